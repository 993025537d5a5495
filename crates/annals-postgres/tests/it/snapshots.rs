//! Snapshot history (the store keeps more than one per aggregate) and staged
//! snapshots paging.

use annals::{Snapshot, SnapshotStore, SnapshotWrite, StreamVersion};
use annals::{SnapshotAdmin, SnapshotStaging};
use chrono::Utc;
use futures::TryStreamExt;
use serde_json::json;

use crate::common::TestDb;

fn snap(id: &str, version: u64, schema: u32) -> Snapshot {
    Snapshot {
        aggregate_type: "Account".into(),
        aggregate_id: id.into(),
        version: StreamVersion(version),
        schema_version: schema,
        state: json!({ "v": version, "schema": schema }),
        created_at: Utc::now(),
    }
}

async fn stored_versions(db: &TestDb, id: &str) -> Vec<(i64, i64)> {
    db.raw()
        .await
        .query(
            "SELECT schema_version, version FROM snapshots WHERE aggregate_id = $1 \
             ORDER BY schema_version DESC, version DESC",
            &[&id],
        )
        .await
        .expect("query")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn history_keeps_the_newest_k() {
    let Some(db) = TestDb::with_options("history_keeps_the_newest_k", |o| {
        o.batch_size = 2;
    })
    .await
    else {
        return;
    };
    let store = &db.store;
    store
        .set_snapshot_history_size(3)
        .await
        .expect("set the history size");
    for v in 1..=5 {
        assert_eq!(
            store.save_snapshot(&snap("h", v, 1)).await.expect("save"),
            SnapshotWrite::Written
        );
    }
    assert_eq!(stored_versions(&db, "h").await, [(1, 5), (1, 4), (1, 3)]);
    assert_eq!(
        store.save_snapshot(&snap("h", 2, 1)).await.expect("save"),
        SnapshotWrite::Superseded
    );
    // A schema bump wins at a lower version; history is ordered by
    // (schema_version, version).
    assert_eq!(
        store.save_snapshot(&snap("h", 1, 2)).await.expect("save"),
        SnapshotWrite::Written
    );
    assert_eq!(stored_versions(&db, "h").await, [(2, 1), (1, 5), (1, 4)]);
    let live = store
        .load_snapshot("Account", "h")
        .await
        .expect("load")
        .expect("live");
    assert_eq!((live.schema_version, live.version.0), (2, 1));
    // Same version, newer schema: replaces that row.
    assert_eq!(
        store.save_snapshot(&snap("h", 5, 3)).await.expect("save"),
        SnapshotWrite::Written
    );
    assert_eq!(stored_versions(&db, "h").await, [(3, 5), (2, 1), (1, 4)]);

    // Promotion keeps history too, and only where staged supersedes live.
    for i in 0..5 {
        store
            .stage_snapshot(&snap(&format!("s{i}"), 10, 4))
            .await
            .expect("stage");
    }
    store
        .stage_snapshot(&snap("h", 1, 1))
        .await
        .expect("stage an old one");
    let staged: Vec<Snapshot> = store
        .staged_snapshots("Account")
        .try_collect()
        .await
        .expect("staged");
    let ids: Vec<&str> = staged.iter().map(|s| s.aggregate_id.as_str()).collect();
    assert_eq!(ids, ["h", "s0", "s1", "s2", "s3", "s4"]);
    let report = store.promote_staged("Account").await.expect("promote");
    assert_eq!((report.promoted, report.kept_live), (5, 1));
    assert_eq!(stored_versions(&db, "h").await, [(3, 5), (2, 1), (1, 4)]);
    assert_eq!(stored_versions(&db, "s3").await, [(4, 10)]);
    assert!(store
        .load_staged("Account", "s3")
        .await
        .expect("load")
        .is_none());
    assert_eq!(
        store.delete_snapshot("Account", "h").await.expect("delete"),
        3
    );
    assert_eq!(
        store
            .invalidate_snapshots("Account", Some(4))
            .await
            .expect("invalidate"),
        0
    );
    assert_eq!(
        store
            .invalidate_snapshots("Account", Some(5))
            .await
            .expect("invalidate"),
        5
    );
    db.cleanup().await;
}
