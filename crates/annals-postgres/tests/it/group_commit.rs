//! Group commit (`PgOptions::group_commit`): appends queued behind a busy
//! leader go out as one group, and a bad append among good ones answers
//! only its own caller.
//!
//! Each test holds the only leader (group commit on one connection) inside
//! an append that waits for a stream lock held by a raw session, queues the
//! appends one by one (watching the queue, not the clock), then lets the
//! leader go: everything queued is one group.

use annals::{
    AppendResult, Error, EventId, EventStore, ExpectedVersion, NewEvent, ReadAll, Result, StreamId,
    StreamVersion,
};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::common::{feed, wait_until, TestDb};

fn sid(s: &str) -> StreamId {
    StreamId::parse(s).expect("stream id")
}

fn ev(n: u64) -> NewEvent {
    NewEvent::new("E", json!({ "n": n }))
}

/// The `n` of an event written by [`ev`].
fn n_of(e: &annals::RecordedEvent) -> i64 {
    let v: serde_json::Value = serde_json::from_str(e.data.as_str()).expect("payload");
    v["n"].as_i64().expect("n")
}

type Pending = JoinHandle<Result<AppendResult>>;

/// The store's only group-commit leader, held inside an append to `Held-1`
/// until [`Held::release`].
struct Held {
    raw: tokio_postgres::Client,
    append: Pending,
}

impl Held {
    async fn new(db: &TestDb) -> Held {
        let raw = db.raw().await;
        raw.batch_execute("SELECT pg_advisory_lock(hashtextextended('Held-1', 0))")
            .await
            .expect("hold the stream lock");
        let store = db.store.clone();
        let append = tokio::spawn(async move {
            store
                .append(&sid("Held-1"), ExpectedVersion::NoStream, vec![ev(0)])
                .await
        });
        db.wait_for_lock_wait(&[]).await;
        Held { raw, append }
    }

    /// Lets the leader go and checks its own append.
    async fn release(self) {
        self.raw
            .batch_execute("SELECT pg_advisory_unlock(hashtextextended('Held-1', 0))")
            .await
            .expect("release the stream lock");
        let held = self.append.await.expect("task").expect("held append");
        assert_eq!(held.first_version, StreamVersion(1));
    }
}

/// Queues one append and waits until it is in the group-commit queue.
async fn queue(
    db: &TestDb,
    stream: &str,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> Pending {
    let before = db.store.group_commit_waiting();
    let store = db.store.clone();
    let stream = sid(stream);
    let task = tokio::spawn(async move { store.append(&stream, expected, events).await });
    wait_until("the append to be queued", || async {
        db.store.group_commit_waiting() == before + 1
    })
    .await;
    task
}

async fn group_db(test: &str) -> Option<TestDb> {
    TestDb::with_options(test, |o| o.group_commit = Some(1)).await
}

/// Issue 11: one append whose expected version does not hold, among good
/// ones in one group: only its caller gets the conflict; the others are
/// durable, committed together, in the order they were queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_conflict_answers_only_its_caller() {
    let Some(db) = group_db("group_commit_conflict_answers_only_its_caller").await else {
        return;
    };
    db.store
        .append(&sid("C-1"), ExpectedVersion::NoStream, vec![ev(1)])
        .await
        .expect("setup");
    let held = Held::new(&db).await;
    let queued = vec![
        queue(&db, "A-1", ExpectedVersion::NoStream, vec![ev(10)]).await,
        queue(
            &db,
            "C-1",
            ExpectedVersion::Exact(StreamVersion(7)),
            vec![ev(11)],
        )
        .await,
        queue(&db, "B-1", ExpectedVersion::NoStream, vec![ev(12), ev(13)]).await,
        queue(
            &db,
            "A-1",
            ExpectedVersion::Exact(StreamVersion(1)),
            vec![ev(14)],
        )
        .await,
        queue(
            &db,
            "C-1",
            ExpectedVersion::Exact(StreamVersion(1)),
            vec![ev(15)],
        )
        .await,
    ];
    assert_eq!(db.store.group_commit_waiting(), 5);
    held.release().await;
    let mut results = Vec::new();
    for task in queued {
        results.push(task.await.expect("task"));
    }

    match &results[1] {
        Err(Error::WrongExpectedVersion { stream, actual, .. }) => {
            assert_eq!(stream, &sid("C-1"));
            assert_eq!(*actual, Some(StreamVersion(1)));
        }
        other => panic!("the bad append must conflict alone, got {other:?}"),
    }
    let good: Vec<&AppendResult> = [0, 2, 3, 4]
        .iter()
        .map(|&i| results[i].as_ref().expect("a good append of the group"))
        .collect();
    let firsts: Vec<u64> = good.iter().map(|r| r.first_version.0).collect();
    assert_eq!(firsts, [1, 1, 2, 2]);
    let positions: Vec<_> = good.iter().flat_map(|r| r.positions.clone()).collect();
    // One group: one transaction, so one commit part; queue order.
    assert!(positions
        .iter()
        .all(|p| p.commit() == positions[0].commit()));
    assert!(positions.windows(2).all(|w| w[0] < w[1]));

    let stored = feed(&db.store, ReadAll::from_start()).await;
    let grouped: Vec<(String, u64, i64)> = stored
        .iter()
        .filter(|e| positions.contains(&e.global_position))
        .map(|e| (e.stream_id.to_string(), e.stream_version.0, n_of(e)))
        .collect();
    assert_eq!(
        grouped,
        [
            ("A-1".to_owned(), 1, 10),
            ("B-1".to_owned(), 1, 12),
            ("B-1".to_owned(), 2, 13),
            ("A-1".to_owned(), 2, 14),
            ("C-1".to_owned(), 2, 15),
        ]
    );
    assert!(!stored.iter().any(|e| n_of(e) == 11));
    assert_eq!(stored.len(), 1 + 1 + 5);
    db.cleanup().await;
}

