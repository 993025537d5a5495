//! `annals snapshots …` beyond the backend scenarios (`scenarios/snapshots.rs`):
//! input checking, the registry's snapshot jobs, a schema bump with an
//! application's own aggregate, and the README's commands as written.

use std::process::ExitCode;
use std::sync::Mutex;

use annals::bank::{Account, AccountEvent};
use annals::{Aggregate, JobOptions, Progress, SnapshotAdmin};
use annals_cli::{AggregateOps, AnyStore, App, Registered};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::util::Db;

/// The commands that fold events, with the arguments each needs after TYPE.
const DOMAIN_COMMANDS: &[&[&str]] = &[
    &["create", "Cart", "1"],
    &["prepopulate", "Cart"],
    &["migrate", "Cart"],
    &["verify", "Cart"],
    &["promote", "Cart"],
];

fn snapshots<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["snapshots"];
    all.extend_from_slice(args);
    all
}

#[test]
fn an_unregistered_type_is_refused_before_the_database_is_opened() {
    for args in DOMAIN_COMMANDS {
        let fresh = Db::sqlite();
        fresh.run(&snapshots(args)).fails(
            2,
            &[
                "unknown aggregate type \"Cart\"",
                "registered types are Account",
            ],
        );
        assert!(!fresh.sqlite_path().exists(), "no database created");
    }
    // The row-level commands need no registration (see the scenarios); on a
    // database that does not exist they say so.
    let fresh = Db::sqlite();
    for args in [
        &["status"][..],
        &["stale", "--min-events", "1"],
        &["delete", "Cart", "1"],
        &["invalidate", "Cart"],
        &["history", "Cart", "1"],
        &["rollback", "Cart", "1", "--to-version", "3"],
        &["keep"],
        &["keep", "3"],
    ] {
        fresh.run(&snapshots(args)).fails(2, &["does not exist"]);
    }
    assert!(!fresh.sqlite_path().exists());
}

#[test]
fn bad_input_is_named_and_writes_nothing() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["status", "Ac-count"], &["category"]),
        (&["stale", "--type", ""], &["--type"]),
        (&["stale", "--min-events", "-1"], &["--min-events"]),
        (&["delete", "Account", ""], &["Account-"]),
        (
            &["invalidate", "Account", "--schema-version-below", "x"],
            &["schema version"],
        ),
        (
            &["prepopulate", "Account", "--concurrency", "0"],
            &["concurrency"],
        ),
        (
            &["migrate", "Account", "--concurrency", "100000"],
            &["concurrency"],
        ),
        (&["verify", "Account", "--sample", "0"], &["at least 1"]),
        (
            &["promote", "Account", "--force", "--verify-sample", "5"],
            &["--force"],
        ),
        (&["create", "Account"], &["ID"]),
        (&["stale", "--min-events", "many"], &["--min-events"]),
        (&["keep", "0"], &["at least 1"]),
        (&["keep", "-2"], &["number of snapshots"]),
        (&["history", "Ac-count", "1"], &["category"]),
        (&["rollback", "Account", "1"], &["--to-version"]),
        (
            &["rollback", "Account", "1", "--to-version", "0"],
            &["start at 1"],
        ),
        (
            &["verify", "Account", "--live", "--sample", "0"],
            &["at least 1"],
        ),
    ];
    for (args, needles) in cases {
        let fresh = Db::sqlite();
        fresh.run(&snapshots(args)).fails(2, needles);
        assert!(
            !fresh.sqlite_path().exists(),
            "{args:?} created the database"
        );
    }
}

#[test]
fn help_lists_the_subcommands_and_exit_codes() {
    let db = Db::sqlite();
    let help = db.run(&["snapshots", "--help"]).ok().stdout;
    for needle in [
        "status",
        "stale",
        "create",
        "delete",
        "invalidate",
        "prepopulate",
        "migrate",
        "verify",
        "promote",
        "history",
        "rollback",
        "keep",
        "Exit status",
    ] {
        assert!(help.contains(needle), "{needle}: {help}");
    }
    let top = db.run(&["--help"]).ok().stdout;
    assert!(top.contains("snapshots"), "{top}");
}

