//! `annals projections rebuild` (in place and blue-green, resumed after
//! Ctrl-C) and `annals projections dead-letters` (list, retry, drop), on
//! SQLite and (when `ANNALS_TEST_POSTGRES_URL` is set) on PostgreSQL.

use std::time::{Duration, Instant};

use annals::{DeadLetter, EventId, GlobalPosition, ProjectionControl, StreamId};
use annals_cli::{AnyStore, OpenOptions};
use serde_json::Value;

use crate::util::{per_backend, Db};

per_backend!(
    rebuild_in_place_and_blue_green_repair_the_read_model,
    rebuild_resumes_after_ctrl_c,
    dead_letters_list_retry_and_drop,
    rebuild_batches_of_one_event_or_of_whole_accounts_give_the_fold,
    in_place_rebuild_leaves_a_locked_projection_untouched,
);

/// The value of `name{projection="account_balances"}` in a metrics file.
#[track_caller]
fn metric(file: &std::path::Path, name: &str) -> f64 {
    let text = std::fs::read_to_string(file).expect("metrics file");
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{projection=\"account_balances\"}}")))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{name} not in {text}"))
}

fn status(db: &Db) -> Value {
    db.run(&["projections", "status", "--json"]).ok().json()
}

/// Whether the row of `Account-ID` holds its fold's balance.
fn row_matches_fold(db: &Db, id: &str) -> bool {
    let folded = db.run(&["aggregate", "Account", id, "--json"]).ok().json();
    let balance = folded["state"]["balance"].as_i64().expect("balance");
    db.execute_sql(&format!(
        "UPDATE account_balances SET balance = balance \
         WHERE stream_id = 'Account-{id}' AND balance = {balance}"
    )) == 1
}

fn rebuild_in_place_and_blue_green_repair_the_read_model(db: &Db) {
    db.run(&["init"]).ok();
    db.run(&["demo", "--accounts", "3", "--operations", "60"])
        .ok();
    assert!(row_matches_fold(db, "demo1-1"));
    let rows = db.execute_sql("UPDATE account_balances SET balance = balance");

    // A damaged row and a parked event, then an in-place rebuild, which
    // delivers every event again: the letter goes (a retry of it would
    // apply its event twice).
    db.execute_sql("UPDATE account_balances SET balance = -1 WHERE stream_id = 'Account-demo1-1'");
    assert!(!row_matches_fold(db, "demo1-1"));
    let events = db.all_events();
    park(db, &[(events[1].clone(), "the payment service was down")]);
    let letters = || {
        db.run(&["projections", "dead-letters", "account_balances", "--json"])
            .ok()
            .json_lines()
    };
    assert_eq!(letters().len(), 1);
    let out = db
        .run(&[
            "projections",
            "rebuild",
            "account_balances",
            "--batch-size",
            "7",
        ])
        .ok()
        .stdout;
    assert!(out.starts_with("rebuilt account_balances: "), "{out}");
    assert!(out.contains("account_balances@v1"), "{out}");
    assert!(row_matches_fold(db, "demo1-1"));
    assert_eq!(status(db)["state"], "caught-up");
    assert_eq!(
        letters(),
        Vec::<Value>::new(),
        "the rebuild forgot the letter"
    );

    // Damaged again, then blue-green: built into shadow tables and swapped.
    db.execute_sql("UPDATE account_balances SET balance = -1 WHERE stream_id = 'Account-demo1-2'");
    let out = db
        .run(&[
            "projections",
            "rebuild",
            "account_balances",
            "--blue-green",
            "--batch-size",
            "5",
        ])
        .ok()
        .stdout;
    assert!(out.contains("shadow tables swapped in"), "{out}");
    assert!(row_matches_fold(db, "demo1-2"));
    assert!(row_matches_fold(db, "demo1-1"));
    assert_eq!(
        db.execute_sql("UPDATE account_balances SET balance = balance"),
        rows
    );
    assert_eq!(status(db)["state"], "caught-up");
    // The live runner goes on from the swapped checkpoint.
    db.run(&["demo", "--accounts", "1", "--operations", "5", "--json"])
        .ok();
    assert!(row_matches_fold(db, "demo2-1"));

    db.run(&["projections", "rebuild", "nope"])
        .fails(2, &["unknown projection \"nope\""]);
}

