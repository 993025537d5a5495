//! `annals check`: each health check sees the fault planted behind the CLI's
//! back with raw SQL, on SQLite and (when `ANNALS_TEST_POSTGRES_URL` is set)
//! on PostgreSQL; a healthy store exits 0.

use std::time::Duration;

use annals::{
    BatchContext, DeadLetter, EventStore, HandlerError, Projection, ProjectionControl,
    ProjectionFilter, ProjectionRunner, ProjectionState, ReadAll,
};
use futures::TryStreamExt;
use serde_json::{json, Value};

use crate::util::{per_backend, Db, Run};

per_backend!(
    healthy_store_has_no_findings,
    version_gaps_heads_and_orphans_are_errors,
    recorded_at_going_backwards_is_an_error,
    events_that_do_not_decode_are_errors,
    snapshot_ahead_of_its_head_is_an_error,
    stale_snapshots_and_low_coverage_are_warnings,
    schema_out_of_date_is_a_finding,
    tripped_projection_is_an_error_until_it_runs_again,
    dead_letters_are_errors_until_dropped,
    the_master_key_is_found_like_the_read_commands,
);

/// The same options on every run: the PostgreSQL horizon is cluster-wide,
/// so a long transaction of some other test on the cluster must not decide
/// a test that is not about it.
const QUIET_HORIZON: &[&str] = &["--max-transaction-age", "1h"];

fn check(db: &Db, extra: &[&str]) -> Run {
    let mut args = vec!["check", "--json"];
    args.extend_from_slice(QUIET_HORIZON);
    args.extend_from_slice(extra);
    db.run(&args)
}

/// The findings of a run, checking each has the four fields.
fn findings(run: &Run) -> Vec<Value> {
    let lines = run.json_lines();
    for f in &lines {
        for field in ["check", "severity", "subject", "detail"] {
            assert!(f[field].is_string(), "{field} missing: {f}");
        }
    }
    lines
}

fn of<'a>(findings: &'a [Value], check: &str) -> Vec<&'a Value> {
    findings.iter().filter(|f| f["check"] == check).collect()
}

/// A failed check: status 1, one line on stderr counting the errors.
#[track_caller]
fn failed(run: &Run) -> Vec<Value> {
    assert_eq!(run.code, 1, "expected status 1: {run:#?}");
    assert!(run.stderr.contains("error finding"), "{run:#?}");
    findings(run)
}

fn append(db: &Db, stream: &str, event_type: &str, data: Value) {
    let data = data.to_string();
    db.run(&["append", stream, "--type", event_type, "--data", &data])
        .ok();
}

/// Account `id` with `deposits` deposits after it was opened.
fn account(db: &Db, id: &str, deposits: u64) {
    let stream = format!("Account-{id}");
    append(db, &stream, "Opened", json!({"owner": id}));
    for _ in 0..deposits {
        append(db, &stream, "Deposited", json!({"amount": 5}));
    }
}

pub fn healthy_store_has_no_findings(db: &Db) {
    db.run(&["init"]).ok();
    // An empty store is healthy.
    let run = check(db, &[]).ok();
    assert!(findings(&run).is_empty(), "{run:#?}");
    db.run(&["demo", "--accounts", "4", "--operations", "40"])
        .ok();
    // Events of a category no aggregate type registers are not decoded.
    append(db, "Other-1", "Whatever", json!({"x": 1}));
    let run = check(db, &[]).ok();
    assert!(findings(&run).is_empty(), "{run:#?}");
    assert!(run.stderr.contains("healthy, no findings"), "{run:#?}");
    // The table: nothing on stdout when there is nothing to say.
    let mut args = vec!["check"];
    args.extend_from_slice(QUIET_HORIZON);
    let run = db.run(&args).ok();
    assert!(run.stdout.is_empty(), "{run:#?}");
}

