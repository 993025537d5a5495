//! GDPR crypto-shredding ([`annals::gdpr`]): personal fields are encrypted on
//! append, decrypted on read, read as `"[erased]"` once the subject is
//! forgotten (aggregates still load), and a wrong master key is a typed error.

use std::sync::{Arc, Mutex};

use annals::gdpr::{
    Crypto, ErasureHandler, ErasureNotice, GdprError, MasterKey, SnapshotSubject, ENCRYPTED, ERASED,
};
use annals::{
    Aggregate, CommandContext, DomainEvent, Error, EventStore, ExpectedVersion, GdprSnapshots,
    GdprStore, KeyStore, NewEvent, ReadAll, ReadStream, Repository, SnapshotConfig, SnapshotStore,
    StreamId,
};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// A person's events: `Registered` carries a name and an e-mail of the
/// subject named by `person_id`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
enum PersonEvent {
    #[event(personal(subject = "person_id", fields("name", "email")))]
    Registered {
        person_id: String,
        name: String,
        email: Option<String>,
    },
    Visited {
        person_id: String,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Person {
    name: String,
    email: Option<String>,
    visits: u32,
}

impl Aggregate for Person {
    const TYPE: &'static str = "Person";
    type Event = PersonEvent;
    fn apply(&mut self, event: &PersonEvent) {
        match event {
            PersonEvent::Registered { name, email, .. } => {
                self.name = name.clone();
                self.email = email.clone();
            }
            PersonEvent::Visited { .. } => self.visits += 1,
        }
    }
}

fn key(n: u8) -> MasterKey {
    MasterKey::from_bytes([n; 32])
}

fn gdpr<S: EventStore + KeyStore>(store: &S, master: MasterKey) -> GdprStore<S, S> {
    GdprStore::new(
        store.clone(),
        Crypto::new::<PersonEvent>(store.clone(), Arc::new(master)),
    )
}

async fn register<S: EventStore + KeyStore>(g: &GdprStore<S, S>, id: &str, name: &str) {
    Repository::<Person, _>::new(g.clone())
        .create(id, &CommandContext::new(), |_| {
            Ok::<_, String>(vec![
                PersonEvent::Registered {
                    person_id: id.into(),
                    name: name.into(),
                    email: Some(format!("{id}@mail.example")),
                },
                PersonEvent::Visited {
                    person_id: id.into(),
                },
            ])
        })
        .await
        .expect("register");
}

/// Personal fields are ciphertext as stored and plaintext through the
/// wrapper on every read path; a retried append still deduplicates.
pub async fn gdpr_encrypts_on_append_and_decrypts_on_read<S: EventStore + KeyStore>(store: S) {
    let g = gdpr(&store, key(1));
    register(&g, "p1", "Ada Lovelace").await;
    let s = StreamId::parse("Person-p1").expect("stream");

    let raw = store
        .read_stream_to_vec(&s, ReadStream::forward())
        .await
        .expect("raw read");
    let stored = raw[0].data.as_str();
    // Whole values: a space, '@' or '.' never occurs in base64 ciphertext,
    // while a short word like "Ada" can (it did once).
    assert!(
        !stored.contains("Ada Lovelace"),
        "plaintext stored: {stored}"
    );
    assert!(
        !stored.contains("p1@mail.example"),
        "plaintext stored: {stored}"
    );
    assert!(stored.contains("$enc"), "{stored}");
    assert_eq!(
        raw[0].data.to_value().expect("json")["person_id"],
        json!("p1"),
        "subject in clear: {stored}"
    );

    let read = g
        .read_stream_to_vec(&s, ReadStream::forward())
        .await
        .expect("read");
    assert_eq!(
        read[0].data.to_value().expect("json"),
        json!({"person_id": "p1", "name": "Ada Lovelace", "email": "p1@mail.example"})
    );
    let all: Vec<_> = g
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("read_all");
    assert_eq!(all[0].data, read[0].data);
    let page = g
        .read_feed_page(&ReadAll::from_start(), 10)
        .await
        .expect("feed page");
    assert_eq!(page.events[0].data, read[0].data);
    let one = g
        .read_event(read[0].event_id)
        .await
        .expect("read_event")
        .expect("found");
    assert_eq!(one.data, read[0].data);
    let loaded = Repository::<Person, _>::new(g.clone())
        .load("p1")
        .await
        .expect("load");
    assert_eq!(loaded.state.name, "Ada Lovelace");

    // The upcasters run after decryption: a step that needs the plain
    // name sees it.
    let upcasters = annals::Upcasters::builder()
        .step(annals::Step::new(
            "Registered",
            1,
            |mut v: serde_json::Value| {
                let name = v["name"]
                    .as_str()
                    .ok_or("name is not plaintext")?
                    .to_uppercase();
                v["name"] = json!(name);
                Ok::<_, annals::BoxError>(v)
            },
        ))
        .build_without_types()
        .expect("upcasters");
    let upcast = g
        .clone()
        .with_upcasters(Arc::new(upcasters))
        .read_stream_to_vec(&s, ReadStream::forward())
        .await
        .expect("upcast read");
    assert_eq!(upcast[0].event_version, 2);
    assert_eq!(
        upcast[0].data.to_value().expect("json")["name"],
        json!("ADA LOVELACE")
    );

    // A retry of the same event (same id, same plaintext) is a no-op even
    // though its ciphertext differs (fresh nonce): the fingerprint is the
    // plaintext's, keyed by the subject's data key.
    let t = StreamId::parse("Person-p2").expect("stream");
    let e = NewEvent::new(
        "Registered",
        json!({"person_id": "p2", "name": "Grace", "email": null}),
    );
    g.append(&t, ExpectedVersion::NoStream, vec![e.clone()])
        .await
        .expect("first");
    let again = g
        .append(&t, ExpectedVersion::NoStream, vec![e])
        .await
        .expect("retry");
    assert!(again.deduplicated);
}

struct Scrubber(Mutex<Vec<String>>);

impl ErasureHandler for Scrubber {
    fn on_erasure<'a>(
        &'a self,
        notice: &'a ErasureNotice,
    ) -> futures::future::BoxFuture<'a, annals::Result<()>> {
        Box::pin(async move {
            self.0.lock().expect("lock").push(notice.subject.clone());
            Ok(())
        })
    }
}

