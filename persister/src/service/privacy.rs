//! Blocks, mutes and privacy settings (PROTOCOL.md v1.1 "Blocks, mutes,
//! privacy"), and the rules the rest of the service asks of them: who may
//! add whom to a group, and who is told of a read receipt.
//!
//! A block change commits, then is announced on core NATS twice: to the
//! block caches (`chat.event.block.<blocker>.<blocked>`, so edges, routers
//! and presence drop both users' block sets) and to presence as a
//! [`FriendChange`] (so it refetches both friend lists, and after an
//! unblock between friends shows each the other's presence again). Like
//! friend changes, these are hints: a lost one is repaired by the caches'
//! TTL, never the stored state.

use chat_shared::ids::UserId;
use chat_shared::presence::FriendChange;
use chat_shared::rpc::{self, RpcError};
use chat_shared::subjects;
use chat_shared::wire::{ErrorCode, GroupAdds, LastSeen, PrivacySettings};
use deadpool_postgres::GenericClient;

use super::{column, corrupt, now_ms, unavailable, Service};

/// Users one user may block: the `blocked` reply and each block set in
/// the caches stay bounded.
const MAX_BLOCKS: i64 = 5000;

fn last_seen_name(value: LastSeen) -> &'static str {
    match value {
        LastSeen::Everyone => "everyone",
        LastSeen::Friends => "friends",
        LastSeen::Nobody => "nobody",
    }
}

fn group_adds_name(value: GroupAdds) -> &'static str {
    match value {
        GroupAdds::Everyone => "everyone",
        GroupAdds::Friends => "friends",
    }
}

fn parse_settings(row: &tokio_postgres::Row) -> Result<PrivacySettings, RpcError> {
    let last_seen = match column::<&str>(row, 0)? {
        "everyone" => LastSeen::Everyone,
        "friends" => LastSeen::Friends,
        "nobody" => LastSeen::Nobody,
        _ => return Err(corrupt("last_seen")),
    };
    let group_adds = match column::<&str>(row, 1)? {
        "everyone" => GroupAdds::Everyone,
        "friends" => GroupAdds::Friends,
        _ => return Err(corrupt("group_adds")),
    };
    Ok(PrivacySettings {
        last_seen,
        group_adds,
        read_receipts: column(row, 2)?,
    })
}

/// Whether `member` is told of a reader's read receipt: the reader's own
/// devices always (that is how their other devices learn of the read);
/// anyone else never across a block, and only while both share read
/// receipts (`read_receipts:false` sends none and sees none).
pub(super) fn sees_read_receipt(
    is_reader: bool,
    reader_shares: bool,
    member_shares: bool,
    blocked: bool,
) -> bool {
    is_reader || (reader_shares && member_shares && !blocked)
}

fn user_rows(rows: &[tokio_postgres::Row]) -> Result<Vec<UserId>, RpcError> {
    rows.iter()
        .map(|row| UserId::parse(column::<&str>(row, 0)?).map_err(|_| corrupt("user")))
        .collect()
}

impl Service {
    pub(super) async fn block(&self, request: rpc::BlockRequest) -> Result<(), RpcError> {
        let rpc::BlockRequest { user, other } = request;
        if user == other {
            return Err(RpcError::new(
                ErrorCode::BadRequest,
                "you cannot block yourself",
            ));
        }
        let db = self.client().await?;
        // One statement: the cap and the insert cannot race apart, and a
        // repeat inserts nothing and announces nothing.
        let inserted = db
            .execute(
                "INSERT INTO blocks (user_id, blocked, since)
                 SELECT $1, $2, $3 WHERE (SELECT count(*) FROM blocks WHERE user_id = $1) < $4
                 ON CONFLICT DO NOTHING",
                &[&user.as_str(), &other.as_str(), &now_ms(), &MAX_BLOCKS],
            )
            .await
            .map_err(unavailable("insert into blocks"))?;
        if inserted == 0 {
            let exists = db
                .query_opt(
                    "SELECT 1 FROM blocks WHERE user_id = $1 AND blocked = $2",
                    &[&user.as_str(), &other.as_str()],
                )
                .await
                .map_err(unavailable("read blocks"))?;
            return match exists {
                Some(_) => Ok(()),
                None => Err(RpcError::new(
                    ErrorCode::TooLarge,
                    format!("you have blocked {MAX_BLOCKS} users already"),
                )),
            };
        }
        self.announce_block(&db, &user, &other).await;
        Ok(())
    }

