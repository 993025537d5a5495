//! Schema versions: explicit migrations, concurrent inits, the lazy schema
//! check and the transaction-id safety check.

use annals::{Error, EventStore, ExpectedVersion, NewEvent, ReadAll, StreamId};
use annals_postgres::{PgEventStore, PgOptions};
use futures::StreamExt;
use serde_json::json;

use crate::common::{drop_schema, new_schema, options, raw_client, url, TestDb};

fn sid(s: &str) -> StreamId {
    StreamId::parse(s).expect("stream id")
}

/// Asserts that `rows` record every migration of this build once, in order,
/// up to [`PgEventStore::SCHEMA_VERSION`].
#[track_caller]
fn assert_every_migration(rows: &[(i32, String)]) {
    let migrations = PgEventStore::schema_sql()
        .matches("INSERT INTO annals_migrations")
        .count();
    assert_eq!(rows.len(), migrations, "{rows:?}");
    assert!(rows.windows(2).all(|w| w[0].0 < w[1].0), "{rows:?}");
    assert_eq!(
        rows.last().map(|r| i64::from(r.0)),
        Some(PgEventStore::SCHEMA_VERSION)
    );
}

async fn migration_rows(url: &str, schema: &str) -> Vec<(i32, String)> {
    raw_client(url, Some(schema))
        .await
        .query(
            "SELECT version, name FROM annals_migrations ORDER BY version",
            &[],
        )
        .await
        .expect("annals_migrations")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn migrate_is_idempotent() {
    let Some(db) = TestDb::new("migrate_is_idempotent").await else {
        return;
    };
    db.store.migrate().await.expect("second migrate");
    db.store.migrate().await.expect("third migrate");
    let rows = migration_rows(&db.url, &db.schema).await;
    assert_every_migration(&rows);
    assert_eq!(rows[0], (1, "initial".to_owned()));
    db.store
        .append(
            &sid("Mig-1"),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("E", json!({}))],
        )
        .await
        .expect("append after migrations");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_are_safe() {
    let Some(url) = url("concurrent_migrations_are_safe") else {
        return;
    };
    let schema = new_schema();
    let mut handles = Vec::new();
    for _ in 0..6 {
        let url = url.clone();
        let schema = schema.clone();
        handles.push(tokio::spawn(async move {
            let store = PgEventStore::connect_with(&url, options(&schema))
                .await
                .expect("connect");
            store.migrate().await.expect("concurrent migrate");
            store
        }));
    }
    let mut stores = Vec::new();
    for h in handles {
        stores.push(h.await.expect("task"));
    }
    let rows = migration_rows(&url, &schema).await;
    assert_every_migration(&rows);
    for (i, store) in stores.iter().enumerate() {
        store
            .append(
                &sid(&format!("Mig-{i}")),
                ExpectedVersion::NoStream,
                vec![NewEvent::new("E", json!({}))],
            )
            .await
            .expect("append");
    }
    drop_schema(&url, &schema).await;
}

#[tokio::test]
async fn missing_schema_reports_schema_version() {
    let Some(url) = url("missing_schema_reports_schema_version") else {
        return;
    };
    let schema = new_schema();
    // connect never creates anything, and succeeds without a schema.
    let store = PgEventStore::connect_with(&url, options(&schema))
        .await
        .expect("connect without schema");
    let expected = PgEventStore::SCHEMA_VERSION;
    let err = store
        .append(
            &sid("Mig-1"),
            ExpectedVersion::Any,
            vec![NewEvent::new("E", json!({}))],
        )
        .await
        .expect_err("append without schema");
    assert!(
        matches!(err, Error::SchemaVersion { found: 0, expected: e } if e == expected),
        "{err:?}"
    );
    assert!(err.to_string().contains("annals init"), "{err}");
    let first = store.read_all(ReadAll::from_start()).next().await;
    assert!(
        matches!(first, Some(Err(Error::SchemaVersion { found: 0, .. }))),
        "{first:?}"
    );
    assert!(matches!(
        store.check_schema().await,
        Err(Error::SchemaVersion { .. })
    ));
    let exists = raw_client(&url, None)
        .await
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
        .await
        .expect("query")
        .is_some();
    assert!(!exists, "connect must not create the schema");

    // Another process runs `annals init`: this handle notices.
    let other = PgEventStore::connect_with(&url, options(&schema))
        .await
        .expect("connect");
    other.migrate().await.expect("migrate");
    store.check_schema().await.expect("schema now current");
    store
        .append(
            &sid("Mig-1"),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("E", json!({}))],
        )
        .await
        .expect("append after migrate");
    drop_schema(&url, &schema).await;
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let Some(db) = TestDb::new("newer_schema_is_refused").await else {
        return;
    };
    db.raw()
        .await
        .execute(
            "INSERT INTO annals_migrations (version, name) VALUES (999, 'from the future')",
            &[],
        )
        .await
        .expect("insert");
    let store = PgEventStore::connect_with(&db.url, options(&db.schema))
        .await
        .expect("connect");
    assert!(matches!(
        store.stream_version(&sid("Mig-1")).await,
        Err(Error::SchemaVersion { found: 999, .. })
    ));
    assert!(matches!(
        store.migrate().await,
        Err(Error::SchemaVersion { found: 999, .. })
    ));
    db.cleanup().await;
}