#[test]
fn the_progress_bar_is_drawn_on_a_terminal_only() {
    // `script` (util-linux) runs the command on a pseudo-terminal.
    let has_script = std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_script {
        eprintln!("skipped: no `script` command to run the CLI on a pseudo-terminal");
        return;
    }
    let db = Db::sqlite();
    db.run(&["demo", "--accounts", "20", "--operations", "100"])
        .ok();
    // Off a terminal: the summary only.
    let plain = db.run(&["snapshots", "migrate", "Account"]).ok();
    assert!(plain.stderr.is_empty(), "{plain:#?}");

    // On one: the bar on stderr, and stdout (sent to a file) is unchanged.
    let out = db.dir.path().join("summary.txt");
    let command = format!(
        "{} snapshots migrate Account --restart --database-url {} > {}",
        env!("CARGO_BIN_EXE_annals"),
        db.url,
        out.display()
    );
    let tty = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .current_dir(db.dir.path())
        // A dumb (or no) TERM, as under CI, gets no bar either.
        .env("TERM", "xterm")
        .env("COLUMNS", "120")
        .output()
        .expect("run script");
    assert!(tty.status.success(), "{tty:?}");
    let screen = String::from_utf8_lossy(&tty.stdout);
    assert!(screen.contains("migrate Account"), "{screen}");
    assert!(screen.contains("/20 aggregates"), "{screen}");
    let summary = std::fs::read_to_string(out).expect("summary");
    assert!(
        summary.starts_with("migrate Account\nexamined         20\n"),
        "{summary}"
    );
    assert!(
        !summary.contains('\u{1b}'),
        "no escape codes in the summary: {summary}"
    );
}

/// The `annals snapshots` lines of the README's shell blocks, as written.
fn readme_snapshot_commands() -> Vec<Vec<String>> {
    let readme = include_str!("../../../../README.md");
    let mut in_sh = false;
    let mut commands = Vec::new();
    for line in readme.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        if !in_sh || !line.starts_with("annals snapshots ") {
            continue;
        }
        // Drop a trailing `# comment`.
        let command = line.split(" #").next().unwrap_or(line);
        commands.push(
            command
                .split_whitespace()
                .skip(1)
                .map(str::to_owned)
                .collect(),
        );
    }
    commands
}

#[test]
fn the_readme_snapshot_commands_run_as_written() {
    let commands = readme_snapshot_commands();
    let names: Vec<&str> = commands.iter().map(|c| c[1].as_str()).collect();
    assert_eq!(
        names,
        [
            "status",
            "stale",
            "prepopulate",
            "migrate",
            "verify",
            "promote",
            "verify",
            "keep",
            "history"
        ],
        "the README's snapshot walkthrough changed: update this test"
    );
    let db = Db::sqlite();
    db.run(&["demo", "--accounts", "6", "--operations", "120"])
        .ok();
    for command in &commands {
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        db.run(&args).ok();
    }
    assert_eq!(
        db.run(&["snapshots", "keep", "--json"]).ok().json()["history_size"],
        3
    );
    // After the walkthrough every account loads from a snapshot.
    let status = db
        .run(&["snapshots", "status", "Account", "--json"])
        .ok()
        .json();
    assert_eq!(status["aggregates"], 6);
    assert_eq!(status["with_snapshot"], 6, "{status}");
}

/// The bank account after a change of state layout: renamed fields, so
/// version-1 snapshots no longer decode and `SCHEMA_VERSION` is bumped.
#[derive(Default, Serialize, Deserialize)]
struct AccountV2 {
    holder: String,
    cents: i64,
}

impl Aggregate for AccountV2 {
    const TYPE: &'static str = "Account";
    const SCHEMA_VERSION: u32 = 2;
    type Event = AccountEvent;

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { owner, .. } => self.holder.clone_from(owner),
            AccountEvent::Deposited { amount } => self.cents += amount,
            AccountEvent::Withdrew { amount } => self.cents -= amount,
        }
    }
}

/// Runs one command in-process; returns the exit code and stdout.
async fn run(app: &App, url: &str, args: &[&str]) -> (ExitCode, String) {
    let mut all = vec!["annals"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--database-url", url]);
    let mut out = Vec::new();
    let code = app.clone().run_with_output(all, &mut out).await;
    (code, String::from_utf8(out).expect("UTF-8 output"))
}

async fn run_json(app: &App, url: &str, args: &[&str]) -> Value {
    let (code, out) = run(app, url, args).await;
    assert_eq!(code, ExitCode::SUCCESS, "{args:?}: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} ({e}): {out}"))
}

