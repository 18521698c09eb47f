//! `user_conversations`: each user's conversations, on the user's shard,
//! with an unread counter kept on write, so `conversations` and the badge
//! read one row per conversation instead of counting messages.
//!
//! A counter is unread messages of the conversation stored up to its
//! `counted_seq` (messages carry their conversation's store order `seq`):
//! others' messages after the user's read mark and after they joined,
//! neither deleted for everyone nor hidden by the user. [`settle`] brings
//! counters up to their conversation: new messages are counted by seq
//! (`counted_seq` to the conversation's), a read, a delete or a join counts
//! the unread range again. The count runs on the conversation's shard and
//! the write on the user's, never in one statement or transaction: the
//! write only lands if `counted_seq` and the read mark are still what the
//! count started from, and otherwise the pair is counted again. So a
//! redelivered batch, two persisters at once, or a read racing a write
//! leave the counter exact, and settling twice changes nothing.

use std::collections::{BTreeMap, HashMap, HashSet};

use chat_shared::idgen::first_id_at;
use chat_shared::ids::{ConversationId, GroupId, UserId};

use chat_shared::shards::{of_conversation, of_user, Bucket};

use crate::shards::{fence, Shards};

/// Rounds of "count, then write if nothing moved" before giving up (the
/// caller retries later; every round that lost a race lost it to a writer
/// that made progress).
const ROUNDS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("no PostgreSQL connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
    #[error("{0} counters kept changing under their count")]
    Contended(usize),
}

/// What changed in some conversations, for [`settle`].
#[derive(Debug, Default)]
pub struct Touched {
    conversations: HashMap<ConversationId, Recount>,
}

/// Whose counters a conversation's change touches.
#[derive(Debug, Default)]
struct Recount {
    /// New messages: every member's counter moves.
    stored: bool,
    /// Every member counts again.
    everyone: bool,
    /// These members count again.
    users: HashSet<UserId>,
}

impl Recount {
    fn touches(&self, user: &UserId) -> bool {
        self.stored || self.everyone || self.users.contains(user)
    }

    fn counts_again(&self, user: &UserId) -> bool {
        self.everyone || self.users.contains(user)
    }
}

impl Touched {
    /// New messages (count them for every member).
    pub fn stored(&mut self, conversation: &ConversationId) {
        self.conversations
            .entry(conversation.clone())
            .or_default()
            .stored = true;
    }

    /// Something every member's count may have lost (a delete for
    /// everyone, a membership change): count them again.
    pub fn recount_all(&mut self, conversation: &ConversationId) {
        self.conversations
            .entry(conversation.clone())
            .or_default()
            .everyone = true;
    }

    /// A change to one member's count (a read, a delete for them).
    pub fn recount(&mut self, conversation: &ConversationId, user: &UserId) {
        self.conversations
            .entry(conversation.clone())
            .or_default()
            .users
            .insert(user.clone());
    }
}

/// One (user, conversation) counter being settled.
struct Pair {
    user: UserId,
    conversation: ConversationId,
    /// The first message id the user may count.
    joined: i64,
    /// The conversation's state when read.
    seq: i64,
    last_id: Option<i64>,
    activity: i64,
    recount: bool,
    /// From the user's shard: `counted_seq` (`None`: no row yet) and the
    /// read mark.
    counted: Option<i64>,
    read: i64,
    /// From the conversation's shard.
    found: i64,
}

impl Pair {
    /// Counting replaces the counter (vs adding to it).
    fn replaces(&self) -> bool {
        self.recount || self.counted.is_none()
    }

    fn counted_after(&self) -> i64 {
        if self.replaces() {
            0
        } else {
            self.counted.unwrap_or(0)
        }
    }

    fn floor(&self) -> i64 {
        self.read.max(self.joined)
    }
}

/// A join time in message-id space: what was said before is not unread.
fn joined_floor(joined_at_ms: i64) -> i64 {
    first_id_at(joined_at_ms.max(0) as u64).get() as i64
}

