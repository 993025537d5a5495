//! Snapshot operations: create, pre-populate, and the staged migration
//! (migrate into staging, verify, promote).
//!
//! The staged migration follows the runbook operators already use (build the
//! new snapshots ahead of a deploy, then switch), done so that it can be left
//! and resumed: the staging table itself is the record of progress. A rerun
//! skips every aggregate that already has a staged snapshot at the current
//! schema version, so an interrupted run continues where it stopped. The
//! application keeps using the live table throughout; `promote` switches in
//! one transaction and never overwrites a live snapshot that is newer.

use std::marker::PhantomData;

use futures::{Stream, StreamExt, TryStreamExt};
use serde::Serialize;

use crate::repository::{decode_snapshot, fold_stream, make_snapshot, resume_from};
use crate::snapshot::{
    PromoteReport, Snapshot, SnapshotAdmin, SnapshotHistoryEntry, SnapshotStaging, SnapshotStore,
    SnapshotWrite,
};
use crate::snapshot_worker::{record_skip, record_write};
use crate::{
    Aggregate, Error, EventStore, ReadStream, Result, SnapshotSkip, StreamCatalog, StreamId,
    StreamInfo, StreamVersion,
};

/// Progress of a long operation, for a progress bar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// The number of items the operation will look at.
    Total(u64),
    /// One more item is done (successfully, skipped or failed).
    Advanced,
}

/// One aggregate an operation could not handle, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JobFailure {
    /// The aggregate id.
    pub aggregate_id: String,
    /// The error, as text.
    pub reason: String,
}

/// Outcome of `prepopulate` and `migrate`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct JobReport {
    /// Aggregates looked at.
    pub examined: u64,
    /// Snapshots written (live for prepopulate, staged for migrate).
    pub written: u64,
    /// Snapshots built but not stored because the guarded write kept a
    /// newer live one (prepopulate only; a concurrent writer got there
    /// first, or a rolled-back snapshot blocks that version).
    pub superseded: u64,
    /// Aggregates skipped because the work was already done (a rerun).
    pub skipped: u64,
    /// Of the written ones, how many were caught up from a live snapshot at
    /// the current schema version instead of fully replayed.
    pub caught_up: u64,
    /// Events folded in total.
    pub events_replayed: u64,
    /// Aggregates that failed, with their reason; the rest went on.
    pub failures: Vec<JobFailure>,
}

impl JobReport {
    /// Adds one aggregate's outcome; a failed listing ends the job.
    fn add(&mut self, outcome: Outcome) -> Result<()> {
        self.examined += 1;
        match outcome {
            Outcome::Written {
                caught_up,
                replayed,
            } => {
                self.written += 1;
                self.caught_up += u64::from(caught_up);
                self.events_replayed += replayed;
            }
            Outcome::Superseded { replayed } => {
                self.superseded += 1;
                self.events_replayed += replayed;
            }
            Outcome::Skipped => self.skipped += 1,
            Outcome::Failed(f) => self.failures.push(f),
            Outcome::ListingFailed(e) => return Err(e),
        }
        Ok(())
    }

    fn finish(mut self) -> Self {
        self.failures
            .sort_by(|a, b| a.aggregate_id.cmp(&b.aggregate_id));
        self
    }
}

/// A snapshot that does not equal a fresh fold.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VerifyMismatch {
    /// The aggregate id.
    pub aggregate_id: String,
    /// The snapshot's version.
    pub version: StreamVersion,
    /// What differed (or why it could not be compared).
    pub reason: String,
}

/// Outcome of `verify` (staged snapshots).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct VerifyReport {
    /// Staged snapshots of the type.
    pub staged: u64,
    /// Of those, how many were checked.
    pub checked: u64,
    /// The ones that did not match.
    pub mismatches: Vec<VerifyMismatch>,
}

/// Outcome of [`SnapshotJobs::verify_live`].
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LiveVerifyReport {
    /// Aggregates of the type with a live snapshot.
    pub live: u64,
    /// Of those, how many were checked.
    pub checked: u64,
    /// The ones that did not match.
    pub mismatches: Vec<VerifyMismatch>,
}

/// What [`SnapshotJobs::create`] did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CreatedSnapshot {
    /// The snapshot built at the aggregate's head.
    pub snapshot: Snapshot,
    /// Whether the guarded write stored it (when it was not,
    /// [`SnapshotJobs::blocker`] names the row that kept it out).
    pub write: SnapshotWrite,
}