/// Forgetting deletes the key and the snapshots, records the erasure,
/// notifies the handlers; reads then show the erased marker and the
/// aggregate still loads; other subjects are untouched.
pub async fn gdpr_forget_erases_and_aggregates_still_load<
    S: EventStore + KeyStore + SnapshotStore,
>(
    store: S,
) {
    let g = gdpr(&store, key(1));
    register(&g, "p1", "Ada Lovelace").await;
    register(&g, "p2", "Grace Hopper").await;
    let repo = Repository::<Person, _>::new(g.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(1));
    repo.snapshot("p1").await.expect("snapshot");
    assert!(store
        .load_snapshot("Person", "p1")
        .await
        .expect("load")
        .is_some());

    let scrubber = Scrubber(Mutex::new(Vec::new()));
    let out = g
        .forget(
            "p1",
            "dpo@example",
            Some(&store),
            &[("Person", "p1")],
            &[&scrubber],
        )
        .await
        .expect("forget");
    assert!(out.key_deleted);
    assert_eq!(out.snapshots_deleted, 1);
    assert_eq!(*scrubber.0.lock().expect("lock"), ["p1"]);
    let record = store.erasure("p1").await.expect("log").expect("recorded");
    assert_eq!(record.erased_by, "dpo@example");
    assert_eq!(record.subject_hash, annals::gdpr::subject_hash("p1"));
    assert!(!record.subject_hash.contains("p1"));
    assert!(store.erasure("p2").await.expect("log").is_none());
    assert!(store.load_key("p1").await.expect("key").is_none());

    let s = StreamId::parse("Person-p1").expect("stream");
    let read = g
        .read_stream_to_vec(&s, ReadStream::forward())
        .await
        .expect("read after forget");
    assert_eq!(
        read[0].data.to_value().expect("json"),
        json!({"person_id": "p1", "name": ERASED, "email": ERASED})
    );
    let p1 = repo.load("p1").await.expect("aggregate still loads");
    assert_eq!(p1.state.name, ERASED);
    assert_eq!(p1.state.visits, 1);
    let p2 = repo.load("p2").await.expect("other subject");
    assert_eq!(p2.state.name, "Grace Hopper");
    let all: Vec<_> = g
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("a rebuild reads everything");
    assert_eq!(all.len(), 4);
}

