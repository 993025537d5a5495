//! Issue 11: appends that wait for the writer commit together, in one
//! transaction, each in its own savepoint. The tests hold the writer with a
//! job that blocks until they release it, queue appends behind it (watching
//! the writer's queue count, never a clock), release it, and check that the
//! queued appends committed as one group, that a bad append among them failed
//! alone with nothing of it written, and that a group whose commit fails
//! answers every member with an error and writes nothing.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use annals::{
    AppendResult, EventId, EventStore, ExpectedVersion, MultiStreamAppend, NewEvent, ReadAll,
    StreamBatch, StreamVersion,
};
use annals_sqlite::SqliteEventStore;
use futures::TryStreamExt;
use tokio::task::JoinHandle;

use crate::{ev, fresh_store, sid};

/// Holds the writer thread until the returned sender is used (or dropped).
/// Returns once the writer runs the holding job, so that whatever is queued
/// after this waits behind it.
async fn hold_writer(store: &SqliteEventStore) -> (mpsc::Sender<()>, JoinHandle<()>) {
    let (go, wait) = mpsc::channel::<()>();
    let (holding, is_holding) = tokio::sync::oneshot::channel::<()>();
    let store = store.clone();
    let held = tokio::spawn(async move {
        store
            .test_hook_writer_job(move |_conn| {
                let _ = holding.send(());
                let _ = wait.recv();
            })
            .await
            .expect("the holding job runs");
    });
    is_holding.await.expect("the writer runs the holding job");
    (go, held)
}

