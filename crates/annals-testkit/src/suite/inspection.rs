//! What operators inspect: the global feed between two instants, an
//! aggregate's state at an instant, the largest streams and how many events
//! arrived lately (`annals read-all --since/--until`, `annals aggregate
//! --as-of`, `annals stats`).

use annals::bank::Account;
use annals::{
    CommandContext, EventStore, ExpectedVersion, NewEvent, ReadAll, ReadStream, RecordedEvent,
    Repository, StreamCatalog, StreamId, StreamVersion,
};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde_json::json;

use super::n_of;

fn sid(name: &str) -> StreamId {
    StreamId::parse(name).expect("valid stream name")
}

fn ev(t: &str, n: i64) -> NewEvent {
    NewEvent::new(t, json!({ "n": n }))
}

async fn read_all<S: EventStore>(store: &S, options: ReadAll) -> Vec<RecordedEvent> {
    store
        .read_all(options)
        .try_collect()
        .await
        .expect("read_all")
}

/// Appends probe events (type `Tick`, stream `Clock-1`) until the store
/// stamps one later than `t`: the store's clock, not this process's
/// (PostgreSQL stamps events with the server's), so the next event is
/// recorded strictly after `t`. Returns nothing; decides nothing by time.
async fn tick_past<S: EventStore>(store: &S, t: DateTime<Utc>) {
    let probe = sid("Clock-1");
    loop {
        store
            .append(&probe, ExpectedVersion::Any, vec![ev("Tick", 0)])
            .await
            .expect("probe append");
        let tick = store
            .read_stream_to_vec(&probe, ReadStream::backward().limit(1))
            .await
            .expect("probe read");
        if tick[0].recorded_at > t {
            return;
        }
    }
}

/// The last event of `stream`.
async fn last<S: EventStore>(store: &S, stream: &str) -> RecordedEvent {
    let mut events = store
        .read_stream_to_vec(&sid(stream), ReadStream::backward().limit(1))
        .await
        .expect("read");
    events.pop().expect("the stream has an event")
}

/// `read_all` between two instants (`since`, `until`, both inclusive, on
/// `recorded_at`), alone and with the other filters, a start position and a
/// limit; the same events a filter in code over the whole feed keeps.
pub async fn read_all_by_recorded_at<S: EventStore>(store: S) {
    let ns = |es: &[RecordedEvent]| es.iter().filter_map(|e| n_of(&e.data)).collect::<Vec<_>>();
    store
        .append(
            &sid("Ins-1"),
            ExpectedVersion::Any,
            vec![ev("X", 1), ev("Y", 2)],
        )
        .await
        .expect("append");
    tick_past(&store, last(&store, "Ins-1").await.recorded_at).await;
    store
        .append(&sid("Ins-2"), ExpectedVersion::Any, vec![ev("X", 3)])
        .await
        .expect("append");
    store
        .append(&sid("Ins-1"), ExpectedVersion::Any, vec![ev("Y", 4)])
        .await
        .expect("append");
    let third = last(&store, "Ins-2").await;
    let fourth = last(&store, "Ins-1").await;
    tick_past(&store, fourth.recorded_at).await;
    store
        .append(&sid("Ins-3"), ExpectedVersion::Any, vec![ev("X", 5)])
        .await
        .expect("append");
    let (since, until) = (third.recorded_at, fourth.recorded_at);
    let ins = || ReadAll::from_start().categories(["Ins"]);

    assert_eq!(ns(&read_all(&store, ins().since(since)).await), [3, 4, 5]);
    assert_eq!(
        ns(&read_all(&store, ins().until(until)).await),
        [1, 2, 3, 4]
    );
    assert_eq!(
        ns(&read_all(&store, ins().since(since).until(until)).await),
        [3, 4]
    );
    // With the type filter and no category (the probes are `Tick`s).
    let typed = ReadAll::from_start()
        .event_types(["X"])
        .since(since)
        .until(until);
    assert_eq!(ns(&read_all(&store, typed).await), [3]);
    // With a start position and a limit.
    let after = ReadAll::after(third.global_position)
        .categories(["Ins"])
        .since(since);
    assert_eq!(ns(&read_all(&store, after).await), [4, 5]);
    assert_eq!(
        ns(&read_all(&store, ins().since(since).limit(1)).await),
        [3]
    );
    // No filter but the bounds: exactly what a filter in code keeps of the
    // whole feed (probe events stamped inside the bounds included).
    let everything = read_all(&store, ReadAll::from_start()).await;
    let bounded = ReadAll::from_start().since(since).until(until);
    let expected: Vec<_> = everything
        .iter()
        .filter(|e| bounded.admits(e))
        .map(|e| e.event_id)
        .collect();
    let got: Vec<_> = read_all(&store, bounded)
        .await
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(got, expected);
    assert!(got.contains(&third.event_id) && got.contains(&fourth.event_id));
    // Bounds that hold nothing.
    let latest = everything
        .iter()
        .map(|e| e.recorded_at)
        .max()
        .expect("events");
    let earliest = everything
        .iter()
        .map(|e| e.recorded_at)
        .min()
        .expect("events");
    let later = ReadAll::from_start().since(latest + chrono::Duration::seconds(1));
    assert!(read_all(&store, later).await.is_empty());
    let earlier = ReadAll::from_start().until(earliest - chrono::Duration::seconds(1));
    assert!(read_all(&store, earlier).await.is_empty());
    assert!(read_all(&store, ins().since(until).until(since))
        .await
        .iter()
        .all(|e| e.recorded_at == since && since == until));
}