/// Brings the counters of every member of the touched conversations up to
/// date (creating missing rows).
pub async fn settle(shards: &Shards, touched: &Touched) -> Result<(), IndexError> {
    let mut pairs = members(shards, touched).await?;
    for _ in 0..ROUNDS {
        if pairs.is_empty() {
            return Ok(());
        }
        read_marks(shards, &mut pairs).await?;
        // Nothing new for a counter already at its conversation's seq.
        pairs.retain(|p| p.replaces() || p.counted.unwrap_or(0) < p.seq);
        count(shards, &mut pairs).await?;
        pairs = write(shards, pairs).await?;
    }
    if pairs.is_empty() {
        Ok(())
    } else {
        Err(IndexError::Contended(pairs.len()))
    }
}

/// Every member of each touched conversation with the conversation's
/// state, from the conversations' shards.
async fn members(shards: &Shards, touched: &Touched) -> Result<Vec<Pair>, IndexError> {
    let mut pairs = Vec::new();
    for (shard, conversations) in shards.split(touched.conversations.keys(), |c| of_conversation(c))
    {
        let db = shards.pool(shard).get().await?;
        let names: Vec<String> = conversations.iter().map(ToString::to_string).collect();
        let groups: Vec<&str> = conversations
            .iter()
            .filter_map(|c| match c {
                ConversationId::Group(group) => Some(group.as_str()),
                ConversationId::Dm { .. } => None,
            })
            .collect();
        let states = db
            .query(
                "SELECT conversation, seq, last_id, activity FROM conversations
                 WHERE conversation = ANY($1::text[])",
                &[&names],
            )
            .await?;
        let mut state: HashMap<String, (i64, Option<i64>, i64)> = HashMap::new();
        for row in &states {
            state.insert(
                row.try_get(0)?,
                (row.try_get(1)?, row.try_get(2)?, row.try_get(3)?),
            );
        }
        let mut group_members: HashMap<String, Vec<(UserId, i64)>> = HashMap::new();
        if !groups.is_empty() {
            let rows = db
                .query(
                    "SELECT group_id, user_id, joined_at FROM group_members
                     WHERE group_id = ANY($1::text[])",
                    &[&groups],
                )
                .await?;
            for row in &rows {
                let (group, user): (String, String) = (row.try_get(0)?, row.try_get(1)?);
                // A stored id that no longer parses counts for nobody.
                if let Ok(user) = UserId::parse(user) {
                    group_members
                        .entry(group)
                        .or_default()
                        .push((user, joined_floor(row.try_get(2)?)));
                }
            }
        }
        for (conversation, name) in conversations.into_iter().zip(&names) {
            // No row: no message and no group (yet); nothing to count.
            let Some(&(seq, last_id, activity)) = state.get(name) else {
                continue;
            };
            let members = match conversation {
                ConversationId::Dm { low, high } => vec![(low.clone(), 0), (high.clone(), 0)],
                ConversationId::Group(group) => {
                    group_members.remove(group.as_str()).unwrap_or_default()
                }
            };
            let recount = &touched.conversations[conversation];
            // A read in a group of thousands settles one counter, not all.
            for (user, joined) in members.into_iter().filter(|(u, _)| recount.touches(u)) {
                pairs.push(Pair {
                    recount: recount.counts_again(&user),
                    user,
                    conversation: conversation.clone(),
                    joined,
                    seq,
                    last_id,
                    activity,
                    counted: None,
                    read: 0,
                    found: 0,
                });
            }
        }
    }
    Ok(pairs)
}

/// The key columns of `pairs[at]`: each pair's index, user and
/// conversation.
fn keys<'a>(pairs: &'a [Pair], at: &[usize]) -> (Vec<i32>, Vec<&'a str>, Vec<String>) {
    (
        at.iter().map(|&i| i as i32).collect(),
        at.iter().map(|&i| pairs[i].user.as_str()).collect(),
        at.iter()
            .map(|&i| pairs[i].conversation.to_string())
            .collect(),
    )
}

/// Indexes of `pairs` by the shard of the bucket `bucket_of` names.
fn by_shard(
    shards: &Shards,
    pairs: &[Pair],
    bucket_of: impl Fn(&Pair) -> Bucket,
) -> BTreeMap<usize, Vec<usize>> {
    shards.split(0..pairs.len(), |&i| bucket_of(&pairs[i]))
}

