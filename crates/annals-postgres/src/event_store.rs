//! [`annals::EventStore`] and [`annals::StreamCatalog`] for [`PgEventStore`].
//!
//! An append is one statement, `annals_append(...)` (see
//! `sql/0001_initial.sql`; `sql/0002_event_fingerprints.sql` adds the
//! fingerprints), run in its own implicit transaction: one round
//! trip whatever the batch size, with the stream lock, the expected-version
//! check and the insert (one `INSERT ... SELECT FROM unnest(...)`) on the
//! server. Event ids are checked by the unique index during the insert, not
//! by a lookup beforehand. The rare outcomes that need more work (a reused
//! event id, a conflict that may be a retried batch, a stream written by a
//! younger transaction, a serialization failure) are handled here, with a
//! bounded retry for the transient ones. A reused id is decided by the core
//! ([`annals::check_retry`]) from the stored rows' fingerprints
//! (`data_digest`), so no stored payload is decoded on that path.
//!
//! Payloads and metadata are sent as the core's canonical JSON text
//! ([`annals::prepare_batch`]) and cast to `jsonb` by the server: that text
//! is already in the form `jsonb` keeps numbers in, so what is read back is
//! what every other backend returns.
//!
//! An `append_many` ([`annals::MultiStreamAppend`]) is one statement too,
//! `annals_append_many(...)` (`sql/0004_append_many.sql`): it takes every
//! stream's lock in key order, checks every stream, then writes each with
//! `annals_append`; its outcomes are handled as an append's are.
//!
//! `read_all` pages through `(tx_id, seq)` strictly below the snapshot
//! horizon; see the crate documentation for why that is gap-free.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use annals::{
    check_retry, check_retry_many, prepare_batch, prepare_many, AppendResult, CategoryStats,
    Direction, Error, EventId, EventStore, EventStream, EventTypeStats, ExpectedVersion,
    Fingerprint, GlobalPosition, NewEvent, PreparedEvent, PreparedStreamBatch, ReadAll, ReadStream,
    RecordedEvent, Result, StoreStats, StoredEvent, StreamBatch, StreamId, StreamInfo,
    StreamVersion, Upcasters,
};
use chrono::{DateTime, Utc};
use deadpool_postgres::Client;
use futures::stream::BoxStream;
use tokio::time::Instant;
use tokio_postgres::types::ToSql;
use tokio_postgres::IsolationLevel;
use uuid::Uuid;

use crate::error::{backend, backend_msg, class_of, Context, ErrorClass};
use crate::rows::{
    budget, collect_page, decode_event, event_columns, failed, paged, position, to_i64, PageRows,
};
use crate::store::{with_client, Lane};
use crate::PgEventStore;

static LABELS: [metrics::Label; 1] = [metrics::Label::from_static_parts("backend", "postgres")];
/// The append and read metrics of this backend.
static METRICS: annals::StoreMetrics = annals::StoreMetrics::new(&LABELS);

/// Attempts of one append before giving up on transient failures.
const MAX_APPEND_ATTEMPTS: u32 = 10;

/// Payloads and metadata travel as text (the core's canonical JSON) and are
/// cast to `jsonb` on the server.
const APPEND_SQL: &str = "SELECT r_outcome, r_version, r_tx, r_seqs \
     FROM annals_append($1, $2, $3, $4, $5, $6, $7, $8::text[]::jsonb[], $9::text[]::jsonb[], $10)";

/// One `annals_append_many` (`sql/0004_append_many.sql`): the batches'
/// streams, expectations and event counts, then their events flattened.
const APPEND_MANY_SQL: &str = "SELECT r_outcome, r_version, r_tx, r_seqs, r_index \
     FROM annals_append_many($1, $2, $3, $4, $5, $6, $7, $8, $9::text[]::jsonb[], \
     $10::text[]::jsonb[], $11)";

/// `annals_append` outcomes (a stored event id is a unique violation).
pub(crate) const APPENDED: i16 = 0;
pub(crate) const WRONG_VERSION: i16 = 2;
const YOUNGER_WRITER: i16 = 4;

/// What the idempotency check needs of stored events; the payload (as text,
/// never decoded into numbers) only for rows written before fingerprints.
const EXISTING_SQL: &str = "SELECT e.event_id, e.stream_id, e.stream_version, \
     e.tx_id::text::bigint, e.seq, e.event_type, e.event_version, e.data_digest, \
     CASE WHEN e.data_digest IS NULL THEN e.data::text END \
     FROM events e WHERE e.event_id = ANY($1)";

/// One event by id. No horizon here, unlike `read_all`: see `read_event`.
const READ_EVENT_SQL: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events e WHERE e.event_id = $1"
);

/// The head, and the archive of an archived stream (its tombstone).
const STREAM_VERSION_SQL: &str = "SELECT s.version, a.location FROM streams s \
     LEFT JOIN archived_streams a ON a.stream_id = s.stream_id WHERE s.stream_id = $1";

const READ_STREAM_FORWARD: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events e WHERE e.stream_id = $1 AND e.stream_version BETWEEN $2 AND $3 \
     AND ($4::timestamptz IS NULL OR e.recorded_at <= $4) \
     ORDER BY e.stream_version LIMIT $5"
);

const READ_STREAM_BACKWARD: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events e WHERE e.stream_id = $1 AND e.stream_version BETWEEN $2 AND $3 \
     AND ($4::timestamptz IS NULL OR e.recorded_at <= $4) \
     ORDER BY e.stream_version DESC LIMIT $5"
);

/// The horizon: every transaction with a smaller id has finished, so no row
/// below it can still appear.
macro_rules! below_horizon {
    ($alias:literal) => {
        concat!(
            "(",
            $alias,
            ".tx_id, ",
            $alias,
            ".seq) > ($1::bigint::text::xid8, $2) AND ",
            $alias,
            ".tx_id < pg_snapshot_xmin(pg_current_snapshot())"
        )
    };
}

const READ_ALL: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events e WHERE ",
    below_horizon!("e"),
    " ORDER BY e.tx_id, e.seq LIMIT $3"
);

/// [`READ_ALL`] from the `$4`-th row on (`OFFSET $4`): the page after the
/// next one, read beside it (see `FeedState`).
const READ_ALL_OFFSET: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events e WHERE ",
    below_horizon!("e"),
    " ORDER BY e.tx_id, e.seq LIMIT $3 OFFSET $4"
);

const READ_ALL_TYPES: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events e WHERE ",
    below_horizon!("e"),
    " AND e.event_type = ANY($4) ORDER BY e.tx_id, e.seq LIMIT $3"
);

/// [`READ_ALL_CATEGORIES`] for one category (`$4`, a text): a projection's
/// usual filter. The rows come in index order, so there is nothing to merge:
/// the merge's sort of a page of whole rows took more than half of a page of
/// 5,000 events (10.4 ms against 4.1 ms for the same rows without it,
/// `EXPLAIN ANALYZE`). The planner picks the index per call: `events_tx_seq_idx`
/// with a filter for a category that holds most events, the category's own
/// range of `events_category_tx_seq_idx` for a rare one.
const READ_ALL_CATEGORY: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events e WHERE e.category = $4 AND ",
    below_horizon!("e"),
    " AND (cardinality($5::text[]) = 0 OR e.event_type = ANY($5)) \
     ORDER BY e.tx_id, e.seq LIMIT $3"
);

/// One index range scan per category on (category, tx_id, seq), merged:
/// bounded work whatever the categories' sizes.
const READ_ALL_CATEGORIES: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM unnest($4::text[]) AS c(category) CROSS JOIN LATERAL (\
     SELECT * FROM events i WHERE i.category = c.category AND ",
    below_horizon!("i"),
    " AND (cardinality($5::text[]) = 0 OR i.event_type = ANY($5)) \
     ORDER BY i.tx_id, i.seq LIMIT $3) e \
     ORDER BY e.tx_id, e.seq LIMIT $3"
);

/// The `read_all` queries with `ReadAll::since` / `until` (the parameters
/// after the others; NULL for a bound not given). Separate statements, so
/// that the unbounded feed keeps its plain plan.
macro_rules! recorded_between {
    ($alias:literal, $since:literal, $until:literal) => {
        concat!(
            " AND ($",
            $since,
            "::timestamptz IS NULL OR ",
            $alias,
            ".recorded_at >= $",
            $since,
            ") AND ($",
            $until,
            "::timestamptz IS NULL OR ",
            $alias,
            ".recorded_at <= $",
            $until,
            ")"
        )
    };
}

const READ_ALL_TIMED: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events e WHERE ",
    below_horizon!("e"),
    recorded_between!("e", "4", "5"),
    " ORDER BY e.tx_id, e.seq LIMIT $3"
);

const READ_ALL_TYPES_TIMED: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events e WHERE ",
    below_horizon!("e"),
    " AND e.event_type = ANY($4)",
    recorded_between!("e", "5", "6"),
    " ORDER BY e.tx_id, e.seq LIMIT $3"
);

const READ_ALL_CATEGORIES_TIMED: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM unnest($4::text[]) AS c(category) CROSS JOIN LATERAL (\
     SELECT * FROM events i WHERE i.category = c.category AND ",
    below_horizon!("i"),
    " AND (cardinality($5::text[]) = 0 OR i.event_type = ANY($5))",
    recorded_between!("i", "6", "7"),
    " ORDER BY i.tx_id, i.seq LIMIT $3) e \
     ORDER BY e.tx_id, e.seq LIMIT $3"
);

