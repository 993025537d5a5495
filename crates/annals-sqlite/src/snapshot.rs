//! [`annals::SnapshotStore`], [`annals::SnapshotAdmin`] and
//! [`annals::SnapshotStaging`] on SQLite.
//!
//! Snapshots live in the same file as the events, so coverage and freshness
//! are single queries joining `snapshots` with `streams`. The live snapshot of
//! an aggregate is its row with the highest `(schema_version, version)` that
//! is not rolled back (`rolled_back_at IS NULL`). A guarded write runs in one
//! `BEGIN IMMEDIATE` transaction on the writer thread: it deletes the
//! aggregate's rows beyond its stream's head, compares with the live and the
//! rolled-back rows, writes, and trims the aggregate to the history size
//! recorded in `snapshot_settings` (see [`annals::SnapshotStore`] for the
//! rules). Listings over every aggregate are keyset-paginated.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use annals::{
    no_such_snapshot, validate_history_size, EventStore, EventStream, PromoteReport, ReadStream,
    Result, RollbackReport, Snapshot, SnapshotCoverage, SnapshotHistoryEntry, SnapshotStore,
    SnapshotWrite, StaleSnapshot, StreamId, StreamVersion,
};
use futures::stream::BoxStream;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::codec::{
    corrupt_row, decode_snapshot, from_micros, now_micros, snapshot_columns, sql_int, to_micros,
};
use crate::conn::Page;
use crate::error::{corrupt, db};
use crate::event_store::first_stream_cursor;
use crate::SqliteEventStore;

/// An aggregate's snapshot rows that are not rolled back, newest stream
/// version first: the live snapshot is the first of them with the highest
/// schema version ([`read_live`]). The order is the primary key's
/// `(aggregate_type, aggregate_id, version)`, so SQLite walks the
/// aggregate's few history rows backwards in that index with nothing to
/// sort; an `ORDER BY schema_version` here made it build and drop a
/// temporary b-tree on every load, a third of a snapshot load's work
/// (issue 11). The lookup goes by the aggregate's id, never by the
/// `(aggregate_type, schema_version)` index, which walks every snapshot of
/// the type.
const LOAD_LIVE_SQL: &str = concat!(
    "SELECT ",
    snapshot_columns!(),
    " FROM snapshots WHERE aggregate_type = ?1 AND aggregate_id = ?2 \
     AND rolled_back_at IS NULL ORDER BY version DESC"
);

/// The live snapshot of one aggregate (`key`: type and id): the row of
/// [`LOAD_LIVE_SQL`] with the highest `(schema_version, version)`. Only the
/// rows that take the lead are decoded: with the default history of one,
/// exactly one.
fn read_live(conn: &Connection, key: [String; 2]) -> Result<Option<Snapshot>> {
    let what = "loading a snapshot";
    let mut stmt = conn.prepare_cached(LOAD_LIVE_SQL).map_err(db(what))?;
    let mut rows = stmt.query(key).map_err(db(what))?;
    let mut live: Option<Snapshot> = None;
    while let Some(row) = rows.next().map_err(db(what))? {
        let leads = match &live {
            None => true,
            // An older stream version leads only with a higher schema
            // version; a schema version that is not an integer is decoded,
            // which reports it.
            Some(best) => row
                .get::<_, i64>(3)
                .map_or(true, |schema| schema > i64::from(best.schema_version)),
        };
        if leads {
            live = Some(decode_snapshot("snapshots", row)?);
        }
    }
    Ok(live)
}

const HISTORY_SIZE_SQL: &str = "SELECT history FROM snapshot_settings WHERE id = 1";

const HEAD_SQL: &str = "SELECT version FROM streams WHERE stream_id = ?1";

/// Deletes the rows of one aggregate beyond its stream's head `?3`.
const DELETE_AHEAD_SQL: &str = "DELETE FROM snapshots \
    WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND version > ?3";

/// The live row's key and the highest rolled-back version of one aggregate.
const GUARD_SQL: &str = "SELECT \
    (SELECT schema_version FROM snapshots WHERE aggregate_type = ?1 AND aggregate_id = ?2 \
        AND rolled_back_at IS NULL ORDER BY schema_version DESC, version DESC LIMIT 1), \
    (SELECT version FROM snapshots WHERE aggregate_type = ?1 AND aggregate_id = ?2 \
        AND rolled_back_at IS NULL ORDER BY schema_version DESC, version DESC LIMIT 1), \
    (SELECT MAX(version) FROM snapshots WHERE aggregate_type = ?1 AND aggregate_id = ?2 \
        AND rolled_back_at IS NOT NULL)";

