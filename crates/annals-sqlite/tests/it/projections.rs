//! What only SQLite has for projections: the in-process append signal (fired
//! after each group commit, for appends and `append_many`), and exactly-once
//! projections whose handler runs in the writer's transaction with the
//! checkpoint (issue 8).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use annals::{
    Backoff, BatchContext, CheckpointStore, EventStore, ExpectedVersion, GlobalPosition,
    HandlerError, MultiStreamAppend, ProjectionRunner, ReadAll, RecordedEvent, RunnerOptions,
    StreamBatch, Subscription, SubscriptionOptions,
};
use annals_sqlite::SqliteProjection;
use futures::TryStreamExt;

use crate::{ev, fresh_store, raw, sid};

const PATIENCE: Duration = Duration::from_secs(30);

/// A poll so long that only the append signal can wake a subscription
/// within [`PATIENCE`].
const NEVER: Duration = Duration::from_secs(3600);

/// A subscription at the end of the log wakes on an append and on an
/// `append_many` of this process, without polling.
#[tokio::test]
async fn issue8_group_commits_wake_subscriptions() {
    let store = fresh_store().await;
    store
        .append(&sid("W-1"), ExpectedVersion::Any, vec![ev("E", 0)])
        .await
        .expect("seed");
    let options = SubscriptionOptions::default().poll_interval(NEVER);
    let mut sub = Subscription::new(store.clone(), GlobalPosition::START, options);
    let first = sub.next_batch().await.expect("catch-up");
    assert_eq!(first.events.len(), 1);

    let writer = store.clone();
    let wrote = tokio::spawn(async move {
        writer
            .append(&sid("W-1"), ExpectedVersion::Any, vec![ev("E", 1)])
            .await
            .expect("append")
    });
    let live = tokio::time::timeout(PATIENCE, sub.next_batch())
        .await
        .expect("woken by the append")
        .expect("batch");
    let wrote = wrote.await.expect("writer");
    assert_eq!(live.events[0].global_position, wrote.positions[0]);
    assert!(!live.replaying);

    let writer = store.clone();
    let many = tokio::spawn(async move {
        writer
            .append_many(vec![
                StreamBatch::new(sid("W-2"), ExpectedVersion::Any, vec![ev("E", 2)]),
                StreamBatch::new(sid("W-3"), ExpectedVersion::Any, vec![ev("E", 3)]),
            ])
            .await
            .expect("append_many")
    });
    let mut got = Vec::new();
    while got.len() < 2 {
        let batch = tokio::time::timeout(PATIENCE, sub.next_batch())
            .await
            .expect("woken by append_many")
            .expect("batch");
        got.extend(batch.events.into_iter().map(|e| e.global_position));
    }
    let many = many.await.expect("writer");
    assert_eq!(got, vec![many[0].positions[0], many[1].positions[0]]);
}

/// Balances per stream in a table of the store's file, with the number of
/// events applied to each; fails (after writing its rows) while
/// `failures` is above zero.
struct Balances {
    failures: Arc<AtomicU32>,
    calls: Arc<AtomicU32>,
}

impl SqliteProjection for Balances {
    fn name(&self) -> &str {
        "balances"
    }
    fn handle(
        &self,
        tx: &rusqlite::Transaction<'_>,
        events: &[RecordedEvent],
        _ctx: &BatchContext,
    ) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS balances \
             (stream TEXT PRIMARY KEY, total INTEGER NOT NULL, events INTEGER NOT NULL)",
        )?;
        for e in events {
            let n = e.data.to_value()?["n"].as_i64().unwrap_or(0);
            tx.execute(
                "INSERT INTO balances (stream, total, events) VALUES (?1, ?2, 1) \
                 ON CONFLICT (stream) DO UPDATE SET total = total + excluded.total, \
                 events = events + 1",
                rusqlite::params![e.stream_id.as_str(), n],
            )?;
        }
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| f.checked_sub(1))
            .is_ok()
        {
            return Err("failing after writing the batch's rows".into());
        }
        Ok(())
    }
}

fn options() -> RunnerOptions {
    RunnerOptions {
        batch_size: 10,
        poll_interval: Duration::from_millis(50),
        store_retry: Backoff::default(),
        handler_retry: Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(5),
            max_attempts: 10,
        },
    }
}

