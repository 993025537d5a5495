-- Looking up an event's correlation and the events it caused (`annals event`,
-- `StreamCatalog::read_correlated` / `read_caused_by`): indexes on the ids in
-- the metadata (canonical JSON, so the ids are lowercase hyphenated text),
-- over the events that carry one only. The position (the rowid) is part of
-- every index entry, so a lookup reads its events in global order.
CREATE INDEX events_correlation_id ON events (json_extract(metadata, '$.correlation_id'))
    WHERE json_extract(metadata, '$.correlation_id') IS NOT NULL;
CREATE INDEX events_causation_id ON events (json_extract(metadata, '$.causation_id'))
    WHERE json_extract(metadata, '$.causation_id') IS NOT NULL;
