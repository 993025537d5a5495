use annals::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
enum Zero {
    #[event(version = 0)]
    Opened,
}

#[derive(Serialize, Deserialize, DomainEvent)]
enum Negative {
    #[event(version = -1)]
    Opened,
}

#[derive(Serialize, Deserialize, DomainEvent)]
enum Twice {
    #[event(version = 2, version = 3)]
    Opened,
}

#[derive(Serialize, Deserialize, DomainEvent)]
enum UnknownKey {
    #[event(name = "opened")]
    Opened,
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(version = 2)]
enum OnTheEnum {
    Opened,
}

fn main() {}
