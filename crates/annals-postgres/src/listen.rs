//! The append signal on PostgreSQL: `LISTEN/NOTIFY`, one dedicated
//! connection per store, opened while anybody listens.
//!
//! Migration 6 adds a statement trigger on `events` that runs
//! `pg_notify('annals_appended', <schema>)`; PostgreSQL delivers it when
//! the appending transaction commits (never for one that rolls back), from
//! any process appending to the schema. [`PgEventStore::append_signal`]
//! hands out receivers of a counter; the first one starts a task that opens
//! a connection outside the pool (its `application_name` is the store's
//! with `/listen` appended, so an operator can find it), runs `LISTEN` and
//! raises the counter on each notification for this store's schema. The
//! task ends when the last receiver is dropped.
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

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, NoTls};

use crate::PgEventStore;

/// The channel of migration 6's trigger; the payload is the schema.
const CHANNEL: &str = "annals_appended";

/// First pause before reconnecting, and the longest.
const MIN_RETRY: Duration = Duration::from_millis(10);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// How often an idle listener checks whether anybody still listens.
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// The shared listener of one store (see the module docs).
pub(crate) struct AppendListener {
    signal: watch::Sender<u64>,
    /// Whether the listening task runs. Receivers subscribe and the task
    /// decides to stop under this lock, so no receiver is left without one.
    running: Mutex<bool>,
}

impl Default for AppendListener {
    fn default() -> Self {
        AppendListener {
            signal: watch::Sender::new(0),
            running: Mutex::new(false),
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
