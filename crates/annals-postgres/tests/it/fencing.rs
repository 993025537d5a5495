//! Fencing (issue 8): a transactional applier whose lease was taken over
//! commits nothing, whether it runs under the projection lock or under a
//! partition lease; and the partition leases themselves (claims raise the
//! fencing token, renewals and releases name it, the worker count).

use std::time::Duration;

use annals::{
    BatchApplier, BatchContext, CheckpointStore, Error, EventStore, ExpectedVersion, Fence,
    GlobalPosition, HandlerError, LockAttempt, NewEvent, PartitionLeases, PartitionOptions,
    PartitionedRunner, ProjectionControl, RecordedEvent, StreamId,
};
use annals_postgres::{PgEventStore, PgProjection};
use serde_json::json;

use crate::common::TestDb;

struct Totals;

impl PgProjection for Totals {
    fn name(&self) -> &str {
        "totals"
    }
    async fn handle(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &[RecordedEvent],
        _ctx: &BatchContext,
    ) -> Result<(), HandlerError> {
        for e in events {
            let n = e.data.to_value()?["n"].as_i64().unwrap_or(0);
            tx.execute(
                "INSERT INTO totals (stream, total) VALUES ($1, $2) \
                 ON CONFLICT (stream) DO UPDATE SET total = totals.total + excluded.total",
                &[&e.stream_id.as_str(), &n],
            )
            .await?;
        }
        Ok(())
    }
}

async fn setup(db: &TestDb, events: i64) -> Vec<RecordedEvent> {
    db.raw()
        .await
        .batch_execute("CREATE TABLE totals (stream text PRIMARY KEY, total bigint NOT NULL)")
        .await
        .expect("create the read model");
    for i in 0..events {
        db.store
            .append(
                &StreamId::parse(&format!("Acc-{}", i % 5)).expect("id"),
                ExpectedVersion::Any,
                vec![NewEvent::new("Deposited", json!({ "n": i + 1 }))],
            )
            .await
            .expect("append");
    }
    crate::common::feed(&db.store, annals::ReadAll::from_start()).await
}

async fn rows(db: &TestDb) -> i64 {
    db.raw()
        .await
        .query_one("SELECT count(*) FROM totals", &[])
        .await
        .expect("count")
        .get(0)
}

/// The sum of every stream's total in the read model.
async fn total(db: &TestDb) -> i64 {
    db.raw()
        .await
        .query_one("SELECT sum(total)::bigint FROM totals", &[])
        .await
        .expect("sum")
        .get(0)
}

fn ctx(checkpoint: &str, after: GlobalPosition, events: &[RecordedEvent]) -> BatchContext {
    BatchContext {
        checkpoint: checkpoint.to_owned(),
        after,
        position: events.last().expect("events").global_position,
        replaying: false,
        attempt: 1,
        tables: Default::default(),
    }
}

/// A runner paused past its projection lock's lease, whose lock another
/// runner took: its next batch fails with `Error::Fenced` and writes
/// neither rows nor checkpoint.
#[tokio::test]
async fn issue8_a_runner_whose_lock_was_taken_over_commits_nothing() {
    let Some(db) = TestDb::new("issue8_a_runner_whose_lock_was_taken_over_commits_nothing").await
    else {
        return;
    };
    let events = setup(&db, 6).await;
    let cp = annals::checkpoint_name("totals", 1);
    let ttl = Duration::from_millis(200);
    let LockAttempt::Acquired(old) = db
        .store
        .acquire_projection_lock(&cp, "old", "token-old", ttl)
        .await
        .expect("lock")
    else {
        panic!("free lock")
    };
    let mut applier = db.store.transactional(Totals);
    applier.set_fence(Some(Fence::Lock {
        lock: cp.clone(),
        token: old.token.clone(),
        ttl,
    }));
    // Under its lease: applied.
    applier
        .apply(&events[..2], &ctx(&cp, GlobalPosition::START, &events[..2]))
        .await
        .expect("first batch");
    let at = events[1].global_position;
    // Past its lease: another runner takes the lock over (waiting on the
    // database's clock, not on a timer).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never expired"
        );
        match db
            .store
            .acquire_projection_lock(&cp, "new", "token-new", Duration::from_secs(60))
            .await
            .expect("lock")
        {
            LockAttempt::Acquired(_) => break,
            LockAttempt::Held(_) => tokio::task::yield_now().await,
        }
    }
    // The old runner wakes up and tries its next batch: fenced, nothing
    // written, although the checkpoint is exactly where its batch starts.
    let err = applier
        .apply(&events[2..4], &ctx(&cp, at, &events[2..4]))
        .await
        .expect_err("fenced");
    match err {
        annals::ApplyError::Store(Error::Fenced { lease, detail }) => {
            assert_eq!(lease, cp);
            assert!(detail.contains("token-new"), "{detail}");
        }
        other => panic!("expected Fenced, got {other}"),
    }
    assert_eq!(db.store.load_checkpoint(&cp).await.expect("cp"), Some(at));
    assert_eq!(total(&db).await, 1 + 2, "only the first batch's rows");
    db.cleanup().await;
}

