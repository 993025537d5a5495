//! Subscriptions: the global feed read from a checkpoint (catch-up), then
//! followed as it grows (live), never skipping or repeating an event.
//!
//! A [`Subscription`] is a cursor on [`EventStore::read_feed_page`]: each
//! call of [`next_batch`](Subscription::next_batch) reads one bounded page
//! after the last position it delivered and moves to the page's
//! `scanned_to`, which also moves through stretches of events that do not
//! match the filter (so a checkpoint saved from it moves too). Nothing else
//! decides what is delivered: the page read is the backend's gap-free feed,
//! so a subscription inherits its guarantee (every matching event exactly
//! once, in global order, with any number of concurrent writers).
//!
//! At the end of the log it does not poll in a tight loop: it waits for the
//! store's [`EventStore::append_signal`] (raised after commits: in-process
//! on SQLite and in memory, by `LISTEN/NOTIFY` on PostgreSQL) or for
//! [`SubscriptionOptions::poll_interval`], whichever comes first. The poll
//! covers what the signal cannot see (another process appending to the same
//! SQLite file; on PostgreSQL, events held back by a transaction elsewhere
//! in the cluster that ended without appending). The signal only says when
//! to read; a spurious wake-up costs one empty read.
//!
//! A read that fails with a transient error (a lost connection, a busy pool:
//! [`Error::Backend`], [`Error::Unavailable`]) is retried with exponential
//! backoff ([`Backoff`]) from the same position, so nothing is lost or
//! delivered twice; after the last attempt the error is returned, and the
//! subscription can still be called again from where it stands.

use std::time::Duration;

use crate::{AppendSignal, Error, EventStore, GlobalPosition, ReadAll, RecordedEvent, Result};

/// Exponential backoff between attempts: `initial`, doubled each time up to
/// `max`, at most `max_attempts` attempts in all.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Backoff {
    /// The pause after the first failure.
    pub initial: Duration,
    /// The longest pause.
    pub max: Duration,
    /// Attempts in all (the first one included); at least 1.
    pub max_attempts: u32,
}

impl Default for Backoff {
    /// 10 ms doubling up to 2 s, 10 attempts (about 8 s in all).
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_secs(2),
            max_attempts: 10,
        }
    }
}

impl Backoff {
    /// The pause after failed attempt number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(20);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// What a subscription delivers: which events, in what batches, how it waits.
#[derive(Clone, PartialEq, Debug)]
pub struct SubscriptionOptions {
    /// Only events of these categories (empty: all).
    pub categories: Vec<String>,
    /// Only events of these types (empty: all).
    pub event_types: Vec<String>,
    /// At most this many events per batch (default
    /// [`DEFAULT_BATCH_SIZE`](crate::DEFAULT_BATCH_SIZE)).
    pub batch_size: usize,
    /// At the end of the log, read again after this long even without a
    /// wake-up (default 250 ms): what sees other processes' SQLite appends.
    pub poll_interval: Duration,
    /// Retries of a read that failed with a transient error.
    pub retry: Backoff,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        SubscriptionOptions {
            categories: Vec::new(),
            event_types: Vec::new(),
            batch_size: crate::DEFAULT_BATCH_SIZE,
            poll_interval: Duration::from_millis(250),
            retry: Backoff::default(),
        }
    }
}

impl SubscriptionOptions {
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
    /// At most `n` events per batch (at least 1).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }
    /// The poll interval at the end of the log.
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every;
        self
    }
    /// The retries of a failed read.
    pub fn retry(mut self, retry: Backoff) -> Self {
        self.retry = retry;
        self
    }
}

/// One delivery of a [`Subscription`].
#[derive(Clone, PartialEq, Debug)]
pub struct SubscriptionBatch {
    /// The matching events, in global order (may be empty when only the
    /// scan moved, through events that do not match).
    pub events: Vec<RecordedEvent>,
    /// Where the subscription stood before this batch (the batch holds the
    /// matching events after it, up to `position`).
    pub after: GlobalPosition,
    /// Where the subscription now stands: every matching event up to here
    /// has been delivered. A safe checkpoint.
    pub position: GlobalPosition,
    /// Whether the batch was read while catching up (before the
    /// subscription first reached the end of the log) rather than live.
    pub replaying: bool,
}

/// Whether a failed read is worth another attempt from the same position.
pub fn is_transient(err: &Error) -> bool {
    matches!(err, Error::Backend { .. } | Error::Unavailable { .. })
}

/// A cursor on the global feed: catch-up from a position, then live (see
/// the module docs).
pub struct Subscription<S: EventStore> {
    store: S,
    filter: ReadAll,
    options: SubscriptionOptions,
    signal: Option<AppendSignal>,
    caught_up: bool,
    /// The pages after `filter.after`, read ahead while the caller handles
    /// the batch before them (see [`Subscription::next_batch`]).
    ahead: Option<Ahead>,
}

