//! A direct evaluator for the filters most plans are made of: one value in,
//! one value out, no generators, no side effects.
//!
//! jaq runs a filter as a tree of boxed iterators, which costs a few dozen
//! allocations and indirect calls per operator even when every operator
//! gives exactly one value. [`Expr`] is a filter of a pure subset of jq
//! (paths, literals, arrays and objects of single values, arithmetic,
//! comparisons, `//`, `and`/`or`, `if`, `as $x` bindings, string
//! interpolation and the natives `tonumber`, `split/1` and `annals_one`),
//! compiled from jaq's own syntax tree, and [`Expr::eval`] gives its value
//! with jaq's operations on jaq's values (`ValT::index`, `ValT::range`,
//! `ops::Math::run`, ...), so that a value it gives is the value jaq gives.
//!
//! It gives up ([`None`]) wherever jaq would give an error, no value or
//! more than one; the caller then runs the filter with jaq from the start,
//! which gives jaq's result, errors included. Since nothing in the subset
//! has side effects, running it first costs nothing but time.
//! `the_direct_evaluator_matches_jaq` checks the two on many filters and
//! inputs.

use jaq_core::load::lex::{StrPart, Token};
use jaq_core::load::parse::{BinaryOp, Def, Pattern, Term};
use jaq_core::load::{Lexer, Parser};
use jaq_core::ops::{Cmp, Math};
use jaq_core::path::Part;
use jaq_core::ValT;
use jaq_json::Val;

/// Which calls [`Expr::compile`] may turn into natives: those whose name
/// and arity the filter's compilation resolves to the natives of
/// `plan.rs` (see [`super::JqFilter::compile_with`]).
#[derive(Clone, Copy)]
pub(super) struct Calls {
    /// `tonumber` and `split/1` are `std_natives`'.
    pub(super) std: bool,
    /// `annals_one/1` is `chain_natives`'.
    pub(super) chain: bool,
}

/// A filter of the subset, its variables resolved.
#[derive(Debug)]
pub(super) enum Expr {
    /// `.`
    Id,
    /// A number or string literal.
    Lit(Val),
    /// `-f`
    Neg(Box<Expr>),
    /// `[]` (`None`) or `[f]`.
    Arr(Option<Box<Expr>>),
    /// `{k1: v1, ..., kn: vn}`: jaq's `{k1: v1} + (... + {kn: vn})`, which
    /// inserts the entries in order.
    Obj(Vec<(Expr, Expr)>),
    /// The interpolated `\(f)` of a string: `f | tostring`.
    ToString(Box<Expr>),
    /// `l | r`
    Pipe(Box<Expr>, Box<Expr>),
    /// `l as $x | r`
    Bind(Box<Expr>, Box<Expr>),
    /// A variable bound by `as`: 0 is the innermost.
    Var(usize),
    Math(Box<Expr>, Math, Box<Expr>),
    Cmp(Box<Expr>, Cmp, Box<Expr>),
    /// `l // r`
    Alt(Box<Expr>, Box<Expr>),
    /// `l or r` (`true`) or `l and r` (`false`).
    Logic(Box<Expr>, bool, Box<Expr>),
    /// `if c then t else e end`
    Ite(Box<Expr>, Box<Expr>, Box<Expr>),
    /// `f[i]`, `f.a`, `f[i:j]`, ... (the indices run on the path's input,
    /// as in jaq).
    Path(Box<Expr>, Vec<Part<Expr>>),
    /// The native `tonumber`.
    ToNumber,
    /// The native `split($sep)`.
    Split(Box<Expr>),
    /// The native `annals_one(f)`.
    One(Box<Expr>),
}

