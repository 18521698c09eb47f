-- `messages` in monthly partitions by id (ids are time-sortable: the time
-- is `id >> 22` ms after the id epoch), so an old month is one table that
-- can be detached and moved to cheaper storage. The persister creates the
-- months ahead (persister/src/months.rs); a row whose month is missing
-- lands in `messages_default`, which a new month must not overlap.
--
-- A unique index of a partitioned table must hold the partition key, and
-- (conversation, sender, client_msg_id) cannot hold the id without losing
-- its point: the last net for idempotent sends moves to `message_keys`,
-- claimed in the same statement as the row (persister/src/writer.rs).

-- Creates the partition of each month from the one holding `from_ms` to
-- the one holding `to_ms` (ms since 1970, UTC months), if missing.
-- `epoch_ms` and `shift` are the id layout's (chat_shared::idgen), passed
-- by the caller.
CREATE FUNCTION chat_message_months(from_ms BIGINT, to_ms BIGINT, epoch_ms BIGINT, shift INT)
RETURNS VOID LANGUAGE plpgsql AS $$
DECLARE
    lo TIMESTAMP := date_trunc('month', to_timestamp(from_ms / 1000.0) AT TIME ZONE 'UTC');
    last TIMESTAMP := date_trunc('month', to_timestamp(to_ms / 1000.0) AT TIME ZONE 'UTC');
    hi TIMESTAMP;
    id_lo BIGINT;
    id_hi BIGINT;
BEGIN
    -- One creator at a time (several persisters start together).
    PERFORM pg_advisory_xact_lock(hashtextextended('chat_message_months', 0));
    WHILE lo <= last LOOP
        hi := lo + interval '1 month';
        id_lo := GREATEST((extract(epoch FROM lo) * 1000)::bigint - epoch_ms, 0) << shift;
        id_hi := GREATEST((extract(epoch FROM hi) * 1000)::bigint - epoch_ms, 0) << shift;
        IF id_hi > id_lo THEN
            EXECUTE format(
                'CREATE TABLE IF NOT EXISTS %I PARTITION OF messages FOR VALUES FROM (%s) TO (%s)',
                'messages_' || to_char(lo, 'YYYY_MM'), id_lo, id_hi);
        END IF;
        lo := hi;
    END LOOP;
END
$$;

ALTER TABLE messages RENAME TO messages_unpartitioned;
ALTER INDEX messages_pkey RENAME TO messages_unpartitioned_pkey;
ALTER INDEX messages_sender_client_msg_id RENAME TO messages_unpartitioned_keys;
ALTER INDEX messages_seq RENAME TO messages_unpartitioned_seq;
ALTER INDEX messages_search_words RENAME TO messages_unpartitioned_words;
ALTER INDEX messages_body_trigrams RENAME TO messages_unpartitioned_trigrams;
ALTER INDEX messages_id RENAME TO messages_unpartitioned_id;

CREATE TABLE messages (LIKE messages_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (id);
ALTER TABLE messages ADD PRIMARY KEY (conversation, id);
CREATE INDEX messages_seq ON messages (conversation, seq);
-- The indexes search reads (0008, 0011), as they were.
CREATE INDEX messages_search_words ON messages USING GIN (to_tsvector('simple', search_text(body)));
CREATE INDEX messages_body_trigrams ON messages USING GIN (body gin_trgm_ops);
CREATE INDEX messages_id ON messages (id);
CREATE TABLE messages_default PARTITION OF messages DEFAULT;

-- Every month that holds a stored message, up to the one two months
-- ahead. The id epoch (2025-01-01) and time shift as in chat_shared::idgen
-- (a unit test holds them equal).
SELECT chat_message_months(
    COALESCE((SELECT (min(id) >> 22) + 1735689600000 FROM messages_unpartitioned),
             (extract(epoch FROM now()) * 1000)::bigint),
    (extract(epoch FROM now() + interval '62 days') * 1000)::bigint,
    1735689600000, 22);
INSERT INTO messages SELECT * FROM messages_unpartitioned;

CREATE TABLE message_keys (
    conversation  TEXT   NOT NULL,
    sender        TEXT   NOT NULL,
    client_msg_id TEXT   NOT NULL,
    id            BIGINT NOT NULL,
    PRIMARY KEY (conversation, sender, client_msg_id)
);
INSERT INTO message_keys SELECT conversation, sender, client_msg_id, id FROM messages_unpartitioned;
DROP TABLE messages_unpartitioned;
