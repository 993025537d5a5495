//! `AnyStore` hands a snapshot load to its backend's own implementation.

use annals::{
    EventStore, ExpectedVersion, NewEvent, Snapshot, SnapshotStore, StreamId, StreamVersion,
};
use annals_any::AnyStore;
use annals_sqlite::{SqliteEventStore, SqliteOptions};
use futures::{FutureExt, StreamExt};
use serde_json::json;

/// On SQLite, `load_snapshot_and_events` through an `AnyStore` (with the
/// same `AnyStore` as the events) is the backend's one reader job: the
/// events after the snapshot are already there when it returns, so they come
/// while the only reader thread is held by another job (the provided
/// two-read method would need that reader for them).
#[tokio::test]
async fn a_snapshot_load_on_sqlite_reads_snapshot_and_events_in_one_job() {
    let dir = tempfile::Builder::new()
        .prefix("annals-any-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create a temp dir")
        .keep();
    let options = SqliteOptions {
        readers: 1,
        ..SqliteOptions::default()
    };
    let sqlite = SqliteEventStore::open_with(dir.join("annals.db"), options)
        .await
        .expect("open");
    let store = AnyStore::Sqlite(sqlite.clone());
    let stream = StreamId::new("Account", "any-one-read").expect("stream id");
    let events = (1..=3)
        .map(|i| NewEvent::new("Deposited", json!({ "amount": i })))
        .collect();
    store
        .append(&stream, ExpectedVersion::NoStream, events)
        .await
        .expect("append");
    store
        .save_snapshot(&Snapshot {
            aggregate_type: "Account".into(),
            aggregate_id: "any-one-read".into(),
            version: StreamVersion(2),
            schema_version: 1,
            state: json!({ "balance": 3 }),
            created_at: chrono::Utc::now(),
        })
        .await
        .expect("save");
    let (snapshot, mut read) = store
        .load_snapshot_and_events(&store, "Account", &stream)
        .await
        .expect("load")
        .expect("a snapshot");
    assert_eq!(snapshot.version, StreamVersion(2));

    // Hold the only reader thread until `release` is sent.
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let mut held = Box::pin(sqlite.test_hook_reader_job(move |_| {
        let _ = gate.recv();
    }));
    assert!(futures::poll!(&mut held).is_pending());

    let mut versions = Vec::new();
    while let Some(item) = read.next().now_or_never().expect("no reader job needed") {
        versions.push(item.expect("event").stream_version.get());
    }
    assert_eq!(versions, [2, 3]);

    release.send(()).expect("the held job waits");
    held.await.expect("the held job ends");
}
