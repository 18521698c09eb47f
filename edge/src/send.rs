//! `send`: check, claim the client's id, publish to MESSAGES, answer `sent`
//! only after JetStream's PubAck (the message is durable).
//!
//! Idempotency has two layers. JetStream drops a second publish with the same
//! `Nats-Msg-Id` within its duplicate window. Beyond the window, the claim in
//! the `chat_sent` KV bucket (key sender + client_msg_id, created before the
//! first publish) remembers the id for days: a retry reuses it. A retry that
//! comes after the window reads the conversation's MESSAGES around the claim's
//! time: found, it is a duplicate; not found (the first attempt died between
//! claim and PubAck), it is published now. PostgreSQL's unique (sender,
//! client_msg_id) is the last net for history.
//!
//! A claim also holds a digest of the conversation and text, so a request
//! that reuses a `client_msg_id` for another message is refused
//! (`bad_request`) instead of being answered as a duplicate of the first.

use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::kv;
use async_nats::HeaderMap;
use chat_shared::consume::Scan;
use chat_shared::idgen::timestamp_ms;
use chat_shared::ids::{ConversationId, MessageId, UserId};
use chat_shared::rpc::RpcError;
use chat_shared::subjects;
use chat_shared::telemetry::TraceId;
use chat_shared::wire::{ErrorCode, MessageEvent, SendRequest, ServerFrame};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::Instrument;

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
    while let Some(request) = requests.recv().await {
        let request = *request;
        let started = Instant::now();
        let reference = request.reference.clone();
        let reply = match accept(&edge, &user, request).await {
            Ok(sent) => sent,
            Err(e) => e.frame(reference.as_deref()),
        };
        edge.metrics.send_answered(started.elapsed());
        if !out.frame(&reply).await {
            break;
        }
    }
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
    /// The group's members could not be read (the persister's answer).
    #[error("{}", .0.message)]
    Members(RpcError),
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
            | Self::Reused => ErrorCode::BadRequest,
            Self::TextTooLong => ErrorCode::TooLarge,
            Self::NotInConversation | Self::NotInGroup => ErrorCode::Forbidden,
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

/// Checks a text before its send is queued, so a text that can never be
/// accepted costs no place in the queue.
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

/// [`validate_text`] as the session calls it today (it destructures a
/// code and a message); goes once the session matches [`SendError`].
pub fn check_text(text: &str) -> Result<(), (ErrorCode, String)> {
    validate_text(text).map_err(|e| (e.code(), e.to_string()))
}

async fn accept(
    edge: &Edge,
    user: &UserId,
    request: SendRequest,
) -> Result<ServerFrame, SendError> {
    let conversation = match (request.to, request.conversation) {
        (Some(to), None) => {
            ConversationId::dm(user.clone(), to).map_err(|_| SendError::DmToSelf)?
        }
        (None, Some(conversation)) => conversation,
        _ => return Err(SendError::Addressing),
    };
    // The session checked it before queueing; a send that reaches the
    // worker some other way must not skip it.
    validate_text(&request.text)?;
    let recipients = recipients(edge, user, &conversation).await?;
    if edge.nats.connection_state() != async_nats::connection::State::Connected {
        return Err(SendError::Unavailable);
    }
    // Before anything is stored: a refused send leaves no trace.
    let bytes = json_bytes(&request.text);
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
    let event = MessageEvent {
        id: MessageId(0),
        conversation,
        from: user.clone(),
        text: request.text,
        ts: 0,
        client_msg_id: request.client_msg_id,
    };
    let trace = TraceId::random();
    let publish =
        publish(edge, event, trace).instrument(tracing::info_span!("send", trace_id = %trace));
    match tokio::time::timeout(edge.config.request_timeout, publish).await {
        Ok(Ok((event, duplicate))) => Ok(ServerFrame::Sent {
            reference: request.reference,
            id: event.id,
            conversation: event.conversation,
            ts: event.ts,
            duplicate,
        }),
        Ok(Err(refusal)) => Err(refusal),
        // Let the client's retry (same client_msg_id) settle it.
        Err(_) => Err(SendError::TimedOut),
    }
}

pub(crate) async fn check_may_write(
    edge: &Edge,
    user: &UserId,
    conversation: &ConversationId,
) -> Result<(), SendError> {
    recipients(edge, user, conversation).await.map(|_| ())
}

