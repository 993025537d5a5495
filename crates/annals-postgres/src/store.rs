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
//!
//! Checkouts wait at most `PgOptions::pool_wait_timeout` (then
//! [`annals::Error::Unavailable`]). Recycling is deadpool's fast method: a
//! connection whose socket is known to be closed is dropped at checkout, at
//! no round trip; one that dies under a call is found by the call's error,
//! removed from the pool, and the call runs again ([`with_client!`]). The
//! global feed takes its connections through a semaphore
//! (`PgOptions::feed_connections`) so that followers leave the rest of the
//! pool to writers.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use annals::{Error, Result, Upcasters};
use deadpool_postgres::{
    Client, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Timeouts,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_postgres::NoTls;

use crate::error::{backend_msg, connection_lost, pool_error, Context};
use crate::horizon::HorizonWatch;
use crate::migrate::{self, SCHEMA_VERSION};

/// Default for [`PgEventStore::with_horizon_wait`].
pub(crate) const DEFAULT_HORIZON_WAIT: Duration = Duration::from_secs(1);

/// Default of [`PgOptions::pool_wait_timeout`].
pub const DEFAULT_POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Default of [`PgOptions::page_bytes`]: 8 MiB.
pub const DEFAULT_PAGE_BYTES: usize = 8 << 20;

/// Connections a lost one is replaced by, within one call, before the call
/// gives up (see [`PgEventStore::with_client`]).
const MAX_RECONNECTS: u32 = 2;

/// Options of [`PgEventStore::connect_with`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PgOptions {
    /// The PostgreSQL schema holding the store's tables (created by
    /// [`PgEventStore::migrate`]). `None` means `public`. Letters, digits
    /// and `_`, not starting with a digit, at most 63 bytes.
    pub schema: Option<String>,
    /// Maximum number of pooled connections (default 8).
    pub pool_size: usize,
    /// How long a call waits for a free pooled connection before it fails
    /// with [`annals::Error::Unavailable`] (default
    /// [`DEFAULT_POOL_WAIT_TIMEOUT`], 30 s; zero fails at once when every
    /// connection is busy). Opening a new connection is bounded separately,
    /// by the URL's `connect_timeout` (10 s when the URL sets none).
    pub pool_wait_timeout: Duration,
    /// How many pooled connections the global feed may use at once:
    /// `read_all` pages, `head_position` and the store's horizon watch.
    /// Followers at the tail of the log then never hold every connection,
    /// and appends, stream reads and snapshots always find one. `None`
    /// (default): half the pool, at least one. At most `pool_size`.
    pub feed_connections: Option<usize>,
    /// Rows fetched per round trip by the lazy reads (default
    /// [`annals::DEFAULT_BATCH_SIZE`]).
    pub batch_size: usize,
    /// A read page also stops once it holds about this many bytes of
    /// payload and metadata (default [`DEFAULT_PAGE_BYTES`], 8 MiB), so a
    /// read of large events holds a few of them in memory at a time, not a
    /// batch. An event larger than this comes alone in its page.
    pub page_bytes: usize,
    /// Group commit: `Some(k)` gathers the appends waiting for a connection
    /// and sends up to 64 of them as one statement in one transaction, on
    /// at most `k` connections at once; each append still gets its own
    /// answer (a failed expected-version check answers only its caller) and
    /// is durable when its call returns. `None` (default): every append is
    /// a transaction of its own. Measured not to pay on this project's
    /// machine; see `docs/adr/003-postgres-group-commit.md`.
    pub group_commit: Option<usize>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            schema: None,
            pool_size: 8,
            pool_wait_timeout: DEFAULT_POOL_WAIT_TIMEOUT,
            feed_connections: None,
            batch_size: annals::DEFAULT_BATCH_SIZE,
            page_bytes: DEFAULT_PAGE_BYTES,
            group_commit: None,
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
        if self.pool_size == 0
            || self.batch_size == 0
            || self.page_bytes == 0
            || self.feed_connections == Some(0)
            || self.group_commit == Some(0)
        {
            return Err(Error::Config(
                "pool_size, feed_connections, batch_size, page_bytes and group_commit \
                 must be at least 1"
                    .into(),
            ));
        }
        Ok(name.to_owned())
    }

    /// The connections the feed may hold at once.
    fn feed_limit(&self) -> usize {
        self.feed_connections
            .unwrap_or(self.pool_size / 2)
            .clamp(1, self.pool_size)
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
    /// Applied to every event a read returns; per handle, so that
    /// [`PgEventStore::raw`] shares the pool and reads as stored.
    upcasters: Option<Arc<Upcasters>>,
}

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) schema: String,
    pub(crate) batch_size: usize,
    pub(crate) page_bytes: usize,
    /// How long a checkout waits (`PgOptions::pool_wait_timeout`).
    pool_wait: Duration,
    /// Permits for the feed's connections (`PgOptions::feed_connections`).
    feed: Arc<Semaphore>,
    /// The shared watch on the snapshot horizon.
    pub(crate) horizon: HorizonWatch,
    /// The `LISTEN` connection's signal (`EventStore::append_signal`).
    pub(crate) listener: crate::listen::AppendListener,
    /// The pool's connection settings, for the `LISTEN` connection.
    pub(crate) config: tokio_postgres::Config,
    /// Set once the schema was found current and the xid check passed.
    ready: AtomicBool,
    /// The group commit queue (`PgOptions::group_commit`).
    pub(crate) group: Option<crate::group::GroupCommit>,
}

