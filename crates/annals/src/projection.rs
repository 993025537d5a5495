//! Projections: read models built from the global feed, with checkpoints.
//!
//! A [`Projection`] has a name, a version, a filter and a batch handler. A
//! [`ProjectionRunner`] feeds it through a [`Subscription`] (catch-up from
//! its checkpoint, then live), one bounded batch at a time, and saves the
//! checkpoint (a [`CheckpointStore`] entry named by [`checkpoint_name`])
//! after each batch.
//!
//! # Delivery guarantees
//!
//! - **At-least-once** (any [`Projection`], read model anywhere): the
//!   checkpoint is saved *after* the handler returned. A crash between the
//!   two delivers the batch again on restart, never skips it. Handlers make
//!   redelivery harmless: keep, per read-model row, the position of the last
//!   event applied to it and skip events at or below it (see
//!   [`IdempotencyGuard`]); for calls to other systems, send the event id
//!   ([`idempotency_key`]) as the idempotency key.
//! - **Exactly-once in effect** (read model in the same database as the
//!   events): the backends offer appliers whose handler runs inside the
//!   transaction that also saves the checkpoint (`annals-sqlite`'s
//!   `SqliteEventStore::transactional`, `annals-postgres`'s
//!   `PgEventStore::transactional`), so a batch's rows and its checkpoint
//!   commit together or not at all. They plug into the same runner through
//!   [`BatchApplier`].
//!
//! # Errors
//!
//! A handler that fails is retried with backoff ([`RunnerOptions::handler_retry`]).
//! When a batch still fails, the runner applies its events one at a time to
//! find the event that fails (the events before it are applied and
//! checkpointed), retries that one the same way, and then stops with
//! [`ProjectionError::Handler`], naming the projection and the event's
//! position, stream, version and type. The checkpoint is then just before
//! that event: a fixed handler resumes there. A store that keeps failing
//! stops it with [`ProjectionError::Store`].
//!
//! The handler knows whether a batch is a replay (read while catching up)
//! or live ([`BatchContext::replaying`]), so side effects such as e-mails
//! need not fire again when a projection catches up.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::blue_green::{BlueGreenApplier, TableNames};
use crate::projection_control::{lock_owner, lock_token, DeadLetter, LockAttempt, ProjectionLock};
use crate::subscription::{is_transient, Backoff, Subscription, SubscriptionOptions};
use crate::{
    CheckpointStore, Error, EventId, EventStore, FeedPage, GlobalPosition, ProjectionControl,
    ReadAll, RecordedEvent, StreamId, StreamVersion,
};

/// Calls a method of the applier with the store retry policy (transient
/// errors again, with backoff).
macro_rules! retry_mut {
    ($applier:expr, $retry:expr, $call:ident ( $($arg:expr),* )) => {{
        let mut attempt = 1;
        loop {
            match $applier.$call($($arg),*).await {
                Ok(v) => break Ok(v),
                Err(e) if is_transient(&e) && attempt < $retry.max_attempts => {
                    tokio::time::sleep($retry.delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => break Err(e),
            }
        }
    }};
}
/// The error a handler returns: the user's own, boxed.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Which events a projection receives.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct ProjectionFilter {
    /// Only events of these categories (empty: all).
    pub categories: Vec<String>,
    /// Only events of these types (empty: all).
    pub event_types: Vec<String>,
}

impl ProjectionFilter {
    /// Every event.
    pub fn all() -> Self {
        Self::default()
    }
    /// Only events of these categories.
    pub fn categories<I: IntoIterator<Item = S>, S: Into<String>>(mut self, c: I) -> Self {
        self.categories = c.into_iter().map(Into::into).collect();
        self
    }
    /// Only events of these types.
    pub fn event_types<I: IntoIterator<Item = S>, S: Into<String>>(mut self, t: I) -> Self {
        self.event_types = t.into_iter().map(Into::into).collect();
        self
    }
}

/// What a handler is told about its batch.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct BatchContext {
    /// The checkpoint name the batch commits to: the projection's
    /// ([`checkpoint_name`]), or one partition's
    /// ([`partition_checkpoint`](crate::partition_checkpoint)). Appliers
    /// save this one.
    pub checkpoint: String,
    /// The checkpoint before the batch: the batch holds the matching events
    /// after it. A transactional applier checks that the stored checkpoint
    /// is still here (or already at `position`) before it applies.
    pub after: GlobalPosition,
    /// The checkpoint saved once the batch is applied.
    pub position: GlobalPosition,
    /// Whether the batch was read while catching up (a replay of events
    /// appended before the runner reached the end of the log), not live.
    pub replaying: bool,
    /// Which attempt at this batch this is (1 for the first).
    pub attempt: u32,
    /// The names to write a SQL projection's tables under: live, or shadow
    /// during a blue-green rebuild (see [`crate::blue_green`]). Set by the
    /// backends' transactional appliers; live (the default) otherwise.
    pub tables: TableNames,
}

/// A read model fed from the global feed (see the module docs).
pub trait Projection: Send + 'static {
    /// The projection's name (with its version, the checkpoint's name).
    fn name(&self) -> &str;

    /// Its version: a new version is a new checkpoint, so it starts from
    /// the beginning.
    fn version(&self) -> u32 {
        1
    }

    /// Which events it receives (default: all).
    fn filter(&self) -> ProjectionFilter {
        ProjectionFilter::all()
    }

    /// Applies one batch (matching events in global order, never empty).
    ///
    /// Contract: may be called again with the same events (at-least-once:
    /// after a crash before the checkpoint was saved, or a retry after an
    /// error), so it must be idempotent (see [`IdempotencyGuard`]).
    fn handle(
        &mut self,
        events: &[RecordedEvent],
        ctx: &BatchContext,
    ) -> impl Future<Output = std::result::Result<(), HandlerError>> + Send;
}

/// The checkpoint name of a projection: `name@vVERSION`.
pub fn checkpoint_name(name: &str, version: u32) -> String {
    format!("{name}@v{version}")
}

/// Why applying a batch failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The handler failed: retried, then reported with the event.
    #[error("handler failed: {0}")]
    Handler(HandlerError),
    /// The store failed (the checkpoint or the transaction).
    #[error(transparent)]
    Store(#[from] Error),
}

/// What the runner drives: applies a batch and saves its checkpoint.
///
/// [`AtLeastOnce`] calls a [`Projection`] and then saves the checkpoint; the
/// backends' transactional appliers do both in one transaction.
pub trait BatchApplier: Send + 'static {
    /// The projection's name.
    fn name(&self) -> &str;
    /// The checkpoint it saves ([`checkpoint_name`]).
    fn checkpoint(&self) -> String;
    /// The events it receives.
    fn filter(&self) -> ProjectionFilter;
    /// Applies `events` and saves `ctx.position` as the checkpoint
    /// `ctx.checkpoint`: after the handler (at-least-once), or atomically
    /// with it. `events` is never empty from a [`ProjectionRunner`]; a
    /// [`PartitionedRunner`](crate::PartitionedRunner) passes an empty
    /// batch for a stretch without events of its partition: then only the
    /// checkpoint moves (the handler is not called).
    fn apply(
        &mut self,
        events: &[RecordedEvent],
        ctx: &BatchContext,
    ) -> impl Future<Output = std::result::Result<(), ApplyError>> + Send;

    /// [`apply`](Self::apply) for a batch held in an [`Arc`]: what the
    /// runners call. An applier that hands the events to another thread
    /// (SQLite's writer) keeps a reference to the batch instead of copying
    /// every event; the default applies the borrowed events.
    fn apply_shared(
        &mut self,
        events: &Arc<Vec<RecordedEvent>>,
        ctx: &BatchContext,
    ) -> impl Future<Output = std::result::Result<(), ApplyError>> + Send {
        self.apply(events.as_slice(), ctx)
    }

    /// Tells the applier the lease it commits under (called by the runner
    /// once it holds its lock, and by
    /// [`PartitionedRunner`](crate::PartitionedRunner) per partition). A
    /// transactional applier checks it in each batch's transaction and
    /// fails with [`Error::Fenced`] (rolling back) once another runner has
    /// taken the lease over; [`AtLeastOnce`] fences its checkpoint save
    /// (not the handler's effects, which it cannot make atomic with the
    /// check); the default ignores it.
    fn set_fence(&mut self, fence: Option<crate::Fence>) {
        let _ = fence;
    }

    /// Applies one parked event again ([`retry_dead_letter`]) without
    /// moving the checkpoint (it is already past the event).
    fn apply_parked(
        &mut self,
        event: &RecordedEvent,
        ctx: &BatchContext,
    ) -> impl Future<Output = std::result::Result<(), ApplyError>> + Send;
}

/// The at-least-once applier: the projection's handler, then the
/// checkpoint's save, fenced by the runner's lease
/// ([`ProjectionControl::save_checkpoint_fenced`]) once it has one.
pub struct AtLeastOnce<C, P> {
    checkpoints: C,
    projection: P,
    checkpoint: String,
    /// The lease it runs under: its checkpoint saves are fenced (the
    /// handler's effects cannot be).
    fence: Option<crate::Fence>,
}

impl<C: CheckpointStore, P: Projection> AtLeastOnce<C, P> {
    /// `projection`, checkpointed in `checkpoints`.
    pub fn new(checkpoints: C, projection: P) -> Self {
        let checkpoint = checkpoint_name(projection.name(), projection.version());
        AtLeastOnce {
            checkpoints,
            projection,
            checkpoint,
            fence: None,
        }
    }

    /// The projection (to read its in-memory state in tests and examples).
    pub fn projection(&self) -> &P {
        &self.projection
    }
}

impl<C: ProjectionControl, P: Projection> BatchApplier for AtLeastOnce<C, P> {
    fn name(&self) -> &str {
        self.projection.name()
    }
    fn checkpoint(&self) -> String {
        self.checkpoint.clone()
    }
    fn filter(&self) -> ProjectionFilter {
        self.projection.filter()
    }
    async fn apply(
        &mut self,
        events: &[RecordedEvent],
        ctx: &BatchContext,
    ) -> std::result::Result<(), ApplyError> {
        // A partition's stretch without its events only moves the checkpoint.
        if !events.is_empty() {
            self.projection
                .handle(events, ctx)
                .await
                .map_err(ApplyError::Handler)?;
        }
        save_checkpoint_under(
            &self.checkpoints,
            &ctx.checkpoint,
            ctx.position,
            self.fence.as_ref(),
        )
        .await?;
        Ok(())
    }
    fn set_fence(&mut self, fence: Option<crate::Fence>) {
        self.fence = fence;
    }
    async fn apply_parked(
        &mut self,
        event: &RecordedEvent,
        ctx: &BatchContext,
    ) -> std::result::Result<(), ApplyError> {
        self.projection
            .handle(std::slice::from_ref(event), ctx)
            .await
            .map_err(ApplyError::Handler)
    }
}

