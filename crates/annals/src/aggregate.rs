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
/// The representation is serde's default (externally tagged) enum: the
/// variant name is the stored `event_type` and the variant's fields are the
/// stored `data`. List every variant name in [`DomainEvent::EVENT_TYPES`] so a
/// stored type the code does not know is reported, not mistaken for bad data.
pub trait DomainEvent: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The type names of all variants.
    const EVENT_TYPES: &'static [&'static str];

    /// This event's type name.
    fn event_type(&self) -> &'static str;

    /// The payload schema version written for this event (default 1).
    fn event_version(&self) -> u32 {
        1
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
pub fn encode_event<E: DomainEvent>(event: &E) -> Result<(&'static str, u32, Value)> {
    let event_type = event.event_type();
    let value = serde_json::to_value(event).map_err(|source| Error::Encode {
        what: format!("event {event_type}"),
        source,
    })?;
    let data = match value {
        // `{"Variant": {...}}`
        Value::Object(mut map) if map.len() == 1 => map.remove(event_type).unwrap_or(Value::Null),
        // A unit variant serializes as its name.
        Value::String(_) => Value::Null,
        other => other,
    };
    Ok((event_type, event.event_version(), data))
}

/// Decodes a recorded event into its typed form. Every read path of the
/// repository, the snapshot jobs and the tools goes through this function
/// It deserializes straight from
/// the stored payload, with the type name as the enum variant, copying
/// nothing.
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
        Ok(())
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
