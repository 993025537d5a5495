//! W5 on plain tokio-postgres: T clients (one connection per task, as a pool
//! of T connections would give), prepared statements; a command reads the
//! stream, decides, then in one transaction moves the stream's head with a
//! version-guarded `UPDATE` (which waits for a concurrent writer of the same
//! row and then sees its version) and inserts the event. A guard that
//! matches no row is a conflict: roll back, wait [`backoff`], run again.

use std::time::Instant;

use annals::bank::{Account, AccountEvent};
use annals::Aggregate;
use anyhow::{bail, ensure, Context};
use tokio_postgres::types::Json;
use tokio_postgres::{Client, NoTls, Statement};
use uuid::Uuid;

use super::{decode, encode, Payload};
use crate::w5::{backoff, CaseResult, Plan, TaskOutcome, W5Args, RETRY, W5};
use crate::workload::account_id;

const LOAD: &str = "SELECT stream_version, event_type, data FROM events \
     WHERE stream_id = $1 ORDER BY stream_version";
const MOVE_HEAD: &str = "UPDATE streams SET version = $2, last_tx = pg_current_xact_id() \
     WHERE stream_id = $1 AND version = $3";
const INSERT: &str = "INSERT INTO events (event_id, stream_id, category, stream_version, \
     event_type, event_version, data, metadata) VALUES ($1, $2, 'Account', $3, $4, 1, $5, '{}')";

/// One task's connection and statements.
struct Conn {
    client: Client,
    load: Statement,
    move_head: Statement,
    insert: Statement,
}

async fn connect(url: &str, schema: &str) -> anyhow::Result<Conn> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .context("raw W5 connect")?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!("SET search_path TO \"{schema}\""))
        .await?;
    Ok(Conn {
        load: client.prepare(LOAD).await?,
        move_head: client.prepare(MOVE_HEAD).await?,
        insert: client.prepare(INSERT).await?,
        client,
    })
}

fn stream_of(plan: &Plan, index: u64) -> String {
    format!("Account-{}", account_id(&plan.owner(index)))
}

impl Conn {
    async fn load(&self, stream: &str) -> anyhow::Result<(Account, i64)> {
        let rows = self.client.query(&self.load, &[&stream]).await?;
        let mut state = Account::default();
        let mut version = 0;
        for r in rows {
            let t: &str = r.get(1);
            let Json(p): Json<Payload> = r.get(2);
            state.apply(&decode(t, p)?);
            version = r.get(0);
        }
        Ok((state, version))
    }

    /// One command: load, decide, guarded save; retried after a conflict.
    /// Returns the attempts it took.
    async fn command(&mut self, stream: &str) -> anyhow::Result<u32> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (state, version) = self.load(stream).await?;
            ensure!(state.open, "raw W5: {stream} not open");
            let (t, data) = encode(&AccountEvent::Deposited { amount: 100 });
            let tx = self.client.transaction().await?;
            let moved = tx
                .execute(&self.move_head, &[&stream, &(version + 1), &version])
                .await?;
            if moved == 1 {
                tx.execute(
                    &self.insert,
                    &[&Uuid::now_v7(), &stream, &(version + 1), &t, &data],
                )
                .await?;
                tx.commit().await?;
                return Ok(attempt);
            }
            tx.rollback().await?;
            if attempt >= RETRY.max_attempts {
                bail!("raw W5: {stream} still conflicting after {attempt} attempts");
            }
            tokio::time::sleep(backoff(attempt - 1)).await;
        }
    }
}

/// Runs the W5 cases in plain SQL in a fresh schema `schema`, created by
/// the backend's own migrations.
pub async fn run(url: &str, schema: &str, args: &W5Args) -> anyhow::Result<W5> {
    let started = Instant::now();
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
    let setup = connect(url, schema).await?;
    let open_streams = setup
        .client
        .prepare(
            "INSERT INTO streams (stream_id, category, version, last_tx) \
             SELECT s, 'Account', 1, pg_current_xact_id() FROM unnest($1::text[]) AS u(s)",
        )
        .await?;
    let open_events = setup
        .client
        .prepare(
            "INSERT INTO events (event_id, stream_id, category, stream_version, event_type, event_version, data, metadata) \
             SELECT i, s, 'Account', 1, 'Opened', 1, d, '{}' FROM unnest($1::uuid[], $2::text[], $3::jsonb[]) AS u(i, s, d)",
        )
        .await?;
    let mut w5 = W5 {
        commands: args.w5_commands,
        hot_accounts: args.w5_hot_accounts.max(1),
        ..Default::default()
    };
    for plan in args.plans() {
        // Setup (untimed): every account opened in one transaction, and one
        // connection per task.
        let streams: Vec<String> = (0..plan.accounts()).map(|i| stream_of(&plan, i)).collect();
        let ids: Vec<Uuid> = streams.iter().map(|_| Uuid::now_v7()).collect();
        let data: Vec<serde_json::Value> = (0..plan.accounts())
            .map(|i| {
                encode(&AccountEvent::Opened {
                    account: None,
                    owner: plan.owner(i),
                    email: None,
                })
                .1
            })
            .collect();
        setup.client.batch_execute("BEGIN").await?;
        setup.client.execute(&open_streams, &[&streams]).await?;
        setup
            .client
            .execute(&open_events, &[&ids, &streams, &data])
            .await?;
        setup.client.batch_execute("COMMIT").await?;
        let mut conns = Vec::with_capacity(plan.case.tasks as usize);
        for _ in 0..plan.case.tasks {
            conns.push(connect(url, schema).await?);
        }

        let t0 = Instant::now();
        let mut tasks = Vec::with_capacity(conns.len());
        for (t, mut conn) in (0..plan.case.tasks).zip(conns) {
            tasks.push(tokio::spawn(async move {
                let n = plan.commands_of(t);
                let mut out = TaskOutcome::default();
                for k in 0..n {
                    let stream = stream_of(&plan, plan.account_of(t, k));
                    let c = Instant::now();
                    let attempts = conn.command(&stream).await?;
                    out.latencies.push(c.elapsed());
                    out.attempts.push(attempts);
                }
                anyhow::Ok(out)
            }));
        }
        let mut outcomes = Vec::with_capacity(tasks.len());
        for h in tasks {
            outcomes.push(h.await??);
        }
        let seconds = t0.elapsed().as_secs_f64();

        let mut sum = 0i64;
        for s in &streams {
            sum += setup.load(s).await?.0.balance;
        }
        ensure!(
            sum == plan.commands as i64 * 100,
            "raw W5 {}: balances sum to {sum}, expected {}",
            plan.case.key,
            plan.commands * 100
        );
        w5.cases.push((
            plan.case.key,
            CaseResult::from_tasks(&plan, seconds, outcomes),
        ));
    }
    w5.total_seconds = started.elapsed().as_secs_f64();
    Ok(w5)
}
