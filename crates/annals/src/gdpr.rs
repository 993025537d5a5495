//! GDPR erasure by crypto-shredding.
//!
//! An event type declares its personal fields and the field naming the
//! person they belong to (the *subject*) on the derive:
//! `#[event(personal(subject = "owner_id", fields("name", "email")))]`
//! (see [`PersonalData`]). Every subject gets its own random AES-256-GCM data
//! key, stored *wrapped* (encrypted by a master key) in a [`KeyStore`]; the
//! master key comes from a [`KeyProvider`] (by default the environment
//! variable `ANNALS_MASTER_KEY`, see [`EnvKeyProvider`]) and is never stored.
//!
//! The one place that encrypts and decrypts is [`GdprStore`], an
//! [`EventStore`] wrapper the application puts around the raw store handle
//! and hands to its [`Repository`](crate::Repository), projections and
//! readers:
//! - on append, each personal field with a value is replaced by
//!   `{"$enc": "<base64 nonce+ciphertext>", "$subject": "<subject id>"}`;
//!   the idempotency fingerprint is computed from the plaintext first and
//!   keyed by the subject's data key ([`NewEvent::with_fingerprint`]), so a
//!   retried append still deduplicates and the stored digest tells nothing
//!   about the plaintext once the key is deleted;
//! - on read, such values are decrypted *before* the upcasters run (the
//!   wrapper holds the upcasters; give it the inner store without any);
//! - for a forgotten subject ([`GdprStore::forget`]) each encrypted field
//!   reads as the string [`ERASED`] (`"[erased]"`), so aggregates and
//!   projections still load and rebuild (declare personal fields as strings
//!   or `Option<String>`);
//! - a key wrapped by another master key is [`GdprError::WrongMasterKey`],
//!   and a key that is missing without an erasure record is
//!   [`GdprError::KeyMissing`]: neither is ever read as erased data.
//!
//! Forgetting deletes the subject's key and records the erasure (a SHA-256
//! of the subject id, when, by whom: no personal data) in one call of the key
//! store, deletes the snapshots the caller names, and hands an
//! [`ErasureNotice`] to every [`ErasureHandler`] given (a projection scrubs
//! the subject's rows there).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload as AeadPayload};
use aes_gcm::{AeadCore, Aes256Gcm, Key, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{
    upcast::upcast_event, AppendResult, AppendSignal, DomainEvent, Error, EventId, EventStore,
    EventStream, ExpectedVersion, FeedPage, Fingerprint, GlobalPosition, NewEvent, Payload,
    ReadAll, ReadStream, RecordedEvent, Result, Snapshot, SnapshotStore, SnapshotWrite, StreamId,
    StreamVersion, Upcasters,
};

/// What a forgotten subject's personal fields read as.
pub const ERASED: &str = "[erased]";

/// What an encrypted field reads as through a [`Crypto`] that
/// [redacts](Crypto::redact_without_master_key) when no master key is
/// configured (the CLI's reads): the value exists, but cannot be shown.
pub const ENCRYPTED: &str = "[encrypted]";

/// The key of an encrypted field value (`{"$enc": .., "$subject": ..}`).
pub const ENC_KEY: &str = "$enc";
/// The key naming the subject in an encrypted field value.
pub const SUBJECT_KEY: &str = "$subject";

/// The environment variable [`EnvKeyProvider::default`] reads.
pub const MASTER_KEY_VAR: &str = "ANNALS_MASTER_KEY";

/// The personal data one event type carries: the payload field naming the
/// subject (kept in clear) and the personal fields (encrypted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersonalData {
    /// The field holding the subject's id (a string or a number).
    pub subject: &'static str,
    /// The personal fields, as serialized.
    pub fields: &'static [&'static str],
}

/// Everything that can go wrong with personal data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GdprError {
    /// No master key is configured.
    #[error(
        "no master key: set {var} to 32 bytes as 64 hex digits or base64 \
         (for example `openssl rand -hex 32`), or plug in a KeyProvider"
    )]
    NoMasterKey {
        /// The variable that was read.
        var: String,
    },
    /// The master key text is not 32 bytes of hex or base64.
    #[error("invalid master key in {source_name}: {reason}")]
    InvalidMasterKey {
        /// Where it came from (a variable or a file).
        source_name: String,
        /// What was wrong.
        reason: String,
    },
    /// The subject's data key was wrapped by another master key: the
    /// configured master key is wrong. Not erased data.
    #[error(
        "wrong master key for subject {subject:?}: its data key was wrapped by master key \
         {stored_key_id}, the configured one is {configured_key_id}"
    )]
    WrongMasterKey {
        /// The subject.
        subject: String,
        /// The id of the master key that wrapped the data key.
        stored_key_id: String,
        /// The id of the configured master key.
        configured_key_id: String,
    },
    /// An encrypted field's subject has no key and no erasure record: the
    /// key table lost a row, or the events come from another store without
    /// their keys (`annals import` of a version 1 export).
    #[error(
        "no data key for subject {subject:?} and no erasure recorded for it \
         (event {event_id} in stream {stream})"
    )]
    KeyMissing {
        /// The subject.
        subject: String,
        /// The event.
        event_id: EventId,
        /// Its stream.
        stream: String,
    },
    /// Decryption failed although the key matched its master key id: the
    /// ciphertext was altered.
    #[error("cannot decrypt field {field:?} of event {event_id} in stream {stream}: {reason}")]
    Corrupt {
        /// The field.
        field: String,
        /// The event.
        event_id: EventId,
        /// Its stream.
        stream: String,
        /// What failed.
        reason: String,
    },
    /// No master key in the environment variable nor in the key file.
    #[error(
        "no master key: set {var} to 32 bytes as 64 hex digits or base64 \
         (for example `openssl rand -hex 32`), or put them in the key file {}",
        file.display()
    )]
    NoMasterKeyOrFile {
        /// The variable that was read.
        var: String,
        /// The key file that does not exist.
        file: std::path::PathBuf,
    },
    /// An encrypted snapshot's subject has no key and no erasure record.
    #[error(
        "no data key for subject {subject:?} and no erasure recorded for it \
         (snapshot of {aggregate_type}/{aggregate_id})"
    )]
    SnapshotKeyMissing {
        /// The subject.
        subject: String,
        /// The aggregate type.
        aggregate_type: String,
        /// The aggregate id.
        aggregate_id: String,
    },
    /// An encrypted snapshot does not decrypt although its key matched the
    /// master key: the stored state was altered.
    #[error("cannot decrypt the snapshot of {aggregate_type}/{aggregate_id}: {reason}")]
    SnapshotCorrupt {
        /// The aggregate type.
        aggregate_type: String,
        /// The aggregate id.
        aggregate_id: String,
        /// What failed.
        reason: String,
    },
    /// A snapshot of a forgotten subject's aggregate was not stored: it
    /// would need a new data key for the subject (loads replay the events).
    #[error(
        "snapshot of {aggregate_type}/{aggregate_id} not stored: its subject {subject:?} \
         was forgotten"
    )]
    SubjectForgotten {
        /// The subject.
        subject: String,
        /// The aggregate type.
        aggregate_type: String,
        /// The aggregate id.
        aggregate_id: String,
    },
    /// An event with personal fields lacks its subject field.
    #[error(
        "event of type {event_type:?} declares personal data of the subject in field \
         {field:?}, but its payload has no such string or number"
    )]
    NoSubject {
        /// The event type.
        event_type: String,
        /// The subject field.
        field: String,
    },
    /// [`KeyStore::import_keys`] was given a data key for a subject that
    /// already has a different one: the two stores encrypted the subject's
    /// data with different keys, and one of them would become unreadable.
    /// Nothing was written.
    #[error(
        "subject {subject:?} already has a different data key (wrapped by master key \
         {stored_key_id}; the imported one is wrapped by {imported_key_id})"
    )]
    KeyConflict {
        /// The subject.
        subject: String,
        /// The master key id of the key already stored.
        stored_key_id: String,
        /// The master key id of the key being imported.
        imported_key_id: String,
    },
}

