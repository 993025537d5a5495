//! The library's metrics (`annals::CATALOGUE`): every backend records the
//! same counters for the same calls, exactly once (so a delegating store such
//! as `AnyStore` adds nothing of its own).
//!
//! Each test installs a debugging recorder for its own thread only
//! ([`metrics::set_default_local_recorder`]): the suite's test body runs on
//! the test's thread (`block_on`), where the backends record after each
//! await, and tests running in parallel on other threads do not see it.

use annals::bank::Account;
use annals::{
    CommandContext, EventStore, ExpectedVersion, NewEvent, ReadAll, ReadStream, Repository,
    SnapshotConfig, SnapshotStore,
};
use futures::StreamExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;
use serde_json::json;

use super::{sid, v};

/// What a recorder holds, read by metric name and labels.
struct Recorded(Vec<(metrics_util::CompositeKey, DebugValue)>);

impl Recorded {
    fn take(snapshotter: &Snapshotter) -> Self {
        Recorded(
            snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .map(|(key, _, _, value)| (key, value))
                .collect(),
        )
    }

    /// The series of `name` that carry every label of `labels`.
    fn series<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a (metrics_util::CompositeKey, DebugValue)> + 'a {
        self.0.iter().filter(move |(key, _)| {
            key.key().name() == name
                && labels.iter().all(|(k, want)| {
                    key.key()
                        .labels()
                        .any(|l| l.key() == *k && l.value() == *want)
                })
        })
    }

    /// The sum of the counters of `name` with `labels` (0 when none).
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.series(name, labels)
            .map(|(key, value)| match (key.kind(), value) {
                (MetricKind::Counter, DebugValue::Counter(n)) => *n,
                _ => panic!("{name} is not a counter"),
            })
            .sum()
    }

    /// The observations of the histograms of `name`.
    fn observations(&self, name: &str) -> usize {
        self.series(name, &[])
            .map(|(_, value)| match value {
                DebugValue::Histogram(values) => values.len(),
                _ => panic!("{name} is not a histogram"),
            })
            .sum()
    }

    /// The values of label `label` over the series of `name`.
    fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut values: Vec<String> = self
            .series(name, &[])
            .flat_map(|(key, _)| {
                key.key()
                    .labels()
                    .filter(|l| l.key() == label)
                    .map(|l| l.value().to_owned())
                    .collect::<Vec<_>>()
            })
            .collect();
        values.sort();
        values.dedup();
        values
    }
}

/// Appends (written, deduplicated, conflicting, invalid) and reads are
/// counted once each, under one `backend` label, with a duration per call.
pub async fn append_and_read_metrics<S: EventStore>(store: S) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let s = sid("Metered-1");
    let first = vec![
        NewEvent::new("A", json!({ "n": 1 })),
        NewEvent::new("A", json!({ "n": 2 })),
    ];
    store
        .append(&s, ExpectedVersion::NoStream, first.clone())
        .await
        .expect("first append");
    store
        .append(
            &s,
            ExpectedVersion::Exact(v(2)),
            vec![NewEvent::new("A", json!({ "n": 3 }))],
        )
        .await
        .expect("second append");
    // The same batch again: a retry, answered from what is stored.
    let retried = store
        .append(&s, ExpectedVersion::NoStream, first)
        .await
        .expect("retried append");
    assert!(retried.deduplicated, "a retried batch is deduplicated");
    let conflict = store
        .append(
            &s,
            ExpectedVersion::Exact(v(1)),
            vec![NewEvent::new("A", json!({ "n": 4 }))],
        )
        .await
        .expect_err("stale expected version");
    assert!(conflict.is_conflict(), "{conflict}");
    store
        .append(&s, ExpectedVersion::Any, vec![NewEvent::new("", json!({}))])
        .await
        .expect_err("an event without a type is refused");

    let read = store
        .read_stream_to_vec(&s, ReadStream::forward())
        .await
        .expect("read_stream");
    assert_eq!(read.len(), 3);
    let mut all = store.read_all(ReadAll::from_start().limit(2));
    let mut from_all = 0;
    while let Some(e) = all.next().await {
        e.expect("read_all item");
        from_all += 1;
    }
    assert_eq!(from_all, 2);

    let m = Recorded::take(&snapshotter);
    let backends = m.label_values("annals_appends_total", "backend");
    assert_eq!(
        backends.len(),
        1,
        "appends are recorded under one backend label: {backends:?}"
    );
    assert_eq!(m.counter("annals_appends_total", &[]), 2);
    assert_eq!(m.counter("annals_events_appended_total", &[]), 3);
    assert_eq!(m.counter("annals_appends_deduplicated_total", &[]), 1);
    assert_eq!(m.counter("annals_append_conflicts_total", &[]), 1);
    assert_eq!(m.counter("annals_append_failures_total", &[]), 1);
    assert_eq!(m.observations("annals_append_duration_seconds"), 5);
    assert_eq!(m.counter("annals_events_read_total", &[]), 5);
    for name in [
        "annals_events_appended_total",
        "annals_append_conflicts_total",
        "annals_events_read_total",
    ] {
        assert_eq!(m.label_values(name, "backend"), backends, "{name}");
    }
}

/// A repository's loads are counted by how the snapshot was used, with the
/// events they replayed, and its snapshot writes by outcome.
pub async fn aggregate_load_metrics<S: EventStore + SnapshotStore>(store: S) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let repo = Repository::<Account, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(4));
    let ctx = CommandContext::new();
    // Loads 1..=6, each before its command: the first finds no stream (no
    // snapshot: missing); the fourth command's save crosses version 4 and
    // writes a snapshot, so loads 5 and 6 use it.
    repo.execute("m1", &ctx, |a| a.open("m"))
        .await
        .expect("open");
    for _ in 0..5 {
        repo.execute("m1", &ctx, |a| a.deposit(1))
            .await
            .expect("deposit");
    }
    let loaded = repo.load("m1").await.expect("load");
    assert_eq!(loaded.report.snapshot_version, Some(v(4)));
    assert_eq!(loaded.report.events_replayed, 2);
    repo.load_without_snapshot("m1")
        .await
        .expect("load without snapshot");

    let m = Recorded::take(&snapshotter);
    let account = ("aggregate_type", "Account");
    let loads = |snapshot| {
        m.counter(
            "annals_aggregate_loads_total",
            &[account, ("snapshot", snapshot)],
        )
    };
    // Before the snapshot: loads at versions 0..=3 (none stored yet).
    assert_eq!(loads("missing"), 4);
    // After it: the loads of the 5th and 6th commands, and `load`.
    assert_eq!(loads("hit"), 3);
    assert_eq!(loads("disabled"), 1);
    assert_eq!(m.counter("annals_aggregate_loads_total", &[]), 8);
    // Replayed: 0+1+2+3 before the snapshot, 0+1+2 after it, 6 without.
    assert_eq!(
        m.counter("annals_aggregate_events_replayed_total", &[account]),
        6 + 3 + 6
    );
    assert_eq!(m.counter("annals_snapshots_written_total", &[account]), 1);
    assert_eq!(m.counter("annals_snapshot_skipped_total", &[]), 0);
}
