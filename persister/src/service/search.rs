//! `search`: messages whose text matches a query, from the conversations
//! the caller is a member of when the query runs (their rows of
//! `user_conversations`, so a removed member finds nothing more), each
//! shard of those conversations searched for its own and the hits merged.
//! Words match with
//! PostgreSQL full-text search in the `simple` configuration (any language,
//! no stemming) over `search_text(body)` (migration 0011), which makes each
//! character of the scripts written without spaces (Japanese, Chinese, Thai)
//! a word of its own: a substring of such text is found through the index as the
//! messages with each of its characters, then ILIKE keeps those that hold
//! it. An ASCII query also matches inside words with ILIKE, served by a
//! trigram index (pg_trgm sees only ASCII under the C locale, so it serves
//! nothing else). Every form is answered through an index; which one
//! a query takes is [`Matching::of`]. Deleted messages (blank, `deleted`)
//! and those the caller hid are never found; items are in their current
//! state, as `history` gives them.

use chat_shared::idgen::timestamp_ms;
use chat_shared::ids::{ConversationId, MessageId};
use chat_shared::rpc::{self, RpcError, REPLY_ITEMS_BUDGET};
use chat_shared::shards::bucket;
use chat_shared::wire::ErrorCode;

use chat_shared::wire::MAX_SEARCH_LIMIT;

use super::pages::{message_columns, stored_message};
use super::{activity_of, column, corrupt, now_ms, unavailable, Service};

/// How a query matches, by the text it holds. Each form is its own SQL text
/// (not a parameter the plan would have to allow for), so the planner picks
/// the index that serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Matching {
    /// Characters of a script without spaces: every word `search_text`
    /// makes of the query (its characters; an index lookup with no
    /// recheck), then the query as a substring.
    Substring,
    /// ASCII: its words, or the query anywhere inside the text.
    WordsOrSubstring,
    /// Anything else (Russian, Greek, ...): its words.
    Words,
}

impl Matching {
    fn of(query: &str) -> Self {
        if query.chars().any(without_spaces) {
            Self::Substring
        } else if query.is_ascii() {
            Self::WordsOrSubstring
        } else {
            Self::Words
        }
    }

    /// The condition on `m.body`, with the query as `$4` and, unless
    /// [`Matching::Words`], its ILIKE pattern as `$8` (the same expressions
    /// as the indexes, word for word).
    fn condition(self) -> &'static str {
        match self {
            Self::Substring => {
                "to_tsvector('simple', search_text(m.body)) @@ plainto_tsquery('simple', search_text($4))
                 AND m.body ILIKE $8"
            }
            Self::WordsOrSubstring => {
                "(to_tsvector('simple', search_text(m.body)) @@ plainto_tsquery('simple', $4)
                  OR m.body ILIKE $8)"
            }
            Self::Words => {
                "to_tsvector('simple', search_text(m.body)) @@ plainto_tsquery('simple', $4)"
            }
        }
    }
}

/// Whether `c` is one of the characters `search_text` (migration 0011)
/// makes a word of its own: the ranges of its pattern.
fn without_spaces(c: char) -> bool {
    matches!(c,
        '\u{3000}'..='\u{30ff}'
        | '\u{3400}'..='\u{4dbf}'
        | '\u{4e00}'..='\u{9fff}'
        | '\u{f900}'..='\u{faff}'
        | '\u{ff01}'..='\u{ff9f}'
        | '\u{0e00}'..='\u{0e7f}')
}

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