impl GdprError {
    /// As an [`Error`] (boxed in [`Error::Gdpr`]).
    pub fn into_error(self) -> Error {
        Error::Gdpr(Box::new(self))
    }
}

/// A 32-byte master key. Its [`id`](MasterKey::id) (a hash, not the key) is
/// stored beside each data key it wraps, so a wrong key is recognised.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.id())
    }
}

impl MasterKey {
    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MasterKey(bytes)
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        let key = Aes256Gcm::generate_key(OsRng);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&key);
        MasterKey(bytes)
    }

    /// Parses 64 hex digits or the base64 of 32 bytes (surrounding
    /// whitespace ignored); `source_name` names where the text came from.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, GdprError> {
        let text = text.trim();
        let invalid = |reason: String| GdprError::InvalidMasterKey {
            source_name: source_name.to_owned(),
            reason,
        };
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|e| invalid(e.to_string()))?
        } else {
            B64.decode(text)
                .map_err(|e| invalid(format!("neither 64 hex digits nor base64 ({e})")))?
        };
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| invalid(format!("{} bytes, expected 32", b.len())))?;
        Ok(MasterKey(bytes))
    }

    /// The key as 64 hex digits (what a key file holds).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The key's id: the first 8 bytes of a SHA-256 of it, in hex.
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"annals master key id\0");
        h.update(self.0);
        h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&self.0))
    }
}

/// The idempotency fingerprint of an event with personal data, keyed by its
/// subject's data key: SHA-256 over a key derived from the data key (the
/// data key's encryption of a fixed label under a fixed nonce, a function
/// of the key alone) and the plaintext fingerprint. A retried append
/// computes the same value with the same key, so it still deduplicates;
/// once the key is deleted (`forget`), no one can test a guessed name or
/// e-mail against the stored digest, as they could against a plain SHA-256
/// of the plaintext.
fn keyed_fingerprint(cipher: &Aes256Gcm, plain: &Fingerprint) -> Result<Fingerprint> {
    let derived = cipher
        .encrypt(
            Nonce::from_slice(&[0u8; 12]),
            AeadPayload {
                msg: b"annals fingerprint key",
                aad: b"annals fingerprint key",
            },
        )
        .map_err(|e| Error::Config(format!("cannot derive a fingerprint key: {e}")))?;
    let mut h = Sha256::new();
    h.update(b"annals keyed fingerprint\0");
    h.update(&derived);
    h.update(plain.as_bytes());
    Ok(Fingerprint::from_bytes(h.finalize().into()))
}

/// Supplies the master key. Implement it to take the key from a KMS or
/// Vault; [`EnvKeyProvider`] reads an environment variable, and a
/// [`MasterKey`] is its own provider.
pub trait KeyProvider: Send + Sync + 'static {
    /// The master key, or why there is none.
    fn master_key(&self) -> Result<MasterKey, GdprError>;
}

impl KeyProvider for MasterKey {
    fn master_key(&self) -> Result<MasterKey, GdprError> {
        Ok(self.clone())
    }
}

/// Reads the master key from an environment variable (default
/// [`MASTER_KEY_VAR`]) each time it is asked.
#[derive(Debug, Clone)]
pub struct EnvKeyProvider {
    var: String,
}

impl EnvKeyProvider {
    /// Reads `var`.
    pub fn new(var: impl Into<String>) -> Self {
        EnvKeyProvider { var: var.into() }
    }
}

impl Default for EnvKeyProvider {
    fn default() -> Self {
        EnvKeyProvider::new(MASTER_KEY_VAR)
    }
}

impl KeyProvider for EnvKeyProvider {
    fn master_key(&self) -> Result<MasterKey, GdprError> {
        match std::env::var(&self.var) {
            Ok(text) if !text.trim().is_empty() => MasterKey::parse(&text, &self.var),
            _ => Err(GdprError::NoMasterKey {
                var: self.var.clone(),
            }),
        }
    }
}

/// Reads the master key from an environment variable, or when that is unset
/// from a key file (64 hex digits or base64; what
/// [`EnvOrFileKeyProvider::generate_file`] writes). The CLI's provider: the
/// key file lies beside the SQLite database.
#[derive(Debug, Clone)]
pub struct EnvOrFileKeyProvider {
    var: String,
    file: std::path::PathBuf,
}

impl EnvOrFileKeyProvider {
    /// Reads `var`, else `file`.
    pub fn new(var: impl Into<String>, file: impl Into<std::path::PathBuf>) -> Self {
        EnvOrFileKeyProvider {
            var: var.into(),
            file: file.into(),
        }
    }

    /// The key file.
    pub fn file(&self) -> &std::path::Path {
        &self.file
    }

    /// Whether a master key is configured (the variable is set or the file
    /// exists), without reading it.
    pub fn is_configured(&self) -> bool {
        std::env::var(&self.var).is_ok_and(|t| !t.trim().is_empty()) || self.file.exists()
    }

    /// Writes a fresh random master key to the key file, readable and
    /// writable by its owner only (mode 0600 on Unix), refusing to replace
    /// an existing file; returns the key.
    pub fn generate_file(&self) -> std::io::Result<MasterKey> {
        let key = MasterKey::generate();
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&self.file)?;
        std::io::Write::write_all(&mut file, format!("{}\n", key.to_hex()).as_bytes())?;
        file.sync_all()?;
        Ok(key)
    }
}

impl KeyProvider for EnvOrFileKeyProvider {
    fn master_key(&self) -> Result<MasterKey, GdprError> {
        match std::env::var(&self.var) {
            Ok(text) if !text.trim().is_empty() => return MasterKey::parse(&text, &self.var),
            _ => {}
        }
        match std::fs::read_to_string(&self.file) {
            Ok(text) => MasterKey::parse(&text, &self.file.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(GdprError::NoMasterKeyOrFile {
                    var: self.var.clone(),
                    file: self.file.clone(),
                })
            }
            Err(e) => Err(GdprError::InvalidMasterKey {
                source_name: self.file.display().to_string(),
                reason: format!("cannot read it: {e}"),
            }),
        }
    }
}

/// A subject's data key as stored: encrypted by a master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// The [`MasterKey::id`] of the master key that wrapped it.
    pub master_key_id: String,
    /// Nonce (12 bytes) and ciphertext of the 32-byte data key.
    pub wrapped: Vec<u8>,
}

/// One recorded erasure. No personal data: the subject appears only hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureRecord {
    /// [`subject_hash`] of the subject.
    pub subject_hash: String,
    /// When it was forgotten.
    pub erased_at: DateTime<Utc>,
    /// Who asked (an operator, a ticket).
    pub erased_by: String,
}

/// A subject's wrapped data key, as an export carries it to another store
/// (see [`KeyStore::import_keys`]). Still wrapped: only the master key that
/// wrapped it opens it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectKey {
    /// The subject.
    pub subject: String,
    /// Its wrapped data key.
    pub key: WrappedKey,
}

/// What [`KeyStore::import_keys`] writes, in one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyImport {
    /// Wrapped keys to store (each unless the subject has it already).
    pub keys: Vec<SubjectKey>,
    /// Subjects forgotten where the keys come from: their keys are deleted
    /// here too, so the erasure holds in this store as well.
    pub forget: Vec<String>,
    /// Erasure records to add (each unless an identical one is there).
    pub erasures: Vec<ErasureRecord>,
}

