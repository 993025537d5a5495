//! Rows to values and back.
//!
//! A row that does not decode (JSON that does not parse, a stream name that
//! does not validate, a number out of range) is an [`annals::Error::Backend`]
//! naming the row, never a panic: the file may have been edited by hand or
//! written by another tool.

use std::ops::Range;
use std::sync::Arc;

use annals::{
    EventId, GlobalPosition, Metadata, Payload, RecordedEvent, Result, Snapshot, StreamId,
    StreamVersion, Upcasters,
};
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use rusqlite::types::ValueRef;
use rusqlite::Row;
use uuid::Uuid;

use crate::error::{corrupt, db, BACKEND};

/// The columns [`RawEvents::collect`] reads, in order.
macro_rules! event_columns {
    () => {
        "position, event_id, stream_id, stream_version, event_type, event_version, data, metadata, recorded_at"
    };
}
pub(crate) use event_columns;

/// The columns [`decode_snapshot`] reads, in order.
macro_rules! snapshot_columns {
    () => {
        "aggregate_type, aggregate_id, version, schema_version, state, created_at"
    };
}
pub(crate) use snapshot_columns;

/// Microseconds since the epoch: the stored form of every timestamp.
pub(crate) fn to_micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// Now, in what the store keeps: rounded up to the microsecond, so that the
/// stored instant is never earlier than the moment of the write (a caller
/// that took `Utc::now()` before appending never sees an earlier
/// `recorded_at`).
pub(crate) fn now_micros() -> i64 {
    let now = Utc::now();
    let micros = to_micros(now);
    if now.timestamp_subsec_nanos() % 1_000 == 0 {
        micros
    } else {
        micros.saturating_add(1)
    }
}

pub(crate) fn from_micros(micros: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
}

/// [`from_micros`] for a run of timestamps, most of them on the same day
/// (a page of events): the calendar date is computed once per day rather
/// than once per timestamp, where it is most of the cost.
#[derive(Default)]
pub(crate) struct Dates {
    /// The last day seen (days since the epoch) and its date.
    last: Option<(i64, NaiveDate)>,
}

impl Dates {
    /// Exactly [`from_micros`]`(micros)`.
    pub(crate) fn at(&mut self, micros: i64) -> Option<DateTime<Utc>> {
        const DAY: i64 = 86_400;
        let secs = micros.div_euclid(1_000_000);
        let day = secs.div_euclid(DAY);
        match self.last {
            Some((last, date)) if last == day => {
                // Both below their bounds: `rem_euclid` of positive moduli.
                let second = u32::try_from(secs.rem_euclid(DAY)).ok()?;
                let nano = u32::try_from(micros.rem_euclid(1_000_000) * 1_000).ok()?;
                let time = NaiveTime::from_num_seconds_from_midnight_opt(second, nano)?;
                Some(NaiveDateTime::new(date, time).and_utc())
            }
            _ => {
                let at = from_micros(micros)?;
                self.last = Some((day, at.date_naive()));
                Some(at)
            }
        }
    }
}

/// A stream version or count for SQL (SQLite integers are `i64`); values
/// beyond `i64::MAX` saturate, which is right for every bound we bind.
pub(crate) fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A corrupt-row error without a source.
pub(crate) fn corrupt_row(message: String) -> annals::Error {
    annals::Error::Backend {
        backend: BACKEND,
        message,
        source: None,
    }
}

/// Rows after which [`RawEvents::collect`] sizes a page's buffers for the
/// rest of it.
const SIZING_ROWS: usize = 32;

/// The most rows [`RawEvents::collect`] reserves room for at once (a
/// larger `batch_size` grows from there).
const MAX_RESERVED_ROWS: usize = 4096;

/// One page of event rows as the reader thread hands it over: the text
/// columns packed into one buffer, the fixed-size ones checked and copied.
///
/// JSON and stream names are decoded on the consuming side, as the stream is
/// polled ([`EventRows`]). That keeps the reader thread's work per row to
/// stepping SQLite and one copy, so it can fetch the next page while the
/// caller decodes this one, and every allocation of a [`RecordedEvent`] is
/// made and freed on the same thread.
pub(crate) struct RawEvents {
    /// UTF-8: [`RawEvents::collect`] checks it once for the whole page
    /// rather than once per column.
    text: String,
    rows: Vec<RawEvent>,
    /// Why the page stopped early (a row with a column of the wrong type).
    error: Option<annals::Error>,
    /// The page stopped at its byte budget: rows may be left.
    at_budget: bool,
}

struct RawEvent {
    position: i64,
    event_id: Uuid,
    stream_id: Range<usize>,
    stream_version: u64,
    event_type: Range<usize>,
    event_version: u32,
    data: Range<usize>,
    metadata: Range<usize>,
    recorded_at: i64,
}

