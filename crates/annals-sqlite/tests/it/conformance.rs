//! The shared conformance suite, on a fresh file per test.

use annals_sqlite::SqliteEventStore;

async fn fresh() -> Option<SqliteEventStore> {
    Some(crate::fresh_store().await)
}

annals_testkit::conformance_suite!(fresh);
