-- Snapshot history as a setting of the store, and rollback.
--
-- How many snapshots each aggregate keeps (the live one included) is this
-- one row, read by every guarded write inside its transaction, so every
-- process trims to the same length. `annals snapshots keep N`
-- (`set_snapshot_history_size`) changes it and trims at once.
CREATE TABLE snapshot_settings (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    history INTEGER NOT NULL CHECK (history >= 1)
);
INSERT INTO snapshot_settings (id, history) VALUES (1, 1);

-- Set (microseconds since the epoch, UTC) on the rows a rollback retired:
-- they are never loaded, and they block guarded writes at or below their
-- version. The live snapshot is the highest row where this is NULL.
ALTER TABLE snapshots ADD COLUMN rolled_back_at INTEGER;
