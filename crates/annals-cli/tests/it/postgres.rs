//! The scenarios on PostgreSQL, each in a fresh schema, when
//! `ANNALS_TEST_POSTGRES_URL` names a server; skipped (visibly) otherwise,
//! or failed when `ANNALS_REQUIRE_POSTGRES=1`.

use crate::scenarios::scenario_tests;
use crate::util::Db;

/// A fresh schema, or `None` after saying (visibly) why the test is
/// skipped; fails instead when `ANNALS_REQUIRE_POSTGRES=1`.
fn pg() -> Option<Db> {
    Db::postgres()
}

scenario_tests!(pg();
    round_trip,
    conflict,
    idempotent_event_id,
    read_from_and_as_of,
    read_all_from_and_limit,
    stats,
    aggregate_of_appended_events,
    demo,
    snapshots_status_and_prepopulate,
    snapshots_stale_most_behind_first,
    snapshots_create_delete_invalidate,
    snapshots_migrate_verify_promote,
    snapshots_verify_reports_a_mismatch,
    snapshots_ahead_of_head_are_repaired,
    snapshots_history_rollback_and_keep,
    snapshots_verify_live_reports_a_mismatch,
    plan_upcasts_every_read_command,
    bad_plans_are_refused_before_reading,
);

#[test]
fn commands_before_init_say_to_run_init() {
    let Some(db) = pg() else { return };
    assert!(db.is_postgres());
    // PostgreSQL is only migrated when asked: until `annals init`, commands
    // fail with one line that says what to do, and write nothing.
    db.run(&["stats"]).fails(2, &["annals init"]);
    db.run(&["append", "Account-1", "--type", "Opened", "--data", "{}"])
        .fails(2, &["annals init"]);
    db.run(&["init"]).ok();
    db.run(&["init"]).ok();
    let stats = db.run(&["stats", "--json"]).ok().json();
    assert_eq!(stats["events"], 0);
}

#[test]
fn stats_records_the_horizon_lag_in_the_metrics_file() {
    let Some(db) = pg() else { return };
    db.run(&["init"]).ok();
    let file = db.dir.path().join("pg.prom");
    let file_arg = file.to_str().expect("utf-8 temp path");
    let table = db.run(&["stats", "--metrics-file", file_arg]).ok().stdout;
    assert!(table.contains("horizon lag"), "{table}");
    let text = std::fs::read_to_string(&file).expect("metrics file");
    assert!(
        text.lines()
            .any(|l| l.starts_with("annals_pg_horizon_lag_events")),
        "{text}"
    );
}

/// Issue 7: without a server a PostgreSQL CLI test says so where `cargo
/// test` shows it (past the harness's capture), and fails when
/// `ANNALS_REQUIRE_POSTGRES=1`. Runs one of them in a child process.
#[test]
fn issue7_a_missing_server_is_visible_and_fails_when_required() {
    let name = "postgres::commands_before_init_say_to_run_init";
    let run = |require: Option<&str>| {
        let mut cmd = std::process::Command::new(std::env::current_exe().expect("test binary"));
        cmd.args([name, "--exact", "--test-threads=1"])
            .env_remove("ANNALS_TEST_POSTGRES_URL")
            .env_remove("ANNALS_REQUIRE_POSTGRES");
        if let Some(value) = require {
            cmd.env("ANNALS_REQUIRE_POSTGRES", value);
        }
        let out = cmd.output().expect("run the test binary");
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = run(None);
    assert!(ok, "skipped, not failed:\n{text}");
    assert!(text.contains("1 passed"), "{text}");
    assert!(
        text.contains(&format!("SKIPPED {name}")),
        "not visible:\n{text}"
    );
    let (ok, text) = run(Some("1"));
    assert!(!ok, "must fail when required:\n{text}");
    assert!(text.contains("ANNALS_REQUIRE_POSTGRES"), "{text}");
}
