-- Snapshot history as a setting of the store, rollback, and guarded writes
-- that treat a snapshot beyond its stream's head as invalid.
--
-- How many snapshots each aggregate keeps (the live one included) is this
-- one row, read by every guarded write inside its transaction, so every
-- process trims to the same length. `annals_set_snapshot_history` (`annals
-- snapshots keep N`) changes it and trims at once.
CREATE TABLE snapshot_settings (
    id      boolean PRIMARY KEY DEFAULT true CHECK (id),
    history int     NOT NULL CHECK (history >= 1)
);
INSERT INTO snapshot_settings (history) VALUES (1);

-- Set on the rows a rollback retired: they are never loaded, and they block
-- guarded writes at or below their version. The live snapshot is the
-- highest row where this is NULL.
ALTER TABLE snapshots ADD COLUMN rolled_back_at timestamptz;

-- Replaced below: the history size is no longer a parameter.
DROP FUNCTION annals_save_snapshot(text, text, bigint, bigint, jsonb, timestamptz, int);
DROP FUNCTION annals_promote_staged(text, int);

-- Saves a snapshot unless the live one supersedes it or a rolled-back row is
-- at the same or a higher version; first deletes the aggregate's rows beyond
-- its stream's head (events restored from an older backup), so they never
-- block it; keeps the history size's worth of rows (the rows not rolled back
-- first, each newest first). Returns whether it was written.
--
-- ROW EXCLUSIVE on the table is what every writer takes anyway; taking it
-- first makes `annals_promote_staged` and `annals_set_snapshot_history`
-- (SHARE ROW EXCLUSIVE) wait for saves in flight. The advisory lock
-- serializes saves and rollbacks of one aggregate.
CREATE FUNCTION annals_save_snapshot(
    p_type       text,
    p_id         text,
    p_version    bigint,
    p_schema     bigint,
    p_state      jsonb,
    p_created_at timestamptz
) RETURNS boolean
LANGUAGE plpgsql AS $fn$
DECLARE
    v_head    bigint;
    v_schema  bigint;
    v_version bigint;
    v_retired bigint;
    v_keep    int;
BEGIN
    LOCK TABLE snapshots IN ROW EXCLUSIVE MODE;
    PERFORM pg_advisory_xact_lock(hashtextextended(p_type || '/' || p_id, 1));

    SELECT s.version INTO v_head FROM streams s WHERE s.stream_id = p_type || '-' || p_id;
    IF FOUND THEN
        DELETE FROM snapshots s
         WHERE s.aggregate_type = p_type AND s.aggregate_id = p_id AND s.version > v_head;
    END IF;

    SELECT s.schema_version, s.version INTO v_schema, v_version
      FROM snapshots s
     WHERE s.aggregate_type = p_type AND s.aggregate_id = p_id AND s.rolled_back_at IS NULL
     ORDER BY s.schema_version DESC, s.version DESC
     LIMIT 1;
    IF FOUND AND (p_schema, p_version) < (v_schema, v_version) THEN
        RETURN false;
    END IF;
    SELECT max(s.version) INTO v_retired
      FROM snapshots s
     WHERE s.aggregate_type = p_type AND s.aggregate_id = p_id AND s.rolled_back_at IS NOT NULL;
    IF v_retired IS NOT NULL AND p_version <= v_retired THEN
        RETURN false;
    END IF;

    INSERT INTO snapshots AS s (aggregate_type, aggregate_id, version, schema_version, state, created_at)
    VALUES (p_type, p_id, p_version, p_schema, p_state, p_created_at)
    ON CONFLICT (aggregate_type, aggregate_id, version) DO UPDATE
       SET schema_version = EXCLUDED.schema_version,
           state = EXCLUDED.state,
           created_at = EXCLUDED.created_at,
           rolled_back_at = NULL;

    SELECT st.history INTO v_keep FROM snapshot_settings st;
    DELETE FROM snapshots s
     WHERE s.aggregate_type = p_type AND s.aggregate_id = p_id
       AND s.version NOT IN (
           SELECT k.version FROM snapshots k
            WHERE k.aggregate_type = p_type AND k.aggregate_id = p_id
            ORDER BY k.rolled_back_at IS NOT NULL, k.schema_version DESC, k.version DESC
            LIMIT v_keep);
    RETURN true;
END
$fn$;

