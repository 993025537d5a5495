//! Subscriptions and projections: feed pages that scan through events that do
//! not match, catch-up then live delivery exactly once and in order, a
//! filtered projection whose checkpoint moves through a long stretch of
//! other events, 8 concurrent writers under a running projection (the read
//! model equals a fold of all events), resume from the checkpoint, a poison
//! event, and read-your-writes with `wait_for`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use annals::{
    checkpoint_name, projection_lag, wait_for, Backoff, BatchContext, EventStore, ExpectedVersion,
    GlobalPosition, HandlerError, IdempotencyGuard, Projection, ProjectionControl, ProjectionError,
    ProjectionFilter, ProjectionRunner, ReadAll, RecordedEvent, RunnerOptions, StreamId,
    Subscription, SubscriptionOptions,
};
use annals::{
    lock_owner, retry_dead_letter, AtLeastOnce, ErrorPolicy, ProjectionState, RebuildOptions,
    RebuildProgress,
};

use super::{ev, n_of, read_all_vec, sid};

/// Long enough for any healthy wait in these tests; a wait that takes it
/// is a failure.
const PATIENCE: Duration = Duration::from_secs(30);

/// Fast retries and a short poll, so the error paths finish quickly.
fn quick() -> RunnerOptions {
    RunnerOptions {
        batch_size: 50,
        poll_interval: Duration::from_millis(50),
        store_retry: Backoff {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(100),
            max_attempts: 20,
        },
        handler_retry: Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(5),
            max_attempts: 3,
        },
    }
}

/// The read model of the test projection: per stream, the sum of the
/// events' `n` and the events counted, guarded by the last applied position.
#[derive(Default)]
struct Model {
    rows: HashMap<StreamId, (IdempotencyGuard, i64, u64)>,
    /// Every event id handled (with repeats), and each batch's flag.
    handled: Vec<annals::EventId>,
    replaying: Vec<bool>,
    /// Once true, the poison type no longer fails (the handler was fixed).
    healed: bool,
    /// Each event handled: its stream and position, in handling order.
    order: Vec<(StreamId, GlobalPosition)>,
}

#[derive(Clone)]
struct Sums {
    name: String,
    filter: ProjectionFilter,
    model: Arc<Mutex<Model>>,
    /// Fail every batch holding an event of this type.
    poison: Option<String>,
}

impl Sums {
    fn new(name: &str, filter: ProjectionFilter) -> Self {
        Sums {
            name: name.to_owned(),
            filter,
            model: Arc::default(),
            poison: None,
        }
    }

    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.model.lock().expect("model lock")
    }
}

impl Projection for Sums {
    fn name(&self) -> &str {
        &self.name
    }
    fn filter(&self) -> ProjectionFilter {
        self.filter.clone()
    }
    async fn handle(
        &mut self,
        events: &[RecordedEvent],
        ctx: &BatchContext,
    ) -> Result<(), HandlerError> {
        let mut m = self.model();
        m.replaying.push(ctx.replaying);
        for e in events {
            if self.poison.as_deref() == Some(e.event_type.as_str()) && !m.healed {
                return Err(format!("cannot apply {}", e.event_type).into());
            }
            m.handled.push(e.event_id);
            m.order.push((e.stream_id.clone(), e.global_position));
            let row = m.rows.entry(e.stream_id.clone()).or_default();
            if row.0.admit(e.global_position) {
                row.1 += n_of(&e.data).unwrap_or(0);
                row.2 += 1;
            }
        }
        Ok(())
    }
}

/// The fold the read model must equal: per stream, the sum and count of
/// every event that `filter` admits.
async fn fold<S: EventStore>(store: &S, filter: &ReadAll) -> HashMap<StreamId, (i64, u64)> {
    let mut out: HashMap<StreamId, (i64, u64)> = HashMap::new();
    for e in read_all_vec(store, filter.clone()).await {
        let row = out.entry(e.stream_id.clone()).or_default();
        row.0 += n_of(&e.data).unwrap_or(0);
        row.1 += 1;
    }
    out
}

fn rows_of(model: &Model) -> HashMap<StreamId, (i64, u64)> {
    model
        .rows
        .iter()
        .map(|(k, (_, sum, n))| (k.clone(), (*sum, *n)))
        .collect()
}

async fn head<S: EventStore>(store: &S) -> GlobalPosition {
    store
        .head_position()
        .await
        .expect("head")
        .expect("a non-empty store")
}

/// `read_feed_page` scans through events that do not match: `scanned_to`
/// moves to the head even when nothing matched, a full page stops at its
/// last event, and the next page from `scanned_to` goes on without a repeat.
pub async fn feed_pages_scan_through_non_matching_events<S: EventStore>(store: S) {
    let filter = ReadAll::from_start().event_types(["Rare"]);
    let empty = store.read_feed_page(&filter, 10).await.expect("empty page");
    assert!(empty.events.is_empty() && empty.at_end);
    assert_eq!(empty.scanned_to, GlobalPosition::START);

    let rare = store
        .append(&sid("Feed-r"), ExpectedVersion::Any, vec![ev("Rare", 1)])
        .await
        .expect("rare");
    for chunk in 0..6 {
        let events = (0..100).map(|i| ev("Common", chunk * 100 + i)).collect();
        store
            .append(&sid("Feed-c"), ExpectedVersion::Any, events)
            .await
            .expect("commons");
    }
    let top = head(&store).await;
    let page = store.read_feed_page(&filter, 10).await.expect("page");
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.events[0].global_position, rare.positions[0]);
    assert_eq!(page.scanned_to, top, "the scan passed the 600 other events");
    assert!(page.at_end);

    // Nothing matches after it: the scan still reaches the head.
    let after = store
        .read_feed_page(&ReadAll::after(rare.positions[0]).event_types(["Rare"]), 10)
        .await
        .expect("page after");
    assert!(after.events.is_empty());
    assert_eq!(after.scanned_to, top);

    // A full page stops at its last event; the next one goes on from there.
    let more = store
        .append(
            &sid("Feed-r"),
            ExpectedVersion::Any,
            vec![ev("Rare", 2), ev("Common", 0), ev("Rare", 3)],
        )
        .await
        .expect("more");
    let first = store
        .read_feed_page(&ReadAll::after(top).event_types(["Rare"]), 1)
        .await
        .expect("first");
    assert_eq!(first.events.len(), 1);
    assert_eq!(first.scanned_to, more.positions[0]);
    assert!(!first.at_end);
    let second = store
        .read_feed_page(&ReadAll::after(first.scanned_to).event_types(["Rare"]), 1)
        .await
        .expect("second");
    assert_eq!(second.events.len(), 1);
    assert_eq!(second.events[0].global_position, more.positions[2]);

    // Categories filter the same way.
    let cats = store
        .read_feed_page(&ReadAll::from_start().categories(["Nope"]), 10)
        .await
        .expect("categories");
    assert!(cats.events.is_empty());
    assert_eq!(cats.scanned_to, head(&store).await);
}

/// `read_feed_pages` yields, page by page, what a loop of `read_feed_page`
/// from each page's `scanned_to` returns (the same events, the same
/// `scanned_to`, the same `at_end`), unfiltered and filtered, from the start
/// and from the middle, and ends after the page at the end of the log.
pub async fn feed_pages_read_as_a_loop_of_feed_page<S: EventStore>(store: S) {
    for i in 0..30 {
        let (stream, kind) = match i % 3 {
            0 => ("FeedsA-1", "Rare"),
            1 => ("FeedsB-1", "Common"),
            _ => ("FeedsA-2", "Common"),
        };
        store
            .append(&sid(stream), ExpectedVersion::Any, vec![ev(kind, i)])
            .await
            .expect("append");
    }
    let all = read_all_vec(&store, ReadAll::from_start()).await;
    let middle = all[12].global_position;
    let filters = [
        ReadAll::from_start(),
        ReadAll::after(middle),
        ReadAll::from_start().event_types(["Rare"]),
        ReadAll::after(middle).categories(["FeedsA"]),
        ReadAll::from_start().categories(["Nobody"]),
    ];
    for filter in filters {
        for limit in [1, 4, 10, 30, 100] {
            crate::check_feed_pages(&store, &filter, limit).await;
        }
    }
}