/// Issue 11: an append that fails the group's statement as a whole (an
/// event id already stored with another payload) among good ones: each
/// caller still gets the answer of an append on its own, and the good ones
/// (and an identical retry of a stored append) are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_failed_statement_answers_each_append_alone() {
    let Some(db) = group_db("group_commit_failed_statement_answers_each_append_alone").await else {
        return;
    };
    let stored_id = EventId::new();
    let stored = ev(1).with_id(stored_id);
    let first = db
        .store
        .append(&sid("C-2"), ExpectedVersion::NoStream, vec![stored.clone()])
        .await
        .expect("setup");
    let held = Held::new(&db).await;
    let queued = vec![
        queue(&db, "A-2", ExpectedVersion::NoStream, vec![ev(10)]).await,
        queue(&db, "C-2", ExpectedVersion::NoStream, vec![stored]).await,
        queue(
            &db,
            "D-2",
            ExpectedVersion::Any,
            vec![ev(2).with_id(stored_id)],
        )
        .await,
        queue(&db, "B-2", ExpectedVersion::NoStream, vec![ev(12)]).await,
    ];
    held.release().await;
    let mut results = Vec::new();
    for task in queued {
        results.push(task.await.expect("task"));
    }
    let a = results[0].as_ref().expect("A-2 appended");
    assert_eq!(a.first_version, StreamVersion(1));
    // Refused before it is queued: it never fails a group.
    let huge = NewEvent::new("E", json!({})).with_event_version(u32::MAX);
    assert!(matches!(
        db.store
            .append(&sid("Bad-2"), ExpectedVersion::Any, vec![huge])
            .await,
        Err(Error::InvalidEvent { .. })
    ));
    let retry = results[1].as_ref().expect("an identical retry succeeds");
    assert!(retry.deduplicated);
    assert_eq!(retry.positions, first.positions);
    assert!(
        matches!(&results[2], Err(Error::DuplicateEventId { event_id, .. }) if *event_id == stored_id),
        "got {:?}",
        results[2]
    );
    let b = results[3].as_ref().expect("B-2 appended");
    assert_eq!(b.first_version, StreamVersion(1));

    let events = feed(&db.store, ReadAll::from_start()).await;
    let streams: Vec<String> = events.iter().map(|e| e.stream_id.to_string()).collect();
    assert_eq!(streams.len(), 4, "{streams:?}");
    for s in ["C-2", "Held-1", "A-2", "B-2"] {
        assert!(
            streams.contains(&s.to_owned()),
            "{s} missing from {streams:?}"
        );
    }
    db.cleanup().await;
}
