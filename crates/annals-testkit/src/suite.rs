//! The conformance tests. Each takes a fresh, empty store and panics on a
//! violation of the traits' contracts.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use annals::bank::{Account, AccountError, AccountEvent};
use annals::{
    Aggregate, CommandContext, CommandError, Error, EventId, EventStore, ExpectedVersion,
    GlobalPosition, Metadata, NewEvent, ReadAll, ReadStream, RecordedEvent, Repository,
    RetryPolicy, Snapshot, SnapshotConfig, SnapshotPolicy, SnapshotSkip, SnapshotWrite, StreamId,
    StreamVersion,
};
use chrono::Utc;
use futures::StreamExt;
use serde_json::json;

use annals::{CheckpointStore, SnapshotAdmin, SnapshotStaging, SnapshotStore, StreamCatalog};

mod hostile;
pub use hostile::*;

mod snapshots_repair;
pub use snapshots_repair::*;

mod commands;
pub use commands::*;
mod numbers;
pub use numbers::*;
mod append_many;
pub use append_many::*;
mod inspection;
pub use inspection::*;
mod projections;
pub use projections::*;
mod reactors;
pub use reactors::*;
mod telemetry;
pub use telemetry::*;
mod import;
pub use import::*;
mod upcasting;
pub use upcasting::*;
mod gdpr;
pub use gdpr::*;

fn sid(name: &str) -> StreamId {
    StreamId::parse(name).expect("valid stream name")
}

fn ev(t: &str, n: i64) -> NewEvent {
    NewEvent::new(t, json!({ "n": n }))
}

fn v(n: u64) -> StreamVersion {
    StreamVersion(n)
}

/// The `n` of a `{"n": n}` payload (`None` when it has none, or does not parse).
pub(crate) fn n_of(data: &annals::Payload) -> Option<i64> {
    data.to_value().ok().and_then(|v| v["n"].as_i64())
}

async fn all<S: EventStore>(store: &S, s: &StreamId) -> Vec<RecordedEvent> {
    store
        .read_stream_to_vec(s, ReadStream::forward())
        .await
        .expect("read_stream")
}

async fn read_all_vec<S: EventStore>(store: &S, opts: ReadAll) -> Vec<RecordedEvent> {
    let mut out = Vec::new();
    let mut s = store.read_all(opts);
    while let Some(e) = s.next().await {
        out.push(e.expect("read_all item"));
    }
    out
}

/// Appends then reads back every field.
pub async fn append_round_trip<S: EventStore>(store: S) {
    let s = sid("Order-1");
    let before = Utc::now() - chrono::Duration::seconds(5);
    let id = EventId::new();
    let r = store
        .append(
            &s,
            ExpectedVersion::NoStream,
            vec![
                ev("Placed", 1).with_id(id).with_event_version(2),
                ev("Paid", 2),
            ],
        )
        .await
        .expect("append");
    assert_eq!(r.first_version, v(1));
    assert_eq!(r.last_version, v(2));
    assert_eq!(r.positions.len(), 2);
    assert!(r.positions[0] < r.positions[1]);
    assert!(!r.deduplicated);
    let got = all(&store, &s).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].event_id, id);
    assert_eq!(got[0].stream_id, s);
    assert_eq!(got[0].stream_version, v(1));
    assert_eq!(got[0].global_position, r.positions[0]);
    assert_eq!(got[0].event_type, "Placed");
    assert_eq!(got[0].event_version, 2);
    assert_eq!(got[0].data, json!({"n": 1}));
    assert!(
        got[0].recorded_at >= before
            && got[0].recorded_at <= Utc::now() + chrono::Duration::seconds(5)
    );
    assert_eq!(got[1].stream_version, v(2));
    assert_eq!(got[1].event_version, 1);
    assert_eq!(store.stream_version(&s).await.expect("version"), Some(v(2)));
    assert_eq!(
        store
            .stream_version(&sid("Order-none"))
            .await
            .expect("version"),
        None
    );
    assert!(all(&store, &sid("Order-none")).await.is_empty());
}

