//! MESSAGES -> `messages`, in batches, idempotently, acked after COMMIT.
//!
//! A batch's messages are inserted first, then its changes (v1.1 edits,
//! deletes, reactions) are applied one by one in stream order, in the same
//! transaction: a change always follows the message it changes on the
//! stream, so the message is stored by then (or a delete leaves a
//! tombstone that a late copy of the message cannot overwrite).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use chat_shared::consume::{self, Backoff};
use chat_shared::idgen::timestamp_ms;
use chat_shared::ids::ConversationId;
use chat_shared::shutdown;
use chat_shared::subjects;
use chat_shared::telemetry::TraceId;
use chat_shared::wire::{ChangeEvent, ChangeKind, DeleteScope, MessageEvent, MessagesEvent};
use deadpool_postgres::Pool;
use tokio::sync::watch;

use crate::metrics::PersisterMetrics;
use crate::PersisterError;

/// The most events written in one transaction.
const MAX_BATCH: usize = 1000;

pub async fn write_messages(
    pool: Pool,
    js: jetstream::Context,
    consumer: PullConsumer,
    metrics: Arc<PersisterMetrics>,
    stop: watch::Receiver<bool>,
) -> Result<(), PersisterError> {
    let stopped = shutdown::wait(stop);
    tokio::pin!(stopped);
    consume::batches(&consumer, MAX_BATCH, &mut stopped, |batch| {
        let (pool, js, metrics) = (&pool, &js, &metrics);
        async move { store_batch(pool, js, batch, metrics).await }
    })
    .await;
    Ok(())
}

/// Events as the columns of one multi-row insert, built once per batch.
#[derive(Default)]
struct Batch {
    conversations: Vec<String>,
    ids: Vec<i64>,
    senders: Vec<String>,
    bodies: Vec<String>,
    stamps: Vec<i64>,
    client_ids: Vec<String>,
    reply_to: Vec<Option<i64>>,
    /// Each message's mentions as a JSON array (PostgreSQL cannot unnest
    /// ragged arrays).
    mentions: Vec<String>,
    /// Each message's attachments as a JSON array, as the event has them.
    attachments: Vec<String>,
    /// One row per attachment, for `message_attachments` (who may see a
    /// media).
    attached_conversations: Vec<String>,
    attached_ids: Vec<i64>,
    attached_positions: Vec<i16>,
    attached_media: Vec<String>,
    /// Changes, in stream order, applied after the messages.
    changes: Vec<ChangeEvent>,
    /// One (user, conversation) pair per DM party, for `dm_members`.
    dm_users: Vec<String>,
    dm_conversations: Vec<String>,
}

impl Batch {
    fn push(
        &mut self,
        conversation: &ConversationId,
        event: MessagesEvent,
    ) -> Result<(), Unwritable> {
        match event {
            MessagesEvent::Message(message) => self.push_message(conversation, message),
            MessagesEvent::Change(change) => {
                if !change.is_complete() {
                    return Err(Unwritable::Incomplete);
                }
                i64::try_from(change.id.get()).map_err(|_| Unwritable::OutOfRange("id"))?;
                i64::try_from(change.ts).map_err(|_| Unwritable::OutOfRange("ts"))?;
                self.changes.push(change);
                Ok(())
            }
        }
    }

    fn push_message(
        &mut self,
        conversation: &ConversationId,
        event: MessageEvent,
    ) -> Result<(), Unwritable> {
        let id = i64::try_from(event.id.get()).map_err(|_| Unwritable::OutOfRange("id"))?;
        let ts = i64::try_from(event.ts).map_err(|_| Unwritable::OutOfRange("ts"))?;
        let name = conversation.to_string();
        if let ConversationId::Dm { low, high } = conversation {
            for party in [low, high] {
                self.dm_users.push(party.to_string());
                self.dm_conversations.push(name.clone());
            }
        }
        self.conversations.push(name);
        self.ids.push(id);
        self.senders.push(event.from.to_string());
        self.bodies.push(event.text);
        self.stamps.push(ts);
        self.client_ids
            .push(event.client_msg_id.as_str().to_string());
        let reply_to = event
            .reply_to
            .map(|r| i64::try_from(r.get()).map_err(|_| Unwritable::OutOfRange("reply_to")))
            .transpose()?;
        self.reply_to.push(reply_to);
        self.mentions.push(serde_json::to_string(&event.mentions)?);
        self.attachments
            .push(serde_json::to_string(&event.attachments)?);
        for (position, attachment) in (0_i16..).zip(&event.attachments) {
            self.attached_conversations.push(conversation.to_string());
            self.attached_ids.push(id);
            self.attached_positions.push(position);
            self.attached_media.push(attachment.media.to_string());
        }
        Ok(())
    }

