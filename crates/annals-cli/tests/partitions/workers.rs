//! `annals projections run --partitions P`: worker processes sharing the
//! partitions of `account_balances` through leases on PostgreSQL (one killed
//! with SIGKILL, one paused with SIGSTOP past its lease, workers joining and
//! leaving), and one process running all partitions on SQLite.
//!
//! Every wait polls a condition with a deadline; nothing decides by sleeping.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use annals::{EventStore, ExpectedVersion, NewEvent, StreamId};
use annals_postgres::{PgEventStore, PgOptions};
use serde_json::{json, Value};

use crate::util::Db;

/// The lease of the workers in these tests (seconds): short, so takeovers
/// happen within the tests' deadlines.
const TTL: &str = "3";

/// Polls `done` every 20 ms for at most 180 s (the machine may be loaded).
#[track_caller]
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        // A pause between two polls of the condition, not a decision.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A worker process and the file its stderr goes to.
struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn spawn(db: &Db, tag: &str, partitions: u32) -> Worker {
        let log = db.dir.path().join(format!("worker-{tag}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let p = partitions.to_string();
        let child = db
            .command(&[
                "projections",
                "run",
                "account_balances",
                "--partitions",
                &p,
                "--lease-ttl",
                TTL,
                "--batch-size",
                "10",
            ])
            .env("RUST_LOG", "annals::partition=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn a worker");
        Worker { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill {sig} {}", self.pid());
    }

    /// SIGTERM, then the exit status must be success.
    fn stop(mut self) {
        self.signal("-TERM");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "{status:?}\n{}", self.log());
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `sql` on the test schema; every column cast to text by the caller.
fn rows(db: &Db, sql: &str) -> Vec<Vec<Option<String>>> {
    let schema = db.pg_schema.clone().expect("a PostgreSQL test");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        let conn = tokio::spawn(connection);
        client
            .batch_execute(&format!("SET search_path TO \"{schema}\""))
            .await
            .expect("search_path");
        let out = client
            .query(sql, &[])
            .await
            .expect("query")
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| r.get::<_, Option<String>>(i))
                    .collect()
            })
            .collect();
        drop(client);
        let _ = conn.await;
        out
    })
}

/// The live lease holders: partition -> (owner's pid, fencing token).
fn holders(db: &Db) -> BTreeMap<u32, (u32, i64)> {
    rows(
        db,
        "SELECT partition::text, owner, fence::text FROM partition_leases \
         WHERE expires_at > now() ORDER BY partition",
    )
    .into_iter()
    .map(|r| {
        let p = r[0].as_deref().unwrap_or("0").parse().unwrap_or(0);
        let owner = r[1].clone().unwrap_or_default();
        let pid = owner
            .strip_prefix("pid ")
            .and_then(|o| o.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let fence = r[2].as_deref().unwrap_or("0").parse().unwrap_or(0);
        (p, (pid, fence))
    })
    .collect()
}

fn held_by(db: &Db, pid: u32) -> Vec<u32> {
    holders(db)
        .into_iter()
        .filter(|(_, (o, _))| *o == pid)
        .map(|(p, _)| p)
        .collect()
}

/// Every checkpoint row of the projection's partitions: name -> (position,
/// time of its last write).
fn checkpoints(db: &Db) -> BTreeMap<String, (String, String)> {
    rows(
        db,
        "SELECT name, commit_pos::text || ':' || seq::text, updated_at::text FROM checkpoints \
         WHERE name LIKE 'account\\_balances@v1/p%'",
    )
    .into_iter()
    .map(|r| {
        (
            r[0].clone().unwrap_or_default(),
            (
                r[1].clone().unwrap_or_default(),
                r[2].clone().unwrap_or_default(),
            ),
        )
    })
    .collect()
}

/// `account_balances`: stream -> balance.
fn balances(db: &Db) -> BTreeMap<String, i64> {
    rows(
        db,
        "SELECT stream_id, balance::text FROM account_balances ORDER BY stream_id",
    )
    .into_iter()
    .map(|r| {
        (
            r[0].clone().unwrap_or_default(),
            r[1].as_deref().unwrap_or("0").parse().unwrap_or(0),
        )
    })
    .collect()
}

/// The fold of every event in the store: stream -> sum of deposits.
fn fold(db: &Db) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for e in db.all_events() {
        let stream = e["stream_id"].as_str().expect("stream").to_owned();
        let amount = e["data"]["amount"].as_i64().expect("amount");
        *out.entry(stream).or_insert(0) += amount;
    }
    out
}

