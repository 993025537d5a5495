//! Snapshots: a cache of an aggregate's state at a known stream version.
//!
//! A snapshot is never the source of truth. The repository uses one only when
//! its `schema_version` is the aggregate's current one (or can be migrated to
//! it) and its version is not beyond the stream's head; otherwise it replays
//! the stream. Removing the snapshot store changes no result, only speed.
//!
//! The live table keeps up to `K` snapshots per aggregate, its *history*;
//! `K` (default 1) is a setting recorded in the store itself
//! ([`SnapshotAdmin::set_snapshot_history_size`], `annals snapshots keep`), so
//! that every process writing snapshots trims to the same length. The *live*
//! snapshot, the one loads use, is the aggregate's row with the highest
//! `(schema_version, version)` that has not been rolled back. A separate
//! staging table holds snapshots that a migration built ahead of a deploy;
//! `promote_staged` moves them into the live table in one transaction.
//!
//! # Guarded writes
//!
//! A write ([`SnapshotStore::save_snapshot`]) never goes backwards. It is
//! stored only when it supersedes the live snapshot ([`Snapshot::supersedes`])
//! *and* is at a higher stream version than every rolled-back row. Rows at a
//! version beyond their stream's head (the events were restored from an older
//! backup) are invalid: the write deletes them in the same transaction, so
//! they never block it, and the next policy write or `create` repairs the
//! aggregate.
//!
//! # Rollback
//!
//! [`SnapshotAdmin::rollback_snapshot`] makes an older row of the history
//! live again. The rows above it are kept but marked rolled back: loads never
//! use them, history listings show them, and they keep blocking guarded writes
//! at or below their stream version, so a stale or retried write of the
//! snapshot that was rolled back cannot silently undo the rollback. A write
//! at a higher stream version (the policy snapshotting events that came
//! later) is genuinely newer and becomes live as usual. Rolled-back rows are
//! the first to go when the history is trimmed, and `delete`/`invalidate`
//! remove them like any other row. Rolling back to a rolled-back row makes it
//! live again (roll forward).
//!
//! A backend implements the cache, [`SnapshotStore`], and opts into the rest:
//! [`SnapshotAdmin`] (invalidation, coverage, freshness, paged listings, the
//! history size, history and rollback) and [`SnapshotStaging`] (the staging
//! area). They are separate because each asks more of the storage: the
//! queries join snapshots with streams, the staging area needs a transaction
//! over two tables.

use std::collections::BTreeMap;
use std::future::Future;

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{EventStore, EventStream, ReadStream, Result, StreamId, StreamVersion};

/// A stored snapshot.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// The aggregate type (the stream category).
    pub aggregate_type: String,
    /// The aggregate id (the stream id after the category).
    pub aggregate_id: String,
    /// The stream version the state reflects.
    pub version: StreamVersion,
    /// The aggregate's `SCHEMA_VERSION` when the snapshot was taken.
    pub schema_version: u32,
    /// The serialized state.
    pub state: Value,
    /// When it was written.
    pub created_at: DateTime<Utc>,
}

impl Snapshot {
    /// Whether this snapshot may replace `existing` in the live table: a newer
    /// schema version always wins; at the same schema version the version must
    /// not go backwards.
    pub fn supersedes(&self, existing: &Snapshot) -> bool {
        (self.schema_version, self.version) >= (existing.schema_version, existing.version)
    }
}

/// The outcome of a guarded snapshot write (`"written"` or `"superseded"` in
/// JSON).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotWrite {
    /// Stored as the live snapshot.
    Written,
    /// Not stored: the live snapshot is newer (higher schema version, or same
    /// schema version and higher stream version), or a rolled-back snapshot
    /// is at the same or a higher stream version.
    Superseded,
}

/// Snapshot coverage of one aggregate type (`annals snapshots status`).
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize)]
pub struct SnapshotCoverage {
    /// The aggregate type.
    pub aggregate_type: String,
    /// Aggregates (streams) of the type.
    pub aggregates: u64,
    /// Of those, how many have a live snapshot.
    pub with_snapshot: u64,
    /// Of those, how many have none.
    pub without_snapshot: u64,
    /// Live snapshots per schema version.
    pub by_schema_version: BTreeMap<u32, u64>,
}