/// While catching up, a subscription reads the next page while its caller
/// still holds the batch before it; a read ahead that fails (a lost
/// connection) is read again when the caller asks for it, so every event
/// still arrives once, in order.
pub async fn subscription_reads_the_next_page_ahead<S: EventStore>(store: S) {
    let faulty = crate::FaultyStore::new(store.clone(), i64::MAX);
    let mut expected = Vec::new();
    for i in 0..10 {
        let r = store
            .append(&sid("Ahead-1"), ExpectedVersion::Any, vec![ev("E", i)])
            .await
            .expect("append");
        expected.extend(r.positions);
    }
    // Read 1 is the first page, read 2 the second page read ahead.
    faulty.fail_feed_read(2);
    let mut reads = faulty.feed_reads();
    let options = SubscriptionOptions::default()
        .batch_size(3)
        .poll_interval(Duration::from_secs(3600))
        .retry(Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(10),
            max_attempts: 5,
        });
    let mut sub = Subscription::new(faulty.clone(), GlobalPosition::START, options);
    // Nobody asks for the second page, yet it is read.
    let seen = hold_first_then_catch_up(&mut sub, &mut reads, 2).await;
    assert_eq!(
        seen, expected,
        "every event once, in order, across the failed read ahead"
    );
    // Pages 1 and 2 (failed), 2 again, then 3 and 4 read ahead; none after
    // the last page, which reached the end.
    assert_eq!(*reads.borrow(), 5, "feed reads");
}

/// Takes a subscription's first batch (three events, its batch size) and,
/// while holding it, waits until the store has had `reads` feed reads in
/// all; then takes the rest of the catch-up in batches of at most three.
/// The positions delivered, in order.
async fn hold_first_then_catch_up<S: EventStore>(
    sub: &mut Subscription<S>,
    feed_reads: &mut tokio::sync::watch::Receiver<u64>,
    reads: u64,
) -> Vec<GlobalPosition> {
    let first = sub.next_batch().await.expect("first batch");
    assert_eq!(first.events.len(), 3);
    tokio::time::timeout(PATIENCE, feed_reads.wait_for(|n| *n >= reads))
        .await
        .unwrap_or_else(|_| panic!("{reads} feed reads while the first batch is held"))
        .expect("feed read counter");
    let mut seen: Vec<GlobalPosition> = first.events.iter().map(|e| e.global_position).collect();
    while !sub.is_caught_up() {
        let batch = sub.next_batch().await.expect("batch");
        assert!(batch.events.len() <= 3, "bounded batches");
        seen.extend(batch.events.iter().map(|e| e.global_position));
    }
    seen
}

/// While catching up, a subscription reads two pages ahead of the batch
/// its caller holds, each as soon as the one before it is read (the store
/// does not wait for the caller between pages), and reads each page once:
/// none twice, none after the end of the log.
pub async fn subscription_reads_two_pages_ahead<S: EventStore>(store: S) {
    let counted = crate::FaultyStore::new(store.clone(), i64::MAX);
    let mut expected = Vec::new();
    for i in 0..11 {
        let r = store
            .append(&sid("Ahead2-1"), ExpectedVersion::Any, vec![ev("E", i)])
            .await
            .expect("append");
        expected.extend(r.positions);
    }
    let mut reads = counted.feed_reads();
    let options = SubscriptionOptions::default()
        .batch_size(3)
        .poll_interval(Duration::from_secs(3600));
    let mut sub = Subscription::new(counted.clone(), GlobalPosition::START, options);
    // The caller still holds batch 1; pages 2 and 3 are read meanwhile.
    let seen = hold_first_then_catch_up(&mut sub, &mut reads, 3).await;
    assert_eq!(seen, expected, "every event once, in order");
    // Pages of 3, 3, 3 and 2 events: four reads, the last at the end.
    assert_eq!(*reads.borrow(), 4, "feed reads");
}

/// A subscription catches up from the start, in bounded batches flagged as
/// replays, then follows new appends live: every event once, in order.
pub async fn subscription_catch_up_then_live<S: EventStore>(store: S) {
    let mut expected = Vec::new();
    for i in 0..20 {
        let r = store
            .append(
                &sid(&format!("Sub-{}", i % 3)),
                ExpectedVersion::Any,
                vec![ev("E", i)],
            )
            .await
            .expect("append");
        expected.extend(r.positions);
    }
    let options = SubscriptionOptions::default()
        .batch_size(7)
        .poll_interval(Duration::from_millis(50));
    let mut sub = Subscription::new(store.clone(), GlobalPosition::START, options);
    let mut seen = Vec::new();
    let mut flags = Vec::new();
    while seen.len() < 20 {
        let batch = sub.next_batch().await.expect("batch");
        assert!(batch.events.len() <= 7, "bounded batches");
        flags.push(batch.replaying);
        seen.extend(batch.events.iter().map(|e| e.global_position));
    }
    assert_eq!(
        seen, expected,
        "catch-up delivers every event once, in order"
    );
    assert!(flags.iter().all(|r| *r), "catch-up batches are replays");

    // Live: appends made while the subscription waits.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..10 {
                let r = store
                    .append(
                        &sid("Sub-live"),
                        ExpectedVersion::Any,
                        vec![ev("E", 100 + i)],
                    )
                    .await
                    .expect("live append");
                out.extend(r.positions);
            }
            out
        })
    };
    let mut live = Vec::new();
    let mut live_flags = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while live.len() < 10 {
        let batch = tokio::time::timeout_at(deadline, sub.next_batch())
            .await
            .expect("live events arrive")
            .expect("batch");
        if !batch.events.is_empty() {
            live_flags.push(batch.replaying);
        }
        live.extend(batch.events.iter().map(|e| e.global_position));
    }
    let written = writer.await.expect("writer");
    let mut sorted = written.clone();
    sorted.sort();
    assert_eq!(live, sorted, "live events once each, in global order");
    assert!(
        live_flags.iter().all(|r| !r),
        "live batches are not replays"
    );
    assert_eq!(sub.position(), *live.last().expect("some"));
}

/// A projection of a rare type over a long stretch of other events: its
/// checkpoint moves to the head without the handler being called, and its
/// lag drops to zero.
pub async fn filtered_projection_advances_through_other_events<
    S: EventStore + ProjectionControl,
>(
    store: S,
) {
    for chunk in 0..10 {
        let events = (0..100).map(|i| ev("Common", chunk * 100 + i)).collect();
        store
            .append(&sid("Skip-c"), ExpectedVersion::Any, events)
            .await
            .expect("commons");
    }
    let top = head(&store).await;
    let sums = Sums::new("rare-sums", ProjectionFilter::all().event_types(["Rare"]));
    let handle = ProjectionRunner::at_least_once(store.clone(), sums.clone())
        .with_options(quick())
        .spawn();
    handle
        .wait_for(top, PATIENCE)
        .await
        .expect("checkpoint moves");
    assert!(sums.model().handled.is_empty(), "no event matched");
    let name = checkpoint_name("rare-sums", 1);
    assert_eq!(handle.checkpoint_name(), name);
    assert!(store.load_checkpoint(&name).await.expect("load") >= Some(top));
    let lag = projection_lag(&store, &name).await.expect("lag");
    assert_eq!(lag.events, 0);
    assert_eq!(lag.head, Some(top));

    // A rare event after the stretch is delivered.
    let r = store
        .append(&sid("Skip-r"), ExpectedVersion::Any, vec![ev("Rare", 7)])
        .await
        .expect("rare");
    handle
        .wait_for(r.positions[0], PATIENCE)
        .await
        .expect("rare event handled");
    assert_eq!(sums.model().handled.len(), 1);
    handle.stop().await.expect("stop");
}

