//! Test fixtures: fresh schemas, raw connections, cleanup.

use std::time::Duration;

use annals::{EventStore, ReadAll, RecordedEvent};
use annals_postgres::{PgEventStore, PgOptions};
use futures::TryStreamExt;
use serde_json::Value;
use tokio::sync::OnceCell;
use tokio_postgres::NoTls;
use uuid::Uuid;

/// The variable naming the test server.
pub const URL_VAR: &str = "ANNALS_TEST_POSTGRES_URL";

/// The test server's URL, or `None` (after a visible SKIPPED line).
pub fn url(test: &str) -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            eprintln!(
                "SKIPPED {test}: set {URL_VAR} (for example \
                 postgres://postgres@127.0.0.1:5432/test) to run the PostgreSQL tests"
            );
            None
        }
    }
}

/// A schema name no other test uses.
pub fn new_schema() -> String {
    format!("annals_test_{}", Uuid::now_v7().simple())
}

/// Options for a test schema.
pub fn options(schema: &str) -> PgOptions {
    PgOptions {
        schema: Some(schema.to_owned()),
        pool_size: 8,
        ..PgOptions::default()
    }
}

/// The conformance suite's factory: a migrated store in a fresh schema.
pub async fn fresh_store() -> Option<PgEventStore> {
    let url = url("conformance test")?;
    sweep_once(&url).await;
    let store = PgEventStore::connect_with(&url, options(&new_schema()))
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    // Tests in this binary hold transactions open on purpose (ordering.rs,
    // appends.rs), and the horizon is cluster-wide: a conformance test that
    // reads its own appends at the tail must wait those out, however long
    // they last, rather than give up after the default second.
    Some(store.with_horizon_wait(std::time::Duration::from_secs(30)))
}

/// A fresh, migrated schema that the test drops at its end.
pub struct TestDb {
    pub url: String,
    pub schema: String,
    pub store: PgEventStore,
}

impl TestDb {
    /// A migrated store with default options in a fresh schema.
    pub async fn new(test: &str) -> Option<Self> {
        Self::with_options(test, |_| {}).await
    }

    /// Same, with options adjusted by `f`.
    pub async fn with_options(test: &str, f: impl FnOnce(&mut PgOptions)) -> Option<Self> {
        let url = url(test)?;
        sweep_once(&url).await;
        let schema = new_schema();
        let mut opts = options(&schema);
        f(&mut opts);
        let store = PgEventStore::connect_with(&url, opts)
            .await
            .expect("connect");
        store.migrate().await.expect("migrate");
        // See `fresh_store`: other tests hold transactions open.
        let store = store.with_horizon_wait(std::time::Duration::from_secs(30));
        Some(TestDb { url, schema, store })
    }

    /// A plain connection with this schema on its search_path.
    pub async fn raw(&self) -> tokio_postgres::Client {
        raw_client(&self.url, Some(&self.schema)).await
    }

    /// Drops the schema.
    pub async fn cleanup(self) {
        drop_schema(&self.url, &self.schema).await;
    }
}

/// A plain tokio-postgres connection (optionally with a search_path).
pub async fn raw_client(url: &str, schema: Option<&str>) -> tokio_postgres::Client {
    let mut config: tokio_postgres::Config = url.parse().expect("test URL");
    if let Some(schema) = schema {
        config.options(format!("-c search_path={schema}"));
    }
    let (client, connection) = config.connect(NoTls).await.expect("raw connect");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

pub async fn drop_schema(url: &str, schema: &str) {
    let client = raw_client(url, None).await;
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await
        .expect("drop schema");
}

/// Once per test process: drops test schemas left over by runs that
/// finished more than an hour ago (tests that panic, or the conformance
/// suite, whose stores outlive the test body).
async fn sweep_once(url: &str) {
    static SWEPT: OnceCell<()> = OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            let client = raw_client(url, None).await;
            let Ok(rows) = client
                .query(
                    "SELECT n.nspname FROM pg_namespace n \
                     JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = 'annals_migrations' \
                     WHERE n.nspname LIKE 'annals\\_test\\_%'",
                    &[],
                )
                .await
            else {
                return;
            };
            for row in rows {
                let schema: String = row.get(0);
                let old = client
                    .query_one(
                        &format!(
                            "SELECT coalesce(max(applied_at) < now() - interval '1 hour', true) \
                             FROM \"{schema}\".annals_migrations"
                        ),
                        &[],
                    )
                    .await
                    .map(|r| r.get::<_, bool>(0))
                    .unwrap_or(false);
                if old {
                    let _ = client
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                        .await;
                }
            }
        })
        .await;
}

/// Appends through the SQL function on a raw connection (inside whatever
/// transaction the caller opened). Returns the outcome code.
pub async fn raw_append(
    client: &tokio_postgres::Client,
    stream: &str,
    id: Uuid,
    data: Value,
) -> i16 {
    let category = stream.split('-').next().expect("category");
    let row = client
        .query_one(
            "SELECT r_outcome FROM annals_append($1, $2, 0::smallint, 0, $3, $4, $5, $6, $7)",
            &[
                &stream,
                &category,
                &vec![id],
                &vec!["E"],
                &vec![1i32],
                &vec![data],
                &vec![serde_json::json!({})],
            ],
        )
        .await
        .expect("raw append");
    row.get(0)
}

/// The whole `read_all` feed.
pub async fn feed(store: &PgEventStore, opts: ReadAll) -> Vec<RecordedEvent> {
    store.read_all(opts).try_collect().await.expect("read_all")
}

/// Polls `cond` until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
