//! Snapshot history (the store keeps `K` per aggregate) and the queries over it.

use annals::{EventStore, ExpectedVersion, Snapshot, SnapshotStore, SnapshotWrite, StreamVersion};
use annals::{SnapshotAdmin, SnapshotStaging};
use annals_sqlite::SqliteEventStore;
use chrono::Utc;
use futures::StreamExt;
use serde_json::json;

use crate::{ev, fresh_store, raw, sid};

fn snap(id: &str, version: u64, schema_version: u32) -> Snapshot {
    Snapshot {
        aggregate_type: "Order".into(),
        aggregate_id: id.into(),
        version: StreamVersion(version),
        schema_version,
        state: json!({"v": version, "schema": schema_version}),
        created_at: Utc::now(),
    }
}

fn rows(store: &SqliteEventStore, id: &str) -> Vec<(u32, u64)> {
    let conn = raw(store);
    let mut s = conn
        .prepare(
            "SELECT schema_version, version FROM snapshots WHERE aggregate_type = 'Order' \
             AND aggregate_id = ?1 ORDER BY schema_version DESC, version DESC",
        )
        .expect("prepare");
    s.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<rusqlite::Result<_>>()
        .expect("rows")
}

/// A fresh store that keeps `k` snapshots per aggregate.
async fn history(k: u32) -> SqliteEventStore {
    let store = fresh_store().await;
    store
        .set_snapshot_history_size(k)
        .await
        .expect("set the history size");
    store
}

#[tokio::test]
async fn history_keeps_the_newest_k() {
    let store = history(3).await;
    for v in 1..=5 {
        assert_eq!(
            store.save_snapshot(&snap("1", v, 1)).await.expect("save"),
            SnapshotWrite::Written
        );
    }
    assert_eq!(rows(&store, "1"), vec![(1, 5), (1, 4), (1, 3)]);
    let live = store
        .load_snapshot("Order", "1")
        .await
        .expect("load")
        .expect("live");
    assert_eq!((live.schema_version, live.version), (1, StreamVersion(5)));
    assert_eq!(live.state, json!({"v": 5, "schema": 1}));

    // Older than live: refused, history untouched.
    assert_eq!(
        store.save_snapshot(&snap("1", 4, 1)).await.expect("save"),
        SnapshotWrite::Superseded
    );
    assert_eq!(rows(&store, "1"), vec![(1, 5), (1, 4), (1, 3)]);

    // A schema bump wins at a lower version and takes over a version's row.
    assert_eq!(
        store.save_snapshot(&snap("1", 4, 2)).await.expect("save"),
        SnapshotWrite::Written
    );
    assert_eq!(rows(&store, "1"), vec![(2, 4), (1, 5), (1, 3)]);
    let live = store
        .load_snapshot("Order", "1")
        .await
        .expect("load")
        .expect("live");
    assert_eq!((live.schema_version, live.version), (2, StreamVersion(4)));

    // Invalidating old schemas removes their history too.
    assert_eq!(
        store
            .invalidate_snapshots("Order", Some(2))
            .await
            .expect("invalidate"),
        2
    );
    assert_eq!(rows(&store, "1"), vec![(2, 4)]);
    assert_eq!(
        store.delete_snapshot("Order", "1").await.expect("delete"),
        1
    );
    assert!(store
        .load_snapshot("Order", "1")
        .await
        .expect("load")
        .is_none());
}

#[tokio::test]
async fn the_default_keeps_one_row() {
    let store = fresh_store().await;
    for v in [2, 4, 6] {
        store.save_snapshot(&snap("1", v, 1)).await.expect("save");
    }
    assert_eq!(rows(&store, "1"), vec![(1, 6)]);
}