pub fn version_gaps_heads_and_orphans_are_errors(db: &Db) {
    db.run(&["init"]).ok();
    account(db, "gap", 3);
    account(db, "head", 2);
    account(db, "orphan", 1);
    account(db, "fine", 2);
    assert!(findings(&check(db, &[]).ok()).is_empty());
    let changed =
        db.execute_sql("DELETE FROM events WHERE stream_id = 'Account-gap' AND stream_version = 2");
    assert_eq!(changed, 1);
    db.execute_sql("UPDATE streams SET version = 5 WHERE stream_id = 'Account-head'");
    db.execute_sql("DELETE FROM streams WHERE stream_id = 'Account-orphan'");
    let run = check(db, &[]);
    let found = failed(&run);
    let versions = of(&found, "stream-versions");
    assert_eq!(versions.len(), 3, "{found:#?}");
    let by = |subject: &str| {
        versions
            .iter()
            .find(|f| f["subject"] == subject)
            .unwrap_or_else(|| panic!("no finding for {subject}: {found:#?}"))["detail"]
            .as_str()
            .expect("detail")
            .to_owned()
    };
    let gap = by("Account-gap");
    assert!(gap.contains("1 version(s) missing (gap)"), "{gap}");
    assert!(gap.contains("head 4, 3 event(s)"), "{gap}");
    let head = by("Account-head");
    assert!(
        head.contains("head 5 in streams is not the last event"),
        "{head}"
    );
    let orphan = by("Account-orphan");
    assert!(orphan.contains("no row in streams"), "{orphan}");
    assert!(versions.iter().all(|f| f["severity"] == "error"));

    // --max-findings caps the rows and says so in one more.
    let found = failed(&check(db, &["--max-findings", "1"]));
    let versions = of(&found, "stream-versions");
    assert_eq!(versions.len(), 2, "{found:#?}");
    assert_eq!(versions[1]["subject"], "...");
    assert!(versions[1]["detail"]
        .as_str()
        .is_some_and(|d| d.contains("--max-findings 1")));
    // A duplicated version needs the unique constraint gone first, which
    // PostgreSQL allows (SQLite cannot drop a table constraint).
    if db.is_postgres() {
        db.execute_sql("ALTER TABLE events DROP CONSTRAINT events_stream_version_key");
        let copied = db.execute_sql(
            "INSERT INTO events (event_id, stream_id, category, stream_version, event_type, \
             event_version, data, metadata, recorded_at) \
             SELECT gen_random_uuid(), stream_id, category, stream_version, event_type, \
             event_version, data, metadata, clock_timestamp() FROM events \
             WHERE stream_id = 'Account-fine' AND stream_version = 2",
        );
        assert_eq!(copied, 1);
        let found = failed(&check(db, &[]));
        let fine = of(&found, "stream-versions")
            .into_iter()
            .find(|f| f["subject"] == "Account-fine")
            .unwrap_or_else(|| panic!("no finding for the duplicate: {found:#?}"));
        let detail = fine["detail"].as_str().expect("detail");
        assert!(detail.contains("1 duplicated version(s)"), "{detail}");
    }
}

pub fn recorded_at_going_backwards_is_an_error(db: &Db) {
    db.run(&["init"]).ok();
    account(db, "clock", 3);
    let events = db.all_events();
    let third = &events[2];
    // The third event recorded 10 s before the second: a clock stepped back.
    let sql = if db.is_postgres() {
        "UPDATE events SET recorded_at = recorded_at - interval '10 seconds' \
         WHERE stream_id = 'Account-clock' AND stream_version = 3"
    } else {
        "UPDATE events SET recorded_at = recorded_at - 10000000 \
         WHERE stream_id = 'Account-clock' AND stream_version = 3"
    };
    assert_eq!(db.execute_sql(sql), 1);
    let found = failed(&check(db, &[]));
    let clock = of(&found, "clock");
    assert_eq!(clock.len(), 1, "{found:#?}");
    let position = third["global_position"]
        .as_str()
        .map_or_else(|| third["global_position"].to_string(), str::to_owned);
    assert_eq!(clock[0]["subject"], format!("position {position}"));
    let detail = clock[0]["detail"].as_str().expect("detail");
    assert!(detail.contains("went backwards"), "{detail}");
    assert!(detail.contains("s before position"), "{detail}");
    // Within a wider tolerance the same store is healthy.
    let run = check(db, &["--clock-tolerance", "1m"]).ok();
    assert!(findings(&run).is_empty(), "{run:#?}");
}

