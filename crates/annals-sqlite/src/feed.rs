//! Consecutive feed pages ([`annals::EventStore::read_feed_pages`]) read
//! ahead in round trips on the reader threads.
//!
//! A loop of [`annals::EventStore::read_feed_page`] leaves the reader idle at
//! every page boundary: the page's last round trip is decoded on the
//! caller's task before the page returns, and only then is the next page's
//! first round trip sent. Here the round trips follow each other across page
//! boundaries, so the readers read the next rows while the caller decodes
//! and consumes the ones before.
//!
//! - Without a time filter (the feed of subscriptions, rebuilds and
//!   replays), the round trips are windows of positions read on several
//!   readers at once ([`Windows`]): two windows are read while the caller
//!   decodes the one before, so a replay has two readers (two cores) behind
//!   one decoding task.
//! - With a time filter, one chain of round trips ([`Conns::paginate`]),
//!   each one reading the head first, then at most the rows the current
//!   page still lacks; rows beyond that head (appended between the two
//!   statements) end the stream, exactly as they end a `read_feed_page`.
//!
//! [`Chain`] cuts the rounds into pages; each event is decoded straight
//! into its page.
//!
//! [`Conns::paginate`]: crate::conn::Conns::paginate

use std::sync::Arc;

use annals::{FeedPage, FeedPages, GlobalPosition, ReadAll, RecordedEvent, Result};
use futures::stream::BoxStream;
use futures::StreamExt;

use crate::codec::{sql_int, EventRows, RawEvents};
use crate::error::{db, thread_stopped};
use crate::event_store::{
    check_local, max_position, read_all_page, read_all_sql, read_window_sql, AllCursor, METRICS,
    PAGE_BYTES,
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

/// A round trip's events with its head, and whether rows may follow its
/// last one (decoded on the caller's task as they are taken).
struct Round {
    head: i64,
    events: EventRows,
    more: bool,
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
    if options.since.is_none() && options.until.is_none() {
        let rounds = Windows::stream(store, options);
        return chain(rounds, start, limit as usize);
    }
    let sql = Arc::new(read_all_sql(&options));
    let batch = store.batch_size().max(1) as u64;
    let (upcasters, read) = (store.upcasters().cloned(), METRICS.read_counter());
    let cursor = Cursor {
        after: sql_int(start.seq()),
        filled: 0,
        seek_since: options.since.is_some(),
    };
    let rounds = store.conns().paginate(cursor, move |conn, cursor: Cursor| {
        let head = max_position(conn)?.unwrap_or(0);
        if head <= cursor.after {
            let round = Round {
                head,
                events: RawEvents::empty().decode(None),
                more: false,
            };
            return Ok((std::iter::once(Ok(round)), None));
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
            head,
            events: page.decode(upcasters.clone()).counting(read.clone()),
            more: next.is_some(),
        };
        Ok((std::iter::once(Ok(round)), next))
    });
    chain(rounds, start, limit as usize)
}

/// Pages of `limit` events cut from `rounds`.
fn chain(
    rounds: BoxStream<'static, Result<Round>>,
    after: GlobalPosition,
    limit: usize,
) -> FeedPages {
    let state = Chain {
        rounds,
        round: None,
        after,
        limit,
        done: false,
    };
    futures::stream::unfold(state, |mut state| async move {
        let page = state.next_page().await?;
        Some((page, state))
    })
    .boxed()
}

/// The most events a page's vector is sized for at once (a longer page
/// grows from there).
const MAX_PRESIZED: usize = 16_384;

/// The chain of round trips, cut into pages.
///
/// Each event is decoded straight into its page's vector: a
/// [`RecordedEvent`] is a few hundred bytes, and on a long replay every
/// move of it costs (the rounds go through the stream, not the events).
struct Chain {
    rounds: BoxStream<'static, Result<Round>>,
    /// The round being cut (a round longer than the room left in a page
    /// goes on in the next page).
    round: Option<Round>,
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
        loop {
            let round = match &mut self.round {
                Some(round) => round,
                None => match self.rounds.next().await {
                    Some(Ok(round)) => self.round.insert(round),
                    Some(Err(e)) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                    // The chain ended after a round that said more may
                    // follow (a page that reached its limit on its last
                    // round returns before this): nothing is lost, the
                    // caller reads on.
                    None => {
                        self.done = true;
                        return None;
                    }
                },
            };
            let head = round.head;
            if events.capacity() == 0 {
                // A round with rows after it: size the page for its limit
                // now, rather than double it a few times on the way.
                let rows = round.events.size_hint().0;
                let want = if round.more { self.limit } else { rows };
                events.reserve(want.min(self.limit).min(MAX_PRESIZED));
            }
            // Rows appended after the round trip's head: they end the stream.
            let mut beyond = false;
            while events.len() < self.limit {
                match round.events.next() {
                    Some(Ok(e)) if e.global_position.seq() > head as u64 => {
                        beyond = true;
                        break;
                    }
                    Some(Ok(e)) => events.push(e),
                    Some(Err(e)) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                    None => break,
                }
            }
            let exhausted = beyond || round.events.size_hint().0 == 0;
            let more = round.more && !beyond;
            if events.len() >= self.limit {
                let scanned_to = events.last().map_or(self.after, |e| e.global_position);
                self.after = scanned_to;
                if exhausted && more {
                    self.round = None;
                }
                // An exhausted last round stays: the next page is the
                // empty one at its head, at the end.
                return Some(Ok(FeedPage {
                    events,
                    scanned_to,
                    at_end: false,
                }));
            }
            // The round is exhausted and the page has room.
            self.round = None;
            if more {
                continue;
            }
            // Every matching event up to the head is in `events`.
            self.done = true;
            let head = GlobalPosition::from_seq(u64::try_from(head).unwrap_or(0));
            let last = events.last().map_or(self.after, |e| e.global_position);
            return Some(Ok(FeedPage {
                events,
                scanned_to: head.max(last).max(self.after),
                at_end: true,
            }));
        }
    }
}

