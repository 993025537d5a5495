-- The global feed for subscriptions and projections.
--
-- 1. Filtered reads by event type: one range scan per type in global order,
--    so a filter on a rare type reads only its own events (the category
--    filter already has `events_category_tx_seq_idx`, migration 1).
--    CREATE INDEX (not CONCURRENTLY, which cannot run inside the migration's
--    transaction) blocks appends while it builds: on a large store, run
--    `annals init` when a pause of writes is acceptable.
CREATE INDEX events_type_tx_seq_idx ON events (event_type, tx_id, seq);

-- 2. Wake-ups: every statement that inserts events notifies the channel
--    `annals_appended` with the table's schema as payload. NOTIFY is
--    transactional: it is delivered when the appending transaction commits
--    (never for one that rolls back), and identical notifications of one
--    transaction are delivered once. Subscribers LISTEN on one connection per
--    store (`PgEventStore::append_signal`) and read the feed when woken; the
--    notification only says when to read, never what.
CREATE FUNCTION annals_notify_appended() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('annals_appended', TG_TABLE_SCHEMA);
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify_appended AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION annals_notify_appended();
