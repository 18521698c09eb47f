//! Blocks as the edge, the router and presence see them: for each user,
//! everyone on the other side of a block (blocked by them or blocking
//! them), asked of the persister, cached like group membership
//! ([`crate::membership`]) and forgotten as soon as the persister publishes
//! a block change naming the user. A steady-state check costs no request.
//!
//! Both directions live in one set because every effect but one is
//! symmetric (presence, typing, receipts; a DM either way, see
//! docs/architecture.md "Blocks"); the one-sided rule (a blocked user may
//! not add the blocker to a group) is checked by the persister itself.

use prometheus_client::registry::Registry;

use crate::config::GroupCacheConfig;
use crate::error::StartError;
use crate::ids::UserId;
use crate::membership::{Members, SetCache};
use crate::rpc::{self, RpcError};
use crate::subjects;

#[derive(Clone)]
pub struct BlockCache {
    nats: async_nats::Client,
    cache: SetCache<UserId>,
}

impl BlockCache {
    /// A cache bounded like the group cache (`CHAT_GROUP_CACHE_*`),
    /// listening for block changes.
    pub async fn start(
        nats: async_nats::Client,
        config: &GroupCacheConfig,
    ) -> Result<Self, StartError> {
        let cache = SetCache::start(&nats, config, subjects::ALL_BLOCK_EVENTS, |subject| {
            subjects::parse_block_event(subject)
                .map(Vec::from)
                .unwrap_or_default()
        })
        .await?;
        Ok(Self { nats, cache })
    }

    /// Registers `block_cache_evictions` (by `reason`), `block_cache_entries`
    /// and `block_cache_bytes` in `registry` (a service's prefixed one).
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.cache
            .register_metrics(registry, "block_cache", "Users' block sets");
    }

    /// Everyone `user` blocked or is blocked by.
    pub async fn peers(&self, user: &UserId) -> Result<Members, RpcError> {
        let request = rpc::UserRequest { user: user.clone() };
        self.cache
            .get(user, rpc::call::<rpc::BlockPeers>(&self.nats, &request))
            .await
    }

    /// Whether a block stands between `a` and `b`, either way.
    pub async fn between(&self, a: &UserId, b: &UserId) -> Result<bool, RpcError> {
        Ok(self.peers(a).await?.contains(b))
    }
}