/// Waits until `n` appends are queued for the writer (an observable state,
/// polled; the deadline only turns a hang into a failure).
async fn until_queued(store: &SqliteEventStore, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.test_hook_group_counters().1 < n {
        assert!(
            Instant::now() < deadline,
            "{n} appends never queued for the writer"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

type Pending<T> = JoinHandle<annals::Result<T>>;

/// Starts an append and waits until it is queued, so that the group's
/// members are in a known order.
async fn queue(
    store: &SqliteEventStore,
    queued: &mut usize,
    stream: &str,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> Pending<AppendResult> {
    let s = store.clone();
    let stream = sid(stream);
    let handle = tokio::spawn(async move { s.append(&stream, expected, events).await });
    *queued += 1;
    until_queued(store, *queued).await;
    handle
}

async fn version(store: &SqliteEventStore, stream: &str) -> Option<StreamVersion> {
    store.stream_version(&sid(stream)).await.expect("version")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_waiting_appends_commit_as_one_group_and_a_bad_one_fails_alone() {
    let store = fresh_store().await;
    store
        .append(
            &sid("Acc-1"),
            ExpectedVersion::NoStream,
            vec![ev("Opened", 1)],
        )
        .await
        .expect("append");
    let taken = EventId::new();
    store
        .append(
            &sid("Other-1"),
            ExpectedVersion::NoStream,
            vec![ev("Opened", 2).with_id(taken)],
        )
        .await
        .expect("append");

    let (go, held) = hold_writer(&store).await;
    let (groups_before, _) = store.test_hook_group_counters();
    let mut q = 0;
    let good_a = queue(
        &store,
        &mut q,
        "Good-a",
        ExpectedVersion::NoStream,
        vec![ev("A", 1), ev("A", 2)],
    )
    .await;
    let conflict = queue(
        &store,
        &mut q,
        "Acc-1",
        ExpectedVersion::NoStream,
        vec![ev("Opened", 9)],
    )
    .await;
    let good_b = queue(
        &store,
        &mut q,
        "Good-b",
        ExpectedVersion::Any,
        vec![ev("B", 1)],
    )
    .await;
    let dup_id = queue(
        &store,
        &mut q,
        "Dup-1",
        ExpectedVersion::NoStream,
        vec![ev("X", 1), ev("X", 2).with_id(taken)],
    )
    .await;
    // Sees Good-a's first append, made earlier in the same transaction.
    let good_a2 = queue(
        &store,
        &mut q,
        "Good-a",
        ExpectedVersion::Exact(StreamVersion(2)),
        vec![ev("A", 3)],
    )
    .await;
    let good_c = queue(
        &store,
        &mut q,
        "Good-c",
        ExpectedVersion::NoStream,
        vec![ev("C", 1)],
    )
    .await;

    go.send(()).expect("release the writer");
    held.await.expect("holding task");

    let a = good_a.await.expect("task").expect("good append a");
    let b = good_b.await.expect("task").expect("good append b");
    let a2 = good_a2
        .await
        .expect("task")
        .expect("second append to Good-a");
    let c = good_c.await.expect("task").expect("good append c");
    match conflict.await.expect("task") {
        Err(annals::Error::WrongExpectedVersion { stream, actual, .. }) => {
            assert_eq!(stream, sid("Acc-1"));
            assert_eq!(actual, Some(StreamVersion(1)));
        }
        other => panic!("expected a conflict on Acc-1, got {other:?}"),
    }
    match dup_id.await.expect("task") {
        Err(annals::Error::DuplicateEventId { event_id, .. }) => assert_eq!(event_id, taken),
        other => panic!("expected a duplicate event id, got {other:?}"),
    }

    // One group transaction for the six queued appends.
    assert_eq!(store.test_hook_group_counters().0, groups_before + 1);
    assert_eq!(
        (a.first_version, a.last_version),
        (StreamVersion(1), StreamVersion(2))
    );
    assert_eq!(
        (a2.first_version, a2.last_version),
        (StreamVersion(3), StreamVersion(3))
    );
    assert_eq!(b.last_version, StreamVersion(1));
    assert_eq!(c.last_version, StreamVersion(1));
    // Nothing of the failed appends was written.
    assert_eq!(version(&store, "Acc-1").await, Some(StreamVersion(1)));
    assert_eq!(version(&store, "Dup-1").await, None);

    // The feed: every committed event once, in the order of the group.
    let all: Vec<_> = store
        .read_all(ReadAll::default())
        .try_collect()
        .await
        .expect("read all");
    let order: Vec<(String, u64)> = all
        .iter()
        .map(|e| (e.stream_id.to_string(), e.stream_version.get()))
        .collect();
    let expected: Vec<(String, u64)> = [
        ("Acc-1", 1),
        ("Other-1", 1),
        ("Good-a", 1),
        ("Good-a", 2),
        ("Good-b", 1),
        ("Good-a", 3),
        ("Good-c", 1),
    ]
    .iter()
    .map(|(s, v)| (s.to_string(), *v))
    .collect();
    assert_eq!(order, expected);
    let positions: Vec<_> = all.iter().map(|e| e.global_position).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    assert_eq!(
        [
            a.positions.clone(),
            b.positions.clone(),
            a2.positions.clone(),
            c.positions.clone()
        ]
        .concat(),
        all[2..]
            .iter()
            .map(|e| e.global_position)
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_a_member_that_panics_fails_alone() {
    let store = fresh_store().await;
    let (go, held) = hold_writer(&store).await;
    let mut q = 0;
    let before = queue(
        &store,
        &mut q,
        "Before-1",
        ExpectedVersion::NoStream,
        vec![ev("A", 1)],
    )
    .await;
    let s = store.clone();
    let panicking = tokio::spawn(async move {
        s.test_hook_group_job(|conn| {
            let sp = conn.savepoint().expect("savepoint");
            sp.execute_batch("CREATE TABLE written_by_the_panicking_member (x INTEGER)")
                .expect("create");
            panic!("boom in a group");
        })
        .await
    });
    q += 1;
    until_queued(&store, q).await;
    let after = queue(
        &store,
        &mut q,
        "After-1",
        ExpectedVersion::NoStream,
        vec![ev("B", 1)],
    )
    .await;
    go.send(()).expect("release the writer");
    held.await.expect("holding task");

    before
        .await
        .expect("task")
        .expect("append before the panic");
    after.await.expect("task").expect("append after the panic");
    match panicking.await.expect("task") {
        Err(annals::Error::Backend { message, .. }) => {
            assert!(message.contains("boom in a group"), "{message}")
        }
        other => panic!("expected the panic as an error, got {other:?}"),
    }
    let table: Option<String> = store
        .test_hook_reader_job(|conn| {
            conn.query_row(
                "SELECT name FROM sqlite_master WHERE name = 'written_by_the_panicking_member'",
                [],
                |r| r.get(0),
            )
            .ok()
        })
        .await
        .expect("reader job");
    assert_eq!(
        table, None,
        "the panicking member's write must be rolled back"
    );
    assert_eq!(version(&store, "Before-1").await, Some(StreamVersion(1)));
    assert_eq!(version(&store, "After-1").await, Some(StreamVersion(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_a_group_whose_commit_fails_fails_every_append_and_writes_nothing() {
    let store = fresh_store().await;
    let (go, held) = hold_writer(&store).await;
    let mut q = 0;
    let first = queue(
        &store,
        &mut q,
        "First-1",
        ExpectedVersion::NoStream,
        vec![ev("A", 1)],
    )
    .await;
    // A member whose write is fine until COMMIT: a deferred foreign key
    // that nothing satisfies.
    let s = store.clone();
    let poison = tokio::spawn(async move {
        s.test_hook_group_job(|conn| {
            let sp = conn.savepoint().expect("savepoint");
            sp.execute_batch(
                "CREATE TABLE parent_t (id INTEGER PRIMARY KEY);
                 CREATE TABLE child_t (p INTEGER REFERENCES parent_t(id) DEFERRABLE INITIALLY DEFERRED);
                 INSERT INTO child_t VALUES (42);",
            )
            .expect("deferred violation");
            sp.commit().expect("release");
        })
        .await
    });
    q += 1;
    until_queued(&store, q).await;
    let last = queue(
        &store,
        &mut q,
        "Last-1",
        ExpectedVersion::NoStream,
        vec![ev("B", 1)],
    )
    .await;
    go.send(()).expect("release the writer");
    held.await.expect("holding task");

    for (name, result) in [
        ("First-1", first.await.expect("task").map(|_| ())),
        ("poison", poison.await.expect("task")),
        ("Last-1", last.await.expect("task").map(|_| ())),
    ] {
        match result {
            Err(annals::Error::Backend { message, .. }) => assert!(
                message.contains("committing an append") && message.contains("constraint"),
                "{name}: {message}"
            ),
            other => panic!("{name}: expected the failed commit, got {other:?}"),
        }
    }
    assert_eq!(version(&store, "First-1").await, None);
    assert_eq!(version(&store, "Last-1").await, None);
    assert_eq!(store.head_position().await.expect("head"), None);

    // The writer goes on.
    store
        .append(&sid("Next-1"), ExpectedVersion::NoStream, vec![ev("C", 1)])
        .await
        .expect("the next append works");
}

/// An `append_many` is one member of a group: refused (one stream's
/// expected version is wrong), it writes nothing on any of its streams and
/// leaves the others of its group alone; accepted, all its streams commit
/// with the group, in the group's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_append_many_in_a_group_is_all_or_nothing() {
    let store = fresh_store().await;
    store
        .append(&sid("Pm-b"), ExpectedVersion::NoStream, vec![ev("B", 0)])
        .await
        .expect("seed");
    let (go, held) = hold_writer(&store).await;
    let (groups_before, _) = store.test_hook_group_counters();
    let mut q = 0;
    let first = queue(
        &store,
        &mut q,
        "Pm-a",
        ExpectedVersion::NoStream,
        vec![ev("A", 1)],
    )
    .await;
    let many = |batches: Vec<StreamBatch>| {
        let s = store.clone();
        tokio::spawn(async move { s.append_many(batches).await })
    };
    // Pm-a is written by the member before it; Pm-b is at 1, not 5.
    let refused = many(vec![
        StreamBatch::new(
            sid("Pm-a"),
            ExpectedVersion::Exact(StreamVersion(1)),
            vec![ev("A", 2)],
        ),
        StreamBatch::new(
            sid("Pm-b"),
            ExpectedVersion::Exact(StreamVersion(5)),
            vec![ev("B", 1)],
        ),
    ]);
    q += 1;
    until_queued(&store, q).await;
    let accepted = many(vec![
        StreamBatch::new(
            sid("Pm-b"),
            ExpectedVersion::Exact(StreamVersion(1)),
            vec![ev("B", 2), ev("B", 3)],
        ),
        StreamBatch::new(
            sid("Pm-a"),
            ExpectedVersion::Exact(StreamVersion(1)),
            vec![ev("A", 3)],
        ),
    ]);
    q += 1;
    until_queued(&store, q).await;
    let last = queue(
        &store,
        &mut q,
        "Pm-c",
        ExpectedVersion::NoStream,
        vec![ev("C", 1)],
    )
    .await;
    go.send(()).expect("release the writer");
    held.await.expect("holding task");

    first.await.expect("task").expect("append before");
    match refused.await.expect("task") {
        Err(annals::Error::WrongExpectedVersion { stream, actual, .. }) => {
            assert_eq!(stream, sid("Pm-b"));
            assert_eq!(actual, Some(StreamVersion(1)));
        }
        other => panic!("expected a conflict on Pm-b, got {other:?}"),
    }
    let done = accepted.await.expect("task").expect("append_many");
    last.await.expect("task").expect("append after");
    assert_eq!(store.test_hook_group_counters().0, groups_before + 1);
    let heads: Vec<(u64, u64)> = done
        .iter()
        .map(|r| (r.first_version.get(), r.last_version.get()))
        .collect();
    assert_eq!(heads, [(2, 3), (2, 2)]);
    let order: Vec<(String, u64, i64)> = store
        .read_all(ReadAll::default())
        .try_collect::<Vec<_>>()
        .await
        .expect("read all")
        .iter()
        .map(|e| {
            (
                e.stream_id.to_string(),
                e.stream_version.get(),
                e.data.to_value().expect("payload")["n"]
                    .as_i64()
                    .expect("n"),
            )
        })
        .collect();
    let want: Vec<(String, u64, i64)> = [
        ("Pm-b", 1, 0),
        ("Pm-a", 1, 1),
        ("Pm-b", 2, 2),
        ("Pm-b", 3, 3),
        ("Pm-a", 2, 3),
        ("Pm-c", 1, 1),
    ]
    .iter()
    .map(|(s, v, n)| (s.to_string(), *v, *n))
    .collect();
    assert_eq!(order, want, "the refused call must write nothing");
}

/// A member whose statement fails with an error that makes SQLite roll back
/// the whole transaction, not only its savepoint (a full database here, via
/// `max_page_count`; a full disk or an I/O error do the same), leaves the
/// writer's connection in autocommit mode. The member before it lost its
/// writes with the transaction and is told so; the member after it is not
/// run in autocommit mode (where its savepoint would commit on its own while
/// the group's `COMMIT` failed and told it otherwise) but in a transaction
/// of its own, and commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_error_rolls_back_the_transaction_fails_the_members_before_it_only() {
    let store = fresh_store().await;
    store
        .append(&sid("Seed-1"), ExpectedVersion::NoStream, vec![ev("S", 0)])
        .await
        .expect("seed");
    store
        .test_hook_writer_job(|conn| {
            let pages: i64 = conn
                .query_row("PRAGMA page_count", [], |r| r.get(0))
                .expect("page_count");
            let cap: i64 = conn
                .query_row(&format!("PRAGMA max_page_count = {}", pages + 8), [], |r| {
                    r.get(0)
                })
                .expect("max_page_count");
            assert_eq!(cap, pages + 8);
        })
        .await
        .expect("cap the file");
    let (go, held) = hold_writer(&store).await;
    let mut q = 0;
    let first = queue(
        &store,
        &mut q,
        "First-1",
        ExpectedVersion::NoStream,
        vec![ev("A", 1)],
    )
    .await;
    let big = NewEvent::new("Big", serde_json::json!({ "blob": "x".repeat(2_000_000) }));
    let too_big = queue(
        &store,
        &mut q,
        "Big-1",
        ExpectedVersion::NoStream,
        vec![big],
    )
    .await;
    let last = queue(
        &store,
        &mut q,
        "Last-1",
        ExpectedVersion::NoStream,
        vec![ev("C", 1)],
    )
    .await;
    go.send(()).expect("release the writer");
    held.await.expect("holding task");
    let first = first
        .await
        .expect("task")
        .expect_err("First-1 was rolled back");
    assert!(
        first
            .to_string()
            .contains("rolled back the whole transaction"),
        "{first}"
    );
    let too_big = too_big
        .await
        .expect("task")
        .expect_err("Big-1 does not fit");
    assert!(
        too_big.to_string().contains("inserting an event"),
        "{too_big}"
    );
    let last = last.await.expect("task").expect("Last-1 commits alone");
    assert_eq!(last.last_version, StreamVersion(1));
    assert_eq!(version(&store, "First-1").await, None);
    assert_eq!(version(&store, "Big-1").await, None);
    assert_eq!(version(&store, "Last-1").await, Some(StreamVersion(1)));
    // Every answer matches what is stored, and the writer goes on.
    store
        .append(&sid("First-1"), ExpectedVersion::NoStream, vec![ev("A", 1)])
        .await
        .expect("First-1 again");
}