/// What is held back after a position: the newest transaction with events
/// after it, and the horizon now. Called with the last position a page
/// delivered: any row after it was held back when the page was read (or
/// committed since), whatever the horizon is by now, so the check cannot
/// miss a horizon that moved between the two queries.
const HELD_BACK_SQL: &str = "SELECT max(e.tx_id)::text::bigint, \
     pg_snapshot_xmin(pg_current_snapshot())::text::bigint FROM events e \
     WHERE (e.tx_id, e.seq) > ($1::bigint::text::xid8, $2)";

/// Events in `((tx, seq), (tx, seq)]`, on the `(tx_id, seq)` index.
const COUNT_BETWEEN_SQL: &str = "SELECT count(*) FROM events e \
     WHERE (e.tx_id, e.seq) > ($1::bigint::text::xid8, $2) \
     AND (e.tx_id, e.seq) <= ($3::bigint::text::xid8, $4)";

const HEAD_SQL: &str = "SELECT e.tx_id::text::bigint, e.seq FROM events e \
     WHERE e.tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
     ORDER BY e.tx_id DESC, e.seq DESC LIMIT 1";

/// The events of one correlation in global order, after a position (on
/// `events_correlation_idx`). Committed rows, without the horizon: a lookup,
/// like `read_event`.
const READ_CORRELATED_SQL: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events e WHERE e.metadata->>'correlation_id' = $1 \
     AND (e.tx_id, e.seq) > ($2::bigint::text::xid8, $3) \
     ORDER BY e.tx_id, e.seq LIMIT $4"
);

/// The events one event (or command) caused (on `events_causation_idx`).
const READ_CAUSED_BY_SQL: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events e WHERE e.metadata->>'causation_id' = $1 \
     AND (e.tx_id, e.seq) > ($2::bigint::text::xid8, $3) \
     ORDER BY e.tx_id, e.seq LIMIT $4"
);

impl PgEventStore {
    /// The events whose metadata holds `id` under the key `sql` looks up, a
    /// page at a time.
    fn read_related(&self, sql: &'static str, id: Uuid, limit: Option<u64>) -> EventStream {
        let store = self.clone();
        let limit = limit.unwrap_or(u64::MAX);
        // Canonical JSON writes a UUID lowercase and hyphenated.
        let id = id.hyphenated().to_string();
        let budget = budget(self.inner.page_bytes);
        paged(
            ((0i64, 0i64), 0u64, PageRows::new(self.inner.batch_size)),
            move |(cursor, taken, rows_limit): ((i64, i64), u64, PageRows)| {
                let store = store.clone();
                let id = id.clone();
                async move {
                    if taken >= limit {
                        return Ok((Vec::new(), None));
                    }
                    let want = (limit - taken).min(rows_limit.rows()) as i64;
                    let what = "cannot read events by metadata";
                    let (rows, cut) =
                        with_client!(store, Lane::Any, "read events by metadata", |client| {
                            let stmt = client.prepare_cached(sql).await.context(what)?;
                            collect_page(client, &stmt, &[&id, &cursor.0, &cursor.1, &want], budget)
                                .await
                                .context(what)
                        })?;
                    position_page(&rows, cut, want, taken, rows_limit, store.upcasters())
                }
            },
        )
    }
}

const LARGEST_STREAMS_SQL: &str = "SELECT stream_id, version FROM streams \
     ORDER BY version DESC, stream_id LIMIT $1";

/// A range count on the recorded_at index.
const RECORDED_SINCE_SQL: &str = "SELECT count(*) FROM events WHERE recorded_at >= $1";

const LIST_STREAMS_SQL: &str = "SELECT stream_id, version FROM streams \
     WHERE category = $1 AND stream_id > $2 ORDER BY stream_id LIMIT $3";

impl PgEventStore {
    /// One append in a transaction of its own (`annals_append`): the path of
    /// every append without group commit, and of a group commit's members
    /// that cannot be answered from the group's statement.
    pub(crate) async fn append_prepared(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[PreparedEvent],
    ) -> Result<AppendResult> {
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id.0).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let versions = event_versions(stream, events)?;
        let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
        let metadata: Vec<&str> = events.iter().map(|e| e.metadata.as_str()).collect();
        let digests: Vec<&[u8]> = events
            .iter()
            .map(|e| &e.fingerprint.as_bytes()[..])
            .collect();
        let (kind, version) = expected_params(expected);
        let batch = Batch {
            stream,
            expected,
            events,
            params: [
                &stream.as_str(),
                &stream.category(),
                &kind,
                &version,
                &ids,
                &types,
                &versions,
                &data,
                &metadata,
                &digests,
            ],
        };
        // A connection lost mid-append is replaced and the batch sent again:
        // if the first attempt committed, its event ids make the second one
        // return the original assignment (deduplicated) instead of writing.
        with_client!(self, Lane::Any, "append", |client| batch
            .append_on(client)
            .await)
    }

    /// What an append that found the stream at another version answers
    /// (`annals_append` outcome 2, head `head`): the original assignment
    /// when the batch is a retry of one already stored, the archive when
    /// the stream is archived, else the conflict.
    pub(crate) async fn wrong_version(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[PreparedEvent],
        head: Option<i64>,
    ) -> Result<AppendResult> {
        with_client!(self, Lane::Any, "append", |client| {
            wrong_version_on(client, stream, expected, events, head).await
        })
    }
}

/// [`PgEventStore::wrong_version`] on one connection.
async fn wrong_version_on(
    client: &Client,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[PreparedEvent],
    head: Option<i64>,
) -> Result<AppendResult> {
    // Idempotency comes first: a retried batch succeeds whatever it
    // expected.
    if let Some(done) = resolve_existing(client, stream, events).await? {
        return Ok(done);
    }
    // An archived stream says so whatever was expected, as on SQLite (the
    // trigger only sees appends that passed the version check).
    crate::archive::refuse_archived(client, stream.as_str()).await?;
    Err(Error::WrongExpectedVersion {
        stream: stream.clone(),
        expected,
        actual: head.and_then(|h| u64::try_from(h).ok()).map(StreamVersion),
    })
}

