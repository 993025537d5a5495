//! Partitioned projections: one projection run as P partitions by a stable
//! hash of the stream id, each with its own checkpoint, shared by worker
//! processes through leases with fencing tokens.
//!
//! # Partitions
//!
//! An event belongs to partition [`partition_of`]`(stream, P)`: FNV-1a
//! (64 bits) of the stream id's bytes, modulo P. The hash is fixed (not
//! std's randomly keyed one), so every process on every machine agrees, and
//! all the events of one stream are in one partition: per-stream order
//! holds. Partition `p` keeps its checkpoint under
//! [`partition_checkpoint`] (`name@vN/pPofCOUNT`) and progresses on its own.
//! Each partition reads the projection's filtered feed and keeps the events
//! of its hash; the events of other partitions only move its checkpoint (so
//! reads cost P times one runner's, the price of not needing a partition
//! column in the store).
//!
//! # Leases and fencing
//!
//! Every commit of a partition (read-model rows and checkpoint, one
//! transaction) runs under a [`Fence`]: the applier
//! ([`BatchApplier::set_fence`]) checks, inside that transaction and as its
//! last statement before the checkpoint moves, that the lease is still the
//! one it was given. A worker that was paused (or cut off) past its lease
//! and woke up after another worker took the partition over finds a newer
//! fencing token there: its transaction fails with [`Error::Fenced`] and
//! rolls back, so it commits nothing, not even a checkpoint. The check
//! locks the lease row until the commit (`FOR SHARE` on PostgreSQL; the
//! writer lock on SQLite), so a takeover is ordered either before the
//! commit (the commit is refused) or after it (the new holder reads the
//! checkpoint it moved).
//!
//! - [`PartitionedRunner::spawn_leased`] (PostgreSQL,
//!   [`PartitionLeases`]): workers on any machine register in a worker table
//!   with a heartbeat, and every third of the lease each one renews its
//!   leases, counts the live workers W, and aims at `ceil(P / W)` partitions:
//!   it releases the extras (after their current batch) and claims expired
//!   or free ones. A claim takes a lease only when it has expired (the
//!   database's clock) and raises its fencing token by one: tokens of a
//!   partition increase monotonically, one per holder. A worker that dies
//!   stops renewing; once its leases expire, the others take its partitions
//!   over from their checkpoints.
//! - [`PartitionedRunner::spawn_local`] (SQLite, memory, or PostgreSQL when
//!   one process should run everything): the process takes the projection
//!   lock ([`ProjectionControl`]) and runs all P partitions itself, each
//!   commit fenced by the lock's token. On SQLite this is the only mode:
//!   one process runs all partitions (a file has one writer anyway).
//!
//! The protocol is model-checked in `crates/annals/tests/it/partition_model.rs`
//! (the `stateright` crate): the model has the same steps (claim, renew,
//! read, commit, pause, expire, take over) and the same guards as the SQL
//! of `annals-postgres`'s `lease` module and the appliers' fenced commits.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};

use crate::projection::{no_live_workers, retry_store};
use crate::projection_control::{lock_owner, lock_token, LockAttempt};
use crate::subscription::{is_transient, Subscription, SubscriptionOptions};
use crate::{
    checkpoint_name, projection_lag, ApplyError, BatchApplier, BatchContext, CheckpointStore,
    Error, EventStore, GlobalPosition, ProjectionControl, ProjectionError, ProjectionLag,
    RecordedEvent, Result, RunnerOptions, StreamId,
};

/// The partition of `stream` among `partitions` (FNV-1a of its bytes; see
/// the module docs). `partitions` of 0 counts as 1.
///
/// ```
/// use annals::{partition_of, StreamId};
/// let s = StreamId::parse("Account-42")?;
/// assert_eq!(partition_of(&s, 8), partition_of(&s, 8));
/// assert!(partition_of(&s, 8) < 8);
/// assert_eq!(partition_of(&s, 1), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn partition_of(stream: &StreamId, partitions: u32) -> u32 {
    (fnv1a(stream.as_str().as_bytes()) % u64::from(partitions.max(1))) as u32
}

/// FNV-1a, 64 bits: fixed constants, the same in every process.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The checkpoint name of partition `partition` of `partitions` of the
/// projection checkpoint `checkpoint` ([`checkpoint_name`]):
/// `name@vN/pPofCOUNT`.
pub fn partition_checkpoint(checkpoint: &str, partition: u32, partitions: u32) -> String {
    format!("{checkpoint}/p{partition}of{partitions}")
}

