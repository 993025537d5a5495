//! PostgreSQL backend for Annals: an event store, snapshot store and
//! checkpoint store on one connection pool, with a gap-free global order.
//!
//! # Overview
//!
//! - [`PgEventStore`]: implements every trait of the core:
//!   [`annals::EventStore`] and [`annals::StreamCatalog`],
//!   [`annals::SnapshotStore`] with [`annals::SnapshotAdmin`] and
//!   [`annals::SnapshotStaging`], and [`annals::CheckpointStore`]. Cheap to
//!   clone; clones share the pool.
//! - [`PgOptions`]: the PostgreSQL schema to use, the pool (size, wait
//!   timeout, connections for the global feed) and read pages (rows, bytes).
//!   (How many snapshots each aggregate keeps is a setting recorded in the
//!   database, [`annals::SnapshotAdmin::set_snapshot_history_size`].)
//! - [`PgEventStore::migrate`] (`annals init`) creates or upgrades the schema
//!   from versioned SQL files; [`PgEventStore::schema_sql`] prints it.
//! - [`PgEventStore::horizon_lag`] measures how many committed events readers
//!   cannot see yet (see below).
//!
//! # Example
//!
//! ```no_run
//! use annals::{EventStore, ExpectedVersion, NewEvent, ReadAll, StreamId};
//! use annals_postgres::{PgEventStore, PgOptions};
//! use futures::TryStreamExt;
//!
//! # tokio::runtime::Runtime::new()?.block_on(async {
//! let options = PgOptions {
//!     schema: Some("bank".into()),
//!     ..PgOptions::default()
//! };
//! let store = PgEventStore::connect_with("postgres://postgres@localhost/app", options).await?;
//! store.migrate().await?; // what `annals init` does; idempotent
//!
//! let stream = StreamId::parse("Account-42")?;
//! let opened = NewEvent::new("Opened", serde_json::json!({ "owner": "ann" }));
//! store.append(&stream, ExpectedVersion::NoStream, vec![opened]).await?;
//!
//! let events: Vec<_> = store.read_all(ReadAll::from_start()).try_collect().await?;
//! println!("{} events, last at {}", events.len(), events[0].global_position);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Global order without holes
//!
//! A projection reads the whole store in global order and remembers the last
//! position it saw. With a plain sequence as the position, that loses events:
//! transactions take sequence numbers when they insert but become visible
//! when they commit, so position 11 can become visible while 10 is still in
//! flight, and a reader that has passed 11 never goes back for 10.
//!
//! Here an event's position is the pair `(tx_id, seq)`: the id of the
//! transaction that appended it (`pg_current_xact_id()`, an `xid8`), then its
//! row sequence. [`annals::GlobalPosition`] holds it as `commit:seq`.
//! `read_all` returns only rows whose `tx_id` is below
//! `pg_snapshot_xmin(pg_current_snapshot())`, the oldest transaction still
//! running anywhere in the cluster. Every transaction below that horizon
//! has finished, and every transaction that has not yet finished, or not yet
//! started, has an id at or above it. So the set of rows a reader can see
//! below the horizon never grows behind its back: paging through it in
//! `(tx_id, seq)` order (keyset pagination on an index) delivers every
//! committed event exactly once.
//!
//! So positions order by transaction id, not by commit time: a
//! transaction that took its id earlier but commits later gets the smaller
//! position. `read_all` never delivers an event while a transaction that
//! could still commit below it is running, so a reader sees the log in
//! position order without holes. The positions an [`annals::EventStore::append`]
//! returns are final and unique, and a caller may wait until a follower has
//! passed them (read-your-writes), but they are not a place to start a
//! `read_all` from: appends still in flight may commit below them later,
//! and a reader starting there would never see those. Resume only from
//! positions that `read_all` delivered (or checkpoints saved from them).
//!
//! Each stream's events must also appear in version order. An append takes
//! an advisory lock on the stream *before* its transaction has an id, and
//! only then takes one; the previous writer of the stream got its id before
//! releasing the lock, so ids, and hence positions, follow the stream's
//! versions. The `streams` table records each stream's last writing
//! transaction, and an append that finds a younger one (a writer that
//! bypassed the lock) retries in a new transaction instead of writing.
//!
//! Positions are only meaningful in the cluster that assigned them.
//! [`PgEventStore::connect`] refuses a store whose events carry transaction
//! ids at or beyond the cluster's next id, as happens after a logical
//! restore (`pg_dump`) into a younger cluster: new events would sort before
//! existing ones. Physical copies (base backups, streaming replicas) keep
//! the counter and are fine.
//!
//! ## The cost
//!
//! A transaction that holds a transaction id anywhere in the cluster (in any
//! database, not just this store's) holds back every `read_all` reader
//! until it ends: an idle-in-transaction session that wrote something, a
//! long batch job or a forgotten prepared transaction stops projections
//! from advancing (writers are not affected). Watch
//! [`PgEventStore::horizon_lag`] (gauge `annals_pg_horizon_lag_events`) and
//! set `idle_in_transaction_session_timeout`. Read-only transactions do not
//! hold an id and do not matter.
//!
//! At the tail of the log, `read_all` and `head_position` wait briefly (at
//! most [`PgEventStore::with_horizon_wait`], 1 s by default) for the
//! transactions that hold back events already committed, so that a writer
//! that reads right after its own append normally sees it.
//!
//! # Under pressure
//!
//! With a long transaction in the cluster, every follower at the tail waits
//! its full `horizon_wait`, over and over. Waiting costs no connection: a
//! waiting reader sleeps on a watch of the horizon that one task per store
//! polls (one short query at a time) while anybody waits. The global feed
//! (`read_all` pages, `head_position`, the horizon watch) may use at most
//! [`PgOptions::feed_connections`] connections at once (half the pool by
//! default), so followers never take every connection from appends, stream
//! reads and snapshots.
//!
//! No call waits for ever for a connection: after
//! [`PgOptions::pool_wait_timeout`] (30 s by default) it fails with
//! [`annals::Error::Unavailable`], which names what it waited for and how
//! long, and means that nothing was written. (Waits inside the server, such
//! as an append queued behind another transaction that holds its stream's
//! lock, are not bounded by the store; `statement_timeout` and
//! `idle_in_transaction_session_timeout` bound those.)
//!
//! A connection that the server ends (`pg_terminate_backend`, a restart, a
//! broken socket) is removed from the pool. The calls of the event store
//! (`read_stream`, `read_all`, `stream_version`, `head_position`,
//! `list_streams`), checkpoint loads and saves, and appends then run again on
//! a fresh connection; an append's event ids make a second run of a batch
//! that did commit return the original assignment (with `deduplicated:
//! true`) instead of writing it twice. Other calls (`read_event`, `stats`,
//! the snapshot traits, `reset_checkpoint`) return the error, and the next
//! call gets a fresh connection: every checkout skips connections already
//! known to be closed (deadpool's fast recycling, which costs no round
//! trip).
//!
//! Read pages are bounded in rows (the batch size, doubling per page up to
//! 16 times it) and in bytes ([`PgOptions::page_bytes`], 8 MiB of payload
//! and metadata by default): a replay of large events holds a few of them
//! at a time. The size of a value stored uncompressed is its stored size;
//! that of a compressed one, the length of its JSON text.
//!
//! # Appends
//!
//! An append is one round trip: a single call of a PL/pgSQL function that
//! takes the stream lock, checks the expected version, updates `streams` and
//! inserts the batch with one `INSERT ... SELECT FROM unnest(...)`. Reused
//! event ids are caught by the unique index on `event_id` during that
//! insert (no lookup on the common path); the store then reads the stored
//! rows' fingerprints, and the core's [`annals::check_retry`] tells an
//! idempotent retry (returned with `deduplicated: true`) from a
//! [`annals::Error::DuplicateEventId`]. Optimistic-concurrency
//! conflicts surface as [`annals::Error::WrongExpectedVersion`]; driver
//! errors keep the `tokio_postgres` error as their source. Connections use
//! `READ COMMITTED` whatever the server's default.
//!
//! # Metrics
//!
//! - gauge `annals_pg_horizon_lag_events` (label `schema`), set by
//!   [`PgEventStore::horizon_lag`];
//! - counter `annals_pg_append_retries_total`: appends retried after a
//!   transient conflict (serialization failure, deadlock, a stream written
//!   outside the append function).
//!
//! # Schema
//!
//! Tables `events`, `streams`, `snapshots`, `snapshot_settings`,
//! `snapshot_staging`, `checkpoints` and `annals_migrations`, in the schema
//! named by
//! [`PgOptions::schema`] (the connections' `search_path`). `connect` never
//! changes the database: when the schema is missing or older than this
//! build, it succeeds, and every operation returns
//! [`annals::Error::SchemaVersion`] (which says to run `annals init`) until
//! [`PgEventStore::migrate`] has run.
//!
//! # Crate features
//!
//! None. Connections use `tokio_postgres::NoTls`. The store runs on Tokio
//! and needs the runtime's time driver (`enable_all`): append retries, pool
//! timeouts and the horizon wait sleep.
//!
//! See `docs/architecture.md` in the repository for the crates, the traits
//! between them and the ordering guarantees of each backend.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod archive;
mod checkpoint;
mod control;
mod error;
mod event_migration;
mod event_store;
mod gdpr;
mod group;
mod health;
mod horizon;
mod import;
mod lease;
mod listen;
mod migrate;
mod projection;
mod rows;
mod snapshot;
mod store;

pub use projection::{PgProjection, PgTransactional};
pub use store::{PgEventStore, PgOptions, DEFAULT_PAGE_BYTES, DEFAULT_POOL_WAIT_TIMEOUT};