/// An aggregate whose snapshot is behind its head, missing, or ahead of its
/// head (`annals snapshots stale`).
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct StaleSnapshot {
    /// The aggregate type.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// The stream head.
    pub head: StreamVersion,
    /// The live snapshot's version (`None`: no snapshot).
    pub snapshot_version: Option<StreamVersion>,
    /// Events a load replays: `head - snapshot_version`, or the whole stream
    /// (`head`) when there is no snapshot or it is ahead.
    pub events_behind: u64,
    /// The live snapshot claims a version beyond the head (events restored
    /// from an older backup): loads pass it over, and the next guarded write
    /// replaces it.
    pub ahead: bool,
}

impl StaleSnapshot {
    /// The row for an aggregate at `head` whose live snapshot is at
    /// `snapshot_version`: the backends' one definition of "behind" and
    /// "ahead".
    pub fn new(
        aggregate_type: String,
        aggregate_id: String,
        head: StreamVersion,
        snapshot_version: Option<StreamVersion>,
    ) -> Self {
        let ahead = snapshot_version.is_some_and(|v| v > head);
        let events_behind = match snapshot_version {
            Some(v) if !ahead => head.0 - v.0,
            _ => head.0,
        };
        StaleSnapshot {
            aggregate_type,
            aggregate_id,
            head,
            snapshot_version,
            events_behind,
            ahead,
        }
    }
}

/// One row of an aggregate's snapshot history (without its state).
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct SnapshotHistoryEntry {
    /// The stream version the state reflects.
    pub version: StreamVersion,
    /// The aggregate's `SCHEMA_VERSION` when it was taken.
    pub schema_version: u32,
    /// When it was written.
    pub created_at: DateTime<Utc>,
    /// Whether this is the live snapshot, the one loads use.
    pub live: bool,
    /// When a rollback retired it (`None`: not rolled back). Rolled-back
    /// rows are never loaded, and they block guarded writes at or below
    /// their version.
    pub rolled_back_at: Option<DateTime<Utc>>,
}

/// Outcome of [`SnapshotAdmin::rollback_snapshot`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct RollbackReport {
    /// The aggregate type.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// The snapshot that is live now.
    pub live: SnapshotHistoryEntry,
    /// Rows above it that this rollback marked rolled back (rows rolled back
    /// earlier are not counted again).
    pub rolled_back: u64,
}

/// The history size a store starts with: the live snapshot only.
pub const DEFAULT_SNAPSHOT_HISTORY: u32 = 1;

/// Refuses a history size below 1 with [`Error::Config`](crate::Error::Config)
/// (for backends implementing [`SnapshotAdmin::set_snapshot_history_size`]).
pub fn validate_history_size(keep: u32) -> Result<()> {
    if keep == 0 {
        return Err(crate::Error::Config(
            "the snapshot history size must be at least 1 (the live snapshot)".into(),
        ));
    }
    Ok(())
}

/// The error of a rollback to a version the history does not hold (for
/// backends implementing [`SnapshotAdmin::rollback_snapshot`]).
pub fn no_such_snapshot(
    aggregate_type: &str,
    aggregate_id: &str,
    version: StreamVersion,
    kept: &[StreamVersion],
) -> crate::Error {
    let kept = if kept.is_empty() {
        "it has no snapshots".to_owned()
    } else {
        let list: Vec<String> = kept.iter().map(|v| v.to_string()).collect();
        format!("its history holds versions {}", list.join(", "))
    };
    crate::Error::Snapshot(format!(
        "no snapshot of {aggregate_type}/{aggregate_id} at version {version} to roll back to: {kept}"
    ))
}

/// Outcome of [`SnapshotStaging::promote_staged`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize)]
pub struct PromoteReport {
    /// Staged snapshots moved into the live table.
    pub promoted: u64,
    /// Staged snapshots dropped because the live one was newer at the same
    /// (or a higher) schema version.
    pub kept_live: u64,
}

