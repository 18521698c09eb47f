//! Time-sortable 64-bit message ids.
//!
//! Layout: 41 bits of milliseconds since [`EPOCH_MS`] | 10 bits of node id |
//! 12 bits of sequence. The node id is leased (see [`crate::lease`]) so two
//! live processes never share one. The generator never goes backwards: when
//! the wall clock steps back it keeps counting from the last timestamp it
//! used, and when a millisecond's 4096 sequence numbers are spent it borrows
//! the next millisecond.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::ids::MessageId;

/// 2025-01-01T00:00:00Z in ms since the Unix epoch.
pub const EPOCH_MS: u64 = 1_735_689_600_000;
pub const NODE_BITS: u32 = 10;
pub const SEQUENCE_BITS: u32 = 12;
pub const MAX_NODE_ID: u16 = (1 << NODE_BITS) - 1;
const SEQUENCE_MASK: u64 = (1 << SEQUENCE_BITS) - 1;
const TIMESTAMP_BITS: u32 = 64 - NODE_BITS - SEQUENCE_BITS - 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("this process holds no valid node id lease")]
    NoLease,
    #[error("the clock is before the id epoch")]
    ClockBeforeEpoch,
}

/// A source of wall-clock milliseconds since the Unix epoch; swappable in tests.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    })
}

/// Where the generator learns whether its node id is still leased.
#[derive(Debug)]
pub struct NodeSlot {
    /// The leased node id, or `u64::MAX` while none is held.
    node: AtomicU64,
    /// Lease validity as nanoseconds since `base`; 0 means never valid.
    valid_until: AtomicU64,
    base: Instant,
}

impl NodeSlot {
    /// A slot with no lease yet: ids are refused until [`NodeSlot::grant`].
    pub fn empty() -> Arc<Self> {
        Arc::new(Self {
            node: AtomicU64::new(u64::MAX),
            valid_until: AtomicU64::new(0),
            base: Instant::now(),
        })
    }

    /// A slot that holds `node` forever (tests, tools).
    pub fn fixed(node: u16) -> Arc<Self> {
        let slot = Self::empty();
        slot.node
            .store(u64::from(node & MAX_NODE_ID), Ordering::SeqCst);
        slot.valid_until.store(u64::MAX, Ordering::SeqCst);
        slot
    }

    /// Records that `node` is ours until `until`.
    pub fn grant(&self, node: u16, until: Instant) {
        self.node
            .store(u64::from(node & MAX_NODE_ID), Ordering::SeqCst);
        let nanos = until.saturating_duration_since(self.base).as_nanos();
        self.valid_until
            .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    pub fn revoke(&self) {
        self.valid_until.store(0, Ordering::SeqCst);
    }

    fn current(&self) -> Option<u64> {
        let now = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if now >= self.valid_until.load(Ordering::SeqCst) {
            return None;
        }
        match self.node.load(Ordering::SeqCst) {
            u64::MAX => None,
            node => Some(node),
        }
    }

    pub fn node(&self) -> Option<u16> {
        self.current().map(|n| n as u16)
    }
}

pub struct IdGenerator {
    slot: Arc<NodeSlot>,
    /// The last (timestamp << SEQUENCE_BITS | sequence) handed out.
    last: AtomicU64,
    clock: Clock,
}

impl IdGenerator {
    pub fn new(slot: Arc<NodeSlot>) -> Self {
        Self::with_clock(slot, system_clock())
    }

    pub fn with_clock(slot: Arc<NodeSlot>, clock: Clock) -> Self {
        Self {
            slot,
            last: AtomicU64::new(0),
            clock,
        }
    }

    pub fn next_id(&self) -> Result<MessageId, IdError> {
        let node = self.slot.current().ok_or(IdError::NoLease)?;
        let now = (self.clock)()
            .checked_sub(EPOCH_MS)
            .ok_or(IdError::ClockBeforeEpoch)?;
        let from_clock = (now & ((1 << TIMESTAMP_BITS) - 1)) << SEQUENCE_BITS;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            // Either a fresh millisecond from the clock, or the successor of the
            // last value (which carries into the timestamp when the sequence is
            // spent). Taking the max is what makes a backwards clock harmless.
            let next = from_clock.max(last + 1);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    let timestamp = next >> SEQUENCE_BITS;
                    let sequence = next & SEQUENCE_MASK;
                    let id = (timestamp << (NODE_BITS + SEQUENCE_BITS))
                        | (node << SEQUENCE_BITS)
                        | sequence;
                    return Ok(MessageId(id));
                }
                Err(seen) => last = seen,
            }
        }
    }
}

