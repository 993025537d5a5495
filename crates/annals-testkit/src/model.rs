//! Model-based property testing: random sequences of appends, reads,
//! snapshot writes and checkpoint saves run against a store and against a
//! plain `Vec` model; every observable answer must agree.

use std::collections::BTreeMap;

use annals::{
    ExpectedVersion, GlobalPosition, NewEvent, ReadAll, ReadStream, Snapshot, SnapshotWrite,
    StreamId, StreamVersion,
};
use futures::TryStreamExt;
use proptest::prelude::*;
use serde_json::json;

use crate::TestStore;

/// One step of a generated scenario.
#[derive(Clone, Debug)]
pub enum Op {
    /// Append `n` events to stream `s` with an expectation derived from `exp`.
    Append {
        /// Stream index (0..4).
        s: u8,
        /// Batch size.
        n: u8,
        /// 0: any, 1: no stream, 2: exists, 3: exact head, 4: exact head + 1 (stale/wrong).
        exp: u8,
    },
    /// Read stream `s` forward from `from`, at most `limit`.
    ReadStream {
        /// Stream index.
        s: u8,
        /// First version.
        from: u8,
        /// Limit.
        limit: u8,
    },
    /// Read the feed after the `after`-th event (mod count).
    ReadAll {
        /// Index into the model's feed.
        after: u8,
        /// Limit.
        limit: u8,
    },
    /// Save a snapshot of stream `s`'s aggregate.
    Snapshot {
        /// Stream index.
        s: u8,
        /// Version.
        version: u8,
        /// Schema version.
        schema: u8,
    },
    /// Save a checkpoint at the `at`-th event of the feed.
    Checkpoint {
        /// Index into the feed.
        at: u8,
    },
}

/// Strategy for scenarios of up to `len` steps.
pub fn ops(len: usize) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        4 => (0u8..4, 1u8..5, 0u8..5).prop_map(|(s, n, exp)| Op::Append { s, n, exp }),
        2 => (0u8..4, 0u8..12, 0u8..6).prop_map(|(s, from, limit)| Op::ReadStream { s, from, limit }),
        2 => (any::<u8>(), 0u8..8).prop_map(|(after, limit)| Op::ReadAll { after, limit }),
        1 => (0u8..4, 1u8..12, 1u8..3).prop_map(|(s, version, schema)| Op::Snapshot { s, version, schema }),
        1 => any::<u8>().prop_map(|at| Op::Checkpoint { at }),
    ];
    proptest::collection::vec(op, 1..len)
}

fn stream(tag: &str, s: u8) -> StreamId {
    StreamId::new(tag, &s.to_string()).expect("valid")
}