impl EventStore for PgEventStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        METRICS
            .append(async {
                let events = prepare_batch(stream, events)?;
                let appended = match &self.inner.group {
                    Some(group) => {
                        group
                            .append(self, stream, expected, std::sync::Arc::new(events))
                            .await?
                    }
                    None => self.append_prepared(stream, expected, &events).await?,
                };
                if !appended.deduplicated {
                    self.announce_append();
                }
                Ok(appended)
            })
            .await
    }

    fn read_stream(&self, stream: &StreamId, options: ReadStream) -> EventStream {
        let store = self.clone();
        let stream_id = stream.clone();
        let until = options.until_version.map_or(i64::MAX, |v| to_i64(v.0));
        let limit = options.limit.unwrap_or(u64::MAX);
        let as_of = options.as_of;
        let backward = options.direction == Direction::Backward;
        let start = if backward {
            options.from.map_or(i64::MAX, |v| to_i64(v.0)).min(until)
        } else {
            options.from.map_or(1, |v| to_i64(v.0).max(1))
        };
        let budget = budget(self.inner.page_bytes);
        let events = paged(
            (start, 0u64, PageRows::new(self.inner.batch_size)),
            move |(cursor, taken, page): (i64, u64, PageRows)| {
                let store = store.clone();
                let stream_id = stream_id.clone();
                async move {
                    let (lo, hi) = if backward {
                        (1, cursor)
                    } else {
                        (cursor, until)
                    };
                    if taken >= limit || lo > hi {
                        return Ok((Vec::new(), None));
                    }
                    let want = (limit - taken).min(page.rows()) as i64;
                    let sql = if backward {
                        READ_STREAM_BACKWARD
                    } else {
                        READ_STREAM_FORWARD
                    };
                    let name = stream_id.as_str();
                    let (rows, cut) = with_client!(store, Lane::Any, "read a stream", |client| {
                        read_stream_page(
                            client,
                            sql,
                            name,
                            &[&name, &lo, &hi, &as_of, &want],
                            budget,
                        )
                        .await
                    })?;
                    let mut last_stream = Some(stream_id);
                    let events = rows
                        .iter()
                        .map(|row| decode_event(row, &mut last_stream, store.upcasters()))
                        .collect::<Result<Vec<_>>>()?;
                    let next = match events.last() {
                        Some(last) if cut || (events.len() as i64) == want => {
                            let v = to_i64(last.stream_version.0);
                            let next = if backward { v - 1 } else { v.saturating_add(1) };
                            Some((
                                next,
                                taken + events.len() as u64,
                                page.next(events.len(), cut),
                            ))
                        }
                        _ => None,
                    };
                    Ok((events, next))
                }
            },
        );
        METRICS.count_reads(events)
    }

    fn read_all(&self, options: ReadAll) -> EventStream {
        let (pager, first) = match AllPager::new(self, options) {
            Ok(pager) => pager,
            Err(e) => return failed(e),
        };
        let events = paged(first, move |cursor| {
            let pager = pager.clone();
            async move { pager.page(cursor).await }
        });
        METRICS.count_reads(events)
    }

    /// The events first, then the head only for a page that came back
    /// short. Every row `read_all` returns is below the snapshot horizon
    /// (its transaction and every earlier one had ended when the page was
    /// read), so a full page is gap-free by itself and its last event is
    /// how far it scanned: a subscription catching up reads each page in
    /// one query, without the two of the head (the trait's default reads
    /// the head first, then the page).
    ///
    /// A short page held every matching event below the horizon when it
    /// was read. Events that became visible after it lie after its last
    /// event (their transactions were still open, so they are later in
    /// the global order than every row it returned), so the head, read
    /// next, bounds what it scanned once the events between its last one
    /// and the head are read too (one more query, only when the head moved
    /// past the page in between).
    async fn read_feed_page(&self, filter: &ReadAll, limit: usize) -> Result<annals::FeedPage> {
        let limit = limit.max(1);
        let first = self
            .read_all_vec(filter.clone().limit(limit as u64))
            .await?;
        let rest = |seen: GlobalPosition, n: usize| {
            let mut rest = filter.clone().limit(n as u64);
            rest.after = seen;
            self.read_all_vec(rest)
        };
        feed_page(filter.after, limit, first, || self.head_position(), rest).await
    }

    /// The pages of `read_feed_page`, with the rows of the next page
    /// fetched (on a task of its own, on another pooled connection) while a
    /// full page is decoded and consumed, and without a filter the page
    /// after it too, checked against the next one (see `FeedState`): the
    /// server produces the next rows while this process decodes the ones
    /// before. Only a full page is followed at once (it is gap-free by
    /// itself, so its last event is where the next page starts); a short
    /// page is completed up to the head exactly as `read_feed_page`
    /// completes it, and a page of more than one query or cut by its byte
    /// budget is read by `read_feed_page` itself.
    fn read_feed_pages(&self, filter: ReadAll, limit: usize) -> annals::FeedPages {
        use futures::StreamExt as _;
        let state = FeedState {
            store: self.clone(),
            filter,
            limit: limit.max(1),
            ahead: None,
            beyond: None,
            ready: None,
        };
        futures::stream::unfold(Some(state), |state| async move {
            let mut state = state?;
            let page = state.next_page().await;
            let next = match &page {
                Ok(p) if !p.at_end && p.scanned_to > state.filter.after => {
                    state.filter.after = p.scanned_to;
                    Some(state)
                }
                _ => None,
            };
            Some((page, next))
        })
        .boxed()
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<StreamVersion>> {
        with_client!(self, Lane::Any, "read a stream version", |client| {
            stream_head(client, stream).await
        })
    }

    async fn head_position(&self) -> Result<Option<GlobalPosition>> {
        if let Some(held) = self.held_back((0, 0)).await? {
            if !held.passed {
                let deadline = Instant::now() + self.horizon_wait;
                self.wait_past(held.newest, deadline).await;
            }
        }
        let what = "cannot read the head position";
        let rows = with_client!(self, Lane::Feed, "read the head position", |client| {
            query(client, HEAD_SQL, &[], what).await
        })?;
        match rows.first() {
            None => Ok(None),
            Some(row) => {
                let tx: i64 = row.try_get(0).context(what)?;
                let seq: i64 = row.try_get(1).context(what)?;
                position(tx, seq).map(Some)
            }
        }
    }

    /// `LISTEN/NOTIFY` on one connection per store, opened while anybody
    /// listens (see `listen.rs`): raised on appends by any process to this
    /// schema.
    fn append_signal(&self) -> Option<annals::AppendSignal> {
        Some(self.subscribe_appends())
    }

    async fn count_events_between(
        &self,
        after: GlobalPosition,
        up_to: GlobalPosition,
    ) -> Result<u64> {
        if up_to <= after {
            return Ok(0);
        }
        let bounds = [after, up_to].map(|p| (to_i64(p.commit()), to_i64(p.seq())));
        let what = "cannot count events between two positions";
        let rows = with_client!(
            self,
            Lane::Feed,
            "count events between two positions",
            |client| {
                query(
                    client,
                    COUNT_BETWEEN_SQL,
                    &[&bounds[0].0, &bounds[0].1, &bounds[1].0, &bounds[1].1],
                    what,
                )
                .await
            }
        )?;
        let n: i64 = rows
            .first()
            .ok_or_else(|| backend_msg("the count query returned no row"))?
            .try_get(0)
            .context(what)?;
        Ok(count(n))
    }

    /// A direct lookup, without the horizon that `read_all` applies. The
    /// horizon exists for readers that walk the global order and keep the
    /// last position as a checkpoint: they must not pass a position below
    /// which a transaction still in flight may add a row. A lookup by id
    /// walks nothing and keeps no cursor; it sees committed rows only (MVCC),
    /// exactly like `read_stream`, and the position it returns carries the
    /// same caveat as the positions an append returns (documented on the
    /// trait). Waiting for the horizon here would instead make the
    /// repository's command-id check wait for unrelated long transactions
    /// anywhere in the cluster.
    async fn read_event(&self, id: EventId) -> Result<Option<RecordedEvent>> {
        // The repository looks up a command's first event id before every
        // command that has one: a connection killed under the store is
        // replaced here too, rather than failing the command.
        let row = with_client!(self, Lane::Any, "read an event by id", |client| {
            read_event_row(client, id).await
        })?;
        row.map(|row| decode_event(&row, &mut None, self.upcasters()))
            .transpose()
    }
}

async fn read_event_row(client: &Client, id: EventId) -> Result<Option<tokio_postgres::Row>> {
    let stmt = client
        .prepare_cached(READ_EVENT_SQL)
        .await
        .context("cannot prepare an event lookup")?;
    client
        .query_opt(&stmt, &[&id.0])
        .await
        .map_err(|e| backend(format!("cannot read event {id}"), e))
}

/// How `annals_append` encodes an [`ExpectedVersion`]: kind and version.
pub(crate) fn expected_params(expected: ExpectedVersion) -> (i16, i64) {
    match expected {
        ExpectedVersion::Any => (0, 0),
        ExpectedVersion::NoStream => (1, 0),
        ExpectedVersion::StreamExists => (2, 0),
        ExpectedVersion::Exact(v) => (3, to_i64(v.0)),
    }
}

/// The events' payload schema versions as the `int` column stores them.
pub(crate) fn event_versions(stream: &StreamId, events: &[PreparedEvent]) -> Result<Vec<i32>> {
    events
        .iter()
        .map(|e| {
            i32::try_from(e.event_version).map_err(|_| Error::InvalidEvent {
                stream: stream.clone(),
                reason: format!(
                    "event type {:?} has event_version {}; this store keeps at most {}",
                    e.event_type,
                    e.event_version,
                    i32::MAX
                ),
            })
        })
        .collect()
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// One append's statement parameters, with what an outcome needs.
struct Batch<'a> {
    stream: &'a StreamId,
    expected: ExpectedVersion,
    events: &'a [PreparedEvent],
    params: [&'a (dyn ToSql + Sync); 10],
}

impl Batch<'_> {
    /// Runs the append on one connection, retrying transient conflicts.
    async fn append_on(&self, client: &Client) -> Result<AppendResult> {
        let (stream, expected, events) = (self.stream, self.expected, self.events);
        let stmt = client
            .prepare_cached(APPEND_SQL)
            .await
            .context("cannot prepare the append")?;
        for attempt in 1..=MAX_APPEND_ATTEMPTS {
            let result = client.query(&stmt, &self.params).await;
            let retry_reason = match result {
                Ok(rows) => {
                    let first = rows
                        .first()
                        .ok_or_else(|| backend_msg("annals_append returned no row"))?;
                    let outcome: i16 = first.try_get(0).context("cannot decode the append")?;
                    match outcome {
                        APPENDED => {
                            return appended(first, events.len());
                        }
                        WRONG_VERSION => {
                            let head: Option<i64> =
                                first.try_get(1).context("cannot decode the append")?;
                            return wrong_version_on(client, stream, expected, events, head).await;
                        }
                        YOUNGER_WRITER => "the stream was written by a younger transaction",
                        other => {
                            return Err(backend_msg(format!(
                                "annals_append returned unknown outcome {other}"
                            )))
                        }
                    }
                }
                Err(e) => match class_of(&e) {
                    ErrorClass::Retry => "serialization failure or deadlock",
                    ErrorClass::EventIdTaken => {
                        match resolve_existing(client, stream, events).await? {
                            Some(done) => return Ok(done),
                            None => "an event id was taken by a transaction that rolled back",
                        }
                    }
                    ErrorClass::StreamVersionTaken if expected != ExpectedVersion::Any => {
                        let actual = stream_head(client, stream).await?;
                        return Err(Error::WrongExpectedVersion {
                            stream: stream.clone(),
                            expected,
                            actual,
                        });
                    }
                    ErrorClass::StreamVersionTaken => "a concurrent writer took the version",
                    ErrorClass::UnstorablePayload => {
                        return Err(Error::InvalidEvent {
                            stream: stream.clone(),
                            reason: format!(
                                "PostgreSQL cannot store this payload or metadata \
                                 (a \\u0000 in a JSON string?): {e}"
                            ),
                        })
                    }
                    ErrorClass::ConnectionLost | ErrorClass::Other => {
                        return Err(backend(format!("cannot append to {stream}"), e))
                    }
                },
            };
            tracing::debug!(%stream, attempt, reason = retry_reason, "retrying append");
            metrics::counter!("annals_pg_append_retries_total").increment(1);
            tokio::time::sleep(Duration::from_millis(u64::from(attempt))).await;
        }
        Err(backend_msg(format!(
            "append to {stream} did not succeed in {MAX_APPEND_ATTEMPTS} attempts \
             (transient conflicts); nothing was written"
        )))
    }
}

