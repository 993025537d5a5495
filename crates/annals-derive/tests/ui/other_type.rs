use annals::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
enum Wire {
    Opened,
}

impl From<Wire> for Into {
    fn from(_: Wire) -> Self {
        Into::Opened
    }
}

impl From<Into> for Wire {
    fn from(_: Into) -> Self {
        Wire::Opened
    }
}

#[derive(Clone, Serialize, Deserialize, DomainEvent)]
#[serde(into = "Wire", from = "Wire")]
enum Into {
    Opened,
}

// Deserialize only: serde refuses to serialize a variant identifier itself.
#[derive(Deserialize, DomainEvent)]
#[serde(variant_identifier)]
enum Identifier {
    Opened,
}

fn main() {}