/// Everything that stops a projection, and the timeout of [`wait_for`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// The handler kept failing on one event (a poison event): the runner
    /// stopped with its checkpoint just before it. Fix the handler (or the
    /// data) and start the runner again; it resumes at this event.
    #[error(
        "projection {projection} failed on the event at position {position} \
         ({stream} version {version}, type {event_type:?}) after {attempts} attempts: {source}"
    )]
    Handler {
        /// The projection's name.
        projection: String,
        /// The event's position.
        position: GlobalPosition,
        /// Its stream.
        stream: StreamId,
        /// Its version in the stream.
        version: StreamVersion,
        /// Its type.
        event_type: String,
        /// Attempts made on it.
        attempts: u32,
        /// The handler's last error.
        #[source]
        source: HandlerError,
    },
    /// Reading the feed or saving the checkpoint kept failing; the
    /// checkpoint is where it was. Start the runner again once the store
    /// is back.
    #[error("projection {projection} stopped: the store failed: {source}")]
    Store {
        /// The projection's name.
        projection: String,
        /// The store's error.
        #[source]
        source: Error,
    },
    /// Another runner or rebuild holds the projection's lock
    /// ([`ProjectionControl::acquire_projection_lock`]): this one did not
    /// start. It can start once the holder stops (or its lease expires).
    #[error(
        "projection {projection} ({checkpoint}) is locked by {owner} until {expires_at} \
         (another runner or rebuild of this version runs)"
    )]
    Locked {
        /// The projection's name.
        projection: String,
        /// Its checkpoint name.
        checkpoint: String,
        /// The holder ([`crate::lock_owner`]).
        owner: String,
        /// When the holder's lease expires unless renewed.
        expires_at: chrono::DateTime<chrono::Utc>,
    },
    /// Partitioned workers ([`crate::PartitionedRunner::spawn_leased`]) of
    /// this version are live: a plain runner or rebuild would write the same
    /// read model under another checkpoint beside them, so it did not start
    /// (it took the lock, found them and released it).
    #[error(
        "projection {projection} ({checkpoint}) runs as partitioned workers ({workers} live): \
         stop them before running it unpartitioned, or run it with the same partitions"
    )]
    PartitionedWorkers {
        /// The projection's name.
        projection: String,
        /// Its checkpoint name (the partitions' group).
        checkpoint: String,
        /// How many workers were registered and live.
        workers: u32,
    },
    /// The runner could not renew its lock in time (the lease expired and
    /// another runner may have taken it): it stopped.
    #[error("projection {projection} lost its lock on {checkpoint}: it stopped")]
    LockLost {
        /// The projection's name.
        projection: String,
        /// Its checkpoint name.
        checkpoint: String,
    },
    /// The circuit breaker tripped: a batch made no progress (retries
    /// included, or a handler that did not return) for the configured time
    /// ([`ProjectionRunner::trip_after`]).
    #[error("projection {projection} tripped: {reason}")]
    Tripped {
        /// The projection's name.
        projection: String,
        /// Why (the time without progress, the position, the last error).
        reason: String,
    },
    /// A blue-green rebuild of a version older than the active one
    /// ([`ProjectionRunner::rebuild_blue_green`]): nothing was changed.
    #[error("projection {projection} v{version} is older than its active version v{active}: not rebuilt")]
    Superseded {
        /// The projection's name.
        projection: String,
        /// The version asked for.
        version: u32,
        /// The active version.
        active: u32,
    },
    /// [`retry_dead_letter`] found no parked event with this id.
    #[error("projection checkpoint {checkpoint} has no parked event {event_id}")]
    NoDeadLetter {
        /// The checkpoint name.
        checkpoint: String,
        /// The event id asked for.
        event_id: EventId,
    },
    /// [`wait_for`] (or [`ProjectionHandle::wait_for`]) gave up: the
    /// projection had not reached `position` within `waited`.
    #[error(
        "projection checkpoint {checkpoint} did not reach {position} within {waited:?} \
         (it is at {})", display_reached(.reached)
    )]
    WaitTimeout {
        /// The checkpoint waited on.
        checkpoint: String,
        /// The position waited for.
        position: GlobalPosition,
        /// Where the checkpoint was when the wait gave up.
        reached: Option<GlobalPosition>,
        /// How long it waited.
        waited: Duration,
    },
    /// The runner is no longer running (stopped, or failed with an error
    /// its `join` returns), so a wait cannot succeed.
    #[error("projection {projection} is not running (its checkpoint is at {})", display_reached(.reached))]
    NotRunning {
        /// The projection's name.
        projection: String,
        /// Its last checkpoint.
        reached: Option<GlobalPosition>,
    },
}

fn display_reached(reached: &Option<GlobalPosition>) -> String {
    reached.map_or_else(|| "the start".to_owned(), |p| p.to_string())
}

/// How a [`ProjectionRunner`] reads and retries.
#[derive(Clone, PartialEq, Debug)]
pub struct RunnerOptions {
    /// At most this many events per batch.
    pub batch_size: usize,
    /// The subscription's poll interval at the end of the log.
    pub poll_interval: Duration,
    /// Retries of a failed read or checkpoint save.
    pub store_retry: Backoff,
    /// Retries of a failed handler, per batch and per isolated event.
    pub handler_retry: Backoff,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        let sub = SubscriptionOptions::default();
        RunnerOptions {
            batch_size: sub.batch_size,
            poll_interval: sub.poll_interval,
            store_retry: Backoff::default(),
            handler_retry: Backoff {
                initial: Duration::from_millis(50),
                max: Duration::from_secs(5),
                max_attempts: 5,
            },
        }
    }
}

/// What the runner does with an event the handler keeps failing on (after
/// [`RunnerOptions::handler_retry`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum ErrorPolicy {
    /// Stop with [`ProjectionError::Handler`], the checkpoint just before
    /// the event (the default).
    #[default]
    Stop,
    /// Park the event in the store's dead-letter table
    /// ([`ProjectionControl::park_event`]), move the checkpoint past it and
    /// go on. Parked events are listed with
    /// [`ProjectionControl::dead_letters`], applied again with
    /// [`retry_dead_letter`] and dropped with
    /// [`ProjectionControl::drop_dead_letter`].
    Park,
}

/// Where a runner stands ([`ProjectionHandle::state`]).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum ProjectionState {
    /// Taking its lock and loading its checkpoint.
    Starting,
    /// Applying batches or waiting for new events.
    Running,
    /// Stopped on request.
    Stopped,
    /// Stopped by the circuit breaker ([`ProjectionRunner::trip_after`]),
    /// with the reason.
    Tripped(String),
    /// Stopped by an error (the one [`ProjectionHandle::join`] returns).
    Failed(String),
}

/// How a rebuild reads and checkpoints ([`ProjectionRunner::rebuild`]).
///
/// The defaults (pages of [`DEFAULT_REBUILD_PAGE`] events, batches of
/// [`DEFAULT_REBUILD_BATCH`]) are larger than a live runner's batches: a
/// rebuild's cost per batch (its transaction, the checkpoint, the lease
/// check, the handler's statements) is paid once per ten thousand events
/// instead of once per few hundred, while memory stays bounded by two
/// batches (one applied, one read ahead) of at most
/// [`REBUILD_BATCH_BYTES`] each.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RebuildOptions {
    /// Events read per page (bounds memory with `checkpoint_every`).
    pub batch_size: usize,
    /// The handler gets batches of up to this many events (fewer once a
    /// batch holds [`REBUILD_BATCH_BYTES`]), and the checkpoint is saved
    /// after each: a crash loses at most this much work.
    pub checkpoint_every: usize,
    /// Start from position 0 (the checkpoint is reset first: the read model
    /// must be empty or reset by the caller); `false` resumes from the
    /// checkpoint (after a crash, a stop or a failure).
    pub from_start: bool,
}

impl Default for RebuildOptions {
    fn default() -> Self {
        RebuildOptions {
            batch_size: DEFAULT_REBUILD_PAGE,
            checkpoint_every: DEFAULT_REBUILD_BATCH,
            from_start: false,
        }
    }
}

/// Default of [`RebuildOptions::batch_size`]: events read per page.
pub const DEFAULT_REBUILD_PAGE: usize = 5_000;

/// Default of [`RebuildOptions::checkpoint_every`]: events per handler batch
/// and checkpoint.
pub const DEFAULT_REBUILD_BATCH: usize = 10_000;

/// What a rebuild reports after each checkpoint ([`ProjectionRunner::rebuild`]).
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct RebuildProgress {
    /// The checkpoint just saved.
    pub position: GlobalPosition,
    /// The head of the feed when last read.
    pub head: Option<GlobalPosition>,
    /// Events scanned by this call so far (matching or not).
    pub events: u64,
    /// Events scanned still to go up to `head`.
    pub remaining: u64,
    /// Events scanned per second by this call.
    pub events_per_sec: f64,
    /// Time since this call started.
    pub elapsed: Duration,
}

/// Runs one projection: subscription, batches, checkpoints, error policy
/// (see the module docs).
///
/// The runner (and a [`rebuild`](Self::rebuild)) first takes the
/// projection's lock in the store ([`ProjectionControl`]): a second runner or
/// rebuild of the same projection version, on this machine or another one,
/// is refused with [`ProjectionError::Locked`] naming the holder, until the
/// first one stops. The lease is renewed every third of
/// [`lock_ttl`](Self::lock_ttl) and released when the runner ends (see
/// [`track_locks`](Self::track_locks) for a runner or rebuild future that
/// is dropped). Every checkpoint the runner saves, with a batch or for a
/// stretch without matching events, is checked against the lock's token in
/// the save's transaction
/// ([`ProjectionControl::save_checkpoint_fenced`]): a runner whose lease was
/// taken over stops with [`Error::Fenced`] and moves nothing.
pub struct ProjectionRunner<S, A> {
    store: S,
    applier: A,
    options: RunnerOptions,
    policy: ErrorPolicy,
    lock_ttl: Duration,
    trip_after: Option<Duration>,
    rate: Option<RateLimiter>,
    /// The lease of the lock while it is held: every checkpoint the runner
    /// saves itself (a stretch without matching events, a parked event) is
    /// checked against it in the save's transaction, as the applier's are.
    fence: Option<crate::Fence>,
    /// Counts this runner's lock keepers until each has released its lock
    /// ([`track_locks`](Self::track_locks)).
    keepers: Option<LockKeepers>,
}

impl<S, P> ProjectionRunner<S, AtLeastOnce<S, P>>
where
    S: EventStore + ProjectionControl,
    P: Projection,
{
    /// Runs `projection` at-least-once on `store` (its events and its
    /// checkpoint).
    pub fn at_least_once(store: S, projection: P) -> Self {
        let applier = AtLeastOnce::new(store.clone(), projection);
        ProjectionRunner::new(store, applier)
    }
}

