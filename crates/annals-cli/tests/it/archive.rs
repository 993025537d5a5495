//! `annals archive` and `annals restore-archive` on SQLite and PostgreSQL:
//! archive, read and append refused naming the file, streams with later
//! events kept, reruns, restore compared with the originals, a tampered and
//! a missing file named.

use std::path::Path;

use serde_json::Value;

use crate::util::{per_backend, Db};

per_backend!(
    check_passes_archived_streams_and_finds_a_tombstone_off_the_head,
    append_with_a_wrong_expected_version_says_the_stream_is_archived,
);

fn append(db: &Db, stream: &str, n: u32) {
    db.run(&[
        "append",
        stream,
        "--type",
        "Deposited",
        "--data",
        &format!(r#"{{"amount":{n},"note":"zoë"}}"#),
        "--metadata",
        r#"{"correlation_id":"0190f7a0-0000-7000-8000-000000000001","tenant":"t1"}"#,
    ])
    .ok();
}

/// The events of `stream` in the whole log, without their positions (a
/// restore gives new ones).
fn events_of(db: &Db, stream: &str) -> Vec<Value> {
    db.all_events()
        .into_iter()
        .filter(|e| e["stream_id"] == stream)
        .map(|mut e| {
            e.as_object_mut()
                .expect("an object")
                .remove("global_position");
            e
        })
        .collect()
}

fn path_arg(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

fn archive(db: &Db, before: &str, dir: &Path) -> String {
    db.run(&[
        "archive",
        "--category",
        "Account",
        "--before",
        before,
        "--to",
        path_arg(dir),
        "--streams-per-file",
        "1",
    ])
    .ok()
    .stdout
}

fn scenario(db: Db) {
    if db.is_postgres() {
        db.run(&["init"]).ok();
    }
    append(&db, "Account-a", 1);
    append(&db, "Account-a", 2);
    append(&db, "Account-b", 3);
    append(&db, "Order-x", 4);
    append(&db, "Account-live", 5);
    append(&db, "Account-live", 6);
    // The cut-off: the live stream's last event, recorded after the others.
    let live = events_of(&db, "Account-live");
    let before = live[1]["recorded_at"]
        .as_str()
        .expect("recorded_at")
        .to_owned();
    let originals = [events_of(&db, "Account-a"), events_of(&db, "Account-b")];
    assert_eq!((originals[0].len(), originals[1].len()), (2, 1));

    let dir = db.dir.path().join("archive");
    let out = archive(&db, &before, &dir);
    assert!(
        out.contains("archived 2 streams (3 events) of Account"),
        "{out}"
    );
    let dir = std::fs::canonicalize(&dir).expect("archive dir");
    let file_a = dir.join("Account-000001.jsonl.zst");
    let file_b = dir.join("Account-000002.jsonl.zst");
    assert!(file_a.exists() && file_b.exists() && dir.join("manifest.json").exists());
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest"))
            .expect("JSON");
    assert_eq!(manifest["files"][0]["streams"][0]["stream"], "Account-a");
    assert_eq!(manifest["files"][0]["streams"][0]["events"], 2);
    assert_eq!(manifest["files"][0]["streams"][0]["last_version"], 2);
    assert_eq!(
        manifest["files"][0]["sha256"].as_str().map(str::len),
        Some(64)
    );
    assert_eq!(manifest["files"][1]["complete"], true);

    // Gone from the hot table; the other streams are untouched.
    assert!(events_of(&db, "Account-a").is_empty());
    assert_eq!(
        events_of(&db, "Account-live"),
        live_without_positions(&live)
    );
    assert_eq!(events_of(&db, "Order-x").len(), 1);
    let shown_a = file_a.display().to_string();
    db.run(&["read", "Account-a"])
        .fails(2, &["Account-a is archived", &shown_a]);
    db.run(&["append", "Account-a", "--type", "Deposited", "--data", "{}"])
        .fails(2, &["Account-a is archived", &shown_a]);

    // A rerun archives nothing.
    let out = archive(&db, &before, &dir);
    assert!(out.contains("archived 0 streams (0 events)"), "{out}");

    let run = db.run(&["restore-archive", path_arg(&dir)]).ok();
    assert!(
        run.stdout
            .contains("restored 2 files: 3 events (0 already present)"),
        "{run:#?}"
    );
    assert_eq!(events_of(&db, "Account-a"), originals[0]);
    assert_eq!(events_of(&db, "Account-b"), originals[1]);
    // Restored streams take appends again, after their old head.
    append(&db, "Account-b", 7);
    assert_eq!(events_of(&db, "Account-b")[1]["stream_version"], 2);
    let run = db.run(&["restore-archive", path_arg(&dir)]).ok();
    assert!(
        run.stdout
            .contains("restored 2 files: 0 events (3 already present)"),
        "{run:#?}"
    );

    // Archive again elsewhere (Account-b now has an event after the
    // cut-off, so the cut-off moves to now), then tamper with one file and
    // lose the other.
    let now = chrono::Utc::now().to_rfc3339();
    let again = db.dir.path().join("again");
    let out = archive(&db, &now, &again);
    assert!(out.contains("archived 3 streams"), "{out}");
    let again = std::fs::canonicalize(&again).expect("archive dir");
    let (first, second) = (
        again.join("Account-000001.jsonl.zst"),
        again.join("Account-000002.jsonl.zst"),
    );
    let mut bytes = std::fs::read(&first).expect("archive file");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&first, bytes).expect("tamper");
    std::fs::remove_file(&second).expect("lose a file");
    let run = db.run(&["restore-archive", path_arg(&again)]);
    assert_eq!(run.code, 1, "{run:#?}");
    let tampered = format!(
        "archive file {} does not match the manifest",
        first.display()
    );
    let missing = format!("archive file {} is missing", second.display());
    assert!(run.stdout.contains(&tampered), "{run:#?}");
    assert!(run.stdout.contains(&missing), "{run:#?}");
    assert!(run.stdout.contains("restored 1 files"), "{run:#?}");
    // Nothing of the bad files came back.
    db.run(&["read", "Account-a"])
        .fails(2, &["Account-a is archived"]);
    db.run(&["read", "Account-b"])
        .fails(2, &["Account-b is archived"]);
    assert_eq!(events_of(&db, "Account-live").len(), 2);
}

fn live_without_positions(live: &[Value]) -> Vec<Value> {
    live.iter()
        .cloned()
        .map(|mut e| {
            e.as_object_mut()
                .expect("an object")
                .remove("global_position");
            e
        })
        .collect()
}

#[test]
fn archive_and_restore_on_sqlite() {
    scenario(Db::sqlite());
}

#[test]
fn archive_and_restore_on_postgres() {
    let Some(db) = Db::postgres() else { return };
    scenario(db);
}

/// An archive interrupted after its files and manifest were written but
/// before the events were removed (a manifest entry not `complete`) is
/// completed by the next run, after its file is checked again.
fn resumed(db: Db) {
    if db.is_postgres() {
        db.run(&["init"]).ok();
    }
    append(&db, "Account-a", 1);
    let now = chrono::Utc::now().to_rfc3339();
    let dir = db.dir.path().join("archive");
    archive(&db, &now, &dir);
    db.run(&["restore-archive", path_arg(&dir)]).ok();
    // As if the run had stopped before removing the events.
    let path = dir.join("manifest.json");
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("manifest")).expect("JSON");
    manifest["files"][0]["complete"] = Value::Bool(false);
    std::fs::write(&path, serde_json::to_vec(&manifest).expect("JSON")).expect("write");
    // A cut-off before everything: only the interrupted entry is archived.
    let out = archive(&db, "2000-01-01T00:00:00Z", &dir);
    assert!(
        out.contains("completed an interrupted archive: 1 streams"),
        "{out}"
    );
    db.run(&["read", "Account-a"])
        .fails(2, &["Account-a is archived"]);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("manifest")).expect("JSON");
    assert_eq!(manifest["files"][0]["complete"], true);
    assert_eq!(manifest["files"].as_array().map(Vec::len), Some(1));
}

