//! The copy-and-transform part of a plan (`annals events migrate`).
//!
//! Besides `[[step]]` (read-time upcasters: one event in, one out), a plan
//! may hold:
//!
//! ```toml
//! [[migrate]]
//! event_type = "AddressChanged"   # matched after the [[step]] chain ran
//! version = 2                     # optional: any version when absent
//! # Input: {type, version, data, stream, stream_version, metadata}.
//! # Each value is one event {type?, version?, data}; no value drops it.
//! filter = '{type: "StreetChanged", data: {street: .data.street}}, {type: "CityChanged", data: {city: .data.city}}'
//!
//! [[merge]]
//! event_types = ["StreetChanged", "CityChanged"]  # matched after the [[step]] chain
//! # Input: the array of the run's events, each as a [[migrate]] filter
//! # gets it. Each value is one event {type?, version?, data}.
//! filter = '{type: "AddressChanged", data: (map(.data) | add)}'
//!
//! [[purge]]
//! stream = "Account-7"
//! reason = "closed, retention expired"
//! tombstone_type = "StreamPurged" # optional (default StreamPurged, version 1)
//! ```
//!
//! Each source event is taken through: a purge (the first event of a purged
//! stream becomes its tombstone `{reason}`, the others are dropped), the
//! `[[step]]` chain, then a `[[merge]]` rule listing its type, else the
//! first `[[migrate]]` rule whose type (and version) match. A value's
//! `type` and `version` default to the input's. One value keeps the event's
//! id; several get ids derived from it
//! ([`derived_event_id`](crate::derived_event_id)); each keeps the source's
//! metadata and `recorded_at`.
//!
//! # Merging
//!
//! A *run* of a `[[merge]]` rule is a maximal sequence of events of one
//! stream that are consecutive in their stream and adjacent in the global
//! order (no event of any stream between them: recorded together,
//! typically by one command), each of a type the rule lists. A type may be
//! listed by one `[[merge]]` rule only. A run of two or more events goes
//! through the rule's filter once, with the array of the members as input;
//! a run of one event is not merged: it goes on to the `[[migrate]]` rules
//! as if no `[[merge]]` rule listed its type. The values' `type` and
//! `version` default to the first member's; each value keeps the first
//! member's metadata and `recorded_at`, and one value keeps the first
//! member's id (the others are removed), while none or several get ids
//! derived from the first member's, as for a split. A run is never cut:
//! [`Migrator::migrate`] holds an open run back until the event after it
//! shows that it ended (so a batch boundary never falls inside one, and
//! the checkpoint stays before it), and [`Migrator::finish`] ends the last
//! one when no event is left (the swap, which copies the tail with the
//! appends held off).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use super::{compile_steps, filter_offset, line_column, parse_file, JqFilter, PlanError, PurgeDef};
use crate::{
    canonical_json, derived_event_id, BoxError, Error, Fingerprint, MigratedEvent, MigratedSource,
    MigrationCheckFailure, Payload, RecordedEvent, Result, StreamId, StreamVersion, UpcastFailure,
    Upcasters,
};

struct Rule {
    event_type: String,
    version: Option<u32>,
    label: String,
    filter: JqFilter,
}

struct MergeRule {
    label: String,
    filter: JqFilter,
}

/// A plan loaded for a copy-and-transform migration: its `[[step]]` chain,
/// `[[migrate]]` and `[[merge]]` rules and `[[purge]]`s (see the module docs
/// of [`Plan`](crate::Plan) and the README's "Schema evolution").
pub struct MigrationPlan {
    file: PathBuf,
    text: String,
    upcasters: Upcasters,
    rules: Vec<Rule>,
    merges: Vec<MergeRule>,
    /// The `[[merge]]` rule (index into `merges`) listing each type.
    merge_of: HashMap<String, usize>,
    purges: HashMap<String, PurgeDef>,
}

impl std::fmt::Debug for MigrationPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationPlan")
            .field("file", &self.file)
            .field("rules", &self.rules.len())
            .field("merges", &self.merges.len())
            .field("purges", &self.purges.len())
            .finish()
    }
}

/// What the plan makes of one event, before versions are assigned.
#[derive(Clone, PartialEq, Debug)]
pub(crate) struct Planned {
    event_type: String,
    event_version: u32,
    data: Value,
}

/// An event as the `[[step]]` chain leaves it: what the rules see.
struct Staged {
    event: RecordedEvent,
    event_type: String,
    event_version: u32,
    data: Value,
}

impl Staged {
    /// The input object of a filter.
    fn input(&self) -> Value {
        json!({
            "type": self.event_type,
            "version": self.event_version,
            "data": self.data,
            "stream": self.event.stream_id.as_str(),
            "stream_version": self.event.stream_version.0,
            "metadata": self.event.metadata.to_value(),
        })
    }
}

/// A failure of a plan's transform on `event`.
fn failure(event: &RecordedEvent, label: &str, source: BoxError) -> Error {
    Error::Upcast(Box::new(UpcastFailure {
        stream: event.stream_id.clone(),
        version: event.stream_version,
        position: event.global_position,
        event_type: event.event_type.clone(),
        stored_version: event.event_version,
        step: label.to_owned(),
        source,
    }))
}

