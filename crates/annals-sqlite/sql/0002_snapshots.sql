-- Snapshots: a cache of aggregate state, never the source of truth.
--
-- The live snapshot of an aggregate is its row with the highest
-- (schema_version, version). With `snapshot_history = K` the store keeps the
-- newest K rows per aggregate, so an operator can roll back to an older one.
-- No separate index on (aggregate_type) alone: the primary key starts with it.
CREATE TABLE snapshots (
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    schema_version INTEGER NOT NULL,
    state          TEXT    NOT NULL,          -- JSON
    created_at     INTEGER NOT NULL,          -- microseconds since the epoch, UTC
    PRIMARY KEY (aggregate_type, aggregate_id, version)
);

CREATE INDEX snapshots_aggregate_id_type ON snapshots (aggregate_id, aggregate_type);
CREATE INDEX snapshots_type_schema_version ON snapshots (aggregate_type, schema_version);
CREATE INDEX snapshots_created_at ON snapshots (created_at);

-- Snapshots built ahead of a deploy by a snapshot migration; at most
-- one per aggregate. `promote_staged` moves them into `snapshots`.
CREATE TABLE snapshot_staging (
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    schema_version INTEGER NOT NULL,
    state          TEXT    NOT NULL,          -- JSON
    created_at     INTEGER NOT NULL,          -- microseconds since the epoch, UTC
    PRIMARY KEY (aggregate_type, aggregate_id)
) WITHOUT ROWID;