/// The task that reads pages ahead of a catching-up subscription, in order,
/// each after the one before, and the pages it has read.
struct Ahead {
    /// Holds one page; the task reads the next one meanwhile.
    pages: tokio::sync::mpsc::Receiver<Result<crate::FeedPage>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Ahead {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<S: EventStore> Subscription<S> {
    /// A subscription delivering the matching events strictly after `after`
    /// ([`GlobalPosition::START`], or a position a subscription or
    /// `read_all` delivered: a checkpoint).
    pub fn new(store: S, after: GlobalPosition, options: SubscriptionOptions) -> Self {
        let filter = ReadAll::after(after)
            .categories(options.categories.clone())
            .event_types(options.event_types.clone());
        let signal = store.append_signal();
        Subscription {
            store,
            filter,
            options,
            signal,
            caught_up: false,
            ahead: None,
        }
    }

    /// The last position delivered (where the next batch starts after).
    pub fn position(&self) -> GlobalPosition {
        self.filter.after
    }

    /// Whether a batch has reached the end of the log yet.
    pub fn is_caught_up(&self) -> bool {
        self.caught_up
    }

    /// The next batch: at once while there is something to deliver (matching
    /// events, or a scan that moved), otherwise after waiting for new
    /// appends. Cancel-safe: dropping the future before it completes
    /// delivers nothing and moves nothing.
    ///
    /// While catching up (the page delivered was full, not the end of the
    /// log), the pages after it are read ahead on a task of its own, each
    /// as soon as the one before it has been read, so the store reads
    /// batches `k + 1` and `k + 2` while the caller handles batch `k` and
    /// never waits for the caller between pages: at most three batches are
    /// held. The pages read ahead are the ones the next calls would read
    /// (the feed after the delivered batch, reads like any other, only
    /// earlier); the task stops after a page at the end of the log, and a
    /// read ahead that failed is dropped and the next call reads again,
    /// with its retries.
    pub async fn next_batch(&mut self) -> Result<SubscriptionBatch> {
        loop {
            let page = match self.take_ahead().await {
                Some(page) => page,
                None => {
                    self.mark_signal_seen();
                    self.read_page().await?
                }
            };
            let moved = page.scanned_to > self.filter.after;
            if moved || !page.events.is_empty() {
                let replaying = !self.caught_up;
                if page.at_end {
                    self.caught_up = true;
                }
                let after = self.filter.after;
                let position = page.scanned_to.max(after);
                self.filter.after = position;
                if !page.at_end {
                    self.read_ahead();
                }
                return Ok(SubscriptionBatch {
                    events: page.events,
                    after,
                    position,
                    replaying,
                });
            }
            self.caught_up = true;
            self.wait().await;
        }
    }

    /// Marks the signal seen before a read: a commit during the read raises
    /// it again, and a wait after the read returns at once.
    fn mark_signal_seen(&mut self) {
        if let Some(signal) = &mut self.signal {
            signal.borrow_and_update();
        }
    }

    /// Starts reading the pages after `filter.after` on a task of its own,
    /// unless one runs already (none outside a Tokio runtime: the next call
    /// then reads the page itself).
    fn read_ahead(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.ahead.is_some() {
            return;
        }
        self.mark_signal_seen();
        let (store, filter, n) = (
            self.store.clone(),
            self.filter.clone(),
            self.options.batch_size,
        );
        let (tx, pages) = tokio::sync::mpsc::channel(1);
        let task = runtime.spawn(async move {
            // Reads on while the log goes on: the stream ends after the end,
            // a failed read, or a page that did not move.
            use futures::StreamExt as _;
            let mut feed = store.read_feed_pages(filter, n);
            while let Some(page) = feed.next().await {
                if tx.send(page).await.is_err() {
                    return;
                }
            }
        });
        self.ahead = Some(Ahead { pages, task });
    }

    /// The next page read ahead, once it has arrived; `None` when no task
    /// reads ahead, when its read failed (the caller then reads it again,
    /// with retries), or after the task's last page (the end of the log).
    /// Cancel-safe: a page read ahead stays until it is taken.
    async fn take_ahead(&mut self) -> Option<crate::FeedPage> {
        let ahead = self.ahead.as_mut()?;
        match ahead.pages.recv().await {
            Some(Ok(page)) => Some(page),
            Some(Err(e)) => {
                self.ahead = None;
                tracing::debug!(error = %e, position = %self.filter.after,
                    "subscription read ahead failed; reading again");
                None
            }
            // The task has delivered its last page (the end of the log),
            // or stopped.
            None => {
                self.ahead = None;
                None
            }
        }
    }

    /// One page, retried on transient errors (from the same position).
    async fn read_page(&self) -> Result<crate::FeedPage> {
        let retry = self.options.retry;
        let mut attempt = 1;
        loop {
            match self
                .store
                .read_feed_page(&self.filter, self.options.batch_size)
                .await
            {
                Ok(page) => return Ok(page),
                Err(e) if is_transient(&e) && attempt < retry.max_attempts => {
                    tracing::warn!(error = %e, attempt, position = %self.filter.after,
                        "subscription read failed, retrying");
                    tokio::time::sleep(retry.delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for the append signal or the poll interval.
    async fn wait(&mut self) {
        let poll = self.options.poll_interval;
        match &mut self.signal {
            Some(signal) => {
                tokio::select! {
                    changed = signal.changed() => {
                        if changed.is_err() {
                            // The store's signal is gone: poll from now on.
                            self.signal = None;
                        }
                    }
                    _ = tokio::time::sleep(poll) => {}
                }
            }
            None => tokio::time::sleep(poll).await,
        }
    }
}
