//! The transactional outbox of membership events: a group change writes
//! its event into `group_event_outbox` (on the group's shard) before
//! COMMIT, and after it the event is applied to the members' rows of
//! `user_conversations`, published to EVENTS and deleted, so no change
//! goes unannounced or unindexed and no event announces a change that was
//! rolled back.

use async_nats::HeaderMap;
use chat_shared::ids::{ConversationId, GroupId, UserId};
use chat_shared::rpc::RpcError;
use chat_shared::subjects;
use chat_shared::wire::{GroupEvent, MembershipChange};

use super::{column, corrupt, now_ms, unavailable, Service, OUTBOX_WAIT};
use crate::user_index::{self, Touched};

impl Service {
    /// Writes a membership event into the outbox inside the change's
    /// transaction; [`Service::publish_outbox`] publishes it after COMMIT.
    pub(super) async fn record_event(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        group: &GroupId,
        change: MembershipChange,
        users: Vec<UserId>,
        by: &UserId,
        members: Vec<UserId>,
    ) -> Result<GroupEvent, RpcError> {
        let row = tx
            .query_one(
                "UPDATE groups SET version = version + 1 WHERE id = $1 RETURNING version",
                &[&group.as_str()],
            )
            .await
            .map_err(unavailable("update groups"))?;
        let version: i64 = column(&row, 0)?;
        let event = GroupEvent {
            id: format!("{group}/{version}"),
            group: group.clone(),
            event: change,
            users,
            by: by.clone(),
            members,
            ts: now_ms() as u64,
        };
        let body = serde_json::to_vec(&event).map_err(|_| corrupt("event"))?;
        tx.execute(
            "INSERT INTO group_event_outbox (group_id, id, body) VALUES ($1, $2, $3)",
            &[&group.as_str(), &event.id, &body],
        )
        .await
        .map_err(unavailable("insert into group_event_outbox"))?;
        Ok(event)
    }

    /// Applies a committed membership event to its users' rows of
    /// `user_conversations`: a member added (or the group created) gets a
    /// row counted from when they joined, one who left or was removed
    /// loses it. Run after COMMIT and again when the event is published
    /// from the outbox (so a crash in between is repaired), both harmless
    /// twice. A failure is logged; the outbox drain applies it again.
    pub(super) async fn index_event(&self, event: &GroupEvent) -> bool {
        let conversation = ConversationId::Group(event.group.clone());
        let applied = match event.event {
            MembershipChange::Created | MembershipChange::Added => {
                let mut touched = Touched::default();
                for user in &event.users {
                    touched.recount(&conversation, user);
                }
                user_index::settle(&self.shards, &touched).await
            }
            MembershipChange::Removed | MembershipChange::Left => {
                user_index::forget(&self.shards, &event.group, &event.users).await
            }
        };
        match applied {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, id = %event.id, "membership not in user_conversations yet");
                false
            }
        }
    }

    pub(super) async fn publish_raw(&self, id: &str, group: &GroupId, body: Vec<u8>) -> bool {
        let mut headers = HeaderMap::new();
        headers.insert(subjects::MSG_ID_HEADER, id);
        match self
            .js
            .publish_with_headers(subjects::group_event(group), headers, body.into())
            .await
        {
            Ok(ack) => match ack.await {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(error = %e, id, "group event not acknowledged; kept in the outbox");
                    false
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, id, "cannot publish group event; kept in the outbox");
                false
            }
        }
    }

    /// Publishes the outbox after a change, waiting a little so that caches
    /// are usually invalidated before the requester hears back, but never
    /// holding the reply hostage to a slow NATS: the drain goes on in the
    /// background (and the periodic drain retries what fails).
    pub(super) async fn publish_outbox_after_change(&self) {
        let service = self.clone();
        let drain = tokio::spawn(async move { service.publish_outbox().await });
        let _ = tokio::time::timeout(OUTBOX_WAIT, drain).await;
    }

    /// Publishes every committed event still in the outbox, oldest first,
    /// removing each once JetStream has it; stops at the first failure so a
    /// group's events never overtake each other. Runs after every change and
    /// at start (for a crash between COMMIT and publish). Repeats are safe:
    /// the event id is the `Nats-Msg-Id`.
    pub(super) async fn publish_outbox(&self) {
        let _one_at_a_time = self.outbox.lock().await;
        // What failed is logged where it failed; the periodic drain retries.
        let _ = self.drain_outbox().await;
    }

    /// Each shard's outbox in commit order (a group's events are all on
    /// its shard, so they stay in order).
    async fn drain_outbox(&self) -> Result<(), RpcError> {
        for (_, pool) in self.shards.all() {
            self.drain_shard(pool).await?;
        }
        Ok(())
    }

    async fn drain_shard(&self, pool: &deadpool_postgres::Pool) -> Result<(), RpcError> {
        let db = super::connect(pool).await?;
        let rows = db
            .query("SELECT id, body FROM group_event_outbox ORDER BY seq", &[])
            .await
            .map_err(unavailable("read group_event_outbox"))?;
        for row in rows {
            let (id, body): (String, Vec<u8>) = (column(&row, 0)?, column(&row, 1)?);
            match serde_json::from_slice::<GroupEvent>(&body) {
                Ok(event) if !self.index_event(&event).await => return Ok(()),
                Ok(event) if !self.publish_raw(&id, &event.group, body).await => return Ok(()),
                Ok(_) => {}
                Err(e) => tracing::error!(%id, error = %e, "dropping a malformed outbox event"),
            }
            db.execute("DELETE FROM group_event_outbox WHERE id = $1", &[&id])
                .await
                .map_err(unavailable("delete from group_event_outbox"))?;
        }
        Ok(())
    }
}
