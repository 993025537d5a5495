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
