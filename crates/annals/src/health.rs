//! What the health checks (`annals check`) and `annals stats` read from a
//! backend: the rows of the integrity queries and the storage size that each
//! backend answers with its own SQL, in backend-neutral types.
//!
//! These are inherent methods of each backend store, not a trait: they are
//! diagnostics for operators, and a backend without the concept (SQLite has
//! no transaction horizon) simply has no such method. Each query is one SQL
//! aggregate or window scan that returns at most `limit` rows, so memory
//! stays bounded however large the store is.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::GlobalPosition;

/// A stream whose stored events are not exactly versions `1..=head`, or
/// whose head in the `streams` table disagrees with its events.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct StreamVersionIssue {
    /// The stream name as stored (raw text: a corrupt row may not parse).
    pub stream_id: String,
    /// The head recorded in the `streams` table (`None`: no row there, the
    /// events are orphans).
    pub head: Option<u64>,
    /// Event rows stored for the stream.
    pub events: u64,
    /// Distinct versions among them (fewer than `events`: duplicates).
    pub distinct_versions: u64,
    /// The lowest stored version (`None`: no events).
    pub min_version: Option<u64>,
    /// The highest stored version (`None`: no events).
    pub max_version: Option<u64>,
}

/// An event recorded earlier than the event just before it in the global
/// order, by more than the tolerance asked for: the clock of the appending
/// host went backwards (or the row was edited).
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct ClockSkew {
    /// The event's position.
    pub position: GlobalPosition,
    /// Its `recorded_at`.
    pub recorded_at: DateTime<Utc>,
    /// The position of the event before it in the global order.
    pub previous_position: GlobalPosition,
    /// That event's `recorded_at`, later than this one's.
    pub previous_recorded_at: DateTime<Utc>,
}

impl ClockSkew {
    /// How far the clock went backwards.
    pub fn backwards_by(&self) -> Duration {
        (self.previous_recorded_at - self.recorded_at)
            .to_std()
            .unwrap_or_default()
    }
}

/// A database transaction open longer than a threshold (PostgreSQL): one
/// that holds a transaction id keeps the store's global-order horizon from
/// advancing, so followers of `read_all` stall behind it; one that only holds
/// a snapshot (`xmin`) keeps vacuum from cleaning up.
#[derive(Clone, PartialEq, Debug, Serialize)]
pub struct LongTransaction {
    /// The server process id (`pg_terminate_backend(pid)` ends it).
    pub pid: i32,
    /// How long the transaction has been open.
    pub age: Duration,
    /// Whether it holds a transaction id (`backend_xid`), which holds back
    /// the global-order horizon; otherwise it only holds a snapshot.
    pub holds_xid: bool,
    /// The database it is connected to.
    pub database: String,
    /// The client's `application_name`.
    pub application_name: String,
    /// The session state (`active`, `idle in transaction`, ...).
    pub state: String,
}

/// How much disk a store takes (`annals stats`), as its backend measures it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
pub struct StorageSize {
    /// The store's own bytes. SQLite: the database's pages, in use and
    /// free, which is the file's size once the write-ahead log is
    /// checkpointed into it (the log beside it is not counted);
    /// PostgreSQL: the tables of the store's schema with their indexes and
    /// TOAST.
    pub store_bytes: u64,
    /// SQLite: the bytes of free pages inside the file, which later writes
    /// reuse and `VACUUM` gives back. `None` on PostgreSQL, where free space
    /// lives inside each table (vacuum's business).
    pub free_bytes: Option<u64>,
    /// PostgreSQL: the whole database (every schema), as
    /// `pg_database_size` reports it. `None` on SQLite, where the file is
    /// the database.
    pub database_bytes: Option<u64>,
}
