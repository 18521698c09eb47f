-- v1.1 media. Each table is keyed by the column it would be distributed by
-- when the database is sharded: media by media id, attachments by
-- conversation (with the conversation in every unique key).

-- One row per stored media object; the id is the SHA-256 of the bytes
-- (hex), so the same bytes uploaded again are this same row.
CREATE TABLE media (
    media        TEXT    PRIMARY KEY,
    size         BIGINT  NOT NULL,
    content_type TEXT    NOT NULL,
    -- Pixels, for images whose size is known (from the upload's header
    -- bytes, else from the thumbnailer).
    width        INT,
    height       INT,
    -- The thumbnailer made a thumbnail (object `<media>.thumb`).
    thumb        BOOLEAN NOT NULL DEFAULT false,
    created_at   BIGINT  NOT NULL
);

-- Who uploaded it (everyone who uploaded the same bytes): they may use it.
CREATE TABLE media_uploaders (
    media       TEXT   NOT NULL,
    user_id     TEXT   NOT NULL,
    uploaded_at BIGINT NOT NULL,
    PRIMARY KEY (media, user_id)
);

-- The media each message carries, in order: members of the conversation
-- may see them. The message itself keeps the attachments' metadata (for
-- history and search) in `messages.attachments`.
CREATE TABLE message_attachments (
    conversation TEXT     NOT NULL,
    message_id   BIGINT   NOT NULL,
    position     SMALLINT NOT NULL,
    media        TEXT     NOT NULL,
    PRIMARY KEY (conversation, message_id, position)
);
CREATE INDEX message_attachments_media ON message_attachments (media, conversation);

ALTER TABLE messages ADD COLUMN attachments JSONB NOT NULL DEFAULT '[]';
