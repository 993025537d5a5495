//! One Annals store over every backend, chosen from a database URL at run
//! time.
//!
//! The core's functions ([`annals::Repository`], [`annals::fold_stream`],
//! [`annals::SnapshotJobs`]) are generic over the store traits, and a tool
//! that takes a database URL only learns the backend when it runs.
//! [`AnyStore`] closes that gap with an enum rather than a trait object: the
//! traits use `async fn` and are not object safe, and an enum keeps every
//! future `Send` with no boxing on the append path. Each trait method is a
//! one-line delegation written by a macro, so adding a backend is one variant
//! and one match arm per macro.
//!
//! # Overview
//!
//! - [`DatabaseUrl`]: a parsed URL, `sqlite://PATH` (also `sqlite:PATH`) or
//!   `postgres://…` / `postgresql://…`; it never displays a password.
//! - [`AnyStore`]: the store a URL names, implementing every trait of the
//!   core; [`AnyStore::open`] and [`AnyStore::open_with`] with
//!   [`OpenOptions`].
//! - [`Backend`]: which backend, and its schema DDL.
//!
//! The `annals` CLI (`annals-cli`) is built on this crate and re-exports it;
//! an application that only needs the store depends on this crate, without
//! the CLI's dependencies.
//!
//! # Example
//!
//! ```
//! use annals::bank::Account;
//! use annals::{CommandContext, Repository, SnapshotConfig, StreamCatalog};
//! use annals_any::{AnyStore, Backend};
//!
//! # tokio::runtime::Runtime::new()?.block_on(async {
//! let dir = tempfile::tempdir()?;
//! let url = format!("sqlite://{}", dir.path().join("bank.db").display());
//! let store = AnyStore::open(&url).await?;
//! assert_eq!(store.backend(), Backend::Sqlite);
//!
//! let repo = Repository::<Account, _>::new(store.clone())
//!     .with_snapshots(store.clone(), SnapshotConfig::every(2));
//! let ctx = CommandContext::new();
//! repo.execute("acc-1", &ctx, |a| a.open("ann")).await?;
//! repo.execute("acc-1", &ctx, |a| a.deposit(100)).await?;
//! assert_eq!(repo.load("acc-1").await?.state.balance, 100);
//! assert_eq!(store.stats().await?.events, 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Crate features
//!
//! None: both backends (`annals-sqlite`, `annals-postgres`) are always built.
//!
//! See `docs/architecture.md` in the repository for the crates and the traits
//! between them.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::any::Any;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use annals::{
    AppendResult, CheckpointStore, Error, EventId, EventStore, EventStream, ExpectedVersion,
    GlobalPosition, NewEvent, PromoteReport, ReadAll, ReadStream, RecordedEvent, Result,
    RollbackReport, Snapshot, SnapshotAdmin, SnapshotCoverage, SnapshotHistoryEntry,
    SnapshotStaging, SnapshotStore, SnapshotWrite, StaleSnapshot, StoreStats, StreamCatalog,
    StreamId, StreamInfo, StreamVersion,
};
use annals::{ClockSkew, LongTransaction, StorageSize, StreamVersionIssue, Upcasters};
use annals_postgres::{PgEventStore, PgOptions};
use annals_sqlite::{SqliteEventStore, SqliteOptions};
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use uuid::Uuid;

/// A backend: the crate behind a store (`annals schema --backend` takes its
/// name).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backend {
    /// Embedded SQLite (`annals-sqlite`).
    Sqlite,
    /// PostgreSQL (`annals-postgres`).
    Postgres,
}

