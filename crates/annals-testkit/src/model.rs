//! Model-based property testing: random sequences of appends, reads,
//! snapshot writes and checkpoint saves run against a store and against a
//! plain `Vec` model; every observable answer must agree.
//!
//! Every backend runs the same property test, [`proptest_model`], from a
//! plain `#[test]` in its `tests/it/model.rs`: a bounded number of random
//! scenarios, each on a fresh store, and a failure shrunk to a minimal
//! scenario. The seed of a run is printed with a failure; set
//! `PROPTEST_RNG_SEED` to replay it and `PROPTEST_CASES` to run more cases.
//!
//! ```
//! async fn fresh() -> Option<annals::InMemoryStore> {
//!     Some(annals::InMemoryStore::new())
//! }
//! annals_testkit::model::proptest_model(8, fresh);
//! ```

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use annals::{
    ExpectedVersion, GlobalPosition, NewEvent, ReadAll, ReadStream, Snapshot, SnapshotWrite,
    StreamId, StreamVersion,
};
use futures::{FutureExt, TryStreamExt};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};
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
                    .map_ok(|e| crate::suite::n_of(&e.data).unwrap_or(0))
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
                    .map_ok(|e| crate::suite::n_of(&e.data).unwrap_or(0))
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

/// Steps in one scenario of [`proptest_model`], at most.
pub const MAX_OPS: usize = 60;

/// Shrink steps after a failure, at most (unless `PROPTEST_MAX_SHRINK_ITERS`
/// says otherwise): each one runs a scenario on a fresh store, which on a
/// server backend costs a schema.
const MAX_SHRINK_ITERS: u32 = 512;

/// Wall-clock bound of the shrinking, in milliseconds (unless
/// `PROPTEST_MAX_SHRINK_TIME` says otherwise).
const MAX_SHRINK_TIME_MS: u32 = 120_000;

/// The model property test on one backend: `cases` random scenarios of up
/// to [`MAX_OPS`] steps, each run by [`check`] on a fresh store from `fresh`,
/// and a failure shrunk to a minimal scenario.
///
/// Call it from a plain `#[test]`, not from inside a runtime: proptest runs
/// each case synchronously, so this function owns a runtime and drives the
/// store on it. When the first call of `fresh` returns `None` the test is
/// skipped (the factory says why); a later `None` fails it. Panics, naming
/// the minimal failing scenario and the seed, when the store and the model
/// disagree.
pub fn proptest_model<S, F, Fut>(cases: u32, fresh: F)
where
    S: TestStore,
    F: Fn() -> Fut,
    Fut: Future<Output = Option<S>>,
{
    proptest_model_with_teardown(
        cases,
        || fresh().map(|store| store.map(|s| (s, ()))),
        |()| async {},
    );
}

/// [`proptest_model`] for a backend whose fresh stores need cleaning up:
/// `fresh` returns the store and a guard, and `teardown` gets the guard once
/// the case is over, whether it passed or not (for example to drop the
/// case's schema).
pub fn proptest_model_with_teardown<S, G, F, Fut, T, TFut>(cases: u32, fresh: F, teardown: T)
where
    S: TestStore,
    F: Fn() -> Fut,
    Fut: Future<Output = Option<(S, G)>>,
    T: Fn(G) -> TFut,
    TFut: Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime for the model test");
    // Asked once up front, so that an unconfigured backend skips the test
    // instead of failing every case; the store serves the first case.
    let Some(first) = rt.block_on(fresh()) else {
        return;
    };
    let first = RefCell::new(Some(first));
    let (config, seed) = config(cases);
    let cases = config.cases;
    let runs = Cell::new(0u32);
    let started = Instant::now();
    let mut runner = TestRunner::new(config);
    let result = runner.run(&ops(MAX_OPS), |scenario| {
        runs.set(runs.get() + 1);
        let taken = first.borrow_mut().take();
        let (store, guard) = taken
            .or_else(|| rt.block_on(fresh()))
            .expect("the store factory stopped giving stores during the model test");
        rt.block_on(async {
            let outcome = AssertUnwindSafe(check(store, "Model", scenario))
                .catch_unwind()
                .await;
            teardown(guard).await;
            if let Err(panic) = outcome {
                std::panic::resume_unwind(panic);
            }
        });
        Ok(())
    });
    if let Err(e) = result {
        panic!("the store disagrees with the model: {e}\nreplay with PROPTEST_RNG_SEED={seed}");
    }
    eprintln!(
        "model property test: {cases} cases passed in {:.1?} ({} scenarios run, seed {seed})",
        started.elapsed(),
        runs.get()
    );
}

/// The proptest configuration of [`proptest_model`], and the seed it uses
/// (fixed here when the environment does not fix it, so that a failure can
/// name it). `PROPTEST_*` variables override the bounds set here.
fn config(cases: u32) -> (Config, u64) {
    let set = |var: &str| std::env::var_os(var).is_some();
    let mut config = Config {
        // Nothing is written next to the sources: a failure prints its
        // minimal scenario and its seed instead.
        failure_persistence: None,
        ..Config::default()
    };
    if !set("PROPTEST_CASES") {
        config.cases = cases;
    }
    if !set("PROPTEST_MAX_SHRINK_ITERS") {
        config.max_shrink_iters = MAX_SHRINK_ITERS;
    }
    if !set("PROPTEST_MAX_SHRINK_TIME") {
        config.max_shrink_time = MAX_SHRINK_TIME_MS;
    }
    let seed = match config.rng_seed {
        RngSeed::Fixed(seed) => seed,
        RngSeed::Random => {
            use std::hash::BuildHasher;
            std::collections::hash_map::RandomState::new().hash_one(Instant::now())
        }
    };
    config.rng_seed = RngSeed::Fixed(seed);
    (config, seed)
}
