-- Projection checkpoints. A global position is a pair (commit, seq); SQLite
-- positions have commit 0, but a checkpoint may track another store, so both
-- parts are kept and compared as a pair.
CREATE TABLE checkpoints (
    name            TEXT    PRIMARY KEY,
    position_commit INTEGER NOT NULL DEFAULT 0,
    position        INTEGER NOT NULL,         -- the seq part
    updated_at      INTEGER NOT NULL          -- microseconds since the epoch, UTC
) WITHOUT ROWID;
