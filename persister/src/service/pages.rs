//! `history` and `conversations`: the replies whose size a user's
//! correspondents choose. Every page is cut to [`rpc::REPLY_ITEMS_BUDGET`]
//! bytes of items (JSON-escaped, as sent) and says `more`, so a few large
//! messages cannot make a reply that NATS or the client's socket refuses;
//! `conversations` carries only a [`PREVIEW_CHARS`] preview of each newest
//! message and pages with an opaque `next` token.

use std::collections::{BTreeMap, HashMap};
use std::io;

use chat_shared::ids::{ConversationId, MessageId, UserId};
use chat_shared::rpc::{self, RpcError, MAX_REACHABLE_CONVERSATIONS, REPLY_ITEMS_BUDGET};
use chat_shared::shards::of_conversation;
use chat_shared::wire::{ConversationSummary, ErrorCode, MessageEvent, PREVIEW_CHARS};
use serde::Serialize;

use super::{column, corrupt, message_from_row, unavailable, Service};

/// Counts what a value serializes to without keeping it.
struct ByteCount(usize);

impl io::Write for ByteCount {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The first `items` whose JSON (with the commas between them) fits in
/// `budget` bytes, and whether any were left out. The first item is always
/// taken, so paging moves on; text limits keep one item far below the
/// budget (100,000 characters escape to at most 600 KB).
fn fit<T: Serialize>(items: impl IntoIterator<Item = T>, budget: usize) -> (Vec<T>, bool) {
    let mut used = 0;
    let mut out = Vec::new();
    for item in items {
        let mut count = ByteCount(1);
        if serde_json::to_writer(&mut count, &item).is_err() {
            return (out, true);
        }
        used += count.0;
        if used > budget && !out.is_empty() {
            return (out, true);
        }
        out.push(item);
    }
    (out, false)
}

/// Where a `conversations` page ends: the (activity, conversation) of its
/// last item, the order's key. Opaque to clients.
struct PageToken {
    activity: i64,
    conversation: String,
}

impl PageToken {
    fn encode(&self) -> String {
        format!("{}.{}", self.activity, self.conversation)
    }

    fn decode(token: &str) -> Result<Self, RpcError> {
        let invalid = || RpcError::new(ErrorCode::BadRequest, "next is not a page token");
        let (activity, conversation) = token.split_once('.').ok_or_else(invalid)?;
        let activity = activity.parse().map_err(|_| invalid())?;
        let conversation = ConversationId::parse(conversation).map_err(|_| invalid())?;
        Ok(Self {
            activity,
            conversation: conversation.to_string(),
        })
    }
}

/// The columns every message page selects first, in this order (for
/// `concat!`); read back by [`stored_message`].
macro_rules! message_columns {
    () => {
        "id, sender, body, ts, client_msg_id, reply_to, mentions, edited_ts, deleted, \
         attachments::text"
    };
}
pub(super) use message_columns;

/// A message in its current state from a row that starts with
/// [`message_columns!`] (`history` and `search` items).
pub(super) fn stored_message(
    conversation: ConversationId,
    row: &tokio_postgres::Row,
) -> Result<MessageEvent, RpcError> {
    let mut message = message_from_row(
        conversation,
        column(row, 0)?,
        column(row, 1)?,
        column(row, 2)?,
        column(row, 3)?,
        column(row, 4)?,
    )?;
    message.reply_to = column::<Option<i64>>(row, 5)?.map(|r| MessageId(r as u64));
    message.mentions = column::<Vec<String>>(row, 6)?
        .into_iter()
        .map(|user| UserId::parse(user).map_err(|_| corrupt("mention")))
        .collect::<Result<_, _>>()?;
    message.edited_ts = column::<Option<i64>>(row, 7)?.map(|t| t as u64);
    message.deleted = column(row, 8)?;
    message.attachments =
        serde_json::from_str(&column::<String>(row, 9)?).map_err(|_| corrupt("attachments"))?;
    Ok(message)
}

impl Service {
    pub(super) async fn history(
        &self,
        request: rpc::HistoryRequest,
    ) -> Result<rpc::HistoryPage, RpcError> {
        let db = self.conversation_db(&request.conversation).await?;
        self.check_access(&db, &request.user, &request.conversation)
            .await?;
        let before = request.before.map(|b| b.get().min(i64::MAX as u64) as i64);
        let limit = i64::from(request.limit.clamp(1, 200));
        // Rows past the budget in raw bytes cannot fit once escaped, so
        // PostgreSQL leaves them out: the page costs this process about the
        // budget, not `limit` texts of 100,000 characters.
        let rows = db
            .query(
                concat!(
                    "WITH newest AS (
                     SELECT ",
                    message_columns!(),
                    "
                     FROM messages m
                     WHERE conversation = $1 AND ($2::bigint IS NULL OR id < $2)
                       -- v1.1: deleted for me by the reader.
                       AND NOT EXISTS (SELECT 1 FROM hidden_messages h
                                       WHERE h.conversation = $1 AND h.id = m.id AND h.user_id = $5)
                     ORDER BY id DESC LIMIT $3),
                 sized AS (
                     SELECT *, count(*) OVER () AS found,
                            sum(octet_length(body) + octet_length(attachments)) OVER (ORDER BY id DESC)
                              - octet_length(body) - octet_length(attachments)
                              AS bytes_before
                     FROM newest)
                 SELECT ",
                    message_columns!(),
                    ", found FROM sized
                 WHERE bytes_before <= $4 ORDER BY id DESC"
                ),
                &[
                    &request.conversation.to_string(),
                    &before,
                    &(limit + 1),
                    &(REPLY_ITEMS_BUDGET as i64),
                    &request.user.as_str(),
                ],
            )
            .await
            .map_err(unavailable("read a history page"))?;
        let found = rows.first().map_or(Ok(0), |row| column::<i64>(row, 10))?;
        let messages = rows
            .iter()
            .take(limit as usize)
            .map(|row| stored_message(request.conversation.clone(), row))
            .collect::<Result<Vec<_>, RpcError>>()?;
        let (messages, more) = self.finish_page(messages, found).await?;
        Ok(rpc::HistoryPage { messages, more })
    }

