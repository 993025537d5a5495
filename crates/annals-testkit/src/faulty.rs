//! A fault-injecting store wrapper: delegates to a real store, but fails
//! writes once a budget is spent, the way a crash or a full disk would cut a
//! long operation short, and can lose the reply of an append that committed,
//! the way a dropped connection or a timeout does.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use annals::{
    AppendResult, CheckpointStore, Error, EventId, EventStore, EventStream, ExpectedVersion,
    GlobalPosition, NewEvent, PromoteReport, ReadAll, ReadStream, RecordedEvent, Result,
    RollbackReport, Snapshot, SnapshotCoverage, SnapshotHistoryEntry, SnapshotStore, SnapshotWrite,
    StaleSnapshot, StoreStats, StreamId, StreamInfo, StreamVersion,
};
use annals::{MultiStreamAppend, SnapshotAdmin, SnapshotStaging, StreamBatch, StreamCatalog};
use futures::stream::BoxStream;

/// The message of the error that replaces a lost reply.
pub const LOST_REPLY: &str = "injected lost reply: the append committed, its reply never arrived";

/// Wraps a store; after `budget` successful writes (appends, snapshot saves
/// and stages) every further write fails with a backend error before it
/// reaches the inner store. Separately, [`FaultyStore::lose_replies`] makes
/// appends commit and then fail.
#[derive(Clone)]
pub struct FaultyStore<S> {
    inner: S,
    budget: Arc<AtomicI64>,
    lost_replies: Arc<AtomicU64>,
    held: Arc<Mutex<Option<HeldWrite>>>,
    fenced_saves: Arc<AtomicU64>,
    /// `read_feed_page` calls made so far.
    feed_reads: Arc<tokio::sync::watch::Sender<u64>>,
    /// The number of the `read_feed_page` call to fail (0: none).
    failing_feed_read: Arc<AtomicU64>,
    /// `head_position` calls made so far.
    head_reads: Arc<tokio::sync::watch::Sender<u64>>,
}

/// A write of a projection lock ([`FaultyStore::hold_lock_write`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LockWrite {
    /// [`annals::ProjectionControl::acquire_projection_lock`].
    Acquire,
    /// [`annals::ProjectionControl::renew_projection_lock`].
    Renew,
}

struct HeldWrite {
    kind: LockWrite,
    started: oneshot::Sender<()>,
    go: oneshot::Receiver<()>,
}

/// The next lock write of one kind, held in flight
/// ([`FaultyStore::hold_lock_write`]).
pub struct HeldLockWrite {
    started: oneshot::Receiver<()>,
    go: oneshot::Sender<()>,
}

impl HeldLockWrite {
    /// Waits until the write was made: it is in flight, on a task of its
    /// own, and lands once [`land`](Self::land) is called whatever becomes
    /// of the caller that made it.
    pub async fn started(&mut self) {
        (&mut self.started)
            .await
            .expect("the held lock write was dropped before it started");
    }

    /// Lets the write reach the store.
    pub fn land(self) {
        let _ = self.go.send(());
    }
}

impl<S> FaultyStore<S> {
    /// Allows `budget` writes, then fails.
    pub fn new(inner: S, budget: i64) -> Self {
        FaultyStore {
            inner,
            budget: Arc::new(AtomicI64::new(budget)),
            lost_replies: Arc::new(AtomicU64::new(0)),
            held: Arc::default(),
            fenced_saves: Arc::default(),
            feed_reads: Arc::new(tokio::sync::watch::Sender::new(0)),
            failing_feed_read: Arc::default(),
            head_reads: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// The number of [`EventStore::head_position`] calls made so far
    /// (counted when a call starts), to wait on.
    pub fn head_reads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.head_reads.subscribe()
    }

    /// The number of [`EventStore::read_feed_page`] calls made so far
    /// (counted when a call starts), to wait on.
    pub fn feed_reads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.feed_reads.subscribe()
    }

    /// Makes the `read_feed_page` call numbered `nth` (1-based, counting
    /// every call since the wrapper was made) fail with a transient
    /// [`Error::Unavailable`] before it reaches the inner store, the way a
    /// read on a lost connection does.
    pub fn fail_feed_read(&self, nth: u64) {
        self.failing_feed_read.store(nth, Ordering::SeqCst);
    }

