//! The projection lock across two store handles on one file (as two
//! processes) and an exactly-once rebuild that fails mid-way and resumes,
//! on SQLite.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use annals::{
    checkpoint_name, lock_owner, lock_token, BatchContext, CheckpointStore, EventStore,
    ExpectedVersion, GlobalPosition, HandlerError, LockAttempt, ProjectionControl, ProjectionError,
    ProjectionRunner, ReadAll, RebuildOptions, RecordedEvent,
};
use annals_sqlite::{SqliteEventStore, SqliteProjection};
use futures::TryStreamExt;

use crate::{ev, fresh_store, raw, sid};

const PATIENCE: Duration = Duration::from_secs(30);

/// Each event recorded once by id (a second application violates the
/// primary key); fails on the event at `fail_at` while `broken` is set.
struct Applied {
    fail_at: Option<GlobalPosition>,
    broken: Arc<AtomicBool>,
}

impl SqliteProjection for Applied {
    fn name(&self) -> &str {
        "applied"
    }
    fn handle(
        &self,
        tx: &rusqlite::Transaction<'_>,
        events: &[RecordedEvent],
        _ctx: &BatchContext,
    ) -> Result<(), HandlerError> {
        for e in events {
            if Some(e.global_position) == self.fail_at && self.broken.load(Ordering::SeqCst) {
                return Err(format!("injected failure at {}", e.global_position).into());
            }
            let n = e.data.to_value()?["n"].as_i64().unwrap_or(0);
            tx.execute(
                "INSERT INTO applied (event_id, stream, n) VALUES (?1, ?2, ?3)",
                rusqlite::params![e.event_id.0.to_string(), e.stream_id.as_str(), n],
            )?;
        }
        Ok(())
    }
}

async fn setup(count: i64) -> (SqliteEventStore, rusqlite::Connection, GlobalPosition) {
    let store = fresh_store().await;
    let conn = raw(&store);
    conn.execute_batch(
        "CREATE TABLE applied (event_id TEXT PRIMARY KEY, stream TEXT NOT NULL, n INTEGER NOT NULL)",
    )
    .expect("create the read model");
    let mut last = GlobalPosition::START;
    for i in 0..count {
        last = store
            .append(
                &sid(&format!("Acc-{}", i % 5)),
                ExpectedVersion::Any,
                vec![ev("Deposited", i)],
            )
            .await
            .expect("append")
            .positions[0];
    }
    (store, conn, last)
}

/// A runner on one handle holds the projection: a runner and a rebuild on a
/// second handle on the same file are refused with the holder named; once
/// it stops, the second handle's runner starts. A lease that is not
/// renewed expires and is taken over, and its old holder can no longer
/// renew it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue8_lock_refuses_a_runner_on_another_handle() {
    let (store, _conn, last) = setup(30).await;
    let other = SqliteEventStore::open(store.path())
        .await
        .expect("second handle");
    let broken = Arc::new(AtomicBool::new(false));
    let projection = || Applied {
        fail_at: None,
        broken: Arc::clone(&broken),
    };
    let a = ProjectionRunner::new(store.clone(), store.transactional(projection())).spawn();
    a.wait_for(last, PATIENCE).await.expect("handle A runs");
    let b = ProjectionRunner::new(other.clone(), other.transactional(projection())).spawn();
    match b.join().await {
        Err(ProjectionError::Locked { owner, .. }) => assert_eq!(owner, lock_owner()),
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("handle B ran while handle A held the projection"),
    }
    let rebuild = ProjectionRunner::new(other.clone(), other.transactional(projection()))
        .rebuild(RebuildOptions::default(), |_| {})
        .await;
    assert!(matches!(rebuild, Err(ProjectionError::Locked { .. })));
    a.stop().await.expect("A stops");
    let b = ProjectionRunner::new(other.clone(), other.transactional(projection())).spawn();
    b.wait_for(last, PATIENCE).await.expect("handle B runs now");
    b.stop().await.expect("B stops");

    let cp = "lease@v1";
    let LockAttempt::Acquired(old) = store
        .acquire_projection_lock(cp, "process A", &lock_token(), Duration::from_millis(200))
        .await
        .expect("acquire")
    else {
        panic!("a free lock is acquired");
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let new = loop {
        match other
            .acquire_projection_lock(cp, "process B", &lock_token(), Duration::from_secs(30))
            .await
            .expect("acquire")
        {
            LockAttempt::Acquired(lock) => break lock,
            LockAttempt::Held(holder) => {
                assert_eq!(holder.owner, "process A");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the lease never expired"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(new.owner, "process B");
    assert_eq!(
        store
            .renew_projection_lock(&old, Duration::from_secs(30))
            .await
            .expect("renew"),
        None
    );
    store.release_projection_lock(&old).await.expect("release");
    assert_eq!(
        other
            .projection_lock(cp)
            .await
            .expect("lock")
            .map(|l| l.owner),
        Some("process B".to_owned())
    );
}

/// An exactly-once rebuild from position 0 fails (injected) mid-way, then
/// resumes from its checkpoint: every event is in the read model exactly
/// once (the primary key refuses a second application).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue8_transactional_rebuild_resumes_and_applies_each_event_once() {
    let (store, conn, last) = setup(120).await;
    let events: Vec<RecordedEvent> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("feed");
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
    let applier = || {
        store.transactional(Applied {
            fail_at: Some(fail_at),
            broken: Arc::clone(&broken),
        })
    };
    let err = ProjectionRunner::new(store.clone(), applier())
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
    assert_eq!(
        store.load_checkpoint(&cp).await.expect("cp"),
        Some(events[69].global_position)
    );
    let count: i64 = conn
        .query_row("SELECT count(*) FROM applied", [], |r| r.get(0))
        .expect("count");
    assert_eq!(count, 70);

    broken.store(false, Ordering::SeqCst);
    let mut reports = Vec::new();
    ProjectionRunner::new(store.clone(), applier())
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
    let (count, sum): (i64, i64) = conn
        .query_row("SELECT count(*), sum(n) FROM applied", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("sums");
    assert_eq!(count, 120, "each event applied exactly once");
    assert_eq!(sum, (0..120).sum::<i64>());
    assert_eq!(store.load_checkpoint(&cp).await.expect("cp"), Some(last));
}
