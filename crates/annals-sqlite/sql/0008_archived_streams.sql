-- Tombstones of archived streams (`annals archive`).
--
-- An archived stream's events are removed from `events`; its `streams` row
-- stays with its head, so its versions are never reused, and this row says
-- where its events went. Reads, `stream_version` and appends of the stream
-- look here and fail with a typed error naming `location`.
CREATE TABLE archived_streams (
    stream_id   TEXT    PRIMARY KEY,
    version     INTEGER NOT NULL,   -- the head when archived
    location    TEXT    NOT NULL,   -- the archive file holding its events
    archived_at INTEGER NOT NULL    -- microseconds since the epoch, UTC
) WITHOUT ROWID;
