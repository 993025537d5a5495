//! One watch on the snapshot horizon per store, shared by every reader that
//! waits for it.
//!
//! At the tail of the log, `read_all` and `head_position` may wait (at most
//! `horizon_wait`) for the transactions that hold back events which are
//! already committed. Waiting must not cost a connection per reader: with
//! a long transaction anywhere in the cluster, every follower at the tail
//! waits its full `horizon_wait`, and followers that each held a pooled
//! connection meanwhile would leave none for appends.
//!
//! So a reader that has to wait holds no connection. It subscribes to a
//! [`watch`] channel carrying the latest horizon seen
//! (`pg_snapshot_xmin(pg_current_snapshot())`) and sleeps until the value
//! passes the transaction it waits for, or its deadline. One task per store
//! polls the horizon while anybody waits: one short query at a time on one
//! of the feed's connections (taken for that query only), every 1 ms to
//! 20 ms (backing off while the horizon stands still, at once when a new
//! reader starts waiting). It stops when the last reader stops waiting; the
//! next waiting reader starts it again.
//!
//! The horizon only moves forward (transaction ids are handed out in
//! increasing order, and the oldest running one can only finish), so a
//! value that has passed a reader's transaction stays past it. The watch
//! only decides how long to wait, never what to deliver: the reader reads
//! its page again afterwards, below the horizon of its own snapshot.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use annals::Result;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::error::Context;
use crate::store::{with_client, Lane};
use crate::PgEventStore;

/// The current horizon (transaction id) as a `bigint`.
const XMIN_SQL: &str = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint";

/// First pause between two polls, and the pause after the horizon moved or
/// a reader started waiting.
const MIN_PAUSE: Duration = Duration::from_millis(1);
/// Longest pause between two polls while readers wait.
const MAX_PAUSE: Duration = Duration::from_millis(20);

/// The shared horizon watch of one store (see the module docs).
pub(crate) struct HorizonWatch {
    /// The highest horizon seen so far (0: none yet).
    seen: watch::Sender<i64>,
    /// Whether a poller task runs. Readers subscribe and the poller decides
    /// to stop under this lock, so no reader is left without a poller.
    polling: Mutex<bool>,
    /// Wakes the poller early when a reader starts waiting.
    wake: Notify,
}

impl Default for HorizonWatch {
    fn default() -> Self {
        HorizonWatch {
            seen: watch::Sender::new(0),
            polling: Mutex::new(false),
            wake: Notify::new(),
        }
    }
}

fn lock(polling: &Mutex<bool>) -> MutexGuard<'_, bool> {
    // The flag is a plain bool: a panic while it was held leaves it valid.
    polling.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PgEventStore {
    /// Waits, holding no connection, until every transaction up to
    /// `newest` has finished (the horizon is above it) or `deadline`
    /// passes. Returns whether the horizon passed `newest`.
    pub(crate) async fn wait_past(&self, newest: i64, deadline: Instant) -> bool {
        let watch = &self.inner.horizon;
        let mut seen = {
            let mut polling = lock(&watch.polling);
            let seen = watch.seen.subscribe();
            if !*polling {
                *polling = true;
                tokio::spawn(poll(self.clone()));
            }
            seen
        };
        watch.wake.notify_one();
        loop {
            if *seen.borrow_and_update() > newest {
                return true;
            }
            match tokio::time::timeout_at(deadline, seen.changed()).await {
                Ok(Ok(())) => {}
                // The deadline passed (the sender lives as long as the
                // store, so `changed` does not fail while we hold it).
                Ok(Err(_)) | Err(_) => return false,
            }
        }
    }

    /// Records a horizon read elsewhere (it only ever moves forward).
    pub(crate) fn saw_horizon(&self, xmin: i64) {
        self.inner.horizon.seen.send_if_modified(|seen| {
            let moved = xmin > *seen;
            if moved {
                *seen = xmin;
            }
            moved
        });
    }

    /// The horizon now, read on one of the feed's connections.
    pub(crate) async fn read_horizon(&self) -> Result<i64> {
        let what = "cannot read the snapshot horizon";
        with_client!(self, Lane::Feed, "read the snapshot horizon", |client| {
            match client.prepare_cached(XMIN_SQL).await.context(what) {
                Ok(stmt) => client.query_one(&stmt, &[]).await.context(what),
                Err(e) => Err(e),
            }
        })?
        .try_get(0)
        .context(what)
    }
}

/// Clears the `polling` flag when the poller ends in any way other than
/// deciding to stop (a panic, or the runtime shutting down and dropping the
/// task), so that the next reader starts a new one.
struct StopGuard {
    store: Option<PgEventStore>,
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        if let Some(store) = self.store.take() {
            *lock(&store.inner.horizon.polling) = false;
        }
    }
}

/// The poller: reads the horizon while anybody waits for it.
async fn poll(store: PgEventStore) {
    let mut guard = StopGuard {
        store: Some(store.clone()),
    };
    let watch = &store.inner.horizon;
    let mut pause = MIN_PAUSE;
    loop {
        {
            let mut polling = lock(&watch.polling);
            if watch.seen.receiver_count() == 0 {
                *polling = false;
                guard.store = None;
                return;
            }
        }
        let before = *watch.seen.borrow();
        match store.read_horizon().await {
            Ok(xmin) => {
                store.saw_horizon(xmin);
                pause = if xmin > before {
                    MIN_PAUSE
                } else {
                    (pause * 2).min(MAX_PAUSE)
                };
            }
            Err(e) => {
                // The waiting readers give up at their deadlines and read
                // again, which reports a lasting failure to their callers.
                tracing::debug!(error = %e, "cannot read the snapshot horizon");
                pause = MAX_PAUSE;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = watch.wake.notified() => pause = MIN_PAUSE,
        }
    }
}
