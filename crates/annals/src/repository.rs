//! The repository: load an aggregate (snapshot + fold), run a command, append
//! its events with an exact expected version, retry on conflict.
//!
//! Snapshots are optional and only ever a cache. Every decision the load made
//! about a snapshot is reported in [`LoadReport`], so tests and metrics can see
//! whether a snapshot was used and why one was passed over.
//!
//! # Idempotent commands
//!
//! A caller that retries a command after losing the reply (its append
//! committed, the answer never arrived) would apply it twice if every attempt
//! minted fresh event ids. With a command id the event ids derive from it, and
//! the repository looks the first one up before running the command; the
//! contract is on [`Repository::execute`], the rationale in
//! `docs/architecture.md` ("Idempotent commands").
//!
//! # Commands
//!
//! A command is anything that implements [`Command`]: a closure
//! `Fn(&A) -> Result<Vec<A::Event>, E>` (passed to [`Repository::execute`]),
//! or a type whose `handle` is an `async fn` that can await a service and owns
//! its arguments (passed to [`Repository::execute_command`]; see [`Command`]).

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::Value;
use uuid::Uuid;

use crate::aggregate::{decode_event, encode_event};
use crate::snapshot::{NoSnapshots, Snapshot, SnapshotStore};
use crate::snapshot_worker::{write_snapshot, Worker};
use crate::{
    Aggregate, AppendResult, Error, EventId, EventStore, ExpectedVersion, Metadata, NewEvent,
    ReadStream, RecordedEvent, Result, StreamId, StreamVersion,
};

/// Tracing target for snapshot decisions (a snapshot passed over, a failed
/// snapshot write).
pub const SNAPSHOT_LOG_TARGET: &str = "annals::snapshot";

/// How often a command retries after an optimistic-concurrency conflict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total (1 = no retry).
    pub max_attempts: u32,
    /// Delay before the first retry; doubles each time.
    pub base_delay: Duration,
    /// Upper bound of one delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            base_delay: Duration::from_millis(2),
            max_delay: Duration::from_millis(200),
        }
    }
}

impl RetryPolicy {
    /// No retries: the first conflict is returned.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..Self::default()
        }
    }

    fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_delay);
        // Jitter from the random bits of a v7 uuid, so racing writers spread out.
        let jitter = (Uuid::now_v7().as_u128() as u64 % 1000) as f64 / 1000.0;
        exp.mul_f64(0.5 + jitter / 2.0)
    }
}

/// Who asked for a command: the correlation and causation ids (and any
/// headers) stamped on every event it produces, and optionally the command's
/// own id, which makes a retried command idempotent (see
/// [`Repository::execute`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommandContext {
    metadata: Metadata,
    command_id: Option<Uuid>,
}

impl CommandContext {
    /// No correlation, no causation.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stamps `id` as the correlation id.
    pub fn with_correlation_id(mut self, id: Uuid) -> Self {
        self.metadata.correlation_id = Some(id);
        self
    }

    /// Stamps `id` as the causation id.
    pub fn with_causation_id(mut self, id: Uuid) -> Self {
        self.metadata.causation_id = Some(id);
        self
    }

    /// Gives the command an id: a command retried with the same id (after a
    /// lost reply, say) is applied once. The events of the command get ids
    /// derived from it ([`CommandContext::event_id`]); the retry of a command
    /// that was applied returns the original result with
    /// [`Executed::replayed`] set, and appends nothing. Use a fresh id (a v4
    /// or v7 UUID) per command, kept with the request that the caller
    /// retries.
    pub fn with_command_id(mut self, id: Uuid) -> Self {
        self.command_id = Some(id);
        self
    }

    /// The command id, when one was given.
    pub fn command_id(&self) -> Option<Uuid> {
        self.command_id
    }

    /// The id of the command's event number `index` (0-based, in the order
    /// the command returned them): UUID v5 with the command id as namespace
    /// and `index` as 8 big-endian bytes as name. `None` without a command id.
    pub fn event_id(&self, index: usize) -> Option<EventId> {
        self.command_id.map(|id| command_event_id(id, index))
    }

    /// Adds a free header. The names of the typed fields
    /// ([`Metadata::RESERVED_KEYS`]: `correlation_id`, `causation_id`) are
    /// not free headers: set them with [`CommandContext::with_correlation_id`]
    /// and [`CommandContext::with_causation_id`]. A command whose context has
    /// such a header, a value nested deeper than [`crate::MAX_JSON_DEPTH`]` - 1`
    /// levels or a NUL character fails at append with [`crate::Error::InvalidEvent`]
    /// and writes nothing.
    pub fn with_header(mut self, key: impl Into<String>, value: Value) -> Self {
        self.metadata.headers.insert(key.into(), value);
        self
    }

    /// The context of a command issued while handling `event`: causation is
    /// the event's id, correlation is the event's correlation id (or the
    /// event's own id when it had none).
    pub fn caused_by(event: &RecordedEvent) -> Self {
        CommandContext {
            metadata: Metadata {
                correlation_id: Some(event.metadata.correlation_id.unwrap_or(event.event_id.0)),
                causation_id: Some(event.event_id.0),
                headers: serde_json::Map::new(),
            },
            command_id: None,
        }
    }

