//! Aggregates and their events.
//!
//! State is a fold of events: [`Aggregate::apply`] is the only way state
//! changes, and commands (ordinary methods on the aggregate) check invariants
//! and return new events without changing anything.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::{Error, RecordedEvent, Result};

/// A typed event enum.
///
/// The representation is serde's default, externally tagged enum: the
/// variant's tag is the stored `event_type` and the variant's content is the
/// stored `data` (`null` for a unit variant). Derive this trait rather than
/// write it: `#[derive(DomainEvent)]` reads the type names from the same
/// `#[serde(rename)]` / `rename_all` attributes serde does, takes versions
/// from `#[event(version = N)]`, and refuses at compile time an enum whose
/// representation does not map onto the store (see
/// [the derive](derive@crate::DomainEvent)).
///
/// ```
/// use annals::DomainEvent;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, DomainEvent)]
/// #[serde(rename_all = "snake_case")]
/// enum CartEvent {
///     ItemAdded { sku: String },
///     #[event(version = 2)]
///     CheckedOut,
/// }
///
/// assert_eq!(CartEvent::EVENT_TYPES, ["item_added", "checked_out"]);
/// assert_eq!(CartEvent::CheckedOut.event_type(), "checked_out");
/// assert_eq!(CartEvent::current_version("checked_out"), Some(2));
/// ```
///
/// A hand-written impl must keep its names equal to serde's tags;
/// [`encode_event`] refuses an event whose tag is not its `event_type()`.
pub trait DomainEvent: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Every type name this enum reads: each variant's stored name (and, when
    /// derived, the names of its `#[serde(alias)]`es). A stored type that is
    /// not listed is reported as [`Error::UnknownEventType`], not mistaken for
    /// bad data.
    const EVENT_TYPES: &'static [&'static str];

    /// This event's type name: the tag serde writes for its variant.
    fn event_type(&self) -> &'static str;

    /// The payload schema version written for this event: by default its
    /// type's [`current_version`](DomainEvent::current_version), else 1.
    fn event_version(&self) -> u32 {
        Self::current_version(self.event_type()).unwrap_or(1)
    }

    /// The payload schema version that events of type `event_type` are
    /// written with today, or `None` when this enum has no such type. By
    /// default 1 for every name in [`EVENT_TYPES`](DomainEvent::EVENT_TYPES);
    /// the derive answers with each variant's `#[event(version = N)]`.
    fn current_version(event_type: &str) -> Option<u32> {
        Self::EVENT_TYPES.contains(&event_type).then_some(1)
    }

    /// The personal data events of type `event_type` carry (see
    /// [`crate::gdpr`]): `None` (the default) when they carry none. The
    /// derive answers with each variant's
    /// `#[event(personal(subject = "..", fields("..", ..)))]`.
    fn personal_data(event_type: &str) -> Option<crate::PersonalData> {
        let _ = event_type;
        None
    }
}

/// An event-sourced aggregate: state folded from the events of one stream
/// `<TYPE>-<id>`.
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The aggregate type, which is the stream category (no `-`).
    const TYPE: &'static str;

    /// Version of the serialized state layout. Bump it when the state's shape
    /// or meaning changes; snapshots of other versions are then not used (or
    /// are migrated by [`Aggregate::migrate_snapshot`]).
    const SCHEMA_VERSION: u32 = 1;

    /// The event enum.
    type Event: DomainEvent;

    /// Applies one event. Infallible by design: invariants are checked by
    /// commands before events exist; a recorded event is a fact.
    fn apply(&mut self, event: &Self::Event);

    /// Upgrades a snapshot state of schema version `from` to `from + 1`.
    /// Return `None` when there is no such step (the default): the snapshot is
    /// then ignored and the aggregate replayed.
    fn migrate_snapshot(from: u32, state: Value) -> Option<Value> {
        let _ = (from, state);
        None
    }
}

