//! `annals serve` as a child process (the gauges, `/health` before and after
//! a planted fault, the bind error, SIGTERM), and `MetricsServer` in this
//! process scraped over HTTP after a workload, on SQLite and (when
//! `ANNALS_TEST_POSTGRES_URL` is set) PostgreSQL.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use annals::bank::Account;
use annals::{
    CommandContext, EventStore, ExpectedVersion, NewEvent, Repository, SnapshotConfig, StreamId,
    StreamVersion,
};
use annals_cli::{AnyStore, App, DatabaseUrl, MetricsServer, OpenOptions};
use serde_json::{json, Value};

use crate::util::{per_backend, Db};

per_backend!(
    serve_shows_gauges_and_health,
    scrape_after_a_workload_finds_the_counters,
    health_finds_the_master_key_like_the_read_commands,
);

/// How long a test waits for the server to show a state it must reach.
const DEADLINE: Duration = Duration::from_secs(30);

/// A running `annals serve`, killed when dropped (a test that panics leaves
/// no server behind); [`Server::terminate`] stops it as an operator would.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    /// Starts `annals serve` on a port the system picks and reads the
    /// address it announces.
    fn start(db: &Db, extra: &[&str]) -> Server {
        let mut args = vec!["serve", "--metrics-addr", "127.0.0.1:0"];
        // The PostgreSQL horizon is cluster-wide: another test's long
        // transaction must not decide this one.
        args.extend_from_slice(&["--max-transaction-age", "1h"]);
        args.extend_from_slice(extra);
        Server::spawn(db.command(&args))
    }

    /// Starts `command` (an `annals serve` on port 0) and reads the address
    /// it announces.
    fn spawn(mut command: std::process::Command) -> Server {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start annals serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read stdout");
        let Some(addr) = line.trim().strip_prefix("listening on http://") else {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            let _ = child.kill();
            panic!("no address announced: stdout {line:?}, stderr {stderr}");
        };
        Server {
            addr: addr.to_owned(),
            child,
        }
    }

    fn get(&self, path: &str) -> (u16, String) {
        get(&self.addr, path)
    }

    /// Scrapes `/metrics` until `ready` accepts the text.
    fn metrics_until(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + DEADLINE;
        loop {
            let (status, text) = self.get("/metrics");
            assert_eq!(status, 200, "{text}");
            if ready(&text) {
                return text;
            }
            assert!(Instant::now() < until, "{what} not seen in time:\n{text}");
            std::thread::yield_now();
        }
    }

    /// Sends SIGTERM and returns the exit status and stderr.
    fn terminate(mut self) -> (Option<i32>, String) {
        let pid = self.child.id().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success());
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut stderr).expect("read stderr");
        }
        let status = self.child.wait().expect("wait for annals serve");
        (status.code(), stderr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 GET; the status code and the body.
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head:?}"));
    (status, body.to_owned())
}

/// The value of the series `name{labels…}` in a Prometheus text exposition
/// (labels in any order; the series must carry at least these).
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, v) = line.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let matches = metric == name
                && labels
                    .iter()
                    .all(|(k, want)| rest.split(',').any(|kv| kv == format!("{k}=\"{want}\"")));
            matches.then(|| v.parse().ok()).flatten()
        })
}

fn append(db: &Db, stream: &str, event_type: &str, data: Value) {
    let data = data.to_string();
    db.run(&["append", stream, "--type", event_type, "--data", &data])
        .ok();
}

