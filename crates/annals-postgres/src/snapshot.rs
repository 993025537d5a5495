//! [`annals::SnapshotStore`], [`annals::SnapshotAdmin`] and
//! [`annals::SnapshotStaging`] for [`PgEventStore`].
//!
//! The live snapshot of an aggregate is its row with the highest
//! `(schema_version, version)` that is not rolled back; each aggregate keeps
//! the history size recorded in `snapshot_settings`. Guarded writes,
//! promotion, rollback and a change of the history size run on the server
//! (`annals_save_snapshot`, `annals_promote_staged`,
//! `annals_rollback_snapshot`, `annals_set_snapshot_history`), each in one
//! statement: saves and rollbacks of one aggregate are serialized by an
//! advisory lock, and a promotion or a history change locks the table
//! against saves for its duration, so no save decides on rows that are being
//! replaced. A save reads the stream's head in the same transaction and
//! deletes the aggregate's rows beyond it (see [`annals::SnapshotStore`]).
//!
//! The coverage and freshness queries join `streams` (one row per
//! aggregate, with its head) to the live snapshots; the listings over every
//! aggregate are keyset-paginated.

use std::collections::BTreeMap;

use annals::{
    no_such_snapshot, validate_history_size, Error, PromoteReport, Result, RollbackReport,
    Snapshot, SnapshotCoverage, SnapshotHistoryEntry, SnapshotStore, SnapshotWrite, StaleSnapshot,
    StreamVersion,
};
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use tokio_postgres::Row;

use crate::error::{backend, Context};
use crate::rows::{paged, to_i64};
use crate::PgEventStore;

const SNAPSHOT_COLUMNS: &str =
    "aggregate_type, aggregate_id, version, schema_version, state, created_at";

const LOAD_SQL: &str = "SELECT aggregate_type, aggregate_id, version, schema_version, state, \
     created_at FROM snapshots WHERE aggregate_type = $1 AND aggregate_id = $2 \
     AND rolled_back_at IS NULL ORDER BY schema_version DESC, version DESC LIMIT 1";

const SAVE_SQL: &str = "SELECT annals_save_snapshot($1, $2, $3, $4, $5, $6)";

const HISTORY_SQL: &str = "SELECT version, schema_version, created_at, rolled_back_at \
     FROM snapshots WHERE aggregate_type = $1 AND aggregate_id = $2 \
     ORDER BY schema_version DESC, version DESC";

/// The live snapshots of a type after aggregate id `$2`.
const LIVE_PAGE_SQL: &str = "SELECT DISTINCT ON (aggregate_id) aggregate_type, aggregate_id, \
     version, schema_version, state, created_at FROM snapshots \
     WHERE aggregate_type = $1 AND aggregate_id > $2 AND rolled_back_at IS NULL \
     ORDER BY aggregate_id, schema_version DESC, version DESC LIMIT $3";

/// Events a load replays (`StaleSnapshot::new`'s definition): the whole
/// stream when there is no live snapshot or it is ahead of the head.
const BEHIND: &str = "CASE WHEN l.version IS NULL OR l.version > s.version THEN s.version \
     ELSE s.version - l.version END";

/// A stream `s` joined to its live snapshot's version `l.version`.
const STREAM_LIVE_LATERAL: &str = "FROM streams s LEFT JOIN LATERAL (\
     SELECT p.version FROM snapshots p WHERE p.aggregate_type = s.category \
        AND p.aggregate_id = substr(s.stream_id, length(s.category) + 2) \
        AND p.rolled_back_at IS NULL \
      ORDER BY p.schema_version DESC, p.version DESC LIMIT 1) l ON true";

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
        AND rolled_back_at IS NULL \
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

/// A row of the stale queries: type, id, head, live version (and, in the
/// paged query, the stream id after them).
fn decode_stale(r: &Row) -> Result<StaleSnapshot> {
    let what = "cannot read stale snapshots";
    let snapshot_version: Option<i64> = r.try_get(3).context(what)?;
    Ok(StaleSnapshot::new(
        r.try_get(0).context(what)?,
        r.try_get(1).context(what)?,
        StreamVersion(count(r.try_get(2).context(what)?)),
        snapshot_version.map(|v| StreamVersion(count(v))),
    ))
}

