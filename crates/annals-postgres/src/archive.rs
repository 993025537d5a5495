//! [`annals::StreamArchive`] on PostgreSQL: one transaction per call.
//!
//! Both calls first take the streams' advisory locks (the keys
//! `annals_append` takes), before the transaction writes anything, as an
//! import does: appends to those streams wait, and the per-stream guard of
//! the global order holds for the events a restore writes.
//!
//! Archiving checks each stream's head against the archived head (the
//! `streams` row stays), deletes its events and inserts its tombstone.
//! Restoring deletes the tombstones and heads of the archived streams among
//! the events, then imports them with the import's own code, in the same
//! transaction. Appends of an archived stream are refused by a trigger on
//! `streams` (see `sql/0007_archived_streams.sql`), mapped to
//! [`annals::Error::StreamArchived`] in `error`.

use std::collections::HashSet;

use annals::{
    ArchivedStream, ImportEvent, ImportReport, Result, StreamArchive, StreamId, StreamVersion,
};
use chrono::{DateTime, Utc};

use crate::error::Context;
use crate::import::{import_locked, lock_streams};
use crate::rows::to_i64;
use crate::PgEventStore;

const TOMBSTONE_SQL: &str =
    "SELECT version, location, archived_at FROM archived_streams WHERE stream_id = $1";

const LOCK_SQL: &str = "SELECT count(pg_advisory_xact_lock(o.k)) FROM \
     (SELECT DISTINCT hashtextextended(s.id, 0) AS k FROM unnest($1::text[]) AS s(id) \
      ORDER BY 1) AS o";

/// The tombstone of `stream`, if any.
async fn tombstone(
    client: &deadpool_postgres::Client,
    stream: &StreamId,
) -> Result<Option<ArchivedStream>> {
    let what = "cannot read a stream's tombstone";
    let stmt = client.prepare_cached(TOMBSTONE_SQL).await.context(what)?;
    let Some(row) = client
        .query_opt(&stmt, &[&stream.as_str()])
        .await
        .context(what)?
    else {
        return Ok(None);
    };
    let version: i64 = row.try_get(0).context(what)?;
    let location: String = row.try_get(1).context(what)?;
    let archived_at: DateTime<Utc> = row.try_get(2).context(what)?;
    Ok(Some(ArchivedStream {
        stream: stream.clone(),
        head: StreamVersion(u64::try_from(version).unwrap_or(0)),
        location,
        archived_at,
    }))
}

/// [`annals::Error::StreamArchived`] when `stream` is archived: what a read
/// that found no events returns.
pub(crate) async fn refuse_archived(
    client: &deadpool_postgres::Client,
    stream: &str,
) -> Result<()> {
    let stream = StreamId::parse(stream)?;
    match tombstone(client, &stream).await? {
        Some(t) => Err(annals::Error::StreamArchived {
            stream: t.stream,
            head: t.head,
            location: t.location,
        }),
        None => Ok(()),
    }
}

impl StreamArchive for PgEventStore {
    async fn archive_streams(&self, streams: Vec<ArchivedStream>) -> Result<u64> {
        if streams.is_empty() {
            return Ok(0);
        }
        let mut client = self.ready_client("archive streams").await?;
        let tx = client
            .transaction()
            .await
            .context("cannot start an archive")?;
        let mut names: Vec<&str> = streams.iter().map(|s| s.stream.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        tx.query(LOCK_SQL, &[&names])
            .await
            .context("cannot lock the archived streams")?;
        let what = "cannot read the archived streams' heads";
        let mut archived = HashSet::new();
        for row in tx
            .query(
                "SELECT stream_id FROM archived_streams WHERE stream_id = ANY($1)",
                &[&names],
            )
            .await
            .context(what)?
        {
            let name: String = row.try_get(0).context(what)?;
            archived.insert(name);
        }
        let mut removed = 0u64;
        for s in streams
            .iter()
            .filter(|s| !archived.contains(s.stream.as_str()))
        {
            let head: Option<i64> = tx
                .query_opt(
                    "SELECT version FROM streams WHERE stream_id = $1",
                    &[&s.stream.as_str()],
                )
                .await
                .context(what)?
                .map(|row| row.try_get(0))
                .transpose()
                .context(what)?;
            let actual = head.and_then(|h| u64::try_from(h).ok()).map(StreamVersion);
            if actual != Some(s.head) {
                return Err(annals::Error::WrongExpectedVersion {
                    stream: s.stream.clone(),
                    expected: annals::ExpectedVersion::Exact(s.head),
                    actual,
                });
            }
            removed += tx
                .execute(
                    "DELETE FROM events WHERE stream_id = $1",
                    &[&s.stream.as_str()],
                )
                .await
                .context("cannot remove an archived stream's events")?;
            tx.execute(
                "INSERT INTO archived_streams (stream_id, version, location, archived_at) \
                 VALUES ($1, $2, $3, $4)",
                &[
                    &s.stream.as_str(),
                    &to_i64(s.head.get()),
                    &s.location,
                    &s.archived_at,
                ],
            )
            .await
            .context("cannot record a stream's tombstone")?;
        }
        tx.commit().await.context("cannot commit an archive")?;
        Ok(removed)
    }

    async fn archived_stream(&self, stream: &StreamId) -> Result<Option<ArchivedStream>> {
        let client = self.ready_client("read a stream's tombstone").await?;
        tombstone(&client, stream).await
    }

    async fn restore_streams(&self, events: Vec<ImportEvent>) -> Result<ImportReport> {
        if events.is_empty() {
            return Ok(ImportReport::default());
        }
        let mut client = self.ready_client("restore streams").await?;
        let tx = client
            .transaction()
            .await
            .context("cannot start a restore")?;
        lock_streams(&tx, &events).await?;
        let mut names: Vec<&str> = events.iter().map(|e| e.stream_id.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        // The events come back at their versions: the heads restart.
        tx.execute(
            "WITH gone AS (DELETE FROM archived_streams WHERE stream_id = ANY($1) \
             RETURNING stream_id) DELETE FROM streams s USING gone WHERE s.stream_id = gone.stream_id",
            &[&names],
        )
        .await
        .context("cannot remove the restored streams' tombstones")?;
        let report = import_locked(&tx, events).await?;
        tx.commit().await.context("cannot commit a restore")?;
        Ok(report)
    }
}
