//! `annals events migrate|swap|drop-backup` on SQLite and PostgreSQL: a plan
//! that upcasts, splits, drops and purges; the dry run; a run interrupted
//! (`--max-batches`, and on SQLite SIGKILL) and resumed that ends identical
//! to one run in one go; a swap with a writer appending
//! throughout (nothing lost or doubled, appends and reads after it); the
//! `migration` finding of `annals check`; an event that does not decode
//! named by stream, version and position.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::util::Db;

const PLAN: &str = r#"
[[step]]
event_type = "Withdrawn"
from_version = 1
rename_to = "Withdrew"
filter = '{amount: (.amount | tonumber)}'

[[migrate]]
event_type = "Moved"
filter = '{type: "StreetChanged", data: {street: .data.street}}, {type: "CityChanged", data: {city: .data.city}}'

[[migrate]]
event_type = "Noise"
filter = 'empty'

[[purge]]
stream = "Ledger-9"
reason = "retention expired"
"#;

fn append(db: &Db, stream: &str, event_type: &str, data: Value, id: Option<&str>) {
    let data = data.to_string();
    let mut args = vec!["append", stream, "--type", event_type, "--data", &data];
    if let Some(id) = id {
        args.extend(["--event-id", id]);
    }
    db.run(&args).ok();
}

fn seed(db: &Db, ids: bool) {
    let id = |n: u32| format!("0190f7a0-0000-7000-8000-{n:012}");
    let ids: Vec<Option<String>> = (0..9).map(|n| ids.then(|| id(n))).collect();
    append(
        db,
        "Ledger-1",
        "Opened",
        json!({"owner": "ann"}),
        ids[0].as_deref(),
    );
    append(
        db,
        "Ledger-9",
        "Opened",
        json!({"owner": "bob"}),
        ids[1].as_deref(),
    );
    append(
        db,
        "Ledger-1",
        "Moved",
        json!({"street": "Main", "city": "X"}),
        ids[2].as_deref(),
    );
    append(
        db,
        "Ledger-9",
        "Deposited",
        json!({"amount": 5}),
        ids[3].as_deref(),
    );
    append(db, "Ledger-1", "Noise", json!({}), ids[4].as_deref());
    append(
        db,
        "Ledger-2",
        "Withdrawn",
        json!({"amount": "7"}),
        ids[5].as_deref(),
    );
    append(
        db,
        "Ledger-1",
        "Withdrawn",
        json!({"amount": "3"}),
        ids[6].as_deref(),
    );
}

fn plan_file(db: &Db) -> String {
    let path = db.dir.path().join("plan.toml");
    std::fs::write(&path, PLAN).expect("write plan");
    path.to_str().expect("utf-8").to_owned()
}

/// (stream, version, type, data) of every event in global order.
fn log(db: &Db) -> Vec<(String, u64, String, Value)> {
    db.all_events()
        .into_iter()
        .map(|e| {
            (
                e["stream_id"].as_str().expect("stream").to_owned(),
                e["stream_version"].as_u64().expect("version"),
                e["event_type"].as_str().expect("type").to_owned(),
                e["data"].clone(),
            )
        })
        .collect()
}

fn findings(db: &Db, check: &str) -> Vec<Value> {
    db.run(&["check", "--json"])
        .ok()
        .json_lines()
        .into_iter()
        .filter(|f| f["check"] == check)
        .collect()
}

#[test]
fn events_migrate_splits_drops_purges_and_swaps_on_sqlite() {
    splits_drops_purges_and_swaps(Db::sqlite());
}

#[test]
fn events_migrate_splits_drops_purges_and_swaps_on_postgres() {
    let Some(db) = Db::postgres() else { return };
    splits_drops_purges_and_swaps(db);
}