/// The default lease of a projection lock.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(30);

impl<S, A> ProjectionRunner<S, A>
where
    S: EventStore + ProjectionControl,
    A: BatchApplier,
{
    /// Runs `applier` on the events of `store`, which also holds its
    /// checkpoint, its lock and its dead letters.
    pub fn new(store: S, applier: A) -> Self {
        ProjectionRunner {
            store,
            applier,
            options: RunnerOptions::default(),
            policy: ErrorPolicy::Stop,
            lock_ttl: DEFAULT_LOCK_TTL,
            trip_after: None,
            rate: None,
            fence: None,
            keepers: None,
        }
    }

    /// Counts the lock keepers of this runner (and of its rebuilds) in
    /// `keepers`, whose [`LockKeepers::released`] then waits until the task
    /// keeping a lock has released it, after any write of the lock it had
    /// in flight: await it before the process exits when a runner or
    /// rebuild future was dropped (Ctrl-C), so that the next run does not
    /// wait for the lease to expire.
    pub fn track_locks(mut self, keepers: LockKeepers) -> Self {
        self.keepers = Some(keepers);
        self
    }

    /// Sets the options.
    pub fn with_options(mut self, options: RunnerOptions) -> Self {
        self.options = options;
        self
    }

    /// Sets the error policy (default [`ErrorPolicy::Stop`]).
    pub fn error_policy(mut self, policy: ErrorPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The lease of the projection lock (default [`DEFAULT_LOCK_TTL`]); a
    /// runner that dies without releasing it blocks others this long.
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        self.lock_ttl = ttl.max(Duration::from_millis(30));
        self
    }

    /// The circuit breaker: when a batch makes no progress for `limit`
    /// (handler retries included, or a handler that does not return), the
    /// runner stops with [`ProjectionError::Tripped`] and its state says why
    /// ([`ProjectionState::Tripped`]). Off by default.
    pub fn trip_after(mut self, limit: Duration) -> Self {
        self.trip_after = Some(limit);
        self
    }

    /// The optional maximum rate, for handlers that call other systems: at
    /// most `events_per_sec` events handled per second on average, with
    /// bursts of up to one second's worth ([`RateLimiter`]); a batch waits
    /// for its permits before its handler runs. Off by default.
    pub fn max_rate(mut self, events_per_sec: f64) -> Self {
        self.rate = Some(RateLimiter::new(events_per_sec, events_per_sec.ceil()));
        self
    }

    /// Starts the runner on a task of the current tokio runtime.
    pub fn spawn(self) -> ProjectionHandle<A> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (pos_tx, pos_rx) = watch::channel(Some(None));
        let (state_tx, state_rx) = watch::channel(ProjectionState::Starting);
        let name = self.applier.name().to_owned();
        let checkpoint = self.applier.checkpoint();
        let task = tokio::spawn(self.run_until(stop_rx, pos_tx, state_tx));
        ProjectionHandle {
            name,
            checkpoint,
            stop: stop_tx,
            position: pos_rx,
            state: state_rx,
            task,
        }
    }

    /// Takes the projection's lock and starts renewing it (a plain future:
    /// `&self` is not `Send` when the applier is not `Sync`).
    fn take_lock(
        &self,
    ) -> impl Future<Output = Result<LockKeeper<S>, ProjectionError>> + Send + 'static {
        take_lock(
            self.store.clone(),
            self.applier.name().to_owned(),
            self.applier.checkpoint(),
            self.lock_ttl,
            self.options.store_retry,
            self.keepers.clone(),
        )
    }

    /// Runs until `stop` becomes true (then returns the applier) or the
    /// projection fails. `position` receives each saved checkpoint, and
    /// `None` once the runner has ended.
    async fn run_until(
        mut self,
        mut stop: watch::Receiver<bool>,
        position: watch::Sender<Option<Option<GlobalPosition>>>,
        state: watch::Sender<ProjectionState>,
    ) -> Result<A, ProjectionError> {
        let out = match self.take_lock().await {
            Ok(mut keeper) => {
                self.set_fence(Some(keeper.fence(self.lock_ttl)));
                state.send_replace(ProjectionState::Running);
                let out = self.run_inner(&mut stop, &position, &mut keeper).await;
                keeper.release().await;
                if let Err(ProjectionError::Tripped { reason, .. }) = &out {
                    keeper.leave_trip_note(reason).await;
                }
                // The applier handed back no longer runs under the lease.
                self.set_fence(None);
                out
            }
            Err(e) => Err(e),
        };
        position.send_modify(|p| *p = None);
        state.send_replace(match &out {
            Ok(()) => ProjectionState::Stopped,
            Err(ProjectionError::Tripped { reason, .. }) => {
                ProjectionState::Tripped(reason.clone())
            }
            Err(e) => ProjectionState::Failed(e.to_string()),
        });
        out.map(|()| self.applier)
    }

    async fn run_inner(
        &mut self,
        stop: &mut watch::Receiver<bool>,
        position: &watch::Sender<Option<Option<GlobalPosition>>>,
        keeper: &mut LockKeeper<S>,
    ) -> Result<(), ProjectionError> {
        let name = self.applier.name().to_owned();
        let checkpoint = self.applier.checkpoint();
        let store_err = |source| ProjectionError::Store {
            projection: name.clone(),
            source,
        };
        let start = self
            .retry_store(|s| {
                let checkpoint = checkpoint.clone();
                async move { s.load_checkpoint(&checkpoint).await }
            })
            .await
            .map_err(store_err)?;
        position.send_replace(Some(start));
        let filter = self.applier.filter();
        let options = SubscriptionOptions::default()
            .categories(filter.categories)
            .event_types(filter.event_types)
            .batch_size(self.options.batch_size)
            .poll_interval(self.options.poll_interval)
            .retry(self.options.store_retry);
        let mut lag_metrics = LagMetrics::new(&name);
        let mut sub = Subscription::new(
            self.store.clone(),
            start.unwrap_or(GlobalPosition::START),
            options,
        );
        loop {
            if *stop.borrow_and_update() {
                return Ok(());
            }
            keeper.check(&name, &checkpoint)?;
            let batch = tokio::select! {
                batch = sub.next_batch() => batch.map_err(store_err)?,
                _ = stop.changed() => return Ok(()),
                _ = keeper.lost() => return Err(keeper.lost_error(&name, &checkpoint)),
            };
            let ctx = BatchContext {
                checkpoint: checkpoint.clone(),
                after: batch.after,
                position: batch.position,
                replaying: batch.replaying,
                attempt: 1,
                tables: TableNames::default(),
            };
            let events = Arc::new(batch.events);
            tokio::select! {
                () = self.throttle(events.len()) => {}
                _ = stop.changed() => return Ok(()),
            }
            self.apply_guarded(&events, ctx).await?;
            position.send_replace(Some(Some(batch.position)));
            let at_end = events.len() < self.options.batch_size;
            lag_metrics
                .record(&self.store, batch.position, events.len(), at_end)
                .await;
        }
    }

    /// Applies a batch (or saves the checkpoint of a scan that moved past
    /// non-matching events only), under the circuit breaker.
    async fn apply_guarded(
        &mut self,
        events: &Arc<Vec<RecordedEvent>>,
        ctx: BatchContext,
    ) -> Result<(), ProjectionError> {
        let limit = self.trip_after;
        let name = self.applier.name().to_owned();
        let (after, position) = (ctx.after, ctx.position);
        let work = async {
            if events.is_empty() {
                self.save_fenced(&ctx.checkpoint, position)
                    .await
                    .map_err(|source| ProjectionError::Store {
                        projection: name.clone(),
                        source,
                    })
            } else {
                self.apply_batch(events, ctx).await
            }
        };
        match limit {
            None => work.await,
            Some(limit) => match tokio::time::timeout(limit, work).await {
                Ok(out) => out,
                Err(_) => Err(ProjectionError::Tripped {
                    projection: name.clone(),
                    reason: format!(
                        "no progress for {limit:?} on the batch after {after} \
                         (up to {position}, {} events): the handler kept failing or did not return",
                        events.len()
                    ),
                }),
            },
        }
    }

    /// Rebuilds the projection: from position 0 (`options.from_start`: the
    /// checkpoint is reset first) or from its checkpoint (resuming a rebuild
    /// that crashed, failed or was cancelled), up to the head of the feed,
    /// in batches of `options.checkpoint_every` events read `batch_size` at
    /// a time, each applied with [`BatchContext::replaying`] true and
    /// checkpointed, under the same lock as the live runner (a rebuild and
    /// the runner of the same projection version never run at once).
    /// `progress` is called after each checkpoint (once, at the head, when there
    /// was nothing to do). Returns the applier
    /// once the checkpoint has reached the head as read at the end.
    ///
    /// Cancel-safe: dropping the future loses at most the batch in flight
    /// (its checkpoint was not saved). The lock is then released by the
    /// task that keeps it, after any write of the lock it had in flight (an
    /// acquisition or a renewal already sent): await
    /// [`LockKeepers::released`] ([`track_locks`](Self::track_locks)) before
    /// the process exits. A process
    /// killed outright leaves the lock held until its lease expires
    /// ([`lock_ttl`](Self::lock_ttl)).
    pub async fn rebuild(
        mut self,
        options: RebuildOptions,
        mut progress: impl FnMut(&RebuildProgress) + Send,
    ) -> Result<A, ProjectionError> {
        let mut keeper = self.take_lock().await?;
        self.set_fence(Some(keeper.fence(self.lock_ttl)));
        let out = self
            .rebuild_inner(&mut keeper, options, None, &mut progress)
            .await;
        keeper.release().await;
        // The applier handed back no longer runs under the lease.
        self.set_fence(None);
        out.map(|()| self.applier)
    }

    /// The loop of [`rebuild`](Self::rebuild), under `keeper`'s lock, with
    /// the applier's current checkpoint (the shadow one in a blue-green
    /// rebuild): up to the end of the log, or once the checkpoint is at or
    /// past `until` (a target that writers cannot keep moving).
    ///
    /// The next batch is read (and its scanned events counted) while this
    /// one is applied: the read depends only on where the previous read
    /// stopped, never on the apply, so the two overlap and a rebuild costs
    /// about the larger of the two instead of their sum. At most two
    /// batches are in memory; a batch whose apply fails drops the one read
    /// ahead, and a resume reads it again from the checkpoint.
    async fn rebuild_inner(
        &mut self,
        keeper: &mut LockKeeper<S>,
        options: RebuildOptions,
        until: Option<GlobalPosition>,
        progress: &mut (impl FnMut(&RebuildProgress) + Send),
    ) -> Result<(), ProjectionError> {
        let name = self.applier.name().to_owned();
        let checkpoint = self.applier.checkpoint();
        let store_err = |source| ProjectionError::Store {
            projection: name.clone(),
            source,
        };
        let metrics = RebuildMetrics::new(&name);
        if options.from_start {
            // Fenced: a rebuild that lost its lock before it began (paused
            // past its lease) must not send the runner that took over back
            // to the first event.
            let fence = keeper.fence(self.lock_ttl);
            self.retry_store(|s| {
                let (checkpoint, fence) = (checkpoint.clone(), fence.clone());
                async move { s.reset_checkpoint_fenced(&checkpoint, &fence).await }
            })
            .await
            .map_err(store_err)?;
        }
        let start = self
            .retry_store(|s| {
                let checkpoint = checkpoint.clone();
                async move { s.load_checkpoint(&checkpoint).await }
            })
            .await
            .map_err(store_err)?
            .unwrap_or(GlobalPosition::START);
        let filter = self.applier.filter();
        let mut reader = ChunkReader::new(
            self.store.clone(),
            self.options.store_retry,
            options.checkpoint_every,
            options.batch_size,
            REBUILD_BATCH_BYTES,
            until,
        );
        let read = ReadAll::after(start)
            .categories(filter.categories)
            .event_types(filter.event_types);
        let began = tokio::time::Instant::now();
        let mut scanned = 0u64;
        let mut reported = false;
        // The head of the last report and the events from the checkpoint
        // up to it: the next report counts only what lies past that head,
        // not the whole remaining log again (a count per batch over the
        // rest of the log made a rebuild quadratic in the log's size).
        let mut last_head: Option<(GlobalPosition, u64)> = None;
        let mut next = Some(reader.read(read).await.map_err(store_err)?);
        loop {
            keeper.check(&name, &checkpoint)?;
            let Some(chunk) = next.take() else {
                return Ok(());
            };
            let moved = chunk.to > chunk.after;
            let position = chunk.to;
            let retry = self.options.store_retry;
            let (chunk_scanned, head, remaining) = if moved {
                let ctx = BatchContext {
                    checkpoint: checkpoint.clone(),
                    after: chunk.after,
                    position,
                    replaying: true,
                    attempt: 1,
                    tables: TableNames::default(),
                };
                // A filtered batch's scanned events are counted beside the
                // apply too (on another reader where the store has several),
                // and so are the progress figures, which need that count but
                // not the apply: read after it, their round trips held up
                // the next batch each time.
                let count = chunk.count(self.store.clone(), retry);
                let figures =
                    progress_figures(self.store.clone(), retry, position, last_head, count);
                let events = Arc::new(chunk.events);
                self.throttle(events.len()).await;
                // The read-ahead borrows nothing of `self` (its own handle
                // on the store), so it runs beside the apply.
                let ahead = async {
                    match &chunk.rest {
                        Some(rest) => Some(reader.read(rest.clone()).await),
                        None => None,
                    }
                };
                let (applied, ahead, figures) =
                    futures::join!(self.apply_guarded(&events, ctx), ahead, figures);
                applied?;
                next = ahead.transpose().map_err(store_err)?;
                figures.map_err(store_err)?
            } else {
                if reported {
                    return Ok(());
                }
                let none = std::future::ready(Ok(0));
                progress_figures(self.store.clone(), retry, position, last_head, none)
                    .await
                    .map_err(store_err)?
            };
            reported = true;
            scanned += chunk_scanned;
            metrics.events.increment(chunk_scanned);
            last_head = head.map(|h| (h, remaining));
            let elapsed = began.elapsed();
            let report = RebuildProgress {
                position,
                head,
                events: scanned,
                remaining,
                events_per_sec: scanned as f64 / elapsed.as_secs_f64().max(1e-6),
                elapsed,
            };
            metrics.record(&report);
            progress(&report);
            if chunk.at_end {
                return Ok(());
            }
        }
    }

    /// Waits for the rate limit ([`max_rate`](Self::max_rate)) before a
    /// batch of `events` events.
    async fn throttle(&mut self, events: usize) {
        if let Some(limit) = &mut self.rate {
            let wait = limit.delay(tokio::time::Instant::now(), events);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
    }

    /// Rebuilds a new version of a SQL read model blue-green (see
    /// [`crate::blue_green`]): under the lock of this version, into shadow
    /// tables with a shadow checkpoint, up to the head, while the live
    /// runner of the old version keeps serving the live tables; then the
    /// swap (one transaction: the shadow tables become the live ones, this
    /// version's checkpoint and the active version move with them) and the
    /// old tables are dropped. Returns the applier, now on the live tables:
    /// run it ([`spawn`](Self::spawn) a runner with it) to keep the read
    /// model current; the old version's runner stops at its next batch.
    ///
    /// A rebuild that fails or is cancelled leaves the live tables, the live
    /// checkpoint and the active version as they were; calling it again
    /// without `options.from_start` resumes from the shadow checkpoint
    /// (`from_start` drops the shadow tables and starts over). Refused with
    /// [`ProjectionError::Superseded`] when a newer version is active.
    pub async fn rebuild_blue_green(
        mut self,
        options: RebuildOptions,
        mut progress: impl FnMut(&RebuildProgress) + Send,
    ) -> Result<A, ProjectionError>
    where
        A: BlueGreenApplier,
    {
        let name = self.applier.name().to_owned();
        let live = self.applier.checkpoint();
        let version = self.applier.version();
        let mut keeper = self.take_lock().await?;
        self.set_fence(Some(keeper.fence(self.lock_ttl)));
        let out = async {
            let retry = self.options.store_retry;
            let active = retry_mut!(self.applier, retry, active_version()).map_err(|source| {
                ProjectionError::Store {
                    projection: name.clone(),
                    source,
                }
            })?;
            if let Some(active) = active.filter(|a| *a > version) {
                return Err(ProjectionError::Superseded {
                    projection: name.clone(),
                    version,
                    active,
                });
            }
            let fresh = options.from_start;
            retry_mut!(self.applier, retry, enter_shadow(fresh)).map_err(|source| {
                ProjectionError::Store {
                    projection: name.clone(),
                    source,
                }
            })?;
            let inner = RebuildOptions {
                from_start: false,
                ..options
            };
            // Two passes with fixed targets, so that writers faster than the
            // rebuild cannot keep it from ending: up to the head read now,
            // then up to the head read after that pass (what was appended
            // meanwhile). What is appended after the second target is
            // applied by the new version's runner from the swapped
            // checkpoint.
            // Progress counts over both passes, as one rebuild.
            let began = tokio::time::Instant::now();
            let mut before = 0u64;
            for _pass in 0..2 {
                let target = retry_store(self.store.clone(), retry, |s| async move {
                    s.head_position().await
                })
                .await
                .map_err(|source| ProjectionError::Store {
                    projection: name.clone(),
                    source,
                })?
                .unwrap_or(GlobalPosition::START);
                let mut this_pass = 0u64;
                let mut report = |p: &RebuildProgress| {
                    this_pass = p.events;
                    let elapsed = began.elapsed();
                    let events = before + p.events;
                    progress(&RebuildProgress {
                        events,
                        events_per_sec: events as f64 / elapsed.as_secs_f64().max(1e-6),
                        elapsed,
                        ..*p
                    });
                };
                self.rebuild_inner(&mut keeper, inner, Some(target), &mut report)
                    .await?;
                before += this_pass;
            }
            keeper.check(&name, &live)?;
            retry_mut!(self.applier, retry, swap()).map_err(|source| ProjectionError::Store {
                projection: name.clone(),
                source,
            })?;
            tracing::info!(projection = %name, version, "blue-green swap committed");
            if let Err(e) = self.applier.drop_retired().await {
                // The next blue-green rebuild drops them before its swap.
                tracing::warn!(projection = %name, error = %e,
                    "cannot drop the retired tables of a blue-green swap");
            }
            Ok(())
        }
        .await;
        keeper.release().await;
        self.set_fence(None);
        out.map(|()| self.applier)
    }

    /// Applies a batch with retries; if it keeps failing, one event at a
    /// time, to stop on (or park) the event that fails.
    async fn apply_batch(
        &mut self,
        events: &Arc<Vec<RecordedEvent>>,
        ctx: BatchContext,
    ) -> Result<(), ProjectionError> {
        match self.apply_with_retry(events, ctx.clone()).await {
            Ok(()) => return Ok(()),
            Err((ApplyError::Store(source), _)) => {
                return Err(ProjectionError::Store {
                    projection: self.applier.name().to_owned(),
                    source,
                })
            }
            Err((ApplyError::Handler(source), attempts)) if events.len() == 1 => {
                self.poison(&events[0], &ctx, attempts, source).await?;
                return self.save_scan(&ctx, events).await;
            }
            Err((ApplyError::Handler(e), _)) => {
                tracing::warn!(projection = self.applier.name(), error = %e,
                    "a batch keeps failing: applying its events one at a time");
            }
        }
        let mut after = ctx.after;
        for event in events.iter() {
            let one = BatchContext {
                after,
                position: event.global_position,
                ..ctx.clone()
            };
            self.apply_batch_one(event, one).await?;
            after = event.global_position;
        }
        self.save_scan(&ctx, events).await
    }

    /// The scan may have moved past the last event: records that too.
    async fn save_scan(
        &mut self,
        ctx: &BatchContext,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        if events.last().map(|e| e.global_position) < Some(ctx.position) {
            self.save_fenced(&ctx.checkpoint, ctx.position)
                .await
                .map_err(|source| ProjectionError::Store {
                    projection: self.applier.name().to_owned(),
                    source,
                })?;
        }
        Ok(())
    }

    async fn apply_batch_one(
        &mut self,
        event: &RecordedEvent,
        ctx: BatchContext,
    ) -> Result<(), ProjectionError> {
        match self
            .apply_with_retry(&Arc::new(vec![event.clone()]), ctx.clone())
            .await
        {
            Ok(()) => Ok(()),
            Err((ApplyError::Store(source), _)) => Err(ProjectionError::Store {
                projection: self.applier.name().to_owned(),
                source,
            }),
            Err((ApplyError::Handler(source), attempts)) => {
                self.poison(event, &ctx, attempts, source).await
            }
        }
    }

    /// An event the handler keeps failing on: stops ([`ErrorPolicy::Stop`])
    /// or parks it and moves the checkpoint past it ([`ErrorPolicy::Park`]).
    async fn poison(
        &mut self,
        event: &RecordedEvent,
        ctx: &BatchContext,
        attempts: u32,
        source: HandlerError,
    ) -> Result<(), ProjectionError> {
        let name = self.applier.name().to_owned();
        if self.policy == ErrorPolicy::Stop {
            return Err(ProjectionError::Handler {
                projection: name,
                position: event.global_position,
                stream: event.stream_id.clone(),
                version: event.stream_version,
                event_type: event.event_type.clone(),
                attempts,
                source,
            });
        }
        tracing::warn!(projection = %name, position = %event.global_position,
            error = %source, "parking an event the handler keeps failing on");
        let letter = DeadLetter {
            checkpoint: ctx.checkpoint.clone(),
            position: event.global_position,
            event_id: event.event_id,
            stream: event.stream_id.clone(),
            event_type: event.event_type.clone(),
            error: source.to_string(),
            attempts,
            parked_at: chrono::Utc::now(),
        };
        let checkpoint = ctx.checkpoint.clone();
        let position = event.global_position;
        let fence = self.fence.clone();
        self.retry_store(|s| {
            let (letter, checkpoint, fence) = (letter.clone(), checkpoint.clone(), fence.clone());
            async move {
                s.park_event(&letter).await?;
                save_checkpoint_under(&s, &checkpoint, position, fence.as_ref()).await
            }
        })
        .await
        .map_err(|source| ProjectionError::Store {
            projection: name.clone(),
            source,
        })?;
        metrics::counter!("annals_projection_dead_letters_parked_total", "projection" => name.clone())
            .increment(1);
        record_dead_letter_count(&self.store, &name, &ctx.checkpoint).await;
        Ok(())
    }

    /// Applies with the handler retry policy (transient store errors are
    /// retried too); the last error and the attempts made.
    async fn apply_with_retry(
        &mut self,
        events: &Arc<Vec<RecordedEvent>>,
        mut ctx: BatchContext,
    ) -> Result<(), (ApplyError, u32)> {
        let retry = self.options.handler_retry;
        loop {
            let err = match self.applier.apply_shared(events, &ctx).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let again = match &err {
                ApplyError::Handler(_) => true,
                ApplyError::Store(e) => is_transient(e),
            };
            if !again || ctx.attempt >= retry.max_attempts.max(1) {
                return Err((err, ctx.attempt));
            }
            tracing::debug!(projection = self.applier.name(), attempt = ctx.attempt,
                error = %err, "projection batch failed, retrying");
            tokio::time::sleep(retry.delay(ctx.attempt)).await;
            ctx.attempt += 1;
        }
    }

    /// Gives the lease to the applier and keeps it for the runner's own
    /// checkpoint saves ([`save_fenced`](Self::save_fenced)).
    fn set_fence(&mut self, fence: Option<crate::Fence>) {
        self.applier.set_fence(fence.clone());
        self.fence = fence;
    }

    /// Saves a checkpoint the runner moves itself (past a stretch without
    /// matching events), under the lease, with the store retry policy.
    fn save_fenced(
        &self,
        checkpoint: &str,
        position: GlobalPosition,
    ) -> impl Future<Output = crate::Result<()>> + Send {
        let (checkpoint, fence) = (checkpoint.to_owned(), self.fence.clone());
        self.retry_store(move |s| {
            let (checkpoint, fence) = (checkpoint.clone(), fence.clone());
            async move { save_checkpoint_under(&s, &checkpoint, position, fence.as_ref()).await }
        })
    }

    /// Runs a store call with the store retry policy (a free function's
    /// future: `&self` is not `Send` when the applier is not `Sync`).
    fn retry_store<T, F, Fut>(&self, f: F) -> impl Future<Output = crate::Result<T>> + Send
    where
        T: Send,
        F: Fn(S) -> Fut + Send,
        Fut: Future<Output = crate::Result<T>> + Send,
    {
        retry_store(self.store.clone(), self.options.store_retry, f)
    }
}

