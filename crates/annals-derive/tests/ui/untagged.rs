use annals::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[serde(untagged)]
enum AccountEvent {
    Opened { owner: String },
    Deposited(i64),
}

fn main() {}
