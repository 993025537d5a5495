-- Filtered reads of the global feed (subscriptions and projections filtered
-- by event type): one range scan per type in position order, so a filter on
-- a rare type reads only its own events and `read_feed_page` moves through
-- the stretches between them without visiting them. The category filter
-- already has `events_category_position` (migration 1).
CREATE INDEX events_event_type_position ON events (event_type, position);
