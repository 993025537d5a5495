//! The raw PostgreSQL baseline: the same inserts and reads as Annals makes,
//! in plain SQL with tokio-postgres on the same schema (created by the
//! backend's own migrations in a separate, fresh schema), one connection,
//! prepared statements, no pool and no library in between.

pub(crate) mod w5;

use std::collections::HashMap;
use std::time::Instant;

use annals::bank::{Account, AccountEvent};
use annals::Aggregate;
use anyhow::{ensure, Context};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_postgres::types::Json;
use tokio_postgres::{Client, NoTls, Statement};
use uuid::Uuid;

use crate::workload::{
    account_id, fold_balance, owner, pattern_balance, pattern_event, verify, Latencies, Results,
    Sizes, Throughput,
};

#[derive(Deserialize)]
struct Payload {
    owner: Option<String>,
    amount: Option<i64>,
}

fn decode(event_type: &str, p: Payload) -> anyhow::Result<AccountEvent> {
    Ok(match (event_type, p) {
        (
            "Opened",
            Payload {
                owner: Some(owner), ..
            },
        ) => AccountEvent::Opened {
            account: None,
            owner,
            email: None,
        },
        (
            "Deposited",
            Payload {
                amount: Some(amount),
                ..
            },
        ) => AccountEvent::Deposited { amount },
        (
            "Withdrew",
            Payload {
                amount: Some(amount),
                ..
            },
        ) => AccountEvent::Withdrew { amount },
        (t, _) => anyhow::bail!("raw: bad event {t}"),
    })
}

/// A typed event as this baseline stores it: type and JSON.
pub fn encode(e: &AccountEvent) -> (&'static str, Value) {
    match e {
        AccountEvent::Opened { owner, .. } => ("Opened", json!({ "owner": owner })),
        AccountEvent::Deposited { amount } => ("Deposited", json!({ "amount": amount })),
        AccountEvent::Withdrew { amount } => ("Withdrew", json!({ "amount": amount })),
    }
}

struct Raw {
    client: Client,
    load: Statement,
    insert: Statement,
    insert_stream: Statement,
    update_stream: Statement,
}

impl Raw {
    async fn load(
        &self,
        stream: &str,
        from: i64,
        mut state: Account,
    ) -> anyhow::Result<(Account, u64)> {
        let rows = self.client.query(&self.load, &[&stream, &from]).await?;
        let mut version = from as u64;
        for r in rows {
            let t: &str = r.get(1);
            let Json(p): Json<Payload> = r.get(2);
            state.apply(&decode(t, p)?);
            version = r.get::<_, i64>(0) as u64;
        }
        Ok((state, version))
    }