/// 8 concurrent writers while a projection runs: once it has reached the
/// last position any append returned, its read model equals a fold of all
/// events (none lost, none applied twice).
pub async fn projection_with_concurrent_writers_equals_fold<S: EventStore + ProjectionControl>(
    store: S,
) {
    let sums = Sums::new("sums", ProjectionFilter::all().categories(["Acc"]));
    let handle = ProjectionRunner::at_least_once(store.clone(), sums.clone())
        .with_options(quick())
        .spawn();
    let mut writers = Vec::new();
    for w in 0..8i64 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut last = GlobalPosition::START;
            for i in 0..25i64 {
                let stream = sid(&format!("Acc-{}", (w + i) % 5));
                let events = if i % 5 == 0 {
                    (0..4)
                        .map(|k| ev("Deposited", w * 1000 + i * 10 + k))
                        .collect()
                } else {
                    vec![ev("Deposited", w * 1000 + i)]
                };
                let r = store
                    .append(&stream, ExpectedVersion::Any, events)
                    .await
                    .expect("append");
                // Noise the filter skips.
                store
                    .append(
                        &sid(&format!("Noise-{w}")),
                        ExpectedVersion::Any,
                        vec![ev("N", i)],
                    )
                    .await
                    .expect("noise");
                last = last.max(*r.positions.last().expect("positions"));
            }
            last
        }));
    }
    let mut last = GlobalPosition::START;
    for w in writers {
        last = last.max(w.await.expect("writer"));
    }
    handle.wait_for(last, PATIENCE).await.expect("caught up");
    let expected = fold(&store, &ReadAll::from_start().categories(["Acc"])).await;
    {
        let model = sums.model();
        assert_eq!(rows_of(&model), expected, "read model = fold of all events");
        let distinct: HashSet<_> = model.handled.iter().collect();
        assert_eq!(
            distinct.len(),
            model.handled.len(),
            "no event delivered twice"
        );
    }
    handle.stop().await.expect("stop");
}

/// A stopped projection resumes from its checkpoint: the second run handles
/// only the events appended since.
pub async fn projection_resumes_from_checkpoint<S: EventStore + ProjectionControl>(store: S) {
    let first = store
        .append(
            &sid("Res-1"),
            ExpectedVersion::Any,
            (0..30).map(|i| ev("E", i)).collect(),
        )
        .await
        .expect("first");
    let sums = Sums::new("resume", ProjectionFilter::all());
    let handle = ProjectionRunner::at_least_once(store.clone(), sums.clone())
        .with_options(quick())
        .spawn();
    handle
        .wait_for(*first.positions.last().expect("some"), PATIENCE)
        .await
        .expect("first run");
    handle.stop().await.expect("stop");
    assert_eq!(sums.model().handled.len(), 30);
    assert!(sums.model().replaying.iter().all(|r| *r));

    let second = store
        .append(
            &sid("Res-1"),
            ExpectedVersion::Any,
            (30..45).map(|i| ev("E", i)).collect(),
        )
        .await
        .expect("second");
    let again = Sums::new("resume", ProjectionFilter::all());
    let handle = ProjectionRunner::at_least_once(store.clone(), again.clone())
        .with_options(quick())
        .spawn();
    handle
        .wait_for(*second.positions.last().expect("some"), PATIENCE)
        .await
        .expect("second run");
    handle.stop().await.expect("stop");
    let ids: Vec<_> = again.model().handled.clone();
    let expected: Vec<_> =
        read_all_vec(&store, ReadAll::after(*first.positions.last().expect("x")))
            .await
            .iter()
            .map(|e| e.event_id)
            .collect();
    assert_eq!(ids, expected, "only the new events, once each");
}

/// A poison event stops the runner with a typed error naming the
/// projection, the event's position, stream and type; the checkpoint stays
/// just before it, with every earlier event applied.
pub async fn poison_event_stops_the_projection<S: EventStore + ProjectionControl>(store: S) {
    let good = store
        .append(
            &sid("Poi-1"),
            ExpectedVersion::Any,
            (0..5).map(|i| ev("Good", i)).collect(),
        )
        .await
        .expect("good");
    let bad = store
        .append(&sid("Poi-2"), ExpectedVersion::Any, vec![ev("Poison", 0)])
        .await
        .expect("poison");
    store
        .append(
            &sid("Poi-1"),
            ExpectedVersion::Any,
            (5..8).map(|i| ev("Good", i)).collect(),
        )
        .await
        .expect("after");
    let mut sums = Sums::new("poisoned", ProjectionFilter::all());
    sums.poison = Some("Poison".into());
    let handle = ProjectionRunner::at_least_once(store.clone(), sums.clone())
        .with_options(quick())
        .spawn();
    let err = match tokio::time::timeout(PATIENCE, handle.join()).await {
        Ok(Err(err)) => err,
        Ok(Ok(_)) => panic!("the runner ended without an error"),
        Err(_) => panic!("the runner did not stop on the poison event"),
    };
    match &err {
        ProjectionError::Handler {
            projection,
            position,
            stream,
            event_type,
            attempts,
            ..
        } => {
            assert_eq!(projection, "poisoned");
            assert_eq!(*position, bad.positions[0]);
            assert_eq!(stream, &sid("Poi-2"));
            assert_eq!(event_type, "Poison");
            assert_eq!(*attempts, 3);
        }
        other => panic!("expected a handler error, got {other}"),
    }
    let text = err.to_string();
    assert!(text.contains("Poi-2") && text.contains("Poison"), "{text}");
    let checkpoint = store
        .load_checkpoint(&checkpoint_name("poisoned", 1))
        .await
        .expect("load");
    assert_eq!(checkpoint, Some(*good.positions.last().expect("some")));
    let applied: HashSet<_> = sums.model().handled.iter().copied().collect();
    for e in read_all_vec(&store, ReadAll::from_start()).await {
        let before = e.global_position < bad.positions[0];
        assert_eq!(
            applied.contains(&e.event_id),
            before,
            "{}",
            e.global_position
        );
    }
}