const UPSERT_SQL: &str = "INSERT INTO snapshots \
    (aggregate_type, aggregate_id, version, schema_version, state, created_at) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
    ON CONFLICT (aggregate_type, aggregate_id, version) DO UPDATE SET \
    schema_version = excluded.schema_version, state = excluded.state, \
    created_at = excluded.created_at, rolled_back_at = NULL";

/// The order rows are kept in when a history is trimmed: the rows not
/// rolled back first (the live one leads), then the rolled-back ones, each
/// newest first.
macro_rules! keep_order {
    () => {
        "rolled_back_at IS NOT NULL, schema_version DESC, version DESC"
    };
}

/// Keeps the first `?3` rows of one aggregate.
const TRIM_ONE_SQL: &str = concat!(
    "DELETE FROM snapshots \
    WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND version NOT IN ( \
        SELECT version FROM snapshots WHERE aggregate_type = ?1 AND aggregate_id = ?2 \
        ORDER BY ",
    keep_order!(),
    " LIMIT ?3)"
);

/// Keeps the first `?2` rows of every aggregate of a type.
const TRIM_TYPE_SQL: &str = concat!(
    "DELETE FROM snapshots \
    WHERE aggregate_type = ?1 AND (aggregate_id, version) IN ( \
        SELECT aggregate_id, version FROM ( \
            SELECT aggregate_id, version, ROW_NUMBER() OVER ( \
                PARTITION BY aggregate_id ORDER BY ",
    keep_order!(),
    ") AS rank \
            FROM snapshots WHERE aggregate_type = ?1) \
        WHERE rank > ?2)"
);

/// Keeps the first `?1` rows of every aggregate.
const TRIM_ALL_SQL: &str = concat!(
    "DELETE FROM snapshots \
    WHERE (aggregate_type, aggregate_id, version) IN ( \
        SELECT aggregate_type, aggregate_id, version FROM ( \
            SELECT aggregate_type, aggregate_id, version, ROW_NUMBER() OVER ( \
                PARTITION BY aggregate_type, aggregate_id ORDER BY ",
    keep_order!(),
    ") AS rank FROM snapshots) \
        WHERE rank > ?1)"
);

const HISTORY_SQL: &str = "SELECT version, schema_version, created_at, rolled_back_at \
    FROM snapshots WHERE aggregate_type = ?1 AND aggregate_id = ?2 \
    ORDER BY schema_version DESC, version DESC";

/// Marks the rows above `(?3, ?4)` rolled back at `?5`.
const ROLL_BACK_ABOVE_SQL: &str = "UPDATE snapshots SET rolled_back_at = ?5 \
    WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND rolled_back_at IS NULL \
    AND (schema_version, version) > (?3, ?4)";

const MAKE_LIVE_SQL: &str = "UPDATE snapshots SET rolled_back_at = NULL \
    WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND version = ?3";

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

/// The live snapshots of a type after aggregate id `?2`.
const LIVE_PAGE_SQL: &str = concat!(
    "SELECT ",
    snapshot_columns!(),
    " FROM snapshots p WHERE p.aggregate_type = ?1 AND p.aggregate_id > ?2 \
     AND p.rolled_back_at IS NULL AND NOT EXISTS ( \
        SELECT 1 FROM snapshots q WHERE q.aggregate_type = p.aggregate_type \
        AND q.aggregate_id = p.aggregate_id AND q.rolled_back_at IS NULL \
        AND (q.schema_version, q.version) > (p.schema_version, p.version)) \
     ORDER BY p.aggregate_id LIMIT ?3"
);

/// Deletes the rows of a type beyond their stream's head (aggregates
/// without a stream are left alone).
const DELETE_AHEAD_TYPE_SQL: &str = "DELETE FROM snapshots \
    WHERE aggregate_type = ?1 AND version > ( \
        SELECT s.version FROM streams s \
        WHERE s.stream_id = snapshots.aggregate_type || '-' || snapshots.aggregate_id)";

