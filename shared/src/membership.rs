//! Group membership as the edge and the router see it: asked of the
//! persister, cached, and dropped from the cache as soon as a membership
//! change is published (every process subscribes to the change subject on
//! core NATS, whichever router consumes the EVENTS stream).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::StartError;
use crate::ids::{GroupId, UserId};
use crate::rpc::{self, RpcError};
use crate::subjects;
use futures::StreamExt;

/// A safety net: entries also expire, in case an invalidation was missed
/// during a NATS reconnect.
const TTL: Duration = Duration::from_secs(30);

pub type Members = Arc<HashSet<UserId>>;

#[derive(Default)]
struct Entries {
    groups: HashMap<GroupId, (Members, Instant)>,
    /// Bumped by every invalidation, so an answer that raced with a change
    /// is not cached.
    generation: u64,
}

fn forget(entries: &Mutex<Entries>, group: &GroupId) {
    if let Ok(mut entries) = entries.lock() {
        entries.groups.remove(group);
        entries.generation += 1;
    }
}

#[derive(Clone)]
pub struct GroupCache {
    nats: async_nats::Client,
    entries: Arc<Mutex<Entries>>,
}

impl GroupCache {
    pub async fn start(nats: async_nats::Client) -> Result<Self, StartError> {
        let cache = Self {
            nats: nats.clone(),
            entries: Arc::default(),
        };
        let mut changes = nats
            .subscribe(subjects::EVENTS_SUBJECTS[0])
            .await
            .map_err(|e| StartError::JetStream(format!("subscribing to group events: {e}")))?;
        let entries = Arc::downgrade(&cache.entries);
        tokio::spawn(async move {
            while let Some(message) = changes.next().await {
                let Some(entries) = entries.upgrade() else {
                    break;
                };
                if let Some(group) = subjects::parse_group_event(&message.subject) {
                    forget(&entries, &group);
                }
            }
        });
        Ok(cache)
    }

    /// Forgets `group` now (a process that has just seen its change).
    pub fn invalidate(&self, group: &GroupId) {
        forget(&self.entries, group);
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