/// A wrong master key is `GdprError::WrongMasterKey`, on reads and on
/// appends for an existing subject; a missing one is `NoMasterKey`. Neither
/// reads as erased data.
pub async fn gdpr_wrong_master_key_is_a_typed_error<S: EventStore + KeyStore>(store: S) {
    register(&gdpr(&store, key(1)), "p1", "Ada Lovelace").await;
    let wrong = gdpr(&store, key(2));
    let s = StreamId::parse("Person-p1").expect("stream");
    let err = wrong
        .read_stream_to_vec(&s, ReadStream::forward())
        .await
        .expect_err("wrong key");
    match err {
        Error::Gdpr(e) => match *e {
            GdprError::WrongMasterKey {
                subject,
                stored_key_id,
                configured_key_id,
            } => {
                assert_eq!(subject, "p1");
                assert_eq!(stored_key_id, key(1).id());
                assert_eq!(configured_key_id, key(2).id());
            }
            other => panic!("expected WrongMasterKey, got {other:?}"),
        },
        other => panic!("expected a GDPR error, got {other:?}"),
    }
    let err = wrong
        .append(
            &s,
            ExpectedVersion::Any,
            vec![NewEvent::new(
                "Registered",
                json!({"person_id": "p1", "name": "x", "email": null}),
            )],
        )
        .await
        .expect_err("wrong key on append");
    assert!(
        matches!(&err, Error::Gdpr(e) if matches!(**e, GdprError::WrongMasterKey { .. })),
        "{err:?}"
    );

    let none = GdprStore::new(
        store.clone(),
        Crypto::new::<PersonEvent>(
            store.clone(),
            Arc::new(annals::gdpr::EnvKeyProvider::new(
                "ANNALS_TEST_MASTER_KEY_THAT_IS_NEVER_SET",
            )),
        ),
    );
    let err = none
        .read_stream_to_vec(&s, ReadStream::forward())
        .await
        .expect_err("no key");
    assert!(
        matches!(&err, Error::Gdpr(e) if matches!(**e, GdprError::NoMasterKey { .. })),
        "{err:?}"
    );
    // Events without personal data need no key.
    let v = StreamId::parse("Person-p9").expect("stream");
    none.append(
        &v,
        ExpectedVersion::NoStream,
        vec![NewEvent::new("Visited", json!({"person_id": "p9"}))],
    )
    .await
    .expect("no personal data, no key needed");
}

fn snapshots<S: SnapshotStore + KeyStore>(store: &S, master: MasterKey) -> GdprSnapshots<S, S> {
    GdprSnapshots::new(
        store.clone(),
        Crypto::new::<PersonEvent>(store.clone(), Arc::new(master)),
    )
    .aggregate("Person", SnapshotSubject::AggregateId)
}

fn is_wrong_key(err: &Error) -> bool {
    matches!(err, Error::Gdpr(e) if matches!(**e, GdprError::WrongMasterKey { .. }))
}

/// Snapshots of an aggregate holding personal data are encrypted with the
/// subject's key (the stored state holds no plaintext) and load decrypted;
/// after forgetting, a snapshot is unreadable: the load deletes it and
/// replays the events, which read as erased. `forget_snapshots` deletes a
/// subject's snapshots at once.
pub async fn gdpr_snapshots_are_encrypted_and_forgotten<
    S: EventStore + KeyStore + SnapshotStore,
