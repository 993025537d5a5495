//! `annals-bench`: the standard workload of `docs/benchmarks.md` (W1
//! command append, W2 long-stream load, W3 bulk append, W3m multi-stream
//! commits, W4 replay, W5 concurrent commands, then the export and import
//! rates, W4 through upcasters, the `account_balances` rebuild and the
//! append-to-handled delay, and W1 with encryption) on Annals and, in the
//! same run and on the same
//! schema, with plain SQL (the raw baseline). Prints one JSON result line
//! per backend with `raw` figures and `ratio_to_raw`.
//!
//! `ratio_to_raw` is always "higher is better, 1.0 = as fast as raw SQL":
//! throughput(annals) / throughput(raw) for W1, W3, W3m, W4 and W5, and
//! median_ms(raw) / median_ms(annals) for the W2 loads.
//!
//! `--scale N` runs instead the growth comparison of `scale.rs`: W1, W2
//! and W4 on a store of N events as ratios to the same workloads on the
//! default store, one `scale` line per backend.
#![forbid(unsafe_code)]

/// The process's allocator, for raw SQL and Annals alike: mimalloc, whose
/// small allocations cost fewer instructions than the system's (jaq, which
/// runs plan files, allocates on every step of a filter).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod gdpr;
mod multi;
mod projection;
mod raw_pg;
mod raw_sqlite;
mod scale;
mod shapes;
mod transfer;
mod upcast;
mod w5;
mod workload;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use serde_json::{json, Value};

use workload::{Results, Sizes};

/// Command-line options; sizes default to those of `docs/benchmarks.md`.
#[derive(Parser, Debug)]
#[command(
    name = "annals-bench",
    about = "Runs the standard workload W1-W5 (docs/benchmarks.md) on Annals and raw SQL"
)]
struct Args {
    /// Backend(s) to run.
    #[arg(long, default_value = "all", value_parser = ["sqlite", "postgres", "all"])]
    backend: String,
    /// PostgreSQL URL (a fresh schema is created and dropped per run).
    #[arg(
        long,
        env = "ANNALS_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
    /// Skip the raw SQL baseline.
    #[arg(long)]
    no_raw: bool,
    /// Directory for the SQLite files (default: a fresh temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Instead of the standard run: load N events in W3's shape and report
    /// W1, W2 and W4 as ratios to the same workloads on the default store of
    /// --bulk-events events, measured in the same run (docs/benchmarks.md,
    /// "Cost as the store grows"). No raw baseline, W3m or W5.
    #[arg(long, value_name = "N")]
    scale: Option<u64>,
    /// Events per import batch of the export/import rates.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    transfer_batch: u64,
    /// Skip the export and import rates.
    #[arg(long)]
    no_transfer: bool,
    /// Skip W4 through upcasters (the v1 copy of W4's data set).
    #[arg(long)]
    no_upcast: bool,
    /// Skip the account_balances rebuild and the append-to-handled delay.
    #[arg(long)]
    no_projection: bool,
    /// Accounts of the delay run (D deposit rounds each, as W1).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    delay_accounts: u64,
    /// Skip W1 with personal-data encryption.
    #[arg(long)]
    no_gdpr: bool,
    /// Accounts per side of the encryption runs (D deposit rounds each).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    gdpr_accounts: u64,
    #[command(flatten)]
    sizes: Sizes,
    #[command(flatten)]
    w5: w5::W5Args,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let backends: Vec<&str> = match args.backend.as_str() {
        "all" => vec!["sqlite", "postgres"],
        b => vec![b],
    };
    if let Some(n) = args.scale {
        scale::check(n, &args.sizes)?;
        for backend in backends {
            let line = run_scale(&args, backend, n).await?;
            println!("{}", serde_json::to_string(&line)?);
        }
        return Ok(());
    }
    for backend in backends {
        let started = std::time::Instant::now();
        let (mut annals, mut raw) = match backend {
            "sqlite" => run_sqlite(&args).await?,
            _ => run_postgres(&args).await?,
        };
        let w3m = multi::run(
            backend,
            args.dir.as_deref(),
            &args.database_url,
            args.no_raw,
            &args.sizes,
        )
        .await?;
        // W5 after W4 and W3m, on fresh stores of its own.
        if !args.w5.no_w5 {
            let (a, r) = match backend {
                "sqlite" => w5::run_sqlite(args.dir.as_deref(), &args.w5, args.no_raw).await?,
                _ => w5::run_postgres(&args.database_url, &args.w5, args.no_raw).await?,
            };
            annals.w5 = Some(a);
            if let Some(raw) = raw.as_mut() {
                raw.w5 = r;
            }
        }
        let mut line = result_line(
            backend,
            &args.sizes,
            &annals,
            raw.as_ref(),
            started.elapsed().as_secs_f64(),
        );
        w3m.add_to(&mut line);
        println!("{}", serde_json::to_string(&line)?);
    }
    Ok(())
}