impl Backend {
    /// The backend's name: `sqlite` or `postgres`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    /// The DDL of the backend's current schema (what `annals init` applies).
    pub fn schema_sql(self) -> String {
        match self {
            Backend::Sqlite => SqliteEventStore::schema_sql(),
            Backend::Postgres => PgEventStore::schema_sql(),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A parsed database URL.
///
/// `sqlite://PATH` (also `sqlite:PATH`) names a file: `sqlite://annals.db` is
/// relative to the current directory and `sqlite:///var/lib/x.db` is
/// absolute. `postgres://…` and `postgresql://…` are handed to the
/// PostgreSQL driver unchanged.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// An SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL.
    Postgres(String),
}

impl DatabaseUrl {
    /// Which backend the URL selects.
    pub fn backend(&self) -> Backend {
        match self {
            DatabaseUrl::Sqlite(_) => Backend::Sqlite,
            DatabaseUrl::Postgres(_) => Backend::Postgres,
        }
    }
}

/// Never prints a PostgreSQL password: URLs end up in error messages.
impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseUrl::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
            DatabaseUrl::Postgres(url) => f.write_str(&redact_password(url)),
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The authority ends at the first '/', '?' or '#'; userinfo before its last '@'.
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

impl FromStr for DatabaseUrl {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self> {
        let url = url.trim();
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                return Err(Error::Config(
                    "database URL sqlite:// has no file path: use sqlite://PATH".into(),
                ));
            }
            return Ok(DatabaseUrl::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(DatabaseUrl::Postgres(url.to_owned()));
        }
        match url.split_once(':') {
            Some((scheme, _)) if !scheme.is_empty() && !scheme.contains(['/', '\\']) => {
                Err(Error::Config(format!(
                    "unsupported database URL scheme {scheme:?}: use sqlite://PATH or postgres://…"
                )))
            }
            _ => Err(Error::Config(format!(
                "database URL {url:?} has no scheme: use sqlite://PATH or postgres://…"
            ))),
        }
    }
}

/// How [`AnyStore::open_with`] opens a store.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// PostgreSQL schema holding the tables (`None`: `public`). Ignored by
    /// SQLite.
    pub pg_schema: Option<String>,
    /// Refuse to open an SQLite file that does not exist yet, instead of
    /// creating it. A read-only tool sets this, so a mistyped path is an
    /// error rather than a new empty database.
    pub must_exist: bool,
    /// Upcasters applied to every event the store reads (see
    /// [`AnyStore::with_upcasters`]); `None` reads events as stored.
    pub upcasters: Option<Arc<Upcasters>>,
}

/// A store on whichever backend a database URL selects.
///
/// Every backend it knows implements every trait of the core, so it does
/// too, by delegation: [`EventStore`], [`annals::MultiStreamAppend`], [`annals::EventImport`], [`annals::StreamArchive`], [`annals::CheckpointListing`], [`StreamCatalog`], [`SnapshotStore`],
/// [`SnapshotAdmin`], [`SnapshotStaging`] and [`CheckpointStore`]. Every
/// generic function of the core works on it.
#[derive(Clone)]
#[non_exhaustive]
pub enum AnyStore {
    /// Embedded SQLite.
    Sqlite(SqliteEventStore),
    /// PostgreSQL.
    Postgres(PgEventStore),
}

impl fmt::Debug for AnyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AnyStore({})", self.backend())
    }
}

impl AnyStore {
    /// Opens the store a URL names, with default options. SQLite creates and
    /// migrates the file on open; PostgreSQL only connects (run
    /// [`AnyStore::migrate`], i.e. `annals init`, once).
    pub async fn open(url: &str) -> Result<AnyStore> {
        Self::open_with(&url.parse()?, &OpenOptions::default()).await
    }