/// One `append_many`'s statement parameters, with what an outcome needs.
struct ManyBatch<'a> {
    batches: &'a [PreparedStreamBatch],
    params: [&'a (dyn ToSql + Sync); 11],
}

impl ManyBatch<'_> {
    /// Runs the call on one connection, retrying transient conflicts: the
    /// outcomes of [`Batch::append_on`], for several streams at once.
    async fn append_on(&self, client: &Client) -> Result<Vec<AppendResult>> {
        let batches = self.batches;
        let names = || {
            batches
                .iter()
                .map(|b| b.stream.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let stmt = client
            .prepare_cached(APPEND_MANY_SQL)
            .await
            .context("cannot prepare the multi-stream append")?;
        let what = "cannot decode the multi-stream append";
        for attempt in 1..=MAX_APPEND_ATTEMPTS {
            let result = client.query(&stmt, &self.params).await;
            let retry_reason = match result {
                Ok(rows) => {
                    let first = rows
                        .first()
                        .ok_or_else(|| backend_msg("annals_append_many returned no row"))?;
                    let outcome: i16 = first.try_get(0).context(what)?;
                    match outcome {
                        APPENDED => {
                            if rows.len() != batches.len() {
                                return Err(backend_msg(format!(
                                    "annals_append_many answered {} of {} streams",
                                    rows.len(),
                                    batches.len()
                                )));
                            }
                            let mut done = Vec::with_capacity(rows.len());
                            for (row, b) in rows.iter().zip(batches) {
                                done.push(appended(row, b.events.len())?);
                            }
                            return Ok(done);
                        }
                        WRONG_VERSION => {
                            let head: Option<i64> = first.try_get(1).context(what)?;
                            let index: i32 = first.try_get(4).context(what)?;
                            let b = usize::try_from(index)
                                .ok()
                                .and_then(|i| batches.get(i.wrapping_sub(1)))
                                .ok_or_else(|| {
                                    backend_msg(format!(
                                        "annals_append_many named stream {index} of {}",
                                        batches.len()
                                    ))
                                })?;
                            // Idempotency comes first: a retried call succeeds
                            // whatever it expected.
                            if let Some(done) = resolve_existing_many(client, batches).await? {
                                return Ok(done);
                            }
                            crate::archive::refuse_archived(client, b.stream.as_str()).await?;
                            return Err(Error::WrongExpectedVersion {
                                stream: b.stream.clone(),
                                expected: b.expected,
                                actual: head.and_then(|h| u64::try_from(h).ok()).map(StreamVersion),
                            });
                        }
                        YOUNGER_WRITER => "a stream was written by a younger transaction",
                        other => {
                            return Err(backend_msg(format!(
                                "annals_append_many returned unknown outcome {other}"
                            )))
                        }
                    }
                }
                Err(e) => match class_of(&e) {
                    ErrorClass::Retry => "serialization failure or deadlock",
                    ErrorClass::EventIdTaken => {
                        match resolve_existing_many(client, batches).await? {
                            Some(done) => return Ok(done),
                            None => "an event id was taken by a transaction that rolled back",
                        }
                    }
                    // A writer bypassed the stream locks; the checks of the
                    // next attempt see what it wrote.
                    ErrorClass::StreamVersionTaken => "a concurrent writer took a version",
                    ErrorClass::UnstorablePayload => {
                        // The text PostgreSQL refuses: a NUL, which canonical
                        // JSON writes as this escape.
                        let holder = batches
                            .iter()
                            .find(|b| {
                                b.events.iter().any(|e| {
                                    e.data.contains("\\u0000") || e.metadata.contains("\\u0000")
                                })
                            })
                            .or(batches.first());
                        let Some(holder) = holder else {
                            return Err(backend(format!("cannot append to {}", names()), e));
                        };
                        return Err(Error::InvalidEvent {
                            stream: holder.stream.clone(),
                            reason: format!(
                                "PostgreSQL cannot store this payload or metadata \
                                 (a \\u0000 in a JSON string?): {e}"
                            ),
                        });
                    }
                    ErrorClass::ConnectionLost | ErrorClass::Other => {
                        return Err(backend(format!("cannot append to {}", names()), e))
                    }
                },
            };
            tracing::debug!(streams = %names(), attempt, reason = retry_reason, "retrying append_many");
            metrics::counter!("annals_pg_append_retries_total").increment(1);
            tokio::time::sleep(Duration::from_millis(u64::from(attempt))).await;
        }
        Err(backend_msg(format!(
            "append to {} did not succeed in {MAX_APPEND_ATTEMPTS} attempts \
             (transient conflicts); nothing was written",
            names()
        )))
    }
}

/// [`resolve_existing`] for every batch, decided together by
/// [`annals::check_retry_many`].
async fn resolve_existing_many(
    client: &Client,
    batches: &[PreparedStreamBatch],
) -> Result<Option<Vec<AppendResult>>> {
    let mut retries = Vec::with_capacity(batches.len());
    for b in batches {
        retries.push(resolve_existing(client, &b.stream, &b.events).await?);
    }
    check_retry_many(batches, retries)
}

impl annals::MultiStreamAppend for PgEventStore {
    async fn append_many(&self, batches: Vec<StreamBatch>) -> Result<Vec<AppendResult>> {
        METRICS
            .append(async {
                let batches = prepare_many(batches)?;
                if batches.is_empty() {
                    return Ok(Vec::new());
                }
                let streams: Vec<&str> = batches.iter().map(|b| b.stream.as_str()).collect();
                let categories: Vec<&str> = batches.iter().map(|b| b.stream.category()).collect();
                let (kinds, expected): (Vec<i16>, Vec<i64>) =
                    batches.iter().map(|b| expected_params(b.expected)).unzip();
                let counts: Vec<i32> = batches
                    .iter()
                    .map(|b| {
                        i32::try_from(b.events.len()).map_err(|_| Error::InvalidEvent {
                            stream: b.stream.clone(),
                            reason: format!(
                                "{} events in one batch; at most {}",
                                b.events.len(),
                                i32::MAX
                            ),
                        })
                    })
                    .collect::<Result<_>>()?;
                let mut versions = Vec::new();
                for b in &batches {
                    versions.extend(event_versions(&b.stream, &b.events)?);
                }
                let events = || batches.iter().flat_map(|b| &b.events);
                let ids: Vec<Uuid> = events().map(|e| e.event_id.0).collect();
                let types: Vec<&str> = events().map(|e| e.event_type.as_str()).collect();
                let data: Vec<&str> = events().map(|e| e.data.as_str()).collect();
                let metadata: Vec<&str> = events().map(|e| e.metadata.as_str()).collect();
                let digests: Vec<&[u8]> = events().map(|e| &e.fingerprint.as_bytes()[..]).collect();
                let call = ManyBatch {
                    batches: &batches,
                    params: [
                        &streams,
                        &categories,
                        &kinds,
                        &expected,
                        &counts,
                        &ids,
                        &types,
                        &versions,
                        &data,
                        &metadata,
                        &digests,
                    ],
                };
                // As for `append`: a call whose connection was lost is sent again,
                // and if the first one committed, its event ids make the second
                // return the original results.
                let appended =
                    with_client!(self, Lane::Any, "append to several streams", |client| call
                        .append_on(client)
                        .await)?;
                if appended.iter().any(|r| !r.deduplicated) {
                    self.announce_append();
                }
                Ok(appended)
            })
            .await
    }
}

/// The pages of a read in global order (`read_all`): its options, read
/// page after page from a cursor (after which position, events taken so
/// far, the next page's rows).
#[derive(Clone)]
struct AllPager {
    store: PgEventStore,
    limit: u64,
    categories: Arc<[String]>,
    event_types: Arc<[String]>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    budget: usize,
}

/// Where the next page of an [`AllPager`] starts.
type AllCursor = ((i64, i64), u64, PageRows);

impl AllPager {
    /// The pager of `options` and its first cursor; a position beyond any
    /// PostgreSQL transaction id or sequence is refused.
    fn new(store: &PgEventStore, options: ReadAll) -> Result<(Self, AllCursor)> {
        let after = options.after;
        let (Ok(tx), Ok(seq)) = (i64::try_from(after.commit()), i64::try_from(after.seq())) else {
            return Err(Error::PositionOutOfRange {
                position: after,
                reason: "beyond any PostgreSQL transaction id and sequence".into(),
            });
        };
        let limit = options.limit.unwrap_or(u64::MAX);
        let mut categories = options.categories;
        categories.sort();
        categories.dedup();
        let pager = AllPager {
            store: store.clone(),
            limit,
            categories: categories.into(),
            event_types: options.event_types.into(),
            since: options.since,
            until: options.until,
            budget: budget(store.inner.page_bytes),
        };
        let first = (
            (tx, seq),
            0,
            PageRows::for_limit(store.inner.batch_size, limit),
        );
        Ok((pager, first))
    }

    /// The page at `cursor` and the cursor after it (`None` after the last).
    async fn page(&self, cursor: AllCursor) -> Result<(Vec<RecordedEvent>, Option<AllCursor>)> {
        let (_, taken, rows_limit) = cursor;
        if taken >= self.limit {
            return Ok((Vec::new(), None));
        }
        let fetched = self.rows(cursor).await?;
        position_page(
            &fetched.rows,
            fetched.cut,
            fetched.want,
            taken,
            rows_limit,
            self.store.upcasters(),
        )
    }

    /// The rows of the page at `cursor`, not decoded yet.
    async fn rows(&self, cursor: AllCursor) -> Result<Fetched> {
        let (after, taken, rows_limit) = cursor;
        let want = (self.limit.saturating_sub(taken)).min(rows_limit.rows()) as i64;
        let page = self.query(after, want, 0);
        let (rows, cut) = self.store.read_all_page(&page).await?;
        Ok(Fetched { rows, cut, want })
    }

    /// The query of `want` rows after `after`, the first `offset` skipped.
    fn query(&self, after: (i64, i64), want: i64, offset: i64) -> Page<'_> {
        Page {
            after,
            want,
            offset,
            budget: self.budget,
            categories: &self.categories,
            event_types: &self.event_types,
            since: self.since,
            until: self.until,
        }
    }

    /// Whether [`AllPager::rows_beyond`] may be used: no filter (a filtered
    /// read, such as a rebuild's, gained nothing measurable from it).
    fn can_skip(&self) -> bool {
        self.categories.is_empty()
            && self.event_types.is_empty()
            && self.since.is_none()
            && self.until.is_none()
    }

    /// `want` rows after `after`, the first `skip` of them skipped, as one
    /// query without the wait for held-back transactions (a short result
    /// is not used, see `FeedState`).
    async fn rows_beyond(&self, after: (i64, i64), skip: i64, want: i64) -> Result<Fetched> {
        let page = self.query(after, want, skip);
        let (rows, cut) = with_client!(self.store, Lane::Feed, "read all events", |client| page
            .fetch(client)
            .await)?;
        Ok(Fetched { rows, cut, want })
    }
}