    /// The context of a command a reactor (a process manager: a projection
    /// whose handler runs commands) issues while handling `event`:
    /// [`caused_by`](Self::caused_by) the event, with the command id
    /// [`reaction_command_id`]`(event, step)`. However often the event is
    /// delivered (a redelivery after a crash, a rebuild), the command is
    /// applied once; `step` tells apart the commands one event causes.
    pub fn reacting_to(event: &RecordedEvent, step: &str) -> Self {
        Self::caused_by(event).with_command_id(reaction_command_id(event.event_id, step))
    }

    /// The metadata every event of the command gets.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }
}

/// When the repository takes a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotPolicy {
    /// When a save crosses a multiple of N (version N, 2N, ...).
    EveryNEvents(u64),
    /// When the live snapshot is older than this (or missing).
    Interval(Duration),
    /// When the load before the command replayed more than N events.
    LoadCost(u64),
    /// Only when asked ([`Repository::snapshot`]).
    Manual,
}

/// Whether snapshots are written inside the save call or by a worker task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Written after the append commits, before `execute` returns.
    Sync,
    /// Queued (bounded) for a background worker; commands never wait. When
    /// the queue is full, a request for an aggregate already queued replaces
    /// it; others are dropped and counted in `annals_snapshot_dropped_total`.
    Background {
        /// Maximum number of distinct aggregates waiting.
        queue: usize,
    },
}

/// Snapshot configuration of a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotConfig {
    /// When.
    pub policy: SnapshotPolicy,
    /// How.
    pub mode: SnapshotMode,
}

impl SnapshotConfig {
    /// Synchronous snapshots every `n` events.
    pub fn every(n: u64) -> Self {
        SnapshotConfig {
            policy: SnapshotPolicy::EveryNEvents(n),
            mode: SnapshotMode::Sync,
        }
    }

    /// The same policy, written by a background worker with a queue of `queue`.
    pub fn background(mut self, queue: usize) -> Self {
        self.mode = SnapshotMode::Background { queue };
        self
    }
}

/// Why a load did not use a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotSkip {
    /// The repository has no snapshot store, or the load asked for none.
    Disabled,
    /// No snapshot stored for the aggregate.
    Missing,
    /// The snapshot's schema version is not the aggregate's, and no migration
    /// leads from it.
    SchemaVersion {
        /// Stored schema version.
        found: u32,
        /// The aggregate's `SCHEMA_VERSION`.
        expected: u32,
    },
    /// The state did not decode (message of the serde error).
    Undecodable(String),
    /// The snapshot claims a version beyond the stream's head.
    AheadOfHead {
        /// The snapshot's version.
        snapshot: StreamVersion,
        /// The head (`None`: no stream).
        head: Option<StreamVersion>,
    },
    /// The snapshot store failed (message); snapshots are a cache.
    StoreError(String),
}

/// How a load went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadReport {
    /// The version of the snapshot used, if one was.
    pub snapshot_version: Option<StreamVersion>,
    /// Whether a snapshot of an older schema version was migrated on load.
    pub snapshot_migrated: bool,
    /// Events folded after the snapshot (or from the start).
    pub events_replayed: u64,
    /// Why no snapshot was used (when none was).
    pub skipped: Option<SnapshotSkip>,
}

/// A loaded aggregate.
#[derive(Clone, Debug)]
pub struct Loaded<A> {
    /// Its state.
    pub state: A,
    /// The stream head it reflects (`None`: the stream does not exist).
    pub version: Option<StreamVersion>,
    /// How it was loaded.
    pub report: LoadReport,
    snapshot_created_at: Option<chrono::DateTime<Utc>>,
}

/// The outcome of a command.
#[derive(Clone, Debug)]
pub struct Executed<A> {
    /// The state after the command's events.
    pub state: A,
    /// The stream head after the command (`None`: the command emitted nothing
    /// on a stream that does not exist).
    pub version: Option<StreamVersion>,
    /// What the append assigned (`None`: the command emitted no events).
    pub append: Option<AppendResult>,
    /// Attempts it took (1 unless there were conflicts).
    pub attempts: u32,
    /// True when the command (same command id) had been applied before: the
    /// command was not run, nothing was appended, and this is the original
    /// result rebuilt from the store (`append` has `deduplicated: true`,
    /// `state` and `version` are as of the command's last event).
    pub replayed: bool,
}

