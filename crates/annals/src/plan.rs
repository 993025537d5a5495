//! Declarative upcasting plans: [`Step`]s written in a TOML file, each
//! payload transform a jq filter run by [jaq](https://github.com/01mf02/jaq),
//! so that operators can read history at the current version without
//! compiling code (`annals read --plan FILE`).
//!
//! ```toml
//! [[step]]
//! event_type = "Deposited"
//! from_version = 1
//! rename_to = "MoneyDeposited"          # optional
//! filter = '.amount_cents = (.amount | tonumber * 100) | del(.amount)'
//! ```
//!
//! A plan compiles to the same [`Upcasters`] as Rust steps, validated the same
//! way. Each filter gets the stored payload and must produce exactly one
//! value (one event in, one event out). Behind the `plan` feature, because
//! jaq and a TOML parser are dependencies an application with Rust
//! upcasters does not need.
//!
//! Errors name the file, the step (its index from 1 and its event type) and
//! the line and column in the file: a TOML error where the parser stopped, a
//! filter error where jaq found the fault (exact for filters written as TOML
//! literal strings, `'…'` or `'''…'''`; inside a basic string with escapes
//! the column counts the filter's own characters from the string's start).

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{data, Compiler, Ctx, Vars};
use jaq_json::{Num, Val};
use serde::Deserialize;
use serde_json::Value;

use crate::upcast::{ChainInput, ChainOutput};
use crate::Payload;
use crate::{BoxError, DomainEvent, Step, UpcastError, Upcasters, UpcastersBuilder};

