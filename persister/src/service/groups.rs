//! Groups: create, add, remove, leave, info and members, on the group's
//! shard. Every change writes its membership event into the outbox in the
//! same transaction (see `outbox`); the members' `user_conversations` rows
//! (on their shards) follow from the event after COMMIT.

use std::collections::HashSet;

use chat_shared::ids::{ConversationId, GroupId, UserId};
use chat_shared::rpc::{self, RpcError};
use chat_shared::wire::{ErrorCode, GroupView, MembershipChange};
use deadpool_postgres::GenericClient;

use super::{
    activity_of, begin, column, corrupt, now_ms, unavailable, Service, MAX_GROUP_NAME_CHARS,
};

impl Service {
    pub(super) async fn group_members(
        &self,
        db: &impl GenericClient,
        group: &GroupId,
    ) -> Result<Vec<UserId>, RpcError> {
        let rows = db
            .query(
                "SELECT user_id FROM group_members WHERE group_id = $1 ORDER BY joined_at, user_id",
                &[&group.as_str()],
            )
            .await
            .map_err(unavailable("read group_members"))?;
        rows.iter()
            .map(|row| UserId::parse(column::<String>(row, 0)?).map_err(|_| corrupt("member")))
            .collect()
    }

    /// The group's row, or `not_found`.
    pub(super) async fn group_row(
        &self,
        db: &impl GenericClient,
        group: &GroupId,
        lock: bool,
    ) -> Result<(String, UserId), RpcError> {
        let sql = if lock {
            "SELECT name, owner FROM groups WHERE id = $1 FOR UPDATE"
        } else {
            "SELECT name, owner FROM groups WHERE id = $1"
        };
        let row = db
            .query_opt(sql, &[&group.as_str()])
            .await
            .map_err(unavailable("read groups"))?
            .ok_or_else(|| RpcError::new(ErrorCode::NotFound, "no such group"))?;
        let owner = UserId::parse(column::<String>(&row, 1)?).map_err(|_| corrupt("owner"))?;
        Ok((column(&row, 0)?, owner))
    }

    /// A connection to `group`'s shard.
    async fn group_db(&self, group: &GroupId) -> Result<deadpool_postgres::Object, RpcError> {
        self.conversation_db(&ConversationId::Group(group.clone()))
            .await
    }

    pub(super) async fn members(
        &self,
        request: rpc::MembersRequest,
    ) -> Result<Vec<UserId>, RpcError> {
        let db = self.group_db(&request.group).await?;
        self.group_row(&db, &request.group, false).await?;
        self.group_members(&db, &request.group).await
    }

    pub(super) async fn group_info(
        &self,
        request: rpc::GroupRequest,
    ) -> Result<GroupView, RpcError> {
        let db = self.group_db(&request.group).await?;
        let (name, owner) = self.group_row(&db, &request.group, false).await?;
        let members = self.group_members(&db, &request.group).await?;
        if !members.contains(&request.user) {
            return Err(RpcError::new(
                ErrorCode::Forbidden,
                "not a member of this group",
            ));
        }
        Ok(GroupView {
            id: request.group,
            name,
            owner,
            members,
        })
    }

