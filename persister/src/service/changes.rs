//! `change_check` (v1.1 `edit`, `delete`, `react`): the rules and the
//! message's current state, read once the writer has caught up.
//!
//! Delivery runs ahead of this writer (a user may edit a message 100 ms
//! after sending it, before it is in PostgreSQL), so the check first waits
//! until the persister's consumer on the conversation's MESSAGES partition
//! has acked everything that partition held when the request arrived: the
//! message and every earlier change of it are then committed.

use std::time::{Duration, Instant};

use chat_shared::clock;
use chat_shared::ids::ConversationId;
use chat_shared::partitions::Partitions;
use chat_shared::rpc::{self, Change, RpcError};
use chat_shared::subjects;
use chat_shared::wire::{DeleteScope, ErrorCode};

use super::{column, unavailable, Service};

/// How long a check waits for the writer; past it the client is told
/// `unavailable` and retries.
const CATCH_UP: Duration = Duration::from_millis(1500);
const CATCH_UP_POLL: Duration = Duration::from_millis(10);

/// What a change is checked with: the windows of PROTOCOL.md v1.1
/// (`CHAT_EDIT_WINDOW_SECS`, `CHAT_DELETE_WINDOW_SECS`) and where a
/// conversation's MESSAGES events are.
#[derive(Debug, Clone, Copy)]
pub struct ChangeRules {
    pub edit: Duration,
    pub delete: Duration,
    pub partitions: Partitions,
}

fn forbidden(message: &str) -> RpcError {
    RpcError::new(ErrorCode::Forbidden, message)
}

fn not_found() -> RpcError {
    RpcError::new(ErrorCode::NotFound, "no such message in this conversation")
}

fn behind() -> RpcError {
    RpcError::new(
        ErrorCode::Unavailable,
        "history store is catching up, retry later; nothing was changed",
    )
}

impl Service {
    pub(super) async fn change_check(
        &self,
        request: rpc::ChangeCheckRequest,
    ) -> Result<rpc::ChangeVerdict, RpcError> {
        self.caught_up(&request.conversation).await?;
        let db = self.conversation_db(&request.conversation).await?;
        self.check_access(&db, &request.user, &request.conversation)
            .await?;
        let conversation = request.conversation.to_string();
        let id = i64::try_from(request.id.get()).map_err(|_| not_found())?;
        let row = db
            .query_opt(
                "SELECT sender, ts, body, deleted, version FROM messages
                 WHERE conversation = $1 AND id = $2",
                &[&conversation, &id],
            )
            .await
            .map_err(unavailable("read a message"))?
            .ok_or_else(not_found)?;
        let sender: String = column(&row, 0)?;
        let ts: i64 = column(&row, 1)?;
        let body: String = column(&row, 2)?;
        let deleted: bool = column(&row, 3)?;
        let version = column::<i64>(&row, 4)?.max(0) as u64;
        let verdict = |noop| Ok(rpc::ChangeVerdict { noop, version });
        let author = sender == request.user.as_str();
        let age_ms = (clock::now_ms() as i64).saturating_sub(ts).max(0) as u128;
        match request.change {
            Change::Delete {
                scope: DeleteScope::Everyone,
            } => {
                if deleted {
                    return verdict(true);
                }
                let in_window = author && age_ms <= self.rules.delete.as_millis();
                if !in_window && !self.owns(&db, &request.conversation, &request.user).await? {
                    return Err(forbidden(
                        "only the author (within the delete window) or the group's owner may delete this for everyone",
                    ));
                }
                verdict(false)
            }
            Change::Delete {
                scope: DeleteScope::Me,
            } => {
                let hidden = db
                    .query_opt(
                        "SELECT 1 FROM hidden_messages
                         WHERE conversation = $2 AND id = $3 AND user_id = $1",
                        &[&request.user.as_str(), &conversation, &id],
                    )
                    .await
                    .map_err(unavailable("read hidden_messages"))?;
                verdict(hidden.is_some())
            }
            // A message deleted for everyone has nothing left to change.
            _ if deleted => Err(not_found()),
            Change::Edit { text } => {
                if !author {
                    return Err(forbidden("only the author may edit a message"));
                }
                if age_ms > self.rules.edit.as_millis() {
                    return Err(forbidden("the edit window of this message has passed"));
                }
                verdict(text == body)
            }
            Change::Reaction { emoji, on } => {
                let given = db
                    .query_opt(
                        "SELECT 1 FROM reactions
                         WHERE conversation = $1 AND id = $2 AND emoji = $3 AND user_id = $4",
                        &[&conversation, &id, &emoji, &request.user.as_str()],
                    )
                    .await
                    .map_err(unavailable("read reactions"))?;
                verdict(given.is_some() == on)
            }
        }
    }

    /// Whether `user` owns the group `conversation` is (never for a DM).
    async fn owns(
        &self,
        db: &deadpool_postgres::Object,
        conversation: &ConversationId,
        user: &chat_shared::ids::UserId,
    ) -> Result<bool, RpcError> {
        let ConversationId::Group(group) = conversation else {
            return Ok(false);
        };
        let owner = db
            .query_opt("SELECT owner FROM groups WHERE id = $1", &[&group.as_str()])
            .await
            .map_err(unavailable("read groups"))?;
        match owner {
            Some(row) => Ok(column::<&str>(&row, 0)? == user.as_str()),
            None => Ok(false),
        }
    }

    /// Waits until the writer has committed (and acked) everything the
    /// conversation's MESSAGES partition holds now.
    async fn caught_up(&self, conversation: &ConversationId) -> Result<(), RpcError> {
        let stream = self
            .rules
            .partitions
            .of_conversation(conversation)
            .messages_stream();
        // Fetched with its state: one request.
        let handle = self
            .js
            .get_stream(&stream)
            .await
            .map_err(unavailable("read the MESSAGES stream"))?;
        let last = handle.cached_info().state.last_sequence;
        let deadline = Instant::now() + CATCH_UP;
        // Usually caught up at the first look; a lagging writer is asked
        // again less and less often, not hammered while NATS is busy.
        let mut pause = CATCH_UP_POLL;
        loop {
            let floor = handle
                .consumer_info(subjects::PERSISTER_CONSUMER)
                .await
                .map_err(unavailable("read the persister consumer"))?
                .ack_floor
                .stream_sequence;
            if floor >= last {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::warn!(stream, floor, last, "writer behind; change refused for now");
                return Err(behind());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(CATCH_UP / 8);
        }
    }
}