/// Copies the staged snapshots of a type that a guarded write would admit:
/// no live row has a higher `(schema_version, version)`, and no rolled-back
/// row is at the same or a higher version.
const PROMOTE_SQL: &str = "INSERT INTO snapshots \
    (aggregate_type, aggregate_id, version, schema_version, state, created_at) \
    SELECT st.aggregate_type, st.aggregate_id, st.version, st.schema_version, st.state, st.created_at \
    FROM snapshot_staging st \
    WHERE st.aggregate_type = ?1 AND NOT EXISTS ( \
        SELECT 1 FROM snapshots l \
        WHERE l.aggregate_type = st.aggregate_type AND l.aggregate_id = st.aggregate_id \
        AND ((l.rolled_back_at IS NULL \
              AND (l.schema_version, l.version) > (st.schema_version, st.version)) \
          OR (l.rolled_back_at IS NOT NULL AND l.version >= st.version))) \
    ON CONFLICT (aggregate_type, aggregate_id, version) DO UPDATE SET \
    schema_version = excluded.schema_version, state = excluded.state, \
    created_at = excluded.created_at, rolled_back_at = NULL";

/// The live snapshot's column `$col` for the stream row `s` (the aggregate
/// id is the stream name after `<category>-`).
macro_rules! live_of_stream {
    ($col:literal) => {
        concat!(
            "(SELECT p.",
            $col,
            " FROM snapshots p WHERE p.aggregate_type = s.category \
             AND p.aggregate_id = substr(s.stream_id, length(s.category) + 2) \
             AND p.rolled_back_at IS NULL \
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

/// Streams (filtered by `$filter`) with their head, live snapshot version
/// and the events a load replays (`StaleSnapshot::new`'s definition: the
/// whole stream when there is no snapshot or it is ahead), more than `?2`.
macro_rules! stale_rows {
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
                SELECT *, CASE WHEN snap IS NULL OR snap > head THEN head \
                ELSE head - snap END AS behind FROM heads) \
             SELECT aggregate_type, aggregate_id, head, snap, stream_id FROM behind \
             WHERE behind > ?2 "
        )
    };
}

const STALE_ALL_SQL: &str = concat!(
    stale_rows!("WHERE ?1 IS NULL"),
    "ORDER BY behind DESC, aggregate_id ASC, stream_id ASC"
);
const STALE_TYPE_SQL: &str = concat!(
    stale_rows!("WHERE s.category = ?1"),
    "ORDER BY behind DESC, aggregate_id ASC, stream_id ASC"
);

/// A page of the stale listing: streams after `?3`, in stream-id order.
const STALE_PAGE_ALL_SQL: &str = concat!(
    stale_rows!("WHERE ?1 IS NULL AND s.stream_id > ?3"),
    "ORDER BY stream_id LIMIT ?4"
);
const STALE_PAGE_TYPE_SQL: &str = concat!(
    stale_rows!("WHERE s.category = ?1 AND s.stream_id > ?3"),
    "ORDER BY stream_id LIMIT ?4"
);

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

/// The history size recorded in the store.
fn history_size(conn: &Connection) -> Result<u32> {
    let keep: i64 = conn
        .prepare_cached(HISTORY_SIZE_SQL)
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(db("reading the snapshot history size"))?;
    u32::try_from(keep)
        .ok()
        .filter(|&k| k >= 1)
        .ok_or_else(|| corrupt_row(format!("snapshot_settings: history {keep} out of range")))
}

/// Deletes the aggregate's rows beyond its stream's head (when the stream
/// exists): a snapshot left there by restored events is invalid.
fn delete_ahead(tx: &Transaction<'_>, aggregate_type: &str, aggregate_id: &str) -> Result<()> {
    let stream = format!("{aggregate_type}-{aggregate_id}");
    let head: Option<i64> = tx
        .prepare_cached(HEAD_SQL)
        .and_then(|mut s| s.query_row([stream], |r| r.get(0)).optional())
        .map_err(db("reading the stream head"))?;
    if let Some(head) = head {
        tx.prepare_cached(DELETE_AHEAD_SQL)
            .and_then(|mut s| s.execute(rusqlite::params![aggregate_type, aggregate_id, head]))
            .map_err(db("deleting snapshots ahead of the stream head"))?;
    }
    Ok(())
}

