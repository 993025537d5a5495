-- Looking up an event's correlation and the events it caused (`annals event`,
-- `StreamCatalog::read_correlated` / `read_caused_by`): indexes on the ids in
-- the metadata, with the global order after them so a lookup reads its
-- events in order, over the events that carry one only.
--
-- CREATE INDEX (not CONCURRENTLY, which cannot run inside the migration's
-- transaction) blocks appends while it builds: on a large store, run
-- `annals init` when a pause of writes is acceptable.
CREATE INDEX events_correlation_idx ON events ((metadata->>'correlation_id'), tx_id, seq)
    WHERE metadata->>'correlation_id' IS NOT NULL;
CREATE INDEX events_causation_idx ON events ((metadata->>'causation_id'), tx_id, seq)
    WHERE metadata->>'causation_id' IS NOT NULL;