async fn run_scale(args: &Args, backend: &str, n: u64) -> anyhow::Result<Value> {
    let started = std::time::Instant::now();
    let (small, large) = match backend {
        "sqlite" => {
            let tmp = tempfile::tempdir()?;
            let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
            std::fs::create_dir_all(&dir)?;
            scale::sqlite(&dir, n, &args.sizes).await?
        }
        _ => scale::postgres(&args.database_url, n, &args.sizes).await?,
    };
    let total = started.elapsed().as_secs_f64();
    Ok(json!({
        "peer": "annals",
        "version": env!("CARGO_PKG_VERSION"),
        "backend": backend,
        "date": chrono::Utc::now().to_rfc3339(),
        "machine": workload::machine(),
        "sizes": args.sizes.to_json(),
        "scale": scale::report(n, &small, &large),
        "total_seconds": (total * 1000.0).round() / 1000.0,
    }))
}

async fn run_sqlite(args: &Args) -> anyhow::Result<(Results, Option<Results>)> {
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let id = uuid::Uuid::now_v7().simple().to_string();
    let annals_path = dir.join(format!("annals-{id}.db"));
    let store = annals_sqlite::SqliteEventStore::open(&annals_path).await?;
    let mut annals = workload::run(store.clone(), &args.sizes, || async { Ok(()) }).await?;
    if !args.no_transfer {
        let target =
            annals_sqlite::SqliteEventStore::open(dir.join(format!("import-{id}.db"))).await?;
        let batch = args.transfer_batch as usize;
        annals.transfer = Some(transfer::run(&store, &target, "sqlite", batch).await?);
    }
    if !args.no_upcast {
        let v1 = annals_sqlite::SqliteEventStore::open(dir.join(format!("v1-{id}.db"))).await?;
        upcast::load_v1(&v1, &args.sizes).await?;
        let with = |s: &annals_sqlite::SqliteEventStore, u| s.clone().with_upcasters(u);
        annals.upcast = Some(upcast::run(&store, &v1, with, &args.sizes).await?);
    }
    if !args.no_projection {
        let db = annals_cli::ReadModelDb {
            store: annals_cli::AnyStore::Sqlite(store.clone()),
            url: format!("sqlite://{}", annals_path.display()),
            pg_schema: None,
            key_file: None,
        };
        let runner = || {
            annals::ProjectionRunner::new(
                store.clone(),
                store.transactional(annals_cli::AccountBalances),
            )
        };
        let figures =
            projection::run(&store, &db, &args.sizes, args.delay_accounts, runner).await?;
        annals.projection = Some(figures);
    }
    if !args.no_gdpr {
        let cost = gdpr::run(&store, args.gdpr_accounts, args.sizes.deposits).await?;
        annals.gdpr = Some(cost);
    }
    let raw = if args.no_raw {
        None
    } else {
        let raw_path = dir.join(format!("raw-{id}.db"));
        let sizes = args.sizes.clone();
        Some(tokio::task::spawn_blocking(move || raw_sqlite::run(&raw_path, &sizes)).await??)
    };
    Ok((annals, raw))
}