/// The snapshot cache: load, guarded save and delete of the live snapshot of
/// one aggregate. All the repository needs.
///
/// The operators' queries ([`SnapshotAdmin`]) and the staging area of a
/// migration ([`SnapshotStaging`]) are separate, optional traits: a backend
/// that can keep a value per aggregate (a key-value bucket on a replicated
/// log) can offer the cache without them.
pub trait SnapshotStore: Clone + Send + Sync + 'static {
    /// The live snapshot of an aggregate: the one with the highest
    /// `(schema_version, version)` that has not been rolled back.
    fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> impl Future<Output = Result<Option<Snapshot>>> + Send;

    /// Stores `snapshot` unless the live one supersedes it (see
    /// [`Snapshot::supersedes`]) or a rolled-back row is at the same or a
    /// higher stream version (see the module docs). Rows of the aggregate
    /// beyond its stream's head are deleted first, in the same transaction,
    /// so a snapshot left ahead of restored events never blocks the write.
    /// Then trims the aggregate to the store's history size. Atomic:
    /// concurrent writers of the same aggregate end with the newest one live.
    fn save_snapshot(
        &self,
        snapshot: &Snapshot,
    ) -> impl Future<Output = Result<SnapshotWrite>> + Send;

    /// Deletes every snapshot of one aggregate (its whole history, rolled-back
    /// rows included); returns how many.
    fn delete_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// What a snapshot load reads: the live snapshot of the aggregate of
    /// `stream` (as [`SnapshotStore::load_snapshot`] with `stream.id()`), and
    /// the events of `stream` in `events` from the snapshot's version on,
    /// that event first (as [`EventStore::read_stream`] with
    /// `ReadStream::forward().from(version)`; finding it proves the snapshot
    /// is not ahead of the head). `Ok(None)` when there is no live snapshot;
    /// an `Err` is the snapshot's load failing, while a failure reading the
    /// events comes through the stream.
    ///
    /// Provided: the two reads one after the other. A backend that keeps
    /// snapshots and events in one database overrides it to answer both in
    /// one round trip when `events` is a handle on that same database.
    fn load_snapshot_and_events<S: EventStore>(
        &self,
        events: &S,
        aggregate_type: &str,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Option<(Snapshot, EventStream)>>> + Send {
        let load = self.load_snapshot(aggregate_type, stream.id());
        async move {
            let Some(snapshot) = load.await? else {
                return Ok(None);
            };
            let read = events.read_stream(stream, ReadStream::forward().from(snapshot.version));
            Ok(Some((snapshot, read)))
        }
    }
}

