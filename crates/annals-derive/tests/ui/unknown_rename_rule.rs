use annals::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[serde(rename_all = "Snake_Case")]
enum AccountEvent {
    Opened,
}

fn main() {}