/// Why a plan could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The file could not be read.
    #[error("{}: cannot read the plan: {source}", file.display())]
    Io {
        /// The plan file.
        file: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a plan: TOML that does not parse, or a step with a
    /// missing, unknown or mistyped key.
    #[error("{}:{line}:{column}: {}{message}", file.display(), step_prefix(*step, event_type.as_deref()))]
    Toml {
        /// The plan file.
        file: PathBuf,
        /// The step the error is in (from 1), when the parser got that far.
        step: Option<usize>,
        /// That step's event type, when it has one.
        event_type: Option<String>,
        /// Line in the file (from 1).
        line: usize,
        /// Column in the line (from 1, in characters).
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// A step's filter is not a jq filter jaq can compile.
    #[error("{}:{line}:{column}: step {step} ({event_type} v{from_version}): the filter does not compile: {message}", file.display())]
    Filter {
        /// The plan file.
        file: PathBuf,
        /// The step (from 1).
        step: usize,
        /// The step's event type.
        event_type: String,
        /// The step's stored version.
        from_version: u32,
        /// Line in the file (from 1).
        line: usize,
        /// Column in the line (from 1, in characters).
        column: usize,
        /// What jaq expected or could not find.
        message: String,
    },
    /// A copy-and-transform rule (`[[merge]]`) is wrong: its filter does
    /// not compile (the position is jaq's), it lists no event type, or it
    /// lists a type another `[[merge]]` rule lists (the position is the
    /// rule's).
    #[error("{}:{line}:{column}: {rule}: {message}", file.display())]
    Rule {
        /// The plan file.
        file: PathBuf,
        /// The rule, for example `[[merge]] 1 (StreetChanged, CityChanged)`.
        rule: String,
        /// Line in the file (from 1).
        line: usize,
        /// Column in the line (from 1, in characters).
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// The steps do not form a valid registry (a missing link, a duplicate
    /// step ...), as [`UpcastersBuilder::build`] reports it.
    #[error("{}: {source}", file.display())]
    Invalid {
        /// The plan file.
        file: PathBuf,
        /// What the validation found.
        #[source]
        source: UpcastError,
    },
}

fn step_prefix(step: Option<usize>, event_type: Option<&str>) -> String {
    match (step, event_type) {
        (Some(i), Some(t)) => format!("step {i} ({t}): "),
        (Some(i), None) => format!("step {i}: "),
        _ => String::new(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    #[serde(default)]
    step: Vec<toml::Spanned<PlanStep>>,
    /// Copy-and-transform rules (`annals events migrate`); read commands
    /// ignore them.
    #[serde(default)]
    migrate: Vec<toml::Spanned<MigrateRuleDef>>,
    /// Streams a migration purges; read commands ignore them.
    #[serde(default)]
    purge: Vec<PurgeDef>,
    /// Runs of events a migration merges; read commands ignore them.
    #[serde(default)]
    merge: Vec<toml::Spanned<MergeRuleDef>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MergeRuleDef {
    event_types: toml::Spanned<Vec<String>>,
    filter: toml::Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateRuleDef {
    event_type: String,
    #[serde(default)]
    version: Option<u32>,
    filter: toml::Spanned<String>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct PurgeDef {
    stream: String,
    reason: String,
    #[serde(default = "default_tombstone_type")]
    tombstone_type: String,
    #[serde(default = "default_tombstone_version")]
    tombstone_version: u32,
}

fn default_tombstone_type() -> String {
    "StreamPurged".to_owned()
}

fn default_tombstone_version() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanStep {
    event_type: String,
    from_version: u32,
    #[serde(default)]
    rename_to: Option<String>,
    filter: toml::Spanned<String>,
}

/// A loaded plan: its steps, compiled, ready to
/// [`build`](Plan::build) into [`Upcasters`].
#[derive(Debug)]
pub struct Plan {
    file: PathBuf,
    steps: Vec<Step>,
}

impl Plan {
    /// Reads and compiles the plan in `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Plan, PlanError> {
        let file = path.as_ref().to_owned();
        let text = std::fs::read_to_string(&file).map_err(|source| PlanError::Io {
            file: file.clone(),
            source,
        })?;
        Plan::parse(file, &text)
    }

    /// Compiles the plan `text`, naming it `file` in errors.
    pub fn parse(file: impl Into<PathBuf>, text: &str) -> Result<Plan, PlanError> {
        let file = file.into();
        let parsed = parse_file(&file, text)?;
        let steps = compile_steps(&file, text, parsed.step)?;
        Ok(Plan { file, steps })
    }

    /// The compiled steps, in file order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The plan's steps added to `builder`.
    pub fn into_builder(self, builder: UpcastersBuilder) -> UpcastersBuilder {
        builder.steps(self.steps)
    }

    /// Validates the plan against the application's current versions (see
    /// [`UpcastersBuilder::build`]) and builds the registry.
    pub fn build(self, current: &[(&str, u32)]) -> Result<Upcasters, PlanError> {
        let file = self.file.clone();
        self.into_builder(Upcasters::builder())
            .build(current)
            .map_err(|source| PlanError::Invalid { file, source })
    }

    /// [`build`](Plan::build) against one event enum.
    pub fn build_for<E: DomainEvent>(self) -> Result<Upcasters, PlanError> {
        self.build(&crate::current_versions::<E>())
    }

    /// Builds the registry without the application's types, taking each
    /// chain's end as current (see [`UpcastersBuilder::build_without_types`]).
    pub fn build_without_types(self) -> Result<Upcasters, PlanError> {
        let file = self.file.clone();
        self.into_builder(Upcasters::builder())
            .build_without_types()
            .map_err(|source| PlanError::Invalid { file, source })
    }
}

fn parse_file(file: &Path, text: &str) -> Result<PlanFile, PlanError> {
    toml::from_str(text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start);
        let (line, column) = line_column(text, at);
        // Which step the error is in: the last `[[step]]` header before it.
        let step = text[..at.min(text.len())].matches("[[step]]").count();
        PlanError::Toml {
            file: file.to_owned(),
            step: (step > 0).then_some(step),
            event_type: None,
            line,
            column,
            message: e.message().trim_end().to_owned(),
        }
    })
}

fn compile_steps(
    file: &Path,
    text: &str,
    defs: Vec<toml::Spanned<PlanStep>>,
) -> Result<Vec<Step>, PlanError> {
    let mut steps = Vec::with_capacity(defs.len());
    let mut codes = Vec::with_capacity(defs.len());
    for (i, spanned) in defs.into_iter().enumerate() {
        let index = i + 1;
        let def = spanned.into_inner();
        let filter_span = def.filter.span();
        let code = def.filter.into_inner();
        let filter = JqFilter::compile(&code).map_err(|(offset, message)| {
            let at = filter_offset(text, filter_span.clone(), offset);
            let (line, column) = line_column(text, at);
            PlanError::Filter {
                file: file.to_owned(),
                step: index,
                event_type: def.event_type.clone(),
                from_version: def.from_version,
                line,
                column,
                message,
            }
        })?;
        let label = format!(
            "{}:{} ({} v{})",
            file.display(),
            line_column(text, filter_span.start).0,
            def.event_type,
            def.from_version
        );
        let filter = Arc::new(filter);
        let mut step = Step::new(def.event_type, def.from_version, move |v: Value| {
            filter.run(&v)
        })
        .label(label);
        if let Some(to) = def.rename_to {
            step = step.rename_to(to);
        }
        steps.push(step);
        codes.push(code);
    }
    Ok(fuse_chains(steps, &codes))
}

/// Each step followed by others of the plan (`A v1` → `A v2` → ...) gets
/// the run of them compiled into one filter, so that an event goes through
/// jaq once instead of once per step:
///
/// ```text
/// annals_one(STEP 1) | annals_one(STEP 2) | ... | (LAST STEP)
/// ```
///
/// where `annals_one(f)` (a native only these filters have) passes on `f`'s
/// only value as the next step would receive it (through the same
/// conversion to serde_json and back, see [`as_next_payload`]) and fails
/// otherwise. The result is the steps' when they all succeed; when the
/// chain filter fails, the registry runs the steps one by one on the same
/// payload, so that the error is the failing step's, as without fusion (a
/// filter with side effects such as `debug` then runs twice).
fn fuse_chains(steps: Vec<Step>, codes: &[String]) -> Vec<Step> {
    let find = |event_type: &str, version: u32| {
        steps
            .iter()
            .position(|s| s.event_type() == event_type && s.from_version() == version)
    };
    let mut fused = Vec::with_capacity(steps.len());
    for (i, step) in steps.iter().enumerate() {
        let mut chain = vec![i];
        let mut at = (step.target_type(), step.from_version().saturating_add(1));
        while let Some(j) = find(at.0, at.1) {
            if chain.len() > steps.len() {
                break;
            }
            chain.push(j);
            at = (steps[j].target_type(), at.1.saturating_add(1));
        }
        let target = at.0.to_owned();
        let Some((&last, init)) = chain.split_last() else {
            continue;
        };
        if init.is_empty() {
            fused.push(step.clone());
            continue;
        }
        let mut code = String::new();
        for &j in init {
            code.push_str("annals_one(\n");
            code.push_str(&codes[j]);
            code.push_str("\n) | ");
        }
        code.push_str("(\n");
        code.push_str(&codes[last]);
        code.push_str("\n)");
        let Ok(filter) = JqFilter::compile_with(&code, Natives::Chain) else {
            fused.push(step.clone());
            continue;
        };
        let filter = Arc::new(filter);
        let rest: Vec<&Step> = chain[1..].iter().map(|&j| &steps[j]).collect();
        fused.push(step.clone().fuse(
            &rest,
            target,
            Arc::new(move |input| filter.run_chain(input)),
        ));
    }
    fused
}

/// The byte offset in the file of byte `offset` of a filter whose TOML
/// string value spans `value` (quotes included).
fn filter_offset(text: &str, value: Range<usize>, offset: usize) -> usize {
    let raw = text.get(value.clone()).unwrap_or("");
    let mut skip = if raw.starts_with("'''") || raw.starts_with("\"\"\"") {
        3
    } else {
        1
    };
    // A newline right after a multi-line string's opening quotes is trimmed.
    if skip == 3 {
        if raw[skip..].starts_with("\r\n") {
            skip += 2;
        } else if raw[skip..].starts_with('\n') {
            skip += 1;
        }
    }
    (value.start + skip + offset).min(value.end.saturating_sub(1))
}

/// 1-based line and column (in characters) of byte `at` in `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

type JaqData = data::JustLut<Val>;

mod fast;
mod migration;
pub use migration::{MigrationPlan, MigrationPreview, Migrator};

// Native versions of two definitions that jaq writes in jq, `tonumber` and
// `split/1`, which upcasting filters use on every event (a decimal amount
// split at its point and parsed). Each native gives what the jq definition
// gives, value for value and error for error; the definitions are left out of
// the loaded ones so that a filter calls the natives
// (`natives_match_the_jq_definitions` runs both on the same inputs). The jq
// definitions take a few dozen interpreted steps per call, each a boxed
// iterator; the natives one.
//
// jaq-json: `def tonumber: totype(isnumber; error("cannot parse as number"))`
// with `def totype(p; e): if p then . else fromjson | if p then . else e end
// end` and `def isnumber: . > true and . < ""`.
// jaq-std: `def split($sep): if isstring and ($sep | isstring) then . / $sep
// else error("split input and separator must be strings") end` with `def
// isstring: . >= "" and . < []`.

/// Which natives of this module a filter is compiled with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Natives {
    /// jaq's own jq definitions only (to test the natives against them).
    #[cfg_attr(not(test), allow(dead_code))]
    None,
    /// [`std_natives`] in place of their jq definitions: a step's filter.
    Std,
    /// And [`chain_natives`]: a chain of steps compiled into one filter.
    Chain,
}

/// Whether the definition `name/arity` is replaced by a native of
/// [`std_natives`].
fn is_native(name: &str, arity: usize) -> bool {
    matches!((name, arity), ("tonumber", 0) | ("split", 1))
}

/// `. > true and . < ""`: jaq orders values by type first (null, booleans,
/// numbers, strings, arrays, objects), so this holds for numbers only.
fn is_number(v: &Val) -> bool {
    matches!(v, Val::Num(_))
}

/// `. >= "" and . < []`: text and byte strings.
fn is_string(v: &Val) -> bool {
    matches!(v, Val::TStr(_) | Val::BStr(_))
}

type NativeRun = jaq_core::RunPtr<JaqData>;

fn std_natives() -> impl Iterator<Item = jaq_core::native::Fun<JaqData>> {
    use jaq_core::box_iter::{box_once, then};
    use jaq_core::native::{run, v, Filter};
    use jaq_core::{Error, Exn};
    let funs: [Filter<NativeRun>; 2] = [
        ("tonumber", v(0), |cv| {
            if is_number(&cv.1) {
                return box_once(Ok(cv.1));
            }
            // `fromjson` (jaq-json's native), then `if isnumber then .
            // else error("cannot parse as number") end` on each value.
            let input = cv.1;
            Box::new(
                then(input.try_as_utf8_bytes_owned(), |s| {
                    let fail = move |r: Result<Val, _>| {
                        r.map_err(|e| Error::str(format_args!("cannot parse {input} as JSON: {e}")))
                    };
                    jaq_json::bytes_valrs(s, |s| Box::new(jaq_json::read::parse_many(s).map(fail)))
                })
                .map(|r| match r {
                    Ok(v) if is_number(&v) => Ok(v),
                    Ok(_) => Err(Exn::from(Error::str("cannot parse as number"))),
                    Err(e) => Err(Exn::from(e)),
                }),
            )
        }),
        ("split", v(1), |mut cv| {
            let sep = cv.0.pop_var();
            box_once(if is_string(&cv.1) && is_string(&sep) {
                (cv.1 / sep).map_err(Exn::from)
            } else {
                Err(Exn::from(Error::str(
                    "split input and separator must be strings",
                )))
            })
        }),
    ];
    funs.into_iter().map(run::<JaqData>)
}

/// `annals_one(f)` of [`fuse_chains`]: `f`'s only value as the next step
/// receives it, or an error when `f` fails or gives no value or more than
/// one (the registry then runs the steps one by one, which names the step
/// and says what is wrong).
fn chain_natives() -> impl Iterator<Item = jaq_core::native::Fun<JaqData>> {
    use jaq_core::box_iter::box_once;
    use jaq_core::native::{run, Filter};
    use jaq_core::{Bind, Error, Exn};
    let funs: [Filter<NativeRun>; 1] = [("annals_one", [Bind::Fun(())].into(), |mut cv| {
        let (f, fc) = cv.0.pop_fun();
        let mut outs = f.run((fc, cv.1));
        box_once(match (outs.next(), outs.next()) {
            (Some(Ok(v)), None) => {
                as_next_payload(v).map_err(|e| Exn::from(Error::str(e.to_string())))
            }
            (Some(Err(e)), _) => Err(e),
            _ => Err(Exn::from(Error::str("not one value"))),
        })
    })];
    funs.into_iter().map(run::<JaqData>)
}

/// A step's result as the next step gets it: written to serde_json
/// ([`JqFilter::run`]) and read back ([`to_jaq`]). Values that this leaves
/// as they are (see [`passes_unchanged`]) are not converted.
fn as_next_payload(v: Val) -> Result<Val, BoxError> {
    if passes_unchanged(&v, DIRECT_DEPTH) {
        return Ok(v);
    }
    let value = from_jaq(&v, "the filter's result", "is not a JSON payload")?;
    to_jaq(&value, "the payload")
}

/// Whether `from_jaq` then `to_jaq` give `v` back as it is: null, booleans,
/// machine integers, UTF-8 strings, and arrays and objects of them (objects
/// with their keys in serde_json's order, which the conversion would sort),
/// within the direct conversions' depth. Floats and decimals are not (they
/// come back as decimal literals), nor what is not JSON.
fn passes_unchanged(v: &Val, depth: usize) -> bool {
    let text_ok = |s: &[u8]| std::str::from_utf8(s).is_ok();
    sorted_json_within(
        v,
        depth,
        &|v| match v {
            Val::Null | Val::Bool(_) | Val::Num(Num::Int(_)) => true,
            Val::TStr(s) => text_ok(s),
            _ => false,
        },
        &text_ok,
    )
}

/// Whether `v` is arrays and objects within `depth` levels of values that
/// `leaf` accepts, every object's keys text strings that `key` accepts, in
/// serde_json's (ascending) order.
fn sorted_json_within(
    v: &Val,
    depth: usize,
    leaf: &impl Fn(&Val) -> bool,
    key: &impl Fn(&[u8]) -> bool,
) -> bool {
    match v {
        Val::Arr(items) => depth
            .checked_sub(1)
            .is_some_and(|d| items.iter().all(|v| sorted_json_within(v, d, leaf, key))),
        Val::Obj(obj) => {
            let Some(d) = depth.checked_sub(1) else {
                return false;
            };
            let mut previous: Option<&[u8]> = None;
            for (k, v) in obj.iter() {
                let Val::TStr(k) = k else { return false };
                if !key(k)
                    || previous.is_some_and(|p| p >= &k[..])
                    || !sorted_json_within(v, d, leaf, key)
                {
                    return false;
                }
                previous = Some(&k[..]);
            }
            true
        }
        v => leaf(v),
    }
}

/// A compiled jq filter.
struct JqFilter {
    filter: jaq_core::Filter<JaqData>,
    /// The filter for [`fast::Expr::eval`], when it is in its subset: tried
    /// first, jaq running the filter where it gives up.
    fast: Option<fast::Expr>,
}

impl fmt::Debug for JqFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JqFilter")
    }
}

impl JqFilter {
    /// Compiles `code`; an error is the byte offset in `code` of the fault
    /// and what is wrong there.
    fn compile(code: &str) -> Result<JqFilter, (usize, String)> {
        JqFilter::compile_with(code, Natives::Std)
    }

    /// [`compile`](JqFilter::compile) with the natives `natives` says.
    fn compile_with(code: &str, natives: Natives) -> Result<JqFilter, (usize, String)> {
        let std = natives != Natives::None;
        let defs: Vec<_> = jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs())
            .filter(|d| !(std && is_native(d.name, d.args.len())))
            .collect();
        let jaq_funs: Vec<_> = jaq_core::funs()
            .chain(jaq_std::funs())
            .chain(jaq_json::funs())
            .collect();
        // Whether calls to `name/arity` reach this module's native: jaq
        // resolves a call to a jq definition first, then to the first
        // native of its name and arity, and ours come last.
        let ours = |name: &str, arity: usize| {
            !defs.iter().any(|d| d.name == name && d.args.len() == arity)
                && !jaq_funs.iter().any(|f| f.0 == name && f.1.len() == arity)
        };
        let calls = fast::Calls {
            std: std && ours("tonumber", 0) && ours("split", 1),
            chain: natives == Natives::Chain && ours("annals_one", 1),
        };
        let funs = jaq_funs
            .into_iter()
            .chain(std_natives().filter(|_| std))
            .chain(chain_natives().filter(|_| natives == Natives::Chain));
        let arena = Arena::default();
        let loader = Loader::new(defs.iter().cloned());
        let offset = |part: &str| {
            let base = code.as_ptr() as usize;
            let p = part.as_ptr() as usize;
            if p >= base && p <= base + code.len() {
                p - base
            } else {
                code.len()
            }
        };
        let modules = loader
            .load(&arena, File { code, path: () })
            .map_err(|errors| {
                let first = errors.into_iter().next().map(|(_, e)| e);
                match first {
                    Some(jaq_core::load::Error::Lex(errs)) => match errs.into_iter().next() {
                        Some((expect, found)) => {
                            (offset(found), format!("expected {}", expect.as_str()))
                        }
                        None => (0, "lexing failed".to_owned()),
                    },
                    Some(jaq_core::load::Error::Parse(errs)) => match errs.into_iter().next() {
                        Some((expect, found)) => (
                            offset(found),
                            if found.is_empty() {
                                format!("expected {}, found the end of the filter", expect.as_str())
                            } else {
                                format!("expected {}, found {found:?}", expect.as_str())
                            },
                        ),
                        None => (0, "parsing failed".to_owned()),
                    },
                    Some(jaq_core::load::Error::Io(errs)) => match errs.into_iter().next() {
                        Some((path, message)) => (offset(path), message),
                        None => (0, "loading failed".to_owned()),
                    },
                    None => (0, "loading failed".to_owned()),
                }
            })?;
        let filter = Compiler::default()
            .with_funs(funs)
            .compile(modules)
            .map_err(|errors| {
                let first = errors
                    .into_iter()
                    .next()
                    .and_then(|(_, e)| e.into_iter().next());
                match first {
                    Some((name, undefined)) => (
                        offset(name),
                        format!("undefined {} {name:?}", undefined.as_str()),
                    ),
                    None => (0, "compiling failed".to_owned()),
                }
            })?;
        let fast = fast::Expr::compile(code, calls, &defs);
        Ok(JqFilter { filter, fast })
    }

    /// The filter's only value on `input` by [`fast::Expr::eval`], when
    /// the filter is in its subset and it does not give up.
    fn run_fast(&self, input: &Val) -> Option<Val> {
        self.fast.as_ref()?.eval(input, None)
    }

    /// Runs the filter on one input and returns every value it produces.
    fn run_all(&self, input: Value) -> Result<Vec<Value>, BoxError> {
        let input = to_jaq(&input, "the input")?;
        if let Some(v) = self.run_fast(&input) {
            return Ok(vec![from_jaq(&v, "the filter's result", "is not JSON")?]);
        }
        let ctx = Ctx::<JaqData>::new(&self.filter.lut, Vars::new([]));
        let mut values = Vec::new();
        for out in self.filter.id.run((ctx, input)).map(jaq_core::unwrap_valr) {
            let v = out.map_err(|e| format!("the filter failed: {e}"))?;
            values.push(from_jaq(&v, "the filter's result", "is not JSON")?);
        }
        Ok(values)
    }

    /// [`run`](JqFilter::run) on a chain's input: a value, or a stored
    /// payload's text, read as serde_json reads it (see [`json_to_jaq`]).
    /// Its result is the payload, written directly where
    /// [`writes_alike`] says that gives what the value would.
    fn run_chain(&self, input: ChainInput<'_>) -> Result<ChainOutput, BoxError> {
        let input = match input {
            ChainInput::Value(v) => to_jaq(v, "the payload")?,
            ChainInput::Json(text) => json_to_jaq(text)?,
        };
        let out = self.one_value(input)?;
        if writes_alike(&out, DIRECT_DEPTH) {
            if let Ok(raw) = serde_json::value::to_raw_value(&AsPayload(&out)) {
                return Ok(ChainOutput::Payload(Payload::from(raw)));
            }
        }
        from_jaq(&out, "the filter's result", "is not a JSON payload").map(ChainOutput::Value)
    }

    /// Runs the filter on one payload; it must produce exactly one value.
    fn run(&self, input: &Value) -> Result<Value, BoxError> {
        self.run_val(to_jaq(input, "the payload")?)
    }

    /// [`run`](JqFilter::run) on the payload as jaq's value.
    fn run_val(&self, input: Val) -> Result<Value, BoxError> {
        let out = self.one_value(input)?;
        from_jaq(&out, "the filter's result", "is not a JSON payload")
    }

    /// The filter's only value on `input`, or why there is none.
    fn one_value(&self, input: Val) -> Result<Val, BoxError> {
        if let Some(v) = self.run_fast(&input) {
            return Ok(v);
        }
        let ctx = Ctx::<JaqData>::new(&self.filter.lut, Vars::new([]));
        let mut out = self.filter.id.run((ctx, input)).map(jaq_core::unwrap_valr);
        let first = match out.next() {
            Some(Ok(v)) => v,
            Some(Err(e)) => return Err(format!("the filter failed: {e}").into()),
            None => return Err("the filter produced no value (one event in, one event out)".into()),
        };
        let more = out.count();
        if more > 0 {
            return Err(format!(
                "the filter produced {} values; an upcaster turns one event into one event",
                more + 1
            )
            .into());
        }
        Ok(first)
    }
}