/// The wall-clock millisecond (since the Unix epoch) encoded in an id.
pub fn timestamp_ms(id: MessageId) -> u64 {
    (id.0 >> (NODE_BITS + SEQUENCE_BITS)) + EPOCH_MS
}

/// The smallest id of millisecond `ms` (since the Unix epoch; 0 for any
/// time before the id epoch): every id made at `ms` or later is at least
/// this, every one made earlier below it.
pub fn first_id_at(ms: u64) -> MessageId {
    MessageId(ms.saturating_sub(EPOCH_MS) << (NODE_BITS + SEQUENCE_BITS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::time::Duration;

    /// The node id encoded in an id.
    fn node_of(id: MessageId) -> u16 {
        ((id.0 >> SEQUENCE_BITS) & u64::from(MAX_NODE_ID)) as u16
    }

    fn scripted_clock(times: Vec<u64>) -> Clock {
        let times = Mutex::new(times.into_iter());
        let last = AtomicU64::new(EPOCH_MS);
        Arc::new(move || {
            let next = times.lock().ok().and_then(|mut t| t.next());
            match next {
                Some(t) => {
                    last.store(t, Ordering::SeqCst);
                    t
                }
                None => last.load(Ordering::SeqCst),
            }
        })
    }

    #[test]
    fn ids_encode_time_and_node() {
        let now = EPOCH_MS + 123_456;
        let generator = IdGenerator::with_clock(NodeSlot::fixed(42), Arc::new(move || now));
        let id = generator.next_id().unwrap();
        assert_eq!(timestamp_ms(id), now);
        assert_eq!(node_of(id), 42);
    }

    #[test]
    fn no_lease_no_ids() {
        let generator = IdGenerator::new(NodeSlot::empty());
        assert_eq!(generator.next_id(), Err(IdError::NoLease));
        let slot = NodeSlot::empty();
        slot.grant(3, Instant::now() - Duration::from_secs(1));
        assert_eq!(IdGenerator::new(slot).next_id(), Err(IdError::NoLease));
    }

    #[test]
    fn a_full_millisecond_borrows_the_next() {
        let generator = IdGenerator::with_clock(NodeSlot::fixed(1), Arc::new(|| EPOCH_MS + 10));
        let ids: Vec<_> = (0..5000).map(|_| generator.next_id().unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(timestamp_ms(ids[4095]), EPOCH_MS + 10);
        assert_eq!(timestamp_ms(ids[4096]), EPOCH_MS + 11);
    }

    #[test]
    fn unique_and_increasing_across_threads() {
        let generator = Arc::new(IdGenerator::new(NodeSlot::fixed(7)));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let generator = generator.clone();
                std::thread::spawn(move || {
                    let ids: Vec<_> = (0..20_000).map(|_| generator.next_id().unwrap()).collect();
                    // Each thread sees its own ids strictly increasing.
                    assert!(ids.windows(2).all(|w| w[0] < w[1]));
                    ids
                })
            })
            .collect();
        let mut all = HashSet::new();
        for handle in handles {
            for id in handle.join().unwrap() {
                assert!(all.insert(id), "duplicate id {id}");
            }
        }
        assert_eq!(all.len(), 80_000);
    }

    proptest! {
        /// Whatever the clock does (steps back, stalls, jumps), ids strictly grow.
        #[test]
        fn monotonic_under_any_clock(steps in proptest::collection::vec(0u64..10_000_000, 1..300)) {
            let times: Vec<u64> = steps.iter().map(|s| EPOCH_MS + s).collect();
            let generator = IdGenerator::with_clock(NodeSlot::fixed(5), scripted_clock(times.clone()));
            let mut previous = None;
            for _ in 0..times.len() + 10 {
                let id = generator.next_id().unwrap();
                if let Some(p) = previous {
                    prop_assert!(id > p, "{} after {}", id, p);
                }
                prop_assert_eq!(node_of(id), 5);
                previous = Some(id);
            }
        }
    }
}
