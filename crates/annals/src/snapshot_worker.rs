//! The background snapshot worker of a repository
//! ([`SnapshotMode::Background`](crate::SnapshotMode::Background)), and the
//! snapshot-write metrics every writer records.
//!
//! The worker is a tokio task started by the first request, not by
//! [`Repository::with_snapshots`](crate::Repository::with_snapshots): a
//! repository can then be built outside a runtime (in `main` before the
//! runtime starts, in a synchronous constructor), and one that never asks for
//! a snapshot never spawns anything. A request made where no tokio runtime
//! runs is written directly.
//!
//! One mutex guards the queue *and* the worker's life cycle (closed, running,
//! finished). A request decides between "queue it" and "write it myself"
//! under that lock, and the worker decides to exit under it, only once the
//! queue is closed and empty. So no request can slip in between a "still
//! open" check and the worker's last look at the queue: each is either
//! drained by the worker or written by the caller.
//!
//! The repositories hold the worker through [`Worker`], shared by their
//! clones. When the last clone is dropped without
//! [`Repository::shutdown`](crate::Repository::shutdown), the queue is closed
//! all the same: the task writes what is queued, ends, and releases its
//! handle on the snapshot store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{watch, Notify};

use crate::repository::SNAPSHOT_LOG_TARGET;
use crate::snapshot::{Snapshot, SnapshotStore, SnapshotWrite};
use crate::Result;

/// Counts a snapshot write: `annals_snapshots_written_total`,
/// `annals_snapshot_superseded_total` (the guarded write kept a newer one) or
/// `annals_snapshot_failures_total`, labelled by aggregate type. The
/// repository and the snapshot jobs both record through this.
pub(crate) fn record_write(aggregate_type: &str, result: &Result<SnapshotWrite>) {
    let name = match result {
        Ok(SnapshotWrite::Written) => "annals_snapshots_written_total",
        Ok(SnapshotWrite::Superseded) => "annals_snapshot_superseded_total",
        Err(_) => "annals_snapshot_failures_total",
    };
    metrics::counter!(name, "aggregate_type" => aggregate_type.to_owned()).increment(1);
}

/// Counts a snapshot that a load (or a snapshot job) passed over:
/// `annals_snapshot_skipped_total`.
pub(crate) fn record_skip(aggregate_type: &str) {
    metrics::counter!("annals_snapshot_skipped_total", "aggregate_type" => aggregate_type.to_owned())
        .increment(1);
}

/// Writes one snapshot, recording the outcome; a failure is logged, never
/// returned (the command that asked for it has succeeded).
pub(crate) async fn write_snapshot<N: SnapshotStore>(store: &N, snap: &Snapshot) {
    let result = store.save_snapshot(snap).await;
    record_write(&snap.aggregate_type, &result);
    if let Err(e) = result {
        tracing::warn!(target: SNAPSHOT_LOG_TARGET, aggregate_type = %snap.aggregate_type, aggregate_id = %snap.aggregate_id, version = %snap.version, error = %e, "snapshot write failed; the command succeeded");
    }
}

type PendingKey = (String, String);

/// Where the worker task stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Task {
    /// No request yet: nothing spawned.
    NotStarted,
    Running,
    /// Exited (or never to start): requests are written by their caller.
    Finished,
}

struct State {
    pending: HashMap<PendingKey, Snapshot>,
    /// No more requests are queued (shutdown, or the last handle dropped).
    closed: bool,
    task: Task,
}

struct Shared<N> {
    state: Mutex<State>,
    /// Wakes the worker: a request was queued, or the queue was closed.
    wake: Notify,
    /// Becomes `true` once the worker is done (or will never run).
    finished: watch::Sender<bool>,
    capacity: usize,
    store: N,
    /// Test hook: awaited by a request before it takes the queue's lock, to
    /// run a shutdown in exactly the window where a request used to be lost.
    #[cfg(test)]
    before_enqueue: Mutex<Option<tests::Hook>>,
}

impl<N> Shared<N> {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock is never held across a panic that could leave the queue
        // half-updated (only map operations run under it).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the queue; a worker that never started is finished at once.
    fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        if st.task == Task::NotStarted {
            st.task = Task::Finished;
            self.finished.send_replace(true);
        }
        drop(st);
        self.wake.notify_one();
    }
}

