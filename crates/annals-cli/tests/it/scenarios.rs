//! Scenarios that hold on every backend. `events.rs` runs them on SQLite and
//! `postgres.rs` on PostgreSQL, so the two never drift apart.

use serde_json::{json, Value};

use crate::util::{assert_event_fields, Db};

mod snapshots;
mod upcasting;
pub use snapshots::{
    snapshots_ahead_of_head_are_repaired, snapshots_create_delete_invalidate,
    snapshots_history_rollback_and_keep, snapshots_migrate_verify_promote,
    snapshots_stale_most_behind_first, snapshots_status_and_prepopulate,
    snapshots_verify_live_reports_a_mismatch, snapshots_verify_reports_a_mismatch,
};
pub use upcasting::{bad_plans_are_refused_before_reading, plan_upcasts_every_read_command};

/// Declares one `#[test]` per scenario, on the databases `$make` returns
/// (`None`: skip, with the reason already printed).
macro_rules! scenario_tests {
    ($make:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let Some(db) = $make else { return };
                $crate::scenarios::$name(&db);
            }
        )*
    };
}
pub(crate) use scenario_tests;

fn init(db: &Db) {
    let run = db.run(&["init"]).ok();
    assert!(run.stdout.contains("schema is up to date"), "{run:#?}");
}

fn append(db: &Db, stream: &str, event_type: &str, data: Value, extra: &[&str]) -> Value {
    let data = data.to_string();
    let mut args = vec![
        "append", stream, "--type", event_type, "--data", &data, "--json",
    ];
    args.extend_from_slice(extra);
    db.run(&args).ok().json()
}