/// A held partition lease ([`PartitionLeases::claim_partition`]).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PartitionLease {
    /// The projection's checkpoint name (`name@vN`).
    pub group: String,
    /// The partition.
    pub partition: u32,
    /// How many partitions the projection runs as.
    pub partitions: u32,
    /// The worker that holds it.
    pub owner: String,
    /// The fencing token: raised by one at every claim, so a later holder
    /// always has a larger one.
    pub fence: i64,
    /// When it expires unless renewed (the database's clock).
    pub expires_at: DateTime<Utc>,
}

/// Who holds a partition ([`PartitionLeases::partition_holders`]).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PartitionHolder {
    /// The partition.
    pub partition: u32,
    /// The worker that holds (or last held) it; `None`: never claimed or
    /// released.
    pub owner: Option<String>,
    /// Its fencing token (0: never claimed).
    pub fence: i64,
    /// When the lease expires (or expired).
    pub expires_at: Option<DateTime<Utc>>,
    /// Whether the lease is unexpired now (the database's clock).
    pub live: bool,
}

/// The lease a transactional applier commits under ([`BatchApplier::set_fence`]).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Fence {
    /// The projection lock `lock` (a checkpoint name) must still carry
    /// `token` (a [`ProjectionRunner`](crate::ProjectionRunner), a rebuild,
    /// or [`PartitionedRunner::spawn_local`]).
    Lock {
        /// The lock's name ([`checkpoint_name`]).
        lock: String,
        /// The acquisition's token.
        token: String,
        /// The lease's length: a transaction left idle this long (its
        /// process paused) is ended by the database.
        ttl: Duration,
    },
    /// The partition lease must still carry `lease.fence`
    /// ([`PartitionedRunner::spawn_leased`]).
    Partition {
        /// The lease as claimed or last renewed.
        lease: PartitionLease,
        /// The lease's length (as for `Lock`).
        ttl: Duration,
    },
}

impl Fence {
    /// The lease's length.
    pub fn ttl(&self) -> Duration {
        match self {
            Fence::Lock { ttl, .. } | Fence::Partition { ttl, .. } => *ttl,
        }
    }

    /// The lease, for messages: `name@vN` or `name@vN partition P`.
    pub fn lease_name(&self) -> String {
        match self {
            Fence::Lock { lock, .. } => lock.clone(),
            Fence::Partition { lease, .. } => {
                format!("{} partition {}", lease.group, lease.partition)
            }
        }
    }

    /// The [`Error::Fenced`] of a commit refused under this fence, with
    /// what the store holds now.
    pub fn fenced(&self, now: &str) -> Error {
        let held = match self {
            Fence::Lock { token, .. } => format!("token {token}"),
            Fence::Partition { lease, .. } => format!("fencing token {}", lease.fence),
        };
        Error::Fenced {
            lease: self.lease_name(),
            detail: format!("this runner held {held}; the store has {now}"),
        }
    }
}