/// Whether [`AsPayload`] writes `v` as [`Payload::from_value`] writes
/// [`from_jaq`]'s value for it, which it accepts: null, booleans, machine
/// integers, finite floats, UTF-8 strings without NUL, and arrays and
/// objects of them (objects with keys in serde_json's order, none of them
/// with NUL or serde_json's private prefix), within the direct conversions'
/// depth (below [`crate::event::MAX_JSON_DEPTH`]).
fn writes_alike(v: &Val, depth: usize) -> bool {
    let text_ok = |s: &[u8]| std::str::from_utf8(s).is_ok() && !s.contains(&0);
    sorted_json_within(
        v,
        depth,
        &|v| match v {
            Val::Null | Val::Bool(_) | Val::Num(Num::Int(_)) => true,
            Val::Num(Num::Float(f)) => f.is_finite(),
            Val::TStr(s) => text_ok(s),
            _ => false,
        },
        &|k| text_ok(k) && !k.starts_with(b"$serde_json::private::"),
    )
}

/// A value [`writes_alike`] accepts, serialized with the calls serde_json's
/// `Value` makes for [`from_jaq`]'s value of it.
struct AsPayload<'a>(&'a Val);

impl serde::Serialize for AsPayload<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeMap, SerializeSeq};
        match self.0 {
            Val::Null => s.serialize_unit(),
            Val::Bool(b) => s.serialize_bool(*b),
            Val::Num(Num::Int(i)) => {
                let i = i64::try_from(*i).map_err(S::Error::custom)?;
                if i >= 0 {
                    s.serialize_u64(i as u64)
                } else {
                    s.serialize_i64(i)
                }
            }
            Val::Num(Num::Float(f)) => s.serialize_f64(*f),
            Val::TStr(b) => s.serialize_str(std::str::from_utf8(b).map_err(S::Error::custom)?),
            Val::Arr(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for v in items.iter() {
                    seq.serialize_element(&AsPayload(v))?;
                }
                seq.end()
            }
            Val::Obj(obj) => {
                let mut map = s.serialize_map(Some(obj.len()))?;
                for (k, v) in obj.iter() {
                    let Val::TStr(k) = k else {
                        return Err(S::Error::custom("a key that is not a string"));
                    };
                    let k = std::str::from_utf8(k).map_err(S::Error::custom)?;
                    map.serialize_entry(k, &AsPayload(v))?;
                }
                map.end()
            }
            _ => Err(S::Error::custom("not a JSON payload")),
        }
    }
}

