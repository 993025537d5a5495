//! [`annals::EventStore`] and [`annals::StreamCatalog`] on SQLite.
//!
//! An append is one writer-thread job in one savepoint of a group
//! transaction (`BEGIN IMMEDIATE`, committed once for all the appends that
//! were waiting; see `conn`): read the head from `streams`, check the
//! expected version, insert the events, move the head, release the
//! savepoint. The idempotency check costs nothing on the
//! normal path: a reused event id surfaces as a unique violation on insert,
//! and only then does the job roll back its savepoint, read the stored rows of the batch's
//! ids and let the core decide ([`annals::check_retry`], on their
//! fingerprints); when the expected version does not match, the same check
//! runs before the conflict is reported, because a retried batch must
//! succeed. Payloads and metadata are stored as the core prepared them
//! ([`annals::prepare_batch`]: canonical JSON text), with the payload's
//! fingerprint in `data_digest`.
//!
//! Reads are keyset-paginated (`stream_version` for a stream, `position` for
//! the global feed), `batch_size` rows per reader round trip, with every
//! filter in SQL so that a short page means the end. A page also stops once
//! its rows hold [`PAGE_BYTES`] of text (it always has one row), so that a
//! read of large events holds a few megabytes, not `batch_size` of them
//! twice over (the page being consumed and the one read ahead).
//!
//! An `append_many` ([`annals::MultiStreamAppend`]) is the same steps for
//! each of its batches inside one savepoint: one member of a group, all or
//! nothing.

use std::sync::Arc;

use annals::{
    check_retry, check_retry_many, prepare_batch, prepare_many, AppendResult, CategoryStats,
    Direction, EventId, EventStore, EventStream, EventTypeStats, ExpectedVersion, Fingerprint,
    GlobalPosition, NewEvent, PreparedEvent, PreparedStreamBatch, ReadAll, ReadStream,
    RecordedEvent, Result, StoreStats, StoredEvent, StreamBatch, StreamId, StreamInfo,
    StreamVersion,
};
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use rusqlite::{Connection, OptionalExtension, ToSql};
use uuid::Uuid;

use crate::codec::{
    event_columns, from_micros, now_micros, sql_int, to_micros, EventRows, RawEvents,
};
use crate::conn::Page;
use crate::error::{classify, corrupt, db, map_err, ErrorKind};
use crate::SqliteEventStore;

static LABELS: [metrics::Label; 1] = [metrics::Label::from_static_parts("backend", "sqlite")];
/// The append and read metrics of this backend.
pub(crate) static METRICS: annals::StoreMetrics = annals::StoreMetrics::new(&LABELS);

/// The text (payloads, metadata, names) a read page stops at: the row that
/// reaches it is the page's last. Small events fill `batch_size` rows long
/// before this; events of a megabyte come a few per page.
pub(crate) const PAGE_BYTES: usize = 4 << 20;

/// The head, and the archive of an archived stream (its tombstone).
const HEAD_SQL: &str = "SELECT s.version, a.location FROM streams s \
    LEFT JOIN archived_streams a ON a.stream_id = s.stream_id WHERE s.stream_id = ?1";

pub(crate) const INSERT_SQL: &str = "INSERT INTO events \
    (event_id, stream_id, category, stream_version, event_type, event_version, data, metadata, recorded_at, data_digest) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

pub(crate) const UPSERT_STREAM_SQL: &str = "INSERT INTO streams (stream_id, category, version) \
    VALUES (?1, ?2, ?3) ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version";

/// What the idempotency check needs of a stored event; the payload only for
/// rows written before fingerprints were stored.
const FIND_BY_ID_SQL: &str = "SELECT position, stream_id, stream_version, event_type, \
    event_version, data_digest, CASE WHEN data_digest IS NULL THEN data END \
    FROM events WHERE event_id = ?1";

pub(crate) const READ_EVENT_SQL: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events WHERE event_id = ?1"
);

const READ_FORWARD_SQL: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events WHERE stream_id = ?1 AND stream_version BETWEEN ?2 AND ?3 \
     AND recorded_at <= ?4 ORDER BY stream_version ASC LIMIT ?5"
);

const READ_BACKWARD_SQL: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events WHERE stream_id = ?1 AND stream_version BETWEEN ?2 AND ?3 \
     AND recorded_at <= ?4 ORDER BY stream_version DESC LIMIT ?5"
);

const LIST_STREAMS_SQL: &str = "SELECT stream_id, version FROM streams \
    WHERE category = ?1 AND stream_id > ?2 ORDER BY stream_id LIMIT ?3";

