-- Messages are kept forever. Ids are the 63-bit time-sortable message ids.
CREATE TABLE messages (
    conversation  TEXT   NOT NULL,
    id            BIGINT NOT NULL,
    sender        TEXT   NOT NULL,
    body          TEXT   NOT NULL,
    ts            BIGINT NOT NULL,
    client_msg_id TEXT   NOT NULL,
    PRIMARY KEY (conversation, id)
);
-- The last net for idempotent sends beyond every other window.
CREATE UNIQUE INDEX messages_sender_client_msg_id ON messages (sender, client_msg_id);

-- One row per conversation: its newest message and its latest activity (in
-- message-id space, so a group with no messages yet sorts by its creation).
CREATE TABLE conversations (
    conversation TEXT   PRIMARY KEY,
    last_id      BIGINT,
    activity     BIGINT NOT NULL
);

-- Which DMs a user takes part in (groups come from group_members).
CREATE TABLE dm_members (
    user_id      TEXT NOT NULL,
    conversation TEXT NOT NULL,
    PRIMARY KEY (user_id, conversation)
);

CREATE TABLE groups (
    id         TEXT   PRIMARY KEY,
    name       TEXT   NOT NULL,
    owner      TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    -- Bumped by every membership change; names the change's event.
    version    BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE group_members (
    group_id  TEXT   NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    user_id   TEXT   NOT NULL,
    joined_at BIGINT NOT NULL,
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX group_members_user ON group_members (user_id);

CREATE TABLE read_state (
    user_id      TEXT   NOT NULL,
    conversation TEXT   NOT NULL,
    read_up_to   BIGINT NOT NULL,
    PRIMARY KEY (user_id, conversation)
);

-- Membership events committed with their change and published after the
-- commit (transactional outbox): a crash in between publishes them at start.
CREATE TABLE group_event_outbox (
    id   TEXT  PRIMARY KEY,
    body BYTEA NOT NULL
);