/// Partition leases and worker membership, kept by the store (PostgreSQL:
/// the `partition_leases` and `partition_workers` tables). See the module
/// docs for the protocol; every time is the database's clock.
pub trait PartitionLeases: EventStore + CheckpointStore {
    /// Registers (or keeps alive) `worker` among the workers of `group` for
    /// `ttl`, forgets workers whose registration expired, makes sure the
    /// lease rows of partitions `0..partitions` exist, and returns how many
    /// workers are live. Fails with [`Error::Config`] when `group` already
    /// runs as another number of partitions.
    fn join_partitions(
        &self,
        group: &str,
        partitions: u32,
        worker: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<u32>> + Send;

    /// Removes `worker`'s registration (it stops).
    fn leave_partitions(
        &self,
        group: &str,
        worker: &str,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Takes `partition` for `worker` for `ttl` when its lease has expired
    /// (or was released, or never taken), raising its fencing token by one;
    /// `None` when someone holds it.
    fn claim_partition(
        &self,
        group: &str,
        partition: u32,
        partitions: u32,
        worker: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<PartitionLease>>> + Send;

    /// Extends `lease` by `ttl` from now; `None` when its fencing token is
    /// no longer the partition's (it was taken over).
    fn renew_partition(
        &self,
        lease: &PartitionLease,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<PartitionLease>>> + Send;

    /// Gives `lease` up (it expires now; nothing when it was taken over).
    fn release_partition(&self, lease: &PartitionLease) -> impl Future<Output = Result<()>> + Send;

    /// The holders of `group`'s partitions, by partition.
    fn partition_holders(
        &self,
        group: &str,
    ) -> impl Future<Output = Result<Vec<PartitionHolder>>> + Send;
}

/// How a [`PartitionedRunner`] runs.
#[derive(Clone, PartialEq, Debug)]
pub struct PartitionOptions {
    /// How many partitions (at least 1). Every worker of a projection
    /// version must use the same number.
    pub partitions: u32,
    /// The lease of each partition (or of the projection lock in local
    /// mode); renewed every third of it.
    pub lease_ttl: Duration,
    /// Batches and retries of each partition.
    pub runner: RunnerOptions,
}

impl Default for PartitionOptions {
    fn default() -> Self {
        PartitionOptions {
            partitions: 4,
            lease_ttl: crate::DEFAULT_LOCK_TTL,
            runner: RunnerOptions::default(),
        }
    }
}

/// Runs a projection as partitions (see the module docs). `make` builds one
/// applier per partition it runs (they run in parallel, each on its own
/// task).
pub struct PartitionedRunner<S, F> {
    store: S,
    make: F,
    options: PartitionOptions,
    name: String,
    group: String,
}

/// Where a partitioned worker stands ([`PartitionedHandle`]).
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct WorkerView {
    /// The partitions it runs now.
    pub owned: BTreeSet<u32>,
    /// The last checkpoint of each partition it has run.
    pub checkpoints: BTreeMap<u32, Option<GlobalPosition>>,
    /// Whether it has ended.
    pub ended: bool,
}

/// A running partitioned worker ([`PartitionedRunner::spawn_leased`],
/// [`PartitionedRunner::spawn_local`]). Dropping it stops the worker as
/// [`stop`](Self::stop) does.
pub struct PartitionedHandle {
    name: String,
    worker: String,
    stop: watch::Sender<bool>,
    view: watch::Receiver<WorkerView>,
    task: tokio::task::JoinHandle<std::result::Result<(), ProjectionError>>,
}

impl PartitionedHandle {
    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This worker's id (owner of its leases): `pid PID on HOST #ID`.
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// What it runs now.
    pub fn view(&self) -> WorkerView {
        self.view.borrow().clone()
    }

    /// Waits until `cond` holds for its view, at most `timeout`; the view
    /// then (or `None` on timeout or once it has ended without `cond`).
    pub async fn wait_view(
        &self,
        timeout: Duration,
        cond: impl Fn(&WorkerView) -> bool,
    ) -> Option<WorkerView> {
        let mut rx = self.view.clone();
        let out = tokio::time::timeout(timeout, rx.wait_for(|v| cond(v) || v.ended)).await;
        match out {
            Ok(Ok(v)) if cond(&v) => Some(v.clone()),
            _ => None,
        }
    }

    /// Waits until the worker ends by itself (an error), without consuming
    /// the handle.
    pub async fn ended(&self) {
        let mut rx = self.view.clone();
        let _ = rx.wait_for(|v| v.ended).await;
    }

    /// Stops the worker: its partitions finish their current batch, its
    /// leases are released (others take them at once) and it leaves.
    pub async fn stop(self) -> std::result::Result<(), ProjectionError> {
        self.stop.send_replace(true);
        self.join().await
    }

    /// Waits until the worker ends (an error, or stopped).
    pub async fn join(self) -> std::result::Result<(), ProjectionError> {
        match self.task.await {
            Ok(out) => out,
            Err(e) => Err(ProjectionError::Store {
                projection: self.name,
                source: Error::Backend {
                    backend: "projection",
                    message: format!("the partitioned worker ended abnormally: {e}"),
                    source: None,
                },
            }),
        }
    }
}

impl<S, F, A> PartitionedRunner<S, F>
where
    S: EventStore + CheckpointStore,
    F: Fn() -> A + Send + Sync + 'static,
    A: BatchApplier,
{
    /// Runs the applier `make` builds as `options.partitions` partitions
    /// on `store` (its events, checkpoints and leases).
    pub fn new(store: S, make: F, options: PartitionOptions) -> Self {
        let probe = make();
        let name = probe.name().to_owned();
        let group = probe.checkpoint();
        let mut options = options;
        options.partitions = options.partitions.max(1);
        options.lease_ttl = options.lease_ttl.max(Duration::from_millis(30));
        PartitionedRunner {
            store,
            make,
            options,
            name,
            group,
        }
    }

    fn start(
        self,
        worker: String,
        body: impl FnOnce(
            Self,
            String,
            watch::Receiver<bool>,
            watch::Sender<WorkerView>,
        ) -> tokio::task::JoinHandle<std::result::Result<(), ProjectionError>>,
    ) -> PartitionedHandle {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (view_tx, view_rx) = watch::channel(WorkerView::default());
        let name = self.name.clone();
        let task = body(self, worker.clone(), stop_rx, view_tx);
        PartitionedHandle {
            name,
            worker,
            stop: stop_tx,
            view: view_rx,
            task,
        }
    }

    /// Starts a worker that shares the partitions with the other workers
    /// of this projection version through leases in `store` (see the
    /// module docs), on the current tokio runtime.
    ///
    /// It refuses to start ([`ProjectionError::Locked`], from its `join`)
    /// while a plain runner (or a rebuild, or a local partitioned worker)
    /// holds the projection lock: they keep other checkpoints of the same
    /// read model.
    pub fn spawn_leased(self) -> PartitionedHandle
    where
        S: PartitionLeases + ProjectionControl,
    {
        let worker = format!("{} #{}", lock_owner(), short_id());
        self.start(worker, |runner, worker, stop, view| {
            tokio::spawn(async move {
                let out = runner.run_leased(&worker, stop, &view).await;
                view.send_modify(|v| {
                    v.owned.clear();
                    v.ended = true;
                });
                out
            })
        })
    }

    /// Starts a worker that runs all partitions itself under the
    /// projection lock (see the module docs), on the current tokio runtime.
    /// Fails (in its `join`) with [`ProjectionError::Locked`] when another
    /// runner holds the lock.
    pub fn spawn_local(self) -> PartitionedHandle
    where
        S: ProjectionControl,
    {
        let worker = lock_owner();
        self.start(worker, |runner, worker, stop, view| {
            tokio::spawn(async move {
                let out = runner.run_local(&worker, stop, &view).await;
                view.send_modify(|v| {
                    v.owned.clear();
                    v.ended = true;
                });
                out
            })
        })
    }

    fn store_err(&self, source: Error) -> ProjectionError {
        ProjectionError::Store {
            projection: self.name.clone(),
            source,
        }
    }

    fn spawn_partition(
        &self,
        partition: u32,
        fence: Fence,
        view: &watch::Sender<WorkerView>,
        done: &mpsc::UnboundedSender<(u32, u64, PartitionEnd)>,
        serial: u64,
    ) -> Running {
        let mut applier = (self.make)();
        applier.set_fence(Some(fence));
        let (stop_tx, stop_rx) = watch::channel(false);
        let job = PartitionJob {
            store: self.store.clone(),
            name: self.name.clone(),
            checkpoint: partition_checkpoint(&self.group, partition, self.options.partitions),
            partition,
            partitions: self.options.partitions,
            options: self.options.runner.clone(),
        };
        let view = view.clone();
        let done = done.clone();
        view.send_modify(|v| {
            v.owned.insert(partition);
        });
        let task = tokio::spawn(async move {
            let end = job.run(applier, stop_rx, &view).await;
            let _ = done.send((partition, serial, end));
        });
        Running {
            stop: stop_tx,
            task,
            serial,
        }
    }

    async fn run_leased(
        &self,
        worker: &str,
        mut stop: watch::Receiver<bool>,
        view: &watch::Sender<WorkerView>,
    ) -> std::result::Result<(), ProjectionError>
    where
        S: PartitionLeases + ProjectionControl,
    {
        let ttl = self.options.lease_ttl;
        // A plain runner of this projection version keeps the checkpoint
        // `name@vN` of the same read model: do not run beside it. First
        // register (a plain runner checks for live registrations after it
        // took the lock), then probe the lock: of a worker and a plain
        // runner starting together, at least one sees the other. The probe
        // takes the lock for a moment; other workers' probes are waited out.
        let count = self.options.partitions;
        retry_store(
            self.store.clone(),
            self.options.runner.store_retry,
            |s| async move { s.join_partitions(&self.group, count, worker, ttl).await },
        )
        .await
        .map_err(|e| self.store_err(e))?;
        let deadline = tokio::time::Instant::now() + ttl;
        loop {
            let probe = format!("{PROBE}{}", lock_token());
            let attempt = retry_store(self.store.clone(), self.options.runner.store_retry, |s| {
                let probe = probe.clone();
                async move {
                    s.acquire_projection_lock(&self.group, worker, &probe, ttl)
                        .await
                }
            })
            .await
            .map_err(|e| self.store_err(e))?;
            match attempt {
                LockAttempt::Acquired(lock) => {
                    self.store
                        .release_projection_lock(&lock)
                        .await
                        .map_err(|e| self.store_err(e))?;
                    break;
                }
                LockAttempt::Held(holder)
                    if holder.token.starts_with(PROBE)
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                LockAttempt::Held(holder) => {
                    if let Err(e) = self.store.leave_partitions(&self.group, worker).await {
                        tracing::warn!(projection = %self.name, error = %e,
                            "cannot unregister a partitioned worker that did not start");
                    }
                    return Err(ProjectionError::Locked {
                        projection: self.name.clone(),
                        checkpoint: self.group.clone(),
                        owner: holder.owner,
                        expires_at: holder.expires_at,
                    });
                }
            }
        }
        let count = self.options.partitions;
        let retry = self.options.runner.store_retry;
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let mut held: BTreeMap<u32, (PartitionLease, Running, tokio::time::Instant)> =
            BTreeMap::new();
        let mut serial = 0u64;
        let mut last_join = tokio::time::Instant::now();
        let mut live = 1u32;
        // Spread first claims: each worker starts looking at its own offset.
        let offset = (fnv1a(worker.as_bytes()) % u64::from(count)) as u32;
        let outcome: std::result::Result<(), ProjectionError> = loop {
            // 1. Heartbeat: how many workers share the partitions.
            match self
                .store
                .join_partitions(&self.group, count, worker, ttl)
                .await
            {
                Ok(n) => {
                    live = n.max(1);
                    last_join = tokio::time::Instant::now();
                }
                // Anything but a refusal (another partition count) is
                // retried for a whole lease: a deadlock victim, a lost
                // connection, a server restart.
                Err(e) if !matches!(e, Error::Config(_)) && last_join.elapsed() < ttl => {
                    tracing::warn!(projection = %self.name, error = %e,
                        "cannot register a partitioned worker; trying again");
                }
                Err(e) => break Err(self.store_err(e)),
            }
            // 2. Renew the leases held; a lease that is gone (taken over)
            // or could not be renewed for a whole lease stops its partition.
            let mut lost = Vec::new();
            for (p, (lease, _, renewed)) in held.iter_mut() {
                match self.store.renew_partition(lease, ttl).await {
                    Ok(Some(l)) => {
                        *lease = l;
                        *renewed = tokio::time::Instant::now();
                    }
                    Ok(None) => lost.push(*p),
                    Err(e) if renewed.elapsed() < ttl => {
                        tracing::warn!(projection = %self.name, partition = p, error = %e,
                            "cannot renew a partition lease");
                    }
                    Err(_) => lost.push(*p),
                }
            }
            for p in lost {
                if let Some((_, running, _)) = held.remove(&p) {
                    // Its commits would be fenced anyway: abort the batch in
                    // flight (its transaction rolls back).
                    running.task.abort();
                    view.send_modify(|v| {
                        v.owned.remove(&p);
                    });
                    tracing::warn!(projection = %self.name, partition = p,
                        "lost a partition lease: another worker took the partition over");
                }
            }
            // 3. Fair share: release the extras, claim up to the target.
            let target = count.div_ceil(live) as usize;
            while held.len() > target {
                let Some((p, (lease, running, _))) = held.pop_last() else {
                    break;
                };
                running.finish().await;
                view.send_modify(|v| {
                    v.owned.remove(&p);
                });
                if let Err(e) = self.store.release_partition(&lease).await {
                    tracing::warn!(projection = %self.name, partition = p, error = %e,
                        "cannot release a partition lease: it expires with its lease");
                }
            }
            if held.len() < target {
                for i in 0..count {
                    if held.len() >= target || stopping(&stop) {
                        break;
                    }
                    let p = (offset + i) % count;
                    if held.contains_key(&p) {
                        continue;
                    }
                    let claimed = retry_store(self.store.clone(), retry, |s| async move {
                        s.claim_partition(&self.group, p, count, worker, ttl).await
                    })
                    .await;
                    match claimed {
                        Ok(Some(lease)) => {
                            serial += 1;
                            let fence = Fence::Partition {
                                lease: lease.clone(),
                                ttl,
                            };
                            let running = self.spawn_partition(p, fence, view, &done_tx, serial);
                            held.insert(p, (lease, running, tokio::time::Instant::now()));
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(projection = %self.name, partition = p, error = %e,
                                "cannot claim a partition; trying at the next round");
                            break;
                        }
                    }
                }
            }
            // 4. Until the next round: a stop, or a partition that ended.
            let sleep = tokio::time::sleep(ttl / 3);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    _ = stop.changed() => break,
                    Some((p, s, end)) = done_rx.recv() => {
                        if held.get(&p).is_some_and(|(_, r, _)| r.serial == s) {
                            held.remove(&p);
                            view.send_modify(|v| { v.owned.remove(&p); });
                        }
                        match end {
                            PartitionEnd::Stopped => {}
                            PartitionEnd::Fenced(e) => tracing::warn!(projection = %self.name,
                                partition = p, error = %e, "a partition was fenced"),
                            PartitionEnd::Failed(e) => {
                                // Stop here: the others stop below.
                                stop_all_leased(&self.store, &mut held, view).await;
                                let _ = self.store.leave_partitions(&self.group, worker).await;
                                return Err(e);
                            }
                        }
                    }
                }
            }
            if stopping(&stop) {
                break Ok(());
            }
        };
        stop_all_leased(&self.store, &mut held, view).await;
        if let Err(e) = self.store.leave_partitions(&self.group, worker).await {
            tracing::warn!(projection = %self.name, error = %e,
                "cannot unregister a partitioned worker: it expires with its lease");
        }
        outcome
    }

    async fn run_local(
        &self,
        worker: &str,
        mut stop: watch::Receiver<bool>,
        view: &watch::Sender<WorkerView>,
    ) -> std::result::Result<(), ProjectionError>
    where
        S: ProjectionControl,
    {
        let ttl = self.options.lease_ttl;
        let token = lock_token();
        let retry = self.options.runner.store_retry;
        let attempt = retry_store(self.store.clone(), retry, |s| {
            let token = token.clone();
            async move {
                s.acquire_projection_lock(&self.group, worker, &token, ttl)
                    .await
            }
        })
        .await
        .map_err(|e| self.store_err(e))?;
        let mut lock = match attempt {
            LockAttempt::Acquired(lock) => lock,
            LockAttempt::Held(holder) => {
                return Err(ProjectionError::Locked {
                    projection: self.name.clone(),
                    checkpoint: self.group.clone(),
                    owner: holder.owner,
                    expires_at: holder.expires_at,
                })
            }
        };
        // Leased workers of this version (on other machines) would run the
        // same partitions beside this process.
        if let Err(e) = no_live_workers(&self.store, retry, &self.name, &self.group).await {
            if let Err(e) = self.store.release_projection_lock(&lock).await {
                tracing::warn!(projection = %self.name, error = %e,
                    "cannot release a projection lock: it expires with its lease");
            }
            return Err(e);
        }
        let fence = Fence::Lock {
            lock: self.group.clone(),
            token: token.clone(),
            ttl,
        };
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let mut running: BTreeMap<u32, Running> = (0..self.options.partitions)
            .map(|p| (p, self.spawn_partition(p, fence.clone(), view, &done_tx, 0)))
            .collect();
        let mut renewed = tokio::time::Instant::now();
        let outcome = loop {
            tokio::select! {
                () = tokio::time::sleep(ttl / 3) => {
                    match self.store.renew_projection_lock(&lock, ttl).await {
                        Ok(Some(l)) => { lock = l; renewed = tokio::time::Instant::now(); }
                        Ok(None) => break Err(self.lock_lost()),
                        Err(e) if renewed.elapsed() < ttl => tracing::warn!(
                            projection = %self.name, error = %e, "cannot renew a projection lock"),
                        Err(_) => break Err(self.lock_lost()),
                    }
                }
                _ = stop.changed() => {
                    if stopping(&stop) { break Ok(()); }
                }
                Some((p, _, end)) = done_rx.recv() => {
                    running.remove(&p);
                    view.send_modify(|v| { v.owned.remove(&p); });
                    match end {
                        PartitionEnd::Stopped => {}
                        PartitionEnd::Fenced(_) => break Err(self.lock_lost()),
                        PartitionEnd::Failed(e) => break Err(e),
                    }
                }
            }
        };
        let lost = matches!(outcome, Err(ProjectionError::LockLost { .. }));
        for (p, r) in std::mem::take(&mut running) {
            if lost {
                r.task.abort();
            } else {
                r.finish().await;
            }
            view.send_modify(|v| {
                v.owned.remove(&p);
            });
        }
        if !lost {
            if let Err(e) = self.store.release_projection_lock(&lock).await {
                tracing::warn!(projection = %self.name, error = %e,
                    "cannot release a projection lock: it expires with its lease");
            }
        }
        outcome
    }

    fn lock_lost(&self) -> ProjectionError {
        ProjectionError::LockLost {
            projection: self.name.clone(),
            checkpoint: self.group.clone(),
        }
    }
}

/// The token prefix of a leased worker's check that no plain runner holds
/// the projection lock.
const PROBE: &str = "partition-probe ";

/// Stop requested, or the handle dropped (which stops the worker too).
fn stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

fn short_id() -> String {
    let token = lock_token();
    token[token.len().saturating_sub(8)..].to_owned()
}

async fn stop_all_leased<S: PartitionLeases>(
    store: &S,
    held: &mut BTreeMap<u32, (PartitionLease, Running, tokio::time::Instant)>,
    view: &watch::Sender<WorkerView>,
) {
    for (p, (lease, running, _)) in std::mem::take(held) {
        running.finish().await;
        view.send_modify(|v| {
            v.owned.remove(&p);
        });
        if let Err(e) = store.release_partition(&lease).await {
            tracing::warn!(partition = p, error = %e,
                "cannot release a partition lease: it expires with its lease");
        }
    }
}

/// A partition's task.
struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    serial: u64,
}

impl Running {
    /// Stops it after its current batch and waits for it.
    async fn finish(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

/// How a partition's task ended.
enum PartitionEnd {
    /// Stopped on request.
    Stopped,
    /// A commit was refused: the lease was taken over.
    Fenced(Error),
    /// The handler or the store kept failing.
    Failed(ProjectionError),
}

/// One partition's loop: read the projection's feed after the partition's
/// checkpoint, keep the partition's events, commit each batch (rows and
/// checkpoint) under the fence.
struct PartitionJob<S> {
    store: S,
    name: String,
    checkpoint: String,
    partition: u32,
    partitions: u32,
    options: RunnerOptions,
}

impl<S: EventStore + CheckpointStore> PartitionJob<S> {
    async fn run<A: BatchApplier>(
        self,
        mut applier: A,
        mut stop: watch::Receiver<bool>,
        view: &watch::Sender<WorkerView>,
    ) -> PartitionEnd {
        match self.run_inner(&mut applier, &mut stop, view).await {
            Ok(()) => PartitionEnd::Stopped,
            Err(ApplyError::Store(e @ Error::Fenced { .. })) => PartitionEnd::Fenced(e),
            Err(ApplyError::Store(source)) => PartitionEnd::Failed(ProjectionError::Store {
                projection: self.name.clone(),
                source,
            }),
            Err(ApplyError::Handler(source)) => PartitionEnd::Failed(ProjectionError::Store {
                projection: self.name.clone(),
                source: Error::Backend {
                    backend: "projection",
                    message: format!("partition {}: {source}", self.partition),
                    source: None,
                },
            }),
        }
    }

    async fn run_inner<A: BatchApplier>(
        &self,
        applier: &mut A,
        stop: &mut watch::Receiver<bool>,
        view: &watch::Sender<WorkerView>,
    ) -> std::result::Result<(), ApplyError> {
        let checkpoint = self.checkpoint.clone();
        let start = retry_store(self.store.clone(), self.options.store_retry, |s| {
            let checkpoint = checkpoint.clone();
            async move { s.load_checkpoint(&checkpoint).await }
        })
        .await?;
        let p = self.partition;
        view.send_modify(|v| {
            v.checkpoints.insert(p, start);
        });
        let filter = applier.filter();
        let options = SubscriptionOptions::default()
            .categories(filter.categories)
            .event_types(filter.event_types)
            .batch_size(self.options.batch_size)
            .poll_interval(self.options.poll_interval)
            .retry(self.options.store_retry);
        let mut sub = Subscription::new(
            self.store.clone(),
            start.unwrap_or(GlobalPosition::START),
            options,
        );
        loop {
            if *stop.borrow_and_update() {
                return Ok(());
            }
            let batch = tokio::select! {
                batch = sub.next_batch() => batch?,
                _ = stop.changed() => return Ok(()),
            };
            if batch.position <= batch.after {
                continue;
            }
            let events: Vec<RecordedEvent> = batch
                .events
                .into_iter()
                .filter(|e| partition_of(&e.stream_id, self.partitions) == p)
                .collect();
            let ctx = BatchContext {
                checkpoint: checkpoint.clone(),
                after: batch.after,
                position: batch.position,
                replaying: batch.replaying,
                attempt: 1,
                tables: crate::TableNames::default(),
            };
            self.apply(applier, Arc::new(events), ctx).await?;
            view.send_modify(|v| {
                v.checkpoints.insert(p, Some(batch.position));
            });
        }
    }

    /// Applies a batch (possibly without events of this partition: then
    /// only its checkpoint moves, fenced like any commit) with retries;
    /// a batch that keeps failing is applied one event at a time, so the
    /// error names the event.
    async fn apply<A: BatchApplier>(
        &self,
        applier: &mut A,
        events: Arc<Vec<RecordedEvent>>,
        ctx: BatchContext,
    ) -> std::result::Result<(), ApplyError> {
        match self.apply_with_retry(applier, &events, ctx.clone()).await {
            Err(ApplyError::Handler(_)) if events.len() > 1 => {}
            other => return other,
        }
        let mut after = ctx.after;
        for event in events.iter() {
            let one = BatchContext {
                after,
                position: event.global_position,
                ..ctx.clone()
            };
            self.apply_with_retry(applier, &Arc::new(vec![event.clone()]), one)
                .await
                .map_err(|e| match e {
                    ApplyError::Handler(source) => ApplyError::Handler(
                        format!(
                            "{} failed on the event at {} ({} version {}, type {:?}): {source}",
                            self.name,
                            event.global_position,
                            event.stream_id,
                            event.stream_version,
                            event.event_type
                        )
                        .into(),
                    ),
                    other => other,
                })?;
            after = event.global_position;
        }
        if after < ctx.position {
            let rest = BatchContext { after, ..ctx };
            self.apply_with_retry(applier, &Arc::new(Vec::new()), rest)
                .await?;
        }
        Ok(())
    }

    async fn apply_with_retry<A: BatchApplier>(
        &self,
        applier: &mut A,
        events: &Arc<Vec<RecordedEvent>>,
        mut ctx: BatchContext,
    ) -> std::result::Result<(), ApplyError> {
        loop {
            let err = match applier.apply_shared(events, &ctx).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let retry = match &err {
                ApplyError::Handler(_) => self.options.handler_retry,
                ApplyError::Store(e) if is_transient(e) => self.options.store_retry,
                ApplyError::Store(_) => return Err(err),
            };
            if ctx.attempt >= retry.max_attempts.max(1) {
                return Err(err);
            }
            tracing::debug!(projection = %self.name, partition = self.partition,
                attempt = ctx.attempt, error = %err, "partition batch failed, retrying");
            tokio::time::sleep(retry.delay(ctx.attempt)).await;
            ctx.attempt += 1;
        }
    }
}

/// One partition's lag ([`partition_lags`]).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PartitionLag {
    /// The partition.
    pub partition: u32,
    /// Its checkpoint name ([`partition_checkpoint`]).
    pub checkpoint_name: String,
    /// Its checkpoint, the head, and the events between them.
    pub lag: ProjectionLag,
}

/// The lag of each partition of the projection `name` version `version`
/// run as `partitions` partitions.
pub async fn partition_lags<S: EventStore + CheckpointStore>(
    store: &S,
    name: &str,
    version: u32,
    partitions: u32,
) -> Result<Vec<PartitionLag>> {
    let group = checkpoint_name(name, version);
    let mut out = Vec::with_capacity(partitions as usize);
    for p in 0..partitions.max(1) {
        let checkpoint_name = partition_checkpoint(&group, p, partitions.max(1));
        let lag = projection_lag(store, &checkpoint_name).await?;
        out.push(PartitionLag {
            partition: p,
            checkpoint_name,
            lag,
        });
    }
    Ok(out)
}

/// Read-your-writes on a partitioned projection: waits until every
/// partition's checkpoint of `group` (`name@vN`) run as `partitions` is at
/// or past `position`, at most `timeout` (see [`crate::wait_for`]).
pub async fn wait_for_partitions<C: CheckpointStore>(
    store: &C,
    group: &str,
    partitions: u32,
    position: GlobalPosition,
    timeout: Duration,
) -> std::result::Result<(), ProjectionError> {
    let deadline = tokio::time::Instant::now() + timeout;
    for p in 0..partitions.max(1) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let name = partition_checkpoint(group, p, partitions.max(1));
        crate::wait_for(store, &name, position, left).await?;
    }
    Ok(())
}
