//! Multi-stream atomic appends: [`MultiStreamAppend`], its input
//! [`StreamBatch`], and the shared steps every backend's `append_many` runs
//! ([`prepare_many`], [`check_retry_many`]).
//!
//! Why an opt-in trait and not a method of [`EventStore`]: an atomic write
//! across streams needs one transaction over all of them. The SQL backends
//! and the in-memory store have that, but a backend built on a replicated log
//! that is partitioned by stream may not, and it should still be a complete
//! [`EventStore`]. Code that needs the guarantee says so in its bounds
//! (`S: MultiStreamAppend`), and fails to compile against a store without it
//! rather than losing atomicity at run time.
//!
//! Each stream's events go through [`prepare_batch`] and each stream's
//! idempotency check through [`check_retry`](crate::check_retry), exactly as
//! for [`EventStore::append`]; this module only adds what is about several
//! streams: the same stream twice or the same event id in two batches is
//! refused, and a retry is recognised only when every stream is one.

use std::collections::HashMap;
use std::future::Future;

use crate::idempotency::{prepare_batch, PreparedEvent};
use crate::{AppendResult, Error, EventStore, ExpectedVersion, NewEvent, Result, StreamId};

/// The events for one stream of an [`append_many`](MultiStreamAppend::append_many),
/// with the version that stream is expected to be at.
#[derive(Clone, Debug)]
pub struct StreamBatch {
    /// The stream.
    pub stream: StreamId,
    /// What its head must satisfy.
    pub expected: ExpectedVersion,
    /// Its events, in order (at least one).
    pub events: Vec<NewEvent>,
}

impl StreamBatch {
    /// The events `events` for `stream`, expected at `expected`.
    pub fn new(stream: StreamId, expected: ExpectedVersion, events: Vec<NewEvent>) -> Self {
        StreamBatch {
            stream,
            expected,
            events,
        }
    }
}

/// A [`StreamBatch`] after [`prepare_many`]: its events as the backend
/// stores them.
#[derive(Clone, PartialEq, Debug)]
pub struct PreparedStreamBatch {
    /// The stream.
    pub stream: StreamId,
    /// What its head must satisfy.
    pub expected: ExpectedVersion,
    /// Its events, as [`prepare_batch`] made them.
    pub events: Vec<PreparedEvent>,
}

/// Appending to several streams in one atomic write.
///
/// Optional, because it needs one transaction across streams, which a
/// backend built on a log partitioned by stream may not offer; code that
/// needs the guarantee says so in its bounds (`S: MultiStreamAppend`). The
/// SQLite, PostgreSQL and in-memory stores implement it.
pub trait MultiStreamAppend: EventStore {
    /// Appends each batch to its stream if every stream's head satisfies its
    /// batch's `expected`; returns one [`AppendResult`] per batch, in the
    /// order of `batches`.
    ///
    /// Contract:
    /// - All or nothing: every batch is durable when this returns `Ok`; when
    ///   it returns `Err`, no event of any batch is stored.
    /// - Each batch is validated and stored as [`EventStore::append`] does
    ///   ([`prepare_batch`]), so an invalid event anywhere fails the whole
    ///   call with [`Error::InvalidEvent`]. A stream that appears in two
    ///   batches, or an event id that appears in two batches, is
    ///   [`Error::InvalidEvent`] too (put a stream's events in one batch).
    /// - A head that does not satisfy its `expected` is
    ///   [`Error::WrongExpectedVersion`] naming that stream (the first such
    ///   in the order of `batches`) and its actual head; nothing is written.
    /// - Idempotent: when every batch is a retry of a stored batch (the test
    ///   of [`EventStore::append`], by [`check_retry`](crate::check_retry)),
    ///   this is a no-op that returns the original results, each with
    ///   `deduplicated: true`, whatever `expected` says. When some batches are
    ///   stored and others not, it is [`Error::DuplicateEventId`] naming the
    ///   first stored batch's stream: a retried `append_many` is all stored
    ///   or not at all, so this is a reuse of ids, not a retry.
    /// - Versions and positions are assigned as [`EventStore::append`]
    ///   assigns them, per stream; across the call, positions increase in
    ///   the order of `batches`. The same caveats on positions apply.
    /// - No deadlock: overlapping calls from many tasks wait for each other
    ///   instead of deadlocking, whatever the order of `batches`. A backend
    ///   that locks streams one at a time takes them in one fixed order
    ///   (PostgreSQL: increasing advisory-lock key); SQLite and the
    ///   in-memory store take one lock for the whole call.
    ///
    /// An empty `batches` writes nothing and returns an empty list.
    fn append_many(
        &self,
        batches: Vec<StreamBatch>,
    ) -> impl Future<Output = Result<Vec<AppendResult>>> + Send;
}

