//! Exactly-once projections into the same SQLite file: the handler runs on
//! the writer thread, inside the transaction that also saves the
//! checkpoint.
//!
//! [`SqliteEventStore::transactional`] wraps a [`SqliteProjection`] into an
//! [`annals::BatchApplier`] for [`annals::ProjectionRunner`]. Each batch is
//! one writer job: `BEGIN IMMEDIATE`, read the checkpoint (a batch at or
//! below it was applied already: skipped), the handler's writes through the
//! `rusqlite::Transaction` it is given, the guarded checkpoint upsert,
//! `COMMIT`. A handler that fails, or panics, or a checkpoint that cannot
//! be saved, rolls the whole transaction back: the read model never holds a
//! batch whose checkpoint was not saved, and never gets a batch twice. The
//! runner then retries the batch (see its error policy).
//!
//! Fencing: once the runner holds its projection lock it hands the lock's
//! token to the applier ([`annals::BatchApplier::set_fence`]), and each
//! batch's transaction checks that `projection_locks` still carries it: a
//! runner that was paused past its lease while another process took the
//! lock over fails with [`annals::Error::Fenced`] and commits nothing.
//! Partition leases are PostgreSQL's: on SQLite one process runs all the
//! partitions of a projection under its lock
//! ([`annals::PartitionedRunner::spawn_local`]).
//!
//! The job holds the writer for as long as the handler runs, so appends
//! wait meanwhile: keep handlers to SQL on the read model (bounded batches
//! keep each job short).
//!
//! A projection that declares its tables ([`SqliteProjection::tables`],
//! created by [`SqliteProjection::create_tables`]) and writes them through
//! [`annals::BatchContext::tables`] can be rebuilt blue-green
//! ([`annals::ProjectionRunner::rebuild_blue_green`], see
//! [`annals::blue_green`]): the applier implements
//! [`annals::BlueGreenApplier`] with writer jobs (`BEGIN IMMEDIATE`), and its
//! live batches read the projection's active version in their transaction,
//! so a batch of a superseded version never lands after a swap (the writer
//! runs one job at a time, so the two cannot interleave).

use std::sync::Arc;

use annals::{
    checkpoint_moved, checkpoint_name, quote_ident, retired_table, shadow_checkpoint_name,
    shadow_table, superseded, ApplyError, BatchApplier, BatchContext, BlueGreenApplier, Error,
    GlobalPosition, HandlerError, ProjectionFilter, RecordedEvent, TableNames,
};
use rusqlite::{OptionalExtension, TransactionBehavior};

use crate::codec::{now_micros, sql_int};
use crate::error::db;
use crate::SqliteEventStore;

/// A projection whose read model lives in the store's SQLite file (see the
/// module docs). The handler gets the transaction; it must not commit it.
pub trait SqliteProjection: Send + Sync + 'static {
    /// The projection's name.
    fn name(&self) -> &str;

    /// Its version (a new version is a new checkpoint).
    fn version(&self) -> u32 {
        1
    }

    /// Which events it receives (default: all).
    fn filter(&self) -> ProjectionFilter {
        ProjectionFilter::all()
    }

    /// The tables it writes, by their live names (default: none). A
    /// projection that declares them writes them under
    /// `ctx.tables.name(TABLE)` and can be rebuilt blue-green.
    fn tables(&self) -> Vec<String> {
        Vec::new()
    }

    /// Creates its tables (and their indexes) if they are missing, under the
    /// names `tables` gives them (live, or shadow for a blue-green rebuild):
    /// name indexes after `tables.name(TABLE)` so that shadow indexes do not
    /// collide with live ones. Called before a live runner starts and when a
    /// blue-green rebuild creates its shadow tables.
    fn create_tables(
        &self,
        tx: &rusqlite::Transaction<'_>,
        tables: &TableNames,
    ) -> Result<(), HandlerError> {
        let _ = (tx, tables);
        Ok(())
    }

    /// Applies one batch (never empty) with `tx`, on the writer thread. Its
    /// writes commit together with the checkpoint, or not at all.
    fn handle(
        &self,
        tx: &rusqlite::Transaction<'_>,
        events: &[RecordedEvent],
        ctx: &BatchContext,
    ) -> Result<(), HandlerError>;
}

/// The exactly-once applier of a [`SqliteProjection`]
/// ([`SqliteEventStore::transactional`]).
pub struct SqliteTransactional<P> {
    store: SqliteEventStore,
    projection: Arc<P>,
    /// The checkpoint it saves now: the live one, or the shadow one during
    /// a blue-green rebuild.
    checkpoint: String,
    live_checkpoint: String,
    /// The names its tables have now (live, or shadow).
    tables: TableNames,
    fence: Option<annals::Fence>,
}

