//! Exactly-once projections into the same PostgreSQL database: the handler
//! gets the transaction that also saves the checkpoint.
//!
//! [`PgEventStore::transactional`] wraps a [`PgProjection`] into an
//! [`annals::BatchApplier`] for [`annals::ProjectionRunner`]. Each batch is
//! one transaction on a pooled connection: make sure the checkpoint row
//! exists and lock it (`SELECT ... FOR UPDATE`, so two runners of one
//! projection apply batches one after the other), skip the batch if the
//! checkpoint is already at or past it (an earlier attempt committed, for
//! example one whose `COMMIT` reply was lost with its connection), fail it
//! with [`annals::checkpoint_moved`] if the checkpoint is anywhere else than
//! where the batch starts (another runner moved it, or it was reset), run the
//! handler's statements through the `tokio_postgres::Transaction` it is
//! given, move the checkpoint, commit. A handler that fails, a lost
//! connection, or a failed commit rolls everything back: the read model
//! never holds a batch whose checkpoint was not saved, and never gets a
//! batch twice. The runner then retries the batch (see its error policy).
//!
//! A projection that declares its tables ([`PgProjection::tables`], created
//! by [`PgProjection::create_tables`]) and writes them through
//! [`annals::BatchContext::tables`] can be rebuilt blue-green
//! ([`annals::ProjectionRunner::rebuild_blue_green`], see
//! [`annals::blue_green`]). Its live batches then also share-lock the
//! projection's row of `projection_versions` and read the active version;
//! the swap locks the same row for update first, so a live batch of the old version
//! either commits before the swap renames the tables (into the table that
//! is retired) or waits for it and finds itself superseded.
//!
//! Fencing: once the runner holds its lease it hands it to the applier
//! ([`annals::BatchApplier::set_fence`]), and every batch's transaction then
//! locks the lease row (`FOR SHARE`) and checks that it still carries the
//! runner's token: the projection lock's token for a single runner, the
//! partition's fencing token for a partitioned worker. A runner that was
//! paused past its lease and taken over fails with [`annals::Error::Fenced`]
//! and commits nothing. The transaction also sets
//! `idle_in_transaction_session_timeout` to the lease's length, so a
//! process paused inside a transaction cannot keep the rows it locked.

use std::future::Future;

use annals::{
    checkpoint_moved, checkpoint_name, quote_ident, retired_table, shadow_checkpoint_name,
    shadow_table, superseded, ApplyError, BatchApplier, BatchContext, BlueGreenApplier, Error,
    HandlerError, ProjectionFilter, RecordedEvent, TableNames,
};

use crate::error::Context;
use crate::rows::{position as position_of, to_i64};
use crate::PgEventStore;