fn splits_drops_purges_and_swaps(db: Db) {
    db.run(&["init"]).ok();
    seed(&db, false);
    let plan = plan_file(&db);
    let before = db.all_events();

    let dry = db
        .run(&["events", "migrate", "--plan", &plan, "--dry-run"])
        .ok()
        .stdout;
    assert!(
        dry.contains("Moved v1: 1 events, 1 would change (0 dropped, 1 split, 0 merged in 0 runs)"),
        "{dry}"
    );
    assert!(
        dry.contains("Noise v1: 1 events, 1 would change (1 dropped, 0 split, 0 merged in 0 runs)"),
        "{dry}"
    );
    assert!(
        dry.contains("Withdrawn v1: 2 events, 2 would change"),
        "{dry}"
    );
    assert!(dry.contains("after:  {\"data\":{\"city\":\"X\"}"), "{dry}");
    assert!(dry.contains("StreamPurged"), "{dry}");
    assert_eq!(db.all_events(), before, "a dry run writes nothing");
    assert!(findings(&db, "migration").is_empty());

    let out = db
        .run(&["events", "migrate", "--plan", &plan, "--json"])
        .ok()
        .json();
    assert_eq!(out["source_events"], 7);
    assert_eq!(out["written_events"], 6);
    assert_eq!(out["renumbered"], true);
    let pending = findings(&db, "migration");
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0]["severity"], "warning");
    assert!(pending[0]["detail"]
        .as_str()
        .expect("detail")
        .contains("is copying"));
    assert_eq!(
        db.all_events(),
        before,
        "the live table is untouched before the swap"
    );

    if db.is_postgres() {
        db.execute_sql("INSERT INTO checkpoints (name, commit_pos, seq) VALUES ('p@v1', 0, 3)");
        db.execute_sql(
            "INSERT INTO dead_letters (name, commit_pos, seq, event_id, stream_id, event_type, error, attempts, parked_at) \
             VALUES ('p@v1', 0, 2, gen_random_uuid(), 'Ledger-1', 'Moved', 'boom', 3, now())",
        );
    } else {
        db.execute_sql(
            "INSERT INTO checkpoints (name, position, updated_at) VALUES ('p@v1', 3, 0)",
        );
        db.execute_sql(
            "INSERT INTO dead_letters (name, position_commit, position, event_id, stream_id, event_type, error, attempts, parked_at) \
             VALUES ('p@v1', 0, 2, 'x', 'Ledger-1', 'Moved', 'boom', 3, 0)",
        );
    }
    let swap = db.run(&["events", "swap", "--json"]).ok().json();
    assert_eq!(swap["events"], 6);
    assert_eq!(swap["checkpoints_reset"], json!(["p@v1"]));
    assert_eq!(
        swap["dead_letters_removed"], 1,
        "dead letters name the old positions"
    );
    let backup = swap["backup_table"].as_str().expect("backup").to_owned();
    assert!(backup.starts_with("events_backup_"), "{backup}");

    assert_eq!(
        log(&db),
        vec![
            (
                "Ledger-1".into(),
                1,
                "Opened".into(),
                json!({"owner": "ann"})
            ),
            (
                "Ledger-9".into(),
                1,
                "StreamPurged".into(),
                json!({"reason": "retention expired"})
            ),
            (
                "Ledger-1".into(),
                2,
                "StreetChanged".into(),
                json!({"street": "Main"})
            ),
            (
                "Ledger-1".into(),
                3,
                "CityChanged".into(),
                json!({"city": "X"})
            ),
            (
                "Ledger-2".into(),
                1,
                "Withdrew".into(),
                json!({"amount": 7})
            ),
            (
                "Ledger-1".into(),
                4,
                "Withdrew".into(),
                json!({"amount": 3})
            ),
        ]
    );
    let after = db.all_events();
    assert_eq!(after[0]["event_id"], before[0]["event_id"], "ids are kept");
    assert_eq!(after[0]["recorded_at"], before[0]["recorded_at"]);
    assert_eq!(after[5]["event_id"], before[6]["event_id"]);
    // Positions renumbered in the same order (dense on SQLite, where the
    // source's were; on PostgreSQL each keeps its transaction id).
    let positions: Vec<String> = after
        .iter()
        .map(|e| {
            e["global_position"]
                .to_string()
                .trim_matches('"')
                .to_owned()
        })
        .collect();
    if !db.is_postgres() {
        assert_eq!(positions, ["1", "2", "3", "4", "5", "6"]);
    }
    let mut sorted = positions.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), 6, "{positions:?}");

    // Appends go on at each stream's new head, and after every old position.
    db.run(&[
        "append",
        "Ledger-1",
        "--type",
        "Noted",
        "--data",
        "{}",
        "--expected-version",
        "4",
    ])
    .ok();
    db.run(&[
        "append",
        "Ledger-9",
        "--type",
        "Noted",
        "--data",
        "{}",
        "--expected-version",
        "1",
    ])
    .ok();
    let last = db.all_events();
    assert_eq!(last.len(), 8);
    assert!(
        db.run(&["read", "Ledger-1", "--json"])
            .ok()
            .json_lines()
            .len()
            == 5
    );

    assert_eq!(
        last[6]["stream_id"], "Ledger-1",
        "appends come after every copied event"
    );
    assert_eq!(last[7]["stream_id"], "Ledger-9");
    // The unique index on event ids is there under its name: appending a
    // stored event again is recognised as a retry (PostgreSQL maps the
    // constraint by name), a reused id for another payload is refused.
    let id = last[0]["event_id"].as_str().expect("id").to_owned();
    db.run(&[
        "append",
        "Ledger-1",
        "--type",
        "Opened",
        "--data",
        r#"{"owner":"ann"}"#,
        "--event-id",
        &id,
    ])
    .ok();
    let reused = db.run(&[
        "append",
        "Ledger-3",
        "--type",
        "Opened",
        "--data",
        "{}",
        "--event-id",
        &id,
    ]);
    assert_ne!(reused.code, 0, "{reused:#?}");
    assert_eq!(db.all_events().len(), 8);
    // Followers and projections read the new table: a follower started
    // before an append receives it, and the demo's projection runs.
    let follower = db
        .command(&[
            "read-all",
            "--follow",
            "--poll-interval",
            "10ms",
            "--limit",
            "9",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("follower");
    db.run(&[
        "append",
        "Account-1",
        "--type",
        "Opened",
        "--data",
        r#"{"owner":"ann"}"#,
    ])
    .ok();
    let out = follower.wait_with_output().expect("follower output");
    let followed = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(followed, 9);
    db.run(&[
        "projections",
        "run",
        "account_balances",
        "--until-caught-up",
    ])
    .ok();

    if db.is_postgres() {
        // The live table carries the original names of its indexes (and of
        // the constraints behind them), and its identity sequence.
        let names = [
            "events_pkey",
            "events_event_id_key",
            "events_stream_version_key",
            "events_tx_seq_idx",
            "events_type_recorded_idx",
            "events_recorded_idx",
            "events_category_tx_seq_idx",
            "events_correlation_idx",
            "events_causation_idx",
            "events_type_tx_seq_idx",
        ];
        let list = names.map(|n| format!("'{n}'")).join(", ");
        assert_eq!(
            db.execute_sql(&format!(
                "SELECT 1 FROM pg_indexes WHERE schemaname = current_schema() \
                 AND tablename = 'events' AND indexname IN ({list})"
            )),
            names.len() as u64
        );
        assert_eq!(
            db.execute_sql(
                "SELECT 1 FROM pg_constraint WHERE conrelid = 'events'::regclass \
                 AND conname IN ('events_event_id_key', 'events_stream_version_key', 'events_pkey')"
            ),
            3
        );
        assert_eq!(
            db.execute_sql(
                "SELECT 1 WHERE pg_get_serial_sequence('events', 'seq') LIKE '%.events_seq_seq'"
            ),
            1
        );
    }

    if !db.is_postgres() {
        // The live table has the indexes of the old one, under their names,
        // and its sequence is past every position (the trick: an UPDATE of
        // the run row that matches only when the condition holds).
        let names = [
            "events_event_type_recorded_at",
            "events_recorded_at",
            "events_category_position",
            "events_correlation_id",
            "events_causation_id",
            "events_event_type_position",
        ];
        let list = names.map(|n| format!("'{n}'")).join(", ");
        assert_eq!(
            db.execute_sql(&format!(
                "UPDATE event_migrations SET plan_file = plan_file WHERE state = 'swapped' \
                 AND (SELECT count(*) FROM sqlite_schema WHERE type = 'index' \
                      AND tbl_name = 'events' AND name IN ({list})) = {} \
                 AND (SELECT seq FROM sqlite_sequence WHERE name = 'events') \
                     >= (SELECT max(position) FROM events)",
                names.len()
            )),
            1
        );
    }

    let left = findings(&db, "migration");
    assert_eq!(left.len(), 1);
    assert!(left[0]["detail"]
        .as_str()
        .expect("detail")
        .contains(&backup));
    let dropped = db.run(&["events", "drop-backup", "--json"]).ok().json();
    assert_eq!(dropped["dropped"], backup);
    assert!(findings(&db, "migration").is_empty());
    db.run(&["check"]).ok();
}

#[test]
fn events_migrate_interrupted_resumes_to_the_same_result_on_sqlite() {
    interrupted_resumes(Db::sqlite(), Db::sqlite());
}

#[test]
fn events_migrate_interrupted_resumes_to_the_same_result_on_postgres() {
    let (Some(a), Some(b)) = (Db::postgres(), Db::postgres()) else {
        return;
    };
    interrupted_resumes(a, b);
}

fn interrupted_resumes(once: Db, twice: Db) {
    once.run(&["init"]).ok();
    twice.run(&["init"]).ok();
    seed(&once, true);
    seed(&twice, true);
    let plan = plan_file(&once);
    let plan2 = plan_file(&twice);
    once.run(&["events", "migrate", "--plan", &plan]).ok();
    let stopped = twice
        .run(&[
            "events",
            "migrate",
            "--plan",
            &plan2,
            "--batch-size",
            "2",
            "--max-batches",
            "2",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(stopped["complete"], false);
    assert_eq!(stopped["source_events"], 4);
    let resumed = twice
        .run(&[
            "events",
            "migrate",
            "--plan",
            &plan2,
            "--batch-size",
            "2",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(
        resumed["copied"], 3,
        "the rerun starts after the last batch"
    );
    assert_eq!(resumed["source_events"], 7);
    once.run(&["events", "swap"]).ok();
    twice.run(&["events", "swap"]).ok();
    let strip = |db: &Db| -> Vec<Value> {
        db.all_events()
            .into_iter()
            .map(|mut e| {
                let o = e.as_object_mut().expect("object");
                o.remove("recorded_at");
                // Positions are each store's own on PostgreSQL (transaction ids).
                if db.is_postgres() {
                    o.remove("global_position");
                }
                e
            })
            .collect()
    };
    assert_eq!(strip(&once), strip(&twice));
}

#[test]
fn events_swap_with_a_writer_running_throughout_loses_and_doubles_nothing_on_sqlite() {
    writer_throughout(Db::sqlite());
}

#[test]
fn events_swap_with_a_writer_running_throughout_loses_and_doubles_nothing_on_postgres() {
    let Some(db) = Db::postgres() else { return };
    writer_throughout(db);
}

fn writer_throughout(db: Db) {
    db.run(&["init"]).ok();
    let db = Arc::new(db);
    seed(&db, false);
    let plan = plan_file(&db);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (db, stop) = (Arc::clone(&db), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut n = 0u32;
            // At least a few appends before, during and after the swap.
            while !stop.load(Ordering::SeqCst) || n < 5 {
                n += 1;
                append(&db, "Writer-1", "Noted", json!({"n": n}), None);
            }
            n
        })
    };
    let wait_for = |count: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while db
            .run(&["read", "Writer-1", "--json"])
            .ok()
            .json_lines()
            .len()
            < count
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer did not get to {count}"
            );
        }
    };
    wait_for(2);
    db.run(&["events", "migrate", "--plan", &plan, "--batch-size", "2"])
        .ok();
    // Events appended after the copy's last batch: the swap must copy them.
    let copied = db
        .run(&["read", "Writer-1", "--json"])
        .ok()
        .json_lines()
        .len();
    wait_for(copied + 2);
    db.run(&["events", "swap"]).ok();
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().expect("writer");
    let events: Vec<u64> = db
        .run(&["read", "Writer-1", "--json"])
        .ok()
        .json_lines()
        .iter()
        .map(|e| e["data"]["n"].as_u64().expect("n"))
        .collect();
    assert_eq!(events, (1..=u64::from(written)).collect::<Vec<_>>());
    let all = db.all_events();
    let mut ids: Vec<&str> = all
        .iter()
        .map(|e| e["event_id"].as_str().expect("id"))
        .collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "no event twice");
    db.run(&["check"]).ok();
}

