//! Issue 7: read pages are bounded in bytes as well as rows, so a read of
//! large events holds a few of them at a time (`annals read-all --json`
//! over 3,000 events of 1 MiB used to peak at 3.9 GB).
//!
//! What one page holds is observed from outside: a consumer takes the
//! first event (its page is fetched), then the test locks the `events`
//! table, and the consumer drains what it has until the read's next query
//! waits for the lock (seen in `pg_stat_activity`). The events delivered by
//! then are the first page.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use annals::{
    EventStore, EventStream, ExpectedVersion, NewEvent, ReadAll, ReadStream, RecordedEvent,
    StreamId,
};
use futures::TryStreamExt;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::common::{wait_until, TestDb};

fn sid(s: &str) -> StreamId {
    StreamId::parse(s).expect("stream id")
}

/// An event whose payload holds a string of `len` characters that do not
/// compress much (so its stored size is close to what a reader receives).
fn large(n: u64, len: usize) -> NewEvent {
    let mut text = String::with_capacity(len + 16);
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while text.len() < len {
        // xorshift: cheap, deterministic, incompressible enough.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        text.push_str(&format!("{x:016x}"));
    }
    text.truncate(len);
    NewEvent::new("Large", json!({ "n": n, "blob": text }))
}

/// Appends `count` events made by `make`, one append each.
async fn append_each(db: &TestDb, stream: &StreamId, count: u64, make: impl Fn(u64) -> NewEvent) {
    for n in 0..count {
        db.store
            .append(stream, ExpectedVersion::Any, vec![make(n)])
            .await
            .expect("append");
    }
}

/// Runs `read` to its end; returns how many events its first page held,
/// and every event it delivered.
async fn first_page_and_all(db: &TestDb, read: EventStream) -> (usize, Vec<RecordedEvent>) {
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let (first_tx, first_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let finished = Arc::new(AtomicBool::new(false));
    let consumer = {
        let finished = finished.clone();
        tokio::spawn(async move {
            let mut read = read;
            let first = read.try_next().await.expect("read").expect("an event");
            events_tx.send(first).expect("send");
            first_tx.send(()).expect("signal");
            go_rx.await.expect("go");
            while let Some(event) = read.try_next().await.expect("read") {
                events_tx.send(event).expect("send");
            }
            finished.store(true, Ordering::Release);
        })
    };
    first_rx.await.expect("first event");
    let lock = db.raw().await;
    lock.batch_execute("BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    go_tx.send(()).expect("go");
    let probe = db.raw().await;
    wait_until("the read's next query, or its end", || async {
        finished.load(Ordering::Acquire) || !db.lock_waiters(&probe).await.is_empty()
    })
    .await;
    let mut events = Vec::new();
    while let Ok(event) = events_rx.try_recv() {
        events.push(event);
    }
    let first_page = events.len();
    lock.batch_execute("ROLLBACK").await.expect("unlock");
    consumer.await.expect("consumer");
    while let Some(event) = events_rx.recv().await {
        events.push(event);
    }
    (first_page, events)
}

/// The events of `read`, collected.
async fn all(read: EventStream) -> Vec<RecordedEvent> {
    read.try_collect().await.expect("read")
}

fn ns(events: &[RecordedEvent]) -> Vec<u64> {
    events
        .iter()
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(e.data.as_str()).expect("payload")["n"]
                .as_u64()
                .expect("n")
        })
        .collect()
}

/// 12 events of about 20 kB with a 64 KiB budget and a batch of 1,000
/// rows: every kind of read takes them 4 per page, and delivers all of
/// them, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue7_pages_of_large_events_are_bounded_in_bytes() {
    let Some(db) = TestDb::with_options("issue7_pages_of_large_events_are_bounded_in_bytes", |o| {
        o.batch_size = 1000;
        o.page_bytes = 64 * 1024;
    })
    .await
    else {
        return;
    };
    let s = sid("Large-1");
    append_each(&db, &s, 12, |n| large(n, 20_000)).await;
    let store = &db.store;
    let forward: Vec<u64> = (0..12).collect();
    let backward: Vec<u64> = (0..12).rev().collect();

    for (name, read, expected) in [
        ("read_all", store.read_all(ReadAll::from_start()), &forward),
        (
            "read_all by category",
            store.read_all(ReadAll::from_start().categories(["Large"])),
            &forward,
        ),
        (
            "read_all by type",
            store.read_all(ReadAll::from_start().event_types(["Large"])),
            &forward,
        ),
        (
            "read_stream forward",
            store.read_stream(&s, ReadStream::forward()),
            &forward,
        ),
        (
            "read_stream backward",
            store.read_stream(&s, ReadStream::backward()),
            &backward,
        ),
    ] {
        let (first_page, got) = first_page_and_all(&db, read).await;
        assert_eq!(
            first_page, 4,
            "{name}: the first page holds 4 events of 20 kB"
        );
        assert_eq!(&ns(&got), expected, "{name}: every event once, in order");
    }
    let feed = all(store.read_all(ReadAll::from_start())).await;
    assert!(feed
        .windows(2)
        .all(|w| w[0].global_position < w[1].global_position));
    let limited = all(store.read_all(ReadAll::after(feed[2].global_position).limit(7))).await;
    assert_eq!(ns(&limited), (3..10).collect::<Vec<u64>>());
    let limited = all(store.read_stream(&s, ReadStream::backward().limit(5))).await;
    assert_eq!(ns(&limited), [11, 10, 9, 8, 7]);
    db.cleanup().await;
}

