//! The projections an ops binary knows ([`App::register_projection`]), and
//! the demo's `account_balances` read model.
//!
//! A registered projection is a [`ProjectionOps`]: its name and checkpoint,
//! how to start its runner on an [`AnyStore`], and how to reset it. The
//! commands of `annals projections` (and `annals check`'s `projection-lag`)
//! work on any registered projection through it.
//!
//! [`AccountBalances`] is the demo's read model: the table
//! `account_balances` (one row per `Account` stream: owner, balance, and the
//! position of the last event applied to the row) in the same database as
//! the events. It runs exactly-once through the backends' transactional
//! appliers (`SqliteEventStore::transactional`,
//! `PgEventStore::transactional`): a batch's rows and its checkpoint commit
//! in one transaction. Its reset deletes the rows and the checkpoint in one
//! transaction too.
//!
//! [`App::register_projection`]: crate::App::register_projection

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use annals::bank::{Account, AccountEvent};
use annals::{
    checkpoint_name, Aggregate, BatchApplier, BatchContext, Error, GlobalPosition, HandlerError,
    PartitionOptions, PartitionedHandle, PartitionedRunner, ProjectionError, ProjectionFilter,
    ProjectionHandle, ProjectionRunner, RecordedEvent, RunnerOptions,
};
use annals_postgres::PgProjection;
use annals_sqlite::SqliteProjection;
use futures::future::BoxFuture;
use futures::FutureExt;

use crate::AnyStore;

/// The database a projection runs on: the open store, and how to reach its
/// database for the read model's own SQL (the URL and the PostgreSQL
/// schema, as given to the command line).
#[derive(Clone, Debug)]
pub struct ReadModelDb {
    /// The event store (events and checkpoints).
    pub store: AnyStore,
    /// The database URL the store was opened with.
    pub url: String,
    /// The PostgreSQL schema of the store's tables (`None`: `public`).
    pub pg_schema: Option<String>,
}

/// One registered projection, type-erased (see the module docs).
pub trait ProjectionOps: Send + Sync + 'static {
    /// The projection's name (what `annals projections` takes).
    fn name(&self) -> &str;

    /// Its checkpoint's name ([`annals::checkpoint_name`]).
    fn checkpoint(&self) -> String;

    /// One line on what it builds (for `annals projections list`).
    fn describe(&self) -> String;

    /// Creates the read model's tables if missing, then starts the runner
    /// on the current tokio runtime.
    fn start<'a>(
        &'a self,
        db: &'a ReadModelDb,
        options: RunnerOptions,
    ) -> BoxFuture<'a, annals::Result<RunningProjection>>;

    /// Creates the read model's tables if missing, then starts a worker of
    /// the projection run as `options.partitions` partitions
    /// ([`annals::PartitionedRunner`]): on PostgreSQL a worker that shares
    /// the partitions with the other workers (on any machine) through
    /// leases; on SQLite one that runs all of them under the projection
    /// lock. The default refuses: the projection was not written for it.
    fn start_partitioned<'a>(
        &'a self,
        db: &'a ReadModelDb,
        options: PartitionOptions,
    ) -> BoxFuture<'a, annals::Result<PartitionedHandle>> {
        let _ = (db, options);
        async move {
            Err(Error::Config(format!(
                "projection {} does not run as partitions",
                self.name()
            )))
        }
        .boxed()
    }

    /// Deletes the checkpoint and the read model's rows, in one
    /// transaction where the read model lives in the store's database, so
    /// the next run rebuilds it from the first event.
    fn reset<'a>(&'a self, db: &'a ReadModelDb) -> BoxFuture<'a, annals::Result<()>>;
}

/// A started projection runner ([`ProjectionOps::start`]).
pub struct RunningProjection {
    name: String,
    handle: Box<dyn ErasedHandle>,
}

impl std::fmt::Debug for RunningProjection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningProjection")
            .field("name", &self.name)
            .field("checkpoint", &self.handle.checkpoint())
            .finish()
    }
}