/// A handler that fails after writing its rows leaves nothing behind: the
/// rows roll back with the checkpoint, the retry applies the batch once,
/// and the table equals a fold of the events.
#[tokio::test]
async fn issue8_in_transaction_projection_applies_each_batch_once() {
    let store = fresh_store().await;
    let mut last = GlobalPosition::START;
    for i in 0..40 {
        let r = store
            .append(
                &sid(&format!("Acc-{}", i % 4)),
                ExpectedVersion::Any,
                vec![ev("D", i)],
            )
            .await
            .expect("append");
        last = r.positions[0];
    }
    let failures = Arc::new(AtomicU32::new(3));
    let calls = Arc::new(AtomicU32::new(0));
    let applier = store.transactional(Balances {
        failures: Arc::clone(&failures),
        calls: Arc::clone(&calls),
    });
    let handle = ProjectionRunner::new(store.clone(), applier)
        .with_options(options())
        .spawn();
    handle.wait_for(last, PATIENCE).await.expect("caught up");
    // Live batches too, and one more failure among them.
    failures.store(1, Ordering::SeqCst);
    for i in 40..50 {
        let r = store
            .append(
                &sid(&format!("Acc-{}", i % 4)),
                ExpectedVersion::Any,
                vec![ev("D", i)],
            )
            .await
            .expect("append");
        last = r.positions[0];
    }
    handle.wait_for(last, PATIENCE).await.expect("live");
    handle.stop().await.expect("stop");
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "every failure was injected"
    );
    assert!(
        calls.load(Ordering::SeqCst) >= 5 + 4,
        "failed batches were retried"
    );

    let mut expected: HashMap<String, (i64, i64)> = HashMap::new();
    let events: Vec<RecordedEvent> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("read_all");
    for e in &events {
        let row = expected.entry(e.stream_id.to_string()).or_default();
        row.0 += e.data.to_value().expect("json")["n"].as_i64().unwrap_or(0);
        row.1 += 1;
    }
    let conn = raw(&store);
    let mut stmt = conn
        .prepare("SELECT stream, total, events FROM balances")
        .expect("prepare");
    let table: HashMap<String, (i64, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
        .expect("query")
        .collect::<rusqlite::Result<_>>()
        .expect("rows");
    assert_eq!(table, expected, "each event applied exactly once");
    assert_eq!(
        store
            .load_checkpoint(&annals::checkpoint_name("balances", 1))
            .await
            .expect("checkpoint"),
        Some(last)
    );
}

