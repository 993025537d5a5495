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

/// The suite again with group commit on (`PgOptions::group_commit`): every
/// append goes through the group-commit queue, and the concurrent tests
/// (racing writers, the global-order follower) form real groups.
mod group_commit {
    annals_testkit::conformance_suite!(crate::common::fresh_group_store;
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
}
