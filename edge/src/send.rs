//! `send`: check, publish to MESSAGES, answer `sent` only after
//! JetStream's PubAck (the message is durable). One JetStream write per send.
//!
//! Idempotency: JetStream drops a second publish with the same `Nats-Msg-Id`
//! (`<sender>:<client_msg_id>`) within its duplicate window and names the
//! stored copy, which is read back for its id (and refused as `bad_request`
//! if it was another conversation or text). Beyond the window the sender's
//! claims (`claims`, written lazily: only for sends whose answer the client
//! may have missed) name the id an earlier attempt used: a retry reuses it,
//! and past the window first reads the conversation's MESSAGES around that
//! id's time: found, it is a duplicate; not found (the first attempt never
//! got through), it is published now. PostgreSQL's unique (sender,
//! client_msg_id) is the last net for history.

use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::HeaderMap;
use chat_shared::consume::Scan;
use chat_shared::idgen::timestamp_ms;
use chat_shared::ids::{ConversationId, UserId};
use chat_shared::rpc::RpcError;
use chat_shared::subjects;
use chat_shared::telemetry::TraceId;
use chat_shared::wire::{
    Attachment, ErrorCode, MessageEvent, SendRequest, ServerFrame, MAX_ATTACHMENTS,
    MAX_ATTACHMENT_NAME_CHARS, MAX_MENTIONS,
};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::claims::{Claim, SenderClaims};
use crate::quota::{json_bytes, Kind, QuotaError};
use crate::session::Outbox;
use crate::Edge;

/// Sends of one connection waiting their turn. They are handled one at a time
/// so one sender's messages reach MESSAGES in the order they were sent.
pub const SEND_QUEUE: usize = 64;
/// The longest text, in Unicode characters.
pub const MAX_TEXT_CHARS: usize = 100_000;

pub async fn send_worker(
    edge: Arc<Edge>,
    user: UserId,
    out: Outbox,
    mut requests: mpsc::Receiver<Box<SendRequest>>,
) {
    let mut claims = SenderClaims::new(user.clone(), &edge.config);
    loop {
        // The session holds the queue's sender while its connection is open
        // and drops it as the connection ends: open now, the sends answered
        // long enough ago were read.
        let open = !requests.is_closed();
        if open {
            claims.still_open();
        }
        let Some(request) = requests.recv().await else {
            if open {
                // It closed while this worker waited: open until now.
                claims.still_open();
            }
            break;
        };
        let request = *request;
        let started = Instant::now();
        let reference = request.reference.clone();
        let reply = match accept(&edge, &mut claims, &user, request).await {
            Ok(sent) => sent,
            Err(e) => e.frame(reference.as_deref()),
        };
        edge.metrics.send_answered(started.elapsed());
        let answered = out.frame(&reply).await;
        claims.write_unsure(&edge).await;
        if !answered {
            break;
        }
    }
    claims.finish(&edge).await;
}

/// Why a send was not accepted. [`SendError::frame`] is the one place a
/// refusal becomes what the client reads; the texts are written for it.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("text must not be empty")]
    EmptyText,
    #[error("text is longer than {MAX_TEXT_CHARS} characters")]
    TextTooLong,
    /// PostgreSQL's text type cannot hold NUL.
    #[error("text must not contain NUL characters")]
    NulInText,
    #[error("give exactly one of `to` and `conversation`")]
    Addressing,
    #[error("you cannot send a direct message to yourself")]
    DmToSelf,
    #[error("you are not part of this conversation")]
    NotInConversation,
    #[error("you are not a member of this group")]
    NotInGroup,
    /// v1.1: a block stands between the two users of a DM (either way).
    #[error("a block stands between you and this user")]
    Blocked,
    /// The group's members (or a DM's blocks) could not be read (the
    /// persister's answer).
    #[error("{}", .0.message)]
    Members(RpcError),
    #[error("at most {MAX_MENTIONS} mentions")]
    TooManyMentions,
    #[error("at most {MAX_ATTACHMENTS} attachments")]
    TooManyAttachments,
    #[error("an attachment name must be 1..={MAX_ATTACHMENT_NAME_CHARS} characters without control characters")]
    AttachmentName,
    /// Not the sender's upload nor one they can see in a conversation
    /// (or no such media: which, is not told).
    #[error("no such media: {0}")]
    UnknownMedia(chat_shared::ids::MediaId),
    /// The persister could not say who may use the media.
    #[error("{}", .0.message)]
    Media(RpcError),
    #[error("client_msg_id was already used for another message; use a new one")]
    Reused,
    #[error("message store unavailable, retry later; nothing was accepted")]
    Unavailable,
    /// The PubAck may have been lost rather than the publish.
    #[error("timed out; the message may or may not be stored: retry with the same client_msg_id")]
    TimedOut,
    #[error(transparent)]
    Quota(#[from] QuotaError),
}

