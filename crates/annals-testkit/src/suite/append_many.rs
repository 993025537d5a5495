//! Multi-stream atomic appends ([`annals::MultiStreamAppend`]): all or
//! nothing, each stream's own expected version, idempotent retries (also
//! after a lost reply), a transfer between two accounts, the global order
//! under concurrent calls, and no deadlock between overlapping calls.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use annals::bank::{Account, AccountEvent};
use annals::{
    encode_event, AppendResult, CommandContext, Error, EventId, ExpectedVersion, GlobalPosition,
    MultiStreamAppend, NewEvent, ReadAll, RecordedEvent, Repository, StreamBatch, StreamId,
    StreamVersion,
};

use super::{all, ev, read_all_vec, sid, v};
use crate::{FaultyStore, LOST_REPLY};

fn batch(stream: &str, expected: ExpectedVersion, events: Vec<NewEvent>) -> StreamBatch {
    StreamBatch::new(sid(stream), expected, events)
}

/// Results come back per stream, in the caller's order; versions as an
/// append assigns them; positions increase across the call; refused input
/// (a stream twice, an id in two batches, an empty batch) writes nothing.
pub async fn append_many_round_trip<S: MultiStreamAppend>(store: S) {
    store
        .append(&sid("B-1"), ExpectedVersion::NoStream, vec![ev("E", 0)])
        .await
        .expect("seed B-1");
    let results = store
        .append_many(vec![
            batch("C-1", ExpectedVersion::NoStream, vec![ev("E", 1)]),
            batch(
                "B-1",
                ExpectedVersion::Exact(v(1)),
                vec![ev("E", 2), ev("E", 3)],
            ),
            batch("A-1", ExpectedVersion::Any, vec![ev("E", 4)]),
        ])
        .await
        .expect("append_many");
    let heads: Vec<(u64, u64, bool)> = results
        .iter()
        .map(|r| (r.first_version.0, r.last_version.0, r.deduplicated))
        .collect();
    assert_eq!(heads, [(1, 1, false), (2, 3, false), (1, 1, false)]);
    let positions: Vec<GlobalPosition> = results
        .iter()
        .flat_map(|r| r.positions.iter().copied())
        .collect();
    assert_eq!(positions.len(), 4);
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions must increase in the order of the batches: {positions:?}"
    );
    let b = all(&store, &sid("B-1")).await;
    assert_eq!(b.len(), 3);
    assert_eq!(b[1].global_position, positions[1]);
    assert_eq!(all(&store, &sid("C-1")).await.len(), 1);
    assert_eq!(all(&store, &sid("A-1")).await.len(), 1);

    assert!(store
        .append_many(Vec::new())
        .await
        .expect("empty")
        .is_empty());

    let twice = store
        .append_many(vec![
            batch("D-1", ExpectedVersion::Any, vec![ev("E", 5)]),
            batch("D-1", ExpectedVersion::Any, vec![ev("E", 6)]),
        ])
        .await;
    assert!(
        matches!(&twice, Err(Error::InvalidEvent { stream, .. }) if stream.as_str() == "D-1"),
        "{twice:?}"
    );
    let id = EventId::new();
    let shared = store
        .append_many(vec![
            batch("D-1", ExpectedVersion::Any, vec![ev("E", 7).with_id(id)]),
            batch("E-1", ExpectedVersion::Any, vec![ev("E", 8).with_id(id)]),
        ])
        .await;
    assert!(
        matches!(&shared, Err(Error::InvalidEvent { stream, .. }) if stream.as_str() == "E-1"),
        "{shared:?}"
    );
    let empty = store
        .append_many(vec![
            batch("D-1", ExpectedVersion::Any, vec![ev("E", 9)]),
            batch("E-1", ExpectedVersion::Any, Vec::new()),
        ])
        .await;
    assert!(
        matches!(&empty, Err(Error::InvalidEvent { stream, .. }) if stream.as_str() == "E-1"),
        "{empty:?}"
    );
    for s in ["D-1", "E-1"] {
        assert_eq!(
            store.stream_version(&sid(s)).await.expect("head"),
            None,
            "{s}"
        );
    }
}

