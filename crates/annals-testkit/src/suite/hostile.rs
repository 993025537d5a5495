//! Hostile input through the library API: whatever an append accepts reads
//! back as written, and whatever would not read back is refused with
//! [`Error::InvalidEvent`] before anything is written, the same on every
//! backend. A refused event must never reach the store: one unreadable row
//! stops every follower of the global feed at its position for ever.

use std::time::Duration;

use annals::{
    CommandContext, Error, EventId, EventStore, ExpectedVersion, GlobalPosition, Metadata,
    NewEvent, ReadAll, ReadStream, RecordedEvent, StreamId, MAX_JSON_DEPTH,
};
use futures::StreamExt;
use serde_json::{json, Value};

use super::{all, sid};

/// `depth` arrays nested in each other, built without recursion.
fn nested_arrays(depth: usize) -> Value {
    let mut v = json!("leaf");
    for _ in 0..depth {
        v = Value::Array(vec![v]);
    }
    v
}

/// `depth` objects nested in each other (`{"k": {"k": ...}}`).
fn nested_objects(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        let mut m = serde_json::Map::new();
        m.insert("k".into(), v);
        v = Value::Object(m);
    }
    v
}

fn with_header(key: &str, value: Value) -> Metadata {
    let mut m = Metadata::default();
    m.headers.insert(key.to_owned(), value);
    m
}

/// One batch that must be refused, and words its error must contain.
struct Refused {
    what: &'static str,
    batch: Vec<NewEvent>,
    needles: Vec<String>,
}

fn refused(what: &'static str, batch: Vec<NewEvent>, needles: &[&str]) -> Refused {
    Refused {
        what,
        batch,
        needles: needles.iter().map(|n| (*n).to_owned()).collect(),
    }
}

const RAW_VALUE_KEY: &str = "$serde_json::private::RawValue";

fn meta(m: Metadata) -> NewEvent {
    NewEvent::new("Hostile", json!({"ok": true})).with_metadata(m)
}

fn levels() -> String {
    format!("{MAX_JSON_DEPTH} levels")
}

// Values 100,000 levels deep cannot be cloned, nor dropped the ordinary way
// (serde_json's `Value` drops recursively) without overflowing a test
// thread's stack: each list is built fresh and every batch in it is handed
// to an append, which takes a refused batch apart without recursion.

/// Hostile metadata, each batch freshly built.
fn hostile_metadata() -> Vec<Refused> {
    let levels = levels();
    let levels = levels.as_str();
    vec![
        // Reserved metadata names, as the issue found them.
        refused(
            "a correlation_id header from CommandContext::with_header",
            vec![meta(
                CommandContext::new()
                    .with_header("correlation_id", json!("req-123"))
                    .metadata()
                    .clone(),
            )],
            &["\"correlation_id\"", "reserved"],
        ),
        refused(
            "a causation_id header that is even a valid UUID",
            vec![meta(with_header(
                "causation_id",
                json!(uuid::Uuid::now_v7().to_string()),
            ))],
            &["\"causation_id\"", "reserved"],
        ),
        refused(
            "a correlation_id header beside the typed field",
            vec![meta({
                let mut m = with_header("correlation_id", json!("req-123"));
                m.correlation_id = Some(uuid::Uuid::now_v7());
                m
            })],
            &["\"correlation_id\"", "reserved"],
        ),
        refused(
            "a header one level too deep (the metadata object is a level)",
            vec![meta(with_header("h", nested_arrays(MAX_JSON_DEPTH)))],
            &["header \"h\"", levels],
        ),
        refused(
            "a header 100,000 levels deep",
            vec![meta(with_header("h", nested_arrays(100_000)))],
            &["header \"h\"", levels],
        ),
        refused(
            "a NUL character in a header",
            vec![meta(with_header("h", json!(["\u{0}"])))],
            &["header \"h\"", "NUL"],
        ),
        refused(
            "serde_json's raw-value marker deep in a header",
            vec![meta(with_header("h", json!([{ RAW_VALUE_KEY: "5" }])))],
            &["header \"h\"", RAW_VALUE_KEY],
        ),
        refused(
            "serde_json's raw-value marker as a header name",
            vec![meta(with_header(RAW_VALUE_KEY, json!(1)))],
            &[RAW_VALUE_KEY],
        ),
        // One bad event spoils the batch: nothing of it is written.
        refused(
            "a good event before a bad one",
            vec![
                NewEvent::new("Fine", json!({"fine": 1})),
                meta(with_header("correlation_id", json!("req-123"))),
            ],
            &["event 1", "\"correlation_id\""],
        ),
    ]
}

