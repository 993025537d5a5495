-- The active version of each SQL projection whose read model was rebuilt
-- blue-green (annals::blue_green): the swap sets it in the transaction that
-- renames the shadow tables into place; a runner of an older version locks
-- and reads the row in each batch transaction and stops.
CREATE TABLE projection_versions (
    name           text COLLATE "C" PRIMARY KEY,  -- the projection's name
    active_version integer,                       -- the version whose tables are live
    swapped_at     timestamptz
);
