-- Events and stream heads.
--
-- `position` is the global order. AUTOINCREMENT never reuses a rowid, and a
-- single writer assigns positions inside BEGIN IMMEDIATE transactions, so
-- positions are commit-ordered: a reader that has seen position p will never
-- later find a committed event below p.
--
-- Timestamps are integer microseconds since the Unix epoch, UTC (sortable,
-- and the precision PostgreSQL keeps).
CREATE TABLE events (
    position       INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id       BLOB    NOT NULL UNIQUE,   -- the 16 bytes of the UUID
    stream_id      TEXT    NOT NULL,          -- `<Category>-<id>`
    category       TEXT    NOT NULL,          -- the text before the first `-`
    stream_version INTEGER NOT NULL,          -- 1-based, no gaps
    event_type     TEXT    NOT NULL,
    event_version  INTEGER NOT NULL,
    data           TEXT    NOT NULL,          -- JSON
    metadata       TEXT    NOT NULL,          -- JSON object
    recorded_at    INTEGER NOT NULL,          -- microseconds since the epoch, UTC
    UNIQUE (stream_id, stream_version)
);

CREATE INDEX events_event_type_recorded_at ON events (event_type, recorded_at);
CREATE INDEX events_recorded_at ON events (recorded_at);
CREATE INDEX events_category_position ON events (category, position);

-- One row per stream with its head version: the expected-version check reads
-- one row instead of MAX(stream_version), and listing a category's streams
-- does not scan the events.
CREATE TABLE streams (
    stream_id TEXT    PRIMARY KEY,
    category  TEXT    NOT NULL,
    version   INTEGER NOT NULL
) WITHOUT ROWID;

-- In a WITHOUT ROWID table a secondary index ends with the primary key, so
-- this one also serves `ORDER BY stream_id` within a category.
CREATE INDEX streams_category ON streams (category);
