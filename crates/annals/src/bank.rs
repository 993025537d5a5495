//! The bank `Account` of the standard workload: the example domain of the
//! demo, the benchmarks and the docs.
//!
//! # History
//!
//! The example has a stored history from older versions of itself, read
//! today through [`upcasters`] (Rust) or the equivalent plan [`PLAN`]
//! (`crates/annals/fixtures/bank-plan.toml`); golden events of each version
//! are in `crates/annals/fixtures/bank-history.jsonl`.
//!
//! | type | v1 | v2 | v3 |
//! |---|---|---|---|
//! | `Opened` | `{"name": "ann"}` | `{"owner": "ann"}` | `{"account": "7", "owner": "ann", "email": "ann@mail.example"}` (current) |
//! | `Deposited` | `{"amount": "12.50"}` (decimal string, major units) | `{"amount_minor": 1250}` | `{"amount": 1250}` (current) |
//! | `Withdrew` | stored as `Withdrawn`, `{"amount": "3.00"}` | `{"amount": 300}` (current) | |
//!
//! # Personal data
//!
//! `Opened` v3 carries the owner's name and e-mail as personal data of the
//! account (`#[event(personal(subject = "account", ...))]`): through a
//! [`GdprStore`](crate::GdprStore) they are stored encrypted with the
//! account's data key, and [`personal_snapshots`] encrypts the `Account`
//! snapshots with the same key. Events stored before v3 named no account
//! (`account` is `null` after upcasting) and were stored in clear.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{Aggregate, BoxError, DomainEvent, Step, UpcastError, Upcasters};

/// Events of an account. The stored type names (`Opened`, `Deposited`,
/// `Withdrew`) are the variant names, derived by `DomainEvent` from the same
/// attributes serde reads. Older versions are read through [`upcasters`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, DomainEvent)]
pub enum AccountEvent {
    /// The account was opened.
    #[event(version = 3, personal(subject = "account", fields("owner", "email")))]
    Opened {
        /// The account's id: the subject whose data key encrypts the
        /// owner's name and e-mail. `None` in events stored before v3.
        #[serde(default)]
        account: Option<String>,
        /// The owner's name (personal data).
        owner: String,
        /// The owner's e-mail (personal data); `None` before v3.
        #[serde(default)]
        email: Option<String>,
    },
    /// Money came in (minor units).
    #[event(version = 3)]
    Deposited {
        /// Amount in minor units.
        amount: i64,
    },
    /// Money went out (minor units).
    #[event(version = 2)]
    Withdrew {
        /// Amount in minor units.
        amount: i64,
    },
}

/// The plan equivalent to [`upcasters`], as shipped in
/// `crates/annals/fixtures/bank-plan.toml`.
pub const PLAN: &str = include_str!("../fixtures/bank-plan.toml");

/// The stored history of three accounts, one event a line as JSON
/// (`stream`, `event_type`, `event_version`, `data`), with events of every
/// version: the golden fixture the upcasters are tested on.
pub const HISTORY: &str = include_str!("../fixtures/bank-history.jsonl");