/// A command on aggregate `A`: from the state, the events to append, or the
/// user's own error.
///
/// A closure `Fn(&A) -> Result<Vec<A::Event>, E>` is a command (that is what
/// [`Repository::execute`] takes). A type that implements `Command` can do
/// more: `handle` may be an `async fn` that awaits a service (a uniqueness
/// lookup, a price), and the command owns its arguments, moved in once.
/// `handle` borrows the command and the state, and is called again, on a
/// fresh state, after each conflict: a retry clones nothing.
///
/// Besides the events it returns, a command should have no effects that a
/// retry would repeat.
///
/// # Example
///
/// ```
/// use annals::bank::{Account, AccountError, AccountEvent};
/// use annals::{Command, CommandContext, CommandError, EventStore, InMemoryStore, Repository, StreamId};
///
/// /// Opens an account unless its owner's name is reserved (a stream
/// /// `Reserved-<name>`): the command awaits that lookup.
/// struct OpenUnique<'a> {
///     owner: String,
///     names: &'a InMemoryStore,
/// }
///
/// #[derive(Debug)]
/// enum OpenError {
///     NameTaken,
///     Account(AccountError),
///     Lookup(annals::Error),
/// }
///
/// impl Command<Account> for OpenUnique<'_> {
///     type Error = OpenError;
///
///     async fn handle(&self, account: &Account) -> Result<Vec<AccountEvent>, OpenError> {
///         let reserved = StreamId::new("Reserved", &self.owner).map_err(OpenError::Lookup)?;
///         if self.names.stream_version(&reserved).await.map_err(OpenError::Lookup)?.is_some() {
///             return Err(OpenError::NameTaken);
///         }
///         account.open(&self.owner).map_err(OpenError::Account)
///     }
/// }
///
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// let store = InMemoryStore::new();
/// let repo = Repository::<Account, _>::new(store.clone());
/// let ctx = CommandContext::new();
/// let owner = String::from("ann"); // moved into the command, never cloned
/// let opened = repo
///     .execute_command("acc-1", &ctx, OpenUnique { owner, names: &store })
///     .await
///     .expect("ann is free");
/// assert_eq!(opened.state.owner, "ann");
///
/// store
///     .append(&StreamId::new("Reserved", "bob")?, annals::ExpectedVersion::NoStream,
///         vec![annals::NewEvent::new("Reserved", serde_json::json!({}))])
///     .await?;
/// let refused = repo
///     .execute_command("acc-2", &ctx, OpenUnique { owner: "bob".into(), names: &store })
///     .await;
/// assert!(matches!(refused, Err(CommandError::Rejected(OpenError::NameTaken))));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Command<A: Aggregate>: Send + Sync {
    /// The user's error type for a refused command.
    type Error: Send;

    /// Decides, from the state as loaded for this attempt, which events to
    /// append.
    fn handle(
        &self,
        state: &A,
    ) -> impl Future<Output = std::result::Result<Vec<A::Event>, Self::Error>> + Send;
}

impl<A, F, E> Command<A> for F
where
    A: Aggregate,
    F: Fn(&A) -> std::result::Result<Vec<A::Event>, E> + Send + Sync,
    E: Send,
{
    type Error = E;

    fn handle(
        &self,
        state: &A,
    ) -> impl Future<Output = std::result::Result<Vec<A::Event>, E>> + Send {
        std::future::ready(self(state))
    }
}

/// A command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError<E> {
    /// The aggregate refused the command (the user's own error type).
    #[error("command rejected: {0}")]
    Rejected(E),
    /// The store failed, or conflicts outlasted the retry policy.
    #[error(transparent)]
    Store(#[from] Error),
}

impl<E> CommandError<E> {
    /// The store error, if that is what this is.
    pub fn store_error(&self) -> Option<&Error> {
        match self {
            CommandError::Store(e) => Some(e),
            CommandError::Rejected(_) => None,
        }
    }
}

/// Loads aggregates and executes commands against an [`EventStore`], with an
/// optional [`SnapshotStore`].
pub struct Repository<A, S, N = NoSnapshots> {
    store: S,
    snapshots: Option<(N, SnapshotConfig)>,
    /// The background worker, shared by the clones (see `snapshot_worker`).
    background: Option<Arc<Worker<N>>>,
    retry: RetryPolicy,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A, S: Clone, N: Clone> Clone for Repository<A, S, N> {
    fn clone(&self) -> Self {
        Repository {
            store: self.store.clone(),
            snapshots: self.snapshots.clone(),
            background: self.background.clone(),
            retry: self.retry,
            _aggregate: PhantomData,
        }
    }
}

impl<A: Aggregate, S: EventStore> Repository<A, S, NoSnapshots> {
    /// A repository without snapshots.
    pub fn new(store: S) -> Self {
        Repository {
            store,
            snapshots: None,
            background: None,
            retry: RetryPolicy::default(),
            _aggregate: PhantomData,
        }
    }

    /// Adds a snapshot store and policy. In background mode the worker task
    /// starts with the first snapshot request, on the tokio runtime that
    /// request runs on, so the repository may be built outside a runtime.
    /// It ends at [`Repository::shutdown`], or when the last clone of the
    /// repository is dropped (after writing what is queued).
    pub fn with_snapshots<N: SnapshotStore>(
        self,
        store: N,
        config: SnapshotConfig,
    ) -> Repository<A, S, N> {
        let background = match config.mode {
            SnapshotMode::Sync => None,
            SnapshotMode::Background { queue } => Some(Arc::new(Worker::new(store.clone(), queue))),
        };
        Repository {
            store: self.store,
            snapshots: Some((store, config)),
            background,
            retry: self.retry,
            _aggregate: PhantomData,
        }
    }
}

impl<A: Aggregate, S: EventStore, N: SnapshotStore> Repository<A, S, N> {
    /// Sets the retry policy for conflicts.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The underlying event store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The snapshot store, when configured.
    pub fn snapshot_store(&self) -> Option<&N> {
        self.snapshots.as_ref().map(|(n, _)| n)
    }

