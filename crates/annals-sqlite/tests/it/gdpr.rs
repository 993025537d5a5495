//! Crypto-shredding leaves no plaintext in the SQLite files.

use std::sync::Arc;

use annals::gdpr::{Crypto, MasterKey, SnapshotSubject};
use annals::{
    Aggregate, CommandContext, DomainEvent, GdprSnapshots, GdprStore, Repository, SnapshotConfig,
    SnapshotStore,
};
use annals_sqlite::SqliteEventStore;
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

/// Neither the event log nor the snapshot (encrypted with the subject's
/// key through `GdprSnapshots`) ever holds the plaintext: not before
/// `forget`, and not after it, a WAL checkpoint and a `VACUUM`. The subject
/// id, stored in clear, is found in both files' searches, so the search
/// works. After `forget` the snapshot is unreadable: the load deletes it
/// and replays the events, which read as erased.
#[tokio::test]
async fn no_plaintext_in_the_files_before_or_after_forget() {
    let store = crate::fresh_store().await;
    let crypto =
        Crypto::new::<PersonEvent>(store.clone(), Arc::new(MasterKey::from_bytes([7; 32])));
    let g = GdprStore::new(store.clone(), crypto.clone());
    let snapshots =
        GdprSnapshots::new(store.clone(), crypto).aggregate("Person", SnapshotSubject::AggregateId);
    let name = "Zebulon Quixotic-Plaintext";
    let subject = "subject-Zx91-in-clear";
    let repo = Repository::<Person, _>::new(g.clone())
        .with_snapshots(snapshots.clone(), SnapshotConfig::every(1));
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

    let conn = crate::raw(&store);
    let (db, wal) = files(store.path());
    assert!(
        contains(&db, subject.as_bytes()) || contains(&wal, subject.as_bytes()),
        "the search should find the subject id, stored in clear"
    );
    assert!(
        !contains(&db, name.as_bytes()),
        "plaintext in the database file"
    );
    assert!(
        !contains(&wal, name.as_bytes()),
        "plaintext in the WAL file"
    );
    drop(conn);

    g.forget::<SqliteEventStore>(subject, "test", None, &[], &[])
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
    let conn = crate::raw(&store);
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); VACUUM; PRAGMA wal_checkpoint(TRUNCATE);")
        .expect("checkpoint and vacuum");
    drop(conn);
    let (db, wal) = files(store.path());
    assert!(
        contains(&db, subject.as_bytes()),
        "the events still name the subject in clear"
    );
    assert!(
        !contains(&db, name.as_bytes()),
        "plaintext in the database file"
    );
    assert!(
        !contains(&wal, name.as_bytes()),
        "plaintext in the WAL file"
    );
}