// Between serde_json and jaq. The meaning of a filter's input and output
// is defined by text: the input is the JSON serde_json writes for the
// value, read by jaq's JSON reader; the output is what jaq prints, read back
// by serde_json. Going through text costs a serialisation and a parse each
// way on every event, so `to_jaq` and `from_jaq` build the value directly,
// the same value the text would give, and fall back to the text for what
// they do not handle exactly (numbers beyond 64 bits, jaq's non-JSON values
// such as NaN or byte strings, invalid UTF-8, deep nesting), so that every
// error and edge case stays the text's. `direct_conversions_match_the_text`
// checks the two against each other.

/// How deep the direct conversions go before leaving a value to the text
/// (well below serde_json's recursion limit of 128, which the text path
/// enforces on filter results).
const DIRECT_DEPTH: usize = 64;

/// `value` as jaq reads serde_json's text of it; an error names it `what`.
fn to_jaq(value: &Value, what: &str) -> Result<Val, BoxError> {
    match to_jaq_direct(value, DIRECT_DEPTH) {
        Some(v) => Ok(v),
        None => to_jaq_text(value, what),
    }
}

fn to_jaq_text(value: &Value, what: &str) -> Result<Val, BoxError> {
    let text = serde_json::to_string(value)?;
    jaq_json::read::parse_single(text.as_bytes())
        .map_err(|e| format!("{what} is not JSON jaq reads: {e}").into())
}

fn to_jaq_direct(value: &Value, depth: usize) -> Option<Val> {
    Some(match value {
        Value::Null => Val::Null,
        Value::Bool(b) => Val::Bool(*b),
        Value::Number(n) => Val::Num(if let Some(u) = n.as_u64() {
            // jaq reads digits as a machine integer, else a big one.
            Num::from_integral(u)
        } else if let Some(i) = n.as_i64() {
            Num::from_integral(i)
        } else {
            // serde_json writes a float with a `.` or an exponent, which
            // jaq keeps as the decimal literal it read.
            Num::Dec(jaq_json::Rc::new(n.to_string()))
        }),
        Value::String(s) => Val::utf8_str(s.clone().into_bytes()),
        Value::Array(items) => {
            let depth = depth.checked_sub(1)?;
            let items = items
                .iter()
                .map(|v| to_jaq_direct(v, depth))
                .collect::<Option<Vec<_>>>()?;
            Val::Arr(jaq_json::Rc::new(items))
        }
        Value::Object(map) => {
            let depth = depth.checked_sub(1)?;
            let mut obj = jaq_json::Map::with_capacity_and_hasher(map.len(), Default::default());
            for (k, v) in map {
                obj.insert(
                    Val::utf8_str(k.clone().into_bytes()),
                    to_jaq_direct(v, depth)?,
                );
            }
            Val::obj(obj)
        }
    })
}

/// The stored payload `text` as [`to_jaq`] gives the value serde_json
/// reads from it, read by serde_json's parser into jaq's value directly
/// (with the calls serde_json's `Value` makes of it, see [`SerdeVal`]).
/// An error where serde_json fails to read a `Value`, or on the key
/// serde_json keeps for its raw values (which its `Value` reads
/// otherwise).
fn json_to_jaq(text: &str) -> Result<Val, serde_json::Error> {
    serde_json::from_str::<SerdeVal>(text).map(|v| v.0)
}

/// jaq's value of what serde_json reads into a `Value`: objects with
/// their keys sorted and the last value of a repeated key (serde_json's
/// map), numbers as [`to_jaq_direct`] converts serde_json's.
struct SerdeVal(Val);

impl<'de> Deserialize<'de> for SerdeVal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SerdeValVisitor).map(SerdeVal)
    }
}

struct SerdeValVisitor;

impl<'de> serde::de::Visitor<'de> for SerdeValVisitor {
    type Value = Val;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Val, E> {
        Ok(Val::Bool(b))
    }

    fn visit_i64<E>(self, i: i64) -> Result<Val, E> {
        // `Number::from(i)`, then `as_u64` before `as_i64`.
        Ok(Val::Num(match u64::try_from(i) {
            Ok(u) => Num::from_integral(u),
            Err(_) => Num::from_integral(i),
        }))
    }

    fn visit_u64<E>(self, u: u64) -> Result<Val, E> {
        Ok(Val::Num(Num::from_integral(u)))
    }

    fn visit_f64<E>(self, f: f64) -> Result<Val, E> {
        Ok(match serde_json::Number::from_f64(f) {
            Some(n) => Val::Num(Num::Dec(jaq_json::Rc::new(n.to_string()))),
            None => Val::Null,
        })
    }

    fn visit_str<E>(self, s: &str) -> Result<Val, E> {
        Ok(Val::utf8_str(s.as_bytes().to_vec()))
    }

    fn visit_string<E>(self, s: String) -> Result<Val, E> {
        Ok(Val::utf8_str(s.into_bytes()))
    }