impl RawEvents {
    /// Reads rows of [`event_columns!`], at most `max` of them, and no more
    /// once their text columns hold `max_bytes` (a page always has at least
    /// one row, however large). A row whose columns have the wrong type ends
    /// the page (the rows before it are kept); a driver error fails the
    /// whole page.
    pub(crate) fn collect(
        rows: &mut rusqlite::Rows<'_>,
        max: usize,
        max_bytes: usize,
        context: &'static str,
    ) -> Result<Self> {
        // Sized for a short stream; a long page is sized again once it
        // has `SIZING_ROWS` rows.
        let mut text: Vec<u8> = Vec::with_capacity(max.min(SIZING_ROWS + 1) * 128);
        let mut raws: Vec<RawEvent> = Vec::with_capacity(max.min(SIZING_ROWS + 1));
        let mut error = None;
        let mut at_budget = false;
        while raws.len() < max {
            if text.len() >= max_bytes {
                at_budget = true;
                break;
            }
            let Some(row) = rows.next().map_err(db(context))? else {
                break;
            };
            if raws.len() == SIZING_ROWS {
                // A long page: size both buffers for the rest of it now,
                // from the rows so far, instead of doubling them a few
                // times (each doubling copies the page so far).
                let left = max - SIZING_ROWS;
                let per_row = text.len() / SIZING_ROWS + 1;
                raws.reserve(left.min(MAX_RESERVED_ROWS));
                text.reserve(per_row.saturating_mul(left).min(max_bytes));
            }
            let start = text.len();
            match push(&mut text, row) {
                Ok(raw) => raws.push(raw),
                Err(e) => {
                    // Nothing of the bad row stays in the buffer.
                    text.truncate(start);
                    error = Some(e);
                    break;
                }
            }
        }
        // SQLite hands text columns over as stored, without checking their
        // encoding: one check for the whole page. A row with bad text ends
        // the page there, like any other undecodable row.
        let text = match String::from_utf8(text) {
            Ok(text) => text,
            Err(e) => {
                let at = e.utf8_error().valid_up_to();
                let mut text = e.into_bytes();
                if let Some(bad) = raws.iter().position(|r| r.metadata.end > at) {
                    let raw = &raws[bad];
                    error = Some(corrupt_row(format!(
                        "event at position {}: {} is not valid UTF-8 text",
                        raw.position,
                        raw.column_at(at)
                    )));
                    text.truncate(raw.stream_id.start);
                    raws.truncate(bad);
                }
                // What is left ends before the first invalid byte.
                String::from_utf8(text)
                    .map_err(|e| corrupt(format!("{context}: a page's text is not UTF-8"), e))?
            }
        };
        Ok(RawEvents {
            text,
            rows: raws,
            error,
            at_budget,
        })
    }

    /// A page without rows: a read that has nothing to return.
    pub(crate) fn empty() -> Self {
        RawEvents {
            text: String::new(),
            rows: Vec::new(),
            error: None,
            at_budget: false,
        }
    }

    /// Rows read (not counting a row that ended the page early).
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the page ended without a bad row.
    pub(crate) fn is_complete(&self) -> bool {
        self.error.is_none()
    }

    /// Whether the page stopped at its byte budget (not at `max` rows, nor
    /// at the end of the rows): the next page may have more.
    pub(crate) fn is_at_budget(&self) -> bool {
        self.at_budget
    }

    /// The last row's `(position, stream_version)`: the keyset cursors.
    pub(crate) fn last_keys(&self) -> Option<(i64, u64)> {
        self.rows.last().map(|r| (r.position, r.stream_version))
    }
}

impl RawEvent {
    /// The name of the text column holding byte `at` of the page buffer
    /// (one of this row's).
    fn column_at(&self, at: usize) -> &'static str {
        [
            (&self.stream_id, "stream_id"),
            (&self.event_type, "event_type"),
            (&self.data, "data"),
        ]
        .into_iter()
        .find(|(r, _)| at < r.end)
        .map_or("metadata", |(_, name)| name)
    }
}

