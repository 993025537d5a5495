//! The [`EventStore`] trait: the contract every backend keeps; and
//! [`StreamCatalog`], the listing and counting a backend adds when it keeps an
//! index of its streams.
//!
//! Reads return lazy streams that fetch bounded batches, so a reader never
//! holds a whole stream or table in memory. The trait is small on purpose:
//! append, the two reads, the head of a stream and the head of the global
//! order, a lookup of one event by id, and helpers built on them. Everything a log-only backend (a
//! replicated log read forward) could not answer lives in an optional trait.

use std::future::Future;

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::TryStreamExt;
use serde::Serialize;
use uuid::Uuid;

use crate::{
    AppendResult, EventId, ExpectedVersion, GlobalPosition, NewEvent, RecordedEvent, Result,
    StreamId, StreamVersion,
};

/// A lazy, batched stream of recorded events.
pub type EventStream = BoxStream<'static, Result<RecordedEvent>>;

/// Default number of rows a backend fetches per round trip.
pub const DEFAULT_BATCH_SIZE: usize = 500;

/// Direction of a stream read.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Direction {
    /// Oldest first.
    #[default]
    Forward,
    /// Newest first.
    Backward,
}

/// Options of [`EventStore::read_stream`].
#[derive(Clone, PartialEq, Debug, Default)]
pub struct ReadStream {
    /// First version to return (inclusive). Forward default: 1; backward
    /// default: the head.
    pub from: Option<StreamVersion>,
    /// Direction.
    pub direction: Direction,
    /// At most this many events.
    pub limit: Option<u64>,
    /// Time travel by version: ignore events after this version.
    pub until_version: Option<StreamVersion>,
    /// Time travel by time: ignore events recorded after this instant.
    pub as_of: Option<DateTime<Utc>>,
}

impl ReadStream {
    /// The whole stream, oldest first.
    pub fn forward() -> Self {
        Self::default()
    }
    /// The whole stream, newest first.
    pub fn backward() -> Self {
        ReadStream {
            direction: Direction::Backward,
            ..Self::default()
        }
    }
    /// Start at `version` (inclusive).
    pub fn from(mut self, version: StreamVersion) -> Self {
        self.from = Some(version);
        self
    }
    /// Return at most `n` events.
    pub fn limit(mut self, n: u64) -> Self {
        self.limit = Some(n);
        self
    }
    /// The stream as of `version`.
    pub fn until_version(mut self, version: StreamVersion) -> Self {
        self.until_version = Some(version);
        self
    }
    /// The stream as of instant `t`.
    pub fn as_of(mut self, t: DateTime<Utc>) -> Self {
        self.as_of = Some(t);
        self
    }

    /// Whether an event passes the time-travel bounds (for backends that
    /// filter in code rather than in SQL).
    pub fn admits(&self, e: &RecordedEvent) -> bool {
        self.until_version.is_none_or(|v| e.stream_version <= v)
            && self.as_of.is_none_or(|t| e.recorded_at <= t)
    }
}

/// Options of [`EventStore::read_all`].
#[derive(Clone, PartialEq, Debug, Default)]
pub struct ReadAll {
    /// Return events strictly after this position (a checkpoint).
    pub after: GlobalPosition,
    /// At most this many events.
    pub limit: Option<u64>,
    /// Only these categories (empty: all).
    pub categories: Vec<String>,
    /// Only these event types (empty: all).
    pub event_types: Vec<String>,
    /// Only events recorded at or after this instant (`recorded_at`).
    ///
    /// A filter, not a starting point: `recorded_at` is stamped by the
    /// appending host's clock (SQLite, memory) or the server's (PostgreSQL)
    /// and need not grow along the global order (a clock stepped back, or on
    /// PostgreSQL a transaction that took its id early and committed late),
    /// so the read still walks the global order from `after` and skips the
    /// events outside the bounds.
    pub since: Option<DateTime<Utc>>,
    /// Only events recorded at or before this instant (`recorded_at`); a
    /// filter like [`since`](Self::since).
    pub until: Option<DateTime<Utc>>,
}

