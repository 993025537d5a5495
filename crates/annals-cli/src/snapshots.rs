//! `annals snapshots …`: the snapshot store's operator queries, and the
//! snapshot jobs of the core ([`annals::SnapshotJobs`]) behind a progress bar.
//!
//! `status`, `stale`, `delete`, `invalidate`, `history`, `rollback` and
//! `keep` only read or change rows, so they work on any aggregate type,
//! registered or not: an operator can clean up after a type the binary no
//! longer knows. `create`, `prepopulate`, `migrate`, `verify` and `promote`
//! fold events and need the type's `apply`, so they go through the registry
//! and refuse an unregistered type before the database is opened.
//!
//! A job that finishes with failed aggregates (or a verification with
//! mismatches, or a `create` whose snapshot was not stored) prints its whole
//! report first and then exits 1: the report is the useful part, and the
//! exit code is what a script checks.
//!
//! Listings over every aggregate (`stale`, and the jobs) page through the
//! store, so memory stays bounded however many aggregates there are; `stale
//! --limit N` keeps only the N most behind while it reads.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::io::Write;

use annals::{
    JobOptions, JobReport, LiveVerifyReport, Progress, PromoteReport, Snapshot,
    SnapshotHistoryEntry, SnapshotStore, SnapshotWrite, StaleSnapshot, StreamId, VerifyMismatch,
    VerifyReport,
};
use annals::{SnapshotAdmin, SnapshotStaging};
use futures::StreamExt;
use indicatif::ProgressBar;
use serde::Serialize;

use crate::cli::{
    CreateArgs, DeleteArgs, HistoryArgs, InvalidateArgs, KeepArgs, MigrateArgs, PrepopulateArgs,
    PromoteArgs, RollbackArgs, SnapshotsCommand, StaleArgs, StatusArgs, VerifyArgs,
};
use crate::commands::{registered, Env};
use crate::output::{json_line, note, timestamp, Table};
use crate::Outcome;

pub(crate) async fn dispatch(env: Env<'_>, command: SnapshotsCommand) -> anyhow::Result<Outcome> {
    match command {
        SnapshotsCommand::Status(args) => status(env, args).await,
        SnapshotsCommand::Stale(args) => stale(env, args).await,
        SnapshotsCommand::Create(args) => create(env, args).await,
        SnapshotsCommand::Delete(args) => delete(env, args).await,
        SnapshotsCommand::Invalidate(args) => invalidate(env, args).await,
        SnapshotsCommand::Prepopulate(args) => prepopulate(env, args).await,
        SnapshotsCommand::Migrate(args) => migrate(env, args).await,
        SnapshotsCommand::Verify(args) => verify(env, args).await,
        SnapshotsCommand::Promote(args) => promote(env, args).await,
        SnapshotsCommand::History(args) => history(env, args).await,
        SnapshotsCommand::Rollback(args) => rollback(env, args).await,
        SnapshotsCommand::Keep(args) => keep(env, args).await,
    }
}

/// The snapshot jobs' bar (see [`crate::progress::progress_bar`]).
fn progress_bar(prefix: String) -> ProgressBar {
    crate::progress::progress_bar(
        "{prefix} {wide_bar} {pos}/{len} aggregates, {eta} left",
        prefix,
    )
}

/// The core's progress callback, drawn on `bar`.
fn advance(bar: &ProgressBar) -> impl Fn(Progress) + Send + Sync + '_ {
    move |p| match p {
        Progress::Total(n) => bar.set_length(n),
        Progress::Advanced => bar.inc(1),
    }
}

/// `1 snapshot`, `2 snapshots`.
fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

