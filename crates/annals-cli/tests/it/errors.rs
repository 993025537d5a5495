//! Bad input exits with status 2 and one clear line on stderr, and writes
//! nothing: not an event, not even a new database file.

use crate::util::{annals_in, Db};

/// Runs `args` against a fresh database and against one holding one event,
/// expecting the same clear failure, and checks nothing was written.
#[track_caller]
fn rejects(args: &[&str], needles: &[&str]) {
    let fresh = Db::sqlite();
    fresh.run(args).fails(2, needles);
    assert!(
        !fresh.sqlite_path().exists(),
        "bad input must not create the database"
    );

    let used = Db::sqlite();
    used.run(&["append", "Account-1", "--type", "Opened", "--data", "{}"])
        .ok();
    used.run(args).fails(2, needles);
    assert_eq!(used.all_events().len(), 1, "nothing written");
}

#[test]
fn unknown_url_scheme_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    annals_in(
        dir,
        &[
            "read-all",
            "--database-url",
            "mysql://root@localhost/annals",
        ],
    )
    .fails(2, &["unsupported database URL scheme", "\"mysql\""]);
    annals_in(dir, &["init", "--database-url", "annals.db"]).fails(2, &["no scheme"]);
    annals_in(dir, &["demo", "--database-url", "sqlite://"]).fails(2, &["no file path"]);
    // Through the environment variable too.
    let out = crate::util::command(dir)
        .args(["stats"])
        .env("ANNALS_DATABASE_URL", "redis://localhost")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("\"redis\""), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(
        std::fs::read_dir(dir).expect("list").count(),
        0,
        "no file created"
    );
}

#[test]
fn invalid_json_data() {
    rejects(
        &[
            "append",
            "Account-1",
            "--type",
            "Deposited",
            "--data",
            "{amount: 5",
        ],
        &["--data", "not valid JSON"],
    );
}

#[test]
fn invalid_metadata() {
    rejects(
        &[
            "append",
            "Account-1",
            "--type",
            "X",
            "--data",
            "{}",
            "--metadata",
            "[1,2]",
        ],
        &["--metadata", "metadata must be a JSON object"],
    );
    rejects(
        &[
            "append",
            "Account-1",
            "--type",
            "X",
            "--data",
            "{}",
            "--metadata",
            r#"{"correlation_id": "not-a-uuid"}"#,
        ],
        &["--metadata", "correlation_id"],
    );
}

#[test]
fn bad_stream_names() {
    rejects(
        &["append", "Account", "--type", "Opened", "--data", "{}"],
        &["invalid stream name", "\"Account\""],
    );
    rejects(
        &[
            "append",
            "Account-a\u{7}b",
            "--type",
            "Opened",
            "--data",
            "{}",
        ],
        &["invalid stream name", "control character"],
    );
    // A leading '-' reads as an option: clap says so, on one line.
    rejects(
        &["append", "-x", "--type", "Opened", "--data", "{}"],
        &["'-x'"],
    );
    rejects(&["read", "Account-"], &["invalid stream name", "empty id"]);
    rejects(
        &["aggregate", "Account", ""],
        &["invalid stream name", "empty id"],
    );
}

#[test]
fn negative_expected_version() {
    rejects(
        &[
            "append",
            "Account-1",
            "--type",
            "Deposited",
            "--data",
            "{}",
            "--expected-version",
            "-1",
        ],
        &["--expected-version", "\"-1\"", "any, no-stream, exists"],
    );
    rejects(
        &[
            "append",
            "Account-1",
            "--type",
            "Deposited",
            "--data",
            "{}",
            "--expected-version",
            "latest",
        ],
        &["--expected-version", "latest"],
    );
}

#[test]
fn bad_versions_and_counts() {
    rejects(&["read", "Account-1", "--from", "-2"], &["--from", "-2"]);
    rejects(
        &["read", "Account-1", "--from", "0"],
        &["--from", "start at 1"],
    );
    rejects(&["read-all", "--limit", "-5"], &["--limit", "-5"]);
    rejects(
        &[
            "append",
            "Account-1",
            "--type",
            "X",
            "--data",
            "{}",
            "--event-version",
            "0",
        ],
        &["--event-version", "start at 1"],
    );
    rejects(
        &["aggregate", "Account", "1", "--at-version", "x"],
        &["--at-version"],
    );
}

#[test]
fn bad_read_all_position() {
    rejects(
        &["read-all", "--from", "x:y"],
        &["--from", "invalid global position", "x:y"],
    );
    rejects(&["read-all", "--from", "-1"], &["--from", "-1"]);
}

#[test]
fn bad_as_of_time() {
    rejects(
        &["read", "Account-1", "--as-of", "yesterday"],
        &["--as-of", "RFC 3339"],
    );
}

#[test]
fn bad_event_type_and_category() {
    rejects(
        &["append", "Account-1", "--type", "", "--data", "{}"],
        &["invalid event", "event type"],
    );
    rejects(&["read-all", "--category", "Acc-ount"], &["--category"]);
}

#[test]
fn unknown_aggregate_type_lists_the_registered_ones() {
    rejects(
        &["aggregate", "Basket", "1"],
        &[
            "unknown aggregate type \"Basket\"",
            "registered types are Account",
        ],
    );
}

#[test]
fn reading_a_missing_sqlite_file_does_not_create_it() {
    let db = Db::sqlite();
    for args in [
        &["read", "Account-1"][..],
        &["read-all"],
        &["stats"],
        &["aggregate", "Account", "1"],
    ] {
        db.run(args).fails(2, &["does not exist", "annals init"]);
        assert!(!db.sqlite_path().exists());
    }
}

#[test]
fn unreachable_databases() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing_dir = dir.path().join("no/such/dir/x.db");
    let url = format!("sqlite://{}", missing_dir.display());
    annals_in(dir.path(), &["init", "--database-url", &url])
        .fails(2, &["directory", "does not exist"]);
    // A directory where the file should be.
    let url = format!("sqlite://{}", dir.path().display());
    annals_in(dir.path(), &["init", "--database-url", &url]).fails(2, &[]);

    // Nothing listens on port 1.
    let pg = "postgres://annals@127.0.0.1:1/annals";
    annals_in(dir.path(), &["stats", "--database-url", pg]).fails(2, &[]);
    annals_in(
        dir.path(),
        &[
            "append",
            "Account-1",
            "--type",
            "Opened",
            "--data",
            "{}",
            "--database-url",
            pg,
        ],
    )
    .fails(2, &[]);
}

#[test]
fn postgres_passwords_are_not_printed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pg = "postgres://annals:hunter2@127.0.0.1:1/annals";
    let run = annals_in(dir.path(), &["stats", "--database-url", pg]).fails(2, &[]);
    assert!(!run.stderr.contains("hunter2"), "{}", run.stderr);
}