/// One stream's wrong expected version fails the whole call, naming that
/// stream and its head, and nothing is written on any stream.
pub async fn append_many_is_all_or_nothing<S: MultiStreamAppend>(store: S) {
    for s in ["Acc-a", "Acc-b"] {
        store
            .append(&sid(s), ExpectedVersion::NoStream, vec![ev("E", 0)])
            .await
            .expect("seed");
    }
    let before = read_all_vec(&store, ReadAll::from_start()).await.len();
    let refused = store
        .append_many(vec![
            batch("Acc-new", ExpectedVersion::NoStream, vec![ev("E", 1)]),
            batch("Acc-a", ExpectedVersion::Exact(v(1)), vec![ev("E", 2)]),
            batch("Acc-b", ExpectedVersion::Exact(v(5)), vec![ev("E", 3)]),
        ])
        .await;
    match refused {
        Err(Error::WrongExpectedVersion {
            stream,
            expected,
            actual,
        }) => {
            assert_eq!(stream.as_str(), "Acc-b");
            assert_eq!(expected, ExpectedVersion::Exact(v(5)));
            assert_eq!(actual, Some(v(1)));
        }
        other => panic!("expected a conflict on Acc-b, got {other:?}"),
    }
    let no_stream = store
        .append_many(vec![
            batch("Acc-a", ExpectedVersion::StreamExists, vec![ev("E", 4)]),
            batch("Acc-b", ExpectedVersion::NoStream, vec![ev("E", 5)]),
        ])
        .await;
    assert!(
        matches!(&no_stream, Err(e) if e.is_conflict()),
        "{no_stream:?}"
    );
    // An invalid event in the last batch refuses the first one too.
    let invalid = store
        .append_many(vec![
            batch("Acc-a", ExpectedVersion::Any, vec![ev("E", 6)]),
            batch("Acc-b", ExpectedVersion::Any, vec![ev("", 7)]),
        ])
        .await;
    assert!(
        matches!(&invalid, Err(Error::InvalidEvent { stream, .. }) if stream.as_str() == "Acc-b"),
        "{invalid:?}"
    );
    // An event id already stored elsewhere refuses the whole call.
    let taken = all(&store, &sid("Acc-a")).await[0].event_id;
    let dup = store
        .append_many(vec![
            batch("Acc-new", ExpectedVersion::Any, vec![ev("E", 8)]),
            batch(
                "Acc-b",
                ExpectedVersion::Any,
                vec![ev("E", 9).with_id(taken)],
            ),
        ])
        .await;
    assert!(
        matches!(&dup, Err(Error::DuplicateEventId { event_id, .. }) if *event_id == taken),
        "{dup:?}"
    );
    assert_eq!(
        store.stream_version(&sid("Acc-a")).await.expect("a"),
        Some(v(1))
    );
    assert_eq!(
        store.stream_version(&sid("Acc-b")).await.expect("b"),
        Some(v(1))
    );
    assert_eq!(
        store.stream_version(&sid("Acc-new")).await.expect("new"),
        None
    );
    assert_eq!(
        read_all_vec(&store, ReadAll::from_start()).await.len(),
        before,
        "a refused append_many wrote something"
    );
}

/// A retried identical call returns the original results, deduplicated,
/// whatever it expected, and writes nothing; a call that repeats only some
/// stored batches is a reused id.
pub async fn append_many_retry_is_deduplicated<S: MultiStreamAppend>(store: S) {
    let call = vec![
        batch(
            "Pay-1",
            ExpectedVersion::NoStream,
            vec![ev("E", 1), ev("E", 2)],
        ),
        batch("Pay-2", ExpectedVersion::NoStream, vec![ev("E", 3)]),
    ];
    let first = store.append_many(call.clone()).await.expect("first");
    assert!(first.iter().all(|r| !r.deduplicated));
    let again = store.append_many(call.clone()).await.expect("retry");
    let undup = |rs: &[AppendResult]| {
        rs.iter()
            .map(|r| AppendResult {
                deduplicated: false,
                ..r.clone()
            })
            .collect::<Vec<_>>()
    };
    assert!(again.iter().all(|r| r.deduplicated), "{again:?}");
    assert_eq!(undup(&again), first);
    assert_eq!(read_all_vec(&store, ReadAll::from_start()).await.len(), 3);

    // Another stream moved on since: still the original results.
    store
        .append(
            &sid("Pay-2"),
            ExpectedVersion::Exact(v(1)),
            vec![ev("E", 4)],
        )
        .await
        .expect("later append");
    let late = store.append_many(call.clone()).await.expect("late retry");
    assert_eq!(undup(&late), first);

    // The first batch again, with a new second one: not a retry.
    let partial = store
        .append_many(vec![
            call[0].clone(),
            batch("Pay-3", ExpectedVersion::NoStream, vec![ev("E", 5)]),
        ])
        .await;
    match partial {
        Err(Error::DuplicateEventId { event_id, stream }) => {
            assert_eq!(event_id, call[0].events[0].event_id);
            assert_eq!(stream.as_str(), "Pay-1");
        }
        other => panic!("expected a reused id, got {other:?}"),
    }
    assert_eq!(
        store.stream_version(&sid("Pay-3")).await.expect("head"),
        None
    );
    assert_eq!(read_all_vec(&store, ReadAll::from_start()).await.len(), 4);
}

