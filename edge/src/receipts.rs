//! Delivered receipts from acks, coalesced per conversation.
//!
//! The session remembers the messages it sent (cursor, conversation, id,
//! sender); an ack settles every one up to its cursor, and each flush reports
//! per conversation the highest id and who wrote what was received.

use std::collections::{HashMap, HashSet, VecDeque};

use chat_shared::ids::{ConversationId, Cursor, DeviceId, MessageId, UserId};
use chat_shared::receipts::{DeliveredEvent, MessageMeta};

/// Sent messages remembered while unacked; beyond this the oldest are
/// forgotten (a client that never acks gets no delivered receipts).
const MAX_UNACKED: usize = 8192;

#[derive(Default)]
pub struct DeliveredTracker {
    unacked: VecDeque<(Cursor, MessageMeta)>,
    pending: HashMap<ConversationId, (MessageId, HashSet<UserId>)>,
}

impl DeliveredTracker {
    pub fn sent(&mut self, cursor: Cursor, meta: MessageMeta) {
        if self.unacked.len() == MAX_UNACKED {
            self.unacked.pop_front();
        }
        self.unacked.push_back((cursor, meta));
    }

    /// `reader` acked everything up to `cursor`; their own messages need no receipt.
    pub fn acked(&mut self, cursor: Cursor, reader: &UserId) {
        while self.unacked.front().is_some_and(|(c, _)| *c <= cursor) {
            let Some((_, meta)) = self.unacked.pop_front() else {
                break;
            };
            if meta.from == *reader {
                continue;
            }
            let (up_to, senders) = self
                .pending
                .entry(meta.conversation)
                .or_insert_with(|| (meta.id, HashSet::new()));
            *up_to = (*up_to).max(meta.id);
            senders.insert(meta.from);
        }
    }

    /// The receipts gathered since the last call, from `reader`'s `device`.
    pub fn take(&mut self, reader: &UserId, device: &DeviceId) -> Vec<DeliveredEvent> {
        self.pending
            .drain()
            .map(|(conversation, (up_to, senders))| DeliveredEvent {
                conversation,
                user: reader.clone(),
                up_to,
                senders: senders.into_iter().collect(),
                device: Some(device.clone()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(conversation: &str, id: u64, from: &str) -> MessageMeta {
        MessageMeta {
            conversation: ConversationId::parse(conversation).unwrap(),
            id: MessageId(id),
            from: UserId::parse(from).unwrap(),
        }
    }

    #[test]
    fn acks_coalesce_per_conversation_and_skip_own_messages() {
        let bob = UserId::parse("bob").unwrap();
        let phone = DeviceId::parse("phone").unwrap();
        let mut tracker = DeliveredTracker::default();
        tracker.sent(Cursor(1), meta("dm:alice:bob", 10, "alice"));
        tracker.sent(Cursor(2), meta("dm:alice:bob", 11, "alice"));
        tracker.sent(Cursor(3), meta("group:g", 5, "carol"));
        tracker.sent(Cursor(4), meta("group:g", 6, "bob"));
        tracker.sent(Cursor(5), meta("dm:alice:bob", 12, "alice"));
        tracker.acked(Cursor(4), &bob);
        let mut receipts = tracker.take(&bob, &phone);
        receipts.sort_by_key(|r| r.conversation.to_string());
        assert_eq!(receipts.len(), 2);
        assert_eq!(
            (receipts[0].up_to, receipts[0].senders.len()),
            (MessageId(11), 1)
        );
        assert_eq!(receipts[1].up_to, MessageId(5));
        assert_eq!(receipts[1].device, Some(phone.clone()));
        assert!(tracker.take(&bob, &phone).is_empty());
        tracker.acked(Cursor(5), &bob);
        assert_eq!(tracker.take(&bob, &phone)[0].up_to, MessageId(12));
    }
}
