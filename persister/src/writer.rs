//! MESSAGES -> `messages`, in batches, idempotently, acked after COMMIT.

use std::collections::HashMap;

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use chat_shared::consume::{self, Backoff};
use chat_shared::ids::ConversationId;
use chat_shared::shutdown;
use chat_shared::subjects;
use chat_shared::wire::MessageEvent;
use deadpool_postgres::Pool;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;

use crate::PersisterError;

/// The most events written in one transaction.
const MAX_BATCH: usize = 1000;

pub async fn write_messages(
    pool: Pool,
    consumer: PullConsumer,
    stop: watch::Receiver<bool>,
) -> Result<(), PersisterError> {
    let stopped = shutdown::wait(stop);
    tokio::pin!(stopped);
    loop {
        let Some(mut stream) = consume::open_pull(&consumer, MAX_BATCH, None, &mut stopped).await
        else {
            return Ok(());
        };
        loop {
            let first = tokio::select! {
                _ = &mut stopped => return Ok(()),
                next = stream.next() => next,
            };
            let first = match first {
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "pull stream error");
                    break;
                }
                None => break,
            };
            // Whatever else is already here joins the batch; nothing waits for more.
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match stream.next().now_or_never() {
                    Some(Some(Ok(message))) => batch.push(message),
                    _ => break,
                }
            }
            store_batch(&pool, batch).await;
        }
    }
}

/// A decoded event ready for the database.
struct Row {
    conversation: String,
    id: i64,
    sender: String,
    body: String,
    ts: i64,
    client_msg_id: String,
    dm_parties: Option<[String; 2]>,
}

fn decode(message: &jetstream::Message) -> Result<Row, String> {
    let conversation = subjects::parse_message(&message.subject).ok_or("unexpected subject")?;
    let event: MessageEvent =
        serde_json::from_slice(&message.payload).map_err(|e| e.to_string())?;
    if event.conversation != conversation {
        return Err("event conversation does not match its subject".into());
    }
    let dm_parties = match &conversation {
        ConversationId::Dm { low, high } => Some([low.to_string(), high.to_string()]),
        ConversationId::Group(_) => None,
    };
    Ok(Row {
        conversation: conversation.to_string(),
        id: i64::try_from(event.id.get()).map_err(|_| "id out of range")?,
        sender: event.from.to_string(),
        body: event.text,
        ts: i64::try_from(event.ts).map_err(|_| "ts out of range")?,
        client_msg_id: event.client_msg_id.as_str().to_string(),
        dm_parties,
    })
}

/// Writes a batch until it sticks, then acks it. Malformed events are
/// terminated (they would never succeed) and logged.
async fn store_batch(pool: &Pool, batch: Vec<jetstream::Message>) {
    let mut rows = Vec::with_capacity(batch.len());
    let mut good = Vec::with_capacity(batch.len());
    for message in batch {
        match decode(&message) {
            Ok(row) => {
                rows.push(row);
                good.push(message);
            }
            Err(reason) => {
                tracing::error!(subject = %message.subject, %reason, "dropping a malformed MESSAGES event");
                let _ = message.ack_with(AckKind::Term).await;
            }
        }
    }
    if rows.is_empty() {
        return;
    }
    let mut backoff = Backoff::default();
    loop {
        match insert(pool, &rows).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, rows = rows.len(), "batch insert failed; retrying");
                // Keep the batch ours while the database is away.
                for message in &good {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
                backoff.wait().await;
            }
        }
    }
    for message in good {
        if let Err(e) = message.ack().await {
            tracing::warn!(error = %e, "ack failed; the event will be redelivered and skipped");
        }
    }
}

async fn insert(pool: &Pool, rows: &[Row]) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let mut client = pool.get().await.map_err(|e| err(&e))?;
    let tx = client.transaction().await.map_err(|e| err(&e))?;
    let column = |f: fn(&Row) -> String| rows.iter().map(f).collect::<Vec<_>>();
    let conversations = column(|r| r.conversation.clone());
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let senders = column(|r| r.sender.clone());
    let bodies = column(|r| r.body.clone());
    let stamps: Vec<i64> = rows.iter().map(|r| r.ts).collect();
    let client_ids = column(|r| r.client_msg_id.clone());
    let inserted = tx
        .query(
            "INSERT INTO messages (conversation, id, sender, body, ts, client_msg_id)
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::text[])
             ON CONFLICT DO NOTHING
             RETURNING conversation, id",
            &[&conversations, &ids, &senders, &bodies, &stamps, &client_ids],
        )
        .await
        .map_err(|e| err(&e))?;
    if !inserted.is_empty() {
        let mut newest: HashMap<String, i64> = HashMap::new();
        for row in &inserted {
            let (conversation, id): (String, i64) = (row.get(0), row.get(1));
            let entry = newest.entry(conversation).or_insert(id);
            *entry = (*entry).max(id);
        }
        let (names, last): (Vec<String>, Vec<i64>) = newest.into_iter().unzip();
        tx.execute(
            "INSERT INTO conversations (conversation, last_id, activity)
             SELECT c, m, m FROM UNNEST($1::text[], $2::bigint[]) AS t(c, m)
             ON CONFLICT (conversation) DO UPDATE
               SET last_id = GREATEST(conversations.last_id, EXCLUDED.last_id),
                   activity = GREATEST(conversations.activity, EXCLUDED.activity)",
            &[&names, &last],
        )
        .await
        .map_err(|e| err(&e))?;
        let mut users = Vec::new();
        let mut dms = Vec::new();
        for row in rows.iter() {
            if let Some(parties) = &row.dm_parties {
                for party in parties {
                    users.push(party.clone());
                    dms.push(row.conversation.clone());
                }
            }
        }
        if !users.is_empty() {
            tx.execute(
                "INSERT INTO dm_members (user_id, conversation)
                 SELECT DISTINCT u, c FROM UNNEST($1::text[], $2::text[]) AS t(u, c)
                 ON CONFLICT DO NOTHING",
                &[&users, &dms],
            )
            .await
            .map_err(|e| err(&e))?;
        }
    }
    tx.commit().await.map_err(|e| err(&e))
}