/// Each batch is checked against its own stream's head: two streams at
/// different versions are written with each one's version, and the same
/// versions swapped between the streams are refused, naming the first
/// stream whose version is wrong, with nothing written.
pub async fn append_many_checks_each_streams_own_version<S: MultiStreamAppend>(store: S) {
    store
        .append(
            &sid("Own-a"),
            ExpectedVersion::NoStream,
            vec![ev("E", 1), ev("E", 2), ev("E", 3)],
        )
        .await
        .expect("seed a");
    store
        .append(&sid("Own-b"), ExpectedVersion::NoStream, vec![ev("E", 4)])
        .await
        .expect("seed b");
    let before = read_all_vec(&store, ReadAll::from_start()).await.len();
    let swapped = store
        .append_many(vec![
            batch("Own-a", ExpectedVersion::Exact(v(1)), vec![ev("E", 5)]),
            batch("Own-b", ExpectedVersion::Exact(v(3)), vec![ev("E", 6)]),
        ])
        .await;
    match swapped {
        Err(Error::WrongExpectedVersion {
            stream,
            expected,
            actual,
        }) => {
            assert_eq!(stream.as_str(), "Own-a");
            assert_eq!(expected, ExpectedVersion::Exact(v(1)));
            assert_eq!(actual, Some(v(3)));
        }
        other => panic!("expected a conflict on Own-a, got {other:?}"),
    }
    // Only the second stream's version is wrong: still nothing written.
    let second = store
        .append_many(vec![
            batch("Own-a", ExpectedVersion::Exact(v(3)), vec![ev("E", 7)]),
            batch("Own-b", ExpectedVersion::Exact(v(3)), vec![ev("E", 8)]),
        ])
        .await;
    assert!(
        matches!(&second, Err(Error::WrongExpectedVersion { stream, actual, .. })
            if stream.as_str() == "Own-b" && *actual == Some(v(1))),
        "{second:?}"
    );
    assert_eq!(
        read_all_vec(&store, ReadAll::from_start()).await.len(),
        before,
        "a refused append_many wrote something"
    );
    let done = store
        .append_many(vec![
            batch("Own-b", ExpectedVersion::Exact(v(1)), vec![ev("E", 9)]),
            batch("Own-new", ExpectedVersion::NoStream, vec![ev("E", 10)]),
            batch(
                "Own-a",
                ExpectedVersion::Exact(v(3)),
                vec![ev("E", 11), ev("E", 12)],
            ),
        ])
        .await
        .expect("each stream at its own version");
    let heads: Vec<(u64, u64)> = done
        .iter()
        .map(|r| (r.first_version.0, r.last_version.0))
        .collect();
    assert_eq!(heads, [(2, 2), (1, 1), (4, 5)]);
    for (s, head) in [("Own-a", 5), ("Own-b", 2), ("Own-new", 1)] {
        assert_eq!(
            store.stream_version(&sid(s)).await.expect("head"),
            Some(v(head)),
            "{s}"
        );
    }
}

