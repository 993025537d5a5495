//! [`annals::PartitionLeases`] on PostgreSQL: partition leases with
//! monotonically increasing fencing tokens, and the worker heartbeat table
//! (`partition_leases`, `partition_workers`; migration 12).
//!
//! Every statement is one row operation against the database's clock, so
//! workers on machines with skewed clocks agree on expiry:
//!
//! - claim: `UPDATE ... SET owner, fence = fence + 1, expires_at WHERE
//!   expires_at <= now()`: two workers racing for a partition serialize on
//!   its row, and the second one finds it unexpired;
//! - renew: `... SET expires_at WHERE fence = $held`: a worker that was taken
//!   over cannot renew, and learns it lost the partition;
//! - release: `... SET expires_at = 'epoch' WHERE fence = $held` (the token
//!   stays, the next claim raises it).
//!
//! The fenced commit itself lives with the applier
//! ([`PgEventStore::transactional`](crate::PgEventStore::transactional)):
//! `SELECT fence ... FOR SHARE` in the batch's transaction.

use std::time::Duration;

use annals::{Error, PartitionHolder, PartitionLease, Result};
use chrono::{DateTime, Utc};

use crate::error::Context;
use crate::PgEventStore;

fn secs(ttl: Duration) -> f64 {
    ttl.as_secs_f64()
}

fn int(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

const HEARTBEAT_SQL: &str = "INSERT INTO partition_workers (name, worker, expires_at) \
     VALUES ($1, $2, now() + make_interval(secs => $3)) \
     ON CONFLICT (name, worker) DO UPDATE SET expires_at = EXCLUDED.expires_at";

/// Forgets workers gone for a minute, skipping rows another statement
/// holds: no statement of the protocol ever waits on another worker.
const FORGET_SQL: &str = "DELETE FROM partition_workers WHERE ctid IN (\
     SELECT ctid FROM partition_workers \
     WHERE name = $1 AND expires_at <= now() - interval '1 minute' \
     FOR UPDATE SKIP LOCKED)";

/// The lease rows, unless the projection runs as another count (then the
/// check below refuses the worker, and nothing was added).
const ROWS_SQL: &str = "INSERT INTO partition_leases (name, partition, partitions) \
     SELECT $1, p, $2 FROM generate_series(0, $2 - 1) AS p \
     WHERE NOT EXISTS (SELECT 1 FROM partition_leases WHERE name = $1 AND partitions <> $2) \
     ON CONFLICT DO NOTHING";

const COUNTS_SQL: &str = "SELECT DISTINCT partitions FROM partition_leases WHERE name = $1";

const LIVE_SQL: &str =
    "SELECT count(*) FROM partition_workers WHERE name = $1 AND expires_at > now()";

const CLAIM_SQL: &str = "UPDATE partition_leases SET owner = $3, fence = fence + 1, \
     expires_at = now() + make_interval(secs => $4) \
     WHERE name = $1 AND partition = $2 AND expires_at <= now() \
     RETURNING fence, expires_at, partitions";

const RENEW_SQL: &str =
    "UPDATE partition_leases SET expires_at = now() + make_interval(secs => $4) \
     WHERE name = $1 AND partition = $2 AND fence = $3 RETURNING expires_at";

const RELEASE_SQL: &str = "UPDATE partition_leases SET expires_at = 'epoch' \
     WHERE name = $1 AND partition = $2 AND fence = $3";

const HOLDERS_SQL: &str = "SELECT partition, owner, fence, expires_at, expires_at > now() \
     FROM partition_leases WHERE name = $1 ORDER BY partition";

/// The live registrations of `group` in `partition_workers`
/// (`ProjectionControl::live_partition_workers`).
pub(crate) async fn live_workers(store: &PgEventStore, group: &str) -> Result<u32> {
    let client = store.ready_client("count partitioned workers").await?;
    count_live(&client, group, "cannot count partitioned workers").await
}

/// [`LIVE_SQL`] on `client`.
async fn count_live(
    client: &deadpool_postgres::Client,
    group: &str,
    what: &'static str,
) -> Result<u32> {
    let live: i64 = client
        .query_one(LIVE_SQL, &[&group])
        .await
        .context(what)?
        .try_get(0)
        .context(what)?;
    Ok(u32::try_from(live).unwrap_or(u32::MAX))
}

impl annals::PartitionLeases for PgEventStore {
    async fn join_partitions(
        &self,
        group: &str,
        partitions: u32,
        worker: &str,
        ttl: Duration,
    ) -> Result<u32> {
        // One statement at a time (no transaction): a worker paused between
        // two of them holds no lock another worker could wait on.
        let tx = self.ready_client("register a partitioned worker").await?;
        let what = "cannot register a partitioned worker";
        tx.execute(ROWS_SQL, &[&group, &int(partitions)])
            .await
            .context(what)?;
        let counts: Vec<i32> = tx
            .query(COUNTS_SQL, &[&group])
            .await
            .context(what)?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<std::result::Result<_, _>>()
            .context(what)?;
        if let Some(other) = counts.iter().find(|c| **c != int(partitions)) {
            return Err(Error::Config(format!(
                "projection {group} runs as {other} partitions, but this worker was started \
                 with {partitions}: use the same number on every worker (a new \
                 projection version to change it)"
            )));
        }
        tx.execute(HEARTBEAT_SQL, &[&group, &worker, &secs(ttl)])
            .await
            .context(what)?;
        tx.execute(FORGET_SQL, &[&group]).await.context(what)?;
        count_live(&tx, group, what).await
    }

    async fn leave_partitions(&self, group: &str, worker: &str) -> Result<()> {
        let client = self.ready_client("unregister a partitioned worker").await?;
        client
            .execute(
                "DELETE FROM partition_workers WHERE name = $1 AND worker = $2",
                &[&group, &worker],
            )
            .await
            .context("cannot unregister a partitioned worker")?;
        Ok(())
    }

    async fn claim_partition(
        &self,
        group: &str,
        partition: u32,
        partitions: u32,
        worker: &str,
        ttl: Duration,
    ) -> Result<Option<PartitionLease>> {
        let client = self.ready_client("claim a partition").await?;
        let what = "cannot claim a partition";
        let row = client
            .query_opt(CLAIM_SQL, &[&group, &int(partition), &worker, &secs(ttl)])
            .await
            .context(what)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let stored: i32 = row.try_get(2).context(what)?;
        if stored != int(partitions) {
            return Err(Error::Config(format!(
                "projection {group} runs as {stored} partitions, not {partitions}"
            )));
        }
        Ok(Some(PartitionLease {
            group: group.to_owned(),
            partition,
            partitions,
            owner: worker.to_owned(),
            fence: row.try_get(0).context(what)?,
            expires_at: row.try_get(1).context(what)?,
        }))
    }

    async fn renew_partition(
        &self,
        lease: &PartitionLease,
        ttl: Duration,
    ) -> Result<Option<PartitionLease>> {
        let client = self.ready_client("renew a partition lease").await?;
        let what = "cannot renew a partition lease";
        let row = client
            .query_opt(
                RENEW_SQL,
                &[
                    &lease.group,
                    &int(lease.partition),
                    &lease.fence,
                    &secs(ttl),
                ],
            )
            .await
            .context(what)?;
        match row {
            None => Ok(None),
            Some(row) => {
                let expires_at: DateTime<Utc> = row.try_get(0).context(what)?;
                Ok(Some(PartitionLease {
                    expires_at,
                    ..lease.clone()
                }))
            }
        }
    }

    async fn release_partition(&self, lease: &PartitionLease) -> Result<()> {
        let client = self.ready_client("release a partition lease").await?;
        client
            .execute(
                RELEASE_SQL,
                &[&lease.group, &int(lease.partition), &lease.fence],
            )
            .await
            .context("cannot release a partition lease")?;
        Ok(())
    }

    async fn partition_holders(&self, group: &str) -> Result<Vec<PartitionHolder>> {
        let client = self.ready_client("read partition leases").await?;
        let what = "cannot read partition leases";
        let rows = client.query(HOLDERS_SQL, &[&group]).await.context(what)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let partition: i32 = row.try_get(0).context(what)?;
            let fence: i64 = row.try_get(2).context(what)?;
            let expires_at: DateTime<Utc> = row.try_get(3).context(what)?;
            out.push(PartitionHolder {
                partition: u32::try_from(partition).unwrap_or(0),
                owner: row.try_get(1).context(what)?,
                fence,
                expires_at: (fence > 0).then_some(expires_at),
                live: row.try_get(4).context(what)?,
            });
        }
        Ok(out)
    }
}

