//! The worker's life cycle: built outside a runtime, dropped without
//! `shutdown`, and a request racing a shutdown.

use std::sync::Mutex as StdMutex;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::oneshot;

use super::*;
use crate::bank::Account;
use crate::{CommandContext, InMemoryStore, Repository, SnapshotConfig, StreamVersion};

/// What a request awaits before it takes the queue's lock (see `Shared`).
pub(super) type Hook = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

pub(super) async fn run_hook<N>(shared: &Shared<N>) {
    let hook = shared
        .before_enqueue
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some(hook) = hook {
        hook().await;
    }
}

/// Fails the test (rather than hang it) when an awaited state never comes.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn live_version(store: &InMemoryStore, id: &str) -> Option<StreamVersion> {
    store
        .load_snapshot("Account", id)
        .await
        .expect("load")
        .map(|s| s.version)
}

#[test]
fn a_background_repository_is_built_outside_a_runtime() {
    let store = InMemoryStore::new();
    // No runtime here: this used to panic in `tokio::spawn`.
    let repo = Repository::<Account, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(2).background(8));

    // A request made where no tokio runtime runs is written directly.
    let ctx = CommandContext::new();
    futures::executor::block_on(async {
        repo.execute("plain", &ctx, |a| a.open("p"))
            .await
            .expect("open");
        repo.execute("plain", &ctx, |a| a.deposit(1))
            .await
            .expect("deposit");
        assert_eq!(live_version(&store, "plain").await, Some(StreamVersion(2)));
    });

    // On a runtime the worker starts with the first request.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        repo.execute("rt", &ctx, |a| a.open("r"))
            .await
            .expect("open");
        for _ in 0..3 {
            repo.execute("rt", &ctx, |a| a.deposit(1))
                .await
                .expect("deposit");
        }
        repo.shutdown().await;
        assert_eq!(live_version(&store, "rt").await, Some(StreamVersion(4)));
    });
}

/// A snapshot store that reports when its last clone is dropped.
#[derive(Clone)]
struct Tracked {
    inner: InMemoryStore,
    _alive: Arc<Alive>,
}

struct Alive(StdMutex<Option<oneshot::Sender<()>>>);

impl Drop for Alive {
    fn drop(&mut self) {
        if let Some(tx) = self.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(());
        }
    }
}

impl SnapshotStore for Tracked {
    async fn load_snapshot(&self, t: &str, id: &str) -> Result<Option<Snapshot>> {
        self.inner.load_snapshot(t, id).await
    }
    async fn save_snapshot(&self, s: &Snapshot) -> Result<SnapshotWrite> {
        self.inner.save_snapshot(s).await
    }
    async fn delete_snapshot(&self, t: &str, id: &str) -> Result<u64> {
        self.inner.delete_snapshot(t, id).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_clone_flushes_and_releases_the_store() {
    let store = InMemoryStore::new();
    let (released_tx, released) = oneshot::channel();
    let tracked = Tracked {
        inner: store.clone(),
        _alive: Arc::new(Alive(StdMutex::new(Some(released_tx)))),
    };
    let repo = Repository::<Account, _>::new(store.clone())
        .with_snapshots(tracked, SnapshotConfig::every(1).background(8));
    let ctx = CommandContext::new();
    let other = repo.clone();
    other
        .execute("d", &ctx, |a| a.open("d"))
        .await
        .expect("open");
    // Not the last clone: the worker goes on.
    drop(other);
    for _ in 0..5 {
        repo.execute("d", &ctx, |a| a.deposit(1))
            .await
            .expect("deposit");
    }
    // No shutdown: the last clone's drop closes the queue; the worker writes
    // what is queued, ends, and drops its handle on the store.
    drop(repo);
    within("the snapshot store to be released", released)
        .await
        .expect("the store's last clone was dropped");
    assert_eq!(live_version(&store, "d").await, Some(StreamVersion(6)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_racing_a_shutdown_is_never_lost() {
    let store = InMemoryStore::new();
    let repo = Repository::<Account, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(1).background(8));
    let ctx = CommandContext::new();
    // The worker is running and has written the first snapshot.
    repo.execute("race", &ctx, |a| a.open("r"))
        .await
        .expect("open");
    let worker = repo.worker().expect("background mode");
    // The next request stops in the window between deciding to queue and
    // queueing (where the old code had checked "closed" already), while
    // the test runs a whole shutdown: the worker finds the queue empty and
    // ends. The request must then be written, not queued for nobody.
    let (reached_tx, reached) = oneshot::channel::<()>();
    let (go, go_rx) = oneshot::channel::<()>();
    let armed = Arc::new(StdMutex::new(Some((reached_tx, go_rx))));
    let hook: Hook = Arc::new(move || {
        let taken = armed.lock().unwrap_or_else(|e| e.into_inner()).take();
        Box::pin(async move {
            if let Some((reached, go)) = taken {
                let _ = reached.send(());
                let _ = go.await;
            }
        })
    });
    *worker
        .shared
        .before_enqueue
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(hook);
    let racer = {
        let repo = repo.clone();
        tokio::spawn(async move {
            repo.execute("race", &CommandContext::new(), |a| a.deposit(5))
                .await
                .expect("deposit")
        })
    };
    within("the request to reach the window", reached)
        .await
        .expect("hook ran");
    within("the shutdown", repo.shutdown()).await;
    assert_eq!(
        worker.shared.lock().task,
        Task::Finished,
        "the worker has ended"
    );
    go.send(()).expect("the request is waiting");
    let executed = within("the racing command", racer).await.expect("task");
    assert_eq!(executed.version, Some(StreamVersion(2)));
    assert_eq!(
        live_version(&store, "race").await,
        Some(StreamVersion(2)),
        "the request that raced the shutdown was lost"
    );
}

#[tokio::test]
async fn a_shutdown_before_any_request_spawns_nothing() {
    let store = InMemoryStore::new();
    let repo = Repository::<Account, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(1).background(8));
    let worker = repo.worker().expect("background mode");
    assert_eq!(worker.shared.lock().task, Task::NotStarted);
    within("the shutdown", repo.shutdown()).await;
    assert_eq!(worker.shared.lock().task, Task::Finished);
    // Afterwards snapshots are written by the command itself.
    repo.execute("late", &CommandContext::new(), |a| a.open("l"))
        .await
        .expect("open");
    assert_eq!(live_version(&store, "late").await, Some(StreamVersion(1)));
}
