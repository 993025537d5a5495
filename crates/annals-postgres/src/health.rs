//! The integrity and horizon queries behind `annals check` (see
//! [`annals::StreamVersionIssue`], [`annals::ClockSkew`] and
//! [`annals::LongTransaction`]): one scan each, returning at most `limit`
//! rows; and the store's size for `annals stats` ([`annals::StorageSize`]).

use std::time::Duration;

use annals::{ClockSkew, LongTransaction, Result, StorageSize, StreamVersionIssue};
use chrono::{DateTime, Utc};

use crate::error::Context;
use crate::rows::{position, to_i64};
use crate::PgEventStore;

/// Streams whose `streams` row and event rows disagree (as on SQLite; an
/// archived stream, its tombstone at the head and its events gone, is not one).
const STREAM_VERSION_ISSUES_SQL: &str = "\
SELECT stream_id, head, n, d, lo, hi FROM (
    SELECT s.stream_id AS stream_id, s.version AS head, count(e.stream_version) AS n,
           count(DISTINCT e.stream_version) AS d,
           min(e.stream_version) AS lo, max(e.stream_version) AS hi
      FROM streams s LEFT JOIN events e ON e.stream_id = s.stream_id
     GROUP BY s.stream_id, s.version
    UNION ALL
    SELECT e.stream_id, NULL, count(*), count(DISTINCT e.stream_version),
           min(e.stream_version), max(e.stream_version)
      FROM events e
     WHERE NOT EXISTS (SELECT 1 FROM streams s WHERE s.stream_id = e.stream_id)
     GROUP BY e.stream_id
) AS t
WHERE (head IS NULL OR n <> head OR d <> n OR lo <> 1 OR hi <> head)
  AND NOT (n = 0 AND EXISTS (SELECT 1 FROM archived_streams a
                             WHERE a.stream_id = t.stream_id AND a.version = t.head))
ORDER BY stream_id
LIMIT $1";

/// Events recorded more than `$1` seconds before the event just before them
/// in the global order `(tx_id, seq)`.
const CLOCK_SKEWS_SQL: &str = "\
SELECT tx, seq, recorded_at, prev_tx, prev_seq, prev_recorded_at FROM (
    SELECT tx_id::text::bigint AS tx, seq, recorded_at,
           lag(tx_id::text::bigint) OVER w AS prev_tx,
           lag(seq) OVER w AS prev_seq,
           lag(recorded_at) OVER w AS prev_recorded_at
      FROM events
    WINDOW w AS (ORDER BY tx_id, seq)
) AS t
WHERE prev_recorded_at - recorded_at > make_interval(secs => $1)
ORDER BY tx, seq
LIMIT $2";

/// Transactions of the whole cluster (the horizon is cluster-wide) open for
/// at least `$1` seconds that hold a transaction id or a snapshot, oldest
/// first; never this session's own.
const LONG_TRANSACTIONS_SQL: &str = "\
SELECT pid, coalesce(datname, ''), coalesce(application_name, ''), coalesce(state, ''),
       backend_xid IS NOT NULL,
       extract(epoch FROM clock_timestamp() - xact_start)::float8
  FROM pg_stat_activity
 WHERE xact_start IS NOT NULL
   AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)
   AND pid <> pg_backend_pid()
   AND clock_timestamp() - xact_start >= make_interval(secs => $1)
 ORDER BY xact_start
 LIMIT $2";

/// The store's tables (those of its schema, the connections' `search_path`)
/// with their indexes and TOAST, and the whole database.
const STORAGE_SIZE_SQL: &str = "\
SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint,
       pg_database_size(current_database())
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'm')";

