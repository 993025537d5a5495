//! [`annals::ProjectionControl`] on PostgreSQL: projection locks and dead
//! letters in the store's schema.
//!
//! The lock is a lease row in `projection_locks`, taken by one upsert that
//! only replaces an expired row (`WHERE expires_at <= now()`, the database's
//! clock, so machines with skewed clocks agree): two store handles (two
//! machines) racing for it serialize on the row, and the second one sees
//! the first one's unexpired lease. Renewals and the release name the
//! acquisition's token, so a runner whose lease expired and was taken over
//! cannot renew it or delete the new holder's row.

use std::time::Duration;

use annals::{DeadLetter, EventId, LockAttempt, ProjectionLock, Result, StreamId};
use chrono::{DateTime, Utc};

use crate::error::{backend_msg, Context};
use crate::rows::{position, to_i64};
use crate::PgEventStore;

const ACQUIRE_SQL: &str = "INSERT INTO projection_locks AS l (name, owner, token, expires_at) \
     VALUES ($1, $2, $3, now() + make_interval(secs => $4)) \
     ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, token = EXCLUDED.token, \
     expires_at = EXCLUDED.expires_at WHERE l.expires_at <= now() \
     RETURNING expires_at";

const HOLDER_SQL: &str = "SELECT owner, token, expires_at FROM projection_locks WHERE name = $1";

fn secs(ttl: Duration) -> f64 {
    ttl.as_secs_f64()
}

fn holder(checkpoint: &str, row: &tokio_postgres::Row) -> Result<ProjectionLock> {
    let what = "cannot decode a projection lock";
    Ok(ProjectionLock {
        checkpoint: checkpoint.to_owned(),
        owner: row.try_get(0).context(what)?,
        token: row.try_get(1).context(what)?,
        expires_at: row.try_get(2).context(what)?,
    })
}

impl annals::ProjectionControl for PgEventStore {
    async fn live_partition_workers(&self, group: &str) -> Result<u32> {
        crate::lease::live_workers(self, group).await
    }