/// What [`KeyStore::import_keys`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyImportReport {
    /// Keys stored.
    pub keys_inserted: u64,
    /// Keys that were stored identically already.
    pub keys_present: u64,
    /// Keys of forgotten subjects deleted.
    pub keys_deleted: u64,
    /// Erasure records added.
    pub erasures_recorded: u64,
    /// Erasure records that were there already.
    pub erasures_present: u64,
}

/// Whether two erasure records are the same: the timestamps are compared to
/// the microsecond, what every backend stores.
pub fn same_erasure(a: &ErasureRecord, b: &ErasureRecord) -> bool {
    a.subject_hash == b.subject_hash
        && a.erased_by == b.erased_by
        && a.erased_at.timestamp_micros() == b.erased_at.timestamp_micros()
}

/// The hex SHA-256 of a subject id: how the erasure log names subjects.
pub fn subject_hash(subject: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"annals subject\0");
    h.update(subject.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Where wrapped data keys and the erasure log live: one table each per
/// backend (memory, SQLite, PostgreSQL, `AnyStore`).
pub trait KeyStore: Clone + Send + Sync + 'static {
    /// The subject's wrapped key, if it has one.
    fn load_key(&self, subject: &str) -> impl Future<Output = Result<Option<WrappedKey>>> + Send;

    /// Stores `key` for `subject` unless it already has one (a concurrent
    /// writer won); returns the key stored now.
    fn insert_key(
        &self,
        subject: &str,
        key: &WrappedKey,
    ) -> impl Future<Output = Result<WrappedKey>> + Send;

    /// Deletes the subject's key and appends `record` to the erasure log, in
    /// one transaction; returns whether a key was deleted. Forgetting twice
    /// records twice.
    fn forget_key(
        &self,
        subject: &str,
        record: &ErasureRecord,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// The latest erasure recorded for a subject (by [`subject_hash`]).
    fn erasure(&self, subject: &str) -> impl Future<Output = Result<Option<ErasureRecord>>> + Send;

    /// Imports keys and erasures from another store (`annals import`), all
    /// or nothing, in one transaction: stores each key of `import.keys`
    /// whose subject has none (an identical key is counted as present),
    /// deletes the keys of `import.forget`, and appends each record of
    /// `import.erasures` unless an identical one ([`same_erasure`]) is
    /// logged. A subject that has a *different* key is
    /// [`GdprError::KeyConflict`] (the first one in `import.keys` order),
    /// and then nothing is written. Running it twice changes nothing the
    /// second time.
    fn import_keys(
        &self,
        import: &KeyImport,
    ) -> impl Future<Output = Result<KeyImportReport>> + Send;

    /// Whether any data key or erasure record is stored (an export of a
    /// store without personal data skips looking for subjects).
    fn holds_keys(&self) -> impl Future<Output = Result<bool>> + Send;
}

/// The [`GdprError::KeyConflict`] of an imported key, if the stored one
/// differs; for the backends' [`KeyStore::import_keys`].
pub fn key_conflict(subject: &str, stored: &WrappedKey, imported: &WrappedKey) -> Option<Error> {
    (stored != imported).then(|| {
        GdprError::KeyConflict {
            subject: subject.to_owned(),
            stored_key_id: stored.master_key_id.clone(),
            imported_key_id: imported.master_key_id.clone(),
        }
        .into_error()
    })
}

/// What a projection is told when a subject is forgotten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureNotice {
    /// The subject id (the read model's rows are keyed by it).
    pub subject: String,
    /// The erasure record.
    pub record: ErasureRecord,
}

/// A read model that scrubs a forgotten subject's rows. Handed to
/// [`GdprStore::forget`]; called after the key is gone.
pub trait ErasureHandler: Send + Sync {
    /// Removes or blanks whatever the read model keeps about `notice.subject`.
    fn on_erasure<'a>(
        &'a self,
        notice: &'a ErasureNotice,
    ) -> futures::future::BoxFuture<'a, Result<()>>;
}

/// The outcome of [`GdprStore::forget`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forgotten {
    /// Whether the subject had a key (false: nothing was encrypted for it,
    /// or it was already forgotten).
    pub key_deleted: bool,
    /// Snapshots deleted.
    pub snapshots_deleted: u64,
    /// The erasure recorded.
    pub record: ErasureRecord,
}

type PersonalLookup = fn(&str) -> Option<PersonalData>;

/// The personal data declarations, the key store and the master key: what
/// encrypts and decrypts.
#[derive(Clone)]
pub struct Crypto<K> {
    keys: K,
    provider: Arc<dyn KeyProvider>,
    lookups: Vec<PersonalLookup>,
    redact: bool,
}

impl<K> fmt::Debug for Crypto<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Crypto")
            .field("event_enums", &self.lookups.len())
            .finish_non_exhaustive()
    }
}

impl<K: KeyStore> Crypto<K> {
    /// Encrypts the personal data `E` declares, with keys in `keys` wrapped
    /// by `provider`'s master key.
    pub fn new<E: DomainEvent>(keys: K, provider: Arc<dyn KeyProvider>) -> Self {
        Crypto {
            keys,
            provider,
            lookups: vec![E::personal_data],
            redact: false,
        }
    }

    /// Reads an encrypted field of a subject that still has its key as
    /// [`ENCRYPTED`] when the provider has no master key
    /// ([`GdprError::NoMasterKey`]), instead of failing; a snapshot then
    /// reads as absent (loads replay the events). For inspection tools
    /// that show what they can: a *wrong* master key is still an error,
    /// and appends still need the key.
    pub fn redact_without_master_key(mut self) -> Self {
        self.redact = true;
        self
    }