impl RunningProjection {
    /// Wraps a runner's handle.
    pub fn new<A: BatchApplier>(handle: ProjectionHandle<A>) -> Self {
        RunningProjection {
            name: handle.name().to_owned(),
            handle: Box::new(handle),
        }
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last checkpoint the runner saved or loaded.
    pub fn checkpoint(&self) -> Option<GlobalPosition> {
        self.handle.checkpoint()
    }

    /// Waits until the checkpoint is at or past `position` (see
    /// [`ProjectionHandle::wait_for`]).
    pub async fn wait_for(
        &self,
        position: GlobalPosition,
        timeout: Duration,
    ) -> Result<(), ProjectionError> {
        self.handle.wait_for(position, timeout).await
    }

    /// Waits until the runner ends by itself (it failed: [`stop`](Self::stop)
    /// then returns why).
    pub async fn ended(&self) {
        // No checkpoint reaches this position; the wait ends with
        // `NotRunning` when the runner does.
        let never = GlobalPosition::new(u64::MAX, u64::MAX);
        loop {
            if let Err(ProjectionError::NotRunning { .. }) =
                self.handle.wait_for(never, Duration::from_secs(3600)).await
            {
                return;
            }
        }
    }

    /// Stops the runner after its current batch; the error it had stopped
    /// with, if any.
    pub async fn stop(self) -> Result<(), ProjectionError> {
        self.handle.stop().await
    }
}

trait ErasedHandle: Send + Sync {
    fn checkpoint(&self) -> Option<GlobalPosition>;
    fn wait_for(
        &self,
        position: GlobalPosition,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<(), ProjectionError>>;
    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), ProjectionError>>;
}

impl<A: BatchApplier> ErasedHandle for ProjectionHandle<A> {
    fn checkpoint(&self) -> Option<GlobalPosition> {
        ProjectionHandle::checkpoint(self)
    }
    fn wait_for(
        &self,
        position: GlobalPosition,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<(), ProjectionError>> {
        ProjectionHandle::wait_for(self, position, timeout).boxed()
    }
    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), ProjectionError>> {
        async move { ProjectionHandle::stop(*self).await.map(drop) }.boxed()
    }
}

/// The demo's read model: `account_balances`, one row per `Account` stream
/// (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct AccountBalances;

/// The table [`AccountBalances`] writes.
pub const ACCOUNT_BALANCES_TABLE: &str = "account_balances";

const NAME: &str = "account_balances";

/// The same DDL on both backends.
const CREATE_SQL: &str = "CREATE TABLE IF NOT EXISTS account_balances (\
     stream_id TEXT PRIMARY KEY, \
     owner TEXT NOT NULL, \
     balance BIGINT NOT NULL, \
     last_commit BIGINT NOT NULL, \
     last_seq BIGINT NOT NULL)";

/// Opened: the owner, and a zero balance.
const OPENED_PG: &str = "INSERT INTO account_balances \
     (stream_id, owner, balance, last_commit, last_seq) VALUES ($1, $2, 0, $3, $4) \
     ON CONFLICT (stream_id) DO UPDATE SET owner = excluded.owner, balance = 0, \
     last_commit = excluded.last_commit, last_seq = excluded.last_seq";
/// Deposited and Withdrew: the signed amount added.
const MOVED_PG: &str = "INSERT INTO account_balances \
     (stream_id, owner, balance, last_commit, last_seq) VALUES ($1, '', $2, $3, $4) \
     ON CONFLICT (stream_id) DO UPDATE SET balance = account_balances.balance + excluded.balance, \
     last_commit = excluded.last_commit, last_seq = excluded.last_seq";
const OPENED_SQLITE: &str = "INSERT INTO account_balances \
     (stream_id, owner, balance, last_commit, last_seq) VALUES (?1, ?2, 0, ?3, ?4) \
     ON CONFLICT (stream_id) DO UPDATE SET owner = excluded.owner, balance = 0, \
     last_commit = excluded.last_commit, last_seq = excluded.last_seq";
const MOVED_SQLITE: &str = "INSERT INTO account_balances \
     (stream_id, owner, balance, last_commit, last_seq) VALUES (?1, '', ?2, ?3, ?4) \
     ON CONFLICT (stream_id) DO UPDATE SET balance = account_balances.balance + excluded.balance, \
     last_commit = excluded.last_commit, last_seq = excluded.last_seq";

/// The checkpoint and those of its partitions (`name@vN/pPofN`).
const RESET_CHECKPOINTS_SQLITE: &str = "DELETE FROM checkpoints \
     WHERE name = ?1 OR substr(name, 1, length(?1) + 2) = ?1 || '/p'";
const RESET_CHECKPOINTS_PG: &str = "DELETE FROM checkpoints \
     WHERE name = $1 OR substr(name, 1, length($1) + 2) = $1 || '/p'";

/// How many partitions the checkpoint `checkpoint` (`name@vN`) was last run
/// as on SQLite, from its partitions' checkpoint names (`name@vN/pPofN`);
/// `None` when it never ran partitioned. (On PostgreSQL the lease rows
/// tell.)
pub(crate) async fn sqlite_partition_count(
    store: &annals_sqlite::SqliteEventStore,
    checkpoint: &str,
) -> annals::Result<Option<u32>> {
    let checkpoint = checkpoint.to_owned();
    let names: Vec<String> = sqlite_job(store.path().to_owned(), move |conn| {
        let mut s = conn.prepare(
            "SELECT name FROM checkpoints WHERE substr(name, 1, length(?1) + 2) = ?1 || '/p'",
        )?;
        let rows = s.query_map([&checkpoint], |r| r.get(0))?;
        rows.collect()
    })
    .await?;
    Ok(names
        .iter()
        .filter_map(|n| n.rsplit_once("of").and_then(|(_, c)| c.parse::<u32>().ok()))
        .max())
}

/// What one event does to its row.
enum Change {
    Opened(String),
    Moved(i64),
}

/// The event decoded through the one decode path, as a row change.
fn change(event: &RecordedEvent) -> Result<(String, Change, i64, i64), HandlerError> {
    let change = match annals::decode_event::<AccountEvent>(event)? {
        AccountEvent::Opened { owner } => Change::Opened(owner),
        AccountEvent::Deposited { amount } => Change::Moved(amount),
        AccountEvent::Withdrew { amount } => Change::Moved(-amount),
    };
    let p = event.global_position;
    let commit = i64::try_from(p.commit())?;
    let seq = i64::try_from(p.seq())?;
    Ok((event.stream_id.to_string(), change, commit, seq))
}

impl SqliteProjection for AccountBalances {
    fn name(&self) -> &str {
        NAME
    }
    fn filter(&self) -> ProjectionFilter {
        ProjectionFilter::all().categories([<Account as Aggregate>::TYPE])
    }
    fn handle(
        &self,
        tx: &rusqlite::Transaction<'_>,
        events: &[RecordedEvent],
        _ctx: &BatchContext,
    ) -> Result<(), HandlerError> {
        for event in events {
            let (stream, change, commit, seq) = change(event)?;
            match change {
                Change::Opened(owner) => tx
                    .prepare_cached(OPENED_SQLITE)?
                    .execute(rusqlite::params![stream, owner, commit, seq])?,
                Change::Moved(amount) => tx
                    .prepare_cached(MOVED_SQLITE)?
                    .execute(rusqlite::params![stream, amount, commit, seq])?,
            };
        }
        Ok(())
    }
}

impl PgProjection for AccountBalances {
    fn name(&self) -> &str {
        NAME
    }
    fn filter(&self) -> ProjectionFilter {
        ProjectionFilter::all().categories([<Account as Aggregate>::TYPE])
    }
    async fn handle(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &[RecordedEvent],
        _ctx: &BatchContext,
    ) -> Result<(), HandlerError> {
        let opened = tx.prepare(OPENED_PG).await?;
        let moved = tx.prepare(MOVED_PG).await?;
        for event in events {
            let (stream, change, commit, seq) = change(event)?;
            match change {
                Change::Opened(owner) => {
                    tx.execute(&opened, &[&stream, &owner, &commit, &seq])
                        .await?
                }
                Change::Moved(amount) => {
                    tx.execute(&moved, &[&stream, &amount, &commit, &seq])
                        .await?
                }
            };
        }
        Ok(())
    }
}

impl ProjectionOps for AccountBalances {
    fn name(&self) -> &str {
        NAME
    }

