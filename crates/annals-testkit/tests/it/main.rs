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
    checkpoints,
    model,
);

mod model {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn memory_store_agrees_with_model(ops in annals_testkit::model::ops(60)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            rt.block_on(annals_testkit::model::check(annals::InMemoryStore::new(), "Model", ops));
        }
    }
}