/// The head of `stream` as seen by `conn`; [`annals::Error::StreamArchived`]
/// when it is archived (so appends and imports refuse it too).
pub(crate) fn head_version(conn: &Connection, stream: &StreamId) -> Result<Option<StreamVersion>> {
    let row: Option<(i64, Option<String>)> = conn
        .prepare_cached(HEAD_SQL)
        .and_then(|mut s| {
            s.query_row([stream.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(db("reading a stream head"))?;
    let Some((v, archived)) = row else {
        return Ok(None);
    };
    let head = u64::try_from(v)
        .map(StreamVersion)
        .map_err(|e| corrupt(format!("streams row {stream}: negative version"), e))?;
    match archived {
        Some(location) => Err(annals::Error::StreamArchived {
            stream: stream.clone(),
            head,
            location,
        }),
        None => Ok(Some(head)),
    }
}

/// Why inserting a batch stopped.
enum InsertError {
    /// A unique key clashed: an event id (or version) is already stored.
    Unique(rusqlite::Error),
    /// Anything else.
    Other(annals::Error),
}

impl From<annals::Error> for InsertError {
    fn from(e: annals::Error) -> Self {
        InsertError::Other(e)
    }
}

/// Inserts the batch after `head`; returns each event's position.
fn insert_events(
    tx: &Connection,
    stream: &StreamId,
    head: u64,
    events: &[PreparedEvent],
    recorded_at: i64,
) -> std::result::Result<Vec<GlobalPosition>, InsertError> {
    let mut insert = tx
        .prepare_cached(INSERT_SQL)
        .map_err(db("preparing the event insert"))?;
    let mut positions = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        let version = sql_int(head + i as u64 + 1);
        let inserted = insert.execute(rusqlite::params![
            &e.event_id.0.as_bytes()[..],
            stream.as_str(),
            stream.category(),
            version,
            e.event_type,
            i64::from(e.event_version),
            e.data,
            e.metadata,
            recorded_at,
            &e.fingerprint.as_bytes()[..],
        ]);
        match inserted {
            Ok(_) => positions.push(GlobalPosition::from_seq(tx.last_insert_rowid() as u64)),
            Err(err) if classify(&err) == ErrorKind::UniqueViolation => {
                return Err(InsertError::Unique(err))
            }
            Err(err) => return Err(InsertError::Other(map_err("inserting an event", err))),
        }
    }
    Ok(positions)
}

/// Reads the stored rows of the batch's ids and lets the core decide:
/// `Ok(None)` when none is stored, `Ok(Some(original))` for a retry of a
/// stored batch, [`annals::Error::DuplicateEventId`] for any other reuse.
fn find_existing(
    conn: &Connection,
    stream: &StreamId,
    events: &[PreparedEvent],
) -> Result<Option<AppendResult>> {
    let mut find = conn
        .prepare_cached(FIND_BY_ID_SQL)
        .map_err(db("preparing the event id lookup"))?;
    let mut stored = Vec::with_capacity(events.len());
    for e in events {
        let row = find
            .query_row([&e.event_id.0.as_bytes()[..]], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<Vec<u8>>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                ))
            })
            .optional()
            .map_err(db("looking up an event id"))?;
        let Some((position, stream_id, version, event_type, event_version, digest, data)) = row
        else {
            stored.push(None);
            continue;
        };
        let bad = |what: &str| format!("event at position {position}: {what}");
        let fingerprint = digest
            .map(|d| {
                Fingerprint::from_slice(&d)
                    .ok_or_else(|| crate::codec::corrupt_row(bad("data_digest is not 32 bytes")))
            })
            .transpose()?;
        stored.push(Some(StoredEvent {
            stream_id: StreamId::parse(&stream_id)
                .map_err(|e| corrupt(bad("invalid stream_id"), e))?,
            stream_version: StreamVersion(
                u64::try_from(version).map_err(|e| corrupt(bad("negative stream_version"), e))?,
            ),
            global_position: GlobalPosition::from_seq(
                u64::try_from(position).map_err(|e| corrupt(bad("negative position"), e))?,
            ),
            event_type,
            event_version: u32::try_from(event_version)
                .map_err(|e| corrupt(bad("event_version out of range"), e))?,
            fingerprint,
            data,
        }));
    }
    check_retry(stream, events, &stored)
}

/// The whole append, on the writer thread, inside a group transaction
/// (`Conns::write_in_group`): everything it writes is in its own savepoint,
/// released when it succeeds and rolled back when it fails, so a failed
/// append leaves the other appends of its group as they were.
fn append_job(
    conn: &mut Connection,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[PreparedEvent],
) -> Result<AppendResult> {
    let sp = conn.savepoint().map_err(db("starting an append"))?;
    let actual = head_version(&sp, stream)?;
    if !expected.matches(actual) {
        // Idempotency first: a retried batch succeeds whatever `expected` says.
        if let Some(original) = find_existing(&sp, stream, events)? {
            return Ok(original);
        }
        return Err(annals::Error::WrongExpectedVersion {
            stream: stream.clone(),
            expected,
            actual,
        });
    }
    let head = actual.map_or(0, StreamVersion::get);
    let recorded_at = now_micros();
    match insert_events(&sp, stream, head, events, recorded_at) {
        Ok(positions) => {
            let last = head + events.len() as u64;
            sp.prepare_cached(UPSERT_STREAM_SQL)
                .and_then(|mut s| {
                    s.execute(rusqlite::params![
                        stream.as_str(),
                        stream.category(),
                        sql_int(last)
                    ])
                })
                .map_err(db("moving the stream head"))?;
            sp.commit().map_err(db("releasing an append's savepoint"))?;
            Ok(AppendResult {
                first_version: StreamVersion(head + 1),
                last_version: StreamVersion(last),
                positions,
                deduplicated: false,
            })
        }
        Err(InsertError::Other(e)) => Err(e),
        Err(InsertError::Unique(err)) => {
            // Drop this batch's own rows before comparing with what is stored.
            let mut sp = sp;
            sp.rollback().map_err(db("rolling back an append"))?;
            match find_existing(&sp, stream, events)? {
                Some(original) => Ok(original),
                // Not an event id: the (stream_id, stream_version) key, which
                // means `streams` is out of step with `events`.
                None => Err(map_err(
                    &format!("appending to {stream}: stream head out of step with its events"),
                    err,
                )),
            }
        }
    }
}

