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
///
/// The names in [`Metadata::RESERVED_KEYS`] belong to the typed fields: a
/// read decodes them as UUIDs, so an append refuses a free header with one of
/// those names ([`Error::InvalidEvent`]), and [`Metadata::to_value`] and the
/// `Serialize` impl never write such a header (the typed field is the only
/// source of that key).
#[derive(Clone, PartialEq, Debug, Default)]
pub struct Metadata {
    /// The id shared by every event that one request caused.
    pub correlation_id: Option<Uuid>,
    /// The id of the event (or command) that caused this event.
    pub causation_id: Option<Uuid>,
    /// Any other headers. Keys must not be one of
    /// [`Metadata::RESERVED_KEYS`]; values may nest at most
    /// [`MAX_JSON_DEPTH`]` - 1` levels (the metadata object is the first).
    pub headers: serde_json::Map<String, Value>,
}

impl Serialize for Metadata {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        if let Some(c) = &self.correlation_id {
            map.serialize_entry("correlation_id", c)?;
        }
        if let Some(c) = &self.causation_id {
            map.serialize_entry("causation_id", c)?;
        }
        for (k, v) in self.free_headers() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
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
    /// The keys a read decodes into the typed fields (as UUIDs), which
    /// therefore cannot be free headers.
    pub const RESERVED_KEYS: &'static [&'static str] = &["correlation_id", "causation_id"];

    /// Whether `key` is one of [`Metadata::RESERVED_KEYS`].
    pub fn is_reserved(key: &str) -> bool {
        Self::RESERVED_KEYS.contains(&key)
    }

    /// Parses metadata from a JSON value, which must be an object whose
    /// `correlation_id` / `causation_id`, when present, are UUIDs (they go to
    /// the typed fields, never to the headers). Refuses what an append would
    /// refuse in a header: nesting deeper than [`MAX_JSON_DEPTH`] (counting
    /// the object itself), a NUL character, a key serde_json reserves.
    pub fn from_value(value: Value) -> std::result::Result<Self, String> {
        if !value.is_object() {
            return Err("metadata must be a JSON object".to_owned());
        }
        // Before serde walks it: serde's walk recurses, this check does not.
        if let Err(fault) = check_json(&value, MAX_JSON_DEPTH, &mut Vec::new()) {
            dismantle(value);
            return Err(format!("invalid metadata: it {fault}"));
        }
        for key in Self::RESERVED_KEYS {
            match value.get(key) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) if Uuid::try_parse(s).is_ok() => {}
                Some(other) => {
                    let shown: String = other.to_string().chars().take(80).collect();
                    return Err(format!(
                        "invalid metadata: {key} must be a UUID (it is a typed field, \
                         not a free header), got {shown}"
                    ));
                }
            }
        }
        serde_json::from_value(value).map_err(|e| format!("invalid metadata: {e}"))
    }

    /// The metadata as a JSON object.
    pub fn to_value(&self) -> Value {
        let mut map: serde_json::Map<String, Value> = self
            .free_headers()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(c) = self.correlation_id {
            map.insert("correlation_id".into(), Value::String(c.to_string()));
        }
        if let Some(c) = self.causation_id {
            map.insert("causation_id".into(), Value::String(c.to_string()));
        }
        Value::Object(map)
    }

    /// The headers without reserved names (which only code that fills
    /// `headers` by hand can put there, and which an append refuses).
    fn free_headers(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.headers.iter().filter(|(k, _)| !Self::is_reserved(k))
    }
}

/// How deeply arrays and objects may nest in what an event stores: its
/// payload, and its metadata counting the metadata object as the first
/// level. serde_json, which every read decodes with, stops at 128 levels
/// (its recursion limit), so anything deeper could be stored but never read
/// back; appends refuse it with [`Error::InvalidEvent`].
pub const MAX_JSON_DEPTH: usize = 127;

/// Object keys with this prefix are serde_json's private markers: a value
/// whose object starts with such a key does not read back as written (or
/// at all), so no event may contain one.
const SERDE_PRIVATE_PREFIX: &str = "$serde_json::private::";

/// Why a JSON value cannot be stored so that it reads back.
#[derive(Debug)]
enum JsonFault {
    /// Arrays and objects nest deeper than the limit.
    TooDeep(usize),
    /// A string holds U+0000.
    NulInString,
    /// An object key holds U+0000.
    NulInKey(String),
    /// An object key serde_json reserves.
    PrivateKey(String),
}

