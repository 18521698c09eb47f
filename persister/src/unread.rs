//! A user's unread total over their conversations: the badge pushd puts on
//! every notification and retraction. The same definition as each
//! conversation's `unread` in the `conversations` answer
//! (service/pages.rs): messages of others after the user's read mark and
//! after they joined, over the first [`MAX_REACHABLE_CONVERSATIONS`] by
//! activity. Each conversation counts at most [`PER_CONVERSATION`], so one
//! huge unread group costs a bounded scan (a badge shows "99+" long before).

use chat_shared::idgen::{EPOCH_MS, NODE_BITS, SEQUENCE_BITS};
use chat_shared::ids::UserId;
use chat_shared::rpc::MAX_REACHABLE_CONVERSATIONS;
use deadpool_postgres::GenericClient;

/// The most unread messages one conversation adds to the total.
pub const PER_CONVERSATION: i64 = 1000;

/// `user`'s unread total.
pub async fn total(db: &impl GenericClient, user: &UserId) -> Result<u64, tokio_postgres::Error> {
    let row = db
        .query_one(
            "WITH mine AS (
                 SELECT conversation, 0::bigint AS joined FROM dm_members WHERE user_id = $1
                 UNION ALL
                 SELECT 'group:' || group_id, (GREATEST(joined_at - $2, 0)) << $3
                   FROM group_members WHERE user_id = $1),
             reachable AS (
                 SELECT mine.conversation, mine.joined
                 FROM mine JOIN conversations c ON c.conversation = mine.conversation
                 ORDER BY c.activity DESC, c.conversation DESC
                 LIMIT $4)
             SELECT COALESCE(sum(
                 (SELECT count(*) FROM (
                     SELECT 1 FROM messages u
                      WHERE u.conversation = p.conversation
                        AND u.id > GREATEST(COALESCE(r.read_up_to, 0), p.joined)
                        AND u.sender <> $1
                      LIMIT $5) unread)), 0)::bigint
             FROM reachable p
             LEFT JOIN read_state r ON r.user_id = $1 AND r.conversation = p.conversation",
            &[
                &user.as_str(),
                &(EPOCH_MS as i64),
                &((NODE_BITS + SEQUENCE_BITS) as i32),
                &MAX_REACHABLE_CONVERSATIONS,
                &PER_CONVERSATION,
            ],
        )
        .await?;
    let total: i64 = row.try_get(0)?;
    Ok(total.max(0) as u64)
}
