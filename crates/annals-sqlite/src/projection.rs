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

use std::sync::Arc;

use annals::{
    checkpoint_moved, checkpoint_name, ApplyError, BatchApplier, BatchContext, GlobalPosition,
    HandlerError, ProjectionFilter, RecordedEvent,
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
    checkpoint: String,
    fence: Option<annals::Fence>,
}

impl SqliteEventStore {
    /// `projection` as an exactly-once [`annals::BatchApplier`]: give it to
    /// [`annals::ProjectionRunner::new`] with this store.
    pub fn transactional<P: SqliteProjection>(&self, projection: P) -> SqliteTransactional<P> {
        SqliteTransactional {
            store: self.clone(),
            checkpoint: checkpoint_name(projection.name(), projection.version()),
            projection: Arc::new(projection),
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
        let projection = Arc::clone(&self.projection);
        let events = events.to_vec();
        let ctx = ctx.clone();
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
                let stored: Option<(i64, i64)> = tx
                    .prepare_cached(LOAD_SQL)
                    .and_then(|mut s| {
                        s.query_row([&ctx.checkpoint], |r| Ok((r.get(0)?, r.get(1)?)))
                            .optional()
                    })
                    .map_err(db("reading a projection's checkpoint"))?;
                // Fencing: the writer lock orders this check with any
                // takeover of the lock, which is a write too.
                if let Some(f @ annals::Fence::Lock { lock, token, .. }) = &fence {
                    let now: Option<String> = tx
                        .prepare_cached("SELECT token FROM projection_locks WHERE name = ?1")
                        .and_then(|mut s| s.query_row([lock], |r| r.get(0)).optional())
                        .map_err(db("checking a projection's lock"))?;
                    match now {
                        Some(now) if &now == token => {}
                        Some(now) => return Err(f.fenced(&format!("token {now}"))),
                        None => return Err(f.fenced("no lock")),
                    }
                }
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
        let ctx = ctx.clone();
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
