//! The persister's request/reply service: what edges and the router ask of
//! PostgreSQL without touching it. One subject per method
//! (`chat.rpc.<method>`, queue group `persister`); JSON bodies; the reply is
//! `{"ok":…}` or `{"err":{"code","message"}}` with a PROTOCOL.md error code.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ids::{ConversationId, DeviceId, GroupId, MediaId, MessageId, UserId};
use crate::push::Platform;
use crate::subjects;
use crate::telemetry::TraceId;
use crate::wire::{
    Attachment, ConversationSummary, DeleteScope, ErrorCode, FriendState, GroupView,
    MemberReceipts, MessageEvent, PrivacySettings, Profile, SettingsChange,
};

/// A method: its subject name and its request and response types.
pub trait Method {
    const NAME: &'static str;
    type Request: Serialize + DeserializeOwned + Send;
    type Response: Serialize + DeserializeOwned + Send;
}

macro_rules! method {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $req:ty => $resp:ty) => {
        $(#[$doc])*
        pub struct $ty;
        impl Method for $ty {
            const NAME: &'static str = $name;
            type Request = $req;
            type Response = $resp;
        }
    };
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryRequest {
    pub user: UserId,
    pub conversation: ConversationId,
    pub before: Option<MessageId>,
    pub limit: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryPage {
    /// Newest first.
    pub messages: Vec<MessageEvent>,
    pub more: bool,
}

/// The largest reply a client is sent: PROTOCOL.md closes a socket on a
/// frame over 1 MiB, and 1 MiB is also NATS's default `max_payload`.
pub const MAX_REPLY_BYTES: usize = 1024 * 1024;
/// What a reply's items may take of [`MAX_REPLY_BYTES`]: the rest is for
/// the envelope around them (`{"ok":…}` here, `type`, `ref`, `more`, `next`
/// on the client's frame).
pub const REPLY_ITEMS_BUDGET: usize = MAX_REPLY_BYTES - 64 * 1024;

/// How many of a user's conversations (by latest activity) `conversations`
/// pages through at most: the rest are reachable by `history` but never
/// listed, so one user in thousands of groups costs one bounded query.
pub const MAX_REACHABLE_CONVERSATIONS: i64 = 500;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConversationsRequest {
    pub user: UserId,
    /// 1..=200 (the edge checks; the persister clamps).
    pub limit: u32,
    /// The previous page's `next`.
    #[serde(default)]
    pub next: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConversationsPage {
    /// Newest activity first.
    pub items: Vec<ConversationSummary>,
    pub more: bool,
    pub next: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRequest {
    pub user: UserId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupCreateRequest {
    pub user: UserId,
    pub name: String,
    pub members: Vec<UserId>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupChangeRequest {
    pub user: UserId,
    pub group: GroupId,
    pub users: Vec<UserId>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupRequest {
    pub user: UserId,
    pub group: GroupId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MembersRequest {
    pub group: GroupId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadRequest {
    pub user: UserId,
    pub conversation: ConversationId,
    pub up_to: MessageId,
}

method!(History, "history", HistoryRequest => HistoryPage);
method!(
    /// One page of a user's conversations (of the first
    /// [`MAX_REACHABLE_CONVERSATIONS`] by activity), at most
    /// [`REPLY_ITEMS_BUDGET`] bytes of items.
    Conversations, "conversations", ConversationsRequest => ConversationsPage
);
method!(GroupCreate, "group_create", GroupCreateRequest => GroupView);
method!(GroupAdd, "group_add", GroupChangeRequest => GroupView);
method!(GroupRemove, "group_remove", GroupChangeRequest => GroupView);
method!(GroupLeave, "group_leave", GroupRequest => ());
method!(GroupInfo, "group_info", GroupRequest => GroupView);
method!(
    /// Current members of a group, for the router's fan-out and the edge's
    /// send check. `not_found` for an unknown group.
    Members, "members", MembersRequest => Vec<UserId>
);
method!(Read, "read", ReadRequest => ());

/// What a change request asks (v1.1 `edit`, `delete`, `react`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Change {
    Edit {
        text: String,
    },
    Delete {
        #[serde(rename = "for")]
        scope: DeleteScope,
    },
    Reaction {
        emoji: String,
        on: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeCheckRequest {
    pub user: UserId,
    pub conversation: ConversationId,
    pub id: MessageId,
    pub change: Change,
}

/// The persister's verdict on a change it allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeVerdict {
    /// The message is already in the state asked for: answer `ok` and
    /// publish nothing.
    pub noop: bool,
    /// How many changes the message has had: part of the change's
    /// `Nats-Msg-Id`, so a reaction taken back and given again is a new
    /// event while the same request repeated at once is not.
    pub version: u64,
}

method!(
    /// Checks a change against the rules and the message's current state,
    /// once every MESSAGES event of the conversation's partition published
    /// before the request is in PostgreSQL (`unavailable` if the writer
    /// does not get there in time). `not_found`, `forbidden` otherwise.
    CheckChange, "change_check", ChangeCheckRequest => ChangeVerdict
);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConversationRequest {
    pub user: UserId,
    pub conversation: ConversationId,
}

method!(
    /// Every member's stored delivered and read watermarks; `forbidden`
    /// unless `user` is a member.
    Receipts, "receipts", ConversationRequest => Vec<MemberReceipts>
);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FriendRequest {
    pub user: UserId,
    pub other: UserId,
}

/// One entry of a user's friend list, as stored (presence is added by the
/// edge, for accepted friends only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FriendEntry {
    pub user: UserId,
    pub state: FriendState,
    /// v1.1: whether the asker may see this user's presence (no block
    /// between them) and `last_active` (their `last_seen` allows it).
    #[serde(default = "visible")]
    pub presence: bool,
    #[serde(default = "visible")]
    pub last_active: bool,
}

fn visible() -> bool {
    true
}

method!(
    /// Asks `other` to be friends; if `other` had asked `user` already they
    /// become friends. Replies with `user`'s state towards `other`.
    FriendAsk, "friend_request", FriendRequest => FriendState
);
method!(
    /// Accepts `other`'s pending request; `not_found` without one.
    FriendAccept, "friend_accept", FriendRequest => FriendState
);
method!(
    /// Ends a friendship, withdraws a request or declines one.
    FriendRemove, "friend_remove", FriendRequest => ()
);
method!(FriendList, "friends", UserRequest => Vec<FriendEntry>);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushTokenRequest {
    pub user: UserId,
    pub device: DeviceId,
    pub platform: Platform,
    pub token: String,
}

method!(
    /// Stores a device's token for a platform (replacing its previous one);
    /// `bad_request` for a token of the wrong shape.
    PushRegister, "push_register", PushTokenRequest => ()
);
method!(PushUnregister, "push_unregister", PushTokenRequest => ());
method!(
    /// The accepted friends with no block between them and the user: whom
    /// presence changes go to, and whose presence the user's snapshot shows.
    FriendsOf, "friends_of", UserRequest => PresenceAudience
);

/// Who shares presence with a user, and what of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PresenceAudience {
    /// The user's own `last_seen` lets their friends see `last_active`.
    pub shows_last_active: bool,
    pub friends: Vec<PresencePeer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresencePeer {
    pub user: UserId,
    /// This friend's `last_seen` lets the user see their `last_active`.
    pub shows_last_active: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockRequest {
    pub user: UserId,
    pub other: UserId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MuteRequest {
    pub user: UserId,
    pub conversation: ConversationId,
    /// ms since the epoch; `None` unmutes.
    pub until: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SettingsRequest {
    pub user: UserId,
    pub change: SettingsChange,
}

method!(
    /// Blocks `other` (idempotent); publishes the block change.
    Block, "block", BlockRequest => ()
);
method!(Unblock, "unblock", BlockRequest => ());
method!(
    /// The users `user` blocked, oldest block first.
    BlockList, "blocked", UserRequest => Vec<UserId>
);
method!(
    /// Everyone `user` blocked or is blocked by: what block caches hold.
    BlockPeers, "block_peers", UserRequest => Vec<UserId>
);
method!(
    /// Mutes (or with `until: None` unmutes) a conversation the user is a
    /// member of.
    Mute, "mute", MuteRequest => ()
);
method!(
    /// Applies the change (possibly none) and answers every setting.
    Settings, "settings", SettingsRequest => PrivacySettings
);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchRequest {
    pub user: UserId,
    /// 1..=200 characters (the edge checks).
    pub query: String,
    pub conversation: Option<ConversationId>,
    pub before: Option<MessageId>,
    /// 1..=100 (the edge checks; the persister clamps).
    pub limit: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchPage {
    /// Newest first, at most [`REPLY_ITEMS_BUDGET`] bytes of them.
    pub items: Vec<MessageEvent>,
    pub more: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfileSetRequest {
    pub user: UserId,
    pub name: String,
    pub avatar: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfilesRequest {
    pub user: UserId,
    pub users: Vec<UserId>,
}

method!(
    /// Messages matching a query in the conversations `user` is a member
    /// of at the time of the query; never deleted or hidden ones.
    Search, "search", SearchRequest => SearchPage
);
method!(
    /// Stores `user`'s profile; `bad_request` for a name or avatar of the
    /// wrong shape.
    ProfileSet, "profile_set", ProfileSetRequest => ()
);
method!(
    /// The stored profiles of `users` (those without one are left out).
    Profiles, "profiles", ProfilesRequest => Vec<Profile>
);

/// A stored media's metadata (table `media`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaInfo {
    /// The bytes' SHA-256, hex.
    pub media: MediaId,
    pub size: u64,
    pub content_type: String,
    #[serde(default)]
    pub width: Option<u32>,
    #[serde(default)]
    pub height: Option<u32>,
}

impl MediaInfo {
    /// Whether the thumbnailer should make a thumbnail: a type it decodes.
    pub fn is_image(&self) -> bool {
        self.content_type.starts_with("image/")
    }

    /// The attachment a message carries of it.
    pub fn attachment(&self, name: Option<String>) -> Attachment {
        Attachment {
            media: self.media.clone(),
            name,
            size: self.size,
            sha256: self.media.to_string(),
            content_type: self.content_type.clone(),
            width: self.width,
            height: self.height,
        }
    }
}

/// An upload an edge stored in the object store, by `uploader`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MediaStoredRequest {
    pub user: UserId,
    pub media: MediaInfo,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MediaAccessRequest {
    pub user: UserId,
    /// At most [`crate::wire::MAX_ATTACHMENTS`].
    pub media: Vec<MediaId>,
}

method!(
    /// Records an upload (idempotent): the media's metadata and its
    /// uploader; an image gets a thumbnail job. Answered once both are
    /// durable, so the `201` of an upload means the media can be used.
    MediaStored, "media_stored", MediaStoredRequest => MediaInfo
);
method!(
    /// The metadata of those of `media` that `user` may see: their
    /// uploader, or a current member of a conversation in which a message
    /// (not deleted) carries them. Checked at the time of the request.
    MediaAccess, "media_access", MediaAccessRequest => Vec<MediaInfo>
);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct RpcError {
    pub code: ErrorCode,
    pub message: String,
}

impl RpcError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply<T> {
    Ok(T),
    Err(RpcError),
}

/// Calls `M` and waits for its reply (bounded by the client's request
/// timeout). Transport failures are `unavailable`.
pub async fn call<M: Method>(
    client: &async_nats::Client,
    request: &M::Request,
) -> Result<M::Response, RpcError> {
    let body = serde_json::to_vec(request).map_err(|e| {
        tracing::error!(method = M::NAME, error = %e, "cannot encode an rpc request");
        RpcError::new(ErrorCode::Internal, "internal error")
    })?;
    // The persister's span for this request carries the same trace id.
    let trace = TraceId::random();
    let mut headers = async_nats::HeaderMap::new();
    trace.add_to(&mut headers);
    let reply = client
        .request_with_headers(subjects::rpc(M::NAME), headers, body.into())
        .await
        .map_err(|e| {
            tracing::warn!(method = M::NAME, trace_id = %trace, error = %e, "rpc failed");
            RpcError::new(
                ErrorCode::Unavailable,
                "history service unavailable, retry later",
            )
        })?;
    match serde_json::from_slice::<Reply<M::Response>>(&reply.payload) {
        Ok(Reply::Ok(response)) => Ok(response),
        Ok(Reply::Err(error)) => Err(error),
        Err(e) => {
            tracing::error!(method = M::NAME, trace_id = %trace, error = %e, "bad rpc reply");
            Err(RpcError::new(ErrorCode::Internal, "internal error"))
        }
    }
}

/// Encodes a handler's result as a reply body.
pub fn encode_reply<T: Serialize>(result: Result<T, RpcError>) -> Vec<u8> {
    let reply = match result {
        Ok(value) => Reply::Ok(value),
        Err(error) => Reply::Err(error),
    };
    serde_json::to_vec(&reply).unwrap_or_else(|_| {
        br#"{"err":{"code":"internal","message":"could not encode the reply"}}"#.to_vec()
    })
}