impl Expr {
    /// `code` in the subset, or `None` (some of it is not, or it is not a
    /// plain term). Call only for code jaq compiled, with `calls` saying
    /// which natives its calls resolved to.
    ///
    /// `defs` are the jq definitions the filter was compiled with, in
    /// order: jaq resolves a call to the last of them with its name and
    /// arity (in a definition's body, the last up to that definition), else
    /// to a native. A call to a definition without arguments is its body,
    /// which is in the subset or not as any filter.
    pub(super) fn compile(code: &str, calls: Calls, defs: &[Def<&'static str>]) -> Option<Expr> {
        let tokens: Vec<Token<&str>> = Lexer::new(code).lex().ok()?;
        let term = Parser::new(&tokens).parse(|p| p.term()).ok()?;
        let scope = Scope {
            calls,
            defs,
            visible: defs.len(),
            depth: 0,
        };
        scope.lower(term, &mut Vec::new())
    }

    /// The filter's value on `input`, or `None` where jaq would not give
    /// exactly this one value (an error, no value, several). `env` holds
    /// the values of the variables bound around it (`None` at the top).
    pub(super) fn eval(&self, input: &Val, env: Env<'_>) -> Option<Val> {
        Some(match self {
            Expr::Id => input.clone(),
            Expr::Lit(v) => v.clone(),
            Expr::Neg(f) => (-f.eval(input, env)?).ok()?,
            Expr::Arr(None) => Val::Arr(Default::default()),
            Expr::Arr(Some(f)) => Val::Arr(jaq_json::Rc::new(vec![f.eval(input, env)?])),
            Expr::Obj(entries) => {
                let mut map =
                    jaq_json::Map::with_capacity_and_hasher(entries.len(), Default::default());
                for (k, v) in entries {
                    let k = k.eval(input, env)?;
                    let v = v.eval(input, env)?;
                    map.insert(k, v);
                }
                Val::obj(map)
            }
            Expr::ToString(f) => f.eval(input, env)?.into_string(),
            Expr::Pipe(l, r) => {
                let y = l.eval(input, env)?;
                r.eval(&y, env)?
            }
            Expr::Bind(l, r) => {
                let y = l.eval(input, env)?;
                r.eval(input, Some(&Bound { value: &y, up: env }))?
            }
            Expr::Var(i) => var(env, *i)?.clone(),
            Expr::Math(l, op, r) => {
                let x = l.eval(input, env)?;
                let y = r.eval(input, env)?;
                op.run(x, y).ok()?
            }
            Expr::Cmp(l, op, r) => {
                let x = l.eval(input, env)?;
                let y = r.eval(input, env)?;
                Val::from(op.run(&x, &y))
            }
            Expr::Alt(l, r) => {
                let x = l.eval(input, env)?;
                if x.as_bool() {
                    x
                } else {
                    r.eval(input, env)?
                }
            }
            Expr::Logic(l, stop, r) => {
                if l.eval(input, env)?.as_bool() == *stop {
                    Val::from(*stop)
                } else {
                    Val::from(r.eval(input, env)?.as_bool())
                }
            }
            Expr::Ite(c, t, e) => {
                if c.eval(input, env)?.as_bool() {
                    t.eval(input, env)?
                } else {
                    e.eval(input, env)?
                }
            }
            Expr::Path(f, parts) => {
                // The path's start borrowed where it is the input or a
                // variable (indexing an object or null needs no copy).
                let owned;
                let start: &Val = match &**f {
                    Expr::Id => input,
                    Expr::Var(i) => var(env, *i)?,
                    f => {
                        owned = f.eval(input, env)?;
                        &owned
                    }
                };
                let mut parts = parts.iter();
                let mut v = match parts.next() {
                    None => start.clone(),
                    Some(Part::Index(i)) => match i {
                        Expr::Lit(i) => index_ref(start, i)?,
                        i => index_ref(start, &i.eval(input, env)?)?,
                    },
                    Some(Part::Range(from, upto)) => {
                        range(start.clone(), from.as_ref(), upto.as_ref(), input, env)?
                    }
                };
                for part in parts {
                    v = match part {
                        Part::Index(Expr::Lit(i)) => index_ref(&v, i)?,
                        Part::Index(i) => index_ref(&v, &i.eval(input, env)?)?,
                        Part::Range(from, upto) => {
                            range(v, from.as_ref(), upto.as_ref(), input, env)?
                        }
                    };
                }
                v
            }
            Expr::ToNumber => match input {
                Val::Num(_) => input.clone(),
                // `fromjson`: every JSON value in the text; exactly one,
                // and a number, for a value.
                Val::TStr(s) => {
                    let mut values = jaq_json::read::parse_many(&s[..]);
                    match (values.next(), values.next()) {
                        (Some(Ok(v @ Val::Num(_))), None) => v,
                        _ => return None,
                    }
                }
                _ => return None,
            },
            Expr::Split(sep) => {
                let sep = sep.eval(input, env)?;
                match (input, &sep) {
                    (Val::TStr(_), Val::TStr(_)) | (Val::BStr(_), Val::BStr(_)) => {
                        (input.clone() / sep).ok()?
                    }
                    _ => return None,
                }
            }
            Expr::One(f) => super::as_next_payload(f.eval(input, env)?).ok()?,
        })
    }
}

/// The values of the variables bound around a term, innermost first (on
/// the stack: binding one allocates nothing).
pub(super) type Env<'a> = Option<&'a Bound<'a>>;

/// A variable's value and those bound around it.
pub(super) struct Bound<'a> {
    value: &'a Val,
    up: Env<'a>,
}

