//! Every NATS subject, stream, consumer, queue group, KV bucket and header
//! name the system uses. Nothing outside this module spells `chat.`.
//!
//! Each family has its own second token (`msg`, `inbox`, `deliver`, …), so a
//! user and a conversation or an edge with the same id can never collide.

use crate::ids::{
    ClientMsgId, ConversationId, DeviceId, EdgeId, GroupId, MediaId, MessageId, UserId,
};
use crate::partitions::Partition;
use crate::wire::{PresenceStatus, ReceiptKind};

pub const MESSAGES_STREAM: &str = "MESSAGES";
pub const INBOX_STREAM: &str = "INBOX";
pub const PUSH_STREAM: &str = "PUSH";
pub const EVENTS_STREAM: &str = "EVENTS";
/// Events a consumer gave up on, kept for an operator (see [`dead_letter`]).
pub const DEADLETTER_STREAM: &str = "DEADLETTER";
/// One event per operator action (see [`audit`]).
pub const AUDIT_STREAM: &str = "AUDIT";
/// Per-user quota counters (a counter stream, see [`quota`]).
pub const QUOTAS_STREAM: &str = "QUOTAS";
/// Receipt events on their way to the router (and the persister's
/// delivered watermarks): [`DELIVERED_RECEIPTS`], [`READ_RECEIPTS`].
pub const RECEIPTS_STREAM: &str = "RECEIPTS";
/// Thumbnail jobs, one per stored image (see [`thumb_job`]): a work queue
/// the persister's thumbnailer pulls.
pub const MEDIA_JOBS_STREAM: &str = "MEDIA_JOBS";

/// Subjects captured by the MESSAGES stream (PROTOCOL.md "Backend services").
pub const MESSAGES_SUBJECTS: [&str; 2] = ["chat.msg.dm.*.*", "chat.msg.group.*"];
pub const INBOX_SUBJECTS: [&str; 1] = ["chat.inbox.*"];
pub const PUSH_SUBJECTS: [&str; 1] = ["chat.push.*"];
pub const EVENTS_SUBJECTS: [&str; 1] = ["chat.event.group.*"];
/// `chat.dead.<consumer>`; `>` rather than `*` so a future consumer name
/// with a dot cannot fall outside the stream.
pub const DEADLETTER_SUBJECTS: [&str; 1] = ["chat.dead.>"];
pub const AUDIT_SUBJECTS: [&str; 1] = ["chat.audit.>"];
pub const QUOTAS_SUBJECTS: [&str; 1] = ["chat.quota.>"];
pub const RECEIPTS_SUBJECTS: [&str; 1] = ["chat.receipt.*"];
pub const MEDIA_JOBS_SUBJECTS: [&str; 1] = ["chat.media.thumb.*"];

pub const ROUTER_CONSUMER: &str = "router";
pub const ROUTER_EVENTS_CONSUMER: &str = "router-events";
pub const ROUTER_RECEIPTS_CONSUMER: &str = "router-receipts";
pub const PERSISTER_RECEIPTS_CONSUMER: &str = "persister-receipts";
pub const PERSISTER_CONSUMER: &str = "persister";
pub const PUSHD_CONSUMER: &str = "pushd";
/// The persister's consumer on [`MEDIA_JOBS_STREAM`]: every persister
/// process pulls from it, so the jobs are shared out like a queue group.
pub const THUMBNAILER_CONSUMER: &str = "thumbnailer";
/// The priority group whose pinned client is the one active router.
pub const ROUTER_PRIORITY_GROUP: &str = "router";

/// Queue group of the persister's request/reply service.
pub const PERSISTER_QUEUE: &str = "persister";

pub const NODES_BUCKET: &str = "chat_nodes";
pub const CURSORS_BUCKET: &str = "chat_cursors";
pub const SENT_BUCKET: &str = "chat_sent";
pub const PRESENCE_BUCKET: &str = "chat_presence";
pub const EDGES_BUCKET: &str = "chat_edges";
/// Leader leases of services that run hot standbys (presence).
pub const LEADERS_BUCKET: &str = "chat_leaders";
/// Bans and token revocations (see [`ban_key`], [`revoke_key`]).
pub const MODERATION_BUCKET: &str = "chat_moderation";
/// The devices of each user that hold a push token ([`crate::push::PushDevices`]).
pub const PUSH_DEVICES_BUCKET: &str = "chat_push_devices";
/// The object store of uploaded media (JetStream Object Store, stream
/// [`object_store_stream`]): each object named [`media_object`],
/// [`thumb_object`] or, while it is being written, [`upload_object`].
pub const MEDIA_BUCKET: &str = "chat_media";