/// Hostile payloads and event fields, each batch freshly built.
fn hostile_payloads() -> Vec<Refused> {
    let ev = |data: Value| NewEvent::new("Hostile", data);
    let levels = levels();
    let levels = levels.as_str();
    vec![
        // Deeper than the decoder reads.
        refused(
            "a payload one level too deep",
            vec![ev(nested_arrays(MAX_JSON_DEPTH + 1))],
            &["payload", levels],
        ),
        refused(
            "objects one level too deep",
            vec![ev(nested_objects(MAX_JSON_DEPTH + 1))],
            &["payload", levels],
        ),
        refused(
            "a payload 100,000 levels deep",
            vec![ev(nested_arrays(100_000))],
            &["payload", levels],
        ),
        // What PostgreSQL cannot store, refused everywhere.
        refused(
            "a NUL character in a payload string",
            vec![ev(json!({"s": "a\u{0}b"}))],
            &["payload", "NUL"],
        ),
        refused(
            "a NUL character in a payload key",
            vec![ev(json!({"a\u{0}b": 1}))],
            &["payload", "NUL"],
        ),
        // Keys serde_json treats as its own markers.
        refused(
            "serde_json's raw-value marker as a payload key",
            vec![ev(json!({ RAW_VALUE_KEY: "[1," }))],
            &["payload", RAW_VALUE_KEY],
        ),
        refused(
            "serde_json's number marker as a payload key",
            vec![ev(json!({"n": {"$serde_json::private::Number": "1"}}))],
            &["payload", "$serde_json::private::Number"],
        ),
        // Fields a backend stores in a narrower type.
        refused(
            "an event_version beyond i32::MAX",
            vec![ev(json!(1)).with_event_version(u32::MAX)],
            &["event_version", "2147483647"],
        ),
        refused(
            "a NUL character in the event type",
            vec![NewEvent::new("Hos\u{0}tile", json!(1))],
            &["event type"],
        ),
    ]
}

/// Accepted inputs at the edges of what the store promises to give back.
fn edge_events() -> Vec<NewEvent> {
    let mut near_reserved = Metadata {
        correlation_id: Some(uuid::Uuid::now_v7()),
        causation_id: Some(uuid::Uuid::now_v7()),
        ..Metadata::default()
    };
    for key in [
        "Correlation_Id",
        "correlation",
        "correlation_id ",
        "",
        "$serde_json",
        "serde_json::private::RawValue",
    ] {
        near_reserved.headers.insert(key.to_owned(), json!(key));
    }
    near_reserved.headers.insert("null".into(), Value::Null);
    let long_type: String = "é".repeat(127) + "x";
    assert_eq!(long_type.len(), 255);
    vec![
        NewEvent::new("Deep", nested_arrays(MAX_JSON_DEPTH)),
        NewEvent::new("Deep", nested_objects(MAX_JSON_DEPTH)),
        NewEvent::new("DeepHeader", json!(1))
            .with_metadata(with_header("h", nested_arrays(MAX_JSON_DEPTH - 1))),
        NewEvent::new("NearReserved", json!({})).with_metadata(near_reserved),
        NewEvent::new(
            "Text",
            json!({
                "controls": "\u{1}\u{1f}\u{7f}\t\n\r",
                "quotes": "\"\\/'",
                "unicode": "ünïcødé \u{2028}\u{2029} 🦀 \u{fffd}",
                "": "empty key",
                "$serde_json::private": "not the marker",
                "nested": [[], {}, [null, true, false, 0, -1, 9007199254740993u64]],
            }),
        ),
        NewEvent::new(long_type, json!(null)).with_event_version(i32::MAX as u32),
        NewEvent::new("Scalar", json!("just a string")),
        NewEvent::new("Big", json!({ "blob": "x".repeat(256 * 1024) })),
    ]
}