fn save_job(conn: &mut Connection, snapshot: &Snapshot, state: &str) -> Result<SnapshotWrite> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db("starting a snapshot write"))?;
    let (t, id) = (&snapshot.aggregate_type, &snapshot.aggregate_id);
    delete_ahead(&tx, t, id)?;
    let new_key = (
        i64::from(snapshot.schema_version),
        sql_int(snapshot.version.get()),
    );
    let (live_schema, live_version, rolled_back): (Option<i64>, Option<i64>, Option<i64>) = tx
        .prepare_cached(GUARD_SQL)
        .and_then(|mut s| s.query_row([t, id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))))
        .map_err(db("reading the live snapshot"))?;
    let live = live_schema.zip(live_version);
    // `Snapshot::supersedes` on the live key, and above every rolled-back row.
    if live.is_some_and(|live| new_key < live) || rolled_back.is_some_and(|v| new_key.1 <= v) {
        tx.commit().map_err(db("committing a snapshot write"))?;
        return Ok(SnapshotWrite::Superseded);
    }
    tx.prepare_cached(UPSERT_SQL)
        .and_then(|mut s| {
            s.execute(rusqlite::params![
                t,
                id,
                new_key.1,
                new_key.0,
                state,
                to_micros(snapshot.created_at),
            ])
        })
        .map_err(db("writing a snapshot"))?;
    let keep = history_size(&tx)?;
    tx.prepare_cached(TRIM_ONE_SQL)
        .and_then(|mut s| s.execute(rusqlite::params![t, id, keep]))
        .map_err(db("trimming snapshot history"))?;
    tx.commit().map_err(db("committing a snapshot"))?;
    Ok(SnapshotWrite::Written)
}

fn promote_job(conn: &mut Connection, aggregate_type: &str) -> Result<PromoteReport> {
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
    tx.execute(DELETE_AHEAD_TYPE_SQL, [aggregate_type])
        .map_err(db("deleting snapshots ahead of their stream head"))?;
    let promoted = tx
        .execute(PROMOTE_SQL, [aggregate_type])
        .map_err(db("promoting staged snapshots"))? as u64;
    let keep = history_size(&tx)?;
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

fn set_history_job(conn: &mut Connection, keep: u32) -> Result<u64> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db("starting a history size change"))?;
    tx.execute(
        "UPDATE snapshot_settings SET history = ?1 WHERE id = 1",
        [keep],
    )
    .map_err(db("recording the snapshot history size"))?;
    let trimmed = tx
        .execute(TRIM_ALL_SQL, [keep])
        .map_err(db("trimming snapshot history"))? as u64;
    tx.commit()
        .map_err(db("committing a history size change"))?;
    Ok(trimmed)
}

