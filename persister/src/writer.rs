//! MESSAGES -> `messages`, in batches, idempotently, acked after COMMIT.
//!
//! A batch is split by the shard of each event's conversation: one
//! transaction per shard, then the unread counters of the members (on the
//! users' shards, `user_index`), and the events are acked only once all of
//! it committed. Within a shard, a batch's messages are inserted first,
//! then its changes (v1.1 edits, deletes, reactions) are applied one by
//! one in stream order, in the same transaction: a change always follows the message it changes on the
//! stream, so the message is stored by then (or a delete leaves a
//! tombstone that a late copy of the message cannot overwrite).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use chat_shared::consume::{self, Backoff};
use chat_shared::idgen::timestamp_ms;
use chat_shared::ids::ConversationId;
use chat_shared::shards::{of_conversation, Bucket, ShardMap};
use chat_shared::shutdown;
use chat_shared::subjects;
use chat_shared::telemetry::TraceId;
use chat_shared::wire::{ChangeEvent, ChangeKind, DeleteScope, MessageEvent, MessagesEvent};
use deadpool_postgres::Pool;
use tokio::sync::watch;

use crate::metrics::PersisterMetrics;
use crate::shards::Shards;
use crate::user_index::{self, Touched};
use crate::PersisterError;

/// The most events written in one transaction.
const MAX_BATCH: usize = 1000;

pub async fn write_messages(
    shards: Shards,
    js: jetstream::Context,
    consumer: PullConsumer,
    metrics: Arc<PersisterMetrics>,
    stop: watch::Receiver<bool>,
) -> Result<(), PersisterError> {
    let stopped = shutdown::wait(stop);
    tokio::pin!(stopped);
    consume::batches(&consumer, MAX_BATCH, &mut stopped, |batch| {
        let (shards, js, metrics) = (&shards, &js, &metrics);
        async move { store_batch(shards, js, batch, metrics).await }
    })
    .await;
    Ok(())
}

/// A batch's messages and changes (in stream order, applied after the
/// messages). They are split by the shard of their conversation at each
/// try, by the map as it is then: a bucket move may flip it between two.
#[derive(Default)]
struct Batch {
    messages: Vec<Row>,
    changes: Vec<ChangeEvent>,
    /// What the events change in unread counters.
    touched: Touched,
}

/// One shard's part of a batch: written in one transaction.
#[derive(Default)]
struct ShardRows<'a> {
    messages: Vec<&'a Row>,
    changes: Vec<&'a ChangeEvent>,
    /// The buckets of their conversations, which the shard must own.
    buckets: Vec<Bucket>,
}

/// A message as the columns of its row.
struct Row {
    conversation: String,
    /// Its conversation's bucket.
    bucket: Bucket,
    id: i64,
    sender: String,
    body: String,
    ts: i64,
    client_msg_id: String,
    reply_to: Option<i64>,
    /// As a JSON array (PostgreSQL cannot unnest ragged arrays).
    mentions: String,
    /// As a JSON array, as the event has them.
    attachments: String,
    /// The media, in order, for `message_attachments` (who may see a
    /// media).
    media: Vec<String>,
}

impl Batch {
    fn push(
        &mut self,
        conversation: &ConversationId,
        event: MessagesEvent,
    ) -> Result<(), Unwritable> {
        match event {
            MessagesEvent::Message(message) => {
                self.messages.push(Row::of(conversation, message)?);
                self.touched.stored(conversation);
                Ok(())
            }
            MessagesEvent::Change(change) => {
                if !change.is_complete() {
                    return Err(Unwritable::Incomplete);
                }
                i64::try_from(change.id.get()).map_err(|_| Unwritable::OutOfRange("id"))?;
                i64::try_from(change.ts).map_err(|_| Unwritable::OutOfRange("ts"))?;
                match (change.kind, change.scope) {
                    (ChangeKind::Delete, Some(DeleteScope::Me)) => {
                        self.touched.recount(&change.conversation, &change.by)
                    }
                    (ChangeKind::Delete, _) => self.touched.recount_all(&change.conversation),
                    _ => {}
                }
                self.changes.push(change);
                Ok(())
            }
        }
    }

    fn len(&self) -> usize {
        self.messages.len() + self.changes.len()
    }

