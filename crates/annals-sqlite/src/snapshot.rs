//! [`annals::SnapshotStore`], [`annals::SnapshotAdmin`] and
//! [`annals::SnapshotStaging`] on SQLite.
//!
//! Snapshots live in the same file as the events, so coverage and freshness
//! are single queries joining `snapshots` with `streams`. The live snapshot of
//! an aggregate is its row with the highest `(schema_version, version)`; a
//! guarded write compares with it inside a `BEGIN IMMEDIATE` transaction on
//! the writer thread, then trims the aggregate to `snapshot_history` rows.

use std::collections::BTreeMap;

use annals::{
    PromoteReport, Result, Snapshot, SnapshotCoverage, SnapshotStore, SnapshotWrite, StaleSnapshot,
    StreamVersion,
};
use futures::stream::BoxStream;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::codec::{decode_snapshot, snapshot_columns, sql_int, to_micros};
use crate::conn::Page;
use crate::error::{corrupt, db};
use crate::SqliteEventStore;

const LOAD_LIVE_SQL: &str = concat!(
    "SELECT ",
    snapshot_columns!(),
    " FROM snapshots WHERE aggregate_type = ?1 AND aggregate_id = ?2 \
     ORDER BY schema_version DESC, version DESC LIMIT 1"
);

const LIVE_KEY_SQL: &str = "SELECT schema_version, version FROM snapshots \
    WHERE aggregate_type = ?1 AND aggregate_id = ?2 \
    ORDER BY schema_version DESC, version DESC LIMIT 1";

const UPSERT_SQL: &str = "INSERT INTO snapshots \
    (aggregate_type, aggregate_id, version, schema_version, state, created_at) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
    ON CONFLICT (aggregate_type, aggregate_id, version) DO UPDATE SET \
    schema_version = excluded.schema_version, state = excluded.state, \
    created_at = excluded.created_at";

/// Keeps the newest `?3` rows of one aggregate.
const TRIM_ONE_SQL: &str = "DELETE FROM snapshots \
    WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND version NOT IN ( \
        SELECT version FROM snapshots WHERE aggregate_type = ?1 AND aggregate_id = ?2 \
        ORDER BY schema_version DESC, version DESC LIMIT ?3)";

/// Keeps the newest `?2` rows of every aggregate of a type.
const TRIM_TYPE_SQL: &str = "DELETE FROM snapshots \
    WHERE aggregate_type = ?1 AND (aggregate_id, version) IN ( \
        SELECT aggregate_id, version FROM ( \
            SELECT aggregate_id, version, ROW_NUMBER() OVER ( \
                PARTITION BY aggregate_id ORDER BY schema_version DESC, version DESC) AS rank \
            FROM snapshots WHERE aggregate_type = ?1) \
        WHERE rank > ?2)";

const STAGE_SQL: &str = "INSERT INTO snapshot_staging \
    (aggregate_type, aggregate_id, version, schema_version, state, created_at) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
    ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET \
    version = excluded.version, schema_version = excluded.schema_version, \
    state = excluded.state, created_at = excluded.created_at";

const LOAD_STAGED_SQL: &str = concat!(
    "SELECT ",
    snapshot_columns!(),
    " FROM snapshot_staging WHERE aggregate_type = ?1 AND aggregate_id = ?2"
);

const STAGED_PAGE_SQL: &str = concat!(
    "SELECT ",
    snapshot_columns!(),
    " FROM snapshot_staging WHERE aggregate_type = ?1 AND aggregate_id > ?2 \
     ORDER BY aggregate_id LIMIT ?3"
);

/// Copies the staged snapshots of a type that supersede the live one (no live
/// row has a higher `(schema_version, version)`).
const PROMOTE_SQL: &str = "INSERT INTO snapshots \
    (aggregate_type, aggregate_id, version, schema_version, state, created_at) \
    SELECT st.aggregate_type, st.aggregate_id, st.version, st.schema_version, st.state, st.created_at \
    FROM snapshot_staging st \
    WHERE st.aggregate_type = ?1 AND NOT EXISTS ( \
        SELECT 1 FROM snapshots l \
        WHERE l.aggregate_type = st.aggregate_type AND l.aggregate_id = st.aggregate_id \
        AND (l.schema_version, l.version) > (st.schema_version, st.version)) \
    ON CONFLICT (aggregate_type, aggregate_id, version) DO UPDATE SET \
    schema_version = excluded.schema_version, state = excluded.state, \
    created_at = excluded.created_at";