/// A whole `append_many`, on the writer thread, as one member of a group
/// transaction (`Conns::write_in_group`), like [`append_job`]: every batch
/// goes through its steps (head, expected version, insert, head update)
/// inside one savepoint, released when every batch is written and rolled
/// back at the first failure, so the call is all or nothing and leaves the
/// other members of its group as they were. The writer thread runs one
/// member at a time, so the streams need no lock order of their own here.
fn append_many_job(
    conn: &mut Connection,
    batches: &[PreparedStreamBatch],
) -> Result<Vec<AppendResult>> {
    let sp = conn.savepoint().map_err(db("starting an append"))?;
    let mut heads = Vec::with_capacity(batches.len());
    for b in batches {
        let actual = head_version(&sp, &b.stream)?;
        if !b.expected.matches(actual) {
            // Idempotency first: a retried call succeeds whatever it expected.
            if let Some(originals) = find_existing_many(&sp, batches)? {
                return Ok(originals);
            }
            return Err(annals::Error::WrongExpectedVersion {
                stream: b.stream.clone(),
                expected: b.expected,
                actual,
            });
        }
        heads.push(actual.map_or(0, StreamVersion::get));
    }
    let recorded_at = now_micros();
    let mut results = Vec::with_capacity(batches.len());
    for (b, head) in batches.iter().zip(heads) {
        match insert_events(&sp, &b.stream, head, &b.events, recorded_at) {
            Ok(positions) => {
                let last = head + b.events.len() as u64;
                sp.prepare_cached(UPSERT_STREAM_SQL)
                    .and_then(|mut s| {
                        s.execute(rusqlite::params![
                            b.stream.as_str(),
                            b.stream.category(),
                            sql_int(last)
                        ])
                    })
                    .map_err(db("moving the stream head"))?;
                results.push(AppendResult {
                    first_version: StreamVersion(head + 1),
                    last_version: StreamVersion(last),
                    positions,
                    deduplicated: false,
                });
            }
            Err(InsertError::Other(e)) => return Err(e),
            Err(InsertError::Unique(err)) => {
                // Drop the call's own rows before comparing with what is
                // stored.
                let mut sp = sp;
                sp.rollback().map_err(db("rolling back an append"))?;
                return match find_existing_many(&sp, batches)? {
                    Some(originals) => Ok(originals),
                    None => Err(map_err(
                        &format!(
                            "appending to {}: stream head out of step with its events",
                            b.stream
                        ),
                        err,
                    )),
                };
            }
        }
    }
    sp.commit().map_err(db("releasing an append's savepoint"))?;
    Ok(results)
}

/// [`find_existing`] for every batch, decided together by
/// [`annals::check_retry_many`].
fn find_existing_many(
    conn: &Connection,
    batches: &[PreparedStreamBatch],
) -> Result<Option<Vec<AppendResult>>> {
    let retries = batches
        .iter()
        .map(|b| find_existing(conn, &b.stream, &b.events))
        .collect::<Result<Vec<_>>>()?;
    check_retry_many(batches, retries)
}

impl annals::MultiStreamAppend for SqliteEventStore {
    async fn append_many(&self, batches: Vec<StreamBatch>) -> Result<Vec<AppendResult>> {
        METRICS
            .append(async {
                let batches = prepare_many(batches)?;
                if batches.is_empty() {
                    return Ok(Vec::new());
                }
                self.conns()
                    .write_in_group(move |conn| append_many_job(conn, &batches))
                    .await
            })
            .await
    }
}

/// Where a paginated stream read resumes.
pub(crate) struct StreamCursor {
    /// Next version to read (forward: lowest; backward: highest).
    next: u64,
    /// Events still allowed by `limit`.
    remaining: u64,
}

/// Where a paginated `read_all` resumes.
pub(crate) struct AllCursor {
    pub(crate) after: i64,
    pub(crate) remaining: u64,
    /// Whether the first page is still to skip ahead to the first event
    /// recorded at or after `ReadAll::since` (see [`read_all_page`]).
    pub(crate) seek_since: bool,
}

/// Where a feed page's read resumes: the first round trip also reads the
/// head.
struct FeedCursor {
    all: AllCursor,
    first: bool,
}

/// The lowest position recorded at or after `?1`: one range scan of the
/// recorded_at index (named, because SQLite's MIN optimization would rather
/// walk the table from position 1 until the first match, which is the whole
/// log before a recent `since`).
const FIRST_SINCE_SQL: &str =
    "SELECT MIN(position) FROM events INDEXED BY events_recorded_at WHERE recorded_at >= ?1";

fn read_stream_page(
    conn: &Connection,
    stream: &StreamId,
    options: &ReadStream,
    batch: u64,
    max_bytes: usize,
    cursor: StreamCursor,
) -> Result<(RawEvents, Option<StreamCursor>)> {
    let want = cursor.remaining.min(batch);
    let until = options.until_version.map_or(u64::MAX, StreamVersion::get);
    let (sql, lo, hi) = match options.direction {
        Direction::Forward => (READ_FORWARD_SQL, cursor.next, until),
        Direction::Backward => (READ_BACKWARD_SQL, 1, cursor.next.min(until)),
    };
    let as_of = options.as_of.map_or(i64::MAX, to_micros);
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(db("preparing a stream read"))?;
    let mut rows = stmt
        .query(rusqlite::params![
            stream.as_str(),
            sql_int(lo),
            sql_int(hi),
            as_of,
            sql_int(want)
        ])
        .map_err(db("reading a stream"))?;
    let page = RawEvents::collect(&mut rows, want as usize, max_bytes, "reading a stream")?;
    let n = page.len() as u64;
    if n == 0 {
        // No events: an archived stream says where they went.
        crate::archive::refuse_archived(conn, stream)?;
    }
    let more = n == want || page.is_at_budget();
    let next = match page.last_keys() {
        Some((_, v)) if more && page.is_complete() && cursor.remaining > n => {
            match options.direction {
                Direction::Forward => (v < until).then_some(v + 1),
                Direction::Backward => (v > 1).then(|| v - 1),
            }
            .map(|next| StreamCursor {
                next,
                remaining: cursor.remaining - n,
            })
        }
        _ => None,
    };
    Ok((page, next))
}

/// The highest position stored (`None`: no events).
pub(crate) fn max_position(conn: &Connection) -> Result<Option<i64>> {
    conn.prepare_cached("SELECT MAX(position) FROM events")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(db("reading the head position"))
}

/// `position` as a position of this store: SQLite positions have no commit
/// part.
pub(crate) fn check_local(position: GlobalPosition) -> Result<()> {
    if position.commit() == 0 {
        return Ok(());
    }
    Err(annals::Error::PositionOutOfRange {
        position,
        reason: "SQLite positions have no commit part; this one is from another store".into(),
    })
}

