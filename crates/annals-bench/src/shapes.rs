//! The bench's event shapes, shared by the bench and its examples (which
//! include this file by path): the stream pattern of W1-W4, W4's fold, and
//! the raw SQLite baseline's decoding of a stored event.

use std::collections::HashMap;

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

/// The raw SQLite baseline's W4: every event of `conn`'s `events` table in
/// pages of `page` (one keyset query each), decoded and folded into a map
/// of stream id to balance. Returns the events read and the map.
pub fn raw_w4(
    conn: &rusqlite::Connection,
    page: i64,
) -> anyhow::Result<(u64, HashMap<String, i64>)> {
    let mut balances: HashMap<String, i64> = HashMap::new();
    let mut after = 0i64;
    let mut events = 0u64;
    let mut stmt = conn.prepare_cached(
        "SELECT position, stream_id, event_type, data FROM events \
         WHERE position > ?1 ORDER BY position LIMIT ?2",
    )?;
    loop {
        let mut rows = stmt.query(rusqlite::params![after, page])?;
        let mut got = 0;
        while let Some(row) = rows.next()? {
            after = row.get(0)?;
            let stream: String = row.get(1)?;
            let t: String = row.get(2)?;
            let d: String = row.get(3)?;
            let b = balances.entry(stream).or_default();
            fold_balance(b, &decode(&t, &d)?);
            got += 1;
        }
        if got == 0 {
            break;
        }
        events += got;
    }
    Ok((events, balances))
}
