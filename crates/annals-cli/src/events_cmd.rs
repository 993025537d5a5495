//! `annals events migrate|swap|drop-backup`: copy-and-transform migrations
//! of the event table (see [`annals::EventMigration`] for the store's side
//! and the README's "Schema evolution" for the plan's `[[migrate]]`,
//! `[[merge]]` and `[[purge]]` tables).
//!
//! `migrate` copies the live table into `events_migrating` in global order,
//! `--batch-size` source events per transaction with the run's checkpoint,
//! so a run that stops (Ctrl-C, a crash, `--max-batches`) resumes after its
//! last batch when started again. A batch never ends inside a `[[merge]]`
//! run (the run is held back to the next batch, and a run open at the end
//! of the table to the swap), so a resumed run merges what one run in one
//! go would. `--dry-run` only reads, and prints per stored event type and
//! version how many events the plan would change (dropped, split, merged),
//! with one example (and one merged run). `swap` catches the copy up, then copies the events
//! appended meanwhile, verifies and renames, in one transaction.
//! `drop-backup` removes the backup (or abandons a copy not swapped).
//! Every event written is decoded with the binary's registered aggregate
//! types first.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use annals::{
    EventMigration, EventStore, MigrationPlan, MigrationPreview, MigrationState, Migrator, ReadAll,
    RecordedEvent,
};
use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::commands::Env;
use crate::output::json_line;
use crate::{AggregateOps, AnyStore, Outcome};

/// `annals events …`.
#[derive(Subcommand, Debug)]
pub(crate) enum EventsCommand {
    /// Copy every event into a new table in global order, transformed by a
    /// plan (upcast, split, merge, drop, purge); resumable. With --dry-run, print
    /// what would change and write nothing.
    Migrate(MigrateArgs),
    /// Catch the copy up, copy the events appended meanwhile, verify it and
    /// make it the live table in one transaction; the old table stays as a
    /// dated backup.
    Swap(JsonArg),
    /// Drop the backup a swap left (or abandon a copy not swapped yet).
    #[command(name = "drop-backup")]
    DropBackup(JsonArg),
}

/// `--json`.
#[derive(Args, Debug)]
pub(crate) struct JsonArg {
    /// JSON output.
    #[arg(long)]
    json: bool,
}

/// `annals events migrate`.
#[derive(Args, Debug)]
pub(crate) struct MigrateArgs {
    /// The plan: a TOML file of [[step]] (upcasters), [[migrate]] (jq
    /// filters that may split or drop events), [[merge]] (jq filters over
    /// runs of adjacent events of one stream) and [[purge]] tables.
    #[arg(long, value_name = "FILE")]
    plan: PathBuf,
    /// Print, per stored event type and version, how many events would
    /// change, with one before/after example each; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Source events per transaction (and checkpoint).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    batch_size: u64,
    /// Stop after this many batches (a rerun resumes where it stopped).
    #[arg(long, value_name = "N")]
    max_batches: Option<u64>,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn dispatch(env: Env<'_>, command: EventsCommand) -> anyhow::Result<Outcome> {
    match command {
        EventsCommand::Migrate(args) => migrate(env, args).await,
        EventsCommand::Swap(args) => swap(env, args.json).await,
        EventsCommand::DropBackup(args) => drop_backup(env, args.json).await,
    }
}

/// The check every migrated event passes: it decodes with the registered
/// aggregate type of its category (other categories are not checked).
fn decode_check(
    aggregates: BTreeMap<&'static str, Arc<dyn AggregateOps>>,
) -> impl Fn(&RecordedEvent) -> Result<(), String> + Send + Sync + 'static {
    move |event| match aggregates.get(event.stream_id.category()) {
        Some(ops) => ops.check_event(event).map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

fn progress_bar(len: Option<u64>) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(len, target);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} events copied ({per_sec}, {eta})")
    {
        bar.set_style(style);
    }
    bar
}

/// Copies batches after the run's checkpoint until the live table's end (or
/// `max_batches`). A batch never ends inside a `[[merge]]` run: the
/// migrator holds the run back (a batch of nothing but held events reads
/// on), so the checkpoint stays before it, and a run still open at the end
/// is left to the swap. Returns the source events copied and whether it
/// stopped early.
async fn copy(
    store: &AnyStore,
    run: i64,
    migrator: &mut Migrator,
    batch_size: u64,
    max_batches: Option<u64>,
) -> anyhow::Result<(u64, bool)> {
    let current = store
        .migration_run()
        .await?
        .ok_or_else(|| anyhow!("the migration run is gone"))?;
    let after = current.checkpoint.unwrap_or_default();
    let remaining = match store.head_position().await? {
        Some(head) => store.count_events_between(after, head).await.ok(),
        None => Some(0),
    };
    let bar = progress_bar(remaining);
    let mut after = current.checkpoint;
    let (mut copied, mut batches) = (0u64, 0u64);
    loop {
        if max_batches.is_some_and(|m| batches >= m) {
            bar.finish_and_clear();
            return Ok((copied, true));
        }
        let options = match after {
            Some(p) => ReadAll::after(p),
            None => ReadAll::from_start(),
        };
        let mut events = store.read_all(ReadAll {
            limit: Some(batch_size),
            ..options
        });
        let mut batch = Vec::new();
        let mut read = false;
        while let Some(event) = events.next().await {
            let event = event.context("cannot read the live events")?;
            after = Some(event.global_position);
            read = true;
            batch.extend(migrator.migrate(event)?);
        }
        if !read {
            bar.finish_and_clear();
            return Ok((copied, false));
        }
        if batch.is_empty() {
            // Every event read joined an open run: read on.
            continue;
        }
        let n = batch.len() as u64;
        store
            .write_migration_batch(run, batch)
            .await
            .context("cannot write a batch of the copy")?;
        copied += n;
        batches += 1;
        bar.inc(n);
    }
}

