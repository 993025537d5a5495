//! `annals check`: the health checks, one finding per row.
//!
//! Each check asks the store one bounded question (an SQL aggregate or
//! window scan that returns at most `--max-findings` rows, or a lazy stream
//! read a page at a time), so the check runs in bounded memory on any store.
//! A check that finds more than `--max-findings` problems shows the first
//! ones and one more row that counts the rest.
//!
//! Severity: an `error` is something wrong with the data or something that
//! stops readers (exit status 1); a `warning` is worth a look but harms
//! nothing yet (stale snapshots, low coverage, a snapshot-only transaction).
//! A failure to run a check at all is not a finding but an error (status 2).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use annals::{
    CheckpointStore, EventStore, ProjectionControl, ReadAll, SnapshotAdmin, StaleSnapshot,
};
use anyhow::Context;
use futures::StreamExt;
use serde::Serialize;

use crate::cli::{CheckArgs, CheckOptions};
use crate::commands::Env;
use crate::keys::KeySource;
use crate::output::{json_line, note, timestamp, Table};
use crate::{AnyStore, App, Outcome};

/// How bad a finding is.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Severity {
    Warning,
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// One problem found: a row of the table, an object of `--json`.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Finding {
    /// The check's name (`stream-versions`, `clock`, ...).
    pub(crate) check: &'static str,
    pub(crate) severity: Severity,
    /// What the finding is about: a stream, a position, a type, a pid.
    pub(crate) subject: String,
    /// What is wrong, in a sentence.
    pub(crate) detail: String,
}

/// The findings so far, and at most `limit` shown per check.
struct Findings {
    limit: usize,
    list: Vec<Finding>,
}

impl Findings {
    fn add(&mut self, check: &'static str, severity: Severity, subject: String, detail: String) {
        self.list.push(Finding {
            check,
            severity,
            subject,
            detail,
        });
    }

    /// The row that stands for the findings of `check` beyond the limit.
    fn more(&mut self, check: &'static str, severity: Severity, what: String) {
        let limit = self.limit;
        self.add(
            check,
            severity,
            "...".to_owned(),
            format!("{what} not shown (--max-findings {limit})"),
        );
    }

    /// Adds the findings of a check that asked for `limit + 1` rows.
    fn add_capped<T>(
        &mut self,
        check: &'static str,
        severity: Severity,
        rows: Vec<T>,
        describe: impl Fn(&T) -> (String, String),
    ) {
        let over = rows.len() > self.limit;
        for row in rows.iter().take(self.limit) {
            let (subject, detail) = describe(row);
            self.add(check, severity, subject, detail);
        }
        if over {
            self.more(check, severity, "more findings".to_owned());
        }
    }
}

/// The findings of every check on an open store (`/health` of `annals
/// serve`), in the order `annals check` prints them.
pub(crate) async fn findings(
    app: &App,
    store: &AnyStore,
    keys: &KeySource,
    options: &CheckOptions,
) -> anyhow::Result<Vec<Finding>> {
    let mut findings = Findings {
        limit: options.max_findings,
        list: Vec::new(),
    };
    run_checks(app, store, keys, options, &mut findings).await?;
    Ok(findings.list)
}

/// Runs the checks on an open store: a schema that is not this build's is a
/// finding, and then only the checks that need no schema run.
async fn run_checks(
    app: &App,
    store: &AnyStore,
    keys: &KeySource,
    options: &CheckOptions,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    let schema_ok = match store.head_position().await {
        Ok(_) => true,
        Err(e) => {
            let e = anyhow::Error::new(e);
            if schema_error(&e).is_none() {
                return Err(e.context("cannot read the head position"));
            }
            schema_finding(findings, &e);
            false
        }
    };
    if schema_ok {
        stream_versions(store, findings).await?;
        clock(store, options, findings).await?;
        decode(app, store, keys, findings).await?;
        snapshots(store, options, findings).await?;
        projection_lag(app, store, options, findings).await?;
        projection_control(app, store, findings).await?;
        pending_migration(store, findings).await?;
    }
    // Needs no schema: it reads the server's activity.
    horizon(store, options, findings).await?;
    Ok(())
}

