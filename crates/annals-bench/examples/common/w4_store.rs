//! The store of `w4_rounds`, `rebuild_rounds` and `pg_rounds`: 1,210
//! accounts of 100 events each (121,000 events, W4's count, in W3's stream
//! pattern), written into a fresh SQLite file with the default options, as
//! the bench's store (or into a PostgreSQL schema).

use std::collections::HashMap;
use std::path::Path;

use annals::bank::{Account, AccountEvent};
use annals::{
    decode_event, CommandContext, EventStore, GlobalPosition, Repository, Subscription,
    SubscriptionOptions,
};
use annals_sqlite::{SqliteEventStore, SqliteOptions};

/// The bench's shared shapes (each example uses some of them).
#[allow(dead_code)]
#[path = "../../src/shapes.rs"]
pub mod shapes;

/// Accounts in the store.
pub const ACCOUNTS: u64 = 1_210;
/// Events per account.
pub const EVENTS_PER_ACCOUNT: u64 = 100;
/// Each account's balance at the end of its stream.
pub const BALANCE: i64 = 8_550;

/// W4's page (the bench's feed page).
pub const PAGE: usize = 1_000;

/// W4 through a catch-up `Subscription` in pages of [`PAGE`], each event
/// decoded and folded into its account's balance: the events and the sum of
/// the balances.
pub async fn annals_w4<S: EventStore>(store: &S) -> anyhow::Result<(u64, i64)> {
    let head = store
        .head_position()
        .await?
        .unwrap_or(GlobalPosition::START);
    let options = SubscriptionOptions::default().batch_size(PAGE);
    let mut feed = Subscription::new(store.clone(), GlobalPosition::START, options);
    let mut balances: HashMap<String, i64> = HashMap::new();
    let mut events = 0;
    loop {
        let batch = feed.next_batch().await?;
        events += batch.events.len() as u64;
        for e in &batch.events {
            let b = balances.entry(e.stream_id.id().to_owned()).or_default();
            shapes::fold_balance(b, &decode_event::<AccountEvent>(e)?);
        }
        if batch.position >= head {
            break;
        }
    }
    Ok((events, balances.values().sum()))
}

/// Opens `path` (a new file) and writes the accounts, one commit each.
pub async fn w4_store(path: &Path) -> anyhow::Result<SqliteEventStore> {
    let store = SqliteEventStore::open_with(path, SqliteOptions::default()).await?;
    write_accounts(&store).await?;
    Ok(store)
}

/// Writes the accounts into `store`, one commit each.
pub async fn write_accounts<S: EventStore>(store: &S) -> anyhow::Result<()> {
    let repo = Repository::<Account, _>::new(store.clone());
    let ctx = CommandContext::new();
    for i in 0..ACCOUNTS {
        let owner = format!("w4-{i:06}");
        let batch: Vec<AccountEvent> = (1..=EVENTS_PER_ACCOUNT)
            .map(|k| shapes::pattern_event(&owner, k))
            .collect();
        let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, owner.as_bytes()).to_string();
        repo.create(&id, &ctx, |_| Ok::<_, std::convert::Infallible>(batch))
            .await?;
    }
    Ok(())
}

/// The lines of `/proc/self/status` that start with one of `prefixes` (the
/// process's memory: `VmHWM`, `VmRSS`, `Rss…`); none where it cannot be read.
pub fn memory_lines(prefixes: &[&str]) -> Vec<String> {
    std::fs::read_to_string("/proc/self/status")
        .map(|status| {
            status
                .lines()
                .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Checks the `account_balances` rows of `db` after a rebuild: one per
/// account, summing to every account's balance.
pub async fn check_balances(db: &annals_cli::ReadModelDb) -> anyhow::Result<()> {
    let rows = annals_cli::account_balances(db, "Account-").await?;
    let sum: i64 = rows.iter().map(|r| r.balance).sum();
    anyhow::ensure!(
        (rows.len() as u64, sum) == (ACCOUNTS, ACCOUNTS as i64 * BALANCE),
        "{} rows summing to {sum}",
        rows.len()
    );
    Ok(())
}

/// Prints `label events/s:` with each round's rate, then their median.
pub fn print_rates(label: &str, mut rates: Vec<f64>) {
    println!(
        "{label} events/s: {}",
        rates
            .iter()
            .map(|x| format!("{:.0}k", x / 1e3))
            .collect::<Vec<_>>()
            .join(" ")
    );
    rates.sort_by(f64::total_cmp);
    if let Some(median) = rates.get(rates.len() / 2) {
        println!("median {:.0}k", median / 1e3);
    }
}