    /// A page of messages as sent: their reactions filled in, cut to the
    /// budget, and whether more follow (`found` rows were read for it).
    pub(super) async fn finish_page(
        &self,
        mut messages: Vec<MessageEvent>,
        found: i64,
    ) -> Result<(Vec<MessageEvent>, bool), RpcError> {
        self.add_reactions(&mut messages).await?;
        let (messages, cut) = fit(messages, REPLY_ITEMS_BUDGET);
        let more = cut || (messages.len() as i64) < found;
        Ok((messages, more))
    }

    /// Fills in each message's `reactions` (one query per shard of the
    /// page, whose messages may be of several conversations).
    async fn add_reactions(&self, messages: &mut [MessageEvent]) -> Result<(), RpcError> {
        let keys = messages
            .iter()
            .map(|m| (&m.conversation, m.id.get() as i64));
        let mut rows = Vec::new();
        for (shard, (conversations, ids)) in self.keys_by_shard(keys) {
            rows.extend(
                super::connect(self.shards.pool(shard))
                    .await?
                    .query(
                        "SELECT r.conversation, r.id, r.emoji, r.user_id
                         FROM unnest($1::text[], $2::bigint[]) AS page (conversation, id)
                         JOIN reactions r ON r.conversation = page.conversation AND r.id = page.id
                         ORDER BY r.conversation, r.id, r.emoji, r.ts, r.user_id",
                        &[&conversations, &ids],
                    )
                    .await
                    .map_err(unavailable("read reactions"))?,
            );
        }
        // Where each message of the page is: ids are unique across
        // conversations, so the id alone finds it.
        let at: std::collections::HashMap<MessageId, usize> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id, i))
            .collect();
        for row in &rows {
            let id = MessageId(column::<i64>(row, 1)? as u64);
            let user = UserId::parse(column::<String>(row, 3)?).map_err(|_| corrupt("reaction"))?;
            if let Some(message) = at.get(&id).map(|i| &mut messages[*i]) {
                message
                    .reactions
                    .entry(column(row, 2)?)
                    .or_default()
                    .push(user);
            }
        }
        Ok(())
    }

    pub(super) async fn conversations(
        &self,
        request: rpc::ConversationsRequest,
    ) -> Result<rpc::ConversationsPage, RpcError> {
        let after = request.next.as_deref().map(PageToken::decode).transpose()?;
        let limit = i64::from(request.limit.clamp(1, 200));
        // The user's shard lists them (with their counters), each
        // conversation's shard gives its newest message.
        // `reachable` is the cap: only a user's most active conversations
        // are listed, and a page token only moves within them.
        let rows = self
            .user_db(&request.user)
            .await?
            .query(
                "WITH reachable AS (
                     SELECT conversation, activity, last_id, unread FROM user_conversations
                     WHERE user_id = $1
                     ORDER BY activity DESC, conversation DESC
                     LIMIT $2),
                 page AS (
                     SELECT * FROM reachable
                     WHERE $3::bigint IS NULL OR (activity, conversation) < ($3, $4::text)
                     ORDER BY activity DESC, conversation DESC
                     LIMIT $5)
                 SELECT p.conversation, r.read_up_to, p.unread, p.last_id, p.activity
                 FROM page p
                 LEFT JOIN read_state r ON r.user_id = $1 AND r.conversation = p.conversation
                 ORDER BY p.activity DESC, p.conversation DESC",
                &[
                    &request.user.as_str(),
                    &MAX_REACHABLE_CONVERSATIONS,
                    &after.as_ref().map(|a| a.activity),
                    &after.as_ref().map(|a| a.conversation.as_str()),
                    &(limit + 1),
                ],
            )
            .await
            .map_err(unavailable("read a conversations page"))?;
        let mut listed = Vec::with_capacity(rows.len());
        for row in rows.iter().take(limit as usize) {
            let conversation = ConversationId::parse(column::<&str>(row, 0)?)
                .map_err(|_| corrupt("conversation"))?;
            let last_id: Option<i64> = column(row, 3)?;
            listed.push((conversation, last_id));
        }
        let mut previews = self.previews(&listed).await?;
        let mut items = Vec::with_capacity(rows.len());
        let mut tokens = Vec::with_capacity(rows.len());
        for (row, (conversation, last_id)) in rows.iter().zip(listed) {
            let read_up_to: Option<i64> = column(row, 1)?;
            let unread: i64 = column(row, 2)?;
            let (last, truncated) = match last_id.and_then(|id| previews.remove(&id)) {
                Some((last, truncated)) => (Some(last), truncated),
                None => (None, false),
            };
            tokens.push(PageToken {
                activity: column(row, 4)?,
                conversation: conversation.to_string(),
            });
            items.push(ConversationSummary {
                conversation,
                last,
                truncated,
                unread: unread.max(0) as u64,
                read_up_to: read_up_to.map(|r| MessageId(r as u64)),
            });
        }
        let (items, cut) = fit(items, REPLY_ITEMS_BUDGET);
        let more = cut || rows.len() > items.len();
        let next = match items.len().checked_sub(1) {
            Some(last) if more => tokens.get(last).map(PageToken::encode),
            _ => None,
        };
        Ok(rpc::ConversationsPage { items, more, next })
    }

    /// Messages' keys (conversation, id) by shard, as the columns of one
    /// query per shard.
    fn keys_by_shard<'a>(
        &self,
        keys: impl Iterator<Item = (&'a ConversationId, i64)>,
    ) -> BTreeMap<usize, (Vec<String>, Vec<i64>)> {
        self.shards
            .split(keys, |(conversation, _)| of_conversation(conversation))
            .into_iter()
            .map(|(shard, keys)| {
                let columns = keys
                    .into_iter()
                    .map(|(conversation, id)| (conversation.to_string(), id))
                    .unzip();
                (shard, columns)
            })
            .collect()
    }

    /// The newest message of each listed conversation, as a preview of
    /// [`PREVIEW_CHARS`] and whether it was cut, by message id (unique
    /// across conversations): one query per shard.
    async fn previews(
        &self,
        listed: &[(ConversationId, Option<i64>)],
    ) -> Result<HashMap<i64, (MessageEvent, bool)>, RpcError> {
        let keys = listed
            .iter()
            .filter_map(|(conversation, last_id)| last_id.map(|id| (conversation, id)));
        let mut out = HashMap::new();
        for (shard, (conversations, ids)) in self.keys_by_shard(keys) {
            let rows = super::connect(self.shards.pool(shard))
                .await?
                .query(
                    "SELECT m.conversation, m.id, m.sender, left(m.body, $3), m.ts, m.client_msg_id,
                            char_length(m.body) > $3, m.deleted, m.attachments::text
                     FROM unnest($1::text[], $2::bigint[]) AS page (conversation, id)
                     JOIN messages m ON m.conversation = page.conversation AND m.id = page.id",
                    &[&conversations, &ids, &(PREVIEW_CHARS as i32)],
                )
                .await
                .map_err(unavailable("read previews"))?;
            for row in &rows {
                let conversation = ConversationId::parse(column::<&str>(row, 0)?)
                    .map_err(|_| corrupt("conversation"))?;
                let id: i64 = column(row, 1)?;
                let mut last = message_from_row(
                    conversation,
                    id,
                    column(row, 2)?,
                    column(row, 3)?,
                    column(row, 4)?,
                    column(row, 5)?,
                )?;
                // v1.1: the newest message may be deleted for everyone.
                last.deleted = column(row, 7)?;
                // v1.1: a picture without text shows as one.
                last.attachments = serde_json::from_str(&column::<String>(row, 8)?)
                    .map_err(|_| corrupt("attachments"))?;
                out.insert(id, (last, column(row, 6)?));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_cut_at_the_budget_but_never_empty() {
        let item = "x".repeat(98); // 100 bytes with its quotes
        assert_eq!(
            fit(vec![item.clone(); 3], 300),
            (vec![item.clone(); 2], true)
        );
        assert_eq!(
            fit(vec![item.clone(); 2], 1000),
            (vec![item.clone(); 2], false)
        );
        // Escapes count: a control character is six bytes on the wire.
        let escaped = "\u{1}".repeat(20); // 122 bytes encoded
        assert_eq!(fit(vec![escaped.clone(); 3], 300).0.len(), 2);
        assert_eq!(fit(vec![item.clone(); 2], 10), (vec![item], true));
        assert_eq!(fit(Vec::<String>::new(), 10), (vec![], false));
    }

    /// Replies that are not paged are bounded by caps on what they list;
    /// at the caps, with the longest ids, they still fit.
    #[test]
    fn unpaged_replies_fit_at_their_caps() {
        use chat_shared::ids::{GroupId, UserId};
        use chat_shared::wire::{FriendState, FriendView, GroupView, PresenceStatus};

        let id = |i: usize| UserId::parse(format!("{i:064}")).unwrap();
        // The most members CHAT_MAX_GROUP_MEMBERS allows, and a 200-character
        // name that escapes six times larger.
        let group = GroupView {
            id: GroupId::parse("g".repeat(64)).unwrap(),
            name: "\u{1}".repeat(200),
            owner: id(0),
            members: (0..10_000).map(id).collect(),
        };
        let members = serde_json::to_vec(&group).unwrap().len();
        assert!(members < REPLY_ITEMS_BUDGET, "a group of {members} bytes");
        let friends: Vec<FriendView> = (0..super::super::friends::MAX_FRIENDS as usize)
            .map(|i| FriendView {
                user: id(i),
                state: FriendState::Requested,
                status: PresenceStatus::Offline,
                last_active: Some(u64::MAX),
            })
            .collect();
        let friends = serde_json::to_vec(&friends).unwrap().len();
        assert!(
            friends < REPLY_ITEMS_BUDGET,
            "a friend list of {friends} bytes"
        );
    }

    #[test]
    fn page_tokens_round_trip_and_refuse_junk() {
        let token = PageToken {
            activity: 12345,
            conversation: "dm:alice:bob".into(),
        };
        let back = PageToken::decode(&token.encode()).unwrap();
        assert_eq!(
            (back.activity, back.conversation.as_str()),
            (12345, "dm:alice:bob")
        );
        for junk in ["", "12", "x.dm:a:b", "1.nope", "1.dm:a:a"] {
            assert!(PageToken::decode(junk).is_err(), "{junk}");
        }
    }
}