fn check_outcome(e: anyhow::Error) -> anyhow::Result<Outcome> {
    match e.downcast_ref::<annals::Error>() {
        Some(annals::Error::MigrationCheck(f)) => Ok(Outcome::CheckFailed(format!(
            "the migrated copy fails verification: {f}"
        ))),
        _ => Err(e),
    }
}

async fn migrate(env: Env<'_>, args: MigrateArgs) -> anyhow::Result<Outcome> {
    let plan = Arc::new(MigrationPlan::load(&args.plan)?);
    let store = env.open(false).await?.raw();
    if args.dry_run {
        return dry_run(env, &store, plan, args.json).await;
    }
    let run = store
        .begin_migration(&args.plan.display().to_string(), plan.text())
        .await?;
    let deltas = store.migration_deltas().await?;
    let mut migrator =
        Migrator::new(plan, deltas).with_check(decode_check(env.app.aggregate_map()));
    let (copied, stopped) = match copy(
        &store,
        run.id,
        &mut migrator,
        args.batch_size,
        args.max_batches,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return check_outcome(e),
    };
    let run = store
        .migration_run()
        .await?
        .ok_or_else(|| anyhow!("the migration run is gone"))?;
    if args.json {
        json_line(
            env.out,
            &json!({
                "run": run.id,
                "copied": copied,
                "source_events": run.source_events,
                "written_events": run.written_events,
                "renumbered": run.renumbered,
                "complete": !stopped,
                "held": migrator.held(),
            }),
        )?;
    } else {
        writeln!(
            env.out,
            "run {}: copied {copied} events ({} in all, {} written{}){}",
            run.id,
            run.source_events,
            run.written_events,
            if run.renumbered {
                ", versions and positions renumbered"
            } else {
                ""
            },
            if stopped {
                "; stopped after --max-batches: run again to resume"
            } else {
                "; verify and swap with `annals events swap`"
            }
        )?;
        if migrator.held() > 0 && !stopped {
            writeln!(
                env.out,
                "the last {} events form a [[merge]] run that appends may extend: the swap copies them",
                migrator.held()
            )?;
        }
    }
    Ok(Outcome::Success)
}

#[derive(Default)]
struct Tally {
    events: u64,
    changed: u64,
    dropped: u64,
    split: u64,
    /// Events merged with others (members of runs of two or more).
    merged: u64,
    /// The merged runs with an event of this type and version.
    runs: u64,
    example: Option<MigrationPreview>,
    /// A merged run with an event of this type and version, when the
    /// example is not one.
    merge_example: Option<MigrationPreview>,
}

impl Tally {
    fn count(&mut self, p: &MigrationPreview, first: bool) {
        self.events += 1;
        if p.unchanged {
            return;
        }
        self.changed += 1;
        if p.before.len() > 1 {
            self.merged += 1;
            self.runs += u64::from(first);
            if self.merge_example.is_none()
                && self.example.as_ref().is_some_and(|e| e.before.len() == 1)
            {
                self.merge_example = Some(p.clone());
            }
        } else {
            match p.after.len() {
                0 => self.dropped += 1,
                1 => {}
                _ => self.split += 1,
            }
        }
        if self.example.is_none() {
            self.example = Some(p.clone());
        }
    }
}

