//! [`EventImport`]: writing events recorded by another store (a backup, or a
//! store of another backend) into this one, with their ids, versions,
//! metadata and `recorded_at`, at new global positions.
//!
//! Positions are never copied: on PostgreSQL a position is tied to the
//! appending transaction's id, which means nothing in another cluster, so the
//! target's own append machinery assigns them (its per-stream guard included,
//! so a `read_all` follower of the target stays gap-free). What is kept is the
//! order: the events of one call get increasing positions in input order.
//!
//! The decision of what to write is made here, once, for every backend
//! ([`plan_import`]); a backend looks up the heads of the batch's streams and
//! the events stored under the batch's ids, lets the plan decide, and writes
//! the planned runs in one transaction.

use std::collections::{HashMap, HashSet};
use std::future::Future;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::{
    prepare_batch, EventId, EventStore, GlobalPosition, Metadata, NewEvent, Payload, PreparedEvent,
    RecordedEvent, Result, StreamId, StreamVersion,
};

/// An event to import: what a [`RecordedEvent`] holds except its position,
/// which the target assigns.
#[derive(Clone, PartialEq, Debug)]
pub struct ImportEvent {
    /// The event's id, kept.
    pub event_id: EventId,
    /// Its stream.
    pub stream_id: StreamId,
    /// Its version in the stream, kept: it must follow the stream's head.
    pub stream_version: StreamVersion,
    /// Type name.
    pub event_type: String,
    /// Payload schema version.
    pub event_version: u32,
    /// Payload, as JSON text.
    pub data: Payload,
    /// Correlation, causation and headers.
    pub metadata: Metadata,
    /// When the source store recorded it, kept (at the target's precision:
    /// microseconds on SQLite and PostgreSQL).
    pub recorded_at: DateTime<Utc>,
}

impl From<RecordedEvent> for ImportEvent {
    fn from(e: RecordedEvent) -> Self {
        ImportEvent {
            event_id: e.event_id,
            stream_id: e.stream_id,
            stream_version: e.stream_version,
            event_type: e.event_type,
            event_version: e.event_version,
            data: e.data,
            metadata: e.metadata,
            recorded_at: e.recorded_at,
        }
    }
}

/// Why a stream's events were not imported.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum ImportConflictKind {
    /// The store holds another event at that version.
    Differs,
    /// The event's id is stored, but as another event (another stream or
    /// version, type, payload or metadata), or an earlier event of the same
    /// call that is being written has it.
    IdTaken {
        /// The stream of the stored event.
        stream: StreamId,
        /// Its version there.
        version: StreamVersion,
    },
    /// The version does not follow the stream's head (or the previous
    /// event of the stream in the input): events are missing before it.
    Gap {
        /// The version that was expected next.
        expected: StreamVersion,
    },
}

/// A stream whose events were not imported, and the first version where its
/// input disagreed with the store.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ImportConflict {
    /// The stream.
    pub stream: StreamId,
    /// The version of the input event that conflicted.
    pub version: StreamVersion,
    /// The input event's id.
    pub event_id: EventId,
    /// What was wrong.
    pub kind: ImportConflictKind,
}

impl std::fmt::Display for ImportConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stream {} version {} (event {}): ",
            self.stream, self.version, self.event_id
        )?;
        match &self.kind {
            ImportConflictKind::Differs => {
                write!(f, "the store holds another event at that version")
            }
            ImportConflictKind::IdTaken { stream, version } => write!(
                f,
                "the id is stored as another event ({stream} version {version})"
            ),
            ImportConflictKind::Gap { expected } => {
                write!(f, "expected version {expected} next (events are missing)")
            }
        }
    }
}

/// What one [`EventImport::import_events`] call did.
#[derive(Clone, PartialEq, Debug, Default)]
pub struct ImportReport {
    /// For each input event, in input order: its position in this store
    /// (newly assigned, or the position of the identical event already
    /// stored), or `None` when its stream conflicted.
    pub positions: Vec<Option<GlobalPosition>>,
    /// Events written.
    pub imported: u64,
    /// Events already stored identically, skipped.
    pub skipped: u64,
    /// One entry per stream whose events were not written.
    pub conflicts: Vec<ImportConflict>,
}

