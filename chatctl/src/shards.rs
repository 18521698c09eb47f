//! `chatctl shards`: the PostgreSQL shard map in the KV bucket
//! `chat_shards` (shared/src/shards.rs), and where one conversation's or
//! user's rows live.

use std::ops::RangeInclusive;

use anyhow::Context;
use async_nats::jetstream;
use chat_shared::ids::{ConversationId, UserId};
use chat_shared::shards::{self, ShardMap, MAP_KEY};
use chat_shared::subjects;

/// The map the persisters follow.
pub async fn map(js: &jetstream::Context) -> anyhow::Result<ShardMap> {
    let bucket = js
        .get_key_value(subjects::SHARDS_BUCKET)
        .await
        .context("the shards bucket")?;
    let stored = bucket
        .get(MAP_KEY)
        .await?
        .context("no shard map yet (a persister writes it at its first start)")?;
    Ok(ShardMap::decode(&stored)?)
}

/// Each run of buckets and its shard.
pub fn render(map: &ShardMap) -> String {
    let mut out = format!("{:<11} {:>7} {:>5}\n", "BUCKETS", "COUNT", "SHARD");
    for (first, last, shard) in map.runs() {
        out.push_str(&format!(
            "{:<11} {:>7} {:>5}\n",
            format!("{first}-{last}"),
            last - first + 1,
            shard
        ));
    }
    out
}

/// A bucket (`17`) or a range of them (`256-511`), within the map.
pub fn parse_buckets(text: &str) -> anyhow::Result<RangeInclusive<shards::Bucket>> {
    let (first, last) = text.split_once('-').unwrap_or((text, text));
    let parse = |n: &str| -> anyhow::Result<shards::Bucket> {
        n.trim()
            .parse()
            .with_context(|| format!("{text:?}: buckets are N or N-M"))
    };
    let (first, last) = (parse(first)?, parse(last)?);
    anyhow::ensure!(
        first <= last && last < shards::BUCKETS,
        "{text:?}: a range within 0-{}",
        shards::BUCKETS - 1
    );
    Ok(first..=last)
}

/// A finished move, for operators.
pub fn render_move(report: &chat_persister::moves::MoveReport) {
    println!(
        "buckets {}-{} now on shard {} (from {:?}): {} rows copied, {} old rows deleted; \
         their writes waited {} ms; {} ms in all",
        report.first,
        report.last,
        report.to,
        report.from,
        report.rows_copied,
        report.rows_deleted,
        report.fenced_ms,
        report.total_ms
    );
}

/// Where `key`'s rows live: a conversation (`dm:a:b`, `group:id`) or a user.
pub fn locate(map: &ShardMap, key: &str) -> anyhow::Result<String> {
    let (what, bucket) = match ConversationId::parse(key) {
        Ok(conversation) => ("conversation", shards::of_conversation(&conversation)),
        Err(_) => (
            "user",
            shards::of_user(
                &UserId::parse(key.to_string()).context("neither a conversation nor a user")?,
            ),
        ),
    };
    Ok(format!(
        "{what} {key}: bucket {bucket}, shard {}",
        map.shard(bucket)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_one_or_a_range_within_the_map() {
        assert_eq!(parse_buckets("17").ok(), Some(17..=17));
        assert_eq!(parse_buckets("256-511").ok(), Some(256..=511));
        assert!(parse_buckets("511-256").is_err());
        assert!(parse_buckets("0-1024").is_err());
        assert!(parse_buckets("a-b").is_err());
        assert!(parse_buckets("").is_err());
    }
}
