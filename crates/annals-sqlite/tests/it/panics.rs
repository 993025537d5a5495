//! Issue 7: a job that panics on a store thread. The caller gets an error
//! saying so, the thread goes on, nothing the job wrote stays, and the reader
//! pool's accounting survives. The jobs are injected through the store's
//! test hooks (`test_hook_writer_job`, `test_hook_reader_job`).

use std::collections::HashSet;
use std::sync::{Arc, Barrier};

use annals::{EventStore, ExpectedVersion, ReadStream, SnapshotStore, StreamVersion};
use annals_sqlite::{SqliteEventStore, SqliteOptions};
use futures::future::join_all;

use crate::{ev, fresh_store, fresh_store_with, raw, sid};

const READERS: usize = 4;

/// Asserts that `err` is the backend error of a job that panicked on the
/// `which` thread with `message`.
fn assert_panicked(err: &annals::Error, which: &str, message: &str) {
    match err {
        annals::Error::Backend {
            backend,
            message: m,
            ..
        } => {
            assert_eq!(*backend, "sqlite");
            assert!(
                m.contains(&format!("sqlite {which} thread panicked")) && m.contains(message),
                "not a panic report for {which} / {message}: {m}"
            );
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
}

/// Runs one job on every reader at once (a barrier holds each job until all
/// are running, which is only possible on `READERS` distinct live threads)
/// and returns what each job returned, with the thread it ran on.
async fn on_every_reader<T, F>(store: &SqliteEventStore, job: F) -> Vec<annals::Result<(String, T)>>
where
    T: Send + 'static,
    F: Fn(&rusqlite::Connection) -> T + Send + Sync + 'static,
{
    let barrier = Arc::new(Barrier::new(READERS));
    let job = Arc::new(job);
    join_all((0..READERS).map(|_| {
        let barrier = Arc::clone(&barrier);
        let job = Arc::clone(&job);
        store.test_hook_reader_job(move |conn| {
            barrier.wait();
            let thread = std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_owned();
            (thread, job(conn))
        })
    }))
    .await
}

fn count_events(conn: &rusqlite::Connection) -> i64 {
    conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .expect("count events")
}

#[tokio::test]
async fn issue_7_writer_job_panic_is_an_error_and_rolls_back() {
    let store = fresh_store().await;
    let s = sid("Before-1");
    store
        .append(&s, ExpectedVersion::NoStream, vec![ev("A", 1)])
        .await
        .expect("append");

    // The job opens its own transaction, writes a stream head and a table,
    // then panics.
    let err = store
        .test_hook_writer_job::<(), _>(|conn| {
            conn.execute_batch(
                "BEGIN IMMEDIATE;
                 INSERT INTO streams (stream_id, category, version) VALUES ('Half-1', 'Half', 7);
                 CREATE TABLE half_written (x);",
            )
            .expect("begin and write");
            panic!("injected writer panic");
        })
        .await
        .expect_err("the job panicked");
    assert_panicked(&err, "writer", "injected writer panic");
    assert!(err.to_string().contains("rolled back"), "{err}");

    // Nothing of it stays, and the write lock is free: a connection that
    // does not wait at all can take it.
    assert_eq!(
        store.stream_version(&sid("Half-1")).await.expect("version"),
        None
    );
    let conn = raw(&store);
    conn.busy_timeout(std::time::Duration::ZERO)
        .expect("no busy wait");
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'half_written'",
            [],
            |r| r.get(0),
        )
        .expect("schema");
    assert_eq!(tables, 0, "the panicked job's table was committed");
    conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;")
        .expect("the writer holds no transaction");
    drop(conn);

    // A panic with a non-string payload, twice more, then the writer goes
    // on: appends, snapshot and checkpoint writes, reads.
    for _ in 0..2 {
        let err = store
            .test_hook_writer_job::<(), _>(|_| std::panic::panic_any(42u32))
            .await
            .expect_err("the job panicked");
        assert_panicked(&err, "writer", "non-string payload");
    }
    let r = store
        .append(
            &s,
            ExpectedVersion::Exact(StreamVersion(1)),
            vec![ev("A", 2), ev("A", 3)],
        )
        .await
        .expect("append after the panics");
    assert_eq!(r.last_version, StreamVersion(3));
    let snap = annals::Snapshot {
        aggregate_type: "Before".into(),
        aggregate_id: "1".into(),
        version: StreamVersion(3),
        schema_version: 1,
        state: serde_json::json!({ "n": 3 }),
        created_at: chrono::Utc::now(),
    };
    store.save_snapshot(&snap).await.expect("snapshot write");
    annals::CheckpointStore::save_checkpoint(&store, "after-panic", r.positions[1])
        .await
        .expect("checkpoint write");
    let got = store
        .read_stream_to_vec(&s, ReadStream::forward())
        .await
        .expect("read");
    assert_eq!(got.len(), 3);
    assert_eq!(
        store
            .load_snapshot("Before", "1")
            .await
            .expect("load")
            .map(|l| l.version),
        Some(StreamVersion(3))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_7_reader_job_panics_leave_the_pool_whole() {
    let store = fresh_store_with(SqliteOptions {
        readers: READERS,
        ..SqliteOptions::default()
    })
    .await;
    let s = sid("Read-1");
    store
        .append(
            &s,
            ExpectedVersion::NoStream,
            (1..=5).map(|n| ev("A", n)).collect(),
        )
        .await
        .expect("append");

    // Every reader panics at once, each inside a read transaction it opened
    // itself (which would pin its snapshot if it stayed open).
    let panicked = on_every_reader(&store, |conn| {
        conn.execute_batch("BEGIN; SELECT count(*) FROM events;")
            .expect("begin a read");
        panic!("injected reader panic");
    })
    .await;
    assert_eq!(panicked.len(), READERS);
    for r in &panicked {
        let err = r.as_ref().expect_err("the job panicked");
        assert_panicked(err, "reader", "injected reader panic");
    }
    assert_eq!(store.test_hook_reader_jobs_in_flight(), vec![0; READERS]);

    // More panics one after another (all on the idlest reader).
    for _ in 0..8 {
        let err = store
            .test_hook_reader_job::<(), _>(|_| panic!("injected reader panic"))
            .await
            .expect_err("the job panicked");
        assert_panicked(&err, "reader", "injected reader panic");
    }
    assert_eq!(store.test_hook_reader_jobs_in_flight(), vec![0; READERS]);

    // New events, then every reader at once again: all threads are alive,
    // the pool still spreads jobs over all of them, and none reads an old
    // snapshot left over from a panicked job.
    store
        .append(
            &s,
            ExpectedVersion::Any,
            (6..=10).map(|n| ev("A", n)).collect(),
        )
        .await
        .expect("append after the panics");
    let answers = on_every_reader(&store, count_events).await;
    let mut threads = HashSet::new();
    for a in answers {
        let (thread, count) = a.expect("a reader job after the panics");
        assert_eq!(count, 10, "reader {thread} reads an old snapshot");
        threads.insert(thread);
    }
    assert_eq!(threads.len(), READERS, "readers lost: {threads:?}");

    // Many concurrent reads complete, and the accounting is back to zero.
    let reads =
        join_all((0..256).map(|_| store.read_stream_to_vec(&s, ReadStream::forward()))).await;
    for r in reads {
        let events = r.expect("read after the panics");
        assert_eq!(
            events
                .iter()
                .map(|e| e.stream_version.0)
                .collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>()
        );
    }
    assert_eq!(store.test_hook_reader_jobs_in_flight(), vec![0; READERS]);
}