/// A projection whose read model lives in the store's PostgreSQL database
/// (see the module docs). The handler gets the transaction; it must not
/// commit it.
pub trait PgProjection: Send + Sync + 'static {
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
    /// names `tables` gives them (live, or shadow for a blue-green rebuild),
    /// in the store's schema (the `search_path`); name indexes after
    /// `tables.name(TABLE)` so that shadow indexes do not collide with live
    /// ones.
    fn create_tables(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        tables: &TableNames,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = (tx, tables);
        async { Ok(()) }
    }

    /// Applies one batch (never empty) with `tx`. Its statements commit
    /// together with the checkpoint, or not at all. The connection's
    /// `search_path` is the store's schema.
    fn handle(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &[RecordedEvent],
        ctx: &BatchContext,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// The exactly-once applier of a [`PgProjection`]
/// ([`PgEventStore::transactional`]).
pub struct PgTransactional<P> {
    store: PgEventStore,
    projection: P,
    /// The checkpoint it saves now: the live one, or the shadow one during
    /// a blue-green rebuild.
    checkpoint: String,
    live_checkpoint: String,
    /// The names its tables have now (live, or shadow).
    tables: TableNames,
    fence: Option<annals::Fence>,
}

impl PgEventStore {
    /// `projection` as an exactly-once [`annals::BatchApplier`]: give it to
    /// [`annals::ProjectionRunner::new`] with this store.
    pub fn transactional<P: PgProjection>(&self, projection: P) -> PgTransactional<P> {
        let checkpoint = checkpoint_name(projection.name(), projection.version());
        PgTransactional {
            store: self.clone(),
            live_checkpoint: checkpoint.clone(),
            checkpoint,
            projection,
            tables: TableNames::default(),
            fence: None,
        }
    }
}

/// Creates the checkpoint row at the start if it is missing, so that it can
/// be locked.
const ENSURE_SQL: &str = "INSERT INTO checkpoints (name, commit_pos, seq, updated_at) \
     VALUES ($1, 0, 0, now()) ON CONFLICT (name) DO NOTHING";

const LOCK_SQL: &str = "SELECT commit_pos, seq FROM checkpoints WHERE name = $1 FOR UPDATE";

const MOVE_SQL: &str = "UPDATE checkpoints SET commit_pos = $2, seq = $3, updated_at = now() \
     WHERE name = $1 AND (commit_pos, seq) < ($2, $3)";

impl<P: PgProjection> BatchApplier for PgTransactional<P> {
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
        let position = ctx.position;
        let (Ok(commit), Ok(seq)) = (
            i64::try_from(position.commit()),
            i64::try_from(position.seq()),
        ) else {
            return Err(ApplyError::Store(Error::PositionOutOfRange {
                position,
                reason: "beyond what a PostgreSQL checkpoint stores".into(),
            }));
        };
        let mut ctx = ctx.clone();
        ctx.tables = self.tables.clone();
        let ctx = &ctx;
        let mut client = self.store.ready_client("apply a projection batch").await?;
        let what = "cannot apply a projection batch";
        let tx = client.transaction().await.context(what)?;
        let name = self.projection.name();
        let version = self.projection.version();
        let guard = !self.tables.is_shadow() && !self.projection.tables().is_empty();
        // The context's checkpoint: a partition's (`name@vN/pPofN`) when a
        // partitioned runner drives this applier.
        let checkpoint = &ctx.checkpoint;
        // Prepared once per pooled connection (deadpool's statement cache),
        // so each statement below is one message, not a parse and an
        // execute.
        let ensure = tx.prepare_cached(ENSURE_SQL).await.context(what)?;
        let lock = tx.prepare_cached(LOCK_SQL).await.context(what)?;
        let moved = tx.prepare_cached(MOVE_SQL).await.context(what)?;
        let active_stmts = match guard {
            true => Some((
                tx.prepare_cached(ENSURE_ACTIVE_SQL).await.context(what)?,
                tx.prepare_cached(SHARE_ACTIVE_SQL).await.context(what)?,
            )),
            false => None,
        };
        let fence_stmt = match &self.fence {
            Some(f) => Some(
                tx.prepare_cached(crate::lease::fence_sql(f))
                    .await
                    .context(what)?,
            ),
            None => None,
        };
        // The control statements, pipelined: `try_join!` polls them in this
        // order and tokio-postgres sends each request when it is first
        // polled, so the server runs them in this order, in one round trip.
        // First the idle timeout (before any lock: a worker paused in this
        // transaction cannot hold what it locks past its lease), then the
        // active version's share lock (before the checkpoint row, the order
        // the swap takes them in), the checkpoint row, and the lease row
        // (held until the commit, so a takeover is ordered before this
        // batch, which it refuses, or after it).
        let idle = limit_fenced_idle(&tx, self.fence.as_ref());
        let ensure_active = async {
            match &active_stmts {
                Some((ensure, _)) => tx.execute(ensure, &[&name]).await.context(what).map(drop),
                None => Ok(()),
            }
        };
        let share_active = async {
            match &active_stmts {
                Some((_, share)) => {
                    let row = tx.query_one(share, &[&name]).await.context(what)?;
                    let v: Option<i32> = row.try_get(0).context(what)?;
                    Ok(v.and_then(|v| u32::try_from(v).ok()))
                }
                None => Ok(None),
            }
        };
        let ensure_row = async { tx.execute(&ensure, &[checkpoint]).await.context(what) };
        let lock_row = async { tx.query_one(&lock, &[checkpoint]).await.context(what) };
        let fenced = async {
            match (&self.fence, &fence_stmt) {
                (Some(f), Some(stmt)) => crate::lease::check_fence(&tx, stmt, f).await,
                _ => Ok(()),
            }
        };
        let ((), (), active, _, row, ()) = futures::try_join!(
            idle,
            ensure_active,
            share_active,
            ensure_row,
            lock_row,
            fenced
        )?;
        if let Some(active) = active.filter(|a| *a > version) {
            return Err(ApplyError::Store(superseded(name, version, active)));
        }
        let stored: (i64, i64) = (row.try_get(0).context(what)?, row.try_get(1).context(what)?);
        if stored >= (commit, seq) {
            // Applied already (by an attempt that committed).
            return Ok(());
        }
        if stored != (to_i64(ctx.after.commit()), to_i64(ctx.after.seq())) {
            let at = position_of(stored.0, stored.1)?;
            return Err(ApplyError::Store(checkpoint_moved(ctx, at)));
        }
        // Dropping `tx` on an error rolls back whatever the handler wrote.
        // A partition's stretch without its events only moves the checkpoint.
        if !events.is_empty() {
            self.projection
                .handle(&tx, events, ctx)
                .await
                .map_err(ApplyError::Handler)?;
        }
        tx.execute(&moved, &[checkpoint, &commit, &seq])
            .await
            .context(what)?;
        tx.commit()
            .await
            .context("cannot commit a projection batch")?;
        Ok(())
    }

    fn set_fence(&mut self, fence: Option<annals::Fence>) {
        self.fence = fence;
    }

    async fn apply_parked(
        &mut self,
        event: &RecordedEvent,
        ctx: &BatchContext,
    ) -> Result<(), ApplyError> {
        let mut client = self
            .store
            .ready_client("retry a parked projection event")
            .await?;
        let what = "cannot retry a parked projection event";
        let mut ctx = ctx.clone();
        ctx.tables = self.tables.clone();
        let ctx = &ctx;
        let tx = client.transaction().await.context(what)?;
        // Dropping `tx` on an error rolls back whatever the handler wrote.
        self.projection
            .handle(&tx, std::slice::from_ref(event), ctx)
            .await
            .map_err(ApplyError::Handler)?;
        tx.commit().await.context(what)?;
        Ok(())
    }
}