#[tokio::test]
async fn schema_sql_builds_a_current_store() {
    let Some(url) = url("schema_sql_builds_a_current_store") else {
        return;
    };
    let schema = new_schema();
    let raw = raw_client(&url, None).await;
    raw.batch_execute(&format!(
        "CREATE SCHEMA \"{schema}\"; SET search_path TO \"{schema}\";"
    ))
    .await
    .expect("create schema");
    raw.batch_execute(&PgEventStore::schema_sql())
        .await
        .expect("apply schema_sql");
    let store = PgEventStore::connect_with(&url, options(&schema))
        .await
        .expect("connect");
    store.check_schema().await.expect("current");
    store
        .append(
            &sid("Sql-1"),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("E", json!({}))],
        )
        .await
        .expect("append");
    store.migrate().await.expect("nothing to migrate");
    drop_schema(&url, &schema).await;
}

/// A logical restore into a younger cluster leaves events whose transaction
/// ids are ahead of the cluster's counter; simulated by writing such an id.
#[tokio::test]
async fn restored_into_younger_cluster_is_refused() {
    let Some(db) = TestDb::new("restored_into_younger_cluster_is_refused").await else {
        return;
    };
    db.store
        .append(
            &sid("Old-1"),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("E", json!({}))],
        )
        .await
        .expect("append");
    PgEventStore::connect_with(&db.url, options(&db.schema))
        .await
        .expect("a healthy store connects");
    db.raw()
        .await
        .execute(
            "INSERT INTO events (tx_id, event_id, stream_id, category, stream_version, \
             event_type, event_version, data) \
             VALUES ('99999999999'::xid8, gen_random_uuid(), 'Old-1', 'Old', 2, 'E', 1, '{}')",
            &[],
        )
        .await
        .expect("insert future row");
    let err = PgEventStore::connect_with(&db.url, options(&db.schema))
        .await
        .expect_err("connect must refuse");
    assert!(matches!(err, Error::Unsafe(_)), "{err:?}");
    assert!(err.to_string().contains("99999999999"), "{err}");
    assert!(err.to_string().contains("restored"), "{err}");
    db.cleanup().await;
}

#[tokio::test]
async fn bad_options_are_config_errors() {
    let Some(url) = url("bad_options_are_config_errors") else {
        return;
    };
    for schema in ["bad-name", "1abc", "", "a\"b", &"x".repeat(64)] {
        let opts = PgOptions {
            schema: Some(schema.to_owned()),
            ..PgOptions::default()
        };
        assert!(
            matches!(
                PgEventStore::connect_with(&url, opts).await,
                Err(Error::Config(_))
            ),
            "{schema:?}"
        );
    }
    for opts in [
        PgOptions {
            pool_size: 0,
            ..PgOptions::default()
        },
        PgOptions {
            page_bytes: 0,
            ..PgOptions::default()
        },
        PgOptions {
            feed_connections: Some(0),
            ..PgOptions::default()
        },
    ] {
        assert!(
            matches!(
                PgEventStore::connect_with(&url, opts.clone()).await,
                Err(Error::Config(_))
            ),
            "{opts:?}"
        );
    }
    assert!(matches!(
        PgEventStore::connect("mysql://nope").await,
        Err(Error::Config(_))
    ));
}

