//! `annals projections list | status | run | reset | rebuild | dead-letters`,
//! and the status that `annals check` also reads.
//!
//! State is what the database knows: `not-started` (no checkpoint),
//! `caught-up` (checkpoint at the head) or `behind`. A projection that runs
//! as partitions (`run --partitions P`) also gets a row per partition: its
//! checkpoint and lag and, on PostgreSQL, the worker holding its lease (the
//! projection's row is then its furthest-behind partition).

use std::time::Duration;

use annals::{
    CheckpointStore, EventId, EventStore, GlobalPosition, PartitionLeases, PartitionOptions,
    PartitionedHandle, ProjectionControl, ProjectionError, ReadAll, RebuildOptions,
    RebuildProgress, RunnerOptions,
};
use anyhow::{anyhow, Context};
use futures::StreamExt;
use serde::Serialize;

use crate::cli::ProjectionsCommand;
use crate::commands::Env;
use crate::output::{json_line, note, Table};
use crate::{AnyStore, App, Outcome, ProjectionOps, ReadModelDb, RebuildRequest};

pub(crate) async fn dispatch(env: Env<'_>, command: ProjectionsCommand) -> anyhow::Result<Outcome> {
    match command {
        ProjectionsCommand::List { json } => list(env, json),
        ProjectionsCommand::Status { json } => status(env, json).await,
        ProjectionsCommand::Run {
            names,
            until_caught_up,
            batch_size,
            partitions: Some(partitions),
            lease_ttl,
            retry_for,
        } => {
            let options = PartitionOptions {
                partitions,
                lease_ttl: Duration::from_secs_f64(lease_ttl),
                runner: RunnerOptions {
                    batch_size,
                    store_retry: store_retry_for(retry_for),
                    ..RunnerOptions::default()
                },
            };
            run_partitioned(env, names, until_caught_up, options).await
        }
        ProjectionsCommand::Run {
            names,
            until_caught_up,
            batch_size,
            partitions: None,
            retry_for,
            ..
        } => run(env, names, until_caught_up, batch_size, retry_for).await,
        ProjectionsCommand::Reset { name } => reset(env, name).await,
        ProjectionsCommand::Rebuild {
            name,
            blue_green,
            batch_size,
            from_start,
        } => rebuild(env, name, blue_green, batch_size, from_start).await,
        ProjectionsCommand::DeadLetters {
            name,
            retry,
            drop,
            json,
        } => dead_letters(env, name, retry, drop, json).await,
    }
}

#[derive(Serialize)]
struct Listed {
    name: String,
    checkpoint: String,
    description: String,
}

fn list(env: Env<'_>, json: bool) -> anyhow::Result<Outcome> {
    let rows: Vec<Listed> = env
        .app
        .projections()
        .map(|p| Listed {
            name: p.name().to_owned(),
            checkpoint: p.checkpoint(),
            description: p.describe(),
        })
        .collect();
    if json {
        for r in &rows {
            json_line(env.out, r)?;
        }
    } else if rows.is_empty() {
        note("this binary registers no projections");
    } else {
        let mut table = Table::new(&["NAME", "CHECKPOINT", "DESCRIPTION"]);
        for r in rows {
            table.push(env.out, vec![r.name, r.checkpoint, r.description])?;
        }
        table.finish(env.out)?;
    }
    Ok(Outcome::Success)
}

/// One projection's status (a row of `status`, an object of `--json`).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Status {
    pub(crate) name: String,
    pub(crate) checkpoint_name: String,
    /// The checkpoint's position (`N` or `COMMIT:SEQ`), none if never run.
    pub(crate) checkpoint: Option<String>,
    pub(crate) head: Option<String>,
    pub(crate) lag_events: u64,
    pub(crate) lag_seconds: f64,
    pub(crate) state: &'static str,
    /// When the projection runs as partitions: one entry per partition
    /// (the projection's checkpoint and lag are then the furthest behind
    /// partition's).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) partitions: Vec<PartitionStatus>,
}