/// The PostgreSQL shard map (`crate::shards`), one key.
pub const SHARDS_BUCKET: &str = "chat_shards";
/// The presence leader's key in [`LEADERS_BUCKET`].
pub const PRESENCE_LEADER_KEY: &str = "presence";

/// The batched direct get of a stream (ADR-31): any of its replicas answers,
/// and no consumer is created (see `direct`).
pub fn direct_get(stream: &str) -> String {
    format!("$JS.API.DIRECT.GET.{stream}")
}
/// On each message of a direct get: its stream sequence.
pub const DIRECT_SEQUENCE_HEADER: &str = "Nats-Sequence";
/// On each message of a batched direct get and on its end: how many
/// messages matching the request the stream holds after it.
pub const DIRECT_PENDING_HEADER: &str = "Nats-Num-Pending";
/// On each message of a direct get: the subject it was stored under.
pub const DIRECT_SUBJECT_HEADER: &str = "Nats-Subject";
/// On a KV entry that is a deletion (`DEL`) or purge (`PURGE`) marker.
pub const KV_OPERATION_HEADER: &str = "KV-Operation";
/// The stream behind an object store bucket.
pub fn object_store_stream(bucket: &str) -> String {
    format!("OBJ_{bucket}")
}

/// The object holding a media's bytes: its id (the bytes' SHA-256).
pub fn media_object(media: &MediaId) -> String {
    media.to_string()
}

/// The object holding an image's thumbnail.
pub fn thumb_object(media: &MediaId) -> String {
    format!("{media}.thumb")
}

/// The temporary object an upload is written to before its SHA-256 (and so
/// its name) is known; never a media id, so never served.
pub fn upload_object(nonce: u64) -> String {
    format!("upload.{nonce:016x}")
}

/// The object store metadata key holding a media object's content type.
pub const MEDIA_CONTENT_TYPE_KEY: &str = "content-type";

/// The thumbnail job of an image (stream [`MEDIA_JOBS_STREAM`]).
pub fn thumb_job(media: &MediaId) -> String {
    format!("chat.media.thumb.{media}")
}

/// The media of a thumbnail job's subject, if it is one.
pub fn parse_thumb_job(subject: &str) -> Option<MediaId> {
    MediaId::parse(subject.strip_prefix("chat.media.thumb.")?).ok()
}

/// The stream behind a KV bucket.
pub fn bucket_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// JetStream's de-duplication header; every event carries it.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// The inbox cursor of a live delivery, so edges can order it against a backlog
/// without parsing the frame.
pub const CURSOR_HEADER: &str = "Chat-Cursor";
/// On a live delivery: the cursor of the user's inbox item before it, as the
/// router appended them, or [`PREV_CURSOR_UNKNOWN`]. Live deliveries go over
/// core NATS and may be lost (a NATS node dies with one in flight); an edge
/// whose session has not sent up to this cursor missed one and reads the
/// inbox again. Absent when the router does not know (it just started).
pub const PREV_CURSOR_HEADER: &str = "Chat-Prev-Cursor";
/// [`PREV_CURSOR_HEADER`]'s value when an append for the user failed since
/// the last delivery: the failed item may still be stored (its PubAck was
/// lost, not its write), so the edge reads the inbox again before going on.
pub const PREV_CURSOR_UNKNOWN: &str = "unknown";
/// A message's trace id (`telemetry::TraceId`): set by the edge on the
/// MESSAGES publish, copied by the router onto inbox items and live
/// deliveries, logged by the router and the persister.
pub const TRACE_HEADER: &str = "Chat-Trace-Id";