/// A store created by release 1 (schema 1, no payload fingerprints) is
/// refused until `annals init`, then upgrades in place: its old events have
/// no fingerprint, and an identical retry of one is still deduplicated (its
/// payload compared by value: this one holds `f64::MAX`, which `jsonb` keeps
/// as a 309-digit integer and whose retry used to fail with "cannot read
/// stored event ids"), while another payload under its id is a duplicate.
#[tokio::test]
async fn schema_1_upgrades_and_old_events_still_deduplicate() {
    let Some(url) = url("schema_1_upgrades_and_old_events_still_deduplicate") else {
        return;
    };
    let schema = new_schema();
    let raw = raw_client(&url, None).await;
    raw.batch_execute(&format!(
        "CREATE SCHEMA \"{schema}\"; SET search_path TO \"{schema}\";
         CREATE TABLE annals_migrations (version int PRIMARY KEY, name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now());"
    ))
    .await
    .expect("ledger");
    raw.batch_execute(include_str!("../../sql/0001_initial.sql"))
        .await
        .expect("schema 1");
    raw.execute(
        "INSERT INTO annals_migrations (version, name) VALUES (1, 'initial')",
        &[],
    )
    .await
    .expect("record");
    let id = uuid::Uuid::now_v7();
    let data = json!({"max": f64::MAX, "f": 1e16, "z": -0.0, "n": 1});
    // As release 1 appended: the function without fingerprints.
    assert_eq!(
        crate::common::raw_append(&raw, "Old-1", id, data.clone()).await,
        0
    );

    let store = PgEventStore::connect_with(&url, options(&schema))
        .await
        .expect("connect");
    assert!(matches!(
        store.check_schema().await,
        Err(Error::SchemaVersion { found: 1, expected }) if expected == PgEventStore::SCHEMA_VERSION
    ));
    store.migrate().await.expect("annals init");
    store.check_schema().await.expect("current");
    let rows = migration_rows(&url, &schema).await;
    assert_eq!(rows[1], (2, "event_fingerprints".to_owned()));

    let event = |data: serde_json::Value| NewEvent::new("E", data).with_id(annals::EventId(id));
    let again = store
        .append(
            &sid("Old-1"),
            ExpectedVersion::NoStream,
            vec![event(data.clone())],
        )
        .await
        .expect("identical retry of an old event");
    assert!(again.deduplicated);
    let err = store
        .append(
            &sid("Old-1"),
            ExpectedVersion::Any,
            vec![event(json!({"n": 2}))],
        )
        .await
        .expect_err("another payload");
    assert!(matches!(err, Error::DuplicateEventId { .. }), "{err:?}");
    let old = store
        .read_event(annals::EventId(id))
        .await
        .expect("read_event")
        .expect("stored");
    assert_eq!(
        old.data.to_value().expect("payload")["max"].as_f64(),
        Some(f64::MAX)
    );

    // New appends store a fingerprint; the old row keeps none.
    store
        .append(
            &sid("Old-1"),
            ExpectedVersion::Exact(annals::StreamVersion(1)),
            vec![event(json!(1)).with_id(annals::EventId::new())],
        )
        .await
        .expect("append after the upgrade");
    let digests: Vec<Option<Vec<u8>>> = raw_client(&url, Some(&schema))
        .await
        .query(
            "SELECT data_digest FROM events ORDER BY stream_version",
            &[],
        )
        .await
        .expect("digests")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(digests.len(), 2);
    assert_eq!(digests[0], None);
    assert_eq!(digests[1].as_ref().map(Vec::len), Some(32));
    drop_schema(&url, &schema).await;
}
