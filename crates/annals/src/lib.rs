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
//! - [`SnapshotStore`]: a cache of aggregate state with a schema version.
//! - [`CheckpointStore`]: where each projection has got to.
//! - [`Projection`] and [`ProjectionRunner`]: read models fed from the global
//!   feed by a [`Subscription`] (catch-up, then live), checkpointed after
//!   each batch; [`ProjectionHandle::wait_for`] for read-your-writes.
//!
//! Those three traits are what every backend implements. A backend opts into
//! the rest: [`StreamCatalog`] (list streams, count them), [`SnapshotAdmin`]
//! (invalidation, coverage and freshness queries, the snapshot history and
//! rollback) and [`SnapshotStaging`] (the staging area of a snapshot
//! migration) and [`MultiStreamAppend`] (one atomic write to several
//! streams).
//!
//! Events stored by older versions of the application are read at their
//! current version through [`Upcasters`], which a store applies on every
//! read path (see the `upcast` module's docs on [`Upcasters`]).
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
//! - `plan` (off by default): `Plan`, declarative upcasting plans (TOML
//!   steps whose payload transforms are jq filters, run by jaq). Rust
//!   upcasters ([`Upcasters`], [`Step`]) need no feature. Backends live in
//!   their own crates.
//!
//! See `docs/architecture.md` in the repository for the crates, the traits
//! between them and how an event flows.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

// So that `#[derive(DomainEvent)]`, which names `::annals`, works in here too.
extern crate self as annals;

mod aggregate;
mod archive;
pub mod bank;
pub mod blue_green;
mod checkpoint;
mod error;
mod event;
mod event_migration;
mod event_store;
pub mod gdpr;
mod health;
mod idempotency;
mod import;
mod memory;
mod multi_stream;
mod partition;
#[cfg(feature = "plan")]
mod plan;
mod projection;
mod projection_control;
mod repository;
mod snapshot;
mod snapshot_jobs;
mod snapshot_worker;
mod stream;
mod subscription;
mod telemetry;
mod upcast;

pub use aggregate::{decode_event, encode_event, Aggregate, DomainEvent};
pub use annals_derive::DomainEvent;
pub use archive::{ArchivedStream, StreamArchive};
pub use blue_green::{
    quote_ident, retired_table, shadow_checkpoint_name, shadow_table, superseded, BlueGreenApplier,
    TableNames,
};
pub use checkpoint::{Checkpoint, CheckpointListing, CheckpointStore};
pub use error::{Error, Result, UpcastFailure};
pub use event::{
    validate_batch, AppendResult, EventId, ExpectedVersion, GlobalPosition, Metadata, NewEvent,
    Payload, RecordedEvent, StreamVersion,
};
pub use event::{validate_batch_owned, MAX_JSON_DEPTH};
pub use event_migration::{
    backup_table_name, derived_event_id, EventMigration, MigratedEvent, MigratedSource,
    MigrationCheckFailure, MigrationRun, MigrationState, SwapReport, TailTransform,
    MIGRATION_TABLE,
};
pub use event_store::{AppendSignal, FeedPage, FeedPages};
pub use event_store::{
    CategoryStats, Direction, EventStore, EventStream, EventTypeStats, ReadAll, ReadStream,
    StoreStats, StreamCatalog, StreamInfo, DEFAULT_BATCH_SIZE,
};
pub use gdpr::{GdprSnapshots, GdprStore, KeyStore, PersonalData};
pub use health::{ClockSkew, LongTransaction, StorageSize, StreamVersionIssue};
pub use idempotency::{
    canonical_json, check_retry, prepare_batch, Fingerprint, NestingTooDeep, PreparedEvent,
    StoredEvent,
};
pub use import::{
    plan_import, EventImport, ImportConflict, ImportConflictKind, ImportEvent, ImportPlan,
    ImportReport, ImportRun,
};
pub use memory::InMemoryStore;
pub use multi_stream::{
    check_retry_many, prepare_many, MultiStreamAppend, PreparedStreamBatch, StreamBatch,
};
pub use partition::{
    partition_checkpoint, partition_lags, partition_of, wait_for_partitions, Fence,
    PartitionHolder, PartitionLag, PartitionLease, PartitionLeases, PartitionOptions,
    PartitionedHandle, PartitionedRunner, WorkerView,
};
#[cfg(feature = "plan")]
pub use plan::{MigrationPlan, MigrationPreview, Migrator, Plan, PlanError};
pub use projection::{
    checkpoint_moved, checkpoint_name, idempotency_key, projection_lag, wait_for, ApplyError,
    AtLeastOnce, BatchApplier, BatchContext, HandlerError, IdempotencyGuard, Projection,
    ProjectionError, ProjectionFilter, ProjectionHandle, ProjectionLag, ProjectionRunner,
    RunnerOptions,
};
pub use projection::{
    record_dead_letter_count, retry_dead_letter, ErrorPolicy, LockKeepers, ProjectionState,
    RateLimiter, RebuildOptions, RebuildProgress, DEFAULT_LOCK_TTL, DEFAULT_REBUILD_BATCH,
    DEFAULT_REBUILD_PAGE, REBUILD_BATCH_BYTES,
};
pub use projection_control::{
    lock_owner, lock_token, projection_trip, record_trip, DeadLetter, LockAttempt,
    ProjectionControl, ProjectionLock, ProjectionTrip,
};
pub use repository::{
    decode_snapshot, fold_stream, make_snapshot, reaction_command_id, Command, CommandContext,
    CommandError, Executed, LoadReport, Loaded, Repository, RetryPolicy, SnapshotConfig,
    SnapshotMode, SnapshotPolicy, SnapshotSkip, SNAPSHOT_LOG_TARGET,
};
pub use snapshot::{
    no_such_snapshot, validate_history_size, NoSnapshots, PromoteReport, RollbackReport, Snapshot,
    SnapshotAdmin, SnapshotCoverage, SnapshotHistoryEntry, SnapshotStaging, SnapshotStore,
    SnapshotWrite, StaleSnapshot, DEFAULT_SNAPSHOT_HISTORY,
};
pub use snapshot_jobs::{
    CreatedSnapshot, JobFailure, JobOptions, JobReport, LiveVerifyReport, Progress, SnapshotJobs,
    VerifyMismatch, VerifyReport,
};
pub use stream::{validate_category, StreamId, MAX_STREAM_NAME_LEN};
pub use subscription::{
    is_transient, Backoff, Subscription, SubscriptionBatch, SubscriptionOptions,
};
pub use telemetry::{
    describe_metrics, AppendOutcome, MetricInfo, MetricKind, StoreMetrics, CATALOGUE,
};
pub use upcast::{
    current_versions, upcast_event, BoxError, Step, UpcastError, Upcasters, UpcastersBuilder,
    Upcasting,
};