/// Creates (if missing) and locks the projection's row of
/// `projection_versions`, returning its active version.
const LOCK_ACTIVE_SQL: &str = "INSERT INTO projection_versions (name) VALUES ($1) \
     ON CONFLICT (name) DO UPDATE SET name = excluded.name RETURNING active_version";

/// Creates the projection's row of `projection_versions` if missing.
const ENSURE_ACTIVE_SQL: &str =
    "INSERT INTO projection_versions (name) VALUES ($1) ON CONFLICT (name) DO NOTHING";
/// A live batch's view of the active version: the row share-locked until
/// the batch commits, so the swap (which updates the row) is ordered before
/// or after the batch, while batches of the same projection (its
/// partitions) do not queue behind one another.
const SHARE_ACTIVE_SQL: &str =
    "SELECT active_version FROM projection_versions WHERE name = $1 FOR SHARE";

async fn lock_active(
    tx: &tokio_postgres::Transaction<'_>,
    name: &str,
) -> annals::Result<Option<u32>> {
    let row = tx
        .query_one(LOCK_ACTIVE_SQL, &[&name])
        .await
        .context("cannot read a projection's active version")?;
    let v: Option<i32> = row
        .try_get(0)
        .context("cannot read a projection's active version")?;
    Ok(v.and_then(|v| u32::try_from(v).ok()))
}

