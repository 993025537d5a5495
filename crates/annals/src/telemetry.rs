//! The metrics the library records, through the [`metrics`] facade.
//!
//! The library never installs a recorder: an application (or `annals
//! serve`) installs the one it wants, and without one every call below is a
//! no-op. The names, types and labels are listed in [`CATALOGUE`] and in
//! `docs/metrics.md`.
//!
//! Appends and reads are recorded in one place for every backend:
//! [`StoreMetrics`], a `static` each backend builds once with its `backend`
//! label, whose [`StoreMetrics::append`] wraps the backend's append (timing
//! it and counting its outcome) and whose [`StoreMetrics::count_reads`] wraps
//! its read streams. A backend cannot count differently from another, and
//! the keys are built at compile time, so recording an append allocates
//! nothing beyond what the recorder does; a read wraps its stream once (one
//! box per read call) and bumps a counter handle per event. Aggregate loads and snapshot writes are recorded
//! by the repository and the snapshot jobs, above the backends.
//!
//! The projection runner records the events it applied and its lag, its
//! rebuilds their progress, and both their dead letters, by projection
//! name.

use std::future::Future;
use std::time::Instant;

use futures::{Stream, StreamExt};
use metrics::{Key, Label, Level, Metadata};

use crate::repository::{LoadReport, SnapshotSkip};
use crate::{AppendResult, EventStream, RecordedEvent, Result};

/// A metric's type, as the Prometheus exposition names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution of observations.
    Histogram,
}

/// One metric the library records: the rows of `docs/metrics.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricInfo {
    /// The metric's name.
    pub name: &'static str,
    /// Its type.
    pub kind: MetricKind,
    /// The labels it carries.
    pub labels: &'static [&'static str],
    /// What it counts or measures.
    pub help: &'static str,
}

const BACKEND: &[&str] = &["backend"];
const AGGREGATE_TYPE: &[&str] = &["aggregate_type"];
const PROJECTION: &[&str] = &["projection"];

