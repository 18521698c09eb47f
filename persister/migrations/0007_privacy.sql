-- Blocks, one row per (blocker, blocked). The second index finds who
-- blocked a user: block caches hold both directions (shared/src/blocks.rs).
CREATE TABLE blocks (
    user_id TEXT   NOT NULL,
    blocked TEXT   NOT NULL,
    since   BIGINT NOT NULL,
    PRIMARY KEY (user_id, blocked)
);
CREATE INDEX blocks_by_blocked ON blocks (blocked, user_id);

-- Privacy settings; a user without a row has the defaults.
CREATE TABLE privacy_settings (
    user_id       TEXT    PRIMARY KEY,
    last_seen     TEXT    NOT NULL DEFAULT 'everyone'
                  CHECK (last_seen IN ('everyone', 'friends', 'nobody')),
    group_adds    TEXT    NOT NULL DEFAULT 'everyone'
                  CHECK (group_adds IN ('everyone', 'friends')),
    read_receipts BOOLEAN NOT NULL DEFAULT true
);

-- Muted conversations: no push until `until` (ms since the epoch) unless
-- the user is mentioned. Unmuting deletes the row.
CREATE TABLE mutes (
    user_id      TEXT   NOT NULL,
    conversation TEXT   NOT NULL,
    until        BIGINT NOT NULL,
    PRIMARY KEY (user_id, conversation)
);