/// The position of a row of [`event_columns!`].
fn row_position(row: &tokio_postgres::Row) -> Result<GlobalPosition> {
    let what = "cannot decode an event's position";
    position(row.try_get(0).context(what)?, row.try_get(1).context(what)?)
}

/// A page's rows as fetched ([`AllPager::rows`]).
struct Fetched {
    rows: Vec<tokio_postgres::Row>,
    /// Whether its byte budget cut it.
    cut: bool,
    /// The rows it asked for.
    want: i64,
}

/// A query of `read_feed_pages` running ahead on a task of its own,
/// aborted when the pages are dropped.
struct Ahead(tokio::task::JoinHandle<Result<Fetched>>);

impl Drop for Ahead {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Ahead {
    async fn rows(mut self, after: GlobalPosition) -> Result<Fetched> {
        match (&mut self.0).await {
            Ok(fetched) => fetched,
            Err(e) => Err(backend_msg(format!(
                "the read ahead of a feed page after {after} stopped: {e}"
            ))),
        }
    }
}

/// Where `read_feed_pages` stands (see there).
///
/// Once a page came back full (`n` rows, its last event `L`), the next
/// page's query (`n` rows after `L`) runs on a task of its own while this
/// page is decoded. Without a filter, the page after it is read at the same
/// time on another connection: `n + 1` rows after `L`, the first `n - 1`
/// skipped. It is used only if its first row is the next page's last: rows
/// below the snapshot horizon never gain a row before one of theirs (a
/// transaction older than a snapshot's horizon had ended before it), so
/// both queries then saw the same `n` rows after `L`, and the rest of the
/// second is a full page after that row, gap-free by itself as any full
/// page. Otherwise (a row deleted in between, the log ending there) it is
/// dropped and the page after next is read as usual. The server then
/// produces two pages in parallel while this process decodes.
struct FeedState {
    store: PgEventStore,
    filter: ReadAll,
    limit: usize,
    /// The next page's query.
    ahead: Option<Ahead>,
    /// The query of the page after the next one, from the next page's last
    /// row on (to be checked against it).
    beyond: Option<Ahead>,
    /// The next page's rows, checked.
    ready: Option<Fetched>,
}

impl FeedState {
    /// The rows of the page after `self.filter.after`: checked, fetched
    /// ahead, or fetched now. `None` for a page that takes more than one
    /// query (a limit above the largest page).
    async fn fetch(&mut self) -> Result<Option<Fetched>> {
        if let Some(ready) = self.ready.take() {
            return Ok(Some(ready));
        }
        let after = self.filter.after;
        let Some(ahead) = self.ahead.take() else {
            self.beyond = None;
            let (pager, first) =
                AllPager::new(&self.store, self.filter.clone().limit(self.limit as u64))?;
            if first.2.rows() < self.limit as u64 {
                return Ok(None);
            }
            return pager.rows(first).await.map(Some);
        };
        let fetched = ahead.rows(after).await?;
        let beyond = self.beyond.take();
        if let (Some(beyond), Some(last)) = (beyond, self.full_last(&fetched)?) {
            let next = beyond.rows(last).await?;
            let n = self.limit;
            let starts_at_last = match next.rows.first() {
                Some(row) => row_position(row)? == last,
                None => false,
            };
            if !next.cut && next.rows.len() == n + 1 && starts_at_last {
                let mut rows = next.rows;
                rows.remove(0);
                self.ready = Some(Fetched {
                    rows,
                    cut: false,
                    want: n as i64,
                });
            }
        }
        Ok(Some(fetched))
    }

    /// The last position of `fetched` when it is a full page (every query
    /// here asks for the page's limit: a page of more than one query is
    /// read by `read_feed_page`).
    fn full_last(&self, fetched: &Fetched) -> Result<Option<GlobalPosition>> {
        let full = !fetched.cut && fetched.rows.len() == self.limit;
        match fetched.rows.last() {
            Some(row) if full => row_position(row).map(Some),
            _ => Ok(None),
        }
    }

    /// Starts the queries of the page after `after` and, without a filter,
    /// of the page after that one (see [`FeedState`]).
    fn fetch_ahead(&mut self, after: GlobalPosition) -> Result<()> {
        let mut filter = self.filter.clone().limit(self.limit as u64);
        filter.after = after;
        let (pager, first) = AllPager::new(&self.store, filter)?;
        if pager.can_skip() {
            let (pager, from) = (pager.clone(), first.0);
            let n = self.limit as i64;
            self.beyond = Some(Ahead(tokio::spawn(async move {
                pager.rows_beyond(from, n - 1, n + 1).await
            })));
        }
        self.ahead = Some(Ahead(tokio::spawn(async move { pager.rows(first).await })));
        Ok(())
    }

    /// The next page.
    async fn next_page(&mut self) -> Result<annals::FeedPage> {
        let limit = self.limit;
        let Some(fetched) = self.fetch().await? else {
            return self.store.read_feed_page(&self.filter, limit).await;
        };
        if fetched.cut {
            // Cut by its byte budget (large events): as a page read alone.
            return self.store.read_feed_page(&self.filter, limit).await;
        }
        // A full page is gap-free by itself (see `read_feed_page`): the
        // next one starts after its last row, fetched on a task of its own
        // while this one is decoded (unless it is here or on its way).
        let next_after = match (&self.ready, self.full_last(&fetched)?) {
            (Some(ready), _) => self.full_last(ready)?,
            (None, last) if self.ahead.is_none() => last,
            (None, _) => None,
        };
        if let Some(after) = next_after {
            self.fetch_ahead(after)?;
        }
        let Fetched { rows, cut, want } = fetched;
        let rows_limit = PageRows::new(self.store.inner.batch_size);
        let (events, _) = position_page(&rows, cut, want, 0, rows_limit, self.store.upcasters())?;
        METRICS.read_counter().increment(events.len() as u64);
        let after = self.filter.after;
        let filter = &self.filter;
        let rest = |seen: GlobalPosition, n: usize| {
            let mut rest = filter.clone().limit(n as u64);
            rest.after = seen;
            self.store.read_all_vec(rest)
        };
        feed_page(after, limit, events, || self.store.head_position(), rest).await
    }
}

impl PgEventStore {
    /// `read_all(options)` collected: the same queries, the events of each
    /// page decoded into one vector (the first page's is the result's)
    /// rather than moved one by one through a stream.
    async fn read_all_vec(&self, options: ReadAll) -> Result<Vec<RecordedEvent>> {
        let (pager, first) = AllPager::new(self, options)?;
        let read = METRICS.read_counter();
        let mut events: Vec<RecordedEvent> = Vec::new();
        let mut cursor = Some(first);
        while let Some(at) = cursor.take() {
            let (page, next) = pager.page(at).await?;
            if page.is_empty() {
                break;
            }
            read.increment(page.len() as u64);
            if events.is_empty() {
                events = page;
            } else {
                events.extend(page);
            }
            cursor = next;
        }
        Ok(events)
    }
}

/// One page of `read_all`.
struct Page<'a> {
    after: (i64, i64),
    want: i64,
    /// Rows skipped first (only without a filter; 0 otherwise).
    offset: i64,
    budget: usize,
    categories: &'a [String],
    event_types: &'a [String],
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
}