/// The queries and repairs operators run over the live snapshots: bulk
/// invalidation, coverage, freshness, paged listings, the history size,
/// history and rollback (`annals snapshots
/// status|stale|invalidate|keep|history|rollback`, and the snapshot jobs
/// `prepopulate`, which works through the stale list, and `verify_live`).
///
/// Optional. Coverage and freshness join the snapshots with the streams, so
/// the SQL backends keep both in one database; a backend that cannot answer
/// these without reading every stream can leave the trait out.
pub trait SnapshotAdmin: SnapshotStore {
    /// Bulk invalidation: deletes the snapshots of a type, history rows
    /// included (only those with `schema_version < below_schema_version`
    /// when given); returns how many.
    fn invalidate_snapshots(
        &self,
        aggregate_type: &str,
        below_schema_version: Option<u32>,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Coverage per aggregate type (all types when `None`), sorted by type.
    fn snapshot_coverage(
        &self,
        aggregate_type: Option<&str>,
    ) -> impl Future<Output = Result<Vec<SnapshotCoverage>>> + Send;

    /// Aggregates whose head is more than `min_events` past their live
    /// snapshot (or who have none, or one ahead of the head, and more than
    /// `min_events` events), most behind first. Holds every row in memory:
    /// see [`SnapshotAdmin::list_stale_snapshots`] for a lazy listing.
    fn stale_snapshots(
        &self,
        aggregate_type: Option<&str>,
        min_events: u64,
    ) -> impl Future<Output = Result<Vec<StaleSnapshot>>> + Send;

    /// Snapshots kept per aggregate (the live one included), as recorded in
    /// the store. Every writer of the store trims to this length.
    fn snapshot_history_size(&self) -> impl Future<Output = Result<u32>> + Send;

    /// Records a new history size (at least 1) and trims every aggregate to
    /// it at once, the live snapshot always kept and rolled-back rows the
    /// first to go; returns the rows deleted. Atomic with respect to guarded
    /// writes: a write either trims to the old size before this or to the
    /// new one after it.
    fn set_snapshot_history_size(&self, keep: u32) -> impl Future<Output = Result<u64>> + Send;

    /// The snapshot history of one aggregate, newest `(schema_version,
    /// version)` first, with the live one marked. At most the history size
    /// (plus rows left by a larger size before a change).
    fn snapshot_history(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> impl Future<Output = Result<Vec<SnapshotHistoryEntry>>> + Send;

    /// Makes the aggregate's row at `to_version` live: every row above it
    /// is marked rolled back (see the module docs), the row itself is
    /// cleared of that mark. Serialized with guarded writes of the same
    /// aggregate. Fails with [`Error::Snapshot`](crate::Error::Snapshot),
    /// naming the versions kept, when there is no row at `to_version`.
    fn rollback_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        to_version: StreamVersion,
    ) -> impl Future<Output = Result<RollbackReport>> + Send;

    /// The rows of [`SnapshotAdmin::stale_snapshots`], lazily, in stream-id
    /// order (type, then id), fetched a page at a time with keyset
    /// pagination: memory stays bounded however many aggregates there are.
    fn list_stale_snapshots(
        &self,
        aggregate_type: Option<&str>,
        min_events: u64,
    ) -> BoxStream<'static, Result<StaleSnapshot>>;

    /// The live snapshot of every aggregate of a type that has one, ordered
    /// by aggregate id, lazily (keyset pagination).
    fn live_snapshots(&self, aggregate_type: &str) -> BoxStream<'static, Result<Snapshot>>;
}

/// The staging area of a snapshot migration: snapshots built at a new schema
/// version ahead of a deploy, kept apart from the live ones until
/// [`SnapshotStaging::promote_staged`] switches them in one transaction
/// (`SnapshotJobs::migrate`, `verify` and `promote`).
///
/// Optional: it needs a second table beside the live snapshots and a
/// transaction over both.
pub trait SnapshotStaging: SnapshotStore {
    /// Writes (or replaces) the staged snapshot of one aggregate.
    fn stage_snapshot(&self, snapshot: &Snapshot) -> impl Future<Output = Result<()>> + Send;

    /// The staged snapshot of one aggregate.
    fn load_staged(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> impl Future<Output = Result<Option<Snapshot>>> + Send;

    /// All staged snapshots of a type, ordered by aggregate id, lazily.
    fn staged_snapshots(&self, aggregate_type: &str) -> BoxStream<'static, Result<Snapshot>>;

    /// Moves the staged snapshots of a type into the live table in one
    /// transaction, never over a live snapshot that supersedes the staged
    /// one, and deletes the type's staging rows.
    fn promote_staged(
        &self,
        aggregate_type: &str,
    ) -> impl Future<Output = Result<PromoteReport>> + Send;

    /// Deletes the staged snapshots of a type; returns how many.
    fn clear_staged(&self, aggregate_type: &str) -> impl Future<Output = Result<u64>> + Send;
}

/// The snapshot store of a repository configured without snapshots: it holds
/// nothing and accepts nothing. It is only a cache ([`SnapshotStore`]), so no
/// snapshot job or operator query runs against it.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSnapshots;

fn no_store() -> crate::Error {
    crate::Error::Snapshot("no snapshot store configured".into())
}

impl SnapshotStore for NoSnapshots {
    async fn load_snapshot(&self, _: &str, _: &str) -> Result<Option<Snapshot>> {
        Ok(None)
    }
    async fn save_snapshot(&self, _: &Snapshot) -> Result<SnapshotWrite> {
        Err(no_store())
    }
    async fn delete_snapshot(&self, _: &str, _: &str) -> Result<u64> {
        Ok(0)
    }
}