    /// The master key for a read: `Ok(None)` when there is none and this
    /// crypto redacts.
    fn master_for_read(&self) -> Result<Option<MasterKey>> {
        match self.provider.master_key() {
            Ok(m) => Ok(Some(m)),
            Err(GdprError::NoMasterKey { .. } | GdprError::NoMasterKeyOrFile { .. })
                if self.redact =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into_error()),
        }
    }

    /// Also the personal data of another event enum.
    pub fn with_events<E: DomainEvent>(mut self) -> Self {
        self.lookups.push(E::personal_data);
        self
    }

    /// The key store.
    pub fn keys(&self) -> &K {
        &self.keys
    }

    fn personal(&self, event_type: &str) -> Option<PersonalData> {
        self.lookups.iter().find_map(|f| f(event_type))
    }

    /// Checks that the master key is configured (and well formed).
    pub fn check_master_key(&self) -> Result<MasterKey> {
        self.provider.master_key().map_err(GdprError::into_error)
    }

    fn unwrap_key(&self, subject: &str, master: &MasterKey, key: &WrappedKey) -> Result<Aes256Gcm> {
        let wrong = || GdprError::WrongMasterKey {
            subject: subject.to_owned(),
            stored_key_id: key.master_key_id.clone(),
            configured_key_id: master.id(),
        };
        if key.master_key_id != master.id() || key.wrapped.len() < 12 {
            return Err(wrong().into_error());
        }
        let (nonce, ct) = key.wrapped.split_at(12);
        let aad = format!("annals data key\0{subject}");
        let dek = master
            .cipher()
            .decrypt(
                Nonce::from_slice(nonce),
                AeadPayload {
                    msg: ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| wrong().into_error())?;
        if dek.len() != 32 {
            return Err(wrong().into_error());
        }
        Ok(Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&dek)))
    }

    /// The subject's data key, created (and stored wrapped) if it has none.
    async fn key_for_write(&self, subject: &str, master: &MasterKey) -> Result<Aes256Gcm> {
        if let Some(k) = self.keys.load_key(subject).await? {
            return self.unwrap_key(subject, master, &k);
        }
        let dek = Aes256Gcm::generate_key(OsRng);
        let nonce = Aes256Gcm::generate_nonce(OsRng);
        let aad = format!("annals data key\0{subject}");
        let ct = master
            .cipher()
            .encrypt(
                &nonce,
                AeadPayload {
                    msg: dek.as_slice(),
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|e| Error::Config(format!("cannot wrap a data key: {e}")))?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&ct);
        let stored = self
            .keys
            .insert_key(
                subject,
                &WrappedKey {
                    master_key_id: master.id(),
                    wrapped,
                },
            )
            .await?;
        self.unwrap_key(subject, master, &stored)
    }

    /// Encrypts the personal fields of a batch (events of undeclared types
    /// pass unchanged), fingerprinting each changed event's plaintext first.
    pub async fn encrypt_batch(
        &self,
        stream: &StreamId,
        events: Vec<NewEvent>,
    ) -> Result<Vec<NewEvent>> {
        let mut master = None;
        let mut keys: HashMap<String, Aes256Gcm> = HashMap::new();
        let mut out = Vec::with_capacity(events.len());
        for mut e in events {
            let Some(pd) = self.personal(&e.event_type) else {
                out.push(e);
                continue;
            };
            let Some(obj) = e.data.as_object() else {
                out.push(e);
                continue;
            };
            if !pd
                .fields
                .iter()
                .any(|f| obj.get(*f).is_some_and(|v| !v.is_null()))
            {
                out.push(e);
                continue;
            }
            let subject = match obj.get(pd.subject) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => {
                    return Err(GdprError::NoSubject {
                        event_type: e.event_type.clone(),
                        field: pd.subject.to_owned(),
                    }
                    .into_error())
                }
            };
            let m = match master.take() {
                Some(m) => m,
                None => self.provider.master_key().map_err(GdprError::into_error)?,
            };
            let cipher = match keys.remove(&subject) {
                Some(k) => k,
                None => self.key_for_write(&subject, &m).await?,
            };
            master = Some(m);
            if e.fingerprint.is_none() {
                let fp = Fingerprint::of_value(&e.data).map_err(|_| Error::InvalidEvent {
                    stream: stream.clone(),
                    reason: format!("event {} is nested too deep", e.event_id),
                })?;
                e.fingerprint = Some(keyed_fingerprint(&cipher, &fp)?);
            }
            let mut data = std::mem::take(&mut e.data);
            for field in pd.fields {
                let Some(obj) = data.as_object_mut() else {
                    break;
                };
                let Some(v) = obj.get_mut(*field) else {
                    continue;
                };
                if v.is_null() {
                    continue;
                }
                let plain = serde_json::to_vec(v).map_err(|err| Error::Encode {
                    what: format!("personal field {field:?} of {}", e.event_type),
                    source: err,
                })?;
                let nonce = Aes256Gcm::generate_nonce(OsRng);
                let ct = cipher
                    .encrypt(
                        &nonce,
                        AeadPayload {
                            msg: &plain,
                            aad: field.as_bytes(),
                        },
                    )
                    .map_err(|err| Error::Config(format!("cannot encrypt: {err}")))?;
                let mut blob = nonce.to_vec();
                blob.extend_from_slice(&ct);
                *v = serde_json::json!({ ENC_KEY: B64.encode(blob), SUBJECT_KEY: subject });
            }
            e.data = data;
            keys.insert(subject, cipher);
            out.push(e);
        }
        Ok(out)
    }

    /// Decrypts every encrypted top-level field of a stored event; a
    /// forgotten subject's fields become [`ERASED`]. An event without
    /// encrypted fields is handed back unchanged (not reparsed).
    pub async fn decrypt_event(&self, mut event: RecordedEvent) -> Result<RecordedEvent> {
        if !event.data.as_str().contains("\"$enc\"") {
            return Ok(event);
        }
        let decode_err = |e: serde_json::Error| Error::Decode {
            stream: event.stream_id.clone(),
            version: event.stream_version,
            event_type: event.event_type.clone(),
            event_version: event.event_version,
            source: e,
        };
        let mut value = event.data.to_value().map_err(decode_err)?;
        let Some(obj) = value.as_object_mut() else {
            return Ok(event);
        };
        let mut master: Option<Option<MasterKey>> = None;
        // None: erased; Some(None): redacted (no master key).
        let mut keys: HashMap<String, Option<Option<Aes256Gcm>>> = HashMap::new();
        for (field, v) in obj.iter_mut() {
            let Some(enc) = v.as_object() else { continue };
            let (Some(Value::String(blob)), Some(Value::String(subject))) =
                (enc.get(ENC_KEY), enc.get(SUBJECT_KEY))
            else {
                continue;
            };
            let subject = subject.clone();
            let corrupt = |reason: String| GdprError::Corrupt {
                field: field.clone(),
                event_id: event.event_id,
                stream: event.stream_id.to_string(),
                reason,
            };
            let blob = B64
                .decode(blob)
                .map_err(|e| corrupt(e.to_string()).into_error())?;
            if !keys.contains_key(&subject) {
                let key = match self.keys.load_key(&subject).await? {
                    Some(k) => {
                        let m = match master.take() {
                            Some(m) => m,
                            None => self.master_for_read()?,
                        };
                        let cipher = match &m {
                            Some(m) => Some(self.unwrap_key(&subject, m, &k)?),
                            None => None,
                        };
                        master = Some(m);
                        Some(cipher)
                    }
                    None => {
                        if self.keys.erasure(&subject).await?.is_none() {
                            return Err(GdprError::KeyMissing {
                                subject,
                                event_id: event.event_id,
                                stream: event.stream_id.to_string(),
                            }
                            .into_error());
                        }
                        None
                    }
                };
                keys.insert(subject.clone(), key);
            }
            *v = match keys.get(&subject) {
                Some(Some(None)) => Value::String(ENCRYPTED.to_owned()),
                Some(Some(Some(cipher))) => {
                    if blob.len() < 12 {
                        return Err(corrupt("ciphertext too short".into()).into_error());
                    }
                    let (nonce, ct) = blob.split_at(12);
                    let plain = cipher
                        .decrypt(
                            Nonce::from_slice(nonce),
                            AeadPayload {
                                msg: ct,
                                aad: field.as_bytes(),
                            },
                        )
                        .map_err(|e| corrupt(e.to_string()).into_error())?;
                    serde_json::from_slice(&plain)
                        .map_err(|e| corrupt(e.to_string()).into_error())?
                }
                _ => Value::String(ERASED.to_owned()),
            };
        }
        event.data = Payload::from_value(&value).map_err(decode_err)?;
        Ok(event)
    }
}

impl<K: KeyStore> Crypto<K> {
    fn snapshot_aad(aggregate_type: &str, aggregate_id: &str) -> String {
        format!("annals snapshot\0{aggregate_type}\0{aggregate_id}")
    }

