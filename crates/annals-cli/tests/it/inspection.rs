//! Inspection: `read` / `read-all` filters and `--follow`, `aggregate
//! --as-of`, and what `stats` adds (largest streams, append rate, size), on
//! SQLite and (when `ANNALS_TEST_POSTGRES_URL` is set) PostgreSQL.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::util::{per_backend, Db};

per_backend!(
    read_all_filters_by_category_type_and_time,
    read_filters_one_stream_by_type_and_time,
    read_all_follow_prints_new_events_as_they_arrive,
    read_follow_tails_one_stream,
    aggregate_as_of_folds_what_was_recorded_by_then,
    stats_show_largest_streams_append_rate_and_size,
    event_shows_what_it_caused_and_its_correlation_tree,
);

/// How long a test waits for a follower's line before it fails: far longer
/// than a poll interval, so only a follower that never prints trips it.
const PATIENCE: Duration = Duration::from_secs(60);

fn append(db: &Db, stream: &str, event_type: &str, data: Value) -> Value {
    let data = data.to_string();
    db.run(&[
        "append", stream, "--type", event_type, "--data", &data, "--json",
    ])
    .ok()
    .json()
}

fn recorded_at(event: &Value) -> DateTime<Utc> {
    let text = event["recorded_at"].as_str().expect("recorded_at");
    DateTime::parse_from_rfc3339(text)
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// The `n` of each event's `{"n": n}` payload.
fn ns(events: &[Value]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e["data"]["n"].as_i64().expect("n"))
        .collect()
}

fn json_events(db: &Db, args: &[&str]) -> Vec<Value> {
    let mut all = args.to_vec();
    all.push("--json");
    db.run(&all).ok().json_lines()
}

/// Five events: `Ins-1` X1 Y2, `Other-1` X3, `Ins-2` Y4 X5, one append
/// (one process) each, so each has its own stamp. Returns them as appended.
fn five_events(db: &Db) -> Vec<Value> {
    db.run(&["init"]).ok();
    [
        ("Ins-1", "X", 1),
        ("Ins-1", "Y", 2),
        ("Other-1", "X", 3),
        ("Ins-2", "Y", 4),
        ("Ins-2", "X", 5),
    ]
    .into_iter()
    .map(|(stream, t, n)| append(db, stream, t, json!({ "n": n })))
    .collect()
}

pub fn read_all_filters_by_category_type_and_time(db: &Db) {
    let events = five_events(db);
    let t: Vec<DateTime<Utc>> = events.iter().map(recorded_at).collect();
    assert!(t.windows(2).all(|w| w[0] < w[1]), "distinct stamps: {t:?}");
    let (since, until) = (rfc3339(t[1]), rfc3339(t[3]));
    let got = |args: &[&str]| {
        let mut all = vec!["read-all"];
        all.extend_from_slice(args);
        ns(&json_events(db, &all))
    };
    assert_eq!(got(&[]), [1, 2, 3, 4, 5]);
    assert_eq!(got(&["--since", &since]), [2, 3, 4, 5]);
    assert_eq!(got(&["--until", &until]), [1, 2, 3, 4]);
    assert_eq!(got(&["--since", &since, "--until", &until]), [2, 3, 4]);
    assert_eq!(got(&["--category", "Ins", "--since", &since]), [2, 4, 5]);
    assert_eq!(
        got(&["--type", "X", "--since", &since, "--until", &until]),
        [3]
    );
    assert_eq!(
        got(&["--category", "Ins", "--type", "X", "--type", "Y"]),
        [1, 2, 4, 5]
    );
    assert_eq!(got(&["--since", &since, "--limit", "2"]), [2, 3]);
    // An instant with an offset is the same instant.
    let offset = t[1]
        .with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).expect("offset"))
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
    assert_eq!(got(&["--since", &offset]), [2, 3, 4, 5]);
    // Nothing in the window: a note on stderr, nothing on stdout.
    let later = rfc3339(t[4] + chrono::Duration::hours(1));
    let run = db.run(&["read-all", "--since", &later]).ok();
    assert!(run.stdout.is_empty(), "{run:#?}");
    assert!(run.stderr.contains("no events"), "{run:#?}");
    // Bad input is named.
    db.run(&["read-all", "--since", "yesterday"])
        .fails(2, &["--since", "RFC 3339"]);
}