/// [`Repository::load_as_of`]: the state folded from the events recorded at
/// or before an instant.
pub async fn repository_load_as_of<S: EventStore>(store: S) {
    let repo = Repository::<Account, _>::new(store.clone());
    let ctx = CommandContext::new();
    repo.execute("asof", &ctx, |a| a.open("ann"))
        .await
        .expect("open");
    repo.execute("asof", &ctx, |a| a.deposit(10))
        .await
        .expect("deposit");
    let second = last(&store, "Account-asof").await;
    tick_past(&store, second.recorded_at).await;
    repo.execute("asof", &ctx, |a| a.deposit(5))
        .await
        .expect("deposit");

    let then = repo
        .load_as_of("asof", second.recorded_at)
        .await
        .expect("load as of");
    assert_eq!(then.version, Some(StreamVersion(2)));
    assert_eq!(then.state.balance, 10);
    assert_eq!(then.report.events_replayed, 2);
    assert!(then.report.snapshot_version.is_none());

    let now = repo
        .load_as_of("asof", Utc::now() + chrono::Duration::hours(1))
        .await
        .expect("load as of");
    assert_eq!(now.version, Some(StreamVersion(3)));
    assert_eq!(now.state.balance, 15);

    let first = store
        .read_stream_to_vec(&sid("Account-asof"), ReadStream::forward().limit(1))
        .await
        .expect("read");
    let before = repo
        .load_as_of("asof", first[0].recorded_at - chrono::Duration::seconds(1))
        .await
        .expect("load as of");
    assert_eq!(before.version, None);
    assert_eq!(before.report.events_replayed, 0);
    // An aggregate that never existed: no events at any instant.
    let none = repo
        .load_as_of("nobody", Utc::now())
        .await
        .expect("load as of");
    assert_eq!(none.version, None);
}

/// [`StreamCatalog::largest_streams`] (most events first, ties by name) and
/// [`StreamCatalog::events_recorded_since`].
pub async fn largest_streams_and_recent_events<S: EventStore + StreamCatalog>(store: S) {
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    assert!(store.largest_streams(5).await.expect("largest").is_empty());
    assert_eq!(store.events_recorded_since(epoch).await.expect("count"), 0);
    for (stream, n) in [("Big-2", 3), ("Small-1", 1), ("Big-1", 3), ("Mid-1", 2)] {
        let events = (0..n).map(|i| ev("E", i)).collect();
        store
            .append(&sid(stream), ExpectedVersion::Any, events)
            .await
            .expect("append");
    }
    let heads = |infos: Vec<annals::StreamInfo>| {
        infos
            .into_iter()
            .map(|i| (i.stream_id.to_string(), i.version.0))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        heads(store.largest_streams(3).await.expect("largest")),
        [
            ("Big-1".to_owned(), 3),
            ("Big-2".to_owned(), 3),
            ("Mid-1".to_owned(), 2)
        ]
    );
    assert_eq!(store.largest_streams(10).await.expect("largest").len(), 4);
    assert!(store.largest_streams(0).await.expect("largest").is_empty());

    assert_eq!(store.events_recorded_since(epoch).await.expect("count"), 9);
    tick_past(&store, last(&store, "Mid-1").await.recorded_at).await;
    store
        .append(
            &sid("Late-1"),
            ExpectedVersion::Any,
            vec![ev("E", 1), ev("E", 2)],
        )
        .await
        .expect("append");
    let late = store
        .read_stream_to_vec(&sid("Late-1"), ReadStream::forward())
        .await
        .expect("read");
    let since = late[0].recorded_at;
    let everything = read_all(&store, ReadAll::from_start()).await;
    let expected = everything.iter().filter(|e| e.recorded_at >= since).count() as u64;
    let counted = store.events_recorded_since(since).await.expect("count");
    assert_eq!(counted, expected);
    // The two late events, none of the nine before the probe.
    assert!(
        (2..=everything.len() as u64 - 9).contains(&counted),
        "{counted}"
    );
    let future = Utc::now() + chrono::Duration::hours(1);
    assert_eq!(store.events_recorded_since(future).await.expect("count"), 0);
}