/// The `read_all` query for a set of filters: built once per call, cached
/// by its text like any other statement.
pub(crate) fn read_all_sql(options: &ReadAll) -> String {
    select_sql(options, false, false)
}

/// [`read_all_sql`] for a window of positions: `position > ?1 AND
/// position <= ?2`, the filters numbered from `?3`. With `walk`, the
/// filters are not an access path either: the window is read along the
/// table (its rows in position order, each row once), the right plan when
/// most of its rows match; without, a category or type filter walks its
/// index and looks up each match.
pub(crate) fn read_window_sql(options: &ReadAll, walk: bool) -> String {
    select_sql(options, true, walk)
}

fn select_sql(options: &ReadAll, window: bool, walk: bool) -> String {
    let mut sql = format!(
        "SELECT {} FROM events WHERE position > ?1",
        event_columns!()
    );
    let mut n = 2;
    if window {
        sql.push_str(" AND position <= ?2");
        n = 3;
    }
    let mut list = |sql: &mut String, column: &str, len: usize| {
        if len == 0 {
            return;
        }
        sql.push_str(&format!(" AND {column} IN ("));
        for i in 0..len {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("?{n}"));
            n += 1;
        }
        sql.push(')');
    };
    let (category, event_type) = if walk {
        ("+category", "+event_type")
    } else {
        ("category", "event_type")
    };
    list(&mut sql, category, options.categories.len());
    list(&mut sql, event_type, options.event_types.len());
    // Filters, not the access path: `+recorded_at` keeps the planner off
    // the recorded_at index, which would read every event of the window and
    // sort it again for each page; the walk stays in position order.
    if options.since.is_some() {
        sql.push_str(&format!(" AND +recorded_at >= ?{n}"));
        n += 1;
    }
    if options.until.is_some() {
        sql.push_str(&format!(" AND +recorded_at <= ?{n}"));
        n += 1;
    }
    sql.push_str(&format!(" ORDER BY position ASC LIMIT ?{n}"));
    sql
}

pub(crate) fn read_all_page(
    conn: &Connection,
    sql: &str,
    options: &ReadAll,
    batch: u64,
    max_bytes: usize,
    cursor: AllCursor,
) -> Result<(RawEvents, Option<AllCursor>)> {
    let mut cursor = cursor;
    let since = options.since.map(to_micros);
    if let (true, Some(since)) = (cursor.seek_since, since) {
        // Positions follow commit order on SQLite, so no event recorded at
        // or after `since` can appear below the first one stored now: the
        // walk starts there instead of filtering the whole log before it.
        let first: Option<i64> = conn
            .prepare_cached(FIRST_SINCE_SQL)
            .and_then(|mut s| s.query_row([since], |r| r.get(0)))
            .map_err(db("seeking the first event since an instant"))?;
        match first {
            Some(first) => cursor.after = cursor.after.max(first - 1),
            None => return Ok((RawEvents::empty(), None)),
        }
        cursor.seek_since = false;
    }
    let want = cursor.remaining.min(batch);
    let limit = sql_int(want);
    let until = options.until.map(to_micros);
    let mut params: Vec<&dyn ToSql> =
        Vec::with_capacity(4 + options.categories.len() + options.event_types.len());
    params.push(&cursor.after);
    params.extend(options.categories.iter().map(|c| c as &dyn ToSql));
    params.extend(options.event_types.iter().map(|t| t as &dyn ToSql));
    params.extend(since.iter().map(|t| t as &dyn ToSql));
    params.extend(until.iter().map(|t| t as &dyn ToSql));
    params.push(&limit);
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(db("preparing a read_all"))?;
    let mut rows = stmt
        .query(params.as_slice())
        .map_err(db("reading all events"))?;
    let page = RawEvents::collect(&mut rows, want as usize, max_bytes, "reading all events")?;
    let n = page.len() as u64;
    let more = n == want || page.is_at_budget();
    let next = match page.last_keys() {
        Some((position, _)) if more && page.is_complete() && cursor.remaining > n => {
            Some(AllCursor {
                after: position,
                remaining: cursor.remaining - n,
                seek_since: false,
            })
        }
        _ => None,
    };
    Ok((page, next))
}

/// The cursor of a stream read's first page; `None` when the read asks for
/// no events.
pub(crate) fn first_stream_cursor(options: &ReadStream) -> Option<StreamCursor> {
    let next = match options.direction {
        Direction::Forward => options.from.map_or(1, |v| v.get().max(1)),
        Direction::Backward => options.from.map_or(u64::MAX, StreamVersion::get),
    };
    let remaining = options.limit.unwrap_or(u64::MAX);
    (remaining > 0).then_some(StreamCursor { next, remaining })
}

/// A stream read's page fetch: one page of `stream` at `cursor`, decoded
/// with a handle's upcasters and counted on the read metric.
type StreamPageFn = dyn Fn(&Connection, &StreamId, StreamCursor) -> Result<(EventRows, Option<StreamCursor>)>
    + Send
    + Sync;

impl SqliteEventStore {
    /// The page fetch of a read of one stream with `options` through this
    /// handle (its batch size and upcasters).
    pub(crate) fn stream_reader(&self, options: ReadStream) -> Arc<StreamPageFn> {
        let batch = self.batch_size() as u64;
        let upcasters = self.upcasters().cloned();
        let read = METRICS.read_counter();
        Arc::new(move |conn, stream, cursor| {
            read_stream_page(conn, stream, &options, batch, PAGE_BYTES, cursor).map(
                |(page, next)| {
                    let events = page.decode(upcasters.clone()).counting(read.clone());
                    (events, next)
                },
            )
        })
    }

    /// The rest of a stream read whose first page a reader job has already
    /// fetched with `read` (this handle's [`SqliteEventStore::stream_reader`]):
    /// that page's events, then the pages from `next` on.
    pub(crate) fn continue_stream(
        &self,
        stream: StreamId,
        read: Arc<StreamPageFn>,
        first: EventRows,
        next: Option<StreamCursor>,
    ) -> EventStream {
        self.conns()
            .paginate_after(first, next, move |conn, cursor| read(conn, &stream, cursor))
    }
}