/// A call whose every stream committed but whose reply was lost (the
/// caller saw an error) is retried with the same event ids and expected
/// versions: the retry writes nothing and returns the original results.
/// A call refused before it reached the store wrote nothing, and its retry
/// writes it once.
pub async fn append_many_lost_reply_retry_applies_once<S: MultiStreamAppend>(store: S) {
    store
        .append(&sid("Lr-a"), ExpectedVersion::NoStream, vec![ev("E", 0)])
        .await
        .expect("seed");
    let faulty = FaultyStore::new(store.clone(), i64::MAX);
    let call = vec![
        batch(
            "Lr-a",
            ExpectedVersion::Exact(v(1)),
            vec![ev("E", 1), ev("E", 2)],
        ),
        batch("Lr-b", ExpectedVersion::NoStream, vec![ev("E", 3)]),
    ];
    faulty.lose_replies(1);
    match faulty.append_many(call.clone()).await {
        Err(Error::Backend {
            backend: "faulty",
            message,
            ..
        }) if message == LOST_REPLY => {}
        other => panic!("expected the injected lost reply, got {other:?}"),
    }
    assert_eq!(faulty.replies_to_lose(), 0);
    // Committed, although the caller was not told.
    assert_eq!(
        store.stream_version(&sid("Lr-a")).await.expect("a"),
        Some(v(3))
    );
    assert_eq!(
        store.stream_version(&sid("Lr-b")).await.expect("b"),
        Some(v(1))
    );
    // The retry, as sent the first time: its expected versions are stale now.
    let retried = faulty.append_many(call.clone()).await.expect("retry");
    assert!(retried.iter().all(|r| r.deduplicated), "{retried:?}");
    let heads: Vec<(u64, u64)> = retried
        .iter()
        .map(|r| (r.first_version.0, r.last_version.0))
        .collect();
    assert_eq!(heads, [(2, 3), (1, 1)]);
    let a = all(&store, &sid("Lr-a")).await;
    let b = all(&store, &sid("Lr-b")).await;
    assert_eq!((a.len(), b.len()), (3, 1), "the retry wrote again");
    let positions: Vec<GlobalPosition> = retried
        .iter()
        .flat_map(|r| r.positions.iter().copied())
        .collect();
    let stored: Vec<GlobalPosition> = a[1..].iter().chain(&b).map(|e| e.global_position).collect();
    assert_eq!(
        positions, stored,
        "the retry must return the original positions"
    );

    // Refused before the store (a write failure): nothing written; the
    // retry after the "restart" writes once.
    let broken = FaultyStore::new(store.clone(), 0);
    let next = vec![
        batch("Lr-a", ExpectedVersion::Exact(v(3)), vec![ev("E", 4)]),
        batch("Lr-c", ExpectedVersion::NoStream, vec![ev("E", 5)]),
    ];
    let failed = broken.append_many(next.clone()).await;
    assert!(
        matches!(
            &failed,
            Err(Error::Backend {
                backend: "faulty",
                ..
            })
        ),
        "{failed:?}"
    );
    assert_eq!(store.stream_version(&sid("Lr-c")).await.expect("c"), None);
    broken.heal();
    let written = broken.append_many(next).await.expect("after the restart");
    assert!(written.iter().all(|r| !r.deduplicated));
    assert_eq!(
        store.stream_version(&sid("Lr-a")).await.expect("a"),
        Some(v(4))
    );
    assert_eq!(
        store.stream_version(&sid("Lr-c")).await.expect("c"),
        Some(v(1))
    );
}

fn account_events(events: &[AccountEvent]) -> Vec<NewEvent> {
    events
        .iter()
        .map(|e| {
            let (t, version, data) = encode_event(e).expect("encode");
            NewEvent::new(t, data).with_event_version(version)
        })
        .collect()
}

/// Moves `amount` from `from` to `to` in one atomic write, decided on the
/// loaded states and guarded by their versions.
async fn transfer<S: MultiStreamAppend>(
    repo: &Repository<Account, S>,
    store: &S,
    from: &str,
    to: &str,
    amount: i64,
) -> annals::Result<Vec<AppendResult>> {
    let (a, b) = (
        repo.load(from).await.expect("load"),
        repo.load(to).await.expect("load"),
    );
    let out = a.state.withdraw(amount).expect("funds");
    let inn = b.state.deposit(amount).expect("deposit");
    let expect =
        |v: Option<StreamVersion>| v.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
    store
        .append_many(vec![
            StreamBatch::new(
                Repository::<Account, S>::stream_id(from).expect("id"),
                expect(a.version),
                account_events(&out),
            ),
            StreamBatch::new(
                Repository::<Account, S>::stream_id(to).expect("id"),
                expect(b.version),
                account_events(&inn),
            ),
        ])
        .await
}