/// Each pair's `counted_seq` and read mark, from the users' shards.
async fn read_marks(shards: &Shards, pairs: &mut [Pair]) -> Result<(), IndexError> {
    for (shard, at) in by_shard(shards, pairs, |p| of_user(&p.user)) {
        let (index, users, conversations) = keys(pairs, &at);
        let rows = shards
            .pool(shard)
            .get()
            .await?
            .query(
                "SELECT q.i, uc.counted_seq, COALESCE(r.read_up_to, 0)
                 FROM unnest($1::int[], $2::text[], $3::text[]) AS q(i, u, c)
                 LEFT JOIN user_conversations uc ON uc.user_id = q.u AND uc.conversation = q.c
                 LEFT JOIN read_state r ON r.user_id = q.u AND r.conversation = q.c",
                &[&index, &users, &conversations],
            )
            .await?;
        for row in &rows {
            let i: i32 = row.try_get(0)?;
            let pair = &mut pairs[i as usize];
            pair.counted = row.try_get(1)?;
            pair.read = row.try_get(2)?;
            // A counter never goes back: if another settle counted further
            // than the conversation was when read, count up to there (those
            // messages are stored).
            pair.seq = pair.seq.max(pair.counted.unwrap_or(0));
        }
    }
    Ok(())
}

/// Each pair's unread messages in its range, on the conversations' shards.
async fn count(shards: &Shards, pairs: &mut [Pair]) -> Result<(), IndexError> {
    for (shard, at) in by_shard(shards, pairs, |p| of_conversation(&p.conversation)) {
        let (index, users, conversations) = keys(pairs, &at);
        let from: Vec<i64> = at.iter().map(|&i| pairs[i].counted_after()).collect();
        let to: Vec<i64> = at.iter().map(|&i| pairs[i].seq).collect();
        let floors: Vec<i64> = at.iter().map(|&i| pairs[i].floor()).collect();
        let rows = shards
            .pool(shard)
            .get()
            .await?
            .query(
                "SELECT q.i, (SELECT count(*) FROM messages u
                               WHERE u.conversation = q.c AND u.seq > q.lo AND u.seq <= q.hi
                                 AND u.id > q.floor AND u.sender <> q.u AND NOT u.deleted
                                 AND NOT EXISTS (SELECT 1 FROM hidden_messages h
                                                  WHERE h.conversation = u.conversation
                                                    AND h.id = u.id AND h.user_id = q.u))
                 FROM unnest($1::int[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
                             $6::bigint[]) AS q(i, c, u, lo, hi, floor)",
                &[&index, &conversations, &users, &from, &to, &floors],
            )
            .await?;
        for row in &rows {
            let i: i32 = row.try_get(0)?;
            pairs[i as usize].found = row.try_get(1)?;
        }
    }
    Ok(())
}

