//! Row decoding and lazy, keyset-paginated reads.
//!
//! Every read is a stream of pages: each page is one query for a bounded
//! number of rows after the last key seen, on a connection taken from the
//! pool for that query only. A reader that stops early leaves nothing open,
//! and a long read never pins a connection or a snapshot.
//!
//! Pages of events are bounded twice: in rows ([`PageRows`]: the batch
//! size, doubling per page up to [`MAX_BATCH_GROWTH`] times it, so a long
//! replay of small events takes few round trips) and in bytes
//! (`PgOptions::page_bytes`, see [`collect_page`]), so that a replay of
//! large events holds a few of them at a time, not a batch of them.

use std::future::Future;

use annals::{
    EventId, GlobalPosition, Metadata, Payload, RecordedEvent, Result, StreamId, StreamVersion,
    Upcasters,
};
use deadpool_postgres::Client;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use tokio_postgres::types::{FromSql, Json, ToSql, Type};
use tokio_postgres::{Row, Statement};

use crate::error::{backend, backend_msg, Context};

/// The columns [`decode_event`] reads, in order, from an `events` row
/// aliased `e`.
macro_rules! event_columns {
    () => {
        "e.tx_id::text::bigint, e.seq, e.event_id, e.stream_id, e.stream_version, \
         e.event_type, e.event_version, e.data, e.metadata, e.recorded_at"
    };
}
pub(crate) use event_columns;

/// A position from its stored parts.
pub(crate) fn position(tx: i64, seq: i64) -> Result<GlobalPosition> {
    match (u64::try_from(tx), u64::try_from(seq)) {
        (Ok(tx), Ok(seq)) => Ok(GlobalPosition::new(tx, seq)),
        _ => Err(backend_msg(format!(
            "stored position {tx}:{seq} is negative"
        ))),
    }
}

/// A `u64` as a SQL `bigint`, saturating (positions and versions beyond
/// `i64::MAX` cannot be stored, so they compare as "after everything").
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Upper bound of a page, as a multiple of the batch size.
pub(crate) const MAX_BATCH_GROWTH: u64 = 16;

/// Runs a page query and collects its rows as they arrive, until they hold
/// `budget` bytes of payload and metadata (the row that reaches the budget
/// is kept, so a row larger than the budget comes alone). Returns the rows
/// and whether the budget cut the page.
///
/// The bound is kept on the client, where the memory is: rows are read from
/// the connection one at a time, and once the budget is reached the rest of
/// the page is left to the connection, which discards it. Measuring in SQL
/// instead (a running sum over the sizes of the candidate rows) cost a
/// third of the replay throughput of small events; this costs nothing when
/// pages are not cut, and the next page of a cut one asks for few rows
/// ([`PageRows::next`]), so little is sent in vain.
pub(crate) async fn collect_page(
    client: &Client,
    stmt: &Statement,
    params: &[&(dyn ToSql + Sync)],
    budget: usize,
) -> std::result::Result<(Vec<Row>, bool), tokio_postgres::Error> {
    let rows = client.query_raw(stmt, params.iter().copied()).await?;
    futures::pin_mut!(rows);
    let mut page = Vec::new();
    let mut bytes = 0usize;
    while let Some(row) = rows.next().await {
        let row = row?;
        bytes = bytes.saturating_add(event_bytes(&row));
        page.push(row);
        if bytes >= budget {
            return Ok((page, true));
        }
    }
    Ok((page, false))
}

/// The bytes of a row of [`event_columns!`] that count against a page's
/// budget: the payload and the metadata as the server sent them.
fn event_bytes(row: &Row) -> usize {
    let len = |i: usize| row.try_get::<_, RawLen>(i).map_or(0, |l| l.0);
    len(DATA_COLUMN) + len(METADATA_COLUMN)
}

/// The columns of [`event_columns!`] holding the payload and the metadata.
const DATA_COLUMN: usize = 7;
const METADATA_COLUMN: usize = 8;

