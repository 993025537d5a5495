//! W5 on plain rusqlite: one connection per thread (std threads, no async
//! runtime), WAL with `synchronous=FULL`, a busy timeout; a command reads
//! the stream outside any transaction, decides, then moves the stream's head
//! with a version-guarded `UPDATE` and inserts the event in one
//! `BEGIN IMMEDIATE` transaction. A guard that matches no row is a
//! conflict: roll back, wait [`backoff`], and run the command again.

use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use annals::bank::{Account, AccountEvent};
use anyhow::{bail, ensure, Context};
use rusqlite::{params, Connection, TransactionBehavior};

use super::{insert_events, load};
use crate::w5::{backoff, CaseResult, Plan, TaskOutcome, W5Args, RETRY, W5};
use crate::workload::account_id;

/// The busy timeout of every connection. SQLite's busy handler is not a
/// queue: a waiter sleeps (1 ms, growing to 100 ms) and tries again, so one
/// of several writers can wait for seconds while the others take the lock in
/// turn. This is longer than the Annals store's 5 s (which has one writing
/// connection) so that such a wait does not end the run; it changes nothing
/// else, since the sleeps between tries do not depend on it.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// A task's connection. WAL mode is a property of the file (set by the
/// setup connection); `synchronous` is per connection.
fn connect(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(path).with_context(|| format!("open {}", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

fn stream_of(plan: &Plan, index: u64) -> String {
    format!("Account-{}", account_id(&plan.owner(index)))
}

/// One command: load, decide, guarded save; retried after a conflict.
/// Returns the attempts it took.
#[allow(clippy::disallowed_methods)] // std::thread::sleep: a plain thread, no async runtime here
fn command(conn: &mut Connection, stream: &str) -> anyhow::Result<u32> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (state, version) = load(conn, stream, 0, Account::default())
            .with_context(|| format!("raw W5: loading {stream}"))?;
        ensure!(state.open, "raw W5: {stream} not open");
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .with_context(|| format!("raw W5: BEGIN IMMEDIATE for {stream}"))?;
        let moved = tx
            .prepare_cached(
                "UPDATE streams SET version = ?1 WHERE stream_id = ?2 AND version = ?3",
            )?
            .execute(params![version as i64 + 1, stream, version as i64])?;
        if moved == 1 {
            insert_events(
                &tx,
                stream,
                version + 1,
                &[AccountEvent::Deposited { amount: 100 }],
            )?;
            tx.commit()
                .with_context(|| format!("raw W5: commit on {stream}"))?;
            return Ok(attempt);
        }
        drop(tx); // rolls back
        if attempt >= RETRY.max_attempts {
            bail!("raw W5: {stream} still conflicting after {attempt} attempts");
        }
        std::thread::sleep(backoff(attempt - 1));
    }
}

/// Runs the W5 cases in plain SQL on a fresh file at `path`.
pub fn run(path: &Path, args: &W5Args) -> anyhow::Result<W5> {
    let started = Instant::now();
    let mut setup = connect(path)?;
    setup.pragma_update(None, "journal_mode", "WAL")?;
    setup.execute_batch(&annals_sqlite::SqliteEventStore::schema_sql())?;
    let mut w5 = W5 {
        commands: args.w5_commands,
        hot_accounts: args.w5_hot_accounts.max(1),
        ..Default::default()
    };
    for plan in args.plans() {
        // Setup (untimed): every account opened, in one transaction.
        let tx = setup.transaction()?;
        for i in 0..plan.accounts() {
            let owner = plan.owner(i);
            save_open(&tx, &stream_of(&plan, i), owner)?;
        }
        tx.commit()?;

        let start = Barrier::new(plan.case.tasks as usize + 1);
        let (seconds, outcomes) = std::thread::scope(|s| {
            let handles: Vec<_> = (0..plan.case.tasks)
                .map(|t| {
                    let start = &start;
                    s.spawn(move || -> anyhow::Result<TaskOutcome> {
                        let conn = connect(path);
                        start.wait();
                        let mut conn = conn?;
                        let n = plan.commands_of(t);
                        let mut out = TaskOutcome::default();
                        for k in 0..n {
                            let stream = stream_of(&plan, plan.account_of(t, k));
                            let c = Instant::now();
                            let attempts = command(&mut conn, &stream)?;
                            out.latencies.push(c.elapsed());
                            out.attempts.push(attempts);
                        }
                        Ok(out)
                    })
                })
                .collect();
            start.wait();
            let t0 = Instant::now();
            let outcomes: anyhow::Result<Vec<TaskOutcome>> = handles
                .into_iter()
                .map(|h| match h.join() {
                    Ok(r) => r,
                    Err(_) => bail!("raw W5: a thread panicked"),
                })
                .collect();
            (t0.elapsed().as_secs_f64(), outcomes)
        });
        let outcomes = outcomes?;

        let mut sum = 0i64;
        for i in 0..plan.accounts() {
            sum += load(&setup, &stream_of(&plan, i), 0, Account::default())?
                .0
                .balance;
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

/// Creates a stream with its `Opened` event inside the caller's transaction.
fn save_open(conn: &Connection, stream: &str, owner: String) -> anyhow::Result<()> {
    insert_events(
        conn,
        stream,
        1,
        &[AccountEvent::Opened {
            account: None,
            owner,
            email: None,
        }],
    )?;
    conn.prepare_cached(
        "INSERT INTO streams (stream_id, category, version) VALUES (?1, 'Account', 1)",
    )?
    .execute(params![stream])?;
    Ok(())
}
