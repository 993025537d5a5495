//! The global order: the snapshot horizon holds back events that an older,
//! still-running transaction could precede, and each stream's versions stay
//! in feed order.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use annals::{
    EventId, EventStore, ExpectedVersion, GlobalPosition, NewEvent, ReadAll, RecordedEvent,
    StreamId,
};
use serde_json::json;
use uuid::Uuid;

use crate::common::{feed, raw_append, wait_until, TestDb};

fn sid(s: &str) -> StreamId {
    StreamId::parse(s).expect("stream id")
}

fn ev(n: u64) -> NewEvent {
    NewEvent::new("E", json!({ "n": n }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_transaction_holds_back_read_all() {
    let Some(db) = TestDb::new("open_transaction_holds_back_read_all").await else {
        return;
    };
    let store = db
        .store
        .clone()
        .with_horizon_wait(Duration::from_millis(100));
    let raw = db.raw().await;
    raw.batch_execute("BEGIN").await.expect("begin");
    let held = Uuid::now_v7();
    assert_eq!(raw_append(&raw, "Held-1", held, json!({})).await, 0);

    // A later transaction commits while the first is still open.
    store
        .append(&sid("Free-1"), ExpectedVersion::NoStream, vec![ev(1)])
        .await
        .expect("append");
    assert!(
        feed(&store, ReadAll::from_start()).await.is_empty(),
        "read_all delivered an event that an open transaction could precede"
    );
    assert_eq!(store.head_position().await.expect("head"), None);
    assert!(store.horizon_lag().await.expect("lag") >= 1);
    // Stream reads are not held back.
    assert_eq!(
        store.stream_version(&sid("Free-1")).await.expect("version"),
        Some(annals::StreamVersion(1))
    );

    raw.batch_execute("COMMIT").await.expect("commit");
    let got = feed(&db.store, ReadAll::from_start()).await;
    let streams: Vec<&str> = got.iter().map(|e| e.stream_id.as_str()).collect();
    assert_eq!(streams, ["Held-1", "Free-1"], "older transaction first");
    assert_eq!(got[0].event_id, EventId(held));
    assert!(got[0].global_position < got[1].global_position);
    assert_eq!(
        db.store.head_position().await.expect("head"),
        Some(got[1].global_position)
    );
    // Other tests' transactions may hold the cluster's horizon for a while.
    wait_until("the horizon lag to drop to zero", || async {
        db.store.horizon_lag().await.expect("lag") == 0
    })
    .await;
    db.cleanup().await;
}

/// At the tail, read_all waits (bounded) for the transactions that hold back
/// events already committed, so a reader sees them as soon as they finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_all_waits_briefly_at_the_tail() {
    let Some(db) = TestDb::new("read_all_waits_briefly_at_the_tail").await else {
        return;
    };
    let store = db.store.clone();
    let raw = db.raw().await;
    raw.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(
        raw_append(&raw, "Held-1", Uuid::now_v7(), json!({})).await,
        0
    );
    store
        .append(&sid("Free-1"), ExpectedVersion::NoStream, vec![ev(1)])
        .await
        .expect("append");
    let reader = {
        let store = store.clone();
        tokio::spawn(async move { feed(&store, ReadAll::from_start()).await })
    };
    // The reader found both events held back and waits: the store's horizon
    // watch polls the horizon, which it only does while a reader waits.
    let probe = db.raw().await;
    wait_until("the store to watch the horizon", || async {
        probe
            .query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = $1 \
                 AND query = 'SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint' \
                 LIMIT 1",
                &[&db.app],
            )
            .await
            .expect("pg_stat_activity")
            .is_some()
    })
    .await;
    assert!(!reader.is_finished(), "the reader should wait");
    raw.batch_execute("COMMIT").await.expect("commit");
    let got = reader.await.expect("reader");
    assert_eq!(got.len(), 2, "both events once the open transaction ends");

    // With no wait, the read returns what is safe at once.
    let raw = db.raw().await;
    raw.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(
        raw_append(&raw, "Held-2", Uuid::now_v7(), json!({})).await,
        0
    );
    store
        .append(&sid("Free-2"), ExpectedVersion::NoStream, vec![ev(2)])
        .await
        .expect("append");
    let impatient = store.clone().with_horizon_wait(Duration::ZERO);
    let started = Instant::now();
    let tail = feed(&impatient, ReadAll::after(got[1].global_position)).await;
    assert!(tail.is_empty());
    assert!(started.elapsed() < Duration::from_secs(2));
    raw.batch_execute("ROLLBACK").await.expect("rollback");
    let tail = feed(&store, ReadAll::after(got[1].global_position)).await;
    let streams: Vec<&str> = tail.iter().map(|e| e.stream_id.as_str()).collect();
    assert_eq!(streams, ["Free-2"]);
    db.cleanup().await;
}

/// An older transaction must not append after a younger one wrote the same
/// stream: its events would come first in the feed with higher versions.
#[tokio::test]
async fn older_transaction_cannot_write_after_younger_one() {
    let Some(db) = TestDb::new("older_transaction_cannot_write_after_younger_one").await else {
        return;
    };
    let older = db.raw().await;
    let younger = db.raw().await;
    older.batch_execute("BEGIN").await.expect("begin");
    let older_tx: i64 = older
        .query_one("SELECT pg_current_xact_id()::text::bigint", &[])
        .await
        .expect("xid")
        .get(0);
    younger.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(
        raw_append(&younger, "Race-1", Uuid::now_v7(), json!({})).await,
        0
    );
    younger.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(
        raw_append(&older, "Race-1", Uuid::now_v7(), json!({})).await,
        4,
        "the append function must refuse (retry) in the older transaction {older_tx}"
    );
    older.batch_execute("ROLLBACK").await.expect("rollback");

    // The store's own appends take a fresh transaction and succeed.
    db.store
        .append(&sid("Race-1"), ExpectedVersion::Any, vec![ev(2)])
        .await
        .expect("append");
    let got = feed(&db.store, ReadAll::from_start()).await;
    let versions: Vec<u64> = got.iter().map(|e| e.stream_version.0).collect();
    assert_eq!(versions, [1, 2]);
    assert!(got[0].global_position.commit() < got[1].global_position.commit());
    db.cleanup().await;
}

/// 8 writers (shared and own streams, batches of 1 to 100) and one follower
/// reading from its last position in small pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_writers_one_follower() {
    let Some(db) = TestDb::with_options("eight_writers_one_follower", |o| {
        o.pool_size = 12;
        o.batch_size = 50;
    })
    .await
    else {
        return;
    };
    let store = db.store.clone();
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let store = store.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut seen: Vec<RecordedEvent> = Vec::new();
            let mut after = GlobalPosition::START;
            loop {
                let finished = done.load(Ordering::Acquire);
                let page = feed(&store, ReadAll::after(after).limit(137)).await;
                if let Some(last) = page.last() {
                    after = last.global_position;
                }
                let empty = page.is_empty();
                seen.extend(page);
                if finished && empty {
                    return seen;
                }
            }
        })
    };
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..60u64 {
                let stream = if i % 2 == 0 {
                    sid(&format!("Shared-{}", i % 3))
                } else {
                    sid(&format!("Own-{w}"))
                };
                let n = match i % 10 {
                    0 => 100,
                    1..=3 => 5,
                    _ => 1,
                };
                let batch: Vec<NewEvent> =
                    (0..n).map(|k| ev(w * 1_000_000 + i * 1000 + k)).collect();
                ids.extend(batch.iter().map(|e| e.event_id));
                let result = store
                    .append(&stream, ExpectedVersion::Any, batch)
                    .await
                    .expect("append");
                // One batch, one transaction: one commit, increasing seqs.
                assert!(result
                    .positions
                    .windows(2)
                    .all(|p| p[0].commit() == p[1].commit() && p[0].seq() < p[1].seq()));
            }
            ids
        }));
    }
    let mut written = HashSet::new();
    for w in writers {
        written.extend(w.await.expect("writer"));
    }
    done.store(true, Ordering::Release);
    let seen = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("reader finished")
        .expect("reader");
    eprintln!(
        "eight_writers_one_follower: {} events in {:?}",
        seen.len(),
        started.elapsed()
    );
    let ids: Vec<EventId> = seen.iter().map(|e| e.event_id).collect();
    let unique: HashSet<EventId> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "an event was delivered twice");
    assert_eq!(unique, written, "the follower missed events");
    assert!(
        seen.windows(2)
            .all(|w| w[0].global_position < w[1].global_position),
        "positions not increasing"
    );
    let mut heads: HashMap<StreamId, u64> = HashMap::new();
    for e in &seen {
        let prev = heads
            .insert(e.stream_id.clone(), e.stream_version.0)
            .unwrap_or(0);
        assert_eq!(
            e.stream_version.0,
            prev + 1,
            "{} out of order in the feed",
            e.stream_id
        );
    }
    let full: Vec<EventId> = feed(&store, ReadAll::from_start())
        .await
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(full, ids);
    db.cleanup().await;
}
