//! Versioned migrations, the ledger and the schema-version guard.

use annals::StreamCatalog;
use annals::{CheckpointStore, EventStore, ExpectedVersion, ReadAll, SnapshotStore};
use annals_sqlite::{SqliteEventStore, SqliteOptions};
use futures::StreamExt;

use crate::{ev, fresh_path, fresh_store, raw, sid};

/// Versions this build ships, by name.
const EXPECTED: &[(i64, &str)] = &[
    (1, "events"),
    (2, "snapshots"),
    (3, "checkpoints"),
    (4, "event_fingerprints"),
    (5, "snapshot_history"),
    (6, "correlation_index"),
    (7, "feed_indexes"),
    (8, "archived_streams"),
    (9, "gdpr_keys"),
    (10, "projection_control"),
    (11, "event_migrations"),
    (12, "projection_versions"),
];
const LATEST: i64 = 12;

fn ledger(conn: &rusqlite::Connection) -> Vec<(i64, String, String)> {
    let mut s = conn
        .prepare("SELECT version, name, applied_at FROM annals_migrations ORDER BY version")
        .expect("prepare");
    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<rusqlite::Result<_>>()
        .expect("rows")
}

fn no_migrate() -> SqliteOptions {
    SqliteOptions {
        migrate_on_open: false,
        ..SqliteOptions::default()
    }
}

fn is_schema_error(e: &annals::Error, found: i64) -> bool {
    matches!(e, annals::Error::SchemaVersion { found: f, expected } if *f == found && *expected == LATEST)
}

#[tokio::test]
async fn migrations_are_recorded_once() {
    let store = fresh_store().await;
    let first = ledger(&raw(&store));
    let names: Vec<(i64, &str)> = first.iter().map(|(v, n, _)| (*v, n.as_str())).collect();
    assert_eq!(names, EXPECTED);
    assert!(first.iter().all(|(_, _, at)| at.ends_with('Z')));

    // Again on the same handle, and again on reopen: nothing re-applied.
    store.migrate().await.expect("migrate again");
    let path = store.path().to_owned();
    drop(store);
    let store = SqliteEventStore::open(&path).await.expect("reopen");
    store.migrate().await.expect("and again");
    assert_eq!(ledger(&raw(&store)), first);
}

#[tokio::test]
async fn an_empty_file_is_refused_until_migrated() {
    let store = SqliteEventStore::open_with(fresh_path(), no_migrate())
        .await
        .expect("open succeeds so that migrate can run");
    let s = sid("Order-1");

    let append = store
        .append(&s, ExpectedVersion::Any, vec![ev("A", 1)])
        .await
        .expect_err("schema missing");
    assert!(is_schema_error(&append, 0), "{append:?}");
    assert!(append.to_string().contains("annals init"));
    let read = store.read_all(ReadAll::from_start()).next().await;
    assert!(
        matches!(read, Some(Err(ref e)) if is_schema_error(e, 0)),
        "{read:?}"
    );
    let version = store.stream_version(&s).await.expect_err("schema missing");
    assert!(is_schema_error(&version, 0));
    let snapshot = store
        .load_snapshot("Order", "1")
        .await
        .expect_err("schema missing");
    assert!(is_schema_error(&snapshot, 0));
    let checkpoint = store
        .load_checkpoint("p")
        .await
        .expect_err("schema missing");
    assert!(is_schema_error(&checkpoint, 0));

    store.migrate().await.expect("migrate");
    store
        .append(&s, ExpectedVersion::Any, vec![ev("A", 1)])
        .await
        .expect("append after migrate");
    assert_eq!(ledger(&raw(&store)).len(), EXPECTED.len());
}