pub fn events_that_do_not_decode_are_errors(db: &Db) {
    db.run(&["init"]).ok();
    account(db, "bad", 2);
    db.execute_sql(
        "UPDATE events SET event_type = 'Bogus' \
         WHERE stream_id = 'Account-bad' AND stream_version = 2",
    );
    db.execute_sql(
        r#"UPDATE events SET data = '{"amount": "lots"}'
           WHERE stream_id = 'Account-bad' AND stream_version = 3"#,
    );
    let found = failed(&check(db, &[]));
    let decode = of(&found, "decode");
    assert_eq!(decode.len(), 2, "{found:#?}");
    assert_eq!(decode[0]["subject"], "Account-bad@2");
    assert!(
        decode[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("unknown event type \"Bogus\"")),
        "{decode:#?}"
    );
    assert_eq!(decode[1]["subject"], "Account-bad@3");
    assert!(
        decode[1]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("Deposited")),
        "{decode:#?}"
    );
}

pub fn snapshot_ahead_of_its_head_is_an_error(db: &Db) {
    db.run(&["init"]).ok();
    account(db, "ahead", 2);
    db.run(&["snapshots", "create", "Account", "ahead"]).ok();
    assert!(findings(&check(db, &[]).ok()).is_empty());
    // The events restored from an older backup: the snapshot is now ahead.
    db.execute_sql("DELETE FROM events WHERE stream_id = 'Account-ahead' AND stream_version > 1");
    db.execute_sql("UPDATE streams SET version = 1 WHERE stream_id = 'Account-ahead'");
    let found = failed(&check(db, &[]));
    let ahead = of(&found, "snapshot-ahead");
    assert_eq!(ahead.len(), 1, "{found:#?}");
    assert_eq!(ahead[0]["subject"], "Account-ahead");
    assert_eq!(ahead[0]["severity"], "error");
    let detail = ahead[0]["detail"].as_str().expect("detail");
    assert!(
        detail.contains("version 3 is ahead of the stream head 1"),
        "{detail}"
    );
    // Nothing else is wrong with the store.
    assert_eq!(found.len(), 1, "{found:#?}");
}

pub fn stale_snapshots_and_low_coverage_are_warnings(db: &Db) {
    db.run(&["init"]).ok();
    account(db, "s1", 1);
    account(db, "s2", 0);
    account(db, "s3", 0);
    account(db, "s4", 0);
    db.run(&["snapshots", "create", "Account", "s1"]).ok();
    // Three events past the snapshot.
    for _ in 0..3 {
        append(db, "Account-s1", "Deposited", json!({"amount": 1}));
    }
    // Within the defaults: healthy.
    assert!(findings(&check(db, &[]).ok()).is_empty());
    let run = check(db, &["--stale-events", "2", "--min-coverage", "50"]).ok();
    assert!(run.stderr.contains("healthy, 2 warning(s)"), "{run:#?}");
    let found = findings(&run);
    assert_eq!(found.len(), 2, "{found:#?}");
    let stale = of(&found, "snapshot-stale");
    assert_eq!(stale.len(), 1, "{found:#?}");
    assert_eq!(stale[0]["severity"], "warning");
    assert_eq!(stale[0]["subject"], "Account");
    let detail = stale[0]["detail"].as_str().expect("detail");
    assert!(detail.contains("Account-s1, 3 behind"), "{detail}");
    let coverage = of(&found, "snapshot-coverage");
    assert_eq!(coverage.len(), 1, "{found:#?}");
    assert_eq!(coverage[0]["severity"], "warning");
    let detail = coverage[0]["detail"].as_str().expect("detail");
    assert!(detail.contains("1 of 4 aggregates"), "{detail}");
    assert!(detail.contains("25.0%"), "{detail}");
    // A snapshot only 3 behind is not stale at the threshold 3.
    let run = check(db, &["--stale-events", "3"]).ok();
    assert!(findings(&run).is_empty(), "{run:#?}");
}