/// One partition of a partitioned projection (`status`).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct PartitionStatus {
    pub(crate) partition: u32,
    pub(crate) checkpoint_name: String,
    pub(crate) checkpoint: Option<String>,
    pub(crate) lag_events: u64,
    /// The worker holding its lease (PostgreSQL), and whether the lease is
    /// live.
    pub(crate) owner: Option<String>,
    pub(crate) fence: Option<i64>,
    pub(crate) lease_live: bool,
}

/// The status of `projection` on `store`.
pub(crate) async fn status_of(
    store: &AnyStore,
    projection: &dyn ProjectionOps,
) -> anyhow::Result<Status> {
    let checkpoint_name = projection.checkpoint();
    let what = || format!("cannot read the lag of projection {}", projection.name());
    let partitions = partitions_of(store, &checkpoint_name)
        .await
        .with_context(what)?;
    // Partitioned: the furthest behind partition speaks for the projection.
    let lag = match partitions.iter().max_by_key(|p| p.1.events) {
        Some((_, lag)) => *lag,
        None => annals::projection_lag(store, &checkpoint_name)
            .await
            .with_context(what)?,
    };
    let lag = annals::ProjectionLag {
        checkpoint: if partitions.iter().any(|p| p.1.checkpoint.is_none()) {
            None
        } else {
            lag.checkpoint
        },
        ..lag
    };
    let partitions = partitions.into_iter().map(|(p, _)| p).collect();
    let lag_seconds = match lag.head {
        Some(head) if lag.events > 0 => lag_age(store, lag.checkpoint, head)
            .await
            .with_context(|| format!("cannot read the lag of projection {}", projection.name()))?
            .as_secs_f64(),
        _ => 0.0,
    };
    let state = match (lag.checkpoint, lag.events) {
        (None, _) => "not-started",
        (Some(_), 0) => "caught-up",
        (Some(_), _) => "behind",
    };
    Ok(Status {
        name: projection.name().to_owned(),
        checkpoint_name,
        checkpoint: lag.checkpoint.map(|p| p.to_string()),
        head: lag.head.map(|p| p.to_string()),
        lag_events: lag.events,
        lag_seconds,
        state,
        partitions,
    })
}

/// The partitions of the projection checkpoint `group` (`name@vN`) when it
/// runs partitioned: each one's status and lag.
async fn partitions_of(
    store: &AnyStore,
    group: &str,
) -> annals::Result<Vec<(PartitionStatus, annals::ProjectionLag)>> {
    let holders = match store {
        AnyStore::Postgres(p) => p.partition_holders(group).await?,
        _ => Vec::new(),
    };
    let count = match store {
        AnyStore::Postgres(_) => u32::try_from(holders.len()).ok().filter(|n| *n > 0),
        AnyStore::Sqlite(s) => crate::projections::sqlite_partition_count(s, group).await?,
        _ => None,
    };
    let Some(count) = count else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for p in 0..count {
        let checkpoint_name = annals::partition_checkpoint(group, p, count);
        let lag = annals::projection_lag(store, &checkpoint_name).await?;
        let holder = holders.iter().find(|h| h.partition == p);
        out.push((
            PartitionStatus {
                partition: p,
                checkpoint_name,
                checkpoint: lag.checkpoint.map(|c| c.to_string()),
                lag_events: lag.events,
                owner: holder.and_then(|h| h.owner.clone()),
                fence: holder.map(|h| h.fence),
                lease_live: holder.is_some_and(|h| h.live),
            },
            lag,
        ));
    }
    Ok(out)
}

/// The lag in time: `recorded_at` of the head event minus that of the first
/// event after `checkpoint` (zero when the clock went backwards between
/// them). Two reads of one event each.
pub(crate) async fn lag_age(
    store: &AnyStore,
    checkpoint: Option<GlobalPosition>,
    head: GlobalPosition,
) -> annals::Result<Duration> {
    let store = store.raw();
    let first = first_after(&store, checkpoint.unwrap_or(GlobalPosition::START)).await?;
    // Just before the head: the head is the first event after it (positions
    // order by commit, then sequence).
    let before_head = GlobalPosition::new(head.commit(), head.seq().saturating_sub(1));
    let last = if head.seq() == 0 {
        None
    } else {
        first_after(&store, before_head).await?
    };
    Ok(match (first, last) {
        (Some(first), Some(last)) => (last - first).to_std().unwrap_or(Duration::ZERO),
        _ => Duration::ZERO,
    })
}