/// Reads one row of [`event_columns!`], appending its text columns to
/// `text` as they are stored (the page checks them as UTF-8 once, at its
/// end).
fn push(text: &mut Vec<u8>, row: &Row<'_>) -> Result<RawEvent> {
    let position: i64 = row
        .get(0)
        .map_err(|e| corrupt("event row without an integer position".into(), e))?;
    let bad = |what: &str| format!("event at position {position}: {what}");
    let value = |i: usize| {
        row.get_ref(i)
            .map_err(|e| corrupt(bad("missing column"), e))
    };
    let int = |i: usize, name: &str| match value(i)? {
        ValueRef::Integer(v) => Ok(v),
        _ => Err(corrupt_row(bad(&format!("{name} is not an integer")))),
    };
    let mut column = |i: usize, name: &str| -> Result<Range<usize>> {
        let ValueRef::Text(s) = value(i)? else {
            return Err(corrupt_row(bad(&format!("{name} is not text"))));
        };
        let start = text.len();
        text.extend_from_slice(s);
        Ok(start..text.len())
    };
    let event_id = match value(1)? {
        ValueRef::Blob(b) => {
            Uuid::from_slice(b).map_err(|e| corrupt(bad("invalid event_id"), e))?
        }
        ValueRef::Text(t) => {
            Uuid::try_parse_ascii(t).map_err(|e| corrupt(bad("invalid event_id"), e))?
        }
        _ => return Err(corrupt_row(bad("event_id is neither a blob nor text"))),
    };
    let stream_id = column(2, "stream_id")?;
    let event_type = column(4, "event_type")?;
    let data = column(6, "data")?;
    let metadata = column(7, "metadata")?;
    let stream_version = u64::try_from(int(3, "stream_version")?)
        .map_err(|e| corrupt(bad("negative stream_version"), e))?;
    let event_version = u32::try_from(int(5, "event_version")?)
        .map_err(|e| corrupt(bad("event_version out of range"), e))?;
    Ok(RawEvent {
        position,
        event_id,
        stream_id,
        stream_version,
        event_type,
        event_version,
        data,
        metadata,
        recorded_at: int(8, "recorded_at")?,
    })
}

/// Decodes a [`RawEvents`] page row by row as it is iterated, reusing the last
/// stream name (pages of one stream, and runs of one stream in the global
/// order, validate it once), and upcasting each event with the store
/// handle's registry. Ends with the page's error, if it had one.
pub(crate) struct EventRows {
    /// The page's text, shared by the payloads of its events (zero-copy:
    /// an event at its current version carries a slice of this buffer).
    text: Arc<String>,
    rows: std::vec::IntoIter<RawEvent>,
    error: Option<annals::Error>,
    last_stream: Option<StreamId>,
    dates: Dates,
    upcasters: Option<Arc<Upcasters>>,
    /// `annals_events_read_total`, counted as events are yielded.
    read: Option<metrics::Counter>,
}

impl RawEvents {
    /// The page's events, decoded as they are iterated and upcast by
    /// `upcasters` (the store handle's, [`crate::SqliteEventStore::upcasters`];
    /// `None` reads them as stored). This is the only way from rows to
    /// [`RecordedEvent`]s, so that no read path can forget the upcasters:
    /// there is deliberately no `IntoIterator` for a page.
    pub(crate) fn decode(self, upcasters: Option<Arc<Upcasters>>) -> EventRows {
        EventRows {
            text: Arc::new(self.text),
            rows: self.rows.into_iter(),
            error: self.error,
            last_stream: None,
            dates: Dates::default(),
            upcasters,
            read: None,
        }
    }
}

impl EventRows {
    /// Counts each event yielded on `counter` (the read metric), here
    /// rather than in a wrapper stream that would move every event once
    /// more.
    pub(crate) fn counting(mut self, counter: metrics::Counter) -> Self {
        self.read = Some(counter);
        self
    }
}

impl Iterator for EventRows {
    type Item = Result<RecordedEvent>;

    fn next(&mut self) -> Option<Self::Item> {
        let Some(raw) = self.rows.next() else {
            return self.error.take().map(Err);
        };
        let event = decode_event(&self.text, &raw, &mut self.last_stream, &mut self.dates);
        let event = match &self.upcasters {
            None => event,
            Some(u) => event.and_then(|e| u.apply(e)),
        };
        if let (Ok(_), Some(counter)) = (&event, &self.read) {
            counter.increment(1);
        }
        Some(event)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.rows.len() + usize::from(self.error.is_some());
        (n, Some(n))
    }
}

