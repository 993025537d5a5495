//! The CLI's master key and the decrypting wrappers its commands read
//! through (see `annals::gdpr`).
//!
//! The master key comes from `ANNALS_MASTER_KEY`, else from the key file:
//! `--key-file PATH` (`ANNALS_KEY_FILE`), by default `<database file>.key`
//! beside an SQLite database (PostgreSQL has no default file). Only
//! `annals demo` creates the file, when no key is configured at all; every
//! other command refuses to guess: what needs plaintext fails with
//! `GdprError::NoMasterKeyOrFile` (or `NoMasterKey`) naming both places.
//!
//! Every command finds the key the same way ([`KeySource::new`]), `annals
//! check` and `annals serve` (its `/health`) included.
//!
//! The read commands (`read`, `read-all`, `event`, `aggregate`) decrypt when
//! a key is there and otherwise show each encrypted field as
//! `"[encrypted]"` (a forgotten subject's as `"[erased]"`); a wrong master
//! key is an error on every one of them. They read the store as stored and
//! decrypt, then upcast, each event here: the backends' decode path is not
//! involved. `--raw` shows the ciphertext as stored, and `export` writes it.

use std::path::PathBuf;
use std::sync::Arc;

use annals::bank::AccountEvent;
use annals::gdpr::{Crypto, EnvKeyProvider, EnvOrFileKeyProvider, KeyProvider, MASTER_KEY_VAR};
use annals::{upcast_event, GdprStore, RecordedEvent, Upcasters};

use crate::store::DatabaseUrl;
use crate::AnyStore;

/// The suffix of the default key file beside an SQLite database.
pub(crate) const KEY_FILE_SUFFIX: &str = ".key";

/// Where the master key comes from.
#[derive(Clone, Debug)]
pub(crate) enum KeySource {
    /// The variable, then a key file.
    EnvOrFile(EnvOrFileKeyProvider),
    /// The variable only (PostgreSQL without `--key-file`).
    Env(EnvKeyProvider),
}

impl KeySource {
    /// The key file, for a database URL and `--key-file`.
    pub(crate) fn new(url: &DatabaseUrl, key_file: Option<PathBuf>) -> Self {
        let file = key_file.or_else(|| match url {
            DatabaseUrl::Sqlite(path) => {
                let mut name = path.as_os_str().to_owned();
                name.push(KEY_FILE_SUFFIX);
                Some(PathBuf::from(name))
            }
            DatabaseUrl::Postgres(_) => None,
        });
        match file {
            Some(file) => KeySource::from_file(file),
            None => KeySource::Env(EnvKeyProvider::new(MASTER_KEY_VAR)),
        }
    }

    /// The variable, then `file`.
    pub(crate) fn from_file(file: PathBuf) -> Self {
        KeySource::EnvOrFile(EnvOrFileKeyProvider::new(MASTER_KEY_VAR, file))
    }

    /// The default source of an open store (no `--key-file`): for a
    /// [`MetricsServer`](crate::MetricsServer) built by a library user
    /// (`annals serve` and `annals check` take `--key-file` through
    /// [`KeySource::new`], like the read commands).
    pub(crate) fn of_store(store: &AnyStore) -> Self {
        let url = match store {
            AnyStore::Sqlite(s) => DatabaseUrl::Sqlite(s.path().to_owned()),
            _ => DatabaseUrl::Postgres(String::new()),
        };
        KeySource::new(&url, None)
    }

    pub(crate) fn provider(&self) -> Arc<dyn KeyProvider> {
        match self {
            KeySource::EnvOrFile(p) => Arc::new(p.clone()),
            KeySource::Env(p) => Arc::new(p.clone()),
        }
    }

    /// The crypto of the demo's domain over `store`'s key table (decryption
    /// needs no event types: it follows the stored `$enc` markers).
    pub(crate) fn crypto(&self, store: &AnyStore) -> Crypto<AnyStore> {
        Crypto::new::<AccountEvent>(store.raw(), self.provider())
    }
}

/// How a read command turns a stored event into what it prints.
#[derive(Clone, Debug)]
pub(crate) struct Reading {
    /// Redacting: `"[encrypted]"` without a master key.
    crypto: Crypto<AnyStore>,
    /// `false` with `--raw`: events as stored.
    decrypt: bool,
    upcasters: Option<Arc<Upcasters>>,
}

impl Reading {
    /// Decrypting (unless `raw`), then upcasting.
    pub(crate) fn new(
        crypto: Crypto<AnyStore>,
        raw: bool,
        upcasters: Option<Arc<Upcasters>>,
    ) -> Self {
        Reading {
            crypto: crypto.redact_without_master_key(),
            decrypt: !raw,
            upcasters,
        }
    }

    /// One stored event, as the command shows it.
    pub(crate) async fn apply(&self, event: RecordedEvent) -> annals::Result<RecordedEvent> {
        if !self.decrypt {
            return Ok(event);
        }
        let event = self.crypto.decrypt_event(event).await?;
        upcast_event(self.upcasters.as_deref(), event)
    }

    /// The store an aggregate loads through (`annals aggregate`):
    /// decrypting (redacting without a master key), then upcasting; with
    /// `--raw` nothing is upcast.
    pub(crate) fn ops_store(&self, raw: &AnyStore) -> crate::OpsStore {
        let mut store = GdprStore::new(raw.raw(), self.crypto.clone()).with_snapshot_subject(
            <annals::bank::Account as annals::Aggregate>::TYPE,
            annals::gdpr::SnapshotSubject::AggregateId,
        );
        if let Some(u) = &self.upcasters {
            store = store.with_upcasters(u.clone());
        }
        store
    }
}
