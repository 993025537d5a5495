//! Row decoding and lazy, keyset-paginated reads.
//!
//! Every read is a stream of pages: each page is one query for at most
//! `batch_size` rows after the last key seen, on a connection taken from the
//! pool for that query only. A reader that stops early leaves nothing open,
//! and a long read never pins a connection or a snapshot.

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

/// How many rows page number `page` (0-based) of a read fetches: the batch
/// size, doubling per page up to [`MAX_BATCH_GROWTH`] times it, so a short
/// read costs one small query and a long replay few round trips, while every
/// page stays bounded.
pub(crate) fn page_size(batch_size: usize, page: u32) -> u64 {
    (batch_size as u64).saturating_mul(1 << page.min(MAX_BATCH_GROWTH.trailing_zeros()))
}

/// Upper bound of a page, as a multiple of the batch size.
pub(crate) const MAX_BATCH_GROWTH: u32 = 16;

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
