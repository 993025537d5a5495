//! Issue 7: PostgreSQL under pressure. Followers waiting at the tail hold no
//! connection, a busy pool answers `Unavailable` instead of hanging, and
//! connections killed under the store are replaced.

use std::collections::HashSet;
use std::time::Duration;

use annals::{
    CheckpointStore, Error, EventId, EventStore, ExpectedVersion, GlobalPosition, NewEvent,
    ReadAll, ReadStream, RecordedEvent, StreamId, StreamVersion,
};
use futures::TryStreamExt;
use serde_json::json;
use uuid::Uuid;

use crate::common::{feed, raw_append, wait_until, IdleTransaction, TestDb, HANG};

fn sid(s: &str) -> StreamId {
    StreamId::parse(s).expect("stream id")
}

fn ev(n: u64) -> NewEvent {
    NewEvent::new("E", json!({ "n": n }))
}

/// The text of the horizon watch's query (see `src/horizon.rs`).
const WATCH_SQL: &str = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint";

/// Waits until the store's horizon watch runs, which it only does while a
/// reader waits for the horizon.
async fn wait_for_the_watch(db: &TestDb, probe: &tokio_postgres::Client) {
    wait_until("the store to watch the horizon", || async {
        probe
            .query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = $1 AND query = $2 \
                 LIMIT 1",
                &[&db.app, &WATCH_SQL],
            )
            .await
            .expect("pg_stat_activity")
            .is_some()
    })
    .await;
}

/// Reads the feed from the start, from its last position each time, until
/// it has `total` events.
async fn follow(store: annals_postgres::PgEventStore, total: usize) -> Vec<RecordedEvent> {
    let mut seen: Vec<RecordedEvent> = Vec::new();
    let mut after = GlobalPosition::START;
    while seen.len() < total {
        let page = feed(&store, ReadAll::after(after)).await;
        if let Some(last) = page.last() {
            after = last.global_position;
        }
        seen.extend(page);
    }
    seen
}

/// An idle-in-transaction session in another database of the cluster
/// holds the horizon back; 32 followers wait at the tail (for up to 30 s
/// each) while 8 writers append. Every append completes (before the
/// session ends), and once it ends every follower has every event exactly
/// once, in order.
///
/// Before issue 7 each waiting follower held a pooled connection for its
/// whole wait and the pool waited for ever: the writers starved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue7_followers_at_the_tail_do_not_starve_writers() {
    const FOLLOWERS: usize = 32;
    const WRITERS: u64 = 8;
    const APPENDS: u64 = 10;
    /// Far above what an append takes, and above the pool's wait timeout,
    /// so that a starved append shows as a failure, not a hang.
    const APPEND_GUARD: Duration = Duration::from_secs(20);
    let Some(db) =
        TestDb::with_options("issue7_followers_at_the_tail_do_not_starve_writers", |o| {
            o.pool_size = 8;
            o.pool_wait_timeout = Duration::from_secs(10);
        })
        .await
    else {
        return;
    };
    let store = db.store.clone();
    let probe = db.raw().await;

    let idle = IdleTransaction::begin(&db.url).await;
    // An event the followers find held back, so that they wait at once.
    let mut written: Vec<EventId> = Vec::new();
    let warm = ev(0);
    written.push(warm.event_id);
    store
        .append(&sid("Warm-1"), ExpectedVersion::NoStream, vec![warm])
        .await
        .expect("append");
    let total = 1 + (WRITERS * APPENDS) as usize;
    let followers: Vec<_> = (0..FOLLOWERS)
        .map(|_| tokio::spawn(follow(store.clone(), total)))
        .collect();
    wait_for_the_watch(&db, &probe).await;

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let stream = sid(&format!("Writer-{w}"));
                let mut ids = Vec::new();
                for i in 0..APPENDS {
                    let event = ev(1000 * (w + 1) + i);
                    ids.push(event.event_id);
                    let append = store.append(&stream, ExpectedVersion::Any, vec![event]);
                    match tokio::time::timeout(APPEND_GUARD, append).await {
                        Ok(Ok(done)) => assert_eq!(done.first_version, StreamVersion(i + 1)),
                        Ok(Err(e)) => panic!("append {i} of writer {w} failed: {e}"),
                        Err(_) => panic!(
                            "append {i} of writer {w} still waits after {APPEND_GUARD:?}: \
                             the followers starve the writers"
                        ),
                    }
                }
                ids
            })
        })
        .collect();
    for w in writers {
        written.extend(w.await.expect("writer"));
    }
    // The writers finished while the session still held the horizon.
    let state: Option<String> = probe
        .query_opt(
            "SELECT state FROM pg_stat_activity WHERE pid = $1",
            &[&idle.pid()],
        )
        .await
        .expect("pg_stat_activity")
        .map(|r| r.get(0));
    assert_eq!(state.as_deref(), Some("idle in transaction"));
    idle.end().await;

    let expected: HashSet<EventId> = written.iter().copied().collect();
    assert_eq!(expected.len(), total);
    let full: Vec<EventId> = feed(&store, ReadAll::from_start())
        .await
        .iter()
        .map(|e| e.event_id)
        .collect();
    for (n, follower) in followers.into_iter().enumerate() {
        let seen = tokio::time::timeout(HANG, follower)
            .await
            .expect("follower finished")
            .expect("follower");
        let ids: Vec<EventId> = seen.iter().map(|e| e.event_id).collect();
        assert_eq!(ids.len(), total, "follower {n} saw an event twice");
        assert_eq!(
            ids.iter().copied().collect::<HashSet<_>>(),
            expected,
            "follower {n} missed events"
        );
        assert!(
            seen.windows(2)
                .all(|w| w[0].global_position < w[1].global_position),
            "follower {n}: positions not increasing"
        );
        assert_eq!(ids, full, "follower {n}: not in feed order");
    }
    db.cleanup().await;
}