/// The repositories' handle on the worker, shared by their clones: dropping
/// the last one closes the queue (see the module docs).
pub(crate) struct Worker<N> {
    shared: Arc<Shared<N>>,
}

impl<N> Drop for Worker<N> {
    fn drop(&mut self) {
        self.shared.close();
    }
}

/// Marks the worker finished however its task ends: returning, panicking,
/// or dropped unpolled with its runtime.
struct FinishGuard<N>(Arc<Shared<N>>);

impl<N> Drop for FinishGuard<N> {
    fn drop(&mut self) {
        self.0.lock().task = Task::Finished;
        self.0.finished.send_replace(true);
    }
}

/// What a request does, decided under the lock.
enum Decision {
    Queued,
    Dropped,
    WriteHere(Snapshot),
}

impl<N: SnapshotStore> Worker<N> {
    /// A worker for `store` with room for `capacity` distinct aggregates.
    /// Spawns nothing.
    pub(crate) fn new(store: N, capacity: usize) -> Self {
        Worker {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    pending: HashMap::new(),
                    closed: false,
                    task: Task::NotStarted,
                }),
                wake: Notify::new(),
                finished: watch::Sender::new(false),
                capacity: capacity.max(1),
                store,
                #[cfg(test)]
                before_enqueue: Mutex::new(None),
            }),
        }
    }

    /// Queues `snap` for the worker (starting it on the first request), or
    /// writes it here when the queue is closed or no tokio runtime runs.
    /// When the queue is full, a request for an aggregate already queued
    /// replaces it; others are dropped and counted.
    pub(crate) async fn request(&self, snap: Snapshot) {
        #[cfg(test)]
        tests::run_hook(&self.shared).await;
        let decision = self.decide(snap);
        match decision {
            Decision::Queued => self.shared.wake.notify_one(),
            Decision::Dropped => {
                tracing::debug!(target: SNAPSHOT_LOG_TARGET, "snapshot queue full; request dropped");
            }
            Decision::WriteHere(snap) => write_snapshot(&self.shared.store, &snap).await,
        }
    }

    fn decide(&self, snap: Snapshot) -> Decision {
        let mut st = self.shared.lock();
        if st.closed || st.task == Task::Finished {
            return Decision::WriteHere(snap);
        }
        if st.task == Task::NotStarted {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return Decision::WriteHere(snap);
            };
            let guard = FinishGuard(Arc::clone(&self.shared));
            runtime.spawn(async move {
                let guard = guard;
                run(&guard.0).await;
            });
            st.task = Task::Running;
        }
        let key = (snap.aggregate_type.clone(), snap.aggregate_id.clone());
        if st.pending.len() >= self.shared.capacity && !st.pending.contains_key(&key) {
            metrics::counter!("annals_snapshot_dropped_total", "aggregate_type" => snap.aggregate_type)
                .increment(1);
            return Decision::Dropped;
        }
        // Coalesce: keep the newest request per aggregate.
        match st.pending.get(&key) {
            Some(existing) if existing.version > snap.version => {}
            _ => {
                st.pending.insert(key, snap);
            }
        }
        Decision::Queued
    }

    /// Closes the queue, lets the worker write what is queued, and waits
    /// until it has ended. Requests made afterwards are written directly.
    pub(crate) async fn shutdown(&self) {
        self.shared.close();
        let mut finished = self.shared.finished.subscribe();
        // The sender lives in `shared`, which we hold: this cannot fail.
        let _ = finished.wait_for(|done| *done).await;
    }
}

/// The worker task: drains the queue until it is closed and empty.
async fn run<N: SnapshotStore>(shared: &Shared<N>) {
    loop {
        let batch: Vec<Snapshot> = {
            let mut st = shared.lock();
            if st.pending.is_empty() && st.closed {
                return;
            }
            st.pending.drain().map(|(_, s)| s).collect()
        };
        if batch.is_empty() {
            // A notification sent since the check left a permit: no wake-up
            // is lost.
            shared.wake.notified().await;
            continue;
        }
        for snap in batch {
            write_snapshot(&shared.store, &snap).await;
        }
    }
}

#[cfg(test)]
mod tests;