/// The length of a column's value on the wire, whatever its type.
struct RawLen(usize);

impl<'a> FromSql<'a> for RawLen {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawLen(raw.len()))
    }

    fn from_sql_null(
        _: &Type,
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawLen(0))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// The row limits of the pages of one read.
///
/// The first page fetches the batch size, each further page twice as many
/// as the one before, up to [`MAX_BATCH_GROWTH`] times the batch size: a
/// short read costs one small query and a long replay few round trips. A
/// page cut by its byte budget after `n` rows is followed by one of `2n`
/// rows, so that large events do not make every page compute the sizes of
/// many more rows than it can deliver.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct PageRows {
    rows: u64,
    max: u64,
}

impl PageRows {
    /// The limits of a read's first page.
    pub(crate) fn new(batch_size: usize) -> Self {
        let batch = (batch_size as u64).max(1);
        PageRows {
            rows: batch,
            max: batch.saturating_mul(MAX_BATCH_GROWTH),
        }
    }

    /// The limits of the first page of a read of at most `limit` events:
    /// as [`PageRows::new`], but a read whose limit is above the batch size
    /// and within the largest page (a feed consumer's page) gets all of it
    /// in one query instead of two or more.
    pub(crate) fn for_limit(batch_size: usize, limit: u64) -> Self {
        let first = Self::new(batch_size);
        if limit > first.max {
            // A long or unlimited read: small first, then growing.
            return first;
        }
        PageRows {
            rows: limit.max(first.rows),
            max: first.max,
        }
    }

    /// This page's row limit.
    pub(crate) fn rows(self) -> u64 {
        self.rows
    }

    /// The next page's limits, after this page returned `got` rows and was
    /// (`cut`) or was not stopped by its byte budget.
    pub(crate) fn next(self, got: usize, cut: bool) -> Self {
        let rows = if cut {
            (got as u64).saturating_mul(2)
        } else {
            self.rows.saturating_mul(2)
        };
        PageRows {
            rows: rows.clamp(1, self.max),
            max: self.max,
        }
    }
}

/// A page's byte budget (at least one byte, so a page always ends).
pub(crate) fn budget(page_bytes: usize) -> usize {
    page_bytes.max(1)
}

/// Decodes a row selected with [`event_columns!`] and upcasts it with
/// `upcasters` (the store handle's, [`crate::PgEventStore::upcasters`];
/// `None` reads it as stored). Every read of events goes through here, so
/// that no read path can forget the upcasters. A row that does not decode
/// is an error naming its position. `last_stream` is the stream of the
/// previous row (or the stream being read): when the row has the same name
/// it is reused instead of parsed and validated again.
pub(crate) fn decode_event(
    row: &Row,
    last_stream: &mut Option<StreamId>,
    upcasters: Option<&Upcasters>,
) -> Result<RecordedEvent> {
    let tx: i64 = row
        .try_get(0)
        .context("cannot decode an event's position")?;
    let seq: i64 = row
        .try_get(1)
        .context("cannot decode an event's position")?;
    let global_position = position(tx, seq)?;
    let what = |field: &str| format!("cannot decode the {field} of the event at {global_position}");
    let event_id: uuid::Uuid = row.try_get(2).map_err(|e| backend(what("id"), e))?;
    let stream: &str = row.try_get(3).map_err(|e| backend(what("stream id"), e))?;
    let stream_id = match last_stream {
        Some(last) if last.as_str() == stream => last.clone(),
        _ => {
            let parsed = StreamId::parse(stream).map_err(|e| backend(what("stream id"), e))?;
            *last_stream = Some(parsed.clone());
            parsed
        }
    };
    let version: i64 = row.try_get(4).map_err(|e| backend(what("version"), e))?;
    let stream_version = u64::try_from(version)
        .map(StreamVersion)
        .map_err(|_| backend_msg(what("version")))?;
    let event_type: String = row.try_get(5).map_err(|e| backend(what("type"), e))?;
    let event_version: i32 = row
        .try_get(6)
        .map_err(|e| backend(what("type version"), e))?;
    let event_version =
        u32::try_from(event_version).map_err(|_| backend_msg(what("type version")))?;
    // Validated and kept as JSON text: typed decoding parses it once, later.
    let Json(data): Json<Box<serde_json::value::RawValue>> =
        row.try_get(7).map_err(|e| backend(what("data"), e))?;
    let data = Payload::from(data);
    // Straight from the JSONB bytes into the typed metadata, no value tree.
    let Json(metadata): Json<Metadata> =
        row.try_get(8).map_err(|e| backend(what("metadata"), e))?;
    let recorded_at = row
        .try_get(9)
        .map_err(|e| backend(what("recording time"), e))?;
    let event = RecordedEvent {
        event_id: EventId(event_id),
        stream_id,
        stream_version,
        global_position,
        event_type,
        event_version,
        data,
        metadata,
        recorded_at,
        stored_event_version: None,
        stored_event_type: None,
    };
    annals::upcast_event(upcasters, event)
}

