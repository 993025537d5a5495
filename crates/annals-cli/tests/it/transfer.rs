//! `annals export` and `annals import`: the round trip SQLite -> PostgreSQL
//! -> SQLite, a rerun, zstd files, truncated and corrupt files, and a
//! conflicting stream; the wrapped data keys and erasures of personal data
//! from SQLite into each backend (and from there back into SQLite), a
//! conflicting key, and a version 1 file.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::util::{per_backend, Db, Run};

per_backend!(
    keys_and_erasures_travel_with_the_events,
    a_different_key_in_the_target_is_named_and_nothing_is_written,
    a_version_1_file_without_keys_still_imports,
);

/// A SQLite store with the demo's accounts, metadata headers, a snapshot
/// and a checkpoint at event `checkpoint`.
fn source(checkpoint: u64) -> Db {
    let db = Db::sqlite();
    db.run(&["demo", "--accounts", "4", "--operations", "60"])
        .ok();
    db.run(&[
        "append",
        "Account-extra",
        "--type",
        "Opened",
        "--data",
        r#"{"owner":"zoë","n":1e300}"#,
        "--metadata",
        r#"{"correlation_id":"0190f7a0-0000-7000-8000-000000000001","tenant":"t1"}"#,
    ])
    .ok();
    let stream = first_stream(&db);
    let id = stream.strip_prefix("Account-").expect("an Account stream");
    db.run(&["snapshots", "create", "Account", id]).ok();
    db.execute_sql(&format!(
        "INSERT INTO checkpoints (name, position_commit, position, updated_at) \
         VALUES ('balances', 0, {checkpoint}, 0)"
    ));
    db
}

fn first_stream(db: &Db) -> String {
    db.all_events()[0]["stream_id"]
        .as_str()
        .expect("stream id")
        .to_owned()
}

/// The lines of an export to standard output.
fn export(db: &Db) -> Vec<Value> {
    db.run(&["export"]).ok().json_lines()
}

fn export_to(db: &Db, file: &Path) {
    let run = db.run(&["export", "--output", path_arg(file)]).ok();
    assert!(run.stdout.starts_with("exported "), "{run:#?}");
}

fn import(db: &Db, file: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["import", path_arg(file)];
    args.extend_from_slice(extra);
    db.run(&args)
}

