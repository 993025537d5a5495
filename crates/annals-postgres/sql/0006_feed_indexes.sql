-- Filtered reads of the global feed (subscriptions and projections filtered
-- by event type): one range scan per type in global order, so a filter on a
-- rare type reads only its own events (the category filter already has
-- `events_category_tx_seq_idx`, migration 1).
--
-- CREATE INDEX (not CONCURRENTLY, which cannot run inside the migration's
-- transaction) blocks appends while it builds: on a large store, run
-- `annals init` when a pause of writes is acceptable.
CREATE INDEX events_type_tx_seq_idx ON events (event_type, tx_id, seq);