pub fn schema_out_of_date_is_a_finding(db: &Db) {
    db.run(&["init"]).ok();
    account(db, "m", 1);
    // SQLite applies pending migrations when it opens, so there a file
    // from a newer build is what a check can find; PostgreSQL is migrated
    // only when asked, so there a pending migration is found.
    let (sql, needle) = if db.is_postgres() {
        (
            "DELETE FROM annals_migrations WHERE version = (SELECT max(version) FROM annals_migrations)",
            "migrations pending, run `annals init`",
        )
    } else {
        (
            "INSERT INTO annals_migrations (version, name, applied_at) VALUES (9999, 'future', 'now')",
            "version 9999, newer than this build",
        )
    };
    assert_eq!(db.execute_sql(sql), 1);
    let found = failed(&check(db, &[]));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0]["check"], "schema");
    assert_eq!(found[0]["severity"], "error");
    let detail = found[0]["detail"].as_str().expect("detail");
    assert!(detail.contains(needle), "{detail}");
}

/// A stand-in for the demo's registered `account_balances` (same name and
/// version, so the same checkpoint) whose handler never returns.
struct Stalls;

impl Projection for Stalls {
    fn name(&self) -> &str {
        "account_balances"
    }
    fn filter(&self) -> ProjectionFilter {
        ProjectionFilter::all().categories(["Account"])
    }
    async fn handle(
        &mut self,
        _events: &[annals::RecordedEvent],
        _ctx: &BatchContext,
    ) -> Result<(), HandlerError> {
        std::future::pending().await
    }
}

/// A runner of `account_balances` stopped by its circuit breaker (in this
/// process, on the test's database) is found by `annals check` in another
/// process, from the note the runner left; the next run clears it.
pub fn tripped_projection_is_an_error_until_it_runs_again(db: &Db) {
    db.run(&["init"]).ok();
    account(db, "t", 2);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let store = db.open_store(&rt);
    let state = rt.block_on(async {
        let handle = ProjectionRunner::at_least_once(store.clone(), Stalls)
            .trip_after(Duration::from_millis(200))
            .spawn();
        let state = tokio::time::timeout(Duration::from_secs(60), handle.ended())
            .await
            .expect("the breaker trips");
        assert!(handle.join().await.is_err());
        state
    });
    let ProjectionState::Tripped(reason) = state else {
        panic!("expected Tripped, got {state:?}");
    };
    let found = failed(&check(db, &[]));
    assert_eq!(found.len(), 1, "{found:#?}");
    let f = &found[0];
    assert_eq!(f["check"], "projection-tripped");
    assert_eq!(f["severity"], "error");
    assert_eq!(f["subject"], "account_balances");
    let detail = f["detail"].as_str().expect("detail");
    assert!(detail.contains(&reason), "{detail}");
    assert!(detail.contains("no progress for 200ms"), "{detail}");
    assert!(
        detail.contains("account_balances@v1 stopped by its circuit breaker"),
        "{detail}"
    );
    assert!(detail.contains(&annals::lock_owner()), "{detail}");
    // The table names it too.
    let mut args = vec!["check"];
    args.extend_from_slice(QUIET_HORIZON);
    let table = db.run(&args);
    assert_eq!(table.code, 1, "{table:#?}");
    assert!(table.stdout.contains("projection-tripped"), "{table:#?}");
    // Run again (the real projection): the note is gone.
    db.run(&["projections", "run", "--until-caught-up"]).ok();
    let run = check(db, &[]).ok();
    assert!(findings(&run).is_empty(), "{run:#?}");
}

