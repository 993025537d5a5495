//! The bench's event shapes, shared by the bench and its examples (which
//! include this file by path): the stream pattern of W1-W4, W4's fold, and
//! the raw SQLite baseline's decoding of a stored event.

use annals::bank::AccountEvent;
use serde::Deserialize;

/// Event `k` (1-based) of the stream pattern.
pub fn pattern_event(owner: &str, k: u64) -> AccountEvent {
    if k == 1 {
        AccountEvent::Opened {
            account: None,
            owner: owner.to_owned(),
            email: None,
        }
    } else if (k - 1) % 10 == 0 {
        AccountEvent::Withdrew { amount: 50 }
    } else {
        AccountEvent::Deposited { amount: 100 }
    }
}

/// W4's fold: an account's balance after one more event.
pub fn fold_balance(balance: &mut i64, event: &AccountEvent) {
    match event {
        AccountEvent::Opened { .. } => *balance = 0,
        AccountEvent::Deposited { amount } => *balance += amount,
        AccountEvent::Withdrew { amount } => *balance -= amount,
    }
}

#[derive(Deserialize)]
struct Owner {
    owner: String,
}

#[derive(Deserialize)]
struct Amount {
    amount: i64,
}

/// The raw SQLite baseline's decoding of a stored event's type and JSON
/// text into the typed event.
pub fn decode(event_type: &str, data: &str) -> anyhow::Result<AccountEvent> {
    Ok(match event_type {
        "Opened" => AccountEvent::Opened {
            account: None,
            owner: serde_json::from_str::<Owner>(data)?.owner,
            email: None,
        },
        "Deposited" => AccountEvent::Deposited {
            amount: serde_json::from_str::<Amount>(data)?.amount,
        },
        "Withdrew" => AccountEvent::Withdrew {
            amount: serde_json::from_str::<Amount>(data)?.amount,
        },
        t => anyhow::bail!("unknown event type {t}"),
    })
}
