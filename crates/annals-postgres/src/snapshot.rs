//! [`annals::SnapshotStore`], [`annals::SnapshotAdmin`] and
//! [`annals::SnapshotStaging`] for [`PgEventStore`].
//!
//! The live snapshot of an aggregate is its row with the highest
//! `(schema_version, version)`; up to `snapshot_history` rows are kept per
//! aggregate for rollback. Guarded writes and promotion run on the server
//! (`annals_save_snapshot`, `annals_promote_staged`), each in one statement:
//! saves of one aggregate are serialized by an advisory lock, and a
//! promotion locks the table against saves for its duration, so no save
//! decides on a live snapshot that is being replaced.
//!
//! The coverage and freshness queries join `streams` (one row per
//! aggregate, with its head) to the live snapshots.

use std::collections::BTreeMap;

use annals::{
    Error, PromoteReport, Result, Snapshot, SnapshotCoverage, SnapshotStore, SnapshotWrite,
    StaleSnapshot, StreamVersion,
};
use futures::stream::BoxStream;
use tokio_postgres::Row;

use crate::error::{backend, Context};
use crate::rows::{paged, to_i64};
use crate::PgEventStore;

const SNAPSHOT_COLUMNS: &str =
    "aggregate_type, aggregate_id, version, schema_version, state, created_at";

const LOAD_SQL: &str = "SELECT aggregate_type, aggregate_id, version, schema_version, state, \
     created_at FROM snapshots WHERE aggregate_type = $1 AND aggregate_id = $2 \
     ORDER BY schema_version DESC, version DESC LIMIT 1";

const SAVE_SQL: &str = "SELECT annals_save_snapshot($1, $2, $3, $4, $5, $6, $7)";

const LOAD_STAGED_SQL: &str = "SELECT aggregate_type, aggregate_id, version, schema_version, \
     state, created_at FROM snapshot_staging WHERE aggregate_type = $1 AND aggregate_id = $2";

const STAGED_PAGE_SQL: &str = "SELECT aggregate_type, aggregate_id, version, schema_version, \
     state, created_at FROM snapshot_staging WHERE aggregate_type = $1 AND aggregate_id > $2 \
     ORDER BY aggregate_id LIMIT $3";

/// The live snapshot per aggregate, optionally of one type ($1).
const LIVE_CTE: &str = "WITH live AS (\
     SELECT DISTINCT ON (aggregate_type, aggregate_id) \
            aggregate_type, aggregate_id, version, schema_version \
       FROM snapshots WHERE ($1::text IS NULL OR aggregate_type = $1) \
      ORDER BY aggregate_type, aggregate_id, schema_version DESC, version DESC) ";

/// Streams joined to their live snapshot: `s` is the stream, `l` the
/// snapshot (NULLs when none).
const STREAMS_JOIN_LIVE: &str = "FROM streams s LEFT JOIN live l \
     ON l.aggregate_type = s.category \
    AND l.aggregate_id = substr(s.stream_id, length(s.category) + 2) \
  WHERE ($1::text IS NULL OR s.category = $1) ";

fn snapshot_error<'a>(
    what: &'a str,
    row_key: &'a str,
) -> impl Fn(tokio_postgres::Error) -> Error + 'a {
    move |e| backend(format!("cannot decode the {what} of snapshot {row_key}"), e)
}

fn decode_snapshot(row: &Row) -> Result<Snapshot> {
    let aggregate_type: String = row.try_get(0).context("cannot decode a snapshot")?;
    let aggregate_id: String = row.try_get(1).context("cannot decode a snapshot")?;
    let key = format!("{aggregate_type}/{aggregate_id}");
    let version: i64 = row.try_get(2).map_err(snapshot_error("version", &key))?;
    let schema_version: i64 = row
        .try_get(3)
        .map_err(snapshot_error("schema version", &key))?;
    let state = row.try_get(4).map_err(snapshot_error("state", &key))?;
    let created_at = row
        .try_get(5)
        .map_err(snapshot_error("creation time", &key))?;
    let out_of_range =
        |what: &str, n: i64| Error::Snapshot(format!("snapshot {key} has an invalid {what} {n}"));
    Ok(Snapshot {
        version: StreamVersion(
            u64::try_from(version).map_err(|_| out_of_range("version", version))?,
        ),
        schema_version: u32::try_from(schema_version)
            .map_err(|_| out_of_range("schema version", schema_version))?,
        aggregate_type,
        aggregate_id,
        state,
        created_at,
    })
}