#[test]
fn events_migrate_refuses_an_event_that_does_not_decode_on_sqlite() {
    refuses_undecodable(Db::sqlite());
}

#[test]
fn events_migrate_refuses_an_event_that_does_not_decode_on_postgres() {
    let Some(db) = Db::postgres() else { return };
    refuses_undecodable(db);
}

fn refuses_undecodable(db: Db) {
    db.run(&["init"]).ok();
    db.run(&[
        "append",
        "Account-1",
        "--type",
        "Opened",
        "--data",
        r#"{"owner":"ann"}"#,
    ])
    .ok();
    let path = db.dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[migrate]]\nevent_type = \"Opened\"\nfilter = '{type: \"Bogus\", data: .data}'\n",
    )
    .expect("plan");
    let run = db.run(&["events", "migrate", "--plan", path.to_str().expect("utf-8")]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(
        run.stderr.contains("stream Account-1 version 1 position "),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("Bogus"), "{}", run.stderr);
}

#[test]
fn check_reports_a_planted_pending_migration_on_sqlite() {
    planted(Db::sqlite());
}

#[test]
fn check_reports_a_planted_pending_migration_on_postgres() {
    let Some(db) = Db::postgres() else { return };
    planted(db);
}

/// A run row planted behind the CLI's back: a copy not swapped, then a
/// backup left over; each is a `migration` warning (exit 0), gone once the
/// run is done.
fn planted(db: Db) {
    db.run(&["init"]).ok();
    let started = if db.is_postgres() { "now()" } else { "0" };
    db.execute_sql(&format!(
        "INSERT INTO event_migrations (plan_file, plan, state, started_at) \
         VALUES ('p.toml', '', 'copying', {started})"
    ));
    let found = findings(&db, "migration");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["severity"], "warning");
    assert!(found[0]["detail"]
        .as_str()
        .expect("detail")
        .contains("p.toml"));
    db.execute_sql("UPDATE event_migrations SET state = 'swapped', backup_table = 'events_backup_20260101000000'");
    let found = findings(&db, "migration");
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0]["detail"]
        .as_str()
        .expect("detail")
        .contains("events_backup_20260101000000"));
    db.execute_sql("UPDATE event_migrations SET state = 'done'");
    assert!(findings(&db, "migration").is_empty());
}