/// An event larger than the budget comes alone in its page, and the read
/// goes on past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue7_an_event_larger_than_the_budget_comes_alone() {
    let Some(db) =
        TestDb::with_options("issue7_an_event_larger_than_the_budget_comes_alone", |o| {
            o.batch_size = 1000;
            o.page_bytes = 16 * 1024;
        })
        .await
    else {
        return;
    };
    let s = sid("Large-1");
    append_each(&db, &s, 5, |n| large(n, 20_000)).await;
    let (first_page, got) = first_page_and_all(&db, db.store.read_all(ReadAll::from_start())).await;
    assert_eq!(first_page, 1);
    assert_eq!(ns(&got), [0, 1, 2, 3, 4]);
    let (first_page, got) =
        first_page_and_all(&db, db.store.read_stream(&s, ReadStream::forward())).await;
    assert_eq!(first_page, 1);
    assert_eq!(ns(&got), [0, 1, 2, 3, 4]);
    db.cleanup().await;
}

/// Small events are not affected: a page holds the whole batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue7_pages_of_small_events_hold_the_batch() {
    let Some(db) = TestDb::with_options("issue7_pages_of_small_events_hold_the_batch", |o| {
        o.batch_size = 5;
    })
    .await
    else {
        return;
    };
    let s = sid("Small-1");
    db.store
        .append(
            &s,
            ExpectedVersion::NoStream,
            (0..30)
                .map(|n| NewEvent::new("Small", json!({ "n": n })))
                .collect(),
        )
        .await
        .expect("append");
    let every: Vec<u64> = (0..30).collect();
    let (first_page, got) = first_page_and_all(&db, db.store.read_all(ReadAll::from_start())).await;
    assert_eq!(first_page, 5);
    assert_eq!(ns(&got), every);
    let (first_page, got) =
        first_page_and_all(&db, db.store.read_stream(&s, ReadStream::forward())).await;
    assert_eq!(first_page, 5);
    assert_eq!(ns(&got), every);
    db.cleanup().await;
}

/// `read_feed_pages` fetches the next page's rows (and, without a filter,
/// the page after it, checked against the next one) while a full page is
/// decoded; pages cut by their byte budget and pages of several queries
/// (a limit above 16 batches) are read as `read_feed_page` reads them.
/// Whichever way, each page equals the `read_feed_page` from the
/// `scanned_to` before it, every matching event comes once, and the
/// stream ends at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_pages_read_ahead_equal_feed_page_whatever_cuts_them() {
    let Some(db) = TestDb::with_options(
        "feed_pages_read_ahead_equal_feed_page_whatever_cuts_them",
        |o| {
            o.batch_size = 2;
            o.page_bytes = 50_000;
        },
    )
    .await
    else {
        return;
    };
    let store = &db.store;
    // Small events with a run of large ones in the middle (three of them
    // fill a page's byte budget), in two categories.
    for n in 0..60u64 {
        let (stream, event) = match n {
            20..=27 => ("Large-1", large(n, 20_000)),
            n if n % 3 == 0 => ("Other-1", NewEvent::new("Small", json!({ "n": n }))),
            n => ("Small-1", NewEvent::new("Small", json!({ "n": n }))),
        };
        store
            .append(&sid(stream), ExpectedVersion::Any, vec![event])
            .await
            .expect("append");
    }
    let filters = [
        ReadAll::from_start(),
        ReadAll::from_start().categories(["Small", "Large"]),
        ReadAll::from_start().event_types(["Large"]),
    ];
    annals_testkit::check_feed_pages_to_the_end(store, &filters, &[1, 3, 5, 32, 40]).await;
    db.cleanup().await;
}
