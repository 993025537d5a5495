//! The conformance suite against the in-memory store.

async fn fresh_store() -> Option<annals::InMemoryStore> {
    Some(annals::InMemoryStore::new())
}

annals_testkit::conformance_suite!(fresh_store);

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