/// Importing recorded events, keeping their ids, stream versions, metadata
/// and `recorded_at`, at positions this store assigns.
///
/// Optional: a backend implements it when its append path can take a
/// `recorded_at` (the in-memory store, SQLite, PostgreSQL and `AnyStore` do).
pub trait EventImport: EventStore {
    /// Imports a batch of events, given in the source's global order.
    ///
    /// Contract:
    /// - Each event is checked against its stream ([`plan_import`]): an
    ///   event whose id is stored identically (same stream, version, type,
    ///   event version, payload value and metadata; `recorded_at` is not
    ///   compared) is skipped, so a rerun adds nothing. An event at the
    ///   stream's next version whose id is not stored is written. Anything
    ///   else is a conflict of its stream: another event stored at that
    ///   version, the id stored as another event (or held by an earlier
    ///   event of the call), or a gap (a version past the next one). A conflicting stream is reported once, with its
    ///   first conflicting version, and none of its events of this call is
    ///   written; the other streams go on.
    /// - The written events keep their id, stream version, type, event
    ///   version, payload, metadata and `recorded_at`, and get new positions,
    ///   increasing in input order, assigned by the store's append machinery
    ///   (on PostgreSQL under the streams' advisory locks, taken before the
    ///   transaction has an id, so `read_all` followers stay gap-free).
    /// - Atomic: everything written by one call commits together, or
    ///   nothing does (an `Err`).
    /// - An invalid event (a bad type name, a reserved metadata header) is an
    ///   error for the whole call, nothing written.
    fn import_events(
        &self,
        events: Vec<ImportEvent>,
    ) -> impl Future<Output = Result<ImportReport>> + Send;
}

/// Consecutive input events of one stream to write: one append.
#[derive(Clone, PartialEq, Debug)]
pub struct ImportRun {
    /// The stream.
    pub stream: StreamId,
    /// The stream's head before this run (`None`: a new stream).
    pub head: Option<StreamVersion>,
    /// The events, prepared as an append prepares them
    /// ([`prepare_batch`]); versions `head + 1 ..`.
    pub events: Vec<PreparedEvent>,
    /// Each event's `recorded_at`.
    pub recorded_at: Vec<DateTime<Utc>>,
    /// Each event's index in the input.
    pub indexes: Vec<usize>,
}

/// What [`plan_import`] decided for a batch.
#[derive(Clone, PartialEq, Debug)]
pub struct ImportPlan {
    /// The runs to write, in input order.
    pub runs: Vec<ImportRun>,
    /// The report, with positions of skipped events filled in and those of
    /// the runs still `None` (see [`ImportPlan::finish`]).
    pub report: ImportReport,
}

impl ImportPlan {
    /// The report once the runs are written: `positions[i]` holds the
    /// positions the backend assigned to `runs[i]`'s events.
    /// `backend` names the store in an error (a backend that stored another
    /// number of events than planned).
    pub fn finish(
        mut self,
        backend: &'static str,
        positions: Vec<Vec<GlobalPosition>>,
    ) -> Result<ImportReport> {
        if positions.len() != self.runs.len() {
            return Err(crate::Error::Backend {
                backend,
                message: format!(
                    "import wrote {} runs of {}",
                    positions.len(),
                    self.runs.len()
                ),
                source: None,
            });
        }
        for (run, assigned) in self.runs.iter().zip(positions) {
            if assigned.len() != run.indexes.len() {
                return Err(crate::Error::Backend {
                    backend,
                    message: format!(
                        "import of {} stored {} events of {}",
                        run.stream,
                        assigned.len(),
                        run.indexes.len()
                    ),
                    source: None,
                });
            }
            for (&i, p) in run.indexes.iter().zip(assigned) {
                self.report.positions[i] = Some(p);
                self.report.imported += 1;
            }
        }
        Ok(self.report)
    }
}

