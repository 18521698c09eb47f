//! RECEIPTS (delivered only) -> `delivered_state` (on each user's shard): the newest message of a
//! conversation any device of a user acknowledged, for `receipts`. Batched,
//! acked after COMMIT; a watermark only moves forward, so a redelivery or a
//! second persister on the same consumer changes nothing.

use std::collections::HashMap;

use crate::shards::Shards;
use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use chat_shared::consume::{self, Backoff};
use chat_shared::receipts::DeliveredEvent;
use chat_shared::shards::bucket;
use chat_shared::shutdown;
use tokio::sync::watch;

/// The most events stored in one statement.
const MAX_BATCH: usize = 1000;

pub async fn store_delivered(
    shards: Shards,
    js: jetstream::Context,
    consumer: PullConsumer,
    stop: watch::Receiver<bool>,
) {
    let stopped = shutdown::wait(stop);
    tokio::pin!(stopped);
    consume::batches(&consumer, MAX_BATCH, &mut stopped, |batch| {
        let (shards, js) = (&shards, &js);
        async move { store_batch(shards, js, batch).await }
    })
    .await;
}

/// The batch's highest watermark per (user, conversation): one statement
/// may not update a row twice.
#[derive(Default)]
struct Watermarks(HashMap<(String, String), i64>);

impl Watermarks {
    fn add(&mut self, event: &DeliveredEvent) -> Result<(), &'static str> {
        let up_to = i64::try_from(event.up_to.get()).map_err(|_| "up_to out of range")?;
        let entry = self
            .0
            .entry((event.user.to_string(), event.conversation.to_string()))
            .or_insert(up_to);
        *entry = (*entry).max(up_to);
        Ok(())
    }
}

/// One shard's watermarks as the columns of one statement.
#[derive(Default)]
struct Columns<'a> {
    users: Vec<&'a str>,
    conversations: Vec<&'a str>,
    up_to: Vec<i64>,
}

async fn store_batch(shards: &Shards, js: &jetstream::Context, batch: Vec<jetstream::Message>) {
    let mut watermarks = Watermarks::default();
    let mut good = Vec::with_capacity(batch.len());
    for message in batch {
        let added = serde_json::from_slice::<DeliveredEvent>(&message.payload)
            .map_err(|_| "malformed delivered event")
            .and_then(|event| watermarks.add(&event));
        match added {
            Ok(()) => good.push(message),
            Err(reason) => {
                tracing::error!(%reason, "dead-lettering a delivered receipt");
                consume::dead_letter(js, &message, reason).await;
            }
        }
    }
    if good.is_empty() {
        return;
    }
    let mut backoff = Backoff::default();
    while let Err(e) = upsert_all(shards, &watermarks).await {
        tracing::warn!(error = %e, "storing delivered watermarks failed; retrying");
        for message in &good {
            let _ = message.ack_with(AckKind::Progress).await;
        }
        backoff.wait().await;
    }
    for message in good {
        if let Err(e) = message.ack().await {
            tracing::warn!(error = %e, "ack failed; the receipt will be redelivered");
        }
    }
}

/// Why a batch was not stored; retried.
#[derive(Debug, thiserror::Error)]
enum UpsertError {
    #[error("no PostgreSQL connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
}

/// Each shard's watermarks, by the map as it is now (a bucket move may
/// have changed it since a failed try); all again after a failure (a
/// watermark only moves forward, so what was stored already stays).
async fn upsert_all(shards: &Shards, watermarks: &Watermarks) -> Result<(), UpsertError> {
    for (shard, marks) in shards.split(&watermarks.0, |((user, _), _)| bucket(user)) {
        let mut columns = Columns::default();
        for ((user, conversation), up_to) in marks {
            columns.users.push(user);
            columns.conversations.push(conversation);
            columns.up_to.push(*up_to);
        }
        upsert(shards.pool(shard), &columns).await?;
    }
    Ok(())
}

async fn upsert(pool: &deadpool_postgres::Pool, marks: &Columns<'_>) -> Result<(), UpsertError> {
    let Columns {
        users,
        conversations,
        up_to,
    } = marks;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    crate::shards::fence(&tx, users.iter().map(|user| bucket(user))).await?;
    tx.execute(
        "INSERT INTO delivered_state (user_id, conversation, delivered_up_to)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[])
         ON CONFLICT (user_id, conversation) DO UPDATE
           SET delivered_up_to = GREATEST(delivered_state.delivered_up_to, EXCLUDED.delivered_up_to)",
        &[&users, &conversations, &up_to],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}