impl MigrationPlan {
    /// Reads and compiles the plan in `path`.
    pub fn load(path: impl AsRef<Path>) -> std::result::Result<Self, PlanError> {
        let file = path.as_ref().to_owned();
        let text = std::fs::read_to_string(&file).map_err(|source| PlanError::Io {
            file: file.clone(),
            source,
        })?;
        Self::parse(file, &text)
    }

    /// Compiles the plan `text`, naming it `file` in errors. The `[[step]]`
    /// chain is validated without the application's types (each chain's
    /// end is current), as `--plan` on the read commands is.
    pub fn parse(file: impl Into<PathBuf>, text: &str) -> std::result::Result<Self, PlanError> {
        let file = file.into();
        let parsed = parse_file(&file, text)?;
        let steps = compile_steps(&file, text, parsed.step)?;
        let upcasters = Upcasters::builder()
            .steps(steps)
            .build_without_types()
            .map_err(|source| PlanError::Invalid {
                file: file.clone(),
                source,
            })?;
        let mut rules = Vec::with_capacity(parsed.migrate.len());
        for (i, spanned) in parsed.migrate.into_iter().enumerate() {
            let def = spanned.into_inner();
            let span = def.filter.span();
            let code = def.filter.into_inner();
            let filter = JqFilter::compile(&code).map_err(|(offset, message)| {
                let (line, column) = line_column(text, filter_offset(text, span.clone(), offset));
                PlanError::Filter {
                    file: file.clone(),
                    step: i + 1,
                    event_type: def.event_type.clone(),
                    from_version: def.version.unwrap_or(0),
                    line,
                    column,
                    message: format!("[[migrate]] {message}"),
                }
            })?;
            rules.push(Rule {
                label: format!(
                    "{}:{} ([[migrate]] {})",
                    file.display(),
                    line_column(text, span.start).0,
                    def.event_type
                ),
                event_type: def.event_type,
                version: def.version,
                filter,
            });
        }
        let mut merges = Vec::with_capacity(parsed.merge.len());
        let mut merge_of = HashMap::new();
        for (i, spanned) in parsed.merge.into_iter().enumerate() {
            let def = spanned.into_inner();
            let types_span = def.event_types.span();
            let types = def.event_types.into_inner();
            let rule = format!("[[merge]] {} ({})", i + 1, types.join(", "));
            let error = |at: usize, message: String| {
                let (line, column) = line_column(text, at);
                PlanError::Rule {
                    file: file.clone(),
                    rule: rule.clone(),
                    line,
                    column,
                    message,
                }
            };
            if types.is_empty() {
                return Err(error(
                    types_span.start,
                    "`event_types` lists no event type".into(),
                ));
            }
            for t in &types {
                match merge_of.insert(t.clone(), i) {
                    Some(j) if j != i => {
                        return Err(error(
                            types_span.start,
                            format!("{t} is listed by [[merge]] {} too", j + 1),
                        ))
                    }
                    _ => {}
                }
            }
            let span = def.filter.span();
            let code = def.filter.into_inner();
            let filter = JqFilter::compile(&code).map_err(|(offset, message)| {
                error(
                    filter_offset(text, span.clone(), offset),
                    format!("the filter does not compile: {message}"),
                )
            })?;
            merges.push(MergeRule {
                label: format!(
                    "{}:{} ([[merge]] {})",
                    file.display(),
                    line_column(text, span.start).0,
                    types.join(", ")
                ),
                filter,
            });
        }
        let purges = parsed
            .purge
            .into_iter()
            .map(|p| (p.stream.clone(), p))
            .collect();
        Ok(MigrationPlan {
            file,
            text: text.to_owned(),
            upcasters,
            rules,
            merges,
            merge_of,
            purges,
        })
    }

    /// The plan file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The plan's text (recorded with a run, so that the swap uses it).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The tombstone (or nothing) of an event of a purged stream.
    fn purged(&self, event: &RecordedEvent) -> Option<Vec<Planned>> {
        let purge = self.purges.get(event.stream_id.as_str())?;
        Some(if event.stream_version == StreamVersion(1) {
            vec![Planned {
                event_type: purge.tombstone_type.clone(),
                event_version: purge.tombstone_version,
                data: json!({ "reason": purge.reason }),
            }]
        } else {
            Vec::new()
        })
    }

    /// `event` (as stored) through the `[[step]]` chain.
    fn stage(&self, event: RecordedEvent) -> Result<Staged> {
        let current = self.upcasters.apply_ref(&event)?;
        let data = current
            .data
            .to_value()
            .map_err(|e| failure(&event, "reading the payload", e.into()))?;
        Ok(Staged {
            event_type: current.event_type,
            event_version: current.event_version,
            data,
            event,
        })
    }

