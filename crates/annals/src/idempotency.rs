//! What a backend stores for a payload, and how it tells an identical retry
//! from a reused event id: written once here, used by every backend.
//!
//! # Canonical JSON and number fidelity
//!
//! Backends do not store `serde_json`'s text of a payload but its *canonical
//! JSON* ([`canonical_json`]): compact, object keys sorted by bytes, and every
//! number written so that each backend keeps it unchanged. PostgreSQL stores
//! JSON as `jsonb`, whose numbers are `numeric`: it would turn `1e300` into a
//! 301-digit integer, `1e16` (a float) into the integer `10000000000000000`,
//! and `-0.0` into `0.0`. The canonical form is what `jsonb` gives back
//! already, so every backend stores and returns the same values:
//!
//! - an integer (`u64` or `i64`, which is all a `serde_json::Value` holds) is
//!   written in decimal and reads back as the same integer;
//! - a float is written as the shortest decimal that parses back to the same
//!   `f64`, in plain notation (no exponent) and always with a `.` (so it
//!   stays a float: `1e16` is written `10000000000000000.0`); it reads back as
//!   the same `f64`, with one exception: the sign of zero is not kept (`-0.0`
//!   is stored as `0.0`, as PostgreSQL would);
//! - nothing else changes: strings, booleans and nulls are kept as they are.
//!
//! The promise is about values, not text: `RecordedEvent::data` holds
//! canonical text on SQLite and in memory and `jsonb`'s spacing and key order
//! on PostgreSQL, which parse to the same value. Reading `f64::MAX` back needs
//! a correctly rounding float parser, so the workspace builds `serde_json`
//! with `float_roundtrip`.
//!
//! A payload (or metadata) nested deeper than [`MAX_JSON_DEPTH`] arrays and
//! objects is refused at append with [`Error::InvalidEvent`]: the JSON decoder
//! that reads events back stops at that depth, so such an event could be
//! stored but never read.
//!
//! # Fingerprints, and why not a comparison of stored payloads
//!
//! Each stored event carries a [`Fingerprint`]: SHA-256 of its payload's
//! canonical JSON, computed here when the batch is prepared and stored beside
//! the payload. An append whose event ids are already stored compares
//! fingerprints (and event type and version), never payload texts. Three
//! reasons:
//!
//! - It needs no decoding of what is stored. Comparing payloads meant parsing
//!   `jsonb` back into values, which fails on numbers the reader cannot
//!   represent (the identical retry of an event holding `f64::MAX` failed on
//!   PostgreSQL), and is as slow as a read.
//! - It survives an encrypting wrapper (crypto-shredding, planned): such a
//!   wrapper hands the backend ciphertext that differs on every attempt, so a
//!   comparison of stored payloads could never recognise a retry. The wrapper
//!   sets [`NewEvent::fingerprint`] itself, from the plaintext, and the backend
//!   stores and compares that. It must not use the plain SHA-256 of the
//!   plaintext (after the key is shredded, anyone could confirm a guessed
//!   payload against it): a keyed one, such as an HMAC under the subject's
//!   key over [`canonical_json`] of the plaintext, is what this field is for.
//!   Either way the store only compares opaque bytes.
//! - The check is the same code on every backend ([`check_retry`]); backends
//!   only read the stored rows of the batch's ids.
//!
//! Rows written before fingerprints existed (SQLite schema 3, PostgreSQL
//! schema 1) have none; for them the stored payload is compared with the new
//! one as values, numbers by value (so `jsonb`'s rewriting of old rows still
//! matches).

use std::fmt::{self, Write as _};

use serde_json::{Number, Value};
use sha2::{Digest, Sha256};

use crate::event::MAX_JSON_DEPTH;
use crate::{
    AppendResult, Error, EventId, GlobalPosition, Metadata, NewEvent, Result, StreamId,
    StreamVersion,
};