    /// Encrypts a snapshot's whole state with `subject`'s data key. A
    /// subject without a key never had an event encrypted (its data is in
    /// clear in the log), so its snapshot is handed back in clear; a
    /// forgotten subject's is refused ([`GdprError::SubjectForgotten`]).
    /// Encrypted, the state becomes
    /// `{"$enc": "<base64 nonce+ciphertext>", "$subject": "<id>"}`, bound to
    /// the aggregate (a state cannot be moved to another one).
    pub async fn encrypt_snapshot(&self, subject: &str, snapshot: &Snapshot) -> Result<Snapshot> {
        let Some(key) = self.keys.load_key(subject).await? else {
            if self.keys.erasure(subject).await?.is_some() {
                return Err(GdprError::SubjectForgotten {
                    subject: subject.to_owned(),
                    aggregate_type: snapshot.aggregate_type.clone(),
                    aggregate_id: snapshot.aggregate_id.clone(),
                }
                .into_error());
            }
            // No key: none of the subject's events was encrypted, its data
            // is in clear in the log already.
            return Ok(snapshot.clone());
        };
        let master = self.provider.master_key().map_err(GdprError::into_error)?;
        let cipher = self.unwrap_key(subject, &master, &key)?;
        let plain = serde_json::to_vec(&snapshot.state).map_err(|e| Error::Encode {
            what: format!(
                "snapshot of {}/{}",
                snapshot.aggregate_type, snapshot.aggregate_id
            ),
            source: e,
        })?;
        let nonce = Aes256Gcm::generate_nonce(OsRng);
        let aad = Self::snapshot_aad(&snapshot.aggregate_type, &snapshot.aggregate_id);
        let ct = cipher
            .encrypt(
                &nonce,
                AeadPayload {
                    msg: &plain,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|err| Error::Config(format!("cannot encrypt: {err}")))?;
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ct);
        let mut out = snapshot.clone();
        out.state = serde_json::json!({ ENC_KEY: B64.encode(blob), SUBJECT_KEY: subject });
        Ok(out)
    }

    /// Decrypts a snapshot that [`Crypto::encrypt_snapshot`] wrote; a
    /// snapshot in clear is handed back as it is. `Ok(None)`: unreadable
    /// because its subject was forgotten (or, when redacting, because there
    /// is no master key). A wrong master key is
    /// [`GdprError::WrongMasterKey`], a subject without key and erasure
    /// record [`GdprError::SnapshotKeyMissing`].
    pub async fn decrypt_snapshot(&self, snapshot: Snapshot) -> Result<SnapshotRead> {
        let Some((blob, subject)) = encrypted_parts(&snapshot.state) else {
            return Ok(SnapshotRead::Plain(snapshot));
        };
        let subject = subject.to_owned();
        let corrupt = |reason: String| {
            GdprError::SnapshotCorrupt {
                aggregate_type: snapshot.aggregate_type.clone(),
                aggregate_id: snapshot.aggregate_id.clone(),
                reason,
            }
            .into_error()
        };
        let blob = B64.decode(blob).map_err(|e| corrupt(e.to_string()))?;
        let Some(key) = self.keys.load_key(&subject).await? else {
            if self.keys.erasure(&subject).await?.is_some() {
                return Ok(SnapshotRead::Erased { subject });
            }
            return Err(GdprError::SnapshotKeyMissing {
                subject,
                aggregate_type: snapshot.aggregate_type.clone(),
                aggregate_id: snapshot.aggregate_id.clone(),
            }
            .into_error());
        };
        let Some(master) = self.master_for_read()? else {
            return Ok(SnapshotRead::Redacted);
        };
        let cipher = self.unwrap_key(&subject, &master, &key)?;
        if blob.len() < 12 {
            return Err(corrupt("ciphertext too short".into()));
        }
        let (nonce, ct) = blob.split_at(12);
        let aad = Self::snapshot_aad(&snapshot.aggregate_type, &snapshot.aggregate_id);
        let plain = cipher
            .decrypt(
                Nonce::from_slice(nonce),
                AeadPayload {
                    msg: ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|e| corrupt(e.to_string()))?;
        let state = serde_json::from_slice(&plain).map_err(|e| corrupt(e.to_string()))?;
        let mut out = snapshot;
        out.state = state;
        Ok(SnapshotRead::Decrypted(out))
    }
}

/// The `$enc` blob and `$subject` of an encrypted value, if it is one.
fn encrypted_parts(v: &Value) -> Option<(&str, &str)> {
    let obj = v.as_object()?;
    match (obj.get(ENC_KEY), obj.get(SUBJECT_KEY)) {
        (Some(Value::String(blob)), Some(Value::String(subject))) => Some((blob, subject)),
        _ => None,
    }
}

/// The subjects whose data keys encrypt a stored payload: those named by
/// its encrypted top-level fields (an event), or by the payload itself (an
/// encrypted snapshot state). What `annals export` carries keys for.
pub fn encrypted_subjects(value: &Value) -> Vec<&str> {
    if let Some((_, subject)) = encrypted_parts(value) {
        return vec![subject];
    }
    value
        .as_object()
        .map(|obj| {
            obj.values()
                .filter_map(|v| encrypted_parts(v).map(|(_, s)| s))
                .collect()
        })
        .unwrap_or_default()
}

/// What [`Crypto::decrypt_snapshot`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum SnapshotRead {
    /// The snapshot was stored in clear.
    Plain(Snapshot),
    /// Decrypted.
    Decrypted(Snapshot),
    /// Encrypted for a forgotten subject: unreadable for good.
    Erased {
        /// The subject.
        subject: String,
    },
    /// Encrypted, and the crypto redacts without a master key.
    Redacted,
}

/// Where the subject of an aggregate's snapshot is found
/// ([`GdprSnapshots::aggregate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotSubject {
    /// The aggregate id is the subject (the bank example's `Account`: its
    /// `Opened` names the account as the subject).
    AggregateId,
    /// A top-level string or number field of the state names the subject;
    /// a state without it holds no one's personal data and stays in clear.
    StateField(String),
}

/// A [`SnapshotStore`] wrapper that encrypts the snapshots of aggregates
/// holding personal data with their subject's data key, so the plaintext
/// reaches no table; the repository of a [`GdprStore`] takes it as its
/// snapshot store.
///
/// - `save_snapshot` of a declared aggregate type stores the state
///   encrypted (see [`Crypto::encrypt_snapshot`]); other types pass in clear.
/// - `load_snapshot` decrypts any encrypted state. A snapshot of a forgotten
///   subject is unreadable: it is deleted and the load sees none, so the
///   repository replays the events, whose personal fields read as
///   [`ERASED`]. A wrong master key is an error, never a missing snapshot
///   (the repository reports it instead of replaying).
/// - [`GdprSnapshots::forget_snapshots`] deletes at once the snapshots a
///   subject's key encrypts where the aggregate id is the subject.
#[derive(Clone, Debug)]
pub struct GdprSnapshots<N, K> {
    inner: N,
    crypto: Crypto<K>,
    aggregates: Arc<Vec<(String, SnapshotSubject)>>,
}

impl<N: SnapshotStore, K: KeyStore> GdprSnapshots<N, K> {
    /// Wraps `inner`; declare the aggregates with [`GdprSnapshots::aggregate`].
    pub fn new(inner: N, crypto: Crypto<K>) -> Self {
        GdprSnapshots {
            inner,
            crypto,
            aggregates: Arc::new(Vec::new()),
        }
    }

    /// Encrypts the snapshots of `aggregate_type`, whose subject is found
    /// as `subject` says.
    pub fn aggregate(
        mut self,
        aggregate_type: impl Into<String>,
        subject: SnapshotSubject,
    ) -> Self {
        Arc::make_mut(&mut self.aggregates).push((aggregate_type.into(), subject));
        self
    }

    /// The wrapped store (loads return ciphertext, as stored).
    pub fn inner(&self) -> &N {
        &self.inner
    }

    /// Deletes the snapshots of `subject` among the declared aggregate types
    /// whose subject is the aggregate id; returns how many. (Snapshots whose
    /// subject is a state field are unreadable once the key is gone, and
    /// deleted when next loaded.)
    pub async fn forget_snapshots(&self, subject: &str) -> Result<u64> {
        let mut n = 0;
        for (t, how) in self.aggregates.iter() {
            if *how == SnapshotSubject::AggregateId {
                n += self.inner.delete_snapshot(t, subject).await?;
            }
        }
        Ok(n)
    }