    fn visit_none<E>(self) -> Result<Val, E> {
        Ok(Val::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Val, D::Error> {
        SerdeVal::deserialize(d).map(|v| v.0)
    }

    fn visit_unit<E>(self) -> Result<Val, E> {
        Ok(Val::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Val, A::Error> {
        let mut items = Vec::new();
        while let Some(SerdeVal(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Val::Arr(jaq_json::Rc::new(items)))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Val, A::Error> {
        use serde::de::Error;
        let mut obj = jaq_json::Map::default();
        let mut sorted = true;
        while let Some(k) = map.next_key::<String>()? {
            if k == "$serde_json::private::RawValue" {
                return Err(A::Error::custom("serde_json's raw value key"));
            }
            let SerdeVal(v) = map.next_value()?;
            sorted &= match obj.last() {
                Some((Val::TStr(p), _)) => p[..] < *k.as_bytes(),
                _ => true,
            };
            // A repeated key keeps its place and takes the last value.
            obj.insert(Val::utf8_str(k.into_bytes()), v);
        }
        if !sorted {
            // serde_json's map: sorted by key (its bytes).
            obj.sort_by(|k1, _, k2, _| match (k1, k2) {
                (Val::TStr(a), Val::TStr(b)) => a[..].cmp(&b[..]),
                _ => std::cmp::Ordering::Equal,
            });
        }
        Ok(Val::obj(obj))
    }
}

/// `value` as serde_json reads jaq's text of it; an error (a value that is
/// not JSON) names `what` and says it `is_not`.
fn from_jaq(value: &Val, what: &str, is_not: &str) -> Result<Value, BoxError> {
    match from_jaq_direct(value, DIRECT_DEPTH) {
        Some(v) => Ok(v),
        None => {
            let text = value.to_string();
            serde_json::from_str(&text).map_err(|e| format!("{what} {text} {is_not}: {e}").into())
        }
    }
}

fn from_jaq_direct(value: &Val, depth: usize) -> Option<Value> {
    Some(match value {
        Val::Null => Value::Null,
        Val::Bool(b) => Value::Bool(*b),
        Val::Num(Num::Int(i)) => Value::from(i64::try_from(*i).ok()?),
        // jaq writes a finite float in the shortest form that reads back
        // as the same float, which serde_json (with `float_roundtrip`)
        // does.
        Val::Num(Num::Float(f)) => Value::Number(serde_json::Number::from_f64(*f)?),
        Val::Num(Num::Dec(d)) => match serde_json::from_str::<Value>(d).ok()? {
            n @ Value::Number(_) => n,
            _ => return None,
        },
        Val::Num(Num::BigInt(_)) => return None,
        Val::TStr(s) => Value::String(std::str::from_utf8(s).ok()?.to_owned()),
        Val::BStr(_) => return None,
        Val::Arr(items) => {
            let depth = depth.checked_sub(1)?;
            Value::Array(
                items
                    .iter()
                    .map(|v| from_jaq_direct(v, depth))
                    .collect::<Option<Vec<_>>>()?,
            )
        }
        Val::Obj(obj) => {
            let depth = depth.checked_sub(1)?;
            let mut map = serde_json::Map::new();
            for (k, v) in obj.iter() {
                let Val::TStr(k) = k else { return None };
                let k = std::str::from_utf8(k).ok()?.to_owned();
                map.insert(k, from_jaq_direct(v, depth)?);
            }
            Value::Object(map)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        Error, EventId, GlobalPosition, Metadata, Payload, RecordedEvent, StreamId, StreamVersion,
    };
    use serde_json::json;

    fn stored(event_type: &str, version: u32, data: Value) -> RecordedEvent {
        RecordedEvent {
            event_id: EventId::new(),
            stream_id: StreamId::parse("Account-1").expect("stream"),
            stream_version: StreamVersion(3),
            global_position: GlobalPosition::from_seq(9),
            event_type: event_type.to_owned(),
            event_version: version,
            data: Payload::from_value(&data).expect("payload"),
            metadata: Metadata::default(),
            recorded_at: chrono::Utc::now(),
            stored_event_version: None,
            stored_event_type: None,
        }
    }

    const PLAN: &str = r#"
[[step]]
event_type = "Deposited"
from_version = 1
rename_to = "MoneyDeposited"
filter = '.amount_cents = (.amount | tonumber * 100 | round) | del(.amount)'

[[step]]
event_type = "MoneyDeposited"
from_version = 2
filter = '''
. + {currency: "EUR"}
'''
"#;

    #[test]
    fn a_plan_compiles_to_upcasters() {
        let u = Plan::parse("plan.toml", PLAN)
            .expect("plan")
            .build(&[("MoneyDeposited", 3)])
            .expect("valid");
        let e = u
            .apply(stored("Deposited", 1, json!({"amount": "12.5"})))
            .expect("upcast");
        assert_eq!(
            (e.event_type.as_str(), e.event_version),
            ("MoneyDeposited", 3)
        );
        assert_eq!(e.data, json!({"amount_cents": 1250, "currency": "EUR"}));
        assert_eq!(e.stored_event_type.as_deref(), Some("Deposited"));
    }

    #[test]
    fn toml_errors_name_the_file_step_and_position() {
        let err = Plan::parse(
            "p.toml",
            "[[step]]\nevent_type = \"A\"\nfrom_version = 1\nfilter = '.'\nbogus = 1\n",
        )
        .expect_err("unknown key");
        assert!(
            matches!(
                &err,
                PlanError::Toml {
                    step: Some(1),
                    line: 5,
                    column: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("p.toml:5:1: step 1: unknown field `bogus`"),
            "{err}"
        );
        let err = Plan::parse(
            "p.toml",
            "[[step]]\nevent_type = \"A\"\nfrom_version = \"x\"\n",
        )
        .expect_err("mistyped");
        assert!(
            matches!(
                &err,
                PlanError::Toml {
                    line: 3,
                    column: 16,
                    ..
                }
            ),
            "{err:?}"
        );
        let err = Plan::parse("p.toml", "[[step]\n").expect_err("syntax");
        assert!(matches!(&err, PlanError::Toml { line: 1, .. }), "{err:?}");
        let err = Plan::load("/nonexistent/plan.toml").expect_err("io");
        assert!(err
            .to_string()
            .starts_with("/nonexistent/plan.toml: cannot read the plan"));
    }

    #[test]
    fn filter_errors_name_the_step_and_position() {
        let plan = "[[step]]\nevent_type = \"A\"\nfrom_version = 1\nfilter = '.a = ('\n\n\
                    [[step]]\nevent_type = \"B\"\nfrom_version = 1\nfilter = '.a | nosuchfn(1)'\n";
        let err = Plan::parse("p.toml", plan).expect_err("parse error");
        assert!(
            matches!(
                &err,
                PlanError::Filter {
                    step: 1,
                    line: 4,
                    column: 17,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("p.toml:4:17: step 1 (A v1): the filter does not compile: expected"),
            "{err}"
        );
        let fixed = plan.replace(".a = (", ".a = 1");
        let err = Plan::parse("p.toml", &fixed).expect_err("undefined");
        assert!(
            matches!(
                &err,
                PlanError::Filter {
                    step: 2,
                    line: 9,
                    column: 16,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("undefined filter \"nosuchfn\""),
            "{err}"
        );
        let err = Plan::parse("p.toml", "[[step]]\nevent_type = \"A\"\nfrom_version = 1\nfilter = '''\n.a |\n  \"unterminated'''\n")
            .expect_err("lex error");
        assert!(
            matches!(
                &err,
                PlanError::Filter {
                    step: 1,
                    line: 6,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn an_invalid_chain_names_the_file() {
        let err = Plan::parse("p.toml", PLAN)
            .expect("plan")
            .build(&[("MoneyDeposited", 4)])
            .expect_err("missing 3 -> 4");
        assert_eq!(
            err.to_string(),
            "p.toml: no upcaster for event type \"MoneyDeposited\" from version 3 to version 4"
        );
    }

    #[test]
    fn a_filter_must_produce_one_value() {
        let u = |filter: &str| {
            Plan::parse(
                "p.toml",
                &format!("[[step]]\nevent_type = \"A\"\nfrom_version = 1\nfilter = '{filter}'\n"),
            )
            .expect("plan")
            .build(&[("A", 2)])
            .expect("valid")
        };
        for (filter, says) in [
            ("empty", "no value"),
            (".a, .b", "2 values"),
            ("error(\"boom\")", "boom"),
            (".a | tonumber", "cannot"),
        ] {
            let err = u(filter)
                .apply(stored("A", 1, json!({"a": "x"})))
                .expect_err(filter);
            let text = err.to_string();
            assert!(text.contains("Account-1 version 3 (position 9)"), "{text}");
            assert!(text.contains("step p.toml:4 (A v1)"), "{text}");
            assert!(
                text.contains(says) || filter.contains("tonumber"),
                "{filter}: {text}"
            );
        }
    }

    /// A plan of one chain, `A` v1 → (renamed) `B` v2 → `B` v3, with
    /// these filters.
    fn chain(f1: &str, f2: &str) -> String {
        format!(
            "[[step]]\nevent_type = \"A\"\nfrom_version = 1\nrename_to = \"B\"\nfilter = '''{f1}'''\n\n\
             [[step]]\nevent_type = \"B\"\nfrom_version = 2\nfilter = '''{f2}'''\n"
        )
    }

    fn upcast_with(steps: Vec<Step>, data: Value) -> std::result::Result<RecordedEvent, String> {
        Upcasters::builder()
            .steps(steps)
            .build(&[("B", 3)])
            .expect("valid")
            .apply(stored("A", 1, data))
            .map_err(|e| {
                let source = std::error::Error::source(&e).map(|s| s.to_string());
                format!("{e} / {source:?}")
            })
    }

    /// A chain of plan steps runs as one filter, and gives what the steps
    /// give one by one: the same payload, type, version and stored type
    /// and version, and the same error naming the same step and event.
    #[test]
    fn a_composed_chain_gives_what_its_steps_give() {
        let cases = [
            ("{b: .a}", "{c: .b}", json!({"a": 1})),
            ("{b: (.a | tonumber)}", "{c: (.b * 2)}", json!({"a": "1.5"})),
            // Floats and decimals reach the next step as serde_json gives them.
            (
                "{b: 0.1, d: 1.50, e: 1e3}",
                "[.b, .d, .e | tostring]",
                json!({}),
            ),
            // Object keys reach the next step in serde_json's order.
            ("{z: 1, a: 2}", "[keys_unsorted[], .[]]", json!({})),
            ("{b: nan}", "{c: (.b == null)}", json!({})),
            ("{b: (\"x\" | tobytes)}", "{c: (.b | type)}", json!({})),
            // Two values of the first step are an error even when the second
            // step keeps one of them.
            (".a[]", "select(. == 1) | {c: .}", json!({"a": [1, 2]})),
            ("empty", "{c: 1}", json!({})),
            (".a, error(\"late\")", "{c: .}", json!({"a": 1})),
            ("error(\"first\")", "{c: .}", json!({})),
            ("{b: .a}", ".b | tonumber", json!({"a": "x"})),
            ("{b: .a}", "error(\"second\")", json!({"a": 1})),
            ("{b: .a}", ".b, .b", json!({"a": 1})),
            ("{(1 | tostring): 1}", "{c: .[\"1\"]}", json!({})),
            (
                "def f: {b: .a}; f",
                "def g: {c: .b}; g # a comment",
                json!({"a": 7}),
            ),
        ];
        for (f1, f2, data) in cases {
            let plan = Plan::parse("p.toml", &chain(f1, f2)).expect("plan");
            let u = Upcasters::builder()
                .steps(plan.steps().to_vec())
                .build(&[("B", 3)])
                .expect("valid");
            assert!(u.is_fused("A", 1), "{f1} | {f2}");
            let fused = upcast_with(plan.steps().to_vec(), data.clone());
            let one_by_one = upcast_with(
                plan.steps().iter().cloned().map(Step::unfused).collect(),
                data,
            );
            match (&fused, &one_by_one) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(
                        (&a.data, &a.event_type, a.event_version),
                        (&b.data, &b.event_type, b.event_version),
                        "{f1} | {f2}"
                    );
                    assert_eq!(
                        (a.stored_event_type.as_deref(), a.stored_event_version),
                        (Some("A"), Some(1)),
                        "{f1} | {f2}"
                    );
                    assert_eq!(
                        (&b.stored_event_type, b.stored_event_version),
                        (&a.stored_event_type, a.stored_event_version)
                    );
                }
                _ => assert_eq!(
                    fused.map(|e| e.data),
                    one_by_one.map(|e| e.data),
                    "{f1} | {f2}"
                ),
            }
        }
    }

    /// An error in the second step of a composed chain names that step and
    /// the event, with its stored type and version.
    #[test]
    fn an_error_in_a_composed_chain_names_its_step() {
        let plan = Plan::parse("p.toml", &chain("{b: .a}", ".b | tonumber")).expect("plan");
        let u = plan.build(&[("B", 3)]).expect("valid");
        assert!(u.is_fused("A", 1));
        let err = u
            .apply(stored("A", 1, json!({"a": "x"})))
            .expect_err("not a number");
        let Error::Upcast(failure) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(failure.step, "p.toml:10 (B v2)");
        assert_eq!(
            (failure.event_type.as_str(), failure.stored_version),
            ("A", 1)
        );
        assert_eq!(
            (failure.stream.as_str(), failure.version, failure.position),
            ("Account-1", StreamVersion(3), GlobalPosition::from_seq(9))
        );
        let text = err.to_string();
        assert!(text.contains("Account-1 version 3 (position 9)"), "{text}");
        assert!(text.contains("step p.toml:10 (B v2)"), "{text}");
        // The first step's error names the first step.
        let u = Plan::parse("p.toml", &chain("error(\"boom\")", "."))
            .expect("plan")
            .build(&[("B", 3)])
            .expect("valid");
        let Err(Error::Upcast(failure)) = u.apply(stored("A", 1, json!({}))) else {
            panic!("the first step fails")
        };
        assert_eq!(failure.step, "p.toml:5 (A v1)");
        assert!(failure.source.to_string().contains("boom"), "{failure:?}");
    }

    /// A plan's step taken into a builder whose next step is not the plan's
    /// runs on its own: the chain transform is dropped.
    #[test]
    fn a_chain_transform_needs_its_steps() {
        let plan = Plan::parse("p.toml", &chain("{b: .a}", "{c: .b}")).expect("plan");
        let u = Upcasters::builder()
            .step(plan.steps()[0].clone())
            .step(Step::new("B", 2, |v: Value| {
                Ok::<_, BoxError>(json!({ "rust": v["b"] }))
            }))
            .build(&[("B", 3)])
            .expect("valid");
        assert!(!u.is_fused("A", 1));
        let e = u.apply(stored("A", 1, json!({"a": 5}))).expect("upcast");
        assert_eq!(e.data, json!({"rust": 5}));
        assert_eq!((e.event_type.as_str(), e.event_version), ("B", 3));
        // From the middle of the chain, one step.
        let u = plan.build(&[("B", 3)]).expect("valid");
        assert!(!u.is_fused("B", 2));
        let e = u.apply(stored("B", 2, json!({"b": 6}))).expect("upcast");
        assert_eq!(e.data, json!({"c": 6}));
        assert_eq!(e.stored_event_type, None);
    }

    fn jaq_outputs(code: &str, input: Val) -> Vec<Val> {
        let filter = JqFilter::compile(code).expect(code);
        let ctx = Ctx::<JaqData>::new(&filter.filter.lut, Vars::new([]));
        filter
            .filter
            .id
            .run((ctx, input))
            .map(jaq_core::unwrap_valr)
            .map(|v| v.expect(code))
            .collect()
    }

    /// Every output of `filter` on `input`, errors as their text.
    fn outputs_of(filter: &JqFilter, input: &Val) -> Vec<Result<String, String>> {
        let ctx = Ctx::<JaqData>::new(&filter.filter.lut, Vars::new([]));
        filter
            .filter
            .id
            .run((ctx, input.clone()))
            .map(jaq_core::unwrap_valr)
            .map(|r| r.map(|v| format!("{v:?}")).map_err(|e| e.to_string()))
            // A run stops at its first error (a JSON reader may go on
            // failing where it stopped).
            .scan(false, |failed, r| {
                let out = (!*failed).then(|| r.clone());
                *failed |= r.is_err();
                out
            })
            .take(20)
            .collect()
    }

    /// Null, booleans and numbers of each kind jaq has: inputs for the
    /// tests that compare two ways of running a filter.
    fn scalar_inputs() -> Vec<Val> {
        vec![
            Val::Null,
            Val::Bool(true),
            Val::Bool(false),
            Val::from(12isize),
            Val::Num(Num::Float(1.5)),
            Val::Num(Num::Float(f64::NAN)),
            Val::Num(Num::Dec(jaq_json::Rc::new("1.50".to_owned()))),
        ]
    }

    /// The natives `tonumber` and `split/1` give what jaq's jq definitions
    /// give: the same values and the same errors, in the same order.
    #[test]
    fn natives_match_the_jq_definitions() {
        let text = |s: &str| Val::utf8_str(s.as_bytes().to_vec());
        let bytes = |s: &str| Val::byte_str(s.as_bytes().to_vec());
        let mut inputs = scalar_inputs();
        inputs.extend([
            bytes("12"),
            bytes("a.b"),
            Val::Arr(jaq_json::Rc::new(vec![text("1")])),
            Val::obj([(text("a"), text("1"))].into_iter().collect()),
        ]);
        for s in [
            "",
            "1",
            "1.00",
            "-0.5",
            " 2 ",
            "1 2",
            "1 x",
            "x",
            "\"1\"",
            "[1]",
            "nan",
            "1e400",
            "123456789012345678901234567890",
            "12.",
            ".5",
            "1,2",
            "a.b.c",
            ".",
            "..",
            "a..b",
            "é.ü",
            "€",
            "true",
        ] {
            inputs.push(text(s));
        }
        for code in [
            "tonumber",
            "[.[]? | tonumber]",
            "split(\".\")",
            "split(\"\")",
            "split(\"..\")",
            "split(\".\", \",\")",
            "split(1)",
            "split(\".\" | tobytes)",
            "tobytes? | split(\".\" | tobytes)",
            "split(empty)",
            "split(error(\"sep\"))",
            ".amount = . | .amount | split(\".\") as $p | {amount_minor: (($p[0] | tonumber) * 100 + ((($p[1] // \"\") + \"00\")[0:2] | tonumber))}",
        ] {
            let native = JqFilter::compile_with(code, Natives::Std).expect(code);
            let jq = JqFilter::compile_with(code, Natives::None).expect(code);
            for input in &inputs {
                assert_eq!(
                    outputs_of(&native, input),
                    outputs_of(&jq, input),
                    "{code} on {input:?}"
                );
            }
        }
    }

    /// Where the direct evaluator gives a value, jaq gives that value and
    /// nothing else, for filters of its subset and around it on inputs of
    /// every kind; and it takes the filters it is meant for.
    #[test]
    fn the_direct_evaluator_matches_jaq() {
        let text = |s: &str| Val::utf8_str(s.as_bytes().to_vec());
        let parse = |s: &str| jaq_json::read::parse_single(s.as_bytes()).expect(s);
        let mut inputs = scalar_inputs();
        inputs.extend([
            Val::byte_str(b"1.2".to_vec()),
            Val::utf8_str(vec![b'a', 0xff, b'.', b'b']),
            Val::obj([(Val::from(1isize), text("x"))].into_iter().collect()),
        ]);
        for s in ["", "1.00", "12", "a.b.c", "é.ü", " 2 ", "1 2", "x", "-0.5"] {
            inputs.push(text(s));
        }
        for s in [
            r#"{"amount": "12.50", "name": "ann", "holder": null}"#,
            r#"{"amount": "7", "a": {"b": [1, "2", null]}, "i": 1, "s": "k"}"#,
            r#"{"amount": "0.5.5", "a": [], "i": -1, "s": "amount"}"#,
            r#"{"amount": 3, "a": false, "i": "x", "amount_minor": 1250}"#,
            r#"{"amount": ".", "a": {"a": {"a": 1}}, "i": 1.5, "k": "a"}"#,
            r#"{"amount": "1e2", "name": "", "a": [[1, 2], {"x": 3}], "i": 9}"#,
            "[0, 1, 2, 3, \"x\", [4]]",
            "[\"a\", \"b\"]",
        ] {
            inputs.push(parse(s));
        }
        // Filters of the subset, then filters outside it.
        let subset = [
            ".",
            "{holder: .name}",
            "{owner: .holder}",
            ".amount | split(\".\") as $p | {amount_minor: (($p[0] | tonumber) * 100 + ((($p[1] // \"\") + \"00\")[0:2] | tonumber))}",
            "{amount: .amount_minor}",
            ".a.b[1]",
            ".[0]",
            ".[1:3]",
            ".[:2]",
            ".[2:]",
            ".[-1:]",
            ".[.i]",
            ".a[.i:]",
            ".[\"a\"]?",
            ".a?.b",
            "-.i",
            "-(.amount | tonumber)",
            "[]",
            "[.a]",
            "{}",
            "{a: 1, b: 2, a: 3}",
            "{(.s): .i, (.k): 2}",
            "{(1): 2}",
            "{name, \"amount\"}",
            ". as $x | {$x}",
            "1 as $x | 2 as $y | {a: [$x], b: $y, c: ($x + $y)}",
            "1 as $x | (2 as $x | $x) + $x",
            "\"a\\(.i)b\\n\\(.a)\"",
            "\"\\(.)\"",
            "\"\"",
            "{a: (.i + 1), b: (.i - 1), c: (.i * 2), d: (.i / 2), e: (.i % 2), f: (.amount + .name)}",
            "{a: (.i < 2), b: (.i == 1), c: (.a != null), d: (.amount >= \"1\")}",
            ".a // .i // \"none\"",
            ".holder // 0",
            "{a: (.a and .i), b: (.a or .i), c: (.x and 1), d: (.x or false)}",
            "if .a then .i elif .i then 2 else 3 end",
            "if .a then .i end",
            "if .a then .i elif .amount then .amount end",
            "tonumber",
            ".amount | tonumber",
            "split(\".\")",
            "split(.s)",
            ".amount | split(\".\")",
            ".amount | split(\".\") | .[0] | tonumber",
            "{a: 1.50, b: 100000000000000000000, c: 1e3, d: -1, e: (0.1 + 0.2)}",
            "{a: 1} + {b: 2} + null",
            "{a: ([[1]] + [2] + [3]), b: (\"ab\" * 2), c: ({} * {})}",
            "(.amount | split(\".\"))[5]",
            // Definitions without arguments are inlined.
            "{a: (.a | not), b: (.i | tostring), c: null, d: true, e: false}",
            "{a: (. | tostring), b: (.i == null)}",
        ];
        let outside = [
            ".[]",
            ".[0], 1",
            "[.a, .i]",
            "def f: 1; f",
            ".a |= 1",
            "length",
            "error(\"x\")",
            "empty",
            "try .a catch 1",
            "reduce .[] as $x (0; . + $x)",
            ". as [$a] | $a",
            "@base64 \"\\(.)\"",
            "recurse",
            "first(.a)",
            ".a | select(.)",
        ];
        for (code, fast) in subset
            .iter()
            .map(|c| (c, true))
            .chain(outside.iter().map(|c| (c, false)))
        {
            let filter = JqFilter::compile(code).expect(code);
            assert_eq!(filter.fast.is_some(), fast, "{code}");
            for input in &inputs {
                let jq = outputs_of(&filter, input);
                if let Some(v) = filter.run_fast(input) {
                    assert_eq!(vec![Ok(format!("{v:?}"))], jq, "{code} on {input:?}");
                }
            }
        }

        // It gives values where the filters succeed.
        let deposit = JqFilter::compile(subset[3]).expect("deposit");
        let input = parse(r#"{"amount": "12.5"}"#);
        assert_eq!(
            deposit.run_fast(&input).map(|v| v.to_string()),
            Some(r#"{"amount_minor":1250}"#.to_owned())
        );

        // Chains: `annals_one`, and the natives of the jq definitions only
        // where those are not loaded.
        for (f1, f2) in [
            ("{b: .a}", "{c: .b}"),
            ("{b: (.amount | tonumber)}", "{c: (.b * 2)}"),
            ("{b: 0.1, d: 1.50, e: 1e3}", "[.b, .d, .e | tostring]"),
            ("{z: 1, a: 2}", "[.z, .a]"),
            ("{b: nan}", "{c: (.b == null)}"),
            ("{b: (\"x\" | tobytes)}", "{c: .b}"),
            ("{b: .i}", "{c: (.b + 1)}"),
            ("{b: .amount | split(\".\")}", "{c: .b[1]}"),
            ("error(\"first\")", "{c: .}"),
            ("{b: .a}", ".b | tonumber"),
        ] {
            let code = format!("annals_one(\n{f1}\n) | (\n{f2}\n)");
            let filter = JqFilter::compile_with(&code, Natives::Chain).expect(&code);
            for input in &inputs {
                let jq = outputs_of(&filter, input);
                if let Some(v) = filter.run_fast(input) {
                    assert_eq!(vec![Ok(format!("{v:?}"))], jq, "{code} on {input:?}");
                }
            }
        }
        let chain = JqFilter::compile_with("annals_one(.a) | .b", Natives::Chain).expect("chain");
        assert!(chain.fast.is_some());
        for natives in [Natives::None, Natives::Std] {
            let code = "annals_one(.a)";
            assert!(JqFilter::compile_with(code, natives).is_err(), "{code}");
        }
        let plain = JqFilter::compile_with("tonumber, split(\".\")", Natives::None).expect("jq");
        assert!(plain.fast.is_none());
    }

    /// A stored payload read into jaq's value directly is the value
    /// serde_json reads from it, converted; and it fails where that fails.
    #[test]
    fn payload_text_read_directly_matches_serde_json() {
        let debug = |v: &Val| format!("{v:?}");
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let deeper = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let texts = [
            r#"{"amount": "12.50"}"#,
            r#"{"amount":"0.50","name":"ann"}"#,
            r#"  { "a" : [1, -2, true, false, null, {"b": "x\ty\u00e9\ud83d\ude00\"\\\/"}] }  "#,
            "0",
            "-1",
            "-0",
            "[1, -0, -0.0, 0.0]",
            "9223372036854775807",
            "-9223372036854775808",
            "9223372036854775808",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775809",
            "123456789012345678901234567890",
            "1.50",
            "1e2",
            "1E2",
            "0.1",
            "1e400",
            "5e-324",
            "\"\"",
            "[]",
            "{}",
            r#"{"a": "\u0000"}"#,
            r#"{"a": 1, "a": 2}"#,
            r#"{"a": 1, "b": 2, "a": 3}"#,
            r#"{"b": 1, "a": 2, "b": 3, "c": {"d": 1, "c": 2}}"#,
            r#"{"é": 1, "z": 2, "Z": 3, "": 4}"#,
            r#""\ud800""#,
            r#""\udc00x""#,
            r#""\ufffd""#,
            "\"\u{fffd}\"",
            &deep,
            &deeper,
            "1 2",
            "",
            "[1,]",
            r#"{"x": 1, "$serde_json::private::RawValue": 2}"#,
        ];
        let mut read = 0;
        for text in texts {
            let via_serde = serde_json::from_str::<Value>(text)
                .map_err(|e| e.to_string())
                .and_then(|v| to_jaq(&v, "the payload").map_err(|e| e.to_string()));
            match json_to_jaq(text) {
                Ok(v) => {
                    read += 1;
                    assert_eq!(Ok(debug(&v)), via_serde.as_ref().map(debug), "{text}");
                }
                // serde_json fails too, or the raw value key.
                Err(e) => assert!(
                    via_serde.is_err() || text.contains("$serde_json::private"),
                    "{text}: {e}"
                ),
            }
        }
        // All but the number out of range, the lone surrogates, the text
        // nested deeper than serde_json reads, the three texts that are
        // not JSON, and the raw value key.
        assert_eq!(read, texts.len() - 8);
    }

    /// A chain's result written directly is the payload its serde_json
    /// value makes, text for text; what that would refuse, or write
    /// otherwise, is not written directly.
    #[test]
    fn payloads_written_directly_match_serde_json() {
        let mut outputs = Vec::new();
        for code in [
            "{amount_minor: 1250}",
            "{z: 1, a: [2, -3, null, true, false, \"x\\u0000\"], m: {}}",
            "{a: \"\\\"\\\\\\n\\t\\u0001\\u007f é 😀 /\"}",
            "[1.5, 0.1 + 0.2, 1e300 * 10, -0.0, 1.0e2, 2.5E-7, 1 / 3, nan]",
            "9223372036854775807, -9223372036854775807 - 1, 100000000000000000000",
            "{(\"k\" | tobytes): 1}, {(1): 2}, {\"$serde_json::private::RawValue\": 1}",
            "{\"a\\u0000\": 1}, (\"abc\" | tobytes), {b: 1, a: 2}, [{b: 1, a: 2}]",
            "[limit(70; repeat(1))] | reduce .[] as $x (0; [.])",
            "[limit(60; repeat(1))] | reduce .[] as $x (0; [.])",
            "1.50, null, true, \"\", [], {}",
            "[0.1 + 0.2, 1 / 3, 1e300 * 10, 0.5 - 1, -(0.5 - 0.5)]",
        ] {
            outputs.extend(jaq_outputs(code, Val::Null));
        }
        outputs.push(Val::utf8_str(vec![b'a', 0xff]));
        let mut direct = 0;
        for v in &outputs {
            let via_value = from_jaq(v, "the result", "is not JSON")
                .map_err(|e| e.to_string())
                .and_then(|value| Payload::from_value(&value).map_err(|e| e.to_string()))
                .map(|p| p.as_str().to_owned());
            if writes_alike(v, DIRECT_DEPTH) {
                direct += 1;
                let raw = serde_json::value::to_raw_value(&AsPayload(v)).expect("written");
                assert_eq!(Ok(raw.get().to_owned()), via_value, "{v:?}");
            }
        }
        // Directly: the first object, the escapes, the two machine
        // integers, the array of floats, the array 60 deep, null, true, "",
        // [] and {}; the rest has a decimal as written, NaN, a big integer,
        // a key that is not a text, the private key, a NUL, a byte string,
        // unsorted keys, nesting too deep or invalid UTF-8.
        assert_eq!(direct, 11, "{outputs:?}");
    }

    /// The direct conversions between serde_json and jaq give what the text
    /// would (the same jaq value, variant for variant, for every input; the
    /// same serde_json value for every output they do not leave to the
    /// text), and ordinary values take the direct path.
    #[test]
    fn direct_conversions_match_the_text() {
        let inputs = [
            r#"{"b": 1, "a": [true, false, null], "c": {"z": "x\u0000y\n\"\u00e9\ud83d\ude00"}}"#,
            "0",
            "-1",
            "9223372036854775807",
            "9223372036854775808",
            "18446744073709551615",
            "-9223372036854775808",
            "1.5",
            "-0.0",
            "1e21",
            "1.0e2",
            "2.5E-7",
            "0.1",
            "123456789012345678901234567890",
            "5e-324",
            "1.7976931348623157e308",
            r#""""#,
            "[]",
            "{}",
            r#"{"amount": "12.50", "name": "ann"}"#,
        ];
        let debug = |v: &Val| format!("{v:?}");
        for text in inputs {
            let value: Value = serde_json::from_str(text).expect(text);
            let direct = to_jaq_direct(&value, DIRECT_DEPTH).expect("the direct path");
            let via_text = to_jaq_text(&value, "the payload").expect("the text");
            assert_eq!(debug(&direct), debug(&via_text), "{text}");
        }
        let deep: Value =
            serde_json::from_str(&format!("{}{}", "[".repeat(100), "]".repeat(100))).expect("deep");
        assert!(to_jaq_direct(&deep, DIRECT_DEPTH).is_none());
        assert_eq!(
            debug(&to_jaq(&deep, "the payload").expect("via the text")),
            debug(&to_jaq_text(&deep, "the payload").expect("text"))
        );

        let input = Val::obj(
            [("a", Val::from(1isize)), ("b", Val::from("x".to_owned()))]
                .into_iter()
                .map(|(k, v)| (Val::from(k.to_owned()), v))
                .collect(),
        );
        let mut outputs = Vec::new();
        for code in [
            ".",
            "{z: .a, a: .b, m: {y: [1, 2.50, null, true]}}",
            "1.5, 1.0e2, 1e400, 2.5E-7, -0.0, 0.1 + 0.2, 1 / 3, 100 * 1.5, 1e300 * 10",
            "9223372036854775807, -9223372036854775807 - 1, 9223372036854775807 + 1",
            "nan, infinite, -infinite, (nan | floor)",
            "\"x\\u0000y\\u007f\\t\\u001fé\", (\"abc\" | tobytes)",
            "{(1): 2}, {(\"k\" | tobytes): 1}",
            "[limit(70; repeat(1))] | reduce .[] as $x (0; [.])",
            "[limit(30; repeat(1))] | reduce .[] as $x (0; [.])",
        ] {
            outputs.extend(jaq_outputs(code, input.clone()));
        }
        outputs.push(Val::utf8_str(vec![b'a', 0xff]));
        outputs.push(Val::obj(
            [(Val::utf8_str(vec![0xfe]), Val::Null)]
                .into_iter()
                .collect(),
        ));
        let mut direct = 0;
        for v in &outputs {
            let text = v.to_string();
            let via_text = serde_json::from_str::<Value>(&text);
            let Some(d) = from_jaq_direct(v, DIRECT_DEPTH) else {
                // Left to the text: `from_jaq` is the text's, error included.
                let got = from_jaq(v, "the result", "is not JSON").map_err(|e| e.to_string());
                let want = via_text.map_err(|e| format!("the result {text} is not JSON: {e}"));
                assert_eq!(got, want, "{text}");
                continue;
            };
            direct += 1;
            let via_text = via_text.expect(&text);
            assert_eq!(d, via_text, "{text}");
            assert_eq!(d.to_string(), via_text.to_string(), "{text}");
        }
        // Everything but the big integer, the non-finite floats, 1e400, the
        // byte strings, the invalid UTF-8, the non-string key and the deep
        // array went the direct way.
        assert_eq!(direct, outputs.len() - 12, "{outputs:?}");
    }
}