    /// The next `n` appends that succeed on the inner store (they are
    /// committed there) return an error instead of their result: a
    /// [`Error::Backend`] from backend `faulty` with message [`LOST_REPLY`],
    /// the way a caller sees a commit whose reply was lost. Appends that fail
    /// on the inner store fail as they are and do not count.
    pub fn lose_replies(&self, n: u64) {
        self.lost_replies.store(n, Ordering::SeqCst);
    }

    /// Replies still to be lost.
    pub fn replies_to_lose(&self) -> u64 {
        self.lost_replies.load(Ordering::SeqCst)
    }

    /// Takes one lost reply, if any are left.
    fn lose_reply(&self) -> bool {
        self.lost_replies
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Holds the next write of a projection lock of kind `kind` in flight,
    /// the way a statement already sent to the database (or queued on
    /// SQLite's writer thread) is: the call starts a task that makes the
    /// write on the inner store once [`HeldLockWrite::land`] is called (or
    /// the handle is dropped), and waits for it; dropping the call's future
    /// does not cancel the write.
    pub fn hold_lock_write(&self, kind: LockWrite) -> HeldLockWrite {
        let (started_tx, started) = oneshot::channel();
        let (go, go_rx) = oneshot::channel();
        *self.held.lock().expect("held lock write") = Some(HeldWrite {
            kind,
            started: started_tx,
            go: go_rx,
        });
        HeldLockWrite { started, go }
    }

    /// The held write of kind `kind`, if one is armed.
    fn take_held(&self, kind: LockWrite) -> Option<HeldWrite> {
        let mut held = self.held.lock().expect("held lock write");
        if held.as_ref().is_some_and(|h| h.kind == kind) {
            held.take()
        } else {
            None
        }
    }

    /// How many fenced checkpoint saves and resets the inner store refused
    /// with [`Error::Fenced`] (the lease had been taken over).
    pub fn fenced_saves(&self) -> u64 {
        self.fenced_saves.load(Ordering::SeqCst)
    }

    /// Allows writes again (the "restart").
    pub fn heal(&self) {
        self.budget.store(i64::MAX, Ordering::SeqCst);
    }

    fn spend(&self) -> Result<()> {
        if self.budget.fetch_sub(1, Ordering::SeqCst) > 0 {
            Ok(())
        } else {
            Err(Error::Backend {
                backend: "faulty",
                message: "injected write failure".into(),
                source: None,
            })
        }
    }
}

impl<S: EventStore> EventStore for FaultyStore<S> {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        self.spend()?;
        let result = self.inner.append(stream, expected, events).await?;
        if self.lose_reply() {
            return Err(Error::Backend {
                backend: "faulty",
                message: LOST_REPLY.into(),
                source: None,
            });
        }
        Ok(result)
    }
    fn read_stream(&self, stream: &StreamId, options: ReadStream) -> EventStream {
        self.inner.read_stream(stream, options)
    }
    fn read_all(&self, options: ReadAll) -> EventStream {
        self.inner.read_all(options)
    }
    async fn stream_version(&self, stream: &StreamId) -> Result<Option<StreamVersion>> {
        self.inner.stream_version(stream).await
    }
    async fn head_position(&self) -> Result<Option<GlobalPosition>> {
        self.head_reads.send_modify(|n| *n += 1);
        self.inner.head_position().await
    }
    async fn read_feed_page(
        &self,
        filter: &annals::ReadAll,
        limit: usize,
    ) -> Result<annals::FeedPage> {
        let mut nth = 0;
        self.feed_reads.send_modify(|n| {
            *n += 1;
            nth = *n;
        });
        if self.failing_feed_read.load(Ordering::SeqCst) == nth {
            return Err(Error::Unavailable {
                what: format!("injected failure of feed read {nth}"),
                after: std::time::Duration::ZERO,
            });
        }
        self.inner.read_feed_page(filter, limit).await
    }
    fn append_signal(&self) -> Option<annals::AppendSignal> {
        self.inner.append_signal()
    }
    async fn count_events_between(
        &self,
        after: GlobalPosition,
        up_to: GlobalPosition,
    ) -> Result<u64> {
        self.inner.count_events_between(after, up_to).await
    }
    async fn read_event(&self, id: EventId) -> Result<Option<RecordedEvent>> {
        self.inner.read_event(id).await
    }
}

