-- v1.1 search: words in any language. The `simple` configuration lowercases
-- and splits on spaces and punctuation without stemming (no language is
-- favoured); trigrams find substrings of text without spaces (Japanese,
-- Chinese) through ILIKE. Both indexes serve the expressions the search
-- query uses, word for word.
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE INDEX messages_body_words ON messages USING GIN (to_tsvector('simple', body));
CREATE INDEX messages_body_trigrams ON messages USING GIN (body gin_trgm_ops);

-- v1.1 profiles: one row per user who set one.
CREATE TABLE profiles (
    user_id    TEXT   PRIMARY KEY,
    name       TEXT   NOT NULL,
    -- A media id, or NULL.
    avatar     TEXT,
    updated_at BIGINT NOT NULL
);
