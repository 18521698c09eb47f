//! A user's unread total over their conversations: the badge pushd puts on
//! every notification and retraction. The sum of the counters of
//! `user_conversations` (`user_index`), the same as each conversation's
//! `unread` in the `conversations` answer, over the first
//! [`MAX_REACHABLE_CONVERSATIONS`] by activity, one read of the user's
//! shard. Each conversation adds at most [`PER_CONVERSATION`] (a badge
//! shows "99+" long before).
//!
//! Delivery runs ahead of the writer: a message being notified may not be
//! counted yet. The caller names such messages (`pending`); those newer
//! than what the user's counter has seen (`last_id`) and than their read
//! mark are added.

use chat_shared::ids::{ConversationId, MessageId, UserId};
use chat_shared::rpc::MAX_REACHABLE_CONVERSATIONS;
use deadpool_postgres::GenericClient;

/// The most unread messages one conversation adds to the total.
pub const PER_CONVERSATION: i64 = 1000;

/// `user`'s unread total, counting `pending` messages (of others, to
/// `user`) that are not counted yet. `db` is the user's shard.
pub async fn total(
    db: &impl GenericClient,
    user: &UserId,
    pending: &[(ConversationId, MessageId)],
) -> Result<u64, tokio_postgres::Error> {
    let conversations: Vec<String> = pending.iter().map(|(c, _)| c.to_string()).collect();
    let ids: Vec<i64> = pending
        .iter()
        .map(|(_, id)| i64::try_from(id.get()).unwrap_or(i64::MAX))
        .collect();
    let row = db
        .query_one(
            "SELECT (SELECT COALESCE(sum(LEAST(unread, $3)), 0)::bigint FROM (
                         SELECT unread FROM user_conversations WHERE user_id = $1
                         ORDER BY activity DESC, conversation DESC LIMIT $2) reachable)
                  + (SELECT count(*) FROM unnest($4::text[], $5::bigint[]) AS q(conversation, id)
                      WHERE q.id > COALESCE((SELECT last_id FROM user_conversations uc
                                              WHERE uc.user_id = $1
                                                AND uc.conversation = q.conversation), 0)
                        AND q.id > COALESCE((SELECT read_up_to FROM read_state r
                                              WHERE r.user_id = $1
                                                AND r.conversation = q.conversation), 0))",
            &[
                &user.as_str(),
                &MAX_REACHABLE_CONVERSATIONS,
                &PER_CONVERSATION,
                &conversations,
                &ids,
            ],
        )
        .await?;
    let total: i64 = row.try_get(0)?;
    Ok(total.max(0) as u64)
}
