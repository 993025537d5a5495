-- Copy-and-transform migrations of the event table (`annals events
-- migrate`, `swap`, `drop-backup`; annals::EventMigration).
--
-- One row per run. While a run copies, the copy is the table
-- `events_migrating` (created `LIKE events INCLUDING ALL`);
-- (`source_commit`, `source_seq`) is the last source position copied (the
-- run's checkpoint, committed with each batch). Rows keep their source
-- `(tx_id, seq)` until the first drop or split (`renumbered`); from then on
-- they keep their `tx_id` and take `next_seq`, counting up, so the order
-- `(tx_id, seq)` is the copy order.
CREATE TABLE event_migrations (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    plan_file      text        NOT NULL,
    plan           text        NOT NULL,
    state          text        NOT NULL,        -- copying | swapped | done
    started_at     timestamptz NOT NULL DEFAULT now(),
    source_commit  bigint,                      -- NULL: nothing copied yet
    source_seq     bigint,
    source_events  bigint      NOT NULL DEFAULT 0,
    written_events bigint      NOT NULL DEFAULT 0,
    next_seq       bigint      NOT NULL DEFAULT 0,
    renumbered     boolean     NOT NULL DEFAULT false,
    backup_table   text,
    swapped_at     timestamptz
);

-- The copying run's streams whose event count changed: versions in the
-- copy are the source's plus `delta` (for the events after the change).
CREATE TABLE event_migration_streams (
    stream_id text COLLATE "C" PRIMARY KEY,
    delta     bigint NOT NULL
);

-- Source events of the copying run that no event of the copy has the id of
-- (dropped, split, purged): the verification's id check skips them.
CREATE TABLE event_migration_removed (
    event_id       uuid   PRIMARY KEY,
    stream_id      text   NOT NULL,
    stream_version bigint NOT NULL
);
