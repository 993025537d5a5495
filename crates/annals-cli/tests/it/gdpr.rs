//! `annals gdpr forget|status`.

use serde_json::{json, Value};

use crate::util::Db;

#[test]
fn forget_records_the_erasure_and_status_shows_it() {
    let db = Db::sqlite();
    db.run(&["init"]).ok();
    let before = db.run(&["gdpr", "status", "owner-7"]).ok();
    assert!(
        before
            .stdout
            .contains("no data key and no erasure recorded"),
        "{}",
        before.stdout
    );
    let forgot = db
        .run(&[
            "gdpr",
            "forget",
            "owner-7",
            "--by",
            "dpo",
            "--snapshot",
            "Account-7",
        ])
        .ok();
    assert!(
        forgot.stdout.contains("forgot subject \"owner-7\""),
        "{}",
        forgot.stdout
    );
    assert!(
        forgot.stdout.contains("0 snapshot(s) deleted"),
        "{}",
        forgot.stdout
    );
    let after = db.run(&["gdpr", "status", "owner-7"]).ok();
    assert!(after.stdout.contains("forgotten at"), "{}", after.stdout);
    assert!(after.stdout.contains("by \"dpo\""), "{}", after.stdout);
}

#[test]
fn a_bad_snapshot_name_is_refused() {
    let db = Db::sqlite();
    db.run(&["init"]).ok();
    db.run(&["gdpr", "forget", "s", "--snapshot", "nodash"])
        .fails(2, &["--snapshot", "TYPE-ID"]);
}

/// One value of `account_balances`, straight from the database.
fn balance_owner(db: &Db, stream: &str) -> Option<String> {
    let sql = format!("SELECT owner FROM account_balances WHERE stream_id = '{stream}'");
    let Some(schema) = &db.pg_schema else {
        let conn = rusqlite::Connection::open(db.sqlite_path()).expect("open SQLite");
        return conn.query_row(&sql, [], |r| r.get(0)).ok();
    };
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
        let row = client.query_opt(&sql, &[]).await.expect("query");
        drop(client);
        let _ = conn.await;
        row.map(|r| r.get(0))
    })
}

fn opened(events: &[Value], stream: &str) -> Value {
    events
        .iter()
        .find(|e| e["stream_id"] == stream && e["event_type"] == "Opened")
        .unwrap_or_else(|| panic!("no Opened in {stream}"))["data"]
        .clone()
}