async fn status(env: Env<'_>, args: StatusArgs) -> anyhow::Result<Outcome> {
    let store = env.open_ops(false).await?;
    let coverage = store
        .snapshot_coverage(args.aggregate_type.as_deref())
        .await?;
    let out = env.out;
    if args.json {
        for c in &coverage {
            json_line(out, c)?;
        }
        return Ok(Outcome::Success);
    }
    if coverage.is_empty() {
        match &args.aggregate_type {
            Some(t) => note(&format!("no aggregates of type {t}")),
            None => note("no aggregates"),
        }
        return Ok(Outcome::Success);
    }
    let mut t = Table::new(&[
        "TYPE",
        "AGGREGATES",
        "WITH_SNAPSHOT",
        "WITHOUT",
        "COVERAGE",
        "BY_SCHEMA_VERSION",
    ])
    .right_align(&[1, 2, 3, 4]);
    for c in &coverage {
        // Whole percent, rounded down: 100% means every aggregate.
        let percent = (c.with_snapshot.saturating_mul(100))
            .checked_div(c.aggregates)
            .map_or("-".to_owned(), |p| format!("{p}%"));
        let by_schema = if c.by_schema_version.is_empty() {
            "-".to_owned()
        } else {
            c.by_schema_version
                .iter()
                .map(|(v, n)| format!("v{v}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        t.push(
            out,
            vec![
                c.aggregate_type.clone(),
                c.aggregates.to_string(),
                c.with_snapshot.to_string(),
                c.without_snapshot.to_string(),
                percent,
                by_schema,
            ],
        )?;
    }
    t.finish(out)?;
    Ok(Outcome::Success)
}

/// A stale row ranked for `stale --limit`: more behind first, then by type
/// and id.
struct MostBehind(StaleSnapshot);

impl MostBehind {
    fn key(&self) -> (u64, Reverse<&str>, Reverse<&str>) {
        let s = &self.0;
        (
            s.events_behind,
            Reverse(s.aggregate_type.as_str()),
            Reverse(s.aggregate_id.as_str()),
        )
    }
}

impl PartialEq for MostBehind {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for MostBehind {}

impl PartialOrd for MostBehind {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for MostBehind {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

/// The `limit` most behind of `rows`, most behind first, holding at most
/// `limit` of them.
async fn most_behind(
    mut rows: futures::stream::BoxStream<'static, annals::Result<StaleSnapshot>>,
    limit: usize,
) -> anyhow::Result<Vec<StaleSnapshot>> {
    let mut top: BinaryHeap<Reverse<MostBehind>> = BinaryHeap::with_capacity(limit + 1);
    while let Some(row) = rows.next().await {
        if limit == 0 {
            break;
        }
        top.push(Reverse(MostBehind(row?)));
        if top.len() > limit {
            top.pop();
        }
    }
    let mut out: Vec<MostBehind> = top.into_iter().map(|Reverse(r)| r).collect();
    out.sort_by(|a, b| b.cmp(a));
    Ok(out.into_iter().map(|r| r.0).collect())
}

/// Prints stale rows as they come: JSON Lines, or a table in blocks.
struct StalePrinter {
    json: bool,
    table: Table,
    rows: u64,
}

impl StalePrinter {
    fn new(json: bool) -> Self {
        StalePrinter {
            json,
            table: Table::new(&["TYPE", "ID", "HEAD", "SNAPSHOT", "BEHIND"])
                .right_align(&[2, 3, 4]),
            rows: 0,
        }
    }

    fn print(&mut self, out: &mut (dyn Write + Send), s: &StaleSnapshot) -> std::io::Result<()> {
        self.rows += 1;
        if self.json {
            return json_line(out, s);
        }
        let snapshot = match s.snapshot_version {
            None => "-".to_owned(),
            Some(v) if s.ahead => format!("{v} (ahead)"),
            Some(v) => v.to_string(),
        };
        self.table.push(
            out,
            vec![
                s.aggregate_type.clone(),
                s.aggregate_id.clone(),
                s.head.to_string(),
                snapshot,
                s.events_behind.to_string(),
            ],
        )
    }

    fn finish(self, out: &mut (dyn Write + Send)) -> std::io::Result<u64> {
        self.table.finish(out)?;
        Ok(self.rows)
    }
}

async fn stale(env: Env<'_>, args: StaleArgs) -> anyhow::Result<Outcome> {
    let store = env.open_ops(false).await?;
    let rows = store.list_stale_snapshots(args.aggregate_type.as_deref(), args.min_events);
    let out = env.out;
    let mut printer = StalePrinter::new(args.json);
    match args.limit {
        Some(limit) => {
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            for s in most_behind(rows, limit).await? {
                printer.print(out, &s)?;
            }
        }
        None => {
            let mut rows = rows;
            while let Some(s) = rows.next().await {
                printer.print(out, &s?)?;
            }
        }
    }
    if printer.finish(out)? == 0 && !args.json {
        note(&format!(
            "no aggregate is more than {} past its snapshot",
            count(args.min_events, "event")
        ));
    }
    Ok(Outcome::Success)
}

/// What `create --json` prints: the snapshot, and what the write did.
#[derive(Serialize)]
struct CreateOutput<'a> {
    #[serde(flatten)]
    snapshot: &'a Snapshot,
    write: SnapshotWrite,
    blocked_by: Option<&'a SnapshotHistoryEntry>,
}

/// Why a snapshot was not stored, from the row that blocked it.
fn not_written_reason(
    stream: &StreamId,
    snapshot: &Snapshot,
    blocker: Option<&SnapshotHistoryEntry>,
) -> String {
    let what = format!(
        "snapshot of {stream} at version {} (schema version {}) not written",
        snapshot.version, snapshot.schema_version
    );
    match blocker {
        Some(b) if b.rolled_back_at.is_some() => format!(
            "{what}: the snapshot at version {} was rolled back, and a write must be past it (after more events, or roll forward with `annals snapshots rollback {} {} --to-version {}`)",
            b.version,
            stream.category(),
            stream.id(),
            b.version
        ),
        Some(b) => format!(
            "{what}: the live snapshot at version {} (schema version {}) is newer",
            b.version, b.schema_version
        ),
        None => format!("{what}: a newer snapshot was written meanwhile"),
    }
}

async fn create(env: Env<'_>, args: CreateArgs) -> anyhow::Result<Outcome> {
    let ops = registered(env.app, &args.aggregate_type)?;
    let stream = StreamId::new(ops.aggregate_type(), &args.id)?;
    let store = env.open_ops(false).await?;
    let Some((created, blocked_by)) = ops.create_snapshot(&store, &args.id).await? else {
        return Ok(Outcome::CheckFailed(format!(
            "aggregate {stream} does not exist (its stream has no events)"
        )));
    };
    let snapshot = &created.snapshot;
    if args.json {
        json_line(
            env.out,
            &CreateOutput {
                snapshot,
                write: created.write,
                blocked_by: blocked_by.as_ref(),
            },
        )?;
    }
    match created.write {
        SnapshotWrite::Written => {
            if !args.json {
                writeln!(
                    env.out,
                    "created snapshot of {stream} at version {} (schema version {})",
                    snapshot.version, snapshot.schema_version
                )?;
            }
            Ok(Outcome::Success)
        }
        SnapshotWrite::Superseded => Ok(Outcome::CheckFailed(not_written_reason(
            &stream,
            snapshot,
            blocked_by.as_ref(),
        ))),
    }
}

#[derive(Serialize)]
struct Deleted<'a> {
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    deleted: u64,
}

async fn delete(env: Env<'_>, args: DeleteArgs) -> anyhow::Result<Outcome> {
    let stream = StreamId::new(&args.aggregate_type, &args.id)?;
    let store = env.open_ops(false).await?;
    let deleted = store
        .delete_snapshot(&args.aggregate_type, &args.id)
        .await?;
    if args.json {
        json_line(
            env.out,
            &Deleted {
                aggregate_type: &args.aggregate_type,
                aggregate_id: &args.id,
                deleted,
            },
        )?;
    } else {
        writeln!(
            env.out,
            "deleted {} of {stream}",
            count(deleted, "snapshot")
        )?;
    }
    Ok(Outcome::Success)
}

#[derive(Serialize)]
struct Invalidated<'a> {
    aggregate_type: &'a str,
    schema_version_below: Option<u32>,
    invalidated: u64,
}

async fn invalidate(env: Env<'_>, args: InvalidateArgs) -> anyhow::Result<Outcome> {
    let store = env.open_ops(false).await?;
    let invalidated = store
        .invalidate_snapshots(&args.aggregate_type, args.schema_version_below)
        .await?;
    if args.json {
        json_line(
            env.out,
            &Invalidated {
                aggregate_type: &args.aggregate_type,
                schema_version_below: args.schema_version_below,
                invalidated,
            },
        )?;
    } else {
        let which = args
            .schema_version_below
            .map_or(String::new(), |v| format!(" with schema version below {v}"));
        writeln!(
            env.out,
            "invalidated {} of {}{which}",
            count(invalidated, "snapshot"),
            args.aggregate_type
        )?;
    }
    Ok(Outcome::Success)
}

/// A job report as `--json` prints it.
#[derive(Serialize)]
struct JobSummary<'a> {
    aggregate_type: &'a str,
    operation: &'a str,
    #[serde(flatten)]
    report: &'a JobReport,
}

/// Prints a `prepopulate` or `migrate` report: the counts, then every failed
/// aggregate with its reason.
fn print_job_report(
    out: &mut (dyn Write + Send),
    summary: &JobSummary<'_>,
    json: bool,
) -> std::io::Result<()> {
    if json {
        return json_line(out, summary);
    }
    let r = summary.report;
    writeln!(out, "{} {}", summary.operation, summary.aggregate_type)?;
    writeln!(out, "examined         {}", r.examined)?;
    writeln!(out, "written          {}", r.written)?;
    writeln!(out, "superseded       {}", r.superseded)?;
    writeln!(out, "skipped          {}", r.skipped)?;
    writeln!(out, "caught up        {}", r.caught_up)?;
    writeln!(out, "events replayed  {}", r.events_replayed)?;
    writeln!(out, "failed           {}", r.failures.len())?;
    if !r.failures.is_empty() {
        writeln!(out)?;
        let mut t = Table::new(&["FAILED_ID", "REASON"]);
        for f in &r.failures {
            t.push(out, vec![f.aggregate_id.clone(), f.reason.clone()])?;
        }
        t.finish(out)?;
    }
    Ok(())
}

async fn prepopulate(env: Env<'_>, args: PrepopulateArgs) -> anyhow::Result<Outcome> {
    let ops = registered(env.app, &args.aggregate_type)?;
    let store = env.open_ops(false).await?;
    let options = JobOptions {
        min_events: args.min_events,
        concurrency: args.concurrency,
    };
    let bar = progress_bar(format!("prepopulate {}", ops.aggregate_type()));
    let report = ops.prepopulate(&store, options, &advance(&bar)).await;
    bar.finish_and_clear();
    let report = report?;
    let summary = JobSummary {
        aggregate_type: ops.aggregate_type(),
        operation: "prepopulate",
        report: &report,
    };
    print_job_report(env.out, &summary, args.json)?;
    Ok(match report.failures.len() {
        0 => Outcome::Success,
        n => Outcome::CheckFailed(format!(
            "{} of {} failed (listed with their reason); the others have snapshots, and a rerun only retries what is still stale",
            count(n as u64, "aggregate"),
            report.examined
        )),
    })
}

async fn migrate(env: Env<'_>, args: MigrateArgs) -> anyhow::Result<Outcome> {
    let ops = registered(env.app, &args.aggregate_type)?;
    let store = env.open_ops(false).await?;
    let options = JobOptions {
        concurrency: args.concurrency,
        ..JobOptions::default()
    };
    if args.restart {
        let cleared = store.clear_staged(ops.aggregate_type()).await?;
        note(&format!(
            "discarded {} staged for {}",
            count(cleared, "snapshot"),
            ops.aggregate_type()
        ));
    }
    let bar = progress_bar(format!("migrate {}", ops.aggregate_type()));
    let report = ops.migrate(&store, options, &advance(&bar)).await;
    bar.finish_and_clear();
    let report = report?;
    let summary = JobSummary {
        aggregate_type: ops.aggregate_type(),
        operation: "migrate",
        report: &report,
    };
    print_job_report(env.out, &summary, args.json)?;
    Ok(match report.failures.len() {
        0 => Outcome::Success,
        n => Outcome::CheckFailed(format!(
            "{} of {} failed (listed with their reason); the others are staged, and a rerun skips them",
            count(n as u64, "aggregate"),
            report.examined
        )),
    })
}

#[derive(Serialize)]
struct VerifySummary<'a> {
    aggregate_type: &'a str,
    #[serde(flatten)]
    report: &'a VerifyReport,
}