/// A rebuild batch stops gathering pages once its events hold about this
/// many bytes of payload (64 MiB), whatever `checkpoint_every` says, so a
/// log of large events keeps a rebuild's memory bounded too (two batches
/// are held at once: one applied, one read ahead).
pub const REBUILD_BATCH_BYTES: usize = 64 << 20;

/// What one event counts against [`REBUILD_BATCH_BYTES`]: its payload and
/// names, plus a fixed share for the rest of the struct and its metadata.
fn event_bytes(e: &RecordedEvent) -> usize {
    e.data.as_str().len() + e.event_type.len() + e.stream_id.as_str().len() + 256
}

/// Reads a rebuild's batches ([`ProjectionRunner::rebuild`]): its own
/// handle on the store, so a read can run beside the apply of the batch
/// before it.
///
/// The pages come from one [`EventStore::read_feed_pages`] stream kept
/// across batches, so a backend that reads ahead (SQLite) keeps its reader
/// busy between batches too. A page that would overfill a batch is cut
/// after the batch's last event and the rest starts the next batch.
struct ChunkReader<S> {
    store: S,
    retry: Backoff,
    /// Events per batch (`checkpoint_every`).
    chunk: usize,
    /// Events per page read (`batch_size`, at most `chunk`).
    page_size: usize,
    /// Payload bytes per batch ([`REBUILD_BATCH_BYTES`]).
    max_bytes: usize,
    until: Option<GlobalPosition>,
    /// The pages being read, with where the next one starts.
    pages: Option<(GlobalPosition, crate::FeedPages)>,
    /// The part of a page past the last batch: where it starts, and the
    /// page (its events after that start, its `scanned_to`, its `at_end`).
    carry: Option<(GlobalPosition, FeedPage)>,
}