/// One write of the budget, like an append; a lost reply loses the whole
/// call's reply (every stream committed).
impl<S: MultiStreamAppend> MultiStreamAppend for FaultyStore<S> {
    async fn append_many(&self, batches: Vec<StreamBatch>) -> Result<Vec<AppendResult>> {
        self.spend()?;
        let result = self.inner.append_many(batches).await?;
        if self.lose_reply() {
            return Err(Error::Backend {
                backend: "faulty",
                message: LOST_REPLY.into(),
                source: None,
            });
        }
        Ok(result)
    }
}

impl<S: SnapshotStore> SnapshotStore for FaultyStore<S> {
    async fn load_snapshot(&self, t: &str, id: &str) -> Result<Option<Snapshot>> {
        self.inner.load_snapshot(t, id).await
    }
    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<SnapshotWrite> {
        self.spend()?;
        self.inner.save_snapshot(snapshot).await
    }
    async fn delete_snapshot(&self, t: &str, id: &str) -> Result<u64> {
        self.inner.delete_snapshot(t, id).await
    }
}

impl<S: SnapshotAdmin> SnapshotAdmin for FaultyStore<S> {
    async fn invalidate_snapshots(&self, t: &str, below: Option<u32>) -> Result<u64> {
        self.inner.invalidate_snapshots(t, below).await
    }
    async fn snapshot_coverage(&self, t: Option<&str>) -> Result<Vec<SnapshotCoverage>> {
        self.inner.snapshot_coverage(t).await
    }
    async fn stale_snapshots(&self, t: Option<&str>, min: u64) -> Result<Vec<StaleSnapshot>> {
        self.inner.stale_snapshots(t, min).await
    }
    async fn snapshot_history_size(&self) -> Result<u32> {
        self.inner.snapshot_history_size().await
    }
    async fn set_snapshot_history_size(&self, keep: u32) -> Result<u64> {
        self.inner.set_snapshot_history_size(keep).await
    }
    async fn snapshot_history(&self, t: &str, id: &str) -> Result<Vec<SnapshotHistoryEntry>> {
        self.inner.snapshot_history(t, id).await
    }
    async fn rollback_snapshot(
        &self,
        t: &str,
        id: &str,
        to: StreamVersion,
    ) -> Result<RollbackReport> {
        self.inner.rollback_snapshot(t, id, to).await
    }
    fn list_stale_snapshots(
        &self,
        t: Option<&str>,
        min: u64,
    ) -> BoxStream<'static, Result<StaleSnapshot>> {
        self.inner.list_stale_snapshots(t, min)
    }
    fn live_snapshots(&self, t: &str) -> BoxStream<'static, Result<Snapshot>> {
        self.inner.live_snapshots(t)
    }
}

impl<S: SnapshotStaging> SnapshotStaging for FaultyStore<S> {
    async fn stage_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        self.spend()?;
        self.inner.stage_snapshot(snapshot).await
    }
    async fn load_staged(&self, t: &str, id: &str) -> Result<Option<Snapshot>> {
        self.inner.load_staged(t, id).await
    }
    fn staged_snapshots(&self, t: &str) -> BoxStream<'static, Result<Snapshot>> {
        self.inner.staged_snapshots(t)
    }
    async fn promote_staged(&self, t: &str) -> Result<PromoteReport> {
        self.inner.promote_staged(t).await
    }
    async fn clear_staged(&self, t: &str) -> Result<u64> {
        self.inner.clear_staged(t).await
    }
}

impl<S: CheckpointStore> CheckpointStore for FaultyStore<S> {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<GlobalPosition>> {
        self.inner.load_checkpoint(name).await
    }
    async fn save_checkpoint(&self, name: &str, position: GlobalPosition) -> Result<()> {
        self.spend()?;
        self.inner.save_checkpoint(name, position).await
    }
    async fn reset_checkpoint(&self, name: &str) -> Result<()> {
        self.inner.reset_checkpoint(name).await
    }
}

impl<S: annals::ProjectionControl> annals::ProjectionControl for FaultyStore<S> {
    async fn live_partition_workers(&self, group: &str) -> Result<u32> {
        self.inner.live_partition_workers(group).await
    }