/// The first statement of a fenced batch's transaction: a transaction of a
/// paused process must not hold the rows it locks (the checkpoint, the
/// lease) past its lease, so the server ends it once idle that long.
pub(crate) async fn limit_idle(
    tx: &tokio_postgres::Transaction<'_>,
    fence: &annals::Fence,
) -> Result<()> {
    let idle_ms = fence.ttl().as_millis().clamp(100, i32::MAX as u128);
    tx.batch_execute(&format!(
        "SET LOCAL idle_in_transaction_session_timeout = {idle_ms}"
    ))
    .await
    .context("cannot limit a projection batch's idle time")
}

/// The statement of [`check_fence`] for `fence` (prepared and cached by
/// the applier).
pub(crate) fn fence_sql(fence: &annals::Fence) -> &'static str {
    match fence {
        annals::Fence::Lock { .. } => {
            "SELECT token FROM projection_locks WHERE name = $1 FOR SHARE"
        }
        annals::Fence::Partition { .. } => {
            "SELECT fence, owner FROM partition_leases \
             WHERE name = $1 AND partition = $2 FOR SHARE"
        }
    }
}

/// The fence check of a batch's transaction (see the module docs of
/// `projection`), with `stmt` prepared from [`fence_sql`]: locks the lease
/// row until the commit and fails with [`Error::Fenced`] when it no longer
/// carries the applier's token.
pub(crate) async fn check_fence(
    tx: &tokio_postgres::Transaction<'_>,
    stmt: &tokio_postgres::Statement,
    fence: &annals::Fence,
) -> Result<()> {
    let what = "cannot check a projection's lease";
    match fence {
        annals::Fence::Lock { lock, token, .. } => {
            let row = tx.query_opt(stmt, &[lock]).await.context(what)?;
            let now: Option<String> = row.map(|r| r.try_get(0)).transpose().context(what)?;
            match now {
                Some(now) if &now == token => Ok(()),
                Some(now) => Err(fence.fenced(&format!("token {now}"))),
                None => Err(fence.fenced("no lock")),
            }
        }
        annals::Fence::Partition { lease, .. } => {
            let row = tx
                .query_opt(stmt, &[&lease.group, &int(lease.partition)])
                .await
                .context(what)?;
            let now: Option<(i64, Option<String>)> = row
                .map(|r| Ok::<_, tokio_postgres::Error>((r.try_get(0)?, r.try_get(1)?)))
                .transpose()
                .context(what)?;
            match now {
                Some((f, _)) if f == lease.fence => Ok(()),
                Some((f, owner)) => Err(fence.fenced(&format!(
                    "fencing token {f} held by {}",
                    owner.as_deref().unwrap_or("no one")
                ))),
                None => Err(fence.fenced("no lease row")),
            }
        }
    }
}