/// Every `ExpectedVersion` case, accepted and refused.
pub async fn expected_version_cases<S: EventStore>(store: S) {
    let s = sid("Case-1");
    let conflict =
        |r: annals::Result<annals::AppendResult>| matches!(r, Err(ref e) if e.is_conflict());
    assert!(conflict(
        store
            .append(&s, ExpectedVersion::StreamExists, vec![ev("A", 0)])
            .await
    ));
    assert!(conflict(
        store
            .append(&s, ExpectedVersion::Exact(v(1)), vec![ev("A", 0)])
            .await
    ));
    store
        .append(&s, ExpectedVersion::NoStream, vec![ev("A", 1)])
        .await
        .expect("no stream");
    assert!(conflict(
        store
            .append(&s, ExpectedVersion::NoStream, vec![ev("A", 0)])
            .await
    ));
    assert!(conflict(
        store
            .append(&s, ExpectedVersion::Exact(v(0)), vec![ev("A", 0)])
            .await
    ));
    store
        .append(&s, ExpectedVersion::StreamExists, vec![ev("A", 2)])
        .await
        .expect("exists");
    store
        .append(&s, ExpectedVersion::Exact(v(2)), vec![ev("A", 3)])
        .await
        .expect("exact");
    assert!(conflict(
        store
            .append(&s, ExpectedVersion::Exact(v(2)), vec![ev("A", 0)])
            .await
    ));
    assert!(conflict(
        store
            .append(&s, ExpectedVersion::Exact(v(9)), vec![ev("A", 0)])
            .await
    ));
    store
        .append(&s, ExpectedVersion::Any, vec![ev("A", 4)])
        .await
        .expect("any");
    let s2 = sid("Case-2");
    store
        .append(&s2, ExpectedVersion::Any, vec![ev("A", 1)])
        .await
        .expect("any on new");
    store
        .append(
            &sid("Case-3"),
            ExpectedVersion::Exact(v(0)),
            vec![ev("A", 1)],
        )
        .await
        .expect("exact 0 on new");
    let got = all(&store, &s).await;
    assert_eq!(
        got.iter()
            .map(|e| n_of(&e.data).unwrap_or(-1))
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
}

/// A conflict is `WrongExpectedVersion` naming stream, expected and actual.
pub async fn conflict_names_actual_version<S: EventStore>(store: S) {
    let s = sid("Acct-x");
    store
        .append(
            &s,
            ExpectedVersion::Any,
            vec![ev("A", 1), ev("A", 2), ev("A", 3)],
        )
        .await
        .expect("append");
    let err = store
        .append(&s, ExpectedVersion::Exact(v(1)), vec![ev("A", 4)])
        .await
        .expect_err("conflict");
    match &err {
        Error::WrongExpectedVersion {
            stream,
            expected,
            actual,
        } => {
            assert_eq!(stream, &s);
            assert_eq!(*expected, ExpectedVersion::Exact(v(1)));
            assert_eq!(*actual, Some(v(3)));
        }
        other => panic!("expected WrongExpectedVersion, got {other:?}"),
    }
    assert!(err.is_conflict());
    assert!(err.to_string().contains("Acct-x") && err.to_string().contains('3'));
    let err = store
        .append(
            &sid("Acct-y"),
            ExpectedVersion::StreamExists,
            vec![ev("A", 1)],
        )
        .await
        .expect_err("conflict");
    assert!(matches!(
        err,
        Error::WrongExpectedVersion { actual: None, .. }
    ));
}

/// A batch that fails part-way writes nothing.
pub async fn batch_is_atomic<S: EventStore>(store: S) {
    let s = sid("Atomic-1");
    let other = sid("Atomic-2");
    let taken = EventId::new();
    store
        .append(
            &other,
            ExpectedVersion::Any,
            vec![ev("A", 1).with_id(taken)],
        )
        .await
        .expect("append");
    let head_before = store.head_position().await.expect("head");
    // The third event reuses an id stored elsewhere: the whole batch must fail.
    let err = store
        .append(
            &s,
            ExpectedVersion::Any,
            vec![ev("A", 1), ev("A", 2), ev("A", 3).with_id(taken)],
        )
        .await
        .expect_err("must fail");
    assert!(matches!(err, Error::DuplicateEventId { .. }), "{err:?}");
    assert!(all(&store, &s).await.is_empty());
    assert_eq!(store.stream_version(&s).await.expect("version"), None);
    assert_eq!(store.head_position().await.expect("head"), head_before);
    // A large batch lands whole.
    let big: Vec<NewEvent> = (0..250).map(|i| ev("Big", i)).collect();
    let r = store
        .append(&s, ExpectedVersion::NoStream, big)
        .await
        .expect("big batch");
    assert_eq!(r.last_version, v(250));
    assert_eq!(r.positions.len(), 250);
    assert!(r.positions.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(all(&store, &s).await.len(), 250);
}

/// Retrying the same batch is a no-op that returns the original assignment.
pub async fn idempotent_event_ids<S: EventStore>(store: S) {
    let s = sid("Idem-1");
    let batch = vec![ev("A", 1), ev("B", 2)];
    let first = store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .expect("append");
    // The retry carries the stale expected version and must still succeed.
    let again = store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .expect("retry");
    assert!(again.deduplicated);
    assert_eq!(again.first_version, first.first_version);
    assert_eq!(again.last_version, first.last_version);
    assert_eq!(again.positions, first.positions);
    assert_eq!(all(&store, &s).await.len(), 2);
    store
        .append(&s, ExpectedVersion::Exact(v(2)), vec![ev("C", 3)])
        .await
        .expect("append");
    let again = store
        .append(&s, ExpectedVersion::Exact(v(0)), batch)
        .await
        .expect("retry after more");
    assert!(again.deduplicated);
    assert_eq!(all(&store, &s).await.len(), 3);
}

/// Reusing a stored id for a different event fails and writes nothing.
pub async fn duplicate_event_id_is_rejected<S: EventStore>(store: S) {
    let s = sid("Dup-1");
    let id = EventId::new();
    store
        .append(&s, ExpectedVersion::Any, vec![ev("A", 1).with_id(id)])
        .await
        .expect("append");
    let e = store
        .append(&s, ExpectedVersion::Any, vec![ev("A", 2).with_id(id)])
        .await
        .expect_err("payload differs");
    assert!(
        matches!(e, Error::DuplicateEventId { ref event_id, ref stream } if *event_id == id && *stream == s),
        "{e:?}"
    );
    let e = store
        .append(
            &sid("Dup-2"),
            ExpectedVersion::Any,
            vec![ev("A", 1).with_id(id)],
        )
        .await
        .expect_err("other stream");
    assert!(
        matches!(e, Error::DuplicateEventId { ref stream, .. } if *stream == s),
        "{e:?}"
    );
    // A batch whose ids are only partly stored is not a retry.
    let e = store
        .append(
            &s,
            ExpectedVersion::Any,
            vec![ev("A", 1).with_id(id), ev("B", 1)],
        )
        .await
        .expect_err("partial");
    assert!(matches!(e, Error::DuplicateEventId { .. }), "{e:?}");
    assert_eq!(all(&store, &s).await.len(), 1);
    assert_eq!(store.stream_version(&sid("Dup-2")).await.expect("v"), None);
}

/// Invalid events are typed errors; nothing is written.
pub async fn bad_input_is_rejected<S: EventStore>(store: S) {
    let s = sid("Bad-1");
    let cases = vec![
        vec![],
        vec![ev("", 1)],
        vec![ev("Has\ncontrol", 1)],
        vec![ev("A", 1).with_event_version(0)],
        {
            let id = EventId::new();
            vec![ev("A", 1).with_id(id), ev("A", 2).with_id(id)]
        },
    ];
    for batch in cases {
        let e = store
            .append(&s, ExpectedVersion::Any, batch)
            .await
            .expect_err("invalid");
        assert!(
            matches!(e, Error::InvalidEvent { ref stream, .. } if *stream == s),
            "{e:?}"
        );
    }
    assert_eq!(store.stream_version(&s).await.expect("v"), None);
    assert_eq!(store.head_position().await.expect("head"), None);
    assert!(StreamId::parse("no_dash").is_err());
}

/// Correlation, causation and free headers survive the store.
pub async fn metadata_round_trip<S: EventStore>(store: S) {
    let s = sid("Meta-1");
    let mut m = Metadata {
        correlation_id: Some(uuid::Uuid::now_v7()),
        causation_id: Some(uuid::Uuid::now_v7()),
        ..Default::default()
    };
    m.headers.insert("user".into(), json!("ann"));
    m.headers.insert("nested".into(), json!({"a": [1, 2]}));
    let data =
        json!({"text": "ünïcødé \"quoted\"", "big": 9007199254740993u64, "f": 1.5, "null": null});
    store
        .append(
            &s,
            ExpectedVersion::Any,
            vec![NewEvent::new("A", data.clone()).with_metadata(m.clone())],
        )
        .await
        .expect("append");
    let got = all(&store, &s).await;
    assert_eq!(got[0].metadata, m);
    assert_eq!(got[0].data, data);
}

/// N tasks race on one stream with exact expected versions: exactly one
/// winner per version, no gaps, no duplicates.
pub async fn racing_writers_one_stream<S: EventStore>(store: S) {
    let s = sid("Race-1");
    let tasks = 8;
    let per_task = 15;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let mut wins = Vec::new();
            let mut written = 0;
            while written < per_task {
                let head = store
                    .stream_version(&s)
                    .await
                    .expect("version")
                    .unwrap_or_default();
                match store
                    .append(&s, ExpectedVersion::Exact(head), vec![ev("W", t)])
                    .await
                {
                    Ok(r) => {
                        assert_eq!(r.first_version, head.next());
                        wins.push(r.first_version.0);
                        written += 1;
                    }
                    Err(e) if e.is_conflict() => tokio::task::yield_now().await,
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
            wins
        }));
    }
    let mut versions = Vec::new();
    for h in handles {
        versions.extend(h.await.expect("task"));
    }
    versions.sort_unstable();
    let expected: Vec<u64> = (1..=(tasks * per_task) as u64).collect();
    assert_eq!(versions, expected, "exactly one winner per version");
    let got = all(&store, &s).await;
    assert_eq!(got.len(), (tasks * per_task) as usize);
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, e)| e.stream_version.0 == i as u64 + 1));
    assert!(got
        .windows(2)
        .all(|w| w[0].global_position < w[1].global_position));
}

/// 8 concurrent writers, one reader following `read_all` from its last
/// position: every event exactly once, in increasing position, and each
/// stream's versions in order.
pub async fn global_order_with_concurrent_writers<S: EventStore>(store: S) {
    let writers = 8u64;
    let appends = 40u64;
    // (appends finished, all writers done). A reader that has caught up
    // waits for this to change: every finished append and the end change it,
    // so it wakes exactly when there may be more to read.
    let (progress, mut watch) = tokio::sync::watch::channel((0u64, false));
    let progress = Arc::new(progress);
    let reader = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut seen: Vec<RecordedEvent> = Vec::new();
            let mut after = GlobalPosition::START;
            loop {
                // Before the read: once the writers are done, an empty page
                // means the follower has everything.
                let (_, finished) = *watch.borrow_and_update();
                let page = read_all_vec(&store, ReadAll::after(after).limit(100)).await;
                if let Some(last) = page.last() {
                    after = last.global_position;
                }
                let empty = page.is_empty();
                seen.extend(page);
                if finished && empty {
                    return seen;
                }
                if empty {
                    watch
                        .changed()
                        .await
                        .expect("the test keeps the sender until the end");
                }
            }
        })
    };
    let mut handles = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        let progress = Arc::clone(&progress);
        handles.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..appends {
                // Writers share a few streams so per-stream order is exercised,
                // and vary batch sizes (1 and 10).
                let s = sid(&format!("Order-{}", (w + i) % 5));
                let n = if i % 4 == 0 { 10 } else { 1 };
                let batch: Vec<NewEvent> = (0..n)
                    .map(|k| ev("E", (w * 1000 + i * 10 + k) as i64))
                    .collect();
                ids.extend(batch.iter().map(|e| e.event_id));
                store
                    .append(&s, ExpectedVersion::Any, batch)
                    .await
                    .expect("append");
                progress.send_modify(|p| p.0 += 1);
            }
            ids
        }));
    }
    let mut written = HashSet::new();
    for h in handles {
        written.extend(h.await.expect("writer"));
    }
    progress.send_modify(|p| p.1 = true);
    let seen = reader.await.expect("reader task");
    let seen_ids: Vec<EventId> = seen.iter().map(|e| e.event_id).collect();
    let unique: HashSet<EventId> = seen_ids.iter().copied().collect();
    assert_eq!(unique.len(), seen_ids.len(), "an event was delivered twice");
    assert_eq!(unique, written, "the reader missed events");
    assert!(
        seen.windows(2)
            .all(|w| w[0].global_position < w[1].global_position),
        "positions not increasing"
    );
    let mut last: HashMap<StreamId, u64> = HashMap::new();
    for e in &seen {
        let prev = last
            .insert(e.stream_id.clone(), e.stream_version.0)
            .unwrap_or(0);
        assert_eq!(
            e.stream_version.0,
            prev + 1,
            "stream {} out of order in the feed",
            e.stream_id
        );
    }
    // The whole feed read in one go agrees with the follower.
    let full: Vec<EventId> = read_all_vec(&store, ReadAll::from_start())
        .await
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(full, seen_ids);
}

