//! Group membership as the edge and the router see it: asked of the
//! persister, cached, and dropped from the cache as soon as a membership
//! change is published (every process subscribes to the change subject on
//! core NATS, whichever router consumes the EVENTS stream).
//!
//! Any user chooses the keys (every group they send to or ask about), so
//! the cache is bounded by entries and by bytes (least recently used go
//! first), and entries past their TTL are swept out, not only ignored.

use std::collections::HashSet;
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
use crate::ids::{GroupId, UserId};
use crate::lru::Lru;
use crate::rpc::{self, RpcError};
use crate::subjects;

pub type Members = Arc<HashSet<UserId>>;

/// What one cached group costs beyond its ids: the map slot, the LRU
/// order entry, the `Arc` and the set's table.
const ENTRY_OVERHEAD: usize = 160;
/// What one member costs beyond its id's bytes: a `String` and its slot in
/// the set.
const MEMBER_OVERHEAD: usize = 40;

/// The estimated memory of one cached group, what the byte bound counts.
fn size_of(group: &GroupId, members: &Members) -> usize {
    let ids: usize = members
        .iter()
        .map(|m| m.as_str().len() + MEMBER_OVERHEAD)
        .sum();
    ENTRY_OVERHEAD + group.as_str().len() + ids
}

struct Entries {
    groups: Lru<GroupId, (Members, Instant)>,
    /// Bumped by every invalidation, so an answer that raced with a change
    /// is not cached.
    generation: u64,
    ttl: Duration,
}

impl Entries {
    fn new(config: &GroupCacheConfig) -> Self {
        Self {
            groups: Lru::new(config.entries, config.bytes),
            generation: 0,
            ttl: config.ttl,
        }
    }

    /// The members of `group` if cached and younger than the TTL; an older
    /// entry is dropped.
    fn fresh(&mut self, group: &GroupId, now: Instant) -> Option<Members> {
        let (members, at) = self.groups.get_mut(group)?;
        if now.saturating_duration_since(*at) < self.ttl {
            return Some(members.clone());
        }
        self.groups.remove(group);
        None
    }

    /// Caches `members`; returns how many other groups were evicted.
    fn insert(&mut self, group: GroupId, members: Members, now: Instant) -> usize {
        let bytes = size_of(&group, &members);
        self.groups.insert(group, (members, now), bytes)
    }

    /// Drops every entry past the TTL; returns how many.
    fn sweep(&mut self, now: Instant) -> usize {
        let ttl = self.ttl;
        self.groups
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

    fn size(&self, entries: &Entries) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.entries.set(gauge(entries.groups.len()));
        self.bytes.set(gauge(entries.groups.bytes()));
    }
}

