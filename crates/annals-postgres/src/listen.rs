//! The append signal on PostgreSQL: `LISTEN/NOTIFY`, sent after each
//! append commits, heard on one dedicated connection per store, opened while
//! anybody listens.
//!
//! **Sending.** After an append (or `append_many`) that wrote events returns
//! from the server, the store raises its own counter at once (followers in
//! this process wake without a round trip) and marks a notification as
//! pending; one task per store, started on demand, sends
//! `SELECT pg_notify('annals_appended', <schema>)` on a pooled connection
//! while notifications are pending, one at a time, so a burst of appends
//! costs one notification per round trip, not one per append, and stops
//! after a second without appends. The notification is sent *after* the
//! commit, in a transaction of its own, rather than from a trigger in the
//! appending transaction: PostgreSQL serializes the commits of notifying
//! transactions on one lock, held until their commit record is flushed, which
//! would serialize every append's commit. A notification-only transaction
//! writes no commit record, so the lock is held briefly. If the process
//! dies between its commit and the notification, other processes' followers
//! find the events at their next poll.
//!
//! **Hearing.** [`PgEventStore::append_signal`] hands out receivers of the
//! counter; the first one starts a task that opens a connection outside the
//! pool (its `application_name` is the store's with `/listen` appended, so
//! an operator can find it), runs `LISTEN` and raises the counter on each
//! notification for this store's schema, from any process. The task ends
//! when the last receiver is dropped.
//!
//! The horizon watch (`horizon.rs`) could not serve here: it polls only
//! while a reader waits for a transaction it already knows of, and says
//! nothing about appends that have not happened yet.
//!
//! A lost listening connection (a server restart, `pg_terminate_backend`)
//! is opened again with backoff (10 ms doubling up to 5 s); notifications
//! sent meanwhile are lost, so the counter is raised once `LISTEN` runs again
//! (also the first time), and every follower reads the feed: it resumes from
//! its last position, so nothing is lost or delivered twice. The signal only
//! says when to read, never what: delivery is the feed's (`read_feed_page`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch, Notify};
use tokio_postgres::{AsyncMessage, NoTls};

use crate::error::Context;
use crate::store::{with_client, Lane};
use crate::PgEventStore;

/// The notification channel; the payload is the schema.
const CHANNEL: &str = "annals_appended";

/// First pause before reconnecting, and the longest.
const MIN_RETRY: Duration = Duration::from_millis(10);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// How often an idle listener checks whether anybody still listens.
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// How long the notifying task waits for another append before it ends.
const NOTIFIER_IDLE: Duration = Duration::from_secs(1);

/// The shared listener and notifier of one store (see the module docs).
pub(crate) struct AppendListener {
    signal: watch::Sender<u64>,
    /// Whether the listening task runs. Receivers subscribe and the task
    /// decides to stop under this lock, so no receiver is left without one.
    running: Mutex<bool>,
    /// A notification is due (an append committed since the last one sent).
    pending: AtomicBool,
    /// Whether the notifying task runs; it decides to stop under this lock
    /// after finding nothing pending, so no append is left unannounced.
    notifying: Mutex<bool>,
    /// Wakes the notifying task.
    wake: Notify,
}

impl Default for AppendListener {
    fn default() -> Self {
        AppendListener {
            signal: watch::Sender::new(0),
            running: Mutex::new(false),
            pending: AtomicBool::new(false),
            notifying: Mutex::new(false),
            wake: Notify::new(),
        }
    }
}

fn lock(running: &Mutex<bool>) -> MutexGuard<'_, bool> {
    // A plain bool: a panic while it was held leaves it valid.
    running.lock().unwrap_or_else(PoisonError::into_inner)
}

fn raise(signal: &watch::Sender<u64>) {
    signal.send_modify(|n| *n = n.wrapping_add(1));
}

impl PgEventStore {
    /// Called after an append that wrote events returned from the server:
    /// wakes this process's followers and has the notifying task tell the
    /// other processes.
    pub(crate) fn announce_append(&self) {
        let listener = &self.inner.listener;
        raise(&listener.signal);
        listener.pending.store(true, Ordering::SeqCst);
        let mut notifying = lock(&listener.notifying);
        if *notifying {
            listener.wake.notify_one();
        } else {
            *notifying = true;
            tokio::spawn(notify(self.clone()));
        }
    }

    /// A receiver of the append counter; starts the listening task if none
    /// runs (needs a tokio runtime, as every call of the store does).
    pub(crate) fn subscribe_appends(&self) -> watch::Receiver<u64> {
        let listener = &self.inner.listener;
        let mut running = lock(&listener.running);
        let rx = listener.signal.subscribe();
        if !*running {
            *running = true;
            tokio::spawn(listen(self.clone()));
        }
        rx
    }
}