/// Every connection is busy (the pool's only one waits on a lock): a call
/// gives up after the pool's wait timeout with `Error::Unavailable` naming
/// what it waited for, and works again once the connection is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue7_a_busy_pool_answers_unavailable() {
    let wait = Duration::from_millis(300);
    let Some(db) = TestDb::with_options("issue7_a_busy_pool_answers_unavailable", |o| {
        o.pool_size = 1;
        o.pool_wait_timeout = wait;
    })
    .await
    else {
        return;
    };
    let raw = db.raw().await;
    raw.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(
        raw_append(&raw, "Busy-1", Uuid::now_v7(), json!({})).await,
        0
    );
    let blocked = {
        let store = db.store.clone();
        tokio::spawn(async move {
            store
                .append(&sid("Busy-1"), ExpectedVersion::Any, vec![ev(1)])
                .await
        })
    };
    db.wait_for_lock_wait(&[]).await;

    let err = db
        .store
        .stream_version(&sid("Other-1"))
        .await
        .expect_err("no connection is free");
    match &err {
        Error::Unavailable { what, after } => {
            assert_eq!(*after, wait);
            assert!(what.contains("read a stream version"), "{what}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(!err.is_conflict());
    let err = db
        .store
        .read_all(ReadAll::from_start())
        .try_collect::<Vec<_>>()
        .await
        .expect_err("no connection is free");
    assert!(
        matches!(&err, Error::Unavailable { what, .. } if what.contains("read all events")),
        "{err:?}"
    );
    let err = db
        .store
        .append(&sid("Other-1"), ExpectedVersion::NoStream, vec![ev(2)])
        .await
        .expect_err("no connection is free");
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");

    raw.batch_execute("COMMIT").await.expect("commit");
    let done = blocked.await.expect("task").expect("append");
    assert_eq!(done.first_version, StreamVersion(2));
    assert_eq!(
        db.store
            .stream_version(&sid("Other-1"))
            .await
            .expect("free again"),
        None,
        "the refused append wrote nothing"
    );
    db.cleanup().await;
}

/// Every connection of the pool is terminated by the server while idle:
/// each kind of call works on fresh connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue7_killed_connections_are_discarded() {
    let Some(db) = TestDb::new("issue7_killed_connections_are_discarded").await else {
        return;
    };
    let s = sid("Kill-1");
    db.store
        .append(&s, ExpectedVersion::NoStream, vec![ev(1), ev(2)])
        .await
        .expect("append");
    // Open a few connections at once.
    let reads = (0..4).map(|_| db.store.read_stream_to_vec(&s, ReadStream::forward()));
    for read in futures::future::join_all(reads).await {
        assert_eq!(read.expect("read").len(), 2);
    }
    let raw = db.raw().await;
    let killed = db.backends(&raw).await;
    assert!(!killed.is_empty());
    db.kill(&raw, &killed).await;

    let done = db
        .store
        .append(&s, ExpectedVersion::Exact(StreamVersion(2)), vec![ev(3)])
        .await
        .expect("append after the kill");
    assert_eq!(done.first_version, StreamVersion(3));
    db.kill(&raw, &db.backends(&raw).await).await;
    let read = db
        .store
        .read_stream_to_vec(&s, ReadStream::forward())
        .await
        .expect("read_stream after the kill");
    assert_eq!(read.len(), 3);
    db.kill(&raw, &db.backends(&raw).await).await;
    let all = db
        .store
        .read_all(ReadAll::from_start())
        .try_collect::<Vec<_>>()
        .await
        .expect("read_all after the kill");
    assert_eq!(all, read);
    db.kill(&raw, &db.backends(&raw).await).await;
    assert_eq!(
        db.store.head_position().await.expect("head after the kill"),
        Some(read[2].global_position)
    );
    db.kill(&raw, &db.backends(&raw).await).await;
    assert_eq!(
        db.store.stream_version(&s).await.expect("version"),
        Some(StreamVersion(3))
    );
    db.kill(&raw, &db.backends(&raw).await).await;
    db.store
        .save_checkpoint("p", read[1].global_position)
        .await
        .expect("save a checkpoint after the kill");
    db.kill(&raw, &db.backends(&raw).await).await;
    assert_eq!(
        db.store.load_checkpoint("p").await.expect("load"),
        Some(read[1].global_position)
    );
    let now = db.backends(&raw).await;
    assert!(now.iter().all(|pid| !killed.contains(pid)));
    db.cleanup().await;
}

/// The server terminates the connection of an append while it waits for
/// the stream lock: the append runs again on a fresh connection (nothing
/// was written by the first attempt) and succeeds once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue7_connection_killed_during_an_append_is_replaced() {
    let Some(db) = TestDb::new("issue7_connection_killed_during_an_append_is_replaced").await
    else {
        return;
    };
    let raw = db.raw().await;
    raw.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(
        raw_append(&raw, "Kill-1", Uuid::now_v7(), json!({})).await,
        0
    );
    let event = ev(2);
    let id = event.event_id;
    let append = {
        let store = db.store.clone();
        tokio::spawn(async move {
            store
                .append(&sid("Kill-1"), ExpectedVersion::Any, vec![event])
                .await
        })
    };
    let first = db.wait_for_lock_wait(&[]).await;
    let admin = db.raw().await;
    db.kill(&admin, &[first]).await;
    // The append is back, on another connection, waiting for the lock.
    let second = db.wait_for_lock_wait(&[first]).await;
    assert_ne!(first, second);
    raw.batch_execute("COMMIT").await.expect("commit");
    let done = append
        .await
        .expect("task")
        .expect("append after its connection was killed");
    assert_eq!(done.first_version, StreamVersion(2));
    assert!(!done.deduplicated);
    let read = db
        .store
        .read_stream_to_vec(&sid("Kill-1"), ReadStream::forward())
        .await
        .expect("read");
    assert_eq!(read.len(), 2);
    assert_eq!(read[1].event_id, id);
    db.cleanup().await;
}

