//! `append_many` on PostgreSQL: the stream locks are taken in increasing key
//! order whatever order the caller lists the streams in, so two overlapping
//! calls queue instead of deadlocking. The conformance group's racing test
//! cannot show this here: PostgreSQL's deadlock detector would abort one
//! side of a deadlock and the store would retry it, so a wrong order would
//! still pass. These tests look at the locks themselves (`pg_locks`) while
//! the calls wait, so nothing is decided by timing.

use annals::{AppendResult, ExpectedVersion, MultiStreamAppend, NewEvent, StreamBatch, StreamId};
use serde_json::json;
use uuid::Uuid;

use crate::common::TestDb;

fn sid(s: &str) -> StreamId {
    StreamId::parse(s).expect("stream id")
}

/// One call: one event on each stream, in the order given.
fn call(streams: &[&str], n: u64) -> Vec<StreamBatch> {
    streams
        .iter()
        .map(|s| {
            StreamBatch::new(
                sid(s),
                ExpectedVersion::Any,
                vec![NewEvent::new("E", json!({ "n": n }))],
            )
        })
        .collect()
}

/// The advisory locks of the given backends: (pid, key, granted).
async fn advisory_locks(probe: &tokio_postgres::Client, pids: &[i32]) -> Vec<(i32, i64, bool)> {
    let mut rows: Vec<(i32, i64, bool)> = probe
        .query(
            // A bigint key shows as its high half in classid and its low
            // half in objid, with objsubid 1.
            "SELECT pid, (classid::bigint << 32) | objid::bigint, granted FROM pg_locks \
             WHERE locktype = 'advisory' AND objsubid = 1 AND pid = ANY($1)",
            &[&pids],
        )
        .await
        .expect("pg_locks")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    rows.sort();
    rows
}

/// Two calls over the same two streams, listed in opposite orders, start
/// while another session holds the lock of one stream; returns once both
/// wait for a lock, with the backends' advisory locks at that moment, then
/// lets them finish and returns their results (call 1's, call 2's).
async fn opposite_calls_while_held(
    db: &TestDb,
    low: &str,
    high: &str,
    held: i64,
) -> (Vec<(i32, i64, bool)>, [i32; 2], [Vec<AppendResult>; 2]) {
    let holder = db.raw().await;
    holder.batch_execute("BEGIN").await.expect("begin");
    holder
        .execute("SELECT pg_advisory_xact_lock($1)", &[&held])
        .await
        .expect("take the stream's lock");
    let spawn = |streams: Vec<String>, n: u64| {
        let store = db.store.clone();
        tokio::spawn(async move {
            let names: Vec<&str> = streams.iter().map(String::as_str).collect();
            store.append_many(call(&names, n)).await
        })
    };
    let first = spawn(vec![low.to_owned(), high.to_owned()], 1);
    let second = spawn(vec![high.to_owned(), low.to_owned()], 2);
    let a = db.wait_for_lock_wait(&[]).await;
    let b = db.wait_for_lock_wait(&[a]).await;
    let probe = db.raw().await;
    let locks = advisory_locks(&probe, &[a, b]).await;
    assert!(!first.is_finished() && !second.is_finished());
    holder.batch_execute("COMMIT").await.expect("release");
    let first = first.await.expect("task").expect("call 1");
    let second = second.await.expect("task").expect("call 2");
    (locks, [a, b], [first, second])
}

/// Both calls wrote both streams, one whole call after the other: the call
/// that got version 1 on one stream got it on the other too.
fn assert_serialized(results: &[Vec<AppendResult>; 2], round: u64) {
    // Call 1 listed (low, high), call 2 (high, low).
    let low = [results[0][0].first_version.0, results[1][1].first_version.0];
    let high = [results[0][1].first_version.0, results[1][0].first_version.0];
    let base = 2 * round;
    assert!(
        low == high && (low == [base + 1, base + 2] || low == [base + 2, base + 1]),
        "the calls interleaved: low stream {low:?}, high stream {high:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_many_takes_stream_locks_in_key_order() {
    let Some(db) = TestDb::new("append_many_takes_stream_locks_in_key_order").await else {
        return;
    };
    // Advisory locks are per database, not per schema: names of our own.
    let tag = Uuid::now_v7().simple().to_string();
    let probe = db.raw().await;
    let mut named: Vec<(i64, String)> = Vec::new();
    for suffix in ["x", "y"] {
        let name = format!("Lock-{tag}{suffix}");
        let key: i64 = probe
            .query_one("SELECT hashtextextended($1, 0)", &[&name])
            .await
            .expect("lock key")
            .get(0);
        named.push((key, name));
    }
    named.sort();
    let [(low_key, low), (high_key, high)] = [named[0].clone(), named[1].clone()];
    assert_ne!(low_key, high_key, "two stream names with one lock key");

    // The lower key held elsewhere: both calls wait for it holding nothing.
    // Taking locks in the listed order, call 2 would hold the higher key.
    let (locks, [a, b], results) = opposite_calls_while_held(&db, &low, &high, low_key).await;
    let mut want = vec![(a, low_key, false), (b, low_key, false)];
    want.sort();
    assert_eq!(
        locks, want,
        "while the lower key is held, no call may hold the higher one"
    );
    assert_serialized(&results, 0);

    // The higher key held elsewhere: one call holds the lower key and waits
    // for the higher; the other waits for the lower, holding nothing.
    let (locks, [a, b], results) = opposite_calls_while_held(&db, &low, &high, high_key).await;
    let holder_of_low = locks
        .iter()
        .find(|(_, key, granted)| *key == low_key && *granted)
        .map(|(pid, _, _)| *pid)
        .expect("one call holds the lower key");
    let other = if holder_of_low == a { b } else { a };
    let mut want = vec![
        (holder_of_low, low_key, true),
        (holder_of_low, high_key, false),
        (other, low_key, false),
    ];
    want.sort();
    assert_eq!(locks, want, "locks taken out of key order");
    assert_serialized(&results, 1);

    for s in [&low, &high] {
        assert_eq!(
            annals::EventStore::stream_version(&db.store, &sid(s))
                .await
                .expect("head"),
            Some(annals::StreamVersion(4)),
            "{s}"
        );
    }
    db.cleanup().await;
}