    /// The stream of aggregate `id`.
    pub fn stream_id(id: &str) -> Result<StreamId> {
        StreamId::new(A::TYPE, id)
    }

    /// Loads aggregate `id`: its live snapshot when usable, then the events
    /// after it.
    pub async fn load(&self, id: &str) -> Result<Loaded<A>> {
        self.load_with(&Self::stream_id(id)?, true).await
    }

    /// Loads aggregate `id` by folding its whole stream, ignoring snapshots.
    pub async fn load_without_snapshot(&self, id: &str) -> Result<Loaded<A>> {
        self.load_with(&Self::stream_id(id)?, false).await
    }

    async fn load_with(&self, stream: &StreamId, use_snapshot: bool) -> Result<Loaded<A>> {
        let loaded = self.load_unrecorded(stream, use_snapshot).await?;
        crate::telemetry::record_load(A::TYPE, &loaded.report);
        Ok(loaded)
    }

    async fn load_unrecorded(&self, stream: &StreamId, use_snapshot: bool) -> Result<Loaded<A>> {
        let mut skipped = Some(SnapshotSkip::Disabled);
        if let (true, Some((snaps, _))) = (use_snapshot, &self.snapshots) {
            match self.try_snapshot(snaps, stream).await? {
                Ok(loaded) => return Ok(loaded),
                Err(skip) => {
                    if !matches!(skip, SnapshotSkip::Missing) {
                        metrics::counter!("annals_snapshot_skipped_total", "aggregate_type" => A::TYPE).increment(1);
                        tracing::warn!(target: SNAPSHOT_LOG_TARGET, stream = %stream, reason = ?skip, "snapshot passed over; replaying the stream");
                    }
                    skipped = Some(skip);
                }
            }
        }
        let (state, version, replayed) =
            fold_stream::<A, S>(&self.store, stream, A::default(), ReadStream::forward()).await?;
        Ok(Loaded {
            state,
            version,
            report: LoadReport {
                snapshot_version: None,
                snapshot_migrated: false,
                events_replayed: replayed,
                skipped,
            },
            snapshot_created_at: None,
        })
    }

    /// Tries the live snapshot. The outer error is a store failure reading
    /// events (fatal); the inner one is why the snapshot is not usable.
    async fn try_snapshot(
        &self,
        snaps: &N,
        stream: &StreamId,
    ) -> Result<Result<Loaded<A>, SnapshotSkip>> {
        // One round trip where the backend can (see the trait method).
        let (snap, events) = match snaps
            .load_snapshot_and_events(&self.store, A::TYPE, stream)
            .await
        {
            Ok(Some(found)) => found,
            Ok(None) => return Ok(Err(SnapshotSkip::Missing)),
            // A wrong or missing master key is the caller's to see, not a
            // cache miss to replay around (see `annals::gdpr`).
            Err(e @ crate::Error::Gdpr(_)) => return Err(e),
            Err(e) => return Ok(Err(SnapshotSkip::StoreError(e.to_string()))),
        };
        let (state, migrated) = match decode_snapshot::<A>(&snap) {
            Ok(x) => x,
            Err(skip) => return Ok(Err(skip)),
        };
        let Some((state, version, replayed)) = resume_with(events, snap.version, state).await?
        else {
            let head = self.store.stream_version(stream).await?;
            return Ok(Err(SnapshotSkip::AheadOfHead {
                snapshot: snap.version,
                head,
            }));
        };
        Ok(Ok(Loaded {
            state,
            version: Some(version),
            report: LoadReport {
                snapshot_version: Some(snap.version),
                snapshot_migrated: migrated,
                events_replayed: replayed,
                skipped: None,
            },
            snapshot_created_at: Some(snap.created_at),
        }))
    }

    /// The state of aggregate `id` as of `version` (time travel), by full replay.
    pub async fn load_at_version(&self, id: &str, version: StreamVersion) -> Result<Loaded<A>> {
        let stream = Self::stream_id(id)?;
        let (state, v, replayed) = fold_stream::<A, S>(
            &self.store,
            &stream,
            A::default(),
            ReadStream::forward().until_version(version),
        )
        .await?;
        Ok(Loaded {
            state,
            version: v,
            report: LoadReport {
                snapshot_version: None,
                snapshot_migrated: false,
                events_replayed: replayed,
                skipped: Some(SnapshotSkip::Disabled),
            },
            snapshot_created_at: None,
        })
    }