fn path_arg(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// The body of an export (no header), with or without positions.
fn body(lines: &[Value], keep_positions: bool) -> Vec<Value> {
    lines
        .iter()
        .filter(|l| l.get("header").is_none())
        .map(|l| {
            let mut l = l.clone();
            if !keep_positions {
                if let Some(e) = l.get_mut("event") {
                    e.as_object_mut().expect("object").remove("global_position");
                }
                if let Some(c) = l.get_mut("checkpoint") {
                    c.as_object_mut().expect("object").remove("position");
                }
            }
            l
        })
        .collect()
}

fn events_of(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter_map(|l| l.get("event")).collect()
}

fn stats_events(db: &Db) -> u64 {
    db.run(&["stats", "--json"]).ok().json()["events"]
        .as_u64()
        .expect("events count")
}

fn file_in(db: &Db, name: &str) -> PathBuf {
    db.dir.path().join(name)
}

#[test]
fn round_trip_sqlite_postgres_sqlite_gives_the_identical_log() {
    let Some(pg) = Db::postgres() else { return };
    let src = source(20);
    let original = export(&src);
    let n = events_of(&original).len();
    assert!(n > 40, "a log worth the name: {n}");
    let header = &original[0]["header"];
    assert_eq!(header["source_backend"], "sqlite");
    assert_eq!(header["head_position"], n.to_string());
    let snapshots = original
        .iter()
        .filter(|l| l.get("snapshot").is_some())
        .count();
    assert!(snapshots >= 1, "the demo's and the one created");
    assert_eq!(
        original.last().expect("trailer")["trailer"],
        // The test's checkpoint and the demo's account_balances@v1.
        json!({"events": n, "checkpoints": 2, "snapshots": snapshots, "keys": 4, "erasures": 0})
    );

    let first = file_in(&src, "first.jsonl");
    export_to(&src, &first);
    pg.run(&["init"]).ok();
    let run = import(&pg, &first, &[]).ok();
    assert!(
        run.stdout
            .contains(&format!("imported {n} events (0 already present")),
        "{run:#?}"
    );
    let via_pg = export(&pg);
    assert_eq!(via_pg[0]["header"]["source_backend"], "postgres");
    // Everything but the positions, in the same order.
    assert_eq!(body(&via_pg, false), body(&original, false));
    // The checkpoint moved to the new position of event 20.
    let pg_events = events_of(&via_pg);
    let cp = via_pg
        .iter()
        .filter_map(|l| l.get("checkpoint"))
        .find(|c| c["name"] == "balances")
        .expect("checkpoint");
    assert_eq!(cp["position"], pg_events[19]["global_position"]);

    let second = file_in(&pg, "second.jsonl");
    export_to(&pg, &second);
    let back = Db::sqlite();
    import(&back, &second, &[]).ok();
    let again = export(&back);
    // SQLite numbers its positions from 1 in order: the very same log.
    assert_eq!(body(&again, true), body(&original, true));
}

#[test]
fn import_twice_adds_nothing() {
    let src = source(5);
    let file = file_in(&src, "dump.jsonl");
    export_to(&src, &file);
    let n = events_of(&export(&src)).len();
    let dst = Db::sqlite();
    import(&dst, &file, &["--batch-size", "7"]).ok();
    let once = export(&dst);
    let run = import(&dst, &file, &["--batch-size", "7"]).ok();
    assert!(
        run.stdout
            .contains(&format!("imported 0 events ({n} already present")),
        "{run:#?}"
    );
    assert!(run.stdout.contains("checkpoint balances -> 5"), "{run:#?}");
    assert_eq!(body(&export(&dst), true), body(&once, true));
    assert_eq!(stats_events(&dst), n as u64);
}

#[test]
fn zst_files_round_trip() {
    let src = source(3);
    let file = file_in(&src, "dump.jsonl.zst");
    export_to(&src, &file);
    let bytes = std::fs::read(&file).expect("read the export");
    assert_eq!(&bytes[..4], &[0x28, 0xb5, 0x2f, 0xfd], "a zstd frame");
    let dst = Db::sqlite();
    import(&dst, &file, &[]).ok();
    assert_eq!(body(&export(&dst), true), body(&export(&src), true));
}

/// Writes the first `keep` lines of `from` to `to`, then `tail` bytes of
/// the next line (a line cut in the middle).
fn cut(from: &Path, to: &Path, keep: usize, tail: Option<usize>) {
    let text = std::fs::read_to_string(from).expect("read the export");
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut out: String = lines[..keep].concat();
    if let Some(t) = tail {
        out.push_str(&lines[keep][..t]);
    }
    std::fs::write(to, out).expect("write the cut file");
}

/// The key and erasure lines after the header (the demo's four accounts'
/// keys in [`source`]): the events start after them.
fn key_lines(file: &Path) -> usize {
    let text = std::fs::read_to_string(file).expect("read the export");
    let n = text
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with(r#"{"subject_key""#) || l.starts_with(r#"{"erasure""#))
        .count();
    assert_eq!(n, 4, "the demo's four accounts");
    n
}

#[test]
fn a_file_cut_inside_a_line_names_it_and_writes_only_complete_batches() {
    let src = source(30);
    let whole = file_in(&src, "dump.jsonl");
    export_to(&src, &whole);
    let k = key_lines(&whole);
    let bad = file_in(&src, "cut.jsonl");
    // Event 24 cut after 40 bytes; batches of 10 events are events 1-10 and
    // 11-20, both complete; the batch of events 21-30 holds event 24.
    cut(&whole, &bad, 24 + k, Some(40));
    let dst = Db::sqlite();
    import(&dst, &bad, &["--batch-size", "10"])
        .fails(2, &[&format!("line {}", 25 + k), "incomplete"]);
    assert_eq!(stats_events(&dst), 20);
    // No checkpoint was saved from a file without its trailer.
    assert!(export(&dst).iter().all(|l| l.get("checkpoint").is_none()));
    // The whole file then completes the import.
    import(&dst, &whole, &["--batch-size", "10"]).ok();
    assert_eq!(body(&export(&dst), true), body(&export(&src), true));
}

#[test]
fn a_file_cut_at_a_line_boundary_is_truncated_without_its_trailer() {
    let src = source(30);
    let whole = file_in(&src, "dump.jsonl");
    export_to(&src, &whole);
    let lines = std::fs::read_to_string(&whole)
        .expect("read")
        .lines()
        .count();
    let n = events_of(&export(&src)).len();
    let k = key_lines(&whole);

    // Cut after event 25, inside the third batch of 10: two batches written.
    let bad = file_in(&src, "cut.jsonl");
    cut(&whole, &bad, 26 + k, None);
    let dst = Db::sqlite();
    import(&dst, &bad, &["--batch-size", "10"]).fails(
        2,
        &[&format!("ends after line {}", 26 + k), "without a trailer"],
    );
    assert_eq!(stats_events(&dst), 20);

    // Only the trailer missing: every event and the snapshot are written
    // (their parts ended), the checkpoint is not.
    let no_trailer = file_in(&src, "no-trailer.jsonl");
    cut(&whole, &no_trailer, lines - 1, None);
    let dst = Db::sqlite();
    import(&dst, &no_trailer, &["--batch-size", "10"])
        .fails(2, &[&format!("ends after line {}", lines - 1)]);
    assert_eq!(stats_events(&dst), n as u64);
    assert!(export(&dst).iter().all(|l| l.get("checkpoint").is_none()));
}

#[test]
fn a_corrupt_line_is_named() {
    let src = source(3);
    let whole = file_in(&src, "dump.jsonl");
    export_to(&src, &whole);
    let text = std::fs::read_to_string(&whole).expect("read");
    let k = key_lines(&whole);
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    // The fourth event's line.
    lines[4 + k] = r#"{"event": {"stream_id": 12}}"#.into();
    let bad = file_in(&src, "bad.jsonl");
    std::fs::write(&bad, lines.join("\n") + "\n").expect("write");
    let dst = Db::sqlite();
    import(&dst, &bad, &["--batch-size", "2"])
        .fails(2, &[&format!("line {}", 5 + k), "not an export line"]);
    // Events 1-2 were one complete batch; event 3 waited for the next line.
    assert_eq!(stats_events(&dst), 2);

    // A trailer whose counts disagree with the lines: the events' batches
    // are written (their part ended), the checkpoint is not.
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let last = lines.len() - 1;
    let n = lines.len() as u64;
    // The source has two checkpoints: the test's own and the demo's
    // account_balances@v1.
    lines[last] = lines[last].replace("\"checkpoints\":2", "\"checkpoints\":3");
    let bad = file_in(&src, "bad-trailer.jsonl");
    std::fs::write(&bad, lines.join("\n") + "\n").expect("write");
    let dst = Db::sqlite();
    import(&dst, &bad, &[]).fails(2, &[&format!("line {n}"), "trailer counts"]);
    assert!(export(&dst).iter().all(|l| l.get("checkpoint").is_none()));
}

#[test]
fn a_conflicting_stream_is_reported_and_the_others_are_imported() {
    let src = source(3);
    let whole = file_in(&src, "dump.jsonl");
    export_to(&src, &whole);
    let lines = export(&src);
    let events = events_of(&lines);
    let stream = first_stream(&src);
    let in_stream = events.iter().filter(|e| e["stream_id"] == stream).count();

    let dst = Db::sqlite();
    dst.run(&[
        "append",
        &stream,
        "--type",
        "Opened",
        "--data",
        r#"{"owner":"someone else"}"#,
    ])
    .ok();
    let run = import(&dst, &whole, &["--batch-size", "5"]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(
        run.stdout
            .contains(&format!("conflict: stream {stream} version 1")),
        "{run:#?}"
    );
    assert!(run.stderr.contains("1 streams conflict"), "{run:#?}");
    // Nothing of that stream was written; every other event was.
    assert_eq!(
        stats_events(&dst),
        (events.len() - in_stream + 1) as u64,
        "{run:#?}"
    );
    // Its snapshot is ahead of the target's stream: skipped.
    assert!(run.stdout.contains("snapshots (1 skipped)"), "{run:#?}");
    let mine = dst.run(&["read", &stream, "--json"]).ok().json_lines();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0]["data"]["owner"], "someone else");
}

#[test]
fn filters_select_events_and_leave_checkpoints_out() {
    let src = source(3);
    src.run(&["append", "Other-1", "--type", "Noted", "--data", "{}"])
        .ok();
    let all = export(&src);
    let only = src
        .run(&["export", "--category", "Other"])
        .ok()
        .json_lines();
    let events = events_of(&only);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["stream_id"], "Other-1");
    // No checkpoint in a filtered export; no Account snapshot either.
    assert!(only
        .iter()
        .all(|l| l.get("checkpoint").is_none() && l.get("snapshot").is_none()));
    let accounts = src
        .run(&["export", "--category", "Account"])
        .ok()
        .json_lines();
    assert_eq!(events_of(&accounts).len(), events_of(&all).len() - 1);
    assert!(accounts.iter().any(|l| l.get("snapshot").is_some()));
    let later = src
        .run(&["export", "--since", "2999-01-01T00:00:00Z"])
        .ok()
        .json_lines();
    assert_eq!(later.len(), 2, "header and trailer: {later:?}");
    assert_eq!(
        later[1]["trailer"],
        json!({"events": 0, "checkpoints": 0, "snapshots": 0, "keys": 0, "erasures": 0})
    );
}