/// A JSON value nests arrays and objects deeper than [`MAX_JSON_DEPTH`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[error("nested more than {MAX_JSON_DEPTH} arrays and objects deep, which no reader could decode")]
pub struct NestingTooDeep;

/// The canonical JSON text of `value`: what every backend stores for a
/// payload or a metadata object ([`prepare_batch`]).
///
/// Compact, object keys sorted by bytes, integers in decimal, floats as the
/// shortest decimal that parses back to the same `f64`, in plain notation and
/// with a `.` (`-0.0` as `0.0`). That is the form PostgreSQL's `jsonb` keeps
/// numbers in (it stores them as `numeric`, and would otherwise turn `1e300`
/// into a 301-digit integer and the float `1e16` into an integer), so every
/// backend reads back the same values. What the store promises for numbers:
///
/// - an integer (`u64` or `i64`) reads back as the same integer;
/// - a float reads back as the same `f64`, still a float, except that the
///   sign of zero is not kept (`-0.0` reads back as `0.0`);
/// - the JSON text is not kept: spacing, key order and number notation may
///   differ between backends, the values do not.
///
/// Fails when `value` nests arrays and objects deeper than
/// [`MAX_JSON_DEPTH`]: no reader could decode it.
///
/// ```
/// use serde_json::json;
/// let text = annals::canonical_json(&json!({"b": 1e16, "a": [-0.0, 0.1, u64::MAX]}))?;
/// assert_eq!(text, r#"{"a":[0.0,0.1,18446744073709551615],"b":10000000000000000.0}"#);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn canonical_json(value: &Value) -> std::result::Result<String, NestingTooDeep> {
    let mut out = String::new();
    write_value(&mut out, value, 0)?;
    Ok(out)
}

fn write_value(
    out: &mut String,
    value: &Value,
    depth: usize,
) -> std::result::Result<(), NestingTooDeep> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            if depth >= MAX_JSON_DEPTH {
                return Err(NestingTooDeep);
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item, depth + 1)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            if depth >= MAX_JSON_DEPTH {
                return Err(NestingTooDeep);
            }
            out.push('{');
            let mut write_entry = |i: usize, key: &str, item: &Value| {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, key);
                out.push(':');
                write_value(out, item, depth + 1)
            };
            // `serde_json::Map` is a `BTreeMap` (sorted) unless a crate in
            // the build enables `preserve_order`; sort only then.
            let sorted = map.keys().zip(map.keys().skip(1)).all(|(a, b)| a < b);
            if sorted {
                for (i, (key, item)) in map.iter().enumerate() {
                    write_entry(i, key, item)?;
                }
            } else {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    write_entry(i, key, item)?;
                }
            }
            out.push('}');
        }
    }
    Ok(())
}

fn write_number(out: &mut String, n: &Number) {
    // `write!` to a `String` cannot fail.
    if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(f) = n.as_f64() {
        write_float(out, f);
    }
}

fn write_float(out: &mut String, f: f64) {
    if !f.is_finite() {
        // A `Value` cannot hold one; serde_json writes `null` for it too.
        out.push_str("null");
    } else if f == 0.0 {
        // Both zeros: PostgreSQL's numeric has no negative zero.
        out.push_str("0.0");
    } else {
        // `Display` of an `f64` is the shortest decimal that parses back to
        // the same value, in plain notation: exactly what `jsonb` keeps.
        let start = out.len();
        let _ = write!(out, "{f}");
        if !out[start..].contains('.') {
            out.push_str(".0");
        }
    }
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        // `b` is ASCII, so `i` is a character boundary.
        out.push_str(&s[start..i]);
        if escaped.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escaped);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// The fingerprint of an event's payload: what the idempotency check