    async fn save(
        &mut self,
        stream: &str,
        head: u64,
        events: &[AccountEvent],
    ) -> anyhow::Result<()> {
        let n = events.len();
        let mut ids = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut data = Vec::with_capacity(n);
        for (i, e) in events.iter().enumerate() {
            let (t, d) = encode(e);
            ids.push(Uuid::now_v7());
            versions.push(head as i64 + 1 + i as i64);
            types.push(t);
            data.push(d);
        }
        let tx = self.client.transaction().await?;
        tx.execute(&self.insert, &[&stream, &ids, &versions, &types, &data])
            .await?;
        let new_head = head as i64 + n as i64;
        if head == 0 {
            tx.execute(&self.insert_stream, &[&stream, &new_head])
                .await?;
        } else {
            let changed = tx
                .execute(&self.update_stream, &[&stream, &new_head, &(head as i64)])
                .await?;
            ensure!(changed == 1, "raw conflict on {stream}");
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Runs W1-W4 in plain SQL in a fresh schema `schema`.
pub async fn run(url: &str, schema: &str, sz: &Sizes) -> anyhow::Result<Results> {
    // The same tables, created by the backend's migrations.
    let store = annals_postgres::PgEventStore::connect_with(
        url,
        annals_postgres::PgOptions {
            schema: Some(schema.to_owned()),
            ..Default::default()
        },
    )
    .await?;
    store.migrate().await?;
    drop(store);
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .context("raw connect")?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!("SET search_path TO \"{schema}\""))
        .await?;
    let load = client
        .prepare("SELECT stream_version, event_type, data FROM events WHERE stream_id = $1 AND stream_version > $2 ORDER BY stream_version")
        .await?;
    let insert = client
        .prepare(
            "INSERT INTO events (event_id, stream_id, category, stream_version, event_type, event_version, data, metadata) \
             SELECT i, $1, 'Account', v, t, 1, d, '{}' FROM unnest($2::uuid[], $3::bigint[], $4::text[], $5::jsonb[]) AS u(i, v, t, d)",
        )
        .await?;
    let insert_stream = client
        .prepare("INSERT INTO streams (stream_id, category, version, last_tx) VALUES ($1, 'Account', $2, pg_current_xact_id())")
        .await?;
    let update_stream = client
        .prepare("UPDATE streams SET version = $2, last_tx = pg_current_xact_id() WHERE stream_id = $1 AND version = $3")
        .await?;
    let mut raw = Raw {
        client,
        load,
        insert,
        insert_stream,
        update_stream,
    };
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
        raw.save(
            s,
            0,
            &[AccountEvent::Opened {
                account: None,
                owner: o.clone(),
                email: None,
            }],
        )
        .await?;
    }
    res.w1.open_per_sec = sz.accounts as f64 / t.elapsed().as_secs_f64().max(1e-9);
    let mut lat = Vec::new();
    let t = Instant::now();
    for _ in 0..sz.deposits {
        for (s, _) in &streams {
            let c = Instant::now();
            let (state, version) = raw.load(s, 0, Account::default()).await?;
            ensure!(state.open, "raw: account not open");
            raw.save(s, version, &[AccountEvent::Deposited { amount: 100 }])
                .await?;
            lat.push(c.elapsed());
        }
    }
    res.w1.seconds = t.elapsed().as_secs_f64();
    res.w1.commands = sz.accounts * sz.deposits;
    res.w1.latency = Latencies(lat);

    // W2.
    let o = owner("w2", 1);
    let id = account_id(&o);
    let s = format!("Account-{id}");
    let t = Instant::now();
    let mut state = Account::default();
    let mut k = 1;
    while k <= sz.long_stream {
        let end = (k + sz.snapshot_interval - 1).min(sz.long_stream);
        let batch: Vec<AccountEvent> = (k..=end).map(|j| pattern_event(&o, j)).collect();
        raw.save(&s, k - 1, &batch).await?;
        for e in &batch {
            state.apply(e);
        }
        if end % sz.snapshot_interval == 0 {
            let tx = raw.client.transaction().await?;
            tx.execute(
                "DELETE FROM snapshots WHERE aggregate_type = 'Account' AND aggregate_id = $1",
                &[&id],
            )
            .await?;
            tx.execute(
                "INSERT INTO snapshots (aggregate_type, aggregate_id, version, schema_version, state, created_at) VALUES ('Account', $1, $2, 1, $3, now())",
                &[&id, &(end as i64), &serde_json::to_value(&state)?],
            )
            .await?;
            tx.commit().await?;
        }
        k = end + 1;
    }
    res.w2.setup_seconds = t.elapsed().as_secs_f64();
    let want = pattern_balance(sz.long_stream);
    let snap_stmt = raw
        .client
        .prepare("SELECT version, state FROM snapshots WHERE aggregate_type = 'Account' AND aggregate_id = $1 ORDER BY schema_version DESC, version DESC LIMIT 1")
        .await?;
    let mut no_snap = Vec::new();
    for i in 0..=sz.loads {
        let c = Instant::now();
        let (st, v) = raw.load(&s, 0, Account::default()).await?;
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
        let row = raw.client.query_opt(&snap_stmt, &[&id]).await?;
        let (from, base) = match row {
            Some(r) => {
                let Json(a): Json<Account> = r.get(1);
                (r.get::<_, i64>(0), a)
            }
            None => (0, Account::default()),
        };
        let (st, v) = raw.load(&s, from, base).await?;
        let d = c.elapsed();
        ensure!(
            v == sz.long_stream && st.balance == want,
            "raw W2 snapshot wrong state"
        );
        res.w2.snapshot_version = from as u64;
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
        raw.save(&format!("Account-{}", account_id(&o)), 0, &batch)
            .await?;
    }
    res.w3 = Throughput {
        events: n * sz.bulk_stream_len,
        seconds: t.elapsed().as_secs_f64(),
    };

    raw.client.batch_execute("ANALYZE events").await?;
    // W4: global order by (tx_id, seq) below the horizon, as the schema defines it.
    let page = raw
        .client
        .prepare(
            // Qualified names: a bare `ORDER BY tx_id` would name the
            // output column (the bigint cast) and defeat the index.
            "SELECT e.tx_id::text::bigint, e.seq, e.stream_id, e.event_type, e.data FROM events e \
             WHERE (e.tx_id, e.seq) > ($1::bigint::text::xid8, $2) AND e.tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
             ORDER BY e.tx_id, e.seq LIMIT $3",
        )
        .await?;
    let t = Instant::now();
    let mut balances: HashMap<String, i64> = HashMap::new();
    let (mut after_tx, mut after_seq) = (0i64, 0i64);
    let mut events = 0u64;
    loop {
        let rows = raw
            .client
            .query(&page, &[&after_tx, &after_seq, &(sz.feed_page as i64)])
            .await?;
        if rows.is_empty() {
            break;
        }
        for r in &rows {
            after_tx = r.get(0);
            after_seq = r.get(1);
            let stream: String = r.get(2);
            let t: &str = r.get(3);
            let Json(p): Json<Payload> = r.get(4);
            let b = balances.entry(stream).or_default();
            fold_balance(b, &decode(t, p)?);
        }
        events += rows.len() as u64;
    }
    res.w4 = Throughput {
        events,
        seconds: t.elapsed().as_secs_f64(),
    };
    verify(sz, events, balances.len() as u64, balances.values().sum())?;
    Ok(res)
}

/// Refreshes the planner statistics of a schema's events table.
pub async fn analyze(url: &str, schema: &str) -> anyhow::Result<()> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    let h = tokio::spawn(conn);
    client
        .batch_execute(&format!("ANALYZE \"{schema}\".events"))
        .await?;
    drop(client);
    let _ = h.await;
    Ok(())
}

/// Drops a bench schema.
pub async fn drop_schema(url: &str, schema: &str) -> anyhow::Result<()> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    let h = tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await?;
    drop(client);
    let _ = h.await;
    Ok(())
}
