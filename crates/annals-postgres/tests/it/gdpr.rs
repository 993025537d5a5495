//! Crypto-shredding leaves no plaintext in the files of the test schema's
//! tables.

use std::sync::Arc;

use annals::gdpr::{Crypto, MasterKey, SnapshotSubject};
use annals::{
    Aggregate, CommandContext, DomainEvent, GdprSnapshots, GdprStore, Repository, SnapshotConfig,
    SnapshotStore,
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

/// Neither the event log nor the snapshot (encrypted with the subject's
/// key through `GdprSnapshots`) holds the plaintext, before or after
/// `forget`: searched through SQL (each row of each table as text) and in
/// the files of the schema's tables, TOAST tables and indexes (after a
/// `CHECKPOINT`, and after `forget` a `VACUUM FULL` that rewrites each table
/// into a new file). The subject id, stored in clear, is found by both
/// searches, so they work. The cluster's WAL (`pg_wal`) is not searched (it
/// is shared by the whole cluster); the plaintext never reaches the server.
#[tokio::test]
async fn no_plaintext_in_the_table_files_before_or_after_forget() {
    let Some(db) = TestDb::new("no_plaintext_in_the_table_files_before_or_after_forget").await
    else {
        return;
    };
    let store = db.store.clone();
    let crypto =
        Crypto::new::<PersonEvent>(store.clone(), Arc::new(MasterKey::from_bytes([7; 32])));
    let g = GdprStore::new(store.clone(), crypto.clone());
    let snapshots =
        GdprSnapshots::new(store.clone(), crypto).aggregate("Person", SnapshotSubject::AggregateId);
    let name = "Zebulon Quixotic-Plaintext";
    let subject = "subject-Zx91-in-clear";
    let repo =
        Repository::<Person, _>::new(g.clone()).with_snapshots(snapshots, SnapshotConfig::every(1));
    repo.create(subject, &CommandContext::new(), |_| {
        Ok::<_, String>(vec![PersonEvent::Registered {
            person_id: subject.into(),
            name: name.into(),
        }])
    })
    .await
    .expect("register");
    repo.snapshot(subject).await.expect("snapshot");
    assert!(store
        .load_snapshot("Person", subject)
        .await
        .expect("load")
        .is_some());
    let loaded = repo.load(subject).await.expect("load");
    assert!(loaded.report.snapshot_version.is_some());
    assert_eq!(loaded.state.name, name);

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
    // The searches work: the subject id is in clear in the events, the
    // snapshot and the key table.
    let with_subject = rows_with_name(&raw, &db.schema, &tables, subject).await;
    for t in ["events", "snapshots", "subject_keys"] {
        assert!(with_subject.iter().any(|x| x == t), "{t}: {with_subject:?}");
    }
    assert!(
        rows_with_name(&raw, &db.schema, &tables, name)
            .await
            .is_empty(),
        "plaintext in a row before forget"
    );
    raw.batch_execute("CHECKPOINT").await.expect("checkpoint");
    if let Some(files) = schema_files(&raw, &db.schema).await {
        assert!(
            files.iter().any(|(_, b)| contains(b, subject.as_bytes())),
            "the subject id should be in a table file"
        );
        for (file, bytes) in &files {
            assert!(!contains(bytes, name.as_bytes()), "plaintext in {file}");
        }
    }

    g.forget::<annals_postgres::PgEventStore>(subject, "test", None, &[], &[])
        .await
        .expect("forget");
    let erased = repo.load(subject).await.expect("still loads");
    assert_eq!(erased.report.snapshot_version, None);
    assert_eq!(erased.state.name, annals::gdpr::ERASED);
    assert!(
        store
            .load_snapshot("Person", subject)
            .await
            .expect("load")
            .is_none(),
        "the unreadable snapshot was deleted"
    );
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
    db.cleanup().await;
}