pub fn serve_shows_gauges_and_health(db: &Db) {
    db.run(&["init"]).ok();
    append(db, "Account-s1", "Opened", json!({"owner": "s1"}));
    append(db, "Account-s1", "Deposited", json!({"amount": 5}));
    append(db, "Account-s1", "Deposited", json!({"amount": 7}));
    append(db, "Other-1", "Whatever", json!({"x": 1}));
    let server = Server::start(db, &["--interval", "50ms"]);

    // The first refresh ran before the address was announced.
    let (status, text) = server.get("/metrics");
    assert_eq!(status, 200, "{text}");
    assert_eq!(value(&text, "annals_streams", &[]), Some(2.0), "{text}");
    assert_eq!(value(&text, "annals_events", &[]), Some(4.0), "{text}");
    assert_eq!(
        value(&text, "annals_head_position", &[]),
        Some(4.0),
        "{text}"
    );
    assert!(value(&text, "annals_storage_bytes", &[]).is_some_and(|b| b > 0.0));
    assert!(
        text.contains("# HELP annals_events Events in the store."),
        "{text}"
    );
    if let Some(schema) = &db.pg_schema {
        let lag = value(
            &text,
            "annals_pg_horizon_lag_events",
            &[("schema", schema.as_str())],
        );
        assert!(lag.is_some(), "{text}");
        assert!(
            value(&text, "annals_database_bytes", &[]).is_some(),
            "{text}"
        );
    } else {
        assert!(
            value(&text, "annals_storage_free_bytes", &[]).is_some(),
            "{text}"
        );
    }

    let (status, body) = server.get("/health");
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(report["status"], "healthy", "{report}");
    assert_eq!(report["errors"], 0);
    assert_eq!(report["findings"], json!([]));
    // The decode check read the three Account events (the registered type)
    // in this process.
    let backend = if db.is_postgres() {
        "postgres"
    } else {
        "sqlite"
    };
    let text = server.metrics_until("the events read by /health", |t| {
        value(t, "annals_events_read_total", &[("backend", backend)]).is_some()
    });
    assert_eq!(
        value(&text, "annals_events_read_total", &[("backend", backend)]),
        Some(3.0),
        "{text}"
    );

    // A fault planted behind the server's back: a version gap.
    let changed =
        db.execute_sql("DELETE FROM events WHERE stream_id = 'Account-s1' AND stream_version = 2");
    assert_eq!(changed, 1);
    let (status, body) = server.get("/health");
    assert_eq!(status, 503, "{body}");
    let report: Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(report["status"], "unhealthy", "{report}");
    assert_eq!(report["errors"], 1, "{report}");
    let finding = &report["findings"][0];
    assert_eq!(finding["check"], "stream-versions", "{report}");
    assert_eq!(finding["severity"], "error");
    assert_eq!(finding["subject"], "Account-s1");

    // The gauges follow the store on the interval.
    let text = server.metrics_until("the deleted event", |t| {
        value(t, "annals_events", &[]) == Some(3.0)
    });
    assert_eq!(value(&text, "annals_streams", &[]), Some(2.0), "{text}");

    let (code, stderr) = server.terminate();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("stopped serving on"), "{stderr}");
}

#[test]
fn serve_names_the_address_it_cannot_bind() {
    let db = Db::sqlite();
    db.run(&["init"]).ok();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address").to_string();
    db.run(&["serve", "--metrics-addr", &addr])
        .fails(2, &["cannot listen on", &addr]);
}

#[test]
fn serve_refuses_a_zero_interval() {
    let db = Db::sqlite();
    db.run(&["serve", "--interval", "0s"])
        .fails(2, &["--interval", "above zero"]);
}