    /// The state of aggregate `id` at instant `t` (time travel by time), by
    /// full replay: the fold of the longest prefix of its stream whose events
    /// were all recorded at or before `t`. The first event recorded after
    /// `t` ends the fold, even when a later one carries an earlier stamp (a
    /// clock that stepped back, which `annals check` reports): a state is
    /// always the fold of versions `1..=n`. `version` is `None` when the
    /// stream had no event yet at `t`. Reads at most one page past `t`.
    pub async fn load_as_of(&self, id: &str, t: DateTime<Utc>) -> Result<Loaded<A>> {
        let stream = Self::stream_id(id)?;
        let events = self
            .store
            .read_stream(&stream, ReadStream::forward())
            .take_while(move |e| {
                std::future::ready(e.as_ref().map_or(true, |e| e.recorded_at <= t))
            })
            .boxed();
        let (state, v, replayed) = fold_events(A::default(), events).await?;
        Ok(Loaded {
            state,
            version: v,
            report: LoadReport {
                snapshot_version: None,
                snapshot_migrated: false,
                events_replayed: replayed,
                skipped: Some(SnapshotSkip::Disabled),
            },
            snapshot_created_at: None,
        })
    }

    /// Runs `command` on aggregate `id` and appends the events it returns with
    /// the loaded version as the expected version. On a conflict it reloads
    /// and runs the command again, up to the retry policy.
    ///
    /// # Idempotent commands
    ///
    /// With a command id in `ctx` ([`CommandContext::with_command_id`]), the
    /// command's events get ids derived from it ([`CommandContext::event_id`]),
    /// and after loading the aggregate the repository looks up the first of
    /// them ([`EventStore::read_event`]):
    ///
    /// - Stored in this aggregate's stream: the command was applied (its
    ///   reply may have been lost). It is not run again, since the aggregate
    ///   and the services it consulted have moved on (a retried
    ///   `withdraw(100)` on the account it emptied would be refused). The
    ///   original result is rebuilt from the store: the versions and positions
    ///   of its events (`append` with `deduplicated: true`) and the state as
    ///   of its last event, not today's when other commands ran since.
    ///   [`Executed::replayed`] is set and nothing is appended.
    /// - Stored in another stream, or the derived ids are held by events this
    ///   command did not write: [`Error::CommandIdReused`], nothing written.
    /// - Not stored: the command runs. The lookup follows the load, so the
    ///   state the command sees never holds its own events; a concurrent
    ///   attempt of the same command that commits meanwhile is answered by the
    ///   store's idempotency or by the next attempt's lookup, as a replay.
    ///
    /// The repository cannot tell two commands apart without running them:
    /// a command id reused for another command on the same aggregate returns
    /// the first one's result, replayed. A command that emits no events leaves
    /// nothing to find and runs again when retried. Without a command id,
    /// every call is a new command.
    ///
    /// `command` is a closure; for commands that await or own their
    /// arguments, see [`Repository::execute_command`].
    pub async fn execute<E, F>(
        &self,
        id: &str,
        ctx: &CommandContext,
        command: F,
    ) -> std::result::Result<Executed<A>, CommandError<E>>
    where
        F: Fn(&A) -> std::result::Result<Vec<A::Event>, E> + Send + Sync,
        E: Send,
    {
        self.execute_command(id, ctx, command).await
    }

