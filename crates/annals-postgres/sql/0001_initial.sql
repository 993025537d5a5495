-- Annals PostgreSQL schema, version 1: events, streams, snapshots,
-- checkpoints, and the functions that keep their invariants.
--
-- Objects are created unqualified: `migrate()` runs this file with the
-- store's schema first on the search_path. Text keys use the "C" collation so
-- that ordering is by bytes, as in the other backends, whatever the
-- database's default collation.

-- One row per stream: its head version and the id of the transaction that
-- last wrote it. `last_tx` lets an append detect that a younger transaction
-- already wrote the stream (see `annals_append`).
CREATE TABLE streams (
    stream_id text COLLATE "C" PRIMARY KEY,
    category  text COLLATE "C" NOT NULL,
    version   bigint NOT NULL CHECK (version > 0),
    last_tx   xid8   NOT NULL
);
CREATE INDEX streams_category_idx ON streams (category, stream_id);

-- The log. The global order is (tx_id, seq): the appending transaction's id,
-- then the row's sequence number. Readers only see rows whose tx_id is below
-- the horizon of their snapshot, so no uncommitted transaction can later add
-- a row before a position they have passed.
CREATE TABLE events (
    seq            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx_id          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    event_id       uuid        NOT NULL,
    stream_id      text COLLATE "C" NOT NULL,
    category       text COLLATE "C" NOT NULL,
    stream_version bigint      NOT NULL CHECK (stream_version > 0),
    event_type     text COLLATE "C" NOT NULL,
    event_version  int         NOT NULL CHECK (event_version > 0),
    data           jsonb       NOT NULL,
    metadata       jsonb       NOT NULL DEFAULT '{}',
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version)
);
CREATE INDEX events_tx_seq_idx ON events (tx_id, seq);
CREATE INDEX events_type_recorded_idx ON events (event_type, recorded_at);
CREATE INDEX events_recorded_idx ON events (recorded_at);
CREATE INDEX events_category_tx_seq_idx ON events (category, tx_id, seq);

-- Live snapshots, with up to K older ones per aggregate kept for rollback.
-- The live one is the row with the highest (schema_version, version). The
-- primary key's prefix serves lookups by aggregate_type alone.
CREATE TABLE snapshots (
    aggregate_type text COLLATE "C" NOT NULL,
    aggregate_id   text COLLATE "C" NOT NULL,
    version        bigint      NOT NULL CHECK (version >= 0),
    schema_version bigint      NOT NULL CHECK (schema_version >= 0),
    state          jsonb       NOT NULL,
    created_at     timestamptz NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, version)
);
CREATE INDEX snapshots_id_type_idx ON snapshots (aggregate_id, aggregate_type);
CREATE INDEX snapshots_type_schema_idx ON snapshots (aggregate_type, schema_version);
CREATE INDEX snapshots_created_idx ON snapshots (created_at);

