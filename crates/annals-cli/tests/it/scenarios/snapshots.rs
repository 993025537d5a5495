//! `annals snapshots …` scenarios, on every backend: coverage and freshness,
//! create/delete/invalidate, prepopulate, the staged migration, and repair
//! (ahead-of-head snapshots, live verification, history and rollback).

use serde_json::{json, Value};

use super::{append, init};
use crate::util::{Db, Run};

/// Opens `Account-<id>` and deposits `deposits` times 10: `1 + deposits`
/// events, balance `10 * deposits`.
fn account(db: &Db, id: &str, deposits: u64) {
    let stream = format!("Account-{id}");
    append(db, &stream, "Opened", json!({"owner": id}), &[]);
    deposit(db, id, deposits);
}

fn deposit(db: &Db, id: &str, deposits: u64) {
    let stream = format!("Account-{id}");
    for _ in 0..deposits {
        append(db, &stream, "Deposited", json!({"amount": 10}), &[]);
    }
}

/// An account whose second event is one `Account` does not know.
fn broken_account(db: &Db, id: &str) {
    let stream = format!("Account-{id}");
    append(db, &stream, "Opened", json!({"owner": id}), &[]);
    append(db, &stream, "Exploded", json!({}), &[]);
}

/// `snapshots status --json`, one object per type.
fn coverage(db: &Db, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["snapshots", "status", "--json"];
    all.extend_from_slice(args);
    db.run(&all).ok().json_lines()
}

fn aggregate(db: &Db, id: &str) -> Value {
    db.run(&["aggregate", "Account", id, "--json"]).ok().json()
}