impl fmt::Display for JsonFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonFault::TooDeep(max) => write!(
                f,
                "nests arrays and objects more than {max} levels deep; the store reads \
                 back at most {MAX_JSON_DEPTH} levels (MAX_JSON_DEPTH, below serde_json's \
                 recursion limit of 128)"
            ),
            JsonFault::NulInString => f.write_str(
                "holds a NUL character (\\u0000) in a string, which PostgreSQL cannot \
                 store; no backend accepts it",
            ),
            JsonFault::NulInKey(key) => write!(
                f,
                "has an object key {key:?} holding a NUL character (\\u0000), which \
                 PostgreSQL cannot store; no backend accepts it"
            ),
            JsonFault::PrivateKey(key) => write!(
                f,
                "has an object key {key:?}, which serde_json reserves for itself \
                 (the value would not read back as written)"
            ),
        }
    }
}

fn check_key(key: &str) -> std::result::Result<(), JsonFault> {
    if key.contains('\0') {
        Err(JsonFault::NulInKey(key.to_owned()))
    } else if key.starts_with(SERDE_PRIVATE_PREFIX) {
        Err(JsonFault::PrivateKey(key.to_owned()))
    } else {
        Ok(())
    }
}

/// Checks that `value` nests at most `max_depth` levels of arrays and objects
/// and holds nothing a read could not give back (see [`JsonFault`]).
///
/// Iterative, with `stack` (reused across calls, left empty) in place of the
/// call stack, so a value nested 100,000 levels deep is refused instead of
/// overflowing the stack.
fn check_json<'a>(
    value: &'a Value,
    max_depth: usize,
    stack: &mut Vec<(&'a Value, usize)>,
) -> std::result::Result<(), JsonFault> {
    stack.clear();
    let result = check_json_inner(value, max_depth, stack);
    stack.clear();
    result
}