-- Snapshots built ahead of a deploy; one per aggregate.
CREATE TABLE snapshot_staging (
    aggregate_type text COLLATE "C" NOT NULL,
    aggregate_id   text COLLATE "C" NOT NULL,
    version        bigint      NOT NULL CHECK (version >= 0),
    schema_version bigint      NOT NULL CHECK (schema_version >= 0),
    state          jsonb       NOT NULL,
    created_at     timestamptz NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Projection checkpoints: a GlobalPosition as (commit_pos, seq).
CREATE TABLE checkpoints (
    name       text COLLATE "C" PRIMARY KEY,
    commit_pos bigint      NOT NULL,
    seq        bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Appends one batch to one stream, in one statement (one round trip).
--
-- Outcomes (r_outcome):
--   0 appended: r_version = the first new version, r_tx = this
--     transaction's id, r_seqs = the events' seqs in batch order
--   2 wrong expected version: r_version = the head (NULL: no stream)
--   4 the stream was last written by a younger transaction: nothing was
--     written; retry in a new transaction (whose id is then larger)
-- Always exactly one row.
-- An event id that is already stored makes the insert fail on
-- events_event_id_key; the caller then reads the stored events to tell an
-- idempotent retry from a duplicate id (and does the same before reporting
-- outcome 2, since a retried batch must succeed whatever it expected). The
-- unique index does that check for free on the common path, where a
-- separate lookup would cost a probe per event.
--
-- The advisory lock is taken before this transaction has an id, so that the
-- transaction that held it before (and wrote the stream) always has a
-- smaller id than this one: a stream's versions then follow the global
-- order, and outcome 4 only happens when something wrote the stream
-- without this function.
CREATE FUNCTION annals_append(
    p_stream_id        text,
    p_category         text,
    p_expected_kind    smallint, -- 0 any, 1 no stream, 2 stream exists, 3 exact
    p_expected_version bigint,
    p_event_ids        uuid[],
    p_event_types      text[],
    p_event_versions   int[],
    p_data             jsonb[],
    p_metadata         jsonb[]
) RETURNS TABLE (r_outcome smallint, r_version bigint, r_tx bigint, r_seqs bigint[])
LANGUAGE plpgsql AS $fn$
DECLARE
    v_tx   xid8;
    v_head bigint;
    v_last xid8;
    v_n    int := cardinality(p_event_ids);
    v_now  timestamptz;
    v_ok   boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_stream_id, 0));
    v_tx := pg_current_xact_id();

    -- No FOR UPDATE: the advisory lock already serializes this stream's
    -- appends, and a row lock would cost a WAL record before the update.
    SELECT s.version, s.last_tx INTO v_head, v_last
      FROM streams s WHERE s.stream_id = p_stream_id;
    IF v_last > v_tx THEN
        RETURN QUERY SELECT 4::smallint, v_head, v_last::text::bigint, NULL::bigint[];
        RETURN;
    END IF;

    v_ok := CASE p_expected_kind
        WHEN 0 THEN true
        WHEN 1 THEN v_head IS NULL
        WHEN 2 THEN v_head IS NOT NULL
        ELSE coalesce(v_head, 0) = p_expected_version
    END;
    IF NOT v_ok THEN
        RETURN QUERY SELECT 2::smallint, v_head, NULL::bigint, NULL::bigint[];
        RETURN;
    END IF;

    -- One timestamp per batch: the batch is one atomic fact.
    v_now := clock_timestamp();
    RETURN QUERY
    WITH created AS (
        INSERT INTO streams (stream_id, category, version, last_tx)
        SELECT p_stream_id, p_category, v_n, v_tx
         WHERE v_head IS NULL
    ), updated AS (
        UPDATE streams s SET version = v_head + v_n, last_tx = v_tx
         WHERE s.stream_id = p_stream_id AND v_head IS NOT NULL
    ), inserted AS (
        INSERT INTO events AS e (tx_id, event_id, stream_id, category, stream_version,
                                 event_type, event_version, data, metadata, recorded_at)
        SELECT v_tx, b.id, p_stream_id, p_category, coalesce(v_head, 0) + b.ord,
               b.typ, b.ver, b.dat, b.meta, v_now
          FROM unnest(p_event_ids, p_event_types, p_event_versions, p_data, p_metadata)
               WITH ORDINALITY AS b(id, typ, ver, dat, meta, ord)
         ORDER BY b.ord
        RETURNING e.seq
    )
    -- Rows are inserted in batch order, so their seqs increase with it.
    SELECT 0::smallint, coalesce(v_head, 0) + 1, v_tx::text::bigint,
           array_agg(i.seq ORDER BY i.seq)
      FROM inserted i;
END
$fn$;

-- Saves a snapshot unless the live one supersedes it; keeps the newest
-- p_keep rows of the aggregate. Returns whether it was written.
--
-- ROW EXCLUSIVE on the table is what every writer takes anyway; taking it
-- first makes `annals_promote_staged` (SHARE ROW EXCLUSIVE) wait for saves
-- in flight, so no save decides on a live snapshot that a promotion is about
-- to replace. The advisory lock serializes saves of one aggregate.
CREATE FUNCTION annals_save_snapshot(
    p_type       text,
    p_id         text,
    p_version    bigint,
    p_schema     bigint,
    p_state      jsonb,
    p_created_at timestamptz,
    p_keep       int
) RETURNS boolean
LANGUAGE plpgsql AS $fn$
DECLARE
    v_schema  bigint;
    v_version bigint;
