//! Snapshots: a cache of an aggregate's state at a known stream version.
//!
//! A snapshot is never the source of truth. The repository uses one only when
//! its `schema_version` is the aggregate's current one (or can be migrated to
//! it) and its version is not beyond the stream's head; otherwise it replays
//! the stream. Removing the snapshot store changes no result, only speed.
//!
//! The live table holds the newest snapshot of each aggregate (or the newest
//! `K`, when a backend is configured to keep history for rollback). A
//! separate staging table holds snapshots that a migration built ahead of a
//! deploy; `promote_staged` moves them into the live table in one
//! transaction.
//!
//! A backend implements the cache, [`SnapshotStore`], and opts into the rest:
//! [`SnapshotAdmin`] (invalidation, coverage, freshness) and
//! [`SnapshotStaging`] (the staging area). They are separate because each
//! asks more of the storage: the queries join snapshots with streams, the
//! staging area needs a transaction over two tables.

use std::collections::BTreeMap;
use std::future::Future;

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Result, StreamVersion};

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

/// The outcome of a guarded snapshot write.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SnapshotWrite {
    /// Stored as the live snapshot.
    Written,
    /// Not stored: the live snapshot is newer (higher schema version, or same
    /// schema version and higher stream version).
    Superseded,
}

/// Snapshot coverage of one aggregate type (seed 000's coverage query).
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

/// An aggregate whose snapshot is behind its head (seed 000's freshness query).
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
    /// `head - snapshot_version`.
    pub events_behind: u64,
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
    /// `(schema_version, version)`.
    fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> impl Future<Output = Result<Option<Snapshot>>> + Send;

    /// Stores `snapshot` unless the live one supersedes it (see
    /// [`Snapshot::supersedes`]). Atomic: concurrent writers of the same
    /// aggregate end with the newest one live.
    fn save_snapshot(
        &self,
        snapshot: &Snapshot,
    ) -> impl Future<Output = Result<SnapshotWrite>> + Send;

    /// Deletes every live snapshot of one aggregate; returns how many.
    fn delete_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> impl Future<Output = Result<u64>> + Send;
}

/// The queries operators run over the live snapshots: bulk invalidation,
/// coverage and freshness (`annals snapshots coverage|stale|invalidate`, and
/// `SnapshotJobs::prepopulate`, which works through the stale list).
///
/// Optional. Coverage and freshness join the snapshots with the streams, so
/// the SQL backends keep both in one database; a backend that cannot answer
/// these without reading every stream can leave the trait out.
pub trait SnapshotAdmin: SnapshotStore {
    /// Bulk invalidation: deletes the live snapshots of a type (only those
    /// with `schema_version < below` when given); returns how many.
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
    /// snapshot (or who have none and more than `min_events` events), most
    /// behind first.
    fn stale_snapshots(
        &self,
        aggregate_type: Option<&str>,
        min_events: u64,
    ) -> impl Future<Output = Result<Vec<StaleSnapshot>>> + Send;
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