/// `from`, `direction` and `limit` of stream reads.
pub async fn read_stream_options<S: EventStore>(store: S) {
    let s = sid("Opts-1");
    store
        .append(
            &s,
            ExpectedVersion::Any,
            (1..=10).map(|i| ev("A", i)).collect(),
        )
        .await
        .expect("append");
    let versions =
        |es: Vec<RecordedEvent>| es.iter().map(|e| e.stream_version.0).collect::<Vec<_>>();
    let r = |o| store.read_stream_to_vec(&s, o);
    assert_eq!(
        versions(
            r(ReadStream::forward().from(v(4)).limit(3))
                .await
                .expect("r")
        ),
        vec![4, 5, 6]
    );
    assert_eq!(
        versions(r(ReadStream::backward().limit(3)).await.expect("r")),
        vec![10, 9, 8]
    );
    assert_eq!(
        versions(r(ReadStream::backward().from(v(3))).await.expect("r")),
        vec![3, 2, 1]
    );
    assert_eq!(
        versions(r(ReadStream::forward().from(v(11))).await.expect("r")),
        Vec::<u64>::new()
    );
    assert_eq!(
        versions(r(ReadStream::forward().limit(0)).await.expect("r")),
        Vec::<u64>::new()
    );
}

/// Reads longer than one backend batch come back whole and in order.
pub async fn reads_cross_batch_boundaries<S: EventStore>(store: S) {
    let s = sid("Long-1");
    for chunk in 0..3 {
        let batch: Vec<NewEvent> = (0..450).map(|i| ev("A", chunk * 450 + i)).collect();
        store
            .append(&s, ExpectedVersion::Any, batch)
            .await
            .expect("append");
    }
    let got = all(&store, &s).await;
    assert_eq!(got.len(), 1350);
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, e)| n_of(&e.data) == Some(i as i64)));
    let back = store
        .read_stream_to_vec(&s, ReadStream::backward())
        .await
        .expect("back");
    assert_eq!(back.len(), 1350);
    assert_eq!(back[0].stream_version, v(1350));
    let feed = read_all_vec(&store, ReadAll::from_start()).await;
    assert_eq!(feed.len(), 1350);
    let limited = read_all_vec(&store, ReadAll::after(feed[99].global_position).limit(700)).await;
    assert_eq!(limited.len(), 700);
    assert_eq!(limited[0].event_id, feed[100].event_id);
}

/// A stream as of a version and as of an instant.
pub async fn time_travel<S: EventStore>(store: S) {
    let s = sid("Travel-1");
    store
        .append(&s, ExpectedVersion::Any, vec![ev("A", 1), ev("A", 2)])
        .await
        .expect("append");
    let first = all(&store, &s).await;
    let t = first[1].recorded_at;
    // The next event must be stamped after `t`. Wait for the store's clock
    // (not this process's: PostgreSQL stamps events with the server's) to
    // pass `t`, watching the stamps of probe events in another stream.
    let probe = sid("TravelClock-1");
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
            break;
        }
    }
    store
        .append(&s, ExpectedVersion::Any, vec![ev("A", 3)])
        .await
        .expect("append");
    let third = all(&store, &s).await[2].recorded_at;
    assert!(third > t, "event 3 stamped {third}, not after {t}");
    let as_of = store
        .read_stream_to_vec(&s, ReadStream::forward().as_of(t))
        .await
        .expect("as of");
    assert_eq!(as_of.len(), 2);
    let before_all = store
        .read_stream_to_vec(
            &s,
            ReadStream::forward().as_of(first[0].recorded_at - chrono::Duration::seconds(1)),
        )
        .await
        .expect("as of");
    assert!(before_all.is_empty());
    let until = store
        .read_stream_to_vec(&s, ReadStream::forward().until_version(v(1)))
        .await
        .expect("until");
    assert_eq!(until.len(), 1);
    let repo = Repository::<Account, _>::new(store.clone());
    let ctx = CommandContext::new();
    repo.execute("tt", &ctx, |a| a.open("tt"))
        .await
        .expect("open");
    repo.execute("tt", &ctx, |a| a.deposit(10))
        .await
        .expect("deposit");
    repo.execute("tt", &ctx, |a| a.deposit(5))
        .await
        .expect("deposit");
    let past = repo.load_at_version("tt", v(2)).await.expect("load at");
    assert_eq!(past.state.balance, 10);
    assert_eq!(past.version, Some(v(2)));
}

/// `read_all` by position, category and event type.
pub async fn read_all_filters<S: EventStore>(store: S) {
    store
        .append(
            &sid("Cat-1"),
            ExpectedVersion::Any,
            vec![ev("X", 1), ev("Y", 2)],
        )
        .await
        .expect("a");
    store
        .append(&sid("Dog-1"), ExpectedVersion::Any, vec![ev("X", 3)])
        .await
        .expect("a");
    store
        .append(&sid("Cat-2"), ExpectedVersion::Any, vec![ev("Z", 4)])
        .await
        .expect("a");
    let ns = |es: Vec<RecordedEvent>| {
        es.iter()
            .map(|e| n_of(&e.data).unwrap_or(-1))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ns(read_all_vec(&store, ReadAll::from_start()).await),
        vec![1, 2, 3, 4]
    );
    assert_eq!(
        ns(read_all_vec(&store, ReadAll::from_start().categories(["Cat"])).await),
        vec![1, 2, 4]
    );
    assert_eq!(
        ns(read_all_vec(&store, ReadAll::from_start().event_types(["X"])).await),
        vec![1, 3]
    );
    assert_eq!(
        ns(read_all_vec(
            &store,
            ReadAll::from_start()
                .categories(["Cat"])
                .event_types(["X", "Z"])
        )
        .await),
        vec![1, 4]
    );
    let all_events = read_all_vec(&store, ReadAll::from_start()).await;
    assert_eq!(
        ns(read_all_vec(&store, ReadAll::after(all_events[1].global_position)).await),
        vec![3, 4]
    );
    assert_eq!(
        ns(read_all_vec(&store, ReadAll::from_start().limit(2)).await),
        vec![1, 2]
    );
    assert!(
        read_all_vec(&store, ReadAll::after(all_events[3].global_position))
            .await
            .is_empty()
    );
    assert_eq!(
        store.head_position().await.expect("head"),
        Some(all_events[3].global_position)
    );
    // Positions round-trip through their text form.
    for e in &all_events {
        assert_eq!(
            e.global_position
                .to_string()
                .parse::<GlobalPosition>()
                .expect("parse"),
            e.global_position
        );
    }
}

/// Streams of a category, head versions and stats.
pub async fn stream_listing_and_stats<S: EventStore + StreamCatalog>(store: S) {
    assert_eq!(store.stats().await.expect("stats").events, 0);
    store
        .append(
            &sid("Cat-b"),
            ExpectedVersion::Any,
            vec![ev("X", 1), ev("Y", 2)],
        )
        .await
        .expect("a");
    store
        .append(&sid("Cat-a"), ExpectedVersion::Any, vec![ev("X", 3)])
        .await
        .expect("a");
    store
        .append(&sid("Dog-1"), ExpectedVersion::Any, vec![ev("X", 4)])
        .await
        .expect("a");
    let cats: Vec<_> = store
        .list_streams("Cat")
        .map(|r| r.expect("info"))
        .collect()
        .await;
    assert_eq!(
        cats.iter()
            .map(|i| (i.stream_id.to_string(), i.version.0))
            .collect::<Vec<_>>(),
        vec![("Cat-a".to_owned(), 1), ("Cat-b".to_owned(), 2)]
    );
    let st = store.stats().await.expect("stats");
    assert_eq!((st.streams, st.events), (3, 4));
    assert_eq!(
        st.categories
            .iter()
            .map(|c| (c.category.as_str(), c.streams, c.events))
            .collect::<Vec<_>>(),
        vec![("Cat", 2, 3), ("Dog", 1, 1)]
    );
    assert_eq!(
        st.event_types
            .iter()
            .map(|t| (t.event_type.as_str(), t.events))
            .collect::<Vec<_>>(),
        vec![("X", 3), ("Y", 1)]
    );
    assert!(st.first_recorded_at.is_some() && st.first_recorded_at <= st.last_recorded_at);
}