    pub(super) async fn group_create(
        &self,
        request: rpc::GroupCreateRequest,
    ) -> Result<GroupView, RpcError> {
        let name = request.name.trim().to_string();
        if name.is_empty() || name.chars().count() > MAX_GROUP_NAME_CHARS || name.contains('\0') {
            return Err(RpcError::new(
                ErrorCode::BadRequest,
                "a group name has 1 to 200 characters and no NUL",
            ));
        }
        let members = self.distinct_members(
            std::iter::once(request.user.clone()).chain(request.members),
            &HashSet::new(),
            self.max_group_members,
        )?;
        let group = GroupId::parse(format!("g{:016x}", rand::random::<u64>()))
            .map_err(|_| corrupt("group id"))?;
        let now = now_ms();
        // Privacy settings are on the home shard, the group on its own.
        self.check_adds(&self.client().await?, &request.user, &members)
            .await?;
        let mut db = self.group_db(&group).await?;
        let tx = begin_writing(&mut db, &group).await?;
        tx.execute(
            "INSERT INTO groups (id, name, owner, created_at) VALUES ($1, $2, $3, $4)",
            &[&group.as_str(), &name, &request.user.as_str(), &now],
        )
        .await
        .map_err(unavailable("insert into groups"))?;
        let ids: Vec<&str> = members.iter().map(UserId::as_str).collect();
        tx.execute(
            "INSERT INTO group_members (group_id, user_id, joined_at) SELECT $1, u, $2 FROM UNNEST($3::text[]) AS u",
            &[&group.as_str(), &now, &ids],
        )
        .await
        .map_err(unavailable("insert into group_members"))?;
        tx.execute(
            "INSERT INTO conversations (conversation, last_id, activity) VALUES ($1, NULL, $2)",
            &[
                &ConversationId::Group(group.clone()).to_string(),
                &activity_of(now),
            ],
        )
        .await
        .map_err(unavailable("insert into conversations"))?;
        let event = self
            .record_event(
                &tx,
                &group,
                MembershipChange::Created,
                members.clone(),
                &request.user,
                members.clone(),
            )
            .await?;
        tx.commit().await.map_err(unavailable("commit"))?;
        self.index_event(&event).await;
        self.publish_outbox_after_change().await;
        Ok(GroupView {
            id: group,
            name,
            owner: request.user,
            members,
        })
    }

