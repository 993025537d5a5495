-- The active version of each SQL projection whose read model was rebuilt
-- blue-green (annals::blue_green): the swap sets it in the transaction that
-- renames the shadow tables into place, and a runner of an older version
-- reads it in each batch transaction and stops.
CREATE TABLE projection_versions (
    name           TEXT    PRIMARY KEY,      -- the projection's name
    active_version INTEGER,                  -- the version whose tables are live
    swapped_at     INTEGER                   -- microseconds since the epoch, UTC
) WITHOUT ROWID;
