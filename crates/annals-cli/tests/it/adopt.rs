//! `annals adopt`: rows of an existing table become one stream each, on
//! SQLite and (when `ANNALS_TEST_POSTGRES_URL` is set) PostgreSQL, with the
//! table in the store's own database; a rerun adds nothing.

use serde_json::{json, Value};

use crate::util::{per_backend, Db};

per_backend!(
    rows_become_streams_and_a_rerun_adds_nothing,
    changed_rows_and_foreign_streams_are_reported,
    bad_id_columns_are_errors_naming_the_row,
);

const QUERY: &str = "SELECT id, name, credit FROM customers ORDER BY id";

fn adopt(db: &Db, query: &str, extra: &[&str]) -> crate::util::Run {
    let mut args = vec![
        "adopt",
        "--query",
        query,
        "--category",
        "Customer",
        "--id-column",
        "id",
        "--type",
        "CustomerAdopted",
        "--json",
    ];
    args.extend_from_slice(extra);
    db.run(&args)
}

fn customers(db: &Db) {
    db.run(&["init"]).ok();
    db.execute_sql("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, credit INTEGER)");
    db.execute_sql(
        "INSERT INTO customers (id, name, credit) VALUES (1, 'ann', 100), (2, 'bob', 0), (3, 'cy', NULL)",
    );
}

fn rows_become_streams_and_a_rerun_adds_nothing(db: &Db) {
    customers(db);
    let first = adopt(db, QUERY, &["--batch-size", "2"]).ok().json();
    assert_eq!(first["rows"], 3);
    assert_eq!(first["adopted"], 3);
    assert_eq!(first["already_adopted"], 0);

    let events = db.all_events();
    assert_eq!(events.len(), 3);
    let ann = &events[0];
    assert_eq!(ann["stream_id"], "Customer-1");
    assert_eq!(ann["stream_version"], 1);
    assert_eq!(ann["event_type"], "CustomerAdopted");
    assert_eq!(ann["event_version"], 1);
    assert_eq!(ann["data"], json!({"id": 1, "name": "ann", "credit": 100}));
    assert_eq!(ann["metadata"]["adopted_from"]["row"], 1);
    assert_eq!(events[2]["data"]["credit"], Value::Null);

    let again = adopt(db, QUERY, &[]).ok().json();
    assert_eq!(again["rows"], 3);
    assert_eq!(again["adopted"], 0);
    assert_eq!(again["already_adopted"], 3);
    assert_eq!(again["changed"], 0);
    assert_eq!(db.all_events(), events, "a rerun adds nothing");

    // New rows since the first run are adopted; the others stay.
    db.execute_sql("INSERT INTO customers (id, name, credit) VALUES (4, 'di', 7)");
    let third = adopt(db, QUERY, &[]).ok().json();
    assert_eq!(third["adopted"], 1);
    assert_eq!(third["already_adopted"], 3);
    assert_eq!(db.all_events().len(), 4);
}

fn changed_rows_and_foreign_streams_are_reported(db: &Db) {
    customers(db);
    adopt(db, QUERY, &[]).ok();
    db.execute_sql("UPDATE customers SET credit = 5 WHERE id = 2");
    db.execute_sql("INSERT INTO customers (id, name, credit) VALUES (9, 'eve', 1)");
    db.run(&[
        "append",
        "Customer-9",
        "--type",
        "Registered",
        "--data",
        "{}",
    ])
    .ok();

    let run = adopt(db, QUERY, &[]);
    assert_eq!(run.code, 1, "a conflict fails the command: {run:#?}");
    let out = run.json();
    assert_eq!(out["rows"], 4);
    assert_eq!(out["adopted"], 0);
    assert_eq!(out["already_adopted"], 2);
    assert_eq!(out["changed"], 1);
    assert_eq!(out["changed_streams"], json!(["Customer-2"]));
    assert_eq!(out["conflicts"], 1);
    assert_eq!(out["conflicting_streams"], json!(["Customer-9"]));
    assert!(run.stderr.contains("not adopted"), "{run:#?}");

    // Nothing was overwritten.
    let bob: Vec<Value> = db.run(&["read", "Customer-2", "--json"]).ok().json_lines();
    assert_eq!(bob.len(), 1);
    assert_eq!(bob[0]["data"]["credit"], 0);
    let nine = db.run(&["read", "Customer-9", "--json"]).ok().json_lines();
    assert_eq!(nine.len(), 1);
    assert_eq!(nine[0]["event_type"], "Registered");

    // The text summary names them too.
    let text = db.run(&[
        "adopt",
        "--query",
        QUERY,
        "--category",
        "Customer",
        "--id-column",
        "id",
        "--type",
        "CustomerAdopted",
    ]);
    assert_eq!(text.code, 1);
    assert!(text.stdout.contains("changed  Customer-2"), "{text:#?}");
    assert!(text.stdout.contains("conflict Customer-9"), "{text:#?}");
}

