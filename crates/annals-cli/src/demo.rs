//! `annals demo`: the bank example, end to end, on a real store.
//!
//! Everything goes through [`Repository::execute`], so the run shows the
//! whole write path: commands checked by the aggregate (an overdraft is
//! refused by `Account::withdraw`, not by the demo), appends with an exact
//! expected version, and snapshots every 10 events. The choices are a small
//! LCG over `--seed`, so a run is reproducible without a `rand` dependency.
//!
//! Then it runs the demo's projection, [`AccountBalances`] (the table
//! `account_balances`, exactly-once in the same database), until it has
//! applied the last event, prints the balances from the table, and checks
//! that each row equals the account's fold.
//!
//! Each run opens fresh accounts `Account-demo<RUN>-<i>`, with `RUN` one more
//! than the highest run already in the store, so running the demo twice on
//! the same database never collides and each run checks only its own totals.
//!
//! Personal data: each `Opened` carries the owner's name and e-mail,
//! encrypted with the account's data key (`annals::gdpr`), and so are the
//! account snapshots; the projection reads them decrypted. The master key
//! is `ANNALS_MASTER_KEY` or the key file (`--key-file`, by default beside
//! the SQLite database); when neither exists the demo generates the key
//! file (mode 0600) and says so. On PostgreSQL without either it refuses.

use std::io::Write;

use annals::bank::{personal_snapshots, Account, AccountError};
use annals::{
    CommandContext, CommandError, EventStore, GdprStore, Repository, SnapshotConfig, StreamCatalog,
    StreamVersion,
};
use anyhow::{bail, Context};
use futures::TryStreamExt;
use serde::Serialize;

use crate::cli::DemoArgs;
use crate::keys::KeySource;
use crate::output::{json_line, Table};
use crate::{AccountBalances, AnyStore, Outcome, ProjectionOps, ReadModelDb};

/// How long the demo waits for its projection to catch up.
const PROJECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Owners cycled through by the opened accounts.
const OWNERS: &[&str] = &[
    "ann", "bob", "cleo", "dev", "eve", "finn", "gus", "hana", "ivo", "jo",
];

/// Accounts listed in the text output; beyond this only totals are shown.
const LISTED_ACCOUNTS: usize = 50;

/// Operations from which a progress bar is worth drawing (on a terminal).
const PROGRESS_FROM: u64 = 1000;

/// Knuth's MMIX LCG; the high bits are the usable ones.
struct Lcg(u64);

impl Lcg {
    fn new(seed: u64) -> Self {
        let mut lcg = Lcg(seed ^ 0x9E37_79B9_7F4A_7C15);
        lcg.next();
        lcg
    }

    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Serialize)]
struct Balance {
    stream_id: String,
    owner: String,
    balance: i64,
    version: u64,
    /// The balance in the `account_balances` table (none: no row).
    projected_balance: Option<i64>,
}

#[derive(Serialize, Default)]
struct Summary {
    run: u64,
    seed: u64,
    /// The master key file the run generated (none: a key was configured).
    generated_key_file: Option<String>,
    accounts: u64,
    operations: u64,
    deposits: u64,
    deposited: i64,
    withdrawals: u64,
    withdrawn: i64,
    refused: u64,
    events_written: u64,
    total_balance: i64,
    /// Every account's row in `account_balances` equals its fold.
    projection_matches: bool,
    check_passed: bool,
    balances: Vec<Balance>,
}

/// The next free run number: one more than the highest `demo<N>-…` account.
async fn next_run(store: &AnyStore) -> anyhow::Result<u64> {
    let streams: Vec<_> = store
        .list_streams(<Account as annals::Aggregate>::TYPE)
        .try_collect()
        .await
        .context("listing existing demo accounts")?;
    let last = streams
        .iter()
        .filter_map(|s| {
            let rest = s.stream_id.id().strip_prefix("demo")?;
            rest.split_once('-')?.0.parse::<u64>().ok()
        })
        .max()
        .unwrap_or(0);
    Ok(last + 1)
}

