//! Group membership as the edge and the router see it: asked of the
//! persister, cached, and dropped from the cache as soon as a membership
//! change is published (every process subscribes to the change subject on
//! core NATS, whichever router consumes the EVENTS stream). The same
//! [`SetCache`] holds blocks (`crate::blocks`).
//!
//! Any user chooses the keys (every group they send to or ask about), so
//! the cache is bounded by entries and by bytes (least recently used go
//! first), and entries past their TTL are swept out, not only ignored.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::config::GroupCacheConfig;
use crate::error::StartError;
use crate::ids::{ConversationId, GroupId, UserId};
use crate::lru::Lru;
use crate::rpc::{self, RpcError};
use crate::subjects;

pub type Members = Arc<HashSet<UserId>>;

/// What one cached set costs beyond its ids: the map slot, the LRU order
/// entry, the `Arc` and the set's table.
const ENTRY_OVERHEAD: usize = 160;
/// What one member costs beyond its id's bytes: a `String` and its slot in
/// the set.
const MEMBER_OVERHEAD: usize = 40;

/// The key of a [`SetCache`]: a group (its members) or a user (the users
/// across a block from them, `crate::blocks`).
pub(crate) trait Key: Clone + Eq + Hash + Send + Sync + 'static {
    fn text(&self) -> &str;
}

impl Key for GroupId {
    fn text(&self) -> &str {
        self.as_str()
    }
}

impl Key for UserId {
    fn text(&self) -> &str {
        self.as_str()
    }
}

/// The estimated memory of one cached set, what the byte bound counts.
fn size_of<K: Key>(key: &K, members: &Members) -> usize {
    let ids: usize = members
        .iter()
        .map(|m| m.as_str().len() + MEMBER_OVERHEAD)
        .sum();
    ENTRY_OVERHEAD + key.text().len() + ids
}

struct Entries<K: Key> {
    sets: Lru<K, (Members, Instant)>,
    /// Bumped by every invalidation, so an answer that raced with a change
    /// is not cached.
    generation: u64,
    ttl: Duration,
}

impl<K: Key> Entries<K> {
    fn new(config: &GroupCacheConfig) -> Self {
        Self {
            sets: Lru::new(config.entries, config.bytes),
            generation: 0,
            ttl: config.ttl,
        }
    }

    /// The set of `key` if cached and younger than the TTL; an older entry
    /// is dropped.
    fn fresh(&mut self, key: &K, now: Instant) -> Option<Members> {
        let (members, at) = self.sets.get_mut(key)?;
        if now.saturating_duration_since(*at) < self.ttl {
            return Some(members.clone());
        }
        self.sets.remove(key);
        None
    }

    /// Caches `members`; returns how many other sets were evicted.
    fn insert(&mut self, key: K, members: Members, now: Instant) -> usize {
        let bytes = size_of(&key, &members);
        self.sets.insert(key, (members, now), bytes)
    }

    /// Drops every entry past the TTL; returns how many.
    fn sweep(&mut self, now: Instant) -> usize {
        let ttl = self.ttl;
        self.sets
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < ttl)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EvictionLabels {
    /// `bound`: pushed out by a newer entry; `expired`: swept past its TTL.
    reason: &'static str,
}

#[derive(Default)]
struct CacheMetrics {
    evictions: Family<EvictionLabels, Counter>,
    entries: Gauge,
    bytes: Gauge,
}

impl CacheMetrics {
    fn evicted(&self, reason: &'static str, count: usize) {
        if count > 0 {
            self.evictions
                .get_or_create(&EvictionLabels { reason })
                .inc_by(count as u64);
        }
    }

    fn size<K: Key>(&self, entries: &Entries<K>) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.entries.set(gauge(entries.sets.len()));
        self.bytes.set(gauge(entries.sets.bytes()));
    }
}

struct Inner<K: Key> {
    entries: Mutex<Entries<K>>,
    metrics: CacheMetrics,
}