    /// `users` without repeats and without those in `except`, refused as
    /// `too_large` once more than `room` remain (checked as it goes, so a
    /// huge list costs no more than `room` entries).
    pub(super) fn distinct_members(
        &self,
        users: impl IntoIterator<Item = UserId>,
        except: &HashSet<&UserId>,
        room: usize,
    ) -> Result<Vec<UserId>, RpcError> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for user in users {
            if except.contains(&user) || !seen.insert(user.clone()) {
                continue;
            }
            if out.len() == room {
                return Err(RpcError::new(
                    ErrorCode::TooLarge,
                    format!("a group holds at most {} members", self.max_group_members),
                ));
            }
            out.push(user);
        }
        Ok(out)
    }

    pub(super) async fn group_add(
        &self,
        request: rpc::GroupChangeRequest,
    ) -> Result<GroupView, RpcError> {
        self.change_members(request, MembershipChange::Added).await
    }

    pub(super) async fn group_remove(
        &self,
        request: rpc::GroupChangeRequest,
    ) -> Result<GroupView, RpcError> {
        self.change_members(request, MembershipChange::Removed)
            .await
    }

    /// Owner-only add/remove.
    pub(super) async fn change_members(
        &self,
        request: rpc::GroupChangeRequest,
        change: MembershipChange,
    ) -> Result<GroupView, RpcError> {
        if request.users.is_empty() {
            return Err(RpcError::new(
                ErrorCode::BadRequest,
                "users must not be empty",
            ));
        }
        // Privacy settings are on the home shard, the group on its own.
        let home = self.client().await?;
        let mut db = self.group_db(&request.group).await?;
        let tx = begin_writing(&mut db, &request.group).await?;
        let (name, owner) = self.group_row(&tx, &request.group, true).await?;
        let before = self.group_members(&tx, &request.group).await?;
        let before_set: HashSet<&UserId> = before.iter().collect();
        if !before_set.contains(&request.user) {
            return Err(RpcError::new(
                ErrorCode::Forbidden,
                "not a member of this group",
            ));
        }
        if owner != request.user {
            return Err(RpcError::new(
                ErrorCode::Forbidden,
                "only the owner changes members",
            ));
        }
        let affected: Vec<UserId> = match change {
            MembershipChange::Added => {
                let room = self.max_group_members.saturating_sub(before.len());
                let new =
                    self.distinct_members(request.users.iter().cloned(), &before_set, room)?;
                self.check_adds(&home, &request.user, &new).await?;
                let ids: Vec<&str> = new.iter().map(UserId::as_str).collect();
                tx.execute(
                    "INSERT INTO group_members (group_id, user_id, joined_at) SELECT $1, u, $2 FROM UNNEST($3::text[]) AS u
                     ON CONFLICT DO NOTHING",
                    &[&request.group.as_str(), &now_ms(), &ids],
                )
                .await
                .map_err(unavailable("insert into group_members"))?;
                new
            }
            _ => {
                if request.users.contains(&owner) {
                    return Err(RpcError::new(
                        ErrorCode::BadRequest,
                        "the owner leaves with group.leave",
                    ));
                }
                let gone: Vec<UserId> = request
                    .users
                    .iter()
                    .filter(|u| before_set.contains(u))
                    .cloned()
                    .collect();
                let ids: Vec<&str> = gone.iter().map(UserId::as_str).collect();
                tx.execute(
                    "DELETE FROM group_members WHERE group_id = $1 AND user_id = ANY($2::text[])",
                    &[&request.group.as_str(), &ids],
                )
                .await
                .map_err(unavailable("delete from group_members"))?;
                gone
            }
        };
        let after = self.group_members(&tx, &request.group).await?;
        let event = if affected.is_empty() {
            None
        } else {
            Some(
                self.record_event(
                    &tx,
                    &request.group,
                    change,
                    affected,
                    &request.user,
                    after.clone(),
                )
                .await?,
            )
        };
        tx.commit().await.map_err(unavailable("commit"))?;
        if let Some(event) = event {
            self.index_event(&event).await;
            self.publish_outbox_after_change().await;
        }
        Ok(GroupView {
            id: request.group,
            name,
            owner,
            members: after,
        })
    }

    pub(super) async fn group_leave(&self, request: rpc::GroupRequest) -> Result<(), RpcError> {
        let mut db = self.group_db(&request.group).await?;
        let tx = begin_writing(&mut db, &request.group).await?;
        let (_, owner) = self.group_row(&tx, &request.group, true).await?;
        let removed = tx
            .execute(
                "DELETE FROM group_members WHERE group_id = $1 AND user_id = $2",
                &[&request.group.as_str(), &request.user.as_str()],
            )
            .await
            .map_err(unavailable("delete from group_members"))?;
        if removed == 0 {
            return Err(RpcError::new(
                ErrorCode::Forbidden,
                "not a member of this group",
            ));
        }
        let after = self.group_members(&tx, &request.group).await?;
        if owner == request.user {
            // Ownership passes to the longest-standing member.
            if let Some(heir) = after.first() {
                tx.execute(
                    "UPDATE groups SET owner = $2 WHERE id = $1",
                    &[&request.group.as_str(), &heir.as_str()],
                )
                .await
                .map_err(unavailable("update groups"))?;
            }
        }
        let event = self
            .record_event(
                &tx,
                &request.group,
                MembershipChange::Left,
                vec![request.user.clone()],
                &request.user,
                after,
            )
            .await?;
        tx.commit().await.map_err(unavailable("commit"))?;
        self.index_event(&event).await;
        self.publish_outbox_after_change().await;
        Ok(())
    }
}

/// A transaction that writes `group`'s rows, fenced (a move of its bucket
/// refuses it: `unavailable`, and the client's retry follows the new map).
async fn begin_writing<'a>(
    db: &'a mut deadpool_postgres::Object,
    group: &GroupId,
) -> Result<deadpool_postgres::Transaction<'a>, RpcError> {
    let tx = begin(db).await?;
    let bucket = chat_shared::shards::of_conversation(&ConversationId::Group(group.clone()));
    crate::shards::fence(&tx, [bucket])
        .await
        .map_err(unavailable("fence a group's rows"))?;
    Ok(tx)
}