/// A batch whose checkpoint is already stored (an attempt that committed)
/// is not applied again.
#[tokio::test]
async fn issue8_in_transaction_projection_skips_a_committed_batch() {
    let store = fresh_store().await;
    let r = store
        .append(&sid("Acc-1"), ExpectedVersion::Any, vec![ev("D", 5)])
        .await
        .expect("append");
    let calls = Arc::new(AtomicU32::new(0));
    let mut applier = store.transactional(Balances {
        failures: Arc::new(AtomicU32::new(0)),
        calls: Arc::clone(&calls),
    });
    let events: Vec<RecordedEvent> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("read_all");
    let ctx = BatchContext {
        checkpoint: annals::checkpoint_name("balances", 1),
        after: GlobalPosition::START,
        position: r.positions[0],
        replaying: true,
        attempt: 1,
        tables: Default::default(),
    };
    use annals::BatchApplier;
    applier.apply(&events, &ctx).await.expect("first");
    applier.apply(&events, &ctx).await.expect("again");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let total: i64 = raw(&store)
        .query_row("SELECT total FROM balances", [], |r| r.get(0))
        .expect("row");
    assert_eq!(total, 5);

    // A batch that starts anywhere but at the stored checkpoint (another
    // runner moved it) is refused, not applied twice.
    let r2 = store
        .append(&sid("Acc-1"), ExpectedVersion::Any, vec![ev("D", 7)])
        .await
        .expect("append");
    let stale = BatchContext {
        position: r2.positions[0],
        ..ctx
    };
    let all: Vec<RecordedEvent> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("read_all");
    match applier.apply(&all, &stale).await {
        Err(annals::ApplyError::Store(annals::Error::Unsafe(why))) => {
            assert!(why.contains("another runner"), "{why}")
        }
        other => panic!("expected the checkpoint-moved refusal, got {other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Where the handler found a batch's events, and how many there were.
struct Seen {
    at: Arc<std::sync::Mutex<Vec<(usize, usize)>>>,
}

impl SqliteProjection for Seen {
    fn name(&self) -> &str {
        "seen"
    }
    fn handle(
        &self,
        _tx: &rusqlite::Transaction<'_>,
        events: &[RecordedEvent],
        _ctx: &BatchContext,
    ) -> Result<(), HandlerError> {
        let mut at = self.at.lock().map_err(|_| "poisoned")?;
        at.push((events.as_ptr() as usize, events.len()));
        Ok(())
    }
}

/// A batch handed over in an `Arc` reaches the handler on the writer
/// thread as it is, not copied; a borrowed batch is copied once and
/// applied the same way.
#[tokio::test]
async fn issue8_a_shared_batch_reaches_the_writer_thread_uncopied() {
    let store = fresh_store().await;
    let mut last = GlobalPosition::START;
    for i in 0..4 {
        last = store
            .append(&sid("Acc-1"), ExpectedVersion::Any, vec![ev("D", i)])
            .await
            .expect("append")
            .positions[0];
    }
    let events: Vec<RecordedEvent> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("read_all");
    let at = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut applier = store.transactional(Seen {
        at: Arc::clone(&at),
    });
    use annals::BatchApplier;
    let (head, rest) = events.split_at(2);
    let ctx = BatchContext {
        checkpoint: annals::checkpoint_name("seen", 1),
        after: GlobalPosition::START,
        position: head[1].global_position,
        replaying: true,
        attempt: 1,
        tables: Default::default(),
    };
    let shared = Arc::new(head.to_vec());
    applier.apply_shared(&shared, &ctx).await.expect("shared");
    let borrowed = BatchContext {
        after: head[1].global_position,
        position: last,
        ..ctx
    };
    applier.apply(rest, &borrowed).await.expect("borrowed");
    let at = at.lock().expect("lock").clone();
    assert_eq!(at.len(), 2, "{at:?}");
    assert_eq!(
        at[0],
        (shared.as_ptr() as usize, 2),
        "the shared batch itself"
    );
    assert_ne!(
        at[1].0,
        rest.as_ptr() as usize,
        "a copy of the borrowed one"
    );
    assert_eq!(at[1].1, 2);
    assert_eq!(
        store
            .load_checkpoint(&annals::checkpoint_name("seen", 1))
            .await
            .expect("checkpoint"),
        Some(last)
    );
}

/// Two runners of one transactional projection at once (a second process
/// started by mistake): batches apply in turn, a runner whose batch no
/// longer starts at the checkpoint stops instead of applying it, and the
/// table ends equal to a fold of the events, each applied once.
#[tokio::test]
async fn issue8_two_transactional_runners_never_apply_twice() {
    let store = fresh_store().await;
    let mut last = GlobalPosition::START;
    for i in 0..200 {
        let r = store
            .append(
                &sid(&format!("Acc-{}", i % 4)),
                ExpectedVersion::Any,
                vec![ev("D", i)],
            )
            .await
            .expect("append");
        last = r.positions[0];
    }
    let runner = |batch: usize| {
        let mut opts = options();
        opts.batch_size = batch;
        ProjectionRunner::new(
            store.clone(),
            store.transactional(Balances {
                failures: Arc::new(AtomicU32::new(0)),
                calls: Arc::new(AtomicU32::new(0)),
            }),
        )
        .with_options(opts)
        .spawn()
    };
    // Different batch sizes, so their batches do not line up.
    let a = runner(7);
    let b = runner(11);
    let checkpoint = annals::checkpoint_name("balances", 1);
    annals::wait_for(&store, &checkpoint, last, PATIENCE)
        .await
        .expect("one of them reaches the end");
    for handle in [a, b] {
        if let Err(e) = handle.stop().await {
            assert!(e.to_string().contains("another runner"), "{e}");
        }
    }
    let conn = raw(&store);
    let (total, events): (i64, i64) = conn
        .query_row("SELECT sum(total), sum(events) FROM balances", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("sums");
    assert_eq!(events, 200, "each event applied once");
    assert_eq!(total, (0..200).sum::<i64>());
}

/// Another process's appends (here a second store on the same file, with
/// its own writer) raise no signal in this one: the subscription's poll
/// finds them.
#[tokio::test]
async fn issue8_other_processes_appends_are_polled() {
    let store = fresh_store().await;
    let other = annals_sqlite::SqliteEventStore::open(store.path())
        .await
        .expect("a second store on the file");
    let options = SubscriptionOptions::default().poll_interval(Duration::from_millis(20));
    let mut sub = Subscription::new(store.clone(), GlobalPosition::START, options);
    let mut expected = Vec::new();
    let mut got = Vec::new();
    for i in 0..3 {
        let r = other
            .append(&sid("Other-1"), ExpectedVersion::Any, vec![ev("E", i)])
            .await
            .expect("append from the other store");
        expected.extend(r.positions);
        while got.len() < expected.len() {
            let batch = tokio::time::timeout(PATIENCE, sub.next_batch())
                .await
                .expect("found by the poll")
                .expect("batch");
            got.extend(batch.events.iter().map(|e| e.global_position));
        }
    }
    assert_eq!(got, expected);
}

/// Fencing: a runner paused past its projection lock's lease, whose lock
/// another process took, fails its next batch with `Error::Fenced` and
/// writes neither rows nor checkpoint; a partition lease (PostgreSQL's) is
/// refused with a message that says what SQLite does instead.
#[tokio::test]
async fn issue8_a_runner_whose_lock_was_taken_over_commits_nothing() {
    use annals::{BatchApplier, Fence, LockAttempt, ProjectionControl};
    let store = fresh_store().await;
    for i in 0..4 {
        store
            .append(&sid("Acc-1"), ExpectedVersion::Any, vec![ev("D", i + 1)])
            .await
            .expect("append");
    }
    let events: Vec<RecordedEvent> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("read_all");
    let cp = annals::checkpoint_name("balances", 1);
    let ttl = Duration::from_millis(100);
    let LockAttempt::Acquired(old) = store
        .acquire_projection_lock(&cp, "old", "token-old", ttl)
        .await
        .expect("lock")
    else {
        panic!("free lock")
    };
    let calls = Arc::new(AtomicU32::new(0));
    let mut applier = store.transactional(Balances {
        failures: Arc::new(AtomicU32::new(0)),
        calls: Arc::clone(&calls),
    });
    applier.set_fence(Some(Fence::Lock {
        lock: cp.clone(),
        token: old.token.clone(),
        ttl,
    }));
    let ctx = |after: GlobalPosition, batch: &[RecordedEvent]| BatchContext {
        checkpoint: cp.clone(),
        after,
        position: batch.last().expect("events").global_position,
        replaying: false,
        attempt: 1,
        tables: Default::default(),
    };
    applier
        .apply(&events[..2], &ctx(GlobalPosition::START, &events[..2]))
        .await
        .expect("under the lease");
    let at = events[1].global_position;
    // Another process takes the lock once the lease has expired (polled
    // against the store's clock, with a deadline).
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        assert!(std::time::Instant::now() < deadline, "never expired");
        match store
            .acquire_projection_lock(&cp, "new", "token-new", PATIENCE)
            .await
            .expect("lock")
        {
            LockAttempt::Acquired(_) => break,
            LockAttempt::Held(_) => tokio::task::yield_now().await,
        }
    }
    match applier.apply(&events[2..], &ctx(at, &events[2..])).await {
        Err(annals::ApplyError::Store(annals::Error::Fenced { lease, detail })) => {
            assert_eq!(lease, cp);
            assert!(detail.contains("token-new"), "{detail}");
        }
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler never ran");
    assert_eq!(store.load_checkpoint(&cp).await.expect("cp"), Some(at));
    let total: i64 = raw(&store)
        .query_row("SELECT total FROM balances", [], |r| r.get(0))
        .expect("row");
    assert_eq!(total, 1 + 2);

    applier.set_fence(Some(Fence::Partition {
        lease: annals::PartitionLease {
            group: cp.clone(),
            partition: 0,
            partitions: 2,
            owner: "w".into(),
            fence: 1,
            expires_at: chrono::Utc::now(),
        },
        ttl,
    }));
    match applier.apply(&events[2..], &ctx(at, &events[2..])).await {
        Err(annals::ApplyError::Store(annals::Error::Config(why))) => {
            assert!(why.contains("one process runs all partitions"), "{why}");
        }
        other => panic!("expected the SQLite refusal, got {other:?}"),
    }
}