    /// What the `[[migrate]]` rules make of one staged event.
    fn plan_single(&self, staged: &Staged) -> Result<Vec<Planned>> {
        let rule = self.rules.iter().find(|r| {
            r.event_type == staged.event_type && r.version.is_none_or(|v| v == staged.event_version)
        });
        let Some(rule) = rule else {
            return Ok(vec![Planned {
                event_type: staged.event_type.clone(),
                event_version: staged.event_version,
                data: staged.data.clone(),
            }]);
        };
        let values = rule
            .filter
            .run_all(staged.input())
            .map_err(|e| failure(&staged.event, &rule.label, e))?;
        planned_values(values, staged, &rule.label)
    }

    /// What `[[merge]]` rule `rule` makes of a run (two or more events).
    fn plan_run(&self, rule: usize, run: &[Staged]) -> Result<Vec<Planned>> {
        let first = &run[0];
        let merge = &self.merges[rule];
        let label = format!("{}, a run of {} events", merge.label, run.len());
        let input = Value::Array(run.iter().map(Staged::input).collect());
        let values = merge
            .filter
            .run_all(input)
            .map_err(|e| failure(&first.event, &label, e))?;
        planned_values(values, first, &label)
    }
}

/// A filter's values as events; `type` and `version` default to `like`'s.
fn planned_values(values: Vec<Value>, like: &Staged, label: &str) -> Result<Vec<Planned>> {
    let fail = |why: String| failure(&like.event, label, why.into());
    values
        .into_iter()
        .map(|v| {
            let Value::Object(mut o) = v else {
                return Err(fail(format!(
                    "a value is not an object {{type, version, data}}: {v}"
                )));
            };
            let data = o
                .remove("data")
                .ok_or_else(|| fail("a value has no `data`".into()))?;
            let event_type = match o.remove("type") {
                None => like.event_type.clone(),
                Some(Value::String(t)) => t,
                Some(t) => return Err(fail(format!("`type` {t} is not a string"))),
            };
            let event_version = match o.remove("version") {
                None => like.event_version,
                Some(v) => v
                    .as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .filter(|v| *v > 0)
                    .ok_or_else(|| fail(format!("`version` {v} is not a positive integer")))?,
            };
            if let Some(k) = o.keys().next() {
                return Err(fail(format!("unknown key `{k}` in a value")));
            }
            Ok(Planned {
                event_type,
                event_version,
                data,
            })
        })
        .collect()
}

/// A check of each migrated event against the current code (the CLI's
/// registered types): `Err(why)` fails the run naming the event.
pub type EventCheck = Arc<dyn Fn(&RecordedEvent) -> std::result::Result<(), String> + Send + Sync>;

/// A run of a `[[merge]]` rule that the next event may still extend.
struct OpenRun {
    rule: usize,
    members: Vec<Staged>,
}

impl OpenRun {
    /// Whether `event`, the next event in global order, extends the run.
    fn extended_by(&self, rule: usize, event: &RecordedEvent) -> bool {
        let last = &self.members[self.members.len() - 1].event;
        self.rule == rule
            && last.stream_id == event.stream_id
            && last.stream_version.0.checked_add(1) == Some(event.stream_version.0)
    }
}

/// What the plan makes of one event, or of a merged run.
struct Unit {
    /// The source events: one, or the run's members in order.
    members: Vec<RecordedEvent>,
    planned: Vec<Planned>,
    /// One event, copied as it is.
    unchanged: bool,
    /// The (first) source's id stays with the one event planned.
    keeps_id: bool,
}

impl Unit {
    fn event_id(&self, index: usize) -> crate::EventId {
        let first = self.members[0].event_id;
        if self.keeps_id {
            first
        } else {
            derived_event_id(first, index as u64)
        }
    }
}

/// What `--dry-run` shows of one event, or of one merged run
/// ([`Migrator::preview`]).
#[derive(Clone, PartialEq, Debug)]
pub struct MigrationPreview {
    /// The source events as stored: one, or a merged run's members.
    pub before: Vec<RecordedEvent>,
    /// What they become, without new versions or positions (each keeps the
    /// first source's).
    pub after: Vec<RecordedEvent>,
    /// Whether the event is copied as it is (one event, same type, version
    /// and payload).
    pub unchanged: bool,
}

/// Runs a [`MigrationPlan`] over the source events in global order, keeping
/// each changed stream's version delta and the `[[merge]]` run still open,
/// and turns them into [`MigratedSource`]s for
/// [`EventMigration::write_migration_batch`](crate::EventMigration::write_migration_batch).
///
/// Feed it every event after the checkpoint, in global order, and no other:
/// a run's members must be adjacent in that order.
pub struct Migrator {
    plan: Arc<MigrationPlan>,
    deltas: HashMap<StreamId, i64>,
    check: Option<EventCheck>,
    open: Option<OpenRun>,
}

impl Migrator {
    /// A migrator resuming with the deltas a run recorded.
    pub fn new(plan: Arc<MigrationPlan>, deltas: Vec<(StreamId, i64)>) -> Self {
        Migrator {
            plan,
            deltas: deltas.into_iter().collect(),
            check: None,
            open: None,
        }
    }

    /// Checks every written event with `check` (decoding with the current
    /// code); a failure is [`Error::MigrationCheck`] naming the event.
    pub fn with_check(
        mut self,
        check: impl Fn(&RecordedEvent) -> std::result::Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.check = Some(Arc::new(check));
        self
    }