    fn checkpoint(&self) -> String {
        checkpoint_name(NAME, 1)
    }

    fn describe(&self) -> String {
        "the demo's Account balances: table account_balances (stream_id, owner, balance, \
         last applied position), exactly-once in the store's database"
            .to_owned()
    }

    fn start<'a>(
        &'a self,
        db: &'a ReadModelDb,
        options: RunnerOptions,
    ) -> BoxFuture<'a, annals::Result<RunningProjection>> {
        async move {
            sql_batch(db, CREATE_SQL).await?;
            let store = db.store.clone();
            Ok(match &db.store {
                AnyStore::Sqlite(s) => RunningProjection::new(
                    ProjectionRunner::new(store, s.transactional(*self))
                        .with_options(options)
                        .spawn(),
                ),
                AnyStore::Postgres(p) => RunningProjection::new(
                    ProjectionRunner::new(store, p.transactional(*self))
                        .with_options(options)
                        .spawn(),
                ),
                other => return Err(unsupported(other)),
            })
        }
        .boxed()
    }

    fn start_partitioned<'a>(
        &'a self,
        db: &'a ReadModelDb,
        options: PartitionOptions,
    ) -> BoxFuture<'a, annals::Result<PartitionedHandle>> {
        async move {
            // Workers start together: on PostgreSQL two concurrent `CREATE
            // TABLE IF NOT EXISTS` can collide on the catalog; the loser's
            // second try finds the table.
            if sql_batch(db, CREATE_SQL).await.is_err() {
                sql_batch(db, CREATE_SQL).await?;
            }
            Ok(match &db.store {
                AnyStore::Sqlite(s) => {
                    let store = s.clone();
                    PartitionedRunner::new(
                        s.clone(),
                        move || store.transactional(AccountBalances),
                        options,
                    )
                    .spawn_local()
                }
                AnyStore::Postgres(p) => {
                    let store = p.clone();
                    PartitionedRunner::new(
                        p.clone(),
                        move || store.transactional(AccountBalances),
                        options,
                    )
                    .spawn_leased()
                }
                other => return Err(unsupported(other)),
            })
        }
        .boxed()
    }

    fn reset<'a>(&'a self, db: &'a ReadModelDb) -> BoxFuture<'a, annals::Result<()>> {
        async move {
            sql_batch(db, CREATE_SQL).await?;
            let checkpoint = ProjectionOps::checkpoint(self);
            match sql_target(db)? {
                SqlTarget::Sqlite(path) => {
                    sqlite_job(path, move |conn| {
                        let tx = conn
                            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                        tx.execute("DELETE FROM account_balances", [])?;
                        tx.execute(RESET_CHECKPOINTS_SQLITE, [&checkpoint])?;
                        tx.commit()
                    })
                    .await
                }
                SqlTarget::Postgres => {
                    let (mut client, conn) = pg_client(db).await?;
                    let out = async {
                        let tx = client.transaction().await?;
                        tx.execute("DELETE FROM account_balances", &[]).await?;
                        tx.execute(RESET_CHECKPOINTS_PG, &[&checkpoint]).await?;
                        tx.commit().await
                    }
                    .await
                    .map_err(pg_error("resetting account_balances"));
                    drop(client);
                    let _ = conn.await;
                    out
                }
            }
        }
        .boxed()
    }
}

