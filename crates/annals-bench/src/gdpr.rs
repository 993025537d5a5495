//! The cost of personal-data encryption (`docs/benchmarks.md`, "Upcasting
//! and encryption"): W1's commands on an account whose `Opened` event
//! carries the owner's name as personal data, once on the store as it is
//! (the name stored in clear) and once through [`annals::GdprStore`] (the
//! name encrypted with the account's data key on append, decrypted on every
//! load), back to back on accounts of their own, in the same run.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use annals::gdpr::{Crypto, KeyStore, MasterKey};
use annals::{Aggregate, CommandContext, DomainEvent, EventStore, GdprStore, Repository};
use anyhow::ensure;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::workload::{account_id, owner, Latencies, W1};

/// W1's account with the owner's name as personal data of the account.
#[derive(Clone, Serialize, Deserialize, DomainEvent)]
pub enum MemberEvent {
    /// Opened, the name encrypted under the account's key.
    #[event(personal(subject = "account", fields("owner")))]
    Opened {
        /// The account id (the subject, in clear).
        account: String,
        /// The owner's name (personal).
        owner: String,
    },
    /// Money came in.
    Deposited {
        /// Minor units.
        amount: i64,
    },
}

/// The state W1's commands need.
#[derive(Default, Serialize, Deserialize)]
pub struct Member {
    owner: String,
    balance: i64,
}

impl Aggregate for Member {
    const TYPE: &'static str = "Member";
    type Event = MemberEvent;

    fn apply(&mut self, event: &MemberEvent) {
        match event {
            MemberEvent::Opened { owner, .. } => {
                self.owner.clone_from(owner);
                self.balance = 0;
            }
            MemberEvent::Deposited { amount } => self.balance += amount,
        }
    }
}

/// W1 (open phase, then D deposit rounds, each command a full replay) on
/// `accounts` accounts `PREFIX-…` of `store`, checking every balance and
/// that every owner's name reads back.
async fn w1<S: EventStore>(
    store: S,
    prefix: &str,
    accounts: u64,
    deposits: u64,
) -> anyhow::Result<W1> {
    let ctx = CommandContext::new();
    let repo = Repository::<Member, _>::new(store);
    let ids: Vec<(String, String)> = (1..=accounts)
        .map(|i| {
            let o = owner(prefix, i);
            (account_id(&o), o)
        })
        .collect();
    let t = Instant::now();
    for (id, o) in &ids {
        let event = MemberEvent::Opened {
            account: id.clone(),
            owner: o.clone(),
        };
        repo.create(id, &ctx, |_| Ok::<_, Infallible>(vec![event]))
            .await?;
    }
    let open_per_sec = accounts as f64 / t.elapsed().as_secs_f64().max(1e-9);
    let mut lat = Vec::with_capacity((accounts * deposits) as usize);
    let t = Instant::now();
    for _ in 0..deposits {
        for (id, _) in &ids {
            let c = Instant::now();
            repo.execute(id, &ctx, |_| {
                Ok::<_, Infallible>(vec![MemberEvent::Deposited { amount: 100 }])
            })
            .await?;
            lat.push(c.elapsed());
        }
    }
    let seconds = t.elapsed().as_secs_f64();
    for (id, o) in &ids {
        let loaded = repo.load(id).await?;
        ensure!(
            loaded.state.balance == deposits as i64 * 100 && &loaded.state.owner == o,
            "{prefix}: account {id} loaded wrong"
        );
    }
    Ok(W1 {
        commands: accounts * deposits,
        seconds,
        latency: Latencies(lat),
        open_per_sec,
    })
}

/// What the encryption runs measured.
#[derive(Clone, Debug, Default)]
pub struct GdprCost {
    /// Accounts per side.
    pub accounts: u64,
    /// W1 on the store as it is.
    pub plain: W1,
    /// W1 through `GdprStore`.
    pub encrypted: W1,
}

/// W1 plain (accounts `w1p-…`), then encrypted (accounts `w1g-…`, a fresh
/// master key for the run), on `store`, whose handle `raw` has no
/// upcasters.
pub async fn run<S>(store: &S, accounts: u64, deposits: u64) -> anyhow::Result<GdprCost>
where
    S: EventStore + KeyStore,
{
    ensure!(
        MemberEvent::personal_data("Opened").is_some(),
        "Opened declares no personal data"
    );
    let plain = w1(store.clone(), "w1p", accounts, deposits).await?;
    let crypto = Crypto::new::<MemberEvent>(store.clone(), Arc::new(MasterKey::generate()));
    let encrypted = w1(
        GdprStore::new(store.clone(), crypto),
        "w1g",
        accounts,
        deposits,
    )
    .await?;
    Ok(GdprCost {
        accounts,
        plain,
        encrypted,
    })
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn ratio(a: f64, b: f64) -> Value {
    if b > 0.0 {
        json!(round(a / b))
    } else {
        Value::Null
    }
}

impl GdprCost {
    /// The `gdpr` object of the result line.
    pub fn to_json(&self) -> Value {
        let (p, e) = (&self.plain, &self.encrypted);
        json!({
            "accounts": self.accounts,
            "commands": p.commands,
            "plain_commands_per_sec": round(p.commands_per_sec()),
            "encrypted_commands_per_sec": round(e.commands_per_sec()),
            "plain_open_per_sec": round(p.open_per_sec),
            "encrypted_open_per_sec": round(e.open_per_sec),
            "plain_command_latency": p.latency.to_json(),
            "encrypted_command_latency": e.latency.to_json(),
            "w1_ratio": ratio(e.commands_per_sec(), p.commands_per_sec()),
            "w1_open_ratio": ratio(e.open_per_sec, p.open_per_sec),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both runs verify, and the encrypted one stores no name in clear.
    #[tokio::test]
    async fn both_runs_verify_and_the_name_is_stored_encrypted() {
        let store = annals::InMemoryStore::new();
        let cost = run(&store, 3, 2).await.expect("runs");
        assert_eq!((cost.plain.commands, cost.encrypted.commands), (6, 6));
        let stored: Vec<annals::RecordedEvent> =
            futures::TryStreamExt::try_collect(store.read_all(annals::ReadAll::from_start()))
                .await
                .expect("read");
        let opened = |prefix: &str| {
            stored
                .iter()
                .find(|e| {
                    e.event_type == "Opened" && e.stream_id.id() == account_id(&owner(prefix, 1))
                })
                .map(|e| e.data.as_str().to_owned())
                .expect("opened")
        };
        assert!(opened("w1p").contains("w1p-000001"));
        let encrypted = opened("w1g");
        assert!(!encrypted.contains("w1g-000001"), "{encrypted}");
        assert!(encrypted.contains("$enc"), "{encrypted}");
    }
}