>(
    store: S,
) {
    let g = gdpr(&store, key(1));
    register(&g, "p1", "Ada Lovelace").await;
    register(&g, "p2", "Grace Hopper").await;
    let repo = Repository::<Person, _>::new(g.clone())
        .with_snapshots(snapshots(&store, key(1)), SnapshotConfig::every(1));
    repo.snapshot("p1").await.expect("snapshot p1");
    repo.snapshot("p2").await.expect("snapshot p2");

    let stored = store
        .load_snapshot("Person", "p1")
        .await
        .expect("raw load")
        .expect("stored");
    let text = stored.state.to_string();
    assert!(!text.contains("Ada Lovelace"), "plaintext snapshot: {text}");
    assert!(
        !text.contains("p1@mail.example"),
        "plaintext snapshot: {text}"
    );
    assert_eq!(stored.state["$subject"], json!("p1"), "{text}");
    assert!(stored.state["$enc"].is_string(), "{text}");

    let loaded = repo.load("p1").await.expect("load from the snapshot");
    assert_eq!(loaded.report.snapshot_version, stored.version.into());
    assert_eq!(loaded.state.name, "Ada Lovelace");
    assert_eq!(loaded.state.email.as_deref(), Some("p1@mail.example"));

    // Forget p1 without naming its snapshot: the stored ciphertext stays
    // until a load finds it unreadable, deletes it and replays.
    g.forget::<S>("p1", "dpo", None, &[], &[])
        .await
        .expect("forget");
    assert!(store
        .load_snapshot("Person", "p1")
        .await
        .expect("raw load")
        .is_some());
    let erased = repo.load("p1").await.expect("loads after forget");
    assert_eq!(erased.report.snapshot_version, None);
    assert_eq!(erased.state.name, ERASED);
    assert_eq!(erased.state.email.as_deref(), Some(ERASED));
    assert_eq!(erased.state.visits, 1);
    assert!(
        store
            .load_snapshot("Person", "p1")
            .await
            .expect("raw load")
            .is_none(),
        "the unreadable snapshot is deleted"
    );
    // No new snapshot for a forgotten subject: it would need a new key.
    let err = repo
        .snapshot("p1")
        .await
        .expect_err("no snapshot after forget");
    assert!(
        matches!(&err, Error::Gdpr(e) if matches!(**e, GdprError::SubjectForgotten { .. })),
        "{err:?}"
    );
    assert!(store.load_key("p1").await.expect("key").is_none());
    let again = repo.load("p1").await.expect("load");
    assert_eq!(again.state.name, ERASED);

    // forget_snapshots deletes the subject's snapshots at once.
    let snaps = snapshots(&store, key(1));
    g.forget::<S>("p2", "dpo", None, &[], &[])
        .await
        .expect("forget p2");
    assert_eq!(snaps.forget_snapshots("p2").await.expect("delete"), 1);
    assert!(store
        .load_snapshot("Person", "p2")
        .await
        .expect("raw load")
        .is_none());
}

/// A wrong master key fails a load from an encrypted snapshot with
/// `WrongMasterKey` (not a replay, not erased data), and leaves the
/// snapshot in place. A crypto that redacts without a master key reads
/// encrypted fields as `"[encrypted]"` and passes the snapshot over, but a
/// wrong key is still an error there.
pub async fn gdpr_wrong_master_key_on_snapshots_and_redaction<
    S: EventStore + KeyStore + SnapshotStore,
>(
    store: S,
) {
    let g = gdpr(&store, key(1));
    register(&g, "p1", "Ada Lovelace").await;
    Repository::<Person, _>::new(g.clone())
        .with_snapshots(snapshots(&store, key(1)), SnapshotConfig::every(1))
        .snapshot("p1")
        .await
        .expect("snapshot");

    let wrong = Repository::<Person, _>::new(gdpr(&store, key(2)))
        .with_snapshots(snapshots(&store, key(2)), SnapshotConfig::every(1));
    let err = wrong.load("p1").await.expect_err("wrong key");
    assert!(is_wrong_key(&err), "{err:?}");
    let err = snapshots(&store, key(2))
        .load_snapshot("Person", "p1")
        .await
        .expect_err("wrong key on the snapshot");
    assert!(is_wrong_key(&err), "{err:?}");
    assert!(store
        .load_snapshot("Person", "p1")
        .await
        .expect("raw")
        .is_some());

    let unset = || {
        Crypto::new::<PersonEvent>(
            store.clone(),
            Arc::new(annals::gdpr::EnvKeyProvider::new(
                "ANNALS_TEST_MASTER_KEY_THAT_IS_NEVER_SET",
            )),
        )
        .redact_without_master_key()
    };
    let redacting = Repository::<Person, _>::new(GdprStore::new(store.clone(), unset()))
        .with_snapshots(
            GdprSnapshots::new(store.clone(), unset())
                .aggregate("Person", SnapshotSubject::AggregateId),
            SnapshotConfig::every(1),
        );
    let shown = redacting.load("p1").await.expect("redacted load");
    assert_eq!(shown.report.snapshot_version, None);
    assert_eq!(shown.state.name, ENCRYPTED);
    assert_eq!(shown.state.visits, 1);
    assert!(store
        .load_snapshot("Person", "p1")
        .await
        .expect("raw")
        .is_some());

    let wrong_redacting = GdprStore::new(
        store.clone(),
        Crypto::new::<PersonEvent>(store.clone(), Arc::new(key(2))).redact_without_master_key(),
    );
    let err = wrong_redacting
        .read_stream_to_vec(
            &StreamId::parse("Person-p1").expect("stream"),
            ReadStream::forward(),
        )
        .await
        .expect_err("a wrong key is never redacted");
    assert!(is_wrong_key(&err), "{err:?}");
}

