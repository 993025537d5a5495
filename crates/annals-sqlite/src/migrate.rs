//! Versioned schema migrations.
//!
//! The schema lives in `sql/NNNN_name.sql`, compiled in with `include_str!`.
//! [`migrate`] applies the pending ones in order, each in its own
//! `BEGIN IMMEDIATE` transaction together with its row in
//! `annals_migrations`, so a crash leaves the schema at a whole version and
//! two processes migrating the same file apply each migration once. A file
//! that is already current is recognised without the write lock, so opening
//! a store never waits for another process's write transaction. A file
//! whose schema is behind (or ahead of) this build is refused with
//! [`annals::Error::SchemaVersion`] until it is migrated.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::error::db;

/// One versioned migration.
pub(crate) struct Migration {
    pub(crate) version: i64,
    pub(crate) name: &'static str,
    pub(crate) sql: &'static str,
}

/// The ledger table, created before anything else.
const BOOTSTRAP: &str = include_str!("../sql/bootstrap.sql");

/// Every migration, in order. Versions are 1, 2, 3 ... with no gaps.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events",
        sql: include_str!("../sql/0001_events.sql"),
    },
    Migration {
        version: 2,
        name: "snapshots",
        sql: include_str!("../sql/0002_snapshots.sql"),
    },
    Migration {
        version: 3,
        name: "checkpoints",
        sql: include_str!("../sql/0003_checkpoints.sql"),
    },
    Migration {
        version: 4,
        name: "event_fingerprints",
        sql: include_str!("../sql/0004_event_fingerprints.sql"),
    },
    Migration {
        version: 5,
        name: "snapshot_history",
        sql: include_str!("../sql/0005_snapshot_history.sql"),
    },
    Migration {
        version: 6,
        name: "correlation_index",
        sql: include_str!("../sql/0006_correlation_index.sql"),
    },
    Migration {
        version: 7,
        name: "feed_indexes",
        sql: include_str!("../sql/0007_feed_indexes.sql"),
    },
    Migration {
        version: 8,
        name: "archived_streams",
        sql: include_str!("../sql/0008_archived_streams.sql"),
    },
    Migration {
        version: 9,
        name: "gdpr_keys",
        sql: include_str!("../sql/0009_gdpr_keys.sql"),
    },
    Migration {
        version: 10,
        name: "projection_control",
        sql: include_str!("../sql/0010_projection_control.sql"),
    },
    Migration {
        version: 11,
        name: "event_migrations",
        sql: include_str!("../sql/0011_event_migrations.sql"),
    },
    Migration {
        version: 12,
        name: "projection_versions",
        sql: include_str!("../sql/0012_projection_versions.sql"),
    },
];

/// The schema version this build needs.
pub(crate) const LATEST_VERSION: i64 = MIGRATIONS.len() as i64;

/// The full DDL: the ledger table, then every migration in order.
pub(crate) fn schema_sql() -> String {
    let mut out = String::from("-- annals-sqlite schema\n\n");
    out.push_str(BOOTSTRAP);
    for m in MIGRATIONS {
        out.push_str(&format!(
            "\n-- migration {:04}_{}\n{}",
            m.version, m.name, m.sql
        ));
        out.push_str(&format!(
            "INSERT INTO annals_migrations (version, name, applied_at) VALUES ({}, '{}', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));\n",
            m.version, m.name
        ));
    }
    out
}

/// The highest applied migration (0 for a file without the ledger).
pub(crate) fn schema_version(conn: &Connection) -> annals::Result<i64> {
    let has_ledger: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'annals_migrations')",
        )
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(db("reading the schema version"))?;
    if !has_ledger {
        return Ok(0);
    }
    conn.prepare_cached("SELECT COALESCE(MAX(version), 0) FROM annals_migrations")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(db("reading the schema version"))
}

/// [`schema_version`] from one read snapshot (a deferred transaction that
/// only reads, so it takes no write lock).
fn current_version(conn: &mut Connection) -> annals::Result<i64> {
    let tx = conn
        .transaction()
        .map_err(db("starting a schema version check"))?;
    let found = schema_version(&tx)?;
    tx.commit().map_err(db("ending a schema version check"))?;
    Ok(found)
}

/// Applies the pending migrations; returns the versions it applied.
///
/// A file that is already current is confirmed from a read snapshot, without
/// the write lock: in WAL mode that never waits for a writer, so opening a
/// store to read it works while another process holds a long write
/// transaction. Only a file that needs a migration takes the lock (and
/// re-checks under it).
pub(crate) fn migrate(conn: &mut Connection) -> annals::Result<Vec<i64>> {
    let found = current_version(conn)?;
    if found == LATEST_VERSION {
        return Ok(Vec::new());
    }
    if found > LATEST_VERSION {
        // A newer build migrated this file: refuse rather than guess.
        return Err(annals::Error::SchemaVersion {
            found,
            expected: LATEST_VERSION,
        });
    }
    // In a write transaction from the start: a deferred one would fail at
    // once (no busy wait) if another process created the table meanwhile.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db("starting a migration"))?;
    tx.execute_batch(BOOTSTRAP)
        .map_err(db("creating annals_migrations"))?;
    tx.commit().map_err(db("creating annals_migrations"))?;
    let mut applied = Vec::new();
    for m in MIGRATIONS {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db("starting a migration"))?;
        // Read inside the write transaction: another process may have
        // applied it since we looked.
        let done = tx
            .query_row(
                "SELECT 1 FROM annals_migrations WHERE version = ?1",
                [m.version],
                |_| Ok(()),
            )
            .optional()
            .map_err(db("reading annals_migrations"))?
            .is_some();
        if done {
            continue;
        }
        tx.execute_batch(m.sql).map_err(|e| {
            crate::error::map_err(
                &format!("applying migration {:04}_{}", m.version, m.name),
                e,
            )
        })?;
        tx.execute(
            "INSERT INTO annals_migrations (version, name, applied_at)
             VALUES (?1, ?2, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
            rusqlite::params![m.version, m.name],
        )
        .map_err(db("recording a migration"))?;
        tx.commit().map_err(db("committing a migration"))?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "applied sqlite migration"
        );
        applied.push(m.version);
    }
    let found = schema_version(conn)?;
    if found != LATEST_VERSION {
        // A newer build migrated this file: refuse rather than guess.
        return Err(annals::Error::SchemaVersion {
            found,
            expected: LATEST_VERSION,
        });
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_consecutive_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "{}", m.name);
        }
    }

    #[test]
    fn schema_sql_builds_the_same_schema_as_migrate() {
        let mut migrated = Connection::open_in_memory().expect("db");
        migrate(&mut migrated).expect("migrates");
        let scripted = Connection::open_in_memory().expect("db");
        scripted
            .execute_batch(&schema_sql())
            .expect("schema_sql runs");
        assert_eq!(schema_version(&scripted).expect("version"), LATEST_VERSION);
        let ddl = |c: &Connection| -> Vec<String> {
            let mut s = c
                .prepare("SELECT sql FROM sqlite_schema WHERE sql IS NOT NULL ORDER BY name")
                .expect("prepare");
            s.query_map([], |r| r.get(0))
                .expect("query")
                .collect::<rusqlite::Result<_>>()
                .expect("rows")
        };
        assert_eq!(ddl(&migrated), ddl(&scripted));
    }
}