pub(crate) async fn run(
    db: &ReadModelDb,
    keys: &KeySource,
    location: &str,
    args: &DemoArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<Outcome> {
    let store = &db.store;
    let generated_key_file = ensure_master_key(keys)?;
    let crypto = keys.crypto(store);
    crypto
        .check_master_key()
        .context("the demo encrypts personal data")?;
    let repo = Repository::<Account, _>::new(GdprStore::new(store.raw(), crypto.clone()))
        .with_snapshots(
            personal_snapshots(store.raw(), crypto),
            SnapshotConfig::every(10),
        );
    let ctx = CommandContext::new()
        .with_correlation_id(uuid::Uuid::now_v7())
        .with_header("source", "annals demo".into());
    let run = next_run(store).await?;
    let mut rng = Lcg::new(args.seed);
    let width = args.accounts.to_string().len();
    let ids: Vec<String> = (1..=args.accounts)
        .map(|i| format!("demo{run}-{i:0width$}"))
        .collect();

    let mut s = Summary {
        run,
        seed: args.seed,
        generated_key_file,
        accounts: ids.len() as u64,
        operations: args.operations,
        ..Summary::default()
    };

    for (i, id) in ids.iter().enumerate() {
        let owner = OWNERS[i % OWNERS.len()];
        let email = format!("{owner}.{id}@mail.example");
        repo.execute(id, &ctx, |a| a.open_for(id, owner, &email))
            .await
            .with_context(|| format!("opening account {id}"))?;
    }

    let progress = if args.operations >= PROGRESS_FROM {
        let bar = indicatif::ProgressBar::new(args.operations);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} operations ({per_sec})")
        {
            bar.set_style(style);
        }
        Some(bar)
    } else {
        None
    };
    for _ in 0..args.operations {
        let id = &ids[rng.below(ids.len() as u64) as usize];
        let deposit = rng.below(100) < 55;
        // Withdrawals ask for more on average, so some are refused.
        let amount = 1 + rng.below(if deposit { 500 } else { 800 }) as i64;
        let result = if deposit {
            repo.execute(id, &ctx, |a| a.deposit(amount)).await
        } else {
            repo.execute(id, &ctx, |a| a.withdraw(amount)).await
        };
        match result {
            Ok(_) if deposit => {
                s.deposits += 1;
                s.deposited += amount;
            }
            Ok(_) => {
                s.withdrawals += 1;
                s.withdrawn += amount;
            }
            Err(CommandError::Rejected(AccountError::InsufficientFunds { .. })) => s.refused += 1,
            Err(CommandError::Rejected(e)) => bail!("account {id} refused an operation: {e}"),
            Err(CommandError::Store(e)) => {
                return Err(anyhow::Error::new(e).context(format!("operation on account {id}")))
            }
        }
        if let Some(bar) = &progress {
            bar.inc(1);
        }
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }

    // The check reads everything back by full replay, so it tests the store
    // and not the numbers this process kept.
    let mut all_non_negative = true;
    for id in &ids {
        let loaded = repo
            .load_without_snapshot(id)
            .await
            .with_context(|| format!("reloading account {id}"))?;
        let version = loaded.version.map_or(0, StreamVersion::get);
        s.total_balance += loaded.state.balance;
        s.events_written += version;
        all_non_negative &= loaded.state.balance >= 0;
        s.balances.push(Balance {
            stream_id: format!("{}-{id}", <Account as annals::Aggregate>::TYPE),
            owner: loaded.state.owner,
            balance: loaded.state.balance,
            version,
            projected_balance: None,
        });
    }
    // The read model, caught up with the last event, against the folds.
    let rows = project(db, run).await?;
    s.projection_matches = rows.len() == s.balances.len();
    for b in &mut s.balances {
        let row = rows.iter().find(|r| r.stream_id == b.stream_id);
        b.projected_balance = row.map(|r| r.balance);
        s.projection_matches &= row.is_some_and(|r| r.balance == b.balance && r.owner == b.owner);
    }
    s.check_passed = s.projection_matches
        && all_non_negative
        && s.total_balance == s.deposited - s.withdrawn
        && s.events_written == s.accounts + s.deposits + s.withdrawals;

    if args.json {
        if let Some(file) = &s.generated_key_file {
            crate::output::note(&format!(
                "no master key was configured: generated one into {file} (mode 0600)"
            ));
        }
        json_line(out, &s)?;
    } else {
        print_text(out, location, &s)?;
    }
    Ok(if s.check_passed {
        Outcome::Success
    } else {
        Outcome::CheckFailed(format!(
            "demo check failed: account_balances {} the folds; total balance {} but deposits {} - withdrawals {} = {}, {} events stored for {} expected",
            if s.projection_matches { "matches" } else { "does not match" },
            s.total_balance,
            s.deposited,
            s.withdrawn,
            s.deposited - s.withdrawn,
            s.events_written,
            s.accounts + s.deposits + s.withdrawals
        ))
    })
}