/// The demo's accounts `demo1-1` (ann), `demo1-2` (bob) and `demo1-3`
/// (cleo), whose owners and e-mails are personal data, in a new SQLite
/// file with the master key the demo generated beside it.
fn personal_source() -> Db {
    let db = Db::sqlite();
    db.run(&["demo", "--accounts", "3", "--operations", "30"])
        .ok();
    db
}

/// The decrypted data of an account's `Opened`.
fn opened(db: &Db, account: &str) -> Value {
    db.run(&["read", &format!("Account-{account}"), "--json"])
        .ok()
        .json_lines()[0]["data"]
        .clone()
}

fn ann() -> Value {
    json!({"account": "demo1-1", "owner": "ann", "email": "ann.demo1-1@mail.example"})
}

fn bob() -> Value {
    json!({"account": "demo1-2", "owner": "bob", "email": "bob.demo1-2@mail.example"})
}

fn erased(account: &str) -> Value {
    json!({"account": account, "owner": "[erased]", "email": "[erased]"})
}

/// Gives `db` the master key of `from` (for PostgreSQL through the
/// `--key-file` its commands pass).
fn share_key(from: &Db, db: &Db) {
    std::fs::copy(from.key_file(), db.key_file()).expect("copy the key file");
}

/// Rows of a table, counted through an `UPDATE` that changes nothing (the
/// CLI has no command that counts erasure records).
fn rows(db: &Db, table: &str, column: &str) -> u64 {
    db.execute_sql(&format!("UPDATE {table} SET {column} = {column}"))
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Personal data exported from SQLite into a fresh store of each backend
/// with the same master key: the events and snapshots decrypt there, a
/// subject forgotten in the source reads as erased and its erasure is
/// recorded, a wrong master key is reported as such, a rerun changes
/// nothing, and the file holds neither the plaintext nor the master key.
/// Then the same from the target back into SQLite (PostgreSQL -> SQLite).
fn keys_and_erasures_travel_with_the_events(dst: &Db) {
    let src = personal_source();
    let before = file_in(&src, "before.jsonl");
    export_to(&src, &before);
    src.run(&["gdpr", "forget", "demo1-2", "--by", "dpo"]).ok();
    let plain = file_in(&src, "after.jsonl");
    let zst = file_in(&src, "after.jsonl.zst");
    export_to(&src, &plain);
    export_to(&src, &zst);

    // The file: wrapped keys for ann and cleo, bob's erasure and no key
    // for him; neither plaintext nor the master key, in any form.
    let text = std::fs::read(&plain).expect("read the export");
    let lines: Vec<Value> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("JSON line"))
        .collect();
    assert_eq!(lines[0]["header"]["version"], 2);
    let keys: Vec<&Value> = lines.iter().filter_map(|l| l.get("subject_key")).collect();
    let subjects: Vec<&str> = keys
        .iter()
        .map(|k| k["subject"].as_str().expect("subject"))
        .collect();
    assert_eq!(subjects, ["demo1-1", "demo1-3"]);
    let erasure = lines
        .iter()
        .find_map(|l| l.get("erasure"))
        .expect("an erasure line");
    assert_eq!(erasure["subject"], "demo1-2");
    assert_eq!(erasure["erased_by"], "dpo");
    // Keys and erasures come first, right after the header.
    assert!(lines[1..4]
        .iter()
        .all(|l| l.get("subject_key").is_some() || l.get("erasure").is_some()));
    assert_eq!(lines.last().expect("trailer")["trailer"]["keys"], 2);
    assert_eq!(lines.last().expect("trailer")["trailer"]["erasures"], 1);
    let master_hex = std::fs::read_to_string(src.key_file()).expect("key file");
    let master_hex = master_hex.trim();
    let master_bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&master_hex[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    for bytes in [&text, &std::fs::read(&zst).expect("read the zst export")] {
        for needle in ["mail.example", "\"ann\"", "\"cleo\"", master_hex] {
            assert!(!contains(bytes, needle), "{needle} in the export");
        }
        assert!(!contains(bytes, &master_hex.to_uppercase()));
        assert!(!bytes.windows(32).any(|w| w == master_bytes.as_slice()));
    }
    // The key's base64, as a key file may hold it.
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &master_bytes);
    assert!(!contains(&text, &b64));

    // Into a fresh store with the same master key.
    dst.run(&["init"]).ok();
    share_key(&src, dst);
    let run = import(dst, &before, &[]).ok();
    assert!(
        run.stdout
            .contains("imported 3 subject keys (0 already present), 0 erasures"),
        "{run:#?}"
    );
    assert_eq!(opened(dst, "demo1-2"), bob());
    // The later file (compressed): bob's key goes in the target too.
    let run = import(dst, &zst, &[]).ok();
    assert!(
        run.stdout.contains(
            "imported 0 subject keys (2 already present), 1 erasures (0 already recorded), \
             1 keys of forgotten subjects deleted"
        ),
        "{run:#?}"
    );
    assert_eq!(opened(dst, "demo1-1"), ann());
    assert_eq!(opened(dst, "demo1-2"), erased("demo1-2"));
    let status = dst.run(&["gdpr", "status", "demo1-2"]).ok();
    assert!(status.stdout.contains("forgotten at"), "{}", status.stdout);
    assert!(status.stdout.contains("by \"dpo\""), "{}", status.stdout);
    // The encrypted snapshot decrypts too.
    let loaded = dst
        .run(&["aggregate", "Account", "demo1-1", "--json"])
        .ok()
        .json();
    assert_eq!(loaded["state"]["email"], "ann.demo1-1@mail.example");
    let events = stats_events(dst);

    // A rerun changes nothing.
    let run = import(dst, &plain, &[]).ok();
    assert!(
        run.stdout.contains(
            "imported 0 subject keys (2 already present), 0 erasures (1 already recorded), \
             0 keys"
        ),
        "{run:#?}"
    );
    assert_eq!(rows(dst, "erasure_log", "erased_by"), 1);
    assert_eq!(rows(dst, "subject_keys", "subject"), 2);
    assert_eq!(stats_events(dst), events);

    // A wrong master key in the target: reported as such, not as erased.
    let right = file_in(dst, "right.key");
    std::fs::rename(dst.key_file(), &right).expect("move the key away");
    std::fs::write(dst.key_file(), format!("{}\n", "cd".repeat(32))).expect("wrong key");
    dst.run(&["read", "Account-demo1-1"])
        .fails(2, &["wrong master key", "demo1-1"]);
    std::fs::rename(&right, dst.key_file()).expect("restore the key");

    // And on from the target into a fresh SQLite file.
    let again = file_in(dst, "again.jsonl.zst");
    export_to(dst, &again);
    let back = Db::sqlite();
    share_key(&src, &back);
    let run = import(&back, &again, &[]).ok();
    assert!(
        run.stdout
            .contains("imported 2 subject keys (0 already present), 1 erasures"),
        "{run:#?}"
    );
    assert_eq!(opened(&back, "demo1-1"), ann());
    assert_eq!(opened(&back, "demo1-2"), erased("demo1-2"));
    let status = back.run(&["gdpr", "status", "demo1-2"]).ok();
    assert!(status.stdout.contains("forgotten at"), "{}", status.stdout);
}