/// The history of one aggregate, newest first, the live row marked.
fn history_rows(
    conn: &Connection,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Vec<SnapshotHistoryEntry>> {
    let what = "reading snapshot history";
    let mut stmt = conn.prepare_cached(HISTORY_SQL).map_err(db(what))?;
    let mut rows = stmt
        .query([aggregate_type, aggregate_id])
        .map_err(db(what))?;
    let bad = |what: &str| format!("snapshots row {aggregate_type}/{aggregate_id}: {what}");
    let mut out = Vec::new();
    let mut live_seen = false;
    while let Some(r) = rows.next().map_err(db(what))? {
        let version: i64 = r.get(0).map_err(db(what))?;
        let schema_version: i64 = r.get(1).map_err(db(what))?;
        let created_at: i64 = r.get(2).map_err(db(what))?;
        let rolled_back_at: Option<i64> = r.get(3).map_err(db(what))?;
        let live = rolled_back_at.is_none() && !live_seen;
        live_seen |= live;
        out.push(SnapshotHistoryEntry {
            version: StreamVersion(u64_of(version, || bad("negative version"))?),
            schema_version: u32::try_from(schema_version)
                .map_err(|e| corrupt(bad("schema_version out of range"), e))?,
            created_at: from_micros(created_at)
                .ok_or_else(|| corrupt_row(bad("created_at out of range")))?,
            live,
            rolled_back_at: rolled_back_at
                .map(|t| {
                    from_micros(t).ok_or_else(|| corrupt_row(bad("rolled_back_at out of range")))
                })
                .transpose()?,
        });
    }
    Ok(out)
}

fn rollback_job(
    conn: &mut Connection,
    aggregate_type: &str,
    aggregate_id: &str,
    to_version: StreamVersion,
) -> Result<RollbackReport> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db("starting a snapshot rollback"))?;
    let history = history_rows(&tx, aggregate_type, aggregate_id)?;
    let Some(target) = history.iter().find(|e| e.version == to_version) else {
        let kept: Vec<StreamVersion> = history.iter().map(|e| e.version).collect();
        return Err(no_such_snapshot(
            aggregate_type,
            aggregate_id,
            to_version,
            &kept,
        ));
    };
    let version = sql_int(to_version.get());
    let rolled_back = tx
        .prepare_cached(ROLL_BACK_ABOVE_SQL)
        .and_then(|mut s| {
            s.execute(rusqlite::params![
                aggregate_type,
                aggregate_id,
                target.schema_version,
                version,
                now_micros()
            ])
        })
        .map_err(db("rolling snapshots back"))? as u64;
    tx.prepare_cached(MAKE_LIVE_SQL)
        .and_then(|mut s| s.execute(rusqlite::params![aggregate_type, aggregate_id, version]))
        .map_err(db("rolling snapshots back"))?;
    let live = SnapshotHistoryEntry {
        live: true,
        rolled_back_at: None,
        ..target.clone()
    };
    tx.commit().map_err(db("committing a snapshot rollback"))?;
    Ok(RollbackReport {
        aggregate_type: aggregate_type.to_owned(),
        aggregate_id: aggregate_id.to_owned(),
        live,
        rolled_back,
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

/// A row of the stale queries, with its stream id (the listing's cursor).
fn decode_stale(r: &rusqlite::Row<'_>) -> Result<(StaleSnapshot, String)> {
    let what = "reading stale snapshots";
    let aggregate_type: String = r.get(0).map_err(db(what))?;
    let aggregate_id: String = r.get(1).map_err(db(what))?;
    let at = || format!("stream {aggregate_type}-{aggregate_id}: negative version");
    let head: i64 = r.get(2).map_err(db(what))?;
    let snap: Option<i64> = r.get(3).map_err(db(what))?;
    let stream_id: String = r.get(4).map_err(db(what))?;
    let head = StreamVersion(u64_of(head, at)?);
    let snap = snap.map(|v| u64_of(v, at).map(StreamVersion)).transpose()?;
    Ok((
        StaleSnapshot::new(aggregate_type, aggregate_id, head, snap),
        stream_id,
    ))
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
        out.push(decode_stale(r)?.0);
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
        let key = [aggregate_type.to_owned(), aggregate_id.to_owned()];
        self.conns().read(move |conn| read_live(conn, key)).await
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<SnapshotWrite> {
        let state = state_text(snapshot)?;
        let snapshot = snapshot.clone();
        self.conns()
            .write(move |conn| save_job(conn, &snapshot, &state))
            .await
    }

    /// One reader job when `events` is a handle on this same database (any
    /// clone of this store, with any upcasters): the snapshot query and the
    /// first page of events from its version, in one round trip and one
    /// read of the file. Otherwise the two reads one after the other.
    async fn load_snapshot_and_events<S: EventStore>(
        &self,
        events: &S,
        aggregate_type: &str,
        stream: &StreamId,
    ) -> Result<Option<(Snapshot, EventStream)>> {
        let same = (events as &dyn Any)
            .downcast_ref::<SqliteEventStore>()
            .filter(|e| Arc::ptr_eq(&e.inner, &self.inner));
        let Some(events) = same else {
            let Some(snapshot) = self.load_snapshot(aggregate_type, stream.id()).await? else {
                return Ok(None);
            };
            let read = events.read_stream(stream, ReadStream::forward().from(snapshot.version));
            return Ok(Some((snapshot, read)));
        };
        let key = [aggregate_type.to_owned(), stream.id().to_owned()];
        let (id, read) = (stream.clone(), events.stream_reader(ReadStream::forward()));
        let job_read = Arc::clone(&read);
        let found = self
            .conns()
            .read(move |conn| {
                let Some(snapshot) = read_live(conn, key)? else {
                    return Ok(None);
                };
                // The events from the snapshot's version on. A failure here
                // belongs to the events' stream, not to the snapshot's load
                // (see the trait method).
                let from = ReadStream::forward().from(snapshot.version);
                let page = match first_stream_cursor(&from) {
                    Some(cursor) => job_read(conn, &id, cursor),
                    None => Err(corrupt_row("a snapshot read without a cursor".into())),
                };
                Ok(Some((snapshot, page)))
            })
            .await?;
        let Some((snapshot, page)) = found else {
            return Ok(None);
        };
        let events = match page {
            Ok((first, next)) => events.continue_stream(stream.clone(), read, first, next),
            Err(e) => Box::pin(futures::stream::iter([Err(e)])),
        };
        Ok(Some((snapshot, events)))
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
    async fn snapshot_history_size(&self) -> Result<u32> {
        self.conns().read(history_size).await
    }

    async fn set_snapshot_history_size(&self, keep: u32) -> Result<u64> {
        validate_history_size(keep)?;
        self.conns()
            .write(move |conn| set_history_job(conn, keep))
            .await
    }

    async fn snapshot_history(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Vec<SnapshotHistoryEntry>> {
        let (t, id) = (aggregate_type.to_owned(), aggregate_id.to_owned());
        self.conns()
            .read(move |conn| history_rows(conn, &t, &id))
            .await
    }

    async fn rollback_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        to_version: StreamVersion,
    ) -> Result<RollbackReport> {
        let (t, id) = (aggregate_type.to_owned(), aggregate_id.to_owned());
        self.conns()
            .write(move |conn| rollback_job(conn, &t, &id, to_version))
            .await
    }

    fn list_stale_snapshots(
        &self,
        aggregate_type: Option<&str>,
        min_events: u64,
    ) -> BoxStream<'static, Result<StaleSnapshot>> {
        let aggregate_type = aggregate_type.map(str::to_owned);
        let sql = if aggregate_type.is_some() {
            STALE_PAGE_TYPE_SQL
        } else {
            STALE_PAGE_ALL_SQL
        };
        let batch = sql_int(self.batch_size() as u64);
        let min_events = sql_int(min_events);
        self.conns()
            .paginate(String::new(), move |conn, after: String| {
                let what = "listing stale snapshots";
                let mut stmt = conn.prepare_cached(sql).map_err(db(what))?;
                let mut rows = stmt
                    .query(rusqlite::params![aggregate_type, min_events, after, batch])
                    .map_err(db(what))?;
                let mut page = Vec::new();
                let mut next = None;
                while let Some(r) = rows.next().map_err(db(what))? {
                    let (row, stream_id) = decode_stale(r)?;
                    page.push(Ok(row));
                    next = Some(stream_id);
                }
                let next = next.filter(|_| page.len() as i64 == batch);
                Ok((page, next))
            })
    }

    fn live_snapshots(&self, aggregate_type: &str) -> BoxStream<'static, Result<Snapshot>> {
        let aggregate_type = aggregate_type.to_owned();
        let batch = sql_int(self.batch_size() as u64);
        self.conns()
            .paginate(String::new(), move |conn, after: String| {
                let mut stmt = conn
                    .prepare_cached(LIVE_PAGE_SQL)
                    .map_err(db("preparing a live snapshot listing"))?;
                let mut rows = stmt
                    .query(rusqlite::params![aggregate_type, after, batch])
                    .map_err(db("listing live snapshots"))?;
                let page = Page::collect(&mut rows, 64, "listing live snapshots", |r| {
                    decode_snapshot("snapshots", r)
                })?;
                let next = match page.last_if_complete() {
                    Some(last) if page.len() as i64 == batch => Some(last.aggregate_id.clone()),
                    _ => None,
                };
                Ok(page.finish(next))
            })
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
        self.conns()
            .write(move |conn| promote_job(conn, &aggregate_type))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot load looks the aggregate up by its id, not by walking
    /// every snapshot of its type, and sorts nothing (issue 11).
    #[test]
    fn live_snapshot_load_goes_by_the_aggregate_id() {
        let mut conn = Connection::open_in_memory().expect("in-memory database");
        crate::migrate::migrate(&mut conn).expect("migrate");
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {LOAD_LIVE_SQL}"))
            .expect("explain")
            .query_map(rusqlite::params!["Account", "a1"], |r| r.get(3))
            .expect("plan")
            .collect::<rusqlite::Result<_>>()
            .expect("rows");
        assert!(
            plan.iter().any(|step| step.contains("aggregate_id=?")),
            "no lookup by aggregate_id in {plan:?}"
        );
        assert!(
            !plan
                .iter()
                .any(|step| step.contains("snapshots_type_schema_version")),
            "the type's index in {plan:?}"
        );
        assert!(
            !plan.iter().any(|step| step.contains("TEMP B-TREE")),
            "a sort in {plan:?}"
        );
    }
}