/// Clears the `running` flag however the task ends (a panic, the runtime
/// shutting down), so that the next receiver starts a new one.
struct StopGuard {
    store: Option<PgEventStore>,
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        if let Some(store) = self.store.take() {
            *lock(&store.inner.listener.running) = false;
        }
    }
}

/// Whether nobody listens any more; if so, marks the task stopped.
fn nobody_listens(store: &PgEventStore, guard: &mut StopGuard) -> bool {
    let listener = &store.inner.listener;
    let mut running = lock(&listener.running);
    if listener.signal.receiver_count() == 0 {
        *running = false;
        guard.store = None;
        return true;
    }
    false
}

/// The listening task: connect, `LISTEN`, raise on notifications; again
/// with backoff when the connection is lost.
async fn listen(store: PgEventStore) {
    let mut guard = StopGuard {
        store: Some(store.clone()),
    };
    let mut retry = MIN_RETRY;
    loop {
        if nobody_listens(&store, &mut guard) {
            return;
        }
        match listen_once(&store, &mut guard).await {
            Ok(Done::NobodyListens) => return,
            Ok(Done::Lost) => {
                tracing::debug!("the LISTEN connection was lost; connecting again");
                retry = MIN_RETRY;
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot LISTEN for appends; retrying");
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
        tokio::time::sleep(retry).await;
    }
}

enum Done {
    NobodyListens,
    Lost,
}

async fn listen_once(
    store: &PgEventStore,
    guard: &mut StopGuard,
) -> Result<Done, tokio_postgres::Error> {
    let mut config = store.inner.config.clone();
    let app = config.get_application_name().unwrap_or("annals").to_owned();
    config.application_name(format!("{app}/listen"));
    let (client, mut connection) = config.connect(NoTls).await?;
    // The connection's messages: notifications go to `rx`; the stream ends
    // (and `rx` with it) when the connection does.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "the LISTEN connection failed");
                    return;
                }
            }
        }
    });
    let result = async {
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        // Appends made before LISTEN ran (or while the connection was
        // down) sent notifications nobody heard: wake every follower once.
        raise(&store.inner.listener.signal);
        loop {
            tokio::select! {
                payload = rx.recv() => match payload {
                    Some(schema) if schema == store.inner.schema => {
                        raise(&store.inner.listener.signal);
                    }
                    Some(_) => {}
                    None => return Ok(Done::Lost),
                },
                _ = tokio::time::sleep(IDLE_CHECK) => {
                    if nobody_listens(store, guard) {
                        return Ok(Done::NobodyListens);
                    }
                }
            }
        }
    }
    .await;
    drop(client);
    driver.abort();
    result
}

/// Clears the `notifying` flag however the notifying task ends.
struct NotifierGuard {
    store: Option<PgEventStore>,
}

impl Drop for NotifierGuard {
    fn drop(&mut self) {
        if let Some(store) = self.store.take() {
            *lock(&store.inner.listener.notifying) = false;
        }
    }
}

/// The notifying task: one `pg_notify` per round while appends are pending.
async fn notify(store: PgEventStore) {
    let mut guard = NotifierGuard {
        store: Some(store.clone()),
    };
    let listener = &store.inner.listener;
    loop {
        if !listener.pending.swap(false, Ordering::SeqCst) {
            let woken = tokio::time::timeout(NOTIFIER_IDLE, listener.wake.notified()).await;
            if woken.is_err() {
                let mut notifying = lock(&listener.notifying);
                if !listener.pending.load(Ordering::SeqCst) {
                    *notifying = false;
                    guard.store = None;
                    return;
                }
            }
            continue;
        }
        let sent = send_notification(&store).await;
        if let Err(e) = sent {
            // Followers elsewhere find the events at their next poll; try
            // again shortly.
            tracing::debug!(error = %e, "cannot send the append notification");
            listener.pending.store(true, Ordering::SeqCst);
            tokio::time::sleep(MAX_RETRY / 50).await;
        }
    }
}

/// One `pg_notify` for this store's schema.
async fn send_notification(store: &PgEventStore) -> annals::Result<()> {
    let schema = store.inner.schema.as_str();
    with_client!(
        store,
        Lane::Any,
        "notify followers of an append",
        |client| {
            client
                .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &schema])
                .await
                .context("cannot notify followers of an append")
        }
    )?;
    Ok(())
}