    /// Opens the store a parsed URL names.
    pub async fn open_with(url: &DatabaseUrl, options: &OpenOptions) -> Result<AnyStore> {
        match url {
            DatabaseUrl::Sqlite(path) => {
                if options.must_exist && !path.exists() {
                    return Err(Error::Config(format!(
                        "database file {} does not exist: check the database URL, or run `annals init` to create it",
                        path.display()
                    )));
                }
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    if !dir.is_dir() {
                        return Err(Error::Config(format!(
                            "directory {} does not exist",
                            dir.display()
                        )));
                    }
                }
                let path: &Path = path;
                let store = SqliteEventStore::open_with(path, SqliteOptions::default()).await?;
                Ok(AnyStore::Sqlite(store).with_optional_upcasters(options))
            }
            DatabaseUrl::Postgres(url) => {
                let pg = PgOptions {
                    schema: options.pg_schema.clone(),
                    ..PgOptions::default()
                };
                Ok(
                    AnyStore::Postgres(PgEventStore::connect_with(url, pg).await?)
                        .with_optional_upcasters(options),
                )
            }
        }
    }

    fn with_optional_upcasters(self, options: &OpenOptions) -> Self {
        match &options.upcasters {
            Some(u) => self.with_upcasters(Arc::clone(u)),
            None => self,
        }
    }

    /// This store (the same connections) with every read upcast by
    /// `upcasters` (see [`annals::Upcasters`]).
    pub fn with_upcasters(self, upcasters: Arc<Upcasters>) -> Self {
        match self {
            AnyStore::Sqlite(s) => AnyStore::Sqlite(s.with_upcasters(upcasters)),
            AnyStore::Postgres(s) => AnyStore::Postgres(s.with_upcasters(upcasters)),
        }
    }

    /// This store (the same connections) reading events as stored.
    pub fn raw(&self) -> Self {
        match self {
            AnyStore::Sqlite(s) => AnyStore::Sqlite(s.raw()),
            AnyStore::Postgres(s) => AnyStore::Postgres(s.raw()),
        }
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        match self {
            AnyStore::Sqlite(_) => Backend::Sqlite,
            AnyStore::Postgres(_) => Backend::Postgres,
        }
    }

    /// Creates or upgrades the schema (`annals init`). Idempotent.
    pub async fn migrate(&self) -> Result<()> {
        match self {
            AnyStore::Sqlite(s) => s.migrate().await,
            AnyStore::Postgres(s) => s.migrate().await,
        }
    }

    /// Streams whose stored events are not exactly versions `1..=head`, at
    /// most `limit` of them (see [`StreamVersionIssue`]).
    pub async fn stream_version_issues(&self, limit: usize) -> Result<Vec<StreamVersionIssue>> {
        match self {
            AnyStore::Sqlite(s) => s.stream_version_issues(limit).await,
            AnyStore::Postgres(s) => s.stream_version_issues(limit).await,
        }
    }

    /// Events recorded more than `tolerance` before the event preceding them
    /// in the global order, at most `limit` of them (see [`ClockSkew`]).
    pub async fn clock_skews(&self, tolerance: Duration, limit: usize) -> Result<Vec<ClockSkew>> {
        match self {
            AnyStore::Sqlite(s) => s.clock_skews(tolerance, limit).await,
            AnyStore::Postgres(s) => s.clock_skews(tolerance, limit).await,
        }
    }

    /// The disk the store takes (see [`StorageSize`]): the SQLite database, or
    /// the PostgreSQL schema's tables and the whole database.
    pub async fn storage_size(&self) -> Result<StorageSize> {
        match self {
            AnyStore::Sqlite(s) => s.storage_size().await,
            AnyStore::Postgres(s) => s.storage_size().await,
        }
    }

    /// On PostgreSQL, the transactions open for at least `min_age` that hold
    /// back the horizon or vacuum (see [`LongTransaction`]), at most `limit`
    /// of them. SQLite has no such horizon (one writer at a time, readers on
    /// WAL snapshots): always empty there.
    pub async fn long_transactions(
        &self,
        min_age: Duration,
        limit: usize,
    ) -> Result<Vec<LongTransaction>> {
        match self {
            AnyStore::Sqlite(_) => Ok(Vec::new()),
            AnyStore::Postgres(s) => s.long_transactions(min_age, limit).await,
        }
    }
}

/// `delegate!(self, s => s.method(args))` runs the expression on whichever
/// backend `self` holds.
macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $e,
            AnyStore::Postgres($s) => $e,
        }
    };
}

impl EventStore for AnyStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        delegate!(self, s => s.append(stream, expected, events).await)
    }

    fn read_stream(&self, stream: &StreamId, options: ReadStream) -> EventStream {
        delegate!(self, s => s.read_stream(stream, options))
    }

    fn read_all(&self, options: ReadAll) -> EventStream {
        delegate!(self, s => s.read_all(options))
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<StreamVersion>> {
        delegate!(self, s => s.stream_version(stream).await)
    }

    async fn head_position(&self) -> Result<Option<GlobalPosition>> {
        delegate!(self, s => s.head_position().await)
    }

    async fn read_event(&self, id: EventId) -> Result<Option<RecordedEvent>> {
        delegate!(self, s => s.read_event(id).await)
    }

    async fn read_feed_page(&self, filter: &ReadAll, limit: usize) -> Result<annals::FeedPage> {
        delegate!(self, s => s.read_feed_page(filter, limit).await)
    }

    fn read_feed_pages(&self, filter: ReadAll, limit: usize) -> annals::FeedPages {
        delegate!(self, s => s.read_feed_pages(filter, limit))
    }

    fn append_signal(&self) -> Option<annals::AppendSignal> {
        delegate!(self, s => s.append_signal())
    }

    async fn count_events_between(
        &self,
        after: GlobalPosition,
        up_to: GlobalPosition,
    ) -> Result<u64> {
        delegate!(self, s => s.count_events_between(after, up_to).await)
    }
}

