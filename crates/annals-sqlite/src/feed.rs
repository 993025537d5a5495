//! Consecutive feed pages ([`annals::EventStore::read_feed_pages`]) in one
//! chain of reader round trips.
//!
//! A loop of [`annals::EventStore::read_feed_page`] leaves the reader idle at
//! every page boundary: the page's last round trip is decoded on the
//! caller's task before the page returns, and only then is the next page's
//! first round trip sent. Here the round trips follow each other across page
//! boundaries (each is requested as soon as the one before arrives, as within
//! a page), so the reader reads the next rows while the caller decodes and
//! consumes the ones before; at most one round trip is read ahead.
//!
//! Each round trip reads the head first, then at most the rows the current
//! page still lacks; rows beyond that head (appended between the two
//! statements) end the stream, exactly as they end a `read_feed_page`.

use std::sync::Arc;

use annals::{FeedPage, FeedPages, GlobalPosition, ReadAll, RecordedEvent, Result};
use futures::stream::BoxStream;
use futures::StreamExt;

use crate::codec::{sql_int, EventRows, RawEvents};
use crate::event_store::{
    check_local, max_position, read_all_page, read_all_sql, AllCursor, METRICS, PAGE_BYTES,
};
use crate::SqliteEventStore;

/// Where the next round trip of the chain starts.
struct Cursor {
    after: i64,
    /// Events the current page already has.
    filled: u64,
    /// Whether the first round trip is still to skip ahead to `since`.
    seek_since: bool,
}

/// What a round trip yields, in order: its head, its events, its end.
// Nearly every item is an event; boxing it would allocate once per event.
#[allow(clippy::large_enum_variant)]
enum Item {
    Head(i64),
    Event(RecordedEvent),
    /// Whether rows may follow the round trip's last one.
    End {
        more: bool,
    },
}

/// A round trip's items (see [`Item`]), its events decoded as they are
/// iterated (on the caller's task).
struct Round {
    head: Option<i64>,
    events: EventRows,
    end: Option<bool>,
}

impl Iterator for Round {
    type Item = Result<Item>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(head) = self.head.take() {
            return Some(Ok(Item::Head(head)));
        }
        if let Some(event) = self.events.next() {
            return Some(event.map(Item::Event));
        }
        self.end.take().map(|more| Ok(Item::End { more }))
    }
}

/// The pages of `filter` after `filter.after`, `limit` events each, read in
/// round trips of at most `batch` rows (see the module docs).
pub(crate) fn pages(store: &SqliteEventStore, filter: ReadAll, limit: usize) -> FeedPages {
    if let Err(e) = check_local(filter.after) {
        return futures::stream::once(async move { Err(e) }).boxed();
    }
    let limit = limit.max(1) as u64;
    let mut options = filter;
    options.limit = None;
    let start = options.after;
    let sql = Arc::new(read_all_sql(&options));
    let batch = store.batch_size().max(1) as u64;
    let (upcasters, read) = (store.upcasters().cloned(), METRICS.read_counter());
    let cursor = Cursor {
        after: sql_int(start.seq()),
        filled: 0,
        seek_since: options.since.is_some(),
    };
    let items = store.conns().paginate(cursor, move |conn, cursor: Cursor| {
        let head = max_position(conn)?.unwrap_or(0);
        if head <= cursor.after {
            let events = RawEvents::empty().decode(None);
            let round = Round {
                head: Some(head),
                events,
                end: Some(false),
            };
            return Ok((round, None));
        }
        let want = (limit - cursor.filled).min(batch);
        let all = AllCursor {
            after: cursor.after,
            remaining: u64::MAX,
            seek_since: cursor.seek_since,
        };
        let (page, next) = read_all_page(conn, &sql, &options, want, PAGE_BYTES, all)?;
        let filled = cursor.filled + page.len() as u64;
        let next = next.map(|all| Cursor {
            after: all.after,
            filled: if filled >= limit { 0 } else { filled },
            seek_since: false,
        });
        let round = Round {
            head: Some(head),
            events: page.decode(upcasters.clone()).counting(read.clone()),
            end: Some(next.is_some()),
        };
        Ok((round, next))
    });
    let state = Chain {
        items,
        after: start,
        limit: limit as usize,
        done: false,
    };
    futures::stream::unfold(state, |mut state| async move {
        let page = state.next_page().await?;
        Some((page, state))
    })
    .boxed()
}

/// The chain of round trips, cut into pages.
struct Chain {
    items: BoxStream<'static, Result<Item>>,
    /// Where the next page starts.
    after: GlobalPosition,
    limit: usize,
    done: bool,
}

impl Chain {
    /// The next page; `None` after the last one.
    async fn next_page(&mut self) -> Option<Result<FeedPage>> {
        if self.done {
            return None;
        }
        let mut events: Vec<RecordedEvent> = Vec::new();
        let mut head = 0i64;
        // Rows appended after the round trip's head: they end the stream.
        let mut beyond = false;
        loop {
            let item = match self.items.next().await {
                Some(Ok(item)) => item,
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                // The chain ended after an `End` that said more may follow
                // (a page that reached its limit on its last round trip
                // returns before this): nothing is lost, the caller reads on.
                None => {
                    self.done = true;
                    return None;
                }
            };
            match item {
                Item::Head(h) => head = h,
                Item::Event(e) => {
                    if beyond || e.global_position.seq() > head as u64 {
                        beyond = true;
                    } else {
                        events.push(e);
                    }
                }
                Item::End { more } => {
                    let full = events.len() >= self.limit;
                    if full {
                        let scanned_to = events.last().map_or(self.after, |e| e.global_position);
                        self.after = scanned_to;
                        // Without `more`, whether anything follows is not
                        // known yet: the caller reads on from here.
                        self.done = !more;
                        return Some(Ok(FeedPage {
                            events,
                            scanned_to,
                            at_end: false,
                        }));
                    }
                    if more && !beyond {
                        continue;
                    }
                    // Every matching event up to the head is in `events`.
                    self.done = true;
                    let head = GlobalPosition::from_seq(u64::try_from(head).unwrap_or(0));
                    return Some(Ok(FeedPage {
                        events,
                        scanned_to: head.max(self.after),
                        at_end: true,
                    }));
                }
            }
        }
    }
}