/// Why an event was dead-lettered (`max deliveries: N`, or what made it
/// unprocessable).
pub const DEAD_REASON_HEADER: &str = "Chat-Dead-Reason";
/// The stream a dead letter was copied from.
pub const DEAD_STREAM_HEADER: &str = "Chat-Dead-Stream";
/// Its sequence in that stream.
pub const DEAD_SEQ_HEADER: &str = "Chat-Dead-Seq";
/// The subject it had there.
pub const DEAD_SUBJECT_HEADER: &str = "Chat-Dead-Subject";
/// How many times the consumer had been given it.
pub const DEAD_DELIVERIES_HEADER: &str = "Chat-Dead-Deliveries";
/// The original's `Nats-Msg-Id`, if it had one (the dead letter's own
/// `Nats-Msg-Id` is [`dead_letter_id`]), so a re-publish de-duplicates.
pub const DEAD_MSG_ID_HEADER: &str = "Chat-Dead-Msg-Id";

/// `chat.msg.dm.<a>.<b>` or `chat.msg.group.<group>`.
pub fn message(conversation: &ConversationId) -> String {
    match conversation {
        ConversationId::Dm { low, high } => format!("chat.msg.dm.{low}.{high}"),
        ConversationId::Group(group) => format!("chat.msg.group.{group}"),
    }
}

/// The conversation of a MESSAGES subject, if it is one.
pub fn parse_message(subject: &str) -> Option<ConversationId> {
    let rest = subject.strip_prefix("chat.msg.")?;
    if let Some(pair) = rest.strip_prefix("dm.") {
        let (a, b) = pair.split_once('.')?;
        ConversationId::parse(&format!("dm:{a}:{b}")).ok()
    } else {
        let group = rest.strip_prefix("group.")?;
        GroupId::parse(group).ok().map(ConversationId::Group)
    }
}

/// One user's durable inbox (stream INBOX); the sequence is the cursor.
pub fn inbox(user: &UserId) -> String {
    format!("chat.inbox.{user}")
}

/// Where an event of `conversation` is published: [`message`] itself when
/// MESSAGES is one stream; split, `chat.msg.<k>.dm.<a>.<b>` or
/// `chat.msg.<k>.group.<g>` (`partition` is the conversation's), which
/// `MESSAGES_<k>` captures and stores as [`message`] (see `partitions`).
pub fn message_in(conversation: &ConversationId, partition: Partition) -> String {
    if !partition.is_split() {
        return message(conversation);
    }
    match conversation {
        ConversationId::Dm { low, high } => format!("chat.msg.{partition}.dm.{low}.{high}"),
        ConversationId::Group(group) => format!("chat.msg.{partition}.group.{group}"),
    }
}

/// Where an item of `user`'s inbox is appended: [`inbox`] itself when
/// INBOX is one stream; split, `chat.inbox.<k>.<user>` (`partition` is the
/// user's), which `INBOX_<k>` captures and stores as [`inbox`].
pub fn inbox_in(user: &UserId, partition: Partition) -> String {
    if partition.is_split() {
        format!("chat.inbox.{partition}.{user}")
    } else {
        inbox(user)
    }
}

/// A subject transform of a partition's stream: what it captures (`src`)
/// is stored under `dest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transform {
    pub src: String,
    pub dest: String,
}

/// The subjects MESSAGES partition `partition` captures, and the transform
/// that stores them under [`MESSAGES_SUBJECTS`] (none on one stream).
pub fn messages_partition(partition: Partition) -> (Vec<String>, Option<Transform>) {
    partition_subjects(partition, "chat.msg", &MESSAGES_SUBJECTS)
}

/// The subjects INBOX partition `partition` captures, and the transform
/// that stores them under [`INBOX_SUBJECTS`] (none on one stream).
pub fn inbox_partition(partition: Partition) -> (Vec<String>, Option<Transform>) {
    partition_subjects(partition, "chat.inbox", &INBOX_SUBJECTS)
}

fn partition_subjects(
    partition: Partition,
    family: &str,
    plain: &[&str],
) -> (Vec<String>, Option<Transform>) {
    if !partition.is_split() {
        return (plain.iter().map(|s| s.to_string()).collect(), None);
    }
    let subjects = plain
        .iter()
        .filter_map(|s| s.strip_prefix(family))
        .map(|rest| format!("{family}.{partition}{rest}"))
        .collect();
    let transform = Transform {
        src: format!("{family}.{partition}.>"),
        dest: format!("{family}.>"),
    };
    (subjects, Some(transform))
}

