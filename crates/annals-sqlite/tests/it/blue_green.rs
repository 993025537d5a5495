//! Blue-green rebuilds on SQLite (issue 8): a new projection version builds
//! into shadow tables while the old one serves, one transaction swaps them,
//! and a failed, cancelled or crashed rebuild leaves the live projection as
//! it was.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use annals::{
    checkpoint_name, shadow_checkpoint_name, Backoff, BatchContext, CheckpointStore, EventStore,
    ExpectedVersion, GlobalPosition, HandlerError, ProjectionError, ProjectionRunner, ReadAll,
    RebuildOptions, RecordedEvent, RunnerOptions, TableNames,
};
use annals_sqlite::{SqliteEventStore, SqliteProjection};
use futures::TryStreamExt;

use crate::{ev, fresh_store, raw, sid};

const PATIENCE: Duration = Duration::from_secs(60);

/// Per stream: the sum of `n` and the number of events, in table `totals`
/// (written through the batch's table names). Fails on the event whose `n`
/// equals `fail_on` (after writing the batch's rows) while it is set.
struct Totals {
    version: u32,
    fail_on: Arc<AtomicI64>,
    handled: Arc<AtomicU64>,
}

impl Totals {
    fn new(version: u32) -> Self {
        Totals {
            version,
            fail_on: Arc::new(AtomicI64::new(-1)),
            handled: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl SqliteProjection for Totals {
    fn name(&self) -> &str {
        "totals"
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn tables(&self) -> Vec<String> {
        vec!["totals".to_owned()]
    }
    fn create_tables(
        &self,
        tx: &rusqlite::Transaction<'_>,
        tables: &TableNames,
    ) -> Result<(), HandlerError> {
        let t = tables.name("totals");
        tx.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS \"{t}\" \
             (stream TEXT PRIMARY KEY, total INTEGER NOT NULL, events INTEGER NOT NULL); \
             CREATE INDEX IF NOT EXISTS \"{t}_total\" ON \"{t}\" (total)"
        ))?;
        Ok(())
    }
    fn handle(
        &self,
        tx: &rusqlite::Transaction<'_>,
        events: &[RecordedEvent],
        ctx: &BatchContext,
    ) -> Result<(), HandlerError> {
        let sql = format!(
            "INSERT INTO \"{}\" (stream, total, events) VALUES (?1, ?2, 1) \
             ON CONFLICT (stream) DO UPDATE SET total = total + excluded.total, \
             events = events + 1",
            ctx.tables.name("totals")
        );
        let fail_on = self.fail_on.load(Ordering::SeqCst);
        let mut failed = false;
        for e in events {
            let n = e.data.to_value()?["n"].as_i64().unwrap_or(0);
            tx.prepare_cached(&sql)?
                .execute(rusqlite::params![e.stream_id.as_str(), n])?;
            failed |= n == fail_on;
        }
        if failed {
            return Err(format!("failing on n = {fail_on}").into());
        }
        self.handled
            .fetch_add(events.len() as u64, Ordering::SeqCst);
        Ok(())
    }
}

fn options() -> RunnerOptions {
    RunnerOptions {
        batch_size: 16,
        poll_interval: Duration::from_millis(20),
        store_retry: Backoff::default(),
        handler_retry: Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(1),
            max_attempts: 1,
        },
    }
}

fn rebuild_options(from_start: bool) -> RebuildOptions {
    RebuildOptions {
        batch_size: 16,
        checkpoint_every: 32,
        from_start,
    }
}

type Rows = HashMap<String, (i64, i64)>;

fn table(store: &SqliteEventStore, name: &str) -> Rows {
    let conn = raw(store);
    let mut stmt = conn
        .prepare(&format!("SELECT stream, total, events FROM \"{name}\""))
        .expect("prepare");
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
        .expect("query")
        .collect::<rusqlite::Result<_>>()
        .expect("rows");
    rows
}

fn tables_like(store: &SqliteEventStore, pattern: &str) -> Vec<String> {
    let conn = raw(store);
    let mut stmt = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE ?1 ORDER BY name",
        )
        .expect("prepare");
    let names = stmt
        .query_map([pattern], |r| r.get(0))
        .expect("query")
        .collect::<rusqlite::Result<_>>()
        .expect("names");
    names
}