/// Decides an import batch, the same on every backend.
///
/// `heads` holds the head of every stream of the batch as stored now
/// (`None` or absent: no stream), `stored` the stored event under each of
/// the batch's ids that is stored. See [`EventImport::import_events`] for
/// the rules.
pub fn plan_import(
    events: Vec<ImportEvent>,
    heads: &HashMap<StreamId, Option<StreamVersion>>,
    stored: &HashMap<EventId, RecordedEvent>,
) -> Result<ImportPlan> {
    let n = events.len();
    let mut report = ImportReport {
        positions: vec![None; n],
        ..ImportReport::default()
    };
    // Per stream: the next version to write, and whether it conflicted.
    let mut next: HashMap<StreamId, u64> = HashMap::new();
    let mut conflicted: HashSet<StreamId> = HashSet::new();
    // (index, event) to write, in input order.
    let mut writes: Vec<(usize, ImportEvent)> = Vec::new();
    // The ids this call plans to write, and where: a second event with one
    // of them is a conflict of its stream, not a unique violation that
    // would fail the whole call.
    let mut planned: HashMap<EventId, (StreamId, StreamVersion)> = HashMap::new();
    for (i, e) in events.into_iter().enumerate() {
        if conflicted.contains(&e.stream_id) {
            continue;
        }
        let head = heads
            .get(&e.stream_id)
            .copied()
            .flatten()
            .map_or(0, |v| v.0);
        let want = *next.entry(e.stream_id.clone()).or_insert(head + 1);
        let conflict = match stored.get(&e.event_id) {
            _ if planned.contains_key(&e.event_id) => {
                let (stream, version) = planned[&e.event_id].clone();
                Some(ImportConflictKind::IdTaken { stream, version })
            }
            Some(s) if same_event(s, &e) => {
                report.positions[i] = Some(s.global_position);
                report.skipped += 1;
                None
            }
            Some(s) => Some(ImportConflictKind::IdTaken {
                stream: s.stream_id.clone(),
                version: s.stream_version,
            }),
            None if e.stream_version.0 == want => {
                next.insert(e.stream_id.clone(), want + 1);
                planned.insert(e.event_id, (e.stream_id.clone(), e.stream_version));
                writes.push((i, e.clone()));
                None
            }
            None if e.stream_version.0 <= head => Some(ImportConflictKind::Differs),
            None => Some(ImportConflictKind::Gap {
                expected: StreamVersion(want),
            }),
        };
        if let Some(kind) = conflict {
            conflicted.insert(e.stream_id.clone());
            report.conflicts.push(ImportConflict {
                stream: e.stream_id.clone(),
                version: e.stream_version,
                event_id: e.event_id,
                kind,
            });
        }
    }
    writes.retain(|(_, e)| !conflicted.contains(&e.stream_id));
    let mut runs: Vec<ImportRun> = Vec::new();
    for (i, e) in writes {
        let data: Value = e.data.to_value().map_err(|source| crate::Error::Decode {
            stream: e.stream_id.clone(),
            version: e.stream_version,
            event_type: e.event_type.clone(),
            event_version: e.event_version,
            source,
        })?;
        let (stream, version, recorded_at) = (e.stream_id.clone(), e.stream_version, e.recorded_at);
        let new = NewEvent {
            event_id: e.event_id,
            event_type: e.event_type,
            event_version: e.event_version,
            data,
            metadata: e.metadata,
            fingerprint: None,
        };
        let mut prepared = prepare_batch(&stream, vec![new])?;
        match runs.last_mut() {
            Some(run) if run.stream == stream => {
                run.events.append(&mut prepared);
                run.recorded_at.push(recorded_at);
                run.indexes.push(i);
            }
            _ => {
                let head = version.0 - 1;
                runs.push(ImportRun {
                    stream,
                    head: (head > 0).then_some(StreamVersion(head)),
                    events: prepared,
                    recorded_at: vec![recorded_at],
                    indexes: vec![i],
                });
            }
        }
    }
    Ok(ImportPlan { runs, report })
}

/// Whether a stored event is the input event: same place, type, version,
/// payload value (numbers as the store promises) and metadata.
fn same_event(s: &RecordedEvent, e: &ImportEvent) -> bool {
    s.event_id == e.event_id
        && s.stream_id == e.stream_id
        && s.stream_version == e.stream_version
        && s.event_type == e.event_type
        && s.event_version == e.event_version
        && crate::idempotency::same_json_text(s.data.as_str(), e.data.as_str())
        && s.metadata == e.metadata
}
