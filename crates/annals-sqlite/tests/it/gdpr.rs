//! Crypto-shredding leaves no plaintext in the SQLite files.

use std::sync::Arc;

use annals::gdpr::{Crypto, MasterKey};
use annals::{
    Aggregate, CommandContext, DomainEvent, GdprStore, Repository, SnapshotConfig, SnapshotStore,
};
use serde::{Deserialize, Serialize};

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

/// The bytes of the database file and of its WAL (absent counts as empty).
fn files(path: &std::path::Path) -> (Vec<u8>, Vec<u8>) {
    let db = std::fs::read(path).expect("read the database file");
    let mut wal_path = path.as_os_str().to_owned();
    wal_path.push("-wal");
    let wal = std::fs::read(&wal_path).unwrap_or_default();
    (db, wal)
}

/// The event log never holds the plaintext; the (unencrypted) snapshot does
/// until the subject is forgotten. After `forget`, a WAL checkpoint and a
/// `VACUUM` (which rewrites the file without the freed pages), neither the
/// database file nor the WAL file contains the name.
#[tokio::test]
async fn no_plaintext_in_the_files_after_forget() {
    let store = crate::fresh_store().await;
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

    // The search works: the snapshot holds the name in clear.
    let conn = crate::raw(&store);
    let (db, wal) = files(store.path());
    assert!(
        contains(&db, name.as_bytes()) || contains(&wal, name.as_bytes()),
        "the snapshot's plaintext should be findable before forgetting"
    );
    drop(conn);

    g.forget("p1", "test", Some(&store), &[("Person", "p1")], &[])
        .await
        .expect("forget");
    let conn = crate::raw(&store);
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); VACUUM; PRAGMA wal_checkpoint(TRUNCATE);")
        .expect("checkpoint and vacuum");
    drop(conn);
    let (db, wal) = files(store.path());
    assert!(
        !contains(&db, name.as_bytes()),
        "plaintext in the database file"
    );
    assert!(
        !contains(&wal, name.as_bytes()),
        "plaintext in the WAL file"
    );
    let loaded = repo.load("p1").await.expect("still loads");
    assert_eq!(loaded.state.name, annals::gdpr::ERASED);
}