/// Options of [`SnapshotJobs::prepopulate`] and [`SnapshotJobs::migrate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobOptions {
    /// Prepopulate only aggregates more than this many events past their
    /// snapshot (0: every aggregate without an up-to-date snapshot).
    pub min_events: u64,
    /// Aggregates processed at once.
    pub concurrency: usize,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            min_events: 0,
            concurrency: 4,
        }
    }
}

/// Snapshot operations for aggregate type `A` on a store that holds both
/// events and snapshots.
///
/// Every operation reads its aggregates as a lazy, paged listing and keeps
/// only the aggregates in flight (`concurrency`) and the failures in memory,
/// however many aggregates the type has. Jobs record the repository's
/// metrics: `annals_snapshots_written_total`,
/// `annals_snapshot_superseded_total`, `annals_snapshot_failures_total` (a
/// write that failed, or an aggregate whose snapshot could not be built),
/// `annals_snapshot_skipped_total` (a live snapshot passed over), plus
/// `annals_snapshots_staged_total` for staged ones.
///
/// Each operation asks only for the traits it uses: [`SnapshotJobs::create`]
/// works on any snapshot cache; `prepopulate`, `verify_live` and `blocker`
/// also need [`SnapshotAdmin`]; `migrate` needs [`StreamCatalog`],
/// [`SnapshotAdmin`] and [`SnapshotStaging`]; `verify` and `promote` need
/// [`SnapshotStaging`].
pub struct SnapshotJobs<A, S> {
    store: S,
    _aggregate: PhantomData<fn() -> A>,
}

enum Outcome {
    Written {
        caught_up: bool,
        replayed: u64,
    },
    Superseded {
        replayed: u64,
    },
    Skipped,
    Failed(JobFailure),
    /// Listing the aggregates failed: the run cannot be trusted as complete.
    ListingFailed(Error),
}

/// Which table a verification reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    Staged,
    Live,
}

/// Picks `want` of `total` items evenly spread by index, as they stream by
/// (all of them when `want` is `None` or not below `total`).
struct Spread {
    total: u64,
    want: Option<u64>,
    picked: u64,
}

impl Spread {
    fn new(total: u64, want: Option<usize>) -> Self {
        let want = want.map(|n| n as u64).filter(|&n| n < total);
        Spread {
            total,
            want,
            picked: 0,
        }
    }

    /// How many will be picked.
    fn len(&self) -> u64 {
        self.want.unwrap_or(self.total)
    }

    /// Whether the item at `index` (0-based, increasing) is picked.
    fn pick(&mut self, index: u64) -> bool {
        let hit = match self.want {
            None => true,
            Some(n) => self.picked < n && index == self.picked * self.total / n.max(1),
        };
        self.picked += u64::from(hit);
        hit
    }
}

impl<A: Aggregate, S: EventStore + SnapshotStore> SnapshotJobs<A, S> {
    /// Operations on `store`.
    pub fn new(store: S) -> Self {
        SnapshotJobs {
            store,
            _aggregate: PhantomData,
        }
    }

    /// Builds the state of `id` at its head, starting from the live snapshot
    /// when it is usable (current schema, not ahead of head). Returns the
    /// snapshot, whether a live snapshot was used, and events folded.
    async fn build(&self, id: &str) -> Result<Option<(Snapshot, bool, u64)>> {
        let stream = StreamId::new(A::TYPE, id)?;
        let live = match self.store.load_snapshot(A::TYPE, id).await {
            Ok(s) => s,
            Err(e) => {
                record_skip(A::TYPE);
                tracing::warn!(target: crate::SNAPSHOT_LOG_TARGET, stream = %stream, error = %e, "cannot read live snapshot; replaying");
                None
            }
        };
        if let Some(live) = live.filter(|s| s.schema_version == A::SCHEMA_VERSION) {
            let skip = match decode_snapshot::<A>(&live) {
                Ok((state, _)) => {
                    match resume_from(&self.store, &stream, live.version, state).await? {
                        Some((state, version, n)) => {
                            return Ok(Some((make_snapshot(&stream, &state, version)?, true, n)))
                        }
                        None => SnapshotSkip::AheadOfHead {
                            snapshot: live.version,
                            head: self.store.stream_version(&stream).await?,
                        },
                    }
                }
                Err(skip) => skip,
            };
            record_skip(A::TYPE);
            tracing::warn!(target: crate::SNAPSHOT_LOG_TARGET, stream = %stream, reason = ?skip, "snapshot passed over; replaying the stream");
        }
        let (state, version, n) =
            fold_stream::<A, S>(&self.store, &stream, A::default(), ReadStream::forward()).await?;
        match version {
            Some(v) => Ok(Some((make_snapshot(&stream, &state, v)?, false, n))),
            None => Ok(None),
        }
    }