    fn len(&self) -> usize {
        self.ids.len() + self.changes.len()
    }
}

/// Why a MESSAGES event is dead-lettered (the text is the dead letter's
/// reason).
#[derive(Debug, thiserror::Error)]
enum Unwritable {
    #[error("unexpected subject")]
    Subject,
    #[error("malformed event: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("event conversation does not match its subject")]
    Conversation,
    #[error("{0} out of range")]
    OutOfRange(&'static str),
    #[error("a change without what its kind needs")]
    Incomplete,
    #[error("the database refuses it: {0}")]
    Refused(#[source] tokio_postgres::Error),
}

fn decode(message: &jetstream::Message) -> Result<(ConversationId, MessagesEvent), Unwritable> {
    let conversation = subjects::parse_message(&message.subject).ok_or(Unwritable::Subject)?;
    let event = MessagesEvent::parse(&message.payload)?;
    if *event.conversation() != conversation {
        return Err(Unwritable::Conversation);
    }
    Ok((conversation, event))
}

/// Why an insert failed: a database that is away (retry), or rows it will
/// never take (PostgreSQL error classes 22 "data exception" and 23
/// "integrity constraint violation").
#[derive(Debug, thiserror::Error)]
enum InsertError {
    #[error("no PostgreSQL connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Transient(tokio_postgres::Error),
    #[error(transparent)]
    Permanent(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for InsertError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.code().map(|c| c.code()) {
            Some(code) if code.starts_with("22") || code.starts_with("23") => Self::Permanent(e),
            _ => Self::Transient(e),
        }
    }
}

/// The trace ids of some events, for logs; formatted only if a log line
/// with them is actually written.
struct TraceIds<'a>(&'a [jetstream::Message]);

impl fmt::Display for TraceIds<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let traces = self
            .0
            .iter()
            .filter_map(|message| TraceId::from_headers(message.headers.as_ref()));
        for (index, trace) in traces.enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            write!(f, "{trace}")?;
        }
        Ok(())
    }
}

/// Writes a batch until it sticks, then acks it. An event the database will
/// never take (malformed, or refused as data) is copied to the dead letters
/// and terminated, so it cannot stall every event behind it.
async fn store_batch(
    pool: &Pool,
    js: &jetstream::Context,
    batch: Vec<jetstream::Message>,
    metrics: &PersisterMetrics,
) {
    let started = Instant::now();
    let events = batch.len();
    store_events(pool, js, batch, metrics).await;
    metrics.batch_stored(events, started.elapsed());
}

async fn store_events(
    pool: &Pool,
    js: &jetstream::Context,
    batch: Vec<jetstream::Message>,
    metrics: &PersisterMetrics,
) {
    let mut rows = Batch::default();
    let mut good = Vec::with_capacity(batch.len());
    for message in batch {
        let pushed =
            decode(&message).and_then(|(conversation, event)| rows.push(&conversation, event));
        match pushed {
            Ok(()) => good.push(message),
            Err(reason) => terminate(js, &message, &reason, metrics).await,
        }
    }
    if good.is_empty() {
        return;
    }
    match insert_until_settled(pool, &rows, &good).await {
        Ok(written) => {
            metrics.rows_written(written);
            tracing::debug!(
                events = good.len(),
                written,
                trace_ids = %TraceIds(&good),
                "batch stored"
            );
            ack_all(good).await
        }
        Err(reason) if good.len() == 1 => terminate(js, &good[0], &reason, metrics).await,
        Err(_) => {
            // Find the bad event: write the batch one event at a time.
            for message in good {
                let Ok((conversation, event)) = decode(&message) else {
                    continue;
                };
                let mut single = Batch::default();
                if single.push(&conversation, event).is_err() {
                    continue;
                }
                match insert_until_settled(pool, &single, std::slice::from_ref(&message)).await {
                    Ok(written) => {
                        metrics.rows_written(written);
                        ack_all(vec![message]).await
                    }
                    Err(reason) => terminate(js, &message, &reason, metrics).await,
                }
            }
        }
    }
}