fn active_version(store: &SqliteEventStore) -> Option<i64> {
    raw(store)
        .query_row(
            "SELECT active_version FROM projection_versions WHERE name = 'totals'",
            [],
            |r| r.get(0),
        )
        .ok()
}

async fn fold(store: &SqliteEventStore) -> Rows {
    let events: Vec<RecordedEvent> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("read_all");
    let mut rows = Rows::new();
    for e in &events {
        let row = rows.entry(e.stream_id.to_string()).or_default();
        row.0 += e.data.to_value().expect("json")["n"].as_i64().unwrap_or(0);
        row.1 += 1;
    }
    rows
}

async fn seed(store: &SqliteEventStore, count: i64) -> GlobalPosition {
    let mut last = GlobalPosition::START;
    for i in 0..count {
        last = store
            .append(
                &sid(&format!("Acc-{}", i % 8)),
                ExpectedVersion::Any,
                vec![ev("D", i)],
            )
            .await
            .expect("append")
            .positions[0];
    }
    last
}

/// Version 1 live and caught up with `count` events.
async fn live_v1(
    store: &SqliteEventStore,
    count: i64,
) -> annals::ProjectionHandle<annals_sqlite::SqliteTransactional<Totals>> {
    let last = seed(store, count).await;
    let applier = store.transactional(Totals::new(1));
    applier.create_tables().await.expect("create v1 tables");
    let handle = ProjectionRunner::new(store.clone(), applier)
        .with_options(options())
        .spawn();
    handle.wait_for(last, PATIENCE).await.expect("v1 caught up");
    handle
}

/// A blue-green rebuild while 8 writers append: the old version's table is
/// read throughout, the swap happens while the writers run, the old runner
/// stops at its first batch after the swap, the new runner goes on from the
/// swapped checkpoint, and the table ends equal to a fold of every event,
/// none lost or applied twice; no shadow or retired table is left.
#[tokio::test]
async fn issue8_blue_green_rebuild_while_eight_writers_append() {
    let store = fresh_store().await;
    let v1 = live_v1(&store, 200).await;

    let swapped = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (store, swapped) = (store.clone(), Arc::clone(&swapped));
        writers.push(tokio::spawn(async move {
            let (mut n, mut after_swap) = (0i64, 0);
            // Until 30 events of this writer landed after the swap.
            while after_swap < 30 {
                store
                    .append(
                        &sid(&format!("Acc-{w}")),
                        ExpectedVersion::Any,
                        vec![ev("D", 1000 + n)],
                    )
                    .await
                    .expect("append");
                n += 1;
                if swapped.load(Ordering::SeqCst) {
                    after_swap += 1;
                }
                tokio::task::yield_now().await;
            }
            n
        }));
    }
    // A reader of the live table, on its own connection, until the swap.
    let reading = Arc::new(AtomicBool::new(true));
    let reader = {
        let (path, reading) = (store.path().to_owned(), Arc::clone(&reading));
        tokio::task::spawn_blocking(move || {
            let conn = rusqlite::Connection::open(path).expect("open");
            conn.busy_timeout(Duration::from_secs(10)).expect("busy");
            let mut reads = 0u64;
            while reading.load(Ordering::SeqCst) {
                let n: i64 = conn
                    .query_row("SELECT count(*) FROM totals", [], |r| r.get(0))
                    .expect("the live table is readable throughout the rebuild");
                assert!(n > 0, "the live table keeps its rows");
                reads += 1;
            }
            reads
        })
    };

    let v2 = Totals::new(2);
    let handled = Arc::clone(&v2.handled);
    let mut reports = 0;
    let applier = ProjectionRunner::new(store.clone(), store.transactional(v2))
        .with_options(options())
        .rebuild_blue_green(rebuild_options(true), |_| reports += 1)
        .await
        .expect("blue-green rebuild");
    swapped.store(true, Ordering::SeqCst);
    reading.store(false, Ordering::SeqCst);
    assert!(reports >= 2, "progress after each checkpoint");
    assert!(
        handled.load(Ordering::SeqCst) >= 200,
        "v2 built from the start"
    );
    assert_eq!(active_version(&store), Some(2));
    assert!(reader.await.expect("reader") > 0);

    let v2_runner = ProjectionRunner::new(store.clone(), applier)
        .with_options(options())
        .spawn();
    let mut total = 0;
    for w in writers {
        total += w.await.expect("writer");
    }
    assert!(total >= 8 * 30);
    let head = store.head_position().await.expect("head").expect("events");
    v2_runner.wait_for(head, PATIENCE).await.expect("v2 live");
    // The old runner met the swap at its first batch after it.
    let old = tokio::time::timeout(PATIENCE, v1.join())
        .await
        .expect("the v1 runner stops by itself");
    let err = old.err().expect("v1 stops with an error");
    assert!(err.to_string().contains("superseded by v2"), "{err}");
    v2_runner.stop().await.expect("stop v2");

    assert_eq!(table(&store, "totals"), fold(&store).await);
    assert_eq!(tables_like(&store, "totals__bg%"), Vec::<String>::new());
    assert_eq!(
        store
            .load_checkpoint(&shadow_checkpoint_name(&checkpoint_name("totals", 2)))
            .await
            .expect("load"),
        None,
        "the shadow checkpoint moved to totals@v2"
    );
    assert_eq!(
        store
            .load_checkpoint(&checkpoint_name("totals", 2))
            .await
            .expect("load"),
        Some(head)
    );
    // A runner of the old version started again is refused at its batch.
    let late = seed(&store, 1).await;
    let again = ProjectionRunner::new(store.clone(), store.transactional(Totals::new(1)))
        .with_options(options())
        .spawn();
    let err = tokio::time::timeout(PATIENCE, again.join())
        .await
        .expect("ends")
        .err()
        .expect("refused");
    assert!(err.to_string().contains("superseded"), "{err}");
    assert!(late > head);
    // And a blue-green rebuild of the old version is refused.
    let err = ProjectionRunner::new(store.clone(), store.transactional(Totals::new(1)))
        .rebuild_blue_green(rebuild_options(true), |_| {})
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(
            err,
            ProjectionError::Superseded {
                version: 1,
                active: 2,
                ..
            }
        ),
        "{err}"
    );
}

