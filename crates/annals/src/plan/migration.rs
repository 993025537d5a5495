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
//! [[purge]]
//! stream = "Account-7"
//! reason = "closed, retention expired"
//! tombstone_type = "StreamPurged" # optional (default StreamPurged, version 1)
//! ```
//!
//! Each source event is taken through: a purge (the first event of a purged
//! stream becomes its tombstone `{reason}`, the others are dropped), the
//! `[[step]]` chain, then the first `[[migrate]]` rule whose type (and
//! version) match. A value's `type` and `version` default to the input's.
//! One value keeps the event's id; several get ids derived from it
//! ([`derived_event_id`](crate::derived_event_id)); each keeps the source's
//! metadata and `recorded_at`.

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

/// A plan loaded for a copy-and-transform migration: its `[[step]]` chain,
/// `[[migrate]]` rules and `[[purge]]`s (see the module docs of
/// [`Plan`](crate::Plan) and the README's "Schema evolution").
pub struct MigrationPlan {
    file: PathBuf,
    text: String,
    upcasters: Upcasters,
    rules: Vec<Rule>,
    purges: HashMap<String, PurgeDef>,
}

impl std::fmt::Debug for MigrationPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationPlan")
            .field("file", &self.file)
            .field("rules", &self.rules.len())
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

    /// What the plan makes of `event` (as stored): the events it becomes,
    /// in order, without stream versions.
    pub(crate) fn plan(&self, event: &RecordedEvent) -> Result<Vec<Planned>> {
        if let Some(purge) = self.purges.get(event.stream_id.as_str()) {
            if event.stream_version == StreamVersion(1) {
                return Ok(vec![Planned {
                    event_type: purge.tombstone_type.clone(),
                    event_version: purge.tombstone_version,
                    data: json!({ "reason": purge.reason }),
                }]);
            }
            return Ok(Vec::new());
        }
        let current = self.upcasters.apply_ref(event)?;
        let fail = |label: &str, source: BoxError| {
            Error::Upcast(Box::new(UpcastFailure {
                stream: event.stream_id.clone(),
                version: event.stream_version,
                position: event.global_position,
                event_type: event.event_type.clone(),
                stored_version: event.event_version,
                step: label.to_owned(),
                source,
            }))
        };
        let data = current
            .data
            .to_value()
            .map_err(|e| fail("reading the payload", e.into()))?;
        let rule = self.rules.iter().find(|r| {
            r.event_type == current.event_type
                && r.version.is_none_or(|v| v == current.event_version)
        });
        let Some(rule) = rule else {
            return Ok(vec![Planned {
                event_type: current.event_type,
                event_version: current.event_version,
                data,
            }]);
        };
        let input = json!({
            "type": current.event_type,
            "version": current.event_version,
            "data": data,
            "stream": event.stream_id.as_str(),
            "stream_version": event.stream_version.0,
            "metadata": event.metadata.to_value(),
        });
        let values = rule
            .filter
            .run_all(input)
            .map_err(|e| fail(&rule.label, e))?;
        values
            .into_iter()
            .map(|v| {
                let Value::Object(mut o) = v else {
                    return Err(fail(
                        &rule.label,
                        format!("a value is not an object {{type, version, data}}: {v}").into(),
                    ));
                };
                let data = o
                    .remove("data")
                    .ok_or_else(|| fail(&rule.label, "a value has no `data`".into()))?;
                let event_type = match o.remove("type") {
                    None => current.event_type.clone(),
                    Some(Value::String(t)) => t,
                    Some(t) => {
                        return Err(fail(
                            &rule.label,
                            format!("`type` {t} is not a string").into(),
                        ))
                    }
                };
                let event_version = match o.remove("version") {
                    None => current.event_version,
                    Some(v) => v
                        .as_u64()
                        .and_then(|v| u32::try_from(v).ok())
                        .filter(|v| *v > 0)
                        .ok_or_else(|| {
                            fail(
                                &rule.label,
                                format!("`version` {v} is not a positive integer").into(),
                            )
                        })?,
                };
                if let Some(k) = o.keys().next() {
                    return Err(fail(
                        &rule.label,
                        format!("unknown key `{k}` in a value").into(),
                    ));
                }
                Ok(Planned {
                    event_type,
                    event_version,
                    data,
                })
            })
            .collect()
    }
}

/// A check of each migrated event against the current code (the CLI's
/// registered types): `Err(why)` fails the run naming the event.
pub type EventCheck = Arc<dyn Fn(&RecordedEvent) -> std::result::Result<(), String> + Send + Sync>;

/// Runs a [`MigrationPlan`] over the source events in global order, keeping
/// each changed stream's version delta, and turns each into a
/// [`MigratedSource`] for
/// [`EventMigration::write_migration_batch`](crate::EventMigration::write_migration_batch).
pub struct Migrator {
    plan: Arc<MigrationPlan>,
    deltas: HashMap<StreamId, i64>,
    check: Option<EventCheck>,
}