pub(crate) async fn run(env: Env<'_>, args: CheckArgs) -> anyhow::Result<Outcome> {
    let mut findings = Findings {
        limit: args.options.max_findings,
        list: Vec::new(),
    };
    let url = env.database_url()?;
    // The master key as every read command finds it (`--key-file`).
    let keys = env.key_source()?;
    // A store whose schema is older or newer than this build is a finding
    // (run `annals init`), not a failure to run the checks. SQLite applies
    // pending migrations when it opens, so there only a file from a newer
    // build is found; PostgreSQL is only migrated when asked.
    let store = match env.open(false).await {
        Ok(store) => Some(store),
        Err(e) if schema_error(&e).is_some() => {
            schema_finding(&mut findings, &e);
            None
        }
        Err(e) => return Err(e),
    };
    if let Some(store) = &store {
        run_checks(env.app, store, &keys, &args.options, &mut findings)
            .await
            .with_context(|| format!("cannot check {url}"))?;
    }
    print(env.out, &findings.list, args.json)?;
    let errors = count(&findings.list, Severity::Error);
    let warnings = count(&findings.list, Severity::Warning);
    if errors > 0 {
        return Ok(Outcome::CheckFailed(format!(
            "{url}: {errors} error finding(s), {warnings} warning(s)"
        )));
    }
    match warnings {
        0 => note(&format!("{url}: healthy, no findings")),
        n => note(&format!("{url}: healthy, {n} warning(s)")),
    }
    Ok(Outcome::Success)
}

fn count(findings: &[Finding], severity: Severity) -> usize {
    findings.iter().filter(|f| f.severity == severity).count()
}

fn print(
    out: &mut (dyn std::io::Write + Send),
    findings: &[Finding],
    json: bool,
) -> anyhow::Result<()> {
    if json {
        for f in findings {
            json_line(out, f)?;
        }
        return Ok(());
    }
    if findings.is_empty() {
        return Ok(());
    }
    let mut table = Table::new(&["CHECK", "SEVERITY", "SUBJECT", "DETAIL"]);
    for f in findings {
        table.push(
            out,
            vec![
                f.check.to_owned(),
                f.severity.to_string(),
                f.subject.clone(),
                f.detail.clone(),
            ],
        )?;
    }
    table.finish(out)?;
    Ok(())
}

/// The schema-version error in an error's chain, if that is what it is.
fn schema_error(e: &anyhow::Error) -> Option<&annals::Error> {
    e.chain()
        .filter_map(|cause| cause.downcast_ref::<annals::Error>())
        .find(|cause| matches!(cause, annals::Error::SchemaVersion { .. }))
}

fn schema_finding(findings: &mut Findings, e: &anyhow::Error) {
    let detail = match schema_error(e) {
        Some(annals::Error::SchemaVersion { found, expected }) if found < expected => format!(
            "schema is at version {found}, this build needs {expected}: migrations pending, run `annals init`"
        ),
        Some(annals::Error::SchemaVersion { found, expected }) => format!(
            "schema is at version {found}, newer than this build's {expected}: use a newer `annals`"
        ),
        _ => format!("{e:#}"),
    };
    findings.add("schema", Severity::Error, "database".to_owned(), detail);
}

/// Stored events must be exactly versions `1..=head`, and `streams` must
/// hold that head.
async fn stream_versions(store: &AnyStore, findings: &mut Findings) -> anyhow::Result<()> {
    let issues = store
        .stream_version_issues(findings.limit + 1)
        .await
        .context("cannot check stream versions")?;
    findings.add_capped("stream-versions", Severity::Error, issues, |i| {
        let range = match (i.min_version, i.max_version) {
            (Some(lo), Some(hi)) => format!("versions {lo}..{hi}"),
            _ => "no versions".to_owned(),
        };
        let detail = match i.head {
            None => format!("{} event(s) ({range}) but no row in streams", i.events),
            Some(head) if i.events == 0 => {
                format!("streams records head {head} but no events are stored")
            }
            Some(head) => {
                let mut problems = Vec::new();
                if i.distinct_versions < i.events {
                    problems.push(format!(
                        "{} duplicated version(s)",
                        i.events - i.distinct_versions
                    ));
                }
                if i.min_version != Some(1) {
                    problems.push("version 1 missing".to_owned());
                }
                let span = match (i.min_version, i.max_version) {
                    (Some(lo), Some(hi)) => hi - lo + 1,
                    _ => 0,
                };
                if i.distinct_versions < span {
                    problems.push(format!(
                        "{} version(s) missing (gap)",
                        span - i.distinct_versions
                    ));
                }
                if i.max_version != Some(head) {
                    problems.push(format!("head {head} in streams is not the last event"));
                }
                format!(
                    "head {head}, {} event(s) stored with {range}: {}",
                    i.events,
                    problems.join(", ")
                )
            }
        };
        (i.stream_id.clone(), detail)
    });
    Ok(())
}

