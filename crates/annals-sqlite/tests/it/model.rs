//! The model-based property test (random scenarios, shrinking) on SQLite,
//! each case on a fresh file.

#[test]
fn sqlite_store_agrees_with_model() {
    annals_testkit::model::proptest_model(32, || async { Some(crate::fresh_store().await) });
}
