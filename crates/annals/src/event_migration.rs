//! [`EventMigration`]: copy-and-transform migrations of the event table
//! (seed 002's fourth strategy), the store's side of `annals events migrate`,
//! `swap` and `drop-backup`.
//!
//! A run copies every event of the live table, in global order, into a new
//! table beside it, transformed by the caller (a plan's jq filters in the
//! CLI): one source event becomes zero (dropped), one, or several (split)
//! events, and a run of adjacent source events of one stream may become
//! any number (merged: the first source carries the events, the others
//! none). The copy is written in batches, each in one transaction together
//! with the run's checkpoint (the last source position copied), so an
//! interrupted run resumes after its last committed batch; the caller never
//! ends a batch inside a merged run. The store keeps the run's bookkeeping
//! in the database: the run row, each changed stream's version delta, and
//! the ids of the source events that do not appear in the copy under their
//! own id (dropped, split, merged, purged).
//!
//! Renumbering: an event keeps its id, metadata and `recorded_at`. Stream
//! versions follow the per-stream delta (the events a stream gained or lost
//! before), so each stream of the copy is `1..n` again. Global positions are
//! kept while every event so far was copied one to one; after the first
//! drop, split or merge they are renumbered in the same order (SQLite: the source
//! position plus the events gained or lost so far; PostgreSQL: the source
//! transaction id with a fresh sequence number), and the run is marked
//! `renumbered`: the swap then removes every projection checkpoint, so
//! each projection rebuilds from the start.
//!
//! [`EventMigration::swap_migration`] finishes the run in one transaction
//! that holds appends off the table: it copies the events after the
//! checkpoint (appended during the copy, or held back in a merged run)
//! through the same transform, verifies the copy (counts
//! per stream, every id), renames the live table to a dated backup and the
//! copy to `events` (with the live table's indexes, constraints and, on
//! PostgreSQL, identity sequence), moves the changed streams' heads,
//! drops the snapshots (a cache of folds of the old events) and, when
//! renumbered, the checkpoints.

use std::future::Future;

use chrono::{DateTime, Utc};

use crate::{
    EventId, EventStore, Fingerprint, GlobalPosition, RecordedEvent, Result, StreamId,
    StreamVersion,
};

/// One event written into the copy.
#[derive(Clone, PartialEq, Debug)]
pub struct MigratedEvent {
    /// Its id: the source event's, or derived from it (UUID v5) for the
    /// events of a split (of a merge: from the run's first source).
    pub event_id: EventId,
    /// Its stream.
    pub stream_id: StreamId,
    /// Its version in the copy.
    pub stream_version: StreamVersion,
    /// Type name.
    pub event_type: String,
    /// Payload schema version.
    pub event_version: u32,
    /// The payload as canonical JSON.
    pub data: String,
    /// The metadata object as canonical JSON.
    pub metadata: String,
    /// The payload's fingerprint; `None` copies the source row's (the event
    /// keeps the source's id and payload).
    pub fingerprint: Option<Fingerprint>,
    /// The source event's `recorded_at`.
    pub recorded_at: DateTime<Utc>,
}

/// What one source event became.
#[derive(Clone, PartialEq, Debug, Default)]
pub struct MigratedSource {
    /// The source event's position.
    pub source: GlobalPosition,
    /// The source event's id, when no event of the copy has it (dropped,
    /// split, merged, purged); with its stream and version.
    pub removed: Option<(EventId, StreamId, StreamVersion)>,
    /// The events it became, in order (empty: dropped, or merged into the
    /// events of the run's first source).
    pub events: Vec<MigratedEvent>,
    /// The stream's version delta after this event, when it changed.
    pub delta: Option<(StreamId, i64)>,
}

/// A transform the store runs on the events after the run's checkpoint
/// (those appended during the copy, and any a transform held back), inside
/// the swap's transaction: `Some(event)` for each in global order, then
/// `None` once. Each call returns the sources it completed, in order (a
/// merge holds events back until the one after them, or the final `None`).
/// It must produce what the batches before it would have (same state: the
/// per-stream deltas).
pub type TailTransform =
    Box<dyn FnMut(Option<RecordedEvent>) -> Result<Vec<MigratedSource>> + Send>;

/// Where a run is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MigrationState {
    /// Copying: the copy table exists and is not live yet.
    Copying,
    /// Swapped: the copy is live, the old table is kept as a backup.
    Swapped,
    /// The backup was dropped (or the run abandoned): nothing left.
    Done,
}

impl MigrationState {
    /// The state's name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationState::Copying => "copying",
            MigrationState::Swapped => "swapped",
            MigrationState::Done => "done",
        }
    }

    /// The state from its stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "copying" => Some(MigrationState::Copying),
            "swapped" => Some(MigrationState::Swapped),
            "done" => Some(MigrationState::Done),
            _ => None,
        }
    }
}

/// A migration run as the store records it.
#[derive(Clone, PartialEq, Debug)]
pub struct MigrationRun {
    /// The run's number.
    pub id: i64,
    /// The plan file's name, as given.
    pub plan_file: String,
    /// The plan's text, so that `swap` transforms the tail with the plan
    /// the copy was made with.
    pub plan: String,
    /// Where the run is.
    pub state: MigrationState,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// The last source position copied (`None`: nothing yet).
    pub checkpoint: Option<GlobalPosition>,
    /// Source events copied.
    pub source_events: u64,
    /// Events written into the copy.
    pub written_events: u64,
    /// Whether positions or versions were renumbered (a drop, split or merge).
    pub renumbered: bool,
    /// The backup table's name, once swapped.
    pub backup_table: Option<String>,
    /// When it was swapped.
    pub swapped_at: Option<DateTime<Utc>>,
}

