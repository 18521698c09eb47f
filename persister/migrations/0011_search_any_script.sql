-- v1.1 search, fixed for text without spaces whatever the database's locale.
-- pg_trgm (0008) builds trigrams only from characters LC_CTYPE calls
-- alphanumeric: under the C locale (scripts/dev, the tests, many servers)
-- that is ASCII only, so a Russian or Japanese ILIKE matched every row of the
-- trigram index and re-read the whole table (7.7 s over 1.1 M messages,
-- `chatctl bench search`). Instead, the words index now also holds each
-- character of the scripts written without spaces as a word of its own, with
-- its position: a Japanese substring is found through the index as the rows
-- with each of its characters ('東' & '京'), then ILIKE keeps those with the
-- substring itself; in any locale. The trigram index
-- stays for ASCII substrings (English word parts), where it works.

-- `body` with a space around each character of Japanese kana, CJK
-- ideographs and punctuation, half-width katakana and Thai; other text as is
-- (the `simple` parser splits it into words as before). PL/pgSQL, not an
-- inlined SQL function, so the planner weighs its COST: computing it row by
-- row (walking a conversation's messages, filtering each) costs about 25 µs
-- a row, far more than reading the few rows the index names.
CREATE FUNCTION search_text(body text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE COST 1000 AS $$
BEGIN
    RETURN regexp_replace(body,
        '([\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff01-\uff9f\u0e00-\u0e7f])',
        ' \1 ', 'g');
END
$$;
CREATE INDEX messages_search_words ON messages USING GIN (to_tsvector('simple', search_text(body)));
-- Its words are a subset of the new index's; one index less per insert.
DROP INDEX messages_body_words;

-- A search reads the newest day of matches first, then the newest month,
-- then all (service/search.rs): the id range ANDed with the text index
-- keeps a frequent word from reading every one of its matches for a page.
CREATE INDEX messages_id ON messages (id);