#[test]
fn a_schema_bump_is_migrated_ahead_of_the_deploy() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("bump.db").display());
    let old = App::new().register::<Account>();
    let new = App::new().register::<AccountV2>();
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let demo = ["demo", "--accounts", "3", "--operations", "30"];
            assert_eq!(run(&old, &url, &demo).await.0, ExitCode::SUCCESS);
            let ids = ["demo1-1", "demo1-2", "demo1-3"];

            // Today's code has snapshots of every account at version 1.
            run_json(
                &old,
                &url,
                &["snapshots", "invalidate", "Account", "--json"],
            )
            .await;
            let pre = run_json(
                &old,
                &url,
                &["snapshots", "prepopulate", "Account", "--json"],
            )
            .await;
            assert_eq!(pre["written"], 3);
            // The new code snapshots one account at version 2 (as its
            // policy would after the deploy).
            let snap = run_json(
                &new,
                &url,
                &["snapshots", "create", "Account", ids[0], "--json"],
            )
            .await;
            assert_eq!(snap["schema_version"], 2);
            assert!(snap["state"]["holder"].is_string(), "{snap}");
            let status = run_json(&old, &url, &["snapshots", "status", "Account", "--json"]).await;
            assert_eq!(
                status["by_schema_version"],
                serde_json::json!({"1": 2, "2": 1})
            );

            // Bulk-delete what is below the new version; no registration needed.
            let gone = run_json(
                &App::new(),
                &url,
                &[
                    "snapshots",
                    "invalidate",
                    "Account",
                    "--schema-version-below",
                    "2",
                    "--json",
                ],
            )
            .await;
            assert_eq!(gone["invalidated"], 2);
            run_json(
                &old,
                &url,
                &["snapshots", "prepopulate", "Account", "--json"],
            )
            .await;

            // Migrate with the new code while the old one keeps its live
            // snapshots: the v2 one is caught up, the others replayed.
            let migrated =
                run_json(&new, &url, &["snapshots", "migrate", "Account", "--json"]).await;
            assert_eq!(migrated["written"], 3);
            assert_eq!(migrated["caught_up"], 1, "{migrated}");
            let verified =
                run_json(&new, &url, &["snapshots", "verify", "Account", "--json"]).await;
            assert_eq!(verified["mismatches"], serde_json::json!([]));
            // The old code cannot check version-2 states: every one mismatches.
            let (code, out) = run(&old, &url, &["snapshots", "verify", "Account", "--json"]).await;
            assert_eq!(code, ExitCode::from(1), "{out}");
            assert!(
                out.contains("schema version 2 is not the current 1"),
                "{out}"
            );

            let promoted =
                run_json(&new, &url, &["snapshots", "promote", "Account", "--json"]).await;
            assert_eq!(promoted["promoted"], 3, "{promoted}");
            let status = run_json(&old, &url, &["snapshots", "status", "Account", "--json"]).await;
            assert_eq!(status["by_schema_version"], serde_json::json!({"2": 3}));

            // After the deploy the new code loads from the migrated snapshots;
            // the old code, still running, passes over them and replays.
            let view = run_json(&new, &url, &["aggregate", "Account", ids[1], "--json"]).await;
            assert_eq!(view["snapshot_used"], true, "{view}");
            assert_eq!(view["events_replayed"], 0);
            let view = run_json(&old, &url, &["aggregate", "Account", ids[1], "--json"]).await;
            assert_eq!(view["snapshot_used"], false, "{view}");
            assert!(view["snapshot_skipped"]
                .as_str()
                .is_some_and(|s| s.contains("schema version 2")));

            // An ops binary that registers nothing says so.
            let (code, out) = run(&App::new(), &url, &["snapshots", "migrate", "Account"]).await;
            assert_eq!(code, ExitCode::from(2));
            assert!(out.is_empty());
        });
}

#[test]
fn registered_ops_report_progress() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("ops.db").display());
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let app = App::with_demo();
            let demo = ["demo", "--accounts", "4", "--operations", "20"];
            assert_eq!(run(&app, &url, &demo).await.0, ExitCode::SUCCESS);
            // The demo generated the master key file beside the database.
            let key_file = dir.path().join("ops.db.key");
            let store = annals_cli::ops_store(
                &AnyStore::open(&url).await.expect("open"),
                std::sync::Arc::new(annals::gdpr::EnvOrFileKeyProvider::new(
                    annals::gdpr::MASTER_KEY_VAR,
                    key_file,
                )),
            );
            let ops = Registered::<Account>::new();

            let seen = Mutex::new(Vec::new());
            let progress = |p: Progress| seen.lock().expect("lock").push(p);
            let check = |seen: &Mutex<Vec<Progress>>, total: u64| {
                let seen = std::mem::take(&mut *seen.lock().expect("lock"));
                assert_eq!(seen.first(), Some(&Progress::Total(total)), "{seen:?}");
                let advanced = seen.iter().filter(|p| **p == Progress::Advanced).count();
                assert_eq!(advanced as u64, total, "{seen:?}");
            };

            store
                .invalidate_snapshots("Account", None)
                .await
                .expect("invalidate");
            let report = ops
                .prepopulate(&store, JobOptions::default(), &progress)
                .await
                .expect("prepopulate");
            assert_eq!(report.written, 4);
            check(&seen, 4);

            let report = ops
                .migrate(
                    &store,
                    JobOptions {
                        min_events: 0,
                        concurrency: 1,
                    },
                    &progress,
                )
                .await
                .expect("migrate");
            assert_eq!((report.written, report.caught_up), (4, 4));
            check(&seen, 4);

            let report = ops
                .verify(&store, Some(2), &progress)
                .await
                .expect("verify");
            assert_eq!((report.staged, report.checked), (4, 2));
            check(&seen, 2);

            let promoted = ops.promote(&store, false, None).await.expect("promote");
            assert_eq!(promoted.promoted + promoted.kept_live, 4);
            let (created, blocker) = ops
                .create_snapshot(&store, "demo1-1")
                .await
                .expect("create")
                .expect("the account exists");
            assert_eq!(created.snapshot.aggregate_type, "Account");
            assert_eq!(created.write, annals::SnapshotWrite::Written);
            assert_eq!(blocker, None);

            let report = ops
                .verify_live(&store, None, &progress)
                .await
                .expect("verify live");
            assert_eq!((report.live, report.checked), (4, 4));
            assert!(report.mismatches.is_empty(), "{report:?}");
            check(&seen, 4);
            assert!(ops
                .create_snapshot(&store, "nobody")
                .await
                .expect("create")
                .is_none());
        });
}