struct Inner {
    entries: Mutex<Entries>,
    metrics: CacheMetrics,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Entries> {
        // Each critical section is a few map operations: a panic inside
        // cannot leave the cache inconsistent.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn forget(&self, group: &GroupId) {
        let mut entries = self.lock();
        entries.groups.remove(group);
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

#[derive(Clone)]
pub struct GroupCache {
    nats: async_nats::Client,
    inner: Arc<Inner>,
}

impl GroupCache {
    /// A cache bounded by `config`, listening for membership changes and
    /// sweeping expired entries every TTL while any clone of it lives.
    pub async fn start(
        nats: async_nats::Client,
        config: &GroupCacheConfig,
    ) -> Result<Self, StartError> {
        let cache = Self {
            nats: nats.clone(),
            inner: Arc::new(Inner {
                entries: Mutex::new(Entries::new(config)),
                metrics: CacheMetrics::default(),
            }),
        };
        let subject = subjects::EVENTS_SUBJECTS[0];
        let changes = nats
            .subscribe(subject)
            .await
            .map_err(|source| StartError::Subscribe { subject, source })?;
        tokio::spawn(maintain(Arc::downgrade(&cache.inner), changes, config.ttl));
        Ok(cache)
    }

    /// Registers `group_cache_evictions` (by `reason`), `group_cache_entries`
    /// and `group_cache_bytes` in `registry` (a service's prefixed one).
    pub fn register_metrics(&self, registry: &mut Registry) {
        let metrics = &self.inner.metrics;
        registry.register(
            "group_cache_evictions",
            "Groups dropped from the membership cache: `bound` to stay within its entry and byte bounds, `expired` past its TTL",
            metrics.evictions.clone(),
        );
        registry.register(
            "group_cache_entries",
            "Groups in the membership cache",
            metrics.entries.clone(),
        );
        registry.register(
            "group_cache_bytes",
            "Estimated bytes of the membership cache",
            metrics.bytes.clone(),
        );
    }

    /// Forgets `group` now (a process that has just seen its change).
    pub fn invalidate(&self, group: &GroupId) {
        self.inner.forget(group);
    }

    /// The current members of `group` (`not_found` if there is no such group).
    pub async fn members(&self, group: &GroupId) -> Result<Members, RpcError> {
        let generation = {
            let mut entries = self.inner.lock();
            if let Some(members) = entries.fresh(group, Instant::now()) {
                return Ok(members);
            }
            entries.generation
        };
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
        let mut entries = self.inner.lock();
        if entries.generation == generation {
            let evicted = entries.insert(group.clone(), members.clone(), Instant::now());
            self.inner.metrics.evicted("bound", evicted);
            self.inner.metrics.size(&entries);
        }
        Ok(members)
    }
}

/// Drops changed groups as their changes are published, and sweeps expired
/// entries every `ttl`, until the cache is gone.
async fn maintain(inner: Weak<Inner>, mut changes: async_nats::Subscriber, ttl: Duration) {
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
                if let Some(group) = subjects::parse_group_event(&message.subject) {
                    inner.forget(&group);
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
        let mut entries = Entries::new(&GroupCacheConfig {
            entries: 3,
            ..GroupCacheConfig::default()
        });
        let now = Instant::now();
        let mut evicted = 0;
        for i in 0..10 {
            evicted += entries.insert(group(i), members(&["a", "b"]), now);
            assert!(entries.groups.len() <= 3);
        }
        assert_eq!(evicted, 7);
        assert!(entries.fresh(&group(9), now).is_some());
        assert!(entries.fresh(&group(0), now).is_none(), "the oldest went");
    }

    #[test]
    fn the_cache_keeps_within_its_byte_bound() {
        let big = members(&["alice", "bob", "carol", "dave"]);
        let one = size_of(&group(0), &big);
        let mut entries = Entries::new(&GroupCacheConfig {
            bytes: one * 2 + one / 2,
            ..GroupCacheConfig::default()
        });
        let now = Instant::now();
        let evicted: usize = (0..5)
            .map(|i| entries.insert(group(i), big.clone(), now))
            .sum();
        assert_eq!(entries.groups.len(), 2, "two fit in two and a half");
        assert_eq!(evicted, 3);
        assert!(entries.groups.bytes() <= one * 2 + one / 2);
    }

    #[test]
    fn expired_entries_are_not_served_and_are_swept() {
        let ttl = Duration::from_secs(30);
        let mut entries = Entries::new(&GroupCacheConfig {
            ttl,
            ..GroupCacheConfig::default()
        });
        let t0 = Instant::now();
        entries.insert(group(1), members(&["a"]), t0);
        entries.insert(group(2), members(&["a"]), t0 + ttl / 2);
        assert_eq!(entries.sweep(t0 + ttl / 2), 0);
        assert_eq!(entries.sweep(t0 + ttl), 1, "the first is past its TTL");
        assert_eq!(entries.groups.len(), 1);
        assert!(entries.fresh(&group(2), t0 + ttl).is_some());
        assert!(entries.fresh(&group(2), t0 + ttl * 2).is_none());
        assert!(entries.groups.is_empty(), "a stale entry found is dropped");
    }
}