/// ([`check_retry`]) compares, stored with each event.
///
/// By default it is SHA-256 of the payload's [`canonical_json`], computed by
/// [`prepare_batch`]. Comparing fingerprints rather than stored payloads
/// means nothing stored is decoded to recognise a retry, and the check keeps
/// working behind a wrapper that encrypts payloads on their way to the
/// backend (its ciphertext differs on every attempt). Such a wrapper sets
/// [`NewEvent::fingerprint`] itself, from the plaintext, with a *keyed* hash
/// (for example an HMAC under the data subject's key over [`canonical_json`]
/// of the plaintext): a plain SHA-256 of a small payload would let anyone
/// confirm a guessed payload after the key is shredded. The store only
/// compares the bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// SHA-256 of a canonical JSON text.
    pub fn of_canonical(canonical: &str) -> Self {
        Fingerprint(Sha256::digest(canonical.as_bytes()).into())
    }

    /// The default fingerprint of a payload.
    pub fn of_value(value: &Value) -> std::result::Result<Self, NestingTooDeep> {
        canonical_json(value).map(|text| Self::of_canonical(&text))
    }

    /// A fingerprint from its 32 bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Fingerprint(bytes)
    }

    /// A fingerprint from stored bytes (`None` unless there are exactly 32).
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Fingerprint)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprint(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…)")
    }
}

/// An event as a backend writes it, made by [`prepare_batch`]: payload and
/// metadata as canonical JSON text, and the payload's fingerprint.
#[derive(Clone, PartialEq, Debug)]
pub struct PreparedEvent {
    /// The event id.
    pub event_id: EventId,
    /// The type name.
    pub event_type: String,
    /// The payload schema version.
    pub event_version: u32,
    /// The payload, as canonical JSON.
    pub data: String,
    /// The metadata object, as canonical JSON (`{}` when empty).
    pub metadata: String,
    /// What the idempotency check compares: [`NewEvent::fingerprint`] when
    /// set, else [`Fingerprint::of_canonical`] of `data`.
    pub fingerprint: Fingerprint,
}

impl PreparedEvent {
    /// The metadata, parsed back from its canonical text (what a reader of
    /// any backend gets).
    pub fn parsed_metadata(&self) -> Result<Metadata> {
        serde_json::from_str(&self.metadata).map_err(|source| Error::Encode {
            what: format!("metadata of {}", self.event_type),
            source,
        })
    }
}

/// Validates a batch ([`validate_batch`](crate::validate_batch)) and turns each event into what the
/// backend stores. Every backend's `append` starts here, so what one backend
/// accepts, all do, and they all store the same values.
pub fn prepare_batch(stream: &StreamId, events: Vec<NewEvent>) -> Result<Vec<PreparedEvent>> {
    // Owned, so that a refused payload nested 100,000 levels deep is taken
    // apart without recursion rather than dropped.
    let events = crate::event::validate_batch_owned(stream, events)?;
    events
        .into_iter()
        .map(|e| {
            let invalid = |what: &str, err: NestingTooDeep| Error::InvalidEvent {
                stream: stream.clone(),
                reason: format!("{what} of event type {:?} is {err}", e.event_type),
            };
            let data = canonical_json(&e.data).map_err(|err| invalid("the payload", err))?;
            let metadata =
                canonical_metadata(&e.metadata).map_err(|err| invalid("the metadata", err))?;
            let fingerprint = e
                .fingerprint
                .unwrap_or_else(|| Fingerprint::of_canonical(&data));
            Ok(PreparedEvent {
                event_id: e.event_id,
                event_type: e.event_type,
                event_version: e.event_version,
                data,
                metadata,
                fingerprint,
            })
        })
        .collect()
}

fn canonical_metadata(m: &Metadata) -> std::result::Result<String, NestingTooDeep> {
    if m.correlation_id.is_none() && m.causation_id.is_none() && m.headers.is_empty() {
        return Ok("{}".to_owned());
    }
    canonical_json(&m.to_value())
}