/// Live deliveries for every connection of one user (core NATS).
pub fn deliver(user: &UserId) -> String {
    format!("chat.deliver.{user}")
}

/// Push jobs for one user (stream PUSH).
pub fn push(user: &UserId) -> String {
    format!("chat.push.{user}")
}

/// Public presence changes of one user (core NATS).
pub fn presence(user: &UserId) -> String {
    format!("chat.presence.{user}")
}

/// Membership changes of one group (stream EVENTS).
pub fn group_event(group: &GroupId) -> String {
    format!("chat.event.group.{group}")
}

/// The group of an EVENTS subject, if it is one.
pub fn parse_group_event(subject: &str) -> Option<GroupId> {
    GroupId::parse(subject.strip_prefix("chat.event.group.")?).ok()
}

/// The persister's request/reply service for one method.
pub fn rpc(method: &str) -> String {
    format!("chat.rpc.{method}")
}

/// An edge's device connects and disconnects (core NATS), for presence.
pub const EDGE_DEVICES: &str = "chat.edge.device";
/// An operator's request that one edge drain (`chatctl drain <edge>`); only
/// the admin user may publish it.
pub fn edge_drain(edge: &EdgeId) -> String {
    format!("chat.control.drain.{edge}")
}

/// Every edge's periodic list of its live devices (core NATS), for presence.
pub const EDGE_HEARTBEATS: &str = "chat.edge.heartbeat";

/// `typing` frames of one user, published by their edge (core NATS).
pub fn typing(user: &UserId) -> String {
    format!("chat.typing.{user}")
}

/// Every user's typing frames, for the presence service.
pub const ALL_TYPING: &str = "chat.typing.*";

/// The typing user of a [`typing`] subject, if it is one.
pub fn parse_typing(subject: &str) -> Option<UserId> {
    UserId::parse(subject.strip_prefix("chat.typing.")?).ok()
}

/// Friendship changes (core NATS), so presence drops its cached friend lists.
pub const FRIEND_CHANGES: &str = "chat.event.friend";

/// `blocker` blocked or unblocked `blocked` (core NATS, no body): every
/// block cache forgets both users (`crate::blocks`).
pub fn block_event(blocker: &UserId, blocked: &UserId) -> String {
    format!("chat.event.block.{blocker}.{blocked}")
}

/// Every block change, for the block caches.
pub const ALL_BLOCK_EVENTS: &str = "chat.event.block.*.*";

/// The two users of a [`block_event`] subject, if it is one.
pub fn parse_block_event(subject: &str) -> Option<[UserId; 2]> {
    let (blocker, blocked) = subject.strip_prefix("chat.event.block.")?.split_once('.')?;
    Some([UserId::parse(blocker).ok()?, UserId::parse(blocked).ok()?])
}

/// Key of a user's presence record in [`PRESENCE_BUCKET`].
pub fn presence_key(user: &UserId) -> String {
    format!("user.{user}")
}

/// The user of a [`presence_key`], if it is one.
pub fn parse_presence_key(key: &str) -> Option<UserId> {
    UserId::parse(key.strip_prefix("user.")?).ok()
}

/// Key of a user's ban in [`MODERATION_BUCKET`].
pub fn ban_key(user: &UserId) -> String {
    format!("ban.{user}")
}

/// Key of a user's token revocation in [`MODERATION_BUCKET`].
pub fn revoke_key(user: &UserId) -> String {
    format!("revoke.{user}")
}

/// A key of [`MODERATION_BUCKET`], parsed back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModerationKey {
    Ban(UserId),
    Revoke(UserId),
}

pub fn parse_moderation_key(key: &str) -> Option<ModerationKey> {
    if let Some(user) = key.strip_prefix("ban.") {
        return UserId::parse(user).ok().map(ModerationKey::Ban);
    }
    UserId::parse(key.strip_prefix("revoke.")?)
        .ok()
        .map(ModerationKey::Revoke)
}