    fn subject_of(&self, snapshot: &Snapshot) -> Option<String> {
        let (_, how) = self
            .aggregates
            .iter()
            .find(|(t, _)| *t == snapshot.aggregate_type)?;
        match how {
            SnapshotSubject::AggregateId => Some(snapshot.aggregate_id.clone()),
            SnapshotSubject::StateField(f) => match snapshot.state.get(f) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            },
        }
    }
}

impl<N: SnapshotStore, K: KeyStore> SnapshotStore for GdprSnapshots<N, K> {
    async fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Snapshot>> {
        let Some(snap) = self
            .inner
            .load_snapshot(aggregate_type, aggregate_id)
            .await?
        else {
            return Ok(None);
        };
        match self.crypto.decrypt_snapshot(snap).await? {
            SnapshotRead::Plain(s) | SnapshotRead::Decrypted(s) => Ok(Some(s)),
            SnapshotRead::Erased { .. } => {
                self.inner
                    .delete_snapshot(aggregate_type, aggregate_id)
                    .await?;
                Ok(None)
            }
            SnapshotRead::Redacted => Ok(None),
        }
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<SnapshotWrite> {
        match self.subject_of(snapshot) {
            Some(subject) => {
                let enc = self.crypto.encrypt_snapshot(&subject, snapshot).await?;
                self.inner.save_snapshot(&enc).await
            }
            None => self.inner.save_snapshot(snapshot).await,
        }
    }

    fn delete_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> impl Future<Output = Result<u64>> + Send {
        self.inner.delete_snapshot(aggregate_type, aggregate_id)
    }
}

/// An [`EventStore`] that encrypts personal fields on append and decrypts
/// them (then upcasts) on read: the one place that does it, for every path
/// that goes through it (repository loads and saves, `read_stream`,
/// `read_all`, `read_event`, the feed pages subscriptions and projections
/// read). Wrap the store handle *without* upcasters and give the upcasters
/// to this wrapper ([`GdprStore::with_upcasters`]), so they see plaintext.
#[derive(Clone, Debug)]
pub struct GdprStore<S, K> {
    inner: S,
    crypto: Crypto<K>,
    upcasters: Option<Arc<Upcasters>>,
    snapshot_subjects: Arc<Vec<(String, SnapshotSubject)>>,
}

impl<S: EventStore, K: KeyStore> GdprStore<S, K> {
    /// Wraps `inner` (a handle without upcasters).
    pub fn new(inner: S, crypto: Crypto<K>) -> Self {
        GdprStore {
            inner,
            crypto,
            upcasters: None,
            snapshot_subjects: Arc::new(Vec::new()),
        }
    }

    /// Upcasts every read, after decryption.
    pub fn with_upcasters(mut self, upcasters: Arc<Upcasters>) -> Self {
        self.upcasters = Some(upcasters);
        self
    }

    /// The wrapped store (reads return ciphertext, as stored).
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// When the wrapper is also the snapshot store (the snapshot jobs take
    /// one store for both): encrypts the snapshots of `aggregate_type` as
    /// [`GdprSnapshots::aggregate`] does. Its [`SnapshotStore`],
    /// [`SnapshotAdmin`](crate::SnapshotAdmin) and
    /// [`SnapshotStaging`](crate::SnapshotStaging) encrypt what they store
    /// and decrypt what they return, like [`GdprSnapshots`].
    pub fn with_snapshot_subject(
        mut self,
        aggregate_type: impl Into<String>,
        subject: SnapshotSubject,
    ) -> Self {
        Arc::make_mut(&mut self.snapshot_subjects).push((aggregate_type.into(), subject));
        self
    }

    /// The crypto layer.
    pub fn crypto(&self) -> &Crypto<K> {
        &self.crypto
    }

    fn reader(
        &self,
    ) -> impl Fn(RecordedEvent) -> futures::future::BoxFuture<'static, Result<RecordedEvent>> {
        let crypto = self.crypto.clone();
        let upcasters = self.upcasters.clone();
        move |e| {
            let crypto = crypto.clone();
            let upcasters = upcasters.clone();
            Box::pin(async move {
                let e = crypto.decrypt_event(e).await?;
                upcast_event(upcasters.as_deref(), e)
            })
        }
    }

    /// Forgets `subject`: deletes its data key and records the erasure
    /// (`by`: who asked), deletes the snapshots of `aggregates` (type, id)
    /// from `snapshots`, then hands an [`ErasureNotice`] to each of
    /// `handlers`. Reads then return [`ERASED`] for its personal fields.
    pub async fn forget<Sn: SnapshotStore>(
        &self,
        subject: &str,
        by: &str,
        snapshots: Option<&Sn>,
        aggregates: &[(&str, &str)],
        handlers: &[&dyn ErasureHandler],
    ) -> Result<Forgotten> {
        let record = ErasureRecord {
            subject_hash: subject_hash(subject),
            erased_at: Utc::now(),
            erased_by: by.to_owned(),
        };
        let key_deleted = self.crypto.keys.forget_key(subject, &record).await?;
        let mut snapshots_deleted = 0;
        if let Some(s) = snapshots {
            for (t, id) in aggregates {
                snapshots_deleted += s.delete_snapshot(t, id).await?;
            }
        }
        let notice = ErasureNotice {
            subject: subject.to_owned(),
            record: record.clone(),
        };
        for h in handlers {
            h.on_erasure(&notice).await?;
        }
        Ok(Forgotten {
            key_deleted,
            snapshots_deleted,
            record,
        })
    }
}

impl<S: EventStore, K: KeyStore> EventStore for GdprStore<S, K> {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        let events = self.crypto.encrypt_batch(stream, events).await?;
        self.inner.append(stream, expected, events).await
    }

    fn read_stream(&self, stream: &StreamId, options: ReadStream) -> EventStream {
        self.inner
            .read_stream(stream, options)
            .and_then(self.reader())
            .boxed()
    }

    fn read_all(&self, options: ReadAll) -> EventStream {
        self.inner.read_all(options).and_then(self.reader()).boxed()
    }

    fn stream_version(
        &self,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Option<StreamVersion>>> + Send {
        self.inner.stream_version(stream)
    }

    fn head_position(&self) -> impl Future<Output = Result<Option<GlobalPosition>>> + Send {
        self.inner.head_position()
    }

    async fn read_event(&self, id: EventId) -> Result<Option<RecordedEvent>> {
        match self.inner.read_event(id).await? {
            Some(e) => Ok(Some(self.reader()(e).await?)),
            None => Ok(None),
        }
    }

    async fn read_feed_page(&self, filter: &ReadAll, limit: usize) -> Result<FeedPage> {
        let mut page = self.inner.read_feed_page(filter, limit).await?;
        let read = self.reader();
        let mut out = Vec::with_capacity(page.events.len());
        for e in std::mem::take(&mut page.events) {
            out.push(read(e).await?);
        }
        page.events = out;
        Ok(page)
    }

    fn append_signal(&self) -> Option<AppendSignal> {
        self.inner.append_signal()
    }

    fn count_events_between(
        &self,
        after: GlobalPosition,
        up_to: GlobalPosition,
    ) -> impl Future<Output = Result<u64>> + Send {
        self.inner.count_events_between(after, up_to)
    }
}

/// Keys and erasures in memory, shared by the handle's clones (for tests
/// and the in-memory store).
#[derive(Clone, Debug, Default)]
pub struct MemoryKeyStore {
    inner: Arc<std::sync::Mutex<MemoryKeys>>,
}