/// Partition leases: a claim raises the fencing token, a renewal or a
/// commit under the old token fails once the partition was taken over, a
/// release lets the next claim in at once, and the worker count follows
/// heartbeats.
#[tokio::test]
async fn issue8_partition_leases_fence_a_worker_that_was_taken_over() {
    let Some(db) = TestDb::new("issue8_partition_leases_fence_a_worker_that_was_taken_over").await
    else {
        return;
    };
    let events = setup(&db, 8).await;
    let group = annals::checkpoint_name("totals", 1);
    let short = Duration::from_millis(200);
    let long = Duration::from_secs(60);
    assert_eq!(
        db.store
            .join_partitions(&group, 2, "w1", long)
            .await
            .expect("join"),
        1
    );
    assert_eq!(
        db.store
            .join_partitions(&group, 2, "w2", long)
            .await
            .expect("join"),
        2
    );
    let err = db
        .store
        .join_partitions(&group, 3, "w3", long)
        .await
        .expect_err("another count");
    assert!(matches!(err, Error::Config(_)), "{err}");

    let first = db
        .store
        .claim_partition(&group, 0, 2, "w1", short)
        .await
        .expect("claim")
        .expect("free");
    assert_eq!(first.fence, 1);
    assert!(db
        .store
        .claim_partition(&group, 0, 2, "w2", long)
        .await
        .expect("claim")
        .is_none());

    // w1 applies the partition's first events under its lease.
    let p0: Vec<RecordedEvent> = events
        .iter()
        .filter(|e| annals::partition_of(&e.stream_id, 2) == 0)
        .cloned()
        .collect();
    assert!(p0.len() >= 2, "the hash puts events in partition 0");
    let pcp = annals::partition_checkpoint(&group, 0, 2);
    let mut old = db.store.transactional(Totals);
    old.set_fence(Some(Fence::Partition {
        lease: first.clone(),
        ttl: short,
    }));
    old.apply(&p0[..1], &ctx(&pcp, GlobalPosition::START, &p0[..1]))
        .await
        .expect("under the lease");

    // w1 pauses past its lease; w2 takes partition 0 over.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let second = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never expired"
        );
        if let Some(l) = db
            .store
            .claim_partition(&group, 0, 2, "w2", long)
            .await
            .expect("claim")
        {
            break l;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(second.fence, 2, "the fencing token only grows");
    assert!(db
        .store
        .renew_partition(&first, long)
        .await
        .expect("renew")
        .is_none());
    let before = rows(&db).await;
    let at = p0[0].global_position;
    let err = old
        .apply(&p0[1..2], &ctx(&pcp, at, &p0[1..2]))
        .await
        .expect_err("fenced");
    assert!(
        matches!(&err, annals::ApplyError::Store(Error::Fenced { detail, .. })
            if detail.contains("fencing token 2 held by w2")),
        "{err}"
    );
    assert_eq!(rows(&db).await, before, "no read-model row");
    assert_eq!(db.store.load_checkpoint(&pcp).await.expect("cp"), Some(at));
    // Releasing with the old token changes nothing; with the new one the
    // next claim gets it at once, with token 3.
    db.store.release_partition(&first).await.expect("release");
    assert!(db
        .store
        .claim_partition(&group, 0, 2, "w1", long)
        .await
        .expect("claim")
        .is_none());
    db.store.release_partition(&second).await.expect("release");
    let third = db
        .store
        .claim_partition(&group, 0, 2, "w1", long)
        .await
        .expect("claim")
        .expect("released");
    assert_eq!(third.fence, 3);
    let holders = db.store.partition_holders(&group).await.expect("holders");
    assert_eq!(holders.len(), 2);
    assert_eq!(holders[0].owner.as_deref(), Some("w1"));
    assert!(holders[0].live);
    assert!(!holders[1].live);
    db.store
        .leave_partitions(&group, "w2")
        .await
        .expect("leave");
    assert_eq!(
        db.store
            .join_partitions(&group, 2, "w1", long)
            .await
            .expect("join"),
        1
    );
    db.cleanup().await;
}

