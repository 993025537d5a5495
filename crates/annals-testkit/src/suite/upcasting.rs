//! Upcasting: events stored by older versions of an application read at the
//! current version on every read path of a store that carries
//! [`annals::Upcasters`], and as stored through its raw handle.

use std::sync::Arc;

use annals::{
    decode_event, Aggregate, BoxError, DomainEvent, Error, EventStore, ExpectedVersion, NewEvent,
    ReadAll, ReadStream, RecordedEvent, Repository, SnapshotConfig, SnapshotJobs, SnapshotStore,
    Step, StreamId, UpcastError, Upcasters, Upcasting,
};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A ledger's events today. History: v1 stored `Deposited { amount }` with
/// the amount as a decimal string; v2 renamed it `Credited` with
/// `amount_cents`; v3 added `currency`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
enum LedgerEvent {
    #[event(version = 3)]
    Credited { amount_cents: i64, currency: String },
    Noted {
        text: String,
        /// Added later without a version bump: old events lack it and read
        /// with the default (tolerant reading, no upcaster).
        #[serde(default)]
        author: Option<String>,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Ledger {
    cents: i64,
    currencies: Vec<String>,
    notes: Vec<String>,
}

impl Aggregate for Ledger {
    const TYPE: &'static str = "Ledger";
    type Event = LedgerEvent;
    fn apply(&mut self, event: &LedgerEvent) {
        match event {
            LedgerEvent::Credited {
                amount_cents,
                currency,
            } => {
                self.cents += amount_cents;
                self.currencies.push(currency.clone());
            }
            LedgerEvent::Noted { text, author } => {
                self.notes
                    .push(format!("{text} by {}", author.as_deref().unwrap_or("?")));
            }
        }
    }
}

/// `"12.50"` as 1250 cents.
fn cents(text: &str) -> Result<i64, BoxError> {
    let (units, fraction) = text.split_once('.').unwrap_or((text, "0"));
    let fraction = format!("{fraction:0<2}");
    if fraction.len() != 2 {
        return Err(format!("amount {text:?} has more than two decimals").into());
    }
    Ok(units.parse::<i64>()? * 100 + fraction.parse::<i64>()?)
}

fn ledger_upcasters() -> Upcasters {
    Upcasters::builder()
        .step(
            Step::new("Deposited", 1, |v: Value| {
                let amount = v["amount"].as_str().ok_or("amount is not a string")?;
                Ok::<_, BoxError>(json!({ "amount_cents": cents(amount)? }))
            })
            .rename_to("Credited"),
        )
        .step(Step::new("Credited", 2, |mut v: Value| {
            v["currency"] = json!("EUR");
            Ok::<_, BoxError>(v)
        }))
        .build_for::<LedgerEvent>()
        .expect("a complete chain")
}

/// The stored history of `Ledger-1`: one event of each version.
async fn store_history<S: EventStore>(store: &S) -> StreamId {
    let s = StreamId::parse("Ledger-1").expect("stream");
    store
        .append(
            &s,
            ExpectedVersion::NoStream,
            vec![
                NewEvent::new("Deposited", json!({"amount": "12.50"})).with_event_version(1),
                NewEvent::new("Credited", json!({"amount_cents": 100})).with_event_version(2),
                NewEvent::new("Credited", json!({"amount_cents": 7, "currency": "CHF"}))
                    .with_event_version(3),
                NewEvent::new("Noted", json!({"text": "old note"})),
            ],
        )
        .await
        .expect("append the history");
    s
}

fn current_shape(events: &[RecordedEvent]) {
    let shapes: Vec<(&str, u32, Option<u32>, Option<&str>)> = events
        .iter()
        .map(|e| {
            (
                e.event_type.as_str(),
                e.event_version,
                e.stored_event_version,
                e.stored_event_type.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        shapes,
        [
            ("Credited", 3, Some(1), Some("Deposited")),
            ("Credited", 3, Some(2), None),
            ("Credited", 3, None, None),
            ("Noted", 1, None, None),
        ]
    );
    assert_eq!(
        events[0].data,
        json!({"amount_cents": 1250, "currency": "EUR"})
    );
    assert_eq!(
        events[1].data,
        json!({"amount_cents": 100, "currency": "EUR"})
    );
    for e in events {
        decode_event::<LedgerEvent>(e).expect("every event decodes at its current version");
    }
}

/// Stored v1 and v2 events read at v3 through `read_stream` (both
/// directions), `read_all`, `read_event`, a repository load and a snapshot
/// job, each upcasted event saying what it was stored as; the raw handle
/// reads them as stored.
pub async fn upcasting_on_every_read_path<S>(store: S)
where
    S: EventStore + SnapshotStore + Upcasting + Clone,
{
    let raw = store.raw();
    let s = store_history(&raw).await;
    let store = store.with_upcasters(Arc::new(ledger_upcasters()));

    let forward = store
        .read_stream_to_vec(&s, ReadStream::forward())
        .await
        .expect("read_stream");
    current_shape(&forward);
    let mut backward = store
        .read_stream_to_vec(&s, ReadStream::backward())
        .await
        .expect("read_stream backward");
    backward.reverse();
    assert_eq!(backward, forward);
    let all: Vec<RecordedEvent> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("read_all");
    assert_eq!(all, forward);
    let one = store
        .read_event(forward[0].event_id)
        .await
        .expect("read_event")
        .expect("stored");
    assert_eq!(one, forward[0]);

    let repo = Repository::<Ledger, _>::new(store.clone());
    let loaded = repo.load("1").await.expect("load");
    assert_eq!(loaded.state.cents, 1250 + 100 + 7);
    assert_eq!(loaded.state.currencies, ["EUR", "EUR", "CHF"]);
    assert_eq!(loaded.version.map(|v| v.get()), Some(4));

    let jobs = SnapshotJobs::<Ledger, _>::new(store.clone());
    let created = jobs
        .create("1")
        .await
        .expect("snapshot job")
        .expect("built");
    let state: Ledger = serde_json::from_value(created.snapshot.state).expect("state");
    assert_eq!(state, loaded.state);
    // The snapshot holds the upcast state; a load from it agrees.
    let with_snapshots = Repository::<Ledger, _>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotConfig::every(1));
    let from_snapshot = with_snapshots.load("1").await.expect("load");
    assert_eq!(from_snapshot.state, loaded.state);

    // The stored bytes never change.
    let stored = raw
        .read_stream_to_vec(&s, ReadStream::forward())
        .await
        .expect("raw read");
    assert_eq!(
        (stored[0].event_type.as_str(), stored[0].event_version),
        ("Deposited", 1)
    );
    assert_eq!(stored[0].data, json!({"amount": "12.50"}));
    assert!(stored.iter().all(|e| e.stored_event_version.is_none()));
}

/// A failing upcaster is `Error::Upcast` naming the event's stream,
/// version, position, stored type and version, and ends the read.
pub async fn failing_upcaster_names_the_event<S>(store: S)
where
    S: EventStore + Upcasting,
{
    let raw = store.raw();
    let s = store_history(&raw).await;
    let bad = StreamId::parse("Ledger-2").expect("stream");
    raw.append(
        &bad,
        ExpectedVersion::NoStream,
        vec![
            NewEvent::new("Noted", json!({"text": "fine"})),
            NewEvent::new("Deposited", json!({"amount": "1.234"})).with_event_version(1),
        ],
    )
    .await
    .expect("append");
    let stored = raw
        .read_stream_to_vec(&bad, ReadStream::forward())
        .await
        .expect("raw");
    let store = store.with_upcasters(Arc::new(ledger_upcasters()));
    let check = |err: Error| match err {
        Error::Upcast(f) => {
            assert_eq!(f.stream, bad);
            assert_eq!(f.version.get(), 2);
            assert_eq!(f.position, stored[1].global_position);
            assert_eq!((f.event_type.as_str(), f.stored_version), ("Deposited", 1));
            assert_eq!(f.step, "Deposited v1");
            assert!(f.source.to_string().contains("more than two decimals"));
        }
        other => panic!("expected Error::Upcast, got {other:?}"),
    };
    // The read ends with the error; the events before it may have been
    // delivered (SQLite, memory) or held back with their page (PostgreSQL
    // decodes a page as a whole).
    let first_error = |mut read: annals::EventStream| async move {
        let mut delivered = 0;
        loop {
            match read.try_next().await {
                Ok(Some(_)) => delivered += 1,
                Ok(None) => panic!("the read ended without the error"),
                Err(e) => return (delivered, e),
            }
        }
    };
    let (delivered, err) = first_error(store.read_stream(&bad, ReadStream::forward())).await;
    assert!(delivered <= 1);
    check(err);
    check(
        store
            .read_event(stored[1].event_id)
            .await
            .expect_err("read_event fails"),
    );
    let (delivered, err) = first_error(store.read_all(ReadAll::from_start())).await;
    assert!(
        delivered <= 5,
        "at most Ledger-1's four events and the note"
    );
    check(err);
    // Ledger-1 still loads.
    assert!(store
        .read_stream_to_vec(&s, ReadStream::forward())
        .await
        .is_ok());
}

/// A registry with a missing link fails when it is built, naming the type
/// and both versions, before the store reads anything.
pub async fn missing_upcaster_fails_at_build<S>(store: S)
where
    S: EventStore + Upcasting,
{
    store_history(&store).await;
    let only_first = Upcasters::builder()
        .step(Step::new("Deposited", 1, Ok::<Value, BoxError>).rename_to("Credited"))
        .build_for::<LedgerEvent>()
        .expect_err("Credited v2 -> v3 is missing");
    assert_eq!(
        only_first,
        UpcastError::MissingStep {
            event_type: "Credited".into(),
            from_version: 2,
            to_version: 3,
        }
    );
    assert_eq!(
        only_first.to_string(),
        "no upcaster for event type \"Credited\" from version 2 to version 3"
    );
}

/// Tolerant reading: a field added with `#[serde(default)]` needs no
/// upcaster and no version bump; events stored without it decode with the
/// default, through a store with no upcasters at all.
pub async fn tolerant_reading_needs_no_upcaster<S: EventStore>(store: S) {
    let s = StreamId::parse("Ledger-3").expect("stream");
    store
        .append(
            &s,
            ExpectedVersion::NoStream,
            vec![
                NewEvent::new("Noted", json!({"text": "before"})),
                NewEvent::new("Noted", json!({"text": "after", "author": "ann"})),
            ],
        )
        .await
        .expect("append");
    let repo = Repository::<Ledger, _>::new(store);
    let loaded = repo.load("3").await.expect("load");
    assert_eq!(loaded.state.notes, ["before by ?", "after by ann"]);
}