/// An operator's kick, ban or revocation of one user (core NATS), which
/// every edge acts on (`shared::moderation::Notice`); only the admin user
/// may publish it.
pub fn moderation_notice(user: &UserId) -> String {
    format!("chat.mod.{user}")
}

/// Every [`moderation_notice`], for the edges.
pub const ALL_MODERATION_NOTICES: &str = "chat.mod.>";

/// The user of a [`moderation_notice`] subject, if it is one.
pub fn parse_moderation_notice(subject: &str) -> Option<UserId> {
    UserId::parse(subject.strip_prefix("chat.mod.")?).ok()
}

/// An operator action's audit event (stream AUDIT): `chat.audit.<action>`.
pub fn audit(action: crate::moderation::Action) -> String {
    format!("chat.audit.{}", action.as_str())
}

/// Every method of the persister's service.
pub const ALL_RPC: &str = "chat.rpc.*";

/// Delivered receipts reported by edges (stream RECEIPTS), fanned out by
/// the router and stored as watermarks by the persister.
pub const DELIVERED_RECEIPTS: &str = "chat.receipt.delivered";
/// Read receipts published by the persister once a read is stored (stream
/// RECEIPTS), fanned out by the router.
pub const READ_RECEIPTS: &str = "chat.receipt.read";

/// Where `consumer` puts the events it gave up on (stream DEADLETTER).
/// Consumer names are ours (the `*_CONSUMER` constants) or an operator's,
/// never a client's.
pub fn dead_letter(consumer: &str) -> String {
    format!("chat.dead.{consumer}")
}

/// Every max-deliveries advisory of the consumers on `stream`
/// (`$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`).
pub fn max_deliveries_advisories(stream: &str) -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.*")
}

/// The `Nats-Msg-Id` of a dead letter: the same event given up by the same
/// consumer is one dead letter, however many persisters copy it.
pub fn dead_letter_id(stream: &str, consumer: &str, sequence: u64) -> String {
    format!("dead:{stream}:{consumer}:{sequence}")
}

/// The `Nats-Msg-Id` of a client's send: retries of one `client_msg_id` collide.
pub fn send_dedup_id(sender: &UserId, client_msg_id: &ClientMsgId) -> String {
    format!("{sender}:{client_msg_id}")
}

/// The `Nats-Msg-Id` of a change of a message (v1.1): the same request
/// made again against the same state (`version`) is dropped by JetStream,
/// a later one (a reaction given again after being taken back) is not.
/// `detail` tells apart changes of one kind at one version (another
/// emoji, another text).
pub fn change_dedup_id(
    id: MessageId,
    version: u64,
    by: &UserId,
    kind: &str,
    detail: &str,
) -> String {
    format!("chg:{id}:{version}:{by}:{kind}:{detail}")
}

/// The `Nats-Msg-Id` of one inbox item, so a redelivered event is appended once.
pub fn inbox_dedup_id(event_id: &str, user: &UserId) -> String {
    format!("{event_id}:{user}")
}

/// The `Nats-Msg-Id` of a delivered-receipt report: the same report twice
/// (a retried flush) has the same id.
pub fn delivered_event_id(
    conversation: &ConversationId,
    user: &UserId,
    device: &DeviceId,
    up_to: MessageId,
) -> String {
    format!("delivered:{conversation}:{user}:{device}:{up_to}")
}

/// The `Nats-Msg-Id` of a read-receipt event: a retried `read` that finds
/// the same stored watermark publishes the same event.
pub fn read_event_id(conversation: &ConversationId, user: &UserId, up_to: MessageId) -> String {
    format!("read:{conversation}:{user}:{up_to}")
}

/// The event id of a coalesced receipt's inbox items (see
/// [`inbox_dedup_id`]): a window routed again after a router restart
/// appends nothing twice.
pub fn receipt_item_id(
    kind: ReceiptKind,
    conversation: &ConversationId,
    user: &UserId,
    up_to: MessageId,
) -> String {
    let kind = match kind {
        ReceiptKind::Delivered => "delivered",
        ReceiptKind::Read => "read",
    };
    format!("receipt:{kind}:{conversation}:{user}:{up_to}")
}