fn check_json_inner<'a>(
    value: &'a Value,
    max_depth: usize,
    stack: &mut Vec<(&'a Value, usize)>,
) -> std::result::Result<(), JsonFault> {
    // Scalars are checked where they are met; containers wait on the stack
    // with their own depth (1 for the outermost).
    let visit = |v: &'a Value, depth: usize, stack: &mut Vec<(&'a Value, usize)>| match v {
        Value::String(s) if s.contains('\0') => Err(JsonFault::NulInString),
        Value::Array(_) | Value::Object(_) if depth > max_depth => {
            Err(JsonFault::TooDeep(max_depth))
        }
        Value::Array(_) | Value::Object(_) => {
            stack.push((v, depth));
            Ok(())
        }
        _ => Ok(()),
    };
    // The outermost container is walked here rather than pushed, so that a
    // flat payload (most are) is checked without allocating the stack.
    match value {
        Value::Array(_) | Value::Object(_) if max_depth < 1 => {
            return Err(JsonFault::TooDeep(max_depth))
        }
        Value::Array(items) => {
            for item in items {
                visit(item, 2, stack)?;
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                check_key(key)?;
                visit(item, 2, stack)?;
            }
        }
        scalar => visit(scalar, 1, stack)?,
    }
    while let Some((v, depth)) = stack.pop() {
        match v {
            Value::Array(items) => {
                for item in items {
                    visit(item, depth + 1, stack)?;
                }
            }
            Value::Object(map) => {
                for (key, item) in map {
                    check_key(key)?;
                    visit(item, depth + 1, stack)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
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

/// The highest `event_version` a store keeps: PostgreSQL stores it as an
/// `integer`, and every backend accepts the same events.
const MAX_EVENT_VERSION: u32 = i32::MAX as u32;

/// Checks a batch before any backend writes it, so that an append accepts
/// exactly what a read can give back, on every backend: a non-empty batch; per
/// event a type name of 1 to 255 bytes without control characters, an
/// `event_version` from 1 to `i32::MAX`, an id not used twice in the batch;
/// a payload and header values that nest at most [`MAX_JSON_DEPTH`] levels
/// (headers sit one level down, inside the metadata object), hold no NUL
/// character and no key serde_json reserves; and no free header named like
/// a typed metadata field ([`Metadata::RESERVED_KEYS`]). Every backend calls
/// it first; the check walks each value without recursion.
pub fn validate_batch(stream: &StreamId, events: &[NewEvent]) -> Result<()> {
    let invalid = |reason: String| Error::InvalidEvent {
        stream: stream.clone(),
        reason,
    };
    if events.is_empty() {
        return Err(invalid("empty batch: append at least one event".into()));
    }
    let mut seen = std::collections::HashSet::with_capacity(events.len());
    let mut stack = Vec::new();
    for (i, e) in events.iter().enumerate() {
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
        if e.event_version > MAX_EVENT_VERSION {
            return Err(invalid(format!(
                "event type {:?} has event_version {}; the store keeps at most \
                 {MAX_EVENT_VERSION} (i32::MAX)",
                e.event_type, e.event_version
            )));
        }
        if !seen.insert(e.event_id) {
            return Err(invalid(format!(
                "event id {} appears twice in the batch",
                e.event_id
            )));
        }
        let which = || {
            format!(
                "event {i} of the batch ({:?}, id {})",
                e.event_type, e.event_id
            )
        };
        check_json(&e.data, MAX_JSON_DEPTH, &mut stack)
            .map_err(|fault| invalid(format!("the payload of {} {fault}", which())))?;
        for (key, value) in &e.metadata.headers {
            if Metadata::is_reserved(key) {
                return Err(invalid(format!(
                    "{} has a free metadata header named {key:?}: that name is reserved \
                     for the typed field Metadata::{key}, which reads decode as a UUID; \
                     set it through the field (or CommandContext::with_{key}), not as a header",
                    which()
                )));
            }
            check_key(key)
                .and_then(|()| check_json(value, MAX_JSON_DEPTH - 1, &mut stack))
                .map_err(|fault| {
                    let note = match fault {
                        JsonFault::TooDeep(_) => {
                            " (a header's value starts one level down, inside the metadata object)"
                        }
                        _ => "",
                    };
                    invalid(format!(
                        "metadata header {key:?} of {} {fault}{note}",
                        which()
                    ))
                })?;
        }
    }
    Ok(())
}

/// [`validate_batch`] for a batch handed over by value, as backends get it:
/// returns the batch when it is valid. A refused batch is taken apart
/// without recursion before the error returns, because serde_json's `Value`
/// drops recursively: dropping a refused payload nested 100,000 levels deep
/// the ordinary way would overflow the caller's stack.
pub fn validate_batch_owned(stream: &StreamId, events: Vec<NewEvent>) -> Result<Vec<NewEvent>> {
    match validate_batch(stream, &events) {
        Ok(()) => Ok(events),
        Err(e) => {
            for event in events {
                dismantle(event.data);
                dismantle(Value::Object(event.metadata.headers));
            }
            Err(e)
        }
    }
}

/// Drops `value` without recursion, however deeply it nests.
fn dismantle(value: Value) {
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        // Each container is emptied onto the stack before it drops, so no
        // drop reaches more than one level down.
        match v {
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.into_iter().map(|(_, v)| v)),
            _ => {}
        }
    }
}

/// A stored event's payload: JSON text, validated when read from the store
/// and kept as text, so that decoding into a typed event parses it once,
/// straight into the type (no intermediate `serde_json::Value`).
///
/// The text is either the payload's own ([`Payload::from_json`],
/// [`Payload::from_value`]) or a slice of a buffer shared with the other
/// events read in the same page ([`Payload::from_shared_json`]): a backend
/// that copies a page of rows into one buffer hands out its payloads without
/// copying or allocating each one, and cloning such a payload copies a
/// pointer. A shared payload keeps its whole page's buffer alive (a page is
/// bounded, see the backends' read docs); [`Payload::into_owned`] detaches one
/// that is to be kept for long.
#[derive(Clone)]
pub struct Payload(PayloadText);

#[derive(Clone)]
enum PayloadText {
    Owned(Box<serde_json::value::RawValue>),
    /// `text[start..end]`, validated as one JSON value when it was made.
    /// (`u32` offsets keep a payload as small as the owned form's fat
    /// pointer plus a tag; page buffers are far smaller than 4 GiB.)
    Shared {
        text: std::sync::Arc<String>,
        start: u32,
        end: u32,
    },
}

impl Payload {
    /// A payload from a JSON value. Fails, without recursing, on a value
    /// that would not read back: nested deeper than [`MAX_JSON_DEPTH`], or
    /// holding a NUL character or a key serde_json reserves.
    pub fn from_value(value: &Value) -> std::result::Result<Self, serde_json::Error> {
        check_json(value, MAX_JSON_DEPTH, &mut Vec::new()).map_err(|fault| {
            <serde_json::Error as serde::ser::Error>::custom(format!("the payload {fault}"))
        })?;
        serde_json::value::to_raw_value(value).map(Payload::from)
    }

    /// A payload from JSON text; fails when the text is not one JSON value.
    pub fn from_json(text: String) -> std::result::Result<Self, serde_json::Error> {
        serde_json::value::RawValue::from_string(text).map(Payload::from)
    }

    /// A payload that is `text[range]`, sharing `text` instead of copying
    /// it; fails when that slice is not one JSON value, or when `range` is
    /// not a slice of `text` on character boundaries (or ends beyond
    /// 4 GiB: a shared text is a page of rows, far smaller).
    pub fn from_shared_json(
        text: std::sync::Arc<String>,
        range: std::ops::Range<usize>,
    ) -> std::result::Result<Self, serde_json::Error> {
        let bad = |what: &str| <serde_json::Error as serde::de::Error>::custom(what);
        let (Ok(start), Ok(end)) = (u32::try_from(range.start), u32::try_from(range.end)) else {
            return Err(bad("payload range beyond 4 GiB of shared text"));
        };
        let Some(slice) = text.get(range) else {
            return Err(bad("payload range outside its text"));
        };
        // Validates without building anything (a borrowed raw value).
        serde_json::from_str::<&serde_json::value::RawValue>(slice)?;
        Ok(Payload(PayloadText::Shared { text, start, end }))
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            PayloadText::Owned(raw) => raw.get(),
            // The range was checked against this very text when it was made.
            PayloadText::Shared { text, start, end } => {
                text.get(*start as usize..*end as usize).unwrap_or_default()
            }
        }
    }

    /// Whether the text is shared with other payloads (a page buffer).
    pub fn is_shared(&self) -> bool {
        matches!(self.0, PayloadText::Shared { .. })
    }

    /// The same payload with text of its own, so that keeping it does not
    /// keep the rest of its page's buffer alive.
    pub fn into_owned(self) -> Self {
        match self.0 {
            PayloadText::Owned(_) => self,
            PayloadText::Shared { .. } => {
                // Validated when made; the fallback keeps the shared text.
                serde_json::value::RawValue::from_string(self.as_str().to_owned())
                    .map(Payload::from)
                    .unwrap_or(self)
            }
        }
    }

    /// The payload as a JSON value (parses the text). Fails on text that is
    /// valid JSON but that serde_json cannot build a value from: nested
    /// deeper than its recursion limit (appends refuse such payloads, see
    /// [`MAX_JSON_DEPTH`], but a row written by other means may hold one).
    pub fn to_value(&self) -> std::result::Result<Value, serde_json::Error> {
        serde_json::from_str(self.as_str())
    }

    /// Deserializes the payload into `T`.
    pub fn deserialize<T: serde::de::DeserializeOwned>(
        &self,
    ) -> std::result::Result<T, serde_json::Error> {
        serde_json::from_str(self.as_str())
    }
}

impl From<Box<serde_json::value::RawValue>> for Payload {
    fn from(raw: Box<serde_json::value::RawValue>) -> Self {
        Payload(PayloadText::Owned(raw))
    }
}

/// Equal when the JSON values are equal (whitespace and key order aside).
impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
            || matches!((self.to_value(), other.to_value()), (Ok(a), Ok(b)) if a == b)
    }
}

