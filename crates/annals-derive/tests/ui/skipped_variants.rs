use annals::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
enum AccountEvent {
    Opened { owner: String },
    #[serde(skip)]
    Skipped,
    #[serde(skip_serializing)]
    NeverWritten(i64),
    #[serde(skip_deserializing)]
    NeverRead { amount: i64 },
}

fn main() {}
