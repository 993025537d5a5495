use annals::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
enum BothSides {
    #[serde(rename(serialize = "opened", deserialize = "Opened"))]
    Opened { owner: String },
}

#[derive(Serialize, Deserialize, DomainEvent)]
enum OneSide {
    #[serde(rename(deserialize = "closed"))]
    Closed,
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[serde(rename_all(serialize = "snake_case", deserialize = "kebab-case"))]
enum Rules {
    // The same under both rules: accepted.
    Opened,
    // `money_in` and `money-in`.
    MoneyIn(i64),
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[serde(rename_all(serialize = "snake_case"))]
enum SerializeRuleOnly {
    AccountOpened,
}

fn main() {}