/// The bank account through the repository.
pub async fn repository_commands<S: EventStore>(store: S) {
    let repo = Repository::<Account, _>::new(store.clone());
    let ctx = CommandContext::new();
    let r = repo
        .execute("a1", &ctx, |a| a.open("ann"))
        .await
        .expect("open");
    assert_eq!(r.version, Some(v(1)));
    repo.execute("a1", &ctx, |a| a.deposit(100))
        .await
        .expect("deposit");
    repo.execute("a1", &ctx, |a| a.withdraw(30))
        .await
        .expect("withdraw");
    let refused = repo.execute("a1", &ctx, |a| a.withdraw(1000)).await;
    assert!(matches!(
        refused,
        Err(CommandError::Rejected(AccountError::InsufficientFunds {
            balance: 70,
            requested: 1000
        }))
    ));
    assert!(matches!(
        repo.execute("a1", &ctx, |a| a.open("again")).await,
        Err(CommandError::Rejected(AccountError::AlreadyOpen))
    ));
    let loaded = repo.load("a1").await.expect("load");
    assert_eq!(loaded.state.balance, 70);
    assert_eq!(loaded.state.owner, "ann");
    assert_eq!(loaded.version, Some(v(3)));
    assert_eq!(loaded.report.events_replayed, 3);
    let stored = all(&store, &sid("Account-a1")).await;
    assert_eq!(
        stored
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        vec!["Opened", "Deposited", "Withdrew"]
    );
    assert_eq!(stored[1].data, json!({"amount": 100}));
    let created = repo
        .create("new1", &ctx, |a| a.open("nia"))
        .await
        .expect("create");
    assert_eq!(created.version, Some(v(1)));
    match repo.create("new1", &ctx, |a| a.open("again")).await {
        Err(CommandError::Store(e)) => assert!(e.is_conflict(), "{e}"),
        other => panic!("create on an existing stream must conflict, got {other:?}"),
    }
    let missing = repo.load("nobody").await.expect("load");
    assert_eq!(missing.version, None);
    assert!(matches!(
        repo.execute("bad\nid", &ctx, |a| a.open("x")).await,
        Err(CommandError::Store(Error::InvalidStreamId { .. }))
    ));
}

/// Concurrent commands on one aggregate all land through retries.
pub async fn repository_retries_on_conflict<S: EventStore>(store: S) {
    let repo = Repository::<Account, _>::new(store.clone()).with_retry(RetryPolicy {
        max_attempts: 200,
        ..RetryPolicy::default()
    });
    let ctx = CommandContext::new();
    repo.execute("hot", &ctx, |a| a.open("hot"))
        .await
        .expect("open");
    let mut handles = Vec::new();
    for _ in 0..6 {
        let repo = repo.clone();
        handles.push(tokio::spawn(async move {
            let mut retried = 0;
            for _ in 0..5 {
                let r = repo
                    .execute("hot", &CommandContext::new(), |a| a.deposit(10))
                    .await
                    .expect("deposit");
                retried += r.attempts - 1;
            }
            retried
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    let loaded = repo.load("hot").await.expect("load");
    assert_eq!(loaded.state.balance, 300);
    assert_eq!(loaded.version, Some(v(31)));
    // Without retries, a stale decision surfaces as a conflict.
    let no_retry = Repository::<Account, _>::new(store.clone()).with_retry(RetryPolicy::none());
    let racing: Vec<_> = (0..8)
        .map(|_| {
            let r = no_retry.clone();
            tokio::spawn(async move {
                r.execute("hot", &CommandContext::new(), |a| a.deposit(1))
                    .await
            })
        })
        .collect();
    let mut ok = 0;
    for h in racing {
        match h.await.expect("task") {
            Ok(_) => ok += 1,
            Err(CommandError::Store(e)) => assert!(e.is_conflict(), "{e}"),
            Err(e) => panic!("{e}"),
        }
    }
    let loaded = repo.load("hot").await.expect("load");
    assert_eq!(loaded.state.balance, 300 + ok);
}

/// Correlation and causation ids flow from commands and handled events.
pub async fn repository_metadata_flow<S: EventStore>(store: S) {
    let repo = Repository::<Account, _>::new(store.clone());
    let corr = uuid::Uuid::now_v7();
    let ctx = CommandContext::new()
        .with_correlation_id(corr)
        .with_header("user", json!("ops"));
    repo.execute("m1", &ctx, |a| a.open("m"))
        .await
        .expect("open");
    let opened = all(&store, &sid("Account-m1")).await.remove(0);
    assert_eq!(opened.metadata.correlation_id, Some(corr));
    assert_eq!(opened.metadata.headers["user"], json!("ops"));
    // A command issued while handling `opened` is caused by it.
    repo.execute("m2", &CommandContext::caused_by(&opened), |a| a.open("n"))
        .await
        .expect("open");
    let caused = all(&store, &sid("Account-m2")).await.remove(0);
    assert_eq!(caused.metadata.causation_id, Some(opened.event_id.0));
    assert_eq!(caused.metadata.correlation_id, Some(corr));
}

/// A stored event type the aggregate does not know is an error naming it.
pub async fn unknown_event_type_is_reported<S: EventStore>(store: S) {
    let s = sid("Account-u1");
    store
        .append(
            &s,
            ExpectedVersion::Any,
            vec![
                NewEvent::new("Opened", json!({"owner": "u"})),
                NewEvent::new("Frozen", json!({})),
            ],
        )
        .await
        .expect("append");
    let repo = Repository::<Account, _>::new(store.clone());
    match repo.load("u1").await {
        Err(Error::UnknownEventType {
            stream,
            version,
            event_type,
        }) => {
            assert_eq!(stream, s);
            assert_eq!(version, v(2));
            assert_eq!(event_type, "Frozen");
        }
        other => panic!("expected UnknownEventType, got {other:?}"),
    }
    let s2 = sid("Account-u2");
    store
        .append(
            &s2,
            ExpectedVersion::Any,
            vec![NewEvent::new("Deposited", json!({"amount": "lots"}))],
        )
        .await
        .expect("append");
    assert!(
        matches!(repo.load("u2").await, Err(Error::Decode { ref event_type, .. }) if event_type == "Deposited")
    );
}

fn snap(id: &str, version: u64, schema: u32, balance: i64) -> Snapshot {
    Snapshot {
        aggregate_type: "Account".into(),
        aggregate_id: id.into(),
        version: v(version),
        schema_version: schema,
        state: json!({"owner": id, "balance": balance, "open": true}),
        created_at: Utc::now(),
    }
}

/// A snapshot write never replaces a newer one.
pub async fn snapshot_store_guarded_writes<S: SnapshotStore>(store: S) {
    assert_eq!(
        store.load_snapshot("Account", "s1").await.expect("load"),
        None
    );
    assert_eq!(
        store
            .save_snapshot(&snap("s1", 10, 1, 10))
            .await
            .expect("save"),
        SnapshotWrite::Written
    );
    assert_eq!(
        store
            .save_snapshot(&snap("s1", 5, 1, 5))
            .await
            .expect("save"),
        SnapshotWrite::Superseded
    );
    assert_eq!(
        store
            .load_snapshot("Account", "s1")
            .await
            .expect("load")
            .map(|s| s.version),
        Some(v(10))
    );
    assert_eq!(
        store
            .save_snapshot(&snap("s1", 20, 1, 20))
            .await
            .expect("save"),
        SnapshotWrite::Written
    );
    // A newer schema version wins even at a lower stream version.
    assert_eq!(
        store
            .save_snapshot(&snap("s1", 3, 2, 3))
            .await
            .expect("save"),
        SnapshotWrite::Written
    );
    let live = store
        .load_snapshot("Account", "s1")
        .await
        .expect("load")
        .expect("some");
    assert_eq!((live.version, live.schema_version), (v(3), 2));
    assert_eq!(live.state["balance"], 3);
    assert_eq!(
        store
            .save_snapshot(&snap("s1", 30, 1, 30))
            .await
            .expect("save"),
        SnapshotWrite::Superseded
    );
    assert_eq!(
        store
            .delete_snapshot("Account", "s1")
            .await
            .expect("delete"),
        1
    );
    assert_eq!(
        store.load_snapshot("Account", "s1").await.expect("load"),
        None
    );
    // Racing writers end with the newest live.
    let handles: Vec<_> = (1..=20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .save_snapshot(&snap("race", i, 1, i as i64))
                    .await
                    .expect("save")
            })
        })
        .collect();
    for h in handles {
        h.await.expect("task");
    }
    assert_eq!(
        store
            .load_snapshot("Account", "race")
            .await
            .expect("load")
            .map(|s| s.version),
        Some(v(20))
    );
}

async fn open_accounts<S: EventStore>(store: &S, n: usize, deposits: usize) {
    let repo = Repository::<Account, _>::new(store.clone());
    let ctx = CommandContext::new();
    for i in 0..n {
        let id = format!("q{i}");
        repo.execute(&id, &ctx, |a| a.open("q"))
            .await
            .expect("open");
        for _ in 0..deposits * (i + 1) {
            repo.execute(&id, &ctx, |a| a.deposit(1))
                .await
                .expect("deposit");
        }
    }
}

/// Coverage, freshness and bulk invalidation.
pub async fn snapshot_queries<S: EventStore + SnapshotStore + SnapshotAdmin>(store: S) {
    open_accounts(&store, 3, 2).await; // heads 3, 5, 7
    store
        .append(&sid("Other-1"), ExpectedVersion::Any, vec![ev("X", 1)])
        .await
        .expect("a");
    store
        .save_snapshot(&snap("q0", 3, 1, 2))
        .await
        .expect("save");
    store
        .save_snapshot(&snap("q1", 2, 2, 1))
        .await
        .expect("save");
    let cov = store
        .snapshot_coverage(Some("Account"))
        .await
        .expect("coverage");
    assert_eq!(cov.len(), 1);
    assert_eq!(
        (
            cov[0].aggregates,
            cov[0].with_snapshot,
            cov[0].without_snapshot
        ),
        (3, 2, 1)
    );
    assert_eq!(cov[0].by_schema_version.get(&1), Some(&1));
    assert_eq!(cov[0].by_schema_version.get(&2), Some(&1));
    let all_cov = store.snapshot_coverage(None).await.expect("coverage");
    assert_eq!(
        all_cov
            .iter()
            .map(|c| c.aggregate_type.as_str())
            .collect::<Vec<_>>(),
        vec!["Account", "Other"]
    );
    let stale = store
        .stale_snapshots(Some("Account"), 2)
        .await
        .expect("stale");
    assert_eq!(
        stale
            .iter()
            .map(|s| (s.aggregate_id.as_str(), s.events_behind))
            .collect::<Vec<_>>(),
        vec![("q2", 7), ("q1", 3)]
    );
    assert_eq!(stale[0].snapshot_version, None);
    assert_eq!(stale[1].snapshot_version, Some(v(2)));
    assert_eq!(stale[1].head, v(5));
    assert_eq!(
        store
            .invalidate_snapshots("Account", Some(2))
            .await
            .expect("invalidate"),
        1
    );
    assert!(store
        .load_snapshot("Account", "q0")
        .await
        .expect("load")
        .is_none());
    assert!(store
        .load_snapshot("Account", "q1")
        .await
        .expect("load")
        .is_some());
    assert_eq!(
        store
            .invalidate_snapshots("Account", None)
            .await
            .expect("invalidate"),
        1
    );
    assert_eq!(
        store.snapshot_coverage(Some("Account")).await.expect("cov")[0].with_snapshot,
        0
    );
}

/// Staged snapshots are promoted in one step, never over a newer live one.
pub async fn snapshot_staging_and_promote<S: SnapshotStore + SnapshotStaging>(store: S) {
    store
        .stage_snapshot(&snap("p1", 5, 2, 5))
        .await
        .expect("stage");
    store
        .stage_snapshot(&snap("p2", 5, 2, 5))
        .await
        .expect("stage");
    store
        .stage_snapshot(&snap("p3", 5, 2, 5))
        .await
        .expect("stage");
    store
        .stage_snapshot(&snap("p3", 6, 2, 6))
        .await
        .expect("restage replaces");
    assert_eq!(
        store
            .load_staged("Account", "p3")
            .await
            .expect("staged")
            .map(|s| s.version),
        Some(v(6))
    );
    // The application keeps running on the live table meanwhile.
    assert!(store
        .load_snapshot("Account", "p1")
        .await
        .expect("live")
        .is_none());
    store
        .save_snapshot(&snap("p2", 9, 2, 9))
        .await
        .expect("live newer at same schema");
    store
        .save_snapshot(&snap("p3", 9, 1, 9))
        .await
        .expect("live older schema");
    let staged: Vec<_> = store
        .staged_snapshots("Account")
        .map(|s| s.expect("staged").aggregate_id)
        .collect()
        .await;
    assert_eq!(staged, vec!["p1", "p2", "p3"]);
    let report = store.promote_staged("Account").await.expect("promote");
    assert_eq!((report.promoted, report.kept_live), (2, 1));
    assert_eq!(
        store
            .load_snapshot("Account", "p1")
            .await
            .expect("l")
            .map(|s| s.version),
        Some(v(5))
    );
    assert_eq!(
        store
            .load_snapshot("Account", "p2")
            .await
            .expect("l")
            .map(|s| s.version),
        Some(v(9))
    );
    let p3 = store
        .load_snapshot("Account", "p3")
        .await
        .expect("l")
        .expect("some");
    assert_eq!((p3.version, p3.schema_version), (v(6), 2));
    assert_eq!(store.staged_snapshots("Account").count().await, 0);
    store
        .stage_snapshot(&snap("p9", 1, 2, 1))
        .await
        .expect("stage");
    assert_eq!(store.clear_staged("Account").await.expect("clear"), 1);
    assert!(store
        .load_staged("Account", "p9")
        .await
        .expect("staged")
        .is_none());
}

/// With a snapshot every N events, a load reads the snapshot plus the tail.
pub async fn repository_snapshots_every_n<S: EventStore + SnapshotStore>(store: S) {
    let repo = Repository::<Account, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(10));
    let ctx = CommandContext::new();
    repo.execute("n1", &ctx, |a| a.open("n"))
        .await
        .expect("open");
    for _ in 0..24 {
        repo.execute("n1", &ctx, |a| a.deposit(5))
            .await
            .expect("deposit");
    }
    let live = store
        .load_snapshot("Account", "n1")
        .await
        .expect("load")
        .expect("snapshot");
    assert_eq!(live.version, v(20));
    assert_eq!(live.schema_version, Account::SCHEMA_VERSION);
    let loaded = repo.load("n1").await.expect("load");
    assert_eq!(loaded.report.snapshot_version, Some(v(20)));
    assert_eq!(loaded.report.events_replayed, 5);
    assert_eq!(loaded.state.balance, 120);
    assert_eq!(loaded.version, Some(v(25)));
    let manual = Repository::<Account, _>::new(store.clone()).with_snapshots(
        store.clone(),
        SnapshotConfig {
            policy: SnapshotPolicy::Manual,
            mode: annals::SnapshotMode::Sync,
        },
    );
    let taken = manual
        .snapshot("n1")
        .await
        .expect("snapshot")
        .expect("exists");
    assert_eq!(taken.write, annals::SnapshotWrite::Written);
    let taken = taken.snapshot;
    assert_eq!(taken.version, v(25));
    assert_eq!(
        manual
            .load("n1")
            .await
            .expect("load")
            .report
            .events_replayed,
        0
    );
    let cost = Repository::<Account, _>::new(store.clone()).with_snapshots(
        store.clone(),
        SnapshotConfig {
            policy: SnapshotPolicy::LoadCost(3),
            mode: annals::SnapshotMode::Sync,
        },
    );
    cost.execute("c1", &ctx, |a| a.open("c"))
        .await
        .expect("open");
    cost.execute("c1", &ctx, |a| a.deposit(1))
        .await
        .expect("deposit");
    cost.execute("c1", &ctx, |a| a.deposit(1))
        .await
        .expect("deposit");
    assert!(store
        .load_snapshot("Account", "c1")
        .await
        .expect("load")
        .is_none());
    cost.execute("c1", &ctx, |a| a.deposit(1))
        .await
        .expect("deposit");
    assert_eq!(
        store
            .load_snapshot("Account", "c1")
            .await
            .expect("load")
            .map(|s| s.version),
        Some(v(4))
    );
}

