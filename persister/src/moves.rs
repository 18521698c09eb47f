//! Moving buckets between shards while writes continue (`chatctl shards
//! move <buckets> <to>`; docs/scaling.md, "Moving buckets").
//!
//! 1. *Fence*: every other shard disowns the buckets (`shard_buckets`,
//!    migration 0016) under the fence lock taken exclusively, which waits
//!    for the writes in flight there. Every later write of those buckets
//!    fails its fence (SQLSTATE `CHMOV`) and is retried: MESSAGES keeps
//!    the events, a client's request answers `unavailable`. Sends never
//!    wait (they do not touch PostgreSQL); reads go on from the old shard,
//!    whose rows of those buckets no longer change.
//! 2. *Copy*: in one transaction on the target, whatever a broken-off move
//!    left there is deleted, every row of the buckets is copied from the
//!    shards the map names (binary COPY), and the target owns them.
//! 3. *Flip*: the map in KV names the target (compare-and-set on its
//!    revision). Every persister and pushd follows it (a KV watch), and the
//!    retried writes land on the target.
//! 4. *Clean*: after a grace period for the watchers, the old copies are
//!    deleted.
//!
//! Every step can run again: a move that stopped half-way (a crash, a lost
//! connection) is finished by running the same command again; until then
//! the fenced buckets' writes wait, and none is lost.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use chat_shared::idgen::timestamp_ms;
use chat_shared::ids::MessageId;
use chat_shared::shards::{Bucket, MapError, ShardMap, BUCKETS, MAP_KEY};
use chat_shared::{subjects, Config};
use deadpool_postgres::Pool;
use futures::{SinkExt, StreamExt};

/// The advisory lock of the fence: shared by every write of a bucket's
/// rows (`chat_fence`), exclusive for a move's disowning.
pub const MOVE_LOCK: i64 = 0x6368_6d76;

