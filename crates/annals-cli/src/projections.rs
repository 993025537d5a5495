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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use annals::bank::{Account, AccountEvent};
use annals::gdpr::{ErasureNotice, ERASED};
use annals::{
    checkpoint_name, Aggregate, BatchApplier, BatchContext, Error, EventId, GlobalPosition,
    HandlerError, PartitionOptions, PartitionedHandle, PartitionedRunner, ProjectionError,
    ProjectionFilter, ProjectionHandle, ProjectionRunner, RebuildOptions, RebuildProgress,
    RecordedEvent, RunnerOptions, TableNames,
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
    /// The master key file (`--key-file`; `None`: beside an SQLite
    /// database, none for PostgreSQL), read when `ANNALS_MASTER_KEY` is
    /// unset: projections read personal data decrypted.
    pub key_file: Option<PathBuf>,
}

impl ReadModelDb {
    /// The store's events decrypted with the master key (see
    /// `annals::gdpr`): a projection reads plaintext, or `"[erased]"` for a
    /// forgotten subject. Without a master key, an encrypted field is an
    /// error naming where the key was looked for; nothing is guessed.
    pub fn decrypting(&self) -> annals::Result<annals::GdprStore<AnyStore, AnyStore>> {
        self.decrypting_over(self.store.clone())
    }

    /// [`decrypting`](Self::decrypting) over `inner`, a handle on the same
    /// database (for a backend's own traits, such as PostgreSQL's partition
    /// leases); data keys are read through [`store`](Self::store).
    pub fn decrypting_over<S: annals::EventStore>(
        &self,
        inner: S,
    ) -> annals::Result<annals::GdprStore<S, AnyStore>> {
        let url: crate::DatabaseUrl = self
            .url
            .parse()
            .map_err(|e| Error::Config(format!("{e}")))?;
        let keys = crate::keys::KeySource::new(&url, self.key_file.clone());
        Ok(annals::GdprStore::new(inner, keys.crypto(&self.store)))
    }
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

    /// Rebuilds the read model up to the head
    /// ([`ProjectionRunner::rebuild`], or with `blue_green`
    /// [`ProjectionRunner::rebuild_blue_green`]), calling `progress` after
    /// each checkpoint. The default refuses: a projection opts in.
    fn rebuild<'a>(
        &'a self,
        db: &'a ReadModelDb,
        request: RebuildRequest,
        progress: &'a mut (dyn FnMut(&RebuildProgress) + Send),
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        let _ = (db, request, progress);
        let name = self.name().to_owned();
        async move {
            Err(unsupported_op(
                &name,
                "rebuilt by annals projections rebuild",
            ))
        }
        .boxed()
    }

    /// Applies the parked event `event_id` again through the handler
    /// ([`annals::retry_dead_letter`]). The default refuses: a projection
    /// opts in.
    fn retry_dead_letter<'a>(
        &'a self,
        db: &'a ReadModelDb,
        event_id: EventId,
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        let _ = (db, event_id);
        let name = self.name().to_owned();
        async move { Err(unsupported_op(&name, "retry dead letters")) }.boxed()
    }

    /// Scrubs what the read model keeps about a forgotten subject (`annals
    /// gdpr forget` calls it on every registered projection, after the
    /// subject's key is deleted). By default nothing: a read model without
    /// personal data has nothing to scrub.
    fn on_erasure<'a>(
        &'a self,
        db: &'a ReadModelDb,
        notice: &'a ErasureNotice,
    ) -> BoxFuture<'a, annals::Result<()>> {
        let _ = (db, notice);
        async { Ok(()) }.boxed()
    }
}

/// What [`ProjectionOps::rebuild`] is asked to do.
#[derive(Clone, Debug)]
pub struct RebuildRequest {
    /// Pages, checkpoints, and whether to start over.
    pub options: RebuildOptions,
    /// Into shadow tables, then a swap (see [`annals::blue_green`]).
    pub blue_green: bool,
    /// Counts the rebuild's lock keeper: give it to the runner
    /// ([`ProjectionRunner::track_locks`](annals::ProjectionRunner::track_locks)),
    /// so that the command, interrupted, waits for the lock's release
    /// before it exits.
    pub keepers: annals::LockKeepers,
}