impl SqliteEventStore {
    /// `projection` as an exactly-once [`annals::BatchApplier`]: give it to
    /// [`annals::ProjectionRunner::new`] with this store.
    pub fn transactional<P: SqliteProjection>(&self, projection: P) -> SqliteTransactional<P> {
        let checkpoint = checkpoint_name(projection.name(), projection.version());
        SqliteTransactional {
            store: self.clone(),
            live_checkpoint: checkpoint.clone(),
            checkpoint,
            projection: Arc::new(projection),
            tables: TableNames::default(),
            fence: None,
        }
    }
}

const LOAD_SQL: &str = "SELECT position_commit, position FROM checkpoints WHERE name = ?1";

const SAVE_SQL: &str = "INSERT INTO checkpoints (name, position_commit, position, updated_at) \
    VALUES (?1, ?2, ?3, ?4) \
    ON CONFLICT (name) DO UPDATE SET position_commit = excluded.position_commit, \
    position = excluded.position, updated_at = excluded.updated_at \
    WHERE (excluded.position_commit, excluded.position) > \
          (checkpoints.position_commit, checkpoints.position)";

impl<P: SqliteProjection> BatchApplier for SqliteTransactional<P> {
    fn name(&self) -> &str {
        self.projection.name()
    }

    fn checkpoint(&self) -> String {
        self.checkpoint.clone()
    }

    fn filter(&self) -> ProjectionFilter {
        self.projection.filter()
    }

    async fn apply(
        &mut self,
        events: &[RecordedEvent],
        ctx: &BatchContext,
    ) -> Result<(), ApplyError> {
        self.apply_shared(&Arc::new(events.to_vec()), ctx).await
    }

    /// The writer job gets a reference to the batch, not a copy of it.
    async fn apply_shared(
        &mut self,
        events: &Arc<Vec<RecordedEvent>>,
        ctx: &BatchContext,
    ) -> Result<(), ApplyError> {
        let projection = Arc::clone(&self.projection);
        let events = Arc::clone(events);
        let mut ctx = ctx.clone();
        ctx.tables = self.tables.clone();
        // A live batch of a projection with tables checks that no newer
        // version was swapped in (see the module docs).
        let guard = !self.tables.is_shadow() && !projection.tables().is_empty();
        let commit = sql_int(ctx.position.commit());
        let seq = sql_int(ctx.position.seq());
        let after = (sql_int(ctx.after.commit()), sql_int(ctx.after.seq()));
        let fence = self.fence.clone();
        if let Some(f @ annals::Fence::Partition { .. }) = &fence {
            return Err(ApplyError::Store(annals::Error::Config(format!(
                "{}: partition leases are held in PostgreSQL; on SQLite one process runs \
                 all partitions under the projection lock (PartitionedRunner::spawn_local)",
                f.lease_name()
            ))));
        }
        let outcome = self
            .store
            .conns()
            .write(move |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db("starting a projection batch"))?;
                if guard {
                    check_active(&tx, projection.name(), projection.version())?;
                }
                let stored: Option<(i64, i64)> = tx
                    .prepare_cached(LOAD_SQL)
                    .and_then(|mut s| {
                        s.query_row([&ctx.checkpoint], |r| Ok((r.get(0)?, r.get(1)?)))
                            .optional()
                    })
                    .map_err(db("reading a projection's checkpoint"))?;
                check_lock_fence(&tx, fence.as_ref())?;
                let stored = stored.unwrap_or((0, 0));
                if stored >= (commit, seq) {
                    // Applied already (by an earlier attempt that committed).
                    return Ok(Ok(()));
                }
                if stored != after {
                    let at = GlobalPosition::new(
                        u64::try_from(stored.0).unwrap_or(0),
                        u64::try_from(stored.1).unwrap_or(0),
                    );
                    return Err(checkpoint_moved(&ctx, at));
                }
                // A partition's stretch without its events only moves the
                // checkpoint.
                if !events.is_empty() {
                    if let Err(e) = projection.handle(&tx, &events, &ctx) {
                        // Dropping `tx` rolls back whatever the handler wrote.
                        return Ok(Err(e));
                    }
                }
                tx.prepare_cached(SAVE_SQL)
                    .and_then(|mut s| {
                        s.execute(rusqlite::params![ctx.checkpoint, commit, seq, now_micros()])
                    })
                    .map_err(db("saving a projection's checkpoint"))?;
                tx.commit().map_err(db("committing a projection batch"))?;
                Ok(Ok(()))
            })
            .await?;
        outcome.map_err(ApplyError::Handler)
    }

    fn set_fence(&mut self, fence: Option<annals::Fence>) {
        self.fence = fence;
    }

    async fn apply_parked(
        &mut self,
        event: &RecordedEvent,
        ctx: &BatchContext,
    ) -> Result<(), ApplyError> {
        let projection = Arc::clone(&self.projection);
        let events = vec![event.clone()];
        let mut ctx = ctx.clone();
        ctx.tables = self.tables.clone();
        let outcome = self
            .store
            .conns()
            .write(move |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db("starting a parked event's retry"))?;
                if let Err(e) = projection.handle(&tx, &events, &ctx) {
                    return Ok(Err(e));
                }
                tx.commit()
                    .map_err(db("committing a parked event's retry"))?;
                Ok(Ok(()))
            })
            .await?;
        outcome.map_err(ApplyError::Handler)
    }
}

