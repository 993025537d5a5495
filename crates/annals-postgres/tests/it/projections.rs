//! What only PostgreSQL has for projections: the `LISTEN/NOTIFY` append
//! signal (across store handles, as across processes), a subscription
//! whose listening and feed connections are terminated and that resumes
//! with nothing lost or doubled, and exactly-once projections whose handler
//! runs in the transaction that saves the checkpoint (issue 8).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use annals::{
    Backoff, BatchContext, CheckpointStore, EventStore, ExpectedVersion, GlobalPosition,
    HandlerError, NewEvent, Projection, ProjectionRunner, ReadAll, RecordedEvent, RunnerOptions,
    StreamId, Subscription, SubscriptionOptions,
};
use annals_postgres::{PgEventStore, PgProjection};
use serde_json::json;

use crate::common::{feed, options, wait_until, TestDb};

const PATIENCE: Duration = Duration::from_secs(60);

/// A poll so long that only the append signal can wake a subscription
/// within [`PATIENCE`].
const NEVER: Duration = Duration::from_secs(3600);

fn sid(s: &str) -> StreamId {
    StreamId::parse(s).expect("stream id")
}

fn ev(n: i64) -> NewEvent {
    NewEvent::new("Deposited", json!({ "n": n }))
}

/// Another handle on the same schema, with its own pool and no listener:
/// what another process appending to the store looks like.
async fn other_process(db: &TestDb) -> PgEventStore {
    PgEventStore::connect_with(&db.url, options(&db.schema))
        .await
        .expect("connect a second store")
}

fn runner_options() -> RunnerOptions {
    RunnerOptions {
        batch_size: 20,
        poll_interval: NEVER,
        store_retry: Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(500),
            max_attempts: 50,
        },
        handler_retry: Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(10),
            max_attempts: 10,
        },
    }
}

/// An append through another store handle wakes a subscription at the end
/// of the log through `NOTIFY`, without polling.
#[tokio::test]
async fn issue8_notify_wakes_subscriptions() {
    let Some(db) = TestDb::new("issue8_notify_wakes_subscriptions").await else {
        return;
    };
    let writer = other_process(&db).await;
    let options = SubscriptionOptions::default().poll_interval(NEVER);
    let mut sub = Subscription::new(db.store.clone(), GlobalPosition::START, options);
    for round in 0..3 {
        let appended = {
            let writer = writer.clone();
            tokio::spawn(async move {
                writer
                    .append(&sid("Note-1"), ExpectedVersion::Any, vec![ev(round)])
                    .await
                    .expect("append")
            })
        };
        let mut got = Vec::new();
        while got.is_empty() {
            let batch = tokio::time::timeout(PATIENCE, sub.next_batch())
                .await
                .expect("woken by NOTIFY")
                .expect("batch");
            got = batch.events;
        }
        let appended = appended.await.expect("writer");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].global_position, appended.positions[0]);
    }
    db.cleanup().await;
}

/// Records every event id it is given.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<annals::EventId>>>);

impl Projection for Seen {
    fn name(&self) -> &str {
        "seen"
    }
    async fn handle(
        &mut self,
        events: &[RecordedEvent],
        _ctx: &BatchContext,
    ) -> Result<(), HandlerError> {
        let mut seen = self.0.lock().expect("lock");
        seen.extend(events.iter().map(|e| e.event_id));
        Ok(())
    }
}

