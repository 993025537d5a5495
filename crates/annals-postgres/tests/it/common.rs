//! Test fixtures: fresh schemas, raw connections, cleanup, and waiting for
//! observable server states (a lock wait, a backend gone) instead of time.

use std::io::Write;
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

/// Set to `1` (as `.ci/run` does), a missing server fails the tests
/// instead of skipping them.
pub const REQUIRE_VAR: &str = "ANNALS_REQUIRE_POSTGRES";

/// The test server's URL, or `None` after a SKIPPED line on the process's
/// stderr. The line is written to the stderr handle, not with `eprintln!`,
/// which the test harness captures (and shows only for failing tests), so
/// `cargo test` shows which tests did not run.
///
/// # Panics
///
/// When no server is configured and [`REQUIRE_VAR`] is `1`.
pub fn url(test: &str) -> Option<String> {
    let url = server_url(test);
    if url.is_none() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: set {URL_VAR} (for example \
             postgres://postgres@127.0.0.1:5432/test) to run the PostgreSQL tests"
        );
    }
    url
}

/// The test server's URL, or `None` without a word (for callers that say
/// so themselves, like the conformance suite's macro).
///
/// # Panics
///
/// When no server is configured and [`REQUIRE_VAR`] is `1`.
pub fn server_url(test: &str) -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var(REQUIRE_VAR).as_deref() != Ok("1"),
                "{test}: {REQUIRE_VAR}=1 but {URL_VAR} is not set: the PostgreSQL tests \
                 must run (set {URL_VAR}, for example postgres://postgres@127.0.0.1:5432/test)"
            );
            None
        }
    }
}

/// `url` with `application_name` set to `app`, so that a test can find the
/// store's own backends in `pg_stat_activity` (and only those).
pub fn url_with_app(url: &str, app: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={app}")
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
    // The harness names each test's thread after the test; the suite's
    // macro prints the SKIPPED line.
    let test = std::thread::current().name().map(str::to_owned);
    let url = server_url(test.as_deref().unwrap_or("conformance test"))?;
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

/// [`fresh_store`] with group commit on two connections
/// (`PgOptions::group_commit`): the conformance suite's second run.
pub async fn fresh_group_store() -> Option<PgEventStore> {
    let test = std::thread::current().name().map(str::to_owned);
    let url = server_url(test.as_deref().unwrap_or("conformance test"))?;
    sweep_once(&url).await;
    let mut opts = options(&new_schema());
    opts.group_commit = Some(2);
    let store = PgEventStore::connect_with(&url, opts)
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    // See `fresh_store`.
    Some(store.with_horizon_wait(std::time::Duration::from_secs(30)))
}

/// A fresh, migrated schema that the test drops at its end.
pub struct TestDb {
    pub url: String,
    pub schema: String,
    /// The `application_name` of the store's connections (unique per test).
    pub app: String,
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
        let id = Uuid::now_v7().simple().to_string();
        // The random tail: the head of a v7 id is its timestamp.
        let app = format!("annals_t_{}", &id[id.len() - 16..]);
        let mut opts = options(&schema);
        f(&mut opts);
        let store = PgEventStore::connect_with(&url_with_app(&url, &app), opts)
            .await
            .expect("connect");
        store.migrate().await.expect("migrate");
        // See `fresh_store`: other tests hold transactions open.
        let store = store.with_horizon_wait(std::time::Duration::from_secs(30));
        Some(TestDb {
            url,
            schema,
            app,
            store,
        })
    }

    /// The pids of the store's backends that wait for a lock (`raw` must
    /// not be inside a transaction, see `wait_for_lock_wait`).
    pub async fn lock_waiters(&self, raw: &tokio_postgres::Client) -> Vec<i32> {
        raw.query(
            "SELECT pid FROM pg_stat_activity \
             WHERE application_name = $1 AND wait_event_type = 'Lock'",
            &[&self.app],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|r| r.get(0))
        .collect()
    }

    /// Waits until one of the store's backends waits for a lock (other
    /// than those in `except`), and returns its pid.
    ///
    /// Looks from a connection of its own: inside a transaction,
    /// `pg_stat_activity` is a snapshot taken at its first use.
    pub async fn wait_for_lock_wait(&self, except: &[i32]) -> i32 {
        let probe = self.raw().await;
        let deadline = tokio::time::Instant::now() + HANG;
        loop {
            let waiting = self.lock_waiters(&probe).await;
            if let Some(pid) = waiting.into_iter().find(|pid| !except.contains(pid)) {
                return pid;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no store connection waits for a lock after {HANG:?}"
            );
            // Pacing between two polls of the state, not a decision.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The pids of the store's backends.
    pub async fn backends(&self, raw: &tokio_postgres::Client) -> Vec<i32> {
        raw.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&self.app],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|r| r.get(0))
        .collect()
    }

    /// Terminates the given backends of the store (`pg_terminate_backend`)
    /// and waits until they are gone.
    pub async fn kill(&self, raw: &tokio_postgres::Client, pids: &[i32]) {
        raw.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND pid = ANY($2)",
            &[&self.app, &pids],
        )
        .await
        .expect("pg_terminate_backend");
        wait_until("the terminated backends to exit", || async {
            let alive = self.backends(raw).await;
            !pids.iter().any(|p| alive.contains(p))
        })
        .await;
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

/// How long [`wait_until`] waits for a state before it declares the test
/// hung. Not a decision by time: every state waited for is reached in
/// milliseconds when the code is right; this only turns a hang into a
/// failure with a message.
pub const HANG: Duration = Duration::from_secs(120);

/// Polls `cond` (typically a query of `pg_stat_activity`) until it holds.
///
/// # Panics
///
/// When it does not hold within [`HANG`].
pub async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + HANG;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still waiting for {what} after {HANG:?}"
        );
        // Pacing between two polls of the state, not a decision.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An idle-in-transaction session holding a transaction id, in the