async fn first_after(
    store: &AnyStore,
    after: GlobalPosition,
) -> annals::Result<Option<chrono::DateTime<chrono::Utc>>> {
    let mut events = store.read_all(ReadAll::after(after).limit(1));
    match events.next().await {
        Some(event) => Ok(Some(event?.recorded_at)),
        None => Ok(None),
    }
}

pub(crate) fn read_model_db(env: &Env<'_>, store: AnyStore) -> ReadModelDb {
    ReadModelDb {
        store,
        url: env.url.to_owned(),
        pg_schema: env.pg_schema.clone(),
        key_file: env.key_file.clone(),
    }
}

async fn status(env: Env<'_>, json: bool) -> anyhow::Result<Outcome> {
    let store = env.open(false).await?;
    let mut rows = Vec::new();
    for p in env.app.projections() {
        rows.push(status_of(&store, p).await?);
    }
    if json {
        for r in &rows {
            json_line(env.out, r)?;
        }
        return Ok(Outcome::Success);
    }
    if rows.is_empty() {
        note("this binary registers no projections");
        return Ok(Outcome::Success);
    }
    let none = || "-".to_owned();
    let mut table = Table::new(&[
        "NAME",
        "CHECKPOINT",
        "HEAD",
        "LAG_EVENTS",
        "LAG_SECONDS",
        "STATE",
    ])
    .right_align(&[3, 4]);
    for r in rows {
        for p in &r.partitions {
            let holder = match (&p.owner, p.lease_live) {
                (Some(owner), true) => format!("held by {owner} (fence {})", p.fence.unwrap_or(0)),
                _ => "no live lease".to_owned(),
            };
            table.push(
                env.out,
                vec![
                    format!("{} partition {}", r.name, p.partition),
                    p.checkpoint.clone().unwrap_or_else(none),
                    r.head.clone().unwrap_or_else(none),
                    p.lag_events.to_string(),
                    "-".to_owned(),
                    holder,
                ],
            )?;
        }
        table.push(
            env.out,
            vec![
                r.name,
                r.checkpoint.unwrap_or_else(none),
                r.head.unwrap_or_else(none),
                r.lag_events.to_string(),
                format!("{:.1}", r.lag_seconds),
                r.state.to_owned(),
            ],
        )?;
    }
    table.finish(env.out)?;
    Ok(Outcome::Success)
}

/// The registered projection `name`, or an error that lists them.
/// The projections `projections run` names (all registered ones without
/// a name); an error when there are none.
fn to_run<'a>(app: &'a App, names: &[String]) -> anyhow::Result<Vec<&'a dyn ProjectionOps>> {
    let selected: Vec<&dyn ProjectionOps> = if names.is_empty() {
        app.projections().collect()
    } else {
        names
            .iter()
            .map(|n| registered(app, n))
            .collect::<anyhow::Result<_>>()?
    };
    if selected.is_empty() {
        return Err(anyhow!("this binary registers no projections to run"));
    }
    Ok(selected)
}

fn registered<'a>(app: &'a App, name: &str) -> anyhow::Result<&'a dyn ProjectionOps> {
    app.projection(name).ok_or_else(|| {
        let known: Vec<&str> = app.projections().map(|p| p.name()).collect();
        if known.is_empty() {
            anyhow!("unknown projection {name:?}: this binary registers no projections")
        } else {
            anyhow!(
                "unknown projection {name:?}: this binary registers {}",
                known.join(", ")
            )
        }
    })
}

