//! The library side: `App` embedded in another program, `AnyStore` under the
//! core's generic functions, and the registry.

use std::process::ExitCode;
use std::sync::Arc;

use annals::bank::Account;
use annals::{
    CheckpointStore, CommandContext, EventStore, GlobalPosition, ReadAll, Repository,
    SnapshotConfig, SnapshotStore,
};
use annals_cli::{AggregateOps, AnyStore, App, Backend, LoadRequest, Registered};
use futures::TryStreamExt;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("runtime")
}

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("lib.db").display())
}

#[test]
fn registry_lists_and_finds_types() {
    let app = App::new();
    assert_eq!(app.aggregate_types().count(), 0);
    let app = App::with_demo();
    assert_eq!(app.aggregate_types().collect::<Vec<_>>(), ["Account"]);
    let ops = app.aggregate("Account").expect("registered");
    assert_eq!(ops.aggregate_type(), "Account");
    assert_eq!(ops.schema_version(), 1);
    assert!(app.aggregate("account").is_none(), "names are exact");
    let app = App::new().register_ops(Arc::new(Registered::<Account>::new()));
    assert!(app.aggregate("Account").is_some());
}

#[test]
fn run_with_output_captures_the_command_output() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = sqlite_url(&dir);
    runtime().block_on(async {
        let mut out = Vec::new();
        let code = App::with_demo()
            .run_with_output(
                [
                    "annals",
                    "append",
                    "Account-9",
                    "--type",
                    "Opened",
                    "--data",
                    r#"{"owner":"kim"}"#,
                    "--json",
                    "--database-url",
                    &url,
                ],
                &mut out,
            )
            .await;
        assert_eq!(code, ExitCode::SUCCESS);
        let event: serde_json::Value = serde_json::from_slice(&out).expect("one JSON line");
        assert_eq!(event["stream_id"], "Account-9");

        let mut out = Vec::new();
        let code = App::new()
            .run_with_output(
                [
                    "annals",
                    "aggregate",
                    "Account",
                    "9",
                    "--database-url",
                    &url,
                ],
                &mut out,
            )
            .await;
        assert_eq!(code, ExitCode::from(2), "App::new() knows no aggregates");
        assert!(out.is_empty());
    });
}

#[test]
fn any_store_runs_the_generic_core() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = sqlite_url(&dir);
    runtime().block_on(async {
        let store = AnyStore::open(&url).await.expect("open");
        assert_eq!(store.backend(), Backend::Sqlite);
        store.migrate().await.expect("migrate is idempotent");

        // Repository: commands, snapshots, reloads.
        let repo = Repository::<Account, _>::new(store.clone())
            .with_snapshots(store.clone(), SnapshotConfig::every(2));
        let ctx = CommandContext::new();
        repo.execute("x", &ctx, |a| a.open("lee"))
            .await
            .expect("open");
        repo.execute("x", &ctx, |a| a.deposit(40))
            .await
            .expect("deposit");
        repo.execute("x", &ctx, |a| a.withdraw(15))
            .await
            .expect("withdraw");
        let loaded = repo.load("x").await.expect("load");
        assert_eq!(loaded.state.balance, 25);
        assert!(
            loaded.report.snapshot_version.is_some(),
            "{:?}",
            loaded.report
        );
        assert!(store
            .load_snapshot("Account", "x")
            .await
            .expect("snapshot store")
            .is_some());

        // Reads and checkpoints.
        let all: Vec<_> = store
            .read_all(ReadAll::from_start())
            .try_collect()
            .await
            .expect("read all");
        assert_eq!(all.len(), 3);
        let last = all[2].global_position;
        assert_eq!(store.head_position().await.expect("head"), Some(last));
        store.save_checkpoint("p", last).await.expect("save");
        assert_eq!(store.load_checkpoint("p").await.expect("load"), Some(last));
        store.reset_checkpoint("p").await.expect("reset");
        assert_eq!(store.load_checkpoint("p").await.expect("load"), None);
        assert!(last > GlobalPosition::START);

        // The registry, on the same store (no personal data: no key).
        let store = annals_cli::ops_store(
            &store,
            Arc::new(annals::gdpr::EnvKeyProvider::new(
                "ANNALS_TEST_MASTER_KEY_THAT_IS_NEVER_SET",
            )),
        );
        let ops = Registered::<Account>::new();
        let view = ops
            .load(&store, "x", LoadRequest::default())
            .await
            .expect("load");
        assert_eq!(view.version.map(|v| v.get()), Some(3));
        assert_eq!(view.state["balance"], 25);
        assert!(view.snapshot_used);
        let fresh = ops
            .load(
                &store,
                "x",
                LoadRequest {
                    no_snapshot: true,
                    ..LoadRequest::default()
                },
            )
            .await
            .expect("load");
        assert!(!fresh.snapshot_used);
        assert_eq!(fresh.events_replayed, 3);
        let snap = ops
            .take_snapshot(&store, "x")
            .await
            .expect("snapshot")
            .expect("the stream exists");
        assert_eq!(snap.snapshot.version.get(), 3);
        assert_eq!(snap.write, annals::SnapshotWrite::Written);
        assert!(ops
            .take_snapshot(&store, "nobody")
            .await
            .expect("snapshot")
            .is_none());
    });
}

