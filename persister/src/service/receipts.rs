//! Receipts: read events published once a read is stored, and `receipts`,
//! every member's stored watermarks.

use async_nats::HeaderMap;
use chat_shared::ids::{MessageId, UserId};
use chat_shared::receipts::ReadEvent;
use chat_shared::rpc::{self, RpcError};
use chat_shared::shards::bucket;
use chat_shared::subjects;
use chat_shared::wire::{ErrorCode, MemberReceipts};

use super::{column, corrupt, unavailable, Service};

impl Service {
    /// Publishes a stored read to stream RECEIPTS and waits for JetStream
    /// to have it; `unavailable` otherwise (a retried `read` publishes it
    /// again).
    pub(super) async fn publish_read(&self, event: ReadEvent) -> Result<(), RpcError> {
        let body = serde_json::to_vec(&event).map_err(|_| corrupt("read event"))?;
        let mut headers = HeaderMap::new();
        headers.insert(
            subjects::MSG_ID_HEADER,
            subjects::read_event_id(&event.conversation, &event.user, event.up_to).as_str(),
        );
        let not_sent = |e: &dyn std::fmt::Display| {
            tracing::warn!(error = %e, "read receipt not published");
            RpcError::new(
                ErrorCode::Unavailable,
                "read stored, its receipt not sent: retry",
            )
        };
        let ack = self
            .js
            .publish_with_headers(subjects::READ_RECEIPTS, headers, body.into())
            .await
            .map_err(|e| not_sent(&e))?;
        ack.await.map_err(|e| not_sent(&e))?;
        Ok(())
    }

    /// Every member's delivered and read watermarks, members only.
    pub(super) async fn receipts(
        &self,
        request: rpc::ConversationRequest,
    ) -> Result<Vec<MemberReceipts>, RpcError> {
        let members = self
            .members_of(&request.user, &request.conversation)
            .await?;
        // Each member's watermarks are on their own shard.
        let mut rows = Vec::with_capacity(members.len());
        for (shard, members) in self
            .shards
            .split(members.iter().map(UserId::as_str), |m| bucket(m))
        {
            rows.extend(
                super::connect(self.shards.pool(shard))
                    .await?
                    .query(
                        "SELECT m.user_id, d.delivered_up_to, r.read_up_to
                         FROM UNNEST($2::text[]) AS m(user_id)
                         LEFT JOIN delivered_state d
                           ON d.user_id = m.user_id AND d.conversation = $1
                         LEFT JOIN read_state r ON r.user_id = m.user_id AND r.conversation = $1",
                        &[&request.conversation.to_string(), &members],
                    )
                    .await
                    .map_err(unavailable("read watermarks"))?,
            );
        }
        let watermark = |value: Option<i64>| value.map(|id| MessageId(id as u64));
        let mut receipts = rows
            .iter()
            .map(|row| {
                Ok(MemberReceipts {
                    user: UserId::parse(column::<String>(row, 0)?)
                        .map_err(|_| corrupt("member"))?,
                    delivered_up_to: watermark(column(row, 1)?),
                    read_up_to: watermark(column(row, 2)?),
                })
            })
            .collect::<Result<Vec<_>, RpcError>>()?;
        receipts.sort_by(|a, b| a.user.as_str().cmp(b.user.as_str()));
        Ok(receipts)
    }
}
