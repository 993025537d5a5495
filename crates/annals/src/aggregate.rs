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
/// or [`decode_event_owned`], which share one implementation.
pub fn decode_event<E: DomainEvent>(event: &RecordedEvent) -> Result<E> {
    decode_parts(event, event.data.clone())
}

/// Like [`decode_event`], consuming the event so its payload is not copied
/// (the fold of a stream owns each event it reads).
pub fn decode_event_owned<E: DomainEvent>(mut event: RecordedEvent) -> Result<E> {
    let data = std::mem::take(&mut event.data);
    decode_parts(&event, data)
}

fn decode_parts<E: DomainEvent>(event: &RecordedEvent, data: Value) -> Result<E> {
    if !E::EVENT_TYPES.contains(&event.event_type.as_str()) {
        return Err(Error::UnknownEventType {
            stream: event.stream_id.clone(),
            version: event.stream_version,
            event_type: event.event_type.clone(),
        });
    }
    let tagged = match data {
        Value::Null => Value::String(event.event_type.clone()),
        data => {
            let mut map = serde_json::Map::with_capacity(1);
            map.insert(event.event_type.clone(), data);
            Value::Object(map)
        }
    };
    serde_json::from_value(tagged).map_err(|source| Error::Decode {
        stream: event.stream_id.clone(),
        version: event.stream_version,
        event_type: event.event_type.clone(),
        event_version: event.event_version,
        source,
    })
}
