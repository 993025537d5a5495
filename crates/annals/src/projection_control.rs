//! What runs a projection safely besides its checkpoint: the projection
//! lock (one runner or rebuild of a projection version at a time, on any
//! machine) and the dead-letter table (events parked by the `Park` error
//! policy).
//!
//! Both live in the store, next to the checkpoints: on SQLite in the
//! `projection_locks` and `dead_letters` tables of the same file, on
//! PostgreSQL in the same tables of the store's schema, in memory in the
//! store itself (shared by its clones).
//!
//! # The lock
//!
//! A lease row per checkpoint name ([`crate::checkpoint_name`]): its owner
//! (process id and host), a token unique to the acquisition, and an expiry.
//! [`ProjectionControl::acquire_projection_lock`] takes it when there is no
//! row or the row has expired, in one statement (SQLite: in the writer's
//! transaction; PostgreSQL: an upsert guarded by `expires_at < now()`, the
//! database's clock), and otherwise returns the holder. The holder renews it
//! well before it expires ([`ProjectionControl::renew_projection_lock`],
//! which fails when the token is no longer the row's: the lease expired and
//! someone else took it) and deletes it when it stops.
//! [`ProjectionControl::save_checkpoint_fenced`] saves a checkpoint only
//! while the lock still carries the saver's token, checked in the save's
//! transaction: the runner's own checkpoint moves are fenced like its
//! batches.
//!
//! # Trip notes
//!
//! A runner stopped by its circuit breaker ([`crate::ProjectionState::Tripped`])
//! releases its lock and puts back in its place a row that is already
//! expired, whose token says why (`tripped: REASON`) and whose expiry is the
//! time of the trip ([`record_trip`]). It blocks no one: the next runner or
//! rebuild takes the lock over it, and the note is gone. Until then
//! [`projection_trip`] reads it, so that a process other than the one that
//! tripped (`annals check`) can report the stopped projection. The note
//! needs no table of its own; when another runner took the lock between the
//! release and the note, the projection runs again and no note is left.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::{CheckpointStore, EventId, GlobalPosition, Result, StreamId};

/// A held projection lock ([`ProjectionControl::acquire_projection_lock`]).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ProjectionLock {
    /// The checkpoint name it protects.
    pub checkpoint: String,
    /// Who holds it (see [`lock_owner`]).
    pub owner: String,
    /// Unique to this acquisition: renewals and the release name it.
    pub token: String,
    /// When it expires unless renewed.
    pub expires_at: DateTime<Utc>,
}

/// The outcome of [`ProjectionControl::acquire_projection_lock`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum LockAttempt {
    /// Taken: this caller holds it.
    Acquired(ProjectionLock),
    /// Held by someone else, until `expires_at` unless renewed.
    Held(ProjectionLock),
}

/// The owner string of this process: `pid PID on HOST`.
pub fn lock_owner() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "an unknown host".to_owned());
    format!("pid {} on {host}", std::process::id())
}

/// A fresh lock token.
pub fn lock_token() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// An event a projection could not apply, parked by the `Park` error policy
/// ([`crate::ErrorPolicy::Park`]) so that the projection went on.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct DeadLetter {
    /// The projection's checkpoint name ([`crate::checkpoint_name`]).
    pub checkpoint: String,
    /// The event's position.
    pub position: GlobalPosition,
    /// The event's id.
    pub event_id: EventId,
    /// Its stream.
    pub stream: StreamId,
    /// Its type.
    pub event_type: String,
    /// The handler's last error.
    pub error: String,
    /// Attempts made on it.
    pub attempts: u32,
    /// When it was parked (or last retried).
    pub parked_at: DateTime<Utc>,
}