/// The idempotency fingerprint of an event with personal data is keyed by
/// its subject's data key: not the plain SHA-256 of the payload (which
/// would let anyone test a guessed name against the stored digest after the
/// key is deleted), the same for a retry under the same key, and another
/// one under another subject's key.
pub async fn gdpr_fingerprints_are_keyed<S: EventStore + KeyStore>(store: S) {
    let crypto = Crypto::new::<PersonEvent>(store.clone(), Arc::new(key(1)));
    let s = StreamId::parse("Person-k1").expect("stream");
    let plain = json!({"person_id": "k1", "name": "Ada Lovelace", "email": null});
    let event = NewEvent::new("Registered", plain.clone());
    let first = crypto
        .encrypt_batch(&s, vec![event.clone()])
        .await
        .expect("encrypt");
    let again = crypto
        .encrypt_batch(&s, vec![event])
        .await
        .expect("encrypt again");
    let fp = first[0].fingerprint.expect("fingerprint set");
    assert_eq!(again[0].fingerprint, Some(fp), "a retry computes the same");
    let unkeyed = annals::Fingerprint::of_value(&plain).expect("fingerprint");
    assert_ne!(fp, unkeyed, "the stored digest must not be the plaintext's");

    // The same plaintext of another subject (another data key) differs too.
    let other = json!({"person_id": "k2", "name": "Ada Lovelace", "email": null});
    let t = StreamId::parse("Person-k2").expect("stream");
    let theirs = crypto
        .encrypt_batch(&t, vec![NewEvent::new("Registered", other.clone())])
        .await
        .expect("encrypt");
    let theirs = theirs[0].fingerprint.expect("fingerprint set");
    assert_ne!(theirs, annals::Fingerprint::of_value(&other).expect("fp"));
    assert_ne!(theirs, fp);

    // Events without personal data keep the plain fingerprint (none set here:
    // the backend computes it).
    let visit = crypto
        .encrypt_batch(
            &s,
            vec![NewEvent::new("Visited", json!({"person_id": "k1"}))],
        )
        .await
        .expect("encrypt");
    assert!(visit[0].fingerprint.is_none());
}