impl Page<'_> {
    /// The page's rows and whether its byte budget cut it.
    async fn fetch(&self, client: &Client) -> Result<(Vec<tokio_postgres::Row>, bool)> {
        let (tx, seq) = self.after;
        let what = "cannot read all events";
        let timed = self.since.is_some() || self.until.is_some();
        let (sql, params): (&str, Vec<&(dyn ToSql + Sync)>) = if timed {
            if !self.categories.is_empty() {
                (
                    READ_ALL_CATEGORIES_TIMED,
                    vec![
                        &tx,
                        &seq,
                        &self.want,
                        &self.categories,
                        &self.event_types,
                        &self.since,
                        &self.until,
                    ],
                )
            } else if !self.event_types.is_empty() {
                (
                    READ_ALL_TYPES_TIMED,
                    vec![
                        &tx,
                        &seq,
                        &self.want,
                        &self.event_types,
                        &self.since,
                        &self.until,
                    ],
                )
            } else {
                (
                    READ_ALL_TIMED,
                    vec![&tx, &seq, &self.want, &self.since, &self.until],
                )
            }
        } else if let [category] = self.categories {
            (
                READ_ALL_CATEGORY,
                vec![&tx, &seq, &self.want, category, &self.event_types],
            )
        } else if !self.categories.is_empty() {
            (
                READ_ALL_CATEGORIES,
                vec![&tx, &seq, &self.want, &self.categories, &self.event_types],
            )
        } else if !self.event_types.is_empty() {
            (
                READ_ALL_TYPES,
                vec![&tx, &seq, &self.want, &self.event_types],
            )
        } else if self.offset > 0 {
            (READ_ALL_OFFSET, vec![&tx, &seq, &self.want, &self.offset])
        } else {
            (READ_ALL, vec![&tx, &seq, &self.want])
        };
        let stmt = client.prepare_cached(sql).await.context(what)?;
        collect_page(client, &stmt, &params, self.budget)
            .await
            .context(what)
    }
}

impl PgEventStore {
    /// Fetches one page of `read_all`, and whether its byte budget cut it.
    ///
    /// A page that ends short of its limits is at the tail of what is safe
    /// to deliver. If committed events after it are held back by
    /// transactions still in flight, the page waits for those transactions
    /// (at most `horizon_wait`, holding no connection; transactions that
    /// start later are not waited for) and is read again.
    async fn read_all_page(&self, page: &Page<'_>) -> Result<(Vec<tokio_postgres::Row>, bool)> {
        let (rows, cut) = with_client!(self, Lane::Feed, "read all events", |client| page
            .fetch(client)
            .await)?;
        if cut || rows.len() as i64 >= page.want || self.horizon_wait.is_zero() {
            return Ok((rows, cut));
        }
        // Where this page stopped: its last row, or where it began.
        let delivered = match rows.last() {
            Some(row) => (
                row.try_get(0)
                    .context("cannot decode an event's position")?,
                row.try_get(1)
                    .context("cannot decode an event's position")?,
            ),
            None => page.after,
        };
        let Some(held) = self.held_back(delivered).await? else {
            return Ok((rows, cut));
        };
        if !held.passed {
            let deadline = Instant::now() + self.horizon_wait;
            if !self.wait_past(held.newest, deadline).await {
                tracing::debug!(
                    newest = held.newest,
                    "read_all: committed events held back by a long transaction"
                );
            }
        }
        let (rows, cut) = with_client!(self, Lane::Feed, "read all events", |client| page
            .fetch(client)
            .await)?;
        Ok((rows, cut))
    }

    /// What lies after `after`: `None` when nothing does (or waiting is
    /// off); otherwise the newest transaction with events there, and
    /// whether the horizon has passed it already (then a page read before
    /// this check is read again at once).
    async fn held_back(&self, after: (i64, i64)) -> Result<Option<Held>> {
        if self.horizon_wait.is_zero() {
            return Ok(None);
        }
        let what = "cannot read the snapshot horizon";
        let rows = with_client!(self, Lane::Feed, "read the snapshot horizon", |client| {
            query(client, HELD_BACK_SQL, &[&after.0, &after.1], what).await
        })?;
        let row = rows
            .first()
            .ok_or_else(|| backend_msg("the horizon query returned no row"))?;
        let newest: Option<i64> = row.try_get(0).context(what)?;
        let horizon: i64 = row.try_get(1).context(what)?;
        self.saw_horizon(horizon);
        Ok(newest.map(|newest| Held {
            newest,
            passed: horizon > newest,
        }))
    }
}

/// Events after a position (see [`PgEventStore::held_back`]).
#[derive(Clone, Copy, Debug)]
struct Held {
    /// The newest transaction that wrote them.
    newest: i64,
    /// Whether the horizon has passed it.
    passed: bool,
}

/// Runs a cached statement.
async fn query(
    client: &Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    what: &str,
) -> Result<Vec<tokio_postgres::Row>> {
    let stmt = client.prepare_cached(sql).await.context(what)?;
    client.query(&stmt, params).await.context(what)
}

/// One page of a stream read (`params` of [`READ_STREAM_FORWARD`]).
async fn read_stream_page(
    client: &Client,
    sql: &str,
    stream: &str,
    params: &[&(dyn ToSql + Sync); 5],
    budget: usize,
) -> Result<(Vec<tokio_postgres::Row>, bool)> {
    let stmt = client
        .prepare_cached(sql)
        .await
        .context("cannot prepare a stream read")?;
    let page = collect_page(client, &stmt, params, budget)
        .await
        .map_err(|e| backend(format!("cannot read stream {stream}"), e))?;
    if page.0.is_empty() {
        // No events: an archived stream says where they went.
        crate::archive::refuse_archived(client, stream).await?;
    }
    Ok(page)
}

async fn stream_head(client: &Client, stream: &StreamId) -> Result<Option<StreamVersion>> {
    let stmt = client
        .prepare_cached(STREAM_VERSION_SQL)
        .await
        .context("cannot prepare a stream version query")?;
    let row = client
        .query_opt(&stmt, &[&stream.as_str()])
        .await
        .map_err(|e| backend(format!("cannot read the version of {stream}"), e))?;
    match row {
        None => Ok(None),
        Some(row) => {
            let v: i64 = row
                .try_get(0)
                .map_err(|e| backend(format!("cannot decode the version of {stream}"), e))?;
            let archived: Option<String> = row
                .try_get(1)
                .map_err(|e| backend(format!("cannot decode the version of {stream}"), e))?;
            match archived {
                Some(location) => Err(Error::StreamArchived {
                    stream: stream.clone(),
                    head: StreamVersion(count(v)),
                    location,
                }),
                None => Ok(Some(StreamVersion(count(v)))),
            }
        }
    }
}

/// The result of a successful `annals_append`: its one row holds the first
/// version, the transaction id and the seqs in batch order.
fn appended(row: &tokio_postgres::Row, n: usize) -> Result<AppendResult> {
    appended_from(row, 1, n)
}

/// [`appended`] on a row whose version, transaction and seqs start at
/// column `col` (a group commit's rows start with the member's ordinal).
pub(crate) fn appended_from(
    row: &tokio_postgres::Row,
    col: usize,
    n: usize,
) -> Result<AppendResult> {
    let what = "cannot decode the append";
    let first: i64 = row.try_get(col).context(what)?;
    let tx: i64 = row.try_get(col + 1).context(what)?;
    let seqs: Vec<i64> = row.try_get(col + 2).context(what)?;
    if seqs.len() != n {
        return Err(backend_msg(format!(
            "annals_append stored {} events of a batch of {n}",
            seqs.len()
        )));
    }
    let positions = seqs
        .into_iter()
        .map(|seq| position(tx, seq))
        .collect::<Result<Vec<_>>>()?;
    let first = count(first);
    Ok(AppendResult {
        first_version: StreamVersion(first),
        last_version: StreamVersion(first + n as u64 - 1),
        positions,
        deduplicated: false,
    })
}

/// Reads the stored rows of the batch's ids and lets the core decide:
/// `Ok(None)` when none is stored, the original assignment for a retry of a
/// stored batch, [`Error::DuplicateEventId`] for any other reuse.
async fn resolve_existing(
    client: &Client,
    stream: &StreamId,
    events: &[PreparedEvent],
) -> Result<Option<AppendResult>> {
    let what = "cannot read stored event ids";
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id.0).collect();
    let stmt = client.prepare_cached(EXISTING_SQL).await.context(what)?;
    let rows = client.query(&stmt, &[&ids]).await.context(what)?;
    let mut found = HashMap::with_capacity(rows.len());
    for r in &rows {
        let id: Uuid = r.try_get(0).context(what)?;
        let holder: &str = r.try_get(1).context(what)?;
        let version: i64 = r.try_get(2).context(what)?;
        let event_version: i32 = r.try_get(6).context(what)?;
        let digest: Option<&[u8]> = r.try_get(7).context(what)?;
        let bad = |field: &str| backend_msg(format!("stored event {id} has an invalid {field}"));
        found.insert(
            id,
            StoredEvent {
                stream_id: StreamId::parse(holder).map_err(|e| {
                    backend(format!("stored event {id} has an invalid stream id"), e)
                })?,
                stream_version: StreamVersion(
                    u64::try_from(version).map_err(|_| bad("stream version"))?,
                ),
                global_position: position(
                    r.try_get(3).context(what)?,
                    r.try_get(4).context(what)?,
                )?,
                event_type: r.try_get(5).context(what)?,
                event_version: u32::try_from(event_version).map_err(|_| bad("event version"))?,
                fingerprint: digest
                    .map(|d| Fingerprint::from_slice(d).ok_or_else(|| bad("data_digest")))
                    .transpose()?,
                data: r.try_get(8).context(what)?,
            },
        );
    }
    let stored: Vec<Option<StoredEvent>> =
        events.iter().map(|e| found.remove(&e.event_id.0)).collect();
    check_retry(stream, events, &stored)
}

