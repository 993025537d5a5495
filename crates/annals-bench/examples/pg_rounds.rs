//! The `account_balances` rebuild (or W4 through a `Subscription`) on
//! PostgreSQL, `ROUNDS` times over the same 121,000 events (w4_rounds's
//! accounts, in a fresh schema dropped at the end), with the median
//! events/s: a loop to profile the server and the client together
//! (`perf record -a`).
//!
//! `pg_rounds [ROUNDS] [rebuild|w4] [URL]` (defaults: 10 rounds, rebuild,
//! `postgres://postgres@127.0.0.1:5432/test`).

use std::time::Instant;

use annals::{ProjectionRunner, RebuildOptions};
use annals_postgres::{PgEventStore, PgOptions};

// The SQLite store and the memory lines are the other examples'.
#[allow(dead_code)]
#[path = "common/w4_store.rs"]
mod w4;
use w4::{
    annals_w4, check_balances, print_rates, write_accounts, ACCOUNTS, BALANCE, EVENTS_PER_ACCOUNT,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map_or(Ok(10), |a| a.parse())?;
    let w4 = match args.next().as_deref() {
        None | Some("rebuild") => false,
        Some("w4") => true,
        Some(other) => anyhow::bail!("unknown mode {other:?}: rebuild or w4"),
    };
    let url = args
        .next()
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("annals_rounds_{}", uuid::Uuid::now_v7().simple());
    let result = run(&url, &schema, rounds, w4).await;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    let task = tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await?;
    drop(client);
    let _ = task.await;
    result
}

async fn run(url: &str, schema: &str, rounds: usize, w4: bool) -> anyhow::Result<()> {
    let store = PgEventStore::connect_with(
        url,
        PgOptions {
            schema: Some(schema.to_owned()),
            // As the bench's store: one query per W4 page of 1,000.
            batch_size: 1_000,
            ..PgOptions::default()
        },
    )
    .await?;
    store.migrate().await?;
    write_accounts(&store).await?;
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!("ANALYZE \"{schema}\".events"))
        .await?;
    let db = annals_cli::ReadModelDb {
        store: annals_cli::AnyStore::Postgres(store.clone()),
        url: url.to_owned(),
        pg_schema: Some(schema.to_owned()),
        key_file: None,
    };
    annals_cli::account_balances(&db, "Account-").await?;
    let mut rates = Vec::new();
    if w4 {
        for _ in 0..rounds {
            let t = Instant::now();
            let (events, sum) = annals_w4(&store).await?;
            rates.push(events as f64 / t.elapsed().as_secs_f64());
            anyhow::ensure!(
                (events, sum) == (ACCOUNTS * EVENTS_PER_ACCOUNT, ACCOUNTS as i64 * BALANCE),
                "W4 read {events} events summing to {sum}"
            );
        }
    }
    for _ in 0..if w4 { 0 } else { rounds } {
        client
            .batch_execute(&format!("DELETE FROM \"{schema}\".account_balances"))
            .await?;
        let runner = ProjectionRunner::new(
            store.clone(),
            store.transactional(annals_cli::AccountBalances),
        );
        let options = RebuildOptions {
            from_start: true,
            ..RebuildOptions::default()
        };
        let t = Instant::now();
        runner.rebuild(options, |_| {}).await?;
        rates.push((ACCOUNTS * EVENTS_PER_ACCOUNT) as f64 / t.elapsed().as_secs_f64());
        check_balances(&db).await?;
    }
    print_rates(if w4 { "W4" } else { "rebuild" }, rates);
    Ok(())
}
