//! Receipts: what travels with a message so an edge can tell whom an ack
//! concerns, and the events on stream RECEIPTS (delivered from edges, read
//! from the persister) that the router turns into inbox items.

use async_nats::HeaderMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::{ConversationId, DeviceId, MessageId, UserId};

pub const CONVERSATION_HEADER: &str = "Chat-Conversation";
pub const MESSAGE_ID_HEADER: &str = "Chat-Message-Id";
pub const FROM_HEADER: &str = "Chat-From";

/// The part of a message an ack's receipt needs, carried in headers of the
/// inbox item and of its live delivery, so edges never parse the frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMeta {
    pub conversation: ConversationId,
    pub id: MessageId,
    pub from: UserId,
}

impl MessageMeta {
    pub fn add_to(&self, headers: &mut HeaderMap) {
        headers.insert(CONVERSATION_HEADER, self.conversation.to_string().as_str());
        headers.insert(MESSAGE_ID_HEADER, self.id.to_string().as_str());
        headers.insert(FROM_HEADER, self.from.as_str());
    }

    /// The metadata of a message item; `None` for other items.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        Some(Self {
            conversation: ConversationId::parse(headers.get(CONVERSATION_HEADER)?.as_str()).ok()?,
            id: MessageId::parse(headers.get(MESSAGE_ID_HEADER)?.as_str()).ok()?,
            from: UserId::parse(headers.get(FROM_HEADER)?.as_str()).ok()?,
        })
    }
}

/// `chat.receipt.delivered`: `user`'s device `device` has received (acked)
/// the messages of `conversation` up to `up_to`; `senders` wrote some of
/// them and are told with a `receipt` frame of kind `delivered`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeliveredEvent {
    pub conversation: ConversationId,
    pub user: UserId,
    pub up_to: MessageId,
    pub senders: Vec<UserId>,
    /// v1.1; absent from an edge of an older release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceId>,
}

/// `chat.receipt.read`: `user` has read `conversation` up to `up_to`, as
/// stored (published by the persister after the read state is committed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReadEvent {
    pub conversation: ConversationId,
    pub user: UserId,
    pub up_to: MessageId,
    /// v1.1 privacy: the members who may see this receipt (no block with
    /// the reader, read receipts on for both; the reader always). Absent:
    /// every member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<Vec<UserId>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_meta_roundtrips_through_headers() {
        let meta = MessageMeta {
            conversation: ConversationId::parse("dm:a:b").unwrap(),
            id: MessageId(42),
            from: UserId::parse("a").unwrap(),
        };
        let mut headers = HeaderMap::new();
        meta.add_to(&mut headers);
        assert_eq!(MessageMeta::from_headers(&headers), Some(meta));
        assert_eq!(MessageMeta::from_headers(&HeaderMap::new()), None);
    }
}