/// cluster's `postgres` database (not the test database): it holds the
/// snapshot horizon back for every database of the cluster, and so for
/// every other test running on it. Keep it as short as the test needs.
///
/// [`end`](Self::end) rolls it back; if the test fails before that, `Drop`
/// terminates the backend from another connection, so a failing test never
/// leaves the cluster's horizon stuck.
pub struct IdleTransaction {
    url: String,
    pid: i32,
    client: Option<tokio_postgres::Client>,
}

impl IdleTransaction {
    /// Opens the session and its transaction, and takes a transaction id.
    pub async fn begin(url: &str) -> Self {
        let mut config: tokio_postgres::Config = url.parse().expect("test URL");
        config.dbname("postgres").application_name("annals_idle_tx");
        let (client, connection) = config.connect(NoTls).await.expect("connect to postgres");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get(0);
        let guard = IdleTransaction {
            url: url.to_owned(),
            pid,
            client: Some(client),
        };
        let client = guard.client.as_ref().expect("client");
        client.batch_execute("BEGIN").await.expect("begin");
        client
            .query_one("SELECT pg_current_xact_id()::text", &[])
            .await
            .expect("take a transaction id");
        guard
    }

    /// The transaction's backend.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Rolls the transaction back and closes the session.
    pub async fn end(mut self) {
        if let Some(client) = self.client.take() {
            client.batch_execute("ROLLBACK").await.expect("rollback");
        }
    }
}

impl Drop for IdleTransaction {
    fn drop(&mut self) {
        if self.client.take().is_none() {
            return;
        }
        // Possibly unwinding on the test's runtime, which cannot run another
        // one: terminate the backend from a thread of its own.
        let (url, pid) = (self.url.clone(), self.pid);
        let ended = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let client = raw_client(&url, None).await;
                client
                    .execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .await
                    .map(|_| ())
            })
        })
        .join();
        if !matches!(ended, Ok(Ok(()))) {
            let _ = writeln!(
                std::io::stderr(),
                "could not terminate the idle transaction's backend {pid}: {ended:?}"
            );
        }
    }
}
