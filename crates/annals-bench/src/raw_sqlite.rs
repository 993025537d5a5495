//! The raw SQLite baseline: the same inserts and reads as Annals makes, in
//! plain rusqlite on the same schema, with the same durability settings
//! (WAL, synchronous=FULL), single-threaded with no async runtime in the way.

pub(crate) mod w5;

use std::path::Path;
use std::time::Instant;

use annals::bank::{Account, AccountEvent};
use anyhow::{ensure, Context};
use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use crate::workload::{
    account_id, owner, pattern_balance, pattern_event, verify, Latencies, Results, Sizes,
    Throughput,
};

use crate::shapes::decode;

/// A typed event as this baseline stores it: type and JSON text.
pub fn encode(e: &AccountEvent) -> (&'static str, String) {
    match e {
        AccountEvent::Opened { owner, .. } => {
            ("Opened", serde_json::json!({ "owner": owner }).to_string())
        }
        AccountEvent::Deposited { amount } => (
            "Deposited",
            serde_json::json!({ "amount": amount }).to_string(),
        ),
        AccountEvent::Withdrew { amount } => (
            "Withdrew",
            serde_json::json!({ "amount": amount }).to_string(),
        ),
    }
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn apply(state: &mut Account, e: &AccountEvent) {
    use annals::Aggregate;
    state.apply(e);
}

fn insert_events(
    conn: &Connection,
    stream: &str,
    first_version: u64,
    events: &[AccountEvent],
) -> anyhow::Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO events (event_id, stream_id, category, stream_version, event_type, event_version, data, metadata, recorded_at) VALUES (?1, ?2, 'Account', ?3, ?4, 1, ?5, '{}', ?6)",
    )?;
    let at = now_micros();
    for (i, e) in events.iter().enumerate() {
        let (t, data) = encode(e);
        stmt.execute(params![
            Uuid::now_v7().as_bytes().as_slice(),
            stream,
            (first_version + i as u64) as i64,
            t,
            data,
            at
        ])?;
    }
    Ok(())
}

fn save(
    conn: &mut Connection,
    stream: &str,
    head: u64,
    events: &[AccountEvent],
) -> anyhow::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    insert_events(&tx, stream, head + 1, events)?;
    let new_head = (head + events.len() as u64) as i64;
    if head == 0 {
        tx.prepare_cached(
            "INSERT INTO streams (stream_id, category, version) VALUES (?1, 'Account', ?2)",
        )?
        .execute(params![stream, new_head])?;
    } else {
        let n = tx
            .prepare_cached(
                "UPDATE streams SET version = ?1 WHERE stream_id = ?2 AND version = ?3",
            )?
            .execute(params![new_head, stream, head as i64])?;
        ensure!(n == 1, "raw conflict on {stream}");
    }
    tx.commit()?;
    Ok(())
}

fn load(
    conn: &Connection,
    stream: &str,
    from: u64,
    mut state: Account,
) -> anyhow::Result<(Account, u64)> {
    let mut stmt = conn.prepare_cached(
        "SELECT stream_version, event_type, data FROM events WHERE stream_id = ?1 AND stream_version > ?2 ORDER BY stream_version",
    )?;
    let mut rows = stmt.query(params![stream, from as i64])?;
    let mut version = from;
    while let Some(row) = rows.next()? {
        let t: String = row.get(1)?;
        let d: String = row.get(2)?;
        apply(&mut state, &decode(&t, &d)?);
        version = row.get::<_, i64>(0)? as u64;
    }
    Ok((state, version))
}