/// Retries transient failures (keeping the events ours meanwhile); returns
/// the rows inserted, or a permanent failure.
async fn insert_until_settled(
    pool: &Pool,
    rows: &Batch,
    messages: &[jetstream::Message],
) -> Result<u64, Unwritable> {
    let mut backoff = Backoff::default();
    loop {
        match insert(pool, rows).await {
            Ok(written) => return Ok(written),
            Err(InsertError::Permanent(e)) => return Err(Unwritable::Refused(e)),
            Err(reason) => {
                tracing::warn!(
                    error = %reason,
                    rows = rows.len(),
                    trace_ids = %TraceIds(messages),
                    "insert failed; retrying"
                );
                for message in messages {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
                backoff.wait().await;
            }
        }
    }
}

/// Gives up on an event the database will never take: a copy goes to
/// `chat.dead.persister` first, and only once JetStream has it is the event
/// terminated (otherwise it comes back later; see `consume::dead_letter`).
async fn terminate(
    js: &jetstream::Context,
    message: &jetstream::Message,
    reason: &Unwritable,
    metrics: &PersisterMetrics,
) {
    let trace_id = TraceId::from_headers(message.headers.as_ref());
    tracing::error!(
        subject = %message.subject,
        %reason,
        trace_id = trace_id.map(tracing::field::display),
        "dead-lettering a MESSAGES event the database will never take"
    );
    if consume::dead_letter(js, message, &reason.to_string()).await {
        metrics.event_dropped();
    }
}

async fn ack_all(messages: Vec<jetstream::Message>) {
    for message in messages {
        if let Err(e) = message.ack().await {
            tracing::warn!(error = %e, "ack failed; the event will be redelivered and skipped");
        }
    }
}

/// Inserts the rows in one transaction; returns how many were new.
async fn insert(pool: &Pool, rows: &Batch) -> Result<u64, InsertError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let inserted = tx
        .query(
            "INSERT INTO messages (conversation, id, sender, body, ts, client_msg_id, reply_to, mentions,
                                   attachments)
             SELECT c, i, s, b, t, m, r, ARRAY(SELECT jsonb_array_elements_text(n::jsonb)), a::jsonb
             FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::text[],
                         $7::bigint[], $8::text[], $9::text[]) AS u(c, i, s, b, t, m, r, n, a)
             ON CONFLICT DO NOTHING
             RETURNING conversation, id",
            &[&rows.conversations, &rows.ids, &rows.senders, &rows.bodies, &rows.stamps, &rows.client_ids,
              &rows.reply_to, &rows.mentions, &rows.attachments],
        )
        .await?;
    if !rows.attached_ids.is_empty() {
        // Only for messages stored now: a redelivered message whose delete
        // came first (a tombstone) must not give its media back.
        tx.execute(
            "INSERT INTO message_attachments (conversation, message_id, position, media)
             SELECT c, i, p, m
             FROM UNNEST($1::text[], $2::bigint[], $3::smallint[], $4::text[]) AS u(c, i, p, m)
             JOIN messages ON messages.conversation = u.c AND messages.id = u.i
                          AND NOT messages.deleted
             ON CONFLICT DO NOTHING",
            &[
                &rows.attached_conversations,
                &rows.attached_ids,
                &rows.attached_positions,
                &rows.attached_media,
            ],
        )
        .await?;
    }
    if !inserted.is_empty() {
        let mut newest: HashMap<String, i64> = HashMap::new();
        for row in &inserted {
            let (conversation, id): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
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
        .await?;
        if !rows.dm_users.is_empty() {
            tx.execute(
                "INSERT INTO dm_members (user_id, conversation)
                 SELECT DISTINCT u, c FROM UNNEST($1::text[], $2::text[]) AS t(u, c)
                 ON CONFLICT DO NOTHING",
                &[&rows.dm_users, &rows.dm_conversations],
            )
            .await?;
        }
    }
    for change in &rows.changes {
        apply(&tx, change).await?;
    }
    tx.commit().await?;
    Ok(inserted.len() as u64)
}