impl<K: Key> Inner<K> {
    fn lock(&self) -> MutexGuard<'_, Entries<K>> {
        // Each critical section is a few map operations: a panic inside
        // cannot leave the cache inconsistent.
        crate::sync::lock(&self.entries)
    }

    fn forget(&self, key: &K) {
        let mut entries = self.lock();
        entries.sets.remove(key);
        entries.generation += 1;
        self.metrics.size(&entries);
    }

    fn sweep(&self) {
        let mut entries = self.lock();
        let swept = entries.sweep(Instant::now());
        self.metrics.evicted("expired", swept);
        self.metrics.size(&entries);
    }
}

/// Sets of users by key, asked of the persister on a miss, bounded, swept,
/// and dropped when a change subject names their key: the one mechanism
/// behind the group membership cache and the block cache.
pub(crate) struct SetCache<K: Key> {
    inner: Arc<Inner<K>>,
}

impl<K: Key> Clone for SetCache<K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<K: Key> SetCache<K> {
    /// A cache bounded by `config`, forgetting the keys `parse` finds in
    /// each message on `subject` and sweeping expired entries every TTL
    /// while any clone of it lives.
    pub(crate) async fn start(
        nats: &async_nats::Client,
        config: &GroupCacheConfig,
        subject: &'static str,
        parse: fn(&str) -> Vec<K>,
    ) -> Result<Self, StartError> {
        let cache = Self {
            inner: Arc::new(Inner {
                entries: Mutex::new(Entries::new(config)),
                metrics: CacheMetrics::default(),
            }),
        };
        let changes = nats
            .subscribe(subject)
            .await
            .map_err(|source| StartError::Subscribe { subject, source })?;
        tokio::spawn(maintain(
            Arc::downgrade(&cache.inner),
            changes,
            config.ttl,
            parse,
        ));
        Ok(cache)
    }

    /// Registers `<name>_evictions` (by `reason`), `<name>_entries` and
    /// `<name>_bytes` in `registry`; `what` names the cached sets in help.
    pub(crate) fn register_metrics(&self, registry: &mut Registry, name: &str, what: &str) {
        let metrics = &self.inner.metrics;
        registry.register(
            format!("{name}_evictions"),
            format!("{what} dropped from the cache: `bound` to stay within its entry and byte bounds, `expired` past its TTL"),
            metrics.evictions.clone(),
        );
        registry.register(
            format!("{name}_entries"),
            format!("{what} in the cache"),
            metrics.entries.clone(),
        );
        registry.register(
            format!("{name}_bytes"),
            format!("Estimated bytes of the cache of {}", what.to_lowercase()),
            metrics.bytes.clone(),
        );
    }

    pub(crate) fn invalidate(&self, key: &K) {
        self.inner.forget(key);
    }

    /// The set of `key`, cached or else from `fetch` (cached unless a
    /// change arrived meanwhile).
    pub(crate) async fn get<F>(&self, key: &K, fetch: F) -> Result<Members, RpcError>
    where
        F: std::future::Future<Output = Result<Vec<UserId>, RpcError>>,
    {
        let generation = {
            let mut entries = self.inner.lock();
            if let Some(members) = entries.fresh(key, Instant::now()) {
                return Ok(members);
            }
            entries.generation
        };
        let members: Members = Arc::new(fetch.await?.into_iter().collect());
        let mut entries = self.inner.lock();
        if entries.generation == generation {
            let evicted = entries.insert(key.clone(), members.clone(), Instant::now());
            self.inner.metrics.evicted("bound", evicted);
            self.inner.metrics.size(&entries);
        }
        Ok(members)
    }
}

#[derive(Clone)]
pub struct GroupCache {
    nats: async_nats::Client,
    cache: SetCache<GroupId>,
}

impl GroupCache {
    /// A cache bounded by `config`, listening for membership changes and
    /// sweeping expired entries every TTL while any clone of it lives.
    pub async fn start(
        nats: async_nats::Client,
        config: &GroupCacheConfig,
    ) -> Result<Self, StartError> {
        let cache = SetCache::start(&nats, config, subjects::EVENTS_SUBJECTS[0], |subject| {
            subjects::parse_group_event(subject).into_iter().collect()
        })
        .await?;
        Ok(Self { nats, cache })
    }

