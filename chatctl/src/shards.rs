//! `chatctl shards`: the PostgreSQL shard map in the KV bucket
//! `chat_shards` (shared/src/shards.rs), and where one conversation's or
//! user's rows live.

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