/// Prints a verification: the counts, then every mismatch with its reason.
fn print_verify_report(out: &mut (dyn Write + Send), r: &VerifyReport) -> std::io::Result<()> {
    writeln!(out, "staged      {}", r.staged)?;
    writeln!(out, "checked     {}", r.checked)?;
    print_mismatches(out, &r.mismatches)
}

fn print_mismatches(
    out: &mut (dyn Write + Send),
    mismatches: &[VerifyMismatch],
) -> std::io::Result<()> {
    writeln!(out, "mismatches  {}", mismatches.len())?;
    if !mismatches.is_empty() {
        writeln!(out)?;
        let mut t = Table::new(&["MISMATCH_ID", "VERSION", "REASON"]).right_align(&[1]);
        for m in mismatches {
            t.push(
                out,
                vec![
                    m.aggregate_id.clone(),
                    m.version.to_string(),
                    m.reason.clone(),
                ],
            )?;
        }
        t.finish(out)?;
    }
    Ok(())
}

/// The exit of a verification with mismatches.
fn mismatched(aggregate_type: &str, r: &VerifyReport, blocked: bool) -> Outcome {
    let what = format!(
        "{} of {} checked staged snapshots of {aggregate_type} do not match a replay (listed with their reason)",
        r.mismatches.len(),
        r.checked
    );
    Outcome::CheckFailed(if blocked {
        format!("promote refused: {what}; fix the code and run `annals snapshots migrate {aggregate_type} --restart`, or promote with --force")
    } else {
        format!("{what}; promote refuses them unless --force (after fixing the code, `annals snapshots migrate {aggregate_type} --restart` rebuilds them)")
    })
}

