//! Wire types: the frames of PROTOCOL.md v1 and the events on NATS.
//!
//! These are the serialization boundary. Internal state never derives
//! `Serialize`; it is converted into one of these types at the edge of a
//! process. JSON Schemas for all of them are generated into `docs/schemas/`
//! (see [`crate::schema`]).

use schemars::JsonSchema;
use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::ids::{
    ClientMsgId, ConversationId, Cursor, DeviceId, GroupId, MediaId, MessageId, UserId,
};

/// Frames a client sends. Unknown fields are ignored; an unknown `type` or a
/// missing field is a `bad_request`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type")]
pub enum ClientFrame {
    #[serde(rename = "hello")]
    Hello {
        token: String,
        device: DeviceId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<Cursor>,
    },
    #[serde(rename = "ping")]
    Ping {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    #[serde(rename = "ack")]
    Ack { cursor: Cursor },
    #[serde(rename = "send")]
    Send(SendRequest),
    #[serde(rename = "read")]
    Read {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        conversation: ConversationId,
        up_to: MessageId,
    },
    #[serde(rename = "typing")]
    Typing {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        conversation: ConversationId,
        active: bool,
    },
    #[serde(rename = "history")]
    History {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        conversation: ConversationId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<MessageId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// v1.1: paged. Without `limit` and `next` (a v1 client) it is the
    /// first page of the default size.
    #[serde(rename = "conversations")]
    Conversations {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        /// 1..=200, default 100.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        /// The previous page's `next`, to continue after it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    },
    #[serde(rename = "group.create")]
    GroupCreate {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        name: String,
        members: Vec<UserId>,
    },
    #[serde(rename = "group.add")]
    GroupAdd {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        #[serde(deserialize_with = "group_ref")]
        group: GroupId,
        users: Vec<UserId>,
    },
    #[serde(rename = "group.remove")]
    GroupRemove {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        #[serde(deserialize_with = "group_ref")]
        group: GroupId,
        users: Vec<UserId>,
    },
    #[serde(rename = "group.leave")]
    GroupLeave {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        #[serde(deserialize_with = "group_ref")]
        group: GroupId,
    },
    #[serde(rename = "group.info")]
    GroupInfo {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        #[serde(deserialize_with = "group_ref")]
        group: GroupId,
    },
    #[serde(rename = "friend.request")]
    FriendRequest {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        user: UserId,
    },
    #[serde(rename = "friend.accept")]
    FriendAccept {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        user: UserId,
    },
    #[serde(rename = "friend.remove")]
    FriendRemove {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        user: UserId,
    },
    #[serde(rename = "friends")]
    Friends {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    #[serde(rename = "push.register")]
    PushRegister {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        platform: PushPlatform,
        token: String,
    },
    #[serde(rename = "push.unregister")]
    PushUnregister {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        platform: PushPlatform,
        token: String,
    },
    /// v1.1: blocks `user` (see docs/protocol.md for every effect).
    #[serde(rename = "block")]
    Block {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        user: UserId,
    },
    #[serde(rename = "unblock")]
    Unblock {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        user: UserId,
    },
    /// v1.1: the users you blocked.
    #[serde(rename = "blocked")]
    Blocked {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    /// v1.1: no push for `conversation` until `until` (ms since the epoch)
    /// unless you are mentioned; `null` unmutes.
    #[serde(rename = "mute")]
    Mute {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        conversation: ConversationId,
        until: Option<u64>,
    },
    /// v1.1: changes the given privacy settings (none: reads them).
    #[serde(rename = "settings")]
    Settings {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        #[serde(flatten)]
        change: SettingsChange,
    },
    #[serde(rename = "refresh")]
    Refresh {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        token: String,
    },
    /// v1.1: replaces a message's text (its author, within the edit window).
    #[serde(rename = "edit")]
    Edit {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        conversation: ConversationId,
        id: MessageId,
        text: String,
    },
    /// v1.1: deletes a message for everyone (erased everywhere) or hides it
    /// from the caller's devices.
    #[serde(rename = "delete")]
    Delete {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        conversation: ConversationId,
        id: MessageId,
        #[serde(rename = "for")]
        scope: DeleteScope,
    },
    /// v1.1: adds (`on`) or takes back a reaction.
    #[serde(rename = "react")]
    React {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        conversation: ConversationId,
        id: MessageId,
        emoji: String,
        on: bool,
    },
    /// v1.1: every member's delivered and read watermarks (members only).
    #[serde(rename = "receipts")]
    Receipts {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        conversation: ConversationId,
    },
    /// v1.1: messages whose text matches `query`, newest first, from the
    /// caller's conversations (or only `conversation`), before `before`.
    #[serde(rename = "search")]
    Search {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        /// 1..=200 characters.
        query: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conversation: Option<ConversationId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<MessageId>,
        /// 1..=100, default 20.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// v1.1: sets the caller's name and avatar.
    #[serde(rename = "profile.set")]
    ProfileSet {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        /// 1..=64 characters, no control characters, not only spaces.
        name: String,
        /// A media id (from `POST /v1/media` once media lands) or `null`.
        #[serde(default)]
        avatar: Option<String>,
    },
    /// v1.1: the profiles of up to [`MAX_PROFILE_USERS`] users.
    #[serde(rename = "profiles")]
    Profiles {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        users: Vec<UserId>,
    },
    /// v1.1: a short-lived signed URL of a media the caller may see, for
    /// `<img>` tags and downloads without the `Authorization` header.
    #[serde(rename = "media.url")]
    MediaUrl {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        media: MediaId,
    },
}

/// The most users one `profiles` request may name.
pub const MAX_PROFILE_USERS: usize = 100;

/// `search`'s `limit` when the request names none, and the largest served.
pub const DEFAULT_SEARCH_LIMIT: u32 = 20;
pub const MAX_SEARCH_LIMIT: u32 = 100;
/// The longest `search` query, in characters.
pub const MAX_QUERY_CHARS: usize = 200;

/// A `group` field: the bare group id, or the `group:<id>` conversation form.
fn group_ref<'de, D: Deserializer<'de>>(d: D) -> Result<GroupId, D::Error> {
    let raw = String::deserialize(d)?;
    let bare = raw.strip_prefix("group:").unwrap_or(&raw);
    GroupId::parse(bare).map_err(serde::de::Error::custom)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SendRequest {
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The recipient of a DM; exactly one of `to` and `conversation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<UserId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<ConversationId>,
    pub text: String,
    pub client_msg_id: ClientMsgId,
    /// v1.1: the message this one answers (same conversation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MessageId>,
    /// v1.1: up to [`MAX_MENTIONS`] users named in the text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<UserId>,
    /// v1.1: up to [`MAX_ATTACHMENTS`] uploaded media (`POST /v1/media`);
    /// with one, `text` may be empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<AttachmentRef>,
}

/// The most users one message may mention.
pub const MAX_MENTIONS: usize = 50;
/// The most attachments one message may carry.
pub const MAX_ATTACHMENTS: usize = 10;
/// The longest attachment `name`, in characters.
pub const MAX_ATTACHMENT_NAME_CHARS: usize = 255;

/// v1.1: what `send` names of an attachment: the media (the sender's
/// upload, or one they can see in a conversation) and a file name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AttachmentRef {
    pub media: MediaId,
    /// 1..=255 characters, no control characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// v1.1: an attachment as a message carries it, filled in by the edge from
/// the media's stored metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Attachment {
    pub media: MediaId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Bytes.
    pub size: u64,
    /// Hex SHA-256 of the bytes (equal to the media id).
    pub sha256: String,
    pub content_type: String,
    /// Pixels, for images whose size is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
}

impl Attachment {
    /// Whether it is a picture (shown inline, previewed as a photo).
    pub fn is_image(&self) -> bool {
        self.content_type.starts_with("image/")
    }
}

/// The platform of a push token (one type for the wire and for pushd).
pub use crate::push::Platform as PushPlatform;

/// Only the `ref` of a frame, read when the frame itself did not parse so the
/// error can still be matched to its request.
#[derive(Debug, Deserialize)]
pub struct RefOnly {
    #[serde(rename = "ref", default)]
    pub reference: Option<serde_json::Value>,
}

impl ClientFrame {
    /// The request's `ref`, echoed in its reply.
    pub fn reference(&self) -> Option<&str> {
        let reference = match self {
            Self::Hello { .. } | Self::Ack { .. } => return None,
            Self::Send(send) => &send.reference,
            Self::Ping { reference }
            | Self::Read { reference, .. }
            | Self::Typing { reference, .. }
            | Self::History { reference, .. }
            | Self::Conversations { reference, .. }
            | Self::GroupCreate { reference, .. }
            | Self::GroupAdd { reference, .. }
            | Self::GroupRemove { reference, .. }
            | Self::GroupLeave { reference, .. }
            | Self::GroupInfo { reference, .. }
            | Self::FriendRequest { reference, .. }
            | Self::FriendAccept { reference, .. }
            | Self::FriendRemove { reference, .. }
            | Self::Friends { reference }
            | Self::PushRegister { reference, .. }
            | Self::PushUnregister { reference, .. }
            | Self::Block { reference, .. }
            | Self::Unblock { reference, .. }
            | Self::Blocked { reference }
            | Self::Mute { reference, .. }
            | Self::Settings { reference, .. }
            | Self::Refresh { reference, .. }
            | Self::Receipts { reference, .. }
            | Self::Search { reference, .. }
            | Self::ProfileSet { reference, .. }
            | Self::Profiles { reference, .. }
            | Self::MediaUrl { reference, .. }
            | Self::Edit { reference, .. }
            | Self::Delete { reference, .. }
            | Self::React { reference, .. } => reference,
        };
        reference.as_deref()
    }

    /// The frame's `type`, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Ping { .. } => "ping",
            Self::Ack { .. } => "ack",
            Self::Send(_) => "send",
            Self::Read { .. } => "read",
            Self::Typing { .. } => "typing",
            Self::History { .. } => "history",
            Self::Conversations { .. } => "conversations",
            Self::GroupCreate { .. } => "group.create",
            Self::GroupAdd { .. } => "group.add",
            Self::GroupRemove { .. } => "group.remove",
            Self::GroupLeave { .. } => "group.leave",
            Self::GroupInfo { .. } => "group.info",
            Self::FriendRequest { .. } => "friend.request",
            Self::FriendAccept { .. } => "friend.accept",
            Self::FriendRemove { .. } => "friend.remove",
            Self::Friends { .. } => "friends",
            Self::PushRegister { .. } => "push.register",
            Self::PushUnregister { .. } => "push.unregister",
            Self::Block { .. } => "block",
            Self::Unblock { .. } => "unblock",
            Self::Blocked { .. } => "blocked",
            Self::Mute { .. } => "mute",
            Self::Settings { .. } => "settings",
            Self::Refresh { .. } => "refresh",
            Self::Edit { .. } => "edit",
            Self::Delete { .. } => "delete",
            Self::React { .. } => "react",
            Self::Receipts { .. } => "receipts",
            Self::Search { .. } => "search",
            Self::ProfileSet { .. } => "profile.set",
            Self::Profiles { .. } => "profiles",
            Self::MediaUrl { .. } => "media.url",
        }
    }
}

/// Frames the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type")]
pub enum ServerFrame {
    #[serde(rename = "welcome")]
    Welcome {
        user: UserId,
        device: DeviceId,
        edge: String,
        heartbeat: u64,
        resumed: bool,
    },
    #[serde(rename = "synced")]
    Synced { cursor: Cursor },
    #[serde(rename = "pong")]
    Pong {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    #[serde(rename = "sent")]
    Sent {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        id: MessageId,
        conversation: ConversationId,
        ts: u64,
        duplicate: bool,
    },
    #[serde(rename = "message")]
    Message {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<Cursor>,
        #[serde(flatten)]
        message: MessageEvent,
    },
    /// v1.1: a message changed (edit, delete, reaction); an inbox item.
    #[serde(rename = "update")]
    Update {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<Cursor>,
        #[serde(flatten)]
        change: ChangeEvent,
    },
    #[serde(rename = "membership")]
    Membership {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<Cursor>,
        conversation: ConversationId,
        event: MembershipChange,
        users: Vec<UserId>,
        by: UserId,
    },
    /// v1.1: an inbox item (with `cursor`, replayed on resume), coalesced
    /// to at most one per (conversation, user, kind) per second; `device`
    /// is the device that acked, for `delivered`.
    #[serde(rename = "receipt")]
    Receipt {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<Cursor>,
        conversation: ConversationId,
        user: UserId,
        kind: ReceiptKind,
        up_to: MessageId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<DeviceId>,
    },
    #[serde(rename = "presence")]
    Presence(PresenceEvent),
    #[serde(rename = "typing")]
    Typing {
        conversation: ConversationId,
        user: UserId,
        active: bool,
    },
    /// Added to PROTOCOL.md v1: your relation with `user` changed (a request
    /// arrived or was sent from another device, an accept, a removal).
    #[serde(rename = "friend")]
    Friend { user: UserId, state: FriendState },
    #[serde(rename = "reconnect")]
    Reconnect { reason: String, edges: Vec<String> },
    #[serde(rename = "error")]
    Error(ErrorFrame),
    #[serde(rename = "history")]
    History {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        conversation: ConversationId,
        /// Newest first.
        messages: Vec<MessageEvent>,
        more: bool,
    },
    #[serde(rename = "conversations")]
    Conversations {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        /// Newest activity first.
        items: Vec<ConversationSummary>,
        /// v1.1: more conversations follow; ask again with `next`.
        more: bool,
        /// v1.1: the token of the page after this one (with `more`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    },
    #[serde(rename = "group")]
    Group {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        group: GroupView,
    },
    #[serde(rename = "ok")]
    Ok {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    #[serde(rename = "friends")]
    Friends {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        items: Vec<FriendView>,
    },
    /// v1.1: the answer to `receipts`.
    #[serde(rename = "receipts")]
    Receipts {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        conversation: ConversationId,
        members: Vec<MemberReceipts>,
    },
    /// v1.1: the reply to `blocked`.
    #[serde(rename = "blocked")]
    Blocked {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        items: Vec<UserId>,
    },
    /// v1.1: the reply to `settings`, every setting.
    #[serde(rename = "settings")]
    Settings {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        #[serde(flatten)]
        settings: PrivacySettings,
    },
    /// v1.1: the reply to `search`: matching messages in their current
    /// state, newest first; `more` when older matches follow.
    #[serde(rename = "search")]
    Search {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        items: Vec<MessageEvent>,
        more: bool,
    },
    /// v1.1: the reply to `profiles`; users without a profile are left out.
    #[serde(rename = "profiles")]
    Profiles {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        items: Vec<Profile>,
    },
    /// v1.1: the reply to `media.url`: paths on this edge (with the
    /// signature in the query) that work without a token until `expires`.
    #[serde(rename = "media.url")]
    MediaUrl {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        /// `/v1/media/<id>?exp=…&sig=…`
        url: String,
        /// The same for the thumbnail (`/v1/media/<id>/thumb?…`; 404 until
        /// it is made, and for anything but an image).
        thumb: String,
        /// ms since the Unix epoch.
        expires: u64,
    },
}

/// v1.1: a user's name and avatar, as they set them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Profile {
    pub user: UserId,
    pub name: String,
    /// A media id, or `null`.
    pub avatar: Option<String>,
}

impl ServerFrame {
    /// Serializes the frame; our frames only hold strings, numbers and
    /// validated ids, so this cannot fail in practice, and if it ever did the
    /// client gets an `internal` error rather than a panic.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"internal","message":"could not encode a frame"}"#.into()
        })
    }

    /// The frame's `type`, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Welcome { .. } => "welcome",
            Self::Synced { .. } => "synced",
            Self::Pong { .. } => "pong",
            Self::Sent { .. } => "sent",
            Self::Message { .. } => "message",
            Self::Update { .. } => "update",
            Self::Membership { .. } => "membership",
            Self::Receipt { .. } => "receipt",
            Self::Presence(_) => "presence",
            Self::Typing { .. } => "typing",
            Self::Friend { .. } => "friend",
            Self::Reconnect { .. } => "reconnect",
            Self::Error(_) => "error",
            Self::History { .. } => "history",
            Self::Conversations { .. } => "conversations",
            Self::Group { .. } => "group",
            Self::Ok { .. } => "ok",
            Self::Friends { .. } => "friends",
            Self::Receipts { .. } => "receipts",
            Self::Blocked { .. } => "blocked",
            Self::Settings { .. } => "settings",
            Self::Search { .. } => "search",
            Self::Profiles { .. } => "profiles",
            Self::MediaUrl { .. } => "media.url",
        }
    }

    pub fn error(reference: Option<&str>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error(ErrorFrame {
            reference: reference.map(str::to_string),
            code,
            message: message.into(),
            retry_after_ms: None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorFrame {
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    TokenExpired,
    Forbidden,
    NotFound,
    TooLarge,
    RateLimited,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The code as it is on the wire, for metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::TokenExpired => "token_expired",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MembershipChange {
    Created,
    Added,
    Removed,
    Left,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReceiptKind {
    Delivered,
    Read,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PresenceStatus {
    Online,
    Offline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FriendState {
    Friends,
    /// You asked them; they have not accepted yet.
    Requested,
    /// They asked you; `friend.accept` makes you friends.
    Pending,
    /// No relation (any more): only in `friend` frames, after a removal.
    None,
}

/// v1.1 `settings.last_seen`: who sees the user's `last_active`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LastSeen {
    #[default]
    Everyone,
    Friends,
    Nobody,
}

/// v1.1 `settings.group_adds`: who may add the user to a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum GroupAdds {
    #[default]
    Everyone,
    Friends,
}

/// v1.1: a user's privacy settings; a user who never set any has the
/// defaults (everything visible, anyone may add them, read receipts on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PrivacySettings {
    pub last_seen: LastSeen,
    pub group_adds: GroupAdds,
    pub read_receipts: bool,
}

impl Default for PrivacySettings {
    fn default() -> Self {
        Self {
            last_seen: LastSeen::Everyone,
            group_adds: GroupAdds::Everyone,
            read_receipts: true,
        }
    }
}

/// The fields a `settings` request changes; the others keep their value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct SettingsChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<LastSeen>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_adds: Option<GroupAdds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_receipts: Option<bool>,
}

/// One accepted message: the MESSAGES stream event, a `history` item and the
/// body of a `message` frame.
///
/// The fields after `client_msg_id` are v1.1's; the last four describe a
/// message's current state and appear only in `history` (and in
/// `conversations`' `last`), never on MESSAGES or in a `message` frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MessageEvent {
    pub id: MessageId,
    pub conversation: ConversationId,
    pub from: UserId,
    /// Absent only for a message deleted for everyone.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
    /// ms since the Unix epoch.
    pub ts: u64,
    pub client_msg_id: ClientMsgId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MessageId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<UserId>,
    /// When the text was last edited (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_ts: Option<u64>,
    /// Deleted for everyone: the text is gone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// Who reacted with what, by emoji.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reactions: BTreeMap<String, Vec<UserId>>,
    /// v1.1: files and pictures, in the order sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
}

impl MessageEvent {
    /// A message as sent: no edits, reactions or deletion yet.
    pub fn sent(
        id: MessageId,
        conversation: ConversationId,
        from: UserId,
        text: String,
        ts: u64,
        client_msg_id: ClientMsgId,
    ) -> Self {
        Self {
            id,
            conversation,
            from,
            text,
            ts,
            client_msg_id,
            reply_to: None,
            mentions: Vec::new(),
            edited_ts: None,
            deleted: false,
            reactions: BTreeMap::new(),
            attachments: Vec::new(),
        }
    }

    /// What a notification shows of it: the text, or for a message of
    /// attachments only "📷 Photo" (a picture first) or "📎 <name>".
    pub fn summary(&self) -> std::borrow::Cow<'_, str> {
        match self.attachments.first() {
            Some(first) if self.text.is_empty() => match (&first.name, first.is_image()) {
                (_, true) => "📷 Photo".into(),
                (Some(name), false) => format!("📎 {name}").into(),
                (None, false) => "📎 File".into(),
            },
            _ => self.text.as_str().into(),
        }
    }
}

/// What a change does (v1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Edit,
    Delete,
    Reaction,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Edit => "edit",
            Self::Delete => "delete",
            Self::Reaction => "reaction",
        }
    }
}

/// Whom a `delete` is for (v1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeleteScope {
    /// Every member: the text is erased everywhere.
    Everyone,
    /// Hidden from the caller's devices only.
    Me,
}

/// A change of a message (v1.1): an event on MESSAGES (on the subject of
/// the message's conversation, so it is ordered after the message) and
/// the body of an `update` frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChangeEvent {
    pub kind: ChangeKind,
    pub conversation: ConversationId,
    /// The message changed.
    pub id: MessageId,
    pub by: UserId,
    /// When the change was made, ms since the Unix epoch.
    pub ts: u64,
    /// The new text (`edit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// `reaction`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emoji: Option<String>,
    /// `reaction`: added (`true`) or taken back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<bool>,
    /// `delete`: for everyone or only for `by`.
    #[serde(rename = "for", default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<DeleteScope>,
}

impl ChangeEvent {
    /// A delete for `me`: only the caller's inboxes get it.
    pub fn is_private(&self) -> bool {
        self.scope == Some(DeleteScope::Me)
    }

    /// A delete for everyone: the message's text is erased.
    pub fn erases(&self) -> bool {
        self.kind == ChangeKind::Delete && self.scope == Some(DeleteScope::Everyone)
    }

    /// Whether it carries what its kind needs (`text`; `emoji` and `on`;
    /// `for`): readers refuse one that does not rather than guess.
    pub fn is_complete(&self) -> bool {
        match self.kind {
            ChangeKind::Edit => self.text.is_some(),
            ChangeKind::Reaction => self.emoji.is_some() && self.on.is_some(),
            ChangeKind::Delete => self.scope.is_some(),
        }
    }
}

/// One MESSAGES event: a message, or (v1.1) a change of one. Every reader of
/// MESSAGES decodes with [`MessagesEvent::parse`].
#[derive(Debug, Clone, PartialEq)]
pub enum MessagesEvent {
    Message(MessageEvent),
    Change(ChangeEvent),
}

impl MessagesEvent {
    /// A payload without `kind` (or with `"kind":"message"`) is a message.
    pub fn parse(payload: &[u8]) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Kind {
            #[serde(default)]
            kind: Option<String>,
        }
        // Messages, the common case, are parsed once: a payload without the
        // bytes `"kind"` has no such key (inside a JSON string the quotes
        // would be escaped).
        if !payload.windows(6).any(|w| w == b"\"kind\"") {
            return serde_json::from_slice(payload).map(Self::Message);
        }
        let probe: Kind = serde_json::from_slice(payload)?;
        match probe.kind.as_deref() {
            None | Some("message") => serde_json::from_slice(payload).map(Self::Message),
            Some(_) => serde_json::from_slice(payload).map(Self::Change),
        }
    }

    pub fn conversation(&self) -> &ConversationId {
        match self {
            Self::Message(message) => &message.conversation,
            Self::Change(change) => &change.conversation,
        }
    }
}

/// `chat.presence.<user>` and the `presence` frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PresenceEvent {
    pub user: UserId,
    pub status: PresenceStatus,
    /// ms since the Unix epoch.
    pub last_active: u64,
}

/// A membership change of a group (stream EVENTS, `chat.event.group.<id>`),
/// published by the persister after the change is committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GroupEvent {
    /// Unique per change; the inbox de-duplication key.
    pub id: String,
    pub group: GroupId,
    pub event: MembershipChange,
    /// The users the change is about.
    pub users: Vec<UserId>,
    pub by: UserId,
    /// Every member after the change.
    pub members: Vec<UserId>,
    pub ts: u64,
}

/// How many characters of a conversation's newest message its summary
/// carries: a `conversations` page stays small whatever was sent.
pub const PREVIEW_CHARS: usize = 200;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConversationSummary {
    pub conversation: ConversationId,
    /// The newest message, its `text` cut to [`PREVIEW_CHARS`] characters
    /// (the whole text is in `history`).
    pub last: Option<MessageEvent>,
    /// v1.1: `last.text` was cut.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    pub unread: u64,
    pub read_up_to: Option<MessageId>,
}

/// One member's watermarks in a conversation (`null`: nothing yet).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MemberReceipts {
    pub user: UserId,
    /// The newest message any of their devices acknowledged.
    pub delivered_up_to: Option<MessageId>,
    pub read_up_to: Option<MessageId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GroupView {
    pub id: GroupId,
    pub name: String,
    pub owner: UserId,
    pub members: Vec<UserId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FriendView {
    pub user: UserId,
    pub state: FriendState,
    pub status: PresenceStatus,
    pub last_active: Option<u64>,
}

pub mod close {
    //! WebSocket close codes of PROTOCOL.md.
    pub const GOING_AWAY: u16 = 1001;
    pub const TOO_BIG: u16 = 1009;
    pub const UNAUTHORIZED: u16 = 4001;
    pub const NO_HELLO: u16 = 4002;
    pub const HEARTBEAT_MISSED: u16 = 4003;
    pub const ABUSE: u16 = 4008;
    /// Added to PROTOCOL.md v1: the client fell too far behind on live
    /// frames; it reconnects and resumes from its cursor.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Adds `"cursor":"<n>"` to a serialized frame that has none.
///
/// Inbox items are stored without their cursor (it is the INBOX sequence,
/// known only after the append), and both the router (live) and the edge
/// (backlog) add it here, without parsing the frame again.
pub fn with_cursor(frame: &[u8], cursor: Cursor) -> Vec<u8> {
    let body = frame.strip_prefix(b"{").unwrap_or(frame);
    let mut out = Vec::with_capacity(frame.len() + 32);
    out.extend_from_slice(b"{\"cursor\":\"");
    out.extend_from_slice(cursor.to_string().as_bytes());
    out.push(b'"');
    if body.first().is_some_and(|b| *b != b'}') {
        out.push(b',');
    }
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn client_frames_parse_per_protocol() {
        let hello: ClientFrame = serde_json::from_value(
            json!({"type":"hello","token":"t","device":"phone-1","cursor":"123"}),
        )
        .unwrap();
        assert_eq!(
            hello,
            ClientFrame::Hello {
                token: "t".into(),
                device: DeviceId::parse("phone-1").unwrap(),
                cursor: Some(Cursor(123)),
            }
        );
        let send: ClientFrame = serde_json::from_value(
            json!({"type":"send","ref":"r1","to":"bob","text":"hi","client_msg_id":"c1","extra":1}),
        )
        .unwrap();
        assert_eq!(send.reference(), Some("r1"));
        let add: ClientFrame = serde_json::from_value(
            json!({"type":"group.add","ref":"r","group":"group:g1","users":["a"]}),
        )
        .unwrap();
        assert!(matches!(add, ClientFrame::GroupAdd { group, .. } if group.as_str() == "g1"));
        // v1.1: `read` and `typing` may carry a `ref`; v1 frames without one
        // still parse, and so does a v1 `conversations` without paging.
        for (frame, reference) in [
            (
                json!({"type":"read","ref":"r2","conversation":"dm:a:b","up_to":"1"}),
                Some("r2"),
            ),
            (
                json!({"type":"read","conversation":"dm:a:b","up_to":"1"}),
                None,
            ),
            (
                json!({"type":"typing","ref":"r3","conversation":"group:g","active":true}),
                Some("r3"),
            ),
            (
                json!({"type":"typing","conversation":"group:g","active":true}),
                None,
            ),
        ] {
            let frame: ClientFrame = serde_json::from_value(frame).unwrap();
            assert_eq!(frame.reference(), reference);
        }
        assert_eq!(
            serde_json::from_value::<ClientFrame>(json!({"type":"conversations"})).unwrap(),
            ClientFrame::Conversations {
                reference: None,
                limit: None,
                next: None
            }
        );
    }

    #[test]
    fn bad_client_frames_are_refused() {
        for bad in [
            json!({"type":"nope"}),
            json!({"type":"hello","device":"d"}),
            json!({"type":"hello","token":"t","device":"a.b"}),
            json!({"type":"send","to":"bob","client_msg_id":"c"}),
            json!({"type":"history","conversation":"dm:b:a"}),
            json!({"token":"t"}),
        ] {
            assert!(
                serde_json::from_value::<ClientFrame>(bad.clone()).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn server_frames_render_per_protocol() {
        let sent = ServerFrame::Sent {
            reference: Some("r".into()),
            id: MessageId(7),
            conversation: ConversationId::parse("dm:a:b").unwrap(),
            ts: 5,
            duplicate: false,
        };
        assert_eq!(
            serde_json::to_value(&sent).unwrap(),
            json!({"type":"sent","ref":"r","id":"7","conversation":"dm:a:b","ts":5,"duplicate":false})
        );
        let message = ServerFrame::Message {
            cursor: Some(Cursor(9)),
            message: MessageEvent::sent(
                MessageId(7),
                ConversationId::parse("dm:a:b").unwrap(),
                UserId::parse("a").unwrap(),
                "hi".into(),
                5,
                ClientMsgId::parse("c").unwrap(),
            ),
        };
        let value = serde_json::to_value(&message).unwrap();
        assert_eq!(
            value,
            json!({"type":"message","cursor":"9","id":"7","conversation":"dm:a:b","from":"a","text":"hi","ts":5,"client_msg_id":"c"})
        );
        assert_eq!(
            serde_json::from_value::<ServerFrame>(value).unwrap(),
            message
        );
        let update = ServerFrame::Update {
            cursor: Some(Cursor(10)),
            change: ChangeEvent {
                kind: ChangeKind::Reaction,
                conversation: ConversationId::parse("dm:a:b").unwrap(),
                id: MessageId(7),
                by: UserId::parse("b").unwrap(),
                ts: 6,
                text: None,
                emoji: Some("👍".into()),
                on: Some(true),
                scope: None,
            },
        };
        let value = serde_json::to_value(&update).unwrap();
        assert_eq!(
            value,
            json!({"type":"update","cursor":"10","kind":"reaction","conversation":"dm:a:b","id":"7","by":"b","ts":6,"emoji":"👍","on":true})
        );
        assert_eq!(
            serde_json::from_value::<ServerFrame>(value).unwrap(),
            update
        );
        let error = ServerFrame::error(None, ErrorCode::BadRequest, "x");
        assert_eq!(
            serde_json::to_value(&error).unwrap(),
            json!({"type":"error","code":"bad_request","message":"x"})
        );
    }

    #[test]
    fn search_and_profile_frames_parse_per_protocol() {
        let search: ClientFrame = serde_json::from_value(
            json!({"type":"search","ref":"r","query":"東京","conversation":"dm:a:b","before":"9","limit":5}),
        )
        .unwrap();
        assert_eq!(
            search,
            ClientFrame::Search {
                reference: Some("r".into()),
                query: "東京".into(),
                conversation: Some(ConversationId::parse("dm:a:b").unwrap()),
                before: Some(MessageId(9)),
                limit: Some(5),
            }
        );
        // An absent avatar is `null`: no avatar.
        let set: ClientFrame =
            serde_json::from_value(json!({"type":"profile.set","name":"n"})).unwrap();
        assert!(matches!(set, ClientFrame::ProfileSet { avatar: None, .. }));
        let profiles = ServerFrame::Profiles {
            reference: Some("r".into()),
            items: vec![Profile {
                user: UserId::parse("a").unwrap(),
                name: "A".into(),
                avatar: None,
            }],
        };
        assert_eq!(
            serde_json::to_value(&profiles).unwrap(),
            json!({"type":"profiles","ref":"r","items":[{"user":"a","name":"A","avatar":null}]})
        );
    }

    #[test]
    fn kinds_are_the_serialized_types() {
        let client = [
            json!({"type":"hello","token":"t","device":"d"}),
            json!({"type":"ping"}),
            json!({"type":"ack","cursor":"1"}),
            json!({"type":"send","to":"b","text":"hi","client_msg_id":"c"}),
            json!({"type":"read","conversation":"dm:a:b","up_to":"1"}),
            json!({"type":"typing","conversation":"dm:a:b","active":true}),
            json!({"type":"history","conversation":"dm:a:b"}),
            json!({"type":"conversations"}),
            json!({"type":"group.create","name":"g","members":[]}),
            json!({"type":"group.add","group":"g","users":[]}),
            json!({"type":"group.remove","group":"g","users":[]}),
            json!({"type":"group.leave","group":"g"}),
            json!({"type":"group.info","group":"g"}),
            json!({"type":"friend.request","user":"b"}),
            json!({"type":"friend.accept","user":"b"}),
            json!({"type":"friend.remove","user":"b"}),
            json!({"type":"friends"}),
            json!({"type":"push.register","platform":"fcm","token":"t"}),
            json!({"type":"push.unregister","platform":"fcm","token":"t"}),
            json!({"type":"refresh","token":"t"}),
            json!({"type":"edit","conversation":"dm:a:b","id":"1","text":"x"}),
            json!({"type":"delete","conversation":"dm:a:b","id":"1","for":"me"}),
            json!({"type":"react","conversation":"dm:a:b","id":"1","emoji":"x","on":true}),
            json!({"type":"receipts","conversation":"dm:a:b"}),
            json!({"type":"block","user":"b"}),
            json!({"type":"unblock","user":"b"}),
            json!({"type":"blocked"}),
            json!({"type":"mute","conversation":"dm:a:b","until":null}),
            json!({"type":"settings"}),
            json!({"type":"search","query":"q"}),
            json!({"type":"profile.set","name":"n"}),
            json!({"type":"profiles","users":["b"]}),
            json!({"type":"media.url","media":"0".repeat(64)}),
        ];
        for value in client {
            let frame: ClientFrame = serde_json::from_value(value.clone()).unwrap();
            assert_eq!(frame.kind(), value["type"], "{value}");
        }
        let server = [
            ServerFrame::Synced { cursor: Cursor(1) },
            ServerFrame::Pong { reference: None },
            ServerFrame::Ok { reference: None },
            ServerFrame::error(None, ErrorCode::Internal, "x"),
            ServerFrame::Reconnect {
                reason: "drain".into(),
                edges: vec![],
            },
            ServerFrame::Friends {
                reference: None,
                items: vec![],
            },
            ServerFrame::Receipts {
                reference: None,
                conversation: ConversationId::parse("dm:a:b").unwrap(),
                members: vec![],
            },
            ServerFrame::Blocked {
                reference: None,
                items: vec![],
            },
            ServerFrame::Settings {
                reference: None,
                settings: PrivacySettings::default(),
            },
            ServerFrame::Search {
                reference: None,
                items: vec![],
                more: false,
            },
            ServerFrame::Profiles {
                reference: None,
                items: vec![],
            },
            ServerFrame::MediaUrl {
                reference: None,
                url: "/v1/media/x".into(),
                thumb: "/v1/media/x/thumb".into(),
                expires: 1,
            },
        ];
        for frame in server {
            let value = serde_json::to_value(&frame).unwrap();
            assert_eq!(frame.kind(), value["type"], "{value}");
        }
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::Unauthorized,
            ErrorCode::TokenExpired,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::TooLarge,
            ErrorCode::RateLimited,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }

    #[test]
    fn messages_events_are_messages_or_changes() {
        let message = br#"{"id":"1","conversation":"dm:a:b","from":"a","text":"hi","ts":1,"client_msg_id":"c","reply_to":"0","mentions":["b"]}"#;
        let Ok(MessagesEvent::Message(parsed)) = MessagesEvent::parse(message) else {
            panic!("not a message");
        };
        assert_eq!(parsed.reply_to, Some(MessageId(0)));
        assert_eq!(parsed.mentions, vec![UserId::parse("b").unwrap()]);
        let labelled = br#"{"kind":"message","id":"1","conversation":"dm:a:b","from":"a","text":"hi","ts":1,"client_msg_id":"c"}"#;
        assert!(matches!(
            MessagesEvent::parse(labelled),
            Ok(MessagesEvent::Message(_))
        ));
        let delete = br#"{"kind":"delete","id":"1","conversation":"dm:a:b","by":"a","ts":2,"for":"everyone"}"#;
        let Ok(MessagesEvent::Change(change)) = MessagesEvent::parse(delete) else {
            panic!("not a change");
        };
        assert!(change.erases() && !change.is_private());
        // A change is never mistaken for a message by an older reader.
        assert!(serde_json::from_slice::<MessageEvent>(delete).is_err());
        assert!(MessagesEvent::parse(br#"{"kind":"shout","id":"1"}"#).is_err());
        // A text that names the key is still a message.
        let quoting = br#"{"id":"1","conversation":"dm:a:b","from":"a","text":"\"kind\": kind","ts":1,"client_msg_id":"c"}"#;
        assert!(matches!(
            MessagesEvent::parse(quoting),
            Ok(MessagesEvent::Message(m)) if m.text == "\"kind\": kind"
        ));
        let named = br#"{"id":"1","conversation":"dm:a:b","from":"a","text":"kind","ts":1,"client_msg_id":"c"}"#;
        assert!(matches!(
            MessagesEvent::parse(named),
            Ok(MessagesEvent::Message(_))
        ));
        let bare = br#"{"kind":"edit","id":"1","conversation":"dm:a:b","by":"a","ts":2}"#;
        assert!(matches!(
            MessagesEvent::parse(bare),
            Ok(MessagesEvent::Change(c)) if !c.is_complete()
        ));
    }

    #[test]
    fn privacy_frames_parse_and_render_flat() {
        let change: ClientFrame = serde_json::from_value(
            json!({"type":"settings","ref":"r","last_seen":"nobody","read_receipts":false}),
        )
        .unwrap();
        assert_eq!(
            change,
            ClientFrame::Settings {
                reference: Some("r".into()),
                change: SettingsChange {
                    last_seen: Some(LastSeen::Nobody),
                    group_adds: None,
                    read_receipts: Some(false),
                },
            }
        );
        for bad in [
            json!({"type":"settings","group_adds":"nobody"}),
            json!({"type":"settings","read_receipts":"no"}),
            json!({"type":"mute","until":1}),
            json!({"type":"block"}),
        ] {
            assert!(
                serde_json::from_value::<ClientFrame>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        let unmute: ClientFrame =
            serde_json::from_value(json!({"type":"mute","conversation":"dm:a:b","until":null}))
                .unwrap();
        assert!(matches!(unmute, ClientFrame::Mute { until: None, .. }));
        let settings = ServerFrame::Settings {
            reference: Some("r".into()),
            settings: PrivacySettings::default(),
        };
        assert_eq!(
            serde_json::to_value(&settings).unwrap(),
            json!({"type":"settings","ref":"r","last_seen":"everyone","group_adds":"everyone","read_receipts":true})
        );
    }

    #[test]
    fn cursors_are_spliced_into_stored_frames() {
        let stored = br#"{"type":"message","id":"1"}"#;
        let live = with_cursor(stored, Cursor(42));
        let value: serde_json::Value = serde_json::from_slice(&live).unwrap();
        assert_eq!(value, json!({"cursor":"42","type":"message","id":"1"}));
        assert_eq!(with_cursor(b"{}", Cursor(1)), br#"{"cursor":"1"}"#.to_vec());
    }

    mod generated {
        use super::*;
        use proptest::prelude::*;

        fn user() -> impl Strategy<Value = UserId> {
            "[A-Za-z0-9_-]{1,12}".prop_map(|s| UserId::parse(s).unwrap())
        }

        fn group() -> impl Strategy<Value = GroupId> {
            "[A-Za-z0-9_-]{1,12}".prop_map(|s| GroupId::parse(s).unwrap())
        }

        fn conversation() -> impl Strategy<Value = ConversationId> {
            prop_oneof![
                (user(), user()).prop_filter_map("a DM needs two users", |(a, b)| {
                    ConversationId::dm(a, b).ok()
                }),
                group().prop_map(ConversationId::Group),
            ]
        }

        fn reference() -> impl Strategy<Value = Option<String>> {
            proptest::option::of(any::<String>())
        }

        fn platform() -> impl Strategy<Value = PushPlatform> {
            proptest::sample::select(PushPlatform::ALL.to_vec())
        }

        /// One frame of each kind, with generated ids and free text.
        fn client_frame() -> impl Strategy<Value = ClientFrame> {
            let users = || proptest::collection::vec(user(), 0..4);
            prop_oneof![
                (
                    any::<String>(),
                    "[A-Za-z0-9_-]{1,12}",
                    proptest::option::of(any::<u64>())
                )
                    .prop_map(|(token, device, cursor)| ClientFrame::Hello {
                        token,
                        device: DeviceId::parse(device).unwrap(),
                        cursor: cursor.map(Cursor),
                    }),
                reference().prop_map(|reference| ClientFrame::Ping { reference }),
                any::<u64>().prop_map(|n| ClientFrame::Ack { cursor: Cursor(n) }),
                (
                    reference(),
                    prop_oneof![
                        user().prop_map(|to| (Some(to), None)),
                        conversation().prop_map(|c| (None, Some(c))),
                    ],
                    any::<String>(),
                    "\\PC{1,64}"
                )
                    .prop_map(|(reference, (to, conversation), text, cmid)| {
                        ClientFrame::Send(SendRequest {
                            reference,
                            to,
                            conversation,
                            text,
                            client_msg_id: ClientMsgId::parse(cmid).unwrap(),
                            reply_to: None,
                            mentions: Vec::new(),
                            attachments: Vec::new(),
                        })
                    }),
                (reference(), conversation(), any::<u64>()).prop_map(
                    |(reference, conversation, n)| ClientFrame::Read {
                        reference,
                        conversation,
                        up_to: MessageId(n),
                    }
                ),
                (reference(), conversation(), any::<bool>()).prop_map(
                    |(reference, conversation, active)| ClientFrame::Typing {
                        reference,
                        conversation,
                        active,
                    }
                ),
                (
                    reference(),
                    proptest::option::of(any::<u32>()),
                    proptest::option::of(any::<String>())
                )
                    .prop_map(|(reference, limit, next)| {
                        ClientFrame::Conversations {
                            reference,
                            limit,
                            next,
                        }
                    }),
                (
                    reference(),
                    conversation(),
                    proptest::option::of(any::<u64>()),
                    proptest::option::of(any::<u32>())
                )
                    .prop_map(|(reference, conversation, before, limit)| {
                        ClientFrame::History {
                            reference,
                            conversation,
                            before: before.map(MessageId),
                            limit,
                        }
                    }),
                (reference(), any::<String>(), users()).prop_map(|(reference, name, members)| {
                    ClientFrame::GroupCreate {
                        reference,
                        name,
                        members,
                    }
                }),
                (reference(), group(), users()).prop_map(|(reference, group, users)| {
                    ClientFrame::GroupAdd {
                        reference,
                        group,
                        users,
                    }
                }),
                (reference(), group())
                    .prop_map(|(reference, group)| ClientFrame::GroupInfo { reference, group }),
                (reference(), user())
                    .prop_map(|(reference, user)| ClientFrame::FriendRequest { reference, user }),
                (reference(), platform(), any::<String>()).prop_map(
                    |(reference, platform, token)| ClientFrame::PushRegister {
                        reference,
                        platform,
                        token,
                    }
                ),
                (reference(), any::<String>())
                    .prop_map(|(reference, token)| ClientFrame::Refresh { reference, token }),
            ]
        }

        proptest! {
            #[test]
            fn generated_client_frames_roundtrip_through_json(frame in client_frame()) {
                let json = serde_json::to_string(&frame).unwrap();
                let value: serde_json::Value = serde_json::from_str(&json).unwrap();
                prop_assert_eq!(&value["type"], frame.kind());
                prop_assert_eq!(value.get("ref").and_then(|r| r.as_str()), frame.reference());
                prop_assert_eq!(serde_json::from_str::<ClientFrame>(&json).unwrap(), frame);
            }

            #[test]
            fn client_frame_parse_never_panics(
                text in prop_oneof![
                    any::<String>(),
                    r#"\{"type":"(hello|send|read|history|group\.add|ack|edit|delete|react)"(,"[a-z_]{1,12}":("[a-z:0-9.]{0,8}"|[0-9-]{1,4}|null|\[\]))*\}"#,
                ]
            ) {
                // What the edge does with a text frame (edge/src/session.rs).
                match serde_json::from_str::<ClientFrame>(&text) {
                    Ok(frame) => {
                        let json = serde_json::to_string(&frame).unwrap();
                        prop_assert_eq!(serde_json::from_str::<ClientFrame>(&json).unwrap(), frame);
                    }
                    Err(_) => {
                        let _ = serde_json::from_str::<RefOnly>(&text);
                    }
                }
            }
        }
    }
}
