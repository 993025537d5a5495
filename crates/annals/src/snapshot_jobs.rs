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

use std::collections::HashSet;
use std::marker::PhantomData;

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::repository::{decode_snapshot, fold_stream, make_snapshot, resume_from};
use crate::snapshot::{PromoteReport, Snapshot, SnapshotAdmin, SnapshotStaging, SnapshotStore};
use crate::{
    Aggregate, Error, EventStore, ReadStream, Result, StreamCatalog, StreamId, StreamVersion,
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

/// A staged snapshot that does not equal a fresh fold.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VerifyMismatch {
    /// The aggregate id.
    pub aggregate_id: String,
    /// The staged snapshot's version.
    pub version: StreamVersion,
    /// What differed (or why it could not be compared).
    pub reason: String,
}

/// Outcome of `verify`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct VerifyReport {
    /// Staged snapshots of the type.
    pub staged: u64,
    /// Of those, how many were checked.
    pub checked: u64,
    /// The ones that did not match.
    pub mismatches: Vec<VerifyMismatch>,
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
/// Each operation asks only for the traits it uses: [`SnapshotJobs::create`]
/// works on any snapshot cache; `prepopulate` also needs [`SnapshotAdmin`];
/// `migrate` needs [`StreamCatalog`], [`SnapshotAdmin`] and
/// [`SnapshotStaging`]; `verify` and `promote` need [`SnapshotStaging`].
pub struct SnapshotJobs<A, S> {
    store: S,
    _aggregate: PhantomData<fn() -> A>,
}

enum Outcome {
    Written {
        caught_up: bool,
        replayed: u64,
    },
    Skipped,
    Failed(JobFailure),
    /// Listing the aggregates failed: the run cannot be trusted as complete.
    ListingFailed(Error),
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
                tracing::warn!(target: crate::SNAPSHOT_LOG_TARGET, stream = %stream, error = %e, "cannot read live snapshot; replaying");
                None
            }
        };
        if let Some(live) = live.filter(|s| s.schema_version == A::SCHEMA_VERSION) {
            if let Ok((state, _)) = decode_snapshot::<A>(&live) {
                if let Some((state, version, n)) =
                    resume_from(&self.store, &stream, live.version, state).await?
                {
                    return Ok(Some((make_snapshot(&stream, &state, version)?, true, n)));
                }
            }
        }
        let (state, version, n) =
            fold_stream::<A, S>(&self.store, &stream, A::default(), ReadStream::forward()).await?;
        match version {
            Some(v) => Ok(Some((make_snapshot(&stream, &state, v)?, false, n))),
            None => Ok(None),
        }
    }

    /// Takes a live snapshot of one aggregate now. `None` when it has no events.
    pub async fn create(&self, id: &str) -> Result<Option<Snapshot>> {
        match self.build(id).await? {
            Some((snap, _, _)) => {
                self.store.save_snapshot(&snap).await?;
                Ok(Some(snap))
            }
            None => Ok(None),
        }
    }
}

