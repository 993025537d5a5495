//! Annals: an event-sourcing toolkit. This crate is the core: the model, the
//! backend traits, aggregates and the repository, snapshots, and an in-memory
//! store. It has no database dependency; `annals-sqlite` and
//! `annals-postgres` implement its traits.
//!
//! # Overview
//!
//! - [`EventStore`]: append with an [`ExpectedVersion`], read a stream or the
//!   whole store (in global order) as lazy batched streams.
//! - [`Aggregate`] and [`Repository`]: state is a fold of events; a command
//!   returns new events; the repository appends them with optimistic
//!   concurrency and retries on conflict.
//! - [`SnapshotStore`]: a cache of aggregate state with a schema version, a
//!   staging area for migrations, and the coverage and freshness queries.
//! - [`CheckpointStore`]: where each projection has got to.
//!
//! # Example
//!
//! ```
//! use annals::bank::Account;
//! use annals::{CommandContext, InMemoryStore, Repository};
//!
//! # tokio::runtime::Runtime::new()?.block_on(async {
//! let repo = Repository::<Account, _>::new(InMemoryStore::new());
//! let ctx = CommandContext::new();
//! repo.execute("acc-1", &ctx, |a| a.open("ann")).await?;
//! repo.execute("acc-1", &ctx, |a| a.deposit(100)).await?;
//! let refused = repo.execute("acc-1", &ctx, |a| a.withdraw(500)).await;
//! assert!(matches!(refused, Err(annals::CommandError::Rejected(_))));
//! let account = repo.load("acc-1").await?;
//! assert_eq!(account.state.balance, 100);
//! assert_eq!(account.version.map(|v| v.get()), Some(2));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Crate features
//!
//! None: the core is always complete. Backends live in their own crates.
//!
//! See `docs/architecture.md` in the repository for the crates, the traits
//! between them and how an event flows.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod aggregate;
pub mod bank;
mod checkpoint;
mod error;
mod event;
mod event_store;
mod idempotency;
mod memory;
mod repository;
mod snapshot;
mod snapshot_jobs;
mod stream;

pub use aggregate::{decode_event, encode_event, Aggregate, DomainEvent};
pub use checkpoint::CheckpointStore;
pub use error::{Error, Result};
pub use event::{
    validate_batch, AppendResult, EventId, ExpectedVersion, GlobalPosition, Metadata, NewEvent,
    Payload, RecordedEvent, StreamVersion,
};
pub use event_store::{
    CategoryStats, Direction, EventStore, EventStream, EventTypeStats, ReadAll, ReadStream,
    StoreStats, StreamInfo, DEFAULT_BATCH_SIZE,
};
pub use idempotency::{
    canonical_json, check_retry, prepare_batch, Fingerprint, NestingTooDeep, PreparedEvent,
    StoredEvent, MAX_JSON_NESTING,
};
pub use memory::InMemoryStore;
pub use repository::{
    decode_snapshot, fold_stream, make_snapshot, Command, CommandContext, CommandError, Executed,
    LoadReport, Loaded, Repository, RetryPolicy, SnapshotConfig, SnapshotMode, SnapshotPolicy,
    SnapshotSkip, SNAPSHOT_LOG_TARGET,
};
pub use snapshot::{
    NoSnapshots, PromoteReport, Snapshot, SnapshotCoverage, SnapshotStore, SnapshotWrite,
    StaleSnapshot,
};
pub use snapshot_jobs::{
    JobFailure, JobOptions, JobReport, Progress, SnapshotJobs, VerifyMismatch, VerifyReport,
};
pub use stream::{validate_category, StreamId, MAX_STREAM_NAME_LEN};
