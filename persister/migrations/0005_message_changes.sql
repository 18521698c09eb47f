-- v1.1: messages that change after they are sent (edits, deletes,
-- reactions) and replies and mentions. Constant defaults: no table rewrite.
ALTER TABLE messages
    ADD COLUMN reply_to  BIGINT,
    ADD COLUMN mentions  TEXT[]  NOT NULL DEFAULT '{}',
    ADD COLUMN edited_ts BIGINT,
    -- Deleted for everyone: `body` is '' (erased, not hidden).
    ADD COLUMN deleted   BOOLEAN NOT NULL DEFAULT false,
    -- Changes applied so far; part of a change's Nats-Msg-Id.
    ADD COLUMN version   BIGINT  NOT NULL DEFAULT 0;

-- One reaction per (user, message, emoji).
CREATE TABLE reactions (
    conversation TEXT   NOT NULL,
    id           BIGINT NOT NULL,
    emoji        TEXT   NOT NULL,
    user_id      TEXT   NOT NULL,
    ts           BIGINT NOT NULL,
    PRIMARY KEY (conversation, id, emoji, user_id)
);

-- Messages a user deleted "for me": hidden from that user's history only.
CREATE TABLE hidden_messages (
    user_id      TEXT   NOT NULL,
    conversation TEXT   NOT NULL,
    id           BIGINT NOT NULL,
    PRIMARY KEY (user_id, conversation, id)
);