const ACTIVE_SQL: &str = "SELECT active_version FROM projection_versions WHERE name = ?1";

fn active_version(tx: &rusqlite::Connection, name: &str) -> annals::Result<Option<u32>> {
    let v: Option<Option<i64>> = tx
        .prepare_cached(ACTIVE_SQL)
        .and_then(|mut s| s.query_row([name], |r| r.get(0)).optional())
        .map_err(db("reading a projection's active version"))?;
    Ok(v.flatten().and_then(|v| u32::try_from(v).ok()))
}

/// Fails with [`annals::superseded`] when a version newer than `version`
/// is active.
fn check_active(tx: &rusqlite::Connection, name: &str, version: u32) -> annals::Result<()> {
    match active_version(tx, name)? {
        Some(active) if active > version => Err(superseded(name, version, active)),
        _ => Ok(()),
    }
}

fn table_exists(tx: &rusqlite::Connection, table: &str) -> annals::Result<bool> {
    tx.prepare_cached("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1")
        .and_then(|mut s| s.exists([table]))
        .map_err(db("looking up a read-model table"))
}

fn handler_failed(what: &str, e: HandlerError) -> Error {
    Error::Backend {
        backend: "sqlite",
        message: format!("{what}: {e}"),
        source: Some(e),
    }
}

impl<P: SqliteProjection> SqliteTransactional<P> {
    /// Creates the projection's live tables if missing (before a live
    /// runner starts).
    pub async fn create_tables(&self) -> annals::Result<()> {
        let projection = Arc::clone(&self.projection);
        let tables = self.tables.clone();
        self.store
            .conns()
            .write(move |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db("creating a projection's tables"))?;
                projection
                    .create_tables(&tx, &tables)
                    .map_err(|e| handler_failed("creating a projection's tables", e))?;
                tx.commit().map_err(db("creating a projection's tables"))
            })
            .await
    }
}

/// Fencing, inside a writer transaction (a batch's, or a blue-green step's:
/// entering the shadow, the swap): fails with [`Error::Fenced`] when the
/// projection lock no longer carries the applier's token. The writer lock
/// orders this check with any takeover of the lock, which is a write too.
/// Without it on the blue-green steps, a rebuild paused past its lease
/// could drop the shadow tables of the rebuild that took over, or swap them
/// in half built.
fn check_lock_fence(
    tx: &rusqlite::Transaction<'_>,
    fence: Option<&annals::Fence>,
) -> annals::Result<()> {
    let Some(f @ annals::Fence::Lock { lock, token, .. }) = fence else {
        return Ok(());
    };
    let now: Option<String> = tx
        .prepare_cached("SELECT token FROM projection_locks WHERE name = ?1")
        .and_then(|mut s| s.query_row([lock], |r| r.get(0)).optional())
        .map_err(db("checking a projection's lock"))?;
    match now {
        Some(now) if &now == token => Ok(()),
        Some(now) => Err(f.fenced(&format!("token {now}"))),
        None => Err(f.fenced("no lock")),
    }
}

impl<P: SqliteProjection> BlueGreenApplier for SqliteTransactional<P> {
    fn version(&self) -> u32 {
        self.projection.version()
    }

    async fn active_version(&mut self) -> annals::Result<Option<u32>> {
        let name = self.projection.name().to_owned();
        self.store
            .conns()
            .read(move |conn| active_version(conn, &name))
            .await
    }

