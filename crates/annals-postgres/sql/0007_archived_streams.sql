-- Tombstones of archived streams (`annals archive`).
--
-- An archived stream's events are removed from `events`; its `streams` row
-- stays with its head, so its versions are never reused, and this row says
-- where its events went. Reads and `stream_version` look here and fail with
-- a typed error naming `location`; appends are refused by the trigger
-- below, which fires when `annals_append` (or `annals_append_many`) moves
-- the stream's head, with SQLSTATE AN001, the stream in the error's HINT,
-- the location in its DETAIL and the head at the end of its message.
CREATE TABLE archived_streams (
    stream_id   text        PRIMARY KEY,
    version     bigint      NOT NULL,   -- the head when archived
    location    text        NOT NULL,   -- the archive file holding its events
    archived_at timestamptz NOT NULL
);

CREATE FUNCTION annals_refuse_archived() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    loc text;
BEGIN
    SELECT a.location INTO loc FROM archived_streams a WHERE a.stream_id = NEW.stream_id;
    IF FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = 'AN001',
            MESSAGE = format('stream %s is archived at version %s', NEW.stream_id, OLD.version),
            DETAIL = loc,
            HINT = NEW.stream_id;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER streams_refuse_archived BEFORE UPDATE OF version ON streams
    FOR EACH ROW EXECUTE FUNCTION annals_refuse_archived();
