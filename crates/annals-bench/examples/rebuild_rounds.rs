//! The `account_balances` rebuild on SQLite, `ROUNDS` times on the same
//! file (the table emptied before each), with the median events/s: a loop
//! to profile. The store is w4_rounds's (121,000 events).
//!
//! `rebuild_rounds [ROUNDS]` (default 10; `PAGE=N` in the environment sets
//! `RebuildOptions::batch_size`, the events per page read). Each round's
//! start and end go to stderr as monotonic instants (`perf record -k mono`,
//! then `perf report --time` on one round), with the process's resident
//! memory after it.

use std::time::Instant;

use annals::{ProjectionRunner, RebuildOptions};

// W4's loop is w4_rounds's and pg_rounds's.
#[allow(dead_code)]
#[path = "common/w4_store.rs"]
mod w4;
use w4::{check_balances, memory_lines, print_rates, w4_store, ACCOUNTS, EVENTS_PER_ACCOUNT};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map_or(Ok(10), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("rb.db");
    let store = w4_store(&path).await?;
    let db = annals_cli::ReadModelDb {
        store: annals_cli::AnyStore::Sqlite(store.clone()),
        url: format!("sqlite://{}", path.display()),
        pg_schema: None,
        key_file: None,
    };
    annals_cli::account_balances(&db, "Account-").await?;
    let conn = rusqlite::Connection::open(&path)?;
    for line in memory_lines(&["VmHWM", "VmRSS"]) {
        eprintln!("setup {line}");
    }
    let mut rates = Vec::new();
    for _ in 0..rounds {
        conn.execute("DELETE FROM account_balances", [])?;
        let runner = ProjectionRunner::new(
            store.clone(),
            store.transactional(annals_cli::AccountBalances),
        );
        let mut options = RebuildOptions {
            from_start: true,
            ..RebuildOptions::default()
        };
        if let Ok(page) = std::env::var("PAGE") {
            options.batch_size = page.parse()?;
        }
        let t = Instant::now();
        eprintln!("round start {t:?}");
        runner.rebuild(options, |_| {}).await?;
        eprintln!("round end {:?}", Instant::now());
        for line in memory_lines(&["VmHWM", "VmRSS"]) {
            eprintln!("{line}");
        }
        rates.push((ACCOUNTS * EVENTS_PER_ACCOUNT) as f64 / t.elapsed().as_secs_f64());
        check_balances(&db).await?;
    }
    print_rates("rebuild", rates);
    Ok(())
}