/// `pg_terminate_backend` on the listening connection and on every pooled
/// connection of a running projection's store: the listener reconnects
/// with backoff, reads retry on fresh connections, and the projection
/// resumes from its last position: every event handled once.
#[tokio::test]
async fn issue8_terminated_listener_and_feed_resume_without_loss() {
    let Some(db) = TestDb::new("issue8_terminated_listener_and_feed_resume_without_loss").await
    else {
        return;
    };
    let writer = other_process(&db).await;
    let mut last = GlobalPosition::START;
    for i in 0..30 {
        last = writer
            .append(
                &sid(&format!("Kill-{}", i % 3)),
                ExpectedVersion::Any,
                vec![ev(i)],
            )
            .await
            .expect("append")
            .positions[0];
    }
    let seen = Seen::default();
    let handle = ProjectionRunner::at_least_once(db.store.clone(), seen.clone())
        .with_options(runner_options())
        .spawn();
    handle.wait_for(last, PATIENCE).await.expect("caught up");

    let raw = db.raw().await;
    let listener = format!("{}/listen", db.app);
    let pids_of = |name: String| {
        let raw = &raw;
        async move {
            raw.query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                &[&name],
            )
            .await
            .expect("pg_stat_activity")
            .iter()
            .map(|r| r.get::<_, i32>(0))
            .collect::<Vec<i32>>()
        }
    };
    wait_until("the listener to connect", || async {
        !pids_of(listener.clone()).await.is_empty()
    })
    .await;
    for round in 0..2 {
        let mut victims = pids_of(listener.clone()).await;
        victims.extend(pids_of(db.app.clone()).await);
        raw.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY($1)",
            &[&victims],
        )
        .await
        .expect("pg_terminate_backend");
        wait_until("the terminated backends to exit", || async {
            let mut alive = pids_of(listener.clone()).await;
            alive.extend(pids_of(db.app.clone()).await);
            !victims.iter().any(|p| alive.contains(p))
        })
        .await;
        for i in 0..20 {
            last = writer
                .append(
                    &sid(&format!("Kill-{}", i % 3)),
                    ExpectedVersion::Any,
                    vec![ev(1000 * (round + 1) + i)],
                )
                .await
                .expect("append")
                .positions[0];
        }
        handle
            .wait_for(last, PATIENCE)
            .await
            .expect("resumed after the connections were terminated");
        wait_until("a new listener", || async {
            !pids_of(listener.clone()).await.is_empty()
        })
        .await;
    }
    handle.stop().await.expect("stop");
    let handled = seen.0.lock().expect("lock").clone();
    let distinct: HashSet<_> = handled.iter().collect();
    assert_eq!(distinct.len(), handled.len(), "no event handled twice");
    let all: Vec<_> = feed(&db.store, ReadAll::from_start())
        .await
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(handled, all, "every event, in order");
    db.cleanup().await;
}

/// Balances per stream in a table of the store's schema; fails (after
/// writing its rows) while `failures` is above zero.
struct Balances {
    failures: Arc<AtomicU32>,
    calls: Arc<AtomicU32>,
}