/// How many inboxes a message of `user` in `conversation` lands in, if
/// `user` may write there.
async fn recipients(
    edge: &Edge,
    user: &UserId,
    conversation: &ConversationId,
) -> Result<u64, SendError> {
    match conversation {
        ConversationId::Dm { .. } if conversation.is_dm_party(user) => Ok(2),
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

/// Claims the client id, then publishes. Returns the stored event and
/// whether it was stored before. `trace` goes along in a header.
async fn publish(
    edge: &Edge,
    mut event: MessageEvent,
    trace: TraceId,
) -> Result<(MessageEvent, bool), SendError> {
    let claim_key = subjects::sent_key(&event.from, &event.client_msg_id);
    let fresh = edge.ids.next_id().map_err(|e| {
        tracing::error!(error = %e, "cannot assign a message id");
        SendError::Unavailable
    })?;
    let digest = Claim::digest(&event);
    let claim = Claim {
        id: fresh,
        digest: Some(digest.clone()),
    };
    let claimed = match edge.claims.create(&claim_key, claim.encode().into()).await {
        Ok(_) => None,
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            let entry = edge
                .claims
                .get(&claim_key)
                .await
                .map_err(|_| SendError::Unavailable)?;
            match entry.and_then(|v| Claim::decode(&v)) {
                Some(Claim {
                    digest: Some(theirs),
                    ..
                }) if theirs != digest => return Err(SendError::Reused),
                Some(claim) => Some(claim.id),
                None => None,
            }
        }
        Err(e) => {
            // A full (or failing) claims bucket must not stop sends: without
            // a claim a retry is still recognised within JetStream's window.
            tracing::warn!(error = %e, "claim failed; sending without one");
            None
        }
    };
    event.id = claimed.unwrap_or(fresh);
    // The timestamp is the id's: a retry that reuses the id reproduces it.
    event.ts = timestamp_ms(event.id);
    if claimed.is_some() {
        let age_ms = timestamp_ms(fresh).saturating_sub(event.ts);
        // Past JetStream's window a republish would be stored twice if the
        // first attempt got through; look for it instead (rare: a retry
        // minutes after the first try).
        if age_ms > edge.config.dedup_window.as_millis() as u64 * 9 / 10
            && was_published(edge, &event).await?
        {
            return Ok((event, true));
        }
    }
    let mut headers = HeaderMap::new();
    headers.insert(
        subjects::MSG_ID_HEADER,
        subjects::send_dedup_id(&event.from, &event.client_msg_id).as_str(),
    );
    trace.add_to(&mut headers);
    let body = serde_json::to_vec(&event).map_err(|_| SendError::Unavailable)?;
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
        // JetStream kept an earlier copy; answer with its id, which differs
        // from ours only if the claim was lost.
        if claimed.is_none() {
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
        return Ok((event, true));
    }
    // Stored now for the first time (also when an earlier attempt claimed
    // the id but never got to publish).
    Ok((event, false))
}

/// The value of a send claim: `<message id>` (claims written before the
/// digest existed) or `<message id>:<digest>`.
#[derive(Debug, PartialEq, Eq)]
struct Claim {
    id: MessageId,
    digest: Option<String>,
}

impl Claim {
    /// What identifies the request a `client_msg_id` was first used for:
    /// its conversation and text (SHA-256, first 16 bytes in hex).
    fn digest(event: &MessageEvent) -> String {
        let mut hash = Sha256::new();
        hash.update(event.conversation.to_string().as_bytes());
        hash.update([0]);
        hash.update(event.text.as_bytes());
        hash.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn encode(&self) -> String {
        match &self.digest {
            Some(digest) => format!("{}:{digest}", self.id),
            None => self.id.to_string(),
        }
    }

    fn decode(value: &[u8]) -> Option<Self> {
        let value = std::str::from_utf8(value).ok()?;
        let (id, digest) = match value.split_once(':') {
            Some((id, digest)) => (id, Some(digest.to_string())),
            None => (value, None),
        };
        Some(Self {
            id: MessageId::parse(id).ok()?,
            digest,
        })
    }
}

/// Whether MESSAGES holds `event.id`. A claimed message is published within
/// the request timeout after its claim, so only that stretch of the
/// conversation's subject is read.
async fn was_published(edge: &Edge, event: &MessageEvent) -> Result<bool, SendError> {
    const SLACK_MS: u64 = 5_000;
    let claimed_at_ns = i128::from(event.ts.saturating_sub(SLACK_MS)) * 1_000_000;
    let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(claimed_at_ns)
        .map_err(|_| SendError::Unavailable)?;
    let window_end_ms = event.ts + edge.config.request_timeout.as_millis() as u64 + SLACK_MS;
    let mut scan = Scan::open(
        &edge.messages_of(&event.conversation).messages,
        subjects::message(&event.conversation),
        DeliverPolicy::ByStartTime { start_time },
    )
    .await
    .map_err(|_| SendError::Unavailable)?;
    let found = async {
        while let Some(message) = scan.next().await.map_err(|_| SendError::Unavailable)? {
            if serde_json::from_slice::<MessageEvent>(&message.payload)
                .is_ok_and(|stored| stored.id == event.id)
            {
                return Ok(true);
            }
            let published_ms = message
                .info()
                .map(|i| (i.published.unix_timestamp_nanos() / 1_000_000) as u64)
                .unwrap_or(u64::MAX);
            if published_ms > window_end_ms {
                break;
            }
        }
        Ok(false)
    }
    .await;
    scan.close().await;
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(conversation: &str, text: &str) -> MessageEvent {
        MessageEvent {
            id: MessageId(7),
            conversation: ConversationId::parse(conversation).unwrap(),
            from: UserId::parse("alice").unwrap(),
            text: text.into(),
            ts: 0,
            client_msg_id: chat_shared::ids::ClientMsgId::parse("c1").unwrap(),
        }
    }

    #[test]
    fn claims_read_back_old_and_new() {
        let digest = Claim::digest(&event("group:g", "hi"));
        let claim = Claim {
            id: MessageId(42),
            digest: Some(digest),
        };
        assert_eq!(Claim::decode(claim.encode().as_bytes()), Some(claim));
        // A claim written before digests: the id alone.
        assert_eq!(
            Claim::decode(b"42"),
            Some(Claim {
                id: MessageId(42),
                digest: None
            })
        );
        assert_eq!(Claim::decode(b"x:y"), None);
    }

    #[test]
    fn the_digest_tells_conversation_and_text_apart() {
        let base = Claim::digest(&event("group:g", "hi"));
        assert_eq!(base, Claim::digest(&event("group:g", "hi")));
        assert_ne!(base, Claim::digest(&event("group:h", "hi")));
        assert_ne!(base, Claim::digest(&event("group:g", "hi!")));
        // The separator keeps conversation and text from running together.
        assert_ne!(
            Claim::digest(&event("group:g", "ab")),
            Claim::digest(&event("group:ga", "b"))
        );
    }

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