/// Writers appending `per_writer` deposits each, from `writers` concurrent
/// tasks, spread over 24 accounts (a thread with its own runtime).
fn write(db: &Db, writers: usize, per_writer: usize) -> std::thread::JoinHandle<()> {
    let url = db.url.clone();
    let schema = db.pg_schema.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let options = PgOptions {
                schema,
                ..PgOptions::default()
            };
            let store = PgEventStore::connect_with(&url, options)
                .await
                .expect("connect");
            let mut tasks = Vec::new();
            for w in 0..writers {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0..per_writer {
                        let stream =
                            StreamId::parse(&format!("Account-{}", (w * 7 + i) % 24)).expect("id");
                        let amount = (w * 1000 + i) as i64 % 97 + 1;
                        let event = NewEvent::new("Deposited", json!({ "amount": amount }))
                            .with_event_version(3);
                        store
                            .append(&stream, ExpectedVersion::Any, vec![event])
                            .await
                            .expect("append");
                    }
                }));
            }
            for t in tasks {
                t.await.expect("writer");
            }
        });
    })
}

fn status(db: &Db) -> Value {
    db.run(&["projections", "status", "--json"]).ok().json()
}

/// Every partition has applied everything up to the head.
fn caught_up(db: &Db) -> bool {
    let s = status(db);
    s["state"] == "caught-up" && s["lag_events"] == 0
}

#[test]
fn three_workers_one_killed_with_sigkill_the_read_model_equals_the_fold() {
    let Some(db) = Db::postgres() else { return };
    db.run(&["init"]).ok();
    let mut workers: Vec<Worker> = (0..3)
        .map(|i| Worker::spawn(&db, &i.to_string(), 6))
        .collect();
    wait_until("three workers sharing six partitions, two each", || {
        let h = holders(&db);
        h.len() == 6 && workers.iter().all(|w| held_by(&db, w.pid()).len() == 2)
    });
    let writers = write(&db, 4, 150);
    wait_until("every partition to commit a checkpoint", || {
        checkpoints(&db).len() == 6
    });
    // SIGKILL one worker mid-run: no release, no last words.
    let victim = workers.remove(0);
    let victim_pid = victim.pid();
    let orphaned = held_by(&db, victim_pid);
    assert_eq!(orphaned.len(), 2);
    drop(victim);
    wait_until("the killed worker's partitions to be taken over", || {
        let h = holders(&db);
        h.len() == 6 && h.values().all(|(pid, _)| *pid != victim_pid)
    });
    writers.join().expect("writers");
    wait_until("every partition to reach the head", || caught_up(&db));
    let expected = fold(&db);
    assert!(expected.values().sum::<i64>() > 0);
    assert_eq!(balances(&db), expected, "read model = fold of all events");
    let s = status(&db);
    assert_eq!(s["partitions"].as_array().map(Vec::len), Some(6), "{s}");
    for w in workers {
        w.stop();
    }
}