/// `recorded_at` must not go backwards along the global order by more than
/// the tolerance.
async fn clock(
    store: &AnyStore,
    args: &CheckOptions,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    let skews = store
        .clock_skews(args.clock_tolerance, findings.limit + 1)
        .await
        .context("cannot check recorded_at order")?;
    findings.add_capped("clock", Severity::Error, skews, |s| {
        (
            format!("position {}", s.position),
            format!(
                "recorded at {}, {} before position {} ({}): the clock went backwards beyond the tolerance",
                timestamp(&s.recorded_at),
                seconds(s.backwards_by()),
                s.previous_position,
                timestamp(&s.previous_recorded_at),
            ),
        )
    });
    Ok(())
}

/// Every event of a registered aggregate type must decode with the type's
/// event enum, through the application's upcasters (an event they fail on
/// is an `upcast` finding). Streams the type's category a page at a time,
/// as stored, and upcasts each event here, so one failure does not end the
/// read.
async fn decode(
    app: &App,
    store: &AnyStore,
    keys: &KeySource,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    let raw = store.raw();
    let upcasters = app.upcasters.as_deref();
    // Personal fields decrypted, or "[encrypted]" without a master key: the
    // check is about decoding, not about reading personal data.
    let crypto = keys.crypto(store).redact_without_master_key();
    for name in app.aggregate_types() {
        let Some(ops) = app.aggregate(name) else {
            continue;
        };
        let mut events = raw.read_all(ReadAll {
            categories: vec![name.to_owned()],
            ..ReadAll::from_start()
        });
        let mut failed = 0_usize;
        let mut upcast_failed = 0_usize;
        while let Some(event) = events.next().await {
            let event = event.with_context(|| format!("cannot read the {name} events"))?;
            let event = crypto
                .decrypt_event(event)
                .await
                .with_context(|| format!("cannot decrypt the {name} events"))?;
            let event = match annals::upcast_event(upcasters, event) {
                Ok(event) => event,
                Err(annals::Error::Upcast(f)) => {
                    upcast_failed += 1;
                    if upcast_failed <= findings.limit {
                        findings.add(
                            "upcast",
                            Severity::Error,
                            format!("{}@{}", f.stream, f.version),
                            format!("position {}: {f}", f.position),
                        );
                    }
                    continue;
                }
                Err(e) => {
                    return Err(
                        anyhow::Error::new(e).context(format!("cannot upcast the {name} events"))
                    )
                }
            };
            if let Err(e) = ops.check_event(&event) {
                failed += 1;
                if failed <= findings.limit {
                    findings.add(
                        "decode",
                        Severity::Error,
                        format!("{}@{}", event.stream_id, event.stream_version),
                        format!("position {}: {e}", event.global_position),
                    );
                }
            }
        }
        if upcast_failed > findings.limit {
            findings.more(
                "upcast",
                Severity::Error,
                format!(
                    "{} more {name} event(s) that fail to upcast",
                    upcast_failed - findings.limit
                ),
            );
        }
        if failed > findings.limit {
            findings.more(
                "decode",
                Severity::Error,
                format!("{} more {name} event(s) that fail", failed - findings.limit),
            );
        }
    }
    Ok(())
}