fn decode_history_entry(r: &Row, live: bool) -> Result<SnapshotHistoryEntry> {
    let what = "cannot read snapshot history";
    let version: i64 = r.try_get(0).context(what)?;
    let schema_version: i64 = r.try_get(1).context(what)?;
    let rolled_back_at: Option<DateTime<Utc>> = r.try_get(3).context(what)?;
    Ok(SnapshotHistoryEntry {
        version: StreamVersion(count(version)),
        schema_version: u32::try_from(schema_version).map_err(|_| {
            Error::Snapshot(format!("invalid stored schema version {schema_version}"))
        })?,
        created_at: r.try_get(2).context(what)?,
        live: live && rolled_back_at.is_none(),
        rolled_back_at,
    })
}

impl PgEventStore {
    /// The snapshots of one aggregate type that `sql` selects (the live or
    /// the staged ones: `which`), ordered by aggregate id, a page at a time.
    fn snapshot_pages(
        &self,
        aggregate_type: &str,
        sql: &'static str,
        which: &'static str,
    ) -> BoxStream<'static, Result<Snapshot>> {
        let store = self.clone();
        let aggregate_type = aggregate_type.to_owned();
        paged(String::new(), move |after: String| {
            let store = store.clone();
            let aggregate_type = aggregate_type.clone();
            async move {
                let what = format!("cannot read {which} snapshots of {aggregate_type}");
                let want = store.inner.batch_size as i64;
                let client = store.ready_client("read snapshots").await?;
                let stmt = client.prepare_cached(sql).await.context(&what)?;
                let rows = client
                    .query(&stmt, &[&aggregate_type, &after, &want])
                    .await
                    .context(&what)?;
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
            "SELECT * FROM (SELECT s.category, \
                    substr(s.stream_id, length(s.category) + 2) AS aggregate_id, \
                    s.version AS head, l.version AS snapshot_version, \
                    {BEHIND} AS behind, s.stream_id \
             {STREAM_LIVE_LATERAL} WHERE ($1::text IS NULL OR s.category = $1)) t \
             WHERE t.behind > $2 ORDER BY t.behind DESC, t.aggregate_id, t.stream_id"
        );
        let rows = client
            .query(&sql, &[&aggregate_type, &to_i64(min_events)])
            .await
            .context("cannot read stale snapshots")?;
        rows.iter().map(decode_stale).collect()
    }
    async fn snapshot_history_size(&self) -> Result<u32> {
        let client = self.ready_client("read the snapshot history size").await?;
        let what = "cannot read the snapshot history size";
        let keep: i32 = client
            .query_one("SELECT history FROM snapshot_settings", &[])
            .await
            .context(what)?
            .try_get(0)
            .context(what)?;
        u32::try_from(keep)
            .ok()
            .filter(|&k| k >= 1)
            .ok_or_else(|| Error::Snapshot(format!("invalid stored history size {keep}")))
    }

    async fn set_snapshot_history_size(&self, keep: u32) -> Result<u64> {
        validate_history_size(keep)?;
        let keep = i32::try_from(keep).map_err(|_| {
            Error::Config(format!(
                "snapshot history size {keep} is beyond what PostgreSQL stores"
            ))
        })?;
        let client = self.ready_client("set the snapshot history size").await?;
        let what = "cannot set the snapshot history size";
        let trimmed: i64 = client
            .query_one("SELECT annals_set_snapshot_history($1)", &[&keep])
            .await
            .context(what)?
            .try_get(0)
            .context(what)?;
        Ok(count(trimmed))
    }

    async fn snapshot_history(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Vec<SnapshotHistoryEntry>> {
        let client = self.ready_client("read snapshot history").await?;
        let stmt = client
            .prepare_cached(HISTORY_SQL)
            .await
            .context("cannot prepare to read snapshot history")?;
        let rows = client
            .query(&stmt, &[&aggregate_type, &aggregate_id])
            .await
            .context("cannot read snapshot history")?;
        let mut live_seen = false;
        rows.iter()
            .map(|r| {
                let entry = decode_history_entry(r, !live_seen)?;
                live_seen |= entry.live;
                Ok(entry)
            })
            .collect()
    }

    async fn rollback_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        to_version: StreamVersion,
    ) -> Result<RollbackReport> {
        let version = i64::try_from(to_version.0).unwrap_or(i64::MAX);
        let client = self.ready_client("roll a snapshot back").await?;
        let what = "cannot roll a snapshot back";
        let row = client
            .query_one(
                "SELECT r_found, r_rolled_back, r_schema, r_created_at \
                 FROM annals_rollback_snapshot($1, $2, $3)",
                &[&aggregate_type, &aggregate_id, &version],
            )
            .await
            .context(what)?;
        drop(client);
        let found: bool = row.try_get(0).context(what)?;
        if !found {
            let kept: Vec<StreamVersion> = self
                .snapshot_history(aggregate_type, aggregate_id)
                .await?
                .into_iter()
                .map(|e| e.version)
                .collect();
            return Err(no_such_snapshot(
                aggregate_type,
                aggregate_id,
                to_version,
                &kept,
            ));
        }
        let schema: i64 = row.try_get(2).context(what)?;
        Ok(RollbackReport {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            live: SnapshotHistoryEntry {
                version: to_version,
                schema_version: u32::try_from(schema).map_err(|_| {
                    Error::Snapshot(format!("invalid stored schema version {schema}"))
                })?,
                created_at: row.try_get(3).context(what)?,
                live: true,
                rolled_back_at: None,
            },
            rolled_back: count(row.try_get(1).context(what)?),
        })
    }

    fn list_stale_snapshots(
        &self,
        aggregate_type: Option<&str>,
        min_events: u64,
    ) -> BoxStream<'static, Result<StaleSnapshot>> {
        let store = self.clone();
        let aggregate_type = aggregate_type.map(str::to_owned);
        // One statement per case, so each uses its index: streams by
        // (category, stream_id), or by stream_id.
        let filter = if aggregate_type.is_some() {
            "s.category = $4 AND s.stream_id > $2"
        } else {
            "s.stream_id > $2"
        };
        let sql = format!(
            "SELECT * FROM (SELECT s.category, \
                    substr(s.stream_id, length(s.category) + 2) AS aggregate_id, \
                    s.version AS head, l.version AS snapshot_version, \
                    {BEHIND} AS behind, s.stream_id \
             {STREAM_LIVE_LATERAL} WHERE {filter} ORDER BY s.stream_id) t \
             WHERE t.behind > $1 ORDER BY t.stream_id LIMIT $3"
        );
        let min_events = to_i64(min_events);
        paged(String::new(), move |after: String| {
            let store = store.clone();
            let aggregate_type = aggregate_type.clone();
            let sql = sql.clone();
            async move {
                let want = store.inner.batch_size as i64;
                let what = "cannot list stale snapshots";
                let client = store.ready_client("list stale snapshots").await?;
                let stmt = client
                    .prepare_cached(&sql)
                    .await
                    .context("cannot prepare a stale snapshot listing")?;
                let rows = match &aggregate_type {
                    Some(t) => client.query(&stmt, &[&min_events, &after, &want, t]).await,
                    None => client.query(&stmt, &[&min_events, &after, &want]).await,
                }
                .context(what)?;
                drop(client);
                let page = rows.iter().map(decode_stale).collect::<Result<Vec<_>>>()?;
                let next = match rows.last() {
                    Some(last) if rows.len() as i64 == want => {
                        Some(last.try_get::<_, String>(5).context(what)?)
                    }
                    _ => None,
                };
                Ok((page, next))
            }
        })
    }

    fn live_snapshots(&self, aggregate_type: &str) -> BoxStream<'static, Result<Snapshot>> {
        self.snapshot_pages(aggregate_type, LIVE_PAGE_SQL, "live")
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
        self.snapshot_pages(aggregate_type, STAGED_PAGE_SQL, "staged")
    }

    async fn promote_staged(&self, aggregate_type: &str) -> Result<PromoteReport> {
        let client = self.ready_client("promote staged snapshots").await?;
        let what = "cannot promote staged snapshots";
        let row = client
            .query_one(
                "SELECT r_promoted, r_kept_live FROM annals_promote_staged($1)",
                &[&aggregate_type],
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