fn unsupported_op(name: &str, what: &str) -> ProjectionError {
    ProjectionError::Store {
        projection: name.to_owned(),
        source: Error::Unsafe(format!("projection {name} cannot be {what}")),
    }
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

/// The DDL, the same on both backends, for the table named `t`.
fn create_sql(t: &str) -> String {
    let t = annals::quote_ident(t);
    format!(
        "CREATE TABLE IF NOT EXISTS {t} (\
         stream_id TEXT PRIMARY KEY, \
         owner TEXT NOT NULL, \
         balance BIGINT NOT NULL, \
         last_commit BIGINT NOT NULL, \
         last_seq BIGINT NOT NULL)"
    )
}

/// Accounts opened in the batch: the owner, and the balance set to what
/// was moved after the (last) opening (placeholders `$n` or `?n`).
fn opened_sql(t: &str, p: char) -> String {
    let t = annals::quote_ident(t);
    format!(
        "INSERT INTO {t} AS r \
         (stream_id, owner, balance, last_commit, last_seq) \
         VALUES ({p}1, {p}2, {p}3, {p}4, {p}5) \
         ON CONFLICT (stream_id) DO UPDATE SET owner = excluded.owner, \
         balance = excluded.balance, \
         last_commit = excluded.last_commit, last_seq = excluded.last_seq"
    )
}

/// Accounts with only deposits and withdrawals in the batch: their sum
/// added.
fn moved_sql(t: &str, p: char) -> String {
    let t = annals::quote_ident(t);
    format!(
        "INSERT INTO {t} AS r \
         (stream_id, owner, balance, last_commit, last_seq) VALUES ({p}1, '', {p}2, {p}3, {p}4) \
         ON CONFLICT (stream_id) DO UPDATE SET balance = r.balance + excluded.balance, \
         last_commit = excluded.last_commit, last_seq = excluded.last_seq"
    )
}

/// The checkpoint and those of its partitions (`name@vN/pPofN`).
const RESET_CHECKPOINTS_SQLITE: &str = "DELETE FROM checkpoints \
     WHERE name = ?1 OR substr(name, 1, length(?1) + 2) = ?1 || '/p'";
const RESET_CHECKPOINTS_PG: &str = "DELETE FROM checkpoints \
     WHERE name = $1 OR substr(name, 1, length($1) + 2) = $1 || '/p'";
/// The dead letters of the same checkpoints: the rebuild delivers their
/// events again (a retry of a letter left behind would apply it twice).
const RESET_DEAD_LETTERS_SQLITE: &str = "DELETE FROM dead_letters \
     WHERE name = ?1 OR substr(name, 1, length(?1) + 2) = ?1 || '/p'";
const RESET_DEAD_LETTERS_PG: &str = "DELETE FROM dead_letters \
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

/// [`opened_sql`] for a whole batch on PostgreSQL: one row per element of
/// the arrays `$1`–`$5`.
fn opened_many_sql(t: &str) -> String {
    let t = annals::quote_ident(t);
    format!(
        "INSERT INTO {t} AS r (stream_id, owner, balance, last_commit, last_seq) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[]) \
         ON CONFLICT (stream_id) DO UPDATE SET owner = excluded.owner, \
         balance = excluded.balance, \
         last_commit = excluded.last_commit, last_seq = excluded.last_seq"
    )
}

/// [`moved_sql`] for a whole batch on PostgreSQL: one row per element of
/// the arrays `$1`–`$4`.
fn moved_many_sql(t: &str) -> String {
    let t = annals::quote_ident(t);
    format!(
        "INSERT INTO {t} AS r (stream_id, owner, balance, last_commit, last_seq) \
         SELECT s, '', b, c, q FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[]) \
         AS u(s, b, c, q) \
         ON CONFLICT (stream_id) DO UPDATE SET balance = r.balance + excluded.balance, \
         last_commit = excluded.last_commit, last_seq = excluded.last_seq"
    )
}

/// What a batch does to one account's row: the events folded in order.
struct RowChange {
    /// The owner of the last `Opened` in the batch (the row is then set,
    /// not added to).
    opened: Option<String>,
    /// The amounts moved after that opening (or in the whole batch).
    amount: i128,
    /// The position of the account's last event in the batch.
    commit: i64,
    seq: i64,
}

/// The batch folded into one change per account, in the order of the
/// accounts' first events, each event decoded through the one decode path.
/// Applying the changes gives the rows that applying the events one by one
/// would (an opening sets the owner and a zero balance; a deposit or a
/// withdrawal adds its signed amount), with one statement per account
/// instead of one per event.
fn fold(events: &[RecordedEvent]) -> Result<Vec<(String, RowChange)>, HandlerError> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut rows: Vec<(String, RowChange)> = Vec::new();
    for event in events {
        let decoded = annals::decode_event::<AccountEvent>(event)?;
        let p = event.global_position;
        let commit = i64::try_from(p.commit())?;
        let seq = i64::try_from(p.seq())?;
        let stream = event.stream_id.as_str();
        let i = *index.entry(stream).or_insert_with(|| {
            rows.push((
                stream.to_owned(),
                RowChange {
                    opened: None,
                    amount: 0,
                    commit,
                    seq,
                },
            ));
            rows.len() - 1
        });
        let row = &mut rows[i].1;
        match decoded {
            AccountEvent::Opened { owner, .. } => {
                row.opened = Some(owner);
                row.amount = 0;
            }
            AccountEvent::Deposited { amount } => row.amount += i128::from(amount),
            AccountEvent::Withdrew { amount } => row.amount -= i128::from(amount),
        }
        (row.commit, row.seq) = (commit, seq);
    }
    Ok(rows)
}