/// Appends `case`, which must be refused with [`Error::InvalidEvent`] for
/// `stream`, naming what was wrong, with nothing written.
async fn assert_refused<S: EventStore>(store: &S, stream: &StreamId, case: Refused) {
    let head = store.head_position().await.expect("head");
    let what = case.what;
    let ids: Vec<EventId> = case.batch.iter().map(|e| e.event_id).collect();
    match store.append(stream, ExpectedVersion::Any, case.batch).await {
        Err(Error::InvalidEvent { stream: s, reason }) => {
            assert_eq!(&s, stream, "{what}: the error names the stream");
            for needle in &case.needles {
                assert!(
                    reason.contains(needle.as_str()),
                    "{what}: the error should mention {needle:?}: {reason}"
                );
            }
        }
        other => panic!("{what}: expected InvalidEvent, got {other:?}"),
    }
    assert_eq!(
        store.stream_version(stream).await.expect("version"),
        None,
        "{what}: nothing written"
    );
    assert_eq!(
        store.head_position().await.expect("head"),
        head,
        "{what}: the global feed did not move"
    );
    let feed = store
        .read_all(ReadAll::from_start())
        .collect::<Vec<_>>()
        .await;
    for e in feed {
        let e = e.expect("the feed reads");
        assert!(!ids.contains(&e.event_id), "{what}: {} stored", e.event_id);
    }
}

fn assert_same(got: &RecordedEvent, sent: &NewEvent, how: &str) {
    let what = format!("{} ({how})", sent.event_type);
    assert_eq!(got.event_id, sent.event_id, "{what}");
    assert_eq!(got.event_type, sent.event_type, "{what}");
    assert_eq!(got.event_version, sent.event_version, "{what}");
    assert_eq!(got.metadata, sent.metadata, "{what}: metadata");
    let value = got.data.to_value().expect("the payload parses back");
    assert!(value == sent.data, "{what}: payload differs");
    assert!(got.data == sent.data, "{what}: payload compares equal");
}

/// Reserved metadata names, too-deep headers, NUL characters and
/// serde_json's private keys in metadata are refused at append, naming the
/// header and the stream; nothing is written.
pub async fn hostile_metadata_is_refused<S: EventStore>(store: S) {
    let s = sid("Hostile-meta");
    let cases = hostile_metadata();
    let mut n = 0;
    for case in cases {
        assert_refused(&store, &s, case).await;
        n += 1;
    }
    assert!(n >= 8, "every metadata case ran");
    assert_eq!(store.head_position().await.expect("head"), None);
}

/// Payloads nested deeper than the decoder reads (100,000 levels included,
/// which must not overflow the stack), NUL characters, serde_json's private
/// keys and out-of-range event versions are refused; nothing is written.
pub async fn hostile_payloads_are_refused<S: EventStore>(store: S) {
    let s = sid("Hostile-data");
    let cases = hostile_payloads();
    let mut n = 0;
    for case in cases {
        assert_refused(&store, &s, case).await;
        n += 1;
    }
    assert!(n >= 9, "every payload case ran");
    assert_eq!(store.head_position().await.expect("head"), None);
}

