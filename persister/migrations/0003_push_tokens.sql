-- Push tokens per user and device, one per platform. A token belongs to
-- whoever registered it last: a phone that changes accounts must not keep
-- notifying the old one.
CREATE TABLE push_tokens (
    user_id    TEXT   NOT NULL,
    device     TEXT   NOT NULL,
    platform   TEXT   NOT NULL CHECK (platform IN ('fcm', 'apns', 'webhook')),
    token      TEXT   NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, device, platform)
);
CREATE UNIQUE INDEX push_tokens_token ON push_tokens (platform, token);