impl annals::StreamCatalog for SqliteEventStore {
    fn list_streams(&self, category: &str) -> BoxStream<'static, Result<StreamInfo>> {
        let category = category.to_owned();
        let batch = sql_int(self.batch_size() as u64);
        self.conns()
            .paginate(String::new(), move |conn, after: String| {
                let mut stmt = conn
                    .prepare_cached(LIST_STREAMS_SQL)
                    .map_err(db("preparing a stream listing"))?;
                let mut rows = stmt
                    .query(rusqlite::params![category, after, batch])
                    .map_err(db("listing streams"))?;
                let page = Page::collect(&mut rows, 64, "listing streams", |r| {
                    let name = r
                        .get_ref(0)
                        .and_then(|v| v.as_str().map_err(Into::into))
                        .map_err(db("listing streams"))?;
                    let stream_id = StreamId::parse(name).map_err(|e| {
                        corrupt(format!("streams row {name:?}: invalid stream_id"), e)
                    })?;
                    let version: i64 = r.get(1).map_err(db("listing streams"))?;
                    let version = u64::try_from(version).map_err(|e| {
                        corrupt(format!("streams row {stream_id}: negative version"), e)
                    })?;
                    Ok(StreamInfo {
                        stream_id,
                        version: StreamVersion(version),
                    })
                })?;
                let next = match page.last_if_complete() {
                    Some(last) if page.len() as i64 == batch => {
                        Some(last.stream_id.as_str().to_owned())
                    }
                    _ => None,
                };
                Ok(page.finish(next))
            })
    }

    async fn stats(&self) -> Result<StoreStats> {
        self.conns().read(stats_job).await
    }

    fn read_correlated(&self, correlation_id: Uuid, limit: Option<u64>) -> EventStream {
        self.read_related(READ_CORRELATED_SQL, correlation_id, limit)
    }

    fn read_caused_by(&self, causation_id: Uuid, limit: Option<u64>) -> EventStream {
        self.read_related(READ_CAUSED_BY_SQL, causation_id, limit)
    }

    async fn largest_streams(&self, limit: usize) -> Result<Vec<StreamInfo>> {
        let limit = sql_int(limit as u64);
        self.conns()
            .read(move |conn| largest_streams(conn, limit))
            .await
    }

    async fn events_recorded_since(&self, since: DateTime<Utc>) -> Result<u64> {
        let since = to_micros(since);
        self.conns()
            .read(move |conn| {
                // A range count on the recorded_at index.
                conn.prepare_cached("SELECT COUNT(*) FROM events WHERE recorded_at >= ?1")
                    .and_then(|mut s| s.query_row([since], |r| r.get::<_, i64>(0)))
                    .map(|n| u64::try_from(n).unwrap_or(0))
                    .map_err(db("counting recent events"))
            })
            .await
    }
}

/// The events of one correlation, in global order (the expression is the
/// one `events_correlation_id` indexes, which is what lets SQLite use it).
const READ_CORRELATED_SQL: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events WHERE json_extract(metadata, '$.correlation_id') = ?1 \
     AND position > ?2 ORDER BY position ASC LIMIT ?3"
);

/// The events one event (or command) caused, in global order (on the
/// `events_causation_id` index).
const READ_CAUSED_BY_SQL: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events WHERE json_extract(metadata, '$.causation_id') = ?1 \
     AND position > ?2 ORDER BY position ASC LIMIT ?3"
);

impl SqliteEventStore {
    /// The events whose metadata holds `id` under the key `sql` looks up, a
    /// page at a time.
    fn read_related(&self, sql: &'static str, id: Uuid, limit: Option<u64>) -> EventStream {
        let cursor = AllCursor {
            after: 0,
            remaining: limit.unwrap_or(u64::MAX),
            seek_since: false,
        };
        if cursor.remaining == 0 {
            return Box::pin(futures::stream::empty());
        }
        // Canonical JSON writes a UUID lowercase and hyphenated.
        let id = id.hyphenated().to_string();
        let batch = self.batch_size() as u64;
        let upcasters = self.upcasters().cloned();
        self.conns()
            .paginate(cursor, move |conn, cursor: AllCursor| {
                let want = cursor.remaining.min(batch);
                let mut stmt = conn
                    .prepare_cached(sql)
                    .map_err(db("preparing a metadata lookup"))?;
                let mut rows = stmt
                    .query(rusqlite::params![id, cursor.after, sql_int(want)])
                    .map_err(db("reading events by metadata"))?;
                let page = RawEvents::collect(
                    &mut rows,
                    want as usize,
                    PAGE_BYTES,
                    "reading events by metadata",
                )?;
                let n = page.len() as u64;
                let more = n == want || page.is_at_budget();
                let next = match page.last_keys() {
                    Some((position, _)) if more && page.is_complete() && cursor.remaining > n => {
                        Some(AllCursor {
                            after: position,
                            remaining: cursor.remaining - n,
                            seek_since: false,
                        })
                    }
                    _ => None,
                };
                Ok((page.decode(upcasters.clone()), next))
            })
    }
}

const LARGEST_STREAMS_SQL: &str = "SELECT stream_id, version FROM streams \
    ORDER BY version DESC, stream_id ASC LIMIT ?1";

