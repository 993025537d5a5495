-- Annals PostgreSQL schema, version 4: multi-stream atomic appends.
--
-- annals_append_many appends to several streams in one statement (one
-- implicit transaction, one round trip): all of them or none. Stream i gets
-- the events p_counts[i] long, starting after those of streams 1..i-1, in the
-- flattened event arrays; its expectation is p_expected_kinds[i] (0 any, 1 no
-- stream, 2 stream exists, 3 exact) with p_expected_versions[i].
--
-- Locking: every stream's advisory lock (the key annals_append uses) is
-- taken first, in increasing key order, so two calls over overlapping
-- streams queue for each other instead of deadlocking, whatever order their
-- callers listed the streams in. They are all taken before this transaction
-- has an id, so for each stream the previous writer got its id before this
-- one, exactly as for annals_append: versions follow the global order and
-- the read horizon needs nothing new.
--
-- Every stream is checked (younger writer: outcome 4; expected version:
-- outcome 2) before any is written, and the first refusal is the one row
-- returned, with r_index naming the stream. Then each stream is written by
-- annals_append itself (its locks are already held, so its own checks pass):
-- the insert is not duplicated here. A reused event id fails the statement
-- on the unique index, as for annals_append, and nothing is written.
CREATE FUNCTION annals_append_many(
    p_stream_ids        text[],
    p_categories        text[],
    p_expected_kinds    smallint[],
    p_expected_versions bigint[],
    p_counts            int[],
    p_event_ids         uuid[],
    p_event_types       text[],
    p_event_versions    int[],
    p_data              jsonb[],
    p_metadata          jsonb[],
    p_digests           bytea[]
) RETURNS TABLE (r_outcome smallint, r_version bigint, r_tx bigint, r_seqs bigint[], r_index int)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_key  bigint;
    v_tx   xid8;
    v_head bigint;
    v_last xid8;
    v_ok   boolean;
    v_from int := 1;
    v_to   int;
    v_row  record;
BEGIN
    FOR v_key IN
        SELECT DISTINCT hashtextextended(s.id, 0) FROM unnest(p_stream_ids) AS s(id) ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(v_key);
    END LOOP;
    v_tx := pg_current_xact_id();

    FOR i IN 1 .. cardinality(p_stream_ids) LOOP
        SELECT s.version, s.last_tx INTO v_head, v_last
          FROM streams s WHERE s.stream_id = p_stream_ids[i];
        IF v_last > v_tx THEN
            RETURN QUERY SELECT 4::smallint, v_head, v_last::text::bigint, NULL::bigint[], i;
            RETURN;
        END IF;
        v_ok := CASE p_expected_kinds[i]
            WHEN 0 THEN true
            WHEN 1 THEN v_head IS NULL
            WHEN 2 THEN v_head IS NOT NULL
            ELSE coalesce(v_head, 0) = p_expected_versions[i]
        END;
        IF NOT v_ok THEN
            RETURN QUERY SELECT 2::smallint, v_head, NULL::bigint, NULL::bigint[], i;
            RETURN;
        END IF;
    END LOOP;

    FOR i IN 1 .. cardinality(p_stream_ids) LOOP
        v_to := v_from + p_counts[i] - 1;
        SELECT * INTO v_row FROM annals_append(
            p_stream_ids[i], p_categories[i], p_expected_kinds[i], p_expected_versions[i],
            p_event_ids[v_from:v_to], p_event_types[v_from:v_to],
            p_event_versions[v_from:v_to], p_data[v_from:v_to], p_metadata[v_from:v_to],
            p_digests[v_from:v_to]);
        IF v_row.r_outcome <> 0 THEN
            -- Cannot happen under the locks held; abort rather than commit
            -- part of the call.
            RAISE EXCEPTION 'annals_append_many: % changed under its lock (outcome %)',
                p_stream_ids[i], v_row.r_outcome;
        END IF;
        r_outcome := v_row.r_outcome;
        r_version := v_row.r_version;
        r_tx := v_row.r_tx;
        r_seqs := v_row.r_seqs;
        r_index := i;
        RETURN NEXT;
        v_from := v_to + 1;
    END LOOP;
END
$fn$;