/// What a backend read about a stored event whose id is in a batch being
/// appended: the input of [`check_retry`].
#[derive(Clone, PartialEq, Debug)]
pub struct StoredEvent {
    /// Its stream.
    pub stream_id: StreamId,
    /// Its version there.
    pub stream_version: StreamVersion,
    /// Its position.
    pub global_position: GlobalPosition,
    /// Its type name.
    pub event_type: String,
    /// Its payload schema version.
    pub event_version: u32,
    /// Its stored fingerprint (`None`: written before fingerprints were
    /// stored).
    pub fingerprint: Option<Fingerprint>,
    /// Its payload text. Only needed, and backends only read it, when
    /// `fingerprint` is `None`.
    pub data: Option<String>,
}

/// The idempotency check of an append, the same on every backend.
///
/// `stored[i]` is what the store holds under `batch[i]`'s event id. Returns
/// `Ok(None)` when no id of the batch is stored (append it), and the original
/// assignment (`deduplicated: true`) when every one is, in `stream`, at
/// consecutive versions in batch order, with the same type, version and
/// payload fingerprint. Any other reuse of a stored id is
/// [`Error::DuplicateEventId`] naming the first stored id of the batch and the
/// stream that holds it.
pub fn check_retry(
    stream: &StreamId,
    batch: &[PreparedEvent],
    stored: &[Option<StoredEvent>],
) -> Result<Option<AppendResult>> {
    let Some(first_stored) = stored.iter().position(Option::is_some) else {
        return Ok(None);
    };
    let same = match stored.first() {
        Some(Some(first)) if batch.len() == stored.len() => {
            batch.iter().zip(stored).enumerate().all(|(i, (new, s))| {
                s.as_ref().is_some_and(|s| {
                    s.stream_id == *stream
                        && s.stream_version.0 == first.stream_version.0 + i as u64
                        && s.event_type == new.event_type
                        && s.event_version == new.event_version
                        && same_payload(s, new)
                })
            })
        }
        _ => false,
    };
    if !same {
        let holder = stored[first_stored]
            .as_ref()
            .map_or_else(|| stream.clone(), |s| s.stream_id.clone());
        return Err(Error::DuplicateEventId {
            event_id: batch[first_stored].event_id,
            stream: holder,
        });
    }
    let stored: Vec<&StoredEvent> = stored.iter().flatten().collect();
    let (Some(first), Some(last)) = (stored.first(), stored.last()) else {
        return Ok(None);
    };
    Ok(Some(AppendResult {
        first_version: first.stream_version,
        last_version: last.stream_version,
        positions: stored.iter().map(|s| s.global_position).collect(),
        deduplicated: true,
    }))
}

fn same_payload(stored: &StoredEvent, new: &PreparedEvent) -> bool {
    match (&stored.fingerprint, &stored.data) {
        (Some(f), _) => *f == new.fingerprint,
        (None, Some(text)) => same_json_text(text, &new.data),
        (None, None) => false,
    }
}

/// Whether two JSON texts hold the same value, numbers compared by value
/// (see [`same_json`]). Text that does not parse matches nothing.
pub(crate) fn same_json_text(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (
        serde_json::from_str::<Value>(a),
        serde_json::from_str::<Value>(b),
    ) {
        (Ok(a), Ok(b)) => same_json(&a, &b),
        _ => false,
    }
}

