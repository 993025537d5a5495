//! [`annals::CheckpointStore`] for [`PgEventStore`].
//!
//! A checkpoint is a `GlobalPosition` stored as `(commit_pos, seq)`. Saving
//! is one upsert whose update only applies when the new position is greater,
//! so a checkpoint never moves backwards even when two runners race.

use annals::{CheckpointStore, Error, GlobalPosition, Result};

use deadpool_postgres::Client;
use tokio_postgres::Row;

use crate::error::Context;
use crate::rows::position;
use crate::store::{with_client, Lane};
use crate::PgEventStore;

const LOAD_SQL: &str = "SELECT commit_pos, seq FROM checkpoints WHERE name = $1";

pub(crate) const SAVE_SQL: &str =
    "INSERT INTO checkpoints AS c (name, commit_pos, seq, updated_at) \
     VALUES ($1, $2, $3, now()) \
     ON CONFLICT (name) DO UPDATE \
     SET commit_pos = EXCLUDED.commit_pos, seq = EXCLUDED.seq, updated_at = now() \
     WHERE (c.commit_pos, c.seq) < (EXCLUDED.commit_pos, EXCLUDED.seq)";

impl CheckpointStore for PgEventStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<GlobalPosition>> {
        let row = with_client!(self, Lane::Any, "load a checkpoint", |client| {
            load(client, name).await
        })?;
        match row {
            None => Ok(None),
            Some(row) => {
                let commit: i64 = row.try_get(0).context("cannot decode a checkpoint")?;
                let seq: i64 = row.try_get(1).context("cannot decode a checkpoint")?;
                position(commit, seq).map(Some)
            }
        }
    }

    async fn save_checkpoint(&self, name: &str, position: GlobalPosition) -> Result<()> {
        let (Ok(commit), Ok(seq)) = (
            i64::try_from(position.commit()),
            i64::try_from(position.seq()),
        ) else {
            return Err(Error::PositionOutOfRange {
                position,
                reason: "beyond what a PostgreSQL checkpoint stores".into(),
            });
        };
        // The save only ever moves a checkpoint forward: running it again
        // after a lost connection changes nothing.
        with_client!(self, Lane::Any, "save a checkpoint", |client| {
            save(client, name, commit, seq).await
        })
    }

    async fn reset_checkpoint(&self, name: &str) -> Result<()> {
        let client = self.ready_client("reset a checkpoint").await?;
        client
            .execute("DELETE FROM checkpoints WHERE name = $1", &[&name])
            .await
            .context("cannot reset a checkpoint")?;
        Ok(())
    }
}

async fn load(client: &Client, name: &str) -> Result<Option<Row>> {
    let stmt = client
        .prepare_cached(LOAD_SQL)
        .await
        .context("cannot prepare a checkpoint load")?;
    client
        .query_opt(&stmt, &[&name])
        .await
        .context("cannot load a checkpoint")
}

async fn save(client: &Client, name: &str, commit: i64, seq: i64) -> Result<()> {
    let stmt = client
        .prepare_cached(SAVE_SQL)
        .await
        .context("cannot prepare a checkpoint save")?;
    client
        .execute(&stmt, &[&name, &commit, &seq])
        .await
        .context("cannot save a checkpoint")?;
    Ok(())
}

impl annals::CheckpointListing for PgEventStore {
    async fn list_checkpoints(&self) -> Result<Vec<annals::Checkpoint>> {
        let rows = with_client!(self, Lane::Any, "list checkpoints", |client| {
            client
                .query(
                    "SELECT name, commit_pos, seq FROM checkpoints ORDER BY name",
                    &[],
                )
                .await
                .context("cannot list checkpoints")
        })?;
        rows.iter()
            .map(|row| {
                let name: String = row.try_get(0).context("cannot decode a checkpoint")?;
                let commit: i64 = row.try_get(1).context("cannot decode a checkpoint")?;
                let seq: i64 = row.try_get(2).context("cannot decode a checkpoint")?;
                Ok(annals::Checkpoint {
                    name,
                    position: position(commit, seq)?,
                })
            })
            .collect()
    }
}
