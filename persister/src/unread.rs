//! A user's unread total over their conversations: the badge pushd puts on
//! every notification and retraction. The same definition as each
//! conversation's `unread` in the `conversations` answer
//! (service/pages.rs): messages of others after the user's read mark and
//! after they joined, over the first [`MAX_REACHABLE_CONVERSATIONS`] by
//! activity. Each conversation counts at most [`PER_CONVERSATION`], so one
//! huge unread group costs a bounded scan (a badge shows "99+" long before).
//!
//! Delivery runs ahead of this writer: a message being notified may not be
//! in `messages` yet. The caller names such messages (`pending`); those not
//! stored yet and not covered by the user's read mark are added.

/// Whether message `u` of conversation `p` is unread for user `$1` given
/// their read state `r` (the one definition, spliced into both queries):
/// another member's message after the read mark and after `p.joined`,
/// neither deleted for everyone nor deleted by `$1` for themselves.
macro_rules! is_unread {
    () => {
        "u.id > GREATEST(COALESCE(r.read_up_to, 0), p.joined)
         AND u.sender <> $1
         AND NOT u.deleted
         AND NOT EXISTS (SELECT 1 FROM hidden_messages h
                          WHERE h.user_id = $1 AND h.conversation = u.conversation AND h.id = u.id)"
    };
}
pub(crate) use is_unread;

/// The CTE `reachable`: user `$1`'s conversations, the `$4` most active
/// (the cap of `conversations` and of the badge), each with `joined`, the
/// first message id they may count (what was said in a group before they
/// joined is not unread for them: `$2` is the id epoch, `$3` the id's time
/// shift), `activity` and `last_id`.
macro_rules! reachable {
    () => {
        "WITH mine AS (
             SELECT conversation, 0::bigint AS joined FROM dm_members WHERE user_id = $1
             UNION ALL
             SELECT 'group:' || group_id, (GREATEST(joined_at - $2, 0)) << $3
               FROM group_members WHERE user_id = $1),
         reachable AS (
             SELECT mine.conversation, mine.joined, c.activity, c.last_id
             FROM mine JOIN conversations c ON c.conversation = mine.conversation
             ORDER BY c.activity DESC, c.conversation DESC
             LIMIT $4)"
    };
}
pub(crate) use reachable;

use chat_shared::idgen::{EPOCH_MS, NODE_BITS, SEQUENCE_BITS};
use chat_shared::ids::{ConversationId, MessageId, UserId};
use chat_shared::rpc::MAX_REACHABLE_CONVERSATIONS;
use deadpool_postgres::GenericClient;

/// The most unread messages one conversation adds to the total.
pub const PER_CONVERSATION: i64 = 1000;

/// `user`'s unread total, counting `pending` messages (of others, to
/// `user`) that are not stored yet.
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
            concat!(
                reachable!(),
                "
             SELECT (SELECT COALESCE(sum(
                 (SELECT count(*) FROM (
                     SELECT 1 FROM messages u
                      WHERE u.conversation = p.conversation
                        AND ",
                is_unread!(),
                "
                      LIMIT $5) unread)), 0)::bigint
             FROM reachable p
             LEFT JOIN read_state r ON r.user_id = $1 AND r.conversation = p.conversation)
             + (SELECT count(*) FROM unnest($6::text[], $7::bigint[]) AS q(conversation, id)
                 WHERE NOT EXISTS (SELECT 1 FROM messages m
                                    WHERE m.conversation = q.conversation AND m.id = q.id)
                   AND q.id > COALESCE((SELECT read_up_to FROM read_state r
                                         WHERE r.user_id = $1
                                           AND r.conversation = q.conversation), 0))"
            ),
            &[
                &user.as_str(),
                &(EPOCH_MS as i64),
                &((NODE_BITS + SEQUENCE_BITS) as i32),
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