#[test]
fn an_interrupted_archive_is_completed_on_sqlite() {
    resumed(Db::sqlite());
}

#[test]
fn an_interrupted_archive_is_completed_on_postgres() {
    let Some(db) = Db::postgres() else { return };
    resumed(db);
}

/// Archives every `Account` stream (one file per stream); the first file.
fn archive_all(db: &Db) -> std::path::PathBuf {
    let dir = db.dir.path().join("archive");
    let now = chrono::Utc::now().to_rfc3339();
    let out = archive(db, &now, &dir);
    assert!(out.contains("archived "), "{out}");
    std::fs::canonicalize(dir.join("Account-000001.jsonl.zst")).expect("archive file")
}

/// `annals check`'s `stream-versions` check: an archived stream (its
/// `streams` row at the head, no events, its tombstone at that head) is
/// healthy; a tombstone that no longer matches the head is a stream whose
/// events are missing.
pub fn check_passes_archived_streams_and_finds_a_tombstone_off_the_head(db: &Db) {
    db.run(&["init"]).ok();
    append(db, "Account-a", 1);
    append(db, "Account-a", 2);
    append(db, "Account-b", 3);
    archive_all(db);
    db.run(&["read", "Account-a"])
        .fails(2, &["Account-a is archived"]);
    let check = ["check", "--json", "--max-transaction-age", "1h"];
    let run = db.run(&check).ok();
    assert!(run.json_lines().is_empty(), "{run:#?}");
    // A live stream beside them is checked as before.
    append(db, "Account-live", 4);
    assert!(db.run(&check).ok().json_lines().is_empty());
    // The tombstone no longer at the head: the head's events are nowhere.
    let changed = db.execute_sql(
        "UPDATE archived_streams SET version = version + 1 WHERE stream_id = 'Account-a'",
    );
    assert_eq!(changed, 1);
    let run = db.run(&check);
    assert_eq!(run.code, 1, "{run:#?}");
    let found = run.json_lines();
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0]["check"], "stream-versions");
    assert_eq!(found[0]["subject"], "Account-a");
    assert_eq!(found[0]["severity"], "error");
    let detail = found[0]["detail"].as_str().expect("detail");
    assert!(
        detail.contains("streams records head 2 but no events are stored"),
        "{detail}"
    );
}

/// An append to an archived stream fails with `StreamArchived` (exit 2,
/// naming the archive file) whatever it expected, not with a wrong expected
/// version (exit 1), on PostgreSQL as on SQLite.
pub fn append_with_a_wrong_expected_version_says_the_stream_is_archived(db: &Db) {
    db.run(&["init"]).ok();
    append(db, "Account-a", 1);
    append(db, "Account-a", 2);
    let file = archive_all(db);
    let shown = file.display().to_string();
    for expected in ["7", "1", "no-stream", "2", "any", "exists"] {
        db.run(&[
            "append",
            "Account-a",
            "--type",
            "Deposited",
            "--data",
            "{}",
            "--expected-version",
            expected,
        ])
        .fails(2, &["Account-a is archived", &shown]);
    }
}
