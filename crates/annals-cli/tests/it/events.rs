//! The backend-neutral scenarios on SQLite, plus what is SQLite's own.

use crate::scenarios::scenario_tests;
use crate::util::{annals_in, Db};

scenario_tests!(Some(Db::sqlite());
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
fn append_creates_and_migrates_a_new_sqlite_file() {
    let db = Db::sqlite();
    assert!(!db.sqlite_path().exists());
    let run = db
        .run(&[
            "append",
            "Account-1",
            "--type",
            "Opened",
            "--data",
            r#"{"owner":"jo"}"#,
        ])
        .ok();
    assert!(db.sqlite_path().exists());
    assert!(run.stdout.contains("Account-1"), "{run:#?}");
    assert_eq!(db.all_events().len(), 1);
}

#[test]
fn init_is_idempotent() {
    let db = Db::sqlite();
    db.run(&["init"]).ok();
    db.run(&["init"]).ok();
    assert!(db.sqlite_path().exists());
}

#[test]
fn env_var_selects_the_database() {
    let db = Db::sqlite();
    let out = crate::util::command(db.dir.path())
        .args(["append", "Account-env", "--type", "Opened", "--data", "{}"])
        .env("ANNALS_DATABASE_URL", &db.url)
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    assert!(db.sqlite_path().exists());
    assert_eq!(db.all_events().len(), 1);
    // The flag wins over the variable.
    let other = db.dir.path().join("other.db");
    let out = crate::util::command(db.dir.path())
        .args(["init", "--database-url"])
        .arg(format!("sqlite://{}", other.display()))
        .env("ANNALS_DATABASE_URL", &db.url)
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    assert!(other.exists());
}

#[test]
fn default_database_is_annals_db_in_the_current_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    annals_in(dir.path(), &["init"]).ok();
    assert!(dir.path().join("annals.db").exists());
    annals_in(
        dir.path(),
        &["append", "Account-d", "--type", "Opened", "--data", "{}"],
    )
    .ok();
    let all = annals_in(dir.path(), &["read-all", "--json"])
        .ok()
        .json_lines();
    assert_eq!(all.len(), 1);
}

#[test]
fn schema_prints_the_ddl_of_both_backends() {
    let dir = tempfile::tempdir().expect("temp dir");
    for backend in ["sqlite", "postgres"] {
        let run = annals_in(dir.path(), &["schema", "--backend", backend]).ok();
        assert!(
            run.stdout.to_uppercase().contains("CREATE TABLE"),
            "{backend}: {}",
            run.stdout
        );
    }
    // It needs no database: nothing was created.
    assert!(!dir.path().join("annals.db").exists());
    annals_in(dir.path(), &["schema", "--backend", "oracle"]).fails(2, &["oracle"]);
}

#[test]
fn a_closed_pipe_is_success() {
    let db = Db::sqlite();
    db.run(&["demo", "--accounts", "3", "--operations", "600", "--json"])
        .ok();
    // Far more output than a pipe buffer holds, and nobody reading it.
    let mut child = db
        .command(&["read-all"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn help_documents_the_exit_codes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = annals_in(dir.path(), &["--help"]).ok();
    assert!(run.stdout.contains("Exit status"), "{}", run.stdout);
    assert!(run.stdout.contains("ANNALS_DATABASE_URL"), "{}", run.stdout);
    let run = annals_in(dir.path(), &["append", "--help"]).ok();
    assert!(run.stdout.contains("--expected-version"), "{}", run.stdout);
    // No command at all: the help, on stderr, as an error.
    let run = annals_in(dir.path(), &[]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("Usage"), "{run:#?}");
}

#[test]
fn a_bad_plan_is_refused_before_the_database_is_opened() {
    let db = Db::sqlite();
    db.run(&["read-all", "--plan", "missing.toml"])
        .fails(2, &["missing.toml", "cannot read the plan"]);
    assert!(!db.sqlite_path().exists());
}