/// Projection locks and dead letters, kept by the store (see the module
/// docs).
pub trait ProjectionControl: CheckpointStore {
    /// Takes the lock of `checkpoint` for `owner` (with a fresh `token`)
    /// for `ttl`, when no one holds it or the holder's lease has expired;
    /// otherwise returns the holder.
    fn acquire_projection_lock(
        &self,
        checkpoint: &str,
        owner: &str,
        token: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<LockAttempt>> + Send;

    /// How many partitioned workers of `group` (a projection version's
    /// checkpoint name) are registered and live
    /// ([`crate::PartitionLeases::join_partitions`]): a plain runner or
    /// rebuild that took the projection lock refuses to run beside them.
    /// Stores without partition leases have none.
    fn live_partition_workers(&self, group: &str) -> impl Future<Output = Result<u32>> + Send;

    /// Extends `lock` by `ttl` from now; `None` when it is no longer held
    /// with this token (it expired and someone else took it, or it was
    /// released).
    fn renew_projection_lock(
        &self,
        lock: &ProjectionLock,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<ProjectionLock>>> + Send;

    /// Releases `lock` (nothing when it is no longer held with its token).
    fn release_projection_lock(
        &self,
        lock: &ProjectionLock,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Saves `position` as the checkpoint `name` (forward only, as
    /// [`CheckpointStore::save_checkpoint`]) under `fence`: in one
    /// transaction, checks that the lease still carries the fence's token
    /// and saves. Fails with [`crate::Error::Fenced`], saving nothing, once
    /// another runner took the lease over (a runner paused past its lease
    /// cannot move the checkpoint, even over a stretch without events it
    /// handles). A partition fence is refused with [`crate::Error::Config`]
    /// by a store without partition leases.
    fn save_checkpoint_fenced(
        &self,
        name: &str,
        position: GlobalPosition,
        fence: &crate::Fence,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Deletes the checkpoint `name` (as
    /// [`CheckpointStore::reset_checkpoint`]) under `fence`: in one
    /// transaction, checks that the lease still carries the fence's token
    /// and deletes. Fails with [`crate::Error::Fenced`], deleting nothing,
    /// once another runner took the lease over, so a rebuild from the start
    /// that lost its lock before it began cannot send the live runner that
    /// took over back to the first event. The checkpoint's dead letters go
    /// with it, in the same transaction: the rebuild delivers their events
    /// again, and retrying a letter left behind would apply its event a
    /// second time. A partition fence is refused with
    /// [`crate::Error::Config`] by a store without partition leases.
    fn reset_checkpoint_fenced(
        &self,
        name: &str,
        fence: &crate::Fence,
    ) -> impl Future<Output = Result<()>> + Send;

    /// The holder of the lock of `checkpoint`, expired or not (`None`: no
    /// row).
    fn projection_lock(
        &self,
        checkpoint: &str,
    ) -> impl Future<Output = Result<Option<ProjectionLock>>> + Send;

    /// Records `letter`. Parking the same event (checkpoint and position)
    /// again replaces its error, attempts and time.
    fn park_event(&self, letter: &DeadLetter) -> impl Future<Output = Result<()>> + Send;

    /// The parked events of `checkpoint`, in global order.
    fn dead_letters(
        &self,
        checkpoint: &str,
    ) -> impl Future<Output = Result<Vec<DeadLetter>>> + Send;

    /// Deletes the parked event `event_id` of `checkpoint`; whether there
    /// was one.
    fn drop_dead_letter(
        &self,
        checkpoint: &str,
        event_id: EventId,
    ) -> impl Future<Output = Result<bool>> + Send;
}

/// The token prefix of a trip note (see the module docs).
const TRIP_TOKEN_PREFIX: &str = "tripped: ";

/// What a runner stopped by its circuit breaker left in its lock row (see
/// the module docs): [`projection_trip`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ProjectionTrip {
    /// The checkpoint name of the projection.
    pub checkpoint: String,
    /// The runner that tripped ([`lock_owner`]).
    pub owner: String,
    /// Why it tripped (as in [`crate::ProjectionState::Tripped`]).
    pub reason: String,
    /// When it tripped.
    pub at: DateTime<Utc>,
}

impl ProjectionTrip {
    /// The trip note a lock row holds, if it is one.
    pub fn from_lock(lock: &ProjectionLock) -> Option<Self> {
        let reason = lock.token.strip_prefix(TRIP_TOKEN_PREFIX)?;
        Some(ProjectionTrip {
            checkpoint: lock.checkpoint.clone(),
            owner: lock.owner.clone(),
            reason: reason.to_owned(),
            at: lock.expires_at,
        })
    }
}

/// Leaves the trip note of `checkpoint` (see the module docs), once its
/// runner `owner` has released the lock: an expired lock row whose token
/// holds `reason`. Returns `false`, leaving nothing, when another runner
/// holds the lock by now.
pub async fn record_trip<S: ProjectionControl>(
    store: &S,
    checkpoint: &str,
    owner: &str,
    reason: &str,
) -> Result<bool> {
    let token = format!("{TRIP_TOKEN_PREFIX}{reason}");
    let attempt = store
        .acquire_projection_lock(checkpoint, owner, &token, Duration::ZERO)
        .await?;
    Ok(matches!(attempt, LockAttempt::Acquired(_)))
}

/// The trip note of `checkpoint`: `Some` when its last runner was stopped
/// by its circuit breaker and no runner or rebuild has taken the lock since.
pub async fn projection_trip<S: ProjectionControl>(
    store: &S,
    checkpoint: &str,
) -> Result<Option<ProjectionTrip>> {
    Ok(store
        .projection_lock(checkpoint)
        .await?
        .as_ref()
        .and_then(ProjectionTrip::from_lock))
}