/// Polls `done` every 20 ms for at most 60 s.
#[track_caller]
/// The handler folds each batch into one change per account: a batch of
/// one event, and a batch holding every account's opening, deposits and
/// withdrawals together, give the same rows, each its stream's fold.
fn rebuild_batches_of_one_event_or_of_whole_accounts_give_the_fold(db: &Db) {
    db.run(&["init"]).ok();
    db.run(&["demo", "--accounts", "3", "--operations", "60"])
        .ok();
    let rows = db.execute_sql("UPDATE account_balances SET balance = balance");
    assert!(rows >= 3, "{rows} rows");
    for batch in ["1", "10000"] {
        db.execute_sql("UPDATE account_balances SET balance = -1, owner = ''");
        let out = db
            .run(&[
                "projections",
                "rebuild",
                "account_balances",
                "--batch-size",
                batch,
            ])
            .ok()
            .stdout;
        assert!(out.starts_with("rebuilt account_balances: "), "{out}");
        for id in ["demo1-1", "demo1-2", "demo1-3"] {
            assert!(row_matches_fold(db, id), "batch {batch}: {id}");
        }
        assert_eq!(
            db.execute_sql("UPDATE account_balances SET balance = balance WHERE owner <> ''"),
            rows,
            "batch {batch}: every row has its owner"
        );
    }
}

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

fn rebuild_resumes_after_ctrl_c(db: &Db) {
    db.run(&["init"]).ok();
    db.run(&["demo", "--accounts", "20", "--operations", "1500"])
        .ok();
    for blue_green in [false, true] {
        let mut args = vec![
            "projections",
            "rebuild",
            "account_balances",
            "--batch-size",
            "1",
        ];
        if blue_green {
            args.push("--blue-green");
        }
        let mut child = db
            .command(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn annals projections rebuild");
        // Interrupted once it has saved a checkpoint of its own: the shadow
        // one blue-green; in place, the live checkpoint after the reset,
        // behind the head (before the rebuild starts it is the demo's, at
        // the head, and the reset deletes it), with the rebuild's marker
        // present. A rebuild that ended before that fails the test rather
        // than letting it check nothing.
        let shadow = "account_balances@v1+shadow";
        wait_until("the rebuild's first checkpoint", || {
            assert!(
                child.try_wait().expect("try_wait").is_none(),
                "the rebuild ended before it could be interrupted"
            );
            if blue_green {
                db.run(&["export"])
                    .ok()
                    .stdout
                    .lines()
                    .any(|l| l.contains(shadow) && !l.contains("\"position\":\"0\""))
            } else {
                let s = status(db);
                s["checkpoint"] != Value::Null
                    && s["lag_events"].as_u64().is_some_and(|lag| lag > 0)
                    && db
                        .run(&["export"])
                        .ok()
                        .stdout
                        .lines()
                        .any(|l| l.contains("account_balances@v1+rebuild"))
            }
        });
        let sent = std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("run the same command again to resume"),
            "{stderr}"
        );
        assert!(stderr.contains("interrupted"), "{stderr}");

        // Resumed (the lock was released on the signal), to the head.
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "1" { "50" } else { a })
            .collect();
        let again = db.run(&args).ok().stdout;
        assert!(again.contains("resumed"), "{again}");
        assert_eq!(status(db)["state"], "caught-up");
        for n in 1..=3 {
            assert!(row_matches_fold(db, &format!("demo1-{n:02}")));
        }
    }
}

/// A store handle on the test database, to park events as a runner with
/// the Park policy would.
fn park(db: &Db, letters: &[(Value, &str)]) {
    with_store(db, async |store| {
        for (event, error) in letters {
            let position: GlobalPosition = event["global_position"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| event["global_position"].to_string())
                .parse()
                .expect("position");
            store
                .park_event(&DeadLetter {
                    checkpoint: "account_balances@v1".into(),
                    position,
                    event_id: EventId(
                        event["event_id"]
                            .as_str()
                            .expect("id")
                            .parse()
                            .expect("uuid"),
                    ),
                    stream: StreamId::parse(event["stream_id"].as_str().expect("stream"))
                        .expect("stream"),
                    event_type: event["event_type"].as_str().expect("type").to_owned(),
                    error: (*error).to_owned(),
                    attempts: 5,
                    parked_at: chrono::Utc::now(),
                })
                .await
                .expect("park");
        }
    });
}

