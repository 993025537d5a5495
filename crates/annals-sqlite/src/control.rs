//! [`annals::ProjectionControl`] on SQLite: projection locks and dead
//! letters in the store's file.
//!
//! The lock is a lease row in `projection_locks`, taken in one writer job
//! (`BEGIN IMMEDIATE`, so no other process writes meanwhile): read the row,
//! and if there is none or it has expired, write this owner's row with its
//! token and expiry; otherwise report the holder. Renewals and the release
//! name the token, so a runner whose lease expired and was taken over
//! cannot renew it or delete the new holder's row. Times are this machine's
//! clock in microseconds (every process using the file runs on it).

use std::time::Duration;

use annals::{DeadLetter, EventId, GlobalPosition, LockAttempt, ProjectionLock, Result, StreamId};
use rusqlite::{OptionalExtension, TransactionBehavior};

use crate::codec::{corrupt_row, from_micros, now_micros, sql_int, to_micros};
use crate::error::db;
use crate::SqliteEventStore;

fn micros(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX / 2)
}

fn lock_row(checkpoint: &str, row: (String, String, i64)) -> Result<ProjectionLock> {
    let (owner, token, expires) = row;
    let expires_at = from_micros(expires).ok_or_else(|| {
        corrupt_row(format!(
            "projection lock {checkpoint:?}: expiry {expires} is out of range"
        ))
    })?;
    Ok(ProjectionLock {
        checkpoint: checkpoint.to_owned(),
        owner,
        token,
        expires_at,
    })
}

const HOLDER_SQL: &str = "SELECT owner, token, expires_at FROM projection_locks WHERE name = ?1";

impl annals::ProjectionControl for SqliteEventStore {
    /// SQLite keeps no partition leases: one process runs all partitions
    /// under the projection lock (`PartitionedRunner::spawn_local`).
    async fn live_partition_workers(&self, _group: &str) -> Result<u32> {
        Ok(0)
    }

    async fn acquire_projection_lock(
        &self,
        checkpoint: &str,
        owner: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<LockAttempt> {
        let (name, owner, token) = (checkpoint.to_owned(), owner.to_owned(), token.to_owned());
        self.conns()
            .write(move |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db("taking a projection lock"))?;
                let now = now_micros();
                let held: Option<(String, String, i64)> = tx
                    .prepare_cached(HOLDER_SQL)
                    .and_then(|mut s| {
                        s.query_row([&name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                            .optional()
                    })
                    .map_err(db("reading a projection lock"))?;
                if let Some(row) = held {
                    if row.2 > now {
                        return Ok(LockAttempt::Held(lock_row(&name, row)?));
                    }
                }
                let expires = now.saturating_add(micros(ttl));
                tx.prepare_cached(
                    "INSERT INTO projection_locks (name, owner, token, expires_at) \
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (name) DO UPDATE SET \
                     owner = excluded.owner, token = excluded.token, \
                     expires_at = excluded.expires_at",
                )
                .and_then(|mut s| s.execute(rusqlite::params![name, owner, token, expires]))
                .map_err(db("taking a projection lock"))?;
                tx.commit().map_err(db("taking a projection lock"))?;
                Ok(LockAttempt::Acquired(lock_row(
                    &name,
                    (owner, token, expires),
                )?))
            })
            .await
    }

    async fn renew_projection_lock(
        &self,
        lock: &ProjectionLock,
        ttl: Duration,
    ) -> Result<Option<ProjectionLock>> {
        let lock = lock.clone();
        self.conns()
            .write(move |conn| {
                let expires = now_micros().saturating_add(micros(ttl));
                let n = conn
                    .prepare_cached(
                        "UPDATE projection_locks SET expires_at = ?3 \
                         WHERE name = ?1 AND token = ?2",
                    )
                    .and_then(|mut s| {
                        s.execute(rusqlite::params![lock.checkpoint, lock.token, expires])
                    })
                    .map_err(db("renewing a projection lock"))?;
                if n == 0 {
                    return Ok(None);
                }
                Ok(Some(lock_row(
                    &lock.checkpoint,
                    (lock.owner.clone(), lock.token.clone(), expires),
                )?))
            })
            .await
    }

    async fn release_projection_lock(&self, lock: &ProjectionLock) -> Result<()> {
        let (name, token) = (lock.checkpoint.clone(), lock.token.clone());
        self.conns()
            .write(move |conn| {
                conn.prepare_cached("DELETE FROM projection_locks WHERE name = ?1 AND token = ?2")
                    .and_then(|mut s| s.execute([name, token]))
                    .map(drop)
                    .map_err(db("releasing a projection lock"))
            })
            .await
    }

    async fn save_checkpoint_fenced(
        &self,
        name: &str,
        position: GlobalPosition,
        fence: &annals::Fence,
    ) -> Result<()> {
        let commit = crate::checkpoint::part(position, position.commit())?;
        let seq = crate::checkpoint::part(position, position.seq())?;
        let name = name.to_owned();
        self.fenced_write(fence, "saving a fenced checkpoint", move |tx| {
            tx.prepare_cached(crate::checkpoint::SAVE_SQL)
                .and_then(|mut s| s.execute(rusqlite::params![name, commit, seq, now_micros()]))
                .map(drop)
        })
        .await
    }

    async fn reset_checkpoint_fenced(&self, name: &str, fence: &annals::Fence) -> Result<()> {
        let name = name.to_owned();
        self.fenced_write(fence, "resetting a fenced checkpoint", move |tx| {
            tx.prepare_cached("DELETE FROM checkpoints WHERE name = ?1")
                .and_then(|mut s| s.execute([&name]))?;
            tx.prepare_cached("DELETE FROM dead_letters WHERE name = ?1")
                .and_then(|mut s| s.execute([&name]))
                .map(drop)
        })
        .await
    }

    async fn projection_lock(&self, checkpoint: &str) -> Result<Option<ProjectionLock>> {
        let name = checkpoint.to_owned();
        self.conns()
            .read(move |conn| {
                let held: Option<(String, String, i64)> = conn
                    .prepare_cached(HOLDER_SQL)
                    .and_then(|mut s| {
                        s.query_row([&name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                            .optional()
                    })
                    .map_err(db("reading a projection lock"))?;
                held.map(|row| lock_row(&name, row)).transpose()
            })
            .await
    }

    async fn park_event(&self, letter: &DeadLetter) -> Result<()> {
        let l = letter.clone();
        self.conns()
            .write(move |conn| {
                conn.prepare_cached(
                    "INSERT INTO dead_letters (name, position_commit, position, event_id, \
                     stream_id, event_type, error, attempts, parked_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                     ON CONFLICT (name, position_commit, position) DO UPDATE SET \
                     error = excluded.error, attempts = excluded.attempts, \
                     parked_at = excluded.parked_at",
                )
                .and_then(|mut s| {
                    s.execute(rusqlite::params![
                        l.checkpoint,
                        sql_int(l.position.commit()),
                        sql_int(l.position.seq()),
                        l.event_id.0.to_string(),
                        l.stream.as_str(),
                        l.event_type,
                        l.error,
                        l.attempts,
                        to_micros(l.parked_at),
                    ])
                })
                .map(drop)
                .map_err(db("parking an event"))
            })
            .await
    }

    async fn dead_letters(&self, checkpoint: &str) -> Result<Vec<DeadLetter>> {
        let name = checkpoint.to_owned();
        self.conns()
            .read(move |conn| {
                let mut stmt = conn
                    .prepare_cached(
                        "SELECT position_commit, position, event_id, stream_id, event_type, \
                         error, attempts, parked_at FROM dead_letters WHERE name = ?1 \
                         ORDER BY position_commit, position",
                    )
                    .map_err(db("listing dead letters"))?;
                let rows = stmt
                    .query_map([&name], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, String>(4)?,
                            r.get::<_, String>(5)?,
                            r.get::<_, u32>(6)?,
                            r.get::<_, i64>(7)?,
                        ))
                    })
                    .map_err(db("listing dead letters"))?;
                let mut all = Vec::new();
                for row in rows {
                    let (commit, seq, id, stream, event_type, error, attempts, at) =
                        row.map_err(db("listing dead letters"))?;
                    let bad = |what: &str| {
                        corrupt_row(format!(
                            "dead letter of {name:?} at ({commit}, {seq}): bad {what}"
                        ))
                    };
                    let position = match (u64::try_from(commit), u64::try_from(seq)) {
                        (Ok(c), Ok(s)) => GlobalPosition::new(c, s),
                        _ => return Err(bad("position")),
                    };
                    all.push(DeadLetter {
                        checkpoint: name.clone(),
                        position,
                        event_id: EventId(uuid::Uuid::parse_str(&id).map_err(|_| bad("event id"))?),
                        stream: StreamId::parse(&stream).map_err(|_| bad("stream id"))?,
                        event_type,
                        error,
                        attempts,
                        parked_at: from_micros(at).ok_or_else(|| bad("time"))?,
                    });
                }
                Ok(all)
            })
            .await
    }

