-- Moving buckets between shards while writes continue
-- (persister/src/moves.rs, `chatctl shards move`). The map in KV routes;
-- this table fences: every transaction that writes a bucket's rows first
-- calls `chat_fence` with its buckets, which holds a shared advisory lock
-- to its end and fails unless this shard owns them all. A move disowns
-- the buckets on their old shard under the same lock taken exclusively,
-- so once it has committed no write of theirs commits there: the copy it
-- takes next is complete, and writers retry (SQLSTATE CHMOV) until they
-- follow the new map.

-- Which buckets this shard owns; the persister fills it from the map at
-- its first start (all 1,024 rows on every shard).
CREATE TABLE shard_buckets (
    bucket INT     PRIMARY KEY,
    owned  BOOLEAN NOT NULL
);

-- The bucket of a key, as chat_shared::shards::bucket computes it: FNV-1a
-- (64 bits) modulo 1,024. 1,024 divides 2^64, and the low 10 bits of a
-- product or an XOR depend only on the low 10 bits of the operands, so
-- the whole hash is computed modulo 1,024 (offset 0x325, prime 0x1b3).
CREATE FUNCTION chat_bucket(key TEXT) RETURNS INT
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    bytes BYTEA := convert_to(key, 'UTF8');
    hash INT := 805;
BEGIN
    FOR i IN 0 .. length(bytes) - 1 LOOP
        hash := ((hash # get_byte(bytes, i)) * 435) % 1024;
    END LOOP;
    RETURN hash;
END
$$;

-- VOLATILE: its second statement takes a snapshot of its own, after the
-- lock is held, so it sees a move that committed while it waited.
CREATE FUNCTION chat_fence(buckets INT[]) RETURNS VOID
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    missing INT;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1667788150);
    SELECT b INTO missing
    FROM unnest(buckets) AS b
    LEFT JOIN shard_buckets s ON s.bucket = b
    WHERE s.owned IS NOT TRUE
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'bucket % is not on this shard (moved or moving): retry with the current map', missing
            USING ERRCODE = 'CHMOV';
    END IF;
END
$$;