/// Variable `i` (0 the innermost) of `env`.
fn var<'a>(mut env: Env<'a>, i: usize) -> Option<&'a Val> {
    for _ in 0..i {
        env = env?.up;
    }
    env.map(|b| b.value)
}

/// `v[i]` as jaq's `ValT::index` gives it, without copying `v` where it is
/// null or an object (jaq's first and object cases).
fn index_ref(v: &Val, i: &Val) -> Option<Val> {
    match v {
        Val::Null => Some(Val::Null),
        Val::Obj(o) => Some(o.get(i).cloned().unwrap_or(Val::Null)),
        v => v.clone().index(i).ok(),
    }
}

/// `v[from:upto]`, the bounds run on `input`.
fn range(
    v: Val,
    from: Option<&Expr>,
    upto: Option<&Expr>,
    input: &Val,
    env: Env<'_>,
) -> Option<Val> {
    let from = match from {
        Some(i) => Some(i.eval(input, env)?),
        None => None,
    };
    let upto = match upto {
        Some(i) => Some(i.eval(input, env)?),
        None => None,
    };
    v.range(from.as_ref()..upto.as_ref()).ok()
}

/// Where a term is lowered: which natives and definitions its calls can
/// reach.
struct Scope<'d> {
    calls: Calls,
    defs: &'d [Def<&'static str>],
    /// How many of `defs` the term sees (all from the filter, those up to
    /// its own from a definition's body).
    visible: usize,
    /// How many definitions' bodies the term is in (a bound on inlining,
    /// for recursive definitions).
    depth: usize,
}

/// How deep calls to definitions are inlined.
const MAX_DEPTH: usize = 8;