/// Minor units of a v1 amount: a decimal string in major units with at most
/// two decimals (`"12.50"`, `"3"`, `"0.7"`).
fn minor_units(amount: &Value) -> Result<i64, BoxError> {
    let text = amount
        .as_str()
        .ok_or_else(|| format!("amount {amount} is not a decimal string"))?;
    let bad = || format!("amount {text:?} is not a decimal with at most two decimals");
    let (units, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 2 || fraction.contains('.') {
        return Err(bad().into());
    }
    let units: i64 = units.parse().map_err(|_| bad())?;
    let fraction: i64 = format!("{fraction:0<2}").parse().map_err(|_| bad())?;
    units
        .checked_mul(100)
        .and_then(|u| u.checked_add(fraction))
        .ok_or_else(|| bad().into())
}

/// The Rust upcasters of the account's history (see the module docs),
/// validated against [`AccountEvent`]'s current versions.
pub fn upcasters() -> Result<Upcasters, UpcastError> {
    Upcasters::builder()
        .step(Step::new("Opened", 1, |v: Value| {
            Ok::<_, BoxError>(json!({ "owner": v["name"] }))
        }))
        .step(Step::new("Opened", 2, |v: Value| {
            Ok::<_, BoxError>(json!({ "account": null, "owner": v["owner"], "email": null }))
        }))
        .step(Step::new("Deposited", 1, |v: Value| {
            Ok::<_, BoxError>(json!({ "amount_minor": minor_units(&v["amount"])? }))
        }))
        .step(Step::new("Deposited", 2, |v: Value| {
            Ok::<_, BoxError>(json!({ "amount": v["amount_minor"] }))
        }))
        .step(
            Step::new("Withdrawn", 1, |v: Value| {
                Ok::<_, BoxError>(json!({ "amount": minor_units(&v["amount"])? }))
            })
            .rename_to("Withdrew"),
        )
        .build_for::<AccountEvent>()
}

/// The snapshot store for `Account`s holding personal data: `inner`
/// wrapped so that each account's snapshot is encrypted with the account's
/// data key (the subject of `Opened`).
pub fn personal_snapshots<N: crate::SnapshotStore, K: crate::KeyStore>(
    inner: N,
    crypto: crate::gdpr::Crypto<K>,
) -> crate::GdprSnapshots<N, K> {
    crate::GdprSnapshots::new(inner, crypto).aggregate(
        <Account as Aggregate>::TYPE,
        crate::gdpr::SnapshotSubject::AggregateId,
    )
}

/// Why an account command was refused.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum AccountError {
    /// `open` on an account that exists.
    #[error("account is already open")]
    AlreadyOpen,
    /// A command on an account that was never opened.
    #[error("account is not open")]
    NotOpen,
    /// A zero or negative amount.
    #[error("amount must be positive, got {0}")]
    InvalidAmount(i64),
    /// A withdrawal larger than the balance.
    #[error("insufficient funds: balance {balance}, requested {requested}")]
    InsufficientFunds {
        /// Current balance.
        balance: i64,
        /// Requested amount.
        requested: i64,
    },
}

/// The account state: `{ owner, email, balance, open }`.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Account {
    /// Owner's name; empty until opened.
    pub owner: String,
    /// Owner's e-mail (`None` for accounts opened before `Opened` v3).
    #[serde(default)]
    pub email: Option<String>,
    /// Balance in minor units.
    pub balance: i64,
    /// Whether `Opened` was applied.
    pub open: bool,
}

impl Aggregate for Account {
    const TYPE: &'static str = "Account";
    type Event = AccountEvent;

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { owner, email, .. } => {
                self.owner.clone_from(owner);
                self.email.clone_from(email);
                self.balance = 0;
                self.open = true;
            }
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrew { amount } => self.balance -= amount,
        }
    }
}

impl Account {
    /// Opens the account for `owner`, naming no account and no e-mail: the
    /// owner's name is stored in clear, and a [`GdprStore`](crate::GdprStore)
    /// refuses it (`GdprError::NoSubject`): use [`Account::open_for`] there.
    pub fn open(&self, owner: &str) -> Result<Vec<AccountEvent>, AccountError> {
        if self.open {
            return Err(AccountError::AlreadyOpen);
        }
        Ok(vec![AccountEvent::Opened {
            account: None,
            owner: owner.to_owned(),
            email: None,
        }])
    }

    /// Opens account `account` (its id, the subject of the personal data)
    /// for `owner` with `email`.
    pub fn open_for(
        &self,
        account: &str,
        owner: &str,
        email: &str,
    ) -> Result<Vec<AccountEvent>, AccountError> {
        if self.open {
            return Err(AccountError::AlreadyOpen);
        }
        Ok(vec![AccountEvent::Opened {
            account: Some(account.to_owned()),
            owner: owner.to_owned(),
            email: Some(email.to_owned()),
        }])
    }

    /// Deposits `amount`.
    pub fn deposit(&self, amount: i64) -> Result<Vec<AccountEvent>, AccountError> {
        if !self.open {
            return Err(AccountError::NotOpen);
        }
        if amount <= 0 {
            return Err(AccountError::InvalidAmount(amount));
        }
        Ok(vec![AccountEvent::Deposited { amount }])
    }

