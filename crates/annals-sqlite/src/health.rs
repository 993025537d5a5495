//! The integrity queries behind `annals check` (see [`annals::StreamVersionIssue`]
//! and [`annals::ClockSkew`]): one aggregate or window scan each, on a reader
//! thread, returning at most `limit` rows; and the file's size for
//! `annals stats` ([`annals::StorageSize`]).

use std::time::Duration;

use annals::{ClockSkew, GlobalPosition, Result, StorageSize, StreamVersionIssue};
use rusqlite::Connection;

use crate::codec::{corrupt_row, from_micros, sql_int};
use crate::error::db;
use crate::SqliteEventStore;

/// Streams whose `streams` row and event rows disagree: a head that is not
/// the highest version, versions that do not start at 1, missing or
/// duplicated versions, or events without a `streams` row. An archived
/// stream (its tombstone at the head, its events gone) is not one.
const STREAM_VERSION_ISSUES_SQL: &str = "\
SELECT stream_id, head, n, d, lo, hi FROM (
    SELECT s.stream_id AS stream_id, s.version AS head, COUNT(e.stream_version) AS n,
           COUNT(DISTINCT e.stream_version) AS d,
           MIN(e.stream_version) AS lo, MAX(e.stream_version) AS hi
      FROM streams s LEFT JOIN events e ON e.stream_id = s.stream_id
     GROUP BY s.stream_id, s.version
    UNION ALL
    SELECT e.stream_id, NULL, COUNT(*), COUNT(DISTINCT e.stream_version),
           MIN(e.stream_version), MAX(e.stream_version)
      FROM events e
     WHERE NOT EXISTS (SELECT 1 FROM streams s WHERE s.stream_id = e.stream_id)
     GROUP BY e.stream_id
) AS t
WHERE (head IS NULL OR n <> head OR d <> n OR lo <> 1 OR hi <> head)
  AND NOT (n = 0 AND EXISTS (SELECT 1 FROM archived_streams a
                             WHERE a.stream_id = t.stream_id AND a.version = t.head))
ORDER BY stream_id
LIMIT ?1";

/// Events recorded more than `?1` microseconds before the event just
/// before them in the global order.
const CLOCK_SKEWS_SQL: &str = "\
SELECT position, recorded_at, prev_position, prev_recorded_at FROM (
    SELECT position, recorded_at,
           LAG(position) OVER w AS prev_position,
           LAG(recorded_at) OVER w AS prev_recorded_at
      FROM events
    WINDOW w AS (ORDER BY position)
) AS t
WHERE prev_recorded_at - recorded_at > ?1
ORDER BY position
LIMIT ?2";

impl SqliteEventStore {
    /// Streams whose stored events are not exactly versions `1..=head` of
    /// their `streams` row (or that have no such row), in stream order, at
    /// most `limit` of them. One aggregate scan of the events table.
    pub async fn stream_version_issues(&self, limit: usize) -> Result<Vec<StreamVersionIssue>> {
        let limit = sql_int(limit as u64);
        self.conns()
            .read(move |conn| stream_version_issues(conn, limit))
            .await
    }

    /// The size of the database (`annals stats`): its pages, and how many
    /// of them are free (see [`StorageSize`]). That is the file's size once
    /// the write-ahead log is checkpointed into it; the log beside it is not
    /// counted.
    pub async fn storage_size(&self) -> Result<StorageSize> {
        self.conns().read(storage_size).await
    }

    /// Events whose `recorded_at` is more than `tolerance` earlier than the
    /// event before them in the global order, in position order, at most
    /// `limit` of them. One window scan of the events table.
    pub async fn clock_skews(&self, tolerance: Duration, limit: usize) -> Result<Vec<ClockSkew>> {
        let tolerance = i64::try_from(tolerance.as_micros()).unwrap_or(i64::MAX);
        let limit = sql_int(limit as u64);
        self.conns()
            .read(move |conn| clock_skews(conn, tolerance, limit))
            .await
    }
}

fn storage_size(conn: &Connection) -> Result<StorageSize> {
    let what = "reading the database size";
    let pragma = |name: &str| -> Result<u64> {
        conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0))
            .map(count)
            .map_err(db(what))
    };
    let page_size = pragma("page_size")?;
    Ok(StorageSize {
        store_bytes: pragma("page_count")?.saturating_mul(page_size),
        free_bytes: Some(pragma("freelist_count")?.saturating_mul(page_size)),
        database_bytes: None,
    })
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn stream_version_issues(conn: &Connection, limit: i64) -> Result<Vec<StreamVersionIssue>> {
    let what = "checking stream versions";
    let mut stmt = conn.prepare(STREAM_VERSION_ISSUES_SQL).map_err(db(what))?;
    let mut rows = stmt.query([limit]).map_err(db(what))?;
    let mut issues = Vec::new();
    while let Some(r) = rows.next().map_err(db(what))? {
        let head: Option<i64> = r.get(1).map_err(db(what))?;
        let lo: Option<i64> = r.get(4).map_err(db(what))?;
        let hi: Option<i64> = r.get(5).map_err(db(what))?;
        issues.push(StreamVersionIssue {
            stream_id: r.get(0).map_err(db(what))?,
            head: head.map(count),
            events: count(r.get(2).map_err(db(what))?),
            distinct_versions: count(r.get(3).map_err(db(what))?),
            min_version: lo.map(count),
            max_version: hi.map(count),
        });
    }
    Ok(issues)
}

fn clock_skews(conn: &Connection, tolerance: i64, limit: i64) -> Result<Vec<ClockSkew>> {
    let what = "checking recorded_at order";
    let mut stmt = conn.prepare(CLOCK_SKEWS_SQL).map_err(db(what))?;
    let mut rows = stmt.query([tolerance, limit]).map_err(db(what))?;
    let mut skews = Vec::new();
    while let Some(r) = rows.next().map_err(db(what))? {
        let position: i64 = r.get(0).map_err(db(what))?;
        let at: i64 = r.get(1).map_err(db(what))?;
        let prev_position: i64 = r.get(2).map_err(db(what))?;
        let prev_at: i64 = r.get(3).map_err(db(what))?;
        let time = |micros: i64, pos: i64| {
            from_micros(micros).ok_or_else(|| {
                corrupt_row(format!(
                    "event at position {pos}: recorded_at {micros} is out of range"
                ))
            })
        };
        skews.push(ClockSkew {
            position: GlobalPosition::from_seq(count(position)),
            recorded_at: time(at, position)?,
            previous_position: GlobalPosition::from_seq(count(prev_position)),
            previous_recorded_at: time(prev_at, prev_position)?,
        });
    }
    Ok(skews)
}