#[tokio::test]
async fn coverage_and_staleness_count_only_live_snapshots() {
    let store = history(3).await;
    for id in ["1", "2", "3"] {
        store
            .append(
                &sid(&format!("Order-{id}")),
                ExpectedVersion::Any,
                (0..10).map(|i| ev("A", i)).collect(),
            )
            .await
            .expect("append");
    }
    for v in [2, 4, 8] {
        store.save_snapshot(&snap("1", v, 1)).await.expect("save");
    }
    store.save_snapshot(&snap("2", 3, 2)).await.expect("save");

    let coverage = store
        .snapshot_coverage(Some("Order"))
        .await
        .expect("coverage");
    assert_eq!(coverage.len(), 1);
    let c = &coverage[0];
    assert_eq!(
        (c.aggregates, c.with_snapshot, c.without_snapshot),
        (3, 2, 1)
    );
    assert_eq!(c.by_schema_version.get(&1), Some(&1));
    assert_eq!(c.by_schema_version.get(&2), Some(&1));
    assert_eq!(
        store.snapshot_coverage(None).await.expect("coverage"),
        coverage
    );

    let stale = store
        .stale_snapshots(Some("Order"), 1)
        .await
        .expect("stale");
    let got: Vec<_> = stale
        .iter()
        .map(|s| {
            (
                s.aggregate_id.as_str(),
                s.snapshot_version.map(|v| v.get()),
                s.events_behind,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![("3", None, 10), ("2", Some(3), 7), ("1", Some(8), 2)]
    );
    assert_eq!(store.stale_snapshots(None, 1).await.expect("stale"), stale);
    assert!(store
        .stale_snapshots(Some("Order"), 10)
        .await
        .expect("stale")
        .is_empty());
}

#[tokio::test]
async fn promote_keeps_history_and_never_overwrites_a_newer_live() {
    let store = history(2).await;
    store.save_snapshot(&snap("1", 5, 1)).await.expect("save");
    store.save_snapshot(&snap("1", 6, 1)).await.expect("save");
    store.save_snapshot(&snap("2", 9, 3)).await.expect("save");
    store.stage_snapshot(&snap("1", 6, 2)).await.expect("stage");
    store.stage_snapshot(&snap("2", 9, 2)).await.expect("stage");
    store.stage_snapshot(&snap("3", 1, 2)).await.expect("stage");
    assert_eq!(store.staged_snapshots("Order").count().await, 3);

    let report = store.promote_staged("Order").await.expect("promote");
    assert_eq!((report.promoted, report.kept_live), (2, 1));
    // Same version, newer schema: the staged row replaces the old one.
    assert_eq!(rows(&store, "1"), vec![(2, 6), (1, 5)]);
    assert_eq!(rows(&store, "2"), vec![(3, 9)]);
    assert_eq!(rows(&store, "3"), vec![(2, 1)]);
    assert_eq!(store.staged_snapshots("Order").count().await, 0);
}

#[tokio::test]
async fn the_history_size_is_recorded_in_the_file() {
    let first = fresh_store().await;
    let path = first.path().to_owned();
    let second = SqliteEventStore::open(&path)
        .await
        .expect("a second handle");
    assert_eq!(first.set_snapshot_history_size(2).await.expect("set"), 0);
    // The other handle (another process, in production) trims to it too.
    assert_eq!(second.snapshot_history_size().await.expect("size"), 2);
    for v in [3, 6, 9] {
        second.save_snapshot(&snap("1", v, 1)).await.expect("save");
    }
    assert_eq!(rows(&second, "1"), vec![(1, 9), (1, 6)]);
    drop((first, second));
    let reopened = SqliteEventStore::open(&path).await.expect("reopen");
    assert_eq!(reopened.snapshot_history_size().await.expect("size"), 2);
}

/// Writes a snapshot row of `Order/id` as it is, past the guarded write.
fn put_row(store: &SqliteEventStore, id: &str, version: u64, schema: u32, rolled_back: bool) {
    raw(store)
        .execute(
            "INSERT INTO snapshots (aggregate_type, aggregate_id, version, schema_version, \
             state, created_at, rolled_back_at) VALUES ('Order', ?1, ?2, ?3, ?4, 0, ?5)",
            rusqlite::params![
                id,
                version as i64,
                schema,
                json!({"v": version, "schema": schema}).to_string(),
                rolled_back.then_some(1_i64)
            ],
        )
        .expect("insert a snapshot row");
}

/// The live snapshot is the row with the highest `(schema_version,
/// version)` that is not rolled back, whatever the order of the stream
/// versions, through both loads.
#[tokio::test]
async fn the_live_snapshot_is_the_highest_schema_then_version() {
    let store = fresh_store().await;
    let stream = sid("Order-mixed");
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            (1..=12).map(|n| ev("Placed", n)).collect(),
        )
        .await
        .expect("append");
    put_row(&store, "mixed", 12, 1, false);
    put_row(&store, "mixed", 10, 1, false);
    put_row(&store, "mixed", 5, 2, false);
    put_row(&store, "mixed", 3, 2, false);
    put_row(&store, "mixed", 8, 3, true);
    let live = store
        .load_snapshot("Order", "mixed")
        .await
        .expect("load")
        .expect("a snapshot");
    assert_eq!((live.schema_version, live.version), (2, StreamVersion(5)));
    assert_eq!(live.state, json!({"v": 5, "schema": 2}));
    let (live, events) = store
        .load_snapshot_and_events(&store, "Order", &stream)
        .await
        .expect("load")
        .expect("a snapshot");
    assert_eq!((live.schema_version, live.version), (2, StreamVersion(5)));
    let versions: Vec<u64> = events
        .map(|e| e.expect("event").stream_version.get())
        .collect()
        .await;
    assert_eq!(versions, (5..=12).collect::<Vec<_>>());
}

/// A live snapshot whose state is not JSON fails its load with a typed
/// error that names the aggregate; a repository load passes over it and
/// replays the events.
#[tokio::test]
async fn a_corrupt_live_snapshot_names_the_aggregate_and_loads_fall_back() {
    use annals::bank::Account;
    use annals::{CommandContext, Repository, SnapshotConfig, SnapshotSkip};

    let store = fresh_store().await;
    let repo = Repository::<Account, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(2));
    let ctx = CommandContext::new();
    repo.execute("bad", &ctx, |a| a.open("b"))
        .await
        .expect("open");
    for _ in 0..3 {
        repo.execute("bad", &ctx, |a| a.deposit(5))
            .await
            .expect("deposit");
    }
    let good = repo.load("bad").await.expect("load");
    assert!(good.report.snapshot_version.is_some(), "{:?}", good.report);
    raw(&store)
        .execute(
            "UPDATE snapshots SET state = 'not json' WHERE aggregate_id = 'bad'",
            [],
        )
        .expect("corrupt the snapshot");

    let err = store
        .load_snapshot("Account", "bad")
        .await
        .expect_err("a corrupt snapshot");
    assert!(matches!(err, annals::Error::Backend { .. }), "{err:?}");
    assert!(err.to_string().contains("Account/bad"), "{err}");
    let stream = sid("Account-bad");
    let err = match store
        .load_snapshot_and_events(&store, "Account", &stream)
        .await
    {
        Err(e) => e,
        Ok(found) => panic!("a corrupt snapshot loaded: {:?}", found.map(|f| f.0)),
    };
    assert!(err.to_string().contains("Account/bad"), "{err}");

    let loaded = repo.load("bad").await.expect("load");
    match &loaded.report.skipped {
        Some(SnapshotSkip::StoreError(why)) => assert!(why.contains("Account/bad"), "{why}"),
        other => panic!("not passed over as a store error: {other:?}"),
    }
    assert_eq!(loaded.report.snapshot_version, None);
    assert_eq!(loaded.report.events_replayed, 4);
    assert_eq!(loaded.state.balance, 15);
    assert_eq!(loaded.version, Some(StreamVersion(4)));
}
