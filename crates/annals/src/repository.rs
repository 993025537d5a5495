//! The repository: load an aggregate (snapshot + fold), run a command, append
//! its events with an exact expected version, retry on conflict.
//!
//! Snapshots are optional and only ever a cache. Every decision the load made
//! about a snapshot is reported in [`LoadReport`], so tests and metrics can see
//! whether a snapshot was used and why one was passed over.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use serde_json::Value;
use uuid::Uuid;

use crate::aggregate::{decode_event, encode_event};
use crate::snapshot::{NoSnapshots, Snapshot, SnapshotStore};
use crate::snapshot_worker::{write_snapshot, Worker};
use crate::{
    Aggregate, AppendResult, Error, EventStore, ExpectedVersion, Metadata, NewEvent, ReadStream,
    RecordedEvent, Result, StreamId, StreamVersion,
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
/// headers) stamped on every event it produces.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommandContext {
    metadata: Metadata,
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
        }
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
        let snap = match snaps.load_snapshot(A::TYPE, stream.id()).await {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(Err(SnapshotSkip::Missing)),
            Err(e) => return Ok(Err(SnapshotSkip::StoreError(e.to_string()))),
        };
        let (state, migrated) = match decode_snapshot::<A>(&snap) {
            Ok(x) => x,
            Err(skip) => return Ok(Err(skip)),
        };
        let Some((state, version, replayed)) =
            resume_from(&self.store, stream, snap.version, state).await?
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

    /// Runs `command` on aggregate `id` and appends the events it returns with
    /// the loaded version as the expected version. On a conflict it reloads
    /// and runs the command again, up to the retry policy.
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
        let stream = Self::stream_id(id)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let loaded = self.load_with(&stream, true).await?;
            let new_events = command(&loaded.state).map_err(CommandError::Rejected)?;
            if new_events.is_empty() {
                return Ok(Executed {
                    state: loaded.state,
                    version: loaded.version,
                    append: None,
                    attempts: attempt,
                });
            }
            let batch = encode_batch::<A>(&new_events, ctx)?;
            let expected = ExpectedVersion::Exact(loaded.version.unwrap_or_default());
            match self.store.append(&stream, expected, batch).await {
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
                    });
                }
                Err(e) if e.is_conflict() && attempt < self.retry.max_attempts => {
                    metrics::counter!("annals_command_conflicts_total", "aggregate_type" => A::TYPE).increment(1);
                    tokio::time::sleep(self.retry.delay(attempt - 1)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Creates aggregate `id`: runs `command` on the default state and
    /// appends its events with [`ExpectedVersion::NoStream`], without reading
    /// the store first. If the stream already exists this is a conflict
    /// ([`Error::WrongExpectedVersion`]), never retried: use
    /// [`Repository::execute`] to act on existing aggregates.
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
        let mut state = A::default();
        let new_events = command(&state).map_err(CommandError::Rejected)?;
        if new_events.is_empty() {
            return Ok(Executed {
                state,
                version: None,
                append: None,
                attempts: 1,
            });
        }
        let batch = encode_batch::<A>(&new_events, ctx)?;
        let result = self
            .store
            .append(&stream, ExpectedVersion::NoStream, batch)
            .await?;
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
        })
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

    /// Takes a snapshot of aggregate `id` now (any policy), from a fresh load.
    /// Returns the snapshot written, `None` when the stream does not exist.
    pub async fn snapshot(&self, id: &str) -> Result<Option<Snapshot>> {
        let Some((store, _)) = &self.snapshots else {
            return Err(Error::Snapshot("repository has no snapshot store".into()));
        };
        let loaded = self.load(id).await?;
        let Some(version) = loaded.version else {
            return Ok(None);
        };
        let snap = make_snapshot(&Self::stream_id(id)?, &loaded.state, version)?;
        store.save_snapshot(&snap).await?;
        Ok(Some(snap))
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

/// Encodes a command's events with the context's metadata.
fn encode_batch<A: Aggregate>(events: &[A::Event], ctx: &CommandContext) -> Result<Vec<NewEvent>> {
    events
        .iter()
        .map(|ev| {
            let (event_type, event_version, data) = encode_event(ev)?;
            Ok(NewEvent::new(event_type, data)
                .with_event_version(event_version)
                .with_metadata(ctx.metadata.clone()))
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
    let mut events = store.read_stream(stream, ReadStream::forward().from(version));
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
    let mut state = snap.state.clone();
    let mut schema = snap.schema_version;
    let skip = SnapshotSkip::SchemaVersion {
        found: snap.schema_version,
        expected: A::SCHEMA_VERSION,
    };
    if schema > A::SCHEMA_VERSION {
        return Err(skip);
    }
    while schema < A::SCHEMA_VERSION {
        state = A::migrate_snapshot(schema, state).ok_or_else(|| skip.clone())?;
        schema += 1;
    }
    serde_json::from_value::<A>(state)
        .map(|s| (s, snap.schema_version != A::SCHEMA_VERSION))
        .map_err(|e| SnapshotSkip::Undecodable(e.to_string()))
}