async fn table_exists(tx: &tokio_postgres::Transaction<'_>, table: &str) -> annals::Result<bool> {
    let row = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_tables \
             WHERE schemaname = current_schema() AND tablename = $1)",
            &[&table],
        )
        .await
        .context("cannot look up a read-model table")?;
    row.try_get(0).context("cannot look up a read-model table")
}

fn handler_failed(what: &str, e: HandlerError) -> Error {
    Error::Backend {
        backend: "postgres",
        message: format!("{what}: {e}"),
        source: Some(e),
    }
}

/// The idle limit of a transaction under `fence` (a batch's or a
/// blue-green step's; its first statement, before any lock).
async fn limit_fenced_idle(
    tx: &tokio_postgres::Transaction<'_>,
    fence: Option<&annals::Fence>,
) -> annals::Result<()> {
    match fence {
        Some(f) => crate::lease::limit_idle(tx, f).await,
        None => Ok(()),
    }
}

/// The fence check of a blue-green step (entering the shadow, the swap),
/// the same as a batch's: the lease row locked until the commit, or
/// [`Error::Fenced`] when another runner took the lock over. Without it a
/// rebuild paused past its lease could drop the shadow tables of the
/// rebuild that took over, or swap them in half built.
async fn check_step_fence(
    tx: &deadpool_postgres::Transaction<'_>,
    fence: Option<&annals::Fence>,
) -> annals::Result<()> {
    let Some(f) = fence else { return Ok(()) };
    let stmt = tx
        .prepare_cached(crate::lease::fence_sql(f))
        .await
        .context("cannot check a projection's lease")?;
    crate::lease::check_fence(tx, &stmt, f).await
}

impl<P: PgProjection> PgTransactional<P> {
    /// Creates the projection's live tables if missing (before a live
    /// runner starts).
    pub async fn create_tables(&self) -> annals::Result<()> {
        let what = "cannot create a projection's tables";
        let mut client = self
            .store
            .ready_client("create a projection's tables")
            .await?;
        let tx = client.transaction().await.context(what)?;
        self.projection
            .create_tables(&tx, &self.tables)
            .await
            .map_err(|e| handler_failed(what, e))?;
        tx.commit().await.context(what)
    }
}

impl<P: PgProjection> BlueGreenApplier for PgTransactional<P> {
    fn version(&self) -> u32 {
        self.projection.version()
    }

    async fn active_version(&mut self) -> annals::Result<Option<u32>> {
        let what = "cannot read a projection's active version";
        let client = self
            .store
            .ready_client("read a projection's active version")
            .await?;
        let row = client
            .query_opt(
                "SELECT active_version FROM projection_versions WHERE name = $1",
                &[&self.projection.name()],
            )
            .await
            .context(what)?;
        let v: Option<i32> = match row {
            Some(r) => r.try_get(0).context(what)?,
            None => None,
        };
        Ok(v.and_then(|v| u32::try_from(v).ok()))
    }

    async fn enter_shadow(&mut self, fresh: bool) -> annals::Result<bool> {
        let live = self.projection.tables();
        if live.is_empty() {
            return Err(Error::Unsafe(format!(
                "projection {} declares no tables (PgProjection::tables): it cannot be \
                 rebuilt blue-green",
                self.projection.name()
            )));
        }
        let version = self.projection.version();
        let tables = TableNames::shadow(&live, version);
        let shadow_cp = shadow_checkpoint_name(&self.live_checkpoint);
        let what = "cannot create a blue-green rebuild's shadow tables";
        let mut client = self.store.ready_client("create shadow tables").await?;
        let tx = client.transaction().await.context(what)?;
        limit_fenced_idle(&tx, self.fence.as_ref()).await?;
        check_step_fence(&tx, self.fence.as_ref()).await?;
        let mut all = true;
        for t in &live {
            all &= table_exists(&tx, &shadow_table(t, version)).await?;
        }
        let resumed = all && !fresh;
        if !resumed {
            for t in &live {
                tx.batch_execute(&format!(
                    "DROP TABLE IF EXISTS {}",
                    quote_ident(&shadow_table(t, version))
                ))
                .await
                .context(what)?;
            }
            tx.execute("DELETE FROM checkpoints WHERE name = $1", &[&shadow_cp])
                .await
                .context(what)?;
            tx.execute("DELETE FROM dead_letters WHERE name = $1", &[&shadow_cp])
                .await
                .context(what)?;
        }
        self.projection
            .create_tables(&tx, &tables)
            .await
            .map_err(|e| handler_failed(what, e))?;
        tx.commit().await.context(what)?;
        self.tables = tables;
        self.checkpoint = shadow_cp;
        Ok(resumed)
    }

