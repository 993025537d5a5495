//! [`annals::StreamArchive`] on SQLite: each call is one writer-thread job
//! in its own savepoint of a group transaction, like an append.
//!
//! Archiving checks every stream's head against the archived head (through
//! the `streams` row, which stays), deletes its events and inserts its
//! tombstone into `archived_streams`. Restoring deletes the tombstones and
//! the heads of the archived streams among the events, then imports the
//! events with the import's own code (`import::import_in`), in the same
//! savepoint. The single writer orders both against every append.

use std::collections::HashSet;

use annals::{
    ArchivedStream, ImportEvent, ImportReport, Result, StreamArchive, StreamId, StreamVersion,
};
use rusqlite::{Connection, OptionalExtension};

use crate::codec::{from_micros, sql_int, to_micros};
use crate::error::{corrupt, db};
use crate::event_store::head_version;
use crate::SqliteEventStore;

const TOMBSTONE_SQL: &str =
    "SELECT version, location, archived_at FROM archived_streams WHERE stream_id = ?1";

/// The tombstone of `stream`, if any.
fn tombstone(conn: &Connection, stream: &StreamId) -> Result<Option<ArchivedStream>> {
    let row: Option<(i64, String, i64)> = conn
        .prepare_cached(TOMBSTONE_SQL)
        .and_then(|mut s| {
            s.query_row([stream.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
        })
        .map_err(db("reading a stream's tombstone"))?;
    row.map(|(v, location, at)| {
        let head = u64::try_from(v).map(StreamVersion).map_err(|e| {
            corrupt(
                format!("archived_streams row {stream}: negative version"),
                e,
            )
        })?;
        let archived_at = from_micros(at).ok_or_else(|| annals::Error::Backend {
            backend: "sqlite",
            message: format!("archived_streams row {stream}: archived_at {at} out of range"),
            source: None,
        })?;
        Ok(ArchivedStream {
            stream: stream.clone(),
            head,
            location,
            archived_at,
        })
    })
    .transpose()
}

/// [`annals::Error::StreamArchived`] when `stream` is archived: what a read
/// that found no events returns.
pub(crate) fn refuse_archived(conn: &Connection, stream: &StreamId) -> Result<()> {
    match tombstone(conn, stream)? {
        Some(t) => Err(annals::Error::StreamArchived {
            stream: t.stream,
            head: t.head,
            location: t.location,
        }),
        None => Ok(()),
    }
}

fn archive_job(conn: &mut Connection, streams: Vec<ArchivedStream>) -> Result<u64> {
    let sp = conn.savepoint().map_err(db("starting an archive"))?;
    let mut removed = 0u64;
    for s in &streams {
        if tombstone(&sp, &s.stream)?.is_some() {
            continue;
        }
        let actual = head_version(&sp, &s.stream)?;
        if actual != Some(s.head) {
            return Err(annals::Error::WrongExpectedVersion {
                stream: s.stream.clone(),
                expected: annals::ExpectedVersion::Exact(s.head),
                actual,
            });
        }
        removed += sp
            .prepare_cached("DELETE FROM events WHERE stream_id = ?1")
            .and_then(|mut st| st.execute([s.stream.as_str()]))
            .map_err(db("removing an archived stream's events"))? as u64;
        sp.prepare_cached(
            "INSERT INTO archived_streams (stream_id, version, location, archived_at) \
             VALUES (?1, ?2, ?3, ?4)",
        )
        .and_then(|mut st| {
            st.execute(rusqlite::params![
                s.stream.as_str(),
                sql_int(s.head.get()),
                s.location,
                to_micros(s.archived_at)
            ])
        })
        .map_err(db("recording a stream's tombstone"))?;
    }
    sp.commit()
        .map_err(db("releasing an archive's savepoint"))?;
    Ok(removed)
}

fn restore_job(conn: &mut Connection, events: Vec<ImportEvent>) -> Result<ImportReport> {
    let sp = conn.savepoint().map_err(db("starting a restore"))?;
    let streams: HashSet<&StreamId> = events.iter().map(|e| &e.stream_id).collect();
    for stream in streams {
        let gone = sp
            .prepare_cached("DELETE FROM archived_streams WHERE stream_id = ?1")
            .and_then(|mut st| st.execute([stream.as_str()]))
            .map_err(db("removing a stream's tombstone"))?;
        if gone > 0 {
            // The events come back at their versions: the head restarts.
            sp.prepare_cached("DELETE FROM streams WHERE stream_id = ?1")
                .and_then(|mut st| st.execute([stream.as_str()]))
                .map_err(db("resetting a restored stream's head"))?;
        }
    }
    let report = crate::import::import_in(&sp, events)?;
    sp.commit().map_err(db("releasing a restore's savepoint"))?;
    Ok(report)
}

impl StreamArchive for SqliteEventStore {
    async fn archive_streams(&self, streams: Vec<ArchivedStream>) -> Result<u64> {
        if streams.is_empty() {
            return Ok(0);
        }
        self.conns()
            .write_in_group(move |conn| archive_job(conn, streams))
            .await
    }

    async fn archived_stream(&self, stream: &StreamId) -> Result<Option<ArchivedStream>> {
        let stream = stream.clone();
        self.conns()
            .read(move |conn| tombstone(conn, &stream))
            .await
    }

    async fn restore_streams(&self, events: Vec<ImportEvent>) -> Result<ImportReport> {
        if events.is_empty() {
            return Ok(ImportReport::default());
        }
        self.conns()
            .write_in_group(move |conn| restore_job(conn, events))
            .await
    }
}