    /// A guarded write of a live snapshot, with its metrics.
    async fn save(&self, snapshot: &Snapshot) -> Result<SnapshotWrite> {
        let result = self.store.save_snapshot(snapshot).await;
        record_write(A::TYPE, &result);
        result
    }

    /// Takes a live snapshot of one aggregate now, from its live snapshot
    /// when usable, else by full replay. A live snapshot ahead of the
    /// stream's head is replaced. `None` when the aggregate has no events.
    /// The guarded write may keep what is stored (see
    /// [`SnapshotStore::save_snapshot`]): the result says so
    /// ([`CreatedSnapshot::write`]), and [`SnapshotJobs::blocker`] (on a
    /// store with [`SnapshotAdmin`]) names the row that blocked it.
    pub async fn create(&self, id: &str) -> Result<Option<CreatedSnapshot>> {
        let Some((snapshot, _, _)) = self.build(id).await? else {
            return Ok(None);
        };
        let write = self.save(&snapshot).await?;
        Ok(Some(CreatedSnapshot { snapshot, write }))
    }

    /// Compares the picked snapshots of `snapshots` with fresh folds.
    async fn check(
        &self,
        snapshots: futures::stream::BoxStream<'static, Result<Snapshot>>,
        mut spread: Spread,
        table: Table,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<(u64, Vec<VerifyMismatch>)> {
        progress(Progress::Total(spread.len()));
        let mut snapshots = snapshots;
        let mut index = 0;
        let mut checked = 0;
        let mut mismatches = Vec::new();
        while let Some(snap) = snapshots.next().await {
            let snap = snap?;
            let picked = spread.pick(index);
            index += 1;
            if !picked {
                continue;
            }
            checked += 1;
            if let Some(reason) = self.compare(&snap, table).await {
                mismatches.push(VerifyMismatch {
                    aggregate_id: snap.aggregate_id.clone(),
                    version: snap.version,
                    reason,
                });
            }
            progress(Progress::Advanced);
        }
        Ok((checked, mismatches))
    }

    async fn compare(&self, snap: &Snapshot, table: Table) -> Option<String> {
        let which = match table {
            Table::Staged => "staged",
            Table::Live => "live",
        };
        if table == Table::Staged && snap.schema_version != A::SCHEMA_VERSION {
            return Some(format!(
                "staged schema version {} is not the current {}",
                snap.schema_version,
                A::SCHEMA_VERSION
            ));
        }
        // Canonical form: decode (migrating a live one as a load would) and
        // encode again.
        let state = match decode_snapshot::<A>(snap) {
            Ok((state, _)) => serde_json::to_value(&state).unwrap_or(serde_json::Value::Null),
            Err(SnapshotSkip::SchemaVersion { found, expected }) => {
                return Some(format!(
                    "{which} schema version {found} cannot be loaded by the current {expected}"
                ))
            }
            Err(e) => return Some(format!("{which} state does not decode: {e:?}")),
        };
        let stream = match StreamId::new(A::TYPE, &snap.aggregate_id) {
            Ok(s) => s,
            Err(e) => return Some(e.to_string()),
        };
        let fresh = match fold_stream::<A, S>(
            &self.store,
            &stream,
            A::default(),
            ReadStream::forward().until_version(snap.version),
        )
        .await
        {
            Ok((state, Some(v), _)) if v == snap.version => state,
            Ok((_, v, _)) => {
                return Some(format!(
                    "stream has {} events, the snapshot claims version {}",
                    v.map_or(0, |v| v.0),
                    snap.version
                ))
            }
            Err(e) => return Some(format!("replay failed: {e}")),
        };
        let fresh = match serde_json::to_value(&fresh) {
            Ok(v) => v,
            Err(e) => return Some(format!("cannot serialize state: {e}")),
        };
        (fresh != state).then(|| format!("{which} {state} != replayed {fresh}"))
    }
}

/// Pre-population works through the stale list of [`SnapshotAdmin`].
impl<A: Aggregate, S: EventStore + SnapshotAdmin> SnapshotJobs<A, S> {
    /// Writes live snapshots for existing aggregates whose head is more than
    /// `min_events` past their snapshot (or who have none, or one ahead of
    /// the head), in aggregate-id order. Safe to interrupt and rerun:
    /// finished aggregates are no longer stale and are not redone.
    pub async fn prepopulate(
        &self,
        options: JobOptions,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<JobReport> {
        let total = self
            .store
            .list_stale_snapshots(Some(A::TYPE), options.min_events)
            .try_fold(0u64, |n, _| futures::future::ready(Ok(n + 1)))
            .await?;
        progress(Progress::Total(total));
        let outcomes = self
            .store
            .list_stale_snapshots(Some(A::TYPE), options.min_events)
            .map(|item| async move {
                let out = match item {
                    Err(e) => Outcome::ListingFailed(e),
                    Ok(stale) => self.prepopulate_one(&stale.aggregate_id).await,
                };
                progress(Progress::Advanced);
                out
            })
            .buffer_unordered(options.concurrency.max(1));
        collect(outcomes).await
    }

    async fn prepopulate_one(&self, id: &str) -> Outcome {
        match self.build(id).await {
            Ok(Some((snap, caught_up, replayed))) => match self.save(&snap).await {
                Ok(SnapshotWrite::Written) => Outcome::Written {
                    caught_up,
                    replayed,
                },
                Ok(SnapshotWrite::Superseded) => Outcome::Superseded { replayed },
                Err(e) => failure(id, &e),
            },
            Ok(None) => Outcome::Skipped,
            Err(e) => {
                record_failure(A::TYPE);
                failure(id, &e)
            }
        }
    }

    /// Why a guarded write did not store `snapshot` (a [`CreatedSnapshot`]
    /// whose write was superseded): the history row that keeps it out, the newest live row that
    /// supersedes it, or a rolled-back row at or above its version.
    pub async fn blocker(&self, snapshot: &Snapshot) -> Result<Option<SnapshotHistoryEntry>> {
        let history = self
            .store
            .snapshot_history(A::TYPE, &snapshot.aggregate_id)
            .await?;
        Ok(history.into_iter().find(|e| {
            if e.rolled_back_at.is_some() {
                e.version >= snapshot.version
            } else {
                e.live
                    && (e.schema_version, e.version) > (snapshot.schema_version, snapshot.version)
            }
        }))
    }

    /// Folds aggregates from scratch up to the version of their live
    /// snapshot and compares with its state (decoded the way a load does,
    /// migrating an older schema version): a snapshot that loads but holds
    /// the wrong state is found here. A live snapshot ahead of its stream,
    /// of a newer schema version, or undecodable is a mismatch too. `sample`
    /// checks that many, evenly spread over the ids; `None` checks all.
    pub async fn verify_live(
        &self,
        sample: Option<usize>,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<LiveVerifyReport> {
        let live = self
            .store
            .snapshot_coverage(Some(A::TYPE))
            .await?
            .first()
            .map_or(0, |c| c.with_snapshot);
        let (checked, mismatches) = self
            .check(
                self.store.live_snapshots(A::TYPE),
                Spread::new(live, sample),
                Table::Live,
                progress,
            )
            .await?;
        Ok(LiveVerifyReport {
            live,
            checked,
            mismatches,
        })
    }
}

/// The staged migration walks every stream of the type ([`StreamCatalog`]),
/// counts them for progress ([`SnapshotAdmin`]) and writes into the staging
/// area ([`SnapshotStaging`]).
impl<A: Aggregate, S: EventStore + StreamCatalog + SnapshotAdmin + SnapshotStaging>
    SnapshotJobs<A, S>
{
    /// Builds snapshots at the current schema version for every aggregate of
    /// the type into the staging table. An aggregate whose live snapshot has
    /// the current schema version is caught up from it; any other is fully
    /// replayed. Resumable: aggregates already staged at the current schema
    /// version are skipped. Failures are listed; the rest go on.
    pub async fn migrate(
        &self,
        options: JobOptions,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<JobReport> {
        let total = self
            .store
            .snapshot_coverage(Some(A::TYPE))
            .await?
            .first()
            .map_or(0, |c| c.aggregates);
        progress(Progress::Total(total));
        let outcomes = self
            .streams_with_staged()
            .map(|item| async move {
                let out = match item {
                    Err(e) => Outcome::ListingFailed(e),
                    Ok((_, true)) => Outcome::Skipped,
                    Ok((info, false)) => self.stage_one(info.stream_id.id()).await,
                };
                progress(Progress::Advanced);
                out
            })
            .buffer_unordered(options.concurrency.max(1));
        collect(outcomes).await
    }

    async fn stage_one(&self, id: &str) -> Outcome {
        match self.build(id).await {
            Ok(Some((snap, caught_up, replayed))) => match self.store.stage_snapshot(&snap).await {
                Ok(()) => {
                    metrics::counter!("annals_snapshots_staged_total", "aggregate_type" => A::TYPE)
                        .increment(1);
                    Outcome::Written {
                        caught_up,
                        replayed,
                    }
                }
                Err(e) => {
                    record_failure(A::TYPE);
                    failure(id, &e)
                }
            },
            Ok(None) => Outcome::Skipped,
            Err(e) => {
                record_failure(A::TYPE);
                failure(id, &e)
            }
        }
    }

    /// The streams of the type, each with whether it already has a staged
    /// snapshot at the current schema version: a merge of two listings in
    /// id order, so nothing is collected.
    fn streams_with_staged(&self) -> impl Stream<Item = Result<(StreamInfo, bool)>> + Send + '_ {
        struct Merge {
            streams: futures::stream::BoxStream<'static, Result<StreamInfo>>,
            staged: futures::stream::BoxStream<'static, Result<String>>,
            /// The smallest staged id not yet passed (`None` once done).
            head: Option<String>,
            staged_done: bool,
        }
        let staged = self
            .store
            .staged_snapshots(A::TYPE)
            .try_filter(|s| futures::future::ready(s.schema_version == A::SCHEMA_VERSION))
            .map_ok(|s| s.aggregate_id)
            .boxed();
        let merge = Merge {
            streams: self.store.list_streams(A::TYPE),
            staged,
            head: None,
            staged_done: false,
        };
        futures::stream::unfold(merge, |mut m| async move {
            let info = match m.streams.next().await? {
                Ok(info) => info,
                Err(e) => return Some((Err(e), m)),
            };
            let id = info.stream_id.id();
            while !m.staged_done && m.head.as_deref().is_none_or(|h| h < id) {
                match m.staged.next().await {
                    Some(Ok(next)) => m.head = Some(next),
                    Some(Err(e)) => return Some((Err(e), m)),
                    None => {
                        m.staged_done = true;
                        m.head = None;
                    }
                }
            }
            let done = m.head.as_deref() == Some(id);
            Some((Ok((info, done)), m))
        })
    }
}

/// Verification and promotion read the staging area ([`SnapshotStaging`]).
impl<A: Aggregate, S: EventStore + SnapshotStaging> SnapshotJobs<A, S> {
    /// Folds staged aggregates from scratch up to their staged version and
    /// compares with the staged state. `sample` checks that many, evenly
    /// spread over the ids; `None` checks all. Reads the staging table twice
    /// (a count, then the check), a page at a time.
    pub async fn verify(
        &self,
        sample: Option<usize>,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<VerifyReport> {
        let staged = self
            .store
            .staged_snapshots(A::TYPE)
            .try_fold(0u64, |n, _| futures::future::ready(Ok(n + 1)))
            .await?;
        let (checked, mismatches) = self
            .check(
                self.store.staged_snapshots(A::TYPE),
                Spread::new(staged, sample),
                Table::Staged,
                progress,
            )
            .await?;
        Ok(VerifyReport {
            staged,
            checked,
            mismatches,
        })
    }

    /// Verifies (unless `force`) and then promotes the staged snapshots of the
    /// type in one transaction. With `verify_sample` (`None`: all) a mismatch
    /// blocks the promotion with [`Error::Snapshot`] naming the aggregates.
    pub async fn promote(
        &self,
        force: bool,
        verify_sample: Option<usize>,
    ) -> Result<PromoteReport> {
        if !force {
            let report = self.verify(verify_sample, &|_| {}).await?;
            if !report.mismatches.is_empty() {
                let ids: Vec<&str> = report
                    .mismatches
                    .iter()
                    .take(10)
                    .map(|m| m.aggregate_id.as_str())
                    .collect();
                return Err(Error::Snapshot(format!(
                    "{} staged snapshot(s) of {} do not match a fresh replay (first: {}); clear the staging rows (clear_staged), fix the code and migrate again, or promote with force",
                    report.mismatches.len(),
                    A::TYPE,
                    ids.join(", ")
                )));
            }
        }
        self.store.promote_staged(A::TYPE).await
    }
}

/// Counts an aggregate whose snapshot could not be built or staged, like a
/// failed write: `annals_snapshot_failures_total`.
fn record_failure(aggregate_type: &'static str) {
    metrics::counter!("annals_snapshot_failures_total", "aggregate_type" => aggregate_type)
        .increment(1);
}

fn failure(id: &str, e: &Error) -> Outcome {
    Outcome::Failed(JobFailure {
        aggregate_id: id.to_owned(),
        reason: e.to_string(),
    })
}

/// Sums the outcomes as they finish, holding none of them.
async fn collect(outcomes: impl Stream<Item = Outcome>) -> Result<JobReport> {
    let mut outcomes = std::pin::pin!(outcomes);
    let mut report = JobReport::default();
    while let Some(o) = outcomes.next().await {
        report.add(o)?;
    }
    Ok(report.finish())
}