impl annals::MultiStreamAppend for AnyStore {
    async fn append_many(&self, batches: Vec<annals::StreamBatch>) -> Result<Vec<AppendResult>> {
        delegate!(self, s => s.append_many(batches).await)
    }
}

impl annals::CheckpointListing for AnyStore {
    async fn list_checkpoints(&self) -> Result<Vec<annals::Checkpoint>> {
        delegate!(self, s => s.list_checkpoints().await)
    }
}

impl annals::EventImport for AnyStore {
    async fn import_events(
        &self,
        events: Vec<annals::ImportEvent>,
    ) -> Result<annals::ImportReport> {
        delegate!(self, s => s.import_events(events).await)
    }
}

impl annals::EventMigration for AnyStore {
    async fn begin_migration(&self, plan_file: &str, plan: &str) -> Result<annals::MigrationRun> {
        delegate!(self, s => s.begin_migration(plan_file, plan).await)
    }

    async fn migration_run(&self) -> Result<Option<annals::MigrationRun>> {
        delegate!(self, s => s.migration_run().await)
    }

    async fn migration_deltas(&self) -> Result<Vec<(StreamId, i64)>> {
        delegate!(self, s => s.migration_deltas().await)
    }

    async fn write_migration_batch(
        &self,
        run: i64,
        batch: Vec<annals::MigratedSource>,
    ) -> Result<()> {
        delegate!(self, s => s.write_migration_batch(run, batch).await)
    }

    async fn swap_migration(
        &self,
        run: i64,
        tail: annals::TailTransform,
    ) -> Result<annals::SwapReport> {
        delegate!(self, s => s.swap_migration(run, tail).await)
    }

    async fn drop_migration_backup(&self) -> Result<Option<String>> {
        delegate!(self, s => s.drop_migration_backup().await)
    }
}

impl annals::StreamArchive for AnyStore {
    async fn archive_streams(&self, streams: Vec<annals::ArchivedStream>) -> Result<u64> {
        delegate!(self, s => s.archive_streams(streams).await)
    }

    async fn archived_stream(
        &self,
        stream: &annals::StreamId,
    ) -> Result<Option<annals::ArchivedStream>> {
        delegate!(self, s => s.archived_stream(stream).await)
    }

    async fn restore_streams(
        &self,
        events: Vec<annals::ImportEvent>,
    ) -> Result<annals::ImportReport> {
        delegate!(self, s => s.restore_streams(events).await)
    }
}

impl StreamCatalog for AnyStore {
    fn list_streams(&self, category: &str) -> BoxStream<'static, Result<StreamInfo>> {
        delegate!(self, s => s.list_streams(category))
    }

    async fn stats(&self) -> Result<StoreStats> {
        delegate!(self, s => s.stats().await)
    }

    fn read_correlated(&self, correlation_id: Uuid, limit: Option<u64>) -> EventStream {
        delegate!(self, s => s.read_correlated(correlation_id, limit))
    }

    fn read_caused_by(&self, causation_id: Uuid, limit: Option<u64>) -> EventStream {
        delegate!(self, s => s.read_caused_by(causation_id, limit))
    }

    async fn largest_streams(&self, limit: usize) -> Result<Vec<StreamInfo>> {
        delegate!(self, s => s.largest_streams(limit).await)
    }

    async fn events_recorded_since(&self, since: DateTime<Utc>) -> Result<u64> {
        delegate!(self, s => s.events_recorded_since(since).await)
    }
}

impl SnapshotStore for AnyStore {
    async fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Snapshot>> {
        delegate!(self, s => s.load_snapshot(aggregate_type, aggregate_id).await)
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<SnapshotWrite> {
        delegate!(self, s => s.save_snapshot(snapshot).await)
    }

    async fn delete_snapshot(&self, aggregate_type: &str, aggregate_id: &str) -> Result<u64> {
        delegate!(self, s => s.delete_snapshot(aggregate_type, aggregate_id).await)
    }

    /// The backend's own implementation, given the backend's own handle when
    /// `events` is an `AnyStore` on the same backend: so on SQLite, where
    /// `events` is a handle on the same file (a repository over one
    /// `AnyStore`), the snapshot and the first page of its events come in one
    /// reader round trip.
    async fn load_snapshot_and_events<S: EventStore>(
        &self,
        events: &S,
        aggregate_type: &str,
        stream: &StreamId,
    ) -> Result<Option<(Snapshot, EventStream)>> {
        match (self, (events as &dyn Any).downcast_ref::<AnyStore>()) {
            (AnyStore::Sqlite(s), Some(AnyStore::Sqlite(e))) => {
                s.load_snapshot_and_events(e, aggregate_type, stream).await
            }
            (AnyStore::Postgres(s), Some(AnyStore::Postgres(e))) => {
                s.load_snapshot_and_events(e, aggregate_type, stream).await
            }
            _ => {
                delegate!(self, s => s.load_snapshot_and_events(events, aggregate_type, stream).await)
            }
        }
    }
}

impl SnapshotAdmin for AnyStore {
    async fn invalidate_snapshots(
        &self,
        aggregate_type: &str,
        below_schema_version: Option<u32>,
    ) -> Result<u64> {
        delegate!(self, s => s.invalidate_snapshots(aggregate_type, below_schema_version).await)
    }