/// 300 events in 10 streams written straight into a new SQLite store, with
/// ids and times fixed by their number, so two stores get the same log.
fn seed_many(db: &Db) {
    db.run(&["init"]).ok();
    db.execute_sql(
        "INSERT INTO events (event_id, stream_id, category, stream_version, event_type, \
         event_version, data, metadata, recorded_at) \
         WITH RECURSIVE n(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM n WHERE x < 299) \
         SELECT unhex(printf('%032x', x + 1)), 'Ledger-' || (x % 10), 'Ledger', x / 10 + 1, \
                CASE WHEN x % 7 = 0 THEN 'Noise' ELSE 'Withdrawn' END, 1, \
                '{\"amount\":\"' || x || '\"}', '{}', 1700000000000000 + x FROM n",
    );
    db.execute_sql(
        "INSERT INTO streams (stream_id, category, version) \
         WITH RECURSIVE k(s) AS (SELECT 0 UNION ALL SELECT s + 1 FROM k WHERE s < 9) \
         SELECT 'Ledger-' || s, 'Ledger', 30 FROM k",
    );
}

#[test]
fn events_migrate_killed_mid_run_resumes_to_the_same_result_on_sqlite() {
    let (killed, once) = (Db::sqlite(), Db::sqlite());
    seed_many(&killed);
    seed_many(&once);
    let plan = plan_file(&killed);
    let mut child = killed
        .command(&["events", "migrate", "--plan", &plan, "--batch-size", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("migrate");
    // Watched with reads: in WAL mode they never wait for the copy's
    // writer. (A watching write waited for the write lock, which the copy
    // takes batch after batch, and could get it only once the copy was
    // done.)
    let watch = rusqlite::Connection::open(killed.sqlite_path()).expect("open SQLite");
    let copied = || {
        watch
            .query_row(
                "SELECT coalesce(max(source_events), 0) FROM event_migrations",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while copied() < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the copy did not start"
        );
    }
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the copy ended before it could be killed"
    );
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    // What was committed is whole: the copy holds exactly the written events.
    let partial = killed.execute_sql(
        "UPDATE event_migrations SET plan_file = plan_file \
         WHERE state = 'copying' AND source_events < 300 \
           AND written_events = (SELECT count(*) FROM events_migrating)",
    );
    assert_eq!(partial, 1, "a half-written batch, or the run had finished");
    killed
        .run(&["events", "migrate", "--plan", &plan, "--batch-size", "7"])
        .ok();
    let plan2 = plan_file(&once);
    once.run(&["events", "migrate", "--plan", &plan2]).ok();
    killed.run(&["events", "swap"]).ok();
    once.run(&["events", "swap"]).ok();
    let all = |db: &Db| -> Vec<Value> {
        db.all_events()
            .into_iter()
            .map(|mut e| {
                e.as_object_mut().expect("object").remove("recorded_at");
                e
            })
            .collect()
    };
    let (a, b) = (all(&killed), all(&once));
    // Ledger-9 (30 events) is purged to its tombstone; of the 43 Noise
    // events (x % 7 == 0) 39 are in other streams and dropped.
    assert_eq!(a.len(), 300 - 29 - 39);
    assert_eq!(a, b);
}

#[test]
fn events_swap_refuses_a_copy_that_fails_verification_on_sqlite() {
    refuses_a_bad_copy(Db::sqlite());
}

#[test]
fn events_swap_refuses_a_copy_that_fails_verification_on_postgres() {
    let Some(db) = Db::postgres() else { return };
    refuses_a_bad_copy(db);
}

/// A copy tampered with behind the CLI's back: an id changed (named by
/// stream, version and position), then a row removed (named by stream);
/// nothing is swapped either time.
fn refuses_a_bad_copy(db: Db) {
    db.run(&["init"]).ok();
    seed(&db, false);
    let plan = plan_file(&db);
    let before = db.all_events();
    db.run(&["events", "migrate", "--plan", &plan]).ok();
    let new_id = if db.is_postgres() {
        "gen_random_uuid()"
    } else {
        "randomblob(16)"
    };
    assert_eq!(
        db.execute_sql(&format!(
            "UPDATE events_migrating SET event_id = {new_id} \
             WHERE stream_id = 'Ledger-2' AND stream_version = 1"
        )),
        1
    );
    let run = db.run(&["events", "swap"]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(
        run.stderr.contains("stream Ledger-2 version 1 position "),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("id is not in the copy"),
        "{}",
        run.stderr
    );
    assert_eq!(db.all_events(), before, "nothing swapped");
    db.execute_sql("DELETE FROM events_migrating WHERE stream_id = 'Ledger-2'");
    let run = db.run(&["events", "swap"]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(
        run.stderr.contains("the copy has 0 events") && run.stderr.contains("(stream Ledger-2)"),
        "{}",
        run.stderr
    );
    assert_eq!(db.all_events(), before, "nothing swapped");
    // Abandoning the copy leaves the live table as it was.
    let dropped = db.run(&["events", "drop-backup", "--json"]).ok().json();
    assert_eq!(dropped["dropped"], "events_migrating");
    assert!(findings(&db, "migration").is_empty());
}
