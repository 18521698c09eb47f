-- A schema that shards: every table is keyed by a conversation (stored on
-- the conversation's shard) or by a user (on the user's shard), every
-- unique key holds its table's distribution column, and no statement reads
-- both kinds (docs/scaling.md, "PostgreSQL shards"). Every shard has every
-- table; the shard map says where a row lives.

-- The last net for idempotent sends, now within the conversation (its
-- distribution column): the windows before it (the edge's claim, the
-- stream's dedup) are per sender and conversation too.
DROP INDEX messages_sender_client_msg_id;
CREATE UNIQUE INDEX messages_sender_client_msg_id
    ON messages (conversation, sender, client_msg_id);

-- The order messages were stored in, per conversation: unread counters
-- count "stored after seq N", which a message whose id is older than one
-- already counted (edges' clocks differ by milliseconds) cannot slip past.
-- Tombstones of never-stored messages take 0 (they are never unread).
ALTER TABLE messages ADD COLUMN seq BIGINT NOT NULL DEFAULT 0;
UPDATE messages m SET seq = n.seq
FROM (SELECT conversation, id,
             row_number() OVER (PARTITION BY conversation ORDER BY id) AS seq
      FROM messages WHERE NOT deleted) n
WHERE m.conversation = n.conversation AND m.id = n.id;
CREATE INDEX messages_seq ON messages (conversation, seq);
ALTER TABLE conversations ADD COLUMN seq BIGINT NOT NULL DEFAULT 0;
UPDATE conversations c SET seq = s.seq
FROM (SELECT conversation, max(seq) AS seq FROM messages GROUP BY conversation) s
WHERE c.conversation = s.conversation;

-- "Deleted for me" is read with the conversation's history: keyed by it.
ALTER TABLE hidden_messages DROP CONSTRAINT hidden_messages_pkey;
ALTER TABLE hidden_messages ADD PRIMARY KEY (conversation, id, user_id);

-- The outbox lives on the group's shard; its key names the group.
ALTER TABLE group_event_outbox ADD COLUMN group_id TEXT;
UPDATE group_event_outbox SET group_id = split_part(id, '/', 1);
ALTER TABLE group_event_outbox ALTER COLUMN group_id SET NOT NULL;
ALTER TABLE group_event_outbox DROP CONSTRAINT group_event_outbox_pkey;
ALTER TABLE group_event_outbox ADD PRIMARY KEY (group_id, id);

-- A user's conversations, on the user's shard: the `conversations` list,
-- the badge and search start here. `unread` is a counter kept on write
-- (persister/src/counters.rs): messages of others stored up to
-- `counted_seq`, after the read mark and after `joined` (the first message
-- id the user may count), neither deleted nor hidden by the user.
-- `activity` and `last_id` copy the conversation's as of `counted_seq`.
CREATE TABLE user_conversations (
    user_id      TEXT   NOT NULL,
    conversation TEXT   NOT NULL,
    joined       BIGINT NOT NULL DEFAULT 0,
    activity     BIGINT NOT NULL,
    last_id      BIGINT,
    unread       BIGINT NOT NULL DEFAULT 0,
    counted_seq  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, conversation)
);
CREATE INDEX user_conversations_by_activity
    ON user_conversations (user_id, activity DESC, conversation DESC);

-- Moved from dm_members and group_members (counted once here; never again).
INSERT INTO user_conversations (user_id, conversation, joined, activity, last_id, counted_seq)
SELECT mine.user_id, mine.conversation, mine.joined, c.activity, c.last_id, c.seq
FROM (SELECT user_id, conversation, 0::bigint AS joined FROM dm_members
      UNION ALL
      SELECT user_id, 'group:' || group_id,
             -- The id epoch (2025-01-01) and the id's time shift, as in
             -- chat_shared::idgen (a unit test holds them equal).
             GREATEST(joined_at - 1735689600000, 0) << 22
      FROM group_members) mine
JOIN conversations c ON c.conversation = mine.conversation;
UPDATE user_conversations uc SET unread = (
    SELECT count(*) FROM messages u
    WHERE u.conversation = uc.conversation
      AND u.id > GREATEST(COALESCE((SELECT read_up_to FROM read_state r
                                     WHERE r.user_id = uc.user_id
                                       AND r.conversation = uc.conversation), 0),
                          uc.joined)
      AND u.sender <> uc.user_id
      AND NOT u.deleted
      AND NOT EXISTS (SELECT 1 FROM hidden_messages h
                       WHERE h.conversation = u.conversation AND h.id = u.id
                         AND h.user_id = uc.user_id));

-- Read by user: replaced by user_conversations. group_members is read by
-- group only (its key).
DROP TABLE dm_members;
DROP INDEX group_members_user;