/// One row of `account_balances`.
#[derive(Clone, PartialEq, Eq, Debug, serde::Serialize)]
pub struct BalanceRow {
    /// The account's stream (`Account-ID`).
    pub stream_id: String,
    /// Its owner.
    pub owner: String,
    /// Its balance.
    pub balance: i64,
}

/// The rows of `account_balances` whose stream id starts with `prefix`,
/// ordered by stream id (none when the table does not exist yet).
pub async fn account_balances(db: &ReadModelDb, prefix: &str) -> annals::Result<Vec<BalanceRow>> {
    sql_batch(db, CREATE_SQL).await?;
    let pattern = format!("{}%", prefix.replace('%', "\\%").replace('_', "\\_"));
    match sql_target(db)? {
        SqlTarget::Sqlite(path) => {
            sqlite_job(path, move |conn| {
                let mut stmt = conn.prepare(
                    "SELECT stream_id, owner, balance FROM account_balances \
                     WHERE stream_id LIKE ?1 ESCAPE '\\' ORDER BY stream_id",
                )?;
                let rows = stmt.query_map([&pattern], |r| {
                    Ok(BalanceRow {
                        stream_id: r.get(0)?,
                        owner: r.get(1)?,
                        balance: r.get(2)?,
                    })
                })?;
                rows.collect()
            })
            .await
        }
        SqlTarget::Postgres => {
            let (client, conn) = pg_client(db).await?;
            let rows = client
                .query(
                    "SELECT stream_id, owner, balance FROM account_balances \
                     WHERE stream_id LIKE $1 ESCAPE '\\' ORDER BY stream_id",
                    &[&pattern],
                )
                .await
                .map_err(pg_error("reading account_balances"));
            drop(client);
            let _ = conn.await;
            rows?
                .iter()
                .map(|r| {
                    Ok(BalanceRow {
                        stream_id: r.try_get(0)?,
                        owner: r.try_get(1)?,
                        balance: r.try_get(2)?,
                    })
                })
                .collect::<Result<_, tokio_postgres::Error>>()
                .map_err(pg_error("reading account_balances"))
        }
    }
}