impl ReadAll {
    /// Everything from the start.
    pub fn from_start() -> Self {
        Self::default()
    }
    /// Everything strictly after `position`.
    pub fn after(position: GlobalPosition) -> Self {
        ReadAll {
            after: position,
            ..Self::default()
        }
    }
    /// At most `n` events.
    pub fn limit(mut self, n: u64) -> Self {
        self.limit = Some(n);
        self
    }
    /// Only events of these categories.
    pub fn categories<I: IntoIterator<Item = S>, S: Into<String>>(mut self, c: I) -> Self {
        self.categories = c.into_iter().map(Into::into).collect();
        self
    }
    /// Only events of these types.
    pub fn event_types<I: IntoIterator<Item = S>, S: Into<String>>(mut self, t: I) -> Self {
        self.event_types = t.into_iter().map(Into::into).collect();
        self
    }
    /// Only events recorded at or after `t`.
    pub fn since(mut self, t: DateTime<Utc>) -> Self {
        self.since = Some(t);
        self
    }
    /// Only events recorded at or before `t`.
    pub fn until(mut self, t: DateTime<Utc>) -> Self {
        self.until = Some(t);
        self
    }
    /// Whether an event passes the filters (for backends that filter in code).
    pub fn admits(&self, e: &RecordedEvent) -> bool {
        (self.categories.is_empty() || self.categories.iter().any(|c| c == e.stream_id.category()))
            && (self.event_types.is_empty() || self.event_types.contains(&e.event_type))
            && self.since.is_none_or(|t| e.recorded_at >= t)
            && self.until.is_none_or(|t| e.recorded_at <= t)
    }
}

/// One page of the global feed: what [`EventStore::read_feed_page`] returns.
#[derive(Clone, PartialEq, Debug)]
pub struct FeedPage {
    /// The matching events, in global order (at most the page's limit).
    pub events: Vec<RecordedEvent>,
    /// How far the read scanned: every event at or below this position that
    /// matches the filter is in `events` (or was before the page's `after`),
    /// even when none matched. Never past what is safe to deliver, so it is a
    /// valid checkpoint and the next page starts after it.
    pub scanned_to: GlobalPosition,
    /// Whether the page reached the end of what was readable when it was
    /// read (a subscription then waits for new appends instead of reading
    /// the next page at once).
    pub at_end: bool,
}

/// What [`EventStore::append_signal`] returns: a counter that the store
/// raises after every commit that wrote events. Only the change matters; a
/// receiver wakes with [`changed`](tokio::sync::watch::Receiver::changed)
/// and then reads the feed.
pub type AppendSignal = tokio::sync::watch::Receiver<u64>;

/// What [`EventStore::read_feed_pages`] returns: consecutive pages of the
/// global feed.
pub type FeedPages = BoxStream<'static, Result<FeedPage>>;

/// A stream and its head.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct StreamInfo {
    /// The stream.
    pub stream_id: StreamId,
    /// Its head version (its number of events).
    pub version: StreamVersion,
}

/// Counts for one category.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct CategoryStats {
    /// The category.
    pub category: String,
    /// Streams in it.
    pub streams: u64,
    /// Events in it.
    pub events: u64,
}

/// Count of one event type.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct EventTypeStats {
    /// The type name.
    pub event_type: String,
    /// Events of that type.
    pub events: u64,
}

/// What `annals stats` shows.
#[derive(Clone, PartialEq, Debug, Default, Serialize)]
pub struct StoreStats {
    /// Number of streams.
    pub streams: u64,
    /// Number of events.
    pub events: u64,
    /// Per category, sorted by name.
    pub categories: Vec<CategoryStats>,
    /// Per event type, sorted by name.
    pub event_types: Vec<EventTypeStats>,
    /// Earliest `recorded_at`.
    pub first_recorded_at: Option<DateTime<Utc>>,
    /// Latest `recorded_at`.
    pub last_recorded_at: Option<DateTime<Utc>>,
}

