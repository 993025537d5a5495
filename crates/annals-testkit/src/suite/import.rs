//! Importing recorded events ([`annals::EventImport`]): every field but the
//! position kept, input order kept, a rerun adds nothing, conflicts are per
//! stream (another event at a version, an id stored as another event or
//! written earlier in the call, a gap) and leave the other streams going, a stream continued across calls,
//! and a `read_all` follower stays gap-free while imports and appends run
//! together.

use std::collections::HashSet;
use std::sync::Arc;

use annals::{
    EventId, EventImport, ExpectedVersion, ImportConflictKind, ImportEvent, Metadata, Payload,
    ReadAll, RecordedEvent,
};
use chrono::{DateTime, TimeZone, Utc};
use serde_json::json;
use uuid::Uuid;

use super::{all, ev, read_all_vec, sid, v};

/// An instant with microseconds (what SQL backends keep), `k` seconds after
/// a fixed point in 2021.
fn at(k: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(1_610_000_000_123_456 + k * 1_000_001)
        .single()
        .expect("valid instant")
}

/// Event `n` of `stream` at `version`, with metadata and a fixed
/// `recorded_at`.
fn imp(stream: &str, version: u64, n: i64) -> ImportEvent {
    let mut metadata = Metadata {
        correlation_id: Some(Uuid::from_u128(7)),
        causation_id: Some(Uuid::from_u128(n as u128 + 100)),
        ..Metadata::default()
    };
    metadata
        .headers
        .insert("source".into(), json!({ "n": n, "f": 0.5 }));
    ImportEvent {
        event_id: EventId(Uuid::from_u128(0xA000 + n as u128)),
        stream_id: sid(stream),
        stream_version: v(version),
        event_type: format!("T{}", n % 3),
        event_version: 1 + (n % 2) as u32,
        data: Payload::from_value(&json!({ "n": n, "big": 1e300, "s": "ü" })).expect("payload"),
        metadata,
        recorded_at: at(n),
    }
}

/// Interleaved streams, in the order a source's `read_all` would give.
fn source_log() -> Vec<ImportEvent> {
    vec![
        imp("A-1", 1, 1),
        imp("B-1", 1, 2),
        imp("A-1", 2, 3),
        imp("A-1", 3, 4),
        imp("C-1", 1, 5),
        imp("B-1", 2, 6),
        imp("A-1", 4, 7),
    ]
}

/// What must survive an import: everything but the position.
fn key(e: &RecordedEvent) -> ImportEvent {
    ImportEvent::from(e.clone())
}

/// Every field but the position is kept, input order becomes the store's
/// global order, and the report's positions are those `read_all` shows.
pub async fn import_keeps_events_and_order<S: EventImport>(store: S) {
    let input = source_log();
    let report = store.import_events(input.clone()).await.expect("import");
    assert_eq!(report.imported, 7);
    assert_eq!(report.skipped, 0);
    assert!(report.conflicts.is_empty(), "{:?}", report.conflicts);
    let log = read_all_vec(&store, ReadAll::from_start()).await;
    let got: Vec<ImportEvent> = log.iter().map(key).collect();
    assert_eq!(got, input, "same events, same order");
    let positions: Vec<_> = log.iter().map(|e| Some(e.global_position)).collect();
    assert_eq!(report.positions, positions);
    assert_eq!(
        store.stream_version(&sid("A-1")).await.expect("head"),
        Some(v(4))
    );
    // Appends go on after imported streams as after any others.
    store
        .append(&sid("A-1"), ExpectedVersion::Exact(v(4)), vec![ev("E", 9)])
        .await
        .expect("append after import");
}

/// A rerun adds nothing and answers the positions of the stored events;
/// an input that continues stored streams writes only the rest.
pub async fn import_twice_adds_nothing<S: EventImport>(store: S) {
    let input = source_log();
    let first = store
        .import_events(input[..4].to_vec())
        .await
        .expect("import");
    assert_eq!(first.imported, 4);
    let again = store.import_events(input.clone()).await.expect("rerun");
    assert_eq!((again.imported, again.skipped), (3, 4));
    assert!(again.conflicts.is_empty(), "{:?}", again.conflicts);
    assert_eq!(again.positions[..4], first.positions[..]);
    let third = store.import_events(input.clone()).await.expect("third");
    assert_eq!((third.imported, third.skipped), (0, 7));
    assert_eq!(third.positions, again.positions);
    let log = read_all_vec(&store, ReadAll::from_start()).await;
    assert_eq!(log.len(), 7);
    assert_eq!(log.iter().map(key).collect::<Vec<_>>(), input);
}