    async fn swap(&mut self) -> annals::Result<()> {
        let live = self.projection.tables();
        let version = self.projection.version();
        let name = self.projection.name().to_owned();
        let live_cp = self.live_checkpoint.clone();
        let shadow_cp = shadow_checkpoint_name(&live_cp);
        let what = "cannot swap a blue-green rebuild's tables";
        let mut client = self.store.ready_client("swap shadow tables").await?;
        let tx = client.transaction().await.context(what)?;
        limit_fenced_idle(&tx, self.fence.as_ref()).await?;
        // First the row lock: live batches of the old version wait here.
        let active = lock_active(&tx, &name).await?;
        // Then the lease row, in the order a batch takes them: a rebuild
        // whose lock was taken over swaps nothing.
        check_step_fence(&tx, self.fence.as_ref()).await?;
        if let Some(active) = active.filter(|a| *a > version) {
            return Err(Error::Unsafe(format!(
                "projection {name} v{active} is active: v{version} is not swapped in"
            )));
        }
        let mut shadows = true;
        for t in &live {
            shadows &= table_exists(&tx, &shadow_table(t, version)).await?;
        }
        if !shadows {
            if active == Some(version) {
                // Swapped already (an earlier call whose COMMIT reply was lost).
                self.tables = TableNames::default();
                self.checkpoint = live_cp;
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
            tx.batch_execute(&format!("DROP TABLE IF EXISTS {q_retired}"))
                .await
                .context(what)?;
            if table_exists(&tx, t).await? {
                tx.batch_execute(&format!("ALTER TABLE {q_live} RENAME TO {q_retired}"))
                    .await
                    .context(what)?;
            }
            tx.batch_execute(&format!("ALTER TABLE {q_shadow} RENAME TO {q_live}"))
                .await
                .context(what)?;
        }
        // The version's checkpoint is the shadow build's, exactly.
        tx.execute("DELETE FROM checkpoints WHERE name = $1", &[&live_cp])
            .await
            .context(what)?;
        tx.execute(
            "UPDATE checkpoints SET name = $1 WHERE name = $2",
            &[&live_cp, &shadow_cp],
        )
        .await
        .context(what)?;
        tx.execute("DELETE FROM dead_letters WHERE name = $1", &[&live_cp])
            .await
            .context(what)?;
        tx.execute(
            "UPDATE dead_letters SET name = $1 WHERE name = $2",
            &[&live_cp, &shadow_cp],
        )
        .await
        .context(what)?;
        let v = i32::try_from(version).map_err(|_| {
            Error::Unsafe(format!("projection {name} version {version} is too large"))
        })?;
        tx.execute(
            "UPDATE projection_versions SET active_version = $2, swapped_at = now() \
             WHERE name = $1",
            &[&name, &v],
        )
        .await
        .context(what)?;
        tx.commit().await.context(what)?;
        self.tables = TableNames::default();
        self.checkpoint = live_cp;
        Ok(())
    }

    async fn drop_retired(&mut self) -> annals::Result<()> {
        let client = self.store.ready_client("drop retired tables").await?;
        for t in self.projection.tables() {
            client
                .batch_execute(&format!(
                    "DROP TABLE IF EXISTS {}",
                    quote_ident(&retired_table(&t))
                ))
                .await
                .context("cannot drop the tables a blue-green swap retired")?;
        }
        Ok(())
    }
}
