//! The PostgreSQL shards: a pool per `CHAT_DATABASE_URLS` entry and the
//! shard map (`chat_shared::shards`) from the KV bucket `chat_shards`,
//! written there by the first persister to start and read by everyone
//! else, and followed from then on (a KV watch: `chatctl shards move`
//! changes it while everything runs). A conversation's rows live on
//! `conversation(..)`, a user's on `user(..)`; the social tables not split
//! yet live on `home()` (shard 0). Every transaction that writes a
//! bucket's rows calls [`fence`] first: the map routes, each shard's
//! `shard_buckets` (migration 0016) says what it owns.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use chat_shared::consume::Backoff;
use chat_shared::ids::{ConversationId, UserId};
use chat_shared::shards::{Bucket, MapError, ShardMap, BUCKETS, MAP_KEY};
use chat_shared::{consume, subjects, Config};
use deadpool_postgres::{GenericClient, Pool};
use futures::StreamExt;
use tokio::sync::watch;

use crate::db;

/// How often a service that does not write the map looks for it.
const MAP_POLL: Duration = Duration::from_millis(250);

#[derive(Clone)]
pub struct Shards {
    pools: Arc<Vec<Pool>>,
    /// The current map, replaced when the stored one changes.
    map: watch::Receiver<Arc<ShardMap>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ShardsError {
    #[error("PostgreSQL pool: {0}")]
    CreatePool(#[from] deadpool_postgres::CreatePoolError),
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("PostgreSQL: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("PostgreSQL: {0}")]
    Database(#[from] tokio_postgres::Error),
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
        let (sender, receiver) = watch::channel(Arc::new(map));
        tokio::spawn(follow(bucket, pools.len(), sender));
        Ok(Self {
            pools: Arc::new(pools),
            map: receiver,
        })
    }

    pub fn count(&self) -> usize {
        self.pools.len()
    }

    /// The map as it is now.
    pub fn map(&self) -> Arc<ShardMap> {
        self.map.borrow().clone()
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
        self.map.borrow().of_conversation(conversation)
    }

    pub fn of_user(&self, user: &UserId) -> usize {
        self.map.borrow().of_user(user)
    }

    pub fn conversation(&self, conversation: &ConversationId) -> &Pool {
        self.pool(self.of_conversation(conversation))
    }

    pub fn user(&self, user: &UserId) -> &Pool {
        self.pool(self.of_user(user))
    }

    /// `items` by the shard holding each one's `bucket`, in shard order,
    /// all by the map as it is now: one query per shard for a page, a
    /// batch or a member list.
    pub fn split<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        bucket: impl Fn(&T) -> Bucket,
    ) -> BTreeMap<usize, Vec<T>> {
        let map = self.map.borrow();
        let mut split: BTreeMap<usize, Vec<T>> = BTreeMap::new();
        for item in items {
            split
                .entry(map.shard(bucket(&item)))
                .or_default()
                .push(item);
        }
        split
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
    let mut backoff = Backoff::default();
    loop {
        match bucket.get(MAP_KEY).await {
            Ok(Some(stored)) => return Ok(ShardMap::decode(&stored)?),
            Ok(None) if writes_map => {
                let even = ShardMap::even(count);
                // A `create`: of two persisters starting at once one writes,
                // and the other reads that map on its next turn.
                if bucket.create(MAP_KEY, even.encode().into()).await.is_ok() {
                    tracing::info!(shards = count, "shard map written");
                    return Ok(even);
                }
            }
            Ok(None) => tracing::info!("waiting for a persister to write the shard map"),
            // A JetStream cluster still electing the bucket's leader, a node
            // away: wait, never exit (a service starts whatever the broker's
            // state and serves once it can).
            Err(e) => tracing::warn!(error = %e, "the shard map is not readable yet; retrying"),
        }
        tokio::time::sleep(backoff.next_delay().max(MAP_POLL)).await;
    }
}

/// Follows the stored map: the newest first, then every change, for as long
/// as anyone holds these shards. A map this process cannot use (naming a
/// shard it has no URL for) is refused loudly and the old one kept: the
/// fence keeps writes where the data is meanwhile.
async fn follow(bucket: kv::Store, count: usize, sender: watch::Sender<Arc<ShardMap>>) {
    let mut backoff = Backoff::default();
    while !sender.is_closed() {
        let mut updates = match bucket.watch_with_history(MAP_KEY).await {
            Ok(updates) => updates,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the shard map; again");
                backoff.wait().await;
                continue;
            }
        };
        loop {
            let entry = tokio::select! {
                update = updates.next() => match update {
                    Some(Ok(entry)) if entry.operation == kv::Operation::Put => entry,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "the shard map watch failed; again");
                        break;
                    }
                    None => break,
                },
                // Nobody follows any more (the process's shards dropped).
                () = sender.closed() => return,
            };
            backoff = Backoff::default();
            match ShardMap::decode(&entry.value).and_then(|map| {
                map.check(count)?;
                Ok(map)
            }) {
                Ok(map) => {
                    if **sender.borrow() != map {
                        tracing::info!(revision = entry.revision, "shard map changed");
                    }
                    if sender.send(Arc::new(map)).is_err() {
                        return;
                    }
                }
                Err(e) => tracing::error!(
                    error = %e,
                    revision = entry.revision,
                    "a shard map this process cannot follow (CHAT_DATABASE_URLS too short?); \
                     keeping the one it has"
                ),
            }
        }
        backoff.wait().await;
    }
}

/// Writes each shard's `shard_buckets` from the map where it has none yet
/// (a first start, or a shard just added, which owns nothing): later rows
/// are a move's to change, never a start's. After the migrations.
pub async fn own_from_map(shards: &Shards) -> Result<(), ShardsError> {
    let map = shards.map();
    for (shard, pool) in shards.all() {
        let buckets: Vec<i32> = (0..BUCKETS as i32).collect();
        let owned: Vec<bool> = (0..BUCKETS).map(|b| map.shard(b) == shard).collect();
        pool.get()
            .await?
            .execute(
                "INSERT INTO shard_buckets (bucket, owned)
                 SELECT * FROM unnest($1::int[], $2::bool[])
                 ON CONFLICT DO NOTHING",
                &[&buckets, &owned],
            )
            .await?;
    }
    Ok(())
}

/// Called first in a transaction that writes the rows of `buckets` on one
/// shard: holds the fence's shared lock to the transaction's end and fails
/// (SQLSTATE `CHMOV`, a transient error to every caller: retried, or
/// `unavailable`) unless the shard owns them all, so no write lands on a
/// shard a bucket has left or is leaving (persister/src/moves.rs).
pub async fn fence(
    tx: &impl GenericClient,
    buckets: impl IntoIterator<Item = Bucket>,
) -> Result<(), tokio_postgres::Error> {
    let mut buckets: Vec<i32> = buckets.into_iter().map(|b| b as i32).collect();
    buckets.sort_unstable();
    buckets.dedup();
    tx.execute("SELECT chat_fence($1::int[])", &[&buckets])
        .await
        .map(|_| ())
}