/// An append-only event store.
///
/// Implementations are cheap to clone (a handle on a shared pool or thread)
/// and safe to use from many tasks at once.
pub trait EventStore: Clone + Send + Sync + 'static {
    /// Appends `events` to `stream` if its head satisfies `expected`.
    ///
    /// Contract:
    /// - Atomic: all events are durable when this returns `Ok`, none are
    ///   stored when it returns `Err`.
    /// - Versions are assigned consecutively after the head, with no gaps.
    /// - A head that does not satisfy `expected` (including losing a race
    ///   with another writer) is [`Error::WrongExpectedVersion`](crate::Error::WrongExpectedVersion)
    ///   naming the actual head; nothing is written.
    /// - If every event id of the batch is already stored, in this stream, in
    ///   this order and with the same type, version and payload, this is a
    ///   no-op that returns the original assignment with `deduplicated: true`
    ///   (checked before `expected`, so a retried request succeeds). Any other
    ///   reuse of a stored id is [`Error::DuplicateEventId`](crate::Error::DuplicateEventId).
    ///   Payloads are compared by [`Fingerprint`](crate::Fingerprint), and the
    ///   decision is [`check_retry`](crate::check_retry) on every backend.
    /// - Payloads and metadata are stored as [`prepare_batch`](crate::prepare_batch)
    ///   makes them, so every backend reads back the same values. Numbers:
    ///   an integer reads back as the same integer, a float as the same `f64`
    ///   (still a float), except that `-0.0` reads back as `0.0`; the JSON
    ///   text may differ. JSON nested deeper than
    ///   [`MAX_JSON_DEPTH`](crate::MAX_JSON_DEPTH) is refused with
    ///   [`Error::InvalidEvent`](crate::Error::InvalidEvent), since no reader
    ///   could decode it.
    /// - Positions: each event gets a unique [`GlobalPosition`]; within the
    ///   batch they increase in batch order, and a stream's events have
    ///   increasing positions in version order. Positions may have gaps,
    ///   and they follow commit order only on some backends: SQLite and the
    ///   in-memory store assign them in commit order, PostgreSQL orders them
    ///   by the appending transaction's id (taken when the append starts
    ///   writing), so an append that commits later can get smaller
    ///   positions than one that committed before it. [`read_all`](Self::read_all)
    ///   makes up for that: a reader that has seen position `p` never later
    ///   sees an event at a position `<= p`.
    ///
    /// With the positions it returns, a caller may wait until a follower of
    /// `read_all` (or a checkpoint it saved) has reached the last of them:
    /// the follower has then delivered these events and every event with a
    /// smaller position (read-your-writes on the feed); and it may compare
    /// them with other positions of the same store. It may not start or
    /// resume a `read_all` after a returned position (on PostgreSQL, appends
    /// still in flight can commit later at smaller positions, and that
    /// reader would never see them: resume only from positions that
    /// `read_all` delivered); conclude from two returned positions which
    /// append committed first, or that every smaller position is already
    /// readable; count events by subtracting positions; or use the
    /// positions of one store (or PostgreSQL cluster) in another.
    fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> impl Future<Output = Result<AppendResult>> + Send;

    /// Reads one stream in version order (or reverse), lazily, in batches.
    /// A stream that does not exist yields nothing.
    fn read_stream(&self, stream: &StreamId, options: ReadStream) -> EventStream;

    /// Reads the whole store in global order, strictly after
    /// `options.after`, lazily, in batches.
    ///
    /// Contract: a reader that calls this repeatedly from its last seen
    /// position, while writers append concurrently, sees every committed event
    /// exactly once and each stream's events in version order. An event
    /// whose commit may still be preceded by an in-flight one is held back
    /// until it is safe to deliver.
    ///
    /// Global order is position order: commit order on SQLite and in
    /// memory, transaction-id order on PostgreSQL, where an event is held
    /// back until every transaction of the cluster with a smaller id has
    /// finished (so a long transaction anywhere in the cluster delays the
    /// feed, not the appends). A read may therefore end before events that
    /// are already committed; the next read from its last position
    /// delivers them. `options.after` must be [`GlobalPosition::START`], a
    /// position this method delivered, or a checkpoint saved from one; a
    /// position returned by [`append`](Self::append) is not a safe place to
    /// start (see there).
    fn read_all(&self, options: ReadAll) -> EventStream;

    /// The head version of a stream, `None` when it does not exist.
    fn stream_version(
        &self,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Option<StreamVersion>>> + Send;

    /// The position of the newest event a `read_all` reader can see now
    /// (`None` when the store is empty). Used to measure projection lag.
    fn head_position(&self) -> impl Future<Output = Result<Option<GlobalPosition>>> + Send;

    /// The event with id `id`, in whichever stream it is (`None`: no event
    /// has that id). The repository uses it to recognise a retried command.
    ///
    /// Contract: a point lookup (the id is indexed), never a scan. It sees
    /// every append that has returned `Ok`, through any handle on the store.
    /// The event's `global_position` is like the positions an append returns:
    /// a `read_all` reader may not have been given it yet, so it is not a
    /// checkpoint.
    fn read_event(&self, id: EventId)
        -> impl Future<Output = Result<Option<RecordedEvent>>> + Send;

    /// One page of the global feed after `filter.after`: at most `limit`
    /// matching events (`filter.limit` is ignored), and how far the read
    /// scanned ([`FeedPage::scanned_to`]), which moves through stretches of
    /// events that do not match the filter, so a subscriber of a rare event
    /// type does not rescan the log on every poll and its checkpoint moves.
    ///
    /// Contract: the delivery guarantee of [`read_all`](Self::read_all)
    /// (a reader that keeps calling this from its last `scanned_to` sees
    /// every matching event exactly once, in global order); `scanned_to` is
    /// never below `filter.after` and never past a position that
    /// `read_all` could not deliver yet (on PostgreSQL, never past the
    /// snapshot horizon), so it is a safe checkpoint; `at_end` is true when
    /// fewer than `limit` events matched up to the safe end of the log.
    ///
    /// Provided on top of [`head_position`](Self::head_position) (read
    /// first: every event at or below it is already readable, and none can
    /// appear there later) and one bounded `read_all` after it; the events
    /// the read returns beyond that head are left for the next page. A
    /// backend may answer it in fewer round trips.
    fn read_feed_page(
        &self,
        filter: &ReadAll,
        limit: usize,
    ) -> impl Future<Output = Result<FeedPage>> + Send {
        let filter = filter.clone();
        async move {
            let after = filter.after;
            let limit = limit.max(1);
            let head = self.head_position().await?;
            let Some(head) = head.filter(|h| *h > after) else {
                return Ok(FeedPage {
                    events: Vec::new(),
                    scanned_to: after,
                    at_end: true,
                });
            };
            let mut events: Vec<RecordedEvent> = self
                .read_all(filter.limit(limit as u64))
                .try_collect()
                .await?;
            let full = events.len() >= limit;
            events.retain(|e| e.global_position <= head);
            if full && events.len() == limit {
                let scanned_to = events.last().map_or(after, |e| e.global_position);
                return Ok(FeedPage {
                    events,
                    scanned_to,
                    at_end: false,
                });
            }
            // Every matching event up to the head is in `events`.
            Ok(FeedPage {
                events,
                scanned_to: head,
                at_end: true,
            })
        }
    }

    /// Consecutive pages of the global feed from `filter.after`, each the
    /// page [`read_feed_page`](Self::read_feed_page) would return after the
    /// `scanned_to` of the page before it, with the same contract. Lazy:
    /// nothing is read until the stream is polled.
    ///
    /// The stream ends after a page with `at_end`, after a page that did not
    /// move (a stale position), or after an error, which is its last item (a
    /// caller reads again from its last `scanned_to`). It may also end after
    /// a full page without saying whether more follow: a caller that wants
    /// more reads on from that page's `scanned_to`.
    ///
    /// Provided as a loop of `read_feed_page`. A backend may instead read
    /// the next rows while the page before is being decoded and consumed
    /// (a bounded number of round trips ahead), so its reader never waits
    /// for the caller between pages: the SQLite store does (windows of
    /// positions on several readers), and the PostgreSQL store sends a full
    /// page's next query before decoding it. [`crate::Subscription`] reads
    /// ahead through this.
    fn read_feed_pages(&self, filter: ReadAll, limit: usize) -> FeedPages {
        use futures::StreamExt as _;
        let store = self.clone();
        futures::stream::unfold(Some(filter), move |filter| {
            let store = store.clone();
            async move {
                let mut filter = filter?;
                let page = store.read_feed_page(&filter, limit).await;
                let next = match &page {
                    Ok(p) if !p.at_end && p.scanned_to > filter.after => {
                        filter.after = p.scanned_to;
                        Some(filter)
                    }
                    _ => None,
                };
                Some((page, next))
            }
        })
        .boxed()
    }

    /// A wake-up source for followers of the feed: a counter the store raises
    /// after each commit that wrote events (see [`AppendSignal`]), or `None`
    /// when the store has none (then a follower polls).
    ///
    /// Contract: after an append through this store (or, where the backend
    /// says so, through another process) has returned `Ok`, the counter has
    /// changed or will change. A change may be spurious (a follower then reads
    /// nothing new) and several commits may raise it once. It only says when
    /// to read, never what: a follower always reads with
    /// [`read_feed_page`](Self::read_feed_page). The in-memory store raises it
    /// after every append; SQLite after each group commit of this process
    /// (other processes' appends are seen by the follower's poll);
    /// PostgreSQL on `NOTIFY`, which every store handle (in any process)
    /// sends after its appends to the same schema commit.
    fn append_signal(&self) -> Option<AppendSignal> {
        None
    }

    /// How many events lie after `after` up to and including `up_to` in the
    /// global order (a projection's lag in events: from its checkpoint to
    /// [`head_position`](Self::head_position)). Provided as a count over
    /// `read_all` (so it costs a read of the lag); the SQL backends count on
    /// their position index.
    fn count_events_between(
        &self,
        after: GlobalPosition,
        up_to: GlobalPosition,
    ) -> impl Future<Output = Result<u64>> + Send {
        async move {
            if up_to <= after {
                return Ok(0);
            }
            let mut n = 0u64;
            let mut events = self.read_all(ReadAll::after(after));
            while let Some(e) = futures::StreamExt::next(&mut events).await {
                if e?.global_position > up_to {
                    break;
                }
                n += 1;
            }
            Ok(n)
        }
    }

    /// Reads a whole stream into memory. For tests, tools and small streams.
    fn read_stream_to_vec(
        &self,
        stream: &StreamId,
        options: ReadStream,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>>> + Send {
        self.read_stream(stream, options).try_collect()
    }
}

/// Listing and counting the streams of an [`EventStore`]: what `annals
/// stats` and the staged snapshot migration (which walks every stream of a
/// category) use.
///
/// Optional. The repository and the `read_all` feed never need it. A backend
/// implements it when it keeps an index of its streams (the SQL backends'
/// `streams` table); one that can only read its log forward can leave it
/// out.
pub trait StreamCatalog: EventStore {
    /// The streams of one category with their heads, ordered by name, lazily.
    /// A stream is listed once it has an event. The listing is read page by
    /// page, so under concurrent appends a head may be behind by the time the
    /// caller sees it.
    fn list_streams(&self, category: &str) -> BoxStream<'static, Result<StreamInfo>>;

    /// Counts of streams and events per category and per type.
    fn stats(&self) -> impl Future<Output = Result<StoreStats>> + Send;

    /// The `limit` streams with the most events (the highest heads), most
    /// first, streams with equal heads by name. One scan of the stream index
    /// (not of the events).
    fn largest_streams(&self, limit: usize)
        -> impl Future<Output = Result<Vec<StreamInfo>>> + Send;

    /// The events whose metadata carries `correlation_id` (every event one
    /// request caused), in global order, lazily, at most `limit`. A lookup,
    /// not a feed: it reads the committed events on an index of the
    /// metadata's `correlation_id` and keeps no position to resume from
    /// (on PostgreSQL it does not wait for the horizon, as
    /// [`EventStore::read_event`] does not).
    fn read_correlated(&self, correlation_id: Uuid, limit: Option<u64>) -> EventStream;

    /// The events whose metadata names `causation_id` as their cause (the
    /// events an event or command caused: [`CommandContext::caused_by`](crate::CommandContext::caused_by)
    /// sets it to the causing event's id), in global order, lazily, at most
    /// `limit`; a lookup like [`read_correlated`](Self::read_correlated).
    fn read_caused_by(&self, causation_id: Uuid, limit: Option<u64>) -> EventStream;

    /// How many stored events were recorded at or after `since` (by
    /// `recorded_at`, see [`ReadAll::since`]): the store's append rate over
    /// a window when `since` is that long ago. Counted with the index on
    /// `recorded_at`, without reading the events.
    fn events_recorded_since(
        &self,
        since: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64>> + Send;
}