/// Live snapshots ahead of their head (error), far behind it (warning, one
/// row per type) and coverage below the threshold (warning).
async fn snapshots(
    store: &AnyStore,
    args: &CheckOptions,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    // Every aggregate not exactly at its head, a page at a time.
    let mut rows = store.list_stale_snapshots(None, 0);
    let mut ahead = 0_usize;
    // Per type: how many are stale, and the one most behind.
    let mut stale: BTreeMap<String, (u64, StaleSnapshot)> = BTreeMap::new();
    while let Some(row) = rows.next().await {
        let row = row.context("cannot list the snapshots")?;
        if row.ahead {
            ahead += 1;
            if ahead <= findings.limit {
                let version = row.snapshot_version.map_or(0, |v| v.0);
                findings.add(
                    "snapshot-ahead",
                    Severity::Error,
                    format!("{}-{}", row.aggregate_type, row.aggregate_id),
                    format!(
                        "live snapshot at version {version} is ahead of the stream head {}: loads pass it over; `annals snapshots create` replaces it",
                        row.head
                    ),
                );
            }
        } else if row.snapshot_version.is_some() && row.events_behind > args.stale_events {
            match stale.get_mut(&row.aggregate_type) {
                Some((n, worst)) => {
                    *n += 1;
                    if row.events_behind > worst.events_behind {
                        *worst = row;
                    }
                }
                None => {
                    stale.insert(row.aggregate_type.clone(), (1, row));
                }
            }
        }
    }
    if ahead > findings.limit {
        findings.more(
            "snapshot-ahead",
            Severity::Error,
            format!("{} more snapshot(s) ahead", ahead - findings.limit),
        );
    }
    for (aggregate_type, (n, worst)) in stale {
        findings.add(
            "snapshot-stale",
            Severity::Warning,
            aggregate_type,
            format!(
                "{n} live snapshot(s) more than {} events behind their head (most: {}-{}, {} behind): `annals snapshots prepopulate`",
                args.stale_events, worst.aggregate_type, worst.aggregate_id, worst.events_behind
            ),
        );
    }
    if args.min_coverage > 0.0 {
        let coverage = store
            .snapshot_coverage(None)
            .await
            .context("cannot read the snapshot coverage")?;
        for c in coverage.into_iter().filter(|c| c.aggregates > 0) {
            let percent = c.with_snapshot as f64 * 100.0 / c.aggregates as f64;
            if percent < args.min_coverage {
                findings.add(
                    "snapshot-coverage",
                    Severity::Warning,
                    c.aggregate_type,
                    format!(
                        "{} of {} aggregates have a live snapshot ({percent:.1}%), below --min-coverage {}%",
                        c.with_snapshot, c.aggregates, args.min_coverage
                    ),
                );
            }
        }
    }
    Ok(())
}

/// Registered projections that have run (they have a checkpoint) and are
/// more than `--max-projection-lag` events, or `--max-projection-age`, behind
/// the head: an error, since their read model serves data older than the
/// operator accepts. One row per projection.
async fn projection_lag(
    app: &App,
    store: &AnyStore,
    args: &CheckOptions,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    for p in app.projections() {
        // Never run: not checked (and its lag in time not read).
        let ran = store
            .load_checkpoint(&p.checkpoint())
            .await
            .with_context(|| format!("cannot read the checkpoint of projection {}", p.name()))?;
        if ran.is_none() {
            continue;
        }
        let status = crate::projections_cmd::status_of(store, p).await?;
        let age = Duration::from_secs_f64(status.lag_seconds);
        let mut over = Vec::new();
        if status.lag_events > args.max_projection_lag {
            over.push(format!(
                "{} events behind (--max-projection-lag {})",
                status.lag_events, args.max_projection_lag
            ));
        }
        if age > args.max_projection_age {
            over.push(format!(
                "{} behind the head event (--max-projection-age {})",
                seconds(age),
                seconds(args.max_projection_age)
            ));
        }
        if over.is_empty() {
            continue;
        }
        findings.add(
            "projection-lag",
            Severity::Error,
            status.name.clone(),
            format!(
                "checkpoint {} at {}, head {}: {}; run it (`annals projections run {}`)",
                status.checkpoint_name,
                status.checkpoint.as_deref().unwrap_or("-"),
                status.head.as_deref().unwrap_or("-"),
                over.join(", "),
                status.name
            ),
        );
    }
    Ok(())
}

