//! The model-based property test (random scenarios, shrinking) on
//! PostgreSQL, each case in a fresh schema that is dropped after it.

use crate::common::TestDb;

#[test]
fn postgres_store_agrees_with_model() {
    annals_testkit::model::proptest_model_with_teardown(
        32,
        || async {
            let db = TestDb::new("model::postgres_store_agrees_with_model").await?;
            Some((db.store.clone(), db))
        },
        TestDb::cleanup,
    );
}