/// Each conflict is reported once per stream, with its first version, and
/// nothing of that stream is written; the other streams are imported.
pub async fn import_reports_conflicts_per_stream<S: EventImport>(store: S) {
    // A-1 holds another event at version 2; D-1 holds the id of B-1's
    // second event.
    store
        .append(&sid("A-1"), ExpectedVersion::NoStream, vec![ev("E", 1)])
        .await
        .expect("seed A-1");
    let b2 = imp("B-1", 2, 6);
    store
        .append(
            &sid("D-1"),
            ExpectedVersion::NoStream,
            vec![ev("E", 2).with_id(b2.event_id)],
        )
        .await
        .expect("seed D-1");
    // F-1's event has the id of C-1's first event, earlier in the batch.
    let mut f1 = imp("F-1", 1, 10);
    f1.event_id = imp("C-1", 1, 5).event_id;
    let input = vec![
        imp("A-1", 1, 11), // another event at A-1 version 1
        imp("A-1", 2, 12),
        imp("B-1", 1, 2),
        b2.clone(), // id stored in D-1
        imp("C-1", 1, 5),
        imp("E-1", 2, 8), // a gap: E-1 does not exist
        imp("C-1", 2, 9),
        f1,
    ];
    let report = store.import_events(input).await.expect("import");
    let conflicts: Vec<_> = report
        .conflicts
        .iter()
        .map(|c| {
            (
                c.stream.as_str().to_owned(),
                c.version.get(),
                c.kind.clone(),
            )
        })
        .collect();
    assert_eq!(
        conflicts,
        vec![
            ("A-1".to_owned(), 1, ImportConflictKind::Differs),
            (
                "B-1".to_owned(),
                2,
                ImportConflictKind::IdTaken {
                    stream: sid("D-1"),
                    version: v(1)
                }
            ),
            (
                "E-1".to_owned(),
                2,
                ImportConflictKind::Gap { expected: v(1) }
            ),
            (
                "F-1".to_owned(),
                1,
                ImportConflictKind::IdTaken {
                    stream: sid("C-1"),
                    version: v(1)
                }
            ),
        ]
    );
    assert_eq!(report.imported, 2, "C-1's two events");
    assert_eq!(
        report
            .positions
            .iter()
            .map(Option::is_some)
            .collect::<Vec<_>>(),
        vec![false, false, false, false, true, false, true, false]
    );
    // Nothing of a conflicting stream was written, not even B-1's first
    // event, which came before its conflict.
    assert_eq!(all(&store, &sid("A-1")).await.len(), 1);
    assert!(all(&store, &sid("B-1")).await.is_empty());
    assert!(all(&store, &sid("E-1")).await.is_empty());
    assert_eq!(all(&store, &sid("C-1")).await.len(), 2);
    assert!(all(&store, &sid("F-1")).await.is_empty());
}

/// Imports and appends running together: a `read_all` follower sees every
/// event once, in increasing positions, each stream in version order.
pub async fn import_with_concurrent_appends_keeps_the_feed_gap_free<S: EventImport>(store: S) {
    let writers = 4u64;
    let batches = 10u64;
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        let done = Arc::clone(&done);
        tasks.push(tokio::spawn(async move {
            for b in 0..batches {
                // Importer w writes streams I{w}-0 and I{w}-1, interleaved,
                // three events per call; then appends to P{w}-1.
                let events = vec![
                    with_place(imp("X-1", 1, 0), &format!("I{w}-0"), b * 2 + 1, w, b, 0),
                    with_place(imp("X-1", 1, 0), &format!("I{w}-1"), b + 1, w, b, 1),
                    with_place(imp("X-1", 1, 0), &format!("I{w}-0"), b * 2 + 2, w, b, 2),
                ];
                let report = store.import_events(events).await.expect("import");
                assert_eq!(report.imported, 3, "{:?}", report.conflicts);
                store
                    .append(
                        &sid(&format!("P{w}-1")),
                        ExpectedVersion::Any,
                        vec![ev("E", b as i64)],
                    )
                    .await
                    .expect("append");
            }
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
    }
    let total = (writers * batches * 4) as usize;
    let mut seen = HashSet::new();
    let mut after = annals::GlobalPosition::START;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while seen.len() < total {
        assert!(
            std::time::Instant::now() < deadline,
            "follower saw {} of {total}",
            seen.len()
        );
        for e in read_all_vec(&store, ReadAll::after(after)).await {
            assert!(e.global_position > after, "positions increase");
            after = e.global_position;
            assert!(seen.insert(e.event_id), "{} seen twice", e.event_id);
        }
        if seen.len() < total {
            tokio::task::yield_now().await;
        }
    }
    for t in tasks {
        t.await.expect("writer task");
    }
    assert_eq!(seen.len(), total);
    for w in 0..writers {
        for s in [format!("I{w}-0"), format!("I{w}-1")] {
            let versions: Vec<u64> = all(&store, &sid(&s))
                .await
                .iter()
                .map(|e| e.stream_version.get())
                .collect();
            let want = if s.ends_with("-0") {
                batches * 2
            } else {
                batches
            };
            assert_eq!(versions, (1..=want).collect::<Vec<_>>(), "{s}");
        }
    }
}

/// `e` moved to `stream` at `version`, with an id unique to writer `w`,
/// batch `b`, index `k`.
fn with_place(
    mut e: ImportEvent,
    stream: &str,
    version: u64,
    w: u64,
    b: u64,
    k: u64,
) -> ImportEvent {
    e.stream_id = sid(stream);
    e.stream_version = v(version);
    e.event_id = EventId(Uuid::from_u128(
        0xB000_0000 + u128::from(w * 10_000 + b * 10 + k),
    ));
    e
}

/// `list_checkpoints` lists every checkpoint once, by name, at its saved
/// position; a reset one is gone.
pub async fn checkpoints_are_listed_by_name<S: annals::CheckpointListing>(store: S) {
    assert!(store.list_checkpoints().await.expect("list").is_empty());
    for (name, seq) in [("proj-b", 7), ("proj-a", 3), ("proj-c", 1)] {
        store
            .save_checkpoint(name, annals::GlobalPosition::from_seq(seq))
            .await
            .expect("save");
    }
    store.reset_checkpoint("proj-c").await.expect("reset");
    let listed: Vec<(String, u64)> = store
        .list_checkpoints()
        .await
        .expect("list")
        .into_iter()
        .map(|c| (c.name, c.position.seq()))
        .collect();
    assert_eq!(
        listed,
        vec![("proj-a".to_owned(), 3), ("proj-b".to_owned(), 7)]
    );
}
