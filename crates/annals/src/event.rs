//! Events as written ([`NewEvent`]) and as stored ([`RecordedEvent`]), and the
//! typed values around them.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{Error, Result, StreamId};

/// A unique event id (UUID v7 unless the caller gives one). Appending an id
/// that is already stored is an idempotent no-op when the event matches.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(pub Uuid);

impl EventId {
    /// A fresh time-ordered (v7) id.
    pub fn new() -> Self {
        EventId(Uuid::now_v7())
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A 1-based version within one stream: the k-th event has version k.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct StreamVersion(pub u64);

impl StreamVersion {
    /// The version after this one.
    pub fn next(self) -> Self {
        StreamVersion(self.0 + 1)
    }
    /// The raw number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for StreamVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A place in the store's total order.
///
/// It is a pair `(commit, seq)` compared lexicographically. SQLite and the
/// in-memory store have one writer at a time and use `commit = 0` with a
/// gap-free-enough `seq` (the rowid); PostgreSQL uses the appending
/// transaction's id as `commit` so that readers never pass a position that
/// is still uncommitted (see `docs/architecture.md`). It prints as `seq` when
/// `commit` is 0 and as `commit:seq` otherwise, and parses back from both.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct GlobalPosition {
    commit: u64,
    seq: u64,
}

impl GlobalPosition {
    /// Before the first event: `read_all` from here reads everything.
    pub const START: GlobalPosition = GlobalPosition { commit: 0, seq: 0 };

    /// A position from its parts.
    pub const fn new(commit: u64, seq: u64) -> Self {
        GlobalPosition { commit, seq }
    }

    /// A single-counter position (SQLite, memory).
    pub const fn from_seq(seq: u64) -> Self {
        GlobalPosition { commit: 0, seq }
    }

    /// The commit part (0 on single-writer backends).
    pub const fn commit(self) -> u64 {
        self.commit
    }

    /// The sequence part.
    pub const fn seq(self) -> u64 {
        self.seq
    }
}

impl fmt::Display for GlobalPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.commit == 0 {
            write!(f, "{}", self.seq)
        } else {
            write!(f, "{}:{}", self.commit, self.seq)
        }
    }
}

impl FromStr for GlobalPosition {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidPosition {
            value: s.to_owned(),
        };
        let t = s.trim();
        match t.split_once(':') {
            None => t.parse::<u64>().map(Self::from_seq).map_err(|_| bad()),
            Some((c, q)) => {
                let commit = c.parse::<u64>().map_err(|_| bad())?;
                let seq = q.parse::<u64>().map_err(|_| bad())?;
                Ok(Self::new(commit, seq))
            }
        }
    }
}

impl Serialize for GlobalPosition {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GlobalPosition {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What the writer believes about a stream's head before appending.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must exist (any version).
    StreamExists,
    /// The stream's head must be exactly this version (`Exact(0)` means the
    /// same as `NoStream`).
    Exact(StreamVersion),
}

impl ExpectedVersion {
    /// Whether a stream whose head is `actual` satisfies this expectation.
    pub fn matches(self, actual: Option<StreamVersion>) -> bool {
        match (self, actual) {
            (ExpectedVersion::Any, _) => true,
            (ExpectedVersion::NoStream, None) => true,
            (ExpectedVersion::NoStream, Some(_)) => false,
            (ExpectedVersion::StreamExists, a) => a.is_some(),
            (ExpectedVersion::Exact(v), None) => v.0 == 0,
            (ExpectedVersion::Exact(v), Some(a)) => v == a,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::StreamExists => f.write_str("stream exists"),
            ExpectedVersion::Exact(v) => write!(f, "{v}"),
        }
    }
}

impl FromStr for ExpectedVersion {
    type Err = String;
    /// Parses `any`, `no-stream`, `exists` or a non-negative version number.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "any" => Ok(ExpectedVersion::Any),
            "no-stream" => Ok(ExpectedVersion::NoStream),
            "exists" => Ok(ExpectedVersion::StreamExists),
            n => n
                .parse::<u64>()
                .map(|v| ExpectedVersion::Exact(StreamVersion(v)))
                .map_err(|_| {
                    format!(
                        "invalid expected version {n:?}: use any, no-stream, exists or a version >= 0"
                    )
                }),
        }
    }
}

/// Event metadata: correlation and causation ids plus free headers. Stored as
/// one JSON object; the headers are the object's other keys.
#[derive(Clone, PartialEq, Debug, Default, Serialize)]
pub struct Metadata {
    /// The id shared by every event that one request caused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The id of the event (or command) that caused this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// Any other headers.
    #[serde(flatten)]
    pub headers: serde_json::Map<String, Value>,
}