#[test]
fn a_worker_paused_past_its_lease_commits_nothing_after_takeover() {
    let Some(db) = Db::postgres() else { return };
    db.run(&["init"]).ok();
    // A backlog, so the paused worker is caught in the middle of its work.
    write(&db, 4, 400).join().expect("writers");
    let a = Worker::spawn(&db, "a", 4);
    wait_until("worker a to hold all four partitions", || {
        held_by(&db, a.pid()).len() == 4
    });
    let b = Worker::spawn(&db, "b", 4);
    wait_until("worker b to take two of them", || {
        held_by(&db, b.pid()).len() == 2 && held_by(&db, a.pid()).len() == 2
    });
    let taken: BTreeMap<u32, i64> = holders(&db)
        .into_iter()
        .filter(|(_, (pid, _))| *pid == b.pid())
        .map(|(p, (_, fence))| (p, fence))
        .collect();
    b.signal("-STOP");
    // Past its lease: a takes b's partitions over, with larger fencing
    // tokens, and finishes them.
    wait_until(
        "worker a to take the paused worker's partitions over",
        || {
            let h = holders(&db);
            taken
                .iter()
                .all(|(p, f)| h.get(p).is_some_and(|(pid, nf)| *pid == a.pid() && nf > f))
        },
    );
    wait_until("every partition to reach the head", || caught_up(&db));
    let before = checkpoints(&db);
    let rows_before = balances(&db);
    assert_eq!(
        rows_before,
        fold(&db),
        "read model = fold before the wake-up"
    );

    b.signal("-CONT");
    // b finds its leases taken over (its renewals fail, a batch in flight is
    // refused by the fence), rejoins, and gets a fair share again, under
    // new fencing tokens.
    wait_until("the woken worker to notice and rejoin", || {
        let h = holders(&db);
        let mine: Vec<_> = h.iter().filter(|(_, (pid, _))| *pid == b.pid()).collect();
        mine.len() == 2
            && mine
                .iter()
                .all(|(p, (_, f))| taken.get(p).is_none_or(|old| f > old))
    });
    let log = b.log();
    assert!(
        log.contains("lost a partition lease") || log.contains("fenced"),
        "the woken worker says it lost its partitions: {log}"
    );
    // Nothing it had in flight or queued was committed: every checkpoint row
    // is as it was (same position, not even rewritten), and so is the read
    // model.
    assert_eq!(
        checkpoints(&db),
        before,
        "no checkpoint written after takeover"
    );
    assert_eq!(balances(&db), rows_before, "no read-model row written");
    assert_eq!(balances(&db), fold(&db));
    a.stop();
    b.stop();
}

#[test]
fn workers_rebalance_when_one_joins_and_one_leaves() {
    let Some(db) = Db::postgres() else { return };
    db.run(&["init"]).ok();
    let n = |w: &Worker| held_by(&db, w.pid()).len();
    let a = Worker::spawn(&db, "a", 6);
    wait_until("a lone worker to hold every partition", || n(&a) == 6);
    let b = Worker::spawn(&db, "b", 6);
    wait_until("the newcomer to get its fair share (3 of 6)", || {
        n(&a) == 3 && n(&b) == 3
    });
    let c = Worker::spawn(&db, "c", 6);
    wait_until("three workers, two partitions each", || {
        n(&a) == 2 && n(&b) == 2 && n(&c) == 2
    });
    // A worker that leaves (SIGTERM) releases its leases at once; the
    // others share them.
    a.stop();
    wait_until("two workers, three partitions each", || {
        n(&b) == 3 && n(&c) == 3
    });
    c.stop();
    wait_until("the remaining worker to take every partition", || {
        n(&b) == 6
    });
    write(&db, 2, 30).join().expect("writers");
    wait_until("every partition to reach the head", || caught_up(&db));
    assert_eq!(balances(&db), fold(&db));
    b.stop();
}