/// What a swap did.
#[derive(Clone, PartialEq, Debug)]
pub struct SwapReport {
    /// The old table's new name.
    pub backup_table: String,
    /// Source events copied inside the swap (appended during the copy, or
    /// held back in a merged run at the end of the copy).
    pub tail_events: u64,
    /// Events in the live table now.
    pub events: u64,
    /// Checkpoints removed because positions were renumbered (their
    /// projections rebuild from the start), by name.
    pub checkpoints_reset: Vec<String>,
    /// Dead letters removed because positions were renumbered: they name
    /// positions of the old table (a projection rebuilding from the start
    /// parks a poison event again under its new position).
    pub dead_letters_removed: u64,
    /// Snapshots removed (a cache of folds of the old events).
    pub snapshots_removed: u64,
}

/// The verification before a swap found the copy wrong; nothing was
/// swapped. Carried by [`Error::MigrationCheck`](crate::Error::MigrationCheck).
#[derive(Clone, PartialEq, Debug, thiserror::Error)]
#[error("{what} (stream {stream}{}{})",
    version.map(|v| format!(" version {v}")).unwrap_or_default(),
    position.map(|p| format!(" position {p}")).unwrap_or_default())]
pub struct MigrationCheckFailure {
    /// The stream.
    pub stream: StreamId,
    /// The stream version, when one event is at fault.
    pub version: Option<StreamVersion>,
    /// The (source) global position, when one event is at fault.
    pub position: Option<GlobalPosition>,
    /// What is wrong.
    pub what: String,
}

/// Copy-and-transform migrations of the event table (see the module docs).
///
/// Implemented by SQLite, PostgreSQL and `AnyStore`; not by the in-memory
/// store.
pub trait EventMigration: EventStore {
    /// Starts a run with `plan` (its text) from `plan_file`, creating the
    /// empty copy table, or returns the run that is copying (a resume).
    /// Fails with [`Error::Unsafe`](crate::Error::Unsafe) while a swapped
    /// run's backup is still there (drop it first), or when a copying run
    /// has another plan text.
    fn begin_migration(
        &self,
        plan_file: &str,
        plan: &str,
    ) -> impl Future<Output = Result<MigrationRun>> + Send;

    /// The latest run that is not [`MigrationState::Done`], if any.
    fn migration_run(&self) -> impl Future<Output = Result<Option<MigrationRun>>> + Send;

    /// The version deltas of the streams the copying run changed so far.
    fn migration_deltas(&self) -> impl Future<Output = Result<Vec<(StreamId, i64)>>> + Send;

    /// Writes one batch into the copy and moves the run's checkpoint to the
    /// last source, in one transaction. Sources must follow the checkpoint
    /// in global order, and a merged run's sources must be in one batch.
    fn write_migration_batch(
        &self,
        run: i64,
        batch: Vec<MigratedSource>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Copies the tail with `tail`, verifies and swaps, in one transaction
    /// (see the module docs). A failed verification is
    /// [`Error::MigrationCheck`](crate::Error::MigrationCheck) and changes
    /// nothing.
    fn swap_migration(
        &self,
        run: i64,
        tail: TailTransform,
    ) -> impl Future<Output = Result<SwapReport>> + Send;

    /// Drops the swapped run's backup table, or abandons a copying run
    /// (drops its copy). Returns the table dropped, `None` when there was
    /// no run.
    fn drop_migration_backup(&self) -> impl Future<Output = Result<Option<String>>> + Send;
}

/// The id of output `index` of a split (or a purge's tombstone) of the event
/// `source`: UUID v5 in the namespace of the source id, named by the index as
/// 8 big-endian bytes.
pub fn derived_event_id(source: EventId, index: u64) -> EventId {
    EventId(uuid::Uuid::new_v5(&source.0, &index.to_be_bytes()))
}

/// The backup table's name for a swap at `at`: `events_backup_YYYYMMDDHHMMSS`.
pub fn backup_table_name(at: DateTime<Utc>) -> String {
    format!("events_backup_{}", at.format("%Y%m%d%H%M%S"))
}

/// The copy table's name while a run copies.
pub const MIGRATION_TABLE: &str = "events_migrating";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let id = EventId::new();
        assert_eq!(derived_event_id(id, 0), derived_event_id(id, 0));
        assert_ne!(derived_event_id(id, 0), derived_event_id(id, 1));
        assert_ne!(derived_event_id(id, 0), id);
    }

    #[test]
    fn a_check_failure_names_stream_version_and_position() {
        let f = MigrationCheckFailure {
            stream: StreamId::parse("Account-1").expect("stream"),
            version: Some(StreamVersion(3)),
            position: Some(GlobalPosition::from_seq(9)),
            what: "missing".into(),
        };
        assert_eq!(
            f.to_string(),
            "missing (stream Account-1 version 3 position 9)"
        );
    }
}