/// A lazy stream of pages. `next(cursor)` fetches one page and returns its
/// items and the cursor of the next page (`None`: this was the last).
pub(crate) fn paged<C, T, F, Fut>(cursor: C, mut next: F) -> BoxStream<'static, Result<T>>
where
    C: Send + 'static,
    T: Send + 'static,
    F: FnMut(C) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(Vec<T>, Option<C>)>> + Send + 'static,
{
    stream::try_unfold(Some(cursor), move |cursor| {
        let page = cursor.map(&mut next);
        async move {
            let Some(page) = page else {
                return Ok(None);
            };
            let (items, next_cursor) = page.await?;
            if items.is_empty() {
                return Ok(None);
            }
            Ok(Some((items, next_cursor)))
        }
    })
    .map_ok(|items| stream::iter(items.into_iter().map(Ok)))
    .try_flatten()
    .boxed()
}

/// A stream that fails at once (for bad read options).
pub(crate) fn failed<T: Send + 'static>(err: annals::Error) -> BoxStream<'static, Result<T>> {
    stream::once(async move { Err(err) }).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_grow_to_sixteen_batches() {
        let mut p = PageRows::new(500);
        let mut seen = Vec::new();
        for _ in 0..7 {
            seen.push(p.rows());
            p = p.next(p.rows() as usize, false);
        }
        assert_eq!(seen, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
    }

    #[test]
    fn a_page_cut_by_bytes_resizes_the_next() {
        let p = PageRows::new(500).next(500, false).next(500, false);
        assert_eq!(p.rows(), 2000);
        // 3 large events filled the budget: the next page asks for 6.
        let cut = p.next(3, true);
        assert_eq!(cut.rows(), 6);
        // A single event larger than the budget: still at least 2 rows.
        assert_eq!(cut.next(1, true).rows(), 2);
        // Small events again: the pages grow back.
        assert_eq!(cut.next(6, false).rows(), 12);
        assert_eq!(PageRows::new(1).next(0, true).rows(), 1);
    }

    #[test]
    fn a_limited_read_asks_for_its_limit_at_once() {
        assert_eq!(PageRows::for_limit(500, 1000).rows(), 1000);
        assert_eq!(PageRows::for_limit(500, 100).rows(), 500);
        assert_eq!(PageRows::for_limit(500, 8000).rows(), 8000);
        // A longer or unlimited read starts small, as any other.
        assert_eq!(PageRows::for_limit(500, 8001).rows(), 500);
        assert_eq!(PageRows::for_limit(500, u64::MAX).rows(), 500);
        // Later pages grow from there, up to the same bound.
        assert_eq!(
            PageRows::for_limit(500, 6000).next(6000, false).rows(),
            8000
        );
    }

    #[test]
    fn a_budget_is_at_least_one_byte() {
        assert_eq!(budget(0), 1);
        assert_eq!(budget(8 << 20), 8 << 20);
    }
}