/// Applies one change; applying it again (a redelivery) changes nothing
/// that matters (`version` only has to grow).
async fn apply(
    tx: &deadpool_postgres::Transaction<'_>,
    change: &ChangeEvent,
) -> Result<(), tokio_postgres::Error> {
    let conversation = change.conversation.to_string();
    // Checked in `Batch::push`.
    let id = change.id.get() as i64;
    let ts = change.ts as i64;
    let by = change.by.as_str();
    let bump = "UPDATE messages SET version = version + 1 WHERE conversation = $1 AND id = $2";
    match (change.kind, change.scope) {
        (ChangeKind::Edit, _) => {
            let text = change.text.as_deref().unwrap_or_default();
            tx.execute(
                "UPDATE messages SET body = $3, edited_ts = $4, version = version + 1
                 WHERE conversation = $1 AND id = $2 AND NOT deleted",
                &[&conversation, &id, &text, &ts],
            )
            .await?;
        }
        (ChangeKind::Delete, Some(DeleteScope::Me)) => {
            tx.execute(
                "INSERT INTO hidden_messages (user_id, conversation, id) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &[&by, &conversation, &id],
            )
            .await?;
        }
        (ChangeKind::Delete, _) => {
            // Erased, not hidden: the text (edited or not) is overwritten.
            // A message never stored (dead-lettered) gets a tombstone, so a
            // late copy of it cannot bring the text back.
            let tombstone_ts = timestamp_ms(change.id) as i64;
            let tombstone_id = format!("deleted:{id}");
            tx.execute(
                "INSERT INTO messages (conversation, id, sender, body, ts, client_msg_id, deleted, version)
                 VALUES ($1, $2, $3, '', $4, $5, true, 1)
                 ON CONFLICT (conversation, id) DO UPDATE
                   SET body = '', deleted = true, edited_ts = NULL, mentions = '{}',
                       attachments = '[]', version = messages.version + 1
                   WHERE NOT messages.deleted",
                &[&conversation, &id, &by, &tombstone_ts, &tombstone_id],
            )
            .await?;
            tx.execute(
                "DELETE FROM reactions WHERE conversation = $1 AND id = $2",
                &[&conversation, &id],
            )
            .await?;
            // Its media are no longer shown to the members through it.
            tx.execute(
                "DELETE FROM message_attachments WHERE conversation = $1 AND message_id = $2",
                &[&conversation, &id],
            )
            .await?;
        }
        (ChangeKind::Reaction, _) => {
            let emoji = change.emoji.as_deref().unwrap_or_default();
            let changed = if change.on == Some(true) {
                tx.execute(
                    "INSERT INTO reactions (conversation, id, emoji, user_id, ts)
                     SELECT $1, $2, $3, $4, $5 WHERE EXISTS
                       (SELECT 1 FROM messages WHERE conversation = $1 AND id = $2 AND NOT deleted)
                     ON CONFLICT DO NOTHING",
                    &[&conversation, &id, &emoji, &by, &ts],
                )
                .await?
            } else {
                tx.execute(
                    "DELETE FROM reactions
                     WHERE conversation = $1 AND id = $2 AND emoji = $3 AND user_id = $4",
                    &[&conversation, &id, &emoji, &by],
                )
                .await?
            };
            if changed > 0 {
                tx.execute(bump, &[&conversation, &id]).await?;
            }
        }
    }
    Ok(())
}