/// A blue-green rebuild that fails leaves the live table, the live
/// checkpoint and the active version untouched; called again it resumes
/// from its shadow checkpoint (not from the first event) and swaps.
#[tokio::test]
async fn issue8_failed_blue_green_rebuild_leaves_the_live_projection() {
    let store = fresh_store().await;
    let v1 = live_v1(&store, 300).await;
    let live_rows = table(&store, "totals");
    let live_checkpoint = store
        .load_checkpoint(&checkpoint_name("totals", 1))
        .await
        .expect("load");

    let v2 = Totals::new(2);
    v2.fail_on.store(150, Ordering::SeqCst);
    let err = ProjectionRunner::new(store.clone(), store.transactional(v2))
        .with_options(options())
        .rebuild_blue_green(rebuild_options(true), |_| {})
        .await
        .err()
        .expect("the rebuild fails");
    assert!(matches!(err, ProjectionError::Handler { .. }), "{err}");

    assert_eq!(table(&store, "totals"), live_rows, "live rows untouched");
    assert_eq!(
        store
            .load_checkpoint(&checkpoint_name("totals", 1))
            .await
            .expect("load"),
        live_checkpoint
    );
    assert_eq!(active_version(&store), None, "no swap");
    assert_eq!(
        store
            .load_checkpoint(&checkpoint_name("totals", 2))
            .await
            .expect("load"),
        None
    );
    let shadow_at = store
        .load_checkpoint(&shadow_checkpoint_name(&checkpoint_name("totals", 2)))
        .await
        .expect("load")
        .expect("the shadow build checkpointed before the failure");
    assert_eq!(tables_like(&store, "totals__bg_v2"), vec!["totals__bg_v2"]);
    assert!(v1.is_running(), "the live runner kept running");

    // Resumed: the events up to the shadow checkpoint are not handled again.
    let fixed = Totals::new(2);
    let handled = Arc::clone(&fixed.handled);
    let applier = ProjectionRunner::new(store.clone(), store.transactional(fixed))
        .with_options(options())
        .rebuild_blue_green(rebuild_options(false), |_| {})
        .await
        .expect("resumed rebuild");
    let before = store
        .count_events_between(GlobalPosition::START, shadow_at)
        .await
        .expect("count");
    assert!(before > 0);
    assert_eq!(handled.load(Ordering::SeqCst), 300 - before);
    assert_eq!(active_version(&store), Some(2));
    drop(applier);
    let _ = v1.stop().await;
    assert_eq!(table(&store, "totals"), fold(&store).await);
}

