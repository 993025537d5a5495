//! Embedded SQLite backend for Annals: events, snapshots and checkpoints in
//! one local file.
//!
//! # Overview
//!
//! - [`SqliteEventStore`]: the store, a cheap `Clone` handle. It implements
//!   every trait of the core: [`annals::EventStore`] and
//!   [`annals::StreamCatalog`], [`annals::SnapshotStore`] with
//!   [`annals::SnapshotAdmin`] and [`annals::SnapshotStaging`], and
//!   [`annals::CheckpointStore`], so it plugs into an
//!   [`annals::Repository`] and every snapshot job as is.
//! - [`SqliteOptions`]: migrate on open, read batch size and the number of
//!   reader connections. (How many snapshots each aggregate keeps is a
//!   setting recorded in the file, [`annals::SnapshotAdmin::set_snapshot_history_size`].)
//!
//! The file is in WAL mode with `synchronous = FULL`: an append is durable
//! when it returns. One writer thread owns the only writing connection and
//! runs appends in `BEGIN IMMEDIATE` transactions, so global positions
//! (the `AUTOINCREMENT` rowid) are assigned in commit order and a `read_all`
//! reader can never pass an uncommitted event. Appends that wait for the
//! writer commit together (group commit: one transaction and one fsync, each
//! append in its own savepoint, every caller answered after the commit). Reads run on a small pool of
//! reader threads beside the writer and come back as lazy streams that fetch
//! `batch_size` rows per round trip (fewer when they hold 4 MiB of text).
//! Opening a file that is already migrated takes no write lock, so readers
//! never wait for another process's writer. No SQLite call runs on an async
//! worker thread.
//!
//! The schema is a set of versioned migrations (`sql/NNNN_*.sql` in this
//! crate), recorded in `annals_migrations`; [`SqliteEventStore::schema_sql`]
//! prints all of it. A file whose schema is behind this build answers with
//! [`annals::Error::SchemaVersion`] until [`SqliteEventStore::migrate`] (or
//! `annals init`) has run.
//!
//! # Example
//!
//! ```
//! use annals::bank::Account;
//! use annals::{CommandContext, EventStore, ReadAll, Repository};
//! use annals_sqlite::SqliteEventStore;
//! use futures::TryStreamExt;
//!
//! # tokio::runtime::Runtime::new()?.block_on(async {
//! let path = std::env::temp_dir().join(format!("annals-{}.db", uuid::Uuid::now_v7()));
//! let store = SqliteEventStore::open(&path).await?;
//!
//! let repo = Repository::<Account, _>::new(store.clone());
//! let ctx = CommandContext::new();
//! repo.execute("acc-1", &ctx, |a| a.open("ann")).await?;
//! repo.execute("acc-1", &ctx, |a| a.deposit(100)).await?;
//! assert_eq!(repo.load("acc-1").await?.state.balance, 100);
//!
//! let all: Vec<_> = store.read_all(ReadAll::from_start()).try_collect().await?;
//! assert_eq!(all.len(), 2);
//! # drop((repo, store));
//! # for suffix in ["", "-wal", "-shm"] {
//! #     let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Crate features
//!
//! None. SQLite is compiled in (rusqlite's `bundled`), so the crate needs no
//! system library.
//!
//! See `docs/architecture.md` in the repository for the schema and the
//! ordering guarantees shared by every backend.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod archive;
mod checkpoint;
mod codec;
mod conn;
mod control;
mod error;
mod event_migration;
mod event_store;
mod feed;
mod gdpr;
mod health;
mod import;
mod migrate;
mod projection;
mod snapshot;
mod store;

pub use projection::{SqliteProjection, SqliteTransactional};
pub use store::{SqliteEventStore, SqliteOptions};
