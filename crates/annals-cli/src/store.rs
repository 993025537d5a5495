//! One store type over every backend the CLI knows.
//!
//! The core functions ([`annals::Repository`], [`annals::fold_stream`], the
//! projection runner) are generic over the store traits, and the backend is
//! only known at run time from a URL. [`AnyStore`] closes that gap with an
//! enum rather than a trait object: the traits use `async fn` and are not
//! object safe, and an enum keeps every future `Send` with no boxing on the
//! append path. Each trait method is a one-line delegation written by a macro,
//! so adding a backend is one variant and one match arm per macro.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use annals::{
    AppendResult, CheckpointStore, Error, EventId, EventStore, EventStream, ExpectedVersion,
    GlobalPosition, NewEvent, PromoteReport, ReadAll, ReadStream, RecordedEvent, Result, Snapshot,
    SnapshotCoverage, SnapshotStore, SnapshotWrite, StaleSnapshot, StoreStats, StreamId,
    StreamInfo, StreamVersion,
};
use annals_postgres::{PgEventStore, PgOptions};
use annals_sqlite::{SqliteEventStore, SqliteOptions};
use futures::stream::BoxStream;

/// The URL used when neither `--database-url` nor `ANNALS_DATABASE_URL` is
/// given: an embedded SQLite file in the current directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://annals.db";

/// A backend name, as `annals schema --backend` takes it.
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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// PostgreSQL schema holding the tables (`None`: the driver default,
    /// usually `public`). Ignored by SQLite.
    pub pg_schema: Option<String>,
    /// Refuse to open an SQLite file that does not exist yet, instead of
    /// creating it. Read-only commands set this, so a mistyped path is an
    /// error rather than a new empty database.
    pub must_exist: bool,
}

/// A store on whichever backend a database URL selects.
///
/// It implements [`EventStore`], [`SnapshotStore`] and [`CheckpointStore`] by
/// delegating to the backend, so every generic function of the core works on
/// it.
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
                        "database file {} does not exist: check --database-url, or run `annals init` to create it",
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
                Ok(AnyStore::Sqlite(store))
            }
            DatabaseUrl::Postgres(url) => {
                let pg = PgOptions {
                    schema: options.pg_schema.clone(),
                    ..PgOptions::default()
                };
                Ok(AnyStore::Postgres(
                    PgEventStore::connect_with(url, pg).await?,
                ))
            }
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

    fn list_streams(&self, category: &str) -> BoxStream<'static, Result<StreamInfo>> {
        delegate!(self, s => s.list_streams(category))
    }

    async fn stats(&self) -> Result<StoreStats> {
        delegate!(self, s => s.stats().await)
    }

    async fn head_position(&self) -> Result<Option<GlobalPosition>> {
        delegate!(self, s => s.head_position().await)
    }

    async fn read_event(&self, id: EventId) -> Result<Option<RecordedEvent>> {
        delegate!(self, s => s.read_event(id).await)
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
