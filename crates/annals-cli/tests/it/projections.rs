//! `annals projections`, the demo's `account_balances` read model, the
//! `projection-lag` and `upcast` findings of `annals check`, on SQLite and
//! (when `ANNALS_TEST_POSTGRES_URL` is set) on PostgreSQL.

use std::io::{BufRead, BufReader};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use annals::{Step, Upcasters};
use annals_cli::App;
use serde_json::Value;

use crate::util::{per_backend, Db};

per_backend!(
    demo_projects_balances_equal_to_the_folds,
    list_status_run_and_reset,
    run_follows_new_events_until_sigterm,
    check_reports_a_projection_behind,
    check_reports_events_the_upcasters_fail_on,
    runner_records_projection_metrics,
);

fn status(db: &Db) -> Value {
    db.run(&["projections", "status", "--json"]).ok().json()
}

fn deposit(db: &Db, stream: &str, amount: i64) {
    let data = format!(r#"{{"amount":{amount}}}"#);
    db.run(&[
        "append",
        stream,
        "--type",
        "Deposited",
        "--event-version",
        "3",
        "--data",
        &data,
    ])
    .ok();
}

/// Rows of `account_balances` (an UPDATE that changes nothing counts them,
/// on either backend).
fn balance_rows(db: &Db) -> u64 {
    db.execute_sql("UPDATE account_balances SET balance = balance")
}

fn demo_projects_balances_equal_to_the_folds(db: &Db) {
    db.run(&["init"]).ok();
    let summary = db
        .run(&["demo", "--accounts", "4", "--operations", "40", "--json"])
        .ok()
        .json();
    assert_eq!(summary["projection_matches"], true, "{summary}");
    assert_eq!(summary["check_passed"], true, "{summary}");
    for b in summary["balances"].as_array().expect("balances") {
        assert_eq!(b["projected_balance"], b["balance"], "{b}");
    }
    // A second run on the same database catches up from the checkpoint and
    // checks its own accounts.
    let again = db
        .run(&["demo", "--accounts", "2", "--operations", "10", "--json"])
        .ok()
        .json();
    assert_eq!(again["run"], 2);
    assert_eq!(again["projection_matches"], true, "{again}");
    assert_eq!(balance_rows(db), 6);
    let text = db
        .run(&["demo", "--accounts", "2", "--operations", "5"])
        .ok()
        .stdout;
    assert!(text.contains("PROJECTED"), "{text}");
    assert!(text.contains("account_balances: ok"), "{text}");
}

fn list_status_run_and_reset(db: &Db) {
    db.run(&["init"]).ok();
    let listed = db.run(&["projections", "list", "--json"]).ok().json();
    assert_eq!(listed["name"], "account_balances");
    assert_eq!(listed["checkpoint"], "account_balances@v1");

    // Never run: no checkpoint.
    deposit(db, "Account-x", 1);
    let s = status(db);
    assert_eq!(s["state"], "not-started", "{s}");
    assert_eq!(s["checkpoint"], Value::Null);
    assert_eq!(s["lag_events"], 1);

    db.run(&["demo", "--accounts", "2", "--operations", "10"])
        .ok();
    let s = status(db);
    assert_eq!(s["state"], "caught-up", "{s}");
    assert_eq!(s["checkpoint"], s["head"]);
    assert_eq!(s["lag_events"], 0);
    assert_eq!(s["lag_seconds"], 0.0);

    deposit(db, "Account-demo1-1", 7);
    deposit(db, "Account-demo1-1", 8);
    let s = status(db);
    assert_eq!(s["state"], "behind", "{s}");
    assert_eq!(s["lag_events"], 2);
    assert!(s["lag_seconds"].as_f64().expect("seconds") > 0.0, "{s}");
    let table = db.run(&["projections", "status"]).ok().stdout;
    assert!(
        table.contains("LAG_SECONDS") && table.contains("behind"),
        "{table}"
    );

    db.run(&[
        "projections",
        "run",
        "account_balances",
        "--until-caught-up",
    ])
    .ok();
    let s = status(db);
    assert_eq!(s["state"], "caught-up", "{s}");
    let folded = db
        .run(&["aggregate", "Account", "demo1-1", "--json"])
        .ok()
        .json();
    let rows_before = balance_rows(db);
    assert_eq!(rows_before, 3, "Account-x and two demo accounts");
    let balance = folded["state"]["balance"].as_i64().expect("balance");
    let matching = db.execute_sql(&format!(
        "UPDATE account_balances SET balance = balance \
         WHERE stream_id = 'Account-demo1-1' AND balance = {balance}"
    ));
    assert_eq!(matching, 1, "the row equals the fold {folded}");

    let out = db
        .run(&["projections", "reset", "account_balances"])
        .ok()
        .stdout;
    assert!(out.contains("account_balances@v1"), "{out}");
    let s = status(db);
    assert_eq!(s["state"], "not-started", "{s}");
    assert_eq!(balance_rows(db), 0, "rows deleted with the checkpoint");

    // Rebuilt from the first event: the same rows again.
    db.run(&["projections", "run", "--until-caught-up"]).ok();
    assert_eq!(status(db)["state"], "caught-up");
    assert_eq!(balance_rows(db), rows_before);

    db.run(&["projections", "run", "nope"])
        .fails(2, &["unknown projection \"nope\"", "account_balances"]);
    db.run(&["projections", "reset", "nope"])
        .fails(2, &["unknown projection"]);
}

/// Polls `done` every 20 ms for at most 60 s.
#[track_caller]
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        // A pause between two polls of the condition (a plain test thread,
        // no async runtime), not a decision.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_follows_new_events_until_sigterm(db: &Db) {
    db.run(&["init"]).ok();
    deposit(db, "Account-live", 1);
    let mut child = db
        .command(&["projections", "run", "account_balances"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn annals projections run");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("a line");
    assert!(line.contains("running account_balances"), "{line}");

    for amount in 1..=5 {
        deposit(db, "Account-live", amount);
    }
    wait_until("the runner to apply the new events", || {
        status(db)["state"] == "caught-up"
    });
    assert_eq!(
        db.execute_sql(
            "UPDATE account_balances SET balance = balance \
             WHERE stream_id = 'Account-live' AND balance = 16"
        ),
        1,
        "1 + (1 + 2 + 3 + 4 + 5), each applied once"
    );
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = child.wait().expect("wait");
    assert!(status.success(), "stops cleanly on SIGTERM: {status:?}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).expect("stderr");
    assert!(rest.contains("stopping on a signal"), "{rest}");
}

fn check_reports_a_projection_behind(db: &Db) {
    db.run(&["init"]).ok();
    // Never run: not checked, even with a zero threshold.
    deposit(db, "Account-x", 1);
    db.run(&["check", "--max-projection-lag", "0"]).ok();

    db.run(&["projections", "run", "--until-caught-up"]).ok();
    deposit(db, "Account-x", 2);
    deposit(db, "Account-x", 3);
    // Within the defaults: healthy.
    db.run(&["check"]).ok();

    let run = db.run(&["check", "--json", "--max-projection-lag", "1"]);
    assert_eq!(run.code, 1, "{run:#?}");
    let f = run.json();
    assert_eq!(f["check"], "projection-lag");
    assert_eq!(f["severity"], "error");
    assert_eq!(f["subject"], "account_balances");
    let detail = f["detail"].as_str().expect("detail");
    assert!(detail.contains("2 events behind"), "{detail}");

    let run = db.run(&["check", "--json", "--max-projection-age", "0s"]);
    assert_eq!(run.code, 1, "{run:#?}");
    let detail = run.json()["detail"].as_str().expect("detail").to_owned();
    assert!(detail.contains("--max-projection-age"), "{detail}");

    db.run(&["projections", "run", "--until-caught-up"]).ok();
    db.run(&[
        "check",
        "--max-projection-lag",
        "0",
        "--max-projection-age",
        "0s",
    ])
    .ok();
}

fn app_args(db: &Db, args: &[&str]) -> Vec<String> {
    let mut all = vec!["annals".to_owned()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    all.extend(["--database-url".to_owned(), db.url.clone()]);
    if let Some(schema) = &db.pg_schema {
        all.extend(["--pg-schema".to_owned(), schema.clone()]);
        // PostgreSQL has no default master key file.
        all.extend(["--key-file".to_owned(), db.key_file().display().to_string()]);
    }
    all
}

fn check_reports_events_the_upcasters_fail_on(db: &Db) {
    let upcasters = Upcasters::builder()
        .step(Step::new("Deposited", 1, |_| {
            Err::<Value, _>("amounts before v2 are in cents and this one has none")
        }))
        .step(Step::relabel("Deposited", 2))
        .build_without_types()
        .expect("upcasters");
    let upcasters = Arc::new(upcasters);
    let app = || App::with_demo().with_upcasters(Arc::clone(&upcasters));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut out = Vec::new();
        let code = app()
            .run_with_output(app_args(db, &["init"]), &mut out)
            .await;
        assert_eq!(code, ExitCode::SUCCESS);
        let code = app()
            .run_with_output(
                app_args(db, &["demo", "--accounts", "1", "--operations", "3"]),
                &mut Vec::new(),
            )
            .await;
        assert_eq!(code, ExitCode::SUCCESS);
        let code = app()
            .run_with_output(app_args(db, &["check", "--json"]), &mut Vec::new())
            .await;
        assert_eq!(code, ExitCode::SUCCESS, "current events upcast nothing");
        // An event stored at v1, which the failing step reads (appended by
        // the stock binary: `append` prints what it stored through the
        // app's upcasters, which would fail on it).
        db.run(&[
            "append",
            "Account-demo1-1",
            "--type",
            "Deposited",
            "--event-version",
            "1",
            "--data",
            "{}",
        ])
        .ok();
        let mut out = Vec::new();
        let code = app()
            .run_with_output(app_args(db, &["check", "--json"]), &mut out)
            .await;
        assert_eq!(code, ExitCode::from(1));
        let text = String::from_utf8(out).expect("utf-8");
        let findings: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect();
        let upcast: Vec<&Value> = findings.iter().filter(|f| f["check"] == "upcast").collect();
        assert_eq!(upcast.len(), 1, "{text}");
        let f = upcast[0];
        assert_eq!(f["severity"], "error");
        let version = 2 + 3_u64; // opened, then at most 3 operations
        let subject = f["subject"].as_str().expect("subject");
        assert!(subject.starts_with("Account-demo1-1@"), "{subject}");
        let v: u64 = subject
            .rsplit_once('@')
            .and_then(|(_, v)| v.parse().ok())
            .expect("a version");
        assert!((2..=version).contains(&v), "{subject}");
        let detail = f["detail"].as_str().expect("detail");
        assert!(detail.starts_with("position "), "{detail}");
        assert!(detail.contains("in cents"), "{detail}");
        // The decode check goes on past it: no decode finding for it.
        assert!(findings.iter().all(|f| f["check"] != "decode"), "{text}");
    });
}

fn runner_records_projection_metrics(db: &Db) {
    db.run(&["init"]).ok();
    for amount in 1..=3 {
        deposit(db, "Account-m", amount);
    }
    let file = db.dir.path().join("projections.prom");
    let file_arg = file.to_str().expect("utf-8 temp path");
    db.run(&[
        "projections",
        "run",
        "--until-caught-up",
        "--metrics-file",
        file_arg,
    ])
    .ok();
    let text = std::fs::read_to_string(&file).expect("metrics file");
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{projection=\"account_balances\"}}")))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} not in {text}"))
    };
    assert_eq!(value("annals_projection_events_handled_total"), 3.0);
    assert_eq!(value("annals_projection_lag_events"), 0.0);
}

#[test]
fn apps_register_projections() {
    assert_eq!(App::new().projections().count(), 0);
    let app = App::with_demo();
    let names: Vec<&str> = app.projections().map(|p| p.name()).collect();
    assert_eq!(names, ["account_balances"]);
    let p = app.projection("account_balances").expect("registered");
    assert_eq!(p.checkpoint(), "account_balances@v1");
    let app = App::new().register_projection(Arc::new(annals_cli::AccountBalances));
    assert!(app.projection("account_balances").is_some());
    assert!(app.projection("balances").is_none(), "names are exact");
}
