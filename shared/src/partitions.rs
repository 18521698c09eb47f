//! Which partition of MESSAGES and INBOX holds a conversation or a user
//! (`CHAT_PARTITIONS`).
//!
//! With one partition (the default) the streams are `MESSAGES` and `INBOX`
//! and events are published on their own subjects. With N > 1 they are
//! `MESSAGES_<k>` and `INBOX_<k>` for k in 0..N: a publisher sends to the
//! partition's subject (`subjects::message_in`, `subjects::inbox_in`), and
//! the stream's subject transform stores the event under its usual subject
//! (`chat.msg.dm.<a>.<b>`, `chat.inbox.<user>`), so whatever reads a stream
//! sees the subjects PROTOCOL.md and docs/events.md name.
//!
//! The partition is NATS's own `partition(N, …)` of the subject mapping
//! (nats-server `subject_transform.go`: FNV-1a, 32 bits, of the selected
//! tokens concatenated, modulo N), computed here by every publisher and
//! reader alike. An operator may add the same mapping to the account for a
//! publisher that sends to the unpartitioned subjects (docs/scaling.md);
//! `partition_agrees_with_the_server_mapping` checks that both agree.

use std::fmt;

use crate::ids::{ConversationId, UserId};

/// The most partitions `CHAT_PARTITIONS` may ask for: nats/users.conf names
/// each partition's stream in the services' rights.
pub const MAX_PARTITIONS: u32 = 16;

/// How many partitions MESSAGES and INBOX are split into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partitions {
    count: u32,
}

/// One partition of MESSAGES and INBOX.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition {
    index: u32,
    /// Whether there are several (then names carry the index).
    split: bool,
}

impl Default for Partitions {
    fn default() -> Self {
        Self { count: 1 }
    }
}

impl Partitions {
    /// `None` outside 1..=[`MAX_PARTITIONS`].
    pub fn new(count: u32) -> Option<Self> {
        (1..=MAX_PARTITIONS)
            .contains(&count)
            .then_some(Self { count })
    }

    pub fn count(self) -> u32 {
        self.count
    }

    /// Every partition, in index order.
    pub fn all(self) -> impl Iterator<Item = Partition> {
        let split = self.count > 1;
        (0..self.count).map(move |index| Partition { index, split })
    }

    fn at(self, key: &[&str]) -> Partition {
        Partition {
            index: hash_partition(key, self.count),
            split: self.count > 1,
        }
    }

    /// Where a conversation's events go: `partition(N, 1, 2)` of
    /// `chat.msg.dm.*.*` for a DM, `partition(N, 1)` of `chat.msg.group.*`.
    pub fn of_conversation(self, conversation: &ConversationId) -> Partition {
        match conversation {
            ConversationId::Dm { low, high } => self.at(&[low.as_str(), high.as_str()]),
            ConversationId::Group(group) => self.at(&[group.as_str()]),
        }
    }

    /// Where a user's inbox lives: `partition(N, 1)` of `chat.inbox.*`.
    pub fn of_user(self, user: &UserId) -> Partition {
        self.at(&[user.as_str()])
    }

    /// The MESSAGES partition whose stream is named `stream`, if any.
    pub fn of_messages_stream(self, stream: &str) -> Option<Partition> {
        self.all().find(|p| p.messages_stream() == stream)
    }
}

impl Partition {
    pub fn index(self) -> u32 {
        self.index
    }

    /// Whether MESSAGES and INBOX are split (names carry the index).
    pub fn is_split(self) -> bool {
        self.split
    }

    fn name(self, stream: &str) -> String {
        if self.split {
            format!("{stream}_{}", self.index)
        } else {
            stream.to_string()
        }
    }

    /// `MESSAGES`, or `MESSAGES_<k>` when split.
    pub fn messages_stream(self) -> String {
        self.name(crate::subjects::MESSAGES_STREAM)
    }

    /// `INBOX`, or `INBOX_<k>` when split.
    pub fn inbox_stream(self) -> String {
        self.name(crate::subjects::INBOX_STREAM)
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.index)
    }
}

/// nats-server's `getHashPartition`: FNV-1a (32 bits) of the tokens
/// concatenated without separators, modulo `count`.
fn hash_partition(tokens: &[&str], count: u32) -> u32 {
    const OFFSET: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    let mut hash = OFFSET;
    for byte in tokens.iter().flat_map(|token| token.bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    hash % count.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn the_hash_is_fnv_1a_as_go_computes_it() {
        // hash/fnv New32a: the published test vectors.
        assert_eq!(hash_partition(&[""], u32::MAX), 0x811c_9dc5);
        assert_eq!(hash_partition(&["a"], u32::MAX), 0xe40c_292c);
        assert_eq!(hash_partition(&["foobar"], u32::MAX), 0xbf9c_f968);
        // Tokens are joined without a separator.
        assert_eq!(
            hash_partition(&["foo", "bar"], 7),
            hash_partition(&["foobar"], 7)
        );
    }

    #[test]
    fn one_partition_keeps_the_plain_names() {
        let one = Partitions::default();
        let partition = one.of_user(&user("alice"));
        assert_eq!(partition.index(), 0);
        assert_eq!(partition.messages_stream(), "MESSAGES");
        assert_eq!(partition.inbox_stream(), "INBOX");
        assert_eq!(one.all().count(), 1);
    }

    #[test]
    fn several_partitions_are_numbered_and_cover_every_user() {
        let three = Partitions::new(3).unwrap_or_default();
        let names: Vec<String> = three.all().map(Partition::inbox_stream).collect();
        assert_eq!(names, ["INBOX_0", "INBOX_1", "INBOX_2"]);
        let mut seen = [0usize; 3];
        for n in 0..300 {
            let partition = three.of_user(&user(&format!("u{n}")));
            assert!(partition.index() < 3);
            seen[partition.index() as usize] += 1;
        }
        assert!(seen.iter().all(|&count| count > 50), "{seen:?}");
        assert_eq!(
            three.of_messages_stream("MESSAGES_2").map(Partition::index),
            Some(2)
        );
        assert_eq!(three.of_messages_stream("MESSAGES"), None);
    }

    #[test]
    fn a_conversation_has_one_partition_whichever_side_sends() {
        let four = Partitions::new(4).unwrap_or_default();
        let (Ok(ab), Ok(ba)) = (
            ConversationId::dm(user("alice"), user("bob")),
            ConversationId::dm(user("bob"), user("alice")),
        ) else {
            panic!("a DM of two users");
        };
        assert_eq!(four.of_conversation(&ab), four.of_conversation(&ba));
    }

    #[test]
    fn the_count_is_bounded() {
        assert!(Partitions::new(0).is_none());
        assert!(Partitions::new(MAX_PARTITIONS + 1).is_none());
        assert_eq!(
            Partitions::new(MAX_PARTITIONS).map(Partitions::count),
            Some(16)
        );
    }
}