fn nothing_staged(aggregate_type: &str) {
    note(&format!(
        "nothing staged for {aggregate_type}: run `annals snapshots migrate {aggregate_type}` first"
    ));
}

#[derive(Serialize)]
struct LiveVerifySummary<'a> {
    aggregate_type: &'a str,
    #[serde(flatten)]
    report: &'a LiveVerifyReport,
}

/// `verify --live`: the live snapshots against fresh folds.
async fn verify_live(env: Env<'_>, args: VerifyArgs) -> anyhow::Result<Outcome> {
    let ops = registered(env.app, &args.aggregate_type)?;
    let aggregate_type = ops.aggregate_type();
    let store = env.open_ops(false).await?;
    let bar = progress_bar(format!("verify {aggregate_type} (live)"));
    let report = ops.verify_live(&store, args.sample, &advance(&bar)).await;
    bar.finish_and_clear();
    let report = report?;
    if args.json {
        json_line(
            env.out,
            &LiveVerifySummary {
                aggregate_type,
                report: &report,
            },
        )?;
    } else {
        writeln!(env.out, "verify {aggregate_type} (live)")?;
        writeln!(env.out, "live        {}", report.live)?;
        writeln!(env.out, "checked     {}", report.checked)?;
        print_mismatches(env.out, &report.mismatches)?;
    }
    if report.live == 0 {
        note(&format!("no live snapshots of {aggregate_type}"));
    }
    Ok(if report.mismatches.is_empty() {
        Outcome::Success
    } else {
        Outcome::CheckFailed(format!(
            "{} of {} checked live snapshots of {aggregate_type} do not match a replay (listed with their reason); loads use them as they are: delete one (`annals snapshots delete {aggregate_type} ID`, the next load replays) or roll it back (`annals snapshots history` / `rollback`)",
            report.mismatches.len(),
            report.checked
        ))
    })
}