    pub(super) async fn unblock(&self, request: rpc::BlockRequest) -> Result<(), RpcError> {
        let rpc::BlockRequest { user, other } = request;
        let db = self.client().await?;
        let removed = db
            .execute(
                "DELETE FROM blocks WHERE user_id = $1 AND blocked = $2",
                &[&user.as_str(), &other.as_str()],
            )
            .await
            .map_err(unavailable("delete from blocks"))?;
        if removed > 0 {
            self.announce_block(&db, &user, &other).await;
        }
        Ok(())
    }

    /// Tells the block caches and presence that the pair changed.
    async fn announce_block(&self, db: &impl GenericClient, user: &UserId, other: &UserId) {
        if let Err(e) = self
            .nats
            .publish(subjects::block_event(user, other), Default::default())
            .await
        {
            tracing::warn!(error = %e, "cannot announce a block change");
        }
        // Presence shares between friends with no block either way; after
        // this change that is what `friends_of` answers.
        let shared = db
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM friendships WHERE user_id = $1 AND other = $2 AND state = 'friends')
                    AND NOT EXISTS (SELECT 1 FROM blocks WHERE (user_id = $1 AND blocked = $2) OR (user_id = $2 AND blocked = $1))",
                &[&user.as_str(), &other.as_str()],
            )
            .await
            .map_err(unavailable("read friendships"))
            .and_then(|row| column::<bool>(&row, 0));
        // Unknown (a read failed): presence only forgets both lists.
        let friends = shared.unwrap_or(false);
        let hides_last_active = if friends {
            self.hiding_last_active(db, user, other)
                .await
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let change = FriendChange {
            users: [user.clone(), other.clone()],
            friends,
            hides_last_active,
        };
        self.publish_friend_change(&change).await;
    }

    pub(super) async fn blocked(&self, request: rpc::UserRequest) -> Result<Vec<UserId>, RpcError> {
        let db = self.client().await?;
        let rows = db
            .query(
                "SELECT blocked FROM blocks WHERE user_id = $1 ORDER BY since, blocked LIMIT $2",
                &[&request.user.as_str(), &MAX_BLOCKS],
            )
            .await
            .map_err(unavailable("read blocks"))?;
        user_rows(&rows)
    }

    pub(super) async fn block_peers(
        &self,
        request: rpc::UserRequest,
    ) -> Result<Vec<UserId>, RpcError> {
        let db = self.client().await?;
        let rows = db
            .query(
                "SELECT blocked FROM blocks WHERE user_id = $1
                 UNION SELECT user_id FROM blocks WHERE blocked = $1",
                &[&request.user.as_str()],
            )
            .await
            .map_err(unavailable("read blocks"))?;
        user_rows(&rows)
    }

    pub(super) async fn mute(&self, request: rpc::MuteRequest) -> Result<(), RpcError> {
        let db = self.client().await?;
        self.check_access(&db, &request.user, &request.conversation)
            .await?;
        let conversation = request.conversation.to_string();
        match request.until {
            Some(until) => {
                let until = i64::try_from(until).unwrap_or(i64::MAX);
                db.execute(
                    "INSERT INTO mutes (user_id, conversation, until) VALUES ($1, $2, $3)
                     ON CONFLICT (user_id, conversation) DO UPDATE SET until = EXCLUDED.until",
                    &[&request.user.as_str(), &conversation, &until],
                )
                .await
                .map_err(unavailable("upsert mutes"))?;
            }
            None => {
                db.execute(
                    "DELETE FROM mutes WHERE user_id = $1 AND conversation = $2",
                    &[&request.user.as_str(), &conversation],
                )
                .await
                .map_err(unavailable("delete from mutes"))?;
            }
        }
        Ok(())
    }

    pub(super) async fn settings(
        &self,
        request: rpc::SettingsRequest,
    ) -> Result<PrivacySettings, RpcError> {
        let rpc::SettingsRequest { user, change } = request;
        let db = self.client().await?;
        let changes = change.last_seen.is_some()
            || change.group_adds.is_some()
            || change.read_receipts.is_some();
        let row = if changes {
            let row = db
                .query_one(
                    "INSERT INTO privacy_settings AS s (user_id, last_seen, group_adds, read_receipts)
                     VALUES ($1, COALESCE($2, 'everyone'), COALESCE($3, 'everyone'), COALESCE($4, true))
                     ON CONFLICT (user_id) DO UPDATE SET
                        last_seen = COALESCE($2, s.last_seen),
                        group_adds = COALESCE($3, s.group_adds),
                        read_receipts = COALESCE($4, s.read_receipts)
                     RETURNING last_seen, group_adds, read_receipts",
                    &[
                        &user.as_str(),
                        &change.last_seen.map(last_seen_name),
                        &change.group_adds.map(group_adds_name),
                        &change.read_receipts,
                    ],
                )
                .await
                .map_err(unavailable("upsert privacy_settings"))?;
            Some(row)
        } else {
            db.query_opt(
                "SELECT last_seen, group_adds, read_receipts FROM privacy_settings WHERE user_id = $1",
                &[&user.as_str()],
            )
            .await
            .map_err(unavailable("read privacy_settings"))?
        };
        let settings = match row {
            Some(row) => parse_settings(&row)?,
            None => PrivacySettings::default(),
        };
        if change.last_seen.is_some() {
            // Presence caches what each user shows with their friend list:
            // naming the user twice makes it refetch theirs.
            self.publish_friend_change(&FriendChange {
                users: [user.clone(), user],
                friends: false,
                hides_last_active: Vec::new(),
            })
            .await;
        }
        Ok(settings)
    }

    /// Which of `a` and `b` hide `last_active` from their friends.
    pub(super) async fn hiding_last_active(
        &self,
        db: &impl GenericClient,
        a: &UserId,
        b: &UserId,
    ) -> Result<Vec<UserId>, RpcError> {
        let rows = db
            .query(
                "SELECT user_id FROM privacy_settings
                 WHERE user_id IN ($1, $2) AND last_seen = 'nobody'",
                &[&a.as_str(), &b.as_str()],
            )
            .await
            .map_err(unavailable("read privacy_settings"))?;
        user_rows(&rows)
    }

    /// `forbidden` unless `adder` may add every one of `users` to a group:
    /// none of them blocked `adder`, and those who take group adds from
    /// friends only are `adder`'s friends. One message for both, so a
    /// refusal does not tell a blocked user they are blocked.
    pub(super) async fn check_adds(
        &self,
        db: &impl GenericClient,
        adder: &UserId,
        users: &[UserId],
    ) -> Result<(), RpcError> {
        let ids: Vec<&str> = users.iter().map(UserId::as_str).collect();
        let refused = db
            .query(
                "SELECT u FROM UNNEST($2::text[]) AS u
                 WHERE u <> $1 AND (
                    EXISTS (SELECT 1 FROM blocks WHERE user_id = u AND blocked = $1)
                    OR (EXISTS (SELECT 1 FROM privacy_settings WHERE user_id = u AND group_adds = 'friends')
                        AND NOT EXISTS (SELECT 1 FROM friendships
                                        WHERE user_id = u AND other = $1 AND state = 'friends')))
                 LIMIT 1",
                &[&adder.as_str(), &ids],
            )
            .await
            .map_err(unavailable("read privacy"))?;
        match user_rows(&refused)?.first() {
            None => Ok(()),
            Some(user) => Err(RpcError::new(
                ErrorCode::Forbidden,
                format!("{user} does not accept group adds from you"),
            )),
        }
    }

    /// Who of `members` is told of `reader`'s read receipt in a
    /// conversation ([`sees_read_receipt`]). The one hook of blocks and
    /// `read_receipts` on read receipts.
    pub(super) async fn read_receipt_audience(
        &self,
        db: &impl GenericClient,
        reader: &UserId,
        members: Vec<UserId>,
    ) -> Result<Vec<UserId>, RpcError> {
        let ids: Vec<&str> = members.iter().map(UserId::as_str).collect();
        let rows = db
            .query(
                "SELECT u,
                        COALESCE((SELECT read_receipts FROM privacy_settings WHERE user_id = $1), true),
                        COALESCE((SELECT read_receipts FROM privacy_settings WHERE user_id = u), true),
                        EXISTS (SELECT 1 FROM blocks
                                WHERE (user_id = $1 AND blocked = u) OR (user_id = u AND blocked = $1))
                 FROM UNNEST($2::text[]) AS u",
                &[&reader.as_str(), &ids],
            )
            .await
            .map_err(unavailable("read privacy"))?;
        let mut audience = Vec::with_capacity(rows.len());
        for row in &rows {
            let member = UserId::parse(column::<&str>(row, 0)?).map_err(|_| corrupt("member"))?;
            if sees_read_receipt(
                member == *reader,
                column(row, 1)?,
                column(row, 2)?,
                column(row, 3)?,
            ) {
                audience.push(member);
            }
        }
        Ok(audience)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_receipts_reach_the_reader_always_and_others_only_both_ways_open() {
        assert!(sees_read_receipt(true, false, false, false));
        assert!(sees_read_receipt(false, true, true, false));
        assert!(
            !sees_read_receipt(false, false, true, false),
            "reader shares none"
        );
        assert!(
            !sees_read_receipt(false, true, false, false),
            "member sees none"
        );
        assert!(
            !sees_read_receipt(false, true, true, true),
            "a block hides it"
        );
    }
}