/// Runs `ops` against `store` and the model, panicking at the first
/// disagreement. `tag` is the category, snapshot type and checkpoint name
/// the scenario uses, so several scenarios can share one store.
pub async fn check<S: TestStore>(store: S, tag: &str, ops: Vec<Op>) {
    // Model: the feed as (stream, version, payload), positions as returned.
    let mut feed: Vec<(u8, u64, i64, GlobalPosition)> = Vec::new();
    let mut heads: BTreeMap<u8, u64> = BTreeMap::new();
    let mut snaps: BTreeMap<u8, (u32, u64)> = BTreeMap::new();
    let mut checkpoint: Option<GlobalPosition> = None;
    let mut counter = 0i64;
    for op in ops {
        match op {
            Op::Append { s, n, exp } => {
                let head = heads.get(&s).copied();
                let expected = match exp {
                    0 => ExpectedVersion::Any,
                    1 => ExpectedVersion::NoStream,
                    2 => ExpectedVersion::StreamExists,
                    3 => ExpectedVersion::Exact(StreamVersion(head.unwrap_or(0))),
                    _ => ExpectedVersion::Exact(StreamVersion(head.unwrap_or(0) + 1)),
                };
                let batch: Vec<NewEvent> = (0..n)
                    .map(|_| {
                        counter += 1;
                        NewEvent::new("E", json!({ "n": counter }))
                    })
                    .collect();
                let payloads: Vec<i64> = batch
                    .iter()
                    .map(|e| e.data["n"].as_i64().unwrap_or(0))
                    .collect();
                let ok = expected.matches(head.map(StreamVersion));
                match store.append(&stream(tag, s), expected, batch).await {
                    Ok(r) => {
                        assert!(ok, "append accepted {expected:?} at head {head:?}");
                        let base = head.unwrap_or(0);
                        assert_eq!(r.first_version.0, base + 1);
                        for (i, (p, pos)) in payloads.iter().zip(&r.positions).enumerate() {
                            if let Some(last) = feed.last() {
                                assert!(*pos > last.3, "positions must increase");
                            }
                            feed.push((s, base + i as u64 + 1, *p, *pos));
                        }
                        heads.insert(s, base + n as u64);
                    }
                    Err(e) => {
                        assert!(
                            !ok && e.is_conflict(),
                            "unexpected {e} for {expected:?} at {head:?}"
                        );
                    }
                }
            }
            Op::ReadStream { s, from, limit } => {
                let got: Vec<i64> = store
                    .read_stream(
                        &stream(tag, s),
                        ReadStream::forward()
                            .from(StreamVersion(from as u64))
                            .limit(limit as u64),
                    )
                    .map_ok(|e| e.data.to_value()["n"].as_i64().unwrap_or(0))
                    .try_collect()
                    .await
                    .expect("read_stream");
                let want: Vec<i64> = feed
                    .iter()
                    .filter(|e| e.0 == s && e.1 >= from as u64)
                    .take(limit as usize)
                    .map(|e| e.2)
                    .collect();
                assert_eq!(got, want, "read_stream {s} from {from} limit {limit}");
            }
            Op::ReadAll { after, limit } => {
                let (pos, skip) = if feed.is_empty() {
                    (GlobalPosition::START, 0)
                } else {
                    let i = after as usize % (feed.len() + 1);
                    if i == 0 {
                        (GlobalPosition::START, 0)
                    } else {
                        (feed[i - 1].3, i)
                    }
                };
                let got: Vec<i64> = store
                    .read_all(ReadAll::after(pos).categories([tag]).limit(limit as u64))
                    .map_ok(|e| e.data.to_value()["n"].as_i64().unwrap_or(0))
                    .try_collect()
                    .await
                    .expect("read_all");
                let want: Vec<i64> = feed
                    .iter()
                    .skip(skip)
                    .take(limit as usize)
                    .map(|e| e.2)
                    .collect();
                assert_eq!(got, want, "read_all after {pos}");
            }
            Op::Snapshot { s, version, schema } => {
                let snap = Snapshot {
                    aggregate_type: tag.into(),
                    aggregate_id: s.to_string(),
                    version: StreamVersion(version as u64),
                    schema_version: schema as u32,
                    state: json!({ "v": version }),
                    created_at: chrono::Utc::now(),
                };
                // A stored snapshot beyond its stream's head is invalid:
                // the write replaces it whatever its version.
                let head = heads.get(&s).copied();
                let prev = snaps
                    .get(&s)
                    .copied()
                    .filter(|p| head.is_none_or(|h| p.1 <= h));
                let wins = prev.is_none_or(|p| (schema as u32, version as u64) >= p);
                let w = store.save_snapshot(&snap).await.expect("save_snapshot");
                assert_eq!(w == SnapshotWrite::Written, wins, "snapshot guard for {s}");
                if wins {
                    snaps.insert(s, (schema as u32, version as u64));
                }
                let live = store
                    .load_snapshot(tag, &s.to_string())
                    .await
                    .expect("load")
                    .map(|l| (l.schema_version, l.version.0));
                assert_eq!(live, snaps.get(&s).copied());
            }
            Op::Checkpoint { at } => {
                if feed.is_empty() {
                    continue;
                }
                let p = feed[at as usize % feed.len()].3;
                store.save_checkpoint(tag, p).await.expect("save");
                checkpoint = Some(checkpoint.map_or(p, |c| c.max(p)));
                assert_eq!(store.load_checkpoint(tag).await.expect("load"), checkpoint);
            }
        }
    }
}

/// Runs `cases` generated scenarios (deterministic seed) on one store, each
/// under its own category.
pub async fn check_generated<S: TestStore>(store: S, cases: u32) {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    for case in 0..cases {
        let scenario = ops(40).new_tree(&mut runner).expect("generate").current();
        check(store.clone(), &format!("Model{case}"), scenario).await;
    }
}