/// The live snapshot's column `$col` for the stream row `s` (the aggregate
/// id is the stream name after `<category>-`).
macro_rules! live_of_stream {
    ($col:literal) => {
        concat!(
            "(SELECT p.",
            $col,
            " FROM snapshots p WHERE p.aggregate_type = s.category \
             AND p.aggregate_id = substr(s.stream_id, length(s.category) + 2) \
             ORDER BY p.schema_version DESC, p.version DESC LIMIT 1)"
        )
    };
}

macro_rules! coverage_sql {
    ($filter:literal) => {
        concat!(
            "SELECT category, schema_version, COUNT(*) FROM ( \
                SELECT s.category AS category, ",
            live_of_stream!("schema_version"),
            " AS schema_version FROM streams s ",
            $filter,
            ") GROUP BY category, schema_version ORDER BY category, schema_version"
        )
    };
}

const COVERAGE_ALL_SQL: &str = coverage_sql!("");
const COVERAGE_TYPE_SQL: &str = coverage_sql!("WHERE s.category = ?1");

macro_rules! stale_sql {
    ($filter:literal) => {
        concat!(
            "WITH heads AS ( \
                SELECT s.stream_id AS stream_id, s.category AS aggregate_type, \
                substr(s.stream_id, length(s.category) + 2) AS aggregate_id, \
                s.version AS head, ",
            live_of_stream!("version"),
            " AS snap FROM streams s ",
            $filter,
            "), behind AS ( \
                SELECT *, MAX(head - COALESCE(snap, 0), 0) AS behind FROM heads) \
             SELECT aggregate_type, aggregate_id, head, snap, behind FROM behind \
             WHERE behind > ?2 \
             ORDER BY behind DESC, aggregate_id ASC, stream_id ASC"
        )
    };
}

const STALE_ALL_SQL: &str = stale_sql!("WHERE ?1 IS NULL");
const STALE_TYPE_SQL: &str = stale_sql!("WHERE s.category = ?1");

fn state_text(snapshot: &Snapshot) -> Result<String> {
    serde_json::to_string(&snapshot.state).map_err(|source| annals::Error::Encode {
        what: format!(
            "snapshot state of {}/{}",
            snapshot.aggregate_type, snapshot.aggregate_id
        ),
        source,
    })
}

fn u64_of(v: i64, what: impl FnOnce() -> String) -> Result<u64> {
    u64::try_from(v).map_err(|e| corrupt(what(), e))
}

fn save_job(
    conn: &mut Connection,
    snapshot: &Snapshot,
    state: &str,
    keep: u32,
) -> Result<SnapshotWrite> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db("starting a snapshot write"))?;
    let new_key = (
        i64::from(snapshot.schema_version),
        sql_int(snapshot.version.get()),
    );
    let live: Option<(i64, i64)> = tx
        .prepare_cached(LIVE_KEY_SQL)
        .and_then(|mut s| {
            s.query_row([&snapshot.aggregate_type, &snapshot.aggregate_id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
        })
        .map_err(db("reading the live snapshot"))?;
    // `Snapshot::supersedes`, on the stored key.
    if live.is_some_and(|live| new_key < live) {
        return Ok(SnapshotWrite::Superseded);
    }
    tx.prepare_cached(UPSERT_SQL)
        .and_then(|mut s| {
            s.execute(rusqlite::params![
                snapshot.aggregate_type,
                snapshot.aggregate_id,
                new_key.1,
                new_key.0,
                state,
                to_micros(snapshot.created_at),
            ])
        })
        .map_err(db("writing a snapshot"))?;
    tx.prepare_cached(TRIM_ONE_SQL)
        .and_then(|mut s| {
            s.execute(rusqlite::params![
                snapshot.aggregate_type,
                snapshot.aggregate_id,
                keep
            ])
        })
        .map_err(db("trimming snapshot history"))?;
    tx.commit().map_err(db("committing a snapshot"))?;
    Ok(SnapshotWrite::Written)
}

fn promote_job(conn: &mut Connection, aggregate_type: &str, keep: u32) -> Result<PromoteReport> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db("starting a promotion"))?;
    let staged: i64 = tx
        .query_row(
            "SELECT COUNT(*) FROM snapshot_staging WHERE aggregate_type = ?1",
            [aggregate_type],
            |r| r.get(0),
        )
        .map_err(db("counting staged snapshots"))?;
    let promoted = tx
        .execute(PROMOTE_SQL, [aggregate_type])
        .map_err(db("promoting staged snapshots"))? as u64;
    tx.execute(TRIM_TYPE_SQL, rusqlite::params![aggregate_type, keep])
        .map_err(db("trimming snapshot history"))?;
    tx.execute(
        "DELETE FROM snapshot_staging WHERE aggregate_type = ?1",
        [aggregate_type],
    )
    .map_err(db("clearing promoted snapshots"))?;
    tx.commit().map_err(db("committing a promotion"))?;
    let staged = u64::try_from(staged).unwrap_or(0);
    Ok(PromoteReport {
        promoted,
        kept_live: staged.saturating_sub(promoted),
    })
}

