//! `edit`, `delete` and `react` (v1.1): checked by the persister against
//! the rules and the message's current state, then published to MESSAGES
//! on the conversation's subject (so every reader gets it after the
//! message, in the same partition) and answered `ok` after the PubAck.
//! A change the message already reflects is answered `ok` and publishes
//! nothing; the same request repeated before the first is stored gets the
//! same `Nats-Msg-Id` (see `subjects::change_dedup_id`) and JetStream
//! drops it.

use async_nats::HeaderMap;
use chat_shared::ids::{ConversationId, MessageId, UserId};
use chat_shared::rpc::{self, Change, RpcError};
use chat_shared::telemetry::TraceId;
use chat_shared::wire::{ChangeEvent, ChangeKind, ErrorCode, ServerFrame};
use chat_shared::{hex, subjects};
use sha2::{Digest, Sha256};

use crate::quota::{json_bytes, QuotaError};
use crate::send::{validate_text, SendError};
use crate::Edge;

/// The longest emoji, in Unicode characters (PROTOCOL.md v1.1).
pub const MAX_EMOJI_CHARS: usize = 32;

/// Why a change was refused; [`ChangeError::frame`] is the one place it
/// becomes what the client reads.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("emoji must be 1..={MAX_EMOJI_CHARS} characters without NUL")]
    Emoji,
    /// The new text (same limits as `send`), or the caller may not write
    /// in the conversation.
    #[error(transparent)]
    Send(#[from] SendError),
    /// The persister's verdict (`not_found`, `forbidden`, `unavailable`).
    #[error("{}", .0.message)]
    Rpc(#[from] RpcError),
    #[error(transparent)]
    Quota(#[from] QuotaError),
    #[error("message store unavailable, retry later; nothing was changed")]
    Unavailable,
    #[error("timed out; the change may or may not be stored: repeat it (it is idempotent)")]
    TimedOut,
}

impl ChangeError {
    pub fn frame(&self, reference: Option<&str>) -> ServerFrame {
        match self {
            Self::Emoji => ServerFrame::error(reference, ErrorCode::BadRequest, self.to_string()),
            Self::Send(e) => e.frame(reference),
            Self::Rpc(e) => ServerFrame::error(reference, e.code, e.message.clone()),
            Self::Quota(e) => e.frame(reference),
            Self::Unavailable | Self::TimedOut => {
                ServerFrame::error(reference, ErrorCode::Unavailable, self.to_string())
            }
        }
    }
}

/// One change request, as the session parsed it.
pub struct Request {
    pub conversation: ConversationId,
    pub id: MessageId,
    pub change: Change,
}

impl Request {
    pub fn of(conversation: ConversationId, id: MessageId, change: Change) -> Self {
        Self {
            conversation,
            id,
            change,
        }
    }
}

/// Checks, publishes and answers one change.
#[tracing::instrument(skip_all, fields(conversation = %request.conversation, id = %request.id))]
pub async fn apply(edge: &Edge, user: &UserId, request: Request) -> Result<(), ChangeError> {
    let bytes = match &request.change {
        Change::Edit { text } => {
            validate_text(text)?;
            json_bytes(text)
        }
        Change::Reaction { emoji, .. } => {
            let chars = emoji.chars().count();
            if chars == 0 || chars > MAX_EMOJI_CHARS || emoji.contains('\0') {
                return Err(ChangeError::Emoji);
            }
            json_bytes(emoji)
        }
        Change::Delete { .. } => 0,
    };
    // Admitted and metered like a send (its update reaches the same
    // inboxes), before anything is stored.
    crate::send::admit(edge, user, &request.conversation, bytes).await?;
    let verdict = rpc::call::<rpc::CheckChange>(
        &edge.nats,
        &rpc::ChangeCheckRequest {
            user: user.clone(),
            conversation: request.conversation.clone(),
            id: request.id,
            change: request.change.clone(),
        },
    )
    .await?;
    if verdict.noop {
        return Ok(());
    }
    let (event, detail) = event_of(user, request);
    let dedup = subjects::change_dedup_id(
        event.id,
        verdict.version,
        user,
        event.kind.as_str(),
        &detail,
    );
    match tokio::time::timeout(edge.config.request_timeout, publish(edge, &event, &dedup)).await {
        Ok(result) => result,
        Err(_) => Err(ChangeError::TimedOut),
    }
}

/// The MESSAGES event of a change, and what tells it apart from another
/// change of the same kind at the same version.
fn event_of(user: &UserId, request: Request) -> (ChangeEvent, String) {
    let mut event = ChangeEvent {
        kind: ChangeKind::Edit,
        conversation: request.conversation,
        id: request.id,
        by: user.clone(),
        ts: chat_shared::clock::now_ms(),
        text: None,
        emoji: None,
        on: None,
        scope: None,
    };
    let detail = match request.change {
        Change::Edit { text } => {
            let digest = hex::encode(&Sha256::digest(text.as_bytes())[..8]);
            event.text = Some(text);
            digest
        }
        Change::Delete { scope } => {
            event.kind = ChangeKind::Delete;
            event.scope = Some(scope);
            format!("{scope:?}")
        }
        Change::Reaction { emoji, on } => {
            event.kind = ChangeKind::Reaction;
            let detail = format!("{}:{on}", hex::encode(&emoji));
            event.emoji = Some(emoji);
            event.on = Some(on);
            detail
        }
    };
    (event, detail)
}

async fn publish(edge: &Edge, event: &ChangeEvent, dedup: &str) -> Result<(), ChangeError> {
    let trace = TraceId::random();
    let mut headers = HeaderMap::new();
    headers.insert(subjects::MSG_ID_HEADER, dedup);
    trace.add_to(&mut headers);
    let body = serde_json::to_vec(event).map_err(|_| ChangeError::Unavailable)?;
    let subject = subjects::message_in(
        &event.conversation,
        edge.messages_of(&event.conversation).partition,
    );
    edge.js
        .publish_with_headers(subject, headers, body.into())
        .await
        .map_err(|_| ChangeError::Unavailable)?
        .await
        .map_err(|e| {
            tracing::warn!(trace_id = %trace, error = %e, "change not acknowledged");
            ChangeError::Unavailable
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(change: Change) -> Request {
        Request {
            conversation: ConversationId::parse("dm:a:b").unwrap(),
            id: MessageId(7),
            change,
        }
    }

    #[test]
    fn changes_of_one_kind_are_told_apart_by_their_detail() {
        let user = UserId::parse("a").unwrap();
        let detail = |change| event_of(&user, request(change)).1;
        let thumbs = |on| Change::Reaction {
            emoji: "👍".into(),
            on,
        };
        assert_ne!(detail(thumbs(true)), detail(thumbs(false)));
        assert_eq!(detail(thumbs(true)), detail(thumbs(true)));
        let edit = |text: &str| Change::Edit { text: text.into() };
        assert_ne!(detail(edit("x")), detail(edit("y")));
        let (event, _) = event_of(&user, request(thumbs(true)));
        assert_eq!(
            (event.kind, event.emoji.as_deref(), event.on),
            (ChangeKind::Reaction, Some("👍"), Some(true))
        );
    }
}