async fn verify(env: Env<'_>, args: VerifyArgs) -> anyhow::Result<Outcome> {
    if args.live {
        return verify_live(env, args).await;
    }
    let ops = registered(env.app, &args.aggregate_type)?;
    let store = env.open_ops(false).await?;
    let bar = progress_bar(format!("verify {}", ops.aggregate_type()));
    let report = ops.verify(&store, args.sample, &advance(&bar)).await;
    bar.finish_and_clear();
    let report = report?;
    if args.json {
        json_line(
            env.out,
            &VerifySummary {
                aggregate_type: ops.aggregate_type(),
                report: &report,
            },
        )?;
    } else {
        writeln!(env.out, "verify {}", ops.aggregate_type())?;
        print_verify_report(env.out, &report)?;
    }
    if report.staged == 0 {
        nothing_staged(ops.aggregate_type());
    }
    Ok(if report.mismatches.is_empty() {
        Outcome::Success
    } else {
        mismatched(ops.aggregate_type(), &report, false)
    })
}

#[derive(Serialize)]
struct PromoteSummary<'a> {
    aggregate_type: &'a str,
    /// `None` with `--force`.
    verify: Option<&'a VerifyReport>,
    /// Whether the verification refused the promotion (nothing was moved).
    blocked: bool,
    #[serde(flatten)]
    report: PromoteReport,
}

async fn promote(env: Env<'_>, args: PromoteArgs) -> anyhow::Result<Outcome> {
    let ops = registered(env.app, &args.aggregate_type)?;
    let aggregate_type = ops.aggregate_type();
    let store = env.open_ops(false).await?;
    // Verify here rather than inside `SnapshotJobs::promote`, so the
    // operator sees progress and every mismatch, and a refusal is a failed
    // check (exit 1) rather than an error.
    let verified = if args.force {
        None
    } else {
        let bar = progress_bar(format!("verify {aggregate_type}"));
        let report = ops.verify(&store, args.verify_sample, &advance(&bar)).await;
        bar.finish_and_clear();
        Some(report?)
    };
    let blocked = verified.as_ref().is_some_and(|v| !v.mismatches.is_empty());
    let report = if blocked {
        PromoteReport::default()
    } else {
        // Verified just above (or forced): promote without verifying again.
        ops.promote(&store, true, None).await?
    };
    let out = env.out;
    if args.json {
        json_line(
            out,
            &PromoteSummary {
                aggregate_type,
                verify: verified.as_ref(),
                blocked,
                report,
            },
        )?;
    } else {
        writeln!(out, "promote {aggregate_type}")?;
        match &verified {
            Some(v) => print_verify_report(out, v)?,
            None => writeln!(out, "verification skipped (--force)")?,
        }
        if !blocked {
            writeln!(out, "promoted    {}", report.promoted)?;
            writeln!(out, "kept live   {}", report.kept_live)?;
        }
    }
    if let Some(v) = verified.as_ref().filter(|_| blocked) {
        return Ok(mismatched(aggregate_type, v, true));
    }
    if report.promoted + report.kept_live == 0 {
        nothing_staged(aggregate_type);
    }
    Ok(Outcome::Success)
}