#[derive(Debug, Default)]
struct MemoryKeys {
    keys: HashMap<String, WrappedKey>,
    erasures: Vec<ErasureRecord>,
}

impl MemoryKeyStore {
    /// An empty key store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, MemoryKeys>> {
        self.inner.lock().map_err(|_| Error::Backend {
            backend: "memory",
            message: "key store lock poisoned".into(),
            source: None,
        })
    }
}

impl KeyStore for MemoryKeyStore {
    async fn load_key(&self, subject: &str) -> Result<Option<WrappedKey>> {
        Ok(self.lock()?.keys.get(subject).cloned())
    }

    async fn insert_key(&self, subject: &str, key: &WrappedKey) -> Result<WrappedKey> {
        Ok(self
            .lock()?
            .keys
            .entry(subject.to_owned())
            .or_insert_with(|| key.clone())
            .clone())
    }

    async fn forget_key(&self, subject: &str, record: &ErasureRecord) -> Result<bool> {
        let mut g = self.lock()?;
        let had = g.keys.remove(subject).is_some();
        g.erasures.push(record.clone());
        Ok(had)
    }

    async fn erasure(&self, subject: &str) -> Result<Option<ErasureRecord>> {
        let h = subject_hash(subject);
        Ok(self
            .lock()?
            .erasures
            .iter()
            .rev()
            .find(|r| r.subject_hash == h)
            .cloned())
    }

    async fn import_keys(&self, import: &KeyImport) -> Result<KeyImportReport> {
        let mut g = self.lock()?;
        // Checked before anything is written: all or nothing.
        for k in &import.keys {
            if let Some(stored) = g.keys.get(&k.subject) {
                if let Some(e) = key_conflict(&k.subject, stored, &k.key) {
                    return Err(e);
                }
            }
        }
        let mut report = KeyImportReport::default();
        for k in &import.keys {
            if g.keys.contains_key(&k.subject) {
                report.keys_present += 1;
            } else {
                g.keys.insert(k.subject.clone(), k.key.clone());
                report.keys_inserted += 1;
            }
        }
        for subject in &import.forget {
            if g.keys.remove(subject).is_some() {
                report.keys_deleted += 1;
            }
        }
        for r in &import.erasures {
            if g.erasures.iter().any(|e| same_erasure(e, r)) {
                report.erasures_present += 1;
            } else {
                g.erasures.push(r.clone());
                report.erasures_recorded += 1;
            }
        }
        Ok(report)
    }

    async fn holds_keys(&self) -> Result<bool> {
        let g = self.lock()?;
        Ok(!g.keys.is_empty() || !g.erasures.is_empty())
    }
}

impl KeyStore for crate::InMemoryStore {
    fn load_key(&self, subject: &str) -> impl Future<Output = Result<Option<WrappedKey>>> + Send {
        self.key_store().load_key(subject)
    }

    fn insert_key(
        &self,
        subject: &str,
        key: &WrappedKey,
    ) -> impl Future<Output = Result<WrappedKey>> + Send {
        self.key_store().insert_key(subject, key)
    }

    fn forget_key(
        &self,
        subject: &str,
        record: &ErasureRecord,
    ) -> impl Future<Output = Result<bool>> + Send {
        self.key_store().forget_key(subject, record)
    }

    fn erasure(&self, subject: &str) -> impl Future<Output = Result<Option<ErasureRecord>>> + Send {
        self.key_store().erasure(subject)
    }

    fn import_keys(
        &self,
        import: &KeyImport,
    ) -> impl Future<Output = Result<KeyImportReport>> + Send {
        self.key_store().import_keys(import)
    }

    fn holds_keys(&self) -> impl Future<Output = Result<bool>> + Send {
        self.key_store().holds_keys()
    }
}

/// Checkpoints pass through: a projection runner can read through a
/// [`GdprStore`].
impl<S: crate::CheckpointStore, K: KeyStore> crate::CheckpointStore for GdprStore<S, K> {
    fn load_checkpoint(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<GlobalPosition>>> + Send {
        self.inner.load_checkpoint(name)
    }

    fn save_checkpoint(
        &self,
        name: &str,
        position: GlobalPosition,
    ) -> impl Future<Output = Result<()>> + Send {
        self.inner.save_checkpoint(name, position)
    }

    fn reset_checkpoint(&self, name: &str) -> impl Future<Output = Result<()>> + Send {
        self.inner.reset_checkpoint(name)
    }
}

/// Projection locks and dead letters pass through, so a
/// [`ProjectionRunner`](crate::ProjectionRunner) can run on a [`GdprStore`]
/// (its handlers then see plaintext, or [`ERASED`]).
impl<S: crate::ProjectionControl, K: KeyStore> crate::ProjectionControl for GdprStore<S, K> {
    fn live_partition_workers(&self, group: &str) -> impl Future<Output = Result<u32>> + Send {
        self.inner.live_partition_workers(group)
    }

    fn acquire_projection_lock(
        &self,
        checkpoint: &str,
        owner: &str,
        token: &str,
        ttl: std::time::Duration,
    ) -> impl Future<Output = Result<crate::LockAttempt>> + Send {
        self.inner
            .acquire_projection_lock(checkpoint, owner, token, ttl)
    }

    fn renew_projection_lock(
        &self,
        lock: &crate::ProjectionLock,
        ttl: std::time::Duration,
    ) -> impl Future<Output = Result<Option<crate::ProjectionLock>>> + Send {
        self.inner.renew_projection_lock(lock, ttl)
    }

    fn release_projection_lock(
        &self,
        lock: &crate::ProjectionLock,
    ) -> impl Future<Output = Result<()>> + Send {
        self.inner.release_projection_lock(lock)
    }

    fn save_checkpoint_fenced(
        &self,
        name: &str,
        position: crate::GlobalPosition,
        fence: &crate::Fence,
    ) -> impl Future<Output = Result<()>> + Send {
        self.inner.save_checkpoint_fenced(name, position, fence)
    }

    fn reset_checkpoint_fenced(
        &self,
        name: &str,
        fence: &crate::Fence,
    ) -> impl Future<Output = Result<()>> + Send {
        self.inner.reset_checkpoint_fenced(name, fence)
    }

    fn projection_lock(
        &self,
        checkpoint: &str,
    ) -> impl Future<Output = Result<Option<crate::ProjectionLock>>> + Send {
        self.inner.projection_lock(checkpoint)
    }

    fn park_event(&self, letter: &crate::DeadLetter) -> impl Future<Output = Result<()>> + Send {
        self.inner.park_event(letter)
    }

    fn dead_letters(
        &self,
        checkpoint: &str,
    ) -> impl Future<Output = Result<Vec<crate::DeadLetter>>> + Send {
        self.inner.dead_letters(checkpoint)
    }

    fn drop_dead_letter(
        &self,
        checkpoint: &str,
        event_id: EventId,
    ) -> impl Future<Output = Result<bool>> + Send {
        self.inner.drop_dead_letter(checkpoint, event_id)
    }
}

impl<S: EventStore + SnapshotStore, K: KeyStore> GdprStore<S, K> {
    /// The snapshot side of this wrapper, as a [`GdprSnapshots`].
    pub fn snapshots(&self) -> GdprSnapshots<S, K> {
        GdprSnapshots {
            inner: self.inner.clone(),
            crypto: self.crypto.clone(),
            aggregates: self.snapshot_subjects.clone(),
        }
    }
}

impl<N: SnapshotStore, K: KeyStore> GdprSnapshots<N, K> {
    /// A stored snapshot as the caller sees it: decrypted, `None` when
    /// unreadable (forgotten subject, or redacted).
    async fn readable(&self, snapshot: Snapshot) -> Result<Option<Snapshot>> {
        Ok(match self.crypto.decrypt_snapshot(snapshot).await? {
            SnapshotRead::Plain(s) | SnapshotRead::Decrypted(s) => Some(s),
            SnapshotRead::Erased { .. } | SnapshotRead::Redacted => None,
        })
    }