impl PgEventStore {
    /// The disk the store takes (`annals stats`): the tables of its schema
    /// with their indexes and TOAST, and the whole database
    /// (see [`StorageSize`]).
    pub async fn storage_size(&self) -> Result<StorageSize> {
        let what = "cannot read the database size";
        let client = self.ready_client(what).await?;
        let row = client
            .query_one(STORAGE_SIZE_SQL, &[])
            .await
            .context(what)?;
        let store: i64 = row.try_get(0).context(what)?;
        let database: i64 = row.try_get(1).context(what)?;
        Ok(StorageSize {
            store_bytes: count(store),
            free_bytes: None,
            database_bytes: Some(count(database)),
        })
    }

    /// Streams whose stored events are not exactly versions `1..=head` of
    /// their `streams` row (or that have no such row), in stream order, at
    /// most `limit` of them. One aggregate scan of the events table.
    pub async fn stream_version_issues(&self, limit: usize) -> Result<Vec<StreamVersionIssue>> {
        let what = "cannot check stream versions";
        let client = self.ready_client(what).await?;
        let rows = client
            .query(STREAM_VERSION_ISSUES_SQL, &[&to_i64(limit as u64)])
            .await
            .context(what)?;
        rows.iter()
            .map(|r| {
                let head: Option<i64> = r.try_get(1).context(what)?;
                let lo: Option<i64> = r.try_get(4).context(what)?;
                let hi: Option<i64> = r.try_get(5).context(what)?;
                Ok(StreamVersionIssue {
                    stream_id: r.try_get(0).context(what)?,
                    head: head.map(count),
                    events: count(r.try_get(2).context(what)?),
                    distinct_versions: count(r.try_get(3).context(what)?),
                    min_version: lo.map(count),
                    max_version: hi.map(count),
                })
            })
            .collect()
    }

    /// Events whose `recorded_at` is more than `tolerance` earlier than the
    /// event before them in the global order, in position order, at most
    /// `limit` of them. One window scan of the events table (committed rows,
    /// whether or not readers of the global order may pass them yet).
    pub async fn clock_skews(&self, tolerance: Duration, limit: usize) -> Result<Vec<ClockSkew>> {
        let what = "cannot check recorded_at order";
        let client = self.ready_client(what).await?;
        let rows = client
            .query(
                CLOCK_SKEWS_SQL,
                &[&tolerance.as_secs_f64(), &to_i64(limit as u64)],
            )
            .await
            .context(what)?;
        rows.iter()
            .map(|r| {
                let at: DateTime<Utc> = r.try_get(2).context(what)?;
                let prev_at: DateTime<Utc> = r.try_get(5).context(what)?;
                Ok(ClockSkew {
                    position: position(r.try_get(0).context(what)?, r.try_get(1).context(what)?)?,
                    recorded_at: at,
                    previous_position: position(
                        r.try_get(3).context(what)?,
                        r.try_get(4).context(what)?,
                    )?,
                    previous_recorded_at: prev_at,
                })
            })
            .collect()
    }

    /// Transactions anywhere on the cluster open for at least `min_age`
    /// that hold a transaction id or a snapshot (the global-order horizon is
    /// cluster-wide), oldest first, at most `limit` of them; never the
    /// session that asks. Needs no schema: it reads `pg_stat_activity`,
    /// where a role without `pg_read_all_stats` sees only its own sessions.
    pub async fn long_transactions(
        &self,
        min_age: Duration,
        limit: usize,
    ) -> Result<Vec<LongTransaction>> {
        let what = "cannot list long transactions";
        let client = self.client(what).await?;
        let rows = client
            .query(
                LONG_TRANSACTIONS_SQL,
                &[&min_age.as_secs_f64(), &to_i64(limit as u64)],
            )
            .await
            .context(what)?;
        rows.iter()
            .map(|r| {
                let age: f64 = r.try_get(5).context(what)?;
                Ok(LongTransaction {
                    pid: r.try_get(0).context(what)?,
                    database: r.try_get(1).context(what)?,
                    application_name: r.try_get(2).context(what)?,
                    state: r.try_get(3).context(what)?,
                    holds_xid: r.try_get(4).context(what)?,
                    age: Duration::try_from_secs_f64(age.max(0.0)).unwrap_or_default(),
                })
            })
            .collect()
    }
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