/// Runs W1-W4 in plain SQL on a fresh file at `path`.
pub fn run(path: &Path, sz: &Sizes) -> anyhow::Result<Results> {
    let mut conn = Connection::open(path).with_context(|| format!("open {}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(&annals_sqlite::SqliteEventStore::schema_sql())?;
    let mut res = Results {
        w3_per_commit: sz.bulk_stream_len,
        w4_page: sz.feed_page,
        ..Default::default()
    };

    // W1.
    let streams: Vec<(String, String)> = (1..=sz.accounts)
        .map(|i| {
            let o = owner("w1", i);
            (format!("Account-{}", account_id(&o)), o)
        })
        .collect();
    let t = Instant::now();
    for (s, o) in &streams {
        save(
            &mut conn,
            s,
            0,
            &[AccountEvent::Opened {
                account: None,
                owner: o.clone(),
                email: None,
            }],
        )?;
    }
    res.w1.open_per_sec = sz.accounts as f64 / t.elapsed().as_secs_f64().max(1e-9);
    let mut lat = Vec::new();
    let t = Instant::now();
    for _ in 0..sz.deposits {
        for (s, _) in &streams {
            let c = Instant::now();
            let (state, version) = load(&conn, s, 0, Account::default())?;
            ensure!(state.open, "raw: account not open");
            save(
                &mut conn,
                s,
                version,
                &[AccountEvent::Deposited { amount: 100 }],
            )?;
            lat.push(c.elapsed());
        }
    }
    res.w1.seconds = t.elapsed().as_secs_f64();
    res.w1.commands = sz.accounts * sz.deposits;
    res.w1.latency = Latencies(lat);

    // W2.
    let o = owner("w2", 1);
    let s = format!("Account-{}", account_id(&o));
    let id = account_id(&o);
    let t = Instant::now();
    let mut state = Account::default();
    let mut k = 1;
    while k <= sz.long_stream {
        let end = (k + sz.snapshot_interval - 1).min(sz.long_stream);
        let batch: Vec<AccountEvent> = (k..=end).map(|j| pattern_event(&o, j)).collect();
        save(&mut conn, &s, k - 1, &batch)?;
        for e in &batch {
            apply(&mut state, e);
        }
        if end % sz.snapshot_interval == 0 {
            let tx = conn.transaction()?;
            tx.execute(
                "DELETE FROM snapshots WHERE aggregate_type = 'Account' AND aggregate_id = ?1",
                params![id],
            )?;
            tx.execute(
                "INSERT INTO snapshots (aggregate_type, aggregate_id, version, schema_version, state, created_at) VALUES ('Account', ?1, ?2, 1, ?3, ?4)",
                params![id, end as i64, serde_json::to_string(&state)?, now_micros()],
            )?;
            tx.commit()?;
        }
        k = end + 1;
    }
    res.w2.setup_seconds = t.elapsed().as_secs_f64();
    let want = pattern_balance(sz.long_stream);
    let mut no_snap = Vec::new();
    for i in 0..=sz.loads {
        let c = Instant::now();
        let (st, v) = load(&conn, &s, 0, Account::default())?;
        let d = c.elapsed();
        ensure!(
            v == sz.long_stream && st.balance == want,
            "raw W2 wrong state"
        );
        if i > 0 {
            no_snap.push(d);
        }
    }
    let mut with_snap = Vec::new();
    for i in 0..=sz.loads {
        let c = Instant::now();
        let snap: Option<(i64, String)> = conn
            .prepare_cached("SELECT version, state FROM snapshots WHERE aggregate_type = 'Account' AND aggregate_id = ?1 ORDER BY schema_version DESC, version DESC LIMIT 1")?
            .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let (from, base) = match snap {
            Some((v, st)) => (v as u64, serde_json::from_str::<Account>(&st)?),
            None => (0, Account::default()),
        };
        let (st, v) = load(&conn, &s, from, base)?;
        let d = c.elapsed();
        ensure!(
            v == sz.long_stream && st.balance == want,
            "raw W2 snapshot wrong state"
        );
        res.w2.snapshot_version = from;
        if i > 0 {
            with_snap.push(d);
        }
    }
    res.w2.no_snapshot = Latencies(no_snap);
    res.w2.snapshot = Latencies(with_snap);

    // W3.
    let n = sz.bulk_events / sz.bulk_stream_len;
    let t = Instant::now();
    for i in 1..=n {
        let o = owner("w3", i);
        let batch: Vec<AccountEvent> = (1..=sz.bulk_stream_len)
            .map(|k| pattern_event(&o, k))
            .collect();
        save(&mut conn, &format!("Account-{}", account_id(&o)), 0, &batch)?;
    }
    res.w3 = Throughput {
        events: n * sz.bulk_stream_len,
        seconds: t.elapsed().as_secs_f64(),
    };

    // W4.
    let t = Instant::now();
    let (events, balances) = crate::shapes::raw_w4(&conn, sz.feed_page as i64)?;
    res.w4 = Throughput {
        events,
        seconds: t.elapsed().as_secs_f64(),
    };
    verify(sz, events, balances.len() as u64, balances.values().sum())?;
    Ok(res)
}