impl SendError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::EmptyText
            | Self::NulInText
            | Self::Addressing
            | Self::DmToSelf
            | Self::TooManyMentions
            | Self::TooManyAttachments
            | Self::AttachmentName
            | Self::Reused => ErrorCode::BadRequest,
            Self::UnknownMedia(_) => ErrorCode::NotFound,
            Self::Media(e) => e.code,
            Self::TextTooLong => ErrorCode::TooLarge,
            Self::NotInConversation | Self::NotInGroup | Self::Blocked => ErrorCode::Forbidden,
            Self::Members(e) => e.code,
            Self::Unavailable | Self::TimedOut => ErrorCode::Unavailable,
            Self::Quota(e) => e.code(),
        }
    }

    /// The error frame answering a refused send.
    pub fn frame(&self, reference: Option<&str>) -> ServerFrame {
        match self {
            // Quotas add `retry_after_ms`.
            Self::Quota(e) => e.frame(reference),
            _ => ServerFrame::error(reference, self.code(), self.to_string()),
        }
    }
}

/// Checks a send before it is queued, so one that can never be accepted
/// costs no place in the queue: its text (which may be empty when it
/// carries attachments), its mentions and its attachments' shape.
pub fn validate_send(request: &SendRequest) -> Result<(), SendError> {
    if request.mentions.len() > MAX_MENTIONS {
        return Err(SendError::TooManyMentions);
    }
    if request.attachments.len() > MAX_ATTACHMENTS {
        return Err(SendError::TooManyAttachments);
    }
    for name in request.attachments.iter().filter_map(|a| a.name.as_deref()) {
        let chars = name.chars().count();
        if chars == 0 || chars > MAX_ATTACHMENT_NAME_CHARS || name.chars().any(char::is_control) {
            return Err(SendError::AttachmentName);
        }
    }
    if request.text.is_empty() && !request.attachments.is_empty() {
        return Ok(());
    }
    validate_text(&request.text)
}

/// Checks a text (of a send or an edit).
pub fn validate_text(text: &str) -> Result<(), SendError> {
    let chars = text.chars().count();
    if chars == 0 {
        return Err(SendError::EmptyText);
    }
    if chars > MAX_TEXT_CHARS {
        return Err(SendError::TextTooLong);
    }
    if text.contains('\0') {
        return Err(SendError::NulInText);
    }
    Ok(())
}

async fn accept(
    edge: &Edge,
    claims: &mut SenderClaims,
    user: &UserId,
    request: SendRequest,
) -> Result<ServerFrame, SendError> {
    // The session checked it before queueing; a send that reaches the
    // worker some other way must not skip it.
    validate_send(&request)?;
    let conversation = match (request.to, request.conversation) {
        (Some(to), None) => {
            ConversationId::dm(user.clone(), to).map_err(|_| SendError::DmToSelf)?
        }
        (None, Some(conversation)) => conversation,
        _ => return Err(SendError::Addressing),
    };
    if edge.nats.connection_state() != async_nats::connection::State::Connected {
        return Err(SendError::Unavailable);
    }
    let attachments = attachments(edge, user, request.attachments).await?;
    // What the message weighs: its text and its attachments' metadata.
    let bytes = json_bytes(&request.text)
        + attachments
            .iter()
            .map(|a| serde_json::to_vec(a).map_or(0, |json| json.len() as u64))
            .sum::<u64>();
    // Before anything is stored: a refused send leaves no trace.
    admit(edge, user, &conversation, bytes).await?;
    let id = edge.ids.next_id().map_err(|e| {
        tracing::error!(error = %e, "cannot assign a message id");
        SendError::Unavailable
    })?;
    let mut event = MessageEvent::sent(
        id,
        conversation,
        user.clone(),
        request.text,
        timestamp_ms(id),
        request.client_msg_id,
    );
    event.reply_to = request.reply_to;
    event.mentions = request.mentions;
    event.attachments = attachments;
    let trace = TraceId::random();
    let publish = publish(edge, claims, event, trace)
        .instrument(tracing::info_span!("send", trace_id = %trace));
    match tokio::time::timeout(edge.config.request_timeout, publish).await {
        Ok(Ok((event, duplicate))) => {
            claims.answered(&event);
            Ok(ServerFrame::Sent {
                reference: request.reference,
                id: event.id,
                conversation: event.conversation,
                ts: event.ts,
                duplicate,
            })
        }
        Ok(Err(refusal)) => Err(refusal),
        // Let the client's retry (same client_msg_id) settle it; the
        // attempt stays in `claims` as one whose outcome is unknown.
        Err(_) => Err(SendError::TimedOut),
    }
}

