//! Number fidelity: what the store promises for numbers in payloads and
//! metadata (see `annals::canonical_json`), the same on every backend.

use annals::{
    EventId, ExpectedVersion, Metadata, NewEvent, ReadAll, ReadStream, RecordedEvent, StreamId,
    StreamVersion,
};
use futures::TryStreamExt;
use serde_json::{json, Value};

use annals::EventStore;

/// What a number must read back as.
#[derive(Clone, Copy, Debug)]
enum Expect {
    Float(f64),
    Unsigned(u64),
    Signed(i64),
}

impl Expect {
    #[track_caller]
    fn check(self, got: &Value, what: &str) {
        match self {
            Expect::Float(f) => {
                assert!(got.is_f64(), "{what}: {got} is not a float");
                let back = got.as_f64().expect("f64");
                assert_eq!(back, f, "{what}");
                // The sign of zero is not kept: -0.0 reads back as 0.0.
                assert!(back.is_sign_positive() || f < 0.0, "{what}: {back}");
            }
            Expect::Unsigned(u) => assert_eq!(got.as_u64(), Some(u), "{what}: {got}"),
            Expect::Signed(i) => {
                assert!(got.is_i64(), "{what}: {got}");
                assert_eq!(got.as_i64(), Some(i), "{what}: {got}");
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct Typed {
    x: f64,
}

/// Each number is stored, reads back as promised through every read path
/// (`read_stream`, `read_event`, `read_all`, typed decoding, metadata
/// headers), and an identical retry of its event is deduplicated, on every
/// backend. `f64::MAX` used to fail the retry on PostgreSQL ("cannot read
/// stored event ids"), `-0.0` and `1e300` came back in another form there.
pub async fn numbers_read_back_as_promised<S: EventStore>(store: S) {
    let cases: Vec<(&str, Value, Expect)> = vec![
        ("f64::MAX", json!(f64::MAX), Expect::Float(f64::MAX)),
        ("-f64::MAX", json!(-f64::MAX), Expect::Float(-f64::MAX)),
        ("-0.0", json!(-0.0), Expect::Float(0.0)),
        ("1e300", json!(1e300), Expect::Float(1e300)),
        ("1e16", json!(1e16), Expect::Float(1e16)),
        (
            "2^60 as f64",
            json!(2f64.powi(60)),
            Expect::Float(2f64.powi(60)),
        ),
        ("5e-324", json!(5e-324), Expect::Float(5e-324)),
        ("0.1", json!(0.1), Expect::Float(0.1)),
        ("1.0", json!(1.0), Expect::Float(1.0)),
        ("u64::MAX", json!(u64::MAX), Expect::Unsigned(u64::MAX)),
        ("i64::MIN", json!(i64::MIN), Expect::Signed(i64::MIN)),
    ];
    for (i, (name, number, expect)) in cases.into_iter().enumerate() {
        let stream = StreamId::new("Num", &i.to_string()).expect("stream");
        let mut metadata = Metadata::default();
        metadata.headers.insert("x".into(), number.clone());
        let event = NewEvent::new("N", json!({"x": number, "deep": {"list": [number]}}))
            .with_id(EventId::new())
            .with_metadata(metadata);
        let first = store
            .append(&stream, ExpectedVersion::NoStream, vec![event.clone()])
            .await
            .unwrap_or_else(|e| panic!("{name}: append: {e}"));
        assert!(!first.deduplicated, "{name}");

        let read = store
            .read_stream_to_vec(&stream, ReadStream::forward())
            .await
            .unwrap_or_else(|e| panic!("{name}: read_stream: {e}"));
        assert_eq!(read.len(), 1, "{name}");
        let by_id = store
            .read_event(event.event_id)
            .await
            .unwrap_or_else(|e| panic!("{name}: read_event: {e}"))
            .unwrap_or_else(|| panic!("{name}: read_event found nothing"));
        for (path, e) in [("read_stream", &read[0]), ("read_event", &by_id)] {
            let data = e.data.to_value().expect("the payload reads back");
            expect.check(&data["x"], &format!("{name} via {path}"));
            expect.check(
                &data["deep"]["list"][0],
                &format!("{name} nested via {path}"),
            );
            expect.check(
                &e.metadata.headers["x"],
                &format!("{name} header via {path}"),
            );
            assert!(
                e.matches(&event),
                "{name} via {path}: matches the appended event"
            );
        }
        if let Expect::Float(f) = expect {
            let typed: Typed = read[0]
                .data
                .deserialize()
                .unwrap_or_else(|e| panic!("{name}: typed decode: {e}"));
            assert_eq!(typed.x, f, "{name}: typed");
        }

        // The identical retry, with a stale expected version, is a no-op.
        let again = store
            .append(&stream, ExpectedVersion::NoStream, vec![event.clone()])
            .await
            .unwrap_or_else(|e| panic!("{name}: identical retry: {e}"));
        assert!(again.deduplicated, "{name}");
        assert_eq!(again.positions, first.positions, "{name}");
        assert_eq!(
            store.stream_version(&stream).await.expect("version"),
            Some(StreamVersion(1)),
            "{name}: nothing more written"
        );
        // Another payload under the same id is still a duplicate.
        let mut other = event.clone();
        other.data = json!({"x": 2});
        assert!(
            matches!(
                store
                    .append(&stream, ExpectedVersion::Any, vec![other])
                    .await,
                Err(annals::Error::DuplicateEventId { .. })
            ),
            "{name}: another payload"
        );
    }
    // A follower of the global feed reads every one of them.
    let feed: Vec<RecordedEvent> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("read_all");
    assert_eq!(feed.len(), 11);
    assert!(feed.iter().all(|e| e.event_type == "N"));
}