    async fn snapshot_coverage(
        &self,
        aggregate_type: Option<&str>,
    ) -> Result<Vec<SnapshotCoverage>> {
        delegate!(self, s => s.snapshot_coverage(aggregate_type).await)
    }

    async fn stale_snapshots(
        &self,
        aggregate_type: Option<&str>,
        min_events: u64,
    ) -> Result<Vec<StaleSnapshot>> {
        delegate!(self, s => s.stale_snapshots(aggregate_type, min_events).await)
    }

    async fn snapshot_history_size(&self) -> Result<u32> {
        delegate!(self, s => s.snapshot_history_size().await)
    }

    async fn set_snapshot_history_size(&self, keep: u32) -> Result<u64> {
        delegate!(self, s => s.set_snapshot_history_size(keep).await)
    }

    async fn snapshot_history(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Vec<SnapshotHistoryEntry>> {
        delegate!(self, s => s.snapshot_history(aggregate_type, aggregate_id).await)
    }

    async fn rollback_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        to_version: StreamVersion,
    ) -> Result<RollbackReport> {
        delegate!(self, s => s.rollback_snapshot(aggregate_type, aggregate_id, to_version).await)
    }

    fn list_stale_snapshots(
        &self,
        aggregate_type: Option<&str>,
        min_events: u64,
    ) -> BoxStream<'static, Result<StaleSnapshot>> {
        delegate!(self, s => s.list_stale_snapshots(aggregate_type, min_events))
    }

    fn live_snapshots(&self, aggregate_type: &str) -> BoxStream<'static, Result<Snapshot>> {
        delegate!(self, s => s.live_snapshots(aggregate_type))
    }
}

impl SnapshotStaging for AnyStore {
    async fn stage_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        delegate!(self, s => s.stage_snapshot(snapshot).await)
    }

    async fn load_staged(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Snapshot>> {
        delegate!(self, s => s.load_staged(aggregate_type, aggregate_id).await)
    }

    fn staged_snapshots(&self, aggregate_type: &str) -> BoxStream<'static, Result<Snapshot>> {
        delegate!(self, s => s.staged_snapshots(aggregate_type))
    }

    async fn promote_staged(&self, aggregate_type: &str) -> Result<PromoteReport> {
        delegate!(self, s => s.promote_staged(aggregate_type).await)
    }

    async fn clear_staged(&self, aggregate_type: &str) -> Result<u64> {
        delegate!(self, s => s.clear_staged(aggregate_type).await)
    }
}

impl CheckpointStore for AnyStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<GlobalPosition>> {
        delegate!(self, s => s.load_checkpoint(name).await)
    }

    async fn save_checkpoint(&self, name: &str, position: GlobalPosition) -> Result<()> {
        delegate!(self, s => s.save_checkpoint(name, position).await)
    }

    async fn reset_checkpoint(&self, name: &str) -> Result<()> {
        delegate!(self, s => s.reset_checkpoint(name).await)
    }
}

impl annals::KeyStore for AnyStore {
    async fn load_key(&self, subject: &str) -> Result<Option<annals::gdpr::WrappedKey>> {
        delegate!(self, s => s.load_key(subject).await)
    }

    async fn insert_key(
        &self,
        subject: &str,
        key: &annals::gdpr::WrappedKey,
    ) -> Result<annals::gdpr::WrappedKey> {
        delegate!(self, s => s.insert_key(subject, key).await)
    }

    async fn forget_key(
        &self,
        subject: &str,
        record: &annals::gdpr::ErasureRecord,
    ) -> Result<bool> {
        delegate!(self, s => s.forget_key(subject, record).await)
    }

    async fn erasure(&self, subject: &str) -> Result<Option<annals::gdpr::ErasureRecord>> {
        delegate!(self, s => s.erasure(subject).await)
    }