/// A transfer between two accounts, read back through the repository; a
/// transfer decided on a stale state of either account is refused whole.
pub async fn append_many_transfer_between_accounts<S: MultiStreamAppend>(store: S) {
    let repo = Repository::<Account, _>::new(store.clone());
    let ctx = CommandContext::new();
    repo.execute("alice", &ctx, |a| a.open("alice"))
        .await
        .expect("open");
    repo.execute("alice", &ctx, |a| a.deposit(100))
        .await
        .expect("deposit");
    repo.execute("bob", &ctx, |a| a.open("bob"))
        .await
        .expect("open");

    let done = transfer(&repo, &store, "alice", "bob", 30)
        .await
        .expect("transfer");
    assert_eq!(done[0].first_version, v(3));
    assert_eq!(done[1].first_version, v(2));
    let (alice, bob) = (
        repo.load("alice").await.expect("alice"),
        repo.load("bob").await.expect("bob"),
    );
    assert_eq!((alice.state.balance, bob.state.balance), (70, 30));

    // Decided on bob's state before a deposit landed: refused, naming bob.
    let stale_bob = repo.load("bob").await.expect("bob");
    repo.execute("bob", &ctx, |a| a.deposit(5))
        .await
        .expect("deposit");
    let alice_now = repo.load("alice").await.expect("alice");
    let refused = store
        .append_many(vec![
            StreamBatch::new(
                sid("Account-alice"),
                ExpectedVersion::Exact(alice_now.version.expect("exists")),
                account_events(&alice_now.state.withdraw(10).expect("funds")),
            ),
            StreamBatch::new(
                sid("Account-bob"),
                ExpectedVersion::Exact(stale_bob.version.expect("exists")),
                account_events(&stale_bob.state.deposit(10).expect("deposit")),
            ),
        ])
        .await;
    assert!(
        matches!(&refused, Err(Error::WrongExpectedVersion { stream, .. }) if stream.as_str() == "Account-bob"),
        "{refused:?}"
    );
    let (alice, bob) = (
        repo.load("alice").await.expect("alice"),
        repo.load("bob").await.expect("bob"),
    );
    assert_eq!((alice.state.balance, bob.state.balance), (70, 35));
    // Decided again on fresh states, it goes through.
    transfer(&repo, &store, "bob", "alice", 35)
        .await
        .expect("transfer back");
    let (alice, bob) = (
        repo.load("alice").await.expect("alice"),
        repo.load("bob").await.expect("bob"),
    );
    assert_eq!((alice.state.balance, bob.state.balance), (105, 0));
}

/// The streams of call `i` of writer `w`: two or three of five, in an order
/// that differs from call to call.
fn streams_of(w: u64, i: u64) -> Vec<String> {
    let n = 2 + (w + i) % 2;
    let start = (w * 7 + i * 3) % 5;
    let mut out: Vec<String> = (0..n)
        .map(|k| format!("Ledger-{}", (start + k * 2) % 5))
        .collect();
    if (w + i) % 3 == 0 {
        out.reverse();
    }
    out
}

/// A follower of `read_all` during concurrent `append_many` calls (and plain
/// appends to the same streams) sees every event exactly once, in
/// increasing position, each stream in version order with no gap, and each
/// call's events on a stream at consecutive versions (no other write in
/// between).
pub async fn append_many_global_order<S: MultiStreamAppend>(store: S) {
    let writers = 6u64;
    let calls = 20u64;
    let (progress, mut watch) = tokio::sync::watch::channel((0u64, false));
    let progress = Arc::new(progress);
    let reader = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut seen: Vec<RecordedEvent> = Vec::new();
            let mut after = GlobalPosition::START;
            loop {
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
    // Each writer returns the event ids of each of its writes to one stream.
    let mut handles = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        let progress = Arc::clone(&progress);
        handles.push(tokio::spawn(async move {
            let mut groups: Vec<Vec<EventId>> = Vec::new();
            for i in 0..calls {
                let batches: Vec<StreamBatch> = streams_of(w, i)
                    .iter()
                    .enumerate()
                    .map(|(k, s)| {
                        let events: Vec<NewEvent> = (0..=(k as u64 + i) % 3)
                            .map(|j| ev("E", (w * 10_000 + i * 10 + j) as i64))
                            .collect();
                        groups.push(events.iter().map(|e| e.event_id).collect());
                        batch(s, ExpectedVersion::Any, events)
                    })
                    .collect();
                store.append_many(batches).await.expect("append_many");
                progress.send_modify(|p| p.0 += 1);
            }
            groups
        }));
    }
    // A plain writer on the same streams, between the calls.
    {
        let store = store.clone();
        let progress = Arc::clone(&progress);
        handles.push(tokio::spawn(async move {
            let mut groups: Vec<Vec<EventId>> = Vec::new();
            for i in 0..calls {
                let events: Vec<NewEvent> = (0..=i % 2)
                    .map(|j| ev("E", (900_000 + i * 10 + j) as i64))
                    .collect();
                groups.push(events.iter().map(|e| e.event_id).collect());
                store
                    .append(
                        &sid(&format!("Ledger-{}", i % 5)),
                        ExpectedVersion::Any,
                        events,
                    )
                    .await
                    .expect("append");
                progress.send_modify(|p| p.0 += 1);
            }
            groups
        }));
    }
    let mut groups: Vec<Vec<EventId>> = Vec::new();
    for h in handles {
        groups.extend(h.await.expect("writer"));
    }
    let written: HashSet<EventId> = groups.iter().flatten().copied().collect();
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
    let version_of: HashMap<EventId, (StreamId, u64)> = seen
        .iter()
        .map(|e| (e.event_id, (e.stream_id.clone(), e.stream_version.0)))
        .collect();
    for group in &groups {
        let (stream, first) = &version_of[&group[0]];
        for (k, id) in group.iter().enumerate() {
            assert_eq!(
                version_of[id],
                (stream.clone(), first + k as u64),
                "one write's events on {stream} are not at consecutive versions"
            );
        }
    }
    let full: Vec<EventId> = read_all_vec(&store, ReadAll::from_start())
        .await
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(full, seen_ids, "a fresh read disagrees with the follower");
}

