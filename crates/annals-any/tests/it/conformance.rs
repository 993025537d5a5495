//! The shared conformance suite on an `AnyStore` over a fresh SQLite file per
//! test: every group, so every method of every trait goes through the
//! delegation. (The PostgreSQL arm is the same macro-written delegation; the
//! CLI's PostgreSQL tests run it.)

use annals_any::{AnyStore, Backend};

async fn fresh() -> Option<AnyStore> {
    // Kept, not deleted on drop: the store's threads close the file only
    // when the last handle drops, after the test's stack frame.
    let dir = tempfile::Builder::new()
        .prefix("annals-any-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create a temp dir")
        .keep();
    let url = format!("sqlite://{}", dir.join("annals.db").display());
    let store = AnyStore::open(&url).await.expect("open a fresh store");
    assert_eq!(store.backend(), Backend::Sqlite);
    Some(store)
}

annals_testkit::conformance_suite!(fresh;
    event_store,
    stream_catalog,
    snapshot_store,
    snapshot_admin,
    snapshot_staging,
    snapshot_migration,
    multi_stream_append,
    event_import,
    checkpoint_listing,
    checkpoints,
    projections,
    model,
    upcasting,
    gdpr,
);
