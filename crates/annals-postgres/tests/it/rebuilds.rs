//! The projection lock across machines (two store handles with their own
//! pools, as two machines) and an exactly-once rebuild that fails mid-way
//! and resumes, on PostgreSQL.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use annals::{
    checkpoint_name, lock_owner, lock_token, BatchContext, CheckpointStore, EventStore,
    ExpectedVersion, GlobalPosition, HandlerError, LockAttempt, ProjectionControl, ProjectionError,
    ProjectionRunner, ReadAll, RebuildOptions, RecordedEvent,
};
use annals_postgres::{PgEventStore, PgProjection};
use serde_json::json;

use crate::common::{feed, options, TestDb};

const PATIENCE: Duration = Duration::from_secs(60);

async fn second_machine(db: &TestDb) -> PgEventStore {
    PgEventStore::connect_with(&db.url, options(&db.schema))
        .await
        .expect("connect a second store")
}

/// Each event recorded once by id (a second application violates the
/// primary key) and summed per stream; fails on the event at `fail_at`
/// while `broken` is set.
struct Applied {
    fail_at: Option<GlobalPosition>,
    broken: Arc<AtomicBool>,
}

impl PgProjection for Applied {
    fn name(&self) -> &str {
        "applied"
    }
    async fn handle(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &[RecordedEvent],
        _ctx: &BatchContext,
    ) -> Result<(), HandlerError> {
        for e in events {
            if Some(e.global_position) == self.fail_at && self.broken.load(Ordering::SeqCst) {
                return Err(format!("injected failure at {}", e.global_position).into());
            }
            let n = e.data.to_value()?["n"].as_i64().unwrap_or(0);
            tx.execute(
                "INSERT INTO applied (event_id, stream, n) VALUES ($1, $2, $3)",
                &[&e.event_id.0, &e.stream_id.as_str(), &n],
            )
            .await?;
        }
        Ok(())
    }
}

async fn create_read_model(db: &TestDb) -> tokio_postgres::Client {
    let raw = db.raw().await;
    raw.batch_execute(
        "CREATE TABLE applied (event_id uuid PRIMARY KEY, stream text NOT NULL, n bigint NOT NULL)",
    )
    .await
    .expect("create the read model");
    raw
}

async fn append_some(store: &PgEventStore, count: i64) -> GlobalPosition {
    let mut last = GlobalPosition::START;
    for i in 0..count {
        last = store
            .append(
                &annals::StreamId::parse(&format!("Acc-{}", i % 5)).expect("sid"),
                ExpectedVersion::Any,
                vec![annals::NewEvent::new("Deposited", json!({ "n": i }))],
            )
            .await
            .expect("append")
            .positions[0];
    }
    last
}