/// One batch of a rebuild.
struct Chunk {
    /// The checkpoint it starts after.
    after: GlobalPosition,
    /// How far it scanned: its checkpoint.
    to: GlobalPosition,
    events: Vec<RecordedEvent>,
    /// Whether it reached the end of the log (or the rebuild's target).
    at_end: bool,
    /// Events scanned from `after` to `to` (matching the filter or not),
    /// when known without counting them (see [`Chunk::count`]).
    scanned: Option<u64>,
    /// The read that continues after it.
    rest: Option<ReadAll>,
}

impl Chunk {
    /// The events scanned from `after` to `to`: known for an unfiltered
    /// batch, counted in the store for a filtered one.
    fn count<S: EventStore>(
        &self,
        store: S,
        retry: Backoff,
    ) -> impl Future<Output = crate::Result<u64>> + Send + 'static {
        let (after, to, scanned) = (self.after, self.to, self.scanned);
        async move {
            match scanned {
                Some(n) => Ok(n),
                None => {
                    retry_store(store, retry, |s| async move {
                        s.count_events_between(after, to).await
                    })
                    .await
                }
            }
        }
    }
}

impl<S: EventStore> ChunkReader<S> {
    fn new(
        store: S,
        retry: Backoff,
        chunk: usize,
        page_size: usize,
        max_bytes: usize,
        until: Option<GlobalPosition>,
    ) -> Self {
        let chunk = chunk.max(1);
        ChunkReader {
            store,
            retry,
            chunk,
            page_size: page_size.clamp(1, chunk),
            max_bytes,
            until,
            pages: None,
            carry: None,
        }
    }

    /// Reads pages from `read.after` until the batch holds `chunk` events
    /// (or `max_bytes`), the end of the log, or the target.
    async fn read(&mut self, mut read: ReadAll) -> crate::Result<Chunk> {
        let after = read.after;
        let mut events = Vec::new();
        let mut bytes = 0usize;
        let mut at_end = false;
        while events.len() < self.chunk && bytes < self.max_bytes && !at_end {
            if self.until.is_some_and(|u| read.after >= u) {
                at_end = true;
                break;
            }
            let mut page = self.page(&read).await?;
            let room = self.chunk - events.len();
            if page.events.len() > room {
                // Cut after the batch's last event: every matching event up
                // to it is in the batch, so it is the batch's checkpoint.
                let rest = page.events.split_off(room);
                let cut = page.events.last().map_or(read.after, |e| e.global_position);
                events.extend(page.events);
                page.events = rest;
                read.after = cut;
                self.carry = Some((cut, page));
                break;
            }
            at_end = page.at_end || page.scanned_to <= read.after;
            read.after = page.scanned_to.max(read.after);
            bytes += page.events.iter().map(event_bytes).sum::<usize>();
            if events.is_empty() {
                // The page's vector is the batch's: an event is a few
                // hundred bytes, and a move of each costs on a replay.
                events = page.events;
                if !at_end && events.len() < self.chunk {
                    events.reserve_exact(self.chunk - events.len());
                }
            } else {
                events.extend(page.events);
            }
        }
        let to = read.after;
        let unfiltered = read.categories.is_empty()
            && read.event_types.is_empty()
            && read.since.is_none()
            && read.until.is_none();
        // Every event from `after` to `to` is in an unfiltered batch: the
        // feed is gap-free and nothing was filtered out. So it is in a
        // filtered one whose events fill every position of a store whose
        // positions are plain numbers (commit part 0: SQLite, in memory):
        // there is no room for another event between them. Any other
        // filtered batch is counted by [`Chunk::count`].
        let filled = after.commit() == 0
            && to.commit() == 0
            && to.seq().checked_sub(after.seq()) == Some(events.len() as u64);
        let scanned = (unfiltered || filled || to <= after).then_some(events.len() as u64);
        Ok(Chunk {
            after,
            to,
            events,
            at_end,
            scanned,
            rest: (!at_end).then_some(read),
        })
    }

    /// The page of `read` after `read.after`: the rest of a page cut by the
    /// last batch, or else the next page of the stream, with the store retry
    /// policy.
    async fn page(&mut self, read: &ReadAll) -> crate::Result<FeedPage> {
        match self.carry.take() {
            Some((start, page)) if start == read.after => return Ok(page),
            _ => {}
        }
        let retry = self.retry;
        retry_mut!(self, retry, next_page(read))
    }

    /// The next page of the stream when it stands at `read.after`, else the
    /// first page of a new stream from there. An error drops the stream (a
    /// retry starts a new one).
    async fn next_page(&mut self, read: &ReadAll) -> crate::Result<FeedPage> {
        use futures::StreamExt as _;
        loop {
            let pages = match &mut self.pages {
                Some((next, pages)) if *next == read.after => pages,
                _ => {
                    let pages = self.store.read_feed_pages(read.clone(), self.page_size);
                    &mut self.pages.insert((read.after, pages)).1
                }
            };
            match pages.next().await {
                Some(Ok(page)) => {
                    match &mut self.pages {
                        Some((next, _)) if !page.at_end && page.scanned_to > read.after => {
                            *next = page.scanned_to;
                        }
                        _ => self.pages = None,
                    }
                    return Ok(page);
                }
                // Ended after a full page: read on from there.
                None => self.pages = None,
                Some(Err(e)) => {
                    self.pages = None;
                    return Err(e);
                }
            }
        }
    }
}

/// Saves a checkpoint under `fence` ([`ProjectionControl::save_checkpoint_fenced`]),
/// or unfenced when there is none.
async fn save_checkpoint_under<S: ProjectionControl>(
    store: &S,
    checkpoint: &str,
    position: GlobalPosition,
    fence: Option<&crate::Fence>,
) -> crate::Result<()> {
    match fence {
        Some(fence) => {
            store
                .save_checkpoint_fenced(checkpoint, position, fence)
                .await
        }
        None => store.save_checkpoint(checkpoint, position).await,
    }
}