impl PgProjection for Balances {
    fn name(&self) -> &str {
        "balances"
    }
    async fn handle(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &[RecordedEvent],
        _ctx: &BatchContext,
    ) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        for e in events {
            let n = e.data.to_value()?["n"].as_i64().unwrap_or(0);
            tx.execute(
                "INSERT INTO balances (stream, total, events) VALUES ($1, $2, 1) \
                 ON CONFLICT (stream) DO UPDATE SET total = balances.total + excluded.total, \
                 events = balances.events + 1",
                &[&e.stream_id.as_str(), &n],
            )
            .await?;
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

/// A handler that fails after writing its rows leaves nothing behind: the
/// rows roll back with the checkpoint, the retry applies the batch once, and
/// the table equals a fold of the events; a batch already committed is
/// skipped.
#[tokio::test]
async fn issue8_in_transaction_projection_applies_each_batch_once() {
    let Some(db) = TestDb::new("issue8_in_transaction_projection_applies_each_batch_once").await
    else {
        return;
    };
    let raw = db.raw().await;
    raw.batch_execute(
        "CREATE TABLE balances (stream text PRIMARY KEY, total bigint NOT NULL, events bigint NOT NULL)",
    )
    .await
    .expect("create the read model");
    let mut last = GlobalPosition::START;
    for i in 0..40 {
        last = db
            .store
            .append(
                &sid(&format!("Acc-{}", i % 4)),
                ExpectedVersion::Any,
                vec![ev(i)],
            )
            .await
            .expect("append")
            .positions[0];
    }
    let failures = Arc::new(AtomicU32::new(3));
    let calls = Arc::new(AtomicU32::new(0));
    let applier = db.store.transactional(Balances {
        failures: Arc::clone(&failures),
        calls: Arc::clone(&calls),
    });
    let mut opts = runner_options();
    opts.batch_size = 10;
    let handle = ProjectionRunner::new(db.store.clone(), applier)
        .with_options(opts)
        .spawn();
    handle.wait_for(last, PATIENCE).await.expect("caught up");
    failures.store(1, Ordering::SeqCst);
    for i in 40..50 {
        last = db
            .store
            .append(
                &sid(&format!("Acc-{}", i % 4)),
                ExpectedVersion::Any,
                vec![ev(i)],
            )
            .await
            .expect("append")
            .positions[0];
    }
    handle.wait_for(last, PATIENCE).await.expect("live");
    let mut applier = handle.stop().await.expect("stop");
    assert_eq!(failures.load(Ordering::SeqCst), 0);
    assert!(
        calls.load(Ordering::SeqCst) >= 5 + 4,
        "failed batches were retried"
    );

    let mut expected: HashMap<String, (i64, i64)> = HashMap::new();
    let events = feed(&db.store, ReadAll::from_start()).await;
    for e in &events {
        let row = expected.entry(e.stream_id.to_string()).or_default();
        row.0 += e.data.to_value().expect("json")["n"].as_i64().unwrap_or(0);
        row.1 += 1;
    }
    assert_eq!(
        table(&raw).await,
        expected,
        "each event applied exactly once"
    );
    let checkpoint = annals::checkpoint_name("balances", 1);
    assert_eq!(
        db.store
            .load_checkpoint(&checkpoint)
            .await
            .expect("checkpoint"),
        Some(last)
    );

    // The last batch again (as after a lost COMMIT reply): skipped.
    use annals::BatchApplier;
    let before = calls.load(Ordering::SeqCst);
    let ctx = BatchContext {
        checkpoint,
        after: GlobalPosition::START,
        position: last,
        replaying: false,
        attempt: 2,
        tables: Default::default(),
    };
    applier
        .apply(&events[events.len() - 1..], &ctx)
        .await
        .expect("apply again");
    assert_eq!(calls.load(Ordering::SeqCst), before, "not applied again");
    assert_eq!(table(&raw).await, expected);
    db.cleanup().await;
}

async fn table(raw: &tokio_postgres::Client) -> HashMap<String, (i64, i64)> {
    raw.query("SELECT stream, total, events FROM balances", &[])
        .await
        .expect("read model")
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                (r.get::<_, i64>(1), r.get::<_, i64>(2)),
            )
        })
        .collect()
}

/// Two runners of one transactional projection at once: batches apply in
/// turn under the checkpoint's row lock, a runner whose batch no longer
/// starts at the checkpoint stops instead of applying it, and the table
/// ends with each event applied once.
#[tokio::test]
async fn issue8_two_transactional_runners_never_apply_twice() {
    let Some(db) = TestDb::new("issue8_two_transactional_runners_never_apply_twice").await else {
        return;
    };
    let raw = db.raw().await;
    raw.batch_execute(
        "CREATE TABLE balances (stream text PRIMARY KEY, total bigint NOT NULL, events bigint NOT NULL)",
    )
    .await
    .expect("create the read model");
    let mut last = GlobalPosition::START;
    for i in 0..200 {
        last = db
            .store
            .append(
                &sid(&format!("Acc-{}", i % 4)),
                ExpectedVersion::Any,
                vec![ev(i)],
            )
            .await
            .expect("append")
            .positions[0];
    }
    let runner = |batch: usize| {
        let mut opts = runner_options();
        opts.batch_size = batch;
        ProjectionRunner::new(
            db.store.clone(),
            db.store.transactional(Balances {
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
    annals::wait_for(&db.store, &checkpoint, last, PATIENCE)
        .await
        .expect("one of them reaches the end");
    for handle in [a, b] {
        if let Err(e) = handle.stop().await {
            assert!(e.to_string().contains("another runner"), "{e}");
        }
    }
    let row = raw
        .query_one(
            "SELECT sum(total)::bigint, sum(events)::bigint FROM balances",
            &[],
        )
        .await
        .expect("sums");
    assert_eq!(row.get::<_, i64>(1), 200, "each event applied once");
    assert_eq!(row.get::<_, i64>(0), (0..200).sum::<i64>());
    db.cleanup().await;
}
