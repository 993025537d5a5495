//! The file: reopening, WAL, several handles on one file, options.

use std::collections::BTreeSet;

use annals::{
    CheckpointStore, EventStore, ExpectedVersion, GlobalPosition, ReadAll, ReadStream, Snapshot,
    SnapshotStore, StreamVersion,
};
use annals_sqlite::{SqliteEventStore, SqliteOptions};
use chrono::Utc;
use futures::TryStreamExt;
use serde_json::json;

use crate::{ev, fresh_path, fresh_store, raw, sid};

#[tokio::test]
async fn data_survives_a_reopen() {
    let store = fresh_store().await;
    let s = sid("Order-1");
    let appended = store
        .append(&s, ExpectedVersion::NoStream, vec![ev("A", 1), ev("B", 2)])
        .await
        .expect("append");
    let snapshot = Snapshot {
        aggregate_type: "Order".into(),
        aggregate_id: "1".into(),
        version: StreamVersion(2),
        schema_version: 1,
        state: json!({"total": 3}),
        created_at: Utc::now(),
    };
    store.save_snapshot(&snapshot).await.expect("snapshot");
    store
        .save_checkpoint("proj", appended.positions[1])
        .await
        .expect("checkpoint");
    let before: Vec<_> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("read");
    let path = store.path().to_owned();
    drop(store);

    let store = SqliteEventStore::open(&path).await.expect("reopen");
    let after: Vec<_> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("read");
    assert_eq!(before, after);
    assert_eq!(
        store.stream_version(&s).await.expect("head"),
        Some(StreamVersion(2))
    );
    let loaded = store
        .load_snapshot("Order", "1")
        .await
        .expect("load")
        .expect("present");
    assert_eq!(loaded.state, snapshot.state);
    assert_eq!(loaded.version, snapshot.version);
    assert_eq!(
        loaded.created_at.timestamp_micros(),
        snapshot.created_at.timestamp_micros(),
        "timestamps are kept to the microsecond"
    );
    assert_eq!(
        store.load_checkpoint("proj").await.expect("load"),
        Some(appended.positions[1])
    );
    // Positions continue after the old head, never reused.
    let next = store
        .append(
            &s,
            ExpectedVersion::Exact(StreamVersion(2)),
            vec![ev("C", 3)],
        )
        .await
        .expect("append");
    assert!(next.positions[0] > appended.positions[1]);
}

#[tokio::test]
async fn the_file_is_in_wal_mode_with_full_sync() {
    let store = fresh_store().await;
    let conn = raw(&store);
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("pragma");
    assert_eq!(mode, "wal");
    assert_eq!(
        store.path().file_name().and_then(|n| n.to_str()),
        Some("annals.db")
    );
}

#[tokio::test]
async fn two_handles_on_one_file_keep_one_global_order() {
    let path = fresh_path();
    let a = SqliteEventStore::open(&path).await.expect("open a");
    let b = SqliteEventStore::open(&path).await.expect("open b");
    let mut tasks = Vec::new();
    for (k, store) in [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
    {
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                store
                    .append(
                        &sid(&format!("Writer-{k}")),
                        ExpectedVersion::Any,
                        vec![ev("A", i), ev("B", i)],
                    )
                    .await
                    .expect("append never fails with busy");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let all: Vec<_> = a
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("read");
    assert_eq!(all.len(), 200);
    assert!(all
        .windows(2)
        .all(|w| w[0].global_position < w[1].global_position));
    let ids: BTreeSet<_> = all.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), 200);
    for k in 0..4 {
        let versions: Vec<u64> = all
            .iter()
            .filter(|e| e.stream_id.as_str() == format!("Writer-{k}"))
            .map(|e| e.stream_version.get())
            .collect();
        assert_eq!(versions, (1..=50).collect::<Vec<_>>());
    }
    assert_eq!(
        b.head_position().await.expect("head"),
        all.last().map(|e| e.global_position)
    );
}

#[tokio::test]
async fn zero_options_are_configuration_errors() {
    for options in [
        SqliteOptions {
            batch_size: 0,
            ..SqliteOptions::default()
        },
        SqliteOptions {
            readers: 0,
            ..SqliteOptions::default()
        },
    ] {
        let err = SqliteEventStore::open_with(fresh_path(), options)
            .await
            .expect_err("invalid option");
        assert!(matches!(err, annals::Error::Config(_)), "{err:?}");
    }
    let defaults = SqliteOptions::default();
    assert!(defaults.migrate_on_open);
    assert_eq!(defaults.batch_size, annals::DEFAULT_BATCH_SIZE);
    assert_eq!(defaults.readers, 4);
}

#[tokio::test]
async fn a_missing_directory_is_an_error_not_a_panic() {
    let path = fresh_path().join("no/such/dir/annals.db");
    let err = SqliteEventStore::open(&path)
        .await
        .expect_err("cannot create");
    assert!(
        matches!(
            err,
            annals::Error::Backend {
                backend: "sqlite",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn checkpoints_hold_positions_of_other_stores() {
    let store = fresh_store().await;
    let pg = GlobalPosition::new(900, 7);
    store.save_checkpoint("pg", pg).await.expect("save");
    store
        .save_checkpoint("pg", GlobalPosition::new(899, 1_000))
        .await
        .expect("save older");
    assert_eq!(store.load_checkpoint("pg").await.expect("load"), Some(pg));
    store
        .save_checkpoint("pg", GlobalPosition::new(900, 8))
        .await
        .expect("save newer");
    assert_eq!(
        store.load_checkpoint("pg").await.expect("load"),
        Some(GlobalPosition::new(900, 8))
    );
    let too_big = GlobalPosition::new(u64::MAX, 1);
    let err = store
        .save_checkpoint("pg", too_big)
        .await
        .expect_err("too big");
    assert!(
        matches!(err, annals::Error::PositionOutOfRange { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn store_handles_are_cheap_clones_of_one_store() {
    let store = fresh_store().await;
    let clone = store.clone();
    clone
        .append(&sid("Order-1"), ExpectedVersion::NoStream, vec![ev("A", 1)])
        .await
        .expect("append");
    let got = store
        .read_stream_to_vec(&sid("Order-1"), ReadStream::forward())
        .await
        .expect("read");
    assert_eq!(got.len(), 1);
    assert!(format!("{store:?}").contains("annals.db"));
}