/// Keys and erasures imported from another store (what `annals import`
/// does with an export): the events copied as stored decrypt with the same
/// master key, a subject forgotten there reads as erased here (its key here
/// deleted too), a rerun changes nothing, a wrong master key is still
/// `WrongMasterKey`, and a different key for a subject is
/// `GdprError::KeyConflict` with nothing written.
pub async fn gdpr_keys_import_all_or_nothing<S: annals::EventImport + KeyStore>(store: S) {
    use annals::gdpr::{KeyImport, SubjectKey};
    let source = annals::InMemoryStore::new();
    let g = gdpr(&source, key(1));
    for (id, name) in [
        ("p1", "Ada Lovelace"),
        ("p2", "Alan Turing"),
        ("p3", "Grace Hopper"),
    ] {
        register(&g, id, name).await;
    }
    let stored: Vec<_> = source
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("source events");
    store
        .import_events(stored.into_iter().map(annals::ImportEvent::from).collect())
        .await
        .expect("import the events");
    let subject_key = |s: &str| {
        let s = s.to_owned();
        let source = source.clone();
        async move {
            let key = source.load_key(&s).await.expect("load").expect("a key");
            SubjectKey { subject: s, key }
        }
    };
    // Before p2 is forgotten: every key.
    let before = KeyImport {
        keys: vec![
            subject_key("p1").await,
            subject_key("p2").await,
            subject_key("p3").await,
        ],
        ..KeyImport::default()
    };
    assert!(!store.holds_keys().await.expect("holds_keys"), "no key yet");
    let report = store.import_keys(&before).await.expect("import the keys");
    assert_eq!(report.keys_inserted, 3);
    assert!(store.holds_keys().await.expect("holds_keys"));
    let here = gdpr(&store, key(1));
    let p2 = StreamId::parse("Person-p2").expect("stream");
    let read = |g: GdprStore<S, S>, s: StreamId| async move {
        g.read_stream_to_vec(&s, ReadStream::forward()).await
    };
    let events = read(here.clone(), p2.clone()).await.expect("decrypts");
    assert_eq!(
        events[0].data.to_value().expect("json")["name"],
        "Alan Turing"
    );

    // p2 forgotten in the source: its erasure, and no key for it.
    g.forget::<annals::InMemoryStore>("p2", "dpo", None, &[], &[])
        .await
        .expect("forget");
    let record = source
        .erasure("p2")
        .await
        .expect("erasure")
        .expect("recorded");
    let after = KeyImport {
        keys: vec![subject_key("p1").await, subject_key("p3").await],
        forget: vec!["p2".into()],
        erasures: vec![record.clone()],
    };
    let report = store.import_keys(&after).await.expect("import the keys");
    assert_eq!(
        (
            report.keys_inserted,
            report.keys_present,
            report.keys_deleted
        ),
        (0, 2, 1)
    );
    assert_eq!((report.erasures_recorded, report.erasures_present), (1, 0));
    let events = read(here.clone(), p2.clone()).await.expect("erased");
    assert_eq!(events[0].data.to_value().expect("json")["name"], ERASED);
    let logged = store
        .erasure("p2")
        .await
        .expect("erasure")
        .expect("recorded here");
    assert!(annals::gdpr::same_erasure(&logged, &record));
    // A rerun changes nothing.
    let report = store.import_keys(&after).await.expect("rerun");
    assert_eq!(
        (
            report.keys_inserted,
            report.keys_present,
            report.keys_deleted
        ),
        (0, 2, 0)
    );
    assert_eq!((report.erasures_recorded, report.erasures_present), (0, 1));

    // A wrong master key is reported as one, not as erased data.
    let p1 = StreamId::parse("Person-p1").expect("stream");
    let err = read(gdpr(&store, key(2)), p1.clone())
        .await
        .expect_err("wrong key");
    assert!(
        matches!(&err, Error::Gdpr(e) if matches!(**e, GdprError::WrongMasterKey { .. })),
        "{err:?}"
    );

    // Another store's key for p1 (and a new subject's): nothing written.
    let other = annals::InMemoryStore::new();
    register(&gdpr(&other, key(3)), "p1", "Someone Else").await;
    register(&gdpr(&other, key(3)), "p9", "New Person").await;
    let clash = KeyImport {
        keys: vec![
            SubjectKey {
                subject: "p9".into(),
                key: other.load_key("p9").await.expect("load").expect("key"),
            },
            SubjectKey {
                subject: "p1".into(),
                key: other.load_key("p1").await.expect("load").expect("key"),
            },
        ],
        ..KeyImport::default()
    };
    let err = store.import_keys(&clash).await.expect_err("a conflict");
    match err {
        Error::Gdpr(e) => match *e {
            GdprError::KeyConflict {
                subject,
                stored_key_id,
                imported_key_id,
            } => {
                assert_eq!(subject, "p1");
                assert_eq!(stored_key_id, key(1).id());
                assert_eq!(imported_key_id, key(3).id());
            }
            other => panic!("expected KeyConflict, got {other:?}"),
        },
        other => panic!("expected a GDPR error, got {other:?}"),
    }
    assert_eq!(store.load_key("p9").await.expect("load"), None);
    let events = read(here, p1).await.expect("still decrypts");
    assert_eq!(
        events[0].data.to_value().expect("json")["name"],
        "Ada Lovelace"
    );
}