pub fn round_trip(db: &Db) {
    init(db);
    let opened = append(
        db,
        "Account-rt",
        "Opened",
        json!({"owner": "ann"}),
        &["--expected-version", "no-stream"],
    );
    assert_event_fields(&opened);
    assert_eq!(opened["stream_id"], "Account-rt");
    assert_eq!(opened["stream_version"], 1);
    assert_eq!(opened["event_type"], "Opened");
    assert_eq!(opened["event_version"], 1);
    assert_eq!(opened["data"], json!({"owner": "ann"}));

    let correlation = uuid::Uuid::now_v7().to_string();
    let metadata = json!({"correlation_id": correlation, "user": "ops"}).to_string();
    let deposited = append(
        db,
        "Account-rt",
        "Deposited",
        json!({"amount": 250}),
        &[
            "--expected-version",
            "1",
            "--metadata",
            &metadata,
            "--event-version",
            "2",
        ],
    );
    assert_eq!(deposited["stream_version"], 2);
    assert_eq!(deposited["event_version"], 2);
    assert_eq!(
        deposited["metadata"]["correlation_id"],
        correlation.as_str()
    );
    assert_eq!(deposited["metadata"]["user"], "ops");

    let read = db.run(&["read", "Account-rt", "--json"]).ok().json_lines();
    assert_eq!(read.len(), 2);
    for e in &read {
        assert_event_fields(e);
        let recorded = e["recorded_at"].as_str().expect("recorded_at is a string");
        chrono::DateTime::parse_from_rfc3339(recorded).expect("recorded_at is RFC 3339");
        assert!(e["global_position"].is_string(), "{e}");
    }
    assert_eq!(read[0], opened, "read returns what append printed");
    assert_eq!(read[1], deposited);

    // The default output is a table with a header and one row per event.
    let table = db.run(&["read", "Account-rt"]).ok().stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    // The POSITION column is right-aligned, header too: on PostgreSQL a
    // position (`COMMIT:SEQ`) can be wider than the header.
    assert!(lines[0].trim_start().starts_with("POSITION"), "{table}");
    assert!(lines[0].contains("RECORDED_AT"), "{table}");
    assert!(
        lines[1].contains("Opened") && lines[1].contains(r#"{"owner":"ann"}"#),
        "{table}"
    );
    assert!(lines[2].contains("Deposited (v2)"), "{table}");
    assert!(lines[2].contains("\"user\":\"ops\""), "{table}");

    // A stream that does not exist reads as empty, not as an error.
    let none = db.run(&["read", "Account-nobody", "--json"]).ok();
    assert!(none.stdout.is_empty());
}

pub fn conflict(db: &Db) {
    init(db);
    append(db, "Account-c", "Opened", json!({"owner": "bo"}), &[]);
    append(db, "Account-c", "Deposited", json!({"amount": 5}), &[]);

    for expected in ["no-stream", "1", "5"] {
        let data = json!({"amount": 1}).to_string();
        db.run(&[
            "append",
            "Account-c",
            "--type",
            "Deposited",
            "--data",
            &data,
            "--expected-version",
            expected,
        ])
        .fails(1, &["Account-c", "actual 2"]);
    }
    // `exists` on a stream that does not exist: the actual is "no stream".
    db.run(&[
        "append",
        "Account-new",
        "--type",
        "Opened",
        "--data",
        "{}",
        "--expected-version",
        "exists",
    ])
    .fails(1, &["Account-new", "no stream"]);

    // Nothing was written by the refused appends.
    assert_eq!(db.all_events().len(), 2);
    // The right expectation succeeds.
    append(
        db,
        "Account-c",
        "Withdrew",
        json!({"amount": 3}),
        &["--expected-version", "2"],
    );
    append(
        db,
        "Account-c",
        "Deposited",
        json!({"amount": 1}),
        &["--expected-version", "exists"],
    );
    assert_eq!(db.all_events().len(), 4);
}

pub fn idempotent_event_id(db: &Db) {
    init(db);
    let id = uuid::Uuid::now_v7().to_string();
    let first = append(
        db,
        "Account-i",
        "Opened",
        json!({"owner": "cy"}),
        &["--event-id", &id],
    );
    assert_eq!(first["event_id"], id.as_str());
    // The same event again (a retried request) is a no-op that prints the
    // original, even with an expectation that no longer holds.
    let again = append(
        db,
        "Account-i",
        "Opened",
        json!({"owner": "cy"}),
        &["--event-id", &id, "--expected-version", "no-stream"],
    );
    assert_eq!(again, first);
    assert_eq!(db.all_events().len(), 1);
}

pub fn read_from_and_as_of(db: &Db) {
    init(db);
    append(db, "Account-t", "Opened", json!({"owner": "di"}), &[]);
    append(db, "Account-t", "Deposited", json!({"amount": 10}), &[]);
    append(db, "Account-t", "Deposited", json!({"amount": 20}), &[]);

    let all = db.run(&["read", "Account-t", "--json"]).ok().json_lines();
    assert_eq!(all.len(), 3);
    // Each append is its own process, milliseconds apart: the times differ.
    let times: Vec<_> = all
        .iter()
        .map(|e| {
            let t = e["recorded_at"].as_str().expect("recorded_at");
            chrono::DateTime::parse_from_rfc3339(t).expect("RFC 3339")
        })
        .collect();
    assert!(times[0] < times[1] && times[1] < times[2], "{times:?}");

    let from = db
        .run(&["read", "Account-t", "--from", "2", "--json"])
        .ok()
        .json_lines();
    assert_eq!(from, all[1..].to_vec());

    let first_at = all[0]["recorded_at"].as_str().expect("string");
    let as_of = db
        .run(&["read", "Account-t", "--as-of", first_at, "--json"])
        .ok()
        .json_lines();
    assert_eq!(as_of, all[..1].to_vec(), "as of the first event's time");

    let second_at = all[1]["recorded_at"].as_str().expect("string");
    let as_of = db
        .run(&["read", "Account-t", "--as-of", second_at, "--json"])
        .ok()
        .json_lines();
    assert_eq!(as_of, all[..2].to_vec());

    let before = db
        .run(&[
            "read",
            "Account-t",
            "--as-of",
            "2000-01-01T00:00:00Z",
            "--json",
        ])
        .ok();
    assert!(before.stdout.is_empty());

    let backward = db
        .run(&["read", "Account-t", "--backward", "--limit", "1", "--json"])
        .ok()
        .json_lines();
    assert_eq!(backward, all[2..].to_vec());
}

pub fn read_all_from_and_limit(db: &Db) {
    init(db);
    append(db, "Account-a", "Opened", json!({"owner": "ed"}), &[]);
    append(db, "Cart-1", "Created", json!({}), &[]);
    append(db, "Account-a", "Deposited", json!({"amount": 7}), &[]);
    append(db, "Cart-1", "ItemAdded", json!({"sku": "x"}), &[]);
    append(db, "Account-b", "Opened", json!({"owner": "fi"}), &[]);

    let all = db.all_events();
    assert_eq!(all.len(), 5);
    let types: Vec<&str> = all
        .iter()
        .map(|e| e["event_type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        types,
        ["Opened", "Created", "Deposited", "ItemAdded", "Opened"]
    );
    for e in &all {
        assert_event_fields(e);
    }

    // --from is exclusive: strictly after the given position.
    let pos = all[1]["global_position"].as_str().expect("position");
    let after = db
        .run(&["read-all", "--from", pos, "--json"])
        .ok()
        .json_lines();
    assert_eq!(after, all[2..].to_vec());

    let limited = db
        .run(&["read-all", "--from", pos, "--limit", "2", "--json"])
        .ok()
        .json_lines();
    assert_eq!(limited, all[2..4].to_vec());

    let last = all[4]["global_position"].as_str().expect("position");
    let none = db.run(&["read-all", "--from", last, "--json"]).ok();
    assert!(none.stdout.is_empty());

    let carts = db
        .run(&["read-all", "--category", "Cart", "--json"])
        .ok()
        .json_lines();
    assert_eq!(carts.len(), 2);
    let opened = db
        .run(&["read-all", "--type", "Opened", "--json"])
        .ok()
        .json_lines();
    assert_eq!(opened.len(), 2);

    let table = db.run(&["read-all", "--limit", "3"]).ok().stdout;
    assert_eq!(table.lines().count(), 4, "header and three rows: {table}");
}

pub fn stats(db: &Db) {
    init(db);
    let empty = db.run(&["stats", "--json"]).ok().json();
    assert_eq!(empty["events"], 0);
    assert_eq!(empty["first_recorded_at"], Value::Null);

    append(db, "Account-s1", "Opened", json!({"owner": "gi"}), &[]);
    append(db, "Account-s1", "Deposited", json!({"amount": 1}), &[]);
    append(db, "Account-s2", "Opened", json!({"owner": "ha"}), &[]);
    append(db, "Cart-s", "Created", json!({}), &[]);

    let s = db.run(&["stats", "--json"]).ok().json();
    // PostgreSQL also reports its horizon lag; SQLite has none.
    assert_eq!(
        s.get("horizon_lag_events").is_some(),
        db.pg_schema.is_some(),
        "{s}"
    );
    assert_eq!(s["streams"], 3);
    assert_eq!(s["events"], 4);
    assert_eq!(
        s["categories"],
        json!([
            {"category": "Account", "streams": 2, "events": 3},
            {"category": "Cart", "streams": 1, "events": 1},
        ])
    );
    assert_eq!(
        s["event_types"],
        json!([
            {"event_type": "Created", "events": 1},
            {"event_type": "Deposited", "events": 1},
            {"event_type": "Opened", "events": 2},
        ])
    );
    let first = s["first_recorded_at"].as_str().expect("first");
    let last = s["last_recorded_at"].as_str().expect("last");
    let first = chrono::DateTime::parse_from_rfc3339(first).expect("RFC 3339");
    let last = chrono::DateTime::parse_from_rfc3339(last).expect("RFC 3339");
    assert!(first <= last);

    let text = db.run(&["stats"]).ok().stdout;
    for needle in [
        "streams",
        "events",
        "CATEGORY",
        "Account",
        "EVENT_TYPE",
        "Deposited",
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
}

pub fn aggregate_of_appended_events(db: &Db) {
    init(db);
    append(db, "Account-ag", "Opened", json!({"owner": "ivy"}), &[]);
    append(db, "Account-ag", "Deposited", json!({"amount": 100}), &[]);
    append(db, "Account-ag", "Withdrew", json!({"amount": 30}), &[]);

    let view = db
        .run(&["aggregate", "Account", "ag", "--json"])
        .ok()
        .json();
    assert_eq!(view["stream_id"], "Account-ag");
    assert_eq!(view["version"], 3);
    assert_eq!(
        view["state"],
        json!({"owner": "ivy", "email": null, "balance": 70, "open": true})
    );
    assert_eq!(view["snapshot_used"], false);
    assert_eq!(view["events_replayed"], 3);

    let at = db
        .run(&["aggregate", "Account", "ag", "--at-version", "2", "--json"])
        .ok()
        .json();
    assert_eq!(at["version"], 2);
    assert_eq!(at["state"]["balance"], 100);
    assert_eq!(at["events_replayed"], 2);

    let text = db.run(&["aggregate", "Account", "ag"]).ok().stdout;
    assert!(text.contains("version          3"), "{text}");
    assert!(text.contains("events replayed  3"), "{text}");
    assert!(text.contains("\"balance\": 70"), "{text}");

    // An event type the aggregate does not know is an error, not a skip.
    append(db, "Account-ag", "Frozen", json!({}), &[]);
    db.run(&["aggregate", "Account", "ag"])
        .fails(2, &["unknown event type", "Frozen"]);

    // An aggregate with no events is a failed check.
    db.run(&["aggregate", "Account", "ghost"])
        .fails(1, &["Account-ghost", "does not exist"]);
}

pub fn demo(db: &Db) {
    // SQLite migrates on open; PostgreSQL only when asked.
    init(db);
    let first = db
        .run(&["demo", "--accounts", "4", "--operations", "80", "--json"])
        .ok()
        .json();
    check_demo_summary(&first, 4, 80);
    assert_eq!(first["run"], 1);

    // A second run opens its own accounts, makes the same choices (same
    // seed) and checks its own totals.
    let second = db
        .run(&["demo", "--accounts", "4", "--operations", "80", "--json"])
        .ok()
        .json();
    check_demo_summary(&second, 4, 80);
    assert_eq!(second["run"], 2);
    for key in [
        "deposits",
        "deposited",
        "withdrawals",
        "withdrawn",
        "refused",
    ] {
        assert_eq!(first[key], second[key], "{key} is seeded");
    }
    let other_seed = db
        .run(&[
            "demo",
            "--accounts",
            "4",
            "--operations",
            "80",
            "--seed",
            "7",
            "--json",
        ])
        .ok()
        .json();
    check_demo_summary(&other_seed, 4, 80);

    // Whatever the demo reported is in the store.
    let balances = first["balances"].as_array().expect("balances");
    let busiest = balances
        .iter()
        .max_by_key(|b| b["version"].as_u64())
        .expect("an account");
    let id = busiest["stream_id"]
        .as_str()
        .and_then(|s| s.strip_prefix("Account-"))
        .expect("Account-<id>");
    let view = db.run(&["aggregate", "Account", id, "--json"]).ok().json();
    assert_eq!(view["version"], busiest["version"]);
    assert_eq!(view["state"]["balance"], busiest["balance"]);
    // The demo snapshots every 10 events: a busy account loads from one.
    let version = busiest["version"].as_u64().expect("version");
    assert!(version >= 10, "80 operations over 4 accounts: {busiest}");
    assert_eq!(view["snapshot_used"], true, "{view}");
    assert!(
        view["events_replayed"].as_u64().expect("count") < 10,
        "{view}"
    );

    let replay = db
        .run(&["aggregate", "Account", id, "--no-snapshot", "--json"])
        .ok()
        .json();
    assert_eq!(replay["snapshot_used"], false);
    assert_eq!(replay["events_replayed"], version);
    assert_eq!(replay["state"], view["state"]);
}

/// The demo's own arithmetic, checked again from its JSON summary.
#[track_caller]
pub fn check_demo_summary(s: &Value, accounts: u64, operations: u64) {
    let n = |k: &str| s[k].as_i64().unwrap_or_else(|| panic!("{k} in {s}"));
    assert_eq!(s["check_passed"], true, "{s}");
    assert_eq!(n("accounts"), accounts as i64);
    assert_eq!(n("operations"), operations as i64);
    assert_eq!(
        n("deposits") + n("withdrawals") + n("refused"),
        operations as i64
    );
    assert_eq!(n("total_balance"), n("deposited") - n("withdrawn"));
    assert_eq!(
        n("events_written"),
        n("accounts") + n("deposits") + n("withdrawals")
    );
    assert!(n("refused") > 0, "some withdrawals are refused: {s}");
    assert!(n("withdrawals") > 0, "{s}");
    let balances = s["balances"].as_array().expect("balances");
    assert_eq!(balances.len() as u64, accounts);
    let sum: i64 = balances
        .iter()
        .map(|b| b["balance"].as_i64().expect("balance"))
        .sum();
    assert_eq!(sum, n("total_balance"));
    assert!(balances.iter().all(|b| b["balance"].as_i64() >= Some(0)));
}