fn largest_streams(conn: &Connection, limit: i64) -> Result<Vec<StreamInfo>> {
    let what = "listing the largest streams";
    let mut stmt = conn.prepare_cached(LARGEST_STREAMS_SQL).map_err(db(what))?;
    let mut rows = stmt.query([limit]).map_err(db(what))?;
    let mut infos = Vec::new();
    while let Some(r) = rows.next().map_err(db(what))? {
        let name: String = r.get(0).map_err(db(what))?;
        let stream_id = StreamId::parse(&name)
            .map_err(|e| corrupt(format!("streams row {name:?}: invalid stream_id"), e))?;
        let version: i64 = r.get(1).map_err(db(what))?;
        let version = u64::try_from(version)
            .map_err(|e| corrupt(format!("streams row {stream_id}: negative version"), e))?;
        infos.push(StreamInfo {
            stream_id,
            version: StreamVersion(version),
        });
    }
    Ok(infos)
}

fn stats_job(conn: &Connection) -> Result<StoreStats> {
    // One read transaction: every count from the same snapshot.
    let tx = conn
        .unchecked_transaction()
        .map_err(db("starting a stats read"))?;
    let count = |v: i64| u64::try_from(v).unwrap_or(0);
    let mut categories = Vec::new();
    let mut streams = 0;
    {
        let mut s = tx
            .prepare_cached(
                "SELECT category, COUNT(*), SUM(version) FROM streams \
                 GROUP BY category ORDER BY category",
            )
            .map_err(db("counting streams"))?;
        let mut rows = s.query([]).map_err(db("counting streams"))?;
        while let Some(r) = rows.next().map_err(db("counting streams"))? {
            let c = CategoryStats {
                category: r.get(0).map_err(db("counting streams"))?,
                streams: count(r.get(1).map_err(db("counting streams"))?),
                events: count(r.get(2).map_err(db("counting streams"))?),
            };
            streams += c.streams;
            categories.push(c);
        }
    }
    let mut event_types = Vec::new();
    let mut events = 0;
    {
        // Served by the (event_type, recorded_at) index alone.
        let mut s = tx
            .prepare_cached(
                "SELECT event_type, COUNT(*) FROM events GROUP BY event_type ORDER BY event_type",
            )
            .map_err(db("counting event types"))?;
        let mut rows = s.query([]).map_err(db("counting event types"))?;
        while let Some(r) = rows.next().map_err(db("counting event types"))? {
            let t = EventTypeStats {
                event_type: r.get(0).map_err(db("counting event types"))?,
                events: count(r.get(1).map_err(db("counting event types"))?),
            };
            events += t.events;
            event_types.push(t);
        }
    }
    let (first, last): (Option<i64>, Option<i64>) = tx
        .prepare_cached("SELECT MIN(recorded_at), MAX(recorded_at) FROM events")
        .and_then(|mut s| s.query_row([], |r| Ok((r.get(0)?, r.get(1)?))))
        .map_err(db("reading the time range"))?;
    Ok(StoreStats {
        streams,
        events,
        categories,
        event_types,
        first_recorded_at: first.and_then(from_micros),
        last_recorded_at: last.and_then(from_micros),
    })
}

