//! `annals export` and `annals import`: the round trip SQLite -> PostgreSQL
//! -> SQLite, a rerun, zstd files, truncated and corrupt files, and a
//! conflicting stream.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::{Db, Run};

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
        serde_json::json!({"events": n, "checkpoints": 2, "snapshots": snapshots})
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

#[test]
fn a_file_cut_inside_a_line_names_it_and_writes_only_complete_batches() {
    let src = source(30);
    let whole = file_in(&src, "dump.jsonl");
    export_to(&src, &whole);
    let bad = file_in(&src, "cut.jsonl");
    // Line 25 (event 24) cut after 40 bytes; batches of 10 events are lines
    // 2-11 and 12-21, both complete; the batch of lines 22-31 holds line 25.
    cut(&whole, &bad, 24, Some(40));
    let dst = Db::sqlite();
    import(&dst, &bad, &["--batch-size", "10"]).fails(2, &["line 25", "incomplete"]);
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

    // Cut after line 26, inside the third batch of 10: two batches written.
    let bad = file_in(&src, "cut.jsonl");
    cut(&whole, &bad, 26, None);
    let dst = Db::sqlite();
    import(&dst, &bad, &["--batch-size", "10"])
        .fails(2, &["ends after line 26", "without a trailer"]);
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
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines[4] = r#"{"event": {"stream_id": 12}}"#.into();
    let bad = file_in(&src, "bad.jsonl");
    std::fs::write(&bad, lines.join("\n") + "\n").expect("write");
    let dst = Db::sqlite();
    import(&dst, &bad, &["--batch-size", "2"]).fails(2, &["line 5", "not an export line"]);
    // Lines 2-3 were one complete batch; line 4 waited for line 5.
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
        serde_json::json!({"events": 0, "checkpoints": 0, "snapshots": 0})
    );
}