/// The attachments of a send, filled in from the media's metadata; each
/// media must be one `user` may see (their upload, or one in a
/// conversation they are in), asked of the persister now.
async fn attachments(
    edge: &Edge,
    user: &UserId,
    wanted: Vec<chat_shared::wire::AttachmentRef>,
) -> Result<Vec<Attachment>, SendError> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let ids = wanted.iter().map(|a| a.media.clone()).collect();
    let visible = crate::media::visible(edge, user, ids)
        .await
        .map_err(SendError::Media)?;
    wanted
        .into_iter()
        .map(|a| match visible.iter().find(|v| v.media == a.media) {
            Some(info) => Ok(info.attachment(a.name)),
            None => Err(SendError::UnknownMedia(a.media)),
        })
        .collect()
}

/// Whether `user` may write into `conversation` (typing): a member, and no
/// block across a DM.
pub(crate) async fn check_may_write(
    edge: &Edge,
    user: &UserId,
    conversation: &ConversationId,
) -> Result<(), SendError> {
    recipients(edge, user, conversation).await.map(|_| ())
}

/// Whether `user` may write `bytes` into `conversation` now (a message, or
/// a change of one, which reaches the same inboxes): a member, no block
/// across a DM, and within the quotas, which it spends.
pub(crate) async fn admit(
    edge: &Edge,
    user: &UserId,
    conversation: &ConversationId,
    bytes: u64,
) -> Result<(), SendError> {
    let recipients = recipients(edge, user, conversation).await?;
    edge.quotas
        .spend(
            user,
            &[
                (Kind::MessagesPerMinute, 1),
                (Kind::MessagesPerDay, 1),
                (Kind::BytesPerMinute, bytes),
                (Kind::BytesPerDay, bytes),
                (Kind::FanoutBytesPerMinute, bytes.saturating_mul(recipients)),
            ],
        )
        .await?;
    Ok(())
}

/// How many inboxes a message of `user` in `conversation` lands in, if
/// `user` may write there.
async fn recipients(
    edge: &Edge,
    user: &UserId,
    conversation: &ConversationId,
) -> Result<u64, SendError> {
    match conversation {
        ConversationId::Dm { low, high } if conversation.is_dm_party(user) => {
            // From the block cache: no request in the steady state.
            let other = if low == user { high } else { low };
            if edge
                .blocks
                .between(user, other)
                .await
                .map_err(SendError::Members)?
            {
                return Err(SendError::Blocked);
            }
            Ok(2)
        }
        ConversationId::Dm { .. } => Err(SendError::NotInConversation),
        ConversationId::Group(group) => {
            let members = edge
                .groups
                .members(group)
                .await
                .map_err(SendError::Members)?;
            if members.contains(user) {
                Ok(members.len() as u64)
            } else {
                Err(SendError::NotInGroup)
            }
        }
    }
}

