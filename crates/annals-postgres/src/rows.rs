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
//! (`PgOptions::page_bytes`, see [`byte_bounded!`]), so that a replay of
//! large events holds a few of them at a time, not a batch of them.

use std::future::Future;

use annals::{
    EventId, GlobalPosition, Metadata, Payload, RecordedEvent, Result, StreamId, StreamVersion,
};
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use tokio_postgres::types::Json;
use tokio_postgres::Row;

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

/// The bytes of the `events` row aliased `$alias` that count against a
/// page's byte budget: the sizes of `data` and `metadata`.
///
/// Measured without reading the values where possible: for a value stored
/// uncompressed, its stored size (`pg_column_size`, which does not detoast;
/// the binary `jsonb` is close to its JSON text); for a compressed one,
/// whose stored size can be a small fraction of what the client receives,
/// the length of its JSON text. (`pg_column_compression` needs PostgreSQL
/// 14.)
macro_rules! event_bytes {
    ($alias:literal) => {
        concat!(
            "(CASE WHEN pg_column_compression(",
            $alias,
            ".data) IS NULL THEN pg_column_size(",
            $alias,
            ".data) ELSE octet_length(",
            $alias,
            ".data::text) END + CASE WHEN pg_column_compression(",
            $alias,
            ".metadata) IS NULL THEN pg_column_size(",
            $alias,
            ".metadata) ELSE octet_length(",
            $alias,
            ".metadata::text) END)"
        )
    };
}
pub(crate) use event_bytes;

/// A page query bounded in bytes as well as rows.
///
/// `inner` selects the candidate rows in page order with their
/// [`event_bytes!`] as `bytes`, limited to the page's rows (the size is
/// computed in the query that has the `LIMIT`, so once per row). The page
/// keeps the rows whose preceding rows hold less than `budget` bytes: it
/// ends with the row that reaches the budget, and a row larger than the
/// budget comes alone. `window` and `order` are the page order over the
/// aliases `p` and `e`. The columns are [`event_columns!`] and then the
/// running total ([`RUN_COLUMN`]), which tells whether the budget cut the
/// page ([`cut_by_bytes`]).
macro_rules! byte_bounded {
    (inner: $inner:expr, window: $window:literal, order: $order:literal, budget: $budget:literal) => {
        concat!(
            "SELECT ",
            event_columns!(),
            ", e.run FROM (SELECT p.*, sum(p.bytes) OVER (ORDER BY ",
            $window,
            " ROWS UNBOUNDED PRECEDING) AS run FROM (",
            $inner,
            ") p) e WHERE e.run - e.bytes < ",
            $budget,
            " ORDER BY ",
            $order
        )
    };
}
pub(crate) use byte_bounded;

/// The column of a [`byte_bounded!`] page holding the running byte total.
pub(crate) const RUN_COLUMN: usize = 10;

/// Whether a [`byte_bounded!`] page stopped at its byte budget rather than
/// at its row limit or the end of the data: its last row reached the
/// budget. (When the data ended right there as well, the next page is
/// empty.)
pub(crate) fn cut_by_bytes(rows: &[Row], budget: i64) -> Result<bool> {
    match rows.last() {
        None => Ok(false),
        Some(row) => {
            let run: i64 = row
                .try_get(RUN_COLUMN)
                .context("cannot decode a page's byte count")?;
            Ok(run >= budget)
        }
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

/// A byte budget as a SQL `bigint`.
pub(crate) fn budget(page_bytes: usize) -> i64 {
    to_i64(page_bytes as u64).max(1)
}

/// Decodes a row selected with [`event_columns!`]. A row that does not
/// decode is an error naming its position. `last_stream` is the stream of
/// the previous row (or the stream being read): when the row has the same
/// name it is reused instead of parsed and validated again.
pub(crate) fn decode_event(row: &Row, last_stream: &mut Option<StreamId>) -> Result<RecordedEvent> {
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
    Ok(RecordedEvent {
        event_id: EventId(event_id),
        stream_id,
        stream_version,
        global_position,
        event_type,
        event_version,
        data,
        metadata,
        recorded_at,
    })
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
    fn page_queries_are_bounded_in_bytes() {
        let sql = byte_bounded!(
            inner: "SELECT i.* FROM events i",
            window: "p.seq",
            order: "e.seq",
            budget: "$1"
        );
        assert!(sql.contains("sum(p.bytes) OVER (ORDER BY p.seq ROWS UNBOUNDED PRECEDING)"));
        assert!(sql.ends_with("WHERE e.run - e.bytes < $1 ORDER BY e.seq"));
        assert!(event_bytes!("i").contains("pg_column_size(i.data)"));
        assert_eq!(budget(0), 1);
    }
}