/// The interval policy snapshots when the live snapshot is older than the
/// interval (or missing), and not otherwise.
pub async fn snapshot_interval_policy<S: EventStore + SnapshotStore>(store: S) {
    let hourly = Repository::<Account, _>::new(store.clone()).with_snapshots(
        store.clone(),
        SnapshotConfig {
            policy: SnapshotPolicy::Interval(Duration::from_secs(3600)),
            mode: annals::SnapshotMode::Sync,
        },
    );
    let ctx = CommandContext::new();
    hourly
        .execute("i1", &ctx, |a| a.open("i"))
        .await
        .expect("open");
    // No snapshot yet: the first save takes one.
    assert_eq!(
        store
            .load_snapshot("Account", "i1")
            .await
            .expect("l")
            .map(|s| s.version),
        Some(v(1))
    );
    hourly
        .execute("i1", &ctx, |a| a.deposit(1))
        .await
        .expect("deposit");
    // The live one is fresh: no new snapshot within the hour.
    assert_eq!(
        store
            .load_snapshot("Account", "i1")
            .await
            .expect("l")
            .map(|s| s.version),
        Some(v(1))
    );
    let always = Repository::<Account, _>::new(store.clone()).with_snapshots(
        store.clone(),
        SnapshotConfig {
            policy: SnapshotPolicy::Interval(Duration::ZERO),
            mode: annals::SnapshotMode::Sync,
        },
    );
    always
        .execute("i1", &ctx, |a| a.deposit(1))
        .await
        .expect("deposit");
    assert_eq!(
        store
            .load_snapshot("Account", "i1")
            .await
            .expect("l")
            .map(|s| s.version),
        Some(v(3))
    );
}

/// An aggregate whose state layout changed: schema version 2, with a
/// migration step from 1.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct AccountV2 {
    holder: String,
    cents: i64,
}