    async fn acquire_projection_lock(
        &self,
        checkpoint: &str,
        owner: &str,
        token: &str,
        ttl: std::time::Duration,
    ) -> Result<annals::LockAttempt> {
        let Some(held) = self.take_held(LockWrite::Acquire) else {
            return self
                .inner
                .acquire_projection_lock(checkpoint, owner, token, ttl)
                .await;
        };
        let inner = self.inner.clone();
        let (checkpoint, owner, token) =
            (checkpoint.to_owned(), owner.to_owned(), token.to_owned());
        in_flight(held, async move {
            inner
                .acquire_projection_lock(&checkpoint, &owner, &token, ttl)
                .await
        })
        .await
    }
    async fn renew_projection_lock(
        &self,
        lock: &annals::ProjectionLock,
        ttl: std::time::Duration,
    ) -> Result<Option<annals::ProjectionLock>> {
        let Some(held) = self.take_held(LockWrite::Renew) else {
            return self.inner.renew_projection_lock(lock, ttl).await;
        };
        let (inner, lock) = (self.inner.clone(), lock.clone());
        in_flight(held, async move {
            inner.renew_projection_lock(&lock, ttl).await
        })
        .await
    }
    async fn release_projection_lock(&self, lock: &annals::ProjectionLock) -> Result<()> {
        self.inner.release_projection_lock(lock).await
    }
    async fn save_checkpoint_fenced(
        &self,
        name: &str,
        position: GlobalPosition,
        fence: &annals::Fence,
    ) -> Result<()> {
        self.spend()?;
        let out = self
            .inner
            .save_checkpoint_fenced(name, position, fence)
            .await;
        if matches!(out, Err(Error::Fenced { .. })) {
            self.fenced_saves.fetch_add(1, Ordering::SeqCst);
        }
        out
    }
    async fn reset_checkpoint_fenced(&self, name: &str, fence: &annals::Fence) -> Result<()> {
        self.spend()?;
        let out = self.inner.reset_checkpoint_fenced(name, fence).await;
        if matches!(out, Err(Error::Fenced { .. })) {
            self.fenced_saves.fetch_add(1, Ordering::SeqCst);
        }
        out
    }
    async fn projection_lock(&self, checkpoint: &str) -> Result<Option<annals::ProjectionLock>> {
        self.inner.projection_lock(checkpoint).await
    }
    async fn park_event(&self, letter: &annals::DeadLetter) -> Result<()> {
        self.inner.park_event(letter).await
    }
    async fn dead_letters(&self, checkpoint: &str) -> Result<Vec<annals::DeadLetter>> {
        self.inner.dead_letters(checkpoint).await
    }
    async fn drop_dead_letter(&self, checkpoint: &str, event_id: annals::EventId) -> Result<bool> {
        self.inner.drop_dead_letter(checkpoint, event_id).await
    }
}

/// Makes `write` on a task of its own once `held` lets it land, and waits
/// for its result (see [`FaultyStore::hold_lock_write`]).
async fn in_flight<T: Send + 'static>(
    held: HeldWrite,
    write: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let HeldWrite { started, go, .. } = held;
    let task = tokio::spawn(async move {
        // Landed on `land`, or when the test drops the handle.
        let _ = go.await;
        write.await
    });
    let _ = started.send(());
    task.await.map_err(|e| Error::Backend {
        backend: "faulty",
        message: format!("the held lock write's task failed: {e}"),
        source: None,
    })?
}

impl<S: StreamCatalog> StreamCatalog for FaultyStore<S> {
    fn list_streams(&self, category: &str) -> BoxStream<'static, Result<StreamInfo>> {
        self.inner.list_streams(category)
    }
    async fn stats(&self) -> Result<StoreStats> {
        self.inner.stats().await
    }
    fn read_correlated(&self, correlation_id: uuid::Uuid, limit: Option<u64>) -> EventStream {
        self.inner.read_correlated(correlation_id, limit)
    }
    fn read_caused_by(&self, causation_id: uuid::Uuid, limit: Option<u64>) -> EventStream {
        self.inner.read_caused_by(causation_id, limit)
    }
    async fn largest_streams(&self, limit: usize) -> Result<Vec<StreamInfo>> {
        self.inner.largest_streams(limit).await
    }
    async fn events_recorded_since(&self, since: chrono::DateTime<chrono::Utc>) -> Result<u64> {
        self.inner.events_recorded_since(since).await
    }
}
