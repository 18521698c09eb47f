//! Group membership as the edge sees it: asked of the persister, cached, and
//! dropped from the cache as soon as a membership change is published.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_shared::ids::{GroupId, UserId};
use chat_shared::rpc::{self, RpcError};
use chat_shared::subjects;
use futures::StreamExt;

use crate::EdgeError;

/// A safety net: entries also expire, in case an invalidation was missed
/// during a NATS reconnect.
const TTL: Duration = Duration::from_secs(30);

type Members = Arc<HashSet<UserId>>;

#[derive(Default)]
struct Entries {
    groups: HashMap<GroupId, (Members, Instant)>,
    /// Bumped by every invalidation, so an answer that raced with a change
    /// is not cached.
    generation: u64,
}

#[derive(Clone)]
pub struct GroupCache {
    nats: async_nats::Client,
    entries: Arc<Mutex<Entries>>,
}

impl GroupCache {
    pub async fn start(nats: async_nats::Client) -> Result<Self, EdgeError> {
        let cache = Self {
            nats: nats.clone(),
            entries: Arc::default(),
        };
        let mut changes = nats
            .subscribe(subjects::EVENTS_SUBJECTS[0])
            .await
            .map_err(|e| {
                EdgeError::from(chat_shared::StartError::JetStream(format!(
                    "subscribing to group events: {e}"
                )))
            })?;
        let entries = Arc::downgrade(&cache.entries);
        tokio::spawn(async move {
            while let Some(message) = changes.next().await {
                let Some(entries) = entries.upgrade() else {
                    break;
                };
                let group = message
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|g| GroupId::parse(g).ok());
                if let Some(group) = group {
                    if let Ok(mut entries) = entries.lock() {
                        entries.groups.remove(&group);
                        entries.generation += 1;
                    }
                }
            }
        });
        Ok(cache)
    }

    /// The current members of `group` (`not_found` if there is no such group).
    pub async fn members(&self, group: &GroupId) -> Result<Members, RpcError> {
        let mut generation = 0;
        if let Ok(entries) = self.entries.lock() {
            if let Some((members, at)) = entries.groups.get(group) {
                if at.elapsed() < TTL {
                    return Ok(members.clone());
                }
            }
            generation = entries.generation;
        }
        let members: Members = Arc::new(
            rpc::call::<rpc::Members>(
                &self.nats,
                &rpc::MembersRequest {
                    group: group.clone(),
                },
            )
            .await?
            .into_iter()
            .collect(),
        );
        if let Ok(mut entries) = self.entries.lock() {
            if entries.generation == generation {
                entries
                    .groups
                    .insert(group.clone(), (members.clone(), Instant::now()));
            }
        }
        Ok(members)
    }
}
