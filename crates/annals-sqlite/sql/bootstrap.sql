-- The migration ledger: one row per applied migration. Created before any
-- migration runs, so it is not itself a versioned migration.
CREATE TABLE IF NOT EXISTS annals_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT    NOT NULL,
    applied_at TEXT    NOT NULL
);