/// Publishes `event` (under the id an earlier attempt claimed, if any).
/// Returns the stored event and whether it was stored before. `trace` goes
/// along in a header.
async fn publish(
    edge: &Edge,
    claims: &mut SenderClaims,
    mut event: MessageEvent,
    trace: TraceId,
) -> Result<(MessageEvent, bool), SendError> {
    let digest = Claim::digest(&event);
    let claimed = match claims.find(&edge.sent, &event.client_msg_id).await {
        Ok(claimed) if claimed.iter().any(|claim| !claim.allows(&digest)) => {
            return Err(SendError::Reused)
        }
        Ok(claimed) => claimed,
        Err(e) => {
            // Unreadable claims must not stop sends: a retry is still
            // recognised within JetStream's window.
            tracing::warn!(error = %e, "send claims unreadable; sending without them");
            Vec::new()
        }
    };
    if let Some(first) = claimed.iter().map(|claim| claim.id).min() {
        // The timestamp is the id's: a retry that reuses the id reproduces it.
        let age_ms = event.ts.saturating_sub(timestamp_ms(first));
        event.id = first;
        event.ts = timestamp_ms(first);
        // Past JetStream's window a republish would be stored twice if an
        // earlier attempt got through; look for it instead (rare: a retry
        // minutes after the first try).
        if age_ms > edge.config.dedup_window.as_millis() as u64 * 9 / 10 {
            let last = claimed.iter().map(|claim| claim.id).max().unwrap_or(first);
            if let Some(stored) = find_published(edge, &event, timestamp_ms(last)).await? {
                if Claim::digest(&stored) != digest {
                    return Err(SendError::Reused);
                }
                return Ok((stored, true));
            }
        }
    }
    let mut headers = HeaderMap::new();
    headers.insert(
        subjects::MSG_ID_HEADER,
        subjects::send_dedup_id(&event.from, &event.client_msg_id).as_str(),
    );
    trace.add_to(&mut headers);
    let body = serde_json::to_vec(&event).map_err(|_| SendError::Unavailable)?;
    claims.trying(&event);
    let ack = edge
        .js
        .publish_with_headers(
            subjects::message_in(
                &event.conversation,
                edge.messages_of(&event.conversation).partition,
            ),
            headers,
            body.into(),
        )
        .await
        .map_err(|_| SendError::Unavailable)?
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "publish not acknowledged");
            SendError::Unavailable
        })?;
    if ack.duplicate {
        // JetStream kept an earlier attempt, under the id that attempt
        // chose (ours only if it was claimed): answer with that one.
        claims.settled();
        let original = edge
            .messages_of(&event.conversation)
            .messages
            .direct_get(ack.sequence)
            .await
            .map_err(|_| SendError::Unavailable)?;
        let original: MessageEvent =
            serde_json::from_slice(&original.payload).map_err(|_| SendError::Unavailable)?;
        if Claim::digest(&original) != digest {
            return Err(SendError::Reused);
        }
        return Ok((original, true));
    }
    // Stored now for the first time (also when an earlier attempt claimed
    // the id but never got to publish).
    Ok((event, false))
}

/// The earlier attempt of `event` (same sender and `client_msg_id`) that
/// MESSAGES holds, if any. An attempt is published within the request
/// timeout after its id was made, so only the conversation's subject from
/// the first claimed id's time (`event.ts`) to the last one's
/// (`last_ms`) plus that timeout is read.
async fn find_published(
    edge: &Edge,
    event: &MessageEvent,
    last_ms: u64,
) -> Result<Option<MessageEvent>, SendError> {
    const SLACK_MS: u64 = 5_000;
    let claimed_at_ns = i128::from(event.ts.saturating_sub(SLACK_MS)) * 1_000_000;
    let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(claimed_at_ns)
        .map_err(|_| SendError::Unavailable)?;
    let window_end_ms = last_ms + edge.config.request_timeout.as_millis() as u64 + SLACK_MS;
    let mut scan = Scan::open(
        &edge.messages_of(&event.conversation).messages,
        subjects::message(&event.conversation),
        DeliverPolicy::ByStartTime { start_time },
    )
    .await
    .map_err(|_| SendError::Unavailable)?;
    let found = async {
        while let Some(message) = scan.next().await.map_err(|_| SendError::Unavailable)? {
            if let Ok(stored) = serde_json::from_slice::<MessageEvent>(&message.payload) {
                if stored.from == event.from && stored.client_msg_id == event.client_msg_id {
                    return Ok(Some(stored));
                }
            }
            let published_ms = message
                .info()
                .map(|i| (i.published.unix_timestamp_nanos() / 1_000_000) as u64)
                .unwrap_or(u64::MAX);
            if published_ms > window_end_ms {
                break;
            }
        }
        Ok(None)
    }
    .await;
    scan.close().await;
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_checked_before_queueing() {
        let code = |text: &str| validate_text(text).map_err(|e| e.code());
        assert_eq!(code("hi"), Ok(()));
        assert_eq!(code(""), Err(ErrorCode::BadRequest));
        assert_eq!(code(&"x".repeat(MAX_TEXT_CHARS)), Ok(()));
        assert_eq!(
            code(&"x".repeat(MAX_TEXT_CHARS + 1)),
            Err(ErrorCode::TooLarge)
        );
        assert_eq!(code("a\0b"), Err(ErrorCode::BadRequest));
    }
}