// Hand-written so that reading metadata (every event read does it) walks
// the object once, instead of buffering it the way `#[serde(flatten)]` does.
impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Metadata;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a metadata object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Metadata, A::Error> {
                let mut m = Metadata::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "correlation_id" => m.correlation_id = map.next_value()?,
                        "causation_id" => m.causation_id = map.next_value()?,
                        _ => {
                            m.headers.insert(key.into_owned(), map.next_value()?);
                        }
                    }
                }
                Ok(m)
            }
        }
        d.deserialize_map(V)
    }
}

impl Metadata {
    /// Parses metadata from a JSON value, which must be an object whose
    /// `correlation_id` / `causation_id`, when present, are UUIDs.
    pub fn from_value(value: Value) -> std::result::Result<Self, String> {
        if !value.is_object() {
            return Err("metadata must be a JSON object".to_owned());
        }
        serde_json::from_value(value).map_err(|e| format!("invalid metadata: {e}"))
    }

    /// The metadata as a JSON object.
    pub fn to_value(&self) -> Value {
        let mut map = self.headers.clone();
        if let Some(c) = self.correlation_id {
            map.insert("correlation_id".into(), Value::String(c.to_string()));
        }
        if let Some(c) = self.causation_id {
            map.insert("causation_id".into(), Value::String(c.to_string()));
        }
        Value::Object(map)
    }
}

/// An event to append.
#[derive(Clone, PartialEq, Debug)]
pub struct NewEvent {
    /// Unique id; a retried append with the same ids is a no-op.
    pub event_id: EventId,
    /// The event's type name.
    pub event_type: String,
    /// The payload's schema version (default 1).
    pub event_version: u32,
    /// The payload.
    pub data: Value,
    /// Correlation, causation and headers.
    pub metadata: Metadata,
    /// What the store's idempotency check compares for the payload. `None`
    /// (the default): the store computes it from `data`. Only a wrapper
    /// that changes `data` on its way to the backend (encryption) sets it;
    /// see [`Fingerprint`](crate::Fingerprint).
    pub fingerprint: Option<crate::Fingerprint>,
}

impl NewEvent {
    /// An event with a fresh v7 id, version 1 and empty metadata.
    pub fn new(event_type: impl Into<String>, data: Value) -> Self {
        NewEvent {
            event_id: EventId::new(),
            event_type: event_type.into(),
            event_version: 1,
            data,
            metadata: Metadata::default(),
            fingerprint: None,
        }
    }

    /// Sets the fingerprint the store compares instead of one of `data`
    /// (for wrappers that transform payloads; see
    /// [`Fingerprint`](crate::Fingerprint)).
    pub fn with_fingerprint(mut self, fingerprint: crate::Fingerprint) -> Self {
        self.fingerprint = Some(fingerprint);
        self
    }

    /// Sets the event id (for idempotent retries).
    pub fn with_id(mut self, id: EventId) -> Self {
        self.event_id = id;
        self
    }

    /// Sets the payload schema version.
    pub fn with_event_version(mut self, v: u32) -> Self {
        self.event_version = v;
        self
    }

    /// Sets the metadata.
    pub fn with_metadata(mut self, m: Metadata) -> Self {
        self.metadata = m;
        self
    }
}

/// Checks a batch before any backend writes it: non-empty, valid type names,
/// versions >= 1, and no id twice within the batch.
pub fn validate_batch(stream: &StreamId, events: &[NewEvent]) -> Result<()> {
    let invalid = |reason: String| Error::InvalidEvent {
        stream: stream.clone(),
        reason,
    };
    if events.is_empty() {
        return Err(invalid("empty batch: append at least one event".into()));
    }
    let mut seen = std::collections::HashSet::with_capacity(events.len());
    for e in events {
        if e.event_type.is_empty()
            || e.event_type.len() > 255
            || e.event_type.chars().any(char::is_control)
        {
            return Err(invalid(format!(
                "invalid event type {:?}: 1 to 255 bytes, no control characters",
                e.event_type
            )));
        }
        if e.event_version == 0 {
            return Err(invalid(format!(
                "event type {:?} has event_version 0; versions start at 1",
                e.event_type
            )));
        }
        if !seen.insert(e.event_id) {
            return Err(invalid(format!(
                "event id {} appears twice in the batch",
                e.event_id
            )));
        }
    }
    Ok(())
}

/// A stored event's payload: JSON text, validated when read from the store
/// and kept as text, so that decoding into a typed event parses it once,
/// straight into the type (no intermediate `serde_json::Value`).
#[derive(Clone)]
pub struct Payload(Box<serde_json::value::RawValue>);

impl Payload {
    /// A payload from a JSON value.
    pub fn from_value(value: &Value) -> std::result::Result<Self, serde_json::Error> {
        serde_json::value::to_raw_value(value).map(Payload)
    }