/// Every metric the core library and its backends record alike (the
/// backends' own ones, such as SQLite's group-commit size or PostgreSQL's
/// append retries, are in `docs/metrics.md` only).
pub const CATALOGUE: &[MetricInfo] = &[
    MetricInfo {
        name: "annals_appends_total",
        kind: MetricKind::Counter,
        labels: BACKEND,
        help: "Append calls (append and append_many) that stored their events.",
    },
    MetricInfo {
        name: "annals_appends_deduplicated_total",
        kind: MetricKind::Counter,
        labels: BACKEND,
        help: "Append calls answered with the result of an earlier identical call (a retry); nothing was written.",
    },
    MetricInfo {
        name: "annals_events_appended_total",
        kind: MetricKind::Counter,
        labels: BACKEND,
        help: "Events written by appends (deduplicated retries not counted).",
    },
    MetricInfo {
        name: "annals_append_conflicts_total",
        kind: MetricKind::Counter,
        labels: BACKEND,
        help: "Append calls refused because a stream was not at the expected version.",
    },
    MetricInfo {
        name: "annals_append_failures_total",
        kind: MetricKind::Counter,
        labels: BACKEND,
        help: "Append calls that failed other than by a conflict (invalid events, database errors).",
    },
    MetricInfo {
        name: "annals_append_duration_seconds",
        kind: MetricKind::Histogram,
        labels: BACKEND,
        help: "Duration of append calls, whatever their outcome, in seconds.",
    },
    MetricInfo {
        name: "annals_events_read_total",
        kind: MetricKind::Counter,
        labels: BACKEND,
        help: "Events returned by read_stream and read_all.",
    },
    MetricInfo {
        name: "annals_aggregate_loads_total",
        kind: MetricKind::Counter,
        labels: &["aggregate_type", "snapshot"],
        help: "Aggregate loads by the repository; snapshot is hit, migrated (an older schema migrated on load), or why none was used: disabled, missing, schema_version, undecodable, ahead_of_head, store_error.",
    },
    MetricInfo {
        name: "annals_aggregate_events_replayed_total",
        kind: MetricKind::Counter,
        labels: AGGREGATE_TYPE,
        help: "Events folded by aggregate loads (after the snapshot, or from the start).",
    },
    MetricInfo {
        name: "annals_snapshot_skipped_total",
        kind: MetricKind::Counter,
        labels: AGGREGATE_TYPE,
        help: "Stored snapshots that a load or a snapshot job passed over (wrong schema version, undecodable, ahead of the head, store error).",
    },
    MetricInfo {
        name: "annals_snapshots_written_total",
        kind: MetricKind::Counter,
        labels: AGGREGATE_TYPE,
        help: "Snapshots stored by a guarded write (repository policy or snapshot job).",
    },
    MetricInfo {
        name: "annals_snapshot_superseded_total",
        kind: MetricKind::Counter,
        labels: AGGREGATE_TYPE,
        help: "Guarded snapshot writes that kept a newer stored snapshot instead.",
    },
    MetricInfo {
        name: "annals_snapshot_failures_total",
        kind: MetricKind::Counter,
        labels: AGGREGATE_TYPE,
        help: "Snapshot writes or snapshot-job aggregates that failed.",
    },
    MetricInfo {
        name: "annals_snapshot_dropped_total",
        kind: MetricKind::Counter,
        labels: AGGREGATE_TYPE,
        help: "Background snapshot requests dropped because the queue was full.",
    },
    MetricInfo {
        name: "annals_snapshots_staged_total",
        kind: MetricKind::Counter,
        labels: AGGREGATE_TYPE,
        help: "Snapshots written to the staging table by a migration.",
    },
    MetricInfo {
        name: "annals_command_conflicts_total",
        kind: MetricKind::Counter,
        labels: AGGREGATE_TYPE,
        help: "Repository commands that met a conflict on append (each attempt counted; retried by the policy).",
    },
    MetricInfo {
        name: "annals_command_replays_total",
        kind: MetricKind::Counter,
        labels: AGGREGATE_TYPE,
        help: "Commands with a command id that were applied before: the original result was returned.",
    },
    MetricInfo {
        name: "annals_projection_events_handled_total",
        kind: MetricKind::Counter,
        labels: PROJECTION,
        help: "Events a projection runner applied (handler and checkpoint committed), by projection name.",
    },
    MetricInfo {
        name: "annals_projection_lag_events",
        kind: MetricKind::Gauge,
        labels: PROJECTION,
        help: "Events between a running projection's checkpoint and the head of the feed, measured by its runner after a batch (at most every 250 ms, and whenever a batch reached the end of the log).",
    },
    MetricInfo {
        name: "annals_projection_rebuild_events_total",
        kind: MetricKind::Counter,
        labels: PROJECTION,
        help: "Events a projection rebuild (plain or blue-green) scanned and applied, by projection name, counted after each checkpoint.",
    },
    MetricInfo {
        name: "annals_projection_rebuild_position",
        kind: MetricKind::Gauge,
        labels: PROJECTION,
        help: "The sequence part of a running rebuild's last checkpoint (the global position itself on SQLite and in memory), by projection name.",
    },
    MetricInfo {
        name: "annals_projection_rebuild_head",
        kind: MetricKind::Gauge,
        labels: PROJECTION,
        help: "The sequence part of the head of the feed as a running rebuild last read it, by projection name.",
    },
    MetricInfo {
        name: "annals_projection_rebuild_remaining_events",
        kind: MetricKind::Gauge,
        labels: PROJECTION,
        help: "Events between a running rebuild's last checkpoint and the head of the feed, by projection name.",
    },
    MetricInfo {
        name: "annals_projection_dead_letters_parked_total",
        kind: MetricKind::Counter,
        labels: PROJECTION,
        help: "Events a projection runner or rebuild parked in the dead-letter table (error policy Park), by projection name.",
    },
    MetricInfo {
        name: "annals_projection_dead_letters",
        kind: MetricKind::Gauge,
        labels: PROJECTION,
        help: "Events parked in the dead-letter table of a projection, counted after each park, retry or drop made through annals (ProjectionRunner, retry_dead_letter, annals projections dead-letters).",
    },
];

