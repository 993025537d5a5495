//! `annals append --data @FILE | -` and `--metadata @FILE | -`: payloads
//! beyond the shell's argument limit (one argument may hold at most 128 KiB
//! on Linux) come from a file or standard input.

use std::io::Write;
use std::process::Stdio;

use serde_json::{json, Value};

use crate::util::{Db, Run};

/// A payload of a little over 2 MiB.
fn big_payload() -> Value {
    json!({"owner": "ann", "blob": "x".repeat(2 << 20)})
}

/// The one event stored, as `read-all --json` prints it.
fn only_event(db: &Db) -> Value {
    let mut events = db.all_events();
    assert_eq!(events.len(), 1);
    events.remove(0)
}

/// Runs `annals append` with `stdin` piped in.
fn append_with_stdin(db: &Db, args: &[&str], stdin: Vec<u8>) -> Run {
    let mut child = db
        .command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run annals");
    let mut pipe = child.stdin.take().expect("stdin");
    // Written from a thread: the child's output must be drained meanwhile.
    let writer = std::thread::spawn(move || pipe.write_all(&stdin));
    let out = child.wait_with_output().expect("annals ran");
    writer.join().expect("writer").expect("stdin written");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn append_reads_a_large_payload_from_a_file() {
    let db = Db::sqlite();
    let data = big_payload();
    let file = db.dir.path().join("payload.json");
    std::fs::write(&file, serde_json::to_vec(&data).expect("json")).expect("write");
    let metadata = db.dir.path().join("meta.json");
    std::fs::write(&metadata, r#"{"user": "ops"}"#).expect("write");
    let data_arg = format!("@{}", file.display());
    let meta_arg = format!("@{}", metadata.display());
    db.run(&[
        "append",
        "Account-1",
        "--type",
        "Opened",
        "--data",
        &data_arg,
        "--metadata",
        &meta_arg,
    ])
    .ok();
    let event = only_event(&db);
    assert_eq!(event["data"], data);
    assert_eq!(event["metadata"], json!({"user": "ops"}));
}

#[test]
fn append_reads_a_large_payload_from_standard_input() {
    let db = Db::sqlite();
    let data = big_payload();
    let run = append_with_stdin(
        &db,
        &[
            "append",
            "Account-1",
            "--type",
            "Opened",
            "--data",
            "-",
            "--json",
        ],
        serde_json::to_vec(&data).expect("json"),
    );
    assert_eq!(run.code, 0, "{run:#?}");
    let printed = run.json();
    assert_eq!(printed["data"], data);
    assert_eq!(only_event(&db)["data"], data);

    // Metadata from standard input, the payload inline.
    let run = append_with_stdin(
        &db,
        &[
            "append",
            "Account-2",
            "--type",
            "Opened",
            "--data",
            "{}",
            "--metadata",
            "-",
            "--json",
        ],
        br#"{"user": "ops"}"#.to_vec(),
    );
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(run.json()["metadata"], json!({"user": "ops"}));
}

#[test]
fn a_missing_data_file_is_named() {
    let db = Db::sqlite();
    db.run(&[
        "append",
        "Account-1",
        "--type",
        "Opened",
        "--data",
        "@no-such-payload.json",
    ])
    .fails(2, &["--data file no-such-payload.json", "cannot read"]);
    assert!(!db.sqlite_path().exists(), "bad input creates no database");
}

#[test]
fn invalid_json_in_a_file_names_the_file_and_where() {
    let db = Db::sqlite();
    let file = db.dir.path().join("broken.json");
    std::fs::write(&file, "{\n  \"owner\": \"ann\",\n  \"amount\": ,\n}\n").expect("write");
    let arg = format!("@{}", file.display());
    db.run(&["append", "Account-1", "--type", "Opened", "--data", &arg])
        .fails(
            2,
            &[
                "--data file",
                "broken.json",
                "not valid JSON",
                "line 3 column 13",
            ],
        );
    // Metadata is checked the same way, and must be a metadata object.
    std::fs::write(&file, r#"{"correlation_id": "req-123"}"#).expect("write");
    db.run(&[
        "append",
        "Account-1",
        "--type",
        "Opened",
        "--data",
        "{}",
        "--metadata",
        &arg,
    ])
    .fails(2, &["--metadata file", "broken.json", "correlation_id"]);
    assert!(!db.sqlite_path().exists(), "bad input creates no database");
}

#[test]
fn data_and_metadata_cannot_both_read_standard_input() {
    let db = Db::sqlite();
    let run = append_with_stdin(
        &db,
        &[
            "append",
            "Account-1",
            "--type",
            "Opened",
            "--data",
            "-",
            "--metadata",
            "-",
        ],
        b"{}".to_vec(),
    );
    run.fails(2, &["--data", "--metadata", "standard input"]);
    // Empty standard input is not JSON, and says where it came from.
    append_with_stdin(
        &db,
        &["append", "Account-1", "--type", "Opened", "--data", "-"],
        Vec::new(),
    )
    .fails(2, &["--data from standard input", "not valid JSON"]);
    assert!(!db.sqlite_path().exists(), "bad input creates no database");
}