impl annals::StreamCatalog for PgEventStore {
    fn list_streams(&self, category: &str) -> BoxStream<'static, Result<StreamInfo>> {
        let store = self.clone();
        let category = category.to_owned();
        paged(String::new(), move |after: String| {
            let store = store.clone();
            let category = category.clone();
            async move {
                let want = store.inner.batch_size as i64;
                let rows = with_client!(store, Lane::Any, "list streams", |client| {
                    query(
                        client,
                        LIST_STREAMS_SQL,
                        &[&category, &after, &want],
                        "cannot list streams",
                    )
                    .await
                })?;
                let infos = rows
                    .iter()
                    .map(|row| {
                        let name: &str = row.try_get(0).context("cannot decode a stream")?;
                        let version: i64 = row.try_get(1).context("cannot decode a stream")?;
                        Ok(StreamInfo {
                            stream_id: StreamId::parse(name).map_err(|e| {
                                backend(format!("stream {name:?} has an invalid name"), e)
                            })?,
                            version: StreamVersion(u64::try_from(version).unwrap_or(0)),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let next = match infos.last() {
                    Some(last) if infos.len() as i64 == want => {
                        Some(last.stream_id.as_str().to_owned())
                    }
                    _ => None,
                };
                Ok((infos, next))
            }
        })
    }

    async fn stats(&self) -> Result<StoreStats> {
        let mut client = self.ready_client("read statistics").await?;
        // One snapshot for all three queries, so the numbers agree.
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .context("cannot start the statistics transaction")?;
        let what = "cannot read statistics";
        let categories = tx
            .query(
                "SELECT category, count(*), sum(version)::bigint FROM streams \
                 GROUP BY category ORDER BY category",
                &[],
            )
            .await
            .context(what)?
            .iter()
            .map(|r| {
                Ok(CategoryStats {
                    category: r.try_get(0).context(what)?,
                    streams: count(r.try_get(1).context(what)?),
                    events: count(r.try_get(2).context(what)?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let event_types = tx
            .query(
                "SELECT event_type, count(*) FROM events GROUP BY event_type ORDER BY event_type",
                &[],
            )
            .await
            .context(what)?
            .iter()
            .map(|r| {
                Ok(EventTypeStats {
                    event_type: r.try_get(0).context(what)?,
                    events: count(r.try_get(1).context(what)?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let times = tx
            .query_one("SELECT min(recorded_at), max(recorded_at) FROM events", &[])
            .await
            .context(what)?;
        let first_recorded_at = times.try_get(0).context(what)?;
        let last_recorded_at = times.try_get(1).context(what)?;
        tx.commit().await.context(what)?;
        Ok(StoreStats {
            streams: categories.iter().map(|c| c.streams).sum(),
            events: event_types.iter().map(|t| t.events).sum(),
            categories,
            event_types,
            first_recorded_at,
            last_recorded_at,
        })
    }

    fn read_correlated(&self, correlation_id: Uuid, limit: Option<u64>) -> EventStream {
        self.read_related(READ_CORRELATED_SQL, correlation_id, limit)
    }

    fn read_caused_by(&self, causation_id: Uuid, limit: Option<u64>) -> EventStream {
        self.read_related(READ_CAUSED_BY_SQL, causation_id, limit)
    }

    async fn largest_streams(&self, limit: usize) -> Result<Vec<StreamInfo>> {
        let what = "cannot list the largest streams";
        let want = to_i64(limit as u64);
        let rows = with_client!(self, Lane::Any, "list the largest streams", |client| {
            query(client, LARGEST_STREAMS_SQL, &[&want], what).await
        })?;
        rows.iter()
            .map(|row| {
                let name: &str = row.try_get(0).context(what)?;
                let version: i64 = row.try_get(1).context(what)?;
                Ok(StreamInfo {
                    stream_id: StreamId::parse(name)
                        .map_err(|e| backend(format!("stream {name:?} has an invalid name"), e))?,
                    version: StreamVersion(count(version)),
                })
            })
            .collect()
    }

    async fn events_recorded_since(&self, since: DateTime<Utc>) -> Result<u64> {
        let what = "cannot count recent events";
        let rows = with_client!(self, Lane::Any, "count recent events", |client| {
            query(client, RECORDED_SINCE_SQL, &[&since], what).await
        })?;
        let row = rows
            .first()
            .ok_or_else(|| backend_msg("the count of recent events returned no row"))?;
        Ok(count(row.try_get(0).context(what)?))
    }
}

/// A feed page after `after` from `first`, at most `limit` events that
/// `read_all` returned (see `read_feed_page` above): `head` reads the head
/// position, `rest(seen, n)` reads at most `n` more events after `seen`.
/// A full `first` is the page (no head read); a short one is completed up to
/// the head, read after it, with the events between its last one and the
/// head (read only when the head moved past it).
async fn feed_page<H, HF, M, MF>(
    after: GlobalPosition,
    limit: usize,
    mut events: Vec<RecordedEvent>,
    head: H,
    rest: M,
) -> Result<annals::FeedPage>
where
    H: FnOnce() -> HF,
    HF: std::future::Future<Output = Result<Option<GlobalPosition>>>,
    M: FnOnce(GlobalPosition, usize) -> MF,
    MF: std::future::Future<Output = Result<Vec<RecordedEvent>>>,
{
    let page = |events: Vec<RecordedEvent>, scanned_to, at_end| annals::FeedPage {
        events,
        scanned_to,
        at_end,
    };
    if events.len() >= limit {
        let scanned_to = events.last().map_or(after, |e| e.global_position);
        return Ok(page(events, scanned_to, false));
    }
    let seen = events.last().map_or(after, |e| e.global_position);
    let head = match head().await? {
        Some(head) if head > after => head.max(seen),
        _ => return Ok(page(events, seen, true)),
    };
    if head > seen {
        events.extend(rest(seen, limit - events.len()).await?);
    }
    let full = events.len() >= limit;
    events.retain(|e| e.global_position <= head);
    if full && events.len() == limit {
        let scanned_to = events.last().map_or(seen, |e| e.global_position);
        return Ok(page(events, scanned_to, false));
    }
    Ok(page(events, head, true))
}

/// Decodes a page of a read in global order and gives its next cursor
/// (after the last position, events taken so far, the next page's rows), or
/// `None` when the page was the last: it came back short of `want` rows
/// without being cut by its byte budget.
#[allow(clippy::type_complexity)]
fn position_page(
    rows: &[tokio_postgres::Row],
    cut: bool,
    want: i64,
    taken: u64,
    rows_limit: PageRows,
    upcasters: Option<&Upcasters>,
) -> Result<(Vec<RecordedEvent>, Option<((i64, i64), u64, PageRows)>)> {
    let mut last_stream = None;
    let events = rows
        .iter()
        .map(|row| decode_event(row, &mut last_stream, upcasters))
        .collect::<Result<Vec<_>>>()?;
    let next = match events.last() {
        Some(last) if cut || (events.len() as i64) == want => Some((
            (
                to_i64(last.global_position.commit()),
                to_i64(last.global_position.seq()),
            ),
            taken + events.len() as u64,
            rows_limit.next(events.len(), cut),
        )),
        _ => None,
    };
    Ok((events, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event at position `seq` of transaction 1.
    fn at(seq: u64) -> RecordedEvent {
        RecordedEvent {
            event_id: EventId::new(),
            stream_id: StreamId::parse("Feed-1").expect("stream"),
            stream_version: StreamVersion(seq),
            global_position: GlobalPosition::new(1, seq),
            event_type: "E".into(),
            event_version: 1,
            data: annals::Payload::from_value(&serde_json::json!({})).expect("payload"),
            metadata: annals::Metadata::default(),
            recorded_at: Utc::now(),
            stored_event_version: None,
            stored_event_type: None,
        }
    }

    fn seqs(page: &annals::FeedPage) -> Vec<u64> {
        page.events
            .iter()
            .map(|e| e.global_position.seq())
            .collect()
    }

    /// Runs [`feed_page`] after position `after` of transaction 1 with
    /// `first` read first, `head` as the head and `later` as what a read
    /// after the first one finds (the events that became visible in
    /// between). Returns the page and the reads it made: whether it read
    /// the head, and the `(after, at most)` of its second read.
    async fn feed(
        after: u64,
        limit: usize,
        first: &[u64],
        head: Option<u64>,
        later: &[u64],
    ) -> (annals::FeedPage, bool, Option<(u64, usize)>) {
        let read_head = std::cell::Cell::new(false);
        let second = std::cell::Cell::new(None);
        let page = feed_page(
            GlobalPosition::new(1, after),
            limit,
            first.iter().map(|s| at(*s)).collect(),
            || async {
                read_head.set(true);
                Ok(head.map(|h| GlobalPosition::new(1, h)))
            },
            |seen: GlobalPosition, n: usize| {
                second.set(Some((seen.seq(), n)));
                let found: Vec<RecordedEvent> = later
                    .iter()
                    .filter(|s| **s > seen.seq())
                    .take(n)
                    .map(|s| at(*s))
                    .collect();
                async move { Ok(found) }
            },
        )
        .await
        .expect("page");
        (page, read_head.get(), second.get())
    }

    /// PostgreSQL's feed page: a full first read is the page without a head
    /// query; a short one ends at the head, with the events that became
    /// visible between the first read and the head read, and no second read
    /// when the head did not move past it.
    #[tokio::test]
    async fn a_feed_page_reads_the_head_only_when_short() {
        // Full: no head, no second read; it ends at its last event.
        let (page, head, second) = feed(0, 3, &[1, 2, 3], Some(9), &[]).await;
        assert_eq!(
            (seqs(&page), page.scanned_to.seq(), page.at_end),
            (vec![1, 2, 3], 3, false)
        );
        assert_eq!((head, second), (false, None));
        // Short, and the head is its last event: nothing more to read.
        let (page, head, second) = feed(0, 5, &[1, 2], Some(2), &[]).await;
        assert_eq!(
            (seqs(&page), page.scanned_to.seq(), page.at_end),
            (vec![1, 2], 2, true)
        );
        assert_eq!((head, second), (true, None));
        // Short, then 3 and 4 became visible before the head (4) was read;
        // 5 after it: the page takes 3 and 4, not 5, and ends at the head.
        let (page, head, second) = feed(0, 10, &[1, 2], Some(4), &[3, 4, 5]).await;
        assert_eq!(
            (seqs(&page), page.scanned_to.seq(), page.at_end),
            (vec![1, 2, 3, 4], 4, true)
        );
        assert_eq!((head, second), (true, Some((2, 8))));
        // Filtered: nothing of the first read matched past 2, the head is
        // far ahead, and the second read finds nothing: scanned to the head.
        let (page, _, second) = feed(0, 10, &[2], Some(600), &[]).await;
        assert_eq!(
            (seqs(&page), page.scanned_to.seq(), page.at_end),
            (vec![2], 600, true)
        );
        assert_eq!(second, Some((2, 9)));
        // The second read fills the page: it ends at its last event.
        let (page, _, second) = feed(0, 3, &[1], Some(8), &[2, 3, 4]).await;
        assert_eq!(
            (seqs(&page), page.scanned_to.seq(), page.at_end),
            (vec![1, 2, 3], 3, false)
        );
        assert_eq!(second, Some((1, 2)));
        // The second read fills it only with an event beyond the head: not
        // full, so it ends at the head, without that event.
        let (page, _, _) = feed(0, 3, &[1], Some(2), &[2, 5]).await;
        assert_eq!(
            (seqs(&page), page.scanned_to.seq(), page.at_end),
            (vec![1, 2], 2, true)
        );
        // Empty: no head past `after`, nothing read again; or a head past
        // it, and what became visible is read from `after`.
        let (page, head, second) = feed(7, 3, &[], Some(7), &[]).await;
        assert_eq!(
            (seqs(&page), page.scanned_to.seq(), page.at_end),
            (vec![], 7, true)
        );
        assert_eq!((head, second), (true, None));
        let (page, _, _) = feed(7, 3, &[], None, &[]).await;
        assert_eq!((page.scanned_to.seq(), page.at_end), (7, true));
        let (page, _, second) = feed(7, 3, &[], Some(9), &[8, 9]).await;
        assert_eq!(
            (seqs(&page), page.scanned_to.seq(), page.at_end),
            (vec![8, 9], 9, true)
        );
        assert_eq!(second, Some((7, 3)));
    }

    /// A migrated store in a fresh schema of the test server, with a plain
    /// client whose `search_path` is that schema, for the plan tests below;
    /// `None`, with a SKIPPED line on stderr naming `test`, without a server
    /// (a failure when `ANNALS_REQUIRE_POSTGRES=1`).
    struct UnitDb {
        schema: String,
        store: crate::PgEventStore,
        client: tokio_postgres::Client,
        connection: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    }

    impl UnitDb {
        async fn new(test: &str) -> Option<Self> {
            let url = match std::env::var("ANNALS_TEST_POSTGRES_URL") {
                Ok(url) if !url.trim().is_empty() => url,
                _ => {
                    assert!(
                        std::env::var("ANNALS_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                        "ANNALS_REQUIRE_POSTGRES=1 but ANNALS_TEST_POSTGRES_URL is not set"
                    );
                    let _ = std::io::Write::write_all(
                        &mut std::io::stderr(),
                        format!("SKIPPED {test}: set ANNALS_TEST_POSTGRES_URL\n").as_bytes(),
                    );
                    return None;
                }
            };
            let schema = format!("annals_unit_{}", Uuid::now_v7().simple());
            let store = crate::PgEventStore::connect_with(
                &url,
                crate::PgOptions {
                    schema: Some(schema.clone()),
                    ..crate::PgOptions::default()
                },
            )
            .await
            .expect("connect");
            store.migrate().await.expect("migrate");
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            let connection = tokio::spawn(connection);
            client
                .batch_execute(&format!("SET search_path TO \"{schema}\""))
                .await
                .expect("search_path");
            Some(UnitDb {
                schema,
                store,
                client,
                connection,
            })
        }

        /// The lines of `EXPLAIN <sql>`.
        async fn plan(&self, sql: &str) -> Vec<String> {
            self.client
                .query(&format!("EXPLAIN {sql}"), &[])
                .await
                .expect("explain")
                .iter()
                .map(|r| r.get(0))
                .collect()
        }

        /// Drops the schema.
        async fn drop(self) {
            self.client
                .batch_execute(&format!("DROP SCHEMA \"{}\" CASCADE", self.schema))
                .await
                .expect("drop schema");
            drop(self.client);
            let _ = self.connection.await;
        }
    }

    /// The metadata lookups can read the indexes of migration 5 (the
    /// expression must match the index's exactly): with sequential scans
    /// off, the plan of each names its index. Needs the test server (see
    /// `tests/it/common.rs`); skipped with a line on stderr without one.
    #[tokio::test]
    async fn metadata_lookups_use_their_indexes() {
        let Some(db) = UnitDb::new("metadata_lookups_use_their_indexes").await else {
            return;
        };
        db.client
            .batch_execute("SET enable_seqscan = off")
            .await
            .expect("settings");
        for (i, (sql, index)) in [
            (READ_CORRELATED_SQL, "events_correlation_idx"),
            (READ_CAUSED_BY_SQL, "events_causation_idx"),
        ]
        .into_iter()
        .enumerate()
        {
            db.client
                .batch_execute(&format!("PREPARE q{i} AS {sql}"))
                .await
                .expect("prepare");
            let plan = db.plan(&format!("EXECUTE q{i}('x', 0, 0, 10)")).await;
            assert!(
                plan.iter().any(|line| line.contains(index)),
                "{index} not in {plan:#?}"
            );
        }
        db.drop().await;
    }

    /// A feed page of one category is one range of the category index
    /// when the category is rare, and no sort of whole rows in either case
    /// (the merge of several categories sorts; one category needs none):
    /// 300 events of one category and 1 of another, analyzed, planned with
    /// sequential scans off. Needs the test server; skipped with a line on
    /// stderr without one.
    #[tokio::test]
    async fn one_category_feed_pages_read_their_index_without_a_sort() {
        use annals::{EventStore, ExpectedVersion, NewEvent, StreamId};
        let test = "one_category_feed_pages_read_their_index_without_a_sort";
        let Some(db) = UnitDb::new(test).await else {
            return;
        };
        for (category, n) in [("Common", 300), ("Rare", 1)] {
            let stream = StreamId::new(category, "1").expect("stream id");
            let events = (0..n)
                .map(|i| NewEvent::new("E", serde_json::json!({ "i": i })))
                .collect();
            db.store
                .append(&stream, ExpectedVersion::Any, events)
                .await
                .expect("append");
        }
        db.client
            .batch_execute(&format!(
                "ANALYZE events; SET enable_seqscan = off; PREPARE one AS {READ_ALL_CATEGORY}"
            ))
            .await
            .expect("prepare");
        let page = |category: &str| format!("EXECUTE one(0, 0, 100, '{category}', '{{}}')");
        let rare = db.plan(&page("Rare")).await;
        assert!(
            rare.iter()
                .any(|line| line.contains("events_category_tx_seq_idx")),
            "the rare category's range of its index: {rare:#?}"
        );
        for p in [rare, db.plan(&page("Common")).await] {
            assert!(!p.iter().any(|line| line.contains("Sort")), "{p:#?}");
        }
        db.drop().await;
    }

    #[test]
    fn read_all_queries_share_the_horizon() {
        for sql in [
            READ_ALL,
            READ_ALL_TYPES,
            READ_ALL_CATEGORY,
            READ_ALL_CATEGORIES,
            READ_ALL_TIMED,
            READ_ALL_TYPES_TIMED,
            READ_ALL_CATEGORIES_TIMED,
        ] {
            assert!(sql.contains("tx_id < pg_snapshot_xmin(pg_current_snapshot())"));
            assert!(sql.contains("($1::bigint::text::xid8, $2)"));
            assert!(sql.contains("LIMIT $3"));
        }
    }
}