/// Takes the lock of `checkpoint` on a [`LockKeeper`]'s task (see there).
async fn take_lock<S: ProjectionControl>(
    store: S,
    name: String,
    checkpoint: String,
    ttl: Duration,
    retry: Backoff,
    keepers: Option<LockKeepers>,
) -> Result<LockKeeper<S>, ProjectionError> {
    let owner = lock_owner();
    let token = lock_token();
    let store_err = |source| ProjectionError::Store {
        projection: name.clone(),
        source,
    };
    // Counted before the task exists, so that `LockKeepers::released`
    // never misses it.
    let live = LiveKeeper::enter(keepers, &checkpoint);
    let (taken_tx, taken_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel();
    let (lost_tx, lost) = watch::channel(false);
    let task = tokio::spawn(keep_lock(
        store.clone(),
        LockRequest {
            checkpoint: checkpoint.clone(),
            owner,
            token,
            ttl,
            retry,
        },
        taken_tx,
        stop_rx,
        lost_tx,
        live,
    ));
    let attempt = match taken_rx.await {
        Ok(attempt) => attempt.map_err(store_err)?,
        Err(_) => {
            return Err(store_err(Error::Backend {
                backend: "annals",
                message: format!(
                    "the task taking the lock of {checkpoint} ended (runtime shut down)"
                ),
                source: None,
            }))
        }
    };
    match attempt {
        LockAttempt::Acquired(lock) => {
            let mut keeper = LockKeeper {
                store,
                lock,
                lost,
                stop: Some(stop_tx),
                task: Some(task),
            };
            match no_live_workers(&keeper.store, retry, &name, &checkpoint).await {
                Ok(()) => Ok(keeper),
                Err(e) => {
                    keeper.release().await;
                    Err(e)
                }
            }
        }
        LockAttempt::Held(holder) => Err(ProjectionError::Locked {
            projection: name,
            checkpoint,
            owner: holder.owner,
            expires_at: holder.expires_at,
        }),
    }
}

/// What [`keep_lock`] takes.
struct LockRequest {
    checkpoint: String,
    owner: String,
    token: String,
    ttl: Duration,
    retry: Backoff,
}

/// The task of a [`LockKeeper`]: every write of the lock, one after the
/// other, the release last. A write is never cancelled half-way (its
/// statement may already be on its way to the database, or queued on
/// SQLite's writer thread): the stop request is only looked at between two
/// writes, so the release is ordered after the acquisition or renewal that
/// was in flight when the runner's future was dropped, and that write
/// cannot leave the lock held behind the release.
async fn keep_lock<S: ProjectionControl>(
    store: S,
    req: LockRequest,
    taken: oneshot::Sender<crate::Result<LockAttempt>>,
    mut stop: oneshot::Receiver<()>,
    lost: watch::Sender<bool>,
    _live: LiveKeeper,
) {
    let LockRequest {
        checkpoint,
        owner,
        token,
        ttl,
        retry,
    } = req;
    let attempt = retry_store(store.clone(), retry, |s| {
        let (checkpoint, owner, token) = (checkpoint.clone(), owner.clone(), token.clone());
        async move {
            s.acquire_projection_lock(&checkpoint, &owner, &token, ttl)
                .await
        }
    })
    .await;
    let lock = match &attempt {
        Ok(LockAttempt::Acquired(lock)) => lock.clone(),
        // Not taken: nothing to renew or release.
        _ => {
            let _ = taken.send(attempt);
            return;
        }
    };
    // The caller gone (its future dropped while the lock was being taken)
    // means a stop: released below, after the acquisition that landed.
    if taken.send(attempt).is_ok() {
        let every = ttl / 3;
        let mut last_ok = tokio::time::Instant::now();
        let mut stopped = false;
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                // Sent, or the keeper dropped: release.
                _ = &mut stop => {
                    stopped = true;
                    break;
                }
            }
            // Not raced with `stop`: see above.
            match store.renew_projection_lock(&lock, ttl).await {
                Ok(Some(_)) => last_ok = tokio::time::Instant::now(),
                Ok(None) => {
                    lost.send_replace(true);
                    break;
                }
                Err(e) => {
                    tracing::warn!(checkpoint = %lock.checkpoint, error = %e,
                        "cannot renew a projection lock");
                    if last_ok.elapsed() >= ttl {
                        lost.send_replace(true);
                        break;
                    }
                }
            }
        }
        // A lost lock is released too once the runner stops (a no-op when
        // another runner took it: the release names this token).
        if !stopped {
            let _ = stop.await;
        }
    }
    if let Err(e) = store.release_projection_lock(&lock).await {
        tracing::warn!(checkpoint = %lock.checkpoint, error = %e,
            "cannot release a projection lock: it expires with its lease");
    }
}

/// Holds a projection lock for a runner or a rebuild. One task of its own
/// ([`keep_lock`]) makes every write of the lock: the acquisition, a
/// renewal every third of the lease, and the release, always the last one.
/// [`release`](Self::release) asks for the release and waits for it;
/// dropping the keeper (a runner or rebuild future dropped on Ctrl-C) asks
/// for it without waiting: the task releases the lock after the write it
/// may have in flight ([`LockKeepers::released`] waits for that).
struct LockKeeper<S: ProjectionControl> {
    store: S,
    lock: ProjectionLock,
    /// Becomes true when a renewal found the lock gone or kept failing.
    lost: watch::Receiver<bool>,
    /// Sent (or dropped): the task releases the lock and ends.
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl<S: ProjectionControl> LockKeeper<S> {
    fn fence(&self, ttl: Duration) -> crate::Fence {
        crate::Fence::Lock {
            lock: self.lock.checkpoint.clone(),
            token: self.lock.token.clone(),
            ttl,
        }
    }

    fn lost_error(&self, name: &str, checkpoint: &str) -> ProjectionError {
        ProjectionError::LockLost {
            projection: name.to_owned(),
            checkpoint: checkpoint.to_owned(),
        }
    }

    fn check(&self, name: &str, checkpoint: &str) -> Result<(), ProjectionError> {
        if *self.lost.borrow() {
            return Err(self.lost_error(name, checkpoint));
        }
        Ok(())
    }

    /// Resolves once the lock is lost (never, while it is held).
    async fn lost(&mut self) {
        if self.lost.wait_for(|l| *l).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Releases the lock (after any write of it in flight) and waits until
    /// it is released.
    async fn release(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            // A failed release was logged by the task; a task that panicked
            // leaves the lock to expire with its lease.
            let _ = task.await;
        }
    }
}

impl<S: ProjectionControl> LockKeeper<S> {
    /// After [`release`](Self::release): the trip note in place of the lock
    /// ([`crate::record_trip`]), so that other processes see why it stopped.
    async fn leave_trip_note(&self, reason: &str) {
        let lock = &self.lock;
        if let Err(e) = crate::record_trip(&self.store, &lock.checkpoint, &lock.owner, reason).await
        {
            tracing::warn!(checkpoint = %lock.checkpoint, error = %e,
                "cannot leave the note that the projection tripped");
        }
    }
}

/// The lock keepers started by the runners given it
/// ([`ProjectionRunner::track_locks`]) that have not ended yet, by lock
/// name: a value the caller owns (a clone shares the count), so that it can
/// wait for the release of a lock whose runner or rebuild future it dropped.
#[derive(Clone, Debug)]
pub struct LockKeepers {
    live: std::sync::Arc<watch::Sender<std::collections::BTreeMap<String, usize>>>,
}

impl Default for LockKeepers {
    fn default() -> Self {
        LockKeepers {
            live: std::sync::Arc::new(watch::channel(std::collections::BTreeMap::new()).0),
        }
    }
}

impl LockKeepers {
    /// No keeper yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits until no lock keeper counted here holds, or is still writing,
    /// the projection lock `checkpoint` ([`checkpoint_name`]).
    ///
    /// A [`ProjectionRunner`] or rebuild future that is dropped (Ctrl-C, a
    /// `select!` that took another branch) hands the release of its lock to
    /// the task that keeps the lock, which releases it after the write of
    /// the lock it may have in flight (an acquisition or a renewal already
    /// sent to the database). Await this before the process exits, so that
    /// the release lands first and the next run does not wait for the lease
    /// to expire. Returns at once when no keeper counted here holds that
    /// lock.
    pub async fn released(&self, checkpoint: &str) {
        let mut live = self.live.subscribe();
        // `self` holds the sender: never closed while this waits.
        let _ = live.wait_for(|m| !m.contains_key(checkpoint)).await;
    }
}

/// One live lock keeper of a lock name, counted in the runner's
/// [`LockKeepers`] (if any) from before its task starts until the task
/// ends, its release done.
struct LiveKeeper(Option<(LockKeepers, String)>);

impl LiveKeeper {
    fn enter(keepers: Option<LockKeepers>, name: &str) -> Self {
        LiveKeeper(keepers.map(|k| {
            k.live
                .send_modify(|m| *m.entry(name.to_owned()).or_default() += 1);
            (k, name.to_owned())
        }))
    }
}

impl Drop for LiveKeeper {
    fn drop(&mut self) {
        if let Some((keepers, name)) = &self.0 {
            keepers.live.send_modify(|m| {
                if let Some(n) = m.get_mut(name) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(name);
                    }
                }
            });
        }
    }
}

/// After taking the projection lock of `checkpoint` (a plain runner, a
/// rebuild, a local partitioned runner): `Ok` when no leased partitioned
/// workers of it are live, else the error to stop with, the caller giving
/// the lock back. Workers register before they check this lock
/// (`PartitionedRunner::run_leased`), and this check comes after the lock
/// was taken: of a worker and a runner starting together, at least one sees
/// the other.
pub(crate) async fn no_live_workers<S: ProjectionControl + Clone>(
    store: &S,
    retry: Backoff,
    name: &str,
    checkpoint: &str,
) -> Result<(), ProjectionError> {
    let workers = retry_store(store.clone(), retry, |s| async move {
        s.live_partition_workers(checkpoint).await
    })
    .await
    .map_err(|source| ProjectionError::Store {
        projection: name.to_owned(),
        source,
    })?;
    match workers {
        0 => Ok(()),
        workers => Err(ProjectionError::PartitionedWorkers {
            projection: name.to_owned(),
            checkpoint: checkpoint.to_owned(),
            workers,
        }),
    }
}

