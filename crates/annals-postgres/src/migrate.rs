//! Versioned schema migrations.
//!
//! The schema lives in `sql/NNNN_name.sql`, compiled in with `include_str!`.
//! `migrate()` applies the pending files in order, each in its own
//! transaction together with its row in `annals_migrations`, so a failed
//! migration leaves the schema at the previous version. Every transaction
//! first takes an advisory lock keyed by the schema name: concurrent
//! `annals init` runs queue up instead of racing on `CREATE TABLE`.
//!
//! Nothing migrates implicitly: [`PgEventStore::connect`](crate::PgEventStore::connect)
//! only reads the version, and operations on a store whose schema is behind
//! fail with [`annals::Error::SchemaVersion`], which says to run `annals init`.

use annals::{Error, Result};
use deadpool_postgres::Client;

use crate::error::Context;

/// One versioned schema change.
pub(crate) struct Migration {
    /// Its number; applied in increasing order.
    pub version: i32,
    /// A short name, recorded in `annals_migrations`.
    pub name: &'static str,
    /// The DDL.
    pub sql: &'static str,
}

/// All migrations, in order.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../sql/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "event_fingerprints",
        sql: include_str!("../sql/0002_event_fingerprints.sql"),
    },
    Migration {
        version: 3,
        name: "snapshot_history",
        sql: include_str!("../sql/0003_snapshot_history.sql"),
    },
    Migration {
        version: 4,
        name: "append_many",
        sql: include_str!("../sql/0004_append_many.sql"),
    },
    Migration {
        version: 5,
        name: "correlation_index",
        sql: include_str!("../sql/0005_correlation_index.sql"),
    },
    Migration {
        version: 6,
        name: "feed_indexes",
        sql: include_str!("../sql/0006_feed_indexes.sql"),
    },
    Migration {
        version: 7,
        name: "archived_streams",
        sql: include_str!("../sql/0007_archived_streams.sql"),
    },
    Migration {
        version: 8,
        name: "gdpr_keys",
        sql: include_str!("../sql/0008_gdpr_keys.sql"),
    },
    Migration {
        version: 9,
        name: "projection_control",
        sql: include_str!("../sql/0009_projection_control.sql"),
    },
    Migration {
        version: 10,
        name: "event_migrations",
        sql: include_str!("../sql/0010_event_migrations.sql"),
    },
    Migration {
        version: 11,
        name: "projection_versions",
        sql: include_str!("../sql/0011_projection_versions.sql"),
    },
    Migration {
        version: 12,
        name: "partition_leases",
        sql: include_str!("../sql/0012_partition_leases.sql"),
    },
];

/// The schema version this build needs: the last migration's.
pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version as i64;

/// The bookkeeping table, created before any migration runs.
const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS annals_migrations (
    version    int PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// First key of the migration advisory lock ("anna"); the second is the
/// hash of the schema name, so inits of different schemas do not wait for
/// each other.
const MIGRATE_LOCK_CLASS: i32 = 0x616e_6e61;

/// The whole schema as one script, for `annals schema --backend postgres`.
pub(crate) fn schema_sql() -> String {
    let mut out = format!(
        "-- Annals PostgreSQL schema, version {SCHEMA_VERSION}.\n\
         -- Run it with the target schema first on the search_path, or let\n\
         -- `annals init` (PgEventStore::migrate) apply it.\n\n\
         BEGIN;\n\n{MIGRATIONS_TABLE};\n\n"
    );
    for m in MIGRATIONS {
        out.push_str(&format!(
            "-- Migration {:04}: {}\n{}\n",
            m.version, m.name, m.sql
        ));
        out.push_str(&format!(
            "INSERT INTO annals_migrations (version, name) VALUES ({}, '{}');\n\n",
            m.version, m.name
        ));
    }
    out.push_str("COMMIT;\n");
    out
}

/// The schema version recorded in the database (0: none).
pub(crate) async fn current_version(client: &Client) -> Result<i64> {
    let exists: bool = client
        .query_one("SELECT to_regclass('annals_migrations') IS NOT NULL", &[])
        .await
        .context("cannot read the schema version")?
        .try_get(0)
        .context("cannot read the schema version")?;
    if !exists {
        return Ok(0);
    }
    let version: Option<i32> = client
        .query_one("SELECT max(version) FROM annals_migrations", &[])
        .await
        .context("cannot read the schema version")?
        .try_get(0)
        .context("cannot read the schema version")?;
    Ok(version.map_or(0, i64::from))
}

/// Applies the pending migrations to `schema` (creating it if needed).
pub(crate) async fn migrate(client: &mut Client, schema: &str) -> Result<()> {
    loop {
        let tx = client
            .transaction()
            .await
            .context("cannot start a migration")?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&MIGRATE_LOCK_CLASS, &schema],
        )
        .await
        .context("cannot take the migration lock")?;
        let exists = tx
            .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
            .await
            .context("cannot look up the schema")?
            .is_some();
        if !exists {
            // The name was validated (letters, digits, `_`) when the store
            // was created, so quoting it is enough.
            tx.batch_execute(&format!("CREATE SCHEMA \"{schema}\""))
                .await
                .context("cannot create the schema")?;
        }
        tx.batch_execute(MIGRATIONS_TABLE)
            .await
            .context("cannot create annals_migrations")?;
        let applied: Option<i32> = tx
            .query_one("SELECT max(version) FROM annals_migrations", &[])
            .await
            .context("cannot read the schema version")?
            .try_get(0)
            .context("cannot read the schema version")?;
        let applied = applied.unwrap_or(0);
        if i64::from(applied) > SCHEMA_VERSION {
            return Err(Error::SchemaVersion {
                found: i64::from(applied),
                expected: SCHEMA_VERSION,
            });
        }
        let Some(next) = MIGRATIONS.iter().find(|m| m.version > applied) else {
            tx.commit().await.context("cannot commit the migration")?;
            return Ok(());
        };
        tracing::info!(
            schema,
            version = next.version,
            name = next.name,
            "applying migration"
        );
        tx.batch_execute(next.sql).await.map_err(|e| {
            crate::error::backend(
                format!("migration {:04} ({}) failed", next.version, next.name),
                e,
            )
        })?;
        tx.execute(
            "INSERT INTO annals_migrations (version, name) VALUES ($1, $2)",
            &[&next.version, &next.name],
        )
        .await
        .context("cannot record the migration")?;
        tx.commit().await.context("cannot commit the migration")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order() {
        // 1, 2, 3 ... with no gap.
        assert_eq!(MIGRATIONS[0].version, 1);
        for w in MIGRATIONS.windows(2) {
            assert!(
                w[0].version + 1 == w[1].version,
                "{} before {}",
                w[0].name,
                w[1].name
            );
        }
        assert_eq!(
            SCHEMA_VERSION,
            i64::from(MIGRATIONS[MIGRATIONS.len() - 1].version)
        );
    }

    #[test]
    fn schema_sql_holds_every_migration() {
        let sql = schema_sql();
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS annals_migrations"));
        for m in MIGRATIONS {
            assert!(sql.contains(m.sql));
        }
        assert!(sql.trim_end().ends_with("COMMIT;"));
    }
}