/// Inputs at the edges of what is allowed (nesting at the limit, header names
/// next to the reserved ones, control characters and non-BMP text, a 255-byte
/// type, `i32::MAX` as event version, a large string) are stored and read
/// back as written by `read_stream`, backward, and `read_all`.
pub async fn edge_inputs_read_back<S: EventStore>(store: S) {
    let s = sid("Edge-1");
    let sent = edge_events();
    store
        .append(&s, ExpectedVersion::NoStream, sent.clone())
        .await
        .expect("edge inputs are accepted");
    let forward = all(&store, &s).await;
    assert_eq!(forward.len(), sent.len());
    for (got, sent) in forward.iter().zip(&sent) {
        assert_same(got, sent, "read_stream");
    }
    let backward = store
        .read_stream_to_vec(&s, ReadStream::backward())
        .await
        .expect("read backward");
    for (got, sent) in backward.iter().rev().zip(&sent) {
        assert_same(got, sent, "read_stream backward");
    }
    let feed: Vec<RecordedEvent> = store
        .read_all(ReadAll::from_start())
        .map(|e| e.expect("read_all"))
        .collect()
        .await;
    assert_eq!(feed.len(), sent.len());
    for (got, sent) in feed.iter().zip(&sent) {
        assert_same(got, sent, "read_all");
    }
    // The same batch again is an idempotent retry, not a clash.
    let again = store
        .append(&s, ExpectedVersion::NoStream, sent)
        .await
        .expect("retry");
    assert!(again.deduplicated);
}

/// A `read_all` follower runs while every hostile batch and every edge input
/// is appended between ordinary events: it never meets a row it cannot read,
/// and it reaches the head with exactly the accepted events, in order.
pub async fn hostile_input_never_stalls_a_follower<S: EventStore>(store: S) {
    let end = EventId::new();
    let follower = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut seen: Vec<RecordedEvent> = Vec::new();
            let mut after = GlobalPosition::START;
            loop {
                let mut page = store.read_all(ReadAll::after(after));
                let mut got_any = false;
                while let Some(e) = page.next().await {
                    let e = e.unwrap_or_else(|e| panic!("the follower stalled after {after}: {e}"));
                    after = e.global_position;
                    got_any = true;
                    let done = e.event_id == end;
                    seen.push(e);
                    if done {
                        return seen;
                    }
                }
                if !got_any {
                    // A poll interval at the tail, not a decision: the
                    // follower ends when it reads the last event.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        })
    };
    let mut accepted = Vec::new();
    let plain = |n: i64| NewEvent::new("Plain", json!({ "n": n }));
    let mut k = 0;
    for case in hostile_metadata().into_iter().chain(hostile_payloads()) {
        let s = sid(&format!("Follow-{k}"));
        let before = plain(k);
        accepted.push(before.event_id);
        store
            .append(&s, ExpectedVersion::Any, vec![before])
            .await
            .expect("plain append");
        store
            .append(&s, ExpectedVersion::Any, case.batch)
            .await
            .expect_err(case.what);
        k += 1;
    }
    for e in edge_events() {
        let s = sid(&format!("Follow-{k}"));
        accepted.push(e.event_id);
        store
            .append(&s, ExpectedVersion::Any, vec![e])
            .await
            .expect("edge append");
        k += 1;
    }
    accepted.push(end);
    store
        .append(
            &sid("Follow-end"),
            ExpectedVersion::Any,
            vec![plain(-1).with_id(end)],
        )
        .await
        .expect("last append");
    let seen = tokio::time::timeout(Duration::from_secs(60), follower)
        .await
        .expect("the follower reached the last event")
        .expect("follower task");
    let ids: Vec<EventId> = seen.iter().map(|e| e.event_id).collect();
    assert_eq!(
        ids, accepted,
        "the follower saw exactly the accepted events"
    );
    assert_eq!(
        store.head_position().await.expect("head"),
        seen.last().map(|e| e.global_position),
        "the follower is at the head"
    );
}
