//! `annals events migrate` with `[[merge]]` rules on SQLite and PostgreSQL:
//! pairs of deposits recorded together merge into one deposit (and a
//! street and a city change into one address change); a run cut by a batch
//! boundary (`--max-batches`) resumes to what one run in one go makes; a
//! run still open at the end of the copy is extended by an append and
//! merged by the swap; the merged events decode and the account folds to
//! the same state; the dry run reports the runs; a bad merge filter is
//! named by file, rule and position.

use serde_json::{json, Value};

use crate::util::{per_backend, Db};

const PLAN: &str = r#"
[[merge]]
event_types = ["Deposited"]
filter = '{data: {amount: (map(.data.amount) | add)}}'

[[merge]]
event_types = ["StreetChanged", "CityChanged"]
filter = '{type: "AddressChanged", data: (map(.data) | add)}'
"#;

fn id(n: u32) -> String {
    format!("0190f7a0-0000-7000-8000-{n:012}")
}

fn append(db: &Db, stream: &str, (event_type, version): (&str, u32), data: Value, n: u32) {
    let (data, version, id) = (data.to_string(), version.to_string(), id(n));
    db.run(&[
        "append",
        stream,
        "--type",
        event_type,
        "--event-version",
        &version,
        "--data",
        &data,
        "--event-id",
        &id,
    ])
    .ok();
}

const DEPOSITED: (&str, u32) = ("Deposited", 3);

/// Twelve events in global order; the comments give the runs.
fn seed(db: &Db) {
    db.run(&["init"]).ok();
    append(db, "Account-2", DEPOSITED, json!({"amount": 5}), 1); // alone
    append(db, "Account-1", DEPOSITED, json!({"amount": 10}), 2); // run of 2
    append(db, "Account-1", DEPOSITED, json!({"amount": 20}), 3);
    append(db, "Account-2", DEPOSITED, json!({"amount": 7}), 4); // run of 2
    append(db, "Account-2", DEPOSITED, json!({"amount": 8}), 5);
    append(db, "Account-1", DEPOSITED, json!({"amount": 1}), 6); // alone
    append(db, "Account-1", ("Withdrew", 2), json!({"amount": 3}), 7);
    append(
        db,
        "Ledger-1",
        ("StreetChanged", 1),
        json!({"street": "Main"}),
        8,
    ); // run of 2
    append(db, "Ledger-1", ("CityChanged", 1), json!({"city": "X"}), 9);
    append(db, "Ledger-1", ("Noted", 1), json!({}), 10);
    append(db, "Account-1", DEPOSITED, json!({"amount": 4}), 11); // open at the end
    append(db, "Account-1", DEPOSITED, json!({"amount": 5}), 12);
}

fn plan_file(db: &Db, text: &str) -> String {
    let path = db.dir.path().join("merge.toml");
    std::fs::write(&path, text).expect("write plan");
    path.to_str().expect("utf-8").to_owned()
}

fn migrate(db: &Db, plan: &str, extra: &[&str]) -> Value {
    let mut args = vec!["events", "migrate", "--plan", plan, "--json"];
    args.extend(extra);
    db.run(&args).ok().json()
}

/// The account's state as folded by `annals aggregate`.
fn state(db: &Db, account: &str) -> Value {
    db.run(&["aggregate", "Account", account, "--no-snapshot", "--json"])
        .ok()
        .json()["state"]
        .clone()
}

/// (stream, version, type, data, id) of every event in global order.
fn log(db: &Db) -> Vec<(String, u64, String, Value, String)> {
    db.all_events()
        .into_iter()
        .map(|e| {
            (
                e["stream_id"].as_str().expect("stream").to_owned(),
                e["stream_version"].as_u64().expect("version"),
                e["event_type"].as_str().expect("type").to_owned(),
                e["data"].clone(),
                e["event_id"].as_str().expect("id").to_owned(),
            )
        })
        .collect()
}

