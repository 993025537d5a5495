//! `--plan FILE` and `--raw` on the read commands, over the bank example's
//! stored history (`crates/annals/fixtures`).

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::util::Db;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../annals/fixtures")
        .join(name)
}

/// Appends the golden history as an older version of the example stored it.
fn store_history(db: &Db) -> Vec<Value> {
    db.run(&["init"]).ok();
    let history = std::fs::read_to_string(fixture("bank-history.jsonl")).expect("fixture");
    let mut stored = Vec::new();
    for line in history.lines() {
        let e: Value = serde_json::from_str(line).expect("fixture line");
        let data = e["data"].to_string();
        let version = e["event_version"].to_string();
        let run = db
            .run(&[
                "append",
                e["stream"].as_str().expect("stream"),
                "--type",
                e["event_type"].as_str().expect("type"),
                "--data",
                &data,
                "--event-version",
                &version,
                "--json",
            ])
            .ok();
        stored.push(run.json());
    }
    stored
}

pub fn plan_upcasts_every_read_command(db: &Db) {
    let stored = store_history(db);
    let plan = fixture("bank-plan.toml");
    let plan = plan.to_str().expect("utf-8 path");

    // As stored: without a plan (the stock binary has no upcasters) and
    // with --raw.
    for extra in [&[][..], &["--raw"][..]] {
        let mut args = vec!["read", "Account-old-1", "--json"];
        args.extend_from_slice(extra);
        let raw = db.run(&args).ok().json_lines();
        assert_eq!(raw[3]["event_type"], "Withdrawn");
        assert_eq!(raw[3]["event_version"], 1);
        assert_eq!(raw[3]["data"], json!({"amount": "3"}));
        assert!(raw.iter().all(|e| e.get("stored_event_version").is_none()));
    }

    // Through the plan: current types, versions and payloads, each
    // upcasted event saying what it is stored as.
    let read = db
        .run(&["read", "Account-old-1", "--plan", plan, "--json"])
        .ok()
        .json_lines();
    let shapes: Vec<(String, u64, Value)> = read
        .iter()
        .map(|e| {
            (
                e["event_type"].as_str().expect("type").to_owned(),
                e["event_version"].as_u64().expect("version"),
                e["data"].clone(),
            )
        })
        .collect();
    assert_eq!(
        shapes,
        [
            (
                "Opened".into(),
                3,
                json!({"account": null, "owner": "ann", "email": null}),
            ),
            ("Deposited".into(), 3, json!({"amount": 1250})),
            ("Deposited".into(), 3, json!({"amount": 29})),
            ("Withdrew".into(), 2, json!({"amount": 300})),
            ("Deposited".into(), 3, json!({"amount": 1000})),
            ("Deposited".into(), 3, json!({"amount": 5})),
        ]
    );
    assert_eq!(read[0]["stored_event_version"], 1);
    assert_eq!(read[3]["stored_event_type"], "Withdrawn");
    assert_eq!(read[4]["stored_event_version"], 2);
    assert!(read[5].get("stored_event_version").is_none());
    let table = db
        .run(&["read", "Account-old-1", "--plan", plan])
        .ok()
        .stdout;
    assert!(
        table.contains("Withdrew (v2, stored as Withdrawn v1)"),
        "{table}"
    );
    assert!(table.contains("Deposited (v3, stored v2)"), "{table}");

    let all = db
        .run(&["read-all", "--plan", plan, "--json"])
        .ok()
        .json_lines();
    assert_eq!(all.len(), stored.len());
    assert!(all.iter().all(|e| e["event_type"] != "Withdrawn"));

    let id = stored[3]["event_id"].as_str().expect("id");
    let event = db.run(&["event", id, "--plan", plan]).ok().stdout;
    assert!(event.contains("type            Withdrew"), "{event}");
    assert!(
        event.contains("stored_as       Withdrawn v1 (upcasted)"),
        "{event}"
    );
    let raw_event = db.run(&["event", id, "--raw"]).ok().stdout;
    assert!(
        raw_event.contains("type            Withdrawn"),
        "{raw_event}"
    );

    for (id, owner, balance) in [
        ("old-1", "ann", 1984),
        ("old-2", "bob", 123_706_779),
        ("new-3", "cy", 0),
    ] {
        let loaded = db
            .run(&["aggregate", "Account", id, "--plan", plan, "--json"])
            .ok()
            .json();
        assert_eq!(
            loaded["state"],
            json!({"owner": owner, "email": null, "balance": balance, "open": true}),
            "{id}"
        );
    }
    // The old events do not decode as they are stored.
    let refused = db.run(&["aggregate", "Account", "old-1", "--raw"]);
    assert_eq!(refused.code, 2, "{refused:#?}");
}

pub fn bad_plans_are_refused_before_reading(db: &Db) {
    store_history(db);
    let dir = db.dir.path();
    db.run(&["read", "Account-old-1", "--plan", "missing.toml"])
        .fails(2, &["missing.toml", "cannot read the plan"]);
    let bad_filter = dir.join("bad-filter.toml");
    std::fs::write(
        &bad_filter,
        "[[step]]\nevent_type = \"Opened\"\nfrom_version = 1\nfilter = '{owner: .name'\n",
    )
    .expect("write");
    let path = bad_filter.to_str().expect("utf-8");
    db.run(&["read-all", "--plan", path]).fails(
        2,
        &[
            "bad-filter.toml:4:",
            "step 1 (Opened v1)",
            "does not compile",
        ],
    );
    let bad_toml = dir.join("bad-toml.toml");
    std::fs::write(
        &bad_toml,
        "[[step]]\nevent_type = \"Opened\"\nfrom_version = one\n",
    )
    .expect("write");
    let path = bad_toml.to_str().expect("utf-8");
    db.run(&["aggregate", "Account", "old-1", "--plan", path])
        .fails(2, &["bad-toml.toml:3:", "step 1"]);
    let hole = dir.join("hole.toml");
    std::fs::write(
        &hole,
        "[[step]]\nevent_type = \"Deposited\"\nfrom_version = 1\nfilter = '.'\n\n\
         [[step]]\nevent_type = \"Deposited\"\nfrom_version = 3\nfilter = '.'\n",
    )
    .expect("write");
    let path = hole.to_str().expect("utf-8");
    db.run(&["event", "1", "--plan", path]).fails(
        2,
        &[
            "hole.toml",
            "no upcaster for event type \"Deposited\" from version 2 to version 3",
        ],
    );
    // A failing filter names the event.
    let failing = dir.join("failing.toml");
    std::fs::write(
        &failing,
        "[[step]]\nevent_type = \"Opened\"\nfrom_version = 1\nfilter = 'error(\"no name\")'\n",
    )
    .expect("write");
    let path = failing.to_str().expect("utf-8");
    db.run(&["read", "Account-old-2", "--plan", path])
        .fails(2, &["Account-old-2 version 1", "stored at v1", "no name"]);
    let conflict = db.run(&["read", "Account-old-1", "--plan", "x.toml", "--raw"]);
    assert_eq!(conflict.code, 2, "{conflict:#?}");
}
