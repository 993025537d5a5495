//! [`StreamArchive`]: moving closed streams out of the hot event table and
//! back.
//!
//! Archiving is driven from outside the store (`annals archive` writes the
//! streams' events to checksummed files first); the store's part is the two
//! atomic steps at the end: remove a batch of streams' events and leave a
//! tombstone per stream ([`StreamArchive::archive_streams`]), and bring
//! events back while removing their tombstones
//! ([`StreamArchive::restore_streams`]).
//!
//! A stream's `streams` row (its head) stays while it is archived, so its
//! versions are never reused: reads, `stream_version` and appends of an
//! archived stream fail with [`Error::StreamArchived`](crate::Error::StreamArchived),
//! which names the archive file. Deleting events leaves holes in the
//! global order, which followers skip like any other hole (positions are
//! never dense); restored events get new positions at the end of the global
//! order, so a `read_all` follower sees them again as new events.

use std::future::Future;

use chrono::{DateTime, Utc};

use crate::{EventImport, ImportEvent, ImportReport, Result, StreamId, StreamVersion};

/// A stream's tombstone: what is left of an archived stream in the store.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ArchivedStream {
    /// The stream.
    pub stream: StreamId,
    /// Its head version when archived (its `streams` row keeps it too).
    pub head: StreamVersion,
    /// Where its events are: the archive file.
    pub location: String,
    /// When it was archived.
    pub archived_at: DateTime<Utc>,
}

/// Archiving streams: removing their events behind a tombstone, and
/// restoring them.
///
/// Implemented by SQLite, PostgreSQL and `AnyStore`; not by the in-memory
/// store.
pub trait StreamArchive: EventImport {
    /// Removes the events of each stream and records its tombstone, all in
    /// one transaction.
    ///
    /// Contract: each stream's stored head must equal `head` (the events
    /// written to the archive are all of them); otherwise nothing is done
    /// and the call fails with [`Error::WrongExpectedVersion`](crate::Error::WrongExpectedVersion)
    /// for the first stream that differs. A stream that is already archived
    /// is skipped (a rerun is idempotent). Returns the number of events
    /// removed. The caller must have made the archive durable first.
    fn archive_streams(
        &self,
        streams: Vec<ArchivedStream>,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// The tombstone of `stream`, if it is archived.
    fn archived_stream(
        &self,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Option<ArchivedStream>>> + Send;

    /// Restores events read from an archive, in one transaction: the
    /// tombstones of their streams are removed together with the streams'
    /// heads, then the events are imported as
    /// [`EventImport::import_events`] imports them (ids, versions, metadata
    /// and `recorded_at` kept, new positions). A stream that is not archived
    /// is imported as is: identical events already stored are skipped, so
    /// a rerun adds nothing.
    fn restore_streams(
        &self,
        events: Vec<ImportEvent>,
    ) -> impl Future<Output = Result<ImportReport>> + Send;
}