#[tokio::test]
async fn an_old_schema_is_refused_then_upgraded() {
    let path = fresh_path();
    {
        // A file as the first release left it: only migration 1 applied.
        let conn = rusqlite::Connection::open(&path).expect("create");
        conn.execute_batch(include_str!("../../sql/bootstrap.sql"))
            .expect("ledger");
        conn.execute_batch(include_str!("../../sql/0001_events.sql"))
            .expect("events");
        conn.execute(
            "INSERT INTO annals_migrations VALUES (1, 'events', '2024-01-01T00:00:00Z')",
            [],
        )
        .expect("record");
    }
    let old = SqliteEventStore::open_with(&path, no_migrate())
        .await
        .expect("open");
    let err = old.stats().await.expect_err("behind");
    assert!(is_schema_error(&err, 1), "{err:?}");
    drop(old);

    let store = SqliteEventStore::open(&path).await.expect("open migrates");
    let rows = ledger(&raw(&store));
    assert_eq!(rows.len(), EXPECTED.len());
    assert_eq!(rows[0].2, "2024-01-01T00:00:00Z", "old rows are kept");
    store
        .append(&sid("Order-1"), ExpectedVersion::NoStream, vec![ev("A", 1)])
        .await
        .expect("append");
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let store = fresh_store().await;
    raw(&store)
        .execute(
            "INSERT INTO annals_migrations VALUES (99, 'future', '2999-01-01T00:00:00Z')",
            [],
        )
        .expect("record a future migration");
    let path = store.path().to_owned();
    drop(store);
    let err = SqliteEventStore::open(&path)
        .await
        .expect_err("newer schema");
    assert!(is_schema_error(&err, 99), "{err:?}");
    let store = SqliteEventStore::open_with(&path, no_migrate())
        .await
        .expect("open without migrating");
    let err = store.head_position().await.expect_err("newer schema");
    assert!(is_schema_error(&err, 99), "{err:?}");
}

#[tokio::test]
async fn schema_sql_creates_a_current_file() {
    let sql = SqliteEventStore::schema_sql();
    for table in [
        "annals_migrations",
        "events",
        "streams",
        "snapshots",
        "snapshot_staging",
        "checkpoints",
    ] {
        assert!(
            sql.contains(&format!("CREATE TABLE {table} ("))
                || sql.contains(&format!("CREATE TABLE IF NOT EXISTS {table} (")),
            "{table}"
        );
    }
    let path = fresh_path();
    rusqlite::Connection::open(&path)
        .expect("create")
        .execute_batch(&sql)
        .expect("the script runs");
    let store = SqliteEventStore::open_with(&path, no_migrate())
        .await
        .expect("open");
    store
        .append(&sid("Order-1"), ExpectedVersion::NoStream, vec![ev("A", 1)])
        .await
        .expect("the scripted schema is current");
}

#[tokio::test]
async fn two_stores_migrating_one_file_apply_each_migration_once() {
    let path = fresh_path();
    let (a, b) = tokio::join!(SqliteEventStore::open(&path), SqliteEventStore::open(&path));
    let (a, b) = (a.expect("open a"), b.expect("open b"));
    assert_eq!(ledger(&raw(&a)).len(), EXPECTED.len());
    a.append(&sid("Order-1"), ExpectedVersion::NoStream, vec![ev("A", 1)])
        .await
        .expect("append via a");
    b.append(
        &sid("Order-1"),
        ExpectedVersion::Exact(annals::StreamVersion(1)),
        vec![ev("A", 2)],
    )
    .await
    .expect("append via b sees a's commit");
}