/// The value of one counter of the Prometheus text `text`, for `Account`.
fn counter(text: &str, name: &str) -> Option<u64> {
    let prefix = format!("{name}{{aggregate_type=\"Account\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().expect("a count"))
}

/// Runs `args` with `--metrics-file` and returns the exit code and the
/// metrics written.
fn with_metrics(db: &Db, args: &[&str]) -> (i32, String) {
    let file = db.dir.path().join("run.prom");
    let _ = std::fs::remove_file(&file);
    let file_arg = file.to_str().expect("utf-8 temp path").to_owned();
    let mut all = args.to_vec();
    all.extend_from_slice(&["--metrics-file", &file_arg]);
    let run = db.run(&all);
    let text = std::fs::read_to_string(&file).expect("metrics file");
    (run.code, text)
}

fn append(db: &Db, stream: &str, event_type: &str, data: &str) {
    db.run(&["append", stream, "--type", event_type, "--data", data])
        .ok();
}

#[test]
fn snapshot_jobs_write_the_repository_metrics_to_the_metrics_file() {
    let db = Db::sqlite();
    db.run(&["init"]).ok();
    for id in ["m1", "m2", "m3"] {
        let stream = format!("Account-{id}");
        append(&db, &stream, "Opened", r#"{"owner":"m"}"#);
        append(&db, &stream, "Deposited", r#"{"amount":5}"#);
    }
    append(&db, "Account-bad", "Opened", r#"{"owner":"b"}"#);
    append(&db, "Account-bad", "Exploded", "{}");

    // Cron runs prepopulate: three written, one that cannot be built.
    let (code, text) = with_metrics(&db, &["snapshots", "prepopulate", "Account"]);
    assert_eq!(code, 1, "the broken aggregate fails the run: {text}");
    assert_eq!(
        counter(&text, "annals_snapshots_written_total"),
        Some(3),
        "{text}"
    );
    assert_eq!(
        counter(&text, "annals_snapshot_failures_total"),
        Some(1),
        "{text}"
    );

    // A snapshot ahead of restored events is passed over (a skip) and
    // replaced (a write).
    db.execute_sql("DELETE FROM events WHERE stream_id = 'Account-m1' AND stream_version = 2");
    db.execute_sql("UPDATE streams SET version = 1 WHERE stream_id = 'Account-m1'");
    let (code, text) = with_metrics(&db, &["snapshots", "create", "Account", "m1"]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        counter(&text, "annals_snapshot_skipped_total"),
        Some(1),
        "{text}"
    );
    assert_eq!(
        counter(&text, "annals_snapshots_written_total"),
        Some(1),
        "{text}"
    );

    // A write that the guard refuses is counted as superseded, not written.
    db.run(&["snapshots", "keep", "2"]).ok();
    append(&db, "Account-m2", "Deposited", r#"{"amount":5}"#);
    db.run(&["snapshots", "create", "Account", "m2"]).ok();
    db.run(&[
        "snapshots",
        "rollback",
        "Account",
        "m2",
        "--to-version",
        "2",
    ])
    .ok();
    let (code, text) = with_metrics(&db, &["snapshots", "create", "Account", "m2"]);
    assert_eq!(code, 1, "{text}");
    assert_eq!(
        counter(&text, "annals_snapshot_superseded_total"),
        Some(1),
        "{text}"
    );
    assert_eq!(
        counter(&text, "annals_snapshots_written_total"),
        None,
        "{text}"
    );

    // Migrate counts what it stages.
    let (code, text) = with_metrics(&db, &["snapshots", "migrate", "Account"]);
    assert_eq!(code, 1, "{text}");
    assert_eq!(
        counter(&text, "annals_snapshots_staged_total"),
        Some(3),
        "{text}"
    );
    assert_eq!(
        counter(&text, "annals_snapshot_failures_total"),
        Some(1),
        "{text}"
    );
}
