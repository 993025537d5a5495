//! `annals demo`, the README's first command.

use crate::scenarios::check_demo_summary;
use crate::util::{annals_in, Db};

#[test]
fn demo_runs_on_the_default_database_and_prints_consistent_totals() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = annals_in(dir.path(), &["demo"]).ok();
    assert!(
        dir.path().join("annals.db").exists(),
        "the default sqlite://annals.db"
    );
    let out = &run.stdout;
    for needle in [
        "accounts opened:",
        "deposits:",
        "withdrawals:",
        "refused:",
        "total balance:",
        "ACCOUNT",
        "BALANCE",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }

    // The printed totals add up: total = deposits - withdrawals.
    let line = out
        .lines()
        .find(|l| l.starts_with("total balance:"))
        .expect("total line");
    assert!(line.ends_with(": ok"), "{line}");
    let numbers: Vec<i64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("number"))
        .collect();
    assert_eq!(numbers.len(), 3, "{line}");
    assert_eq!(numbers[0], numbers[1] - numbers[2], "{line}");

    // The table's balances sum to the total.
    let table_sum: i64 = out
        .lines()
        .filter(|l| l.starts_with("Account-demo1-"))
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols[2].parse::<i64>().expect("balance column")
        })
        .sum();
    assert_eq!(table_sum, numbers[0]);
}

#[test]
fn demo_json_summary_is_consistent() {
    let db = Db::sqlite();
    let s = db
        .run(&[
            "demo",
            "--accounts",
            "7",
            "--operations",
            "150",
            "--seed",
            "3",
            "--json",
        ])
        .ok()
        .json();
    check_demo_summary(&s, 7, 150);
    // Every event the summary counts is in the store.
    let stats = db.run(&["stats", "--json"]).ok().json();
    assert_eq!(stats["events"], s["events_written"]);
    assert_eq!(stats["streams"], 7);
}

#[test]
fn demo_refuses_zero_accounts() {
    let db = Db::sqlite();
    db.run(&["demo", "--accounts", "0"])
        .fails(2, &["--accounts"]);
    assert!(!db.sqlite_path().exists());
}

#[test]
fn metrics_file_holds_the_prometheus_text_of_the_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    annals_in(dir.path(), &["--metrics-file", "annals.prom", "demo"]).ok();
    let text = std::fs::read_to_string(dir.path().join("annals.prom")).expect("metrics file");
    // The demo snapshots every 10 events, so the snapshot writer counted.
    let line = text
        .lines()
        .find(|l| l.starts_with("annals_snapshots_written_total{"))
        .unwrap_or_else(|| panic!("no snapshot counter in:\n{text}"));
    assert!(line.contains("aggregate_type=\"Account\""), "{line}");
    let value: f64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a number");
    assert!(value >= 1.0, "{line}");
    assert!(
        text.contains("# TYPE annals_snapshots_written_total counter"),
        "{text}"
    );
}