/// Many tasks append to overlapping sets of streams listed in opposite
/// orders, half with exact expected versions (retrying on conflicts), half
/// with `Any`. Every call finishes (a deadlock would hang the test, which
/// the outer bound turns into a failure), and every stream holds exactly
/// the events of the calls that succeeded, with no gap. A server with a
/// deadlock detector (PostgreSQL) would abort one side of a deadlock
/// instead, and the store retry it, so there the lock order itself is
/// checked by the backend's own test of the locks it holds while waiting.
pub async fn append_many_overlapping_calls_never_deadlock<S: MultiStreamAppend>(store: S) {
    let tasks = 16u64;
    let calls = 15u64;
    let names = ["Hot-a", "Hot-b", "Hot-c"];
    let work = async {
        let mut handles = Vec::new();
        for t in 0..tasks {
            let store = store.clone();
            handles.push(tokio::spawn(async move {
                let mut written: HashMap<String, u64> = HashMap::new();
                let mut conflicts = 0u64;
                for i in 0..calls {
                    // Opposite orders: a,b(,c) and (c,)b,a.
                    let mut streams: Vec<&str> = if (t + i) % 2 == 0 {
                        names[..2].to_vec()
                    } else {
                        names.to_vec()
                    };
                    if t % 2 == 1 {
                        streams.reverse();
                    }
                    loop {
                        let mut batches = Vec::new();
                        for s in &streams {
                            let expected = if t % 4 < 2 {
                                match store.stream_version(&sid(s)).await.expect("head") {
                                    Some(h) => ExpectedVersion::Exact(h),
                                    None => ExpectedVersion::NoStream,
                                }
                            } else {
                                ExpectedVersion::Any
                            };
                            batches.push(batch(s, expected, vec![ev("E", (t * 100 + i) as i64)]));
                        }
                        match store.append_many(batches).await {
                            Ok(results) => {
                                assert_eq!(results.len(), streams.len());
                                for s in &streams {
                                    *written.entry((*s).to_owned()).or_default() += 1;
                                }
                                break;
                            }
                            Err(e) if e.is_conflict() => conflicts += 1,
                            Err(e) => panic!("append_many failed: {e}"),
                        }
                    }
                }
                (written, conflicts)
            }));
        }
        let mut totals: HashMap<String, u64> = HashMap::new();
        for h in handles {
            let (written, _conflicts) = h.await.expect("task");
            for (s, n) in written {
                *totals.entry(s).or_default() += n;
            }
        }
        totals
    };
    // Only a failure bound: the calls finish long before it on every backend.
    let totals = tokio::time::timeout(Duration::from_secs(120), work)
        .await
        .expect("overlapping append_many calls deadlocked (or stalled for 120 s)");
    for s in names {
        let events = all(&store, &sid(s)).await;
        assert_eq!(events.len() as u64, totals[s], "{s}");
        assert!(
            events
                .iter()
                .enumerate()
                .all(|(i, e)| e.stream_version.0 == i as u64 + 1),
            "{s} has a gap"
        );
    }
}
