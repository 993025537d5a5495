//! The shared conformance suite, on a fresh file per test.

use annals_sqlite::SqliteEventStore;

async fn fresh() -> Option<SqliteEventStore> {
    Some(crate::fresh_store().await)
}

// Every group: the store implements every trait.
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