/// Describes every metric of [`CATALOGUE`] to the current recorder (its
/// `# HELP` line in the Prometheus text format). Call it once after
/// installing a recorder.
pub fn describe_metrics() {
    for m in CATALOGUE {
        match m.kind {
            MetricKind::Counter => metrics::describe_counter!(m.name, m.help),
            MetricKind::Gauge => metrics::describe_gauge!(m.name, m.help),
            MetricKind::Histogram => {
                metrics::describe_histogram!(m.name, metrics::Unit::Seconds, m.help)
            }
        }
    }
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// What an append call returned, as [`StoreMetrics::append`] counts it:
/// implemented for the results of `append` and of `append_many`.
pub trait AppendOutcome {
    /// Events the call wrote (0 when it was a deduplicated retry).
    fn events_written(&self) -> u64;
}

impl AppendOutcome for AppendResult {
    fn events_written(&self) -> u64 {
        if self.deduplicated {
            0
        } else {
            self.positions.len() as u64
        }
    }
}

impl AppendOutcome for Vec<AppendResult> {
    fn events_written(&self) -> u64 {
        self.iter().map(AppendOutcome::events_written).sum()
    }
}

/// The append and read metrics of one backend, with its labels (by
/// convention one, `backend`). Build it once, as a `static`:
///
/// ```
/// use annals::StoreMetrics;
/// use metrics::Label;
///
/// static LABELS: [Label; 1] = [Label::from_static_parts("backend", "mine")];
/// static METRICS: StoreMetrics = StoreMetrics::new(&LABELS);
/// ```
///
/// and route every `append`, `append_many`, `read_stream` and `read_all`
/// through it.
#[derive(Debug)]
pub struct StoreMetrics {
    appends: Key,
    deduplicated: Key,
    events_appended: Key,
    conflicts: Key,
    failures: Key,
    duration: Key,
    events_read: Key,
}

impl StoreMetrics {
    /// The metrics of a backend whose series carry `labels`.
    pub const fn new(labels: &'static [Label]) -> Self {
        StoreMetrics {
            appends: Key::from_static_parts("annals_appends_total", labels),
            deduplicated: Key::from_static_parts("annals_appends_deduplicated_total", labels),
            events_appended: Key::from_static_parts("annals_events_appended_total", labels),
            conflicts: Key::from_static_parts("annals_append_conflicts_total", labels),
            failures: Key::from_static_parts("annals_append_failures_total", labels),
            duration: Key::from_static_parts("annals_append_duration_seconds", labels),
            events_read: Key::from_static_parts("annals_events_read_total", labels),
        }
    }

    /// Runs one append (the whole call, validation included) and records
    /// it: its duration, and whether it wrote (with its events), was a
    /// deduplicated retry, met a conflict or failed.
    pub async fn append<T: AppendOutcome>(
        &self,
        append: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = Instant::now();
        let result = append.await;
        let seconds = started.elapsed().as_secs_f64();
        metrics::with_recorder(|r| {
            r.register_histogram(&self.duration, &METADATA)
                .record(seconds);
            match &result {
                Ok(done) => match done.events_written() {
                    0 => r
                        .register_counter(&self.deduplicated, &METADATA)
                        .increment(1),
                    n => {
                        r.register_counter(&self.appends, &METADATA).increment(1);
                        r.register_counter(&self.events_appended, &METADATA)
                            .increment(n);
                    }
                },
                Err(e) if e.is_conflict() => {
                    r.register_counter(&self.conflicts, &METADATA).increment(1);
                }
                Err(_) => r.register_counter(&self.failures, &METADATA).increment(1),
            }
        });
        result
    }

    /// The `annals_events_read_total` counter, looked up once for one read,
    /// for a backend that counts its events where it makes them instead of
    /// wrapping its stream in [`StoreMetrics::count_reads`] (a wrapper
    /// moves every event once more, which a long replay notices).
    pub fn read_counter(&self) -> metrics::Counter {
        metrics::with_recorder(|r| r.register_counter(&self.events_read, &METADATA))
    }

    /// `events`, counting each event it yields in
    /// `annals_events_read_total` (the counter is looked up once per read).
    pub fn count_reads(
        &self,
        events: impl Stream<Item = Result<RecordedEvent>> + Send + 'static,
    ) -> EventStream {
        let counter = metrics::with_recorder(|r| r.register_counter(&self.events_read, &METADATA));
        events
            .inspect(move |e| {
                if e.is_ok() {
                    counter.increment(1);
                }
            })
            .boxed()
    }
}

/// The `snapshot` label of `annals_aggregate_loads_total` for a load.
fn snapshot_label(report: &LoadReport) -> &'static str {
    match (&report.snapshot_version, &report.skipped) {
        (Some(_), _) if report.snapshot_migrated => "migrated",
        (Some(_), _) => "hit",
        (None, None) | (None, Some(SnapshotSkip::Disabled)) => "disabled",
        (None, Some(SnapshotSkip::Missing)) => "missing",
        (None, Some(SnapshotSkip::SchemaVersion { .. })) => "schema_version",
        (None, Some(SnapshotSkip::Undecodable(_))) => "undecodable",
        (None, Some(SnapshotSkip::AheadOfHead { .. })) => "ahead_of_head",
        (None, Some(SnapshotSkip::StoreError(_))) => "store_error",
    }
}

/// Records one aggregate load of the repository.
pub(crate) fn record_load(aggregate_type: &'static str, report: &LoadReport) {
    metrics::counter!(
        "annals_aggregate_loads_total",
        "aggregate_type" => aggregate_type,
        "snapshot" => snapshot_label(report)
    )
    .increment(1);
    if report.events_replayed > 0 {
        metrics::counter!("annals_aggregate_events_replayed_total", "aggregate_type" => aggregate_type)
            .increment(report.events_replayed);
    }
}