/// Encodes a typed event into its stored `(type, version, data)`.
///
/// The event must serialize as an externally tagged enum variant does:
/// `{"<type>": data}`, or `"<type>"` for a unit variant, whose data is then
/// `null` (what [`decode_event`] expects of a unit variant). The tag must be
/// the event's [`event_type()`](DomainEvent::event_type), and that name must
/// be in [`EVENT_TYPES`](DomainEvent::EVENT_TYPES). Anything else is
/// [`Error::Encode`] saying what differs, so that no event is stored under a
/// type or with a payload it would not read back as.
pub fn encode_event<E: DomainEvent>(event: &E) -> Result<(&'static str, u32, Value)> {
    let event_type = event.event_type();
    let refuse = |reason: String| Error::Encode {
        what: format!("event {event_type}"),
        source: serde::ser::Error::custom(reason),
    };
    if !E::EVENT_TYPES.contains(&event_type) {
        return Err(refuse(format!(
            "event_type() is {event_type:?}, which EVENT_TYPES does not list, so the event \
             could not be read back"
        )));
    }
    let value = serde_json::to_value(event).map_err(|source| Error::Encode {
        what: format!("event {event_type}"),
        source,
    })?;
    let (tag, data) = match value {
        // `{"Variant": content}`
        Value::Object(map) => {
            let keys = map.len();
            let mut entries = map.into_iter();
            match (entries.next(), entries.next()) {
                (Some(entry), None) => entry,
                _ => {
                    return Err(refuse(format!(
                        "it serialized as an object with {keys} keys, not as an externally \
                         tagged enum variant (`{{\"<type>\": data}}` or `\"<type>\"`)"
                    )))
                }
            }
        }
        // A unit variant serializes as its name alone.
        Value::String(tag) => (tag, Value::Null),
        other => {
            let shape = match other {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                _ => "an array",
            };
            return Err(refuse(format!(
                "it serialized as {shape}, not as an externally tagged enum variant \
                 (`{{\"<type>\": data}}` or `\"<type>\"`)"
            )));
        }
    };
    if tag != event_type {
        return Err(refuse(format!(
            "serde wrote the tag {tag:?} but event_type() is {event_type:?}; derive \
             DomainEvent so that both come from the same serde attributes"
        )));
    }
    Ok((event_type, event.event_version(), data))
}

/// Decodes a recorded event into its typed form. Every read path of the
/// repository, the snapshot jobs and the tools goes through this function.
/// It deserializes straight from the stored payload, with the type name as the
/// enum variant, copying nothing. A unit variant's payload must be `null`, as
/// [`encode_event`] writes it (and as serde's own JSON reading demands).
pub fn decode_event<E: DomainEvent>(event: &RecordedEvent) -> Result<E> {
    if !E::EVENT_TYPES.contains(&event.event_type.as_str()) {
        return Err(Error::UnknownEventType {
            stream: event.stream_id.clone(),
            version: event.stream_version,
            event_type: event.event_type.clone(),
        });
    }
    E::deserialize(Tagged {
        tag: &event.event_type,
        data: event.data.as_str(),
    })
    .map_err(|source| Error::Decode {
        stream: event.stream_id.clone(),
        version: event.stream_version,
        event_type: event.event_type.clone(),
        event_version: event.event_version,
        source,
    })
}

/// An externally tagged enum value seen as `(variant name, payload)` without
/// building the `{name: payload}` object.
struct Tagged<'a> {
    tag: &'a str,
    data: &'a str,
}

impl<'de> serde::Deserializer<'de> for Tagged<'de> {
    type Error = serde_json::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(
        self,
        visitor: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        visitor.visit_enum(self)
    }

    fn deserialize_enum<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        visitor.visit_enum(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

impl<'de> serde::de::EnumAccess<'de> for Tagged<'de> {
    type Error = serde_json::Error;
    type Variant = VariantPayload<'de>;

    fn variant_seed<V: serde::de::DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> std::result::Result<(V::Value, Self::Variant), Self::Error> {
        let name = serde::de::value::BorrowedStrDeserializer::<serde_json::Error>::new(self.tag);
        Ok((seed.deserialize(name)?, VariantPayload(self.data)))
    }
}

