-- Projection locks and dead letters (annals::ProjectionControl).
--
-- One lease row per projection checkpoint name: a runner or a rebuild takes
-- it (in the writer's transaction) when there is none or it has expired,
-- renews it while it runs, and deletes it when it stops.
CREATE TABLE projection_locks (
    name       TEXT    PRIMARY KEY,          -- the checkpoint name, name@vN
    owner      TEXT    NOT NULL,             -- pid PID on HOST
    token      TEXT    NOT NULL,             -- unique to the acquisition
    expires_at INTEGER NOT NULL              -- microseconds since the epoch, UTC
) WITHOUT ROWID;

-- Events a projection parked (error policy Park), by checkpoint name and
-- position.
CREATE TABLE dead_letters (
    name            TEXT    NOT NULL,
    position_commit INTEGER NOT NULL,
    position        INTEGER NOT NULL,
    event_id        TEXT    NOT NULL,
    stream_id       TEXT    NOT NULL,
    event_type      TEXT    NOT NULL,
    error           TEXT    NOT NULL,
    attempts        INTEGER NOT NULL,
    parked_at       INTEGER NOT NULL,        -- microseconds since the epoch, UTC
    PRIMARY KEY (name, position_commit, position)
) WITHOUT ROWID;