fn coverage_job(conn: &Connection, aggregate_type: Option<&str>) -> Result<Vec<SnapshotCoverage>> {
    let sql = if aggregate_type.is_some() {
        COVERAGE_TYPE_SQL
    } else {
        COVERAGE_ALL_SQL
    };
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(db("preparing the coverage query"))?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(aggregate_type))
        .map_err(db("reading snapshot coverage"))?;
    let mut out: BTreeMap<String, SnapshotCoverage> = BTreeMap::new();
    while let Some(r) = rows.next().map_err(db("reading snapshot coverage"))? {
        let category: String = r.get(0).map_err(db("reading snapshot coverage"))?;
        let schema: Option<i64> = r.get(1).map_err(db("reading snapshot coverage"))?;
        let n: i64 = r.get(2).map_err(db("reading snapshot coverage"))?;
        let n = u64::try_from(n).unwrap_or(0);
        let c = out
            .entry(category)
            .or_insert_with_key(|category| SnapshotCoverage {
                aggregate_type: category.clone(),
                ..SnapshotCoverage::default()
            });
        c.aggregates += n;
        match schema {
            Some(s) => {
                let s = u32::try_from(s).map_err(|e| {
                    corrupt(
                        format!(
                            "snapshots of {}: schema_version out of range",
                            c.aggregate_type
                        ),
                        e,
                    )
                })?;
                c.with_snapshot += n;
                *c.by_schema_version.entry(s).or_default() += n;
            }
            None => c.without_snapshot += n,
        }
    }
    Ok(out.into_values().collect())
}

fn stale_job(
    conn: &Connection,
    aggregate_type: Option<&str>,
    min_events: u64,
) -> Result<Vec<StaleSnapshot>> {
    let sql = if aggregate_type.is_some() {
        STALE_TYPE_SQL
    } else {
        STALE_ALL_SQL
    };
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(db("preparing the freshness query"))?;
    let mut rows = stmt
        .query(rusqlite::params![aggregate_type, sql_int(min_events)])
        .map_err(db("reading stale snapshots"))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(db("reading stale snapshots"))? {
        let aggregate_type: String = r.get(0).map_err(db("reading stale snapshots"))?;
        let aggregate_id: String = r.get(1).map_err(db("reading stale snapshots"))?;
        let at = || format!("stream {aggregate_type}-{aggregate_id}: negative version");
        let head: i64 = r.get(2).map_err(db("reading stale snapshots"))?;
        let snap: Option<i64> = r.get(3).map_err(db("reading stale snapshots"))?;
        let behind: i64 = r.get(4).map_err(db("reading stale snapshots"))?;
        out.push(StaleSnapshot {
            head: StreamVersion(u64_of(head, at)?),
            snapshot_version: snap.map(|v| u64_of(v, at).map(StreamVersion)).transpose()?,
            events_behind: u64_of(behind, at)?,
            aggregate_type,
            aggregate_id,
        });
    }
    Ok(out)
}

impl SqliteEventStore {
    /// One snapshot row of `table` (live or staging) by
    /// `(aggregate_type, aggregate_id)`, selected by `sql`.
    async fn load_one(
        &self,
        sql: &'static str,
        table: &'static str,
        what: &'static str,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Snapshot>> {
        let key = [aggregate_type.to_owned(), aggregate_id.to_owned()];
        self.conns()
            .read(move |conn| {
                let mut stmt = conn.prepare_cached(sql).map_err(db(what))?;
                let mut rows = stmt.query(key).map_err(db(what))?;
                match rows.next().map_err(db(what))? {
                    Some(r) => decode_snapshot(table, r).map(Some),
                    None => Ok(None),
                }
            })
            .await
    }
}