impl PartialEq<Value> for Payload {
    fn eq(&self, other: &Value) -> bool {
        self.to_value().is_ok_and(|v| v == *other)
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
        match &self.0 {
            PayloadText::Owned(raw) => raw.serialize(s),
            // A borrowed raw value writes the text as it is; the text was
            // validated when the payload was made, so this parse succeeds.
            PayloadText::Shared { .. } => {
                serde_json::from_str::<&serde_json::value::RawValue>(self.as_str())
                    .map_err(serde::ser::Error::custom)?
                    .serialize(s)
            }
        }
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Box::<serde_json::value::RawValue>::deserialize(d).map(Payload::from)
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
    /// Payload schema version (after upcasting, the current one).
    pub event_version: u32,
    /// Payload, as JSON text.
    pub data: Payload,
    /// Correlation, causation and headers.
    pub metadata: Metadata,
    /// When the store recorded it (UTC).
    pub recorded_at: DateTime<Utc>,
    /// The payload schema version the event is stored at, when the store's
    /// [`Upcasters`](crate::Upcasters) brought it to a newer one; `None`
    /// when it is read as stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_event_version: Option<u32>,
    /// The type name the event is stored under, when an upcaster renamed
    /// it; `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_event_type: Option<String>,
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
    use serde_json::json;

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

    /// `depth` arrays nested in each other (`[[...]]`), built without recursion.
    fn nested(depth: usize) -> Value {
        let mut v = Value::Null;
        for _ in 0..depth {
            v = Value::Array(vec![v]);
        }
        v
    }

    fn stream() -> StreamId {
        StreamId::parse("Hostile-1").expect("valid")
    }

    /// The outermost container is checked in place (not pushed on the
    /// walk's stack), with the same depth, NUL and key rules as any other:
    /// at the root, one level down and deep down, and the stack is left
    /// unallocated for a flat payload.
    #[test]
    fn payload_checks_hold_at_the_root_and_below() {
        let check = |v: &Value, max: usize| check_json(v, max, &mut Vec::new());
        for max in [0, 1, 2, 5, MAX_JSON_DEPTH] {
            assert!(
                check(&nested(max), max).is_ok(),
                "{max} levels within {max}"
            );
            assert!(
                matches!(check(&nested(max + 1), max), Err(JsonFault::TooDeep(m)) if m == max),
                "{} levels beyond {max}",
                max + 1
            );
        }
        assert!(check(&json!(1), 0).is_ok(), "a scalar has no level");
        assert!(check(&json!({}), 0).is_err());
        let nul = |v: Value| matches!(check(&v, 8), Err(JsonFault::NulInString));
        assert!(nul(json!("a\u{0}b")));
        assert!(nul(json!(["a\u{0}b"])));
        assert!(nul(json!({"k": [{"k": "a\u{0}b"}]})));
        for v in [
            json!({"a\u{0}b": 1}),
            json!({"k": {"a\u{0}b": 1}}),
            json!([{"a\u{0}b": 1}]),
        ] {
            assert!(check(&v, 8).is_err(), "{v}");
        }
        for v in [json!({"x": 1, "y": "z"}), json!([1, "a", null, true])] {
            let mut stack = Vec::new();
            assert!(check_json(&v, 8, &mut stack).is_ok());
            assert_eq!(stack.capacity(), 0, "a flat payload allocates no stack");
        }
    }

    fn refused(events: &[NewEvent]) -> String {
        match validate_batch(&stream(), events) {
            Err(Error::InvalidEvent { stream: s, reason }) => {
                assert_eq!(s, stream());
                reason
            }
            other => panic!("expected InvalidEvent, got {other:?}"),
        }
    }

    #[test]
    fn reserved_metadata_names_are_refused_as_headers() {
        for key in Metadata::RESERVED_KEYS {
            let mut m = Metadata::default();
            m.headers.insert((*key).into(), json!("req-123"));
            let reason = refused(&[NewEvent::new("A", json!({})).with_metadata(m)]);
            assert!(reason.contains(&format!("{key:?}")), "{reason}");
            assert!(reason.contains("reserved"), "{reason}");
        }
        // The typed fields are the way to set them.
        let m = Metadata {
            correlation_id: Some(Uuid::now_v7()),
            causation_id: Some(Uuid::now_v7()),
            ..Default::default()
        };
        validate_batch(&stream(), &[NewEvent::new("A", json!({})).with_metadata(m)])
            .expect("typed ids are fine");
    }

    #[test]
    fn reserved_headers_are_never_written() {
        // Only code that fills `headers` by hand gets one in; both ways of
        // writing metadata leave it out, so the typed field always wins.
        let id = Uuid::now_v7();
        let mut m = Metadata {
            correlation_id: Some(id),
            ..Default::default()
        };
        m.headers.insert("correlation_id".into(), json!("req-123"));
        m.headers.insert("causation_id".into(), json!("req-456"));
        m.headers.insert("user".into(), json!("ann"));
        let expected = json!({"correlation_id": id.to_string(), "user": "ann"});
        assert_eq!(m.to_value(), expected);
        let text = serde_json::to_string(&m).expect("serializes");
        assert_eq!(
            serde_json::from_str::<Value>(&text).expect("parses"),
            expected
        );
        let back: Metadata = serde_json::from_str(&text).expect("reads back");
        assert_eq!(back.correlation_id, Some(id));
        assert_eq!(back.causation_id, None);
    }

    #[test]
    fn payload_depth_is_bounded_by_what_reads_back() {
        let ok = nested(MAX_JSON_DEPTH);
        validate_batch(&stream(), &[NewEvent::new("A", ok.clone())]).expect("at the limit");
        let text = serde_json::to_string(&ok).expect("serializes");
        let payload = Payload::from_json(text).expect("valid JSON");
        assert_eq!(payload.to_value().expect("reads back"), ok);

        let reason = refused(&[NewEvent::new("A", nested(MAX_JSON_DEPTH + 1))]);
        assert!(reason.contains("127 levels"), "{reason}");
        assert!(reason.contains("event 0"), "{reason}");
        // Proof that the limit is the decoder's: one level more does not read.
        let text = serde_json::to_string(&nested(MAX_JSON_DEPTH + 1)).expect("serializes");
        assert!(serde_json::from_str::<Value>(&text).is_err());
        assert!(Payload::from_value(&nested(MAX_JSON_DEPTH + 1)).is_err());
    }

    #[test]
    fn header_depth_counts_the_metadata_object() {
        let mut m = Metadata::default();
        m.headers.insert("h".into(), nested(MAX_JSON_DEPTH - 1));
        validate_batch(
            &stream(),
            &[NewEvent::new("A", json!(1)).with_metadata(m.clone())],
        )
        .expect("at the limit");
        let text = serde_json::to_string(&m).expect("serializes");
        assert_eq!(serde_json::from_str::<Metadata>(&text).expect("reads"), m);
        assert_eq!(Metadata::from_value(m.to_value()).expect("parses"), m);

        m.headers.insert("h".into(), nested(MAX_JSON_DEPTH));
        let reason = refused(&[NewEvent::new("A", json!(1)).with_metadata(m.clone())]);
        assert!(reason.contains("header \"h\""), "{reason}");
        assert!(reason.contains("127 levels"), "{reason}");
        let text = serde_json::to_string(&m).expect("serializes");
        assert!(serde_json::from_str::<Metadata>(&text).is_err());
        let err = Metadata::from_value(m.to_value()).expect_err("too deep");
        assert!(err.contains("127 levels"), "{err}");
    }

    #[test]
    fn very_deep_values_are_refused_without_recursion() {
        // 100,000 levels: serializing or parsing this recursively overflows
        // the stack; the check must not.
        let deep = nested(100_000);
        let mut m = Metadata::default();
        m.headers.insert("h".into(), nested(100_000));
        let events = vec![
            NewEvent::new("A", deep),
            NewEvent::new("B", json!(1)).with_metadata(m),
        ];
        let reason = refused(&events[..1]);
        assert!(reason.contains("levels deep"), "{reason}");
        let reason = refused(&events[1..]);
        assert!(reason.contains("header"), "{reason}");
        let mut meta = serde_json::Map::new();
        meta.insert("h".into(), nested(100_000));
        let err = Metadata::from_value(Value::Object(meta)).expect_err("too deep");
        assert!(err.contains("levels deep"), "{err}");
        assert!(Payload::from_value(&events[0].data).is_err());
        // The owned check takes a refused batch apart without recursion.
        let err = validate_batch_owned(&stream(), events).expect_err("too deep");
        assert!(err.to_string().contains("levels deep"), "{err}");
    }

    #[test]
    fn nul_characters_and_serde_private_keys_are_refused() {
        let private = "$serde_json::private::RawValue";
        // Proof that such a key does not read back: serde_json parses the
        // string as JSON text in place of the object.
        let text = serde_json::to_string(&json!({ private: "[1," })).expect("serializes");
        assert!(serde_json::from_str::<Value>(&text).is_err());
        let cases = [
            (json!({"a": ["x\u{0}y"]}), "NUL"),
            (json!({"k\u{0}": 1}), "NUL"),
            (json!([{ private: "5" }]), private),
            (
                json!({"a": {"$serde_json::private::Number": "1"}}),
                "reserves",
            ),
        ];
        for (data, needle) in cases {
            let reason = refused(&[NewEvent::new("A", data.clone())]);
            assert!(reason.contains("payload"), "{reason}");
            assert!(reason.contains(needle), "{reason}");
            assert!(Payload::from_value(&data).is_err());
            let mut m = Metadata::default();
            m.headers.insert("h".into(), data.clone());
            let reason = refused(&[NewEvent::new("A", json!(1)).with_metadata(m)]);
            assert!(reason.contains("header \"h\""), "{reason}");
            assert!(Metadata::from_value(json!({ "h": data })).is_err());
        }
        let mut m = Metadata::default();
        m.headers.insert(private.into(), json!(1));
        let reason = refused(&[NewEvent::new("A", json!(1)).with_metadata(m)]);
        assert!(reason.contains(private), "{reason}");
    }

    #[test]
    fn event_versions_beyond_i32_are_refused() {
        let reason = refused(&[NewEvent::new("A", json!(1)).with_event_version(u32::MAX)]);
        assert!(reason.contains("2147483647"), "{reason}");
        validate_batch(
            &stream(),
            &[NewEvent::new("A", json!(1)).with_event_version(i32::MAX as u32)],
        )
        .expect("i32::MAX is kept");
    }

    #[test]
    fn shared_payloads_are_slices_checked_when_made() {
        let text = std::sync::Arc::new(r#"x{"a":1}[2,3]{bad"#.to_owned());
        let a = Payload::from_shared_json(text.clone(), 1..8).expect("an object");
        let b = Payload::from_shared_json(text.clone(), 8..13).expect("an array");
        assert!(a.is_shared() && b.is_shared());
        assert_eq!(a.as_str(), r#"{"a":1}"#);
        assert_eq!(a, json!({"a": 1}));
        assert_eq!(b.deserialize::<Vec<i32>>().expect("decodes"), vec![2, 3]);
        // Not one JSON value, outside the text, or not on a char boundary.
        assert!(Payload::from_shared_json(text.clone(), 13..17).is_err());
        assert!(Payload::from_shared_json(text.clone(), 0..8).is_err());
        assert!(Payload::from_shared_json(text.clone(), 8..99).is_err());
        let accented = std::sync::Arc::new("\"é\"".to_owned());
        assert!(Payload::from_shared_json(accented.clone(), 0..2).is_err());
        assert!(Payload::from_shared_json(accented, 0..4).is_ok());
        // Serialized as the JSON it holds, equal to its owned copy.
        assert_eq!(serde_json::to_string(&a).expect("serializes"), r#"{"a":1}"#);
        let owned = a.clone().into_owned();
        assert!(!owned.is_shared());
        assert_eq!(owned, a);
        assert_eq!(format!("{owned}"), format!("{a}"));
    }

    #[test]
    fn payload_to_value_fails_instead_of_null() {
        let text = serde_json::to_string(&nested(200)).expect("serializes");
        let payload = Payload::from_json(text).expect("valid JSON text");
        assert!(payload.to_value().is_err());
        assert_ne!(payload, Value::Null);
        assert_ne!(payload, Payload::from_json("null".into()).expect("null"));
    }

    #[test]
    fn metadata_round_trips_headers() {
        let v = serde_json::json!({"correlation_id": "0190a8c4-0000-7000-8000-000000000001", "user": "ann"});
        let m = Metadata::from_value(v.clone()).expect("valid");
        assert!(m.correlation_id.is_some());
        assert_eq!(m.headers["user"], "ann");
        assert_eq!(m.to_value(), v);
        assert!(Metadata::from_value(serde_json::json!([1])).is_err());
        let err = Metadata::from_value(json!({"causation_id": "req-123"})).expect_err("not a UUID");
        assert!(err.contains("causation_id must be a UUID"), "{err}");
        assert!(err.contains("req-123"), "{err}");
        let m =
            Metadata::from_value(json!({"correlation_id": null, "x": 1})).expect("null is none");
        assert_eq!(m.correlation_id, None);
        assert!(!m.headers.contains_key("correlation_id"));
    }
}