    async fn drop_dead_letter(&self, checkpoint: &str, event_id: EventId) -> Result<bool> {
        let (name, id) = (checkpoint.to_owned(), event_id.0.to_string());
        self.conns()
            .write(move |conn| {
                conn.prepare_cached("DELETE FROM dead_letters WHERE name = ?1 AND event_id = ?2")
                    .and_then(|mut s| s.execute([name, id]))
                    .map(|n| n > 0)
                    .map_err(db("dropping a dead letter"))
            })
            .await
    }
}

impl SqliteEventStore {
    /// Runs `write` in one writer transaction after checking that the
    /// projection lock still carries `fence`'s token; fails with
    /// [`annals::Error::Fenced`], writing nothing, otherwise. One writer job:
    /// the writer lock orders the check and the write with any takeover of
    /// the lock, which is a write too.
    async fn fenced_write(
        &self,
        fence: &annals::Fence,
        what: &'static str,
        write: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<()> + Send + 'static,
    ) -> Result<()> {
        let annals::Fence::Lock { lock, token, .. } = fence else {
            return Err(annals::Error::Config(format!(
                "{}: partition leases are held in PostgreSQL; on SQLite one process runs \
                 all partitions under the projection lock (PartitionedRunner::spawn_local)",
                fence.lease_name()
            )));
        };
        let (lock, token, fence) = (lock.clone(), token.clone(), fence.clone());
        self.conns()
            .write(move |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db(what))?;
                let now: Option<String> = tx
                    .prepare_cached("SELECT token FROM projection_locks WHERE name = ?1")
                    .and_then(|mut s| s.query_row([&lock], |r| r.get(0)).optional())
                    .map_err(db("checking a projection's lock"))?;
                match now {
                    Some(now) if now == token => {}
                    Some(now) => return Err(fence.fenced(&format!("token {now}"))),
                    None => return Err(fence.fenced("no lock")),
                }
                write(&tx).map_err(db(what))?;
                tx.commit().map_err(db(what))
            })
            .await
    }
}