    async fn enter_shadow(&mut self, fresh: bool) -> annals::Result<bool> {
        let projection = Arc::clone(&self.projection);
        let live = projection.tables();
        if live.is_empty() {
            return Err(Error::Unsafe(format!(
                "projection {} declares no tables (SqliteProjection::tables): it cannot be \
                 rebuilt blue-green",
                projection.name()
            )));
        }
        let version = projection.version();
        let tables = TableNames::shadow(&live, version);
        let shadow_cp = shadow_checkpoint_name(&self.live_checkpoint);
        let names = tables.clone();
        let cp = shadow_cp.clone();
        let fence = self.fence.clone();
        let resumed = self
            .store
            .conns()
            .write(move |conn| {
                let what = "creating a blue-green rebuild's shadow tables";
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db(what))?;
                check_lock_fence(&tx, fence.as_ref())?;
                let mut all = true;
                for t in &live {
                    all &= table_exists(&tx, &shadow_table(t, version))?;
                }
                let resumed = all && !fresh;
                if !resumed {
                    for t in &live {
                        tx.execute_batch(&format!(
                            "DROP TABLE IF EXISTS {}",
                            quote_ident(&shadow_table(t, version))
                        ))
                        .map_err(db(what))?;
                    }
                    tx.execute("DELETE FROM checkpoints WHERE name = ?1", [&cp])
                        .map_err(db(what))?;
                    tx.execute("DELETE FROM dead_letters WHERE name = ?1", [&cp])
                        .map_err(db(what))?;
                }
                projection
                    .create_tables(&tx, &names)
                    .map_err(|e| handler_failed(what, e))?;
                tx.commit().map_err(db(what))?;
                Ok(resumed)
            })
            .await?;
        self.tables = tables;
        self.checkpoint = shadow_cp;
        Ok(resumed)
    }

    async fn swap(&mut self) -> annals::Result<()> {
        let projection = Arc::clone(&self.projection);
        let live = projection.tables();
        let version = projection.version();
        let name = projection.name().to_owned();
        let live_cp = self.live_checkpoint.clone();
        let shadow_cp = shadow_checkpoint_name(&live_cp);
        let fence = self.fence.clone();
        self.store
            .conns()
            .write(move |conn| {
                let what = "swapping a blue-green rebuild's tables";
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db(what))?;
                check_lock_fence(&tx, fence.as_ref())?;
                let active = active_version(&tx, &name)?;
                if let Some(active) = active.filter(|a| *a > version) {
                    return Err(Error::Unsafe(format!(
                        "projection {name} v{active} is active: v{version} is not swapped in"
                    )));
                }
                let mut shadows = true;
                for t in &live {
                    shadows &= table_exists(&tx, &shadow_table(t, version))?;
                }
                if !shadows {
                    if active == Some(version) {
                        // Swapped already (an earlier call whose reply was lost).
                        return Ok(());
                    }
                    return Err(Error::Unsafe(format!(
                        "projection {name} v{version} has no shadow tables to swap in"
                    )));
                }
                for t in &live {
                    let (q_live, q_shadow, q_retired) = (
                        quote_ident(t),
                        quote_ident(&shadow_table(t, version)),
                        quote_ident(&retired_table(t)),
                    );
                    tx.execute_batch(&format!("DROP TABLE IF EXISTS {q_retired}"))
                        .map_err(db(what))?;
                    if table_exists(&tx, t)? {
                        tx.execute_batch(&format!("ALTER TABLE {q_live} RENAME TO {q_retired}"))
                            .map_err(db(what))?;
                    }
                    tx.execute_batch(&format!("ALTER TABLE {q_shadow} RENAME TO {q_live}"))
                        .map_err(db(what))?;
                }
                // The version's checkpoint is the shadow build's, exactly.
                tx.execute("DELETE FROM checkpoints WHERE name = ?1", [&live_cp])
                    .map_err(db(what))?;
                tx.execute(
                    "UPDATE checkpoints SET name = ?1 WHERE name = ?2",
                    [&live_cp, &shadow_cp],
                )
                .map_err(db(what))?;
                tx.execute("DELETE FROM dead_letters WHERE name = ?1", [&live_cp])
                    .map_err(db(what))?;
                tx.execute(
                    "UPDATE dead_letters SET name = ?1 WHERE name = ?2",
                    [&live_cp, &shadow_cp],
                )
                .map_err(db(what))?;
                tx.execute(
                    "INSERT INTO projection_versions (name, active_version, swapped_at) \
                     VALUES (?1, ?2, ?3) ON CONFLICT (name) DO UPDATE SET \
                     active_version = excluded.active_version, swapped_at = excluded.swapped_at",
                    rusqlite::params![name, i64::from(version), now_micros()],
                )
                .map_err(db(what))?;
                tx.commit().map_err(db(what))
            })
            .await?;
        self.tables = TableNames::default();
        self.checkpoint = self.live_checkpoint.clone();
        Ok(())
    }

    async fn drop_retired(&mut self) -> annals::Result<()> {
        let live = self.projection.tables();
        self.store
            .conns()
            .write(move |conn| {
                for t in &live {
                    conn.execute_batch(&format!(
                        "DROP TABLE IF EXISTS {}",
                        quote_ident(&retired_table(t))
                    ))
                    .map_err(db("dropping the tables a blue-green swap retired"))?;
                }
                Ok(())
            })
            .await
    }
}