fn dead_letters_list_retry_and_drop(db: &Db) {
    db.run(&["init"]).ok();
    db.run(&[
        "append",
        "Account-dl",
        "--type",
        "Opened",
        "--data",
        r#"{"owner":"dee"}"#,
    ])
    .ok();
    db.run(&["projections", "run", "--until-caught-up"]).ok();
    // Two events the runner never applied, parked: one the handler takes,
    // one it cannot decode.
    db.run(&[
        "append",
        "Account-dl",
        "--type",
        "Deposited",
        "--data",
        r#"{"amount":40}"#,
    ])
    .ok();
    db.run(&[
        "append",
        "Account-dl",
        "--type",
        "Deposited",
        "--data",
        r#"{"amount":"x"}"#,
    ])
    .ok();
    let events = db.all_events();
    let (good, bad) = (events[1].clone(), events[2].clone());
    park(
        db,
        &[
            (good.clone(), "the payment service was down"),
            (bad.clone(), "bad amount"),
        ],
    );

    let file = db.dir.path().join("dead.prom");
    let file_arg = file.to_str().expect("utf-8 temp path");
    db.run(&[
        "projections",
        "dead-letters",
        "account_balances",
        "--metrics-file",
        file_arg,
    ])
    .ok();
    assert_eq!(metric(&file, "annals_projection_dead_letters"), 2.0);
    let listed = db
        .run(&["projections", "dead-letters", "account_balances", "--json"])
        .ok()
        .json_lines();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["event_id"], good["event_id"]);
    assert_eq!(listed[0]["error"], "the payment service was down");
    assert_eq!(listed[1]["attempts"], 5);

    let good_id = good["event_id"].as_str().expect("id");
    let bad_id = bad["event_id"].as_str().expect("id");
    let out = db
        .run(&[
            "projections",
            "dead-letters",
            "account_balances",
            "--retry",
            good_id,
        ])
        .ok()
        .stdout;
    assert!(out.contains("applied parked event"), "{out}");
    assert_eq!(
        db.execute_sql(
            "UPDATE account_balances SET balance = balance \
             WHERE stream_id = 'Account-dl' AND balance = 40"
        ),
        1,
        "the retried deposit is in the read model"
    );

    let run = db.run(&[
        "projections",
        "dead-letters",
        "account_balances",
        "--retry",
        bad_id,
    ]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stdout.contains("failed again"), "{run:#?}");
    let listed = db
        .run(&["projections", "dead-letters", "account_balances", "--json"])
        .ok()
        .json_lines();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["event_id"], bad["event_id"]);
    assert_eq!(listed[0]["attempts"], 6, "one more attempt counted");

    db.run(&[
        "projections",
        "dead-letters",
        "account_balances",
        "--drop",
        bad_id,
    ])
    .ok();
    assert!(db
        .run(&["projections", "dead-letters", "account_balances", "--json"])
        .ok()
        .stdout
        .is_empty());
    db.run(&[
        "projections",
        "dead-letters",
        "account_balances",
        "--drop",
        bad_id,
    ])
    .fails(2, &["has no parked event", bad_id]);
}

/// Runs `f` on a store handle on the test database.
fn with_store<T>(db: &Db, f: impl AsyncFnOnce(&AnyStore) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let options = OpenOptions {
            pg_schema: db.pg_schema.clone(),
            ..OpenOptions::default()
        };
        let store = AnyStore::open_with(&db.url.parse().expect("url"), &options)
            .await
            .expect("open");
        f(&store).await
    })
}

/// An in-place rebuild resets the read model under the projection's lock:
/// while a runner (here on another host) holds it, the rebuild is refused,
/// naming the holder, and neither the rows nor the checkpoint are touched;
/// once the lock is let go, the same command rebuilds.
fn in_place_rebuild_leaves_a_locked_projection_untouched(db: &Db) {
    db.run(&["init"]).ok();
    db.run(&["demo", "--accounts", "3", "--operations", "60"])
        .ok();
    db.execute_sql("UPDATE account_balances SET balance = -1 WHERE stream_id = 'Account-demo1-1'");
    let before = status(db);
    let lock = with_store(db, async |store| {
        match store
            .acquire_projection_lock(
                "account_balances@v1",
                "pid 1 on another-host",
                "token-elsewhere",
                Duration::from_secs(600),
            )
            .await
            .expect("lock")
        {
            annals::LockAttempt::Acquired(lock) => lock,
            held => panic!("{held:?}"),
        }
    });
    db.run(&["projections", "rebuild", "account_balances"])
        .fails(
            2,
            &["locked by pid 1 on another-host", "stop its runner first"],
        );
    // Nothing reset: the damaged row is still there, the checkpoint too.
    assert_eq!(
        db.execute_sql(
            "UPDATE account_balances SET balance = balance \
             WHERE stream_id = 'Account-demo1-1' AND balance = -1"
        ),
        1
    );
    assert_eq!(status(db)["checkpoint"], before["checkpoint"]);
    assert!(!db
        .run(&["export"])
        .ok()
        .stdout
        .contains("account_balances@v1+rebuild"));
    with_store(db, async |store| {
        store.release_projection_lock(&lock).await.expect("release")
    });
    let out = db
        .run(&["projections", "rebuild", "account_balances"])
        .ok()
        .stdout;
    assert!(out.starts_with("rebuilt account_balances: "), "{out}");
    assert!(row_matches_fold(db, "demo1-1"));
}