enum SqlTarget {
    Sqlite(PathBuf),
    Postgres,
}

fn sql_target(db: &ReadModelDb) -> annals::Result<SqlTarget> {
    Ok(match &db.store {
        AnyStore::Sqlite(s) => SqlTarget::Sqlite(s.path().to_owned()),
        AnyStore::Postgres(_) => SqlTarget::Postgres,
        other => return Err(unsupported(other)),
    })
}

fn unsupported(store: &AnyStore) -> Error {
    Error::Backend {
        backend: "projection",
        message: format!(
            "account_balances has no read model on the {} backend",
            store.backend()
        ),
        source: None,
    }
}

/// Runs `sql` (statements without parameters) on the store's database.
async fn sql_batch(db: &ReadModelDb, sql: &'static str) -> annals::Result<()> {
    match sql_target(db)? {
        SqlTarget::Sqlite(path) => sqlite_job(path, move |conn| conn.execute_batch(sql)).await,
        SqlTarget::Postgres => {
            let (client, conn) = pg_client(db).await?;
            let out = client
                .batch_execute(sql)
                .await
                .map_err(pg_error("creating account_balances"));
            drop(client);
            let _ = conn.await;
            out
        }
    }
}

/// Runs `f` on a connection of its own to the SQLite file, on a blocking
/// thread (never on the async runtime), waiting for the store's writer up
/// to 30 s.
async fn sqlite_job<T, F>(path: PathBuf, f: F) -> annals::Result<T>
where
    T: Send + 'static,
    F: FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
{
    let what = format!("read model SQL on {}", path.display());
    let job = tokio::task::spawn_blocking(move || {
        let mut conn = rusqlite::Connection::open(&path)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        f(&mut conn)
    });
    match job.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::Backend {
            backend: "sqlite",
            message: what,
            source: Some(Box::new(e)),
        }),
        Err(e) => Err(Error::Backend {
            backend: "sqlite",
            message: format!("{what}: the job ended abnormally: {e}"),
            source: None,
        }),
    }
}

type PgConn = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

/// A connection of its own to the store's PostgreSQL database, with the
/// store's schema on its `search_path`.
async fn pg_client(db: &ReadModelDb) -> annals::Result<(tokio_postgres::Client, PgConn)> {
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .map_err(pg_error("connecting for the read model"))?;
    let conn = tokio::spawn(connection);
    if let Some(schema) = &db.pg_schema {
        let ident = schema.replace('"', "\"\"");
        client
            .batch_execute(&format!("SET search_path TO \"{ident}\""))
            .await
            .map_err(pg_error("setting the search_path"))?;
    }
    Ok((client, conn))
}

fn pg_error(what: &'static str) -> impl Fn(tokio_postgres::Error) -> Error {
    move |e| Error::Backend {
        backend: "postgres",
        message: what.to_owned(),
        source: Some(Box::new(e)),
    }
}

/// The registered projections, by name.
pub(crate) type Registry = std::collections::BTreeMap<String, Arc<dyn ProjectionOps>>;
