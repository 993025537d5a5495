//! W5's distinct-account case on SQLite, repeated in one process: `TASKS`
//! tasks run `COMMANDS` commands in all per round on accounts of their own
//! (10 commands per account, as in the bench), `ROUNDS` rounds, each on
//! fresh accounts. Prints each round's commands/s with the median time to
//! the decision (the load) and from it to the answer (the append, group
//! commit included), then the median round: a steadier figure than the
//! bench's single pass, and a loop to profile.
//!
//! `w5_rounds [ROUNDS] [TASKS] [COMMANDS] [execute|append]` (defaults: 10,
//! 8, 8000, execute). `execute` runs W1's command through
//! `Repository::execute` (load, `deposit(100)`, append with the loaded
//! version), as W5 does. `append` leaves the load out: each task appends
//! the `Deposited` event with the version it counts itself, so the round
//! measures what the writer thread alone can commit for that many tasks,
//! the ceiling of `execute`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use annals::bank::Account;
use annals::{CommandContext, EventStore, ExpectedVersion, NewEvent, Repository, StreamVersion};
use anyhow::{bail, Context};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const COMMANDS_PER_ACCOUNT: u64 = 10;

type Repo = Repository<Account, annals_sqlite::SqliteEventStore>;

/// One command on account `id`, the `k`-th of a task that takes its
/// `accounts` accounts in turn: the time to the decision and from it to the
/// answer, in nanoseconds (`append`: all of it is the answer).
async fn command(
    repo: &Repo,
    ctx: &CommandContext,
    id: &str,
    append_only: bool,
    k: u64,
    accounts: u64,
) -> anyhow::Result<(u64, u64)> {
    let started = Instant::now();
    if append_only {
        let stream = Repo::stream_id(id)?;
        // Opened at version 1, then one deposit per turn on this account.
        let version = StreamVersion(1 + k / accounts);
        let event = NewEvent::new("Deposited", serde_json::json!({ "amount": 100 }));
        repo.store()
            .append(&stream, ExpectedVersion::Exact(version), vec![event])
            .await
            .with_context(|| format!("appending to {stream}"))?;
        return Ok((0, started.elapsed().as_nanos() as u64));
    }
    let decided = AtomicU64::new(0);
    repo.execute(id, ctx, |a| {
        decided.store(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        a.deposit(100)
    })
    .await
    .with_context(|| format!("deposit on {id}"))?;
    let load = decided.load(Ordering::Relaxed);
    Ok((
        load,
        (started.elapsed().as_nanos() as u64).saturating_sub(load),
    ))
}

fn micros(sorted: &[u64], percent: usize) -> f64 {
    sorted[(sorted.len() * percent / 100).min(sorted.len() - 1)] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map_or(Ok(10), |a| a.parse())?;
    let tasks: u64 = args.next().map_or(Ok(8), |a| a.parse())?;
    let commands: u64 = args.next().map_or(Ok(8000), |a| a.parse())?;
    let append_only = match args.next().as_deref() {
        None | Some("execute") => false,
        Some("append") => true,
        Some(other) => bail!("unknown mode {other:?}: execute or append"),
    };
    if rounds == 0 || tasks == 0 || commands < tasks {
        bail!("ROUNDS and TASKS must be at least 1, COMMANDS at least TASKS");
    }
    let dir = tempfile::tempdir()?;
    let store = annals_sqlite::SqliteEventStore::open(dir.path().join("w5.db")).await?;
    let repo: Repo = Repository::new(store);
    let per_task = commands / tasks;
    let accounts = per_task.div_ceil(COMMANDS_PER_ACCOUNT).max(1);
    let mut rates = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let ids: Arc<Vec<String>> = Arc::new(
            (0..tasks * accounts)
                .map(|i| format!("r{round}-{i}"))
                .collect(),
        );
        let ctx = CommandContext::new();
        for (i, id) in ids.iter().enumerate() {
            repo.create(id, &ctx, |a| a.open(&format!("owner {i}")))
                .await
                .with_context(|| format!("opening {id}"))?;
        }
        let t0 = Instant::now();
        let mut handles = Vec::new();
        for t in 0..tasks {
            let (repo, ids) = (repo.clone(), ids.clone());
            handles.push(tokio::spawn(async move {
                let ctx = CommandContext::new();
                let mut phases = Vec::with_capacity(per_task as usize);
                for k in 0..per_task {
                    let id = &ids[(t * accounts + k % accounts) as usize];
                    phases.push(command(&repo, &ctx, id, append_only, k, accounts).await?);
                }
                anyhow::Ok(phases)
            }));
        }
        let (mut loads, mut saves) = (Vec::new(), Vec::new());
        for h in handles {
            for (load, save) in h.await?? {
                loads.push(load);
                saves.push(save);
            }
        }
        let rate = (per_task * tasks) as f64 / t0.elapsed().as_secs_f64();
        loads.sort_unstable();
        saves.sort_unstable();
        println!(
            "round {round}: {rate:.0} commands/s; to the decision median {:.0} µs, p90 {:.0}; \
             decision to answer median {:.0} µs, p90 {:.0}",
            micros(&loads, 50),
            micros(&loads, 90),
            micros(&saves, 50),
            micros(&saves, 90)
        );
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    println!("median: {:.0} commands/s", rates[rates.len() / 2]);
    Ok(())
}
