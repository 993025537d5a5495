//! The shared conformance suite, run against PostgreSQL.

// Every group: the store implements every trait.
annals_testkit::conformance_suite!(crate::common::fresh_store;
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