impl fmt::Debug for PgEventStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgEventStore")
            .field("schema", &self.inner.schema)
            .field("pool", &self.inner.pool.status())
            .field("pool_wait_timeout", &self.inner.pool_wait)
            .field(
                "free_feed_connections",
                &self.inner.feed.available_permits(),
            )
            .field("batch_size", &self.inner.batch_size)
            .field("page_bytes", &self.inner.page_bytes)
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
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .wait_timeout(Some(options.pool_wait_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Config(format!("cannot build the connection pool: {e}")))?;
        let store = PgEventStore {
            inner: Arc::new(Inner {
                pool,
                schema,
                batch_size: options.batch_size,
                page_bytes: options.page_bytes,
                pool_wait: options.pool_wait_timeout,
                feed: Arc::new(Semaphore::new(options.feed_limit())),
                horizon: HorizonWatch::default(),
                listener: crate::listen::AppendListener::default(),
                config,
                ready: AtomicBool::new(false),
                group: options.group_commit.map(crate::group::GroupCommit::new),
            }),
            horizon_wait: DEFAULT_HORIZON_WAIT,
            upcasters: None,
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
    /// expires the read returns what is safe to deliver. A waiting read
    /// holds no pooled connection (see the crate docs).
    pub fn with_horizon_wait(mut self, wait: Duration) -> Self {
        self.horizon_wait = wait;
        self
    }

    /// This store (the same pool) with every read upcast by `upcasters`:
    /// aggregate loads, `read_stream`, `read_all`, `read_event`, the
    /// metadata lookups and the snapshot jobs all see events at their
    /// current versions (see [`annals::Upcasters`]).
    pub fn with_upcasters(mut self, upcasters: Arc<Upcasters>) -> Self {
        self.upcasters = Some(upcasters);
        self
    }

    /// Appends waiting for a group commit (always 0 without
    /// `PgOptions::group_commit`): lets a test see a group form.
    #[doc(hidden)]
    pub fn group_commit_waiting(&self) -> usize {
        self.inner.group.as_ref().map_or(0, |g| g.waiting())
    }

    /// This store (the same pool) reading events as stored, without
    /// upcasters (what `annals read --raw` shows).
    pub fn raw(&self) -> Self {
        PgEventStore {
            upcasters: None,
            ..self.clone()
        }
    }

    /// The upcasters this handle applies, if any.
    pub fn upcasters(&self) -> Option<&Upcasters> {
        self.upcasters.as_deref()
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

    /// A pooled connection, waiting at most the pool's wait timeout
    /// ([`annals::Error::Unavailable`] after that).
    pub(crate) async fn client(&self, what: &str) -> Result<Client> {
        let waited = self.inner.pool_wait;
        self.inner
            .pool
            .get()
            .await
            .map_err(|e| pool_error(what, e, waited))
    }

    /// A pooled connection for an operation on the store's tables: checks
    /// the schema first.
    pub(crate) async fn ready_client(&self, what: &str) -> Result<Client> {
        self.check_schema().await?;
        self.client(what).await
    }

    /// A pooled connection for the global feed: first one of the feed's
    /// permits, then a connection, both within one pool wait timeout.
    pub(crate) async fn feed_client(&self, what: &str) -> Result<FeedClient> {
        self.check_schema().await?;
        let waited = self.inner.pool_wait;
        let deadline = Instant::now() + waited;
        let unavailable = || Error::Unavailable {
            what: format!("a free feed connection to {what}"),
            after: waited,
        };
        let permit = tokio::time::timeout_at(deadline, self.inner.feed.clone().acquire_owned())
            .await
            .map_err(|_| unavailable())?
            .map_err(|_| backend_msg("the feed's connection limit was closed"))?;
        let timeouts = Timeouts {
            wait: Some(deadline.saturating_duration_since(Instant::now())),
            ..self.inner.pool.timeouts()
        };
        let client = self
            .inner
            .pool
            .timeout_get(&timeouts)
            .await
            .map_err(|e| pool_error(what, e, waited))?;
        Ok(FeedClient {
            client,
            _permit: permit,
        })
    }
}

/// Runs `$body` with `$client` bound to a pooled connection of `$lane`
/// ([`Lane`]) and evaluates to its `Result`. When the connection turns out
/// to be dead (terminated by the server, a broken socket), it is removed
/// from the pool for good and `$body` runs again on a fresh one, up to
/// [`MAX_RECONNECTS`] times (see [`Reconnect`]).
///
/// Only for idempotent operations: reads, and appends, whose event ids make
/// a repeated batch a no-op that returns the first assignment. A macro
/// rather than a function taking a closure, because the closure would
/// borrow the connection across awaits, and the futures must stay `Send`.
macro_rules! with_client {
    ($store:expr, $lane:expr, $what:expr, |$client:ident| $body:expr) => {{
        let mut reconnect = $crate::store::Reconnect::new($lane, $what);
        loop {
            let checkout = reconnect.checkout(&$store).await?;
            let result = {
                let $client: &::deadpool_postgres::Client = checkout.client();
                $body
            };
            if let Some(done) = reconnect.done(checkout, result) {
                break done;
            }
        }
    }};
}
pub(crate) use with_client;

/// The state of [`with_client!`]: which connections, and the error of a
/// connection that was lost.
pub(crate) struct Reconnect<'a> {
    lane: Lane,
    what: &'a str,
    left: u32,
    lost: Option<Error>,
}

impl<'a> Reconnect<'a> {
    pub(crate) fn new(lane: Lane, what: &'a str) -> Self {
        Reconnect {
            lane,
            what,
            left: MAX_RECONNECTS,
            lost: None,
        }
    }

    /// A connection. If none can be had after a connection was lost, the
    /// lost connection's error is returned: its operation may have taken
    /// effect, so it must not turn into an `Unavailable`, which promises
    /// that nothing was written.
    pub(crate) async fn checkout(&mut self, store: &PgEventStore) -> Result<Checkout> {
        let got = match self.lane {
            Lane::Any => store.ready_client(self.what).await.map(Checkout::Any),
            Lane::Feed => store.feed_client(self.what).await.map(Checkout::Feed),
        };
        match (got, self.lost.take()) {
            (Ok(client), _) => Ok(client),
            (Err(_), Some(lost)) => Err(lost),
            (Err(e), None) => Err(e),
        }
    }

    /// The outcome of one run on `checkout`: `Some` when it is final,
    /// `None` when the connection was lost (and is now discarded) and the
    /// operation should run again.
    pub(crate) fn done<T>(&mut self, checkout: Checkout, result: Result<T>) -> Option<Result<T>> {
        match result {
            Err(e) if connection_lost(&e) => {
                tracing::debug!(error = %e, what = self.what, "discarding a lost connection");
                checkout.discard();
                if self.left == 0 {
                    return Some(Err(e));
                }
                self.left -= 1;
                self.lost = Some(e);
                None
            }
            other => Some(other),
        }
    }
}

/// Which connections an operation may use.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Lane {
    /// Any pooled connection: appends, stream reads, everything else.
    Any,
    /// One of the feed's connections (`read_all`, `head_position`, the
    /// horizon watch), limited by `PgOptions::feed_connections`.
    Feed,
}

