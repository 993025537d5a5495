-- Annals PostgreSQL schema, version 2: payload fingerprints.
--
-- Each event stores the fingerprint of its payload: SHA-256 of the payload's
-- canonical JSON (or what an encrypting wrapper set instead), computed by the
-- core when the event is appended. An append whose event ids are already
-- stored compares fingerprints to tell an identical retry from a reused id,
-- without reading the stored payloads back: `jsonb` rewrites numbers, and a
-- wrapper's ciphertext differs on every attempt. Rows from before this
-- migration have none (NULL) and are compared by payload.
--
-- Adding a nullable column without a default only changes the catalog: no
-- table rewrite, however many events there are.
ALTER TABLE events ADD COLUMN data_digest bytea;

-- annals_append gains the fingerprints, as an optional last argument (a
-- call without it stores NULL). The argument list changes, so the old
-- function is dropped rather than replaced. Outcomes and locking are those of
-- version 1 (see 0001_initial.sql).
DROP FUNCTION annals_append(text, text, smallint, bigint, uuid[], text[], int[], jsonb[], jsonb[]);

CREATE FUNCTION annals_append(
    p_stream_id        text,
    p_category         text,
    p_expected_kind    smallint, -- 0 any, 1 no stream, 2 stream exists, 3 exact
    p_expected_version bigint,
    p_event_ids        uuid[],
    p_event_types      text[],
    p_event_versions   int[],
    p_data             jsonb[],
    p_metadata         jsonb[],
    p_digests          bytea[] DEFAULT NULL
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
                                 event_type, event_version, data, metadata, recorded_at,
                                 data_digest)
        SELECT v_tx, b.id, p_stream_id, p_category, coalesce(v_head, 0) + b.ord,
               b.typ, b.ver, b.dat, b.meta, v_now, b.dig
          FROM unnest(p_event_ids, p_event_types, p_event_versions, p_data, p_metadata,
                      p_digests)
               WITH ORDINALITY AS b(id, typ, ver, dat, meta, dig, ord)
         ORDER BY b.ord
        RETURNING e.seq
    )
    -- Rows are inserted in batch order, so their seqs increase with it.
    SELECT 0::smallint, coalesce(v_head, 0) + 1, v_tx::text::bigint,
           array_agg(i.seq ORDER BY i.seq)
      FROM inserted i;
END
$fn$;