    /// The source events held back in a `[[merge]]` run the next event may
    /// extend (not returned by [`migrate`](Migrator::migrate) yet).
    pub fn held(&self) -> usize {
        self.open.as_ref().map_or(0, |o| o.members.len())
    }

    /// Takes the next event (as stored) and returns the units it completes:
    /// the open run it ends, and the event itself unless it opens or extends
    /// a run.
    fn feed(&mut self, event: RecordedEvent) -> Result<Vec<Unit>> {
        let mut units = Vec::new();
        if let Some(planned) = self.plan.purged(&event) {
            self.close(&mut units)?;
            units.push(Unit {
                members: vec![event],
                planned,
                unchanged: false,
                keeps_id: false,
            });
            return Ok(units);
        }
        let staged = self.plan.stage(event)?;
        match self.plan.merge_of.get(&staged.event_type).copied() {
            Some(rule) => {
                if let Some(open) = &mut self.open {
                    if open.extended_by(rule, &staged.event) {
                        open.members.push(staged);
                        return Ok(units);
                    }
                }
                self.close(&mut units)?;
                self.open = Some(OpenRun {
                    rule,
                    members: vec![staged],
                });
            }
            None => {
                self.close(&mut units)?;
                units.push(self.single(staged)?);
            }
        }
        Ok(units)
    }

    /// Ends the open run, if any, into `units`.
    fn close(&mut self, units: &mut Vec<Unit>) -> Result<()> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let mut members = open.members;
        if members.len() == 1 {
            if let Some(staged) = members.pop() {
                units.push(self.single(staged)?);
            }
            return Ok(());
        }
        let planned = self.plan.plan_run(open.rule, &members)?;
        units.push(Unit {
            keeps_id: planned.len() == 1,
            planned,
            unchanged: false,
            members: members.into_iter().map(|s| s.event).collect(),
        });
        Ok(())
    }

    fn single(&self, staged: Staged) -> Result<Unit> {
        let planned = self.plan.plan_single(&staged)?;
        let unchanged = is_unchanged(&staged.event, &planned);
        Ok(Unit {
            keeps_id: planned.len() == 1,
            unchanged,
            planned,
            members: vec![staged.event],
        })
    }

    /// What `event` (as stored) and the run it ends become, as events
    /// without positions (for `--dry-run`; the deltas are not used).
    /// Call [`preview_finish`](Migrator::preview_finish) after the last.
    pub fn preview(&mut self, event: RecordedEvent) -> Result<Vec<MigrationPreview>> {
        let units = self.feed(event)?;
        units.into_iter().map(preview_of).collect()
    }

    /// The preview of the run still open after the last event.
    pub fn preview_finish(&mut self) -> Result<Vec<MigrationPreview>> {
        let mut units = Vec::new();
        self.close(&mut units)?;
        units.into_iter().map(preview_of).collect()
    }

    /// What `event` (as stored) becomes in the copy, with the open
    /// `[[merge]]` run it ends: one [`MigratedSource`] per source event,
    /// in order. Empty while `event` opens or extends a run (see
    /// [`held`](Migrator::held)): a batch written then ends before the run,
    /// whose members come back, whole, with the event after it (or from
    /// [`finish`](Migrator::finish)).
    pub fn migrate(&mut self, event: RecordedEvent) -> Result<Vec<MigratedSource>> {
        let units = self.feed(event)?;
        let mut out = Vec::new();
        for unit in units {
            out.extend(self.write(unit)?);
        }
        Ok(out)
    }

    /// Ends the run still open after the last event (call it only when no
    /// event can follow: in the swap, which holds appends off).
    pub fn finish(&mut self) -> Result<Vec<MigratedSource>> {
        let mut units = Vec::new();
        self.close(&mut units)?;
        let mut out = Vec::new();
        for unit in units {
            out.extend(self.write(unit)?);
        }
        Ok(out)
    }

    fn write(&mut self, unit: Unit) -> Result<Vec<MigratedSource>> {
        let first = &unit.members[0];
        let stream = first.stream_id.clone();
        let before = self.deltas.get(&stream).copied().unwrap_or(0);
        let metadata =
            canonical_json(&first.metadata.to_value()).map_err(|e| Error::InvalidEvent {
                stream: stream.clone(),
                reason: format!("the metadata is {e}"),
            })?;
        let mut events = Vec::with_capacity(unit.planned.len());
        for (i, p) in unit.planned.iter().enumerate() {
            let version = i64::try_from(first.stream_version.0)
                .unwrap_or(i64::MAX)
                .saturating_add(before)
                .saturating_add(i as i64);
            let stream_version = StreamVersion(u64::try_from(version).unwrap_or(0));
            let event_id = unit.event_id(i);
            let (data, fingerprint) = if unit.unchanged {
                (first.data.as_str().to_owned(), None)
            } else {
                let text = canonical_json(&p.data).map_err(|e| Error::InvalidEvent {
                    stream: stream.clone(),
                    reason: format!("the migrated payload is {e}"),
                })?;
                let fp = Fingerprint::of_canonical(&text);
                (text, Some(fp))
            };
            if let Some(check) = &self.check {
                let out = RecordedEvent {
                    event_id,
                    stream_version,
                    event_type: p.event_type.clone(),
                    event_version: p.event_version,
                    data: Payload::from_value(&p.data).map_err(|e| Error::Encode {
                        what: format!("the migrated payload of {}", p.event_type),
                        source: e,
                    })?,
                    stored_event_type: None,
                    stored_event_version: None,
                    ..first.clone()
                };
                check(&out).map_err(|why| {
                    Error::MigrationCheck(Box::new(MigrationCheckFailure {
                        stream: stream.clone(),
                        version: Some(stream_version),
                        position: Some(first.global_position),
                        what: format!(
                            "event {event_id} of type {:?} v{} does not decode with the current code: {why}",
                            p.event_type, p.event_version
                        ),
                    }))
                })?;
            }
            events.push(MigratedEvent {
                event_id,
                stream_id: stream.clone(),
                stream_version,
                event_type: p.event_type.clone(),
                event_version: p.event_version,
                data,
                metadata: metadata.clone(),
                fingerprint,
                recorded_at: first.recorded_at,
            });
        }
        let k = unit.members.len();
        let after = before + unit.planned.len() as i64 - k as i64;
        if after != before {
            self.deltas.insert(stream.clone(), after);
        }
        let mut events = Some(events);
        Ok(unit
            .members
            .iter()
            .enumerate()
            .map(|(j, m)| MigratedSource {
                source: m.global_position,
                removed: (j > 0 || !unit.keeps_id)
                    .then(|| (m.event_id, m.stream_id.clone(), m.stream_version)),
                events: if j == 0 {
                    events.take().unwrap_or_default()
                } else {
                    Vec::new()
                },
                delta: (j + 1 == k && after != before).then(|| (stream.clone(), after)),
            })
            .collect())
    }
}