pub fn read_filters_one_stream_by_type_and_time(db: &Db) {
    let events = five_events(db);
    let t: Vec<DateTime<Utc>> = events.iter().map(recorded_at).collect();
    let got = |args: &[&str]| {
        let mut all = vec!["read", "Ins-2"];
        all.extend_from_slice(args);
        ns(&json_events(db, &all))
    };
    assert_eq!(got(&[]), [4, 5]);
    assert_eq!(got(&["--type", "X"]), [5]);
    assert_eq!(got(&["--since", &rfc3339(t[4])]), [5]);
    assert_eq!(got(&["--until", &rfc3339(t[3])]), [4]);
    // --limit counts what the filters keep.
    let mut all = vec!["read", "Ins-1", "--type", "Y", "--limit", "1"];
    all.push("--json");
    assert_eq!(ns(&db.run(&all).ok().json_lines()), [2]);
    assert_eq!(
        ns(&json_events(
            db,
            &["read", "Ins-1", "--since", &rfc3339(t[1]), "--limit", "5"]
        )),
        [2]
    );
    let t0 = rfc3339(t[0]);
    db.run(&["read", "Ins-1", "--until", &t0, "--as-of", &t0])
        .fails(2, &["--as-of"]);
    db.run(&["read", "Ins-1", "--follow", "--backward"])
        .fails(2, &["--backward"]);
}

/// A running `annals … --follow --json`: its stdout lines arrive on a
/// channel (`None` when it closed). Killed when dropped, if still running.
struct Follower {
    child: Child,
    lines: Receiver<Option<String>>,
}