    /// The batch split by shard, by `map`.
    fn by_shard(&self, map: &ShardMap) -> BTreeMap<usize, ShardRows<'_>> {
        let mut split: BTreeMap<usize, ShardRows<'_>> = BTreeMap::new();
        for row in &self.messages {
            let part = split.entry(map.shard(row.bucket)).or_default();
            part.messages.push(row);
            part.buckets.push(row.bucket);
        }
        for change in &self.changes {
            let bucket = of_conversation(&change.conversation);
            let part = split.entry(map.shard(bucket)).or_default();
            part.changes.push(change);
            part.buckets.push(bucket);
        }
        split
    }
}

impl Row {
    fn of(conversation: &ConversationId, event: MessageEvent) -> Result<Self, Unwritable> {
        let reply_to = event
            .reply_to
            .map(|r| i64::try_from(r.get()).map_err(|_| Unwritable::OutOfRange("reply_to")))
            .transpose()?;
        Ok(Self {
            conversation: conversation.to_string(),
            bucket: of_conversation(conversation),
            id: i64::try_from(event.id.get()).map_err(|_| Unwritable::OutOfRange("id"))?,
            sender: event.from.to_string(),
            ts: i64::try_from(event.ts).map_err(|_| Unwritable::OutOfRange("ts"))?,
            client_msg_id: event.client_msg_id.as_str().to_string(),
            reply_to,
            mentions: serde_json::to_string(&event.mentions)?,
            attachments: serde_json::to_string(&event.attachments)?,
            media: event
                .attachments
                .iter()
                .map(|a| a.media.to_string())
                .collect(),
            body: event.text,
        })
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
    /// Counters are our own arithmetic over stored rows: always retried.
    #[error("unread counters: {0}")]
    Counters(user_index::IndexError),
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
    shards: &Shards,
    js: &jetstream::Context,
    batch: Vec<jetstream::Message>,
    metrics: &PersisterMetrics,
) {
    let started = Instant::now();
    let events = batch.len();
    store_events(shards, js, batch, metrics).await;
    metrics.batch_stored(events, started.elapsed());
}

async fn store_events(
    shards: &Shards,
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
    match insert_until_settled(shards, &rows, &good).await {
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
                match insert_until_settled(shards, &single, std::slice::from_ref(&message)).await {
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
    shards: &Shards,
    rows: &Batch,
    messages: &[jetstream::Message],
) -> Result<u64, Unwritable> {
    let mut backoff = Backoff::default();
    loop {
        match insert(shards, rows).await {
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

/// Writes each shard's rows in one transaction per shard, then settles the
/// unread counters of what they touched (on the members' shards, in their
/// own transactions); returns how many messages were new. Everything is
/// idempotent, so a failure anywhere retries the whole batch: the events
/// are acked only once every shard they touched has committed.
async fn insert(shards: &Shards, batch: &Batch) -> Result<u64, InsertError> {
    let mut inserted = 0;
    for (shard, rows) in batch.by_shard(&shards.map()) {
        inserted += insert_shard(shards.pool(shard), &rows).await?;
    }
    user_index::settle(shards, &batch.touched)
        .await
        .map_err(InsertError::Counters)?;
    Ok(inserted)
}

/// One shard's messages and changes, in one transaction.
async fn insert_shard(pool: &Pool, rows: &ShardRows<'_>) -> Result<u64, InsertError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    crate::shards::fence(&tx, rows.buckets.iter().copied()).await?;
    let mut inserted = 0;
    if !rows.messages.is_empty() {
        // Each new message takes the next `seq` of its conversation (the
        // order unread counters count in): the conversation's row is
        // created if missing and locked (in name order: two batches never
        // wait on each other in a circle), so two writers never hand out
        // one seq twice. A message stored already wastes its number.
        let mut names: Vec<&str> = rows
            .messages
            .iter()
            .map(|r| r.conversation.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        tx.execute(
            "INSERT INTO conversations (conversation, last_id, activity)
             SELECT c, NULL, 0 FROM UNNEST($1::text[]) AS c
             ON CONFLICT DO NOTHING",
            &[&names],
        )
        .await?;
        let locked = tx
            .query(
                "SELECT conversation, seq FROM conversations
                 WHERE conversation = ANY($1::text[]) ORDER BY conversation FOR UPDATE",
                &[&names],
            )
            .await?;
        let mut next: HashMap<String, i64> = HashMap::new();
        for row in &locked {
            next.insert(row.try_get(0)?, row.try_get(1)?);
        }
        let mut seqs = Vec::with_capacity(rows.messages.len());
        for row in &rows.messages {
            let seq = next.entry(row.conversation.clone()).or_insert(0);
            *seq += 1;
            seqs.push(*seq);
        }
        let column =
            |f: fn(&Row) -> &str| -> Vec<&str> { rows.messages.iter().map(|r| f(r)).collect() };
        let ids: Vec<i64> = rows.messages.iter().map(|r| r.id).collect();
        let stamps: Vec<i64> = rows.messages.iter().map(|r| r.ts).collect();
        let reply_to: Vec<Option<i64>> = rows.messages.iter().map(|r| r.reply_to).collect();
        // A message is stored only with its key (`message_keys`, the last
        // net for idempotent sends: `messages` is partitioned by month and
        // can have no unique index without the id); one already stored, or
        // a retry of a send stored under another id, claims nothing.
        let new = tx
            .query(
                "WITH batch AS (
                     SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[],
                                          $5::bigint[], $6::text[], $7::bigint[], $8::text[],
                                          $9::bigint[], $10::text[]) AS u(c, i, s, b, t, m, r, n, q, a)),
                 claimed AS (
                     INSERT INTO message_keys (conversation, sender, client_msg_id, id)
                     SELECT c, s, m, i FROM batch
                     ON CONFLICT DO NOTHING
                     RETURNING conversation, id)
                 INSERT INTO messages (conversation, id, sender, body, ts, client_msg_id, reply_to,
                                       mentions, seq, attachments)
                 SELECT b.c, b.i, b.s, b.b, b.t, b.m, b.r,
                        ARRAY(SELECT jsonb_array_elements_text(b.n::jsonb)), b.q, b.a::jsonb
                 FROM batch b JOIN claimed k ON k.conversation = b.c AND k.id = b.i
                 ON CONFLICT DO NOTHING
                 RETURNING conversation, id",
                &[
                    &column(|r| &r.conversation),
                    &ids,
                    &column(|r| &r.sender),
                    &column(|r| &r.body),
                    &stamps,
                    &column(|r| &r.client_msg_id),
                    &reply_to,
                    &column(|r| &r.mentions),
                    &seqs,
                    &column(|r| &r.attachments),
                ],
            )
            .await?;
        inserted = new.len() as u64;
        attach(&tx, &rows.messages).await?;
        let mut newest: HashMap<String, i64> = HashMap::new();
        for row in &new {
            let (conversation, id): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
            let entry = newest.entry(conversation).or_insert(id);
            *entry = (*entry).max(id);
        }
        let (names, seqs): (Vec<String>, Vec<i64>) = next.into_iter().unzip();
        let last: Vec<Option<i64>> = names.iter().map(|n| newest.get(n).copied()).collect();
        tx.execute(
            "UPDATE conversations c
             SET seq = GREATEST(c.seq, t.s),
                 last_id = GREATEST(c.last_id, t.m),
                 activity = GREATEST(c.activity, t.m)
             FROM UNNEST($1::text[], $2::bigint[], $3::bigint[]) AS t(n, s, m)
             WHERE c.conversation = t.n",
            &[&names, &seqs, &last],
        )
        .await?;
    }
    for &change in &rows.changes {
        apply(&tx, change).await?;
    }
    tx.commit().await?;
    Ok(inserted)
}

/// Records the media the batch's messages carry (who may see a media), for
/// the messages stored now only: a redelivered message whose delete came
/// first (a tombstone) must not give its media back.
async fn attach(
    tx: &deadpool_postgres::Transaction<'_>,
    messages: &[&Row],
) -> Result<(), tokio_postgres::Error> {
    let mut conversations = Vec::new();
    let mut ids = Vec::new();
    let mut positions = Vec::new();
    let mut media = Vec::new();
    for row in messages {
        for (position, one) in (0_i16..).zip(&row.media) {
            conversations.push(row.conversation.as_str());
            ids.push(row.id);
            positions.push(position);
            media.push(one.as_str());
        }
    }
    if ids.is_empty() {
        return Ok(());
    }
    tx.execute(
        "INSERT INTO message_attachments (conversation, message_id, position, media)
         SELECT c, i, p, m
         FROM UNNEST($1::text[], $2::bigint[], $3::smallint[], $4::text[]) AS u(c, i, p, m)
         JOIN messages ON messages.conversation = u.c AND messages.id = u.i
                      AND NOT messages.deleted
         ON CONFLICT DO NOTHING",
        &[&conversations, &ids, &positions, &media],
    )
    .await?;
    Ok(())
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
