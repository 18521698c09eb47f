//! `search`: messages whose text matches a query, from the conversations
//! the caller is a member of when the query runs (membership is part of the
//! query itself, so a removed member finds nothing more). Words match with
//! PostgreSQL full-text search in the `simple` configuration (any language,
//! no stemming); a substring of text without spaces (Japanese) matches with
//! ILIKE, served by a trigram index. Deleted messages (blank, `deleted`) and
//! those the caller hid are never found; items are in their current state,
//! as `history` gives them.

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
        let db = self.client().await?;
        // As in `history`, rows past the budget in raw bytes are left out by
        // PostgreSQL; the ids of several conversations never collide (the
        // conversation only makes the order total).
        let rows = db
            .query(
                concat!(
                    "WITH mine AS (
                     SELECT conversation FROM dm_members WHERE user_id = $1
                     UNION ALL
                     SELECT 'group:' || group_id FROM group_members WHERE user_id = $1),
                 matches AS (
                     SELECT m.conversation, ",
                    message_columns!(),
                    "
                     FROM messages m
                     WHERE m.conversation IN (SELECT conversation FROM mine)
                       AND ($2::text IS NULL OR m.conversation = $2)
                       AND ($3::bigint IS NULL OR m.id < $3)
                       AND NOT m.deleted
                       AND (to_tsvector('simple', m.body) @@ plainto_tsquery('simple', $4)
                            OR m.body ILIKE $5)
                       AND NOT EXISTS (SELECT 1 FROM hidden_messages h
                                       WHERE h.user_id = $1 AND h.conversation = m.conversation
                                         AND h.id = m.id)
                     ORDER BY m.id DESC, m.conversation DESC LIMIT $6),
                 sized AS (
                     SELECT *, count(*) OVER () AS found,
                            sum(octet_length(body) + octet_length(attachments))
                              OVER (ORDER BY id DESC, conversation DESC)
                              - octet_length(body) - octet_length(attachments) AS bytes_before
                     FROM matches)
                 SELECT ",
                    message_columns!(),
                    ", found, conversation FROM sized
                 WHERE bytes_before <= $7 ORDER BY id DESC, conversation DESC"
                ),
                &[
                    &request.user.as_str(),
                    &request.conversation.as_ref().map(ToString::to_string),
                    &before,
                    &request.query,
                    &substring_pattern(&request.query),
                    &(limit + 1),
                    &(REPLY_ITEMS_BUDGET as i64),
                ],
            )
            .await
            .map_err(unavailable("search messages"))?;
        let found = rows.first().map_or(Ok(0), |row| column::<i64>(row, 10))?;
        let items = rows
            .iter()
            .take(limit as usize)
            .map(|row| {
                let conversation = ConversationId::parse(column::<&str>(row, 11)?)
                    .map_err(|_| corrupt("conversation"))?;
                stored_message(conversation, row)
            })
            .collect::<Result<Vec<_>, RpcError>>()?;
        let (items, more) = self.finish_page(&db, items, found).await?;
        Ok(rpc::SearchPage { items, more })
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
