//! Mapping driver errors to [`annals::Error`].
//!
//! Every SQLSTATE the store reacts to is classified in one place,
//! [`classify`], using the driver's named [`SqlState`] constants and the
//! constraint names the schema declares. Everything else stays a
//! [`annals::Error::Backend`] with the driver error as its source, so
//! nothing is lost for the caller's logs.

use annals::Error;
use tokio_postgres::error::SqlState;

/// Backend name used in [`annals::Error::Backend`].
pub(crate) const BACKEND: &str = "postgres";

/// The unique constraint on `events.event_id` (see `sql/0001_initial.sql`).
pub(crate) const EVENT_ID_CONSTRAINT: &str = "events_event_id_key";
/// The unique constraint on `events (stream_id, stream_version)`.
pub(crate) const STREAM_VERSION_CONSTRAINT: &str = "events_stream_version_key";
/// The primary key of `streams`.
pub(crate) const STREAMS_PKEY: &str = "streams_pkey";

/// What a failed statement means to the store.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ErrorClass {
    /// An event id of the batch was stored concurrently: decide between an
    /// idempotent retry and a duplicate id by reading what is stored.
    EventIdTaken,
    /// A stream version (or a new stream) was taken by a concurrent writer
    /// that bypassed the stream lock: an optimistic-concurrency conflict.
    StreamVersionTaken,
    /// Serialization failure or deadlock: nothing was written, the same
    /// statement may succeed in a new transaction.
    Retry,
    /// A JSON payload that PostgreSQL's `jsonb` refuses (a `\u0000` in a
    /// string): the caller's input, not the store, is at fault.
    UnstorablePayload,
    /// The server ended the session (`pg_terminate_backend`, a shutdown or a
    /// crash): the connection is dead, and the statement may be run again
    /// on a fresh one.
    ConnectionLost,
    /// Anything else: a backend error.
    Other,
}

/// Classifies a database error by its SQLSTATE and, for unique violations,
/// the constraint that was violated.
pub(crate) fn classify(code: Option<&SqlState>, constraint: Option<&str>) -> ErrorClass {
    let Some(code) = code else {
        return ErrorClass::Other;
    };
    if *code == SqlState::UNIQUE_VIOLATION {
        match constraint {
            Some(EVENT_ID_CONSTRAINT) => ErrorClass::EventIdTaken,
            Some(STREAM_VERSION_CONSTRAINT) | Some(STREAMS_PKEY) => ErrorClass::StreamVersionTaken,
            _ => ErrorClass::Other,
        }
    } else if *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
    {
        ErrorClass::Retry
    } else if *code == SqlState::UNTRANSLATABLE_CHARACTER {
        ErrorClass::UnstorablePayload
    } else if *code == SqlState::ADMIN_SHUTDOWN || *code == SqlState::CRASH_SHUTDOWN {
        ErrorClass::ConnectionLost
    } else {
        ErrorClass::Other
    }
}

/// [`classify`] for a driver error.
pub(crate) fn class_of(err: &tokio_postgres::Error) -> ErrorClass {
    let constraint = err.as_db_error().and_then(|d| d.constraint());
    classify(err.code(), constraint)
}

/// True when `err` says that the connection it ran on is dead (closed by
/// the server, terminated by an administrator, a broken socket): the
/// connection must be discarded, and an idempotent operation may run again
/// on a fresh one.
pub(crate) fn connection_lost(err: &Error) -> bool {
    let Error::Backend {
        source: Some(source),
        ..
    } = err
    else {
        return false;
    };
    let Some(pg) = source.downcast_ref::<tokio_postgres::Error>() else {
        return false;
    };
    pg.is_closed()
        || class_of(pg) == ErrorClass::ConnectionLost
        || std::error::Error::source(pg).is_some_and(|s| s.is::<std::io::Error>())
}

/// A backend error that keeps the driver error as its source.
pub(crate) fn backend(
    message: impl Into<String>,
    source: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    if let Some(archived) = stream_archived(&source) {
        return archived;
    }
    Error::backend(BACKEND, message, source)
}

/// The SQLSTATE of the trigger that refuses to move an archived stream's
/// head (`sql/0007_archived_streams.sql`).
pub(crate) const STREAM_ARCHIVED_STATE: &str = "AN001";