/// [`StreamCatalog::read_correlated`] and [`StreamCatalog::read_caused_by`]:
/// the events one request caused, and the events one event caused, in
/// global order, with a limit, across streams.
pub async fn correlation_and_causation_lookups<S: EventStore + StreamCatalog>(store: S) {
    let ids =
        |events: Vec<RecordedEvent>| events.into_iter().map(|e| e.event_id).collect::<Vec<_>>();
    let request = uuid::Uuid::now_v7();
    // The request's first event, then two events it caused (in two
    // streams), then one caused by the second of those; plus an event of
    // another request, and one without metadata.
    let metadata = |correlation: uuid::Uuid, causation: Option<uuid::Uuid>| annals::Metadata {
        correlation_id: Some(correlation),
        causation_id: causation,
        ..annals::Metadata::default()
    };
    let with = |n: i64, causation: Option<uuid::Uuid>| {
        ev("E", n).with_metadata(metadata(request, causation))
    };
    let root = with(1, None);
    let a = with(2, Some(root.event_id.0));
    let b = with(3, Some(root.event_id.0));
    let c = with(4, Some(b.event_id.0));
    let (root_id, a_id, b_id, c_id) = (root.event_id, a.event_id, b.event_id, c.event_id);
    store
        .append(&sid("Req-1"), ExpectedVersion::Any, vec![root])
        .await
        .expect("append");
    let other = uuid::Uuid::now_v7();
    store
        .append(
            &sid("Req-9"),
            ExpectedVersion::Any,
            vec![ev("E", 9).with_metadata(metadata(other, Some(root_id.0)))],
        )
        .await
        .expect("append");
    store
        .append(&sid("Req-2"), ExpectedVersion::Any, vec![a, ev("E", 0)])
        .await
        .expect("append");
    store
        .append(&sid("Req-1"), ExpectedVersion::Any, vec![b, c])
        .await
        .expect("append");

    let correlated = store
        .read_correlated(request, None)
        .try_collect::<Vec<_>>()
        .await
        .expect("correlated");
    assert_eq!(ids(correlated.clone()), [root_id, a_id, b_id, c_id]);
    assert!(correlated
        .windows(2)
        .all(|w| w[0].global_position < w[1].global_position));
    let first_two = store
        .read_correlated(request, Some(2))
        .try_collect::<Vec<_>>()
        .await
        .expect("correlated");
    assert_eq!(ids(first_two), [root_id, a_id]);
    // The root caused a and b here, and the event of the other request.
    let caused = store
        .read_caused_by(root_id.0, None)
        .try_collect::<Vec<_>>()
        .await
        .expect("caused");
    assert_eq!(caused.len(), 3);
    assert_eq!(n_of(&caused[0].data), Some(9));
    assert_eq!(caused[1].event_id, a_id);
    assert_eq!(caused[2].event_id, b_id);
    let by_b = store
        .read_caused_by(b_id.0, None)
        .try_collect::<Vec<_>>()
        .await
        .expect("caused");
    assert_eq!(ids(by_b), [c_id]);
    // Nobody: nothing.
    let none = store
        .read_correlated(uuid::Uuid::now_v7(), None)
        .try_collect::<Vec<_>>()
        .await
        .expect("none");
    assert!(none.is_empty());
    let none = store
        .read_caused_by(c_id.0, Some(0))
        .try_collect::<Vec<_>>()
        .await
        .expect("none");
    assert!(none.is_empty());
}
