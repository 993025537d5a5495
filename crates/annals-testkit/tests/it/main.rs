//! The conformance suite against the in-memory store, and against a store
//! with only the required cores.

mod core_only;

async fn fresh_store() -> Option<annals::InMemoryStore> {
    Some(annals::InMemoryStore::new())
}

// Every group: the store implements every trait.
annals_testkit::conformance_suite!(fresh_store;
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

mod model {
    #[test]
    fn memory_store_agrees_with_model() {
        annals_testkit::model::proptest_model(200, super::fresh_store);
    }
}
