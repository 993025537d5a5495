//! The store handle: options, the connection pool, and the schema checks.
//!
//! Every connection of the pool is opened with the store's schema as its
//! `search_path` and `READ COMMITTED` as its default isolation (the append
//! function re-reads the stream after taking its lock, which needs a fresh
//! snapshot per statement), so SQL text is schema-independent and
//! statements can be prepared once per connection and cached.
//!
//! `connect` never changes the database. It reads the schema version and,
//! when the schema exists, runs the transaction-id safety check; a missing or
//! older schema is not an error at connect time (so that `annals init` can
//! connect and then call [`PgEventStore::migrate`]), but every operation
//! then fails with [`annals::Error::SchemaVersion`] until the schema is
//! current. The first successful check is cached.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use annals::{Error, Result};
use deadpool_postgres::{Client, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::error::Context;
use crate::migrate::{self, SCHEMA_VERSION};

/// Default for [`PgEventStore::with_horizon_wait`].
pub(crate) const DEFAULT_HORIZON_WAIT: Duration = Duration::from_secs(1);

/// Options of [`PgEventStore::connect_with`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PgOptions {
    /// The PostgreSQL schema holding the store's tables (created by
    /// [`PgEventStore::migrate`]). `None` means `public`. Letters, digits
    /// and `_`, not starting with a digit, at most 63 bytes.
    pub schema: Option<String>,
    /// Maximum number of pooled connections (default 8).
    pub pool_size: usize,
    /// Rows fetched per round trip by the lazy reads (default
    /// [`annals::DEFAULT_BATCH_SIZE`]).
    pub batch_size: usize,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            schema: None,
            pool_size: 8,
            batch_size: annals::DEFAULT_BATCH_SIZE,
        }
    }
}

impl PgOptions {
    fn schema_name(&self) -> Result<String> {
        let name = self.schema.as_deref().unwrap_or("public");
        let mut chars = name.chars();
        let valid_start = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        let valid_rest = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_start || !valid_rest || name.len() > 63 {
            return Err(Error::Config(format!(
                "invalid PostgreSQL schema name {name:?}: use letters, digits and '_', \
                 not starting with a digit, at most 63 bytes"
            )));
        }
        if self.pool_size == 0 || self.batch_size == 0 {
            return Err(Error::Config(
                "pool_size and batch_size must be at least 1".into(),
            ));
        }
        Ok(name.to_owned())
    }
}

/// A PostgreSQL event store: implements every trait of the core
/// ([`annals::EventStore`], [`annals::StreamCatalog`],
/// [`annals::SnapshotStore`], [`annals::SnapshotAdmin`],
/// [`annals::SnapshotStaging`], [`annals::CheckpointStore`]) on one pool.
///
/// Cheap to clone; clones share the pool. See the crate documentation for
/// the global-order design and its cost.
#[derive(Clone)]
pub struct PgEventStore {
    pub(crate) inner: Arc<Inner>,
    pub(crate) horizon_wait: Duration,
}

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) schema: String,
    pub(crate) batch_size: usize,
    /// Set once the schema was found current and the xid check passed.
    ready: AtomicBool,
}

impl fmt::Debug for PgEventStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgEventStore")
            .field("schema", &self.inner.schema)
            .field("pool", &self.inner.pool.status())
            .field("batch_size", &self.inner.batch_size)
            .field("horizon_wait", &self.horizon_wait)
            .finish()
    }
}

fn pg_config(url: &str, schema: &str) -> Result<tokio_postgres::Config> {
    // The parse error never echoes the URL, which may hold a password.
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| Error::Config(format!("invalid PostgreSQL URL: {e}")))?;
    let mut options = config
        .get_options()
        .map(|o| format!("{o} "))
        .unwrap_or_default();
    // The server splits `options` on spaces; `\ ` escapes one.
    options.push_str(&format!(
        "-c search_path=\"{schema}\" -c default_transaction_isolation=read\\ committed"
    ));
    config.options(&options);
    if config.get_application_name().is_none() {
        config.application_name("annals");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    Ok(config)
}