/// The library's counters count what the process that records them does:
/// an application runs [`MetricsServer`] in its own process. Here the
/// recorder is installed on this thread only, the workload runs on it, and
/// the server (on another thread) renders it over HTTP.
pub fn scrape_after_a_workload_finds_the_counters(db: &Db) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let url: DatabaseUrl = db.url.parse().expect("URL");
    let options = OpenOptions {
        pg_schema: db.pg_schema.clone(),
        must_exist: false,
        ..OpenOptions::default()
    };
    let store = rt
        .block_on(async {
            let store = AnyStore::open_with(&url, &options).await?;
            store.migrate().await?;
            Ok::<_, annals::Error>(store)
        })
        .expect("open the store");
    let backend = store.backend().name();

    let recorder = annals_cli::prometheus_recorder().expect("recorder");
    let handle = recorder.handle();
    let local = metrics::set_default_local_recorder(&recorder);
    annals_cli::describe_serve_metrics();
    rt.block_on(async {
        // Five events in two appends, then a conflict.
        let s = StreamId::parse("Meter-1").expect("stream");
        let three = (1..=3)
            .map(|n| NewEvent::new("Ticked", json!({ "n": n })))
            .collect();
        store
            .append(&s, ExpectedVersion::NoStream, three)
            .await
            .expect("append");
        let two = (4..=5)
            .map(|n| NewEvent::new("Ticked", json!({ "n": n })))
            .collect();
        store
            .append(&s, ExpectedVersion::Exact(StreamVersion(3)), two)
            .await
            .expect("append");
        let stale = store
            .append(
                &s,
                ExpectedVersion::Exact(StreamVersion(1)),
                vec![NewEvent::new("Ticked", json!({ "n": 6 }))],
            )
            .await
            .expect_err("a stale expected version");
        assert!(stale.is_conflict(), "{stale}");
        // Four commands with a snapshot every 2 events (written at versions
        // 2 and 4), then a load that starts from the snapshot.
        let repo = Repository::<Account, _>::new(store.clone())
            .with_snapshots(store.clone(), SnapshotConfig::every(2));
        let ctx = CommandContext::new();
        repo.execute("w1", &ctx, |a| a.open("w"))
            .await
            .expect("open");
        for _ in 0..3 {
            repo.execute("w1", &ctx, |a| a.deposit(10))
                .await
                .expect("deposit");
        }
        let loaded = repo.load("w1").await.expect("load");
        assert_eq!(loaded.report.snapshot_version, Some(StreamVersion(4)));
    });
    drop(local);

    // The server on its own thread and runtime: rendering needs the handle
    // only.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("address").to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server_store = store.clone();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            MetricsServer::new(App::with_demo(), server_store, handle)
                .run(listener, async {
                    let _ = stopped.await;
                })
                .await
        })
    });

    let (status, text) = get(&addr, "/metrics");
    assert_eq!(status, 200, "{text}");
    let b = [("backend", backend)];
    // Appends: 2 direct + 4 commands; events: 5 + 4.
    assert_eq!(
        value(&text, "annals_appends_total", &b),
        Some(6.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "annals_events_appended_total", &b),
        Some(9.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "annals_append_conflicts_total", &b),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "annals_append_duration_seconds_count", &b),
        Some(7.0),
        "{text}"
    );
    assert!(
        text.contains("annals_append_duration_seconds_bucket"),
        "{text}"
    );
    let account = ("aggregate_type", "Account");
    // Loads: the first two commands found no snapshot, the last two and
    // the final load used one.
    assert_eq!(
        value(
            &text,
            "annals_aggregate_loads_total",
            &[account, ("snapshot", "missing")]
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "annals_aggregate_loads_total",
            &[account, ("snapshot", "hit")]
        ),
        Some(3.0),
        "{text}"
    );
    // Replayed: 1 (2nd command, no snapshot) + 1 (4th, after the snapshot at 2).
    assert_eq!(
        value(&text, "annals_aggregate_events_replayed_total", &[account]),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "annals_snapshots_written_total", &[account]),
        Some(2.0),
        "{text}"
    );
    assert!(
        text.contains("# HELP annals_appends_total Append calls"),
        "{text}"
    );

    let _ = stop.send(());
    server
        .join()
        .expect("server thread")
        .expect("server ran and stopped");
}

#[test]
fn serve_refuses_a_metrics_file() {
    let db = Db::sqlite();
    db.run(&["init"]).ok();
    db.run(&[
        "serve",
        "--metrics-file",
        "m.prom",
        "--metrics-addr",
        "127.0.0.1:0",
    ])
    .fails(
        2,
        &["cannot install the metrics recorder", "--metrics-file"],
    );
}

