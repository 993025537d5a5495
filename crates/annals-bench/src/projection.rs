//! Projection figures (`docs/benchmarks.md`, "Projections"): the rebuild of
//! the demo's `account_balances` read model from W4's events, as a ratio to
//! the read rate of the same run, and the delay from an append to the
//! moment the live projection has handled it while W1's commands run.

use std::time::{Duration, Instant};

use annals::bank::Account;
use annals::{
    BatchApplier, CommandContext, EventStore, GlobalPosition, ProjectionControl, ProjectionRunner,
    RebuildOptions, Repository,
};
use annals_cli::ReadModelDb;
use anyhow::{ensure, Context};
use serde_json::{json, Value};

use crate::workload::{account_id, owner, Latencies, Sizes, Throughput};

/// What the projection runs measured.
#[derive(Clone, Debug, Default)]
pub struct ProjectionFigures {
    /// The rebuild from position 0 up to the head (W4's events).
    pub rebuild: Throughput,
    /// Events per rebuild batch (and checkpoint).
    pub batch: u64,
    /// Append-to-handled delays, one per command.
    pub delay: Latencies,
    /// Commands of the delay run.
    pub commands: u64,
    /// Their rate (the writer's, with the projection following).
    pub commands_per_sec: f64,
}

/// Rebuilds `account_balances` on the main store right after W4 (its table
/// created first, untimed, and verified after, untimed), then runs
/// `delay_accounts` new accounts through W1's deposit rounds with the live
/// runner following. `runner` makes a runner of the projection on `store`.
pub async fn run<S, A>(
    store: &S,
    db: &ReadModelDb,
    sz: &Sizes,
    delay_accounts: u64,
    runner: impl Fn() -> ProjectionRunner<S, A>,
) -> anyhow::Result<ProjectionFigures>
where
    S: EventStore + ProjectionControl,
    A: BatchApplier,
{
    // Creates the table; there are no rows yet.
    let rows = annals_cli::account_balances(db, "Account-").await?;
    ensure!(
        rows.is_empty(),
        "account_balances is not empty before the rebuild"
    );
    let (events, accounts, sum) = sz.expected_totals();
    // The rebuild as `annals projections rebuild` and the library run it:
    // the default pages and batches (W4's page size is the raw read's, a
    // cost of the read alone, not of a batch's transaction).
    let options = RebuildOptions {
        from_start: true,
        ..RebuildOptions::default()
    };
    let t = Instant::now();
    runner()
        .rebuild(options, |_| {})
        .await
        .context("rebuilding account_balances")?;
    let rebuild = Throughput {
        events,
        seconds: t.elapsed().as_secs_f64(),
    };
    let rows = annals_cli::account_balances(db, "Account-").await?;
    let got: i64 = rows.iter().map(|r| r.balance).sum();
    ensure!(
        (rows.len() as u64, got) == (accounts, sum),
        "account_balances after the rebuild: {} rows summing to {got}, expected {accounts} and {sum}",
        rows.len()
    );

    // The delay: the live runner follows while one writer runs W1's
    // commands on accounts of their own.
    let head = store
        .head_position()
        .await?
        .unwrap_or(GlobalPosition::START);
    let handle = runner().spawn();
    handle
        .wait_for(head, Duration::from_secs(600))
        .await
        .context("the live runner did not reach the head")?;
    let ctx = CommandContext::new();
    let repo = Repository::<Account, _>::new(store.clone());
    let ids: Vec<String> = (1..=delay_accounts)
        .map(|i| account_id(&owner("w1d", i)))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let o = owner("w1d", i as u64 + 1);
        repo.create(id, &ctx, |a| a.open(&o)).await?;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(GlobalPosition, Instant)>();
    let writer = async {
        let t = Instant::now();
        for _ in 0..sz.deposits {
            for id in &ids {
                let done = repo.execute(id, &ctx, |a| a.deposit(100)).await?;
                let at = Instant::now();
                let position = done
                    .append
                    .as_ref()
                    .and_then(|a| a.positions.last().copied())
                    .context("a deposit appended nothing")?;
                // The watcher ends when the channel closes.
                let _ = tx.send((position, at));
            }
        }
        drop(tx);
        Ok::<_, anyhow::Error>(t.elapsed().as_secs_f64())
    };
    let watcher = async {
        let mut delays = Vec::new();
        while let Some((position, at)) = rx.recv().await {
            handle
                .wait_for(position, Duration::from_secs(600))
                .await
                .context("the live runner fell behind")?;
            delays.push(at.elapsed());
        }
        Ok::<_, anyhow::Error>(delays)
    };
    let (seconds, delays) = tokio::try_join!(writer, watcher)?;
    handle.stop().await.context("stopping account_balances")?;
    let commands = sz.deposits * delay_accounts;
    ensure!(delays.len() as u64 == commands, "a delay per command");
    let rows = annals_cli::account_balances(db, "Account-").await?;
    ensure!(
        rows.len() as u64 == accounts + delay_accounts,
        "account_balances after the delay run: {} rows",
        rows.len()
    );
    Ok(ProjectionFigures {
        rebuild,
        batch: options.checkpoint_every as u64,
        delay: Latencies(delays),
        commands,
        commands_per_sec: commands as f64 / seconds.max(1e-9),
    })
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn ratio(a: f64, b: f64) -> Value {
    if b > 0.0 {
        json!(round(a / b))
    } else {
        Value::Null
    }
}

impl ProjectionFigures {
    /// The `projection` object of the result line: the rebuild's rate as
    /// ratios to W4 (Annals) and to the raw SQL W4 of the same run.
    pub fn to_json(&self, w4: &Throughput, raw_w4: Option<&Throughput>) -> Value {
        let r = self.rebuild.events_per_sec();
        let mut v = json!({
            "rebuild_events": self.rebuild.events,
            "rebuild_batch": self.batch,
            "rebuild_seconds": round(self.rebuild.seconds),
            "rebuild_events_per_sec": round(r),
            "rebuild_ratio_to_w4": ratio(r, w4.events_per_sec()),
            "delay_commands": self.commands,
            "delay_commands_per_sec": round(self.commands_per_sec),
            "append_to_handled": self.delay.to_json(),
        });
        if let Some(raw) = raw_w4 {
            v["rebuild_ratio_to_raw_w4"] = ratio(r, raw.events_per_sec());
        }
        v
    }
}
