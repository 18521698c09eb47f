//! The PostgreSQL shards: a pool per `CHAT_DATABASE_URLS` entry and the
//! shard map (`chat_shared::shards`) from the KV bucket `chat_shards`,
//! written there by the first persister to start and read by everyone
//! else. A conversation's rows live on `conversation(..)`, a user's on
//! `user(..)`; the social tables not split yet live on `home()` (shard 0).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chat_shared::ids::{ConversationId, UserId};
use chat_shared::shards::{MapError, ShardMap, MAP_KEY};
use chat_shared::{consume, subjects, Config};
use deadpool_postgres::Pool;

use crate::db;

/// How often a service that does not write the map looks for it.
const MAP_POLL: Duration = Duration::from_millis(250);

#[derive(Clone)]
pub struct Shards {
    pools: Arc<Vec<Pool>>,
    map: Arc<ShardMap>,
}

#[derive(Debug, thiserror::Error)]
pub enum ShardsError {
    #[error("PostgreSQL pool: {0}")]
    Pool(#[from] deadpool_postgres::CreatePoolError),
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("the shard map in KV: {0}")]
    Kv(String),
}

impl Shards {
    /// A pool per configured shard, with the shared map. A persister
    /// (`writes_map`) stores an even split over its configured shards if
    /// the bucket has no map yet; anyone else waits for one.
    pub async fn connect(
        config: &Config,
        js: &jetstream::Context,
        writes_map: bool,
    ) -> Result<Self, ShardsError> {
        let pools = config
            .database_urls
            .iter()
            .map(|url| db::connect_pool(config, url))
            .collect::<Result<Vec<_>, _>>()?;
        let bucket = consume::bucket(js, subjects::SHARDS_BUCKET).await;
        let map = load_map(&bucket, pools.len(), writes_map).await?;
        map.check(pools.len())?;
        Ok(Self {
            pools: Arc::new(pools),
            map: Arc::new(map),
        })
    }

    pub fn count(&self) -> usize {
        self.pools.len()
    }

    pub fn map(&self) -> &ShardMap {
        &self.map
    }

    /// Shard `index` (checked against the map at start).
    pub fn pool(&self, index: usize) -> &Pool {
        &self.pools[index.min(self.pools.len() - 1)]
    }

    /// Shard 0: the social tables (friendships, blocks, settings, profiles,
    /// push tokens, mutes) until they are split by user too.
    pub fn home(&self) -> &Pool {
        self.pool(0)
    }

    pub fn of_conversation(&self, conversation: &ConversationId) -> usize {
        self.map.of_conversation(conversation)
    }

    pub fn of_user(&self, user: &UserId) -> usize {
        self.map.of_user(user)
    }

    pub fn conversation(&self, conversation: &ConversationId) -> &Pool {
        self.pool(self.of_conversation(conversation))
    }

    pub fn user(&self, user: &UserId) -> &Pool {
        self.pool(self.of_user(user))
    }

    pub fn all(&self) -> impl Iterator<Item = (usize, &Pool)> {
        self.pools.iter().enumerate()
    }
}

/// The stored map, or an even split over `count` shards stored now (a
/// `create`, so of two persisters starting at once one writes and both
/// read the same).
async fn load_map(
    bucket: &jetstream::kv::Store,
    count: usize,
    writes_map: bool,
) -> Result<ShardMap, ShardsError> {
    let kv = |e: &dyn std::fmt::Display| ShardsError::Kv(e.to_string());
    loop {
        if let Some(stored) = bucket.get(MAP_KEY).await.map_err(|e| kv(&e))? {
            return Ok(ShardMap::decode(&stored)?);
        }
        if writes_map {
            break;
        }
        tracing::info!("waiting for a persister to write the shard map");
        tokio::time::sleep(MAP_POLL).await;
    }
    let even = ShardMap::even(count);
    match bucket.create(MAP_KEY, even.encode().into()).await {
        Ok(_) => {
            tracing::info!(shards = count, "shard map written");
            Ok(even)
        }
        // Someone else wrote it first: theirs is the map.
        Err(_) => match bucket.get(MAP_KEY).await.map_err(|e| kv(&e))? {
            Some(stored) => Ok(ShardMap::decode(&stored)?),
            None => Err(kv(&"the shard map is neither there nor writable")),
        },
    }
}