impl Migrator {
    /// A migrator resuming with the deltas a run recorded.
    pub fn new(plan: Arc<MigrationPlan>, deltas: Vec<(StreamId, i64)>) -> Self {
        Migrator {
            plan,
            deltas: deltas.into_iter().collect(),
            check: None,
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

    /// Whether `event` would be copied unchanged (one event, same type,
    /// version and payload), and what it becomes, as events without
    /// positions (for `--dry-run`).
    pub fn preview(&self, event: &RecordedEvent) -> Result<(bool, Vec<RecordedEvent>)> {
        let planned = self.plan.plan(event)?;
        let unchanged = is_unchanged(event, &planned);
        let out = planned
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                Ok(RecordedEvent {
                    event_id: if unchanged || i == 0 {
                        event.event_id
                    } else {
                        derived_event_id(event.event_id, i as u64)
                    },
                    event_type: p.event_type,
                    event_version: p.event_version,
                    data: Payload::from_value(&p.data).map_err(|e| Error::Encode {
                        what: format!("the migrated payload of {}", event.event_type),
                        source: e,
                    })?,
                    ..event.clone()
                })
            })
            .collect::<Result<_>>()?;
        Ok((unchanged, out))
    }

    /// What `event` (as stored) becomes in the copy.
    pub fn migrate(&mut self, event: RecordedEvent) -> Result<MigratedSource> {
        let planned = self.plan.plan(&event)?;
        let unchanged = is_unchanged(&event, &planned);
        let before = self.deltas.get(&event.stream_id).copied().unwrap_or(0);
        let n = planned.len();
        let keeps_id = n == 1 && !self.plan.purges.contains_key(event.stream_id.as_str());
        let metadata =
            canonical_json(&event.metadata.to_value()).map_err(|e| Error::InvalidEvent {
                stream: event.stream_id.clone(),
                reason: format!("the metadata is {e}"),
            })?;
        let mut events = Vec::with_capacity(n);
        for (i, p) in planned.into_iter().enumerate() {
            let version = i64::try_from(event.stream_version.0)
                .unwrap_or(i64::MAX)
                .saturating_add(before)
                .saturating_add(i as i64);
            let stream_version = StreamVersion(u64::try_from(version).unwrap_or(0));
            let event_id = if keeps_id {
                event.event_id
            } else {
                derived_event_id(event.event_id, i as u64)
            };
            let (data, fingerprint) = if unchanged {
                (event.data.as_str().to_owned(), None)
            } else {
                let text = canonical_json(&p.data).map_err(|e| Error::InvalidEvent {
                    stream: event.stream_id.clone(),
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
                    ..event.clone()
                };
                check(&out).map_err(|why| {
                    Error::MigrationCheck(Box::new(MigrationCheckFailure {
                        stream: event.stream_id.clone(),
                        version: Some(stream_version),
                        position: Some(event.global_position),
                        what: format!(
                            "event {event_id} of type {:?} v{} does not decode with the current code: {why}",
                            p.event_type, p.event_version
                        ),
                    }))
                })?;
            }
            events.push(MigratedEvent {
                event_id,
                stream_id: event.stream_id.clone(),
                stream_version,
                event_type: p.event_type,
                event_version: p.event_version,
                data,
                metadata: metadata.clone(),
                fingerprint,
                recorded_at: event.recorded_at,
            });
        }
        let after = before + n as i64 - 1;
        let delta = (after != before).then(|| {
            self.deltas.insert(event.stream_id.clone(), after);
            (event.stream_id.clone(), after)
        });
        let removed = (!keeps_id).then(|| {
            (
                event.event_id,
                event.stream_id.clone(),
                event.stream_version,
            )
        });
        Ok(MigratedSource {
            source: event.global_position,
            removed,
            events,
            delta,
        })
    }
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

    fn migrator() -> Migrator {
        Migrator::new(
            Arc::new(MigrationPlan::parse("m.toml", PLAN).expect("plan")),
            Vec::new(),
        )
    }

    #[test]
    fn splits_drops_and_renumbers_a_stream() {
        let mut m = migrator();
        let a = m
            .migrate(stored("Account-1", 1, "Opened", json!({"owner": "ann"})))
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
        let b = m.migrate(moved).expect("split");
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
        let c = m
            .migrate(stored("Account-1", 3, "Noise", json!({})))
            .expect("drop");
        assert!(c.events.is_empty());
        assert_eq!(c.delta, Some((StreamId::parse("Account-1").expect("s"), 0)));
        let d = m
            .migrate(stored("Account-1", 4, "Withdrawn", json!({"amount": "5"})))
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
        let t = m.migrate(first).expect("tombstone");
        assert_eq!(t.events.len(), 1);
        assert_eq!(t.events[0].event_type, "StreamPurged");
        assert_eq!(t.events[0].data, r#"{"reason":"retention"}"#);
        assert_eq!(t.events[0].event_id, derived_event_id(id, 0));
        assert_eq!(t.removed.as_ref().map(|r| r.0), Some(id));
        let gone = m
            .migrate(stored("Account-9", 2, "Deposited", json!({"amount": 1})))
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
        let err = m
            .migrate(stored(
                "Account-1",
                2,
                "Moved",
                json!({"street": "a", "city": "b"}),
            ))
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
        let err = m
            .migrate(stored("Account-1", 1, "A", json!(5)))
            .expect_err("not an object");
        let text = err.to_string();
        assert!(text.contains("Account-1 version 1"), "{text}");
        assert!(text.contains("m.toml:3 ([[migrate]] A)"), "{text}");
        // A read-time plan loader ignores the migration tables.
        crate::Plan::parse("m.toml", PLAN).expect("read plan");
    }
}