/// Whether two JSON values are the same under the store's number promise:
/// integers equal as integers, and where either side is a float, equal as
/// `f64` (so `jsonb`'s `10000000000000000` matches the float `1e16`, and
/// `0.0` matches `-0.0`). Values decoded from JSON text nest at most
/// [`MAX_JSON_DEPTH`] deep, so the recursion is bounded.
pub(crate) fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x.is_f64() || y.is_f64() {
                x.as_f64() == y.as_f64()
            } else {
                x == y
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(depth: usize) -> Value {
        let mut v = json!(1);
        for _ in 0..depth {
            v = json!([v]);
        }
        v
    }

    #[test]
    fn canonical_text_is_compact_and_sorted() {
        let v = json!({"b": [1, "x\n\"y\"\u{1}", null, true], "a": {"d": -3, "c": 0.5}});
        assert_eq!(
            canonical_json(&v).expect("canonical"),
            r#"{"a":{"c":0.5,"d":-3},"b":[1,"x\n\"y\"\u0001",null,true]}"#
        );
        let text = canonical_json(&v).expect("canonical");
        assert_eq!(serde_json::from_str::<Value>(&text).expect("parses"), v);
    }

    #[test]
    fn numbers_are_written_as_jsonb_keeps_them() {
        let cases: &[(Value, &str)] = &[
            (json!(u64::MAX), "18446744073709551615"),
            (json!(i64::MIN), "-9223372036854775808"),
            (json!(0.1), "0.1"),
            (json!(1.0), "1.0"),
            (json!(-0.0), "0.0"),
            (json!(1e16), "10000000000000000.0"),
            (json!(1.5e-7), "0.00000015"),
        ];
        for (v, text) in cases {
            assert_eq!(canonical_json(v).expect("canonical"), *text, "{v}");
        }
        let big = canonical_json(&json!(1e300)).expect("canonical");
        assert_eq!(big, format!("1{}.0", "0".repeat(300)));
    }

    #[test]
    fn every_float_reads_back_as_itself() {
        for f in [
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            f64::EPSILON,
            5e-324,
            1e300,
            -1e-300,
            0.1,
            2f64.powi(60),
            123_456.789e200,
            std::f64::consts::PI,
        ] {
            let text = canonical_json(&json!(f)).expect("canonical");
            let back: Value = serde_json::from_str(&text).expect("parses");
            assert!(back.is_f64(), "{f:e} came back as {back}");
            assert_eq!(back.as_f64(), Some(f), "{f:e} via {text}");
            // And it is a fixed point: what PostgreSQL returns, we write again.
            assert_eq!(canonical_json(&back).expect("canonical"), text);
        }
    }

    #[test]
    fn nesting_is_bounded_by_what_the_decoder_reads() {
        let deepest = canonical_json(&nested(MAX_JSON_DEPTH)).expect("at the limit");
        assert!(serde_json::from_str::<Value>(&deepest).is_ok());
        let too_deep = format!("[{deepest}]");
        assert!(serde_json::from_str::<Value>(&too_deep).is_err());
        assert_eq!(
            canonical_json(&nested(MAX_JSON_DEPTH + 1)),
            Err(NestingTooDeep)
        );
    }

    #[test]
    fn legacy_comparison_matches_jsonb_rewrites() {
        assert!(same_json_text(
            r#"{"a":1e16}"#,
            r#"{"a": 10000000000000000}"#
        ));
        assert!(same_json_text(
            r#"{"b":[0.1],"a":-0.0}"#,
            r#"{"a": 0.0, "b": [0.1]}"#
        ));
        assert!(!same_json_text(r#"{"a":1}"#, r#"{"a":2}"#));
        assert!(!same_json_text(r#"{"a":1}"#, r#"{"a":1,"b":1}"#));
        assert!(!same_json_text("not json", "not json "));
    }

    fn prepared(id: EventId, n: i64) -> PreparedEvent {
        prepare_batch(
            &StreamId::parse("S-1").expect("stream"),
            vec![NewEvent::new("E", json!({ "n": n })).with_id(id)],
        )
        .expect("valid")
        .remove(0)
    }

    fn stored(p: &PreparedEvent, stream: &str, version: u64) -> StoredEvent {
        StoredEvent {
            stream_id: StreamId::parse(stream).expect("stream"),
            stream_version: StreamVersion(version),
            global_position: GlobalPosition::from_seq(version * 10),
            event_type: p.event_type.clone(),
            event_version: p.event_version,
            fingerprint: Some(p.fingerprint),
            data: None,
        }
    }

    #[test]
    fn check_retry_cases() {
        let s = StreamId::parse("S-1").expect("stream");
        let (a, b) = (prepared(EventId::new(), 1), prepared(EventId::new(), 2));
        let batch = [a.clone(), b.clone()];
        assert_eq!(check_retry(&s, &batch, &[None, None]).expect("fresh"), None);
        let done = check_retry(
            &s,
            &batch,
            &[Some(stored(&a, "S-1", 3)), Some(stored(&b, "S-1", 4))],
        )
        .expect("retry")
        .expect("deduplicated");
        assert_eq!(
            (done.first_version, done.last_version),
            (StreamVersion(3), StreamVersion(4))
        );
        assert_eq!(
            done.positions,
            [GlobalPosition::from_seq(30), GlobalPosition::from_seq(40)]
        );
        assert!(done.deduplicated);
        let dup = |stored: &[Option<StoredEvent>]| match check_retry(&s, &batch, stored) {
            Err(Error::DuplicateEventId { event_id, stream }) => (event_id, stream.to_string()),
            other => panic!("expected a duplicate id, got {other:?}"),
        };
        // Partly stored, another stream, not consecutive, another payload.
        assert_eq!(
            dup(&[None, Some(stored(&b, "S-1", 4))]),
            (b.event_id, "S-1".into())
        );
        assert_eq!(
            dup(&[Some(stored(&a, "T-1", 3)), Some(stored(&b, "T-1", 4))]),
            (a.event_id, "T-1".into())
        );
        assert_eq!(
            dup(&[Some(stored(&a, "S-1", 3)), Some(stored(&b, "S-1", 5))]).0,
            a.event_id
        );
        let mut other = stored(&b, "S-1", 4);
        other.fingerprint = Some(prepared(b.event_id, 3).fingerprint);
        assert_eq!(
            dup(&[Some(stored(&a, "S-1", 3)), Some(other)]).0,
            a.event_id
        );
        // A row without a fingerprint is compared by value.
        let mut legacy = stored(&b, "S-1", 4);
        legacy.fingerprint = None;
        legacy.data = Some(r#"{"n": 2}"#.into());
        assert!(check_retry(
            &s,
            &batch,
            &[Some(stored(&a, "S-1", 3)), Some(legacy.clone())]
        )
        .expect("legacy retry")
        .is_some());
        legacy.data = Some(r#"{"n": 3}"#.into());
        assert_eq!(
            dup(&[Some(stored(&a, "S-1", 3)), Some(legacy)]).0,
            a.event_id
        );
    }

    #[test]
    fn a_wrapper_fingerprint_wins() {
        let s = StreamId::parse("S-1").expect("stream");
        let f = Fingerprint::from_bytes([7; 32]);
        let p = prepare_batch(&s, vec![NewEvent::new("E", json!({})).with_fingerprint(f)])
            .expect("valid");
        assert_eq!(p[0].fingerprint, f);
        assert_eq!(Fingerprint::from_slice(f.as_bytes()), Some(f));
        assert_eq!(Fingerprint::from_slice(&[1, 2]), None);
    }

    #[test]
    fn too_deep_payloads_and_metadata_are_invalid_events() {
        let s = StreamId::parse("S-1").expect("stream");
        let e = prepare_batch(&s, vec![NewEvent::new("E", nested(MAX_JSON_DEPTH + 1))])
            .expect_err("too deep");
        assert!(
            matches!(&e, Error::InvalidEvent { reason, .. } if reason.contains("127")),
            "{e}"
        );
        let mut m = Metadata::default();
        m.headers.insert("h".into(), nested(MAX_JSON_DEPTH));
        let e = prepare_batch(&s, vec![NewEvent::new("E", json!(1)).with_metadata(m)])
            .expect_err("metadata too deep");
        assert!(
            matches!(&e, Error::InvalidEvent { reason, .. } if reason.contains("metadata")),
            "{e}"
        );
    }
}
