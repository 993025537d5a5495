//! The conformance suite against the in-memory store.

async fn fresh_store() -> Option<annals::InMemoryStore> {
    Some(annals::InMemoryStore::new())
}

annals_testkit::conformance_suite!(fresh_store);