/// A different number of partitions than the running workers' is refused, and
/// so is a partitioned worker beside a plain runner.
#[test]
fn workers_refuse_another_partition_count_and_a_plain_runner() {
    let Some(db) = Db::postgres() else { return };
    db.run(&["init"]).ok();
    let a = Worker::spawn(&db, "a", 4);
    wait_until("a worker to hold every partition", || {
        held_by(&db, a.pid()).len() == 4
    });
    let run = db.run(&[
        "projections",
        "run",
        "account_balances",
        "--partitions",
        "3",
        "--until-caught-up",
    ]);
    assert_eq!(run.code, 2, "{run:#?}");
    assert!(run.stderr.contains("runs as 4 partitions"), "{run:#?}");
    // Nor does a plain runner or an in-place rebuild start beside it: they
    // would write the same read model under another checkpoint.
    let balances = rows(
        &db,
        "SELECT stream_id, balance::text FROM account_balances ORDER BY 1",
    );
    for args in [
        &[
            "projections",
            "run",
            "account_balances",
            "--until-caught-up",
        ][..],
        &["projections", "rebuild", "account_balances"][..],
    ] {
        let run = db.run(args);
        assert_ne!(run.code, 0, "{run:#?}");
        assert!(
            run.stderr.contains("runs as partitioned workers (1 live)"),
            "{run:#?}"
        );
    }
    assert_eq!(
        rows(
            &db,
            "SELECT stream_id, balance::text FROM account_balances ORDER BY 1"
        ),
        balances,
        "the read model was not touched"
    );
    a.stop();
    // A plain runner of the projection holds its lock: partitioned workers
    // (other checkpoints of the same read model) do not start beside it.
    let mut plain = db
        .command(&["projections", "run", "account_balances"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn a plain runner");
    wait_until("the plain runner to hold the projection lock", || {
        !rows(&db, "SELECT owner FROM projection_locks").is_empty()
    });
    let run = db.run(&[
        "projections",
        "run",
        "account_balances",
        "--partitions",
        "4",
        "--until-caught-up",
    ]);
    assert_eq!(run.code, 2, "{run:#?}");
    assert!(run.stderr.contains("locked"), "{run:#?}");
    let _ = plain.kill();
    let _ = plain.wait();
}

#[test]
fn on_sqlite_one_process_runs_all_partitions() {
    let db = Db::sqlite();
    db.run(&["init"]).ok();
    for i in 0..40 {
        let data = format!(r#"{{"amount":{}}}"#, i % 7 + 1);
        db.run(&[
            "append",
            &format!("Account-{}", i % 9),
            "--type",
            "Deposited",
            "--event-version",
            "3",
            "--data",
            &data,
        ])
        .ok();
    }
    let mut child = db
        .command(&[
            "projections",
            "run",
            "account_balances",
            "--partitions",
            "4",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    wait_until("the four partitions to reach the head", || {
        let s = status(&db);
        s["partitions"].as_array().map(Vec::len) == Some(4) && s["state"] == "caught-up"
    });
    // The process holds the projection lock: a second one cannot run it.
    let second = db.run(&[
        "projections",
        "run",
        "account_balances",
        "--partitions",
        "4",
        "--until-caught-up",
    ]);
    assert_eq!(second.code, 2, "{second:#?}");
    assert!(second.stderr.contains("locked"), "{second:#?}");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    assert!(child.wait().expect("wait").success());
    // The read model equals the fold of the events.
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for e in db.all_events() {
        *expected
            .entry(e["stream_id"].as_str().expect("stream").to_owned())
            .or_insert(0) += e["data"]["amount"].as_i64().expect("amount");
    }
    let total: i64 = expected.values().sum();
    assert_eq!(
        db.execute_sql(&format!(
            "UPDATE account_balances SET balance = balance WHERE \
             (SELECT sum(balance) FROM account_balances) = {total}"
        )),
        9
    );
    for (stream, balance) in expected {
        assert_eq!(
            db.execute_sql(&format!(
                "UPDATE account_balances SET balance = balance \
                 WHERE stream_id = '{stream}' AND balance = {balance}"
            )),
            1,
            "{stream}"
        );
    }
    let s = status(&db);
    for p in s["partitions"].as_array().expect("partitions") {
        assert_eq!(p["lag_events"], 0, "{p}");
    }
}