/// [`Error::StreamArchived`] from the archived-stream trigger's error: the
/// stream in its HINT, the archive location in its DETAIL, the head at the
/// end of its message.
fn stream_archived(source: &(dyn std::error::Error + 'static)) -> Option<Error> {
    let db = source
        .downcast_ref::<tokio_postgres::Error>()?
        .as_db_error()?;
    if db.code().code() != STREAM_ARCHIVED_STATE {
        return None;
    }
    let stream = annals::StreamId::parse(db.hint()?).ok()?;
    let head = db.message().rsplit(' ').next()?.parse().ok()?;
    Some(Error::StreamArchived {
        stream,
        head: annals::StreamVersion(head),
        location: db.detail()?.to_owned(),
    })
}

/// A backend error without a driver error behind it (a row that does not
/// decode, a retry budget spent).
pub(crate) fn backend_msg(message: impl Into<String>) -> Error {
    Error::Backend {
        backend: BACKEND,
        message: message.into(),
        source: None,
    }
}

/// Extension to turn driver results into store results with a context.
pub(crate) trait Context<T> {
    /// Maps the error to [`annals::Error::Backend`] with `what` as message.
    fn context(self, what: &str) -> annals::Result<T>;
}

impl<T> Context<T> for Result<T, tokio_postgres::Error> {
    fn context(self, what: &str) -> annals::Result<T> {
        self.map_err(|e| backend(what, e))
    }
}

/// A failed checkout from the pool: a wait that timed out after `waited`
/// is [`Error::Unavailable`]; anything else (the server refused a new
/// connection) a backend error.
pub(crate) fn pool_error(
    what: &str,
    err: deadpool_postgres::PoolError,
    waited: std::time::Duration,
) -> Error {
    use deadpool_postgres::{PoolError, TimeoutType};
    match err {
        PoolError::Timeout(TimeoutType::Wait) => Error::Unavailable {
            what: format!("a free connection to {what}"),
            after: waited,
        },
        other => backend(format!("{what}: cannot get a connection"), other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_violations_by_constraint() {
        let u = Some(&SqlState::UNIQUE_VIOLATION);
        assert_eq!(
            classify(u, Some(EVENT_ID_CONSTRAINT)),
            ErrorClass::EventIdTaken
        );
        assert_eq!(
            classify(u, Some(STREAM_VERSION_CONSTRAINT)),
            ErrorClass::StreamVersionTaken
        );
        assert_eq!(
            classify(u, Some(STREAMS_PKEY)),
            ErrorClass::StreamVersionTaken
        );
        assert_eq!(classify(u, Some("checkpoints_pkey")), ErrorClass::Other);
        assert_eq!(classify(u, None), ErrorClass::Other);
    }

    #[test]
    fn transient_failures_retry() {
        assert_eq!(
            classify(Some(&SqlState::T_R_SERIALIZATION_FAILURE), None),
            ErrorClass::Retry
        );
        assert_eq!(
            classify(Some(&SqlState::T_R_DEADLOCK_DETECTED), None),
            ErrorClass::Retry
        );
    }

    #[test]
    fn payloads_jsonb_refuses() {
        assert_eq!(
            classify(Some(&SqlState::UNTRANSLATABLE_CHARACTER), None),
            ErrorClass::UnstorablePayload
        );
    }

    #[test]
    fn terminated_sessions_are_lost_connections() {
        for code in [SqlState::ADMIN_SHUTDOWN, SqlState::CRASH_SHUTDOWN] {
            assert_eq!(classify(Some(&code), None), ErrorClass::ConnectionLost);
        }
        // Only driver errors of a dead connection count.
        assert!(!connection_lost(&backend_msg("no driver error")));
        assert!(!connection_lost(&Error::Unavailable {
            what: "a free connection".into(),
            after: std::time::Duration::from_secs(1),
        }));
    }

    #[test]
    fn pool_timeouts_are_unavailable() {
        let waited = std::time::Duration::from_millis(250);
        let err = pool_error(
            "append",
            deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait),
            waited,
        );
        match &err {
            Error::Unavailable { what, after } => {
                assert!(what.contains("append"), "{what}");
                assert_eq!(*after, waited);
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(!err.is_conflict());
        assert!(matches!(
            pool_error("append", deadpool_postgres::PoolError::Closed, waited),
            Error::Backend { .. }
        ));
    }

    #[test]
    fn everything_else_is_a_backend_error() {
        assert_eq!(classify(None, None), ErrorClass::Other);
        assert_eq!(
            classify(Some(&SqlState::UNDEFINED_TABLE), None),
            ErrorClass::Other
        );
        assert_eq!(
            classify(Some(&SqlState::CHECK_VIOLATION), Some(EVENT_ID_CONSTRAINT)),
            ErrorClass::Other
        );
    }
}