impl Scope<'_> {
    fn boxed(&self, t: Term<&str>, vars: &mut Vec<String>) -> Option<Box<Expr>> {
        self.lower(t, vars).map(Box::new)
    }

    /// `t` in the subset; `vars` are the names bound around it, innermost
    /// last.
    fn lower(&self, t: Term<&str>, vars: &mut Vec<String>) -> Option<Expr> {
        Some(match t {
            Term::Id => Expr::Id,
            // jaq: a machine integer where the literal reads as one, else its
            // number from the text.
            Term::Num(n) => Expr::Lit(match n.parse::<isize>() {
                Ok(i) => Val::from(i),
                Err(_) => Val::from_num(n).ok()?,
            }),
            Term::Str(None, parts) => {
                // jaq: the parts summed (`+`) from the right, `""` for none.
                let mut parts = parts
                    .into_iter()
                    .map(|part| {
                        Some(match part {
                            StrPart::Str(s) => Expr::Lit(Val::from(s.to_owned())),
                            StrPart::Char(c) => Expr::Lit(Val::from(c.to_string())),
                            StrPart::Term(f) => Expr::ToString(self.boxed(f, vars)?),
                        })
                    })
                    .collect::<Option<Vec<_>>>()?
                    .into_iter()
                    .rev();
                let last = parts.next().unwrap_or(Expr::Lit(Val::from(String::new())));
                parts.fold(last, |acc, x| {
                    Expr::Math(Box::new(x), Math::Add, Box::new(acc))
                })
            }
            Term::Arr(None) => Expr::Arr(None),
            Term::Arr(Some(f)) => Expr::Arr(Some(self.boxed(*f, vars)?)),
            Term::Obj(entries) => Expr::Obj(
                entries
                    .into_iter()
                    .map(|(k, v)| match (k, v) {
                        // `{$x}`: `{"x": $x}`.
                        (Term::Var(x), None) => {
                            let name = x.strip_prefix('$')?;
                            let v = self.lower(Term::Var(x), vars)?;
                            Some((Expr::Lit(Val::from(name.to_owned())), v))
                        }
                        // `{a}`, `{"a"}`: `{a: .a}`.
                        (k, None) => {
                            let key = self.lower(k.clone(), vars)?;
                            let path = Expr::Path(
                                Box::new(Expr::Id),
                                vec![Part::Index(self.lower(k, vars)?)],
                            );
                            Some((key, path))
                        }
                        (k, Some(v)) => Some((self.lower(k, vars)?, self.lower(v, vars)?)),
                    })
                    .collect::<Option<Vec<_>>>()?,
            ),
            Term::Neg(f) => Expr::Neg(self.boxed(*f, vars)?),
            Term::BinOp(l, op, r) => match op {
                BinaryOp::Pipe(None) => Expr::Pipe(self.boxed(*l, vars)?, self.boxed(*r, vars)?),
                BinaryOp::Pipe(Some(Pattern::Var(x))) => {
                    let l = self.boxed(*l, vars)?;
                    vars.push(x.to_owned());
                    let r = self.boxed(*r, vars);
                    vars.pop();
                    Expr::Bind(l, r?)
                }
                BinaryOp::Alt => Expr::Alt(self.boxed(*l, vars)?, self.boxed(*r, vars)?),
                BinaryOp::Or => Expr::Logic(self.boxed(*l, vars)?, true, self.boxed(*r, vars)?),
                BinaryOp::And => Expr::Logic(self.boxed(*l, vars)?, false, self.boxed(*r, vars)?),
                BinaryOp::Math(op) => Expr::Math(self.boxed(*l, vars)?, op, self.boxed(*r, vars)?),
                BinaryOp::Cmp(op) => Expr::Cmp(self.boxed(*l, vars)?, op, self.boxed(*r, vars)?),
                _ => return None,
            },
            Term::IfThenElse(if_thens, else_) => {
                // jaq: `elif`s nested from the last, `.` for a missing `else`.
                let mut acc = match else_ {
                    Some(e) => self.lower(*e, vars)?,
                    None => Expr::Id,
                };
                let if_thens = if_thens
                    .into_iter()
                    .map(|(c, t)| Some((self.lower(c, vars)?, self.lower(t, vars)?)))
                    .collect::<Option<Vec<_>>>()?;
                for (c, t) in if_thens.into_iter().rev() {
                    acc = Expr::Ite(Box::new(c), Box::new(t), Box::new(acc));
                }
                acc
            }
            Term::Var(x) => {
                let i = vars.iter().rev().position(|v| v == x)?;
                Expr::Var(i)
            }
            Term::Call(name, args) => {
                let arity = args.len();
                if let Some(j) = self.defs[..self.visible]
                    .iter()
                    .rposition(|d| d.name == name && d.args.len() == arity)
                {
                    if arity > 0 || self.depth >= MAX_DEPTH {
                        return None;
                    }
                    // The body sees its own variables only.
                    let scope = Scope {
                        visible: j + 1,
                        depth: self.depth + 1,
                        ..*self
                    };
                    return scope.lower(self.defs[j].body.clone(), &mut Vec::new());
                }
                let mut args = args.into_iter();
                match (name, arity) {
                    ("tonumber", 0) if self.calls.std => Expr::ToNumber,
                    ("split", 1) if self.calls.std => Expr::Split(self.boxed(args.next()?, vars)?),
                    ("annals_one", 1) if self.calls.chain => {
                        Expr::One(self.boxed(args.next()?, vars)?)
                    }
                    _ => return None,
                }
            }
            Term::Path(f, path) => {
                let f = self.boxed(*f, vars)?;
                let parts = path
                    .0
                    .into_iter()
                    .map(|(part, _opt)| match part {
                        // `.[]` iterates.
                        Part::Range(None, None) => None,
                        Part::Index(i) => Some(Part::Index(self.lower(i, vars)?)),
                        Part::Range(from, upto) => Some(Part::Range(
                            from.map(|i| self.lower(i, vars))
                                .map_or(Some(None), |e| e.map(Some))?,
                            upto.map(|i| self.lower(i, vars))
                                .map_or(Some(None), |e| e.map(Some))?,
                        )),
                    })
                    .collect::<Option<Vec<_>>>()?;
                Expr::Path(f, parts)
            }
            _ => return None,
        })
    }
}