fn decode_event(
    text: &Arc<String>,
    raw: &RawEvent,
    last_stream: &mut Option<StreamId>,
    dates: &mut Dates,
) -> Result<RecordedEvent> {
    let bad = |what: &str| format!("event at position {}: {what}", raw.position);
    // The ranges were cut at the ends of whole strings pushed into `text`.
    let slice = |r: &Range<usize>| {
        text.get(r.clone())
            .ok_or_else(|| corrupt_row(bad("column out of its page buffer")))
    };
    let stream_text = slice(&raw.stream_id)?;
    let stream_id = match last_stream {
        Some(s) if s.as_str() == stream_text => s.clone(),
        _ => {
            let s =
                StreamId::parse(stream_text).map_err(|e| corrupt(bad("invalid stream_id"), e))?;
            *last_stream = Some(s.clone());
            s
        }
    };
    // Validated and kept as a slice of the page's text, not copied: typed
    // decoding parses it once, later. An upcaster that changes the payload
    // gives the event text of its own.
    let data = Payload::from_shared_json(Arc::clone(text), raw.data.clone())
        .map_err(|e| corrupt(bad("data is not valid JSON"), e))?;
    let metadata = decode_metadata(slice(&raw.metadata)?)
        .map_err(|e| corrupt(bad("metadata is not a valid JSON object"), e))?;
    let recorded_at = dates
        .at(raw.recorded_at)
        .ok_or_else(|| corrupt_row(bad("recorded_at out of range")))?;
    Ok(RecordedEvent {
        event_id: EventId(raw.event_id),
        stream_id,
        stream_version: StreamVersion(raw.stream_version),
        global_position: GlobalPosition::from_seq(raw.position as u64),
        event_type: slice(&raw.event_type)?.to_owned(),
        event_version: raw.event_version,
        data,
        metadata,
        recorded_at,
        stored_event_version: None,
        stored_event_type: None,
    })
}

fn decode_metadata(text: &str) -> serde_json::Result<Metadata> {
    // Most events carry no metadata; skip serde's flatten machinery for them.
    if text == "{}" {
        return Ok(Metadata::default());
    }
    serde_json::from_str(text)
}

/// Decodes a row of [`snapshot_columns!`] (from `snapshots` or
/// `snapshot_staging`, named by `table`).
pub(crate) fn decode_snapshot(table: &str, row: &Row<'_>) -> Result<Snapshot> {
    let aggregate_type: String = row
        .get(0)
        .map_err(|e| corrupt(format!("{table} row: aggregate_type is not text"), e))?;
    let aggregate_id: String = row
        .get(1)
        .map_err(|e| corrupt(format!("{table} row: aggregate_id is not text"), e))?;
    let bad = |what: &str| format!("{table} row {aggregate_type}/{aggregate_id}: {what}");
    let version: i64 = row
        .get(2)
        .map_err(|e| corrupt(bad("version is not an integer"), e))?;
    let version = u64::try_from(version).map_err(|e| corrupt(bad("negative version"), e))?;
    let schema_version: i64 = row
        .get(3)
        .map_err(|e| corrupt(bad("schema_version is not an integer"), e))?;
    let schema_version = u32::try_from(schema_version)
        .map_err(|e| corrupt(bad("schema_version out of range"), e))?;
    let state = row
        .get_ref(4)
        .and_then(|v| v.as_str().map_err(Into::into))
        .map_err(|e| corrupt(bad("state is not text"), e))?;
    let state =
        serde_json::from_str(state).map_err(|e| corrupt(bad("state is not valid JSON"), e))?;
    let created_at: i64 = row
        .get(5)
        .map_err(|e| corrupt(bad("created_at is not an integer"), e))?;
    let created_at =
        from_micros(created_at).ok_or_else(|| corrupt_row(bad("created_at out of range")))?;
    Ok(Snapshot {
        aggregate_type,
        aggregate_id,
        version: StreamVersion(version),
        schema_version,
        state,
        created_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run of timestamps read through one [`Dates`] gives exactly what
    /// [`from_micros`] gives each: within a day, across midnight (both
    /// ways), before the epoch, and out of chrono's range.
    #[test]
    fn dates_of_a_run_equal_their_one_by_one_conversion() {
        const DAY: i64 = 86_400_000_000;
        let mut runs: Vec<Vec<i64>> = vec![
            (0..2_000)
                .map(|k| 1_764_806_400_000_000 + k * 997_003)
                .collect(),
            (-1_000..1_000).map(|k| k * 43_200_001).collect(),
            (0..500).map(|k| DAY * 20_000 - 1_000 + k * 3).collect(),
            (0..500)
                .rev()
                .map(|k| DAY * 20_000 - 1_000 + k * 3)
                .collect(),
            vec![
                i64::MIN,
                -1,
                0,
                1,
                i64::MAX,
                DAY - 1,
                DAY,
                -DAY,
                -DAY - 1,
                0,
            ],
        ];
        let mut spread = 0x2545_f491_4f6c_dd1d_u64;
        runs.push(
            (0..2_000)
                .map(|_| {
                    spread ^= spread << 13;
                    spread ^= spread >> 7;
                    spread ^= spread << 17;
                    (spread % (400 * 365 * DAY as u64)) as i64 - 200 * 365 * DAY
                })
                .collect(),
        );
        for run in runs {
            let mut dates = Dates::default();
            for micros in run {
                assert_eq!(dates.at(micros), from_micros(micros), "{micros}");
            }
        }
    }
}