/// Asserts a failed check (exit 1) whose report is on stdout and whose reason
/// is one line on stderr mentioning every needle.
#[track_caller]
fn check_failed(run: &Run, needles: &[&str]) {
    assert_eq!(run.code, 1, "expected a failed check: {run:#?}");
    let lines: Vec<&str> = run.stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {run:#?}");
    assert!(lines[0].starts_with("error: "), "{run:#?}");
    for n in needles {
        assert!(
            lines[0].contains(n),
            "stderr should mention {n:?}: {run:#?}"
        );
    }
}

fn ids(list: &Value) -> Vec<&str> {
    list.as_array()
        .expect("a list")
        .iter()
        .map(|f| f["aggregate_id"].as_str().expect("aggregate_id"))
        .collect()
}

pub fn snapshots_status_and_prepopulate(db: &Db) {
    init(db);
    account(db, "p1", 5);
    account(db, "p2", 2);
    account(db, "p3", 0);
    broken_account(db, "bad");
    append(db, "Cart-1", "Created", json!({}), &[]);

    let before = coverage(db, &[]);
    assert_eq!(
        before,
        [
            json!({"aggregate_type": "Account", "aggregates": 4, "with_snapshot": 0,
                   "without_snapshot": 4, "by_schema_version": {}}),
            json!({"aggregate_type": "Cart", "aggregates": 1, "with_snapshot": 0,
                   "without_snapshot": 1, "by_schema_version": {}}),
        ]
    );
    // One type, and no registration needed for it.
    assert_eq!(coverage(db, &["Cart"]), before[1..]);
    let table = db.run(&["snapshots", "status"]).ok().stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("TYPE") && lines[0].contains("WITH_SNAPSHOT"));
    assert!(
        lines[1].starts_with("Account") && lines[1].contains("0%"),
        "{table}"
    );

    // The unknown event type fails one aggregate; the others get snapshots.
    let run = db.run(&["snapshots", "prepopulate", "Account", "--json"]);
    check_failed(&run, &["1 aggregate of 4 failed"]);
    let report = run.json();
    assert_eq!(report["aggregate_type"], "Account");
    assert_eq!(report["operation"], "prepopulate");
    assert_eq!(report["examined"], 4);
    assert_eq!(report["written"], 3);
    assert_eq!(report["events_replayed"], 6 + 3 + 1);
    assert_eq!(ids(&report["failures"]), ["bad"]);
    let reason = report["failures"][0]["reason"].as_str().expect("reason");
    assert!(reason.contains("Exploded"), "{reason}");

    let after = coverage(db, &["Account"]);
    assert_eq!(
        after,
        [
            json!({"aggregate_type": "Account", "aggregates": 4, "with_snapshot": 3,
                "without_snapshot": 1, "by_schema_version": {"1": 3}})
        ]
    );
    let table = db.run(&["snapshots", "status", "Account"]).ok().stdout;
    assert!(table.contains("75%") && table.contains("v1: 3"), "{table}");
    let p1 = aggregate(db, "p1");
    assert_eq!(p1["snapshot_used"], true, "{p1}");
    assert_eq!(p1["snapshot_version"], 6);
    assert_eq!(p1["events_replayed"], 0);

    // A rerun redoes only what is still stale (the broken one), and lists
    // the failure with its reason in the text report too.
    let run = db.run(&["snapshots", "prepopulate", "Account", "--concurrency", "1"]);
    check_failed(&run, &["1 aggregate of 1 failed"]);
    assert!(run.stdout.contains("examined         1"), "{run:#?}");
    let failed = run
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("FAILED_ID"))
        .collect::<Vec<_>>();
    assert_eq!(failed.len(), 2, "{run:#?}");
    assert!(failed[1].starts_with("bad") && failed[1].contains("Exploded"));

    // --min-events: only aggregates more than N events past their snapshot.
    deposit(db, "p1", 3);
    let none = db
        .run(&[
            "snapshots",
            "prepopulate",
            "Account",
            "--min-events",
            "5",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(none["examined"], 0);
    let one = db
        .run(&[
            "snapshots",
            "prepopulate",
            "Account",
            "--min-events",
            "2",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(
        one["examined"], 1,
        "p1 is 3 behind; bad has 2 events: {one}"
    );
    assert_eq!(one["written"], 1);
    assert_eq!(one["caught_up"], 1, "from p1's snapshot at 6: {one}");
    assert_eq!(one["events_replayed"], 3);
    assert_eq!(aggregate(db, "p1")["snapshot_version"], 9);
}

pub fn snapshots_stale_most_behind_first(db: &Db) {
    init(db);
    account(db, "a", 0);
    account(db, "b", 3);
    account(db, "c", 6);
    db.run(&["snapshots", "create", "Account", "c"]).ok();
    deposit(db, "c", 2);

    // Every stale aggregate, by stream id, as the store pages through them.
    let stale = db
        .run(&["snapshots", "stale", "--min-events", "0", "--json"])
        .ok()
        .json_lines();
    let behind: Vec<(&str, u64)> = stale
        .iter()
        .map(|s| {
            (
                s["aggregate_id"].as_str().expect("id"),
                s["events_behind"].as_u64().expect("behind"),
            )
        })
        .collect();
    assert_eq!(behind, [("a", 1), ("b", 4), ("c", 2)]);
    assert_eq!(
        stale[2],
        json!({"aggregate_type": "Account", "aggregate_id": "c", "head": 9,
               "snapshot_version": 7, "events_behind": 2, "ahead": false})
    );
    assert_eq!(stale[0]["snapshot_version"], Value::Null);

    // More than N events behind.
    let over_one = db
        .run(&[
            "snapshots",
            "stale",
            "--min-events",
            "1",
            "--type",
            "Account",
            "--json",
        ])
        .ok()
        .json_lines();
    assert_eq!(over_one, stale[1..]);
    // --limit: the most behind, most behind first.
    let first = db
        .run(&["snapshots", "stale", "--limit", "2", "--json"])
        .ok()
        .json_lines();
    assert_eq!(first, [stale[1].clone(), stale[2].clone()]);

    let table = db
        .run(&["snapshots", "stale", "--min-events", "1"])
        .ok()
        .stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("TYPE") && lines[0].ends_with("BEHIND"),
        "{table}"
    );
    assert!(
        lines[1].contains(" b ") && lines[1].ends_with('4'),
        "{table}"
    );
    assert!(lines[1].contains(" - "), "no snapshot: {table}");

    // Nothing stale: empty stdout, a note on stderr.
    let none = db.run(&["snapshots", "stale", "--min-events", "100"]).ok();
    assert!(none.stdout.is_empty(), "{none:#?}");
    assert!(none.stderr.contains("no aggregate is more than 100 events"));
    let carts = db
        .run(&["snapshots", "stale", "--type", "Cart", "--json"])
        .ok();
    assert!(carts.stdout.is_empty());
}

pub fn snapshots_create_delete_invalidate(db: &Db) {
    init(db);
    account(db, "x", 2);
    account(db, "y", 1);
    account(db, "z", 0);
    append(db, "Cart-1", "Created", json!({}), &[]);

    let snap = db
        .run(&["snapshots", "create", "Account", "x", "--json"])
        .ok()
        .json();
    assert_eq!(snap["aggregate_type"], "Account");
    assert_eq!(snap["aggregate_id"], "x");
    assert_eq!(snap["version"], 3);
    assert_eq!(snap["schema_version"], 1);
    assert_eq!(
        snap["state"],
        json!({"owner": "x", "email": null, "balance": 20, "open": true})
    );
    let text = db.run(&["snapshots", "create", "Account", "y"]).ok().stdout;
    assert_eq!(
        text.trim(),
        "created snapshot of Account-y at version 2 (schema version 1)"
    );
    assert_eq!(aggregate(db, "x")["snapshot_used"], true);

    let deleted = db.run(&["snapshots", "delete", "Account", "x"]).ok().stdout;
    assert_eq!(deleted.trim(), "deleted 1 snapshot of Account-x");
    let again = db
        .run(&["snapshots", "delete", "Account", "x", "--json"])
        .ok()
        .json();
    assert_eq!(
        again,
        json!({"aggregate_type": "Account", "aggregate_id": "x", "deleted": 0})
    );
    let x = aggregate(db, "x");
    assert_eq!(x["snapshot_used"], false);
    assert_eq!(x["snapshot_skipped"], "no snapshot stored");

    // An aggregate with no events has nothing to snapshot: a failed check.
    let run = db.run(&["snapshots", "create", "Account", "ghost"]);
    check_failed(&run, &["Account-ghost", "does not exist"]);
    assert!(run.stdout.is_empty());

    // Bulk: nothing is below schema version 1; everything is below 2.
    for id in ["x", "z"] {
        db.run(&["snapshots", "create", "Account", id]).ok();
    }
    let below_1 = db
        .run(&[
            "snapshots",
            "invalidate",
            "Account",
            "--schema-version-below",
            "1",
        ])
        .ok()
        .stdout;
    assert_eq!(
        below_1.trim(),
        "invalidated 0 snapshots of Account with schema version below 1"
    );
    let below_2 = db
        .run(&[
            "snapshots",
            "invalidate",
            "Account",
            "--schema-version-below",
            "2",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(
        below_2,
        json!({"aggregate_type": "Account", "schema_version_below": 2, "invalidated": 3})
    );
    assert_eq!(coverage(db, &["Account"])[0]["with_snapshot"], 0);
    db.run(&["snapshots", "create", "Account", "y"]).ok();
    let all = db.run(&["snapshots", "invalidate", "Account"]).ok().stdout;
    assert_eq!(all.trim(), "invalidated 1 snapshot of Account");

    // Deleting needs no registered type.
    let cart = db.run(&["snapshots", "invalidate", "Cart"]).ok().stdout;
    assert_eq!(cart.trim(), "invalidated 0 snapshots of Cart");
    let cart = db.run(&["snapshots", "delete", "Cart", "1"]).ok().stdout;
    assert_eq!(cart.trim(), "deleted 0 snapshots of Cart-1");
}

pub fn snapshots_migrate_verify_promote(db: &Db) {
    init(db);
    account(db, "m1", 4);
    account(db, "m2", 2);
    account(db, "m3", 1);
    broken_account(db, "bad");
    // m1 has a live snapshot at the current schema version: migrate catches
    // it up from there instead of replaying it.
    db.run(&["snapshots", "create", "Account", "m1"]).ok();
    deposit(db, "m1", 1);

    let run = db.run(&["snapshots", "migrate", "Account", "--json"]);
    check_failed(&run, &["1 aggregate of 4 failed", "staged"]);
    let report = run.json();
    assert_eq!(report["operation"], "migrate");
    assert_eq!(report["examined"], 4);
    assert_eq!(report["written"], 3);
    assert_eq!(report["skipped"], 0);
    assert_eq!(report["caught_up"], 1);
    assert_eq!(report["events_replayed"], 1 + 3 + 2, "{report}");
    assert_eq!(ids(&report["failures"]), ["bad"]);
    assert!(report["failures"][0]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("Exploded")));
    // The live table is untouched until promote.
    assert_eq!(coverage(db, &["Account"])[0]["with_snapshot"], 1);

    // A rerun skips what is staged, and still lists the failure.
    let run = db.run(&["snapshots", "migrate", "Account", "--concurrency", "2"]);
    check_failed(&run, &["1 aggregate of 4 failed"]);
    assert!(run.stdout.starts_with("migrate Account\n"), "{run:#?}");
    assert!(run.stdout.contains("written          0"), "{run:#?}");
    assert!(run.stdout.contains("skipped          3"), "{run:#?}");
    assert!(run.stdout.contains("bad") && run.stdout.contains("Exploded"));

    let verified = db
        .run(&["snapshots", "verify", "Account", "--json"])
        .ok()
        .json();
    assert_eq!(
        verified,
        json!({"aggregate_type": "Account", "staged": 3, "checked": 3, "mismatches": []})
    );
    let sample = db
        .run(&["snapshots", "verify", "Account", "--sample", "1", "--json"])
        .ok()
        .json();
    assert_eq!(sample["checked"], 1);
    let text = db.run(&["snapshots", "verify", "Account"]).ok();
    assert!(text.stdout.contains("mismatches  0"), "{text:#?}");
    assert!(
        text.stderr.is_empty(),
        "no progress bar off a terminal: {text:#?}"
    );

    // m2 moves on and gets a newer live snapshot while staged: promote
    // keeps the live one.
    deposit(db, "m2", 2);
    db.run(&["snapshots", "create", "Account", "m2"]).ok();
    let promoted = db
        .run(&[
            "snapshots",
            "promote",
            "Account",
            "--verify-sample",
            "2",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(promoted["aggregate_type"], "Account");
    assert_eq!(promoted["blocked"], false);
    assert_eq!(promoted["verify"]["checked"], 2);
    assert_eq!(promoted["promoted"], 2, "{promoted}");
    assert_eq!(promoted["kept_live"], 1, "{promoted}");

    // Every aggregate but the broken one now loads from a snapshot.
    let m3 = aggregate(db, "m3");
    assert_eq!(m3["snapshot_used"], true, "{m3}");
    assert_eq!(m3["snapshot_version"], 2);
    assert_eq!(m3["events_replayed"], 0);
    assert_eq!(m3["state"]["balance"], 10);
    let m2 = aggregate(db, "m2");
    assert_eq!(m2["snapshot_version"], 5, "the newer live one: {m2}");
    assert_eq!(m2["state"]["balance"], 40);
    let m1 = aggregate(db, "m1");
    assert_eq!(m1["snapshot_version"], 6);
    assert_eq!(m1["state"]["balance"], 50);
    let text = db.run(&["aggregate", "Account", "m1"]).ok().stdout;
    assert!(text.contains("snapshot         used, version 6"), "{text}");
    assert_eq!(
        coverage(db, &["Account"])[0]["by_schema_version"],
        json!({"1": 3})
    );

    // The staging rows are gone: promoting again moves nothing.
    let run = db.run(&["snapshots", "promote", "Account"]).ok();
    assert!(run.stdout.contains("promoted    0"), "{run:#?}");
    assert!(run.stdout.contains("kept live   0"), "{run:#?}");
    assert!(run.stderr.contains("nothing staged"), "{run:#?}");
    let empty = db
        .run(&["snapshots", "verify", "Account", "--json"])
        .ok()
        .json();
    assert_eq!(empty["staged"], 0);
}

pub fn snapshots_verify_reports_a_mismatch(db: &Db) {
    init(db);
    for id in ["v1", "v2", "v3"] {
        account(db, id, 2);
    }
    let staged = db
        .run(&["snapshots", "migrate", "Account", "--json"])
        .ok()
        .json();
    assert_eq!(staged["written"], 3);

    // What a bug in the new code would do: a staged state that a replay of
    // the events does not give.
    let changed = db.execute_sql(
        r#"UPDATE snapshot_staging SET state = '{"owner":"v2","balance":999999,"open":true}'
           WHERE aggregate_type = 'Account' AND aggregate_id = 'v2'"#,
    );
    assert_eq!(changed, 1);

    let run = db.run(&["snapshots", "verify", "Account", "--json"]);
    check_failed(&run, &["1 of 3", "do not match", "--force"]);
    let report = run.json();
    assert_eq!(report["staged"], 3);
    assert_eq!(report["checked"], 3);
    assert_eq!(ids(&report["mismatches"]), ["v2"]);
    assert_eq!(report["mismatches"][0]["version"], 3);
    let reason = report["mismatches"][0]["reason"].as_str().expect("reason");
    assert!(reason.contains("999999"), "{reason}");

    let run = db.run(&["snapshots", "verify", "Account"]);
    check_failed(&run, &["do not match"]);
    assert!(run.stdout.contains("MISMATCH_ID"), "{run:#?}");
    assert!(run.stdout.contains("v2"), "{run:#?}");

    // The mismatch blocks promote: nothing moves, the staging rows stay.
    let run = db.run(&["snapshots", "promote", "Account", "--json"]);
    check_failed(&run, &["promote refused", "--force"]);
    let blocked = run.json();
    assert_eq!(blocked["blocked"], true);
    assert_eq!(blocked["promoted"], 0);
    assert_eq!(ids(&blocked["verify"]["mismatches"]), ["v2"]);
    let run = db.run(&["snapshots", "promote", "Account"]);
    check_failed(&run, &["promote refused"]);
    assert!(!run.stdout.contains("promoted"), "{run:#?}");
    assert_eq!(coverage(db, &["Account"])[0]["with_snapshot"], 0);
    let still = db.run(&["snapshots", "verify", "Account", "--sample", "3", "--json"]);
    assert_eq!(still.code, 1);
    assert_eq!(still.json()["staged"], 3);

    // --force promotes anyway, without verifying.
    let forced = db
        .run(&["snapshots", "promote", "Account", "--force", "--json"])
        .ok()
        .json();
    assert_eq!(
        forced,
        json!({"aggregate_type": "Account", "verify": null, "blocked": false,
               "promoted": 3, "kept_live": 0})
    );
    assert_eq!(aggregate(db, "v2")["state"]["balance"], 999999);
    // The cure for a bad snapshot: delete it, and the load replays.
    db.run(&["snapshots", "delete", "Account", "v2"]).ok();
    assert_eq!(aggregate(db, "v2")["state"]["balance"], 20);

    // A plain rerun keeps a wrong staged row (it is at the current schema
    // version); --restart discards the staging rows and builds them again.
    db.run(&["snapshots", "migrate", "Account"]).ok();
    let changed = db.execute_sql(
        "UPDATE snapshot_staging SET version = 2 WHERE aggregate_type = 'Account' AND aggregate_id = 'v3'",
    );
    assert_eq!(changed, 1);
    let rerun = db
        .run(&["snapshots", "migrate", "Account", "--json"])
        .ok()
        .json();
    assert_eq!(rerun["skipped"], 3);
    check_failed(
        &db.run(&["snapshots", "verify", "Account"]),
        &["1 of 3", "--restart"],
    );
    let run = db
        .run(&["snapshots", "migrate", "Account", "--restart", "--json"])
        .ok();
    assert!(
        run.stderr
            .contains("discarded 3 snapshots staged for Account"),
        "{run:#?}"
    );
    let restarted = run.json();
    assert_eq!(
        (restarted["written"].as_u64(), restarted["skipped"].as_u64()),
        (Some(3), Some(0))
    );
    db.run(&["snapshots", "verify", "Account"]).ok();
}

/// Events restored from an older backup: the stream is cut back to
/// `version`, behind the CLI's back (the snapshot stays).
fn restore_older_backup(db: &Db, id: &str, version: u64) {
    let stream = format!("Account-{id}");
    db.execute_sql(&format!(
        "DELETE FROM events WHERE stream_id = '{stream}' AND stream_version > {version}"
    ));
    let changed = db.execute_sql(&format!(
        "UPDATE streams SET version = {version} WHERE stream_id = '{stream}'"
    ));
    assert_eq!(changed, 1);
}

pub fn snapshots_ahead_of_head_are_repaired(db: &Db) {
    init(db);
    account(db, "r1", 5);
    account(db, "r2", 5);
    for id in ["r1", "r2"] {
        db.run(&["snapshots", "create", "Account", id]).ok();
    }
    restore_older_backup(db, "r1", 2);
    restore_older_backup(db, "r2", 3);

    let r1 = aggregate(db, "r1");
    assert_eq!(r1["snapshot_used"], false, "{r1}");
    assert!(
        r1["snapshot_skipped"]
            .as_str()
            .is_some_and(|s| s.contains("ahead of the stream head 2")),
        "{r1}"
    );
    let stale = db.run(&["snapshots", "stale", "--json"]).ok().json_lines();
    assert_eq!(
        stale[0],
        json!({"aggregate_type": "Account", "aggregate_id": "r1", "head": 2,
               "snapshot_version": 6, "events_behind": 2, "ahead": true})
    );
    let table = db.run(&["snapshots", "stale"]).ok().stdout;
    assert!(table.contains("6 (ahead)"), "{table}");

    // `create` replaces it (the guarded write used to keep the higher
    // version and print "created" all the same).
    let text = db
        .run(&["snapshots", "create", "Account", "r1"])
        .ok()
        .stdout;
    assert_eq!(
        text.trim(),
        "created snapshot of Account-r1 at version 2 (schema version 1)"
    );
    let r1 = aggregate(db, "r1");
    assert_eq!(r1["snapshot_version"], 2, "{r1}");
    assert_eq!(r1["state"]["balance"], 10);
    // And the next write after new events (here: prepopulate) for r2.
    deposit(db, "r2", 1);
    let report = db
        .run(&["snapshots", "prepopulate", "Account", "--json"])
        .ok()
        .json();
    assert_eq!(
        (report["written"].as_u64(), report["superseded"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(aggregate(db, "r2")["snapshot_version"], 4);
    let history = db
        .run(&["snapshots", "history", "Account", "r2", "--json"])
        .ok()
        .json_lines();
    assert_eq!(history.len(), 1, "the ahead row is gone: {history:?}");
}

pub fn snapshots_history_rollback_and_keep(db: &Db) {
    init(db);
    let keep = db.run(&["snapshots", "keep", "--json"]).ok().json();
    assert_eq!(
        keep,
        json!({"history_size": 1, "previous": null, "trimmed": 0})
    );
    let set = db.run(&["snapshots", "keep", "3"]).ok().stdout;
    assert_eq!(
        set.trim(),
        "3 snapshots kept per aggregate (was 1); 0 snapshots trimmed"
    );
    account(db, "h", 2);
    db.run(&["snapshots", "create", "Account", "h"]).ok();
    for _ in 0..2 {
        deposit(db, "h", 2);
        db.run(&["snapshots", "create", "Account", "h"]).ok();
    } // snapshots at 3, 5, 7; head 7
    let history = db
        .run(&["snapshots", "history", "Account", "h", "--json"])
        .ok()
        .json_lines();
    let rows: Vec<(u64, bool)> = history
        .iter()
        .map(|e| {
            (
                e["version"].as_u64().expect("v"),
                e["live"].as_bool().expect("live"),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [(7, true), (5, false), (3, false)],
        "create kept the history"
    );
    assert_eq!(history[0]["aggregate_id"], "h");
    assert_eq!(history[0]["rolled_back_at"], Value::Null);

    let run = db.run(&["snapshots", "rollback", "Account", "h", "--to-version", "4"]);
    run.fails(2, &["no snapshot of Account/h at version 4", "7, 5, 3"]);
    let text = db
        .run(&["snapshots", "rollback", "Account", "h", "--to-version", "3"])
        .ok()
        .stdout;
    assert_eq!(
        text.trim(),
        "Account-h: the snapshot at version 3 (schema version 1) is live; 2 newer snapshots marked rolled back"
    );
    let h = aggregate(db, "h");
    assert_eq!(
        (
            h["snapshot_version"].as_u64(),
            h["events_replayed"].as_u64()
        ),
        (Some(3), Some(4))
    );
    let table = db
        .run(&["snapshots", "history", "Account", "h"])
        .ok()
        .stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("VERSION") && lines[0].ends_with("STATUS"),
        "{table}"
    );
    assert!(lines[1].contains("rolled back 20"), "{table}");
    assert!(lines[3].ends_with("live"), "{table}");

    // A snapshot at or below a rolled-back version is not written (the
    // rollback is not undone by a rerun): exit 1, with the reason.
    let run = db.run(&["snapshots", "create", "Account", "h", "--json"]);
    check_failed(&run, &["not written", "version 7 was rolled back"]);
    let out = run.json();
    assert_eq!(out["write"], "superseded");
    assert_eq!(out["version"], 7);
    assert_eq!(out["blocked_by"]["version"], 7);
    let run = db.run(&["snapshots", "create", "Account", "h"]);
    check_failed(&run, &["Account-h at version 7", "not written"]);
    assert_eq!(aggregate(db, "h")["snapshot_version"], 3);
    // After new events, a snapshot is genuinely newer and becomes live.
    deposit(db, "h", 1);
    db.run(&["snapshots", "create", "Account", "h"]).ok();
    assert_eq!(aggregate(db, "h")["snapshot_version"], 8);

    // Roll forward, then lower the history size: trims at once.
    let forward = db
        .run(&[
            "snapshots",
            "rollback",
            "Account",
            "h",
            "--to-version",
            "7",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(forward["live"]["version"], 7);
    assert_eq!(forward["rolled_back"], 1);
    let set = db.run(&["snapshots", "keep", "1", "--json"]).ok().json();
    assert_eq!(set, json!({"history_size": 1, "previous": 3, "trimmed": 2}));
    let history = db
        .run(&["snapshots", "history", "Account", "h", "--json"])
        .ok()
        .json_lines();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["version"], 7);
    let none = db.run(&["snapshots", "history", "Account", "nobody"]).ok();
    assert!(none.stdout.is_empty() && none.stderr.contains("no snapshots of Account-nobody"));
}

pub fn snapshots_verify_live_reports_a_mismatch(db: &Db) {
    init(db);
    for id in ["l1", "l2", "l3"] {
        account(db, id, 2);
    }
    db.run(&["snapshots", "prepopulate", "Account"]).ok();
    let clean = db
        .run(&["snapshots", "verify", "Account", "--live", "--json"])
        .ok()
        .json();
    assert_eq!(
        clean,
        json!({"aggregate_type": "Account", "live": 3, "checked": 3, "mismatches": []})
    );
    // A snapshot that loads but holds the wrong state (seed 004).
    let changed = db.execute_sql(
        r#"UPDATE snapshots SET state = '{"owner":"l2","balance":777777,"open":true}'
           WHERE aggregate_type = 'Account' AND aggregate_id = 'l2'"#,
    );
    assert_eq!(changed, 1);
    assert_eq!(aggregate(db, "l2")["state"]["balance"], 777777);
    let run = db.run(&["snapshots", "verify", "Account", "--live", "--json"]);
    check_failed(&run, &["1 of 3", "live snapshots", "do not match"]);
    let report = run.json();
    assert_eq!(ids(&report["mismatches"]), ["l2"]);
    assert!(report["mismatches"][0]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("777777")));
    let run = db.run(&["snapshots", "verify", "Account", "--live", "--sample", "1"]);
    assert!(
        run.stdout
            .starts_with("verify Account (live)\nlive        3\nchecked     1\n"),
        "{run:#?}"
    );
    // The cure: delete it; the next load replays, the next check is clean.
    db.run(&["snapshots", "delete", "Account", "l2"]).ok();
    let after = db
        .run(&["snapshots", "verify", "Account", "--live", "--json"])
        .ok()
        .json();
    assert_eq!(
        (after["live"].as_u64(), after["checked"].as_u64()),
        (Some(2), Some(2))
    );
}