fn bad_id_columns_are_errors_naming_the_row(db: &Db) {
    customers(db);
    adopt(db, "SELECT name, credit FROM customers", &[])
        .fails(2, &["no column \"id\"", "--id-column", "credit, name"]);
    adopt(
        db,
        "SELECT CASE WHEN id = 2 THEN NULL ELSE id END AS id, name FROM customers ORDER BY name",
        &[],
    )
    .fails(2, &["row 2 of the query", "\"id\" is NULL"]);
    // The row before the bad one was adopted; a rerun goes on from there.
    assert_eq!(db.all_events().len(), 1);
    adopt(db, "SELECT * FROM no_such_table", &[]).fails(2, &["no_such_table"]);
}

#[test]
fn sqlite_source_file_and_blob_columns() {
    let db = Db::sqlite();
    let source = db.dir.path().join("crm.db");
    let conn = rusqlite::Connection::open(&source).expect("open source");
    conn.execute_batch(
        "CREATE TABLE people (code TEXT, score REAL, photo BLOB);
         INSERT INTO people VALUES ('a-1', 1.5, x'00ff'), ('b-2', 2.0, NULL);",
    )
    .expect("source table");
    drop(conn);
    let source_url = format!("sqlite://{}", source.display());
    let args = |query: &'static str| {
        vec![
            "adopt".to_owned(),
            "--query".into(),
            query.into(),
            "--category".into(),
            "Person".into(),
            "--id-column".into(),
            "code".into(),
            "--type".into(),
            "PersonAdopted".into(),
            "--source".into(),
            source_url.clone(),
        ]
    };
    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let blob = args("SELECT * FROM people");
    db.run(&refs(&blob))
        .fails(2, &["row 1", "column \"photo\" is a BLOB", "hex(photo)"]);
    let plain = args("SELECT code, score, hex(photo) AS photo FROM people");
    let out = db.run(&refs(&plain)).ok();
    assert!(out.stdout.contains("2 row(s): 2 adopted"), "{out:#?}");
    let events = db.all_events();
    assert_eq!(events[0]["stream_id"], "Person-a-1");
    assert_eq!(
        events[0]["data"],
        json!({"code": "a-1", "score": 1.5, "photo": "00FF"})
    );
    assert_eq!(events[1]["data"]["photo"], "");

    let missing = db.run(&[
        "adopt",
        "--query",
        "SELECT 1",
        "--category",
        "X",
        "--id-column",
        "id",
        "--type",
        "T",
        "--source",
        "sqlite://does-not-exist.db",
    ]);
    missing.fails(2, &["does-not-exist.db", "does not exist"]);
}

#[test]
fn postgres_source_url_with_a_qualified_table() {
    let Some(db) = Db::postgres() else { return };
    db.run(&["init"]).ok();
    let schema = db.pg_schema.clone().expect("a PostgreSQL db has a schema");
    db.execute_sql(
        "CREATE TABLE orders (ref uuid PRIMARY KEY, total numeric, placed timestamptz, tags text[])",
    );
    db.execute_sql(
        "INSERT INTO orders VALUES ('7a2b8d8e-5a0f-4f43-9d53-3f5a3d0e2f10', 12.50, '2026-01-02T03:04:05Z', ARRAY['x','y'])",
    );
    // Read from another database URL (the same server here) with the table
    // named by schema, into a SQLite store.
    let target = Db::sqlite();
    let query = format!("SELECT * FROM \"{schema}\".orders");
    let out = target
        .run(&[
            "adopt",
            "--query",
            &query,
            "--category",
            "Order",
            "--id-column",
            "ref",
            "--type",
            "OrderAdopted",
            "--event-version",
            "2",
            "--source",
            &db.url,
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(out["adopted"], 1);
    let events = target.all_events();
    assert_eq!(
        events[0]["stream_id"],
        "Order-7a2b8d8e-5a0f-4f43-9d53-3f5a3d0e2f10"
    );
    assert_eq!(events[0]["event_version"], 2);
    assert_eq!(events[0]["data"]["total"], json!(12.50));
    assert_eq!(events[0]["data"]["tags"], json!(["x", "y"]));
    assert!(events[0]["data"]["placed"]
        .as_str()
        .is_some_and(|s| s.starts_with("2026-01-02")));
}