/// A history row as `history --json` prints it.
#[derive(Serialize)]
struct HistoryRow<'a> {
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    #[serde(flatten)]
    entry: &'a SnapshotHistoryEntry,
}

fn status_of(e: &SnapshotHistoryEntry) -> String {
    match (e.live, e.rolled_back_at) {
        (true, _) => "live".to_owned(),
        (false, Some(at)) => format!("rolled back {}", timestamp(&at)),
        (false, None) => "kept".to_owned(),
    }
}

async fn history(env: Env<'_>, args: HistoryArgs) -> anyhow::Result<Outcome> {
    let stream = StreamId::new(&args.aggregate_type, &args.id)?;
    let store = env.open_ops(false).await?;
    let rows = store
        .snapshot_history(&args.aggregate_type, &args.id)
        .await?;
    let out = env.out;
    if args.json {
        for entry in &rows {
            json_line(
                out,
                &HistoryRow {
                    aggregate_type: &args.aggregate_type,
                    aggregate_id: &args.id,
                    entry,
                },
            )?;
        }
        return Ok(Outcome::Success);
    }
    if rows.is_empty() {
        note(&format!("no snapshots of {stream}"));
        return Ok(Outcome::Success);
    }
    let mut t =
        Table::new(&["VERSION", "SCHEMA_VERSION", "CREATED_AT", "STATUS"]).right_align(&[0, 1]);
    for e in &rows {
        t.push(
            out,
            vec![
                e.version.to_string(),
                e.schema_version.to_string(),
                timestamp(&e.created_at),
                status_of(e),
            ],
        )?;
    }
    t.finish(out)?;
    Ok(Outcome::Success)
}

async fn rollback(env: Env<'_>, args: RollbackArgs) -> anyhow::Result<Outcome> {
    let stream = StreamId::new(&args.aggregate_type, &args.id)?;
    let store = env.open_ops(false).await?;
    let report = store
        .rollback_snapshot(&args.aggregate_type, &args.id, args.to_version)
        .await?;
    if args.json {
        json_line(env.out, &report)?;
    } else {
        writeln!(
            env.out,
            "{stream}: the snapshot at version {} (schema version {}) is live; {} marked rolled back",
            report.live.version,
            report.live.schema_version,
            count(report.rolled_back, "newer snapshot")
        )?;
    }
    Ok(Outcome::Success)
}

#[derive(Serialize)]
struct KeepOutput {
    /// Snapshots kept per aggregate now.
    history_size: u32,
    /// Before the change (`None`: nothing was changed).
    previous: Option<u32>,
    /// Snapshots deleted by the change.
    trimmed: u64,
}

async fn keep(env: Env<'_>, args: KeepArgs) -> anyhow::Result<Outcome> {
    let store = env.open_ops(false).await?;
    let previous = store.snapshot_history_size().await?;
    let output = match args.keep {
        None => KeepOutput {
            history_size: previous,
            previous: None,
            trimmed: 0,
        },
        Some(keep) => KeepOutput {
            trimmed: store.set_snapshot_history_size(keep).await?,
            history_size: keep,
            previous: Some(previous),
        },
    };
    if args.json {
        json_line(env.out, &output)?;
        return Ok(Outcome::Success);
    }
    let kept = count(u64::from(output.history_size), "snapshot");
    match output.previous {
        None => writeln!(env.out, "{kept} kept per aggregate")?,
        Some(previous) => writeln!(
            env.out,
            "{kept} kept per aggregate (was {previous}); {} trimmed",
            count(output.trimmed, "snapshot")
        )?,
    }
    Ok(Outcome::Success)
}
