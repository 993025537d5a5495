//! Driver errors: the one place that reads SQLite result codes.
//!
//! Every rusqlite error goes through [`classify`] (which names the codes this
//! crate reacts to) and [`map_err`] (which wraps the rest into
//! [`annals::Error::Backend`] with the driver error kept as the source). The
//! append path reacts to a unique violation by running its idempotency check,
//! so a retried batch and a reused event id are told apart by reading the
//! stored events, never by parsing SQLite's message text.

use rusqlite::ffi;

/// The backend name carried by every [`annals::Error::Backend`] of this crate.
pub(crate) const BACKEND: &str = "sqlite";

/// What a driver error means to this crate.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ErrorKind {
    /// A UNIQUE or PRIMARY KEY constraint failed: a row with that key exists.
    UniqueViolation,
    /// Another constraint (NOT NULL, CHECK, foreign key ...) failed.
    OtherConstraint,
    /// The database stayed locked by another connection past `busy_timeout`.
    Busy,
    /// Anything else: I/O, corruption, misuse.
    Other,
}

/// Classifies a driver error by its primary and extended result codes.
pub(crate) fn classify(err: &rusqlite::Error) -> ErrorKind {
    match err {
        rusqlite::Error::SqliteFailure(e, _) => match e.code {
            ffi::ErrorCode::ConstraintViolation => match e.extended_code {
                ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                    ErrorKind::UniqueViolation
                }
                _ => ErrorKind::OtherConstraint,
            },
            ffi::ErrorCode::DatabaseBusy | ffi::ErrorCode::DatabaseLocked => ErrorKind::Busy,
            _ => ErrorKind::Other,
        },
        _ => ErrorKind::Other,
    }
}

/// Wraps a driver error, saying what was being done and keeping the driver
/// error as the source.
pub(crate) fn map_err(context: &str, err: rusqlite::Error) -> annals::Error {
    let message = match classify(&err) {
        ErrorKind::UniqueViolation => format!("{context}: a row with the same key already exists"),
        ErrorKind::OtherConstraint => format!("{context}: a constraint failed"),
        ErrorKind::Busy => format!(
            "{context}: the database is locked by another connection (busy timeout expired)"
        ),
        ErrorKind::Other => context.to_owned(),
    };
    annals::Error::backend(BACKEND, message, err)
}

/// `map_err` for `?`: `.map_err(db("reading a stream"))`.
pub(crate) fn db(context: &'static str) -> impl FnOnce(rusqlite::Error) -> annals::Error {
    move |err| map_err(context, err)
}

/// A stored row that cannot be decoded (bad JSON, bad stream name, a value
/// out of range): the message names the row.
pub(crate) fn corrupt(
    what: String,
    source: impl std::error::Error + Send + Sync + 'static,
) -> annals::Error {
    annals::Error::backend(BACKEND, what, source)
}

/// A store thread is gone (its connection failed to open). A job that
/// panics does not stop its thread: see `conn::job_panicked`.
pub(crate) fn thread_stopped(which: &str) -> annals::Error {
    annals::Error::Backend {
        backend: BACKEND,
        message: format!("the sqlite {which} thread has stopped"),
        source: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    fn conn() -> Connection {
        let c = Connection::open_in_memory().expect("in-memory database");
        c.execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, u TEXT UNIQUE, n TEXT NOT NULL,
                             k TEXT, CHECK (k <> 'bad'));
             CREATE TABLE w (a TEXT, b TEXT, PRIMARY KEY (a, b)) WITHOUT ROWID;
             INSERT INTO t (id, u, n) VALUES (1, 'x', 'n');
             INSERT INTO w VALUES ('a', 'b');",
        )
        .expect("schema");
        c
    }

    #[test]
    fn unique_and_primary_key_violations_are_unique_violations() {
        let c = conn();
        let unique = c
            .execute("INSERT INTO t (id, u, n) VALUES (2, 'x', 'n')", [])
            .expect_err("duplicate unique value");
        assert_eq!(classify(&unique), ErrorKind::UniqueViolation);
        let rowid_pk = c
            .execute("INSERT INTO t (id, u, n) VALUES (1, 'y', 'n')", [])
            .expect_err("duplicate integer primary key");
        assert_eq!(classify(&rowid_pk), ErrorKind::UniqueViolation);
        let composite_pk = c
            .execute("INSERT INTO w VALUES ('a', 'b')", [])
            .expect_err("duplicate composite primary key");
        assert_eq!(classify(&composite_pk), ErrorKind::UniqueViolation);
    }

    #[test]
    fn other_constraints_and_errors_are_told_apart() {
        let c = conn();
        let not_null = c
            .execute("INSERT INTO t (id, u, n) VALUES (3, 'z', NULL)", [])
            .expect_err("not null");
        assert_eq!(classify(&not_null), ErrorKind::OtherConstraint);
        let check = c
            .execute(
                "INSERT INTO t (id, u, n, k) VALUES (4, 'q', 'n', 'bad')",
                [],
            )
            .expect_err("check");
        assert_eq!(classify(&check), ErrorKind::OtherConstraint);
        let syntax = c
            .execute("INSERT INTO nope VALUES (1)", [])
            .expect_err("no table");
        assert_eq!(classify(&syntax), ErrorKind::Other);
        assert_eq!(
            classify(&rusqlite::Error::QueryReturnedNoRows),
            ErrorKind::Other
        );
    }

    #[test]
    fn busy_database_is_busy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("busy.db");
        let a = Connection::open(&path).expect("open a");
        let b = Connection::open(&path).expect("open b");
        b.busy_timeout(std::time::Duration::ZERO).expect("no wait");
        a.execute_batch("CREATE TABLE t (x); BEGIN IMMEDIATE; INSERT INTO t VALUES (1);")
            .expect("lock");
        let err = b.execute_batch("BEGIN IMMEDIATE").expect_err("locked by a");
        assert_eq!(classify(&err), ErrorKind::Busy);
    }

    #[test]
    fn mapped_errors_keep_the_driver_error_as_source() {
        let c = conn();
        let err = c
            .execute("INSERT INTO t (id, u, n) VALUES (2, 'x', 'n')", [])
            .expect_err("duplicate");
        let mapped = map_err("inserting", err);
        match &mapped {
            annals::Error::Backend {
                backend, source, ..
            } => {
                assert_eq!(*backend, "sqlite");
                let source = source.as_ref().expect("source kept");
                assert!(source.downcast_ref::<rusqlite::Error>().is_some());
            }
            other => panic!("expected a backend error, got {other:?}"),
        }
        assert!(!mapped.is_conflict());
        assert!(mapped.to_string().contains("inserting"));
    }
}