impl EventStore for SqliteEventStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        METRICS
            .append(async {
                let events = prepare_batch(stream, events)?;
                let stream = stream.clone();
                self.conns()
                    .write_in_group(move |conn| append_job(conn, &stream, expected, &events))
                    .await
            })
            .await
    }

    fn read_stream(&self, stream: &StreamId, options: ReadStream) -> EventStream {
        let Some(cursor) = first_stream_cursor(&options) else {
            return Box::pin(futures::stream::empty());
        };
        let (stream, read) = (stream.clone(), self.stream_reader(options));
        self.conns()
            .paginate(cursor, move |conn, cursor| read(conn, &stream, cursor))
    }

    fn read_all(&self, options: ReadAll) -> EventStream {
        if let Err(err) = check_local(options.after) {
            return Box::pin(futures::stream::iter([Err(err)]));
        }
        let cursor = AllCursor {
            after: sql_int(options.after.seq()),
            remaining: options.limit.unwrap_or(u64::MAX),
            seek_since: options.since.is_some(),
        };
        if cursor.remaining == 0 {
            return Box::pin(futures::stream::empty());
        }
        let sql = Arc::new(read_all_sql(&options));
        let batch = self.batch_size() as u64;
        let upcasters = self.upcasters().cloned();
        let read = METRICS.read_counter();
        self.conns().paginate(cursor, move |conn, cursor| {
            read_all_page(conn, &sql, &options, batch, PAGE_BYTES, cursor).map(|(page, next)| {
                let events = page.decode(upcasters.clone()).counting(read.clone());
                (events, next)
            })
        })
    }

    /// The head and the rows after `filter.after` in reader round trips of
    /// `batch_size` rows (the first also reads the head), each requested
    /// as soon as the one before arrives, so the reader reads the next rows
    /// while this task decodes (and upcasts) the ones before: on the
    /// caller's task, never on the reader thread, so other reads do not
    /// queue behind the decoding.
    async fn read_feed_page(&self, filter: &ReadAll, limit: usize) -> Result<annals::FeedPage> {
        use futures::StreamExt;
        let after = filter.after;
        check_local(after)?;
        let limit = limit.max(1) as u64;
        let mut options = filter.clone();
        options.limit = None;
        let sql = Arc::new(read_all_sql(&options));
        let batch = self.batch_size() as u64;
        let (upcasters, read) = (self.upcasters().cloned(), METRICS.read_counter());
        // Set by the first round trip, before any row of it is yielded.
        let head = Arc::new(std::sync::atomic::AtomicI64::new(-1));
        let first_head = Arc::clone(&head);
        let cursor = FeedCursor {
            all: AllCursor {
                after: sql_int(after.seq()),
                remaining: limit,
                seek_since: options.since.is_some(),
            },
            first: true,
        };
        let mut rows = self
            .conns()
            .paginate(cursor, move |conn, cursor: FeedCursor| {
                if cursor.first {
                    let head = max_position(conn)?.unwrap_or(0);
                    first_head.store(head, std::sync::atomic::Ordering::Release);
                    if head <= cursor.all.after {
                        return Ok((RawEvents::empty().decode(None), None));
                    }
                }
                read_all_page(conn, &sql, &options, batch, PAGE_BYTES, cursor.all).map(
                    |(page, next)| {
                        let events = page.decode(upcasters.clone()).counting(read.clone());
                        let next = next.map(|all| FeedCursor { all, first: false });
                        (events, next)
                    },
                )
            });
        // Set before the first round trip answers (which it must have, for
        // an event or the stream's end to arrive).
        let head = || {
            let h = head.load(std::sync::atomic::Ordering::Acquire);
            GlobalPosition::from_seq(u64::try_from(h).unwrap_or(0))
        };
        let mut events = Vec::new();
        while let Some(event) = rows.next().await {
            let event = event?;
            // Appended after the head was read: the next page's.
            if event.global_position > head() {
                break;
            }
            events.push(event);
        }
        let head = head();
        if head <= after {
            return Ok(annals::FeedPage {
                events: Vec::new(),
                scanned_to: after,
                at_end: true,
            });
        }
        let full = events.len() as u64 >= limit;
        let scanned_to = match events.last() {
            Some(last) if full => last.global_position,
            _ => head,
        };
        Ok(annals::FeedPage {
            events,
            scanned_to,
            at_end: !full,
        })
    }

    /// Reader round trips read ahead across the pages (see `feed`: windows
    /// of positions on several readers, or one chain under a time filter),
    /// so the readers never wait between pages for the caller to decode.
    fn read_feed_pages(&self, filter: ReadAll, limit: usize) -> annals::FeedPages {
        crate::feed::pages(self, filter, limit)
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<StreamVersion>> {
        let stream = stream.clone();
        self.conns()
            .read(move |conn| head_version(conn, &stream))
            .await
    }

    async fn head_position(&self) -> Result<Option<GlobalPosition>> {
        let max: Option<i64> = self.conns().read(max_position).await?;
        Ok(max.map(|p| GlobalPosition::from_seq(p as u64)))
    }

    fn append_signal(&self) -> Option<annals::AppendSignal> {
        Some(self.conns().append_signal())
    }

    async fn count_events_between(
        &self,
        after: GlobalPosition,
        up_to: GlobalPosition,
    ) -> Result<u64> {
        if up_to <= after {
            return Ok(0);
        }
        let (lo, hi) = (sql_int(after.seq()), sql_int(up_to.seq()));
        let n: i64 = self
            .conns()
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT count(*) FROM events WHERE position > ?1 AND position <= ?2",
                )
                .and_then(|mut s| s.query_row([lo, hi], |r| r.get(0)))
                .map_err(db("counting events between two positions"))
            })
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn read_event(&self, id: EventId) -> Result<Option<RecordedEvent>> {
        let page = self
            .conns()
            .read(move |conn| {
                let mut stmt = conn
                    .prepare_cached(READ_EVENT_SQL)
                    .map_err(db("preparing an event lookup"))?;
                let mut rows = stmt
                    .query([&id.0.as_bytes()[..]])
                    .map_err(db("reading an event by id"))?;
                RawEvents::collect(&mut rows, 1, usize::MAX, "reading an event by id")
            })
            .await?;
        page.decode(self.upcasters().cloned()).next().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_all_sql_numbers_every_parameter() {
        let options = ReadAll::from_start()
            .categories(["A", "B"])
            .event_types(["X"]);
        assert_eq!(
            read_all_sql(&options),
            format!(
                "SELECT {} FROM events WHERE position > ?1 AND category IN (?2, ?3) \
                 AND event_type IN (?4) ORDER BY position ASC LIMIT ?5",
                event_columns!()
            )
        );
        assert!(read_all_sql(&ReadAll::from_start())
            .ends_with("position > ?1 ORDER BY position ASC LIMIT ?2"));
        let t = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
        assert!(
            read_all_sql(&ReadAll::from_start().event_types(["X"]).since(t).until(t)).ends_with(
                "event_type IN (?2) AND +recorded_at >= ?3 AND +recorded_at <= ?4 \
                 ORDER BY position ASC LIMIT ?5"
            )
        );
        assert!(read_all_sql(&ReadAll::from_start().until(t))
            .ends_with("position > ?1 AND +recorded_at <= ?2 ORDER BY position ASC LIMIT ?3"));
    }

    /// A feed window filtered by category or type walks the filter's index
    /// when it is read for few matches, and the table's position range
    /// when it is read along the table (`walk`); in position order either
    /// way (no sort).
    #[test]
    fn feed_windows_walk_the_index_or_the_table() {
        let mut conn = Connection::open_in_memory().expect("in-memory database");
        crate::migrate::migrate(&mut conn).expect("migrate");
        for (options, index) in [
            (
                ReadAll::from_start().categories(["C"]),
                "events_category_position",
            ),
            (
                ReadAll::from_start().event_types(["T"]),
                "events_event_type_position",
            ),
        ] {
            for (walk, access) in [(false, index), (true, "INTEGER PRIMARY KEY")] {
                let sql = read_window_sql(&options, walk);
                assert!(sql.contains("position > ?1 AND position <= ?2"), "{sql}");
                let plan: Vec<String> = conn
                    .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .expect("explain")
                    .query_map(rusqlite::params![0, 10, "C", 10], |r| r.get(3))
                    .expect("plan")
                    .collect::<rusqlite::Result<_>>()
                    .expect("rows");
                assert!(
                    plan.iter().any(|step| step.contains(access)),
                    "walk {walk}: {access} not in {plan:?}"
                );
                assert!(
                    !plan.iter().any(|step| step.contains("TEMP B-TREE")),
                    "a sort in {plan:?}"
                );
            }
        }
    }

    /// A feed read filtered by type walks migration 7's index in position
    /// order (no sort), not the whole log.
    #[test]
    fn feed_reads_filtered_by_type_use_their_index() {
        let mut conn = Connection::open_in_memory().expect("in-memory database");
        crate::migrate::migrate(&mut conn).expect("migrate");
        let sql = read_all_sql(&ReadAll::from_start().event_types(["Rare"]));
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .expect("explain")
            .query_map(rusqlite::params![0, "Rare", 10], |r| r.get(3))
            .expect("plan")
            .collect::<rusqlite::Result<_>>()
            .expect("rows");
        assert!(
            plan.iter()
                .any(|step| step.contains("events_event_type_position")),
            "events_event_type_position not in {plan:?}"
        );
        assert!(
            !plan.iter().any(|step| step.contains("TEMP B-TREE")),
            "a sort in {plan:?}"
        );
    }

    /// The metadata lookups read the indexes migration 6 made for them
    /// (the expression must match the index's exactly).
    #[test]
    fn metadata_lookups_use_their_indexes() {
        let mut conn = Connection::open_in_memory().expect("in-memory database");
        crate::migrate::migrate(&mut conn).expect("migrate");
        for (sql, index) in [
            (READ_CORRELATED_SQL, "events_correlation_id"),
            (READ_CAUSED_BY_SQL, "events_causation_id"),
        ] {
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .expect("explain")
                .query_map(rusqlite::params!["x", 0, 10], |r| r.get(3))
                .expect("plan")
                .collect::<rusqlite::Result<_>>()
                .expect("rows");
            assert!(
                plan.iter().any(|step| step.contains(index)),
                "{index} not in {plan:?}"
            );
        }
    }

    /// A migrated in-memory database holding `n` events of about `size`
    /// bytes each in stream `Big-1`, plus one small event in `Other-1`
    /// between each (for `read_all`).
    fn database_with_large_events(n: usize, size: usize) -> Connection {
        let mut conn = Connection::open_in_memory().expect("in-memory database");
        crate::migrate::migrate(&mut conn).expect("migrate");
        let big = StreamId::parse("Big-1").expect("stream");
        let other = StreamId::parse("Other-1").expect("stream");
        for i in 0..n {
            let e = NewEvent::new("Big", serde_json::json!({"i": i, "s": "x".repeat(size)}));
            let e = prepare_batch(&big, vec![e]).expect("valid");
            append_job(&mut conn, &big, ExpectedVersion::Any, &e).expect("append");
            let e = NewEvent::new("Small", serde_json::json!({"i": i}));
            let e = prepare_batch(&other, vec![e]).expect("valid");
            append_job(&mut conn, &other, ExpectedVersion::Any, &e).expect("append");
        }
        conn
    }

    /// The pages of a read, each as the `i` of its payloads.
    fn pages<C>(
        mut cursor: Option<C>,
        mut fetch: impl FnMut(C) -> Result<(RawEvents, Option<C>)>,
    ) -> Vec<Vec<u64>> {
        let mut out = Vec::new();
        while let Some(c) = cursor.take() {
            let (page, next) = fetch(c).expect("page");
            assert!(page.is_complete());
            if page.len() == 0 {
                // A page that stopped at its budget cannot tell whether rows
                // follow; the next one may come back empty, and ends the read.
                assert!(next.is_none());
                break;
            }
            out.push(
                page.decode(None)
                    .map(|e| {
                        let e = e.expect("row decodes");
                        e.data.to_value().expect("payload")["i"]
                            .as_u64()
                            .expect("i")
                    })
                    .collect(),
            );
            cursor = next;
        }
        out
    }

    #[test]
    fn pages_stop_at_their_byte_budget() {
        let conn = database_with_large_events(10, 1000);
        let big = StreamId::parse("Big-1").expect("stream");
        // Each row holds a little over 1000 bytes: the third reaches 2500.
        let budget = 2500;
        let forward = pages(
            Some(StreamCursor {
                next: 1,
                remaining: u64::MAX,
            }),
            |c| read_stream_page(&conn, &big, &ReadStream::forward(), 100, budget, c),
        );
        assert_eq!(
            forward,
            vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8], vec![9]]
        );
        let backward = pages(
            Some(StreamCursor {
                next: u64::MAX,
                remaining: u64::MAX,
            }),
            |c| read_stream_page(&conn, &big, &ReadStream::backward(), 100, budget, c),
        );
        assert_eq!(
            backward,
            vec![vec![9, 8, 7], vec![6, 5, 4], vec![3, 2, 1], vec![0]]
        );
        // The row limit still applies when it comes first.
        let limited = pages(
            Some(StreamCursor {
                next: 1,
                remaining: 5,
            }),
            |c| read_stream_page(&conn, &big, &ReadStream::forward(), 2, budget, c),
        );
        assert_eq!(limited, vec![vec![0, 1], vec![2, 3], vec![4]]);
        // A row larger than the whole budget still comes, one per page.
        let tiny = pages(
            Some(StreamCursor {
                next: 1,
                remaining: u64::MAX,
            }),
            |c| read_stream_page(&conn, &big, &ReadStream::forward(), 100, 10, c),
        );
        assert_eq!(tiny, (0..10).map(|i| vec![i]).collect::<Vec<_>>());

        // The global feed interleaves a small event after each large one.
        let options = ReadAll::from_start().categories(["Big"]);
        let sql = read_all_sql(&options);
        let feed = pages(
            Some(AllCursor {
                after: 0,
                remaining: u64::MAX,
                seek_since: false,
            }),
            |c| read_all_page(&conn, &sql, &options, 100, budget, c),
        );
        assert_eq!(
            feed,
            vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8], vec![9]]
        );
        let options = ReadAll::from_start();
        let sql = read_all_sql(&options);
        let feed = pages(
            Some(AllCursor {
                after: 0,
                remaining: u64::MAX,
                seek_since: false,
            }),
            |c| read_all_page(&conn, &sql, &options, 100, budget, c),
        );
        // Large, small, large, small, large: the third large row ends it.
        assert_eq!(feed[0], vec![0, 0, 1, 1, 2]);
        assert_eq!(feed.concat().len(), 20);
        assert!(feed.iter().all(|p| p.len() <= 6), "{feed:?}");
    }
}