    /// Withdraws `amount`, refusing when the balance is too low.
    pub fn withdraw(&self, amount: i64) -> Result<Vec<AccountEvent>, AccountError> {
        if !self.open {
            return Err(AccountError::NotOpen);
        }
        if amount <= 0 {
            return Err(AccountError::InvalidAmount(amount));
        }
        if self.balance < amount {
            return Err(AccountError::InsufficientFunds {
                balance: self.balance,
                requested: amount,
            });
        }
        Ok(vec![AccountEvent::Withdrew { amount }])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{EventStore, ExpectedVersion, InMemoryStore, NewEvent, Repository, StreamId};

    /// The golden history, appended as stored by older versions.
    async fn stored_history() -> (InMemoryStore, Vec<String>) {
        let store = InMemoryStore::new();
        let mut ids = Vec::new();
        for line in HISTORY.lines() {
            let e: Value = serde_json::from_str(line).expect("fixture line");
            let stream = StreamId::parse(e["stream"].as_str().expect("stream")).expect("name");
            let id = stream.as_str()["Account-".len()..].to_owned();
            if !ids.contains(&id) {
                ids.push(id);
            }
            let event = NewEvent::new(e["event_type"].as_str().expect("type"), e["data"].clone())
                .with_event_version(e["event_version"].as_u64().expect("version") as u32);
            store
                .append(&stream, ExpectedVersion::Any, vec![event])
                .await
                .expect("append");
        }
        (store, ids)
    }

    async fn states(store: InMemoryStore, upcasters: Upcasters, ids: &[String]) -> Vec<Account> {
        let repo = Repository::<Account, _>::new(store.with_upcasters(Arc::new(upcasters)));
        let mut out = Vec::new();
        for id in ids {
            out.push(
                repo.load(id)
                    .await
                    .expect("loads at the current version")
                    .state,
            );
        }
        out
    }

    fn account(owner: &str, balance: i64) -> Account {
        Account {
            owner: owner.to_owned(),
            email: None,
            balance,
            open: true,
        }
    }

    #[tokio::test]
    async fn the_history_loads_through_the_rust_upcasters() {
        let (store, ids) = stored_history().await;
        let loaded = states(store.raw(), upcasters().expect("complete"), &ids).await;
        assert_eq!(
            loaded,
            [
                account("ann", 1250 + 29 - 300 + 1000 + 5),
                account("bob", 250_000 - 1 + 123_456_780),
                account("cy", 0),
            ]
        );
        // Without upcasters the old events do not decode.
        let raw = Repository::<Account, _>::new(store.raw());
        assert!(raw.load(&ids[0]).await.is_err());
    }

    #[cfg(feature = "plan")]
    #[tokio::test]
    async fn the_plan_and_the_rust_upcasters_agree() {
        let (store, ids) = stored_history().await;
        let plan = crate::Plan::parse("bank-plan.toml", PLAN)
            .expect("plan")
            .build_for::<AccountEvent>()
            .expect("complete");
        let by_plan = states(store.raw(), plan, &ids).await;
        let by_rust = states(store.raw(), upcasters().expect("complete"), &ids).await;
        assert_eq!(by_plan, by_rust);
        // Event by event too: the same payloads, types and versions.
        let rust = store
            .raw()
            .with_upcasters(Arc::new(upcasters().expect("complete")));
        let plan = store.raw().with_upcasters(Arc::new(
            crate::Plan::parse("bank-plan.toml", PLAN)
                .expect("plan")
                .build_for::<AccountEvent>()
                .expect("complete"),
        ));
        let a: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(
            rust.read_all(crate::ReadAll::from_start()),
        )
        .await
        .expect("read");
        let b: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(
            plan.read_all(crate::ReadAll::from_start()),
        )
        .await
        .expect("read");
        assert_eq!(a, b);
        assert_eq!(a.len(), HISTORY.lines().count());
    }

    #[test]
    fn v1_amounts_are_decimal_strings() {
        assert_eq!(minor_units(&json!("12.50")).ok(), Some(1250));
        assert_eq!(minor_units(&json!("0.7")).ok(), Some(70));
        assert_eq!(minor_units(&json!("3")).ok(), Some(300));
        for bad in [json!("1.234"), json!("x"), json!(5), json!("1.2.3")] {
            assert!(minor_units(&bad).is_err(), "{bad}");
        }
    }

    #[cfg(feature = "plan")]
    #[test]
    fn the_plan_refuses_what_the_rust_steps_refuse() {
        let plan = crate::Plan::parse("bank-plan.toml", PLAN)
            .expect("plan")
            .build_for::<AccountEvent>()
            .expect("complete");
        let rust = upcasters().expect("complete");
        for bad in ["1.234", "1.2.3"] {
            let e = crate::RecordedEvent {
                event_id: crate::EventId::new(),
                stream_id: StreamId::parse("Account-x").expect("stream"),
                stream_version: crate::StreamVersion(2),
                global_position: crate::GlobalPosition::from_seq(2),
                event_type: "Deposited".into(),
                event_version: 1,
                data: crate::Payload::from_value(&json!({ "amount": bad })).expect("payload"),
                metadata: crate::Metadata::default(),
                recorded_at: chrono::Utc::now(),
                stored_event_version: None,
                stored_event_type: None,
            };
            assert!(rust.apply(e.clone()).is_err(), "{bad}");
            assert!(plan.apply(e).is_err(), "{bad}");
        }
    }
}
