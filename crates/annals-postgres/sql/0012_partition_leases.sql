-- Partitioned projections (annals::PartitionLeases, annals::PartitionedRunner).
--
-- One lease row per partition of a projection version. A worker claims a
-- row only when it has expired (against the database's clock), and every
-- claim raises `fence` by one: the fencing token, which only grows. Each
-- batch a worker commits checks, in its own transaction, that the row still
-- carries the worker's token (SELECT ... FOR SHARE), so a worker that was
-- paused past its lease and taken over commits nothing.
CREATE TABLE partition_leases (
    name       text COLLATE "C" NOT NULL,    -- the checkpoint name, name@vN
    partition  integer     NOT NULL,         -- 0 .. partitions - 1
    partitions integer     NOT NULL,         -- how many the projection runs as
    owner      text,                         -- the worker that holds or held it
    fence      bigint      NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT 'epoch',
    PRIMARY KEY (name, partition)
);

-- The workers sharing a projection's partitions, with a heartbeat: each one
-- aims at ceil(partitions / live workers) leases.
CREATE TABLE partition_workers (
    name       text COLLATE "C" NOT NULL,
    worker     text        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (name, worker)
);