impl PgEventStore {
    /// Connects with default [`PgOptions`] (schema `public`).
    ///
    /// Does not migrate. Succeeds on a database without the schema (then
    /// every operation returns [`annals::Error::SchemaVersion`] until
    /// [`migrate`](Self::migrate) runs), but fails with
    /// [`annals::Error::Unsafe`] when the stored events carry transaction
    /// ids from the future of this cluster (see the crate docs).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, PgOptions::default()).await
    }

    /// Connects with explicit options. See [`connect`](Self::connect).
    pub async fn connect_with(url: &str, options: PgOptions) -> Result<Self> {
        let schema = options.schema_name()?;
        let config = pg_config(url, &schema)?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .build()
            .map_err(|e| Error::Config(format!("cannot build the connection pool: {e}")))?;
        let store = PgEventStore {
            inner: Arc::new(Inner {
                pool,
                schema,
                batch_size: options.batch_size,
                ready: AtomicBool::new(false),
            }),
            horizon_wait: DEFAULT_HORIZON_WAIT,
        };
        let client = store.client("connect").await?;
        let found = migrate::current_version(&client).await?;
        if found >= 1 {
            check_xids(&client).await?;
        }
        if found == SCHEMA_VERSION {
            store.inner.ready.store(true, Ordering::Release);
        } else {
            tracing::warn!(
                schema = %store.inner.schema,
                found,
                expected = SCHEMA_VERSION,
                "the store's schema is not current: run `annals init`"
            );
        }
        Ok(store)
    }

    /// Sets how long `read_all` and `head_position` wait, at the tail of the
    /// log, for in-flight transactions that hold back events which are
    /// already committed (default 1 s; zero never waits).
    ///
    /// The wait only covers transactions that were running when the read
    /// started, so it never waits on writers that start later; when it
    /// expires the read returns what is safe to deliver.
    pub fn with_horizon_wait(mut self, wait: Duration) -> Self {
        self.horizon_wait = wait;
        self
    }

    /// Creates the schema if needed and applies every pending migration, each
    /// in its own transaction under an advisory lock (safe to run from
    /// several processes at once). Idempotent.
    pub async fn migrate(&self) -> Result<()> {
        let mut client = self.client("migrate").await?;
        migrate::migrate(&mut client, &self.inner.schema).await?;
        check_xids(&client).await?;
        self.inner.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// The full DDL of the current schema version as one script (what
    /// [`migrate`](Self::migrate) applies to an empty schema, plus the
    /// `annals_migrations` rows), for `annals schema --backend postgres`.
    pub fn schema_sql() -> String {
        migrate::schema_sql()
    }

    /// The schema version this build needs.
    pub const SCHEMA_VERSION: i64 = SCHEMA_VERSION;

    /// Checks that the schema is current and the store safe to use; every
    /// operation calls it. The first success is cached, so it costs one
    /// query only until then.
    ///
    /// Errors: [`annals::Error::SchemaVersion`] (run `annals init`),
    /// [`annals::Error::Unsafe`], or a backend error.
    pub async fn check_schema(&self) -> Result<()> {
        if self.inner.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let client = self.client("check the schema").await?;
        let found = migrate::current_version(&client).await?;
        if found != SCHEMA_VERSION {
            return Err(Error::SchemaVersion {
                found,
                expected: SCHEMA_VERSION,
            });
        }
        check_xids(&client).await?;
        self.inner.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// The number of committed events that `read_all` does not deliver yet,
    /// because a transaction that started before they committed is still
    /// running (their `tx_id` is at or above the snapshot horizon). Also
    /// recorded as the gauge `annals_pg_horizon_lag_events`.
    ///
    /// A value that stays above zero means a long transaction somewhere in
    /// the cluster is holding projections back.
    pub async fn horizon_lag(&self) -> Result<u64> {
        self.check_schema().await?;
        let client = self.client("measure the horizon lag").await?;
        let stmt = client
            .prepare_cached(
                "SELECT count(*) FROM events e \
                 WHERE e.tx_id >= pg_snapshot_xmin(pg_current_snapshot())",
            )
            .await
            .context("cannot prepare the horizon lag query")?;
        let n: i64 = client
            .query_one(&stmt, &[])
            .await
            .context("cannot measure the horizon lag")?
            .try_get(0)
            .context("cannot measure the horizon lag")?;
        let lag = u64::try_from(n).unwrap_or(0);
        metrics::gauge!("annals_pg_horizon_lag_events", "schema" => self.inner.schema.clone())
            .set(lag as f64);
        Ok(lag)
    }

    /// A pooled connection.
    pub(crate) async fn client(&self, what: &str) -> Result<Client> {
        self.inner.pool.get().await.context(what)
    }

    /// A pooled connection for an operation on the store's tables: checks
    /// the schema first.
    pub(crate) async fn ready_client(&self, what: &str) -> Result<Client> {
        self.check_schema().await?;
        self.client(what).await
    }
}

/// Refuses a store whose events carry transaction ids at or beyond this
/// cluster's next one.
///
/// The global order is the appending transaction's id. A store copied
/// logically (pg_dump / restore, logical replication) into a cluster whose
/// transaction counter is behind would give new events smaller ids than old
/// ones: they would sort before events that readers have already passed,
/// and those readers would never see them.
async fn check_xids(client: &Client) -> Result<()> {
    let row = client
        .query_one(
            "SELECT (SELECT e.tx_id FROM events e ORDER BY e.tx_id DESC LIMIT 1)::text::bigint, \
                    pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await
        .context("cannot check transaction ids")?;
    let newest: Option<i64> = row.try_get(0).context("cannot check transaction ids")?;
    let next: i64 = row.try_get(1).context("cannot check transaction ids")?;
    match newest {
        Some(newest) if newest >= next => Err(Error::Unsafe(format!(
            "the newest event was written by transaction {newest}, but this cluster's next \
             transaction id is {next}: the store was probably restored logically (pg_dump, \
             logical replication) into another cluster. New events would sort before existing \
             ones and readers that have passed them would miss them. Restore it physically \
             (pg_basebackup), or advance this cluster's transaction counter beyond {newest} \
             (pg_resetwal --epoch and --next-transaction-id) before using it"
        ))),
        _ => Ok(()),
    }
}