/// Windows read ahead at once (each on the least busy reader), besides the
/// one being consumed.
const WINDOWS_AHEAD: usize = 2;

/// The widest window, in batches of positions (a filter that matches few
/// events reads wide windows).
const MAX_WINDOW_BATCHES: i64 = 64;

/// What a window's job read.
struct WindowRead {
    /// The head it read, and the rows after the window's start up to the
    /// window's end or that head, whichever is lower: at most a batch of
    /// them.
    head: i64,
    rows: RawEvents,
    /// The position through which the window has been read: its end, the
    /// head when that is lower, or its last row when the rows stopped at
    /// the batch or the byte budget.
    covered: i64,
}

/// Reads window `(lo, hi]` on a reader's connection.
type ReadWindow = dyn Fn(&rusqlite::Connection, i64, i64, bool) -> Result<WindowRead> + Send + Sync;

/// The rounds of a feed read without time filters, read as windows of
/// positions on several readers at once.
///
/// Positions are gap-free, so window `(lo, hi]` holds every event of its
/// range once the head is at `hi` or beyond, whichever reader reads it and
/// whenever. The windows are sent in position order and consumed in that
/// order, [`WINDOWS_AHEAD`] of them read while the caller decodes the one
/// before: a replay reads on two readers (two cores) while one task
/// decodes. A window that finds the head inside it is the last: its round
/// ends the stream (`more: false`), and the windows read beyond it are
/// dropped. A window whose rows stopped at the batch or the byte budget
/// is read on from its last row before anything after it is delivered.
///
/// Windows beyond the highest head seen are not sent ahead: a subscription
/// polling at the end of the log sends one round trip per poll, as the
/// chain does. An unfiltered window is one batch of positions; a filtered
/// one widens as the filter matches fewer of them (up to
/// [`MAX_WINDOW_BATCHES`] batches), so a rare type is not read a few
/// events per round trip.
struct Windows {
    conns: crate::conn::Conns,
    read: Arc<ReadWindow>,
    upcasters: Option<Arc<annals::Upcasters>>,
    counter: metrics::Counter,
    /// The windows sent and not yet consumed, in position order, with
    /// their bounds.
    queue: std::collections::VecDeque<(i64, i64, crate::conn::Reply<WindowRead>)>,
    /// Where the next window to send starts.
    next_lo: i64,
    /// The width of the next window, in positions.
    width: i64,
    batch: i64,
    filtered: bool,
    /// Whether the next window is read along the table rather than through
    /// its filter's index (see `read_window_sql`): a filtered read whose
    /// last window matched at least half of its positions.
    walk: bool,
    /// The highest head a window has read.
    known_head: i64,
    /// The last window has been consumed, or a read failed: nothing
    /// follows.
    last: bool,
}