    /// [`Repository::execute`] for any [`Command`], such as one whose
    /// `handle` is an `async fn`.
    pub async fn execute_command<C: Command<A>>(
        &self,
        id: &str,
        ctx: &CommandContext,
        command: C,
    ) -> std::result::Result<Executed<A>, CommandError<C::Error>> {
        let stream = Self::stream_id(id)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let loaded = self.load_with(&stream, true).await?;
            // Looked up after the load: when the command's events are not
            // found, the loaded state cannot hold them either.
            if let Some(command_id) = ctx.command_id {
                let first = self
                    .store
                    .read_event(command_event_id(command_id, 0))
                    .await?;
                if let Some(first) = first {
                    return Ok(self
                        .replay(&stream, command_id, first, Some(loaded), attempt)
                        .await?);
                }
            }
            let new_events = command
                .handle(&loaded.state)
                .await
                .map_err(CommandError::Rejected)?;
            if new_events.is_empty() {
                return Ok(Executed {
                    state: loaded.state,
                    version: loaded.version,
                    append: None,
                    attempts: attempt,
                    replayed: false,
                });
            }
            let batch = encode_batch::<A>(&new_events, ctx)?;
            let expected = ExpectedVersion::Exact(loaded.version.unwrap_or_default());
            match self.store.append(&stream, expected, batch).await {
                Ok(result) if result.deduplicated => {
                    // A concurrent attempt of this command stored the same
                    // events since the lookup.
                    return Ok(self
                        .deduplicated(&stream, result, loaded, &new_events, attempt)
                        .await?);
                }
                Ok(result) => {
                    let mut state = loaded.state;
                    for ev in &new_events {
                        state.apply(ev);
                    }
                    self.after_save(
                        &stream,
                        &state,
                        loaded.version,
                        &result,
                        &loaded.report,
                        loaded.snapshot_created_at,
                    )
                    .await;
                    return Ok(Executed {
                        state,
                        version: Some(result.last_version),
                        append: Some(result),
                        attempts: attempt,
                        replayed: false,
                    });
                }
                Err(e) if e.is_conflict() && attempt < self.retry.max_attempts => {
                    metrics::counter!("annals_command_conflicts_total", "aggregate_type" => A::TYPE).increment(1);
                    tokio::time::sleep(self.retry.delay(attempt - 1)).await;
                }
                Err(e @ Error::DuplicateEventId { .. }) => {
                    return Ok(self.after_clash(&stream, ctx, e, attempt).await?);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Creates aggregate `id`: runs `command` on the default state and
    /// appends its events with [`ExpectedVersion::NoStream`], without reading
    /// the store first. If the stream already exists this is a conflict
    /// ([`Error::WrongExpectedVersion`]), never retried: use
    /// [`Repository::execute`] to act on existing aggregates. With a command
    /// id in `ctx`, the store is read once, to recognise a retry of a create
    /// that was applied (see [`Repository::execute`]).
    pub async fn create<E, F>(
        &self,
        id: &str,
        ctx: &CommandContext,
        command: F,
    ) -> std::result::Result<Executed<A>, CommandError<E>>
    where
        F: FnOnce(&A) -> std::result::Result<Vec<A::Event>, E>,
    {
        let stream = Self::stream_id(id)?;
        if let Some(command_id) = ctx.command_id {
            if let Some(first) = self
                .store
                .read_event(command_event_id(command_id, 0))
                .await?
            {
                return Ok(self.replay(&stream, command_id, first, None, 1).await?);
            }
        }
        let mut state = A::default();
        let new_events = command(&state).map_err(CommandError::Rejected)?;
        if new_events.is_empty() {
            return Ok(Executed {
                state,
                version: None,
                append: None,
                attempts: 1,
                replayed: false,
            });
        }
        let batch = encode_batch::<A>(&new_events, ctx)?;
        let result = match self
            .store
            .append(&stream, ExpectedVersion::NoStream, batch)
            .await
        {
            Ok(result) if result.deduplicated => {
                let loaded = Loaded {
                    state,
                    version: None,
                    report: LoadReport {
                        snapshot_version: None,
                        snapshot_migrated: false,
                        events_replayed: 0,
                        skipped: None,
                    },
                    snapshot_created_at: None,
                };
                return Ok(self
                    .deduplicated(&stream, result, loaded, &new_events, 1)
                    .await?);
            }
            Ok(result) => result,
            // A concurrent attempt of this command may have created it.
            Err(e) if ctx.command_id.is_some() && e.is_conflict() => {
                return Ok(self.after_clash(&stream, ctx, e, 1).await?);
            }
            Err(e @ Error::DuplicateEventId { .. }) => {
                return Ok(self.after_clash(&stream, ctx, e, 1).await?);
            }
            Err(e) => return Err(e.into()),
        };
        for ev in &new_events {
            state.apply(ev);
        }
        let report = LoadReport {
            snapshot_version: None,
            snapshot_migrated: false,
            events_replayed: 0,
            skipped: None,
        };
        self.after_save(&stream, &state, None, &result, &report, None)
            .await;
        Ok(Executed {
            state,
            version: Some(result.last_version),
            append: Some(result),
            attempts: 1,
            replayed: false,
        })
    }

    /// The original result of a command whose first event (`first`, found by
    /// its derived id) is stored: the batch's versions and positions, and the
    /// state as of its last event. `loaded` is the current state, when known,
    /// which is that state when nothing was appended since.
    async fn replay(
        &self,
        stream: &StreamId,
        command_id: Uuid,
        first: RecordedEvent,
        loaded: Option<Loaded<A>>,
        attempts: u32,
    ) -> Result<Executed<A>> {
        if first.stream_id != *stream {
            return Err(Error::CommandIdReused {
                command_id,
                reason: format!(
                    "its events are in {}, this command is for {stream}",
                    first.stream_id
                ),
                stream: first.stream_id,
            });
        }
        // The batch is the run of events from `first` whose ids derive from
        // the command id.
        let mut events = self
            .store
            .read_stream(stream, ReadStream::forward().from(first.stream_version));
        let mut positions = Vec::new();
        let mut last = first.stream_version;
        while let Some(e) = events.next().await {
            let e = e?;
            if e.event_id != command_event_id(command_id, positions.len()) {
                break;
            }
            positions.push(e.global_position);
            last = e.stream_version;
        }
        drop(events);
        if positions.is_empty() {
            // The stream read did not return the event the lookup found.
            positions.push(first.global_position);
        }
        let state = match loaded {
            Some(l) if l.version == Some(last) => l.state,
            _ => self.state_at(stream, last).await?,
        };
        metrics::counter!("annals_command_replays_total", "aggregate_type" => A::TYPE).increment(1);
        Ok(Executed {
            state,
            version: Some(last),
            append: Some(AppendResult {
                first_version: first.stream_version,
                last_version: last,
                positions,
                deduplicated: true,
            }),
            attempts,
            replayed: true,
        })
    }

    /// The result of an append that the store answered as a retry (`result`
    /// has `deduplicated: true`): `new_events` were stored before.
    async fn deduplicated(
        &self,
        stream: &StreamId,
        result: AppendResult,
        loaded: Loaded<A>,
        new_events: &[A::Event],
        attempts: u32,
    ) -> Result<Executed<A>> {
        let next = StreamVersion(loaded.version.map_or(0, |v| v.0) + 1);
        let state = if result.first_version == next {
            let mut state = loaded.state;
            for ev in new_events {
                state.apply(ev);
            }
            state
        } else {
            self.state_at(stream, result.last_version).await?
        };
        metrics::counter!("annals_command_replays_total", "aggregate_type" => A::TYPE).increment(1);
        Ok(Executed {
            state,
            version: Some(result.last_version),
            append: Some(result),
            attempts,
            replayed: true,
        })
    }

    /// After an append that clashed with stored ids (or, for `create`, an
    /// existing stream): a command whose first event is stored is a replay
    /// (or [`Error::CommandIdReused`] when it is in another stream); other
    /// duplicate ids are [`Error::CommandIdReused`]; anything else is `err`.
    async fn after_clash(
        &self,
        stream: &StreamId,
        ctx: &CommandContext,
        err: Error,
        attempts: u32,
    ) -> Result<Executed<A>> {
        let Some(command_id) = ctx.command_id else {
            return Err(err);
        };
        if let Some(first) = self
            .store
            .read_event(command_event_id(command_id, 0))
            .await?
        {
            return self.replay(stream, command_id, first, None, attempts).await;
        }
        match err {
            Error::DuplicateEventId {
                event_id,
                stream: holder,
            } => Err(Error::CommandIdReused {
                command_id,
                reason: format!(
                    "event id {event_id}, derived from it, is held by an event this command did not write"
                ),
                stream: holder,
            }),
            other => Err(other),
        }
    }

    /// The state of `stream` as of `version`, by full replay.
    async fn state_at(&self, stream: &StreamId, version: StreamVersion) -> Result<A> {
        let (state, _, _) = fold_stream::<A, S>(
            &self.store,
            stream,
            A::default(),
            ReadStream::forward().until_version(version),
        )
        .await?;
        Ok(state)
    }

    async fn after_save(
        &self,
        stream: &StreamId,
        state: &A,
        before: Option<StreamVersion>,
        result: &AppendResult,
        report: &LoadReport,
        last_snapshot_at: Option<chrono::DateTime<Utc>>,
    ) {
        let Some((_, config)) = &self.snapshots else {
            return;
        };
        let due = match config.policy {
            SnapshotPolicy::EveryNEvents(n) => {
                let n = n.max(1);
                before.map_or(0, |v| v.0) / n != result.last_version.0 / n
            }
            SnapshotPolicy::LoadCost(n) => {
                report.events_replayed + result.positions.len() as u64 > n
            }
            SnapshotPolicy::Interval(d) => {
                last_snapshot_at.is_none_or(|t| (Utc::now() - t).to_std().is_ok_and(|age| age >= d))
            }
            SnapshotPolicy::Manual => false,
        };
        if !due {
            return;
        }
        let snap = match make_snapshot(stream, state, result.last_version) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(target: SNAPSHOT_LOG_TARGET, stream = %stream, error = %e, "cannot serialize state for a snapshot");
                return;
            }
        };
        self.request_snapshot(snap).await;
    }

    async fn request_snapshot(&self, snap: Snapshot) {
        match (&self.background, &self.snapshots) {
            (Some(worker), _) => worker.request(snap).await,
            (None, Some((store, _))) => write_snapshot(store, &snap).await,
            (None, None) => {}
        }
    }

    /// The background worker, for the worker's tests.
    #[cfg(test)]
    pub(crate) fn worker(&self) -> Option<&Worker<N>> {
        self.background.as_deref()
    }

    /// Takes a snapshot of aggregate `id` now (any policy), from a fresh load,
    /// with a guarded write. Returns the snapshot built and what the write
    /// did ([`SnapshotWrite::Superseded`](crate::SnapshotWrite::Superseded)
    /// when a newer live snapshot, or a rolled-back one at or above its
    /// version, kept it out), `None` when the stream does not exist. The
    /// outcome is counted like the policy's writes.
    pub async fn snapshot(&self, id: &str) -> Result<Option<crate::CreatedSnapshot>> {
        let Some((store, _)) = &self.snapshots else {
            return Err(Error::Snapshot("repository has no snapshot store".into()));
        };
        let loaded = self.load(id).await?;
        let Some(version) = loaded.version else {
            return Ok(None);
        };
        let snapshot = make_snapshot(&Self::stream_id(id)?, &loaded.state, version)?;
        let result = store.save_snapshot(&snapshot).await;
        crate::snapshot_worker::record_write(A::TYPE, &result);
        Ok(Some(crate::CreatedSnapshot {
            snapshot,
            write: result?,
        }))
    }

    /// Flushes queued background snapshots and stops the worker. Commands
    /// still work afterwards; their snapshots are then written synchronously.
    /// Dropping the last clone of the repository does the same without
    /// waiting; call this to know that the queue is written.
    pub async fn shutdown(&self) {
        if let Some(worker) = &self.background {
            worker.shutdown().await;
        }
    }
}

/// The command id of the reaction `step` to event `event`: UUID v5 with the
/// event id as namespace and `step` as name, the same on every delivery
/// ([`CommandContext::reacting_to`]).
pub fn reaction_command_id(event: EventId, step: &str) -> Uuid {
    Uuid::new_v5(&event.0, step.as_bytes())
}

/// The id of event `index` of command `command_id`: UUID v5, namespace the
/// command id, name `index` as 8 big-endian bytes.
fn command_event_id(command_id: Uuid, index: usize) -> EventId {
    EventId(Uuid::new_v5(&command_id, &(index as u64).to_be_bytes()))
}

/// Encodes a command's events with the context's metadata, and ids derived
/// from its command id when it has one.
fn encode_batch<A: Aggregate>(events: &[A::Event], ctx: &CommandContext) -> Result<Vec<NewEvent>> {
    events
        .iter()
        .enumerate()
        .map(|(i, ev)| {
            let (event_type, event_version, data) = encode_event(ev)?;
            let event = NewEvent::new(event_type, data)
                .with_event_version(event_version)
                .with_metadata(ctx.metadata.clone());
            Ok(match ctx.event_id(i) {
                Some(id) => event.with_id(id),
                None => event,
            })
        })
        .collect()
}

/// Folds the events of `stream` (within `options`) onto `state`. Returns the
/// state, the last version folded and how many events were folded.
pub async fn fold_stream<A: Aggregate, S: EventStore>(
    store: &S,
    stream: &StreamId,
    state: A,
    options: ReadStream,
) -> Result<(A, Option<StreamVersion>, u64)> {
    fold_events(state, store.read_stream(stream, options)).await
}

/// Folds `events` onto `state`: the one fold loop of every read path.
async fn fold_events<A: Aggregate>(
    mut state: A,
    mut events: crate::EventStream,
) -> Result<(A, Option<StreamVersion>, u64)> {
    let mut version = None;
    let mut n = 0;
    while let Some(e) = events.next().await {
        let e = e?;
        state.apply(&decode_event::<A::Event>(&e)?);
        version = Some(e.stream_version);
        n += 1;
    }
    Ok((state, version, n))
}

/// Continues `state`, the fold of `stream` up to `version` (a snapshot's),
/// with the events after it. The read starts *at* `version`: finding that
/// event proves the snapshot is not ahead of the stream's head, at no extra
/// round trip. `None` when it is ahead (or the stream is gone).
pub(crate) async fn resume_from<A: Aggregate, S: EventStore>(
    store: &S,
    stream: &StreamId,
    version: StreamVersion,
    state: A,
) -> Result<Option<(A, StreamVersion, u64)>> {
    resume_with(
        store.read_stream(stream, ReadStream::forward().from(version)),
        version,
        state,
    )
    .await
}

/// [`resume_from`] over `events`, the stream's events from `version` on.
async fn resume_with<A: Aggregate>(
    mut events: crate::EventStream,
    version: StreamVersion,
    state: A,
) -> Result<Option<(A, StreamVersion, u64)>> {
    match events.next().await.transpose()? {
        Some(first) if first.stream_version == version => {}
        _ => return Ok(None),
    }
    let (state, last, n) = fold_events(state, events).await?;
    Ok(Some((state, last.unwrap_or(version), n)))
}

/// Serializes `state` as a snapshot of `stream` at `version`.
pub fn make_snapshot<A: Aggregate>(
    stream: &StreamId,
    state: &A,
    version: StreamVersion,
) -> Result<Snapshot> {
    Ok(Snapshot {
        aggregate_type: A::TYPE.to_owned(),
        aggregate_id: stream.id().to_owned(),
        version,
        schema_version: A::SCHEMA_VERSION,
        state: serde_json::to_value(state).map_err(|source| Error::Encode {
            what: format!("{} state", A::TYPE),
            source,
        })?,
        created_at: Utc::now(),
    })
}

/// Decodes a snapshot's state, migrating it step by step from an older
/// schema version when the aggregate provides the steps. Returns the state and
/// whether it was migrated.
pub fn decode_snapshot<A: Aggregate>(
    snap: &Snapshot,
) -> std::result::Result<(A, bool), SnapshotSkip> {
    let mut schema = snap.schema_version;
    let skip = SnapshotSkip::SchemaVersion {
        found: snap.schema_version,
        expected: A::SCHEMA_VERSION,
    };
    if schema > A::SCHEMA_VERSION {
        return Err(skip);
    }
    if schema == A::SCHEMA_VERSION {
        // Straight from the stored value, without copying it first.
        return A::deserialize(&snap.state)
            .map(|s| (s, false))
            .map_err(|e| SnapshotSkip::Undecodable(e.to_string()));
    }
    let mut state = snap.state.clone();
    while schema < A::SCHEMA_VERSION {
        state = A::migrate_snapshot(schema, state).ok_or_else(|| skip.clone())?;
        schema += 1;
    }
    serde_json::from_value::<A>(state)
        .map(|s| (s, snap.schema_version != A::SCHEMA_VERSION))
        .map_err(|e| SnapshotSkip::Undecodable(e.to_string()))
}