impl Aggregate for AccountV2 {
    const TYPE: &'static str = "Account";
    const SCHEMA_VERSION: u32 = 2;
    type Event = AccountEvent;
    fn apply(&mut self, e: &AccountEvent) {
        match e {
            AccountEvent::Opened { owner, .. } => self.holder.clone_from(owner),
            AccountEvent::Deposited { amount } => self.cents += amount,
            AccountEvent::Withdrew { amount } => self.cents -= amount,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct AccountV2Migrating(AccountV2);

impl Aggregate for AccountV2Migrating {
    const TYPE: &'static str = "Account";
    const SCHEMA_VERSION: u32 = 2;
    type Event = AccountEvent;
    fn apply(&mut self, e: &AccountEvent) {
        self.0.apply(e)
    }
    fn migrate_snapshot(from: u32, state: serde_json::Value) -> Option<serde_json::Value> {
        if from != 1 {
            return None;
        }
        Some(json!({"holder": state.get("owner")?, "cents": state.get("balance")?}))
    }
}

/// A schema bump: old snapshots are ignored, the aggregate replayed, and a
/// new snapshot at the new schema version follows the policy.
pub async fn snapshot_schema_bump_is_ignored<S: EventStore + SnapshotStore>(store: S) {
    let v1 = Repository::<Account, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(5));
    let ctx = CommandContext::new();
    v1.execute("b1", &ctx, |a| a.open("b")).await.expect("open");
    for _ in 0..6 {
        v1.execute("b1", &ctx, |a| a.deposit(10))
            .await
            .expect("deposit");
    }
    assert_eq!(
        store
            .load_snapshot("Account", "b1")
            .await
            .expect("l")
            .map(|s| (s.version, s.schema_version)),
        Some((v(5), 1))
    );
    let v2 = Repository::<AccountV2, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(5));
    let loaded = v2.load("b1").await.expect("load");
    assert_eq!(
        loaded.report.skipped,
        Some(SnapshotSkip::SchemaVersion {
            found: 1,
            expected: 2
        })
    );
    assert_eq!(loaded.report.events_replayed, 7);
    assert_eq!(loaded.state.cents, 60);
    for _ in 0..3 {
        v2.execute("b1", &ctx, |a: &AccountV2| {
            Ok::<_, ()>(vec![AccountEvent::Deposited {
                amount: a.cents.min(1),
            }])
        })
        .await
        .expect("deposit");
    }
    let live = store
        .load_snapshot("Account", "b1")
        .await
        .expect("l")
        .expect("some");
    assert_eq!((live.version, live.schema_version), (v(10), 2));
    assert_eq!(
        v2.load("b1").await.expect("load").report.snapshot_version,
        Some(v(10))
    );
    // Old code meets a newer snapshot: ignored as well, same result.
    let old = v1.load("b1").await.expect("load");
    assert_eq!(
        old.report.skipped,
        Some(SnapshotSkip::SchemaVersion {
            found: 2,
            expected: 1
        })
    );
    assert_eq!(old.state.balance, 63);
}

/// A registered state migration upgrades an old snapshot on load.
pub async fn snapshot_migration_on_load<S: EventStore + SnapshotStore>(store: S) {
    let v1 = Repository::<Account, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(4));
    let ctx = CommandContext::new();
    v1.execute("g1", &ctx, |a| a.open("g")).await.expect("open");
    for _ in 0..5 {
        v1.execute("g1", &ctx, |a| a.deposit(3))
            .await
            .expect("deposit");
    }
    let repo = Repository::<AccountV2Migrating, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(4));
    let loaded = repo.load("g1").await.expect("load");
    assert_eq!(loaded.report.snapshot_version, Some(v(4)));
    assert!(loaded.report.snapshot_migrated);
    assert_eq!(loaded.report.events_replayed, 2);
    assert_eq!(
        loaded.state.0,
        AccountV2 {
            holder: "g".into(),
            cents: 15
        }
    );
    assert_eq!(
        loaded.state,
        repo.load_without_snapshot("g1").await.expect("load").state
    );
}

/// A snapshot that does not decode is ignored with identical results.
pub async fn corrupt_snapshot_falls_back<S: EventStore + SnapshotStore>(store: S) {
    let repo = Repository::<Account, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(3));
    let ctx = CommandContext::new();
    repo.execute("k1", &ctx, |a| a.open("k"))
        .await
        .expect("open");
    for _ in 0..4 {
        repo.execute("k1", &ctx, |a| a.deposit(7))
            .await
            .expect("deposit");
    }
    let mut bad = store
        .load_snapshot("Account", "k1")
        .await
        .expect("l")
        .expect("some");
    bad.state = json!({"balance": "not a number"});
    bad.version = v(4);
    store.save_snapshot(&bad).await.expect("save");
    let loaded = repo.load("k1").await.expect("load");
    assert!(
        matches!(loaded.report.skipped, Some(SnapshotSkip::Undecodable(_))),
        "{:?}",
        loaded.report
    );
    assert_eq!(loaded.state.balance, 28);
    assert_eq!(loaded.report.events_replayed, 5);
    // The next save at a multiple of 3 writes a good snapshot again.
    repo.execute("k1", &ctx, |a| a.deposit(1))
        .await
        .expect("deposit");
    let fixed = repo.load("k1").await.expect("load");
    assert_eq!(fixed.report.snapshot_version, Some(v(6)));
    assert_eq!(fixed.state.balance, 29);
}

/// A snapshot beyond the stream's head is ignored and reported.
pub async fn snapshot_ahead_of_head_is_ignored<S: EventStore + SnapshotStore>(store: S) {
    let repo = Repository::<Account, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(100));
    let ctx = CommandContext::new();
    repo.execute("h1", &ctx, |a| a.open("h"))
        .await
        .expect("open");
    repo.execute("h1", &ctx, |a| a.deposit(2))
        .await
        .expect("deposit");
    store
        .save_snapshot(&snap("h1", 50, 1, 999))
        .await
        .expect("save");
    let loaded = repo.load("h1").await.expect("load");
    assert_eq!(
        loaded.report.skipped,
        Some(SnapshotSkip::AheadOfHead {
            snapshot: v(50),
            head: Some(v(2))
        })
    );
    assert_eq!(loaded.state.balance, 2);
    store
        .save_snapshot(&snap("ghost", 3, 1, 999))
        .await
        .expect("save");
    let ghost = repo.load("ghost").await.expect("load");
    assert_eq!(ghost.version, None);
    assert_eq!(ghost.state, Account::default());
}

/// `load_snapshot_and_events` returns the live snapshot and the events from
/// its version on (that event first, across read pages), as the two reads
/// one after the other would; `None` without a snapshot; and a snapshot
/// ahead of the head comes with no events (issue 11).
pub async fn snapshot_and_events_in_one_read<S: EventStore + SnapshotStore>(store: S) {
    let stream = StreamId::new("Account", "one-read").expect("stream id");
    // More events after the snapshot than any backend's first read page.
    let events: Vec<NewEvent> = (0..1_300)
        .map(|i| NewEvent::new("Deposited", json!({ "amount": i })))
        .collect();
    store
        .append(&stream, ExpectedVersion::NoStream, events)
        .await
        .expect("append");
    assert!(store
        .load_snapshot_and_events(&store, "Account", &stream)
        .await
        .expect("no snapshot")
        .is_none());
    store
        .save_snapshot(&snap("one-read", 7, 1, 21))
        .await
        .expect("save");
    let (found, read) = store
        .load_snapshot_and_events(&store, "Account", &stream)
        .await
        .expect("load")
        .expect("a snapshot");
    assert_eq!(
        (found.version, found.state["balance"].clone()),
        (v(7), json!(21))
    );
    let got: Vec<RecordedEvent> = read.map(|e| e.expect("event")).collect().await;
    let want = store
        .read_stream_to_vec(&stream, ReadStream::forward().from(v(7)))
        .await
        .expect("read_stream");
    assert_eq!(got.len(), 1_294);
    assert_eq!(
        got.iter()
            .map(|e| (e.event_id, e.stream_version))
            .collect::<Vec<_>>(),
        want.iter()
            .map(|e| (e.event_id, e.stream_version))
            .collect::<Vec<_>>()
    );
    assert_eq!(got[0].stream_version, v(7));
    assert_eq!(got[0].data.as_str(), want[0].data.as_str());
    store
        .save_snapshot(&snap("one-read", 1_400, 1, 0))
        .await
        .expect("save ahead");
    let (ahead, read) = store
        .load_snapshot_and_events(&store, "Account", &stream)
        .await
        .expect("load ahead")
        .expect("a snapshot ahead");
    assert_eq!(ahead.version, v(1_400));
    assert_eq!(read.count().await, 0);
}

