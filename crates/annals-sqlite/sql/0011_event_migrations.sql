-- Copy-and-transform migrations of the event table (`annals events
-- migrate`, `swap`, `drop-backup`; annals::EventMigration).
--
-- One row per run. While a run copies, the copy is the table
-- `events_migrating`; `source_position` is the last source position
-- copied (the run's checkpoint, committed with each batch);
-- `position_delta` the events gained (or lost, negative) so far, which
-- shifts the positions after the first drop or split (`renumbered`).
CREATE TABLE event_migrations (
    id              INTEGER PRIMARY KEY,
    plan_file       TEXT    NOT NULL,
    plan            TEXT    NOT NULL,
    state           TEXT    NOT NULL,          -- copying | swapped | done
    started_at      INTEGER NOT NULL,          -- microseconds since the epoch, UTC
    source_position INTEGER,                   -- NULL: nothing copied yet
    source_events   INTEGER NOT NULL DEFAULT 0,
    written_events  INTEGER NOT NULL DEFAULT 0,
    position_delta  INTEGER NOT NULL DEFAULT 0,
    renumbered      INTEGER NOT NULL DEFAULT 0,
    backup_table    TEXT,
    swapped_at      INTEGER
);

-- The copying run's streams whose event count changed: versions in the
-- copy are the source's plus `delta` (for the events after the change).
CREATE TABLE event_migration_streams (
    stream_id TEXT    PRIMARY KEY,
    delta     INTEGER NOT NULL
) WITHOUT ROWID;

-- Source events of the copying run that no event of the copy has the id of
-- (dropped, split, purged): the verification's id check skips them.
CREATE TABLE event_migration_removed (
    event_id       BLOB    PRIMARY KEY,
    stream_id      TEXT    NOT NULL,
    stream_version INTEGER NOT NULL
) WITHOUT ROWID;