/// Two in-process workers share four partitions through leases and the
/// read model equals the fold; when one stops, the other takes its
/// partitions over.
#[tokio::test]
async fn issue8_two_leased_workers_share_the_partitions() {
    let Some(db) = TestDb::new("issue8_two_leased_workers_share_the_partitions").await else {
        return;
    };
    let events = setup(&db, 60).await;
    let second = PgEventStore::connect_with(&db.url, crate::common::options(&db.schema))
        .await
        .expect("second handle");
    let options = PartitionOptions {
        partitions: 4,
        lease_ttl: Duration::from_millis(600),
        ..PartitionOptions::default()
    };
    let worker = |store: PgEventStore| {
        let s = store.clone();
        PartitionedRunner::new(store, move || s.transactional(Totals), options.clone())
            .spawn_leased()
    };
    let a = worker(db.store.clone());
    let b = worker(second);
    let patience = Duration::from_secs(60);
    assert!(a
        .wait_view(patience, |v| v.owned.len() == 2)
        .await
        .is_some());
    assert!(b
        .wait_view(patience, |v| v.owned.len() == 2)
        .await
        .is_some());
    let last = events.last().expect("events").global_position;
    let group = annals::checkpoint_name("totals", 1);
    annals::wait_for_partitions(&db.store, &group, 4, last, patience)
        .await
        .expect("caught up");
    a.stop().await.expect("stop a");
    assert!(b
        .wait_view(patience, |v| v.owned.len() == 4)
        .await
        .is_some());
    let more = db
        .store
        .append(
            &StreamId::parse("Acc-9").expect("id"),
            ExpectedVersion::Any,
            vec![NewEvent::new("Deposited", json!({ "n": 1000 }))],
        )
        .await
        .expect("append")
        .positions[0];
    annals::wait_for_partitions(&db.store, &group, 4, more, patience)
        .await
        .expect("caught up");
    b.stop().await.expect("stop b");
    assert_eq!(
        total(&db).await,
        (1..=60).sum::<i64>() + 1000,
        "each event once"
    );
    let lags = annals::partition_lags(&db.store, "totals", 1, 4)
        .await
        .expect("lags");
    assert!(lags.iter().all(|l| l.lag.events == 0), "{lags:?}");
    db.cleanup().await;
}

/// A plain runner, an in-place rebuild and a local partitioned runner of a
/// projection version whose leased workers are live do not start: they
/// would write the same read model under another checkpoint (`name@vN`
/// instead of the partitions'), applying every event twice. Each takes the
/// lock, finds the live registrations, gives the lock back and fails with
/// `ProjectionError::PartitionedWorkers`. A worker that stops
/// unregisters.
#[tokio::test]
async fn a_plain_runner_does_not_start_beside_leased_workers() {
    use annals::{ProjectionError, ProjectionRunner, RebuildOptions, RunnerOptions};
    let Some(db) = TestDb::new("a_plain_runner_does_not_start_beside_leased_workers").await else {
        return;
    };
    let events = setup(&db, 20).await;
    let runner = RunnerOptions {
        poll_interval: Duration::from_millis(20),
        ..RunnerOptions::default()
    };
    let options = PartitionOptions {
        partitions: 2,
        lease_ttl: Duration::from_secs(30),
        runner: runner.clone(),
    };
    let s = db.store.clone();
    let worker = PartitionedRunner::new(
        db.store.clone(),
        move || s.transactional(Totals),
        options.clone(),
    )
    .spawn_leased();
    let last = events.last().expect("events").global_position;
    let group = annals::checkpoint_name("totals", 1);
    let patience = Duration::from_secs(60);
    annals::wait_for_partitions(&db.store, &group, 2, last, patience)
        .await
        .expect("partitions caught up");
    let fold: i64 = (1..=20).sum();
    assert_eq!(total(&db).await, fold);
    let refused = |e: Option<ProjectionError>, what: &str| match e {
        Some(ProjectionError::PartitionedWorkers {
            checkpoint,
            workers,
            ..
        }) => {
            assert_eq!(checkpoint, group, "{what}");
            assert_eq!(workers, 1, "{what}");
        }
        other => panic!("{what}: expected PartitionedWorkers, got {other:?}"),
    };
    let plain = ProjectionRunner::new(db.store.clone(), db.store.transactional(Totals))
        .with_options(runner.clone())
        .spawn();
    refused(plain.join().await.err(), "plain runner");
    let rebuild = ProjectionRunner::new(db.store.clone(), db.store.transactional(Totals))
        .with_options(runner.clone())
        .rebuild(RebuildOptions::default(), |_| {})
        .await;
    refused(rebuild.err(), "in-place rebuild");
    let s = db.store.clone();
    let local = PartitionedRunner::new(db.store.clone(), move || s.transactional(Totals), options)
        .spawn_local();
    refused(local.join().await.err(), "local partitioned runner");
    // None of them wrote or took the lock for good.
    assert_eq!(total(&db).await, fold, "each event applied once");
    assert_eq!(db.store.load_checkpoint(&group).await.expect("cp"), None);
    // A worker that stops unregisters: nothing is left to refuse a plain
    // runner (which would then start from its own checkpoint: moving a read
    // model from partitions to one runner takes a rebuild).
    assert_eq!(
        db.store
            .live_partition_workers(&group)
            .await
            .expect("count"),
        1
    );
    worker.stop().await.expect("stop the worker");
    assert_eq!(
        db.store
            .live_partition_workers(&group)
            .await
            .expect("count"),
        0
    );
    db.cleanup().await;
}