    async fn import_keys(
        &self,
        import: &annals::gdpr::KeyImport,
    ) -> Result<annals::gdpr::KeyImportReport> {
        delegate!(self, s => s.import_keys(import).await)
    }

    async fn holds_keys(&self) -> Result<bool> {
        delegate!(self, s => s.holds_keys().await)
    }
}

impl annals::ProjectionControl for AnyStore {
    async fn live_partition_workers(&self, group: &str) -> Result<u32> {
        delegate!(self, s => s.live_partition_workers(group).await)
    }
    async fn acquire_projection_lock(
        &self,
        checkpoint: &str,
        owner: &str,
        token: &str,
        ttl: std::time::Duration,
    ) -> Result<annals::LockAttempt> {
        delegate!(self, s => s.acquire_projection_lock(checkpoint, owner, token, ttl).await)
    }
    async fn renew_projection_lock(
        &self,
        lock: &annals::ProjectionLock,
        ttl: std::time::Duration,
    ) -> Result<Option<annals::ProjectionLock>> {
        delegate!(self, s => s.renew_projection_lock(lock, ttl).await)
    }
    async fn release_projection_lock(&self, lock: &annals::ProjectionLock) -> Result<()> {
        delegate!(self, s => s.release_projection_lock(lock).await)
    }
    async fn save_checkpoint_fenced(
        &self,
        name: &str,
        position: annals::GlobalPosition,
        fence: &annals::Fence,
    ) -> Result<()> {
        delegate!(self, s => s.save_checkpoint_fenced(name, position, fence).await)
    }
    async fn reset_checkpoint_fenced(&self, name: &str, fence: &annals::Fence) -> Result<()> {
        delegate!(self, s => s.reset_checkpoint_fenced(name, fence).await)
    }
    async fn projection_lock(&self, checkpoint: &str) -> Result<Option<annals::ProjectionLock>> {
        delegate!(self, s => s.projection_lock(checkpoint).await)
    }
    async fn park_event(&self, letter: &annals::DeadLetter) -> Result<()> {
        delegate!(self, s => s.park_event(letter).await)
    }
    async fn dead_letters(&self, checkpoint: &str) -> Result<Vec<annals::DeadLetter>> {
        delegate!(self, s => s.dead_letters(checkpoint).await)
    }
    async fn drop_dead_letter(&self, checkpoint: &str, event_id: annals::EventId) -> Result<bool> {
        delegate!(self, s => s.drop_dead_letter(checkpoint, event_id).await)
    }
}

impl annals::Upcasting for AnyStore {
    fn with_upcasters(self, upcasters: Arc<Upcasters>) -> Self {
        AnyStore::with_upcasters(self, upcasters)
    }
    fn raw(&self) -> Self {
        AnyStore::raw(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            "sqlite://annals.db".parse::<DatabaseUrl>().expect("valid"),
            DatabaseUrl::Sqlite("annals.db".into())
        );
        assert_eq!(
            "sqlite:///tmp/x.db".parse::<DatabaseUrl>().expect("valid"),
            DatabaseUrl::Sqlite("/tmp/x.db".into())
        );
        assert_eq!(
            "sqlite:x.db".parse::<DatabaseUrl>().expect("valid"),
            DatabaseUrl::Sqlite("x.db".into())
        );
        for pg in ["postgres://u@h/db", "postgresql://u@h/db"] {
            assert_eq!(
                pg.parse::<DatabaseUrl>().expect("valid").backend(),
                Backend::Postgres
            );
        }
    }

    #[test]
    fn rejects_unknown_schemes_by_name() {
        let err = "mysql://u@h/db"
            .parse::<DatabaseUrl>()
            .expect_err("unsupported");
        assert!(err.to_string().contains("\"mysql\""), "{err}");
        let err = "annals.db".parse::<DatabaseUrl>().expect_err("no scheme");
        assert!(err.to_string().contains("no scheme"), "{err}");
        assert!("sqlite://".parse::<DatabaseUrl>().is_err());
    }

    #[test]
    fn never_displays_a_password() {
        let url: DatabaseUrl = "postgres://ann:s3cret@db.example:5432/x?sslmode=disable"
            .parse()
            .expect("valid");
        let shown = url.to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(
            shown,
            "postgres://ann:***@db.example:5432/x?sslmode=disable"
        );
        assert_eq!(
            redact_password("postgres://ann@h/db"),
            "postgres://ann@h/db"
        );
    }
}