impl SnapshotStore for SqliteEventStore {
    async fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Snapshot>> {
        self.load_one(
            LOAD_LIVE_SQL,
            "snapshots",
            "loading a snapshot",
            aggregate_type,
            aggregate_id,
        )
        .await
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<SnapshotWrite> {
        let state = state_text(snapshot)?;
        let keep = self.inner.options.snapshot_history;
        let snapshot = snapshot.clone();
        self.conns()
            .write(move |conn| save_job(conn, &snapshot, &state, keep))
            .await
    }

    async fn delete_snapshot(&self, aggregate_type: &str, aggregate_id: &str) -> Result<u64> {
        let key = [aggregate_type.to_owned(), aggregate_id.to_owned()];
        self.conns()
            .write(move |conn| {
                conn.prepare_cached(
                    "DELETE FROM snapshots WHERE aggregate_type = ?1 AND aggregate_id = ?2",
                )
                .and_then(|mut s| s.execute(key))
                .map(|n| n as u64)
                .map_err(db("deleting a snapshot"))
            })
            .await
    }
}

impl annals::SnapshotAdmin for SqliteEventStore {
    async fn invalidate_snapshots(
        &self,
        aggregate_type: &str,
        below_schema_version: Option<u32>,
    ) -> Result<u64> {
        let aggregate_type = aggregate_type.to_owned();
        self.conns()
            .write(move |conn| {
                conn.prepare_cached(
                    "DELETE FROM snapshots WHERE aggregate_type = ?1 \
                     AND (?2 IS NULL OR schema_version < ?2)",
                )
                .and_then(|mut s| {
                    s.execute(rusqlite::params![aggregate_type, below_schema_version])
                })
                .map(|n| n as u64)
                .map_err(db("invalidating snapshots"))
            })
            .await
    }

    async fn snapshot_coverage(
        &self,
        aggregate_type: Option<&str>,
    ) -> Result<Vec<SnapshotCoverage>> {
        let aggregate_type = aggregate_type.map(str::to_owned);
        self.conns()
            .read(move |conn| coverage_job(conn, aggregate_type.as_deref()))
            .await
    }

    async fn stale_snapshots(
        &self,
        aggregate_type: Option<&str>,
        min_events: u64,
    ) -> Result<Vec<StaleSnapshot>> {
        let aggregate_type = aggregate_type.map(str::to_owned);
        self.conns()
            .read(move |conn| stale_job(conn, aggregate_type.as_deref(), min_events))
            .await
    }
}

impl annals::SnapshotStaging for SqliteEventStore {
    async fn stage_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        let state = state_text(snapshot)?;
        let snapshot = snapshot.clone();
        self.conns()
            .write(move |conn| {
                conn.prepare_cached(STAGE_SQL)
                    .and_then(|mut s| {
                        s.execute(rusqlite::params![
                            snapshot.aggregate_type,
                            snapshot.aggregate_id,
                            sql_int(snapshot.version.get()),
                            snapshot.schema_version,
                            state,
                            to_micros(snapshot.created_at),
                        ])
                    })
                    .map(drop)
                    .map_err(db("staging a snapshot"))
            })
            .await
    }

    async fn load_staged(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Snapshot>> {
        self.load_one(
            LOAD_STAGED_SQL,
            "snapshot_staging",
            "loading a staged snapshot",
            aggregate_type,
            aggregate_id,
        )
        .await
    }

    fn staged_snapshots(&self, aggregate_type: &str) -> BoxStream<'static, Result<Snapshot>> {
        let aggregate_type = aggregate_type.to_owned();
        let batch = sql_int(self.batch_size() as u64);
        self.conns()
            .paginate(String::new(), move |conn, after: String| {
                let mut stmt = conn
                    .prepare_cached(STAGED_PAGE_SQL)
                    .map_err(db("preparing a staged snapshot listing"))?;
                let mut rows = stmt
                    .query(rusqlite::params![aggregate_type, after, batch])
                    .map_err(db("listing staged snapshots"))?;
                let page = Page::collect(&mut rows, 64, "listing staged snapshots", |r| {
                    decode_snapshot("snapshot_staging", r)
                })?;
                let next = match page.last_if_complete() {
                    Some(last) if page.len() as i64 == batch => Some(last.aggregate_id.clone()),
                    _ => None,
                };
                Ok(page.finish(next))
            })
    }

    async fn promote_staged(&self, aggregate_type: &str) -> Result<PromoteReport> {
        let aggregate_type = aggregate_type.to_owned();
        let keep = self.inner.options.snapshot_history;
        self.conns()
            .write(move |conn| promote_job(conn, &aggregate_type, keep))
            .await
    }

    async fn clear_staged(&self, aggregate_type: &str) -> Result<u64> {
        let aggregate_type = aggregate_type.to_owned();
        self.conns()
            .write(move |conn| {
                conn.prepare_cached("DELETE FROM snapshot_staging WHERE aggregate_type = ?1")
                    .and_then(|mut s| s.execute([aggregate_type]))
                    .map(|n| n as u64)
                    .map_err(db("clearing staged snapshots"))
            })
            .await
    }
}