async fn dry_run(
    env: Env<'_>,
    store: &AnyStore,
    plan: Arc<MigrationPlan>,
    json: bool,
) -> anyhow::Result<Outcome> {
    let mut migrator = Migrator::new(plan, Vec::new());
    let mut tallies: BTreeMap<(String, u32), Tally> = BTreeMap::new();
    let mut tally = |previews: Vec<MigrationPreview>| {
        for p in previews {
            let mut seen = Vec::new();
            for e in &p.before {
                let key = (e.event_type.clone(), e.event_version);
                let first = !seen.contains(&key);
                seen.push(key.clone());
                tallies.entry(key).or_default().count(&p, first);
            }
        }
    };
    let mut events = store.read_all(ReadAll::from_start());
    while let Some(event) = events.next().await {
        let event = event.context("cannot read the live events")?;
        tally(migrator.preview(event)?);
    }
    tally(migrator.preview_finish()?);
    let show = |e: &RecordedEvent| {
        json!({
            "event_type": e.event_type,
            "event_version": e.event_version,
            "data": e.data.to_value().unwrap_or(serde_json::Value::Null),
        })
    };
    let example = |p: &MigrationPreview| {
        let first = &p.before[0];
        let mut o = json!({
            "stream": first.stream_id.as_str(),
            "stream_version": first.stream_version.0,
            "before": show(first),
            "after": p.after.iter().map(show).collect::<Vec<_>>(),
        });
        if p.before.len() > 1 {
            o["run"] = p.before.iter().map(show).collect::<Vec<_>>().into();
        }
        o
    };
    for ((event_type, version), t) in &tallies {
        if json {
            json_line(
                env.out,
                &json!({
                    "event_type": event_type,
                    "event_version": version,
                    "events": t.events,
                    "changed": t.changed,
                    "dropped": t.dropped,
                    "split": t.split,
                    "merged": t.merged,
                    "merged_runs": t.runs,
                    "example": t.example.as_ref().map(example),
                    "merge_example": t.merge_example.as_ref().map(example),
                }),
            )?;
            continue;
        }
        writeln!(
            env.out,
            "{event_type} v{version}: {} events, {} would change ({} dropped, {} split, {} merged in {} runs)",
            t.events, t.changed, t.dropped, t.split, t.merged, t.runs
        )?;
        for p in t.example.iter().chain(&t.merge_example) {
            let first = &p.before[0];
            if p.before.len() > 1 {
                writeln!(
                    env.out,
                    "  e.g. {}@{}..{} (a run of {} merged)",
                    first.stream_id,
                    first.stream_version,
                    p.before[p.before.len() - 1].stream_version,
                    p.before.len()
                )?;
            } else {
                writeln!(
                    env.out,
                    "  e.g. {}@{}",
                    first.stream_id, first.stream_version
                )?;
            }
            for b in &p.before {
                writeln!(env.out, "    before: {}", show(b))?;
            }
            if p.after.is_empty() {
                writeln!(env.out, "    after:  (dropped)")?;
            }
            for a in &p.after {
                writeln!(env.out, "    after:  {}", show(a))?;
            }
        }
    }
    Ok(Outcome::Success)
}

async fn swap(env: Env<'_>, json: bool) -> anyhow::Result<Outcome> {
    let store = env.open(false).await?.raw();
    let run = match store.migration_run().await? {
        Some(run) if run.state == MigrationState::Copying => run,
        Some(run) => {
            return Err(anyhow!(
                "migration run {} is already swapped (backup {}); drop the backup with `annals events drop-backup`",
                run.id,
                run.backup_table.as_deref().unwrap_or("?")
            ))
        }
        None => return Err(anyhow!("no migration to swap: run `annals events migrate --plan FILE` first")),
    };
    let plan = Arc::new(
        MigrationPlan::parse(&run.plan_file, &run.plan)
            .with_context(|| format!("cannot compile the plan of migration run {}", run.id))?,
    );
    let check = decode_check(env.app.aggregate_map());
    let catch_up = async {
        let deltas = store.migration_deltas().await?;
        let mut migrator = Migrator::new(Arc::clone(&plan), deltas)
            .with_check(decode_check(env.app.aggregate_map()));
        copy(&store, run.id, &mut migrator, 500, None).await
    };
    if let Err(e) = catch_up.await {
        return check_outcome(e);
    }
    let deltas = store.migration_deltas().await?;
    let mut migrator = Migrator::new(plan, deltas).with_check(check);
    let report = match store
        .swap_migration(
            run.id,
            Box::new(move |e| match e {
                Some(e) => migrator.migrate(e),
                None => migrator.finish(),
            }),
        )
        .await
    {
        Ok(r) => r,
        Err(e) => return check_outcome(e.into()),
    };
    if json {
        json_line(
            env.out,
            &json!({
                "run": run.id,
                "backup_table": report.backup_table,
                "tail_events": report.tail_events,
                "events": report.events,
                "checkpoints_reset": report.checkpoints_reset,
                "dead_letters_removed": report.dead_letters_removed,
                "snapshots_removed": report.snapshots_removed,
            }),
        )?;
    } else {
        writeln!(
            env.out,
            "swapped: {} events live, {} copied during the swap; the old table is {} (remove it with `annals events drop-backup`); {} snapshots removed",
            report.events, report.tail_events, report.backup_table, report.snapshots_removed
        )?;
        for name in &report.checkpoints_reset {
            writeln!(
                env.out,
                "checkpoint {name} removed (positions were renumbered): reset its read model and rebuild it"
            )?;
        }
        if report.dead_letters_removed > 0 {
            writeln!(
                env.out,
                "{} dead letters removed (they named the old positions; a rebuild parks a poison event again)",
                report.dead_letters_removed
            )?;
        }
    }
    Ok(Outcome::Success)
}

async fn drop_backup(env: Env<'_>, json: bool) -> anyhow::Result<Outcome> {
    let store = env.open(false).await?;
    let dropped = store.drop_migration_backup().await?;
    if json {
        json_line(env.out, &json!({ "dropped": dropped }))?;
    } else {
        match dropped {
            Some(table) => writeln!(env.out, "dropped {table}")?,
            None => writeln!(env.out, "no migration run: nothing to drop")?,
        }
    }
    Ok(Outcome::Success)
}