/// Removing the snapshot store changes no result.
pub async fn snapshots_change_no_result<S: EventStore + SnapshotStore>(store: S) {
    let with = Repository::<Account, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(3));
    let without = Repository::<Account, _>::new(store.clone());
    let ctx = CommandContext::new();
    for i in 0..4 {
        let id = format!("r{i}");
        with.execute(&id, &ctx, |a| a.open("r"))
            .await
            .expect("open");
        for k in 0..(i * 4 + 2) {
            if k % 3 == 2 {
                let _ = with.execute(&id, &ctx, |a| a.withdraw(4)).await;
            } else {
                with.execute(&id, &ctx, |a| a.deposit(3))
                    .await
                    .expect("deposit");
            }
        }
        let a = with.load(&id).await.expect("load");
        let b = without.load(&id).await.expect("load");
        assert_eq!((a.state, a.version), (b.state, b.version));
    }
}

/// Background snapshots: commands never fail or wait on them, none is lost,
/// and every snapshot is the fold of an exact prefix.
pub async fn background_snapshots_lose_no_command<S: EventStore + SnapshotStore>(store: S) {
    let repo = Repository::<Account, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(2).background(16));
    let mut handles = Vec::new();
    for t in 0..4 {
        let repo = repo.clone();
        handles.push(tokio::spawn(async move {
            let id = format!("bg{t}");
            let ctx = CommandContext::new();
            repo.execute(&id, &ctx, |a| a.open("bg"))
                .await
                .expect("open");
            for _ in 0..30 {
                repo.execute(&id, &ctx, |a| a.deposit(1))
                    .await
                    .expect("deposit");
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    repo.shutdown().await;
    let plain = Repository::<Account, _>::new(store.clone());
    for t in 0..4 {
        let id = format!("bg{t}");
        let loaded = plain.load(&id).await.expect("load");
        assert_eq!(loaded.state.balance, 30);
        assert_eq!(loaded.version, Some(v(31)));
        let s = store
            .load_snapshot("Account", &id)
            .await
            .expect("l")
            .expect("flushed at shutdown");
        let at = plain
            .load_at_version(&id, s.version)
            .await
            .expect("load at");
        assert_eq!(
            s.state,
            serde_json::to_value(&at.state).expect("json"),
            "snapshot is not the fold of its prefix"
        );
    }
}

/// Snapshots created while writers append are folds of exact prefixes.
pub async fn snapshots_under_concurrent_writers<S: EventStore + SnapshotStore>(store: S) {
    let writer_repo = Repository::<Account, _>::new(store.clone()).with_retry(RetryPolicy {
        max_attempts: 500,
        ..RetryPolicy::default()
    });
    let ctx = CommandContext::new();
    writer_repo
        .execute("cw", &ctx, |a| a.open("cw"))
        .await
        .expect("open");
    let stop = Arc::new(AtomicBool::new(false));
    // Writers start once the snapshotter is running, so the two overlap even
    // on a store whose calls never yield (the in-memory one).
    let snapping = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|_| {
            let r = writer_repo.clone();
            let snapping = snapping.clone();
            tokio::spawn(async move {
                while !snapping.load(Ordering::Acquire) {
                    tokio::task::yield_now().await;
                }
                for _ in 0..25 {
                    r.execute("cw", &CommandContext::new(), |a| a.deposit(1))
                        .await
                        .expect("deposit");
                }
            })
        })
        .collect();
    let snapper = {
        let store = store.clone();
        let stop = stop.clone();
        let snapping = snapping.clone();
        tokio::spawn(async move {
            let repo = Repository::<Account, _>::new(store.clone()).with_snapshots(
                store.clone(),
                SnapshotConfig {
                    policy: SnapshotPolicy::Manual,
                    mode: annals::SnapshotMode::Sync,
                },
            );
            let mut taken = Vec::new();
            while !stop.load(Ordering::Acquire) {
                if let Some(s) = repo.snapshot("cw").await.expect("snapshot") {
                    taken.push(s.snapshot);
                }
                snapping.store(true, Ordering::Release);
                tokio::task::yield_now().await;
            }
            taken
        })
    };
    for w in writers {
        w.await.expect("writer");
    }
    stop.store(true, Ordering::Release);
    let taken = snapper.await.expect("snapper");
    assert!(!taken.is_empty());
    for s in taken {
        let at = writer_repo
            .load_at_version("cw", s.version)
            .await
            .expect("load at");
        assert_eq!(s.state, serde_json::to_value(&at.state).expect("json"));
        assert_eq!(at.state.balance, s.version.0 as i64 - 1);
    }
    assert_eq!(
        writer_repo.load("cw").await.expect("load").state.balance,
        75
    );
}

/// Checkpoints persist, never move backwards, and reset.
pub async fn checkpoints<S: EventStore + CheckpointStore>(store: S) {
    assert_eq!(store.load_checkpoint("proj").await.expect("load"), None);
    let r = store
        .append(
            &sid("Cp-1"),
            ExpectedVersion::Any,
            vec![ev("A", 1), ev("A", 2)],
        )
        .await
        .expect("append");
    store
        .save_checkpoint("proj", r.positions[1])
        .await
        .expect("save");
    assert_eq!(
        store.load_checkpoint("proj").await.expect("load"),
        Some(r.positions[1])
    );
    store
        .save_checkpoint("proj", r.positions[0])
        .await
        .expect("save older");
    assert_eq!(
        store.load_checkpoint("proj").await.expect("load"),
        Some(r.positions[1])
    );
    assert_eq!(store.load_checkpoint("other").await.expect("load"), None);
    store.reset_checkpoint("proj").await.expect("reset");
    assert_eq!(store.load_checkpoint("proj").await.expect("load"), None);
}

use annals::{JobOptions, Progress, SnapshotJobs};

fn quiet(_: Progress) {}

/// Pre-population writes snapshots for the stale aggregates, lists
/// failures, and a rerun has nothing left to do.
pub async fn prepopulate_snapshots<S: EventStore + SnapshotStore + SnapshotAdmin>(store: S) {
    open_accounts(&store, 4, 3).await; // heads 4, 7, 10, 13
    store
        .append(
            &sid("Account-broken"),
            ExpectedVersion::Any,
            vec![
                NewEvent::new("Opened", json!({"owner": "x"})),
                NewEvent::new("Exploded", json!({})),
            ],
        )
        .await
        .expect("a");
    let jobs = SnapshotJobs::<Account, _>::new(store.clone());
    let report = jobs
        .prepopulate(
            JobOptions {
                min_events: 5,
                concurrency: 2,
            },
            &quiet,
        )
        .await
        .expect("prepopulate");
    assert_eq!(report.examined, 3);
    assert_eq!(report.written, 3);
    assert!(report.failures.is_empty());
    assert!(store
        .load_snapshot("Account", "q0")
        .await
        .expect("l")
        .is_none());
    assert_eq!(
        store
            .load_snapshot("Account", "q3")
            .await
            .expect("l")
            .map(|s| s.version),
        Some(v(13))
    );
    let report = jobs
        .prepopulate(JobOptions::default(), &quiet)
        .await
        .expect("prepopulate all");
    assert_eq!(report.written, 1);
    assert_eq!(report.failures.len(), 1);
    assert_eq!(report.failures[0].aggregate_id, "broken");
    assert!(
        report.failures[0].reason.contains("Exploded"),
        "{}",
        report.failures[0].reason
    );
    let rerun = jobs
        .prepopulate(JobOptions::default(), &quiet)
        .await
        .expect("rerun");
    assert_eq!(
        (rerun.examined, rerun.written),
        (1, 0),
        "only the broken one is left"
    );
    let created = jobs.create("q0").await.expect("create").expect("exists");
    assert_eq!(created.snapshot.version, v(4));
    assert!(jobs.create("nobody").await.expect("create").is_none());
}

/// Migrate into staging (catching up from current-schema snapshots, fully
/// replaying others), verify, promote; loads then use the new snapshots.
pub async fn staged_migration_end_to_end<S>(store: S)
where
    S: EventStore + StreamCatalog + SnapshotStore + SnapshotAdmin + SnapshotStaging,
{
    open_accounts(&store, 3, 2).await; // heads 3, 5, 7
                                       // Old-schema snapshots everywhere.
    SnapshotJobs::<Account, _>::new(store.clone())
        .prepopulate(JobOptions::default(), &quiet)
        .await
        .expect("prepopulate");
    let jobs = SnapshotJobs::<AccountV2, _>::new(store.clone());
    // One aggregate already has a current-schema live snapshot: caught up from it.
    let q2 = Repository::<AccountV2, _>::new(store.clone())
        .load_at_version("q2", v(5))
        .await
        .expect("load");
    let q2 = annals::make_snapshot(&sid("Account-q2"), &q2.state, v(5)).expect("snapshot");
    store.save_snapshot(&q2).await.expect("save");
    let live = store
        .load_snapshot("Account", "q2")
        .await
        .expect("l")
        .expect("some");
    assert_eq!(
        (live.version, live.schema_version),
        (v(5), 2),
        "a newer schema wins"
    );
    let report = jobs
        .migrate(JobOptions::default(), &quiet)
        .await
        .expect("migrate");
    assert_eq!(
        (report.examined, report.written, report.caught_up),
        (3, 3, 1)
    );
    assert!(report.failures.is_empty());
    // The application still runs on the live table, untouched.
    assert_eq!(
        store
            .load_snapshot("Account", "q0")
            .await
            .expect("l")
            .map(|s| s.schema_version),
        Some(1)
    );
    let verify = jobs.verify(None, &quiet).await.expect("verify");
    assert_eq!((verify.staged, verify.checked), (3, 3));
    assert!(verify.mismatches.is_empty(), "{:?}", verify.mismatches);
    let promoted = jobs.promote(false, None).await.expect("promote");
    assert_eq!(promoted.promoted, 3);
    let repo = Repository::<AccountV2, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(1000));
    for (i, head) in [(0, 3), (1, 5), (2, 7)] {
        let loaded = repo.load(&format!("q{i}")).await.expect("load");
        assert_eq!(loaded.report.snapshot_version, Some(v(head)));
        assert_eq!(loaded.report.events_replayed, 0);
        assert_eq!(loaded.state.cents, head as i64 - 1);
    }
    assert_eq!(store.staged_snapshots("Account").count().await, 0);
}

/// An interrupted migration continues where it stopped on rerun: the store
/// starts failing every write after 5 staged snapshots (a crash, a full
/// disk); after it heals, a rerun skips what was staged and does the rest.
pub async fn interrupted_migration_resumes<S>(store: S)
where
    S: EventStore + StreamCatalog + SnapshotStore + SnapshotAdmin + SnapshotStaging,
{
    open_accounts(&store, 12, 1).await;
    let faulty = crate::FaultyStore::new(store.clone(), 5);
    let jobs = SnapshotJobs::<AccountV2, _>::new(faulty.clone());
    let first = jobs
        .migrate(
            JobOptions {
                min_events: 0,
                concurrency: 1,
            },
            &quiet,
        )
        .await
        .expect("migrate runs on");
    assert_eq!(first.written, 5);
    assert_eq!(first.failures.len(), 7, "each failed aggregate is listed");
    assert!(first.failures[0].reason.contains("injected"));
    assert_eq!(store.staged_snapshots("Account").count().await, 5);
    faulty.heal();
    let report = jobs
        .migrate(JobOptions::default(), &quiet)
        .await
        .expect("resume");
    assert_eq!(report.skipped, 5, "a rerun must not start over");
    assert_eq!(report.written, 7);
    assert_eq!(store.staged_snapshots("Account").count().await, 12);
    // A repository on a failing store still runs commands: a failed snapshot
    // write never fails the command.
    let broken = crate::FaultyStore::new(store.clone(), 1);
    let repo = Repository::<Account, _>::new(store.clone())
        .with_snapshots(broken, SnapshotConfig::every(1));
    repo.execute("q0", &CommandContext::new(), |a| a.deposit(1))
        .await
        .expect("first");
    repo.execute("q0", &CommandContext::new(), |a| a.deposit(1))
        .await
        .expect("snapshot write fails, command does not");
    assert_eq!(repo.load("q0").await.expect("load").state.balance, 3);
}

/// A staged snapshot that does not match a fresh replay blocks promote
/// unless forced; failures during migrate are listed and the rest go on.
pub async fn verify_blocks_bad_promote<S>(store: S)
where
    S: EventStore + StreamCatalog + SnapshotStore + SnapshotAdmin + SnapshotStaging,
{
    open_accounts(&store, 3, 1).await;
    store
        .append(
            &sid("Account-odd"),
            ExpectedVersion::Any,
            vec![
                NewEvent::new("Opened", json!({"owner": "o"})),
                NewEvent::new("Frozen", json!({})),
            ],
        )
        .await
        .expect("a");
    let jobs = SnapshotJobs::<AccountV2, _>::new(store.clone());
    let report = jobs
        .migrate(JobOptions::default(), &quiet)
        .await
        .expect("migrate");
    assert_eq!(report.written, 3);
    assert_eq!(report.failures.len(), 1);
    assert_eq!(report.failures[0].aggregate_id, "odd");
    assert!(report.failures[0].reason.contains("Frozen"));
    let mut tampered = store
        .load_staged("Account", "q1")
        .await
        .expect("l")
        .expect("some");
    tampered.state = json!({"holder": "q", "cents": 1_000_000});
    store.stage_snapshot(&tampered).await.expect("stage");
    let verify = jobs.verify(None, &quiet).await.expect("verify");
    assert_eq!(verify.mismatches.len(), 1);
    assert_eq!(verify.mismatches[0].aggregate_id, "q1");
    let sampled = jobs.verify(Some(1), &quiet).await.expect("verify sample");
    assert_eq!(sampled.checked, 1);
    let blocked = jobs.promote(false, None).await.expect_err("blocked");
    assert!(blocked.to_string().contains("q1"), "{blocked}");
    assert!(
        store
            .load_snapshot("Account", "q0")
            .await
            .expect("l")
            .is_none(),
        "nothing promoted"
    );
    let forced = jobs.promote(true, None).await.expect("forced");
    assert_eq!(forced.promoted, 3);
}

/// Promote racing with live saves never replaces a newer live snapshot, and
/// loads stay correct throughout.
pub async fn promote_races_with_live_saves<S>(store: S)
where
    S: EventStore + StreamCatalog + SnapshotStore + SnapshotAdmin + SnapshotStaging,
{
    open_accounts(&store, 6, 1).await;
    let jobs = SnapshotJobs::<Account, _>::new(store.clone());
    jobs.migrate(JobOptions::default(), &quiet)
        .await
        .expect("migrate");
    let live = Repository::<Account, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(1));
    let writer = {
        let live = live.clone();
        tokio::spawn(async move {
            for round in 0..5 {
                for i in 0..6 {
                    live.execute(&format!("q{i}"), &CommandContext::new(), |a| a.deposit(1))
                        .await
                        .expect("deposit");
                }
                if round == 1 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let report = jobs.promote(true, None).await.expect("promote");
    writer.await.expect("writer");
    assert_eq!(report.promoted + report.kept_live, 6);
    let plain = Repository::<Account, _>::new(store.clone());
    for i in 0..6 {
        let id = format!("q{i}");
        let snap = store
            .load_snapshot("Account", &id)
            .await
            .expect("l")
            .expect("some");
        let head = store
            .stream_version(&sid(&format!("Account-{id}")))
            .await
            .expect("v")
            .expect("some");
        assert_eq!(
            snap.version, head,
            "the newest live snapshot survived promote"
        );
        let a = live.load(&id).await.expect("load");
        let b = plain.load(&id).await.expect("load");
        assert_eq!((a.state, a.version), (b.state, b.version));
    }
}

/// Generated append/read/snapshot/checkpoint scenarios agree with a `Vec`
/// model (see [`crate::model`]).
pub async fn model_scenarios<S: EventStore + SnapshotStore + CheckpointStore>(store: S) {
    crate::model::check_generated(store, 12).await;
}

/// A staged migration running while writers append: every staged snapshot is
/// the fold of an exact prefix of its stream (verify finds no mismatch), and
/// after promote every load equals a full replay.
pub async fn migrate_while_writers_append<S>(store: S)
where
    S: EventStore + StreamCatalog + SnapshotStore + SnapshotAdmin + SnapshotStaging,
{
    open_accounts(&store, 8, 1).await;
    let repo = Repository::<Account, _>::new(store.clone()).with_retry(RetryPolicy {
        max_attempts: 500,
        ..RetryPolicy::default()
    });
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let repo = repo.clone();
            tokio::spawn(async move {
                for round in 0..10 {
                    let id = format!("q{}", (w * 3 + round) % 8);
                    repo.execute(&id, &CommandContext::new(), |a| a.deposit(1))
                        .await
                        .expect("deposit");
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let jobs = SnapshotJobs::<AccountV2, _>::new(store.clone());
    let report = jobs
        .migrate(
            JobOptions {
                min_events: 0,
                concurrency: 3,
            },
            &quiet,
        )
        .await
        .expect("migrate");
    for w in writers {
        w.await.expect("writer");
    }
    assert_eq!(report.written, 8);
    let verify = jobs.verify(None, &quiet).await.expect("verify");
    assert!(verify.mismatches.is_empty(), "{:?}", verify.mismatches);
    jobs.promote(false, None).await.expect("promote");
    let with = Repository::<AccountV2, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(1000));
    for i in 0..8 {
        let id = format!("q{i}");
        let a = with.load(&id).await.expect("load");
        let b = with.load_without_snapshot(&id).await.expect("load");
        assert!(a.report.snapshot_version.is_some());
        assert_eq!((a.state, a.version), (b.state, b.version));
    }
}