/// Events parked for `account_balances` (as the `Park` error policy parks
/// them) are one error naming how many and the first; dropped, the store is
/// healthy again. Parked events of a projection this binary does not
/// register are not its business.
pub fn dead_letters_are_errors_until_dropped(db: &Db) {
    db.run(&["init"]).ok();
    account(db, "d", 2);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let store = db.open_store(&rt);
    let events: Vec<annals::RecordedEvent> = rt
        .block_on(store.read_all(ReadAll::from_start()).try_collect())
        .expect("read");
    let park = |checkpoint: &str, e: &annals::RecordedEvent, error: &str| {
        let letter = DeadLetter {
            checkpoint: checkpoint.to_owned(),
            position: e.global_position,
            event_id: e.event_id,
            stream: e.stream_id.clone(),
            event_type: e.event_type.clone(),
            error: error.to_owned(),
            attempts: 5,
            parked_at: chrono::Utc::now(),
        };
        rt.block_on(store.park_event(&letter)).expect("park");
    };
    park("unregistered@v1", &events[0], "not ours");
    assert!(findings(&check(db, &[]).ok()).is_empty());
    park("account_balances@v1", &events[1], "the handler refused it");
    park("account_balances@v1", &events[2], "and this one");
    let found = failed(&check(db, &[]));
    assert_eq!(found.len(), 1, "{found:#?}");
    let f = &found[0];
    assert_eq!(f["check"], "projection-dead-letters");
    assert_eq!(f["severity"], "error");
    assert_eq!(f["subject"], "account_balances");
    let detail = f["detail"].as_str().expect("detail");
    for needle in [
        "account_balances@v1 parked 2 event(s)",
        &format!("position {}", events[1].global_position),
        &events[1].event_id.to_string(),
        "Account-d",
        "type Deposited",
        "5 attempt(s)",
        "the handler refused it",
    ] {
        assert!(detail.contains(needle), "{needle:?} not in {detail}");
    }
    for e in &events[1..=2] {
        let dropped = rt
            .block_on(store.drop_dead_letter("account_balances@v1", e.event_id))
            .expect("drop");
        assert!(dropped);
    }
    let run = check(db, &[]).ok();
    assert!(findings(&run).is_empty(), "{run:#?}");
}

/// PostgreSQL: a transaction held open by another connection is named by its
/// pid, as an error while it holds a transaction id; once it ends it is gone.
#[test]
fn postgres_long_transaction_holding_the_horizon_is_named_by_pid() {
    let Some(db) = Db::postgres() else { return };
    db.run(&["init"]).ok();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (client, connection) = rt
        .block_on(tokio_postgres::connect(&db.url, tokio_postgres::NoTls))
        .expect("connect");
    let conn = rt.spawn(connection);
    let pid: i32 = rt.block_on(async {
        client
            .batch_execute("SET application_name = 'annals-check-test'; BEGIN")
            .await
            .expect("begin");
        // Taking a transaction id is what holds the horizon back.
        client
            .query_one("SELECT pg_current_xact_id()::text", &[])
            .await
            .expect("xid");
        client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get(0)
    });
    let subject = format!("pid {pid}");
    let run = db.run(&["check", "--json", "--max-transaction-age", "0s"]);
    let found = failed(&run);
    let ours: Vec<&Value> = of(&found, "horizon")
        .into_iter()
        .filter(|f| f["subject"] == subject.as_str())
        .collect();
    assert_eq!(ours.len(), 1, "{found:#?}");
    assert_eq!(ours[0]["severity"], "error");
    let detail = ours[0]["detail"].as_str().expect("detail");
    assert!(detail.contains("annals-check-test"), "{detail}");
    assert!(detail.contains("holds a transaction id"), "{detail}");
    assert!(
        detail.contains(&format!("pg_terminate_backend({pid})")),
        "{detail}"
    );
    // The table names it too.
    let table = db.run(&["check", "--max-transaction-age", "0s"]);
    assert_eq!(table.code, 1, "{table:#?}");
    assert!(table.stdout.contains(&subject), "{table:#?}");
    // Ended: no longer reported.
    rt.block_on(client.batch_execute("COMMIT")).expect("commit");
    let run = db.run(&["check", "--json", "--max-transaction-age", "0s"]);
    assert!(
        !findings(&run)
            .iter()
            .any(|f| f["subject"] == subject.as_str()),
        "{run:#?}"
    );
    drop(client);
    let _ = rt.block_on(conn);
}

