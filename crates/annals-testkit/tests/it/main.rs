//! The conformance suite against the in-memory store.

async fn fresh_store() -> Option<annals::InMemoryStore> {
    Some(annals::InMemoryStore::new())
}

annals_testkit::conformance_suite!(fresh_store);

mod model {
    #[test]
    fn memory_store_agrees_with_model() {
        annals_testkit::model::proptest_model(200, super::fresh_store);
    }
}