/// A rebuild batch's figures for its progress report: the events it
/// scanned (`count`), the head of the feed, and the events scanned still to
/// go from `position` (the batch's checkpoint) up to that head. The latter
/// are counted from the last report's head (`last`, with what was left up
/// to it then) when the batch ended at or before it (the batch's events are
/// part of that count), else from `position`.
async fn progress_figures<S: EventStore + Clone>(
    store: S,
    retry: Backoff,
    position: GlobalPosition,
    last: Option<(GlobalPosition, u64)>,
    count: impl Future<Output = crate::Result<u64>>,
) -> crate::Result<(u64, Option<GlobalPosition>, u64)> {
    let head = retry_store(
        store.clone(),
        retry,
        |s| async move { s.head_position().await },
    );
    let (scanned, head) = futures::try_join!(count, head)?;
    let remaining = match head {
        Some(h) if h > position => {
            let (from, known) = match last {
                Some((prev, left)) if position <= prev && prev <= h => {
                    (prev, left.saturating_sub(scanned))
                }
                _ => (position, 0),
            };
            known
                + retry_store(store, retry, |s| async move {
                    s.count_events_between(from, h).await
                })
                .await?
        }
        _ => 0,
    };
    Ok((scanned, head, remaining))
}

pub(crate) async fn retry_store<S: Clone, T, F, Fut>(
    store: S,
    retry: Backoff,
    f: F,
) -> crate::Result<T>
where
    F: Fn(S) -> Fut,
    Fut: Future<Output = crate::Result<T>>,
{
    let mut attempt = 1;
    loop {
        match f(store.clone()).await {
            Ok(v) => return Ok(v),
            Err(e) if is_transient(&e) && attempt < retry.max_attempts => {
                tokio::time::sleep(retry.delay(attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The runner's metrics (`annals_projection_events_handled_total` and
/// `annals_projection_lag_events`, see [`crate::CATALOGUE`]). The lag costs
/// two queries (the head, and a count), so it is measured at most every
/// [`LAG_METRIC_EVERY`], and after a batch that reached the end of the log
/// (so an idle runner's gauge does not stay at an old value).
struct LagMetrics {
    handled: metrics::Counter,
    lag: metrics::Gauge,
    last: Option<std::time::Instant>,
}

/// How often a runner measures its lag while it catches up.
const LAG_METRIC_EVERY: Duration = Duration::from_millis(250);

impl LagMetrics {
    fn new(projection: &str) -> Self {
        let labels = [("projection", projection.to_owned())];
        LagMetrics {
            handled: metrics::counter!("annals_projection_events_handled_total", &labels),
            lag: metrics::gauge!("annals_projection_lag_events", &labels),
            last: None,
        }
    }

    async fn record<S: EventStore>(
        &mut self,
        store: &S,
        position: GlobalPosition,
        handled: usize,
        at_end: bool,
    ) {
        self.handled.increment(handled as u64);
        let due = self.last.is_none_or(|t| t.elapsed() >= LAG_METRIC_EVERY);
        if !(due || at_end) {
            return;
        }
        self.last = Some(std::time::Instant::now());
        let lag = match store.head_position().await {
            Ok(Some(head)) if head > position => store.count_events_between(position, head).await,
            Ok(_) => Ok(0),
            Err(e) => Err(e),
        };
        match lag {
            Ok(n) => self.lag.set(n as f64),
            // A metric is not worth stopping for; the next batch tries again.
            Err(e) => tracing::debug!(error = %e, "cannot measure the projection lag"),
        }
    }
}

/// A rebuild's metrics (`annals_projection_rebuild_*`, see
/// [`crate::CATALOGUE`]), recorded after each checkpoint.
struct RebuildMetrics {
    events: metrics::Counter,
    position: metrics::Gauge,
    head: metrics::Gauge,
    remaining: metrics::Gauge,
}

impl RebuildMetrics {
    fn new(projection: &str) -> Self {
        let labels = [("projection", projection.to_owned())];
        RebuildMetrics {
            events: metrics::counter!("annals_projection_rebuild_events_total", &labels),
            position: metrics::gauge!("annals_projection_rebuild_position", &labels),
            head: metrics::gauge!("annals_projection_rebuild_head", &labels),
            remaining: metrics::gauge!("annals_projection_rebuild_remaining_events", &labels),
        }
    }

    fn record(&self, p: &RebuildProgress) {
        self.position.set(p.position.seq() as f64);
        self.head.set(p.head.map_or(0, |h| h.seq()) as f64);
        self.remaining.set(p.remaining as f64);
    }
}

/// Sets `annals_projection_dead_letters` of `projection` to the number of
/// events parked under `checkpoint` (a metric: a failure is only logged).
pub async fn record_dead_letter_count<S: ProjectionControl>(
    store: &S,
    projection: &str,
    checkpoint: &str,
) {
    match store.dead_letters(checkpoint).await {
        Ok(letters) => metrics::gauge!(
            "annals_projection_dead_letters",
            "projection" => projection.to_owned()
        )
        .set(letters.len() as f64),
        Err(e) => tracing::debug!(error = %e, "cannot count a projection's dead letters"),
    }
}

/// The token bucket of [`ProjectionRunner::max_rate`]: `per_sec` permits a
/// second, at most `burst` saved up. Time is passed in, so the arithmetic is
/// tested without a clock.
///
/// ```
/// use std::time::Duration;
/// use annals::RateLimiter;
/// let t0 = tokio::time::Instant::now();
/// let mut limit = RateLimiter::new(10.0, 5.0);
/// assert_eq!(limit.delay(t0, 5), Duration::ZERO); // the burst
/// assert_eq!(limit.delay(t0, 10), Duration::from_secs(1)); // 10 more: 1 s
/// // After waiting that second, the bucket is empty again.
/// assert_eq!(limit.delay(t0 + Duration::from_secs(1), 1), Duration::from_millis(100));
/// ```
#[derive(Clone, Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Option<tokio::time::Instant>,
    granted: u64,
}

impl RateLimiter {
    /// `per_sec` permits a second (at least 0.001), bursts of `burst`
    /// (at least 1).
    pub fn new(per_sec: f64, burst: f64) -> Self {
        let burst = if burst.is_finite() {
            burst.max(1.0)
        } else {
            1.0
        };
        RateLimiter {
            per_sec: if per_sec.is_finite() {
                per_sec.max(0.001)
            } else {
                0.001
            },
            burst,
            tokens: burst,
            last: None,
            granted: 0,
        }
    }

    /// Takes `permits` at `now`: how long to wait before using them (zero
    /// when the bucket holds enough). The bucket may go into debt; the
    /// debt is the wait.
    pub fn delay(&mut self, now: tokio::time::Instant, permits: usize) -> Duration {
        if let Some(last) = self.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * self.per_sec;
            self.tokens = (self.tokens + refill).min(self.burst);
        }
        self.last = Some(now.max(self.last.unwrap_or(now)));
        self.tokens -= permits as f64;
        self.granted += permits as u64;
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(-self.tokens / self.per_sec)
    }

    /// Permits granted so far.
    pub fn granted(&self) -> u64 {
        self.granted
    }
}

/// Applies the parked event `event_id` of `applier`'s projection again
/// through its handler ([`BatchApplier::apply_parked`], with
/// [`BatchContext::replaying`] true, the checkpoint untouched). On success
/// the dead letter is dropped; on failure it stays, with the new error and
/// one more attempt, and the handler's error is returned as
/// [`ProjectionError::Handler`].
pub async fn retry_dead_letter<S, A>(
    store: &S,
    applier: &mut A,
    event_id: EventId,
) -> Result<(), ProjectionError>
where
    S: EventStore + ProjectionControl,
    A: BatchApplier,
{
    let name = applier.name().to_owned();
    let checkpoint = applier.checkpoint();
    let store_err = |source| ProjectionError::Store {
        projection: name.clone(),
        source,
    };
    let letters = store.dead_letters(&checkpoint).await.map_err(store_err)?;
    let Some(mut letter) = letters.into_iter().find(|d| d.event_id == event_id) else {
        return Err(ProjectionError::NoDeadLetter {
            checkpoint,
            event_id,
        });
    };
    let Some(event) = store.read_event(event_id).await.map_err(store_err)? else {
        return Err(store_err(Error::Unsafe(format!(
            "parked event {event_id} of {checkpoint} is no longer in the store"
        ))));
    };
    let at = store
        .load_checkpoint(&checkpoint)
        .await
        .map_err(store_err)?;
    let ctx = BatchContext {
        checkpoint: checkpoint.clone(),
        after: at.unwrap_or(GlobalPosition::START),
        position: at.unwrap_or(GlobalPosition::START),
        replaying: true,
        attempt: letter.attempts.saturating_add(1),
        tables: TableNames::default(),
    };
    match applier.apply_parked(&event, &ctx).await {
        Ok(()) => {
            store
                .drop_dead_letter(&checkpoint, event_id)
                .await
                .map_err(store_err)?;
            record_dead_letter_count(store, &name, &checkpoint).await;
            Ok(())
        }
        Err(ApplyError::Store(e)) => Err(store_err(e)),
        Err(ApplyError::Handler(source)) => {
            letter.error = source.to_string();
            letter.attempts = ctx.attempt;
            letter.parked_at = chrono::Utc::now();
            store.park_event(&letter).await.map_err(store_err)?;
            Err(ProjectionError::Handler {
                projection: name,
                position: event.global_position,
                stream: event.stream_id,
                version: event.stream_version,
                event_type: event.event_type,
                attempts: ctx.attempt,
                source,
            })
        }
    }
}

/// A running projection ([`ProjectionRunner::spawn`]). Dropping the handle
/// stops the runner as [`stop`](Self::stop) does (after its current batch).
pub struct ProjectionHandle<A> {
    name: String,
    checkpoint: String,
    stop: watch::Sender<bool>,
    /// `Some(checkpoint)` while running; `None` once ended.
    position: watch::Receiver<Option<Option<GlobalPosition>>>,
    state: watch::Receiver<ProjectionState>,
    task: tokio::task::JoinHandle<Result<A, ProjectionError>>,
}

impl<A> ProjectionHandle<A> {
    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its checkpoint name.
    pub fn checkpoint_name(&self) -> &str {
        &self.checkpoint
    }

    /// The last checkpoint it saved (or loaded at start); `None` before
    /// its first batch on a fresh checkpoint.
    pub fn checkpoint(&self) -> Option<GlobalPosition> {
        self.position.borrow().flatten()
    }

    /// Where the runner stands (running, stopped, tripped and why, failed).
    pub fn state(&self) -> ProjectionState {
        self.state.borrow().clone()
    }

    /// Waits until the runner ends (by itself or stopped) and returns its
    /// final state, without consuming the handle.
    pub async fn ended(&self) -> ProjectionState {
        let mut rx = self.state.clone();
        let out = rx
            .wait_for(|s| !matches!(s, ProjectionState::Starting | ProjectionState::Running))
            .await
            .map(|s| s.clone());
        out.unwrap_or_else(|_| self.state.borrow().clone())
    }

    /// Whether the runner still runs.
    pub fn is_running(&self) -> bool {
        self.position.borrow().is_some()
    }

    /// Read-your-writes: waits until the projection's checkpoint is at or
    /// past `position` (for example the last position an append returned:
    /// the projection has then applied that event and every earlier one),
    /// at most `timeout`. Fails with [`ProjectionError::WaitTimeout`], or
    /// [`ProjectionError::NotRunning`] when the runner has ended.
    pub async fn wait_for(
        &self,
        position: GlobalPosition,
        timeout: Duration,
    ) -> Result<(), ProjectionError> {
        let mut rx = self.position.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let now = *rx.borrow_and_update();
            match now {
                Some(Some(p)) if p >= position => return Ok(()),
                Some(_) => {}
                None => {
                    return Err(ProjectionError::NotRunning {
                        projection: self.name.clone(),
                        reached: None,
                    })
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(ProjectionError::NotRunning {
                        projection: self.name.clone(),
                        reached: now.flatten(),
                    })
                }
                Err(_) => {
                    return Err(ProjectionError::WaitTimeout {
                        checkpoint: self.checkpoint.clone(),
                        position,
                        reached: now.flatten(),
                        waited: timeout,
                    })
                }
            }
        }
    }

    /// Stops the runner after its current batch and returns its applier
    /// (or the error it had already stopped with).
    pub async fn stop(self) -> Result<A, ProjectionError> {
        self.stop.send_replace(true);
        self.join().await
    }

    /// Waits until the runner ends by itself (an error) or is stopped.
    pub async fn join(self) -> Result<A, ProjectionError> {
        match self.task.await {
            Ok(out) => out,
            Err(e) => Err(ProjectionError::Store {
                projection: self.name,
                source: Error::Backend {
                    backend: "projection",
                    message: format!("the runner task ended abnormally: {e}"),
                    source: None,
                },
            }),
        }
    }
}

/// Read-your-writes across processes: waits until the checkpoint named
/// `checkpoint` ([`checkpoint_name`]) in `store` is at or past `position`,
/// at most `timeout`, reading it every few milliseconds (1 ms, doubling up to
/// 50 ms). Fails with [`ProjectionError::WaitTimeout`] naming where the
/// checkpoint was, or [`ProjectionError::Store`].
pub async fn wait_for<C: CheckpointStore>(
    store: &C,
    checkpoint: &str,
    position: GlobalPosition,
    timeout: Duration,
) -> Result<(), ProjectionError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        let reached =
            store
                .load_checkpoint(checkpoint)
                .await
                .map_err(|source| ProjectionError::Store {
                    projection: checkpoint.to_owned(),
                    source,
                })?;
        if reached.is_some_and(|p| p >= position) {
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(ProjectionError::WaitTimeout {
                checkpoint: checkpoint.to_owned(),
                position,
                reached,
                waited: timeout,
            });
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A projection's lag ([`projection_lag`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ProjectionLag {
    /// Its checkpoint (`None`: never ran).
    pub checkpoint: Option<GlobalPosition>,
    /// The head of the feed (`None`: empty store).
    pub head: Option<GlobalPosition>,
    /// Events after the checkpoint up to the head (all events, matching
    /// its filter or not: the scan still has to pass them).
    pub events: u64,
}

/// How far the checkpoint `checkpoint` is behind the head of `store`'s feed,
/// in events ([`EventStore::count_events_between`]).
pub async fn projection_lag<S: EventStore + CheckpointStore>(
    store: &S,
    checkpoint: &str,
) -> crate::Result<ProjectionLag> {
    let at = store.load_checkpoint(checkpoint).await?;
    let head = store.head_position().await?;
    let events = match head {
        Some(h) => {
            store
                .count_events_between(at.unwrap_or(GlobalPosition::START), h)
                .await?
        }
        None => 0,
    };
    Ok(ProjectionLag {
        checkpoint: at,
        head,
        events,
    })
}

/// The idempotency helper of at-least-once handlers: a read-model row keeps
/// the position of the last event applied to it, and an event at or below
/// it is skipped (it was applied before a crash or a retry).
///
/// ```
/// use annals::{GlobalPosition, IdempotencyGuard};
/// let mut row = IdempotencyGuard::default(); // stored with the row
/// assert!(row.admit(GlobalPosition::from_seq(5)));
/// assert!(!row.admit(GlobalPosition::from_seq(5))); // redelivered: skip
/// assert!(!row.admit(GlobalPosition::from_seq(3)));
/// assert!(row.admit(GlobalPosition::from_seq(9)));
/// assert_eq!(row.last_applied(), Some(GlobalPosition::from_seq(9)));
/// ```
///
/// In SQL the same guard is the upsert's condition, for example
/// `... ON CONFLICT (id) DO UPDATE SET balance = ..., last_event_position = $p
/// WHERE accounts.last_event_position < $p`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct IdempotencyGuard {
    last: Option<GlobalPosition>,
}

impl IdempotencyGuard {
    /// A guard whose row was last changed by the event at `last`.
    pub fn at(last: Option<GlobalPosition>) -> Self {
        IdempotencyGuard { last }
    }

    /// Whether the event at `position` is new for this row; if so, records
    /// it as the last applied.
    pub fn admit(&mut self, position: GlobalPosition) -> bool {
        if self.last.is_some_and(|l| position <= l) {
            return false;
        }
        self.last = Some(position);
        true
    }

    /// The position of the last event applied to the row.
    pub fn last_applied(&self) -> Option<GlobalPosition> {
        self.last
    }
}

/// The idempotency key to send with a side effect of event `id` to another
/// system (an e-mail service, a payment API): the event id, stable across
/// redeliveries, so the other system can drop a repeat.
pub fn idempotency_key(id: EventId) -> String {
    id.0.to_string()
}

/// The error of a transactional applier that finds the stored checkpoint
/// neither where its batch starts (`ctx.after`) nor at or past its end:
/// another runner of the projection moved it, or it was reset. Not
/// transient: the runner stops with [`ProjectionError::Store`] rather than
/// apply events twice.
pub fn checkpoint_moved(ctx: &BatchContext, stored: GlobalPosition) -> Error {
    Error::Unsafe(format!(
        "checkpoint {} is at {stored}, but this runner's batch starts after {} \
         (another runner of the projection moved it, or it was reset): stopping \
         instead of applying events twice",
        ctx.checkpoint, ctx.after
    ))
}

#[cfg(test)]
mod tests {
    use super::RateLimiter;
    use std::time::Duration;

    /// The token bucket with an injected clock: a burst is free, then each
    /// permit costs 1/rate; idle time refills up to the burst, never more.
    #[test]
    fn rate_limiter_counts_permits_against_an_injected_clock() {
        let t0 = tokio::time::Instant::now();
        let sec = Duration::from_secs(1);
        let mut limit = RateLimiter::new(5.0, 5.0);
        assert_eq!(limit.delay(t0, 5), Duration::ZERO);
        assert_eq!(limit.delay(t0, 5), sec);
        // Waited that second: the debt is paid, the bucket is empty.
        assert_eq!(limit.delay(t0 + sec, 5), sec);
        // Long idle: refilled to the burst (5), not to 45.
        assert_eq!(limit.delay(t0 + sec * 11, 10), sec);
        assert_eq!(limit.granted(), 25);
        // A clock that goes backwards refills nothing: 5 in debt, 5 more.
        assert_eq!(limit.delay(t0, 5), sec * 2);
    }

    /// A filtered batch whose events fill every position from its start to
    /// its end (plain-number positions, as in memory and on SQLite) knows
    /// its scanned count without counting; one with another event between
    /// its events is counted in the store.
    #[tokio::test]
    async fn a_filtered_batch_that_fills_its_positions_is_not_counted() {
        use super::ChunkReader;
        use crate::subscription::Backoff;
        use crate::{EventStore, ExpectedVersion, InMemoryStore, NewEvent, ReadAll, StreamId};

        let store = InMemoryStore::new();
        let append = |category: &'static str, n: usize| {
            let store = store.clone();
            async move {
                let stream = StreamId::new(category, "1").expect("stream id");
                let events = (0..n)
                    .map(|i| NewEvent::new("E", serde_json::json!({ "i": i })))
                    .collect();
                store
                    .append(&stream, ExpectedVersion::Any, events)
                    .await
                    .expect("append");
            }
        };
        append("A", 5).await;
        let read = ReadAll::from_start().categories(["A"]);
        let mut reader = ChunkReader::new(store.clone(), Backoff::default(), 10, 4, 1 << 20, None);
        let first = reader.read(read).await.expect("read");
        assert_eq!((first.events.len(), first.scanned), (5, Some(5)));
        assert!(first.at_end);

        append("B", 1).await;
        append("A", 2).await;
        let mut rest = ReadAll::from_start().categories(["A"]);
        rest.after = first.to;
        let second = reader.read(rest).await.expect("read");
        assert_eq!((second.events.len(), second.scanned), (2, None));
        let counted = second
            .count(store.clone(), Backoff::default())
            .await
            .expect("count");
        assert_eq!(counted, 3, "the other category's event is scanned too");
    }

    /// A rebuild batch stops gathering pages at its byte budget
    /// ([`REBUILD_BATCH_BYTES`] in a rebuild; 1 MiB here) even when
    /// `checkpoint_every` allows more events (memory stays bounded with
    /// large events), and the next read goes on exactly after it.
    #[tokio::test]
    async fn rebuild_batches_stop_at_the_byte_budget() {
        use super::{event_bytes, ChunkReader};
        use crate::subscription::Backoff;
        use crate::{EventStore, ExpectedVersion, InMemoryStore, NewEvent, ReadAll, StreamId};

        let store = InMemoryStore::new();
        let pad = "x".repeat(64 << 10);
        let stream = StreamId::new("Big", "1").expect("stream id");
        let events = (0..20)
            .map(|_| NewEvent::new("E", serde_json::json!({ "pad": pad })))
            .collect();
        store
            .append(&stream, ExpectedVersion::Any, events)
            .await
            .expect("append");
        let budget = 1 << 20;
        let mut reader =
            ChunkReader::new(store.clone(), Backoff::default(), 1_000, 1, budget, None);
        let first = reader.read(ReadAll::from_start()).await.expect("read");
        let bytes: usize = first.events.iter().map(event_bytes).sum();
        // Each event is a little over 64 KiB: the 16th reaches 1 MiB.
        assert_eq!(first.events.len(), 16);
        assert!(bytes >= budget && bytes - event_bytes(&first.events[0]) < budget);
        assert!(!first.at_end);
        assert_eq!(first.scanned, Some(16));
        let rest = first.rest.expect("more to read");
        let second = reader.read(rest).await.expect("read");
        assert_eq!(second.after, first.to);
        assert_eq!(second.events.len(), 4);
        assert!(second.at_end && second.rest.is_none());
        assert_eq!(Some(second.to), store.head_position().await.expect("head"));
    }
}