    /// A payload from JSON text; fails when the text is not one JSON value.
    pub fn from_json(text: String) -> std::result::Result<Self, serde_json::Error> {
        serde_json::value::RawValue::from_string(text).map(Payload)
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The payload as a JSON value (parses the text).
    pub fn to_value(&self) -> Value {
        // The text was validated on construction, so this cannot fail;
        // `Null` keeps the signature infallible without a panic path.
        serde_json::from_str(self.0.get()).unwrap_or(Value::Null)
    }

    /// Deserializes the payload into `T`.
    pub fn deserialize<T: serde::de::DeserializeOwned>(
        &self,
    ) -> std::result::Result<T, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }
}

impl From<Box<serde_json::value::RawValue>> for Payload {
    fn from(raw: Box<serde_json::value::RawValue>) -> Self {
        Payload(raw)
    }
}

/// Equal when the JSON values are equal (whitespace and key order aside).
impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str() || self.to_value() == other.to_value()
    }
}

impl PartialEq<Value> for Payload {
    fn eq(&self, other: &Value) -> bool {
        self.to_value() == *other
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Box::<serde_json::value::RawValue>::deserialize(d).map(Payload)
    }
}

/// An event as stored.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// Unique id.
    pub event_id: EventId,
    /// The stream.
    pub stream_id: StreamId,
    /// 1-based version in the stream, no gaps.
    pub stream_version: StreamVersion,
    /// Place in the store's total order.
    pub global_position: GlobalPosition,
    /// Type name.
    pub event_type: String,
    /// Payload schema version.
    pub event_version: u32,
    /// Payload, as JSON text.
    pub data: Payload,
    /// Correlation, causation and headers.
    pub metadata: Metadata,
    /// When the store recorded it (UTC).
    pub recorded_at: DateTime<Utc>,
}

impl RecordedEvent {
    /// Whether a stored event is the same event as `new`: same id, type,
    /// version and payload, numbers compared by value as the store promises
    /// (see [`canonical_json`](crate::canonical_json): `0.0` matches `-0.0`,
    /// and the integer text an older PostgreSQL row holds for the float
    /// `1e16` matches it). A payload that does not decode matches nothing.
    /// The stores themselves compare fingerprints
    /// ([`check_retry`](crate::check_retry)).
    pub fn matches(&self, new: &NewEvent) -> bool {
        self.event_id == new.event_id
            && self.event_type == new.event_type
            && self.event_version == new.event_version
            && serde_json::from_str::<Value>(self.data.as_str())
                .is_ok_and(|stored| crate::idempotency::same_json(&stored, &new.data))
    }
}

/// What an append assigned.
#[derive(Clone, PartialEq, Debug)]
pub struct AppendResult {
    /// Version of the first event of the batch.
    pub first_version: StreamVersion,
    /// Version of the last event: the stream's new head.
    pub last_version: StreamVersion,
    /// The global position of each event, in batch order.
    pub positions: Vec<GlobalPosition>,
    /// True when the batch had been stored before (idempotent retry) and
    /// nothing new was written.
    pub deduplicated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_and_round_trip() {
        let a = GlobalPosition::new(5, 900);
        let b = GlobalPosition::new(6, 1);
        assert!(a < b);
        assert_eq!("5:900".parse::<GlobalPosition>().expect("parses"), a);
        assert_eq!("42".parse::<GlobalPosition>().expect("parses").seq(), 42);
        assert_eq!(GlobalPosition::from_seq(42).to_string(), "42");
        assert_eq!(a.to_string(), "5:900");
        assert!("x:1".parse::<GlobalPosition>().is_err());
        assert!("-1".parse::<GlobalPosition>().is_err());
    }

    #[test]
    fn expected_version_matching() {
        use ExpectedVersion::*;
        assert!(Any.matches(None));
        assert!(NoStream.matches(None));
        assert!(!NoStream.matches(Some(StreamVersion(1))));
        assert!(!StreamExists.matches(None));
        assert!(Exact(StreamVersion(0)).matches(None));
        assert!(Exact(StreamVersion(3)).matches(Some(StreamVersion(3))));
        assert!(!Exact(StreamVersion(3)).matches(Some(StreamVersion(4))));
        assert!("-1".parse::<ExpectedVersion>().is_err());
    }

    #[test]
    fn metadata_round_trips_headers() {
        let v = serde_json::json!({"correlation_id": "0190a8c4-0000-7000-8000-000000000001", "user": "ann"});
        let m = Metadata::from_value(v.clone()).expect("valid");
        assert!(m.correlation_id.is_some());
        assert_eq!(m.headers["user"], "ann");
        assert_eq!(m.to_value(), v);
        assert!(Metadata::from_value(serde_json::json!([1])).is_err());
    }
}