fn events_migrate_merges_runs_resumed_across_a_batch_boundary(db: &Db) {
    let once = match db.is_postgres() {
        true => Db::postgres().expect("a second schema"),
        false => Db::sqlite(),
    };
    seed(db);
    seed(&once);
    let plan = plan_file(db, PLAN);
    let plan_once = plan_file(&once, PLAN);

    // Batches of two: the first batch reads events 1 and 2, and 2 opens a
    // run that 3 extends: only event 1 is written, the checkpoint stays
    // before the run.
    let first = migrate(db, &plan, &["--batch-size", "2", "--max-batches", "1"]);
    assert_eq!(first["complete"], false);
    assert_eq!(first["source_events"], 1);
    // Resumed, the run (2, 3) fills a whole batch and is held until event 4
    // ends it: the batch is extended to 4 and 5, and writes 2 and 3.
    let second = migrate(db, &plan, &["--batch-size", "2", "--max-batches", "1"]);
    assert_eq!(second["source_events"], 3);
    assert_eq!(second["written_events"], 2);
    let rest = migrate(db, &plan, &["--batch-size", "2"]);
    assert_eq!(rest["complete"], true);
    // Events 11 and 12 form a run an append may still extend.
    assert_eq!(rest["held"], 2);
    assert_eq!(rest["source_events"], 10);
    let whole = migrate(&once, &plan_once, &[]);
    assert_eq!(whole["source_events"], 10);
    assert_eq!(whole["held"], 2);
    assert_eq!(rest["written_events"], whole["written_events"]);

    // Appended during the copy, adjacent to the open run: the swap merges it.
    for d in [db, &once] {
        append(d, "Account-1", DEPOSITED, json!({"amount": 6}), 13);
    }
    let before = [state(db, "1"), state(db, "2")];
    assert_eq!(before[0]["balance"], 10 + 20 + 1 - 3 + 4 + 5 + 6);
    for d in [db, &once] {
        let swap = d.run(&["events", "swap", "--json"]).ok().json();
        assert_eq!(swap["tail_events"], 3);
        assert_eq!(swap["events"], 8);
    }
    let merged = log(db);
    let strip =
        |l: Vec<(String, u64, String, Value, String)>| -> Vec<(String, u64, String, Value)> {
            l.into_iter().map(|(s, v, t, d, _)| (s, v, t, d)).collect()
        };
    assert_eq!(
        strip(merged.clone()),
        vec![
            (
                "Account-2".into(),
                1,
                "Deposited".into(),
                json!({"amount": 5})
            ),
            (
                "Account-1".into(),
                1,
                "Deposited".into(),
                json!({"amount": 30})
            ),
            (
                "Account-2".into(),
                2,
                "Deposited".into(),
                json!({"amount": 15})
            ),
            (
                "Account-1".into(),
                2,
                "Deposited".into(),
                json!({"amount": 1})
            ),
            (
                "Account-1".into(),
                3,
                "Withdrew".into(),
                json!({"amount": 3})
            ),
            (
                "Ledger-1".into(),
                1,
                "AddressChanged".into(),
                json!({"street": "Main", "city": "X"})
            ),
            ("Ledger-1".into(), 2, "Noted".into(), json!({})),
            (
                "Account-1".into(),
                4,
                "Deposited".into(),
                json!({"amount": 15})
            ),
        ]
    );
    // A run merged into one event keeps its first member's id.
    let ids: Vec<&str> = merged.iter().map(|e| e.4.as_str()).collect();
    assert_eq!(
        ids,
        [id(1), id(2), id(4), id(6), id(7), id(8), id(10), id(11)]
    );
    // Interrupted twice and resumed: the same events as in one go (on
    // PostgreSQL positions are each store's own transaction ids).
    let strip_positions = |d: &Db| -> Vec<Value> {
        d.all_events()
            .into_iter()
            .map(|mut e| {
                let o = e.as_object_mut().expect("object");
                o.remove("recorded_at");
                if d.is_postgres() {
                    o.remove("global_position");
                }
                e
            })
            .collect()
    };
    assert_eq!(strip_positions(db), strip_positions(&once));
    // The merged events decode with the current code, and each account
    // folds to the state it had.
    assert_eq!([state(db, "1"), state(db, "2")], before);
    let read = db.run(&["read", "Account-1", "--json"]).ok().json_lines();
    assert_eq!(read.len(), 4);
    // Appends go on at the merged stream's new head.
    db.run(&[
        "append",
        "Account-1",
        "--type",
        "Deposited",
        "--event-version",
        "3",
        "--data",
        r#"{"amount":1}"#,
        "--expected-version",
        "4",
    ])
    .ok();
    db.run(&["check"]).ok();
}

fn events_migrate_dry_run_reports_merged_runs(db: &Db) {
    seed(db);
    let plan = plan_file(db, PLAN);
    let before = db.all_events();
    let dry = db
        .run(&["events", "migrate", "--plan", &plan, "--dry-run"])
        .ok()
        .stdout;
    assert!(
        dry.contains(
            "Deposited v3: 8 events, 6 would change (0 dropped, 0 split, 6 merged in 3 runs)\n  e.g. Account-1@1..2 (a run of 2 merged)\n    before: {\"data\":{\"amount\":10},\"event_type\":\"Deposited\",\"event_version\":3}\n    before: {\"data\":{\"amount\":20},\"event_type\":\"Deposited\",\"event_version\":3}\n    after:  {\"data\":{\"amount\":30},\"event_type\":\"Deposited\",\"event_version\":3}\n"
        ),
        "{dry}"
    );
    assert!(
        dry.contains(
            "CityChanged v1: 1 events, 1 would change (0 dropped, 0 split, 1 merged in 1 runs)"
        ),
        "{dry}"
    );
    assert!(
        dry.contains("after:  {\"data\":{\"city\":\"X\",\"street\":\"Main\"},\"event_type\":\"AddressChanged\",\"event_version\":1}"),
        "{dry}"
    );
    assert!(
        dry.contains(
            "Withdrew v2: 1 events, 0 would change (0 dropped, 0 split, 0 merged in 0 runs)"
        ),
        "{dry}"
    );
    let lines = db
        .run(&["events", "migrate", "--plan", &plan, "--dry-run", "--json"])
        .ok()
        .json_lines();
    let deposited = lines
        .iter()
        .find(|l| l["event_type"] == "Deposited")
        .expect("Deposited");
    assert_eq!(deposited["merged"], 6);
    assert_eq!(deposited["merged_runs"], 3);
    assert_eq!(deposited["example"]["stream"], "Account-1");
    assert_eq!(
        deposited["example"]["run"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(
        deposited["example"]["after"][0]["data"],
        json!({"amount": 30})
    );
    assert_eq!(db.all_events(), before, "a dry run writes nothing");
}

fn events_migrate_names_a_bad_merge_filter(db: &Db) {
    db.run(&["init"]).ok();
    let plan = plan_file(
        db,
        "[[merge]]\nevent_types = [\"Deposited\"]\nfilter = '{data: (map(.data) | add'\n",
    );
    for dry in [false, true] {
        let mut args = vec!["events", "migrate", "--plan", &plan];
        if dry {
            args.push("--dry-run");
        }
        db.run(&args).fails(
            2,
            &[
                "merge.toml:3:",
                "[[merge]] 1 (Deposited): the filter does not compile",
            ],
        );
    }
    assert!(db.all_events().is_empty());
}

per_backend!(
    events_migrate_merges_runs_resumed_across_a_batch_boundary,
    events_migrate_dry_run_reports_merged_runs,
    events_migrate_names_a_bad_merge_filter,
);