/// A runner on one machine holds the projection: a runner and a rebuild on
/// another machine are refused with the holder named; once it stops, the
/// other machine's runner starts. A lease that is not renewed expires and
/// is taken over, and its old holder can no longer renew it.
#[tokio::test]
async fn issue8_lock_refuses_a_runner_on_another_machine() {
    let Some(db) = TestDb::new("issue8_lock_refuses_a_runner_on_another_machine").await else {
        return;
    };
    let _raw = create_read_model(&db).await;
    let last = append_some(&db.store, 30).await;
    let other = second_machine(&db).await;
    let broken = Arc::new(AtomicBool::new(false));
    let projection = || Applied {
        fail_at: None,
        broken: Arc::clone(&broken),
    };
    let a = ProjectionRunner::new(db.store.clone(), db.store.transactional(projection())).spawn();
    a.wait_for(last, PATIENCE).await.expect("machine A runs");

    let b = ProjectionRunner::new(other.clone(), other.transactional(projection())).spawn();
    match b.join().await {
        Err(ProjectionError::Locked { owner, .. }) => assert_eq!(owner, lock_owner()),
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("machine B ran while machine A held the projection"),
    }
    let rebuild = ProjectionRunner::new(other.clone(), other.transactional(projection()))
        .rebuild(RebuildOptions::default(), |_| {})
        .await;
    assert!(matches!(rebuild, Err(ProjectionError::Locked { .. })));

    a.stop().await.expect("A stops");
    let b = ProjectionRunner::new(other.clone(), other.transactional(projection())).spawn();
    b.wait_for(last, PATIENCE)
        .await
        .expect("machine B runs now");
    b.stop().await.expect("B stops");

    // Expiry and takeover, on the database's clock.
    let cp = "lease@v1";
    let LockAttempt::Acquired(old) = db
        .store
        .acquire_projection_lock(cp, "machine A", &lock_token(), Duration::from_millis(200))
        .await
        .expect("acquire")
    else {
        panic!("a free lock is acquired");
    };
    let LockAttempt::Held(holder) = other
        .acquire_projection_lock(cp, "machine B", &lock_token(), Duration::from_secs(30))
        .await
        .expect("acquire")
    else {
        panic!("a live lease is not taken over");
    };
    assert_eq!(holder.owner, "machine A");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let new = loop {
        match other
            .acquire_projection_lock(cp, "machine B", &lock_token(), Duration::from_secs(30))
            .await
            .expect("acquire")
        {
            LockAttempt::Acquired(lock) => break lock,
            LockAttempt::Held(_) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the lease never expired"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(new.owner, "machine B");
    assert_eq!(
        db.store
            .renew_projection_lock(&old, Duration::from_secs(30))
            .await
            .expect("renew"),
        None,
        "the expired holder cannot renew"
    );
    db.store
        .release_projection_lock(&old)
        .await
        .expect("release");
    assert_eq!(
        other
            .projection_lock(cp)
            .await
            .expect("lock")
            .map(|l| l.owner),
        Some("machine B".to_owned()),
        "the old holder's release leaves the new holder's lease"
    );
    db.cleanup().await;
}

/// An exactly-once rebuild from position 0 fails (injected) mid-way, then
/// resumes from its checkpoint: every event is in the read model exactly
/// once (the primary key refuses a second application), and the
/// checkpoint is at the head.
#[tokio::test]
async fn issue8_transactional_rebuild_resumes_and_applies_each_event_once() {
    let Some(db) =
        TestDb::new("issue8_transactional_rebuild_resumes_and_applies_each_event_once").await
    else {
        return;
    };
    let raw = create_read_model(&db).await;
    let last = append_some(&db.store, 120).await;
    let events = feed(&db.store, ReadAll::from_start()).await;
    let fail_at = events[70].global_position;
    let broken = Arc::new(AtomicBool::new(true));
    let options = RebuildOptions {
        batch_size: 8,
        checkpoint_every: 25,
        from_start: true,
    };
    let quick = annals::RunnerOptions {
        handler_retry: annals::Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(2),
            max_attempts: 2,
        },
        ..annals::RunnerOptions::default()
    };
    let err = ProjectionRunner::new(
        db.store.clone(),
        db.store.transactional(Applied {
            fail_at: Some(fail_at),
            broken: Arc::clone(&broken),
        }),
    )
    .with_options(quick.clone())
    .rebuild(options, |_| {})
    .await
    .err()
    .expect("the injected failure stops the rebuild");
    assert!(
        matches!(err, ProjectionError::Handler { position, .. } if position == fail_at),
        "{err}"
    );
    let cp = checkpoint_name("applied", 1);
    let stopped = db
        .store
        .load_checkpoint(&cp)
        .await
        .expect("cp")
        .expect("some");
    assert_eq!(stopped, events[69].global_position);
    let count: i64 = raw
        .query_one("SELECT count(*) FROM applied", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 70, "the events before the failure, once each");

    broken.store(false, Ordering::SeqCst);
    let mut reports = Vec::new();
    ProjectionRunner::new(
        db.store.clone(),
        db.store.transactional(Applied {
            fail_at: Some(fail_at),
            broken: Arc::clone(&broken),
        }),
    )
    .with_options(quick)
    .rebuild(
        RebuildOptions {
            from_start: false,
            ..options
        },
        |p| reports.push(*p),
    )
    .await
    .expect("the resumed rebuild completes");
    assert_eq!(reports.last().map(|p| p.position), Some(last));
    assert_eq!(reports.last().map(|p| p.remaining), Some(0));
    let row = raw
        .query_one("SELECT count(*), sum(n)::bigint FROM applied", &[])
        .await
        .expect("sums");
    assert_eq!(row.get::<_, i64>(0), 120, "each event applied exactly once");
    assert_eq!(row.get::<_, i64>(1), (0..120).sum::<i64>());
    assert_eq!(db.store.load_checkpoint(&cp).await.expect("cp"), Some(last));
    db.cleanup().await;
}
