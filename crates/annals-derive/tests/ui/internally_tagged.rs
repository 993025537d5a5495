use annals::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[serde(tag = "type")]
enum AccountEvent {
    Opened { owner: String },
    Closed,
}

fn main() {}