/// Row changes as columns (PostgreSQL arrays for `unnest`).
#[derive(Default)]
struct Columns {
    stream: Vec<String>,
    /// Only for opened accounts.
    owner: Vec<String>,
    amount: Vec<i64>,
    commit: Vec<i64>,
    seq: Vec<i64>,
}

/// A change's amount as the column's type.
fn amount(stream: &str, change: &RowChange) -> Result<i64, HandlerError> {
    i64::try_from(change.amount).map_err(|_| {
        format!(
            "account_balances: the amounts moved on {stream} up to position {}.{} \
             ({}) exceed a BIGINT balance",
            change.commit, change.seq, change.amount
        )
        .into()
    })
}

impl SqliteProjection for AccountBalances {
    fn name(&self) -> &str {
        NAME
    }
    fn filter(&self) -> ProjectionFilter {
        ProjectionFilter::all().categories([<Account as Aggregate>::TYPE])
    }
    fn tables(&self) -> Vec<String> {
        vec![ACCOUNT_BALANCES_TABLE.to_owned()]
    }
    fn create_tables(
        &self,
        tx: &rusqlite::Transaction<'_>,
        tables: &TableNames,
    ) -> Result<(), HandlerError> {
        tx.execute_batch(&create_sql(tables.name(ACCOUNT_BALANCES_TABLE)))?;
        Ok(())
    }
    fn handle(
        &self,
        tx: &rusqlite::Transaction<'_>,
        events: &[RecordedEvent],
        ctx: &BatchContext,
    ) -> Result<(), HandlerError> {
        let t = ctx.tables.name(ACCOUNT_BALANCES_TABLE);
        let mut opened = tx.prepare_cached(&opened_sql(t, '?'))?;
        let mut moved = tx.prepare_cached(&moved_sql(t, '?'))?;
        for (stream, change) in fold(events)? {
            let amount = amount(&stream, &change)?;
            let (commit, seq) = (change.commit, change.seq);
            match &change.opened {
                Some(owner) => {
                    opened.execute(rusqlite::params![stream, owner, amount, commit, seq])?
                }
                None => moved.execute(rusqlite::params![stream, amount, commit, seq])?,
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
    fn tables(&self) -> Vec<String> {
        vec![ACCOUNT_BALANCES_TABLE.to_owned()]
    }
    async fn create_tables(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        tables: &TableNames,
    ) -> Result<(), HandlerError> {
        tx.batch_execute(&create_sql(tables.name(ACCOUNT_BALANCES_TABLE)))
            .await?;
        Ok(())
    }
    async fn handle(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &[RecordedEvent],
        ctx: &BatchContext,
    ) -> Result<(), HandlerError> {
        // One statement per kind of change for the whole batch (not a
        // round trip per event).
        let t = ctx.tables.name(ACCOUNT_BALANCES_TABLE);
        let (mut opened, mut moved) = (Columns::default(), Columns::default());
        for (stream, change) in fold(events)? {
            let amount = amount(&stream, &change)?;
            let columns = match change.opened {
                Some(owner) => {
                    opened.owner.push(owner);
                    &mut opened
                }
                None => &mut moved,
            };
            columns.stream.push(stream);
            columns.amount.push(amount);
            columns.commit.push(change.commit);
            columns.seq.push(change.seq);
        }
        // The two statements touch disjoint rows (each account is in one of
        // them), so they are pipelined: both parses go out together, then
        // both executions (two round trips, not four).
        let (o, m) = (&opened, &moved);
        let (opened_sql, moved_sql) = (opened_many_sql(t), moved_many_sql(t));
        let opening = async {
            if !o.stream.is_empty() {
                tx.execute(
                    &opened_sql,
                    &[&o.stream, &o.owner, &o.amount, &o.commit, &o.seq],
                )
                .await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        };
        let moving = async {
            if !m.stream.is_empty() {
                tx.execute(&moved_sql, &[&m.stream, &m.amount, &m.commit, &m.seq])
                    .await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        };
        futures::try_join!(opening, moving)?;
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
            sql_batch(db, create_sql(ACCOUNT_BALANCES_TABLE)).await?;
            let store = db.decrypting()?;
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

    fn on_erasure<'a>(
        &'a self,
        db: &'a ReadModelDb,
        notice: &'a ErasureNotice,
    ) -> BoxFuture<'a, annals::Result<()>> {
        async move { self.scrub(db, notice).await.map(|_| ()) }.boxed()
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
            if sql_batch(db, create_sql(ACCOUNT_BALANCES_TABLE))
                .await
                .is_err()
            {
                sql_batch(db, create_sql(ACCOUNT_BALANCES_TABLE)).await?;
            }
            // Events read decrypted (personal data), as by `run`.
            Ok(match &db.store {
                AnyStore::Sqlite(s) => {
                    let store = s.clone();
                    PartitionedRunner::new(
                        db.decrypting()?,
                        move || store.transactional(AccountBalances),
                        options,
                    )
                    .spawn_local()
                }
                AnyStore::Postgres(p) => {
                    let store = p.clone();
                    PartitionedRunner::new(
                        db.decrypting_over(p.clone())?,
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
            sql_batch(db, create_sql(ACCOUNT_BALANCES_TABLE)).await?;
            let checkpoint = ProjectionOps::checkpoint(self);
            match sql_target(db)? {
                SqlTarget::Sqlite(path) => {
                    sqlite_job(path, move |conn| {
                        let tx = conn
                            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                        tx.execute("DELETE FROM account_balances", [])?;
                        tx.execute(RESET_CHECKPOINTS_SQLITE, [&checkpoint])?;
                        tx.execute(RESET_DEAD_LETTERS_SQLITE, [&checkpoint])?;
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
                        tx.execute(RESET_DEAD_LETTERS_PG, &[&checkpoint]).await?;
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

    fn rebuild<'a>(
        &'a self,
        db: &'a ReadModelDb,
        request: RebuildRequest,
        progress: &'a mut (dyn FnMut(&RebuildProgress) + Send),
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        async move {
            let store = db.decrypting().map_err(|source| ProjectionError::Store {
                projection: NAME.to_owned(),
                source,
            })?;
            let options = RunnerOptions {
                batch_size: request.options.batch_size,
                ..RunnerOptions::default()
            };
            match &db.store {
                AnyStore::Sqlite(s) => {
                    let runner = ProjectionRunner::new(store, s.transactional(*self))
                        .with_options(options)
                        .track_locks(request.keepers.clone());
                    if request.blue_green {
                        runner
                            .rebuild_blue_green(request.options, progress)
                            .await
                            .map(drop)
                    } else {
                        runner.rebuild(request.options, progress).await.map(drop)
                    }
                }
                AnyStore::Postgres(p) => {
                    let runner = ProjectionRunner::new(store, p.transactional(*self))
                        .with_options(options)
                        .track_locks(request.keepers.clone());
                    if request.blue_green {
                        runner
                            .rebuild_blue_green(request.options, progress)
                            .await
                            .map(drop)
                    } else {
                        runner.rebuild(request.options, progress).await.map(drop)
                    }
                }
                other => Err(ProjectionError::Store {
                    projection: NAME.to_owned(),
                    source: unsupported(other),
                }),
            }
        }
        .boxed()
    }

    fn retry_dead_letter<'a>(
        &'a self,
        db: &'a ReadModelDb,
        event_id: EventId,
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        async move {
            let store = db.decrypting().map_err(|source| ProjectionError::Store {
                projection: NAME.to_owned(),
                source,
            })?;
            match &db.store {
                AnyStore::Sqlite(s) => {
                    annals::retry_dead_letter(&store, &mut s.transactional(*self), event_id).await
                }
                AnyStore::Postgres(p) => {
                    annals::retry_dead_letter(&store, &mut p.transactional(*self), event_id).await
                }
                other => Err(ProjectionError::Store {
                    projection: NAME.to_owned(),
                    source: unsupported(other),
                }),
            }
        }
        .boxed()
    }
}

/// The owner of a forgotten account's row becomes `"[erased]"`, as a rebuild
/// would write it (`Opened`'s subject is the account id).
const SCRUB_SQLITE: &str = "UPDATE account_balances SET owner = ?1 WHERE stream_id = ?2";
const SCRUB_PG: &str = "UPDATE account_balances SET owner = $1 WHERE stream_id = $2";

impl AccountBalances {
    /// Scrubs the row of the forgotten account `notice.subject`; returns
    /// the rows changed.
    pub async fn scrub(&self, db: &ReadModelDb, notice: &ErasureNotice) -> annals::Result<u64> {
        sql_batch(db, create_sql(ACCOUNT_BALANCES_TABLE)).await?;
        let stream =
            annals::StreamId::new(<Account as Aggregate>::TYPE, &notice.subject)?.to_string();
        match sql_target(db)? {
            SqlTarget::Sqlite(path) => {
                sqlite_job(path, move |conn| {
                    conn.execute(SCRUB_SQLITE, rusqlite::params![ERASED, stream])
                        .map(|n| n as u64)
                })
                .await
            }
            SqlTarget::Postgres => {
                let (client, conn) = pg_client(db).await?;
                let out = client
                    .execute(SCRUB_PG, &[&ERASED, &stream])
                    .await
                    .map_err(pg_error("scrubbing account_balances"));
                drop(client);
                let _ = conn.await;
                out
            }
        }
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
    sql_batch(db, create_sql(ACCOUNT_BALANCES_TABLE)).await?;
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
async fn sql_batch(db: &ReadModelDb, sql: String) -> annals::Result<()> {
    match sql_target(db)? {
        SqlTarget::Sqlite(path) => sqlite_job(path, move |conn| conn.execute_batch(&sql)).await,
        SqlTarget::Postgres => {
            let (client, conn) = pg_client(db).await?;
            let out = client
                .batch_execute(&sql)
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