/// Generates the key file when no master key is configured (variable unset,
/// file missing) and there is a file to write; returns its path.
fn ensure_master_key(keys: &KeySource) -> anyhow::Result<Option<String>> {
    let KeySource::EnvOrFile(provider) = keys else {
        return Ok(None);
    };
    if provider.is_configured() {
        return Ok(None);
    }
    provider.generate_file().with_context(|| {
        format!(
            "cannot write the master key file {}",
            provider.file().display()
        )
    })?;
    Ok(Some(provider.file().display().to_string()))
}

/// Runs [`AccountBalances`] until it has applied the head, and reads this
/// run's rows.
async fn project(db: &ReadModelDb, run: u64) -> anyhow::Result<Vec<crate::BalanceRow>> {
    let head = db
        .store
        .head_position()
        .await
        .context("cannot read the head position")?;
    let runner = AccountBalances
        .start(db, annals::RunnerOptions::default())
        .await
        .context("cannot start the account_balances projection")?;
    let reached = match head {
        Some(head) => runner.wait_for(head, PROJECTION_TIMEOUT).await,
        None => Ok(()),
    };
    let stopped = runner.stop().await;
    reached
        .and(stopped)
        .context("the account_balances projection did not catch up")?;
    let prefix = format!("{}-demo{run}-", <Account as annals::Aggregate>::TYPE);
    crate::account_balances(db, &prefix)
        .await
        .context("cannot read account_balances")
}

fn print_text(out: &mut (dyn Write + Send), location: &str, s: &Summary) -> std::io::Result<()> {
    writeln!(
        out,
        "Annals demo run {} (seed {}) on {location}",
        s.run, s.seed
    )?;
    if let Some(file) = &s.generated_key_file {
        writeln!(
            out,
            "master key:       none was configured: generated one into {file} (mode 0600); \
             keep it safe, without it the owners' names and e-mails cannot be read"
        )?;
    }
    writeln!(out, "accounts opened:  {}", s.accounts)?;
    writeln!(out, "operations:       {}", s.operations)?;
    writeln!(
        out,
        "deposits:         {} (total {})",
        s.deposits, s.deposited
    )?;
    writeln!(
        out,
        "withdrawals:      {} (total {})",
        s.withdrawals, s.withdrawn
    )?;
    writeln!(out, "refused:          {} (insufficient funds)", s.refused)?;
    writeln!(out)?;
    let mut table = Table::new(&["ACCOUNT", "OWNER", "BALANCE", "VERSION", "PROJECTED"])
        .right_align(&[2, 3, 4]);
    for b in s.balances.iter().take(LISTED_ACCOUNTS) {
        table.push(
            out,
            vec![
                b.stream_id.clone(),
                b.owner.clone(),
                b.balance.to_string(),
                b.version.to_string(),
                b.projected_balance
                    .map_or_else(|| "-".to_owned(), |p| p.to_string()),
            ],
        )?;
    }
    table.finish(out)?;
    if s.balances.len() > LISTED_ACCOUNTS {
        writeln!(
            out,
            "… and {} more accounts",
            s.balances.len() - LISTED_ACCOUNTS
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "total balance:    {} = deposits {} - withdrawals {}: {}",
        s.total_balance,
        s.deposited,
        s.withdrawn,
        if s.check_passed { "ok" } else { "MISMATCH" }
    )?;
    writeln!(
        out,
        "events written:   {} ({} opened, {} deposited, {} withdrew)",
        s.events_written, s.accounts, s.deposits, s.withdrawals
    )?;
    writeln!(
        out,
        "account_balances: {} (the projection's table against each account's fold)",
        if s.projection_matches {
            "ok"
        } else {
            "MISMATCH"
        }
    )?;
    if let Some(first) = s.balances.first() {
        let id = first
            .stream_id
            .split_once('-')
            .map_or(first.stream_id.as_str(), |(_, id)| id);
        writeln!(out)?;
        writeln!(
            out,
            "next: annals read {} | annals aggregate Account {id} | annals stats",
            first.stream_id
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Lcg;

    #[test]
    fn lcg_is_deterministic_and_in_range() {
        let a: Vec<u64> = {
            let mut r = Lcg::new(7);
            (0..100).map(|_| r.below(10)).collect()
        };
        let b: Vec<u64> = {
            let mut r = Lcg::new(7);
            (0..100).map(|_| r.below(10)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().all(|&x| x < 10));
        // Not stuck on one value.
        assert!(a.iter().any(|&x| x != a[0]));
    }
}