/// A pooled connection together with one of the feed's permits; both are
/// given back when it is dropped.
pub(crate) struct FeedClient {
    client: Client,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for FeedClient {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

/// A connection checked out by [`Reconnect`].
pub(crate) enum Checkout {
    Any(Client),
    Feed(FeedClient),
}

impl Checkout {
    pub(crate) fn client(&self) -> &Client {
        match self {
            Checkout::Any(c) => c,
            Checkout::Feed(c) => &c.client,
        }
    }

    /// Removes the connection from the pool (and closes it) instead of
    /// returning it: a dead connection is never handed out again.
    fn discard(self) {
        let client = match self {
            Checkout::Any(c) => c,
            Checkout::Feed(c) => c.client,
        };
        drop(Object::take(client));
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

impl annals::Upcasting for PgEventStore {
    fn with_upcasters(self, upcasters: Arc<Upcasters>) -> Self {
        PgEventStore::with_upcasters(self, upcasters)
    }
    fn raw(&self) -> Self {
        PgEventStore::raw(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_feed_gets_half_the_pool_by_default() {
        let options = |pool_size, feed_connections| PgOptions {
            pool_size,
            feed_connections,
            ..PgOptions::default()
        };
        assert_eq!(PgOptions::default().feed_limit(), 4);
        assert_eq!(options(1, None).feed_limit(), 1);
        assert_eq!(options(3, None).feed_limit(), 1);
        assert_eq!(options(8, Some(2)).feed_limit(), 2);
        assert_eq!(options(8, Some(20)).feed_limit(), 8);
        assert!(options(8, Some(0)).schema_name().is_err());
    }

    #[test]
    fn defaults_bound_waits_and_pages() {
        let options = PgOptions::default();
        assert_eq!(options.pool_wait_timeout, Duration::from_secs(30));
        assert_eq!(options.page_bytes, 8 * 1024 * 1024);
        assert!(options.schema_name().is_ok());
    }
}
