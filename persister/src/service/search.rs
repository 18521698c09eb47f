//! `search`: messages whose text matches a query, from the conversations
//! the caller is a member of when the query runs (their rows of
//! `user_conversations`, so a removed member finds nothing more), each
//! shard of those conversations searched for its own and the hits merged. Words match with
//! PostgreSQL full-text search in the `simple` configuration (any language,
//! no stemming); a substring of text without spaces (Japanese) matches with
//! ILIKE, served by a trigram index. Deleted messages (blank, `deleted`) and
//! those the caller hid are never found; items are in their current state,
//! as `history` gives them.

use std::collections::BTreeMap;

use chat_shared::ids::ConversationId;
use chat_shared::rpc::{self, RpcError, REPLY_ITEMS_BUDGET};
use chat_shared::wire::ErrorCode;

use chat_shared::wire::MAX_SEARCH_LIMIT;

use super::pages::{message_columns, stored_message};
use super::{column, corrupt, unavailable, Service};

/// `query` as an ILIKE pattern matching it anywhere: its own `%`, `_` and
/// `\` are literal.
fn substring_pattern(query: &str) -> String {
    let mut pattern = String::with_capacity(query.len() + 2);
    pattern.push('%');
    for c in query.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

impl Service {
    pub(super) async fn search(
        &self,
        request: rpc::SearchRequest,
    ) -> Result<rpc::SearchPage, RpcError> {
        if request.query.trim().is_empty() {
            return Err(RpcError::new(ErrorCode::BadRequest, "query is empty"));
        }
        let before = request.before.map(|b| b.get().min(i64::MAX as u64) as i64);
        let limit = i64::from(request.limit.clamp(1, MAX_SEARCH_LIMIT));
        // The caller's conversations (their shard), then each shard of
        // those conversations searched for its own, newest first, merged.
        let mine = self.searchable(&request).await?;
        let mut by_shard: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for conversation in &mine {
            by_shard
                .entry(self.shards.of_conversation(conversation))
                .or_default()
                .push(conversation.to_string());
        }
        let mut found = 0;
        let mut hits = Vec::new();
        for (shard, conversations) in by_shard {
            // As in `history`, rows past the budget in raw bytes are left
            // out by PostgreSQL; the ids of several conversations never
            // collide (the conversation only makes the order total).
            let rows = super::connect(self.shards.pool(shard))
                .await?
                .query(
                    concat!(
                        "WITH matches AS (
                         SELECT m.conversation, ",
                        message_columns!(),
                        "
                         FROM messages m
                         WHERE m.conversation = ANY($1::text[])
                           AND ($3::bigint IS NULL OR m.id < $3)
                           AND NOT m.deleted
                           AND (to_tsvector('simple', m.body) @@ plainto_tsquery('simple', $4)
                                OR m.body ILIKE $5)
                           AND NOT EXISTS (SELECT 1 FROM hidden_messages h
                                           WHERE h.conversation = m.conversation
                                             AND h.id = m.id AND h.user_id = $2)
                         ORDER BY m.id DESC, m.conversation DESC LIMIT $6),
                     sized AS (
                         SELECT *, count(*) OVER () AS found,
                                sum(octet_length(body)) OVER (ORDER BY id DESC, conversation DESC)
                                  - octet_length(body) AS bytes_before
                         FROM matches)
                     SELECT ",
                        message_columns!(),
                        ", found, conversation FROM sized
                     WHERE bytes_before <= $7 ORDER BY id DESC, conversation DESC"
                    ),
                    &[
                        &conversations,
                        &request.user.as_str(),
                        &before,
                        &request.query,
                        &substring_pattern(&request.query),
                        &(limit + 1),
                        &(REPLY_ITEMS_BUDGET as i64),
                    ],
                )
                .await
                .map_err(unavailable("search messages"))?;
            found += rows.first().map_or(Ok(0), |row| column::<i64>(row, 9))?;
            for row in &rows {
                let conversation = ConversationId::parse(column::<&str>(row, 10)?)
                    .map_err(|_| corrupt("conversation"))?;
                hits.push(stored_message(conversation, row)?);
            }
        }
        hits.sort_by(|a, b| {
            (b.id, b.conversation.to_string()).cmp(&(a.id, a.conversation.to_string()))
        });
        hits.truncate(limit as usize);
        let (items, more) = self.finish_page(hits, found).await?;
        Ok(rpc::SearchPage { items, more })
    }

    /// The conversations `request` searches: the one it names if the
    /// caller is in it, else all of the caller's (membership read when the
    /// query runs, so a removed member finds nothing more).
    async fn searchable(
        &self,
        request: &rpc::SearchRequest,
    ) -> Result<Vec<ConversationId>, RpcError> {
        let rows = self
            .user_db(&request.user)
            .await?
            .query(
                "SELECT conversation FROM user_conversations
                 WHERE user_id = $1 AND ($2::text IS NULL OR conversation = $2)",
                &[
                    &request.user.as_str(),
                    &request.conversation.as_ref().map(ToString::to_string),
                ],
            )
            .await
            .map_err(unavailable("read user_conversations"))?;
        rows.iter()
            .map(|row| {
                ConversationId::parse(column::<&str>(row, 0)?).map_err(|_| corrupt("conversation"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_a_literal_substring() {
        assert_eq!(substring_pattern("猫"), "%猫%");
        assert_eq!(substring_pattern(r"50%_a\b"), r"%50\%\_a\\b%");
    }
}