BEGIN
    LOCK TABLE snapshots IN ROW EXCLUSIVE MODE;
    PERFORM pg_advisory_xact_lock(hashtextextended(p_type || '/' || p_id, 1));

    SELECT s.schema_version, s.version INTO v_schema, v_version
      FROM snapshots s
     WHERE s.aggregate_type = p_type AND s.aggregate_id = p_id
     ORDER BY s.schema_version DESC, s.version DESC
     LIMIT 1;
    IF FOUND AND (p_schema, p_version) < (v_schema, v_version) THEN
        RETURN false;
    END IF;

    INSERT INTO snapshots AS s (aggregate_type, aggregate_id, version, schema_version, state, created_at)
    VALUES (p_type, p_id, p_version, p_schema, p_state, p_created_at)
    ON CONFLICT (aggregate_type, aggregate_id, version) DO UPDATE
       SET schema_version = EXCLUDED.schema_version,
           state = EXCLUDED.state,
           created_at = EXCLUDED.created_at;

    DELETE FROM snapshots s
     WHERE s.aggregate_type = p_type AND s.aggregate_id = p_id
       AND s.version NOT IN (
           SELECT k.version FROM snapshots k
            WHERE k.aggregate_type = p_type AND k.aggregate_id = p_id
            ORDER BY k.schema_version DESC, k.version DESC
            LIMIT p_keep);
    RETURN true;
END
$fn$;

-- Moves the staged snapshots of one type into the live table where they
-- supersede the live one, deletes the type's staging rows, and trims each
-- promoted aggregate to p_keep rows. One transaction; saves wait for it.
CREATE FUNCTION annals_promote_staged(p_type text, p_keep int)
RETURNS TABLE (r_promoted bigint, r_kept_live bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_total    bigint;
    v_promoted bigint;
BEGIN
    LOCK TABLE snapshots IN SHARE ROW EXCLUSIVE MODE;

    WITH staged AS (
        DELETE FROM snapshot_staging st WHERE st.aggregate_type = p_type
        RETURNING st.*
    ), live AS (
        SELECT DISTINCT ON (s.aggregate_id) s.aggregate_id, s.schema_version, s.version
          FROM snapshots s
         WHERE s.aggregate_type = p_type
           AND s.aggregate_id IN (SELECT aggregate_id FROM staged)
         ORDER BY s.aggregate_id, s.schema_version DESC, s.version DESC
    ), winners AS (
        SELECT st.* FROM staged st
          LEFT JOIN live l ON l.aggregate_id = st.aggregate_id
         WHERE l.aggregate_id IS NULL
            OR (st.schema_version, st.version) >= (l.schema_version, l.version)
    ), promoted AS (
        INSERT INTO snapshots AS s (aggregate_type, aggregate_id, version, schema_version, state, created_at)
        SELECT w.aggregate_type, w.aggregate_id, w.version, w.schema_version, w.state, w.created_at
          FROM winners w
        ON CONFLICT (aggregate_type, aggregate_id, version) DO UPDATE
           SET schema_version = EXCLUDED.schema_version,
               state = EXCLUDED.state,
               created_at = EXCLUDED.created_at
        RETURNING s.aggregate_id
    )
    SELECT (SELECT count(*) FROM promoted), (SELECT count(*) FROM staged)
      INTO v_promoted, v_total;

    IF v_promoted > 0 THEN
        DELETE FROM snapshots s
         USING (SELECT k.aggregate_id, k.version,
                       row_number() OVER (PARTITION BY k.aggregate_id
                                          ORDER BY k.schema_version DESC, k.version DESC) AS rn
                  FROM snapshots k WHERE k.aggregate_type = p_type) r
         WHERE s.aggregate_type = p_type
           AND s.aggregate_id = r.aggregate_id
           AND s.version = r.version
           AND r.rn > p_keep;
    END IF;

    RETURN QUERY SELECT v_promoted, v_total - v_promoted;
END
$fn$;
