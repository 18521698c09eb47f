//! A least-recently-used map bounded by entries and by bytes, for caches
//! and per-address tables that an outsider can make grow (one entry per
//! group asked about, per client address seen): past either bound the
//! entries used longest ago go, and the evictions are counted.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

struct Slot<V> {
    value: V,
    /// When it was last used: its key in `order`.
    used: u64,
    bytes: usize,
}

pub struct Lru<K, V> {
    slots: HashMap<K, Slot<V>>,
    /// Keys by last use, oldest first.
    order: BTreeMap<u64, K>,
    clock: u64,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    /// At most `max_entries` entries (at least one) of at most `max_bytes`
    /// together, as their owner counts them.
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            slots: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
            bytes: 0,
            max_entries: max_entries.max(1),
            max_bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The bytes of every entry, as given to [`Lru::insert`].
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The value of `key`, now the most recently used.
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let now = self.tick();
        let slot = self.slots.get_mut(key)?;
        if let Some(key) = self.order.remove(&slot.used) {
            self.order.insert(now, key);
        }
        slot.used = now;
        Some(&mut slot.value)
    }

    /// Stores `value` (of `bytes`) under `key`, then evicts the least
    /// recently used entries until both bounds hold again; returns how many
    /// others were evicted. A value larger than the whole byte bound is not
    /// stored at all (nothing else is evicted for it).
    pub fn insert(&mut self, key: K, value: V, bytes: usize) -> usize {
        self.remove(&key);
        if bytes > self.max_bytes {
            return 0;
        }
        let used = self.tick();
        self.order.insert(used, key.clone());
        self.slots.insert(key, Slot { value, used, bytes });
        self.bytes += bytes;
        let mut evicted = 0;
        while self.slots.len() > self.max_entries || self.bytes > self.max_bytes {
            if self.pop_oldest().is_none() {
                break;
            }
            evicted += 1;
        }
        evicted
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let slot = self.slots.remove(key)?;
        self.order.remove(&slot.used);
        self.bytes -= slot.bytes;
        Some(slot.value)
    }

    /// Removes the entry used longest ago.
    pub fn pop_oldest(&mut self) -> Option<(K, V)> {
        let (_, key) = self.order.pop_first()?;
        let slot = self.slots.remove(&key)?;
        self.bytes -= slot.bytes;
        Some((key, slot.value))
    }

    /// Keeps only the entries `keep` says yes to; returns how many went.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) -> usize {
        let before = self.slots.len();
        let order = &mut self.order;
        let bytes = &mut self.bytes;
        self.slots.retain(|key, slot| {
            let kept = keep(key, &slot.value);
            if !kept {
                order.remove(&slot.used);
                *bytes -= slot.bytes;
            }
            kept
        });
        before - self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entry_bound_evicts_the_least_recently_used() {
        let mut lru = Lru::new(2, usize::MAX);
        assert_eq!(lru.insert("a", 1, 0), 0);
        assert_eq!(lru.insert("b", 2, 0), 0);
        assert_eq!(lru.get_mut("a"), Some(&mut 1), "a is now the newest");
        assert_eq!(lru.insert("c", 3, 0), 1);
        assert_eq!(lru.len(), 2);
        assert!(lru.get_mut("b").is_none(), "b was used longest ago");
        assert!(lru.get_mut("a").is_some() && lru.get_mut("c").is_some());
        // Replacing a key is not an eviction.
        assert_eq!(lru.insert("c", 4, 0), 0);
        assert_eq!(lru.get_mut("c"), Some(&mut 4));
    }

    #[test]
    fn the_byte_bound_evicts_until_it_holds() {
        let mut lru = Lru::new(100, 10);
        lru.insert(1, (), 4);
        lru.insert(2, (), 4);
        assert_eq!(lru.bytes(), 8);
        assert_eq!(lru.insert(3, (), 7), 2, "1 and 2 go to make room for 7");
        assert_eq!((lru.len(), lru.bytes()), (1, 7));
        assert_eq!(lru.insert(4, (), 11), 0, "too large to cache at all");
        assert_eq!((lru.len(), lru.bytes()), (1, 7));
        assert_eq!(lru.remove(&3), Some(()));
        assert_eq!((lru.len(), lru.bytes()), (0, 0));
    }

    #[test]
    fn retain_and_pop_keep_the_books() {
        let mut lru = Lru::new(10, 100);
        for i in 0..6 {
            lru.insert(i, i, 10);
        }
        assert_eq!(lru.retain(|_, v| v % 2 == 0), 3);
        assert_eq!((lru.len(), lru.bytes()), (3, 30));
        assert_eq!(lru.pop_oldest(), Some((0, 0)));
        assert_eq!(lru.pop_oldest(), Some((2, 2)));
        assert_eq!(lru.pop_oldest(), Some((4, 4)));
        assert!(lru.pop_oldest().is_none() && lru.is_empty());
        assert_eq!(lru.bytes(), 0);
    }
}
