use annals::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
enum NoSubject {
    #[event(personal(fields("name")))]
    Opened { owner_id: String, name: String },
}

#[derive(Serialize, Deserialize, DomainEvent)]
enum NoFields {
    #[event(personal(subject = "owner_id"))]
    Opened { owner_id: String, name: String },
}

#[derive(Serialize, Deserialize, DomainEvent)]
enum UnknownField {
    #[event(personal(subject = "owner_id", fields("nmae")))]
    Opened { owner_id: String, name: String },
}

#[derive(Serialize, Deserialize, DomainEvent)]
enum SubjectIsPersonal {
    #[event(personal(subject = "owner_id", fields("owner_id")))]
    Opened { owner_id: String, name: String },
}

#[derive(Serialize, Deserialize, DomainEvent)]
enum TupleVariant {
    #[event(personal(subject = "0", fields("1")))]
    Opened(String, String),
}

#[derive(Serialize, Deserialize, DomainEvent)]
enum UnknownKey {
    #[event(personal(subject = "owner_id", fields("name"), hashed = true))]
    Opened { owner_id: String, name: String },
}

fn main() {}