/// The `Nats-Msg-Id` of a public presence event.
pub fn presence_event_id(user: &UserId, status: PresenceStatus, last_active: u64) -> String {
    let status = match status {
        PresenceStatus::Online => "online",
        PresenceStatus::Offline => "offline",
    };
    format!("presence:{user}:{status}:{last_active}")
}

/// The `Nats-Msg-Id` of the push job for `user` about message `event_id`.
pub fn push_dedup_id(event_id: &str, user: &UserId) -> String {
    format!("push:{event_id}:{user}")
}

/// The `Nats-Msg-Id` of a retraction for `user` (a repeated read or delete
/// of the same message makes no second one).
pub fn retract_dedup_id(
    reason: crate::push::RetractReason,
    conversation: &ConversationId,
    up_to: MessageId,
    user: &UserId,
) -> String {
    format!("retract:{}:{conversation}:{up_to}:{user}", reason.as_str())
}

/// Key of a user's [`crate::push::PushDevices`] in [`PUSH_DEVICES_BUCKET`].
pub fn push_devices_key(user: &UserId) -> String {
    format!("user.{user}")
}

/// The counter of one user's quota `kind` (`messages`, `bytes`, …) in one
/// window (`m<minute>` or `d<day>` since the epoch): a fresh subject per
/// window, so a window's count starts at zero and ages out with the stream.
pub fn quota(user: &UserId, kind: &str, window: &str) -> String {
    format!("chat.quota.{user}.{kind}.{window}")
}

/// Key of a device's acked cursor in [`CURSORS_BUCKET`].
pub fn device_cursor_key(user: &UserId, device: &DeviceId) -> String {
    format!("{user}.{device}")
}

/// Key of a send claim in [`SENT_BUCKET`]; the client id is hex-encoded since
/// it may hold any printable character.
pub fn sent_key(sender: &UserId, client_msg_id: &ClientMsgId) -> String {
    format!("{sender}.{}", client_msg_id.hex())
}

/// Key of a batch of send claims in [`SENT_BUCKET`] (one per connection
/// that had some to write; `nonce` keeps connections apart). Three tokens,
/// so it never reads as a [`sent_key`].
pub fn sent_batch_key(sender: &UserId, nonce: u64) -> String {
    format!("{sender}.batch.{nonce:016x}")
}

