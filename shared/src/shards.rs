//! Where a row of PostgreSQL lives when the store has several shards
//! (`CHAT_DATABASE_URLS`): a conversation's rows on its conversation's
//! shard, a user's rows on the user's shard.
//!
//! A key hashes to one of [`BUCKETS`] buckets, and the [`ShardMap`] names a
//! shard per bucket. The hash never changes (every service computes it, and
//! moving data is a change of the map, not of the hash); the map is stored
//! once in the KV bucket [`crate::subjects::SHARDS_BUCKET`] so every
//! persister and pushd reads the same one.

use std::fmt::{self, Write as _};

use serde::{Deserialize, Serialize};

use crate::ids::{ConversationId, UserId};

/// Hash buckets; a map moves whole buckets between shards.
pub const BUCKETS: usize = 1024;
/// The most shards a map may name.
pub const MAX_SHARDS: usize = 64;
/// The map's key in [`crate::subjects::SHARDS_BUCKET`].
pub const MAP_KEY: &str = "map";

/// A bucket number, `0..BUCKETS`.
pub type Bucket = usize;

/// FNV-1a (64 bits) of `key`, modulo [`BUCKETS`]: simple to compute the same
/// way in any language (a tool or a later Citus migration script), and
/// spread well enough over ids.
pub fn bucket(key: &str) -> Bucket {
    let mut hash = Fnv1a::default();
    hash.add(key);
    hash.bucket()
}

/// FNV-1a (64 bits) over text written into it piece by piece.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn add(&mut self, text: &str) {
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        for byte in text.bytes() {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(PRIME);
        }
    }

    fn bucket(&self) -> Bucket {
        (self.0 % BUCKETS as u64) as Bucket
    }
}

impl fmt::Write for Fnv1a {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        self.add(text);
        Ok(())
    }
}

/// A conversation's bucket, by its canonical name (`dm:<low>:<high>`,
/// `group:<id>`), so both sides of a DM land on one shard. Hashed as it is
/// written out, without building the name (this runs for every event the
/// persister stores).
pub fn of_conversation(conversation: &ConversationId) -> Bucket {
    let mut hash = Fnv1a::default();
    // Writing into the hash cannot fail.
    let _ = write!(hash, "{conversation}");
    hash.bucket()
}

pub fn of_user(user: &UserId) -> Bucket {
    bucket(user.as_str())
}

/// Which shard holds each bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    /// `shards[b]` holds bucket `b`; exactly [`BUCKETS`] entries.
    pub shards: Vec<usize>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MapError {
    #[error("a shard map has {BUCKETS} buckets, this one {0}")]
    Buckets(usize),
    #[error(
        "the shard map names shard {named}, but only {configured} database URLs are configured"
    )]
    Shard { named: usize, configured: usize },
    #[error("the shard map is not valid JSON: {0}")]
    Malformed(String),
}

impl ShardMap {
    /// `count` shards, each holding an equal run of buckets (bucket `b` on
    /// shard `b * count / BUCKETS`): neighbouring buckets stay together, so
    /// moving a run moves one range.
    pub fn even(count: usize) -> Self {
        let count = count.clamp(1, MAX_SHARDS);
        Self {
            shards: (0..BUCKETS).map(|b| b * count / BUCKETS).collect(),
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, MapError> {
        serde_json::from_slice(bytes).map_err(|e| MapError::Malformed(e.to_string()))
    }

    pub fn encode(&self) -> Vec<u8> {
        // A Vec of integers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Whether this map fits a store of `configured` shards.
    pub fn check(&self, configured: usize) -> Result<(), MapError> {
        if self.shards.len() != BUCKETS {
            return Err(MapError::Buckets(self.shards.len()));
        }
        match self.shards.iter().find(|&&s| s >= configured) {
            Some(&named) => Err(MapError::Shard { named, configured }),
            None => Ok(()),
        }
    }

    /// The shard of bucket `bucket` (shard 0 for a bucket out of range,
    /// which [`ShardMap::check`] rules out).
    pub fn shard(&self, bucket: Bucket) -> usize {
        self.shards.get(bucket).copied().unwrap_or(0)
    }

    pub fn of_conversation(&self, conversation: &ConversationId) -> usize {
        self.shard(of_conversation(conversation))
    }

    /// The map as runs of neighbouring buckets on one shard:
    /// `(first, last, shard)`, in bucket order.
    pub fn runs(&self) -> Vec<(Bucket, Bucket, usize)> {
        let mut runs: Vec<(Bucket, Bucket, usize)> = Vec::new();
        for (bucket, &shard) in self.shards.iter().enumerate() {
            match runs.last_mut() {
                Some((_, last, on)) if *on == shard => *last = bucket,
                _ => runs.push((bucket, bucket, shard)),
            }
        }
        runs
    }

    pub fn of_user(&self, user: &UserId) -> usize {
        self.shard(of_user(user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fnv_1a_64_modulo_the_buckets() {
        // FNV-1a 64 of "" is the offset basis; of "a" is 0xaf63dc4c8601ec8c.
        assert_eq!(bucket(""), (0xcbf2_9ce4_8422_2325u64 % 1024) as usize);
        assert_eq!(bucket("a"), (0xaf63_dc4c_8601_ec8cu64 % 1024) as usize);
    }

    #[test]
    fn a_conversation_hashes_as_its_name() {
        for name in ["dm:alice:bob", "dm:a-1:b_2", "group:g0123456789abcdef"] {
            let conversation = ConversationId::parse(name).map_err(|e| e.to_string());
            assert_eq!(conversation.map(|c| of_conversation(&c)), Ok(bucket(name)));
        }
    }

    #[test]
    fn an_even_map_splits_the_buckets_into_runs() {
        let two = ShardMap::even(2);
        assert_eq!(two.shards.len(), BUCKETS);
        assert_eq!(two.shard(0), 0);
        assert_eq!(two.shard(511), 0);
        assert_eq!(two.shard(512), 1);
        assert_eq!(two.shard(1023), 1);
        assert!(ShardMap::even(1).shards.iter().all(|&s| s == 0));
        assert_eq!(two.check(2), Ok(()));
        assert_eq!(
            two.check(1),
            Err(MapError::Shard {
                named: 1,
                configured: 1
            })
        );
        assert_eq!(two.runs(), [(0, 511, 0), (512, 1023, 1)]);
        assert_eq!(ShardMap::decode(&two.encode()), Ok(two));
        assert!(ShardMap::decode(b"{").is_err());
        assert_eq!(
            ShardMap { shards: vec![0; 3] }.check(1),
            Err(MapError::Buckets(3))
        );
    }

    #[test]
    fn keys_spread_over_both_shards_and_a_dm_has_one_place() {
        let map = ShardMap::even(2);
        let on_one = (0..1000)
            .filter(|i| map.of_user(&UserId::parse(format!("u{i}")).unwrap()) == 1)
            .count();
        assert!((400..600).contains(&on_one), "{on_one} of 1000 on shard 1");
        let a = UserId::parse("alice").unwrap();
        let b = UserId::parse("bob").unwrap();
        assert_eq!(
            of_conversation(&ConversationId::dm(a.clone(), b.clone()).unwrap()),
            of_conversation(&ConversationId::dm(b, a).unwrap())
        );
    }
}