impl Follower {
    fn start(db: &Db, args: &[&str]) -> Self {
        let mut child = db
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the follower");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(line) => {
                        if tx.send(Some(line)).is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.send(None);
        });
        Follower { child, lines }
    }

    /// The next event the follower prints, waiting at most [`PATIENCE`].
    #[track_caller]
    fn next_event(&self) -> Value {
        match self.lines.recv_timeout(PATIENCE) {
            Ok(Some(line)) => serde_json::from_str(&line).expect("a JSON line"),
            Ok(None) => panic!("the follower stopped"),
            Err(e) => panic!("no event from the follower within {PATIENCE:?}: {e}"),
        }
    }

    /// Waits until the follower ends by itself; its exit code.
    #[track_caller]
    fn end(mut self) -> i32 {
        match self.lines.recv_timeout(PATIENCE) {
            Ok(None) => {}
            Ok(Some(line)) => panic!("unexpected output: {line}"),
            Err(e) => panic!("the follower did not end within {PATIENCE:?}: {e}"),
        }
        self.child
            .wait()
            .expect("wait for the follower")
            .code()
            .unwrap_or(-1)
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn read_all_follow_prints_new_events_as_they_arrive(db: &Db) {
    db.run(&["init"]).ok();
    append(db, "Watch-1", "X", json!({"n": 1}));
    let follower = Follower::start(
        db,
        &[
            "read-all",
            "--follow",
            "--json",
            "--poll-interval",
            "20ms",
            "--category",
            "Watch",
        ],
    );
    // What was there first, then what arrives, in order; other categories
    // are passed over.
    assert_eq!(follower.next_event()["data"]["n"], 1);
    append(db, "Other-1", "X", json!({"n": 99}));
    append(db, "Watch-2", "X", json!({"n": 2}));
    let second = follower.next_event();
    assert_eq!(second["data"]["n"], 2);
    assert_eq!(second["stream_id"], "Watch-2");
    append(db, "Watch-1", "Y", json!({"n": 3}));
    assert_eq!(follower.next_event()["data"]["n"], 3);
    drop(follower);

    // With --limit the follower stops by itself once it printed that many,
    // and a table is written event by event.
    let follower = Follower::start(
        db,
        &[
            "read-all",
            "--follow",
            "--limit",
            "4",
            "--type",
            "X",
            "--poll-interval",
            "20ms",
        ],
    );
    let header = follower.lines.recv_timeout(PATIENCE).expect("a line");
    assert!(
        // Right-aligned like the positions below it, which on PostgreSQL
        // may be wider than the header.
        header
            .as_deref()
            .is_some_and(|h| h.trim_start().starts_with("POSITION")),
        "{header:?}"
    );
    for _ in 0..3 {
        // Watch-1 X1, Other-1 X99, Watch-2 X2.
        let row = follower.lines.recv_timeout(PATIENCE).expect("a row");
        assert!(row.is_some_and(|r| r.contains(" X ")));
    }
    append(db, "Late-1", "X", json!({"n": 4}));
    let row = follower.lines.recv_timeout(PATIENCE).expect("a row");
    assert!(row.is_some_and(|r| r.contains("Late-1")));
    assert_eq!(follower.end(), 0);
}

pub fn read_follow_tails_one_stream(db: &Db) {
    db.run(&["init"]).ok();
    append(db, "Tail-1", "X", json!({"n": 1}));
    let follower = Follower::start(
        db,
        &[
            "read",
            "Tail-1",
            "--follow",
            "--json",
            "--type",
            "X",
            "--poll-interval",
            "20ms",
            "--limit",
            "3",
        ],
    );
    assert_eq!(follower.next_event()["stream_version"], 1);
    append(db, "Tail-2", "X", json!({"n": 100}));
    append(db, "Tail-1", "Y", json!({"n": 2}));
    append(db, "Tail-1", "X", json!({"n": 3}));
    let third = follower.next_event();
    assert_eq!(
        (third["stream_version"].clone(), third["data"]["n"].clone()),
        (json!(3), json!(3))
    );
    append(db, "Tail-1", "X", json!({"n": 4}));
    assert_eq!(follower.next_event()["data"]["n"], 4);
    assert_eq!(follower.end(), 0);
}

pub fn aggregate_as_of_folds_what_was_recorded_by_then(db: &Db) {
    db.run(&["init"]).ok();
    append(db, "Account-t", "Opened", json!({"owner": "t"}));
    let second = append(db, "Account-t", "Deposited", json!({"amount": 10}));
    append(db, "Account-t", "Deposited", json!({"amount": 5}));
    let t2 = rfc3339(recorded_at(&second));
    let view = db
        .run(&["aggregate", "Account", "t", "--as-of", &t2, "--json"])
        .ok()
        .json();
    assert_eq!(view["version"], 2, "{view}");
    assert_eq!(view["state"]["balance"], 10, "{view}");
    assert_eq!(view["snapshot_used"], false);
    let text = db
        .run(&["aggregate", "Account", "t", "--as-of", &t2])
        .ok()
        .stdout;
    assert!(text.contains(&format!("as of            {t2}")), "{text}");
    let now = rfc3339(Utc::now() + chrono::Duration::hours(1));
    let view = db
        .run(&["aggregate", "Account", "t", "--as-of", &now, "--json"])
        .ok()
        .json();
    assert_eq!(view["state"]["balance"], 15, "{view}");
    // Before the first event the aggregate did not exist: status 1.
    let before = rfc3339(recorded_at(&second) - chrono::Duration::days(1));
    let run = db.run(&["aggregate", "Account", "t", "--as-of", &before]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("did not exist at"), "{run:#?}");

    // A clock that stepped back: version 4 is stamped as early as version
    // 2. The state at t2 is still versions 1..2: the fold ends at version 3,
    // the first event recorded after t2.
    append(db, "Account-t", "Deposited", json!({"amount": 1}));
    let sql = "UPDATE events SET recorded_at = (SELECT recorded_at FROM events \
               WHERE stream_id = 'Account-t' AND stream_version = 2) \
               WHERE stream_id = 'Account-t' AND stream_version = 4";
    assert_eq!(db.execute_sql(sql), 1);
    let view = db
        .run(&["aggregate", "Account", "t", "--as-of", &t2, "--json"])
        .ok()
        .json();
    assert_eq!(view["version"], 2, "{view}");
    assert_eq!(view["state"]["balance"], 10, "{view}");
    // --as-of and --at-version are two answers to one question.
    db.run(&[
        "aggregate",
        "Account",
        "t",
        "--as-of",
        &t2,
        "--at-version",
        "1",
    ])
    .fails(2, &["--at-version"]);
}

pub fn stats_show_largest_streams_append_rate_and_size(db: &Db) {
    db.run(&["init"]).ok();
    for (stream, n) in [("Big-2", 3), ("Small-1", 1), ("Big-1", 3), ("Mid-1", 2)] {
        for i in 0..n {
            append(db, stream, "E", json!({ "n": i }));
        }
    }
    let s = db.run(&["stats", "--json", "--top", "3"]).ok().json();
    assert_eq!(
        s["largest_streams"],
        json!([
            {"stream_id": "Big-1", "version": 3},
            {"stream_id": "Big-2", "version": 3},
            {"stream_id": "Mid-1", "version": 2},
        ])
    );
    assert_eq!(s["appended"]["last_hour"]["events"], 9, "{s}");
    assert_eq!(s["appended"]["last_day"]["events"], 9, "{s}");
    let per_second = s["appended"]["last_hour"]["per_second"]
        .as_f64()
        .expect("rate");
    assert!((per_second - 9.0 / 3600.0).abs() < 1e-9, "{s}");
    let storage = &s["storage"];
    let store_bytes = storage["store_bytes"].as_u64().expect("store bytes");
    assert!(store_bytes > 0, "{s}");
    if db.is_postgres() {
        let database = storage["database_bytes"].as_u64().expect("database bytes");
        assert!(database >= store_bytes, "{s}");
        assert!(storage["free_bytes"].is_null(), "{s}");
    } else {
        // The file's size once the write-ahead log is folded into it.
        let conn = rusqlite::Connection::open(db.sqlite_path()).expect("open");
        let busy: i64 = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .expect("checkpoint");
        assert_eq!(busy, 0, "the checkpoint ran to the end");
        drop(conn);
        let file = std::fs::metadata(db.sqlite_path()).expect("file").len();
        assert_eq!(store_bytes, file, "{s}");
        assert!(storage["free_bytes"].is_u64(), "{s}");
        assert!(storage["database_bytes"].is_null(), "{s}");
    }

    // One event two hours old and one two days old: out of the last hour,
    // and the second out of the last day too.
    let (two_hours, two_days) = if db.is_postgres() {
        (
            "recorded_at - interval '2 hours'",
            "recorded_at - interval '2 days'",
        )
    } else {
        ("recorded_at - 7200000000", "recorded_at - 172800000000")
    };
    let aged = |shift: &str, stream: &str| {
        let sql = format!(
            "UPDATE events SET recorded_at = {shift} \
             WHERE stream_id = '{stream}' AND stream_version = 1"
        );
        assert_eq!(db.execute_sql(&sql), 1);
    };
    aged(two_hours, "Small-1");
    aged(two_days, "Mid-1");
    let s = db.run(&["stats", "--json"]).ok().json();
    assert_eq!(s["appended"]["last_hour"]["events"], 7, "{s}");
    assert_eq!(s["appended"]["last_day"]["events"], 8, "{s}");
    assert_eq!(s["largest_streams"].as_array().map(Vec::len), Some(4));

    let text = db.run(&["stats", "--top", "1"]).ok().stdout;
    for needle in [
        "appended, 1 hour  7 events",
        "appended, 1 day   8 events",
        "store size",
        "LARGEST_STREAM",
        "Big-1",
    ] {
        assert!(text.contains(needle), "{needle:?} in {text}");
    }
    assert!(!text.contains("Big-2"), "--top 1: {text}");
}

/// Appends one event with the given correlation and causation; returns it.
fn append_caused(
    db: &Db,
    stream: &str,
    n: i64,
    correlation: &str,
    causation: Option<&str>,
) -> Value {
    let mut metadata = json!({ "correlation_id": correlation });
    if let Some(c) = causation {
        metadata["causation_id"] = json!(c);
    }
    let data = json!({ "n": n }).to_string();
    let metadata = metadata.to_string();
    db.run(&[
        "append",
        stream,
        "--type",
        "E",
        "--data",
        &data,
        "--metadata",
        &metadata,
        "--json",
    ])
    .ok()
    .json()
}

pub fn event_shows_what_it_caused_and_its_correlation_tree(db: &Db) {
    db.run(&["init"]).ok();
    let request = uuid::Uuid::now_v7().to_string();
    let other = uuid::Uuid::now_v7().to_string();
    let id = |e: &Value| e["event_id"].as_str().expect("event_id").to_owned();
    let root = append_caused(db, "Req-1", 1, &request, None);
    let a = append_caused(db, "Req-2", 2, &request, Some(&id(&root)));
    let elsewhere = append_caused(db, "Req-9", 9, &other, Some(&id(&root)));
    let b = append_caused(db, "Req-1", 3, &request, Some(&id(&root)));
    let c = append_caused(db, "Req-3", 4, &request, Some(&id(&b)));
    let plain = append(db, "Plain-1", "E", json!({"n": 0}));

    let view = db.run(&["event", &id(&root), "--json"]).ok().json();
    assert_eq!(view["event"]["event_id"], root["event_id"]);
    assert_eq!(view["event"]["metadata"]["correlation_id"], json!(request));
    // What it caused, in global order, in its correlation or not.
    let caused: Vec<String> = view["caused"]
        .as_array()
        .expect("caused")
        .iter()
        .map(id)
        .collect();
    assert_eq!(caused, [id(&a), id(&elsewhere), id(&b)]);
    assert_eq!(view["caused_truncated"], false);
    let correlation = &view["correlation"];
    assert_eq!(correlation["correlation_id"], json!(request));
    assert_eq!(correlation["truncated"], false);
    let tree: Vec<(String, u64, Value, bool)> = correlation["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|n| {
            (
                id(&n["event"]),
                n["depth"].as_u64().expect("depth"),
                n["caused_by"].clone(),
                n["this"].as_bool().expect("this"),
            )
        })
        .collect();
    assert_eq!(
        tree,
        [
            (id(&root), 0, Value::Null, true),
            (id(&a), 1, json!(id(&root)), false),
            (id(&b), 1, json!(id(&root)), false),
            (id(&c), 2, json!(id(&b)), false),
        ]
    );

    // By position, as a table: b, under the root, with c under it.
    let position = b["global_position"]
        .as_str()
        .map_or_else(|| b["global_position"].to_string(), str::to_owned);
    let text = db.run(&["event", &position]).ok().stdout;
    assert!(
        text.contains(&format!("event_id        {}", id(&b))),
        "{text}"
    );
    assert!(text.contains("caused: 1 event(s)"), "{text}");
    assert!(
        text.contains(&format!("correlation {request}: 4 event(s)")),
        "{text}"
    );
    let this = text
        .lines()
        .find(|l| l.ends_with("<- this event"))
        .expect("this event is marked");
    assert!(this.starts_with("└─ ") && this.contains(&id(&b)), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("   └─ ") && l.contains(&id(&c))),
        "{text}"
    );

    // --limit: the first events, and says so.
    let view = db
        .run(&["event", &id(&root), "--json", "--limit", "2"])
        .ok()
        .json();
    assert_eq!(view["correlation"]["truncated"], true);
    assert_eq!(
        view["correlation"]["events"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(view["caused_truncated"], true);
    assert_eq!(view["caused"].as_array().map(Vec::len), Some(2));

    // No correlation: said so.
    let text = db.run(&["event", &id(&plain)]).ok().stdout;
    assert!(text.contains("correlation: none"), "{text}");
    assert!(text.contains("caused: no events"), "{text}");

    // Not there: status 1. Not an id or a position: status 2.
    let run = db.run(&["event", &uuid::Uuid::now_v7().to_string()]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("no event with id"), "{run:#?}");
    let run = db.run(&["event", "999999"]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(
        run.stderr.contains("no event at position 999999"),
        "{run:#?}"
    );
    db.run(&["event", "latest"]).fails(2, &["UUID", "position"]);
}
