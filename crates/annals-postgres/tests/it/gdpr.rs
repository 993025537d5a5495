//! Crypto-shredding leaves no plaintext in the files of the test schema's
//! tables.

use std::sync::Arc;

use annals::gdpr::{Crypto, MasterKey};
use annals::{
    Aggregate, CommandContext, DomainEvent, GdprStore, Repository, SnapshotConfig, SnapshotStore,
};
use serde::{Deserialize, Serialize};

use crate::common::TestDb;

#[derive(Clone, Debug, Serialize, Deserialize, DomainEvent)]
enum PersonEvent {
    #[event(personal(subject = "person_id", fields("name")))]
    Registered { person_id: String, name: String },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Person {
    name: String,
}

impl Aggregate for Person {
    const TYPE: &'static str = "Person";
    type Event = PersonEvent;
    fn apply(&mut self, event: &PersonEvent) {
        let PersonEvent::Registered { name, .. } = event;
        self.name = name.clone();
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every file (all segments) of every relation of the schema, tables, TOAST
/// tables and indexes; `None` when the data directory is not readable.
async fn schema_files(
    raw: &tokio_postgres::Client,
    schema: &str,
) -> Option<Vec<(String, Vec<u8>)>> {
    let dir: String = raw
        .query_one("SHOW data_directory", &[])
        .await
        .expect("data_directory")
        .get(0);
    let rows = raw
        .query(
            "SELECT c.relname::text, pg_relation_filepath(c.oid) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname IN ($1, 'pg_toast') AND c.relkind IN ('r', 't', 'i', 'm') \
               AND (n.nspname = $1 OR c.oid IN (SELECT reltoastrelid FROM pg_class c2 \
                    JOIN pg_namespace n2 ON n2.oid = c2.relnamespace WHERE n2.nspname = $1)) \
               AND pg_relation_filepath(c.oid) IS NOT NULL",
            &[&schema],
        )
        .await
        .expect("relations");
    let mut out = Vec::new();
    for row in rows {
        let name: String = row.get(0);
        let rel: String = row.get(1);
        let base = std::path::Path::new(&dir).join(&rel);
        let mut segment = 0;
        loop {
            let path = if segment == 0 {
                base.clone()
            } else {
                base.with_extension(segment.to_string())
            };
            match std::fs::read(&path) {
                Ok(bytes) => out.push((format!("{name} ({})", path.display()), bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return None,
                Err(e) => panic!("reading {}: {e}", path.display()),
            }
            segment += 1;
        }
    }
    Some(out)
}

/// The tables of `schema` with a row whose text contains `needle`.
async fn rows_with_name(
    raw: &tokio_postgres::Client,
    schema: &str,
    tables: &[String],
    needle: &str,
) -> Vec<String> {
    let mut hits = Vec::new();
    for t in tables {
        let n: i64 = raw
            .query_one(
                &format!(
                    "SELECT count(*) FROM \"{schema}\".\"{t}\" x WHERE x::text LIKE '%' || $1 || '%'"
                ),
                &[&needle],
            )
            .await
            .expect("search rows")
            .get(0);
        if n > 0 {
            hits.push(t.clone());
        }
    }
    hits
}

/// The event log holds only ciphertext; the snapshot holds the name until
/// `forget` deletes it. After `VACUUM FULL` of the schema's tables (which
/// rewrites each into a new file) and a `CHECKPOINT`, no file of the schema's
/// tables, TOAST tables or indexes contains the name. Also checked through
/// SQL (each row as text), which works where the files are not readable.
/// The cluster's WAL (`pg_wal`) is not searched: it is shared by the whole
/// cluster and keeps the snapshot's insert until it is recycled.
#[tokio::test]
async fn no_plaintext_in_the_table_files_after_forget() {
    let Some(db) = TestDb::new("no_plaintext_in_the_table_files_after_forget").await else {
        return;
    };
    let store = db.store.clone();
    let g = GdprStore::new(
        store.clone(),
        Crypto::new::<PersonEvent>(store.clone(), Arc::new(MasterKey::from_bytes([7; 32]))),
    );
    let name = "Zebulon Quixotic-Plaintext";
    let repo = Repository::<Person, _>::new(g.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(1));
    repo.create("p1", &CommandContext::new(), |_| {
        Ok::<_, String>(vec![PersonEvent::Registered {
            person_id: "p1".into(),
            name: name.into(),
        }])
    })
    .await
    .expect("register");
    repo.snapshot("p1").await.expect("snapshot");
    assert!(store
        .load_snapshot("Person", "p1")
        .await
        .expect("load")
        .is_some());

    let raw = db.raw().await;
    let tables: Vec<String> = raw
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = $1",
            &[&db.schema],
        )
        .await
        .expect("tables")
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The searches work: before forgetting, the snapshot has the name.
    assert_eq!(
        rows_with_name(&raw, &db.schema, &tables, name).await,
        ["snapshots"]
    );
    raw.batch_execute("CHECKPOINT").await.expect("checkpoint");
    if let Some(files) = schema_files(&raw, &db.schema).await {
        assert!(
            files.iter().any(|(_, b)| contains(b, name.as_bytes())),
            "the snapshot's plaintext should be in a table file before forgetting"
        );
    }

    g.forget("p1", "test", Some(&store), &[("Person", "p1")], &[])
        .await
        .expect("forget");
    assert!(rows_with_name(&raw, &db.schema, &tables, name)
        .await
        .is_empty());
    for t in &tables {
        raw.batch_execute(&format!("VACUUM FULL \"{}\".\"{t}\"", db.schema))
            .await
            .expect("vacuum full");
    }
    raw.batch_execute("CHECKPOINT").await.expect("checkpoint");
    match schema_files(&raw, &db.schema).await {
        Some(files) => {
            assert!(!files.is_empty());
            for (file, bytes) in &files {
                assert!(!contains(bytes, name.as_bytes()), "plaintext in {file}");
            }
        }
        None => eprintln!("data directory not readable: checked through SQL only"),
    }
    let loaded = repo.load("p1").await.expect("still loads");
    assert_eq!(loaded.state.name, annals::gdpr::ERASED);
    db.cleanup().await;
}