    async fn acquire_projection_lock(
        &self,
        checkpoint: &str,
        owner: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<LockAttempt> {
        let client = self.ready_client("take a projection lock").await?;
        let what = "cannot take a projection lock";
        // A holder that releases between the upsert and the read is gone:
        // try again (a few times; each round either takes it or sees one).
        for _ in 0..5 {
            let got = client
                .query_opt(ACQUIRE_SQL, &[&checkpoint, &owner, &token, &secs(ttl)])
                .await
                .context(what)?;
            if let Some(row) = got {
                let expires_at: DateTime<Utc> = row.try_get(0).context(what)?;
                return Ok(LockAttempt::Acquired(ProjectionLock {
                    checkpoint: checkpoint.to_owned(),
                    owner: owner.to_owned(),
                    token: token.to_owned(),
                    expires_at,
                }));
            }
            if let Some(row) = client
                .query_opt(HOLDER_SQL, &[&checkpoint])
                .await
                .context(what)?
            {
                return Ok(LockAttempt::Held(holder(checkpoint, &row)?));
            }
        }
        Err(backend_msg(format!(
            "projection lock {checkpoint:?} kept changing hands while being taken"
        )))
    }

    async fn renew_projection_lock(
        &self,
        lock: &ProjectionLock,
        ttl: Duration,
    ) -> Result<Option<ProjectionLock>> {
        let client = self.ready_client("renew a projection lock").await?;
        let what = "cannot renew a projection lock";
        let row = client
            .query_opt(
                "UPDATE projection_locks SET expires_at = now() + make_interval(secs => $3) \
                 WHERE name = $1 AND token = $2 RETURNING expires_at",
                &[&lock.checkpoint, &lock.token, &secs(ttl)],
            )
            .await
            .context(what)?;
        match row {
            None => Ok(None),
            Some(row) => Ok(Some(ProjectionLock {
                expires_at: row.try_get(0).context(what)?,
                ..lock.clone()
            })),
        }
    }

    async fn release_projection_lock(&self, lock: &ProjectionLock) -> Result<()> {
        let client = self.ready_client("release a projection lock").await?;
        client
            .execute(
                "DELETE FROM projection_locks WHERE name = $1 AND token = $2",
                &[&lock.checkpoint, &lock.token],
            )
            .await
            .context("cannot release a projection lock")?;
        Ok(())
    }

    async fn save_checkpoint_fenced(
        &self,
        name: &str,
        position: annals::GlobalPosition,
        fence: &annals::Fence,
    ) -> Result<()> {
        let (Ok(commit), Ok(seq)) = (
            i64::try_from(position.commit()),
            i64::try_from(position.seq()),
        ) else {
            return Err(annals::Error::PositionOutOfRange {
                position,
                reason: "beyond what a PostgreSQL checkpoint stores".into(),
            });
        };
        self.fenced_execute(
            fence,
            "save a fenced checkpoint",
            crate::checkpoint::SAVE_SQL,
            &[&name, &commit, &seq],
        )
        .await
    }

    async fn reset_checkpoint_fenced(&self, name: &str, fence: &annals::Fence) -> Result<()> {
        self.fenced_execute(
            fence,
            "reset a fenced checkpoint",
            "WITH letters AS (DELETE FROM dead_letters WHERE name = $1) \
             DELETE FROM checkpoints WHERE name = $1",
            &[&name],
        )
        .await
    }

    async fn projection_lock(&self, checkpoint: &str) -> Result<Option<ProjectionLock>> {
        let client = self.ready_client("read a projection lock").await?;
        let row = client
            .query_opt(HOLDER_SQL, &[&checkpoint])
            .await
            .context("cannot read a projection lock")?;
        row.map(|r| holder(checkpoint, &r)).transpose()
    }

    async fn park_event(&self, l: &DeadLetter) -> Result<()> {
        let client = self.ready_client("park an event").await?;
        let attempts = i32::try_from(l.attempts).unwrap_or(i32::MAX);
        client
            .execute(
                "INSERT INTO dead_letters (name, commit_pos, seq, event_id, stream_id, \
                 event_type, error, attempts, parked_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (name, commit_pos, seq) DO UPDATE SET error = EXCLUDED.error, \
                 attempts = EXCLUDED.attempts, parked_at = EXCLUDED.parked_at",
                &[
                    &l.checkpoint,
                    &to_i64(l.position.commit()),
                    &to_i64(l.position.seq()),
                    &l.event_id.0,
                    &l.stream.as_str(),
                    &l.event_type,
                    &l.error,
                    &attempts,
                    &l.parked_at,
                ],
            )
            .await
            .context("cannot park an event")?;
        Ok(())
    }

    async fn dead_letters(&self, checkpoint: &str) -> Result<Vec<DeadLetter>> {
        let client = self.ready_client("list dead letters").await?;
        let what = "cannot list dead letters";
        let rows = client
            .query(
                "SELECT commit_pos, seq, event_id, stream_id, event_type, error, attempts, \
                 parked_at FROM dead_letters WHERE name = $1 ORDER BY commit_pos, seq",
                &[&checkpoint],
            )
            .await
            .context(what)?;
        let mut all = Vec::with_capacity(rows.len());
        for row in rows {
            let stream: String = row.try_get(3).context(what)?;
            let attempts: i32 = row.try_get(6).context(what)?;
            all.push(DeadLetter {
                checkpoint: checkpoint.to_owned(),
                position: position(row.try_get(0).context(what)?, row.try_get(1).context(what)?)?,
                event_id: EventId(row.try_get(2).context(what)?),
                stream: StreamId::parse(&stream).map_err(|e| {
                    backend_msg(format!(
                        "dead letter of {checkpoint:?}: bad stream id {stream:?}: {e}"
                    ))
                })?,
                event_type: row.try_get(4).context(what)?,
                error: row.try_get(5).context(what)?,
                attempts: u32::try_from(attempts).unwrap_or(0),
                parked_at: row.try_get(7).context(what)?,
            });
        }
        Ok(all)
    }

    async fn drop_dead_letter(&self, checkpoint: &str, event_id: EventId) -> Result<bool> {
        let client = self.ready_client("drop a dead letter").await?;
        let n = client
            .execute(
                "DELETE FROM dead_letters WHERE name = $1 AND event_id = $2",
                &[&checkpoint, &event_id.0],
            )
            .await
            .context("cannot drop a dead letter")?;
        Ok(n > 0)
    }
}

impl PgEventStore {
    /// Runs `sql` in one transaction after the fence check of a batch
    /// (`crate::lease`: the idle limit, then the lease row share-locked
    /// until the commit, so a takeover is ordered before this write, which
    /// is then refused with [`annals::Error::Fenced`], or after it).
    async fn fenced_execute(
        &self,
        fence: &annals::Fence,
        what: &str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<()> {
        let failed = format!("cannot {what}");
        let mut client = self.ready_client(what).await?;
        let tx = client.transaction().await.context(&failed)?;
        crate::lease::limit_idle(&tx, fence).await?;
        let stmt = tx
            .prepare_cached(crate::lease::fence_sql(fence))
            .await
            .context(&failed)?;
        crate::lease::check_fence(&tx, &stmt, fence).await?;
        tx.execute(sql, params).await.context(&failed)?;
        tx.commit().await.context(&failed)
    }
}
