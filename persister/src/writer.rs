//! MESSAGES -> `messages`, in batches, idempotently, acked after COMMIT.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use chat_shared::consume::{self, Backoff};
use chat_shared::ids::ConversationId;
use chat_shared::shutdown;
use chat_shared::subjects;
use chat_shared::telemetry::TraceId;
use chat_shared::wire::MessageEvent;
use deadpool_postgres::Pool;
use futures::{FutureExt, StreamExt};
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
    loop {
        let Some(mut stream) = consume::open_pull(&consumer, MAX_BATCH, None, &mut stopped).await
        else {
            return Ok(());
        };
        loop {
            let first = tokio::select! {
                _ = &mut stopped => {
                    consume::release_buffered(&mut stream).await;
                    return Ok(());
                }
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
            store_batch(&pool, &js, batch, &metrics).await;
        }
    }
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
    /// One (user, conversation) pair per DM party, for `dm_members`.
    dm_users: Vec<String>,
    dm_conversations: Vec<String>,
}

impl Batch {
    fn push(
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
        Ok(())
    }

    fn len(&self) -> usize {
        self.ids.len()
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
    #[error("the database refuses it: {0}")]
    Refused(#[source] tokio_postgres::Error),
}

fn decode(message: &jetstream::Message) -> Result<(ConversationId, MessageEvent), Unwritable> {
    let conversation = subjects::parse_message(&message.subject).ok_or(Unwritable::Subject)?;
    let event: MessageEvent = serde_json::from_slice(&message.payload)?;
    if event.conversation != conversation {
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
            "INSERT INTO messages (conversation, id, sender, body, ts, client_msg_id)
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::text[])
             ON CONFLICT DO NOTHING
             RETURNING conversation, id",
            &[&rows.conversations, &rows.ids, &rows.senders, &rows.bodies, &rows.stamps, &rows.client_ids],
        )
        .await?;
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
    tx.commit().await?;
    Ok(inserted.len() as u64)
}