/// The server terminates the connection of a stream read and of a feed
/// read while they wait for a table lock: both run again on fresh
/// connections and deliver everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue7_connection_killed_during_a_read_is_replaced() {
    let Some(db) = TestDb::new("issue7_connection_killed_during_a_read_is_replaced").await else {
        return;
    };
    let s = sid("Kill-1");
    db.store
        .append(&s, ExpectedVersion::NoStream, vec![ev(1), ev(2), ev(3)])
        .await
        .expect("append");
    let admin = db.raw().await;
    for read_all in [false, true] {
        let raw = db.raw().await;
        raw.batch_execute("BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            .await
            .expect("lock");
        let read = {
            let store = db.store.clone();
            let s = s.clone();
            tokio::spawn(async move {
                if read_all {
                    store
                        .read_all(ReadAll::from_start())
                        .try_collect::<Vec<_>>()
                        .await
                } else {
                    store.read_stream_to_vec(&s, ReadStream::forward()).await
                }
            })
        };
        let first = db.wait_for_lock_wait(&[]).await;
        db.kill(&admin, &[first]).await;
        db.wait_for_lock_wait(&[first]).await;
        raw.batch_execute("ROLLBACK").await.expect("rollback");
        let got = read
            .await
            .expect("task")
            .unwrap_or_else(|e| panic!("read (read_all: {read_all}) after the kill: {e}"));
        assert_eq!(
            got.iter().map(|e| e.stream_version.0).collect::<Vec<_>>(),
            [1, 2, 3]
        );
    }
    db.cleanup().await;
}