/// The target encrypted the same subject with another key: the import names
/// the subject and the key's line, and writes nothing at all (no key, no
/// event).
fn a_different_key_in_the_target_is_named_and_nothing_is_written(dst: &Db) {
    let src = personal_source();
    let file = file_in(&src, "dump.jsonl");
    export_to(&src, &file);
    // The target's own demo: the same account ids, its own master key.
    dst.run(&["init"]).ok();
    dst.run(&["demo", "--accounts", "1", "--operations", "3"])
        .ok();
    let events = stats_events(dst);
    let keys = rows(dst, "subject_keys", "subject");
    import(dst, &file, &[]).fails(
        2,
        &[
            "line 2",
            "subject \"demo1-1\"",
            "differs",
            "nothing was imported",
        ],
    );
    assert_eq!(stats_events(dst), events);
    assert_eq!(rows(dst, "subject_keys", "subject"), keys);
    assert_eq!(opened(dst, "demo1-1")["owner"], "ann");
}

/// A file written before keys were exported (version 1: no key lines, a
/// trailer without their counts) still imports; its encrypted events then
/// lack their keys in the target, which says so.
fn a_version_1_file_without_keys_still_imports(dst: &Db) {
    let src = personal_source();
    let file = file_in(&src, "dump.jsonl");
    export_to(&src, &file);
    let text = std::fs::read_to_string(&file).expect("read");
    let mut old = String::new();
    let mut events = 0;
    for line in text.lines() {
        let mut v: Value = serde_json::from_str(line).expect("JSON");
        if v.get("subject_key").is_some() || v.get("erasure").is_some() {
            continue;
        }
        if let Some(h) = v.get_mut("header") {
            h["version"] = json!(1);
        }
        if let Some(t) = v.get_mut("trailer").and_then(Value::as_object_mut) {
            t.remove("keys");
            t.remove("erasures");
        }
        events += u64::from(v.get("event").is_some());
        old.push_str(&v.to_string());
        old.push('\n');
    }
    let v1 = file_in(&src, "v1.jsonl");
    std::fs::write(&v1, old).expect("write");
    dst.run(&["init"]).ok();
    share_key(&src, dst);
    let run = import(dst, &v1, &[]).ok();
    assert!(!run.stdout.contains("subject keys"), "{run:#?}");
    assert_eq!(stats_events(dst), events);
    dst.run(&["read", "Account-demo1-1"])
        .fails(2, &["no data key for subject \"demo1-1\""]);
    // The version 2 file then brings the keys.
    import(dst, &file, &[]).ok();
    assert_eq!(opened(dst, "demo1-1"), ann());
}
