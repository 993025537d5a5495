//! W4 on SQLite, Annals and a plain `rusqlite` loop alternating on the same
//! file, `ROUNDS` rounds each, with the median of each side and their ratio:
//! a steadier figure than the bench's single pass, and a loop to profile.
//!
//! `w4_rounds [ROUNDS] [annals|raw|both]` (defaults: 10, both). The store
//! holds 1,210 accounts of 100 events each (121,000 events, W4's count, in
//! W3's stream pattern), written once into a temporary directory.

use std::time::Instant;

// The rebuild checks are rebuild_rounds's and pg_rounds's.
#[allow(dead_code)]
#[path = "common/w4_store.rs"]
mod w4;
use w4::shapes;
use w4::{annals_w4, memory_lines, w4_store, ACCOUNTS, BALANCE, EVENTS_PER_ACCOUNT, PAGE};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn raw_w4(conn: &rusqlite::Connection) -> anyhow::Result<(u64, i64)> {
    let (events, balances) = shapes::raw_w4(conn, PAGE as i64)?;
    Ok((events, balances.values().sum()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map_or(Ok(10), |a| a.parse())?;
    let mode = args.next().unwrap_or_else(|| "both".into());
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("w4.db");
    let store = w4_store(&path).await?;
    let conn = rusqlite::Connection::open(&path)?;
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        if mode != "raw" {
            let t = Instant::now();
            let (n, sum) = annals_w4(&store).await?;
            ours.push(n as f64 / t.elapsed().as_secs_f64());
            anyhow::ensure!(n == ACCOUNTS * EVENTS_PER_ACCOUNT, "annals read {n} events");
            anyhow::ensure!(sum == ACCOUNTS as i64 * BALANCE, "annals sum {sum}");
        }
        if mode != "annals" {
            let t = Instant::now();
            let (n, sum) = raw_w4(&conn)?;
            raw.push(n as f64 / t.elapsed().as_secs_f64());
            anyhow::ensure!(n == ACCOUNTS * EVENTS_PER_ACCOUNT, "raw read {n} events");
            anyhow::ensure!(sum == ACCOUNTS as i64 * BALANCE, "raw sum {sum}");
        }
    }
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{:.0}k", x / 1e3))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("annals events/s: {}", fmt(&ours));
    println!("raw events/s:    {}", fmt(&raw));
    for line in memory_lines(&["VmHWM", "Rss"]) {
        println!("{line}");
    }
    if !ours.is_empty() && !raw.is_empty() {
        let (a, r) = (median(ours), median(raw));
        println!(
            "median annals {:.0}k, raw {:.0}k, ratio {:.2}",
            a / 1e3,
            r / 1e3,
            a / r
        );
    }
    Ok(())
}