/// PostgreSQL: a transaction that only holds a snapshot (a repeatable-read
/// reader, no transaction id) does not hold readers back but keeps vacuum
/// from cleaning up: a warning naming its pid.
#[test]
fn postgres_snapshot_only_transaction_is_a_warning() {
    let Some(db) = Db::postgres() else { return };
    db.run(&["init"]).ok();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (client, connection) = rt
        .block_on(tokio_postgres::connect(&db.url, tokio_postgres::NoTls))
        .expect("connect");
    let conn = rt.spawn(connection);
    let pid: i32 = rt.block_on(async {
        // The first query of a repeatable-read transaction takes the
        // snapshot it keeps until it ends; it writes nothing, so it never
        // gets a transaction id.
        client
            .batch_execute(
                "SET application_name = 'annals-check-reader'; \
                 BEGIN ISOLATION LEVEL REPEATABLE READ",
            )
            .await
            .expect("begin");
        client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get(0)
    });
    let subject = format!("pid {pid}");
    // Other tests on the cluster may hold transactions of their own, so the
    // exit status is not this test's to decide: only our pid's row is.
    let run = db.run(&["check", "--json", "--max-transaction-age", "0s"]);
    let found = findings(&run);
    let ours: Vec<&Value> = of(&found, "horizon")
        .into_iter()
        .filter(|f| f["subject"] == subject.as_str())
        .collect();
    assert_eq!(ours.len(), 1, "{found:#?}");
    assert_eq!(ours[0]["severity"], "warning");
    let detail = ours[0]["detail"].as_str().expect("detail");
    assert!(detail.contains("annals-check-reader"), "{detail}");
    assert!(detail.contains("holds a snapshot"), "{detail}");
    assert!(detail.contains("idle in transaction"), "{detail}");
    rt.block_on(client.batch_execute("COMMIT")).expect("commit");
    drop(client);
    let _ = rt.block_on(conn);
}

/// PostgreSQL: a schema `annals init` never ran in is a finding (version 0,
/// migrations pending), not a failure to run.
#[test]
fn postgres_uninitialized_schema_is_a_finding() {
    let Some(db) = Db::postgres() else { return };
    let found = failed(&check(&db, &[]));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0]["check"], "schema");
    let detail = found[0]["detail"].as_str().expect("detail");
    assert!(
        detail.contains("schema is at version 0") && detail.contains("run `annals init`"),
        "{detail}"
    );
}

/// Checks that cannot run at all are an error (status 2, one line on
/// stderr), not a finding: a missing SQLite file, an unreachable server.
#[test]
fn a_check_that_cannot_run_exits_2() {
    let db = Db::sqlite();
    db.run(&["check", "--json"])
        .fails(2, &["does not exist", "test.db"]);
    assert!(!db.sqlite_path().exists(), "check must not create the file");
    // Port 1: nothing listens there, so the connection is refused.
    let dir = tempfile::tempdir().expect("temp dir");
    crate::util::annals_in(
        dir.path(),
        &[
            "check",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/test",
        ],
    )
    .fails(2, &["cannot open postgres://postgres@127.0.0.1:1/test"]);
}

/// The decode check decrypts with the master key of `--key-file` (and
/// `ANNALS_KEY_FILE`), like the read commands: the right key is healthy, a
/// wrong one is an error naming it. On SQLite, the default key file beside
/// the database holds a wrong key throughout.
pub fn the_master_key_is_found_like_the_read_commands(db: &Db) {
    db.run(&["init"]).ok();
    db.run(&["demo", "--accounts", "2", "--operations", "10"])
        .ok();
    let right = db.dir.path().join("right.key");
    let wrong = db.dir.path().join("wrong.key");
    std::fs::rename(db.key_file(), &right).expect("move the key");
    std::fs::write(&wrong, format!("{}\n", "ef".repeat(32))).expect("a wrong key");
    std::fs::copy(&wrong, db.key_file()).expect("a wrong default key file");
    let mut args = vec!["check", "--json"];
    args.extend_from_slice(QUIET_HORIZON);
    let run = db.run_with_key_file(&args, Some(&right), &[]);
    assert_eq!(run.code, 0, "{run:#?}");
    db.run_with_key_file(&args, Some(&wrong), &[])
        .fails(2, &["wrong master key", "demo1-"]);
    let run = db.run_with_key_file(&args, None, &[("ANNALS_KEY_FILE", &right)]);
    assert_eq!(run.code, 0, "{run:#?}");
    db.run_with_key_file(&args, None, &[("ANNALS_KEY_FILE", &wrong)])
        .fails(2, &["wrong master key", "demo1-"]);
}
