//! What edges tell the presence service, and what it keeps per user.
//!
//! Edges publish a [`DeviceEvent`] on every device connect and disconnect,
//! and every `CHAT_PRESENCE_HEARTBEAT_MS` one [`EdgeHeartbeat`] listing all
//! their live devices (one message per edge, not per user). The heartbeat is
//! the truth: it repairs a lost event, and its absence past
//! `CHAT_PRESENCE_TIMEOUT_MS` means the edge died with its devices.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::{ConversationId, DeviceId, EdgeId, UserId};
use crate::wire::{PresenceEvent, PresenceStatus};

/// `chat.edge.device`: one device of `user` connected to (`online`) or left
/// `edge`. Published after the `welcome` and after the socket closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeviceEvent {
    pub edge: EdgeId,
    pub user: UserId,
    pub device: DeviceId,
    pub online: bool,
}

/// `chat.edge.heartbeat`: every device live on `edge` right now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EdgeHeartbeat {
    pub edge: EdgeId,
    pub devices: Vec<LiveDevice>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub struct LiveDevice {
    pub user: UserId,
    pub device: DeviceId,
}

/// `chat.typing.<user>`: the body of a client's `typing` frame, after the
/// edge checked that the user is a member of `conversation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TypingEvent {
    pub conversation: ConversationId,
    pub active: bool,
}

/// A user's record in the presence bucket (key `user.<id>`), written by
/// the presence leader on every change of status or of the set of
/// connected devices; read by edges (the presence snapshot, `friends`) and
/// the router (push to the devices that are not connected).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PresenceRecord {
    pub status: PresenceStatus,
    /// ms since the epoch: when the user came online, or went offline.
    pub last_active: u64,
    /// The devices connected now, sorted. Absent in records written before
    /// presence tracked devices: then only `status` is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceId>>,
}

impl PresenceRecord {
    pub fn is_online(&self) -> bool {
        self.status == PresenceStatus::Online
    }

    /// Whether `device` is connected; for a record without a device list,
    /// whether the user is online at all.
    pub fn is_connected(&self, device: &DeviceId) -> bool {
        match &self.devices {
            Some(devices) => devices.contains(device),
            None => self.is_online(),
        }
    }
}

/// v1.1: `last_active` as a `presence` frame shows it to someone the
/// user's `last_seen` hides it from: 0, what v1 already sends for a user
/// presence never saw (the field is a number in v1's frame, so it cannot
/// be left out). The `friends` reply says `null` instead.
pub const HIDDEN_LAST_ACTIVE: u64 = 0;

/// `event` as a reader sees it: its `last_active` hidden unless the user
/// shows it to them.
pub fn as_seen(mut event: PresenceEvent, shows_last_active: bool) -> PresenceEvent {
    if !shows_last_active {
        event.last_active = HIDDEN_LAST_ACTIVE;
    }
    event
}

/// `chat.event.friend`: the friendship of these two users changed, or a
/// block between them, or (the same user twice) what one user shows their
/// friends; presence refetches their friend lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FriendChange {
    pub users: [UserId; 2],
    /// They are friends after the change.
    pub friends: bool,
    /// v1.1: which of the two hide `last_active` from friends
    /// (`last_seen: nobody`), so presence shows new friends each other's
    /// presence at once without asking; only set when `friends`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hides_last_active: Vec<UserId>,
}