/// Every table whose rows belong to a bucket, with the SQL of a row's key
/// (the text its bucket is the hash of), parents before children.
const TABLES: [(&str, &str); 12] = [
    ("messages", "conversation"),
    ("message_keys", "conversation"),
    ("conversations", "conversation"),
    ("reactions", "conversation"),
    ("hidden_messages", "conversation"),
    ("message_attachments", "conversation"),
    ("groups", "'group:' || id"),
    ("group_members", "'group:' || group_id"),
    ("group_event_outbox", "'group:' || group_id"),
    ("user_conversations", "user_id"),
    ("read_state", "user_id"),
    ("delivered_state", "user_id"),
];

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("buckets {first}-{last}: a range within 0-{}", BUCKETS - 1)]
    Range { first: Bucket, last: Bucket },
    #[error("shard {to} is not one of the {count} of CHAT_DATABASE_URLS")]
    Target { to: usize, count: usize },
    #[error("shard {0} owns no buckets yet: start a persister of this version first")]
    Uninitialized(usize),
    #[error("the shard map changed during the move (another move?); run it again")]
    Raced,
    #[error("the shard map in KV: {0}")]
    Kv(String),
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("PostgreSQL pool: {0}")]
    CreatePool(#[from] deadpool_postgres::CreatePoolError),
    #[error("PostgreSQL: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("PostgreSQL: {0}")]
    Database(#[from] tokio_postgres::Error),
}

/// What a move did.
#[derive(Debug, serde::Serialize)]
pub struct MoveReport {
    pub first: Bucket,
    pub last: Bucket,
    pub to: usize,
    /// The shards the buckets' rows came from.
    pub from: Vec<usize>,
    pub rows_copied: u64,
    /// Old copies deleted after the flip (and stale rows on the target).
    pub rows_deleted: u64,
    /// From the fence to the flip: how long the buckets' writes waited.
    pub fenced_ms: u64,
    pub total_ms: u64,
}

/// Moves `buckets` to shard `to`; `grace` is how long the old copies stay
/// after the flip, for every service to follow the new map first.
pub async fn move_buckets(
    config: &Config,
    js: &jetstream::Context,
    buckets: RangeInclusive<Bucket>,
    to: usize,
    grace: Duration,
) -> Result<MoveReport, MoveError> {
    let started = Instant::now();
    let (first, last) = (*buckets.start(), *buckets.end());
    if first > last || last >= BUCKETS {
        return Err(MoveError::Range { first, last });
    }
    let count = config.database_urls.len();
    if to >= count {
        return Err(MoveError::Target { to, count });
    }
    let kv_error = |e: &dyn std::fmt::Display| MoveError::Kv(e.to_string());
    let store = js
        .get_key_value(subjects::SHARDS_BUCKET)
        .await
        .map_err(|e| kv_error(&e))?;
    let entry = store
        .entry(MAP_KEY)
        .await
        .map_err(|e| kv_error(&e))?
        .ok_or_else(|| MoveError::Kv("no shard map yet".into()))?;
    let map = ShardMap::decode(&entry.value)?;
    map.check(count)?;
    let pools = config
        .database_urls
        .iter()
        .map(|url| crate::db::connect_pool(config, url))
        .collect::<Result<Vec<Pool>, _>>()?;
    for (shard, pool) in pools.iter().enumerate() {
        initialized(pool, shard).await?;
    }
    let list: Vec<i32> = buckets.clone().map(|b| b as i32).collect();
    // Where the rows are now: the map's shard (old copies go only after
    // the flip, so it holds them even if an earlier try fenced already).
    let mut sources: BTreeMap<usize, Vec<i32>> = BTreeMap::new();
    for bucket in buckets.clone() {
        let shard = map.shard(bucket);
        if shard != to {
            sources.entry(shard).or_default().push(bucket as i32);
        }
    }
    let mut report = MoveReport {
        first,
        last,
        to,
        from: sources.keys().copied().collect(),
        rows_copied: 0,
        rows_deleted: 0,
        fenced_ms: 0,
        total_ms: 0,
    };
    let mut fenced = Instant::now();
    if owned(&pools[to], &list).await? < list.len() {
        prepare(&pools, &sources, to, &list, &mut report).await?;
        fenced = Instant::now();
        for (shard, pool) in pools.iter().enumerate() {
            if shard != to {
                disown(pool, &list).await?;
            }
        }
        copy_all(&pools, &sources, to, &list, &mut report).await?;
    }
    if buckets.clone().any(|b| map.shard(b) != to) {
        let mut moved = map.clone();
        for bucket in buckets {
            moved.shards[bucket] = to;
        }
        store
            .update(MAP_KEY, moved.encode().into(), entry.revision)
            .await
            .map_err(|_| MoveError::Raced)?;
        tracing::info!(first, last, to, "shard map flipped");
    }
    report.fenced_ms = fenced.elapsed().as_millis() as u64;
    tokio::time::sleep(grace).await;
    for (shard, pool) in pools.iter().enumerate() {
        if shard != to {
            report.rows_deleted += clean(pool, &list).await?;
        }
    }
    report.total_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Whether the persister has written `shard`'s ownership (all buckets).
async fn initialized(pool: &Pool, shard: usize) -> Result<(), MoveError> {
    let db = pool.get().await?;
    let exists: bool = db
        .query_one("SELECT to_regclass('shard_buckets') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        return Err(MoveError::Uninitialized(shard));
    }
    let rows: i64 = db
        .query_one("SELECT count(*) FROM shard_buckets", &[])
        .await?
        .try_get(0)?;
    if rows != BUCKETS as i64 {
        return Err(MoveError::Uninitialized(shard));
    }
    Ok(())
}

/// How many of `buckets` the shard owns.
async fn owned(pool: &Pool, buckets: &[i32]) -> Result<usize, MoveError> {
    let n: i64 = pool
        .get()
        .await?
        .query_one(
            "SELECT count(*) FROM shard_buckets WHERE bucket = ANY($1) AND owned",
            &[&buckets],
        )
        .await?
        .try_get(0)?;
    Ok(n as usize)
}

/// The fence: once this commits, no write of `buckets` commits on the
/// shard (those in flight finished first: their shared lock is held to
/// their commit).
async fn disown(pool: &Pool, buckets: &[i32]) -> Result<(), MoveError> {
    let mut db = pool.get().await?;
    let tx = db.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MOVE_LOCK])
        .await?;
    tx.execute(
        "UPDATE shard_buckets SET owned = false WHERE bucket = ANY($1) AND owned",
        &[&buckets],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Readies the target before the fence (nothing writes the buckets there:
/// it does not own them): the months the rows fall in, in their own
/// transaction (a new partition locks `messages`; a row of a month the
/// target lacks would land in its default partition, over which that month
/// could then never be created), and whatever a broken-off move left.
async fn prepare(
    pools: &[Pool],
    sources: &BTreeMap<usize, Vec<i32>>,
    to: usize,
    list: &[i32],
    report: &mut MoveReport,
) -> Result<(), MoveError> {
    let target = pools[to].get().await?;
    for &source in sources.keys() {
        let oldest: Option<i64> = pools[source]
            .get()
            .await?
            .query_one("SELECT min(id) FROM messages", &[])
            .await?
            .try_get(0)?;
        if let Some(id) = oldest {
            let from_ms = timestamp_ms(MessageId(id as u64)) as i64;
            let now = chat_shared::clock::now_ms() as i64;
            crate::months::create(&target, from_ms, now).await?;
        }
    }
    report.rows_deleted += delete(&target, list).await?;
    Ok(())
}

/// Copies every row of the buckets from their shards to `to`, which owns
/// them once it commits.
async fn copy_all(
    pools: &[Pool],
    sources: &BTreeMap<usize, Vec<i32>>,
    to: usize,
    list: &[i32],
    report: &mut MoveReport,
) -> Result<(), MoveError> {
    let mut target = pools[to].get().await?;
    let tx = target.transaction().await?;
    for (&source, buckets) in sources {
        let db = pools[source].get().await?;
        let columns = columns(&db).await?;
        for (table, key) in TABLES {
            let columns = columns.get(table).map_or("", String::as_str);
            report.rows_copied += copy(&db, &tx, table, key, columns, buckets).await?;
        }
    }
    tx.execute(
        "UPDATE shard_buckets SET owned = true WHERE bucket = ANY($1)",
        &[&list],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Each table's columns as the shard has them, quoted and in order, for
/// a COPY that does not depend on two shards' column order.
async fn columns(db: &tokio_postgres::Client) -> Result<BTreeMap<String, String>, MoveError> {
    let tables: Vec<&str> = TABLES.iter().map(|(table, _)| *table).collect();
    let rows = db
        .query(
            "SELECT c.relname::text, string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
             FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
             WHERE c.relname = ANY($1) AND c.relnamespace = current_schema()::regnamespace
               AND a.attnum > 0 AND NOT a.attisdropped
             GROUP BY c.relname",
            &[&tables],
        )
        .await?;
    rows.iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}

/// One table's rows of `buckets`, from `source` into `target`.
async fn copy(
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Transaction<'_>,
    table: &str,
    key: &str,
    columns: &str,
    buckets: &[i32],
) -> Result<u64, MoveError> {
    // COPY takes no parameters: the buckets are written out (integers).
    let list = buckets
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let rows = source
        .copy_out(&format!(
            "COPY (SELECT {columns} FROM {table} WHERE chat_bucket({key}) = ANY('{{{list}}}'::int[]))
             TO STDOUT (FORMAT binary)"
        ))
        .await?;
    let sink = target
        .copy_in(&format!(
            "COPY {table} ({columns}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    futures::pin_mut!(rows);
    futures::pin_mut!(sink);
    while let Some(chunk) = rows.next().await {
        sink.send(chunk?).await?;
    }
    Ok(sink.finish().await?)
}

/// Deletes the rows of those of `buckets` the shard does not own.
async fn clean(pool: &Pool, buckets: &[i32]) -> Result<u64, MoveError> {
    let db = pool.get().await?;
    let gone: Vec<i32> = db
        .query(
            "SELECT bucket FROM shard_buckets WHERE bucket = ANY($1) AND NOT owned",
            &[&buckets],
        )
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    delete(&db, &gone).await
}

/// Deletes every row of `buckets` (children first).
async fn delete(db: &tokio_postgres::Client, buckets: &[i32]) -> Result<u64, MoveError> {
    if buckets.is_empty() {
        return Ok(0);
    }
    let mut deleted = 0;
    for (table, key) in TABLES.iter().rev() {
        deleted += db
            .execute(
                &format!("DELETE FROM {table} WHERE chat_bucket({key}) = ANY($1)"),
                &[&buckets],
            )
            .await?;
    }
    Ok(deleted)
}