    /// Registers `group_cache_evictions` (by `reason`), `group_cache_entries`
    /// and `group_cache_bytes` in `registry` (a service's prefixed one).
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.cache
            .register_metrics(registry, "group_cache", "Groups");
    }

    /// Forgets `group` now (a process that has just seen its change).
    pub fn invalidate(&self, group: &GroupId) {
        self.cache.invalidate(group);
    }

    /// The current members of `group` (`not_found` if there is no such group).
    pub async fn members(&self, group: &GroupId) -> Result<Members, RpcError> {
        let request = rpc::MembersRequest {
            group: group.clone(),
        };
        self.cache
            .get(group, rpc::call::<rpc::Members>(&self.nats, &request))
            .await
    }

    /// Everyone in `conversation`: a DM's two users, a group's current
    /// members (`not_found` if there is no such group).
    pub async fn of_conversation(
        &self,
        conversation: &ConversationId,
    ) -> Result<Vec<UserId>, RpcError> {
        match conversation {
            ConversationId::Dm { low, high } => Ok(vec![low.clone(), high.clone()]),
            ConversationId::Group(group) => {
                Ok(self.members(group).await?.iter().cloned().collect())
            }
        }
    }
}

/// Drops changed sets as their changes are published, and sweeps expired
/// entries every `ttl`, until the cache is gone.
async fn maintain<K: Key>(
    inner: Weak<Inner<K>>,
    mut changes: async_nats::Subscriber,
    ttl: Duration,
    parse: fn(&str) -> Vec<K>,
) {
    let mut sweep = tokio::time::interval(ttl);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let change = tokio::select! {
            change = changes.next() => match change {
                Some(change) => Some(change),
                None => break,
            },
            _ = sweep.tick() => None,
        };
        let Some(inner) = inner.upgrade() else {
            break;
        };
        match change {
            Some(message) => {
                for key in parse(&message.subject) {
                    inner.forget(&key);
                }
            }
            None => inner.sweep(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(i: usize) -> GroupId {
        GroupId::parse(format!("g{i}")).unwrap()
    }

    fn members(names: &[&str]) -> Members {
        Arc::new(
            names
                .iter()
                .map(|n| UserId::parse(n.to_string()).unwrap())
                .collect(),
        )
    }

    #[test]
    fn the_cache_keeps_within_its_entry_bound() {
        let mut entries = Entries::<GroupId>::new(&GroupCacheConfig {
            entries: 3,
            ..GroupCacheConfig::default()
        });
        let now = Instant::now();
        let mut evicted = 0;
        for i in 0..10 {
            evicted += entries.insert(group(i), members(&["a", "b"]), now);
            assert!(entries.sets.len() <= 3);
        }
        assert_eq!(evicted, 7);
        assert!(entries.fresh(&group(9), now).is_some());
        assert!(entries.fresh(&group(0), now).is_none(), "the oldest went");
    }

    #[test]
    fn the_cache_keeps_within_its_byte_bound() {
        let big = members(&["alice", "bob", "carol", "dave"]);
        let one = size_of(&group(0), &big);
        let mut entries = Entries::<GroupId>::new(&GroupCacheConfig {
            bytes: one * 2 + one / 2,
            ..GroupCacheConfig::default()
        });
        let now = Instant::now();
        let evicted: usize = (0..5)
            .map(|i| entries.insert(group(i), big.clone(), now))
            .sum();
        assert_eq!(entries.sets.len(), 2, "two fit in two and a half");
        assert_eq!(evicted, 3);
        assert!(entries.sets.bytes() <= one * 2 + one / 2);
    }

    #[test]
    fn expired_entries_are_not_served_and_are_swept() {
        let ttl = Duration::from_secs(30);
        let mut entries = Entries::<GroupId>::new(&GroupCacheConfig {
            ttl,
            ..GroupCacheConfig::default()
        });
        let t0 = Instant::now();
        entries.insert(group(1), members(&["a"]), t0);
        entries.insert(group(2), members(&["a"]), t0 + ttl / 2);
        assert_eq!(entries.sweep(t0 + ttl / 2), 0);
        assert_eq!(entries.sweep(t0 + ttl), 1, "the first is past its TTL");
        assert_eq!(entries.sets.len(), 1);
        assert!(entries.fresh(&group(2), t0 + ttl).is_some());
        assert!(entries.fresh(&group(2), t0 + ttl * 2).is_none());
        assert!(entries.sets.is_empty(), "a stale entry found is dropped");
    }
}