    /// A snapshot as it is to be stored: encrypted when declared.
    async fn storable(&self, snapshot: &Snapshot) -> Result<Snapshot> {
        match self.subject_of(snapshot) {
            Some(subject) => self.crypto.encrypt_snapshot(&subject, snapshot).await,
            None => Ok(snapshot.clone()),
        }
    }
}

/// Partition leases are the inner store's: a partitioned projection reads
/// decrypted events through the wrapper and shares partitions through the
/// inner store's lease tables.
impl<S: crate::PartitionLeases, K: KeyStore> crate::PartitionLeases for GdprStore<S, K> {
    fn join_partitions(
        &self,
        group: &str,
        partitions: u32,
        worker: &str,
        ttl: std::time::Duration,
    ) -> impl Future<Output = Result<u32>> + Send {
        self.inner.join_partitions(group, partitions, worker, ttl)
    }

    fn leave_partitions(
        &self,
        group: &str,
        worker: &str,
    ) -> impl Future<Output = Result<()>> + Send {
        self.inner.leave_partitions(group, worker)
    }

    fn claim_partition(
        &self,
        group: &str,
        partition: u32,
        partitions: u32,
        worker: &str,
        ttl: std::time::Duration,
    ) -> impl Future<Output = Result<Option<crate::PartitionLease>>> + Send {
        self.inner
            .claim_partition(group, partition, partitions, worker, ttl)
    }

    fn renew_partition(
        &self,
        lease: &crate::PartitionLease,
        ttl: std::time::Duration,
    ) -> impl Future<Output = Result<Option<crate::PartitionLease>>> + Send {
        self.inner.renew_partition(lease, ttl)
    }

    fn release_partition(
        &self,
        lease: &crate::PartitionLease,
    ) -> impl Future<Output = Result<()>> + Send {
        self.inner.release_partition(lease)
    }

    fn partition_holders(
        &self,
        group: &str,
    ) -> impl Future<Output = Result<Vec<crate::PartitionHolder>>> + Send {
        self.inner.partition_holders(group)
    }
}

impl<S: EventStore + SnapshotStore, K: KeyStore> SnapshotStore for GdprStore<S, K> {
    async fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Snapshot>> {
        self.snapshots()
            .load_snapshot(aggregate_type, aggregate_id)
            .await
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<SnapshotWrite> {
        self.snapshots().save_snapshot(snapshot).await
    }

    fn delete_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> impl Future<Output = Result<u64>> + Send {
        self.inner.delete_snapshot(aggregate_type, aggregate_id)
    }
}

impl<S: EventStore + crate::SnapshotAdmin, K: KeyStore> crate::SnapshotAdmin for GdprStore<S, K> {
    fn invalidate_snapshots(
        &self,
        aggregate_type: &str,
        below_schema_version: Option<u32>,
    ) -> impl Future<Output = Result<u64>> + Send {
        self.inner
            .invalidate_snapshots(aggregate_type, below_schema_version)
    }

    fn snapshot_coverage(
        &self,
        aggregate_type: Option<&str>,
    ) -> impl Future<Output = Result<Vec<crate::SnapshotCoverage>>> + Send {
        self.inner.snapshot_coverage(aggregate_type)
    }

    fn stale_snapshots(
        &self,
        aggregate_type: Option<&str>,
        min_events: u64,
    ) -> impl Future<Output = Result<Vec<crate::StaleSnapshot>>> + Send {
        self.inner.stale_snapshots(aggregate_type, min_events)
    }

    fn snapshot_history_size(&self) -> impl Future<Output = Result<u32>> + Send {
        self.inner.snapshot_history_size()
    }

    fn set_snapshot_history_size(&self, keep: u32) -> impl Future<Output = Result<u64>> + Send {
        self.inner.set_snapshot_history_size(keep)
    }

    fn snapshot_history(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> impl Future<Output = Result<Vec<crate::SnapshotHistoryEntry>>> + Send {
        self.inner.snapshot_history(aggregate_type, aggregate_id)
    }

    fn rollback_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        to_version: StreamVersion,
    ) -> impl Future<Output = Result<crate::RollbackReport>> + Send {
        self.inner
            .rollback_snapshot(aggregate_type, aggregate_id, to_version)
    }

    fn list_stale_snapshots(
        &self,
        aggregate_type: Option<&str>,
        min_events: u64,
    ) -> futures::stream::BoxStream<'static, Result<crate::StaleSnapshot>> {
        self.inner.list_stale_snapshots(aggregate_type, min_events)
    }

    fn live_snapshots(
        &self,
        aggregate_type: &str,
    ) -> futures::stream::BoxStream<'static, Result<Snapshot>> {
        let snaps = self.snapshots();
        self.inner
            .live_snapshots(aggregate_type)
            .and_then(move |s| {
                let snaps = snaps.clone();
                async move { snaps.readable(s).await }
            })
            .try_filter_map(|s| async move { Ok(s) })
            .boxed()
    }
}

impl<S: EventStore + crate::SnapshotStaging, K: KeyStore> crate::SnapshotStaging
    for GdprStore<S, K>
{
    async fn stage_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        let stored = self.snapshots().storable(snapshot).await?;
        self.inner.stage_snapshot(&stored).await
    }

    async fn load_staged(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Snapshot>> {
        match self.inner.load_staged(aggregate_type, aggregate_id).await? {
            Some(s) => self.snapshots().readable(s).await,
            None => Ok(None),
        }
    }

    fn staged_snapshots(
        &self,
        aggregate_type: &str,
    ) -> futures::stream::BoxStream<'static, Result<Snapshot>> {
        let snaps = self.snapshots();
        self.inner
            .staged_snapshots(aggregate_type)
            .and_then(move |s| {
                let snaps = snaps.clone();
                async move { snaps.readable(s).await }
            })
            .try_filter_map(|s| async move { Ok(s) })
            .boxed()
    }

    fn promote_staged(
        &self,
        aggregate_type: &str,
    ) -> impl Future<Output = Result<crate::PromoteReport>> + Send {
        self.inner.promote_staged(aggregate_type)
    }

    fn clear_staged(&self, aggregate_type: &str) -> impl Future<Output = Result<u64>> + Send {
        self.inner.clear_staged(aggregate_type)
    }
}

/// The catalog passes through; the correlation and causation reads decrypt
/// and upcast like every other read.
impl<S: crate::StreamCatalog, K: KeyStore> crate::StreamCatalog for GdprStore<S, K> {
    fn list_streams(
        &self,
        category: &str,
    ) -> futures::stream::BoxStream<'static, Result<crate::StreamInfo>> {
        self.inner.list_streams(category)
    }

    fn stats(&self) -> impl Future<Output = Result<crate::StoreStats>> + Send {
        self.inner.stats()
    }

    fn largest_streams(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<crate::StreamInfo>>> + Send {
        self.inner.largest_streams(limit)
    }

    fn read_correlated(&self, correlation_id: uuid::Uuid, limit: Option<u64>) -> EventStream {
        self.inner
            .read_correlated(correlation_id, limit)
            .and_then(self.reader())
            .boxed()
    }

    fn read_caused_by(&self, causation_id: uuid::Uuid, limit: Option<u64>) -> EventStream {
        self.inner
            .read_caused_by(causation_id, limit)
            .and_then(self.reader())
            .boxed()
    }

    fn events_recorded_since(
        &self,
        since: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64>> + Send {
        self.inner.events_recorded_since(since)
    }
}
