//! The store handle, its options and how it opens.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use annals::{Error, Result, Upcasters};

use crate::conn::Conns;
use crate::migrate;

/// Options of [`SqliteEventStore::open_with`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqliteOptions {
    /// Apply pending migrations when opening (default `true`). With `false`,
    /// a file whose schema is behind this build answers every operation with
    /// [`Error::SchemaVersion`] until [`SqliteEventStore::migrate`] runs.
    pub migrate_on_open: bool,
    /// Rows fetched per round trip by the lazy reads (default
    /// [`annals::DEFAULT_BATCH_SIZE`]). A read holds at most three pages:
    /// the one being consumed and two fetched ahead.
    pub batch_size: usize,
    /// Reader connections (default 4). Reads run on them beside the single
    /// writer connection.
    pub readers: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            migrate_on_open: true,
            batch_size: annals::DEFAULT_BATCH_SIZE,
            readers: 4,
        }
    }
}

/// An event, snapshot and checkpoint store in one SQLite file.
///
/// A cheap handle: clones share one writer thread and a pool of reader
/// threads, each owning its own connection. Implements every trait of the
/// core: [`annals::EventStore`], [`annals::StreamCatalog`],
/// [`annals::SnapshotStore`], [`annals::SnapshotAdmin`],
/// [`annals::SnapshotStaging`] and [`annals::CheckpointStore`].
#[derive(Clone)]
pub struct SqliteEventStore {
    pub(crate) inner: Arc<Inner>,
    /// Applied to every event a read returns; per handle, so that
    /// [`SqliteEventStore::raw`] shares the connections and reads as stored.
    upcasters: Option<Arc<Upcasters>>,
}

pub(crate) struct Inner {
    pub(crate) path: PathBuf,
    pub(crate) options: SqliteOptions,
    pub(crate) conns: Conns,
}

impl fmt::Debug for SqliteEventStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteEventStore")
            .field("path", &self.inner.path)
            .field("options", &self.inner.options)
            .field("upcasters", &self.upcasters)
            .finish()
    }
}

impl SqliteEventStore {
    /// Opens (creating it if missing) the store in the file at `path`, in WAL
    /// mode, and applies pending migrations.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    /// Opens the store at `path` with `options`.
    ///
    /// With `migrate_on_open: false` the open itself succeeds whatever the
    /// schema version, so that a tool can call [`SqliteEventStore::migrate`];
    /// every other operation fails with [`Error::SchemaVersion`] until the
    /// schema is current.
    pub async fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self> {
        if options.batch_size == 0 {
            return Err(Error::Config(
                "SqliteOptions::batch_size must be at least 1".into(),
            ));
        }
        if options.readers == 0 {
            return Err(Error::Config(
                "SqliteOptions::readers must be at least 1".into(),
            ));
        }
        let path = path.as_ref().to_owned();
        let conns = Conns::start(&path, options.readers).await?;
        let store = SqliteEventStore {
            inner: Arc::new(Inner {
                path,
                options,
                conns,
            }),
            upcasters: None,
        };
        if store.inner.options.migrate_on_open {
            store.migrate().await?;
        }
        Ok(store)
    }

    /// Applies the pending versioned migrations (recorded in
    /// `annals_migrations`). Idempotent; safe to run from two processes.
    /// Fails with [`Error::SchemaVersion`] when the file was migrated by a
    /// newer build.
    pub async fn migrate(&self) -> Result<()> {
        self.inner
            .conns
            .write_unchecked(|conn| migrate::migrate(conn).map(drop))
            .await?;
        self.inner.conns.set_schema_ok();
        Ok(())
    }

    /// The full DDL: every migration in order, each followed by its row in
    /// `annals_migrations`, so a file created from this script is at the
    /// current version (what `annals schema --backend sqlite` prints).
    pub fn schema_sql() -> String {
        migrate::schema_sql()
    }

    /// This store (the same file and threads) with every read upcast by
    /// `upcasters`: aggregate loads, `read_stream`, `read_all`, `read_event`,
    /// the metadata lookups and the snapshot jobs all see events at their
    /// current versions (see [`annals::Upcasters`]).
    pub fn with_upcasters(mut self, upcasters: Arc<Upcasters>) -> Self {
        self.upcasters = Some(upcasters);
        self
    }

    /// This store (the same file and threads) reading events as stored,
    /// without upcasters (what `annals read --raw` shows).
    pub fn raw(&self) -> Self {
        SqliteEventStore {
            inner: Arc::clone(&self.inner),
            upcasters: None,
        }
    }

    /// The upcasters this handle applies, if any.
    pub fn upcasters(&self) -> Option<&Arc<Upcasters>> {
        self.upcasters.as_ref()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// TEST HOOK, not part of the API (hidden from the docs, no stability
    /// promise): runs `f` as a job on the writer thread, after the schema
    /// check, the way every write runs. The tests use it to make a write job
    /// panic and check that the store survives.
    #[doc(hidden)]
    pub async fn test_hook_writer_job<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut rusqlite::Connection) -> T + Send + 'static,
    {
        self.inner.conns.write(move |conn| Ok(f(conn))).await
    }

    /// TEST HOOK, not part of the API (see
    /// [`SqliteEventStore::test_hook_writer_job`]): runs `f` as a job on a
    /// reader thread, picked and counted the way every read is.
    #[doc(hidden)]
    pub async fn test_hook_reader_job<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> T + Send + 'static,
    {
        self.inner.conns.read(move |conn| Ok(f(conn))).await
    }

    /// TEST HOOK, not part of the API: the jobs sent to each reader thread
    /// and not yet finished (the pool's accounting), in reader order.
    #[doc(hidden)]
    pub fn test_hook_reader_jobs_in_flight(&self) -> Vec<usize> {
        self.inner.conns.reader_jobs_in_flight()
    }

    /// TEST HOOK, not part of the API: runs `f` on the writer thread as a
    /// member of a group transaction, the way every append runs (inside the
    /// group's transaction; `f` must keep its writes in a savepoint of its
    /// own). The tests use it to put a member that panics, or one that makes
    /// the commit fail, into a group of appends.
    #[doc(hidden)]
    pub async fn test_hook_group_job<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut rusqlite::Connection) -> T + Send + 'static,
    {
        self.inner
            .conns
            .write_in_group(move |conn| Ok(f(conn)))
            .await
    }

    /// TEST HOOK, not part of the API: the group transactions the writer
    /// has run, and the appends queued for the writer and not yet
    /// taken into a group. The tests use them to gather a group of appends
    /// behind a blocked writer.
    #[doc(hidden)]
    pub fn test_hook_group_counters(&self) -> (usize, usize) {
        self.inner.conns.group_counters()
    }

    pub(crate) fn conns(&self) -> &Conns {
        &self.inner.conns
    }

    pub(crate) fn batch_size(&self) -> usize {
        self.inner.options.batch_size
    }
}

impl annals::Upcasting for SqliteEventStore {
    fn with_upcasters(self, upcasters: Arc<Upcasters>) -> Self {
        SqliteEventStore::with_upcasters(self, upcasters)
    }
    fn raw(&self) -> Self {
        SqliteEventStore::raw(self)
    }
}