/// A blue-green rebuild cancelled mid-way (its future dropped, as a crash
/// would) leaves the live projection untouched; a new store handle on the
/// file (a restarted process) resumes it once the lease expired.
#[tokio::test]
async fn issue8_cancelled_blue_green_rebuild_resumes_after_a_restart() {
    let store = fresh_store().await;
    let v1 = live_v1(&store, 400).await;
    let live_rows = table(&store, "totals");

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let rebuild = ProjectionRunner::new(store.clone(), store.transactional(Totals::new(2)))
        .with_options(options())
        .lock_ttl(Duration::from_millis(300))
        .rebuild_blue_green(rebuild_options(true), move |p| {
            let _ = tx.send(p.position);
        });
    tokio::select! {
        out = rebuild => panic!("the rebuild ended before it was cancelled: {:?}", out.map(drop)),
        // Cancelled after its second checkpoint: the future is dropped.
        _ = async { rx.recv().await; rx.recv().await } => {}
    }
    assert_eq!(table(&store, "totals"), live_rows, "live rows untouched");
    assert_eq!(active_version(&store), None);
    // The batch in flight when the future was dropped (the rebuild reads
    // ahead, so it may already be a writer job) commits or not, with its
    // checkpoint, as one transaction; a write queued behind it on the same
    // writer waits for it, so the shadow checkpoint read next is final.
    store
        .save_checkpoint("drain", GlobalPosition::START)
        .await
        .expect("a write behind the batch in flight");
    let shadow_at = store
        .load_checkpoint(&shadow_checkpoint_name(&checkpoint_name("totals", 2)))
        .await
        .expect("load")
        .expect("shadow checkpoint");

    let restarted = SqliteEventStore::open(store.path()).await.expect("reopen");
    let fixed = Totals::new(2);
    let handled = Arc::clone(&fixed.handled);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let applier = loop {
        let attempt = ProjectionRunner::new(
            restarted.clone(),
            restarted.transactional(Totals {
                version: 2,
                fail_on: Arc::new(AtomicI64::new(-1)),
                handled: Arc::clone(&handled),
            }),
        )
        .with_options(options())
        .rebuild_blue_green(rebuild_options(false), |_| {})
        .await;
        match attempt {
            Ok(a) => break a,
            // The cancelled rebuild's lease has not expired yet.
            Err(ProjectionError::Locked { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("resume failed: {e}"),
        }
    };
    drop(fixed);
    let before = restarted
        .count_events_between(GlobalPosition::START, shadow_at)
        .await
        .expect("count");
    assert!(before >= 32);
    assert_eq!(
        handled.load(Ordering::SeqCst),
        400 - before,
        "resumed, not restarted"
    );
    drop(applier);
    let _ = v1.stop().await;
    assert_eq!(active_version(&restarted), Some(2));
    assert_eq!(table(&restarted, "totals"), fold(&restarted).await);
}

/// A blue-green rebuild paused past its lock's lease, whose lock another
/// rebuild of the same version took over: its swap and its own
/// `enter_shadow` fail with `Error::Fenced` and change nothing, so the
/// rebuild that took over keeps its shadow tables and checkpoint, and the
/// live version stays as it was (`annals_testkit::check_blue_green_steps_are_fenced`).
#[tokio::test]
async fn a_blue_green_rebuild_whose_lock_was_taken_over_neither_swaps_nor_resets() {
    let store = fresh_store().await;
    let v1 = live_v1(&store, 40).await;
    let shadow = annals::shadow_table("totals", 2);
    annals_testkit::check_blue_green_steps_are_fenced(
        &store,
        || store.transactional(Totals::new(2)),
        async || (table(&store, "totals"), table(&store, &shadow)),
    )
    .await;
    v1.stop().await.expect("v1 stops");
}
