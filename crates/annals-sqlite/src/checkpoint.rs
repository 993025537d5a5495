//! [`annals::CheckpointStore`] on SQLite.
//!
//! A save is one guarded upsert on the writer thread: the row changes only
//! when the new position is greater, compared as a `(commit, seq)` pair in
//! SQL, so a checkpoint never moves backwards even when two runners race.

use annals::{CheckpointStore, GlobalPosition, Result};
use rusqlite::OptionalExtension;

use crate::codec::now_micros;
use crate::error::{corrupt, db};
use crate::SqliteEventStore;

pub(crate) const SAVE_SQL: &str =
    "INSERT INTO checkpoints (name, position_commit, position, updated_at) \
    VALUES (?1, ?2, ?3, ?4) \
    ON CONFLICT (name) DO UPDATE SET position_commit = excluded.position_commit, \
    position = excluded.position, updated_at = excluded.updated_at \
    WHERE (excluded.position_commit, excluded.position) > \
          (checkpoints.position_commit, checkpoints.position)";

/// SQLite integers are `i64`; a position part beyond that cannot be stored.
pub(crate) fn part(position: GlobalPosition, v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| annals::Error::PositionOutOfRange {
        position,
        reason: "a SQLite checkpoint holds positions up to 2^63 - 1".into(),
    })
}

impl CheckpointStore for SqliteEventStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<GlobalPosition>> {
        let name = name.to_owned();
        self.conns()
            .read(move |conn| {
                let row: Option<(i64, i64)> = conn
                    .prepare_cached(
                        "SELECT position_commit, position FROM checkpoints WHERE name = ?1",
                    )
                    .and_then(|mut s| {
                        s.query_row([&name], |r| Ok((r.get(0)?, r.get(1)?)))
                            .optional()
                    })
                    .map_err(db("loading a checkpoint"))?;
                row.map(|(commit, seq)| {
                    let commit = u64::try_from(commit);
                    let seq = u64::try_from(seq);
                    match (commit, seq) {
                        (Ok(c), Ok(s)) => Ok(GlobalPosition::new(c, s)),
                        (Err(e), _) | (_, Err(e)) => Err(corrupt(
                            format!("checkpoint {name:?}: negative position"),
                            e,
                        )),
                    }
                })
                .transpose()
            })
            .await
    }

    async fn save_checkpoint(&self, name: &str, position: GlobalPosition) -> Result<()> {
        let commit = part(position, position.commit())?;
        let seq = part(position, position.seq())?;
        let name = name.to_owned();
        self.conns()
            .write(move |conn| {
                conn.prepare_cached(SAVE_SQL)
                    .and_then(|mut s| s.execute(rusqlite::params![name, commit, seq, now_micros()]))
                    .map(drop)
                    .map_err(db("saving a checkpoint"))
            })
            .await
    }

    async fn reset_checkpoint(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        self.conns()
            .write(move |conn| {
                conn.prepare_cached("DELETE FROM checkpoints WHERE name = ?1")
                    .and_then(|mut s| s.execute([name]))
                    .map(drop)
                    .map_err(db("resetting a checkpoint"))
            })
            .await
    }
}

impl annals::CheckpointListing for SqliteEventStore {
    async fn list_checkpoints(&self) -> Result<Vec<annals::Checkpoint>> {
        self.conns()
            .read(|conn| {
                let mut stmt = conn
                    .prepare_cached(
                        "SELECT name, position_commit, position FROM checkpoints ORDER BY name",
                    )
                    .map_err(db("listing checkpoints"))?;
                let rows = stmt
                    .query_map([], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, i64>(2)?,
                        ))
                    })
                    .map_err(db("listing checkpoints"))?;
                let mut all = Vec::new();
                for row in rows {
                    let (name, commit, seq) = row.map_err(db("listing checkpoints"))?;
                    match (u64::try_from(commit), u64::try_from(seq)) {
                        (Ok(c), Ok(s)) => all.push(annals::Checkpoint {
                            name,
                            position: GlobalPosition::new(c, s),
                        }),
                        (Err(e), _) | (_, Err(e)) => {
                            return Err(corrupt(
                                format!("checkpoint {name:?}: negative position"),
                                e,
                            ))
                        }
                    }
                }
                Ok(all)
            })
            .await
    }
}