/// The windows of recent history (ms before the newest message a page may
/// hold) a search tries in turn, the last one all of it. A word in tens of
/// thousands of messages fills a page from the last day alone: PostgreSQL
/// then reads that day's matches (the text index ANDed with `messages_id`)
/// rather than all of them; a rare word costs a query or two more, each
/// cheap because its matches are few.
const SEARCH_WINDOWS_MS: [Option<i64>; 3] = [Some(86_400_000), Some(30 * 86_400_000), None];

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
        // Every match first, through the text index (MATERIALIZED: no
        // LIMIT reaches into it), then the newest page of them. Left to
        // itself, the planner would walk a big conversation's messages
        // newest first, computing the text's words row by row until the
        // LIMIT is met, whenever its guess at a word's frequency was high
        // (seconds for a rare word in 100,000 messages); this way the cost
        // follows the number of matches. As in `history`, rows past the
        // budget in raw bytes are left out by PostgreSQL; the ids of several
        // conversations never collide (the conversation only makes the
        // order total).
        let matching = Matching::of(&request.query);
        let sql = format!(
            "WITH hits AS MATERIALIZED (
                 SELECT m.conversation, m.id
                 FROM messages m
                 WHERE m.conversation = ANY($2::text[])
                   AND ($3::bigint IS NULL OR m.id < $3)
                   AND ($7::bigint IS NULL OR m.id >= $7)
                   AND NOT m.deleted
                   AND {condition}
                   AND NOT EXISTS (SELECT 1 FROM hidden_messages h
                                   WHERE h.conversation = m.conversation AND h.id = m.id
                                     AND h.user_id = $1)),
             matches AS (
                 SELECT conversation, {columns}
                 FROM messages
                 JOIN (SELECT conversation, id FROM hits
                       ORDER BY id DESC, conversation DESC LIMIT $5) AS newest
                   USING (conversation, id)),
             sized AS (
                 SELECT *, count(*) OVER () AS found,
                        sum(octet_length(body)) OVER (ORDER BY id DESC, conversation DESC)
                          - octet_length(body) AS bytes_before
                 FROM matches)
             SELECT {columns}, found, conversation FROM sized
             WHERE bytes_before <= $6 ORDER BY id DESC, conversation DESC",
            columns = message_columns!(),
            condition = matching.condition(),
        );
        // The caller's conversations (their shard), then each shard of
        // those conversations searched for its own, merged newest first.
        let by_shard = self
            .shards
            .split(self.searchable(&request).await?, |name| bucket(name));
        let user = request.user.as_str();
        let pattern = substring_pattern(&request.query);
        let (fetch, budget) = (limit + 1, REPLY_ITEMS_BUDGET as i64);
        // The newest day before `before` (or now) first, then the newest
        // month, then everything, until a window holds more than a page.
        let newest_ms = before.map_or_else(now_ms, |id| timestamp_ms(MessageId(id as u64)) as i64);
        let mut found = 0;
        let mut hits = Vec::new();
        for (shard, conversations) in by_shard {
            let db = super::connect(self.shards.pool(shard)).await?;
            let mut rows = Vec::new();
            for window in SEARCH_WINDOWS_MS {
                let since = window.map(|ms| activity_of(newest_ms - ms));
                let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
                    &user,
                    &conversations,
                    &before,
                    &request.query,
                    &fetch,
                    &budget,
                    &since,
                ];
                if matching != Matching::Words {
                    params.push(&pattern);
                }
                rows = db
                    .query(sql.as_str(), &params)
                    .await
                    .map_err(unavailable("search messages"))?;
                if rows.first().map_or(Ok(0), |row| column::<i64>(row, 10))? > limit {
                    break;
                }
            }
            found += rows.first().map_or(Ok(0), |row| column::<i64>(row, 10))?;
            for row in &rows {
                let conversation = ConversationId::parse(column::<&str>(row, 11)?)
                    .map_err(|_| corrupt("conversation"))?;
                hits.push(stored_message(conversation, row)?);
            }
        }
        // Ids of several conversations never collide: the id alone orders.
        hits.sort_by_key(|m| std::cmp::Reverse(m.id));
        hits.truncate(limit as usize);
        let (items, more) = self.finish_page(hits, found).await?;
        Ok(rpc::SearchPage { items, more })
    }

    /// The conversations `request` searches, by name: the one it names if
    /// the caller is in it, else all of the caller's (membership read when
    /// the query runs, so a removed member finds nothing more).
    async fn searchable(&self, request: &rpc::SearchRequest) -> Result<Vec<String>, RpcError> {
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
        rows.iter().map(|row| column(row, 0)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_query_takes_the_form_an_index_serves() {
        assert_eq!(Matching::of("東京"), Matching::Substring);
        assert_eq!(Matching::of("猫 cat"), Matching::Substring);
        assert_eq!(Matching::of("สวัสดี"), Matching::Substring);
        assert_eq!(Matching::of("quarter"), Matching::WordsOrSubstring);
        assert_eq!(Matching::of("завтра"), Matching::Words);
        assert_eq!(Matching::of("café"), Matching::Words);
    }

    #[test]
    fn a_query_is_a_literal_substring() {
        assert_eq!(substring_pattern("猫"), "%猫%");
        assert_eq!(substring_pattern(r"50%_a\b"), r"%50\%\_a\\b%");
    }
}
