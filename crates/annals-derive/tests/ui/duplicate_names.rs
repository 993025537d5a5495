use annals::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[serde(rename_all = "lowercase")]
enum ByRule {
    Opened,
    #[serde(rename = "opened")]
    Reopened,
}

#[derive(Serialize, Deserialize, DomainEvent)]
enum ByAlias {
    Opened,
    #[serde(alias = "Opened")]
    Created,
}

fn main() {}
