use annals::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
struct Opened {
    owner: String,
}

#[derive(DomainEvent)]
union Raw {
    n: u32,
}

fn main() {}