/// The store retry of a live runner that keeps trying for about `secs`
/// seconds: 10 ms doubling to 2 s (about 4 s for the first 10 attempts),
/// then every 2 s.
fn store_retry_for(secs: u32) -> annals::Backoff {
    annals::Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_secs(2),
        max_attempts: 10 + secs.div_ceil(2),
    }
}

async fn run(
    env: Env<'_>,
    names: Vec<String>,
    until_caught_up: bool,
    batch_size: usize,
    retry_for: u32,
) -> anyhow::Result<Outcome> {
    let selected = to_run(env.app, &names)?;
    // Installed before anything runs, so a signal is never missed.
    let mut stop = Shutdown::install()?;
    let store = env.open(false).await?;
    let db = read_model_db(&env, store.clone());
    let head = store
        .head_position()
        .await
        .context("cannot read the head position")?;
    let options = RunnerOptions {
        batch_size,
        store_retry: store_retry_for(retry_for),
        ..RunnerOptions::default()
    };
    let mut running = Vec::new();
    for p in &selected {
        let started = p
            .start(&db, options.clone())
            .await
            .with_context(|| format!("cannot start projection {}", p.name()));
        match started {
            Ok(r) => running.push(r),
            Err(e) => {
                stop_all(running).await;
                return Err(e);
            }
        }
    }
    let names: Vec<&str> = running.iter().map(|r| r.name()).collect();
    note(&format!(
        "running {} (head at start: {})",
        names.join(", "),
        head.map_or_else(|| "empty store".to_owned(), |h| h.to_string())
    ));
    // Until a signal, a runner that fails, or (--until-caught-up) every
    // runner at the head read at the start.
    {
        let caught_up = async {
            match head {
                Some(head) if until_caught_up => {
                    for r in &running {
                        // Ends early when the runner fails; its error comes
                        // from `stop` below.
                        let _ = r.wait_for(head, Duration::from_secs(365 * 24 * 3600)).await;
                    }
                }
                None if until_caught_up => {}
                _ => std::future::pending::<()>().await,
            }
        };
        let failed = futures::future::select_all(running.iter().map(|r| Box::pin(r.ended())));
        tokio::select! {
            () = stop.wait() => note("stopping on a signal"),
            () = caught_up => {}
            _ = failed => {}
        }
    }
    let mut first_error = None;
    for r in running {
        let name = r.name().to_owned();
        let at = r.checkpoint();
        match r.stop().await {
            Ok(()) => note(&format!(
                "{name}: stopped at {}",
                at.map_or_else(|| "the start".to_owned(), |p| p.to_string())
            )),
            Err(e) => {
                first_error.get_or_insert(anyhow::Error::new(e));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(Outcome::Success),
    }
}

/// `run --partitions P`: one partitioned worker per projection (see
/// [`ProjectionOps::start_partitioned`]).
async fn run_partitioned(
    env: Env<'_>,
    names: Vec<String>,
    until_caught_up: bool,
    options: PartitionOptions,
) -> anyhow::Result<Outcome> {
    let selected = to_run(env.app, &names)?;
    let mut stop = Shutdown::install()?;
    let store = env.open(false).await?;
    let db = read_model_db(&env, store.clone());
    let head = store
        .head_position()
        .await
        .context("cannot read the head position")?;
    let mut running: Vec<(String, PartitionedHandle)> = Vec::new();
    for p in &selected {
        match p.start_partitioned(&db, options.clone()).await {
            Ok(h) => running.push((p.checkpoint(), h)),
            Err(e) => {
                for (_, h) in running {
                    let _ = h.stop().await;
                }
                return Err(
                    anyhow::Error::new(e).context(format!("cannot start projection {}", p.name()))
                );
            }
        }
    }
    let workers: Vec<String> = running
        .iter()
        .map(|(_, h)| format!("{} as worker {}", h.name(), h.worker()))
        .collect();
    note(&format!(
        "running {} in {} partitions (head at start: {})",
        workers.join(", "),
        options.partitions,
        head.map_or_else(|| "empty store".to_owned(), |h| h.to_string())
    ));
    {
        let caught_up = async {
            match head {
                Some(head) if until_caught_up => {
                    for (group, _) in &running {
                        let _ = annals::wait_for_partitions(
                            &store,
                            group,
                            options.partitions,
                            head,
                            Duration::from_secs(365 * 24 * 3600),
                        )
                        .await;
                    }
                }
                None if until_caught_up => {}
                _ => std::future::pending::<()>().await,
            }
        };
        let failed = futures::future::select_all(running.iter().map(|(_, h)| Box::pin(h.ended())));
        tokio::select! {
            () = stop.wait() => note("stopping on a signal"),
            () = caught_up => {}
            _ = failed => {}
        }
    }
    let mut first_error = None;
    for (_, h) in running {
        let name = h.name().to_owned();
        match h.stop().await {
            Ok(()) => note(&format!("{name}: stopped; its partitions are free")),
            Err(e) => {
                first_error.get_or_insert(anyhow::Error::new(e));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(Outcome::Success),
    }
}

async fn stop_all(running: Vec<crate::RunningProjection>) {
    for r in running {
        let _ = r.stop().await;
    }
}

async fn reset(env: Env<'_>, name: String) -> anyhow::Result<Outcome> {
    let projection = registered(env.app, &name)?;
    let store = env.open(false).await?;
    let db = read_model_db(&env, store);
    projection
        .reset(&db)
        .await
        .with_context(|| format!("cannot reset projection {name}"))?;
    writeln_out(
        env.out,
        &format!(
            "reset {name}: checkpoint {} deleted with its read model",
            projection.checkpoint()
        ),
    )?;
    Ok(Outcome::Success)
}

/// The checkpoint that marks an in-place rebuild under way: saved once the
/// read model was reset, deleted when the rebuild reached the head. While it
/// exists, `rebuild` resumes instead of resetting again.
fn rebuild_marker(checkpoint: &str) -> String {
    format!("{checkpoint}+rebuild")
}

async fn rebuild(
    env: Env<'_>,
    name: String,
    blue_green: bool,
    batch_size: usize,
    from_start: bool,
) -> anyhow::Result<Outcome> {
    let projection = registered(env.app, &name)?;
    // Installed before anything runs, so a signal is never missed.
    let mut stop = Shutdown::install()?;
    let store = env.open(false).await?;
    let db = read_model_db(&env, store.clone());
    let checkpoint = projection.checkpoint();
    release_dead_local_lock(&store, &checkpoint).await;
    let marker = rebuild_marker(&checkpoint);
    let mut resumed = !from_start;
    if blue_green {
        // An interrupted blue-green rebuild left its shadow checkpoint.
        resumed &= store
            .load_checkpoint(&annals::shadow_checkpoint_name(&checkpoint))
            .await
            .context("cannot read the shadow checkpoint")?
            .is_some();
    } else {
        let under_way = store
            .load_checkpoint(&marker)
            .await
            .context("cannot read the rebuild marker")?
            .is_some();
        if from_start || !under_way {
            // The read model is reset under the projection's lock, so a
            // runner cannot start between a check and the reset and keep
            // applying to rows that are being deleted under it. The lock is
            // let go right after: the rebuild takes it again (a runner that
            // starts in between finds a reset read model and rebuilds it
            // itself, and the rebuild then reports the lock as held).
            let lock = match store
                .acquire_projection_lock(
                    &checkpoint,
                    &annals::lock_owner(),
                    &annals::lock_token(),
                    RESET_LOCK_TTL,
                )
                .await
                .context("cannot take the projection lock")?
            {
                annals::LockAttempt::Acquired(lock) => lock,
                annals::LockAttempt::Held(lock) => {
                    return Err(anyhow!(
                        "projection {name} ({checkpoint}) is locked by {} until {}: stop its \
                         runner first (an in-place rebuild resets the read model)",
                        lock.owner,
                        lock.expires_at
                    ));
                }
            };
            // Leased partitioned workers of this version write the same
            // read model under their own checkpoints: not reset under them
            // (they register before they check the lock, see
            // `ProjectionControl::live_partition_workers`).
            let workers = store.live_partition_workers(&checkpoint).await;
            if !matches!(workers, Ok(0)) {
                let released = store.release_projection_lock(&lock).await;
                let workers = workers.context("cannot count partitioned workers")?;
                released.context("cannot release the projection lock")?;
                return Err(anyhow!(
                    "projection {name} ({checkpoint}) runs as partitioned workers ({workers} \
                     live): stop them first (an in-place rebuild resets the read model)"
                ));
            }
            let reset = async {
                projection
                    .reset(&db)
                    .await
                    .with_context(|| format!("cannot reset projection {name}"))?;
                store
                    .save_checkpoint(&marker, GlobalPosition::START)
                    .await
                    .context("cannot save the rebuild marker")
            }
            .await;
            let released = store
                .release_projection_lock(&lock)
                .await
                .context("cannot release the projection lock");
            reset?;
            released?;
            resumed = false;
        }
    }
    let request = RebuildRequest {
        options: RebuildOptions {
            batch_size,
            checkpoint_every: batch_size.saturating_mul(2),
            from_start: blue_green && from_start,
        },
        blue_green,
        keepers: annals::LockKeepers::new(),
    };
    let keepers = request.keepers.clone();
    let bar = crate::progress::progress_bar(
        "{prefix} {wide_bar} {pos}/{len} events, {per_sec}, {eta} left",
        format!("rebuilding {name}"),
    );
    let mut last: Option<RebuildProgress> = None;
    let mut report = |p: &RebuildProgress| {
        bar.set_length(p.events + p.remaining);
        bar.set_position(p.events);
        last = Some(*p);
    };
    let outcome = tokio::select! {
        out = projection.rebuild(&db, request, &mut report) => Some(out),
        () = stop.wait() => None,
    };
    bar.finish_and_clear();
    let Some(outcome) = outcome else {
        // Cancelled between two awaits: at most the batch in flight is lost
        // (its checkpoint was not saved). The dropped rebuild's lock keeper
        // releases the lock after any write of it in flight; waiting for
        // that before exiting lets the resume start at once rather than at
        // the end of the lease.
        keepers.released(&checkpoint).await;
        note(&format!(
            "stopped on a signal{}; run the same command again to resume",
            last.map_or_else(String::new, |p| format!(" at {}", p.position))
        ));
        return Err(anyhow!("rebuild of {name} interrupted"));
    };
    outcome.with_context(|| format!("cannot rebuild projection {name}"))?;
    if !blue_green {
        store
            .reset_checkpoint(&marker)
            .await
            .context("cannot delete the rebuild marker")?;
    }
    let (events, position) = last.map_or((0, None), |p| (p.events, Some(p.position)));
    let at = position.map_or_else(|| "the start".to_owned(), |p| p.to_string());
    let how = if blue_green {
        "; shadow tables swapped in (run the projection's runner: an older version's stops)"
    } else {
        ""
    };
    let from = if resumed { "resumed, " } else { "" };
    writeln_out(
        env.out,
        &format!(
            "rebuilt {name}: {from}{events} events scanned, checkpoint {checkpoint} at {at}{how}"
        ),
    )?;
    Ok(Outcome::Success)
}

/// Releases the lock of `checkpoint` when its holder is a process of this
/// host that no longer exists (killed with SIGKILL, or by the OOM killer:
/// no release ran), so that a rebuild can resume at once instead of
/// waiting for the lease to run out. Holders on other hosts, live
/// processes and hosts without `/proc` are left alone: their lease decides.
/// (A rebuild stopped by Ctrl-C or SIGTERM releases its lock itself.)
/// How long the lock taken around an in-place reset lasts if this process
/// dies before it lets it go (the reset itself takes a moment).
const RESET_LOCK_TTL: Duration = Duration::from_secs(30);

async fn release_dead_local_lock(store: &AnyStore, checkpoint: &str) {
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    let Ok(Some(lock)) = store.projection_lock(checkpoint).await else {
        return;
    };
    if lock.expires_at <= chrono::Utc::now() {
        return;
    }
    let me = annals::lock_owner();
    let Some((_, host)) = me.split_once(" on ") else {
        return;
    };
    let Some((pid, their_host)) = lock
        .owner
        .strip_prefix("pid ")
        .and_then(|rest| rest.split_once(" on "))
    else {
        return;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return;
    };
    if their_host != host
        || pid == std::process::id()
        || std::path::Path::new(&format!("/proc/{pid}")).exists()
    {
        return;
    }
    tracing::info!(checkpoint, owner = %lock.owner, "releasing the lock of a process that is gone");
    let _ = store.release_projection_lock(&lock).await;
}

#[derive(Serialize)]
struct Letter {
    event_id: String,
    position: String,
    stream: String,
    event_type: String,
    attempts: u32,
    parked_at: String,
    error: String,
}

async fn dead_letters(
    env: Env<'_>,
    name: String,
    retry: Option<uuid::Uuid>,
    drop: Option<uuid::Uuid>,
    json: bool,
) -> anyhow::Result<Outcome> {
    let projection = registered(env.app, &name)?;
    let store = env.open(false).await?;
    let checkpoint = projection.checkpoint();
    if let Some(id) = drop {
        let dropped = store
            .drop_dead_letter(&checkpoint, EventId(id))
            .await
            .context("cannot drop the dead letter")?;
        if !dropped {
            return Err(anyhow!(
                "projection {name} ({checkpoint}) has no parked event {id}"
            ));
        }
        annals::record_dead_letter_count(&store, &name, &checkpoint).await;
        writeln_out(env.out, &format!("dropped parked event {id} of {name}"))?;
        return Ok(Outcome::Success);
    }
    if let Some(id) = retry {
        let db = read_model_db(&env, store.clone());
        return match projection.retry_dead_letter(&db, EventId(id)).await {
            Ok(()) => {
                writeln_out(
                    env.out,
                    &format!("applied parked event {id} of {name}; dropped"),
                )?;
                Ok(Outcome::Success)
            }
            Err(e @ ProjectionError::Handler { .. }) => {
                writeln_out(
                    env.out,
                    &format!("parked event {id} of {name} failed again: {e}"),
                )?;
                Ok(Outcome::CheckFailed(format!(
                    "parked event {id} of {name} failed again; it stays parked"
                )))
            }
            Err(e) => Err(anyhow::Error::new(e).context(format!("cannot retry parked event {id}"))),
        };
    }
    let letters = store
        .dead_letters(&checkpoint)
        .await
        .context("cannot list the dead letters")?;
    annals::record_dead_letter_count(&store, &name, &checkpoint).await;
    let rows: Vec<Letter> = letters
        .into_iter()
        .map(|d| Letter {
            event_id: d.event_id.0.to_string(),
            position: d.position.to_string(),
            stream: d.stream.to_string(),
            event_type: d.event_type,
            attempts: d.attempts,
            parked_at: d.parked_at.to_rfc3339(),
            error: d.error,
        })
        .collect();
    if json {
        for r in &rows {
            json_line(env.out, r)?;
        }
    } else if rows.is_empty() {
        note(&format!("projection {name} has no parked events"));
    } else {
        let mut table = Table::new(&[
            "EVENT_ID",
            "POSITION",
            "STREAM",
            "TYPE",
            "ATTEMPTS",
            "PARKED_AT",
            "ERROR",
        ]);
        for r in rows {
            table.push(
                env.out,
                vec![
                    r.event_id,
                    r.position,
                    r.stream,
                    r.event_type,
                    r.attempts.to_string(),
                    r.parked_at,
                    r.error,
                ],
            )?;
        }
        table.finish(env.out)?;
    }
    Ok(Outcome::Success)
}

fn writeln_out(out: &mut (dyn std::io::Write + Send), line: &str) -> std::io::Result<()> {
    writeln!(out, "{line}")
}

/// Ctrl-C (SIGINT) and SIGTERM, listened to from the moment of `install`.
struct Shutdown {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Shutdown {
                int: signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?,
                term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Shutdown {})
    }

    async fn wait(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