/// Pre-population works through the stale list of [`SnapshotAdmin`].
impl<A: Aggregate, S: EventStore + SnapshotAdmin> SnapshotJobs<A, S> {
    /// Writes live snapshots for existing aggregates whose head is more than
    /// `min_events` past their snapshot (or who have none), most events
    /// first. Safe to interrupt and rerun: finished aggregates are no longer
    /// stale and are not redone.
    pub async fn prepopulate(
        &self,
        options: JobOptions,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<JobReport> {
        let stale = self
            .store
            .stale_snapshots(Some(A::TYPE), options.min_events)
            .await?;
        progress(Progress::Total(stale.len() as u64));
        let outcomes: Vec<Outcome> = futures::stream::iter(stale)
            .map(|s| async move {
                let out = match self.build(&s.aggregate_id).await {
                    Ok(Some((snap, caught_up, replayed))) => {
                        match self.store.save_snapshot(&snap).await {
                            Ok(_) => Outcome::Written {
                                caught_up,
                                replayed,
                            },
                            Err(e) => failure(&s.aggregate_id, &e),
                        }
                    }
                    Ok(None) => Outcome::Skipped,
                    Err(e) => failure(&s.aggregate_id, &e),
                };
                progress(Progress::Advanced);
                out
            })
            .buffer_unordered(options.concurrency.max(1))
            .collect()
            .await;
        summarize(outcomes)
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
        let done: HashSet<String> = self
            .store
            .staged_snapshots(A::TYPE)
            .try_filter_map(|s| async move {
                Ok((s.schema_version == A::SCHEMA_VERSION).then_some(s.aggregate_id))
            })
            .try_collect()
            .await?;
        let total = self
            .store
            .snapshot_coverage(Some(A::TYPE))
            .await?
            .first()
            .map_or(0, |c| c.aggregates);
        progress(Progress::Total(total));
        let done = &done;
        let outcomes: Vec<Outcome> = self
            .store
            .list_streams(A::TYPE)
            .map(|info| async move {
                let out = match info {
                    Err(e) => Outcome::ListingFailed(e),
                    Ok(info) if done.contains(info.stream_id.id()) => Outcome::Skipped,
                    Ok(info) => {
                        let id = info.stream_id.id();
                        match self.build(id).await {
                            Ok(Some((snap, caught_up, replayed))) => {
                                match self.store.stage_snapshot(&snap).await {
                                    Ok(()) => Outcome::Written {
                                        caught_up,
                                        replayed,
                                    },
                                    Err(e) => failure(id, &e),
                                }
                            }
                            Ok(None) => Outcome::Skipped,
                            Err(e) => failure(id, &e),
                        }
                    }
                };
                progress(Progress::Advanced);
                out
            })
            .buffer_unordered(options.concurrency.max(1))
            .collect()
            .await;
        summarize(outcomes)
    }
}

/// Verification and promotion read the staging area ([`SnapshotStaging`]).
impl<A: Aggregate, S: EventStore + SnapshotStaging> SnapshotJobs<A, S> {
    /// Folds staged aggregates from scratch up to their staged version and
    /// compares with the staged state. `sample` checks that many, evenly
    /// spread over the ids; `None` checks all.
    pub async fn verify(
        &self,
        sample: Option<usize>,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<VerifyReport> {
        let ids: Vec<(String, StreamVersion)> = self
            .store
            .staged_snapshots(A::TYPE)
            .map_ok(|s| (s.aggregate_id, s.version))
            .try_collect()
            .await?;
        let staged = ids.len() as u64;
        let picked: Vec<&(String, StreamVersion)> = match sample {
            Some(n) if n < ids.len() => {
                let step = ids.len() as f64 / n.max(1) as f64;
                (0..n).map(|i| &ids[(i as f64 * step) as usize]).collect()
            }
            _ => ids.iter().collect(),
        };
        progress(Progress::Total(picked.len() as u64));
        let mut report = VerifyReport {
            staged,
            ..Default::default()
        };
        for (id, _) in picked {
            // Re-read: the staged row may have been rebuilt since listing.
            if let Some(staged) = self.store.load_staged(A::TYPE, id).await? {
                report.checked += 1;
                if let Some(reason) = self.compare(&staged).await {
                    report.mismatches.push(VerifyMismatch {
                        aggregate_id: id.clone(),
                        version: staged.version,
                        reason,
                    });
                }
            }
            progress(Progress::Advanced);
        }
        Ok(report)
    }

    async fn compare(&self, staged: &Snapshot) -> Option<String> {
        if staged.schema_version != A::SCHEMA_VERSION {
            return Some(format!(
                "staged schema version {} is not the current {}",
                staged.schema_version,
                A::SCHEMA_VERSION
            ));
        }
        let stream = match StreamId::new(A::TYPE, &staged.aggregate_id) {
            Ok(s) => s,
            Err(e) => return Some(e.to_string()),
        };
        let fresh = match fold_stream::<A, S>(
            &self.store,
            &stream,
            A::default(),
            ReadStream::forward().until_version(staged.version),
        )
        .await
        {
            Ok((state, Some(v), _)) if v == staged.version => state,
            Ok((_, v, _)) => {
                return Some(format!(
                    "stream has {} events, the snapshot claims version {}",
                    v.map_or(0, |v| v.0),
                    staged.version
                ))
            }
            Err(e) => return Some(format!("replay failed: {e}")),
        };
        let fresh = match serde_json::to_value(&fresh) {
            Ok(v) => v,
            Err(e) => return Some(format!("cannot serialize state: {e}")),
        };
        // Compare in canonical form: decode the staged state and encode again.
        let staged_state = match decode_snapshot::<A>(staged) {
            Ok((s, _)) => serde_json::to_value(&s).unwrap_or(serde_json::Value::Null),
            Err(e) => return Some(format!("staged state does not decode: {e:?}")),
        };
        (fresh != staged_state).then(|| format!("staged {staged_state} != replayed {fresh}"))
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

fn failure(id: &str, e: &Error) -> Outcome {
    Outcome::Failed(JobFailure {
        aggregate_id: id.to_owned(),
        reason: e.to_string(),
    })
}

fn summarize(outcomes: Vec<Outcome>) -> Result<JobReport> {
    let mut r = JobReport::default();
    for o in outcomes {
        r.examined += 1;
        match o {
            Outcome::Written {
                caught_up,
                replayed,
            } => {
                r.written += 1;
                r.caught_up += u64::from(caught_up);
                r.events_replayed += replayed;
            }
            Outcome::Skipped => r.skipped += 1,
            Outcome::Failed(f) => r.failures.push(f),
            Outcome::ListingFailed(e) => return Err(e),
        }
    }
    r.failures
        .sort_by(|a, b| a.aggregate_id.cmp(&b.aggregate_id));
    Ok(r)
}