/// Writes each counter if its row and read mark are still as counted;
/// returns the pairs that moved meanwhile (to count again).
async fn write(shards: &Shards, pairs: Vec<Pair>) -> Result<Vec<Pair>, IndexError> {
    let mut written = vec![false; pairs.len()];
    for (shard, at) in by_shard(shards, &pairs, |p| of_user(&p.user)) {
        let mut client = shards.pool(shard).get().await?;
        let db = client.transaction().await?;
        fence(&db, at.iter().map(|&i| of_user(&pairs[i].user))).await?;
        let (existing, missing): (Vec<usize>, Vec<usize>) =
            at.into_iter().partition(|&i| pairs[i].counted.is_some());
        let column = |at: &[usize], f: &dyn Fn(&Pair) -> i64| -> Vec<i64> {
            at.iter().map(|&i| f(&pairs[i])).collect()
        };
        if !existing.is_empty() {
            let at = &existing;
            let (index, users, conversations) = keys(&pairs, at);
            let adds: Vec<bool> = at.iter().map(|&i| !pairs[i].replaces()).collect();
            let last: Vec<Option<i64>> = at.iter().map(|&i| pairs[i].last_id).collect();
            let rows = db
                .query(
                    "UPDATE user_conversations uc
                     SET unread = CASE WHEN q.add THEN uc.unread + q.n ELSE q.n END,
                         counted_seq = q.s, joined = q.j,
                         activity = GREATEST(uc.activity, q.a),
                         last_id = GREATEST(uc.last_id, q.l)
                     FROM unnest($1::int[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
                                 $6::bigint[], $7::bigint[], $8::bool[], $9::bigint[],
                                 $10::bigint[], $11::bigint[])
                          AS q(i, u, c, n, s, a, l, add, expect, rd, j)
                     WHERE uc.user_id = q.u AND uc.conversation = q.c
                       AND uc.counted_seq = q.expect
                       AND COALESCE((SELECT read_up_to FROM read_state r
                                      WHERE r.user_id = q.u AND r.conversation = q.c), 0) = q.rd
                     RETURNING q.i",
                    &[
                        &index,
                        &users,
                        &conversations,
                        &column(at, &|p| p.found),
                        &column(at, &|p| p.seq),
                        &column(at, &|p| p.activity),
                        &last,
                        &adds,
                        &column(at, &|p| p.counted.unwrap_or(0)),
                        &column(at, &|p| p.read),
                        &column(at, &|p| p.joined),
                    ],
                )
                .await?;
            for row in &rows {
                let i: i32 = row.try_get(0)?;
                written[i as usize] = true;
            }
        }
        if !missing.is_empty() {
            let at = &missing;
            let (_, users, conversations) = keys(&pairs, at);
            let last: Vec<Option<i64>> = at.iter().map(|&i| pairs[i].last_id).collect();
            let rows = db
                .query(
                    "INSERT INTO user_conversations
                         (user_id, conversation, joined, activity, last_id, unread, counted_seq)
                     SELECT q.u, q.c, q.j, q.a, q.l, q.n, q.s
                     FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[],
                                 $6::bigint[], $7::bigint[], $8::bigint[])
                          AS q(u, c, j, a, l, n, s, rd)
                     WHERE COALESCE((SELECT read_up_to FROM read_state r
                                      WHERE r.user_id = q.u AND r.conversation = q.c), 0) = q.rd
                     ON CONFLICT DO NOTHING
                     RETURNING user_id, conversation",
                    &[
                        &users,
                        &conversations,
                        &column(at, &|p| p.joined),
                        &column(at, &|p| p.activity),
                        &last,
                        &column(at, &|p| p.found),
                        &column(at, &|p| p.seq),
                        &column(at, &|p| p.read),
                    ],
                )
                .await?;
            let inserted: HashSet<(String, String)> = rows
                .iter()
                .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
                .collect::<Result<_, tokio_postgres::Error>>()?;
            for &i in at {
                let key = (
                    pairs[i].user.as_str().to_string(),
                    pairs[i].conversation.to_string(),
                );
                written[i] = inserted.contains(&key);
            }
        }
        db.commit().await?;
    }
    Ok(pairs
        .into_iter()
        .zip(written)
        .filter_map(|(pair, done)| (!done).then_some(pair))
        .collect())
}

/// Drops `users`' rows of `group` unless they are members again: what a
/// removal or a leave leaves behind, applied again harmlessly.
pub async fn forget(shards: &Shards, group: &GroupId, users: &[UserId]) -> Result<(), IndexError> {
    let conversation = ConversationId::Group(group.clone());
    let ids: Vec<&str> = users.iter().map(UserId::as_str).collect();
    let still: HashSet<String> = shards
        .conversation(&conversation)
        .get()
        .await?
        .query(
            "SELECT user_id FROM group_members WHERE group_id = $1 AND user_id = ANY($2::text[])",
            &[&group.as_str(), &ids],
        )
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    let name = conversation.to_string();
    for user in users.iter().filter(|u| !still.contains(u.as_str())) {
        let mut client = shards.user(user).get().await?;
        let tx = client.transaction().await?;
        fence(&tx, [of_user(user)]).await?;
        tx.execute(
            "DELETE FROM user_conversations WHERE user_id = $1 AND conversation = $2",
            &[&user.as_str(), &name],
        )
        .await?;
        tx.commit().await?;
    }
    Ok(())
}
