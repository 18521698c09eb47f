-- Publish outbox events in the order they were committed (ids like
-- "g1/10" do not sort by version as text).
ALTER TABLE group_event_outbox ADD COLUMN seq BIGSERIAL;
