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
    checkpoint_moved, checkpoint_name, ApplyError, BatchApplier, BatchContext, Error, HandlerError,
    ProjectionFilter, RecordedEvent,
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
    checkpoint: String,
    fence: Option<annals::Fence>,
}

impl PgEventStore {
    /// `projection` as an exactly-once [`annals::BatchApplier`]: give it to
    /// [`annals::ProjectionRunner::new`] with this store.
    pub fn transactional<P: PgProjection>(&self, projection: P) -> PgTransactional<P> {
        PgTransactional {
            store: self.clone(),
            checkpoint: checkpoint_name(projection.name(), projection.version()),
            projection,
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
        let mut client = self.store.ready_client("apply a projection batch").await?;
        let what = "cannot apply a projection batch";
        let tx = client.transaction().await.context(what)?;
        if let Some(fence) = &self.fence {
            crate::lease::limit_idle(&tx, fence).await?;
        }
        // The context's checkpoint: a partition's (`name@vN/pPofN`) when a
        // partitioned runner drives this applier.
        let checkpoint = &ctx.checkpoint;
        tx.execute(ENSURE_SQL, &[checkpoint]).await.context(what)?;
        let row = tx.query_one(LOCK_SQL, &[checkpoint]).await.context(what)?;
        // Fencing: the lease row stays locked until the commit, so a
        // takeover is ordered before this batch (refused) or after it.
        if let Some(fence) = &self.fence {
            crate::lease::check_fence(&tx, fence).await?;
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
        tx.execute(MOVE_SQL, &[checkpoint, &commit, &seq])
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