impl Windows {
    fn stream(store: &SqliteEventStore, options: ReadAll) -> BoxStream<'static, Result<Round>> {
        let batch = sql_int(store.batch_size().max(1) as u64);
        let sql = [false, true].map(|walk| read_window_sql(&options, walk));
        let filtered = !options.categories.is_empty() || !options.event_types.is_empty();
        let start = sql_int(options.after.seq());
        let read = move |conn: &rusqlite::Connection, lo: i64, hi: i64, walk: bool| {
            read_window(conn, &sql[usize::from(walk)], &options, batch, lo, hi)
        };
        Windows {
            conns: store.conns().clone(),
            read: Arc::new(read),
            upcasters: store.upcasters().cloned(),
            counter: METRICS.read_counter(),
            queue: std::collections::VecDeque::new(),
            next_lo: start,
            width: batch,
            batch,
            filtered,
            walk: false,
            known_head: 0,
            last: false,
        }
        .boxed()
    }

    /// Sends the window `(lo, hi]` to the least busy reader.
    fn send(&self, lo: i64, hi: i64) -> Result<crate::conn::Reply<WindowRead>> {
        let (read, walk) = (Arc::clone(&self.read), self.walk);
        // Pages never hurry (see `Reply`).
        self.conns
            .submit(move |conn| read(conn, lo, hi, walk), false)
    }

    /// Sends the windows after the last one sent while fewer than
    /// [`WINDOWS_AHEAD`] are out and the head is known to be beyond them
    /// (one when none is out, to read on at all).
    fn send_ahead(&mut self) -> Result<()> {
        while !self.last
            && self.queue.len() < WINDOWS_AHEAD
            && (self.queue.is_empty() || self.next_lo < self.known_head)
        {
            let lo = self.next_lo;
            let hi = lo.saturating_add(self.width);
            let reply = self.send(lo, hi)?;
            self.queue.push_back((lo, hi, reply));
            self.next_lo = hi;
        }
        Ok(())
    }

    /// Takes in window `(lo, hi]`'s read: what follows it, and the round to
    /// yield.
    fn take(&mut self, lo: i64, hi: i64, read: WindowRead) -> Result<Round> {
        let WindowRead {
            head,
            rows,
            covered,
        } = read;
        self.known_head = self.known_head.max(head);
        let top = hi.min(head);
        let complete = rows.is_complete();
        let more = if !complete {
            // The round ends with the bad row's error: nothing after it.
            self.last = true;
            false
        } else if covered < top {
            // Stopped at the batch or the byte budget: the rest of the
            // window comes next, before the windows already sent.
            let reply = self.send(covered, hi)?;
            self.queue.push_front((covered, hi, reply));
            true
        } else if head < hi {
            // The head is inside the window: everything up to it is read.
            self.last = true;
            false
        } else {
            if self.filtered {
                // Wide enough for about a batch of matching events.
                let n = i64::try_from(rows.len()).unwrap_or(i64::MAX);
                let span = covered - lo;
                self.width = (span.saturating_mul(self.batch) / n.max(1))
                    .clamp(self.batch, self.batch.saturating_mul(MAX_WINDOW_BATCHES));
                self.walk = n.saturating_mul(2) >= span;
            }
            true
        };
        if self.last {
            self.queue.clear();
        }
        Ok(Round {
            // Every position up to `lo` is in the windows before: a head
            // read earlier than theirs (on another reader) is not lower.
            head: head.max(lo),
            events: rows
                .decode(self.upcasters.clone())
                .counting(self.counter.clone()),
            more,
        })
    }
}

impl futures::Stream for Windows {
    type Item = Result<Round>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Round>>> {
        use std::future::Future;
        use std::task::Poll;
        let this = self.get_mut();
        if this.last {
            return Poll::Ready(None);
        }
        if let Err(e) = this.send_ahead() {
            this.last = true;
            return Poll::Ready(Some(Err(e)));
        }
        // Never empty: `send_ahead` sends one window when none is out.
        let Some((lo, hi, reply)) = this.queue.front_mut() else {
            this.last = true;
            return Poll::Ready(None);
        };
        let (lo, hi) = (*lo, *hi);
        let answer = match std::pin::Pin::new(reply).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(answer) => answer,
        };
        this.queue.pop_front();
        let round = answer
            .map_err(|_| thread_stopped("reader"))
            .and_then(|r| r)
            .and_then(|read| this.take(lo, hi, read))
            // Read ahead while this window is consumed.
            .and_then(|round| this.send_ahead().map(|()| round));
        if round.is_err() {
            this.last = true;
            this.queue.clear();
        }
        Poll::Ready(Some(round))
    }
}

/// Window `(lo, hi]` of the feed: the head, then at most `batch` rows
/// after `lo` up to `hi` or the head, whichever is lower.
fn read_window(
    conn: &rusqlite::Connection,
    sql: &str,
    options: &ReadAll,
    batch: i64,
    lo: i64,
    hi: i64,
) -> Result<WindowRead> {
    use rusqlite::ToSql;
    let head = max_position(conn)?.unwrap_or(0);
    let top = hi.min(head);
    if top <= lo {
        return Ok(WindowRead {
            head,
            rows: RawEvents::empty(),
            covered: lo,
        });
    }
    let mut params: Vec<&dyn ToSql> =
        Vec::with_capacity(3 + options.categories.len() + options.event_types.len());
    params.push(&lo);
    params.push(&top);
    params.extend(options.categories.iter().map(|c| c as &dyn ToSql));
    params.extend(options.event_types.iter().map(|t| t as &dyn ToSql));
    params.push(&batch);
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(db("preparing a feed window"))?;
    let mut rows = stmt
        .query(params.as_slice())
        .map_err(db("reading a feed window"))?;
    let want = usize::try_from(batch).unwrap_or(usize::MAX);
    let rows = RawEvents::collect(&mut rows, want, PAGE_BYTES, "reading a feed window")?;
    let stopped = rows.len() == want || rows.is_at_budget();
    let covered = match rows.last_keys() {
        Some((position, _)) if stopped => position,
        _ => top,
    };
    Ok(WindowRead {
        head,
        rows,
        covered,
    })
}