/// `docs/metrics.md` has a row for every metric of `annals::CATALOGUE` and
/// `annals_cli::SERVE_METRICS`, with its type and labels, and no row for a
/// metric that is in neither (but for the three one backend records).
#[test]
fn docs_list_every_metric() {
    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/metrics.md"
    ))
    .expect("docs/metrics.md");
    let (metrics, targets) = docs
        .split_once("## Tracing targets")
        .expect("a tracing targets section");
    // `| `name` | type | labels | meaning |`
    let rows: Vec<(String, String, String)> = metrics
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix("`annals_")?.strip_suffix('`')?;
            Some((
                format!("annals_{name}"),
                cells[2].to_owned(),
                cells[3].replace('`', ""),
            ))
        })
        .collect();
    let row = |name: &str| rows.iter().find(|(n, _, _)| n == name);
    for m in annals::CATALOGUE {
        let (_, kind, labels) =
            row(m.name).unwrap_or_else(|| panic!("{} not in docs/metrics.md", m.name));
        assert_eq!(*kind, format!("{:?}", m.kind).to_lowercase(), "{}", m.name);
        assert_eq!(*labels, m.labels.join(", "), "{}", m.name);
    }
    for (name, _) in annals_cli::SERVE_METRICS {
        let (_, kind, _) = row(name).unwrap_or_else(|| panic!("{name} not in docs/metrics.md"));
        let want = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        assert_eq!(kind, want, "{name}");
    }
    let backend_only = [
        "annals_sqlite_group_commit_size",
        "annals_pg_append_retries_total",
        "annals_pg_horizon_lag_events",
    ];
    for (name, _, _) in &rows {
        assert!(
            annals::CATALOGUE.iter().any(|m| m.name == name)
                || annals_cli::SERVE_METRICS.iter().any(|(n, _)| n == name)
                || backend_only.contains(&name.as_str()),
            "docs/metrics.md lists {name}, which nothing records"
        );
    }
    // The backend-only ones are recorded where the docs say.
    for (name, file) in [
        (
            "annals_sqlite_group_commit_size",
            "annals-sqlite/src/conn.rs",
        ),
        (
            "annals_pg_append_retries_total",
            "annals-postgres/src/event_store.rs",
        ),
        (
            "annals_pg_horizon_lag_events",
            "annals-postgres/src/store.rs",
        ),
    ] {
        let path = format!("{}/../{file}", env!("CARGO_MANIFEST_DIR"));
        let source = std::fs::read_to_string(&path).expect("source");
        assert!(
            source.contains(&format!("\"{name}\"")),
            "{name} not in {file}"
        );
    }
    // Each target is a module that logs (or the snapshot target).
    let mut listed = 0;
    for line in targets.lines() {
        let Some(target) = line.strip_prefix("| `").and_then(|l| l.split('`').next()) else {
            continue;
        };
        listed += 1;
        if target == annals::SNAPSHOT_LOG_TARGET {
            continue;
        }
        let (krate, module) = target.split_once("::").expect("crate::module");
        let path = format!(
            "{}/../{}/src/{module}.rs",
            env!("CARGO_MANIFEST_DIR"),
            krate.replace('_', "-")
        );
        let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(source.contains("tracing::"), "{target} does not log");
    }
    assert_eq!(listed, 8);
}

/// `/health` decrypts with the master key of `--key-file` (and
/// `ANNALS_KEY_FILE`), like the read commands: the right key is healthy, a
/// wrong one fails naming it. On SQLite, the default key file beside the
/// database holds a wrong key throughout.
pub fn health_finds_the_master_key_like_the_read_commands(db: &Db) {
    db.run(&["init"]).ok();
    db.run(&["demo", "--accounts", "2", "--operations", "10"])
        .ok();
    let right = db.dir.path().join("right.key");
    let wrong = db.dir.path().join("wrong.key");
    std::fs::rename(db.key_file(), &right).expect("move the key");
    std::fs::write(&wrong, format!("{}\n", "ef".repeat(32))).expect("a wrong key");
    std::fs::copy(&wrong, db.key_file()).expect("a wrong default key file");
    let args = [
        "serve",
        "--metrics-addr",
        "127.0.0.1:0",
        "--max-transaction-age",
        "1h",
    ];
    let health = |mut command: std::process::Command, key: &std::path::Path, env: bool| {
        if env {
            command.env("ANNALS_KEY_FILE", key);
        }
        let server = Server::spawn(command);
        let (status, body) = server.get("/health");
        let report: Value = serde_json::from_str(&body).expect("JSON body");
        (status, report)
    };
    for env in [false, true] {
        let command = |key: &std::path::Path| {
            db.command_with_key_file(&args, if env { None } else { Some(key) })
        };
        let (status, report) = health(command(&right), &right, env);
        assert_eq!(status, 200, "{report}");
        assert_eq!(report["status"], "healthy", "{report}");
        let (status, report) = health(command(&wrong), &wrong, env);
        assert_eq!(status, 503, "{report}");
        assert_eq!(report["status"], "failed", "{report}");
        let error = report["error"].as_str().expect("error");
        assert!(error.contains("wrong master key"), "{report}");
    }
}
