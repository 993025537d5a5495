//! The core error type.
//!
//! Every backend maps its driver errors into [`Error`], so that callers handle
//! a conflict the same way on every store: `err.is_conflict()` is the question
//! to ask before retrying, never a driver code.

use crate::{EventId, ExpectedVersion, GlobalPosition, StreamId, StreamVersion};

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the store, the repository or a codec.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A stream name failed validation (`<Category>-<id>`, at most 255 bytes,
    /// no control characters). Fix the name; nothing was written.
    #[error("invalid stream name {stream:?}: {reason}")]
    InvalidStreamId {
        /// The rejected name.
        stream: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The stream's version did not match the expected version of an append.
    /// Another writer got there first: reload and decide again (the
    /// [`Repository`](crate::Repository) does this for you).
    #[error("wrong expected version for stream {stream}: expected {expected}, actual {}", display_actual(.actual))]
    WrongExpectedVersion {
        /// The stream that was appended to.
        stream: StreamId,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The head version of the stream when the append ran (`None`: no stream).
        actual: Option<StreamVersion>,
    },
    /// An event id already exists in the store for a different event (another
    /// stream, type or payload), or a retried batch only partly matches what was
    /// stored. Nothing was written.
    #[error("event id {event_id} already exists in stream {stream} with different content")]
    DuplicateEventId {
        /// The clashing id.
        event_id: EventId,
        /// The stream that holds the existing event.
        stream: StreamId,
    },
    /// A command id ([`CommandContext::with_command_id`](crate::CommandContext::with_command_id))
    /// was already used by another command: its events are in another
    /// stream, or the ids derived from it are held by events this command
    /// did not write. Nothing was written. Give each command its own id; a
    /// retry of the same command reuses it and is answered with the original
    /// result instead.
    #[error("command id {command_id} was already used by another command (events in {stream}): {reason}")]
    CommandIdReused {
        /// The command id.
        command_id: uuid::Uuid,
        /// The stream holding the events of its first use.
        stream: StreamId,
        /// What did not match.
        reason: String,
    },
    /// An event could not be accepted as written (empty type name, version 0,
    /// metadata that is not an object, empty batch ...). Nothing was written.
    #[error("invalid event for stream {stream}: {reason}")]
    InvalidEvent {
        /// The stream the append was for.
        stream: StreamId,
        /// What was wrong.
        reason: String,
    },
    /// A stored event has a type that the aggregate's event enum does not know.
    /// Events are never silently dropped: add the type to the event enum (a
    /// renamed type can keep its stored name with `#[serde(alias = "..")]`).
    #[error("unknown event type {event_type:?} at {stream} version {version}")]
    UnknownEventType {
        /// The stream holding the event.
        stream: StreamId,
        /// Its version in the stream.
        version: StreamVersion,
        /// The stored type name.
        event_type: String,
    },
    /// A stored payload did not decode into the typed event.
    #[error("cannot decode event {event_type:?} (v{event_version}) at {stream} version {version}: {source}")]
    Decode {
        /// The stream holding the event.
        stream: StreamId,
        /// Its version in the stream.
        version: StreamVersion,
        /// The stored type name.
        event_type: String,
        /// The stored payload schema version.
        event_version: u32,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// An upcaster failed on a stored event (or the stored payload did not
    /// parse, or the result was not a storable payload). Nothing was
    /// changed in the store; fix the step (or the plan's filter) named in
    /// the [`UpcastFailure`] and read again. Boxed, to keep `Error` small.
    #[error(transparent)]
    Upcast(Box<UpcastFailure>),
    /// Personal data could not be encrypted or decrypted (no or a wrong
    /// master key, a missing data key); see [`crate::gdpr`]. Boxed.
    #[error(transparent)]
    Gdpr(Box<crate::gdpr::GdprError>),
    /// A typed value (event or aggregate state) could not be serialized.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// What was being encoded.
        what: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// A text could not be parsed as a global position (`N` or `COMMIT:SEQ`).
    #[error("invalid global position {value:?}: expected N or COMMIT:SEQ")]
    InvalidPosition {
        /// The rejected text.
        value: String,
    },
    /// A read position lies beyond what the store can serve (for example a
    /// position from another store).
    #[error("position {position} is not valid here: {reason}")]
    PositionOutOfRange {
        /// The position.
        position: GlobalPosition,
        /// Why.
        reason: String,
    },
    /// The database schema is older (or newer) than this code. Run `annals init`
    /// (or `migrate()`) to bring it up to date.
    #[error("store schema is at version {found}, this code needs {expected}: run `annals init`")]
    SchemaVersion {
        /// Schema version found in the database.
        found: i64,
        /// Schema version this build expects.
        expected: i64,
    },
    /// The store refuses to serve because it is in a state that would lose or
    /// hide data (for example a PostgreSQL store restored into a younger cluster).
    #[error("store is unsafe to use: {0}")]
    Unsafe(String),
    /// A projection batch was refused because its runner no longer holds
    /// the lease it runs under (see `annals::Fence`): it was paused or
    /// disconnected past the lease, and another worker took the projection
    /// or partition over. The transaction rolled back: nothing of the batch
    /// (rows or checkpoint) was written. Not transient: the runner stops
    /// working on it; the new holder goes on from the checkpoint.
    #[error("fenced: {lease} is no longer held by this runner ({detail}); the batch rolled back")]
    Fenced {
        /// The lease: a projection lock (`name@vN`) or a partition
        /// (`name@vN partition P`).
        lease: String,
        /// What the runner held and what the store has now.
        detail: String,
    },
    /// A configuration value was invalid (URL scheme, option).
    #[error("configuration error: {0}")]
    Config(String),
    /// The snapshot store failed. Snapshots are a cache: the repository logs
    /// this and falls back to a full replay; it only surfaces from direct calls.
    #[error("snapshot error: {0}")]
    Snapshot(String),
    /// The store could not serve the call in time: it gave up after waiting
    /// `after` for `what` (for example a pooled PostgreSQL connection while
    /// every connection was busy). Nothing was written by this call. Not a
    /// conflict: the store is overloaded or a connection is stuck, so retry
    /// later (with backoff), raise the limit that ran out, or look for what
    /// holds the resource.
    #[error("store unavailable: gave up waiting for {what} after {after:?}")]
    Unavailable {
        /// What the call waited for.
        what: String,
        /// How long it waited before giving up.
        after: std::time::Duration,
    },
    /// The stream was archived (`annals archive`): its events were moved to
    /// the archive file `location` and removed from the store, which keeps
    /// a tombstone with its head version. Reads, `stream_version` and
    /// appends are refused; restore it (`annals restore-archive DIR`) to use
    /// it again.
    #[error("stream {stream} is archived (head version {head}) in {location}: restore it with `annals restore-archive` first")]
    StreamArchived {
        /// The archived stream.
        stream: StreamId,
        /// Its head version when it was archived.
        head: StreamVersion,
        /// The archive file holding its events.
        location: String,
    },
    /// A copy-and-transform migration's verification found the copy wrong
    /// (`annals events swap`): a stream whose count differs, an event id
    /// missing, an event that does not decode. Nothing was swapped; fix the
    /// plan, drop the copy (`annals events drop-backup`) and migrate again.
    #[error("the migrated copy fails verification: {0}")]
    MigrationCheck(Box<crate::MigrationCheckFailure>),
    /// The database driver failed (connection lost, disk full, ...). The
    /// driver error is the source. Appends are atomic: an append that fails
    /// this way wrote all of its events or none, and when the connection was
    /// lost around the commit it may have written them (a lost reply). Retry
    /// it with the same event ids (or the same command id): a batch that was
    /// stored is then answered as a retry, not written twice.
    #[error("{backend} backend error: {message}")]
    Backend {
        /// `sqlite`, `postgres`, `memory`.
        backend: &'static str,
        /// What was being done.
        message: String,
        /// The driver error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

/// What [`Error::Upcast`] reports: which stored event a step failed on.
#[derive(Debug, thiserror::Error)]
#[error("cannot upcast event {event_type:?} stored at v{stored_version} at {stream} version {version} (position {position}): step {step} failed: {source}")]
#[non_exhaustive]
pub struct UpcastFailure {
    /// The stream holding the event.
    pub stream: StreamId,
    /// Its version in the stream.
    pub version: StreamVersion,
    /// Its global position.
    pub position: GlobalPosition,
    /// The stored type name.
    pub event_type: String,
    /// The stored payload schema version.
    pub stored_version: u32,
    /// The step that failed (`TYPE vN`, or the plan step's label).
    pub step: String,
    /// What the step reported.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

fn display_actual(actual: &Option<StreamVersion>) -> String {
    match actual {
        Some(v) => v.to_string(),
        None => "no stream".to_owned(),
    }
}

impl Error {
    /// True when the error is an optimistic-concurrency conflict (a wrong
    /// expected version): the operation may succeed after reloading.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::WrongExpectedVersion { .. })
    }

    /// A backend error with a driver source.
    pub fn backend(
        backend: &'static str,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Backend {
            backend,
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

#[cfg(test)]
mod unavailable_tests {
    use super::*;

    #[test]
    fn unavailable_names_what_and_how_long_and_is_no_conflict() {
        let err = Error::Unavailable {
            what: "a pooled connection".into(),
            after: std::time::Duration::from_millis(1500),
        };
        assert!(!err.is_conflict());
        let text = err.to_string();
        assert!(text.contains("a pooled connection"), "{text}");
        assert!(text.contains("1.5s"), "{text}");
    }
}