/// Registered projections stopped by their circuit breaker (the trip note
/// their runner left, [`annals::projection_trip`]) or with parked events
/// (dead letters): errors, since their read model is stale or misses those
/// events. One row per projection and problem.
async fn projection_control(
    app: &App,
    store: &AnyStore,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    for p in app.projections() {
        let checkpoint = p.checkpoint();
        let trip = annals::projection_trip(store, &checkpoint)
            .await
            .with_context(|| format!("cannot read the lock of projection {}", p.name()))?;
        if let Some(trip) = trip {
            findings.add(
                "projection-tripped",
                Severity::Error,
                p.name().to_owned(),
                format!(
                    "{checkpoint} stopped by its circuit breaker at {} ({}): {}; \
                     fix the cause, then run it again (`annals projections run {}`)",
                    timestamp(&trip.at),
                    trip.owner,
                    trip.reason,
                    p.name()
                ),
            );
        }
        let letters = store
            .dead_letters(&checkpoint)
            .await
            .with_context(|| format!("cannot list the dead letters of projection {}", p.name()))?;
        if let Some(first) = letters.first() {
            findings.add(
                "projection-dead-letters",
                Severity::Error,
                p.name().to_owned(),
                format!(
                    "{checkpoint} parked {} event(s) that its read model misses; the first at \
                     position {} (event {} of {}, type {}, {} attempt(s), parked {}): {}; \
                     retry or drop them (`annals projections dead-letters {}`)",
                    letters.len(),
                    first.position,
                    first.event_id,
                    first.stream,
                    first.event_type,
                    first.attempts,
                    timestamp(&first.parked_at),
                    first.error,
                    p.name()
                ),
            );
        }
    }
    Ok(())
}

/// PostgreSQL: transactions open longer than `--max-transaction-age`.
async fn horizon(
    store: &AnyStore,
    args: &CheckOptions,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    let long = store
        .long_transactions(args.max_transaction_age, findings.limit + 1)
        .await
        .context("cannot list long transactions")?;
    let over = long.len() > findings.limit;
    for t in long.iter().take(findings.limit) {
        let (severity, effect) = if t.holds_xid {
            (
                Severity::Error,
                "holds a transaction id: readers of the global order cannot pass it and followers stall",
            )
        } else {
            (
                Severity::Warning,
                "holds a snapshot: vacuum cannot clean up behind it",
            )
        };
        let app = if t.application_name.is_empty() {
            String::new()
        } else {
            format!(", application {:?}", t.application_name)
        };
        findings.add(
            "horizon",
            severity,
            format!("pid {}", t.pid),
            format!(
                "transaction open for {} (database {:?}{app}, {}) {effect}; end it with pg_terminate_backend({})",
                seconds(t.age),
                t.database,
                t.state,
                t.pid
            ),
        );
    }
    if over {
        findings.more("horizon", Severity::Warning, "more transactions".to_owned());
    }
    Ok(())
}

/// A copy-and-transform migration not swapped yet, or a backup left over.
async fn pending_migration(store: &AnyStore, findings: &mut Findings) -> anyhow::Result<()> {
    use annals::EventMigration;
    let Some(run) = store
        .migration_run()
        .await
        .context("cannot read the migration runs")?
    else {
        return Ok(());
    };
    let detail = match run.state {
        annals::MigrationState::Copying => format!(
            "a copy-and-transform migration ({}) is copying, {} events so far, not swapped: run `annals events migrate` again and `annals events swap`, or `annals events drop-backup` to abandon it",
            run.plan_file, run.source_events
        ),
        _ => format!(
            "the backup table {} of the migration swapped at {} is still there: `annals events drop-backup` removes it",
            run.backup_table.as_deref().unwrap_or("?"),
            run.swapped_at.map(|t| t.to_rfc3339()).unwrap_or_default()
        ),
    };
    findings.add(
        "migration",
        Severity::Warning,
        format!("run {}", run.id),
        detail,
    );
    Ok(())
}

/// A duration as seconds with a tenth, e.g. `61.3s`.
fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