fn preview_of(unit: Unit) -> Result<MigrationPreview> {
    let first = &unit.members[0];
    let after = unit
        .planned
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Ok(RecordedEvent {
                event_id: unit.event_id(i),
                event_type: p.event_type.clone(),
                event_version: p.event_version,
                data: Payload::from_value(&p.data).map_err(|e| Error::Encode {
                    what: format!("the migrated payload of {}", first.event_type),
                    source: e,
                })?,
                stored_event_type: None,
                stored_event_version: None,
                ..first.clone()
            })
        })
        .collect::<Result<_>>()?;
    Ok(MigrationPreview {
        after,
        unchanged: unit.unchanged,
        before: unit.members,
    })
}

fn is_unchanged(event: &RecordedEvent, planned: &[Planned]) -> bool {
    match planned {
        [p] => {
            p.event_type == event.event_type
                && p.event_version == event.event_version
                && event
                    .data
                    .to_value()
                    .is_ok_and(|stored| crate::idempotency::same_json(&stored, &p.data))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EventId, GlobalPosition, Metadata};
    use serde_json::json;

    fn stored(stream: &str, version: u64, event_type: &str, data: Value) -> RecordedEvent {
        RecordedEvent {
            event_id: EventId::new(),
            stream_id: StreamId::parse(stream).expect("stream"),
            stream_version: StreamVersion(version),
            global_position: GlobalPosition::from_seq(version * 10),
            event_type: event_type.to_owned(),
            event_version: 1,
            data: Payload::from_value(&data).expect("payload"),
            metadata: Metadata::default(),
            recorded_at: chrono::Utc::now(),
            stored_event_version: None,
            stored_event_type: None,
        }
    }

    const PLAN: &str = r#"
[[step]]
event_type = "Withdrawn"
from_version = 1
rename_to = "Withdrew"
filter = '{amount: (.amount | tonumber)}'

[[migrate]]
event_type = "Moved"
filter = '{type: "StreetChanged", data: {street: .data.street}}, {type: "CityChanged", version: 2, data: {city: .data.city}}'

[[migrate]]
event_type = "Noise"
filter = 'empty'

[[purge]]
stream = "Account-9"
reason = "retention"
"#;

    /// The one source `event` becomes (no run held).
    fn one(m: &mut Migrator, event: RecordedEvent) -> Result<MigratedSource> {
        let mut out = m.migrate(event)?;
        assert_eq!(out.len(), 1, "{out:?}");
        Ok(out.remove(0))
    }

    fn migrator() -> Migrator {
        Migrator::new(
            Arc::new(MigrationPlan::parse("m.toml", PLAN).expect("plan")),
            Vec::new(),
        )
    }

    #[test]
    fn splits_drops_and_renumbers_a_stream() {
        let mut m = migrator();
        let a = one(
            &mut m,
            stored("Account-1", 1, "Opened", json!({"owner": "ann"})),
        )
        .expect("copy");
        assert_eq!(a.events.len(), 1);
        assert!(a.removed.is_none() && a.delta.is_none());
        assert_eq!(a.events[0].fingerprint, None, "unchanged keeps its digest");
        let moved = stored(
            "Account-1",
            2,
            "Moved",
            json!({"street": "Main", "city": "X"}),
        );
        let id = moved.event_id;
        let b = one(&mut m, moved).expect("split");
        assert_eq!(b.events.len(), 2);
        assert_eq!(b.events[0].event_type, "StreetChanged");
        assert_eq!(
            (b.events[1].event_type.as_str(), b.events[1].event_version),
            ("CityChanged", 2)
        );
        assert_eq!(b.events[0].event_id, derived_event_id(id, 0));
        assert_eq!(b.events[1].event_id, derived_event_id(id, 1));
        assert_eq!(
            (b.events[0].stream_version, b.events[1].stream_version),
            (StreamVersion(2), StreamVersion(3))
        );
        assert_eq!(b.delta, Some((StreamId::parse("Account-1").expect("s"), 1)));
        assert_eq!(b.removed.as_ref().map(|r| r.0), Some(id));
        let c = one(&mut m, stored("Account-1", 3, "Noise", json!({}))).expect("drop");
        assert!(c.events.is_empty());
        assert_eq!(c.delta, Some((StreamId::parse("Account-1").expect("s"), 0)));
        let d = one(
            &mut m,
            stored("Account-1", 4, "Withdrawn", json!({"amount": "5"})),
        )
        .expect("upcast");
        assert_eq!(d.events[0].stream_version, StreamVersion(4));
        assert_eq!(d.events[0].event_type, "Withdrew");
        assert_eq!(d.events[0].data, r#"{"amount":5}"#);
        assert!(d.events[0].fingerprint.is_some());
        assert!(d.removed.is_none(), "one event keeps its id");
    }

    #[test]
    fn a_purged_stream_leaves_a_tombstone() {
        let mut m = migrator();
        let first = stored("Account-9", 1, "Opened", json!({"owner": "bob"}));
        let id = first.event_id;
        let t = one(&mut m, first).expect("tombstone");
        assert_eq!(t.events.len(), 1);
        assert_eq!(t.events[0].event_type, "StreamPurged");
        assert_eq!(t.events[0].data, r#"{"reason":"retention"}"#);
        assert_eq!(t.events[0].event_id, derived_event_id(id, 0));
        assert_eq!(t.removed.as_ref().map(|r| r.0), Some(id));
        let gone = one(
            &mut m,
            stored("Account-9", 2, "Deposited", json!({"amount": 1})),
        )
        .expect("dropped");
        assert!(gone.events.is_empty());
        assert_eq!(gone.delta.map(|d| d.1), Some(-1));
    }

    #[test]
    fn a_failing_check_names_stream_version_and_position() {
        let mut m = migrator().with_check(|e| {
            if e.event_type == "CityChanged" {
                Err("unknown type".into())
            } else {
                Ok(())
            }
        });
        let err = one(
            &mut m,
            stored("Account-1", 2, "Moved", json!({"street": "a", "city": "b"})),
        )
        .expect_err("check");
        let text = err.to_string();
        assert!(
            text.contains("stream Account-1 version 3 position 20"),
            "{text}"
        );
        assert!(text.contains("CityChanged"), "{text}");
    }

    #[test]
    fn bad_values_and_filters_are_named() {
        let err = MigrationPlan::parse(
            "m.toml",
            "[[migrate]]\nevent_type = \"A\"\nfilter = '.a = ('\n",
        )
        .expect_err("filter");
        assert!(err.to_string().starts_with("m.toml:3:"), "{err}");
        let plan = MigrationPlan::parse(
            "m.toml",
            "[[migrate]]\nevent_type = \"A\"\nfilter = '.data'\n",
        )
        .expect("plan");
        let mut m = Migrator::new(Arc::new(plan), Vec::new());
        let err = one(&mut m, stored("Account-1", 1, "A", json!(5))).expect_err("not an object");
        let text = err.to_string();
        assert!(text.contains("Account-1 version 1"), "{text}");
        assert!(text.contains("m.toml:3 ([[migrate]] A)"), "{text}");
        // A read-time plan loader ignores the migration tables.
        crate::Plan::parse("m.toml", PLAN).expect("read plan");
    }

    const MERGE: &str = r#"
[[merge]]
event_types = ["StreetChanged", "CityChanged"]
filter = '{type: "AddressChanged", data: (map(.data) | add)}'

[[merge]]
event_types = ["Tick"]
filter = '.[] | select(.data.keep) | {data: {n: .data.n}}'

[[migrate]]
event_type = "CityChanged"
filter = '{data: {city: (.data.city | ascii_upcase)}}'
"#;

    fn at(
        stream: &str,
        version: u64,
        position: u64,
        event_type: &str,
        data: Value,
    ) -> RecordedEvent {
        RecordedEvent {
            global_position: GlobalPosition::from_seq(position),
            ..stored(stream, version, event_type, data)
        }
    }

    fn merger() -> Migrator {
        Migrator::new(
            Arc::new(MigrationPlan::parse("m.toml", MERGE).expect("plan")),
            Vec::new(),
        )
    }

    fn stream(s: &str) -> StreamId {
        StreamId::parse(s).expect("stream")
    }

    /// A-1: Opened, StreetChanged, CityChanged (a run of 2); B-1:
    /// StreetChanged alone (a run of 1), Noted; A-1: StreetChanged (alone:
    /// B-1 comes next), then B-1 and A-1 alternate (no run).
    fn log() -> Vec<RecordedEvent> {
        vec![
            at("A-1", 1, 1, "Opened", json!({})),
            at("A-1", 2, 2, "StreetChanged", json!({"street": "Main"})),
            at("A-1", 3, 3, "CityChanged", json!({"city": "x"})),
            at("B-1", 1, 4, "StreetChanged", json!({"street": "Elm"})),
            at("B-1", 2, 5, "Noted", json!({})),
            at("A-1", 4, 6, "StreetChanged", json!({"street": "Oak"})),
            at("B-1", 3, 7, "CityChanged", json!({"city": "y"})),
            at("A-1", 5, 8, "CityChanged", json!({"city": "z"})),
        ]
    }

    #[test]
    fn a_run_is_adjacent_events_of_one_stream_and_merges_into_its_first() {
        let mut m = merger();
        let log = log();
        let ids: Vec<_> = log.iter().map(|e| e.event_id).collect();
        let mut it = log.into_iter();
        let mut next = |m: &mut Migrator| m.migrate(it.next().expect("event")).expect("migrate");
        assert_eq!(next(&mut m).len(), 1, "Opened is copied at once");
        assert!(next(&mut m).is_empty(), "StreetChanged opens a run");
        assert_eq!(m.held(), 1);
        assert!(next(&mut m).is_empty(), "CityChanged extends it");
        assert_eq!(m.held(), 2);
        // B-1's StreetChanged ends A-1's run (another stream) and opens one.
        let run = next(&mut m);
        assert_eq!(run.len(), 2, "one source each: {run:?}");
        assert_eq!(m.held(), 1);
        let merged = &run[0].events;
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].event_type, "AddressChanged");
        assert_eq!(merged[0].event_version, 1, "the first member's version");
        assert_eq!(merged[0].data, r#"{"city":"x","street":"Main"}"#);
        assert_eq!(merged[0].event_id, ids[1], "one value keeps the first id");
        assert_eq!(merged[0].stream_version, StreamVersion(2));
        assert!(run[0].removed.is_none() && run[0].delta.is_none());
        assert!(run[1].events.is_empty());
        assert_eq!(run[1].removed.as_ref().map(|r| r.0), Some(ids[2]));
        assert_eq!(run[1].delta, Some((stream("A-1"), -1)));
        assert_eq!(run[1].source, GlobalPosition::from_seq(3));
        // Noted ends B-1's run of one: it is not merged, and goes on to the
        // [[migrate]] rules (none for StreetChanged: copied as it is).
        let lone = next(&mut m);
        assert_eq!(lone.len(), 2);
        assert_eq!(lone[0].events[0].event_type, "StreetChanged");
        assert_eq!(lone[0].events[0].fingerprint, None, "unchanged");
        assert_eq!(lone[0].events[0].event_id, ids[3]);
        assert_eq!(lone[1].events[0].event_type, "Noted");
        // Alternating streams: every run has one event; A-1's versions
        // follow the merge (4 -> 3, 5 -> 4), and a lone CityChanged meets
        // its [[migrate]] rule.
        assert!(next(&mut m).is_empty());
        let a = next(&mut m);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].events[0].stream_version, StreamVersion(3));
        let b = next(&mut m);
        assert_eq!(b[0].events[0].data, r#"{"city":"Y"}"#);
    }

    #[test]
    fn finish_ends_the_last_run() {
        let mut m = merger();
        let mut out = Vec::new();
        for e in log().into_iter().take(3) {
            out.extend(m.migrate(e).expect("migrate"));
        }
        assert_eq!((out.len(), m.held()), (1, 2));
        let last = m.finish().expect("finish");
        assert_eq!(last.len(), 2);
        assert_eq!(last[0].events[0].event_type, "AddressChanged");
        assert_eq!(m.held(), 0);
        assert!(m.finish().expect("nothing left").is_empty());
    }

    #[test]
    fn a_run_into_none_or_several_events_gets_derived_ids() {
        let mut m = merger();
        let tick = |v: u64, keep: bool| at("T-1", v, v, "Tick", json!({"n": v, "keep": keep}));
        let first = tick(1, true);
        let id = first.event_id;
        for e in [first, tick(2, false), tick(3, true), tick(4, false)] {
            assert!(m.migrate(e).expect("held").is_empty());
        }
        // Two values of a run of four: ids derived from the first member's.
        let out = m.finish().expect("finish");
        assert_eq!(out.len(), 4, "{out:?}");
        let events: Vec<_> = out[0]
            .events
            .iter()
            .map(|e| (e.event_id, e.stream_version, e.data.as_str()))
            .collect();
        assert_eq!(
            events,
            [
                (derived_event_id(id, 0), StreamVersion(1), r#"{"n":1}"#),
                (derived_event_id(id, 1), StreamVersion(2), r#"{"n":3}"#),
            ]
        );
        assert!(out[1..].iter().all(|s| s.events.is_empty()));
        assert!(
            out.iter().all(|s| s.removed.is_some()),
            "no source id is kept"
        );
        assert_eq!(out[3].delta, Some((stream("T-1"), -2)));
        // A run whose filter yields nothing is dropped whole.
        let mut m = merger();
        m.migrate(tick(1, false)).expect("held");
        m.migrate(tick(2, false)).expect("held");
        let out = m.finish().expect("finish");
        assert!(out
            .iter()
            .all(|s| s.events.is_empty() && s.removed.is_some()));
        assert_eq!(out[1].delta, Some((stream("T-1"), -2)));
    }

    #[test]
    fn a_run_cut_by_a_batch_resumes_to_the_same_copy() {
        let log = log();
        let mut once = merger();
        let mut whole: Vec<MigratedSource> = Vec::new();
        for e in log.clone() {
            whole.extend(once.migrate(e).expect("migrate"));
        }
        whole.extend(once.finish().expect("finish"));
        assert_eq!(whole.len(), log.len(), "one source per event");
        // Every cut: a batch of the first `cut` events is written (what the
        // migrator returned), then a new migrator resumes after its last
        // source, with the deltas the batch recorded.
        for cut in 1..log.len() {
            let mut first = merger();
            let mut batch = Vec::new();
            for e in log[..cut].iter().cloned() {
                batch.extend(first.migrate(e).expect("migrate"));
            }
            let checkpoint = batch.last().map(|s| s.source);
            let deltas: Vec<_> = batch.iter().filter_map(|s| s.delta.clone()).collect();
            let mut resumed = Migrator::new(
                Arc::new(MigrationPlan::parse("m.toml", MERGE).expect("plan")),
                deltas,
            );
            let mut rest = Vec::new();
            for e in log
                .iter()
                .filter(|e| checkpoint.is_none_or(|c| e.global_position > c))
            {
                rest.extend(resumed.migrate(e.clone()).expect("migrate"));
            }
            rest.extend(resumed.finish().expect("finish"));
            batch.extend(rest);
            assert_eq!(batch, whole, "cut after {cut} events");
        }
    }

    #[test]
    fn a_preview_shows_a_run_before_and_after() {
        let mut m = merger();
        let mut previews = Vec::new();
        for e in log().into_iter().take(4) {
            previews.extend(m.preview(e).expect("preview"));
        }
        previews.extend(m.preview_finish().expect("finish"));
        assert_eq!(previews.len(), 3);
        let run = &previews[1];
        assert_eq!(run.before.len(), 2);
        assert!(!run.unchanged);
        assert_eq!(run.after.len(), 1);
        assert_eq!(run.after[0].event_type, "AddressChanged");
        assert_eq!(run.after[0].event_id, run.before[0].event_id);
        assert!(previews[2].unchanged, "a run of one, no [[migrate]] rule");
    }

    #[test]
    fn a_failing_merge_filter_names_the_run_and_the_rule() {
        let plan = "[[merge]]\nevent_types = [\"A\"]\nfilter = '.[0].data.x.y'\n";
        let mut m = Migrator::new(
            Arc::new(MigrationPlan::parse("m.toml", plan).expect("plan")),
            Vec::new(),
        );
        m.migrate(at("S-1", 4, 40, "A", json!({"x": 1})))
            .expect("held");
        m.migrate(at("S-1", 5, 41, "A", json!({"x": 1})))
            .expect("held");
        let err = m.finish().expect_err("not an object");
        let text = err.to_string();
        assert!(text.contains("S-1 version 4 (position 40)"), "{text}");
        assert!(
            text.contains("m.toml:3 ([[merge]] A), a run of 2 events"),
            "{text}"
        );
    }

    #[test]
    fn bad_merge_rules_name_the_file_rule_and_position() {
        let err = MigrationPlan::parse(
            "m.toml",
            "[[merge]]\nevent_types = [\"A\", \"B\"]\nfilter = 'map(.data'\n",
        )
        .expect_err("filter");
        assert!(matches!(err, PlanError::Rule { line: 3, .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.starts_with("m.toml:3:")
                && text.contains("[[merge]] 1 (A, B): the filter does not compile"),
            "{text}"
        );
        let err = MigrationPlan::parse("m.toml", "[[merge]]\nevent_types = []\nfilter = '.'\n")
            .expect_err("no types");
        assert_eq!(
            err.to_string(),
            "m.toml:2:15: [[merge]] 1 (): `event_types` lists no event type"
        );
        let err = MigrationPlan::parse(
            "m.toml",
            "[[merge]]\nevent_types = [\"A\"]\nfilter = '.'\n\n[[merge]]\nevent_types = [\"B\", \"A\"]\nfilter = '.'\n",
        )
        .expect_err("twice");
        assert_eq!(
            err.to_string(),
            "m.toml:6:15: [[merge]] 2 (B, A): A is listed by [[merge]] 1 too"
        );
        let err = MigrationPlan::parse("m.toml", "[[merge]]\nevent_type = \"A\"\nfilter = '.'\n")
            .expect_err("unknown key");
        assert!(err.to_string().starts_with("m.toml:"), "{err}");
        // A read-time plan loader ignores [[merge]] too.
        crate::Plan::parse("m.toml", MERGE).expect("read plan");
    }
}