/// Issue 7: opening an already migrated file and reading it takes no write
/// lock, so it succeeds at once while another process holds a write
/// transaction (it used to wait for the busy timeout, then fail "starting a
/// migration").
#[tokio::test]
async fn open_and_read_while_another_connection_holds_the_write_lock() {
    let store = fresh_store().await;
    let s = sid("Order-1");
    store
        .append(&s, ExpectedVersion::NoStream, vec![ev("A", 1), ev("B", 2)])
        .await
        .expect("append");
    let path = store.path().to_owned();
    drop(store);

    let writer = rusqlite::Connection::open(&path).expect("open the file");
    writer
        .execute_batch("BEGIN IMMEDIATE; DELETE FROM checkpoints;")
        .expect("take the write lock");
    // The lock is really held: another writer cannot start.
    let probe = rusqlite::Connection::open(&path).expect("open the file");
    probe
        .busy_timeout(std::time::Duration::ZERO)
        .expect("no wait");
    assert!(probe.execute_batch("BEGIN IMMEDIATE").is_err());

    let store = SqliteEventStore::open(&path)
        .await
        .expect("opening a current store takes no write lock");
    let events = store
        .read_stream_to_vec(&s, annals::ReadStream::forward())
        .await
        .expect("read_stream");
    assert_eq!(events.len(), 2);
    let feed: Vec<_> = store
        .read_all(ReadAll::from_start())
        .collect::<Vec<_>>()
        .await;
    assert_eq!(feed.len(), 2);
    assert!(feed.iter().all(Result::is_ok));
    store
        .migrate()
        .await
        .expect("migrate is a no-op without the lock");

    writer.execute_batch("ROLLBACK").expect("release the lock");
    store
        .append(
            &s,
            ExpectedVersion::Exact(annals::StreamVersion(2)),
            vec![ev("C", 3)],
        )
        .await
        .expect("writes work once the lock is gone");
}

/// Events written before migration 4 have no fingerprint: after the upgrade
/// an identical retry of one is still deduplicated (compared by value, even
/// where the old text wrote a float as `1e+16`) and a different payload
/// under its id is still a duplicate id.
#[tokio::test]
async fn events_from_before_fingerprints_still_deduplicate() {
    let path = fresh_path();
    let id = uuid::Uuid::now_v7();
    let data = serde_json::json!({"n": 1, "f": 1e16, "z": -0.0});
    {
        // A file as release 3 left it, with one event as that code wrote it.
        let conn = rusqlite::Connection::open(&path).expect("create");
        conn.execute_batch(include_str!("../../sql/bootstrap.sql"))
            .expect("ledger");
        for (version, name, sql) in [
            (1, "events", include_str!("../../sql/0001_events.sql")),
            (2, "snapshots", include_str!("../../sql/0002_snapshots.sql")),
            (
                3,
                "checkpoints",
                include_str!("../../sql/0003_checkpoints.sql"),
            ),
        ] {
            conn.execute_batch(sql).expect("migration");
            conn.execute(
                "INSERT INTO annals_migrations VALUES (?1, ?2, '2024-01-01T00:00:00Z')",
                rusqlite::params![version, name],
            )
            .expect("record");
        }
        conn.execute(
            "INSERT INTO events (event_id, stream_id, category, stream_version, event_type, \
             event_version, data, metadata, recorded_at) \
             VALUES (?1, 'Old-1', 'Old', 1, 'A', 1, ?2, '{}', 0)",
            rusqlite::params![
                &id.as_bytes()[..],
                serde_json::to_string(&data).expect("json")
            ],
        )
        .expect("old event");
        conn.execute(
            "INSERT INTO streams (stream_id, category, version) VALUES ('Old-1', 'Old', 1)",
            [],
        )
        .expect("old stream");
    }
    let store = SqliteEventStore::open(&path).await.expect("open migrates");
    assert_eq!(ledger(&raw(&store)).len(), EXPECTED.len());
    let event =
        |data: serde_json::Value| annals::NewEvent::new("A", data).with_id(annals::EventId(id));
    let again = store
        .append(
            &sid("Old-1"),
            ExpectedVersion::NoStream,
            vec![event(data.clone())],
        )
        .await
        .expect("identical retry");
    assert!(again.deduplicated);
    assert_eq!(again.first_version, annals::StreamVersion(1));
    let err = store
        .append(
            &sid("Old-1"),
            ExpectedVersion::Any,
            vec![event(serde_json::json!({"n": 2}))],
        )
        .await
        .expect_err("another payload");
    assert!(
        matches!(err, annals::Error::DuplicateEventId { .. }),
        "{err:?}"
    );
    assert_eq!(
        store.stream_version(&sid("Old-1")).await.expect("head"),
        Some(annals::StreamVersion(1))
    );
}