fn snapshot_version(snapshot: &Snapshot) -> Result<i64> {
    i64::try_from(snapshot.version.0).map_err(|_| {
        Error::Snapshot(format!(
            "snapshot {}/{} has version {}, beyond what PostgreSQL stores",
            snapshot.aggregate_type, snapshot.aggregate_id, snapshot.version
        ))
    })
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl PgEventStore {
    fn keep(&self) -> i32 {
        i32::try_from(self.inner.snapshot_history).unwrap_or(i32::MAX)
    }

    /// One snapshot row by `(aggregate_type, aggregate_id)`: the live one
    /// or the staged one, depending on `sql`.
    async fn load_one(
        &self,
        sql: &str,
        what: &'static str,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Snapshot>> {
        let client = self.ready_client(what).await?;
        let stmt = client
            .prepare_cached(sql)
            .await
            .context(&format!("cannot prepare to {what}"))?;
        let row = client
            .query_opt(&stmt, &[&aggregate_type, &aggregate_id])
            .await
            .context(&format!("cannot {what}"))?;
        row.as_ref().map(decode_snapshot).transpose()
    }
}

impl SnapshotStore for PgEventStore {
    async fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Snapshot>> {
        self.load_one(LOAD_SQL, "load a snapshot", aggregate_type, aggregate_id)
            .await
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<SnapshotWrite> {
        let version = snapshot_version(snapshot)?;
        let client = self.ready_client("save a snapshot").await?;
        let stmt = client
            .prepare_cached(SAVE_SQL)
            .await
            .context("cannot prepare a snapshot save")?;
        let written: bool = client
            .query_one(
                &stmt,
                &[
                    &snapshot.aggregate_type,
                    &snapshot.aggregate_id,
                    &version,
                    &i64::from(snapshot.schema_version),
                    &snapshot.state,
                    &snapshot.created_at,
                    &self.keep(),
                ],
            )
            .await
            .context("cannot save a snapshot")?
            .try_get(0)
            .context("cannot save a snapshot")?;
        Ok(if written {
            SnapshotWrite::Written
        } else {
            SnapshotWrite::Superseded
        })
    }

    async fn delete_snapshot(&self, aggregate_type: &str, aggregate_id: &str) -> Result<u64> {
        let client = self.ready_client("delete a snapshot").await?;
        let n = client
            .execute(
                "DELETE FROM snapshots WHERE aggregate_type = $1 AND aggregate_id = $2",
                &[&aggregate_type, &aggregate_id],
            )
            .await
            .context("cannot delete a snapshot")?;
        Ok(n)
    }
}

impl annals::SnapshotAdmin for PgEventStore {
    async fn invalidate_snapshots(
        &self,
        aggregate_type: &str,
        below_schema_version: Option<u32>,
    ) -> Result<u64> {
        let client = self.ready_client("invalidate snapshots").await?;
        let below = below_schema_version.map(i64::from);
        let n = client
            .execute(
                "DELETE FROM snapshots WHERE aggregate_type = $1 \
                 AND ($2::bigint IS NULL OR schema_version < $2)",
                &[&aggregate_type, &below],
            )
            .await
            .context("cannot invalidate snapshots")?;
        Ok(n)
    }

    async fn snapshot_coverage(
        &self,
        aggregate_type: Option<&str>,
    ) -> Result<Vec<SnapshotCoverage>> {
        let client = self.ready_client("read snapshot coverage").await?;
        let sql = format!(
            "{LIVE_CTE} SELECT s.category, l.schema_version, count(*) {STREAMS_JOIN_LIVE} \
             GROUP BY s.category, l.schema_version ORDER BY s.category, l.schema_version"
        );
        let what = "cannot read snapshot coverage";
        let rows = client.query(&sql, &[&aggregate_type]).await.context(what)?;
        let mut out: BTreeMap<String, SnapshotCoverage> = BTreeMap::new();
        for r in &rows {
            let category: String = r.try_get(0).context(what)?;
            let schema: Option<i64> = r.try_get(1).context(what)?;
            let n = count(r.try_get(2).context(what)?);
            let c = out
                .entry(category.clone())
                .or_insert_with(|| SnapshotCoverage {
                    aggregate_type: category,
                    ..SnapshotCoverage::default()
                });
            c.aggregates += n;
            match schema {
                Some(schema) => {
                    c.with_snapshot += n;
                    let schema = u32::try_from(schema).map_err(|_| {
                        Error::Snapshot(format!("invalid stored schema version {schema}"))
                    })?;
                    *c.by_schema_version.entry(schema).or_default() += n;
                }
                None => c.without_snapshot += n,
            }
        }
        Ok(out.into_values().collect())
    }

    async fn stale_snapshots(
        &self,
        aggregate_type: Option<&str>,
        min_events: u64,
    ) -> Result<Vec<StaleSnapshot>> {
        let client = self.ready_client("read stale snapshots").await?;
        let sql = format!(
            "{LIVE_CTE} SELECT * FROM (SELECT s.category, \
                    substr(s.stream_id, length(s.category) + 2) AS aggregate_id, \
                    s.version AS head, l.version AS snapshot_version, \
                    greatest(s.version - coalesce(l.version, 0), 0) AS behind, s.stream_id \
             {STREAMS_JOIN_LIVE}) t WHERE t.behind > $2 \
             ORDER BY t.behind DESC, t.aggregate_id, t.stream_id"
        );
        let what = "cannot read stale snapshots";
        let rows = client
            .query(&sql, &[&aggregate_type, &to_i64(min_events)])
            .await
            .context(what)?;
        rows.iter()
            .map(|r| {
                let snapshot_version: Option<i64> = r.try_get(3).context(what)?;
                Ok(StaleSnapshot {
                    aggregate_type: r.try_get(0).context(what)?,
                    aggregate_id: r.try_get(1).context(what)?,
                    head: StreamVersion(count(r.try_get(2).context(what)?)),
                    snapshot_version: snapshot_version.map(|v| StreamVersion(count(v))),
                    events_behind: count(r.try_get(4).context(what)?),
                })
            })
            .collect()
    }
}

impl annals::SnapshotStaging for PgEventStore {
    async fn stage_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        let version = snapshot_version(snapshot)?;
        let client = self.ready_client("stage a snapshot").await?;
        let stmt = client
            .prepare_cached(&format!(
                "INSERT INTO snapshot_staging ({SNAPSHOT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
                 SET version = EXCLUDED.version, schema_version = EXCLUDED.schema_version, \
                     state = EXCLUDED.state, created_at = EXCLUDED.created_at"
            ))
            .await
            .context("cannot prepare a snapshot staging")?;
        client
            .execute(
                &stmt,
                &[
                    &snapshot.aggregate_type,
                    &snapshot.aggregate_id,
                    &version,
                    &i64::from(snapshot.schema_version),
                    &snapshot.state,
                    &snapshot.created_at,
                ],
            )
            .await
            .context("cannot stage a snapshot")?;
        Ok(())
    }

    async fn load_staged(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Snapshot>> {
        self.load_one(
            LOAD_STAGED_SQL,
            "load a staged snapshot",
            aggregate_type,
            aggregate_id,
        )
        .await
    }

    fn staged_snapshots(&self, aggregate_type: &str) -> BoxStream<'static, Result<Snapshot>> {
        let store = self.clone();
        let aggregate_type = aggregate_type.to_owned();
        paged(String::new(), move |after: String| {
            let store = store.clone();
            let aggregate_type = aggregate_type.clone();
            async move {
                let want = store.inner.batch_size as i64;
                let client = store.ready_client("read staged snapshots").await?;
                let stmt = client
                    .prepare_cached(STAGED_PAGE_SQL)
                    .await
                    .context("cannot prepare a staged snapshot read")?;
                let rows = client
                    .query(&stmt, &[&aggregate_type, &after, &want])
                    .await
                    .context("cannot read staged snapshots")?;
                drop(client);
                let snaps = rows
                    .iter()
                    .map(decode_snapshot)
                    .collect::<Result<Vec<_>>>()?;
                let next = match snaps.last() {
                    Some(last) if snaps.len() as i64 == want => Some(last.aggregate_id.clone()),
                    _ => None,
                };
                Ok((snaps, next))
            }
        })
    }

    async fn promote_staged(&self, aggregate_type: &str) -> Result<PromoteReport> {
        let client = self.ready_client("promote staged snapshots").await?;
        let what = "cannot promote staged snapshots";
        let row = client
            .query_one(
                "SELECT r_promoted, r_kept_live FROM annals_promote_staged($1, $2)",
                &[&aggregate_type, &self.keep()],
            )
            .await
            .context(what)?;
        Ok(PromoteReport {
            promoted: count(row.try_get(0).context(what)?),
            kept_live: count(row.try_get(1).context(what)?),
        })
    }

    async fn clear_staged(&self, aggregate_type: &str) -> Result<u64> {
        let client = self.ready_client("clear staged snapshots").await?;
        client
            .execute(
                "DELETE FROM snapshot_staging WHERE aggregate_type = $1",
                &[&aggregate_type],
            )
            .await
            .context("cannot clear staged snapshots")
    }
}