#[test]
fn run_is_a_send_future() {
    // So an application can spawn its ops commands on a multi-thread runtime.
    fn assert_send<T: Send>(_: &T) {}
    let future = App::with_demo().run(["annals", "schema", "--backend", "sqlite"]);
    assert_send(&future);
    let mut out = Vec::new();
    let future = App::with_demo().run_with_output(["annals", "stats"], &mut out);
    assert_send(&future);
}

/// The application's upcasters apply to reads, never to a backup: `read`
/// shows the current version, `export` the stored one.
#[test]
fn export_writes_events_as_stored_while_reads_upcast() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = sqlite_url(&dir);
    let upcasters = Arc::new(annals::bank::upcasters().expect("the bank's chains are complete"));
    let app = || App::with_demo().with_upcasters(Arc::clone(&upcasters));
    let run = |args: Vec<String>| {
        let app = app();
        runtime().block_on(async move {
            let mut out = Vec::new();
            let code = app.run_with_output(args, &mut out).await;
            (code, String::from_utf8(out).expect("UTF-8"))
        })
    };
    let args = |a: &[&str]| {
        let mut v: Vec<String> = std::iter::once("annals")
            .chain(a.iter().copied())
            .map(str::to_owned)
            .collect();
        v.push("--database-url".into());
        v.push(url.clone());
        v
    };
    let (code, _) = run(args(&[
        "append",
        "Account-1",
        "--type",
        "Opened",
        "--event-version",
        "1",
        "--data",
        r#"{"name":"ann"}"#,
    ]));
    assert_eq!(code, ExitCode::SUCCESS);

    let (code, out) = run(args(&["read", "Account-1", "--json"]));
    assert_eq!(code, ExitCode::SUCCESS);
    let read: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(read["event_version"], 3, "reads upcast: {read}");
    assert_eq!(
        read["data"],
        serde_json::json!({"account": null, "owner": "ann", "email": null})
    );

    let file = dir.path().join("backup.jsonl");
    let file_arg = file.display().to_string();
    let (code, _) = run(args(&["export", "--output", &file_arg]));
    assert_eq!(code, ExitCode::SUCCESS);
    let text = std::fs::read_to_string(&file).expect("export file");
    let event = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
        .find_map(|v| Some(v.get("event")?.clone()))
        .expect("the event's line");
    assert_eq!(event["stream_id"], "Account-1");
    assert_eq!(
        event["event_version"], 1,
        "the export holds it as stored: {event}"
    );
    assert_eq!(event["data"], serde_json::json!({"name": "ann"}));
}