-- Moves the staged snapshots of one type into the live table where a
-- guarded write would admit them, deletes the type's staging rows, and trims
-- the type's histories. One transaction; saves wait for it.
CREATE FUNCTION annals_promote_staged(p_type text)
RETURNS TABLE (r_promoted bigint, r_kept_live bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_total    bigint;
    v_promoted bigint;
    v_keep     int;
BEGIN
    LOCK TABLE snapshots IN SHARE ROW EXCLUSIVE MODE;
    SELECT st.history INTO v_keep FROM snapshot_settings st;

    DELETE FROM snapshots s
     USING streams h
     WHERE s.aggregate_type = p_type
       AND h.stream_id = s.aggregate_type || '-' || s.aggregate_id
       AND s.version > h.version;

    WITH staged AS (
        DELETE FROM snapshot_staging st WHERE st.aggregate_type = p_type
        RETURNING st.*
    ), winners AS (
        SELECT st.* FROM staged st
         WHERE NOT EXISTS (
             SELECT 1 FROM snapshots l
              WHERE l.aggregate_type = p_type AND l.aggregate_id = st.aggregate_id
                AND ((l.rolled_back_at IS NULL
                      AND (l.schema_version, l.version) > (st.schema_version, st.version))
                  OR (l.rolled_back_at IS NOT NULL AND l.version >= st.version)))
    ), promoted AS (
        INSERT INTO snapshots AS s (aggregate_type, aggregate_id, version, schema_version, state, created_at)
        SELECT w.aggregate_type, w.aggregate_id, w.version, w.schema_version, w.state, w.created_at
          FROM winners w
        ON CONFLICT (aggregate_type, aggregate_id, version) DO UPDATE
           SET schema_version = EXCLUDED.schema_version,
               state = EXCLUDED.state,
               created_at = EXCLUDED.created_at,
               rolled_back_at = NULL
        RETURNING s.aggregate_id
    )
    SELECT (SELECT count(*) FROM promoted), (SELECT count(*) FROM staged)
      INTO v_promoted, v_total;

    IF v_promoted > 0 THEN
        DELETE FROM snapshots s
         USING (SELECT k.aggregate_id, k.version,
                       row_number() OVER (PARTITION BY k.aggregate_id
                                          ORDER BY k.rolled_back_at IS NOT NULL,
                                                   k.schema_version DESC, k.version DESC) AS rn
                  FROM snapshots k WHERE k.aggregate_type = p_type) r
         WHERE s.aggregate_type = p_type
           AND s.aggregate_id = r.aggregate_id
           AND s.version = r.version
           AND r.rn > v_keep;
    END IF;

    RETURN QUERY SELECT v_promoted, v_total - v_promoted;
END
$fn$;

-- Records a new history size and trims every aggregate to it; returns the
-- rows deleted. Waits for saves in flight, and saves wait for it.
CREATE FUNCTION annals_set_snapshot_history(p_keep int)
RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
    v_trimmed bigint;
BEGIN
    LOCK TABLE snapshots IN SHARE ROW EXCLUSIVE MODE;
    UPDATE snapshot_settings SET history = p_keep;
    WITH ranked AS (
        SELECT k.aggregate_type, k.aggregate_id, k.version,
               row_number() OVER (PARTITION BY k.aggregate_type, k.aggregate_id
                                  ORDER BY k.rolled_back_at IS NOT NULL,
                                           k.schema_version DESC, k.version DESC) AS rn
          FROM snapshots k
    ), gone AS (
        DELETE FROM snapshots s
         USING ranked r
         WHERE s.aggregate_type = r.aggregate_type
           AND s.aggregate_id = r.aggregate_id
           AND s.version = r.version
           AND r.rn > p_keep
        RETURNING 1
    )
    SELECT count(*) INTO v_trimmed FROM gone;
    RETURN v_trimmed;
END
$fn$;

-- Makes the aggregate's row at p_version live: marks the rows above it
-- rolled back and clears the mark on it. r_found is false (and nothing
-- changes) when there is no such row.
CREATE FUNCTION annals_rollback_snapshot(p_type text, p_id text, p_version bigint)
RETURNS TABLE (r_found boolean, r_rolled_back bigint, r_schema bigint, r_created_at timestamptz)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_schema  bigint;
    v_created timestamptz;
    v_count   bigint;
BEGIN
    LOCK TABLE snapshots IN ROW EXCLUSIVE MODE;
    PERFORM pg_advisory_xact_lock(hashtextextended(p_type || '/' || p_id, 1));

    SELECT s.schema_version, s.created_at INTO v_schema, v_created
      FROM snapshots s
     WHERE s.aggregate_type = p_type AND s.aggregate_id = p_id AND s.version = p_version;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, 0::bigint, NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;

    UPDATE snapshots s SET rolled_back_at = clock_timestamp()
     WHERE s.aggregate_type = p_type AND s.aggregate_id = p_id
       AND s.rolled_back_at IS NULL
       AND (s.schema_version, s.version) > (v_schema, p_version);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    UPDATE snapshots s SET rolled_back_at = NULL
     WHERE s.aggregate_type = p_type AND s.aggregate_id = p_id AND s.version = p_version;

    RETURN QUERY SELECT true, v_count, v_schema, v_created;
END
$fn$;
