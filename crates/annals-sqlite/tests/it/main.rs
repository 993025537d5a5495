//! Integration tests of the SQLite backend: the shared conformance suite plus
//! what only this backend has (migrations, the file, options).

mod blue_green;
mod conformance;
mod events;
mod gdpr;
mod group_commit;
mod migrations;
mod model;
mod panics;
mod persistence;
mod projections;
mod rebuilds;
mod snapshots;

use std::path::PathBuf;

use annals_sqlite::{SqliteEventStore, SqliteOptions};

/// A database path in a fresh directory under cargo's per-target temp dir
/// (cleaned by `cargo clean`). The directory is kept on purpose: the store
/// outlives the test's stack frame, and its threads close the file only when
/// the last handle drops.
pub fn fresh_path() -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix("annals-sqlite-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create a temp dir")
        .keep();
    dir.join("annals.db")
}

/// A migrated store in a fresh file.
pub async fn fresh_store() -> SqliteEventStore {
    SqliteEventStore::open(fresh_path())
        .await
        .expect("open a fresh store")
}

/// A fresh store with options.
pub async fn fresh_store_with(options: SqliteOptions) -> SqliteEventStore {
    SqliteEventStore::open_with(fresh_path(), options)
        .await
        .expect("open a fresh store")
}

/// A plain connection to the store's file, for checks and fault injection.
pub fn raw(store: &SqliteEventStore) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(store.path()).expect("open the file");
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .expect("busy timeout");
    conn
}

/// A stream id.
pub fn sid(s: &str) -> annals::StreamId {
    annals::StreamId::parse(s).expect("valid stream id")
}

/// An event with payload `{"n": n}`.
pub fn ev(event_type: &str, n: i64) -> annals::NewEvent {
    annals::NewEvent::new(event_type, serde_json::json!({ "n": n }))
}