async fn run_postgres(args: &Args) -> anyhow::Result<(Results, Option<Results>)> {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let schema = format!("annals_bench_{id}");
    let store = annals_postgres::PgEventStore::connect_with(
        &args.database_url,
        annals_postgres::PgOptions {
            schema: Some(schema.clone()),
            // One query per W4 page.
            batch_size: args.sizes.feed_page as usize,
            group_commit: args.w5.pg_group_commit.map(|k| k as usize),
            ..Default::default()
        },
    )
    .await?;
    store.migrate().await?;
    // PostgreSQL plans W4's keyset query from table statistics; right after
    // W3's 100,000 inserts autovacuum may not have analyzed the table yet,
    // and a stale plan scans and sorts the whole table per page. Both the
    // Annals run and the raw baseline analyze first (untimed), as a server
    // left to itself would shortly do.
    let url = args.database_url.clone();
    let analyze_schema = schema.clone();
    let mut annals = workload::run(store.clone(), &args.sizes, || async move {
        raw_pg::analyze(&url, &analyze_schema).await
    })
    .await;
    if let (Ok(results), false) = (annals.as_mut(), args.no_transfer) {
        let import_schema = format!("annals_import_{id}");
        let measured = pg_transfer(&store, &args.database_url, &import_schema, args).await;
        raw_pg::drop_schema(&args.database_url, &import_schema).await?;
        match measured {
            Ok(t) => results.transfer = Some(t),
            Err(e) => annals = Err(e),
        }
    }
    if let Ok(results) = annals.as_mut() {
        if let Err(e) = pg_costs(&store, &schema, args, results).await {
            annals = Err(e);
        }
    }
    let raw = if args.no_raw || annals.is_err() {
        None
    } else {
        let raw_schema = format!("raw_bench_{id}");
        let r = raw_pg::run(&args.database_url, &raw_schema, &args.sizes).await;
        raw_pg::drop_schema(&args.database_url, &raw_schema).await?;
        Some(r?)
    };
    raw_pg::drop_schema(&args.database_url, &schema).await?;
    Ok((annals?, raw))
}

/// W4 through upcasters (on a v1 copy of W4's data set in a schema of its
/// own, dropped at the end), the `account_balances` rebuild and delay, and
/// W1 with encryption, on the main store after W4.
async fn pg_costs(
    store: &annals_postgres::PgEventStore,
    schema: &str,
    args: &Args,
    results: &mut Results,
) -> anyhow::Result<()> {
    let url = &args.database_url;
    if !args.no_upcast {
        let v1_schema = format!("{schema}_v1");
        let measured = async {
            let v1 = annals_postgres::PgEventStore::connect_with(
                url,
                annals_postgres::PgOptions {
                    schema: Some(v1_schema.clone()),
                    batch_size: args.sizes.feed_page as usize,
                    ..Default::default()
                },
            )
            .await?;
            v1.migrate().await?;
            upcast::load_v1(&v1, &args.sizes).await?;
            raw_pg::analyze(url, &v1_schema).await?;
            let with = |s: &annals_postgres::PgEventStore, u| s.clone().with_upcasters(u);
            upcast::run(store, &v1, with, &args.sizes).await
        }
        .await;
        raw_pg::drop_schema(url, &v1_schema).await?;
        results.upcast = Some(measured?);
    }
    if !args.no_projection {
        let db = annals_cli::ReadModelDb {
            store: annals_cli::AnyStore::Postgres(store.clone()),
            url: url.clone(),
            pg_schema: Some(schema.to_owned()),
            key_file: None,
        };
        let runner = || {
            annals::ProjectionRunner::new(
                store.clone(),
                store.transactional(annals_cli::AccountBalances),
            )
        };
        let figures = projection::run(store, &db, &args.sizes, args.delay_accounts, runner).await?;
        results.projection = Some(figures);
    }
    if !args.no_gdpr {
        let cost = gdpr::run(store, args.gdpr_accounts, args.sizes.deposits).await?;
        results.gdpr = Some(cost);
    }
    Ok(())
}