/// Read-your-writes: `wait_for` returns once the checkpoint has reached a
/// position, and times out with a typed error naming where it stands.
pub async fn wait_for_reaches_or_times_out<S: EventStore + ProjectionControl>(store: S) {
    let name = checkpoint_name("rw", 1);
    let r = store
        .append(
            &sid("Rw-1"),
            ExpectedVersion::Any,
            vec![ev("E", 1), ev("E", 2)],
        )
        .await
        .expect("append");
    let waited = wait_for(&store, &name, r.positions[1], Duration::from_millis(30)).await;
    match waited {
        Err(ProjectionError::WaitTimeout {
            checkpoint,
            position,
            reached,
            ..
        }) => {
            assert_eq!(checkpoint, name);
            assert_eq!(position, r.positions[1]);
            assert_eq!(reached, None);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let lag = projection_lag(&store, &name).await.expect("lag");
    assert_eq!(lag.events, 2);

    let sums = Sums::new("rw", ProjectionFilter::all());
    let handle = ProjectionRunner::at_least_once(store.clone(), sums)
        .with_options(quick())
        .spawn();
    wait_for(&store, &name, r.positions[1], PATIENCE)
        .await
        .expect("reached");
    handle
        .wait_for(r.positions[1], PATIENCE)
        .await
        .expect("handle");
    let later = store
        .append(&sid("Rw-1"), ExpectedVersion::Any, vec![ev("E", 3)])
        .await
        .expect("later");
    handle
        .wait_for(later.positions[0], PATIENCE)
        .await
        .expect("later reached");
    handle.stop().await.expect("stop");
    match wait_for(
        &store,
        &name,
        GlobalPosition::new(u32::MAX as u64, 0),
        Duration::from_millis(20),
    )
    .await
    {
        Err(ProjectionError::WaitTimeout { reached, .. }) => {
            assert_eq!(reached, Some(later.positions[0]))
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

/// A checkpoint that cannot be saved (writes fail, [`crate::FaultyStore`])
/// stops the runner with [`ProjectionError::Store`] and no checkpoint; the
/// next run delivers the same events again (at-least-once), and the
/// read model's [`IdempotencyGuard`] applies each of them once.
pub async fn failed_checkpoint_redelivers_and_the_guard_absorbs_it<
    S: EventStore + ProjectionControl,
>(
    store: S,
) {
    let r = store
        .append(
            &sid("Fcp-1"),
            ExpectedVersion::Any,
            (1..=6).map(|i| ev("E", i)).collect(),
        )
        .await
        .expect("append");
    let faulty = crate::FaultyStore::new(store.clone(), 0);
    let sums = Sums::new("faulty", ProjectionFilter::all());
    let handle = ProjectionRunner::at_least_once(faulty.clone(), sums.clone())
        .with_options(quick())
        .spawn();
    match tokio::time::timeout(PATIENCE, handle.join()).await {
        Ok(Err(ProjectionError::Store { projection, source })) => {
            assert_eq!(projection, "faulty");
            assert!(
                source.to_string().contains("injected write failure"),
                "{source}"
            );
        }
        Ok(Err(other)) => panic!("expected a store error, got {other}"),
        Ok(Ok(_)) => panic!("the runner ended without an error"),
        Err(_) => panic!("the runner did not stop"),
    }
    let name = checkpoint_name("faulty", 1);
    assert_eq!(store.load_checkpoint(&name).await.expect("load"), None);
    assert_eq!(
        sums.model().handled.len(),
        6 * 3,
        "three attempts at the batch"
    );

    faulty.heal();
    let handle = ProjectionRunner::at_least_once(faulty, sums.clone())
        .with_options(quick())
        .spawn();
    handle
        .wait_for(r.positions[5], PATIENCE)
        .await
        .expect("resumed");
    handle.stop().await.expect("stop");
    let model = sums.model();
    assert_eq!(
        model.handled.len(),
        6 * 4,
        "delivered again after the failure"
    );
    assert_eq!(
        rows_of(&model),
        HashMap::from([(sid("Fcp-1"), (21, 6))]),
        "the guard applied each event once"
    );
}

/// Waits (polling with a deadline) until `checkpoint`'s lock is held.
async fn lock_taken<S: ProjectionControl>(store: &S, checkpoint: &str) -> annals::ProjectionLock {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(lock) = store.projection_lock(checkpoint).await.expect("lock row") {
            return lock;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lock of {checkpoint} was never taken"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The projection lock: while a runner of a projection version runs, a
/// second runner and a rebuild of it are refused with
/// [`ProjectionError::Locked`] naming the holder (its process); another
/// version is not affected; once the first runner stops (and releases the
/// lock), the second one starts.
pub async fn second_runner_of_a_projection_is_refused<S: EventStore + ProjectionControl>(store: S) {
    let r = store
        .append(
            &sid("Lck-1"),
            ExpectedVersion::Any,
            (1..=5).map(|i| ev("E", i)).collect(),
        )
        .await
        .expect("append");
    let cp = checkpoint_name("locked", 1);
    let sums = Sums::new("locked", ProjectionFilter::all());
    let first = ProjectionRunner::at_least_once(store.clone(), sums.clone())
        .with_options(quick())
        .spawn();
    first
        .wait_for(*r.positions.last().expect("some"), PATIENCE)
        .await
        .expect("first runner caught up");
    assert_eq!(first.state(), ProjectionState::Running);
    let held = lock_taken(&store, &cp).await;
    assert_eq!(held.owner, lock_owner());

    let second = ProjectionRunner::at_least_once(store.clone(), sums.clone())
        .with_options(quick())
        .spawn();
    match tokio::time::timeout(PATIENCE, second.join()).await {
        Ok(Err(ProjectionError::Locked {
            projection,
            checkpoint,
            owner,
            ..
        })) => {
            assert_eq!(projection, "locked");
            assert_eq!(checkpoint, cp);
            assert_eq!(owner, held.owner);
        }
        Ok(Err(other)) => panic!("expected Locked, got {other}"),
        Ok(Ok(_)) => panic!("a second runner of a locked projection ran"),
        Err(_) => panic!("the second runner neither ran nor failed"),
    }
    let rebuild = ProjectionRunner::at_least_once(store.clone(), sums.clone())
        .with_options(quick())
        .rebuild(RebuildOptions::default(), |_| {})
        .await;
    match rebuild {
        Err(e @ ProjectionError::Locked { .. }) => {
            assert!(e.to_string().contains(&held.owner), "{e}");
        }
        Err(other) => panic!("expected Locked, got {other}"),
        Ok(_) => panic!("a rebuild ran while the runner held the projection"),
    }
    // The same name at another version is another lock.
    struct V2(Sums);
    impl Projection for V2 {
        fn name(&self) -> &str {
            self.0.name()
        }
        fn version(&self) -> u32 {
            2
        }
        async fn handle(
            &mut self,
            events: &[RecordedEvent],
            ctx: &BatchContext,
        ) -> Result<(), HandlerError> {
            self.0.handle(events, ctx).await
        }
    }
    let v2 = Sums::new("locked", ProjectionFilter::all());
    ProjectionRunner::at_least_once(store.clone(), V2(v2))
        .with_options(quick())
        .rebuild(RebuildOptions::default(), |_| {})
        .await
        .expect("version 2 is not locked by version 1");

    first.stop().await.expect("first stops");
    assert_eq!(store.projection_lock(&cp).await.expect("lock row"), None);
    let again = ProjectionRunner::at_least_once(store.clone(), sums.clone())
        .with_options(quick())
        .spawn();
    again
        .wait_for(*r.positions.last().expect("some"), PATIENCE)
        .await
        .expect("runs once the first one stopped");
    assert!(again.is_running());
    again.stop().await.expect("stops");
}

/// A rebuild from position 0 in small batches fails (injected) mid-way:
/// the checkpoint is just before the failing event; the rebuild resumes
/// from there (nothing before it is handled again) and ends with the read
/// model equal to a fold of all events, `replaying` true for every batch,
/// and a progress report after each checkpoint, the last at the head.
pub async fn rebuild_fails_then_resumes_from_its_checkpoint<S: EventStore + ProjectionControl>(
    store: S,
) {
    for i in 0..6 {
        store
            .append(
                &sid(&format!("Reb-{}", i % 3)),
                ExpectedVersion::Any,
                (0..10).map(|n| ev("E", i * 10 + n)).collect(),
            )
            .await
            .expect("append");
    }
    let bad = store
        .append(&sid("Reb-9"), ExpectedVersion::Any, vec![ev("Bad", 1000)])
        .await
        .expect("bad");
    for i in 0..3 {
        store
            .append(
                &sid(&format!("Reb-{i}")),
                ExpectedVersion::Any,
                (0..10).map(|n| ev("E", n)).collect(),
            )
            .await
            .expect("append");
    }
    let cp = checkpoint_name("rebuilt", 1);
    // An old checkpoint, as a projection that ran before would have: the
    // rebuild from the start resets it.
    store
        .save_checkpoint(&cp, head(&store).await)
        .await
        .expect("old checkpoint");
    let mut sums = Sums::new("rebuilt", ProjectionFilter::all());
    sums.poison = Some("Bad".into());
    let options = RebuildOptions {
        batch_size: 4,
        checkpoint_every: 10,
        from_start: true,
    };
    let mut reports: Vec<RebuildProgress> = Vec::new();
    let err = ProjectionRunner::at_least_once(store.clone(), sums.clone())
        .with_options(quick())
        .rebuild(options, |p| reports.push(*p))
        .await
        .err()
        .expect("the injected failure stops the rebuild");
    match &err {
        ProjectionError::Handler { position, .. } => assert_eq!(*position, bad.positions[0]),
        other => panic!("expected a handler error, got {other}"),
    }
    let stopped_at = store
        .load_checkpoint(&cp)
        .await
        .expect("load")
        .expect("some");
    assert!(stopped_at < bad.positions[0], "{stopped_at}");
    let all = read_all_vec(&store, ReadAll::from_start()).await;
    let last_before = all
        .iter()
        .rfind(|e| e.global_position < bad.positions[0])
        .expect("events before");
    assert_eq!(stopped_at, last_before.global_position);
    assert!(!reports.is_empty(), "progress was reported");
    assert!(reports.windows(2).all(|w| w[0].position < w[1].position));
    assert!(reports
        .iter()
        .all(|p| p.position <= stopped_at && p.remaining > 0));
    // Each report's remaining count (kept from the previous report's, not
    // recounted over the rest of the log) is exact.
    for p in &reports {
        let head = p.head.expect("a head");
        let left = store
            .count_events_between(p.position, head)
            .await
            .expect("count");
        assert_eq!(p.remaining, left, "remaining at {}", p.position);
    }
    let before_resume = sums.model().handled.len();

    sums.model().healed = true;
    let mut resumed: Vec<RebuildProgress> = Vec::new();
    ProjectionRunner::at_least_once(store.clone(), sums.clone())
        .with_options(quick())
        .rebuild(
            RebuildOptions {
                from_start: false,
                ..options
            },
            |p| resumed.push(*p),
        )
        .await
        .expect("the resumed rebuild completes");
    let folded = fold(&store, &ReadAll::from_start()).await;
    {
        let m = sums.model();
        let positions: HashMap<_, _> = all
            .iter()
            .map(|e| (e.event_id, e.global_position))
            .collect();
        for id in &m.handled[before_resume..] {
            assert!(
                positions[id] > stopped_at,
                "an event before the checkpoint was handled again"
            );
        }
        assert!(
            m.replaying.iter().all(|r| *r),
            "every rebuild batch is a replay"
        );
        assert_eq!(rows_of(&m), folded);
    }
    let last = resumed.last().expect("progress");
    assert_eq!(last.position, head(&store).await);
    assert_eq!(last.head, Some(last.position));
    assert_eq!(last.remaining, 0);
    assert_eq!(
        last.events,
        store
            .count_events_between(stopped_at, last.position)
            .await
            .expect("count")
    );
    assert!(last.events_per_sec > 0.0);
    assert_eq!(
        store.load_checkpoint(&cp).await.expect("load"),
        Some(last.position)
    );
    assert_eq!(
        store.projection_lock(&cp).await.expect("lock"),
        None,
        "released"
    );
}

/// A rebuild with the default options over more events than one default
/// batch ([`annals::DEFAULT_REBUILD_BATCH`]) and a filter: batches of the
/// default size, the next one read while the one before is applied, each
/// matching event handled once and in order, the read model equal to the
/// fold, and one progress report per batch, the last at the head with every
/// event scanned.
pub async fn rebuild_in_default_batches_reads_ahead_and_equals_the_fold<
    S: EventStore + ProjectionControl,
>(
    store: S,
) {
    let per_append = 500usize;
    // Two thirds of the appends match: more than one default batch.
    let appends = annals::DEFAULT_REBUILD_BATCH.div_ceil(per_append) * 3 / 2 + 2;
    for i in 0..appends {
        // Every third append is of another category, which the filter
        // skips (the batches' scans still count it).
        let stream = if i % 3 == 2 {
            format!("Other-{}", i % 4)
        } else {
            format!("Big-{}", i % 4)
        };
        store
            .append(
                &sid(&stream),
                ExpectedVersion::Any,
                (0..per_append).map(|n| ev("E", n as i64)).collect(),
            )
            .await
            .expect("append");
    }
    let filter = ProjectionFilter::all().categories(["Big"]);
    let sums = Sums::new("big", filter.clone());
    let mut reports: Vec<RebuildProgress> = Vec::new();
    let options = RebuildOptions {
        from_start: true,
        ..RebuildOptions::default()
    };
    ProjectionRunner::at_least_once(store.clone(), sums.clone())
        .with_options(quick())
        .rebuild(options, |p| reports.push(*p))
        .await
        .expect("the rebuild completes");
    let read = ReadAll::from_start().categories(["Big"]);
    let matching = read_all_vec(&store, read.clone()).await;
    let folded = fold(&store, &read).await;
    {
        let m = sums.model();
        assert_eq!(
            m.handled,
            matching.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            "each matching event once, in global order"
        );
        assert_eq!(rows_of(&m), folded);
        assert!(m.replaying.iter().all(|r| *r));
        assert!(matching.len() > annals::DEFAULT_REBUILD_BATCH);
        assert!(m.replaying.len() >= 2, "{} batches", m.replaying.len());
    }
    let total = (appends * per_append) as u64;
    assert!(reports.windows(2).all(|w| w[0].position < w[1].position));
    let last = reports.last().expect("progress");
    assert_eq!(last.position, head(&store).await);
    assert_eq!((last.events, last.remaining), (total, 0));
    let cp = checkpoint_name("big", 1);
    assert_eq!(
        store.load_checkpoint(&cp).await.expect("load"),
        Some(last.position)
    );
}

/// A rebuild whose pages do not divide its batches (pages of 7, batches
/// of 10) cuts a page after a batch's tenth event and starts the next batch
/// with the rest: every batch but the last holds exactly ten events and
/// checkpoints at its tenth, with the other category's events in between
/// counted as scanned. A page read that fails (a lost connection) is read
/// again after a backoff: every matching event is handled once, in order.
pub async fn rebuild_cuts_pages_into_exact_batches_and_reads_a_lost_page_again<
    S: EventStore + ProjectionControl,
>(
    store: S,
) {
    let faulty = crate::FaultyStore::new(store.clone(), i64::MAX);
    for i in 0..40 {
        let stream = if i % 3 == 2 { "Other-1" } else { "Cut-1" };
        store
            .append(&sid(stream), ExpectedVersion::Any, vec![ev("E", i)])
            .await
            .expect("append");
    }
    // Reads 1 and 2 fill the first batch (the second is cut); read 3 is the
    // second batch's first page after the rest of the cut one.
    faulty.fail_feed_read(3);
    let filter = ProjectionFilter::all().categories(["Cut"]);
    let sums = Sums::new("cut", filter);
    let mut reports: Vec<RebuildProgress> = Vec::new();
    let options = RebuildOptions {
        from_start: true,
        batch_size: 7,
        checkpoint_every: 10,
    };
    ProjectionRunner::at_least_once(faulty.clone(), sums.clone())
        .with_options(quick())
        .rebuild(options, |p| reports.push(*p))
        .await
        .expect("the rebuild completes across the failed read");
    let read = ReadAll::from_start().categories(["Cut"]);
    let matching = read_all_vec(&store, read.clone()).await;
    assert_eq!(matching.len(), 27);
    {
        let m = sums.model();
        assert_eq!(
            m.handled,
            matching.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            "each matching event once, in global order"
        );
        assert_eq!(m.replaying.len(), 3, "batches of 10, 10 and 7");
    }
    let all = read_all_vec(&store, ReadAll::from_start()).await;
    let scanned_to =
        |p: GlobalPosition| all.iter().filter(|e| e.global_position <= p).count() as u64;
    let expected: Vec<(GlobalPosition, u64)> =
        [matching[9].global_position, matching[19].global_position]
            .into_iter()
            .chain([head(&store).await])
            .map(|p| (p, scanned_to(p)))
            .collect();
    assert_eq!(
        reports
            .iter()
            .map(|r| (r.position, r.events))
            .collect::<Vec<_>>(),
        expected,
        "each batch checkpoints at its tenth event, with every event before it scanned"
    );
    assert!(
        *faulty.feed_reads().borrow() > 3,
        "the failed read was made and read again"
    );
}

/// A rebuild reads the figures of a batch's progress report (the head of
/// the feed, and the events left up to it) while the batch is applied, not
/// after it, so that no store round trip stands between one batch and the
/// next. The test projection's handler holds batch `k` until the store has
/// had `k` head reads: one per batch, made beside the apply. The reports are
/// exact all the same.
pub async fn rebuild_reads_its_progress_figures_beside_the_apply<
    S: EventStore + ProjectionControl,
>(
    store: S,
) {
    let faulty = crate::FaultyStore::new(store.clone(), i64::MAX);
    store
        .append(
            &sid("Figures-1"),
            ExpectedVersion::Any,
            (0..25).map(|n| ev("E", n)).collect(),
        )
        .await
        .expect("append");
    let gate = HeadGate {
        head_reads: faulty.head_reads(),
        batches: Arc::default(),
    };
    let options = RebuildOptions {
        from_start: true,
        batch_size: 10,
        checkpoint_every: 10,
    };
    let mut reports: Vec<RebuildProgress> = Vec::new();
    ProjectionRunner::at_least_once(faulty.clone(), gate.clone())
        .with_options(quick())
        .rebuild(options, |p| reports.push(*p))
        .await
        .expect("every batch saw its head read while it was applied");
    assert_eq!(*gate.batches.lock().expect("batches"), [10, 10, 5]);
    let all = read_all_vec(&store, ReadAll::from_start()).await;
    let at = |i: usize| all[i].global_position;
    let end = at(24);
    let figures: Vec<_> = reports
        .iter()
        .map(|r| (r.position, r.head, r.events, r.remaining))
        .collect();
    assert_eq!(
        figures,
        [
            (at(9), Some(end), 10, 15),
            (at(19), Some(end), 20, 5),
            (end, Some(end), 25, 0),
        ]
    );
}

/// The projection of [`rebuild_reads_its_progress_figures_beside_the_apply`]:
/// holds its `k`-th batch until the store has had `k` head reads, and
/// records each batch's size.
#[derive(Clone)]
struct HeadGate {
    head_reads: tokio::sync::watch::Receiver<u64>,
    batches: Arc<Mutex<Vec<usize>>>,
}

impl Projection for HeadGate {
    fn name(&self) -> &str {
        "head-gate"
    }
    fn filter(&self) -> ProjectionFilter {
        ProjectionFilter::all()
    }
    async fn handle(
        &mut self,
        events: &[RecordedEvent],
        _ctx: &BatchContext,
    ) -> Result<(), HandlerError> {
        let k = self.batches.lock().expect("batches").len() as u64 + 1;
        let read = tokio::time::timeout(PATIENCE, self.head_reads.wait_for(|n| *n >= k)).await;
        assert!(
            matches!(read, Ok(Ok(_))),
            "batch {k} was held {PATIENCE:?} without the head read beside it"
        );
        self.batches.lock().expect("batches").push(events.len());
        Ok(())
    }
}

/// The `Park` error policy: a poison event is recorded in the dead-letter
/// table (projection, position, event id, stream, type, error, attempts,
/// time) and the runner goes on past it; a retry through the still-broken
/// handler fails and counts the attempt, a retry through the fixed one
/// applies it and removes it; `drop_dead_letter` deletes one.
pub async fn poison_event_is_parked_and_the_projection_goes_on<
    S: EventStore + ProjectionControl,
>(
    store: S,
) {
    store
        .append(
            &sid("Park-1"),
            ExpectedVersion::Any,
            (0..4).map(|i| ev("Good", i)).collect(),
        )
        .await
        .expect("good");
    let bad = store
        .append(
            &sid("Park-2"),
            ExpectedVersion::Any,
            vec![ev("Poison", 100)],
        )
        .await
        .expect("poison");
    let other = store
        .append(
            &sid("Park-3"),
            ExpectedVersion::Any,
            vec![ev("Poison", 200)],
        )
        .await
        .expect("poison 2");
    let tail = store
        .append(
            &sid("Park-1"),
            ExpectedVersion::Any,
            (4..8).map(|i| ev("Good", i)).collect(),
        )
        .await
        .expect("after");
    let cp = checkpoint_name("parking", 1);
    let mut sums = Sums::new("parking", ProjectionFilter::all());
    sums.poison = Some("Poison".into());
    let handle = ProjectionRunner::at_least_once(store.clone(), sums.clone())
        .with_options(quick())
        .error_policy(ErrorPolicy::Park)
        .spawn();
    handle
        .wait_for(*tail.positions.last().expect("some"), PATIENCE)
        .await
        .expect("the runner goes past the poison events");
    let mut applier: AtLeastOnce<S, Sums> = handle.stop().await.expect("stops");
    let letters = store.dead_letters(&cp).await.expect("dead letters");
    assert_eq!(letters.len(), 2);
    let first = &letters[0];
    assert_eq!(first.checkpoint, cp);
    assert_eq!(first.position, bad.positions[0]);
    assert_eq!(first.stream, sid("Park-2"));
    assert_eq!(first.event_type, "Poison");
    assert_eq!(first.attempts, 3);
    assert!(
        first.error.contains("cannot apply Poison"),
        "{}",
        first.error
    );
    assert_eq!(letters[1].position, other.positions[0]);
    let second_id = letters[1].event_id;
    let everything_but_poison = fold(&store, &ReadAll::from_start().event_types(["Good"])).await;
    assert_eq!(rows_of(&sums.model()), everything_but_poison);

    // Still broken: the retry fails and counts.
    match retry_dead_letter(&store, &mut applier, first.event_id).await {
        Err(ProjectionError::Handler {
            position, attempts, ..
        }) => {
            assert_eq!(position, first.position);
            assert_eq!(attempts, 4);
        }
        other => panic!("expected a handler error, got {other:?}"),
    }
    let letters = store.dead_letters(&cp).await.expect("dead letters");
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[0].attempts, 4);

    // Fixed: the retry applies it and removes it.
    sums.model().healed = true;
    retry_dead_letter(&store, &mut applier, first.event_id)
        .await
        .expect("the fixed handler applies the parked event");
    let letters = store.dead_letters(&cp).await.expect("dead letters");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].event_id, second_id);
    let mut expected = everything_but_poison.clone();
    let row = expected.entry(sid("Park-2")).or_default();
    row.0 += 100;
    row.1 += 1;
    assert_eq!(rows_of(&sums.model()), expected);

    // Dropped: gone, and dropping again finds nothing.
    assert!(store.drop_dead_letter(&cp, second_id).await.expect("drop"));
    assert!(!store
        .drop_dead_letter(&cp, second_id)
        .await
        .expect("drop again"));
    assert!(store
        .dead_letters(&cp)
        .await
        .expect("dead letters")
        .is_empty());
    match retry_dead_letter(&store, &mut applier, second_id).await {
        Err(ProjectionError::NoDeadLetter { event_id, .. }) => {
            assert_eq!(event_id, second_id);
        }
        other => panic!("expected NoDeadLetter, got {other:?}"),
    }
}

/// A handler that never returns on a `Hang` event.
struct Hangs;

impl Projection for Hangs {
    fn name(&self) -> &str {
        "hangs"
    }
    async fn handle(
        &mut self,
        events: &[RecordedEvent],
        _ctx: &BatchContext,
    ) -> Result<(), HandlerError> {
        if events.iter().any(|e| e.event_type == "Hang") {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

/// The circuit breaker: a projection whose batch makes no progress for the
/// configured time (here a handler that never returns) stops with
/// [`ProjectionError::Tripped`]; its state says `Tripped` with the reason
/// (the time, the batch's position); the checkpoint stays before the batch,
/// and the lock is released with a trip note in its place that other
/// processes read ([`annals::projection_trip`]), which the next runner's
/// lock replaces.
pub async fn stalled_projection_trips_the_breaker<S: EventStore + ProjectionControl>(store: S) {
    let good = store
        .append(
            &sid("Trip-1"),
            ExpectedVersion::Any,
            (0..3).map(|i| ev("E", i)).collect(),
        )
        .await
        .expect("good");
    store
        .append(&sid("Trip-1"), ExpectedVersion::Any, vec![ev("Hang", 0)])
        .await
        .expect("hang");
    let handle = ProjectionRunner::at_least_once(store.clone(), Hangs)
        .with_options(RunnerOptions {
            batch_size: 3,
            ..quick()
        })
        .trip_after(Duration::from_millis(300))
        .spawn();
    let state = tokio::time::timeout(PATIENCE, handle.ended())
        .await
        .expect("the breaker trips");
    let ProjectionState::Tripped(reason) = state else {
        panic!("expected Tripped, got {state:?}");
    };
    assert!(reason.contains("no progress for 300ms"), "{reason}");
    let last_good = *good.positions.last().expect("some");
    assert!(reason.contains(&last_good.to_string()), "{reason}");
    assert!(matches!(
        handle.join().await,
        Err(ProjectionError::Tripped { .. })
    ));
    let cp = checkpoint_name("hangs", 1);
    assert_eq!(
        store.load_checkpoint(&cp).await.expect("load"),
        Some(last_good)
    );
    let note = annals::projection_trip(&store, &cp)
        .await
        .expect("read the note")
        .expect("a trip note");
    assert_eq!(note.reason, reason);
    assert_eq!(note.owner, lock_owner());
    assert_eq!(note.checkpoint, cp);
    // The note blocks no one: the next runner takes the lock over it, and
    // the note is gone.
    let token = annals::lock_token();
    let next = store
        .acquire_projection_lock(&cp, "next runner", &token, Duration::from_secs(30))
        .await
        .expect("acquire");
    let annals::LockAttempt::Acquired(next) = next else {
        panic!("the trip note held the lock: {next:?}");
    };
    assert_eq!(
        annals::projection_trip(&store, &cp).await.expect("read"),
        None
    );
    store.release_projection_lock(&next).await.expect("release");
    assert_eq!(store.projection_lock(&cp).await.expect("lock"), None);
}

/// A projection run as partitions by one process ([`annals::PartitionedRunner::spawn_local`],
/// the only mode on SQLite): every partition progresses while 8 writers
/// append, the read model equals the fold, each event is handled once, each
/// stream's events in order, each partition's checkpoint reaches the head;
/// a second local worker of the same projection is refused.
pub async fn partitioned_projection_runs_all_partitions_in_one_process<
    S: EventStore + ProjectionControl,
>(
    store: S,
) {
    use annals::{PartitionOptions, PartitionedRunner};
    let sums = Sums::new("parted", ProjectionFilter::all().categories(["Acc"]));
    let options = PartitionOptions {
        partitions: 3,
        lease_ttl: Duration::from_secs(10),
        runner: quick(),
    };
    let worker = |sums: Sums| {
        let s = store.clone();
        PartitionedRunner::new(
            store.clone(),
            move || AtLeastOnce::new(s.clone(), sums.clone()),
            options.clone(),
        )
        .spawn_local()
    };
    let handle = worker(sums.clone());
    assert!(
        handle
            .wait_view(PATIENCE, |v| v.owned.len() == 3)
            .await
            .is_some(),
        "runs all three partitions"
    );
    let mut writers = Vec::new();
    for w in 0..8i64 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut last = GlobalPosition::START;
            for i in 0..20i64 {
                let r = store
                    .append(
                        &sid(&format!("Acc-{}", (w + i) % 7)),
                        ExpectedVersion::Any,
                        vec![ev("Deposited", w * 100 + i)],
                    )
                    .await
                    .expect("append");
                last = last.max(*r.positions.last().expect("positions"));
            }
            last
        }));
    }
    let mut last = GlobalPosition::START;
    for w in writers {
        last = last.max(w.await.expect("writer"));
    }
    let group = checkpoint_name("parted", 1);
    if let Err(e) = annals::wait_for_partitions(&store, &group, 3, last, PATIENCE).await {
        panic!(
            "every partition caught up: {e}; the worker: {:?}",
            handle.stop().await
        );
    }
    // The projection lock is held: a second local worker is refused.
    let second = worker(Sums::new("parted", ProjectionFilter::all()));
    match second.join().await {
        Err(ProjectionError::Locked { checkpoint, .. }) => assert_eq!(checkpoint, group),
        other => panic!("expected Locked, got {other:?}"),
    }
    handle.stop().await.expect("stop");
    let expected = fold(&store, &ReadAll::from_start().categories(["Acc"])).await;
    {
        let model = sums.model();
        assert_eq!(rows_of(&model), expected, "read model = fold of all events");
        let distinct: HashSet<_> = model.handled.iter().collect();
        assert_eq!(distinct.len(), model.handled.len(), "no event twice");
        let mut per_stream: HashMap<&StreamId, GlobalPosition> = HashMap::new();
        for (stream, at) in &model.order {
            if let Some(prev) = per_stream.insert(stream, *at) {
                assert!(prev < *at, "{stream}: {at} handled after {prev}");
            }
        }
    }
    for lag in annals::partition_lags(&store, "parted", 1, 3)
        .await
        .expect("lags")
    {
        assert_eq!(lag.lag.events, 0, "{lag:?}");
    }
    // The partitions split the streams between them.
    let parts: HashSet<u32> = expected
        .keys()
        .map(|s| annals::partition_of(s, 3))
        .collect();
    assert!(parts.len() > 1, "streams in several partitions: {parts:?}");
}

/// A projection whose handler never returns: a rebuild of it stays in
/// progress until its future is dropped.
struct Stuck(String);

impl Projection for Stuck {
    fn name(&self) -> &str {
        &self.0
    }
    async fn handle(&mut self, _: &[RecordedEvent], _: &BatchContext) -> Result<(), HandlerError> {
        std::future::pending::<()>().await;
        Ok(())
    }
}

/// Issue 8, the lock keeper's race: a rebuild whose future is dropped
/// (Ctrl-C) while a write of its lock is in flight (the acquisition, then
/// in a second round a renewal: already sent, so it lands after the drop)
/// still ends with the lock released: the release is ordered after that
/// write, and [`annals::LockKeepers::released`] waits for it. A renewal
/// or acquisition landing after the release would leave the lock held by
/// a runner that is gone until its lease expired.
pub async fn issue8_a_dropped_rebuild_releases_its_lock_after_the_write_in_flight<
    S: EventStore + ProjectionControl,
>(
    store: S,
) {
    use crate::{FaultyStore, LockWrite};
    store
        .append(&sid("Drop-1"), ExpectedVersion::Any, vec![ev("E", 1)])
        .await
        .expect("append");
    let faulty = FaultyStore::new(store.clone(), i64::MAX);
    let keepers = annals::LockKeepers::new();
    for kind in [LockWrite::Acquire, LockWrite::Renew] {
        let name = format!("dropped-{kind:?}").to_lowercase();
        let cp = checkpoint_name(&name, 1);
        let mut held = faulty.hold_lock_write(kind);
        let mut rebuild = Box::pin(
            ProjectionRunner::at_least_once(faulty.clone(), Stuck(name.clone()))
                .with_options(quick())
                .lock_ttl(Duration::from_millis(60))
                .track_locks(keepers.clone())
                .rebuild(RebuildOptions::default(), |_| {}),
        );
        tokio::select! {
            out = &mut rebuild => panic!("{kind:?}: the rebuild ended: {:?}", out.err()),
            () = held.started() => {}
        }
        // Ctrl-C: the future is dropped with the write in flight, which
        // lands only afterwards.
        drop(rebuild);
        held.land();
        tokio::time::timeout(PATIENCE, keepers.released(&cp))
            .await
            .unwrap_or_else(|_| panic!("{kind:?}: the lock keeper never ended"));
        assert_eq!(
            store.projection_lock(&cp).await.expect("lock row"),
            None,
            "{kind:?}: the lock is released after the write that was in flight"
        );
        // The next run takes it at once.
        let again = store
            .acquire_projection_lock(&cp, "next", "token-next", PATIENCE)
            .await
            .expect("lock");
        assert!(
            matches!(again, annals::LockAttempt::Acquired(_)),
            "{kind:?}: {again:?}"
        );
    }
}

/// Issue 8, fencing of the checkpoints a runner saves itself: a runner of
/// a filtered projection whose lease ran out (its renewals do not reach the
/// store, as when its process is paused) and was taken over by another
/// runner meets a stretch of events it does not handle: it saves no
/// checkpoint for it (the save is checked against the lease in its
/// transaction, as batches are) and stops with [`annals::Error::Fenced`],
/// and the new holder finds the checkpoint where it left it.
pub async fn issue8_a_taken_over_runner_saves_no_checkpoint_for_an_empty_stretch<
    S: EventStore + ProjectionControl,
>(
    store: S,
) {
    use crate::{FaultyStore, LockWrite};
    let rare = store
        .append(&sid("Fen-1"), ExpectedVersion::Any, vec![ev("Rare", 1)])
        .await
        .expect("append")
        .positions[0];
    let faulty = FaultyStore::new(store.clone(), i64::MAX);
    let cp = checkpoint_name("fenced-stretch", 1);
    // Its first renewal never lands while the test runs: the lease lapses.
    let mut renewal = faulty.hold_lock_write(LockWrite::Renew);
    let sums = Sums::new(
        "fenced-stretch",
        ProjectionFilter::all().event_types(["Rare"]),
    );
    let old = ProjectionRunner::at_least_once(faulty.clone(), sums.clone())
        .with_options(quick())
        .lock_ttl(Duration::from_millis(90))
        .spawn();
    old.wait_for(rare, PATIENCE).await.expect("caught up");
    renewal.started().await;
    // Another runner takes the lock once the lease has expired (polled
    // against the store's clock, with a deadline).
    take_over(&store, &cp).await;
    // A stretch the projection does not handle.
    let other = store
        .append(
            &sid("Fen-2"),
            ExpectedVersion::Any,
            (1..=3).map(|i| ev("Other", i)).collect(),
        )
        .await
        .expect("append");
    // The old runner reads it and tries to save its checkpoint: refused.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while faulty.fenced_saves() == 0 {
        let at = store.load_checkpoint(&cp).await.expect("checkpoint");
        assert_eq!(
            at,
            Some(rare),
            "the taken-over runner moved the checkpoint over an empty stretch"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old runner never tried to save the stretch up to {:?}",
            other.positions.last()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    renewal.land();
    match tokio::time::timeout(PATIENCE, old.join()).await {
        Ok(Err(ProjectionError::Store {
            source: annals::Error::Fenced { lease, detail },
            ..
        })) => {
            assert_eq!(lease, cp);
            assert!(detail.contains("token-new"), "{detail}");
        }
        Ok(Err(other)) => panic!("expected Fenced, got {other}"),
        Ok(Ok(_)) => panic!("the taken-over runner ended normally"),
        Err(_) => panic!("the taken-over runner never stopped"),
    }
    assert_eq!(store.load_checkpoint(&cp).await.expect("cp"), Some(rare));
    // Its release did not touch the new holder's lock.
    let lock = store
        .projection_lock(&cp)
        .await
        .expect("lock")
        .expect("held");
    assert_eq!(lock.token, "token-new");
}

/// Issue 8, the reset at the start of a rebuild from position 0: it is
/// fenced like every checkpoint save. A holder whose lease expired and was
/// taken over resets nothing ([`annals::Error::Fenced`], naming the new
/// holder's token), so a rebuild paused before it began cannot send the
/// runner that took over back to the first event; the holder's reset
/// deletes the checkpoint.
pub async fn issue8_a_fenced_reset_from_a_lost_lock_deletes_nothing<
    S: EventStore + ProjectionControl,
>(
    store: S,
) {
    let at = store
        .append(&sid("Reset-1"), ExpectedVersion::Any, vec![ev("Rare", 1)])
        .await
        .expect("append")
        .positions[0];
    let cp = checkpoint_name("fenced-reset", 1);
    // A parked event of this checkpoint and one of another projection.
    let event = read_all_vec(&store, ReadAll::from_start()).await.remove(0);
    let letter = |checkpoint: &str| annals::DeadLetter {
        checkpoint: checkpoint.to_owned(),
        position: event.global_position,
        event_id: event.event_id,
        stream: event.stream_id.clone(),
        event_type: event.event_type.clone(),
        error: "parked".into(),
        attempts: 1,
        parked_at: chrono::Utc::now(),
    };
    let other = checkpoint_name("fenced-reset-other", 1);
    store.park_event(&letter(&cp)).await.expect("park");
    store.park_event(&letter(&other)).await.expect("park");
    let fence_of = |token: &str, ttl: Duration| annals::Fence::Lock {
        lock: cp.clone(),
        token: token.to_owned(),
        ttl,
    };
    let short = Duration::from_millis(60);
    let old = store
        .acquire_projection_lock(&cp, "old", "token-old", short)
        .await
        .expect("lock");
    assert!(matches!(old, annals::LockAttempt::Acquired(_)), "{old:?}");
    store
        .save_checkpoint_fenced(&cp, at, &fence_of("token-old", short))
        .await
        .expect("the holder saves");
    // Another runner takes the lock once the old lease has expired (polled
    // against the store's clock, with a deadline).
    take_over(&store, &cp).await;
    match store
        .reset_checkpoint_fenced(&cp, &fence_of("token-old", short))
        .await
    {
        Err(annals::Error::Fenced { lease, detail }) => {
            assert_eq!(lease, cp);
            assert!(detail.contains("token-new"), "{detail}");
        }
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert_eq!(
        store.load_checkpoint(&cp).await.expect("checkpoint"),
        Some(at),
        "a reset under a lost lock moved the checkpoint"
    );
    assert_eq!(store.dead_letters(&cp).await.expect("letters").len(), 1);
    store
        .reset_checkpoint_fenced(&cp, &fence_of("token-new", PATIENCE))
        .await
        .expect("the holder resets");
    assert_eq!(store.load_checkpoint(&cp).await.expect("checkpoint"), None);
    // The reset forgets the checkpoint's dead letters (a rebuild from the
    // start delivers their events again: a retry would apply them twice),
    // and only its own.
    assert!(store.dead_letters(&cp).await.expect("letters").is_empty());
    assert_eq!(store.dead_letters(&other).await.expect("letters").len(), 1);
    // With no lock at all, nothing is reset either.
    store.save_checkpoint(&cp, at).await.expect("save");
    let lock = store
        .projection_lock(&cp)
        .await
        .expect("lock")
        .expect("held");
    store.release_projection_lock(&lock).await.expect("release");
    assert!(matches!(
        store
            .reset_checkpoint_fenced(&cp, &fence_of("token-new", PATIENCE))
            .await,
        Err(annals::Error::Fenced { .. })
    ));
    assert_eq!(
        store.load_checkpoint(&cp).await.expect("checkpoint"),
        Some(at)
    );
}

/// Takes the lock of `cp` as owner `new` with token `token-new` once the
/// current holder's lease has expired (polled against the store's clock,
/// with a deadline).
async fn take_over<S: ProjectionControl>(store: &S, cp: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match store
            .acquire_projection_lock(cp, "new", "token-new", PATIENCE)
            .await
            .expect("lock")
        {
            annals::LockAttempt::Acquired(_) => return,
            annals::LockAttempt::Held(_) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the lease never expired"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}