/// The payload of a variant: the stored JSON text, parsed straight into the
/// variant's fields.
struct VariantPayload<'a>(&'a str);

impl<'a> VariantPayload<'a> {
    fn parser(&self) -> serde_json::Deserializer<serde_json::de::StrRead<'a>> {
        serde_json::Deserializer::from_str(self.0)
    }
}

impl<'de> serde::de::VariantAccess<'de> for VariantPayload<'de> {
    type Error = serde_json::Error;

    fn unit_variant(self) -> std::result::Result<(), Self::Error> {
        // Like serde_json's own `{"Variant": null}`: a payload that holds
        // something is not silently dropped.
        let mut p = self.parser();
        <() as serde::Deserialize>::deserialize(&mut p)?;
        p.end()
    }

    fn newtype_variant_seed<T: serde::de::DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> std::result::Result<T::Value, Self::Error> {
        let mut p = self.parser();
        let v = seed.deserialize(&mut p)?;
        p.end()?;
        Ok(v)
    }

    fn tuple_variant<V: serde::de::Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        let mut p = self.parser();
        let v = serde::Deserializer::deserialize_seq(&mut p, visitor)?;
        p.end()?;
        Ok(v)
    }

    fn struct_variant<V: serde::de::Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        let mut p = self.parser();
        let v = serde::Deserializer::deserialize_struct(&mut p, "", fields, visitor)?;
        p.end()?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};
    use serde_json::{json, Value};

    use super::{decode_event, encode_event, DomainEvent};
    use crate::{Error, StreamVersion};
    use crate::{EventId, GlobalPosition, Metadata, Payload, RecordedEvent, StreamId};

    /// A stored event as a backend would hand it back.
    fn recorded(event_type: &str, event_version: u32, data: &Value) -> RecordedEvent {
        RecordedEvent {
            event_id: EventId::new(),
            stream_id: StreamId::parse("Test-1").expect("valid stream"),
            stream_version: StreamVersion(1),
            global_position: GlobalPosition::from_seq(1),
            event_type: event_type.to_owned(),
            event_version,
            data: Payload::from_value(data).expect("a JSON value"),
            metadata: Metadata::default(),
            recorded_at: chrono::Utc::now(),
            stored_event_version: None,
            stored_event_type: None,
        }
    }

    /// Encodes `event`, checks what would be stored, and decodes it back.
    fn round_trip<E: DomainEvent + PartialEq + std::fmt::Debug>(
        event: &E,
        stored_type: &str,
        stored_data: Value,
    ) {
        let (event_type, version, data) = encode_event(event).expect("encodes");
        assert_eq!(event_type, stored_type);
        assert_eq!(data, stored_data, "payload of {stored_type}");
        let back: E = decode_event(&recorded(event_type, version, &data)).expect("decodes");
        assert_eq!(&back, event);
    }

    #[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
    struct Inner {
        n: u32,
    }

    #[derive(Clone, PartialEq, Debug, Serialize, Deserialize, crate::DomainEvent)]
    enum Shapes {
        Unit,
        Newtype(i64),
        NewtypeStruct(Inner),
        NewtypeOption(Option<String>),
        Tuple(i64, String),
        EmptyTuple(),
        Struct { a: i64, b: Option<String> },
        EmptyStruct {},
    }

    #[test]
    fn every_variant_shape_round_trips() {
        round_trip(&Shapes::Unit, "Unit", Value::Null);
        round_trip(&Shapes::Newtype(-7), "Newtype", json!(-7));
        round_trip(
            &Shapes::NewtypeStruct(Inner { n: 3 }),
            "NewtypeStruct",
            json!({ "n": 3 }),
        );
        round_trip(&Shapes::NewtypeOption(None), "NewtypeOption", Value::Null);
        round_trip(
            &Shapes::NewtypeOption(Some("x".into())),
            "NewtypeOption",
            json!("x"),
        );
        round_trip(&Shapes::Tuple(1, "two".into()), "Tuple", json!([1, "two"]));
        round_trip(&Shapes::EmptyTuple(), "EmptyTuple", json!([]));
        round_trip(
            &Shapes::Struct {
                a: 1,
                b: Some("b".into()),
            },
            "Struct",
            json!({ "a": 1, "b": "b" }),
        );
        round_trip(&Shapes::EmptyStruct {}, "EmptyStruct", json!({}));
    }

    #[test]
    fn unit_variant_payload_must_be_null() {
        // What `encode_event` writes for a unit variant reads back; a payload
        // with something in it is an error, not silently dropped.
        let stored = recorded("Unit", 1, &json!({ "was": "data" }));
        let err = decode_event::<Shapes>(&stored).expect_err("not a unit payload");
        assert!(
            matches!(&err, Error::Decode { event_type, .. } if event_type == "Unit"),
            "{err}"
        );
    }

    #[derive(Clone, PartialEq, Debug, Serialize, Deserialize, crate::DomainEvent)]
    #[serde(rename_all = "snake_case")]
    enum Renamed {
        AccountOpened {
            owner: String,
        },
        AccountClosed,
        MoneyIn(i64),
        #[serde(rename = "money-out.v1")]
        MoneyOut(i64, String),
        #[serde(rename = "Frozen", alias = "AccountFrozen")]
        #[event(version = 3)]
        Frozen {
            reason: String,
        },
    }

    #[test]
    fn renamed_variants_round_trip_under_their_serde_names() {
        round_trip(
            &Renamed::AccountOpened {
                owner: "ann".into(),
            },
            "account_opened",
            json!({ "owner": "ann" }),
        );
        round_trip(&Renamed::AccountClosed, "account_closed", Value::Null);
        round_trip(&Renamed::MoneyIn(5), "money_in", json!(5));
        round_trip(
            &Renamed::MoneyOut(6, "atm".into()),
            "money-out.v1",
            json!([6, "atm"]),
        );
        round_trip(
            &Renamed::Frozen {
                reason: "audit".into(),
            },
            "Frozen",
            json!({ "reason": "audit" }),
        );
    }

    #[test]
    fn derived_versions_and_aliases() {
        let frozen = Renamed::Frozen {
            reason: "audit".into(),
        };
        let (_, version, data) = encode_event(&frozen).expect("encodes");
        assert_eq!(version, 3);
        assert_eq!(Renamed::current_version("Frozen"), Some(3));
        assert_eq!(Renamed::current_version("AccountFrozen"), Some(3));
        assert_eq!(Renamed::current_version("money_in"), Some(1));
        assert_eq!(Renamed::current_version("MoneyIn"), None);
        // Events stored under the alias decode as the variant.
        let old: Renamed = decode_event(&recorded("AccountFrozen", 3, &data)).expect("decodes");
        assert_eq!(old, frozen);
        // The Rust name is not a stored name once renamed.
        let err = decode_event::<Renamed>(&recorded("AccountOpened", 1, &json!({"owner": "a"})))
            .expect_err("unknown type");
        assert!(matches!(err, Error::UnknownEventType { .. }), "{err}");
    }

    /// The defect this guards against: `rename_all` on the enum, names
    /// written by hand without it. The tag serde writes is `opened`, the
    /// impl says `Opened`; the payload used to be stored as `null`.
    #[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum HandWritten {
        Opened { owner: String },
        Closed,
    }

    impl DomainEvent for HandWritten {
        const EVENT_TYPES: &'static [&'static str] = &["Opened", "Closed"];

        fn event_type(&self) -> &'static str {
            match self {
                HandWritten::Opened { .. } => "Opened",
                HandWritten::Closed => "Closed",
            }
        }
    }

    fn encode_error<E: DomainEvent>(event: &E) -> String {
        match encode_event(event) {
            Err(err @ Error::Encode { .. }) => err.to_string(),
            Err(other) => panic!("expected Error::Encode, got {other}"),
            Ok((t, _, data)) => panic!("encoded as {t} with payload {data}"),
        }
    }

    #[test]
    fn tag_that_differs_from_event_type_is_an_encode_error_naming_both() {
        let msg = encode_error(&HandWritten::Opened {
            owner: "ann".into(),
        });
        assert!(
            msg.contains("\"opened\"") && msg.contains("\"Opened\""),
            "{msg}"
        );
        let msg = encode_error(&HandWritten::Closed);
        assert!(
            msg.contains("\"closed\"") && msg.contains("\"Closed\""),
            "{msg}"
        );
    }

    #[test]
    fn hand_written_defaults_for_versions() {
        assert_eq!(HandWritten::current_version("Opened"), Some(1));
        assert_eq!(HandWritten::current_version("opened"), None);
        assert_eq!(HandWritten::Closed.event_version(), 1);
    }

    /// An `event_type()` missing from `EVENT_TYPES` would be written and then
    /// refused by every read.
    #[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
    enum Unlisted {
        Listed,
        Forgotten,
    }

    impl DomainEvent for Unlisted {
        const EVENT_TYPES: &'static [&'static str] = &["Listed"];

        fn event_type(&self) -> &'static str {
            match self {
                Unlisted::Listed => "Listed",
                Unlisted::Forgotten => "Forgotten",
            }
        }
    }

    #[test]
    fn event_type_not_in_event_types_is_refused() {
        assert!(encode_event(&Unlisted::Listed).is_ok());
        let msg = encode_error(&Unlisted::Forgotten);
        assert!(
            msg.contains("\"Forgotten\"") && msg.contains("EVENT_TYPES"),
            "{msg}"
        );
    }

    /// Representations that are not a one-key object or a string: an
    /// internally tagged enum (two keys) and untagged ones (a number, null, an
    /// array). Only a hand-written impl can get here; the derive refuses them.
    #[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
    #[serde(tag = "type")]
    enum Internal {
        A { x: i32 },
    }

    impl DomainEvent for Internal {
        const EVENT_TYPES: &'static [&'static str] = &["A"];
        fn event_type(&self) -> &'static str {
            "A"
        }
    }

    #[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
    #[serde(untagged)]
    enum Untagged {
        Number(i64),
        Nothing(()),
        Pair(i64, i64),
    }

    impl DomainEvent for Untagged {
        const EVENT_TYPES: &'static [&'static str] = &["Number", "Nothing", "Pair"];
        fn event_type(&self) -> &'static str {
            match self {
                Untagged::Number(_) => "Number",
                Untagged::Nothing(_) => "Nothing",
                Untagged::Pair(..) => "Pair",
            }
        }
    }

    #[test]
    fn other_serialized_shapes_are_refused() {
        let msg = encode_error(&Internal::A { x: 1 });
        assert!(msg.contains("object with 2 keys"), "{msg}");
        assert!(encode_error(&Untagged::Number(1)).contains("as a number"));
        assert!(encode_error(&Untagged::Nothing(())).contains("as null"));
        assert!(encode_error(&Untagged::Pair(1, 2)).contains("as an array"));
    }

    #[test]
    fn bank_events_keep_their_stored_names() {
        use crate::bank::AccountEvent;
        assert_eq!(
            AccountEvent::EVENT_TYPES,
            ["Opened", "Deposited", "Withdrew"]
        );
        round_trip(
            &AccountEvent::Deposited { amount: 5 },
            "Deposited",
            json!({ "amount": 5 }),
        );
    }
}