/// The export of `store` imported into a fresh schema `schema`.
async fn pg_transfer(
    store: &annals_postgres::PgEventStore,
    url: &str,
    schema: &str,
    args: &Args,
) -> anyhow::Result<transfer::Transfer> {
    let target = annals_postgres::PgEventStore::connect_with(
        url,
        annals_postgres::PgOptions {
            schema: Some(schema.to_owned()),
            ..Default::default()
        },
    )
    .await?;
    target.migrate().await?;
    transfer::run(store, &target, "postgres", args.transfer_batch as usize).await
}

fn ratio(a: f64, b: f64) -> Value {
    if b > 0.0 {
        json!((a / b * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

fn result_line(
    backend: &str,
    sizes: &Sizes,
    a: &Results,
    raw: Option<&Results>,
    total: f64,
) -> Value {
    let mut line = json!({
        "peer": "annals",
        "version": env!("CARGO_PKG_VERSION"),
        "backend": backend,
        "date": chrono::Utc::now().to_rfc3339(),
        "machine": workload::machine(),
        "sizes": sizes.to_json(),
        "w1": a.w1_json(),
        "w2": a.w2_json(),
        "w3": a.w3_json(),
        "w4": a.w4_json(),
        "total_seconds": (total * 1000.0).round() / 1000.0,
    });
    if let Some(r) = raw {
        line["raw"] = json!({
            "w1": r.w1_json(),
            "w2": r.w2_json(),
            "w3": r.w3_json(),
            "w4": r.w4_json(),
        });
        line["ratio_to_raw"] = json!({
            "w1": ratio(a.w1.commands_per_sec(), r.w1.commands_per_sec()),
            "w1_open": ratio(a.w1.open_per_sec, r.w1.open_per_sec),
            "w2_no_snapshot": ratio(r.w2.no_snapshot.median(), a.w2.no_snapshot.median()),
            "w2_snapshot": ratio(r.w2.snapshot.median(), a.w2.snapshot.median()),
            "w3": ratio(a.w3.events_per_sec(), r.w3.events_per_sec()),
            "w4": ratio(a.w4.events_per_sec(), r.w4.events_per_sec()),
        });
    }
    w5::add_to_line(&mut line, a, raw);
    if let Some(t) = &a.transfer {
        line["transfer"] = t.to_json(&a.w4, raw.map(|r| &r.w4));
    }
    if let Some(u) = &a.upcast {
        line["upcast"] = u.to_json();
    }
    if let Some(p) = &a.projection {
        line["projection"] = p.to_json(&a.w4, raw.map(|r| &r.w4));
    }
    if let Some(g) = &a.gdpr {
        line["gdpr"] = g.to_json();
    }
    line["w2"]["snapshot_speedup"] = ratio(a.w2.no_snapshot.median(), a.w2.snapshot.median());
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_is_parsed_with_the_backend_and_sizes() {
        let a = Args::try_parse_from(["annals-bench", "--scale", "1000000", "--backend", "sqlite"])
            .expect("valid arguments");
        assert_eq!(a.scale, Some(1_000_000));
        assert_eq!(a.backend, "sqlite");
        assert_eq!(a.sizes.bulk_events, 100_000);
        assert_eq!(
            Args::try_parse_from(["annals-bench"])
                .expect("defaults")
                .scale,
            None
        );
        assert!(Args::try_parse_from(["annals-bench", "--scale", "ten"]).is_err());
        assert!(Args::try_parse_from(["annals-bench", "--scale", "-1"]).is_err());
    }
}