/// Validates and prepares the batches of an `append_many`: each one with
/// [`prepare_batch`] (the path of every append), then refuses a stream that
/// appears twice and an event id that appears in two batches. Every backend's
/// `append_many` starts here.
pub fn prepare_many(batches: Vec<StreamBatch>) -> Result<Vec<PreparedStreamBatch>> {
    let mut streams = HashMap::with_capacity(batches.len());
    let mut ids = HashMap::new();
    let mut out = Vec::with_capacity(batches.len());
    for (i, b) in batches.into_iter().enumerate() {
        if streams.insert(b.stream.clone(), i).is_some() {
            return Err(Error::InvalidEvent {
                stream: b.stream,
                reason: "the stream appears in two batches of one append_many; \
                         put all of its events in one batch"
                    .into(),
            });
        }
        let events = prepare_batch(&b.stream, b.events)?;
        for e in &events {
            if let Some(other) = ids.insert(e.event_id, b.stream.clone()) {
                return Err(Error::InvalidEvent {
                    stream: b.stream,
                    reason: format!(
                        "event id {} also appears in the batch for {other}",
                        e.event_id
                    ),
                });
            }
        }
        out.push(PreparedStreamBatch {
            stream: b.stream,
            expected: b.expected,
            events,
        });
    }
    Ok(out)
}

/// The idempotency decision of an `append_many`, from each batch's own
/// [`check_retry`](crate::check_retry) answer (`retries[i]` for
/// `batches[i]`): `Ok(None)` when no batch is stored (write them all), the
/// original results when every one is, and [`Error::DuplicateEventId`]
/// naming the first stored batch's first event and stream when only some
/// are.
pub fn check_retry_many(
    batches: &[PreparedStreamBatch],
    retries: Vec<Option<AppendResult>>,
) -> Result<Option<Vec<AppendResult>>> {
    let Some(first) = retries.iter().position(Option::is_some) else {
        return Ok(None);
    };
    if retries.iter().all(Option::is_some) && retries.len() == batches.len() {
        return Ok(Some(retries.into_iter().flatten().collect()));
    }
    let b = &batches[first];
    match b.events.first() {
        Some(e) => Err(Error::DuplicateEventId {
            event_id: e.event_id,
            stream: b.stream.clone(),
        }),
        // `prepare_batch` refuses empty batches, so this is not reached.
        None => Err(Error::InvalidEvent {
            stream: b.stream.clone(),
            reason: "empty batch".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GlobalPosition, StreamVersion};
    use serde_json::json;

    fn batch(stream: &str, ids: &[crate::EventId]) -> StreamBatch {
        StreamBatch::new(
            StreamId::parse(stream).expect("stream"),
            ExpectedVersion::Any,
            ids.iter()
                .map(|&id| NewEvent::new("E", json!({})).with_id(id))
                .collect(),
        )
    }

    #[test]
    fn a_stream_twice_or_an_id_twice_is_refused() {
        let (a, b) = (crate::EventId::new(), crate::EventId::new());
        let twice = prepare_many(vec![batch("A-1", &[a]), batch("A-1", &[b])]);
        assert!(
            matches!(&twice, Err(Error::InvalidEvent { stream, reason })
                if stream.as_str() == "A-1" && reason.contains("two batches")),
            "{twice:?}"
        );
        let shared = prepare_many(vec![batch("A-1", &[a]), batch("B-1", &[a])]);
        assert!(
            matches!(&shared, Err(Error::InvalidEvent { stream, reason })
                if stream.as_str() == "B-1" && reason.contains("A-1")),
            "{shared:?}"
        );
        let ok = prepare_many(vec![batch("B-1", &[a]), batch("A-1", &[b])]).expect("valid");
        let streams: Vec<&str> = ok.iter().map(|b| b.stream.as_str()).collect();
        assert_eq!(streams, ["B-1", "A-1"], "the caller's order is kept");
    }

    #[test]
    fn a_partial_retry_is_a_reused_id() {
        let (a, b) = (crate::EventId::new(), crate::EventId::new());
        let batches = prepare_many(vec![batch("A-1", &[a]), batch("B-1", &[b])]).expect("valid");
        let done = AppendResult {
            first_version: StreamVersion(1),
            last_version: StreamVersion(1),
            positions: vec![GlobalPosition::from_seq(1)],
            deduplicated: true,
        };
        assert_eq!(
            check_retry_many(&batches, vec![None, None]).expect("fresh"),
            None
        );
        assert_eq!(
            check_retry_many(&batches, vec![Some(done.clone()), Some(done.clone())])
                .expect("retry"),
            Some(vec![done.clone(), done.clone()])
        );
        match check_retry_many(&batches, vec![None, Some(done)]) {
            Err(Error::DuplicateEventId { event_id, stream }) => {
                assert_eq!((event_id, stream.as_str()), (b, "B-1"));
            }
            other => panic!("expected a duplicate id, got {other:?}"),
        }
    }
}
