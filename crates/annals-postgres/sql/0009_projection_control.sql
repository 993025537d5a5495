-- Projection locks and dead letters (annals::ProjectionControl).
--
-- One lease row per projection checkpoint name: a runner or a rebuild takes
-- it when there is none or it has expired (against the database's clock),
-- renews it while it runs, and deletes it when it stops.
CREATE TABLE projection_locks (
    name       text COLLATE "C" PRIMARY KEY,  -- the checkpoint name, name@vN
    owner      text        NOT NULL,          -- pid PID on HOST
    token      text        NOT NULL,          -- unique to the acquisition
    expires_at timestamptz NOT NULL
);

-- Events a projection parked (error policy Park), by checkpoint name and
-- position.
CREATE TABLE dead_letters (
    name       text COLLATE "C" NOT NULL,
    commit_pos bigint      NOT NULL,
    seq        bigint      NOT NULL,
    event_id   uuid        NOT NULL,
    stream_id  text        NOT NULL,
    event_type text        NOT NULL,
    error      text        NOT NULL,
    attempts   integer     NOT NULL,
    parked_at  timestamptz NOT NULL,
    PRIMARY KEY (name, commit_pos, seq)
);
