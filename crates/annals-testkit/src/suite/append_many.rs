//! Multi-stream atomic appends ([`annals::MultiStreamAppend`]): all or
//! nothing, idempotent retries, a transfer between two accounts, the global
//! order under concurrent calls, and no deadlock between overlapping calls.

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

/// A follower of `read_all` during concurrent `append_many` calls sees every
/// event exactly once, in increasing position, each stream in version order,
/// and each call's events together with no other call's in between on a
/// stream.
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
    let mut handles = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        let progress = Arc::clone(&progress);
        handles.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..calls {
                let batches: Vec<StreamBatch> = streams_of(w, i)
                    .iter()
                    .enumerate()
                    .map(|(k, s)| {
                        let events: Vec<NewEvent> = (0..=(k as u64 + i) % 3)
                            .map(|j| ev("E", (w * 10_000 + i * 10 + j) as i64))
                            .collect();
                        ids.extend(events.iter().map(|e| e.event_id));
                        batch(s, ExpectedVersion::Any, events)
                    })
                    .collect();
                store.append_many(batches).await.expect("append_many");
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
/// the events of the calls that succeeded, with no gap.
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