/// The demo end to end with personal data: the key file it generates, reads
/// that decrypt with it and show `[encrypted]` without it, commands that
/// need the plaintext refusing without a key, a wrong key reported on
/// every read path, and `gdpr forget` cascading into snapshots and the
/// `account_balances` read model.
fn demo_personal_data(db: &Db) {
    db.run(&["init"]).ok();
    let demo = db
        .run(&["demo", "--accounts", "3", "--operations", "40", "--json"])
        .ok();
    let key_file = db.key_file();
    let summary = demo.json();
    assert_eq!(
        summary["generated_key_file"],
        json!(key_file.display().to_string())
    );
    assert!(
        demo.stderr.contains("generated one into"),
        "{}",
        demo.stderr
    );
    assert_eq!(summary["check_passed"], json!(true));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file)
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // A second run uses the key file and does not generate another.
    let again = db
        .run(&["demo", "--accounts", "2", "--operations", "5", "--json"])
        .ok();
    assert_eq!(again.json()["generated_key_file"], Value::Null);

    let a = "Account-demo1-1";
    let b = "Account-demo1-2";
    // With the key: plaintext; as stored: ciphertext.
    let events = db.run(&["read-all", "--json"]).ok().json_lines();
    assert_eq!(
        opened(&events, a),
        json!({"account": "demo1-1", "owner": "ann", "email": "ann.demo1-1@mail.example"})
    );
    let raw = db.run(&["read", a, "--raw", "--json"]).ok().json_lines();
    assert!(raw[0]["data"]["owner"]["$enc"].is_string(), "{}", raw[0]);
    assert!(!raw[0]["data"].to_string().contains("mail.example"));
    let loaded = db
        .run(&["aggregate", "Account", "demo1-1", "--json"])
        .ok()
        .json();
    assert_eq!(loaded["state"]["email"], "ann.demo1-1@mail.example");
    if !db.is_postgres() {
        let bytes = std::fs::read(db.sqlite_path()).expect("database file");
        let mut wal = db.sqlite_path().into_os_string();
        wal.push("-wal");
        let wal = std::fs::read(wal).unwrap_or_default();
        let needle = b"ann.demo1-1@mail.example";
        assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        assert!(!wal.windows(needle.len()).any(|w| w == needle));
    }

    // Without a key: reads show the fields as encrypted; commands that
    // need the plaintext refuse, naming where the key was looked for.
    let kept = db.dir.path().join("kept.key");
    std::fs::rename(&key_file, &kept).expect("move the key away");
    let shown = db.run(&["read", a, "--json"]).ok().json_lines();
    assert_eq!(
        shown[0]["data"],
        json!({"account": "demo1-1", "owner": "[encrypted]", "email": "[encrypted]"})
    );
    let shown = db
        .run(&["aggregate", "Account", "demo1-1", "--json"])
        .ok()
        .json();
    assert_eq!(shown["state"]["owner"], "[encrypted]");
    db.run(&["snapshots", "create", "Account", "demo1-1"])
        .fails(2, &["no master key", "ANNALS_MASTER_KEY", "key file"]);

    // A wrong key: an error on every read path, never "[encrypted]" or
    // "[erased]".
    std::fs::write(&key_file, format!("{}\n", "ab".repeat(32))).expect("wrong key");
    for args in [
        &["read", a][..],
        &["read-all"][..],
        &["aggregate", "Account", "demo1-1"][..],
        &["event", raw[0]["event_id"].as_str().expect("id")][..],
    ] {
        db.run(args).fails(2, &["wrong master key", "demo1-1"]);
    }
    std::fs::rename(&kept, &key_file).expect("restore the key");

    // Forget the first account: its snapshot goes, the projection scrubs
    // its row, reads show the erased marker, the aggregate still loads.
    assert_eq!(balance_owner(db, a).as_deref(), Some("ann"));
    let forgot = db.run(&["gdpr", "forget", "demo1-1", "--by", "dpo"]).ok();
    assert!(
        forgot.stdout.contains("data key deleted"),
        "{}",
        forgot.stdout
    );
    assert!(
        forgot.stdout.contains("1 projection(s) notified"),
        "{}",
        forgot.stdout
    );
    assert_eq!(balance_owner(db, a).as_deref(), Some("[erased]"));
    assert_eq!(balance_owner(db, b).as_deref(), Some("bob"));
    let events = db.run(&["read-all", "--json"]).ok().json_lines();
    assert_eq!(
        opened(&events, a),
        json!({"account": "demo1-1", "owner": "[erased]", "email": "[erased]"})
    );
    assert_eq!(opened(&events, b)["owner"], "bob");
    let erased = db
        .run(&["aggregate", "Account", "demo1-1", "--json"])
        .ok()
        .json();
    assert_eq!(erased["state"]["owner"], "[erased]");
    assert_eq!(erased["snapshot_used"], json!(false));
    let status = db.run(&["gdpr", "status", "demo1-1"]).ok();
    assert!(status.stdout.contains("forgotten at"), "{}", status.stdout);
    // A rebuild of the read model writes the erased marker too.
    db.run(&["projections", "reset", "account_balances"]).ok();
    db.run(&["projections", "run", "--until-caught-up"]).ok();
    assert_eq!(balance_owner(db, a).as_deref(), Some("[erased]"));
}

#[test]
fn demo_personal_data_sqlite() {
    demo_personal_data(&Db::sqlite());
}

#[test]
fn demo_personal_data_postgres() {
    if let Some(db) = Db::postgres() {
        demo_personal_data(&db);
    }
}

/// On PostgreSQL there is no default key file: without `--key-file` or
/// `ANNALS_MASTER_KEY` the demo refuses.
#[test]
fn the_demo_on_postgres_needs_a_key() {
    let Some(db) = Db::postgres() else {
        return;
    };
    db.run(&["init"]).ok();
    let out = crate::util::command(db.dir.path())
        .args([
            "demo",
            "--database-url",
            &db.url,
            "--pg-schema",
            db.pg_schema.as_deref().expect("schema"),
        ])
        .output()
        .expect("run annals");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no master key"), "{stderr}");
    assert!(stderr.contains("ANNALS_MASTER_KEY"), "{stderr}");
}