/// Every claim of `sender`, either form, as a subject of the bucket's stream.
pub fn sent_claims(sender: &UserId) -> String {
    format!("$KV.{SENT_BUCKET}.{sender}.>")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn rendered_subjects_are_pinned() {
        let alice = user("alice");
        let dm = ConversationId::dm(user("bob"), alice.clone()).unwrap();
        let group = ConversationId::Group(GroupId::parse("team").unwrap());
        assert_eq!(message(&dm), "chat.msg.dm.alice.bob");
        assert_eq!(message(&group), "chat.msg.group.team");
        assert_eq!(direct_get(INBOX_STREAM), "$JS.API.DIRECT.GET.INBOX");
        assert_eq!(inbox(&alice), "chat.inbox.alice");
        assert_eq!(deliver(&alice), "chat.deliver.alice");
        assert_eq!(push(&alice), "chat.push.alice");
        assert_eq!(presence_key(&alice), "user.alice");
        assert_eq!(push_devices_key(&alice), "user.alice");
        assert_eq!(
            retract_dedup_id(crate::push::RetractReason::Read, &dm, MessageId(7), &alice),
            "retract:read:dm:alice:bob:7:alice"
        );
        assert_eq!(
            parse_presence_key(&presence_key(&alice)),
            Some(alice.clone())
        );
        assert_eq!(parse_presence_key("leader"), None);
        assert_eq!(presence(&alice), "chat.presence.alice");
        assert_eq!(
            group_event(&GroupId::parse("team").unwrap()),
            "chat.event.group.team"
        );
        assert_eq!(rpc("history"), "chat.rpc.history");
        let cmid = ClientMsgId::parse("m.1").unwrap();
        assert_eq!(send_dedup_id(&alice, &cmid), "alice:m.1");
        assert_eq!(
            change_dedup_id(MessageId(7), 2, &alice, "reaction", "f09f918d:true"),
            "chg:7:2:alice:reaction:f09f918d:true"
        );
        assert_eq!(sent_key(&alice, &cmid), "alice.6d2e31");
        assert_eq!(sent_batch_key(&alice, 255), "alice.batch.00000000000000ff");
        assert_eq!(sent_claims(&alice), "$KV.chat_sent.alice.>");
        assert_eq!(bucket_stream(SENT_BUCKET), "KV_chat_sent");
        assert_eq!(inbox_dedup_id("42", &alice), "42:alice");
        let phone = DeviceId::parse("phone").unwrap();
        assert_eq!(
            delivered_event_id(&dm, &alice, &phone, MessageId(7)),
            "delivered:dm:alice:bob:alice:phone:7"
        );
        assert_eq!(
            read_event_id(&group, &alice, MessageId(7)),
            "read:group:team:alice:7"
        );
        assert_eq!(
            receipt_item_id(ReceiptKind::Read, &group, &alice, MessageId(7)),
            "receipt:read:group:team:alice:7"
        );
        assert_eq!(RECEIPTS_SUBJECTS, ["chat.receipt.*"]);
        assert_eq!(DELIVERED_RECEIPTS, "chat.receipt.delivered");
        assert_eq!(READ_RECEIPTS, "chat.receipt.read");
        assert_eq!(
            quota(&alice, "messages", "d20424"),
            "chat.quota.alice.messages.d20424"
        );
        assert_eq!(dead_letter(PERSISTER_CONSUMER), "chat.dead.persister");
        assert_eq!(
            dead_letter_id(MESSAGES_STREAM, PERSISTER_CONSUMER, 7),
            "dead:MESSAGES:persister:7"
        );
        assert_eq!(
            max_deliveries_advisories(MESSAGES_STREAM),
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.MESSAGES.*"
        );
        assert_eq!(
            device_cursor_key(&alice, &DeviceId::parse("phone").unwrap()),
            "alice.phone"
        );
        assert_eq!(ban_key(&alice), "ban.alice");
        assert_eq!(revoke_key(&alice), "revoke.alice");
        assert_eq!(moderation_notice(&alice), "chat.mod.alice");
        assert_eq!(audit(crate::moderation::Action::Unban), "chat.audit.unban");
    }

    #[test]
    fn moderation_keys_and_notices_parse_back() {
        let alice = user("alice");
        assert_eq!(
            parse_moderation_key(&ban_key(&alice)),
            Some(ModerationKey::Ban(alice.clone()))
        );
        assert_eq!(
            parse_moderation_key(&revoke_key(&alice)),
            Some(ModerationKey::Revoke(alice.clone()))
        );
        for bad in ["alice", "ban.", "ban.a.b", "kick.alice", "revoke"] {
            assert_eq!(parse_moderation_key(bad), None, "{bad}");
        }
        assert_eq!(
            parse_moderation_notice(&moderation_notice(&alice)),
            Some(alice)
        );
        assert_eq!(parse_moderation_notice("chat.mod.a.b"), None);
        assert_eq!(parse_moderation_notice("chat.deliver.a"), None);
    }

    #[test]
    fn block_events_name_both_users_and_parse_back() {
        let (alice, bob) = (user("alice"), user("bob"));
        assert_eq!(block_event(&alice, &bob), "chat.event.block.alice.bob");
        assert_eq!(
            parse_block_event(&block_event(&alice, &bob)),
            Some([alice, bob])
        );
        for bad in [
            "chat.event.block.a",
            "chat.event.block.a.b.c",
            "chat.event.group.g",
        ] {
            assert_eq!(parse_block_event(bad), None, "{bad}");
        }
    }

    #[test]
    fn message_subjects_parse_back() {
        let dm = ConversationId::parse("dm:alice:bob").unwrap();
        assert_eq!(parse_message(&message(&dm)), Some(dm));
        let group = ConversationId::parse("group:g1").unwrap();
        assert_eq!(parse_message(&message(&group)), Some(group));
        for bad in [
            "chat.msg.dm.bob.alice",
            "chat.msg.dm.a",
            "chat.inbox.a",
            "chat.msg.group.",
            "x",
        ] {
            assert_eq!(parse_message(bad), None, "{bad}");
        }
    }

    #[test]
    fn partitioned_subjects_carry_the_index_and_are_stored_plain() {
        let three = crate::partitions::Partitions::new(3).unwrap();
        let one = crate::partitions::Partitions::default();
        let dm = ConversationId::parse("dm:alice:bob").unwrap();
        let p = three.of_conversation(&dm);
        assert_eq!(message_in(&dm, p), format!("chat.msg.{p}.dm.alice.bob"));
        assert_eq!(message_in(&dm, one.of_conversation(&dm)), message(&dm));
        let (captured, transform) = messages_partition(p);
        assert_eq!(
            captured,
            [
                format!("chat.msg.{p}.dm.*.*"),
                format!("chat.msg.{p}.group.*")
            ]
        );
        assert_eq!(
            transform,
            Some(Transform {
                src: format!("chat.msg.{p}.>"),
                dest: "chat.msg.>".into()
            })
        );
        let bob = user("bob");
        let q = three.of_user(&bob);
        assert_eq!(inbox_in(&bob, q), format!("chat.inbox.{q}.bob"));
        assert_eq!(inbox_partition(q).0, [format!("chat.inbox.{q}.*")]);
        assert_eq!(
            inbox_partition(one.of_user(&bob)),
            (vec!["chat.inbox.*".to_string()], None)
        );
    }

    #[test]
    fn group_event_subjects_parse_back() {
        let group = GroupId::parse("g1").unwrap();
        assert_eq!(parse_group_event(&group_event(&group)), Some(group));
        assert_eq!(parse_group_event("chat.event.group.a.b"), None);
        assert_eq!(parse_group_event("chat.msg.group.g1"), None);
    }

    #[test]
    fn stream_subjects_cover_the_builders() {
        // Each builder's output must match its stream's wildcard, token for token.
        fn matches(pattern: &str, subject: &str) -> bool {
            let (p, s): (Vec<_>, Vec<_>) =
                (pattern.split('.').collect(), subject.split('.').collect());
            p.len() == s.len() && p.iter().zip(&s).all(|(p, s)| *p == "*" || p == s)
        }
        let dm = ConversationId::parse("dm:a:b").unwrap();
        let group = ConversationId::parse("group:g").unwrap();
        assert!(MESSAGES_SUBJECTS.iter().any(|p| matches(p, &message(&dm))));
        assert!(MESSAGES_SUBJECTS
            .iter()
            .any(|p| matches(p, &message(&group))));
        assert!(matches(INBOX_SUBJECTS[0], &inbox(&user("a"))));
        let partitions = crate::partitions::Partitions::new(3).unwrap();
        for conversation in [&dm, &group] {
            let partition = partitions.of_conversation(conversation);
            let (captured, _) = messages_partition(partition);
            let subject = message_in(conversation, partition);
            assert!(captured.iter().any(|p| matches(p, &subject)), "{subject}");
        }
        let partition = partitions.of_user(&user("a"));
        let (captured, _) = inbox_partition(partition);
        assert!(matches(&captured[0], &inbox_in(&user("a"), partition)));
        assert!(matches(PUSH_SUBJECTS[0], &push(&user("a"))));
        assert!(matches(
            EVENTS_SUBJECTS[0],
            &group_event(&GroupId::parse("g").unwrap())
        ));
        assert!(matches(ALL_RPC, &rpc("history")));
        assert!(
            moderation_notice(&user("a")).starts_with(ALL_MODERATION_NOTICES.trim_end_matches('>'))
        );
        assert!(audit(crate::moderation::Action::Ban)
            .starts_with(AUDIT_SUBJECTS[0].trim_end_matches('>')));
        for consumer in [
            ROUTER_CONSUMER,
            ROUTER_EVENTS_CONSUMER,
            PERSISTER_CONSUMER,
            PUSHD_CONSUMER,
        ] {
            assert!(dead_letter(consumer).starts_with("chat.dead."));
            assert!(!consumer.contains(['.', '*', '>', ' ']), "{consumer}");
        }
    }
}
