//! The transactional outbox of membership events: a group change writes
//! its event into `group_event_outbox` before COMMIT, and it is published
//! to EVENTS (then deleted) after, so no change goes unannounced and no
//! event announces a change that was rolled back.

use async_nats::HeaderMap;
use chat_shared::ids::{GroupId, UserId};
use chat_shared::rpc::RpcError;
use chat_shared::subjects;
use chat_shared::wire::{GroupEvent, MembershipChange};

use super::{column, corrupt, now_ms, unavailable, Service, OUTBOX_WAIT};

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
    ) -> Result<(), RpcError> {
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
            "INSERT INTO group_event_outbox (id, body) VALUES ($1, $2)",
            &[&event.id, &body],
        )
        .await
        .map_err(unavailable("insert into group_event_outbox"))?;
        Ok(())
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

    async fn drain_outbox(&self) -> Result<(), RpcError> {
        let db = self.client().await?;
        let rows = db
            .query("SELECT id, body FROM group_event_outbox ORDER BY seq", &[])
            .await
            .map_err(unavailable("read group_event_outbox"))?;
        for row in rows {
            let (id, body): (String, Vec<u8>) = (column(&row, 0)?, column(&row, 1)?);
            match id.split_once('/').and_then(|(g, _)| GroupId::parse(g).ok()) {
                Some(group) if !self.publish_raw(&id, &group, body).await => return Ok(()),
                Some(_) => {}
                None => tracing::error!(%id, "dropping an outbox event with a malformed id"),
            }
            db.execute("DELETE FROM group_event_outbox WHERE id = $1", &[&id])
                .await
                .map_err(unavailable("delete from group_event_outbox"))?;
        }
        Ok(())
    }
}
