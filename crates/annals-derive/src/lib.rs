//! `#[derive(DomainEvent)]` for Annals. Use it through `annals`, which
//! re-exports it as `annals::DomainEvent` (the derive and the trait share the
//! name, as serde's do).
//!
//! The store keeps an event's type name apart from its payload. With serde's
//! default, externally tagged enum representation the two are the variant's
//! name and the variant's content, so the type names are a fact of the enum's
//! serde attributes. This derive reads them from the same attributes serde
//! reads, so that the names in `DomainEvent::EVENT_TYPES` and
//! `event_type()` cannot drift from the tags serde writes.
//!
//! See the documentation of the derive for the attributes it reads.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod case;
mod expand;

use proc_macro::TokenStream;

/// Derives `annals::DomainEvent` for an externally tagged serde enum.
///
/// Each variant is one event type. Its type name is the tag serde writes for
/// it: the variant's name, changed by the enum's `#[serde(rename_all = "..")]`
/// (every serde rule: `lowercase`, `UPPERCASE`, `PascalCase`, `camelCase`,
/// `snake_case`, `SCREAMING_SNAKE_CASE`, `kebab-case`,
/// `SCREAMING-KEBAB-CASE`) or replaced by the variant's
/// `#[serde(rename = "..")]`. The derive generates:
///
/// - `EVENT_TYPES`: each variant's type name in declaration order, then the
///   names of its `#[serde(alias = "..")]`es (serde reads an alias as the
///   variant, so events stored under an old name still decode);
/// - `event_type()`: the type name of a value's variant;
/// - `event_version()` and `current_version(name)`: the payload schema
///   version each type is written with, 1 unless the variant says otherwise
///   with `#[event(version = N)]` (an alias has its variant's version).
///
/// ```
/// use annals::DomainEvent;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, DomainEvent)]
/// #[serde(rename_all = "snake_case")]
/// enum OrderEvent {
///     Placed { items: u32 },
///     #[event(version = 2)]
///     Shipped { carrier: String },
///     #[serde(rename = "cancelled", alias = "Canceled")]
///     Cancelled,
/// }
///
/// assert_eq!(OrderEvent::EVENT_TYPES, ["placed", "shipped", "cancelled", "Canceled"]);
/// assert_eq!(OrderEvent::Placed { items: 3 }.event_type(), "placed");
/// assert_eq!(OrderEvent::Shipped { carrier: "post".into() }.event_version(), 2);
/// assert_eq!(OrderEvent::current_version("shipped"), Some(2));
/// assert_eq!(OrderEvent::current_version("Canceled"), Some(1));
/// assert_eq!(OrderEvent::current_version("refunded"), None);
/// ```
///
/// # What is refused, at compile time
///
/// Only the externally tagged representation puts the type name where the
/// store keeps it, so these are errors that say why:
///
/// - anything but an enum;
/// - `#[serde(tag = "..")]` (internally tagged), `#[serde(tag = "..", content
///   = "..")]` (adjacently tagged), `#[serde(untagged)]` on the enum or on a
///   variant;
/// - `#[serde(into | from | try_from = "..")]`, which serialize or read the
///   enum as another type, and `#[serde(variant_identifier |
///   field_identifier)]`;
/// - a variant whose serialized and deserialized names differ
///   (`rename(serialize = "a", deserialize = "b")`, or a `rename_all` with
///   different rules): the store has one name per event. Rename it to one
///   name and keep the other readable with `alias`;
/// - two variants with the same name (or alias);
/// - `#[serde(skip)]`, `skip_serializing` and `skip_deserializing` on a
///   variant (it could not be written, or what is written could not be read
///   back), and `#[serde(other)]` (it would read every unknown type as one
///   variant; `annals` reports an unknown type as `Error::UnknownEventType`);
/// - `#[event(version = 0)]` and unknown `#[event]` keys.
///
/// ```compile_fail
/// #[derive(serde::Serialize, serde::Deserialize, annals::DomainEvent)]
/// #[serde(tag = "type")]
/// enum Internally {
///     Opened { owner: String },
/// }
/// ```
///
/// A generic enum's impl is bounded by what the trait needs (`Serialize`,
/// `DeserializeOwned`, `Send`, `Sync`, `'static`), named through the crate
/// `serde`; no bounds need to be written on the enum.
///
/// # Crate path
///
/// The generated impl names `::annals::DomainEvent`. An application that
/// renamed the dependency says where it is with `#[event(crate =
/// "path::to::annals")]` on the enum.
#[proc_macro_derive(DomainEvent, attributes(event))]
pub fn derive_domain_event(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    expand::derive(&input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}
