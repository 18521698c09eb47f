//! Connecting a backend service and pulling from its durable consumers.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use async_nats::HeaderMap;
use bytes::Bytes;

use crate::error::StartError;
use crate::{streams, subjects, Config};

/// Exponential backoff for retrying a side effect in place.
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self { next: first, max }
    }

    /// How long to wait before the next attempt; doubles up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(50), Duration::from_secs(5))
    }
}

/// Connects as `service`, then creates or updates every stream and bucket,
/// waiting while JetStream cannot ([`streams::provision`]).
pub async fn connect_and_provision(
    config: &Config,
    service: &str,
) -> Result<(async_nats::Client, jetstream::Context), StartError> {
    let client = crate::nats::connect(config, service).await?;
    let js = crate::nats::jetstream(client.clone(), config);
    streams::provision(&js, config).await;
    Ok((client, js))
}

/// Runs `attempt` until it succeeds, logging what it waits for: start-up
/// steps that a NATS node down or paused fails for a while (no leader yet,
/// a request timing out) are waited out, never a reason to exit.
pub async fn until_ready<T, E, F, Fut>(what: &str, mut attempt: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(e) => tracing::warn!(waiting_for = what, error = %e, "not ready yet; retrying"),
        }
        backoff.wait().await;
    }
}

/// A handle on the KV bucket `name` (provisioned by [`connect_and_provision`]).
pub async fn bucket(js: &jetstream::Context, name: &str) -> jetstream::kv::Store {
    until_ready(&format!("bucket {name}"), || js.get_key_value(name)).await
}

/// The durable pull consumer `config` on `stream`, created if missing and
/// updated if its definition changed.
pub async fn durable(
    js: &jetstream::Context,
    stream: &str,
    config: consumer::pull::Config,
) -> consumer::PullConsumer {
    let name = config.durable_name.clone().unwrap_or_default();
    until_ready(&format!("consumer {name} on {stream}"), || {
        durable_once(js, stream, config.clone(), &name)
    })
    .await
}

async fn durable_once(
    js: &jetstream::Context,
    stream: &str,
    config: consumer::pull::Config,
    name: &str,
) -> Result<consumer::PullConsumer, async_nats::Error> {
    let handle = js.get_stream(stream).await?;
    // Create or update, so a deployment picks up a changed definition (an
    // ack wait, a limit). A change the server cannot apply in place keeps
    // the existing consumer, loudly.
    match handle.create_consumer(config).await {
        Ok(consumer) => Ok(consumer),
        Err(e) => {
            tracing::warn!(consumer = %name, error = %e, "cannot update the consumer; using it as it is");
            Ok(handle.get_consumer(name).await?)
        }
    }
}

/// Opens a pull stream of up to `batch` messages per request (in priority
/// `group` when given), retrying with backoff while NATS is away. `None` once
/// `stopped` completes.
pub async fn open_pull<S>(
    consumer: &consumer::PullConsumer,
    batch: usize,
    group: Option<&str>,
    stopped: &mut S,
) -> Option<consumer::pull::Stream>
where
    S: Future<Output = ()> + Unpin,
{
    let mut backoff = Backoff::default();
    loop {
        let mut builder = consumer
            .stream()
            .max_messages_per_batch(batch)
            // Missing two heartbeats ends the stream and a new pull starts:
            // after a NATS restart consumption resumes within ~4 s.
            .heartbeat(Duration::from_secs(2))
            .expires(Duration::from_secs(10));
        if let Some(group) = group {
            builder = builder.group(group);
        }
        match builder.messages().await {
            Ok(stream) => return Some(stream),
            Err(e) => tracing::warn!(error = %e, "cannot pull; retrying"),
        }
        tokio::select! {
            _ = &mut *stopped => return None,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// A batch at least this big shows a busy stream, which [`batches`] lets
/// fill for up to [`BUSY_LINGER`].
const BUSY: usize = 16;
const BUSY_LINGER: Duration = Duration::from_millis(5);

/// Pulls `consumer` (no priority group) until `stopped`, handing `store`
/// one batch at a time: a message waited for and whatever else has already
/// arrived, up to `max`; a batch that already shows a busy stream waits up
/// to [`BUSY_LINGER`] for more (a quiet stream's event is stored at once, a
/// busy one's in large batches: 63 events a batch without the wait, 400 to
/// 560 with it, flat out; docs/scaling.md). A pull that ends or fails is
/// opened again; at the stop what is buffered is handed back.
pub async fn batches<S, F, Fut>(
    consumer: &consumer::PullConsumer,
    max: usize,
    stopped: &mut S,
    mut store: F,
) where
    S: Future<Output = ()> + Unpin,
    F: FnMut(Vec<jetstream::Message>) -> Fut,
    Fut: Future<Output = ()>,
{
    use futures::{FutureExt, StreamExt};
    loop {
        let Some(mut stream) = open_pull(consumer, max, None, stopped).await else {
            return;
        };
        loop {
            let first = tokio::select! {
                _ = &mut *stopped => {
                    release_buffered(&mut stream).await;
                    return;
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
            let mut batch = vec![first];
            let linger = tokio::time::Instant::now() + BUSY_LINGER;
            while batch.len() < max {
                match stream.next().now_or_never() {
                    Some(Some(Ok(message))) => batch.push(message),
                    // Nothing arrived yet. A stream this busy has more in
                    // flight: wait a moment for it rather than store a small
                    // batch (each costs the same round trips whatever its
                    // size); a quiet one's event is stored at once.
                    None if batch.len() >= BUSY => {
                        match tokio::time::timeout_at(linger, stream.next()).await {
                            Ok(Some(Ok(message))) => batch.push(message),
                            _ => break,
                        }
                    }
                    _ => break,
                }
            }
            store(batch).await;
        }
    }
}

/// Hands back what a pull stream has received but nobody handled (at
/// shutdown), so another consumer gets it in a moment instead of after the
/// ack wait.
///
/// Messages of the open pull request may still be on the wire, so it waits
/// a moment for each. They are naked only once nothing more comes, and with
/// a short delay: an immediate nak would be redelivered into this same pull
/// request, which nobody reads any more.
pub async fn release_buffered(stream: &mut consumer::pull::Stream) {
    use futures::StreamExt;
    let mut held = Vec::new();
    while held.len() < MAX_RELEASED {
        match tokio::time::timeout(IN_FLIGHT_GRACE, stream.next()).await {
            Ok(Some(Ok(message))) => held.push(message),
            _ => break,
        }
    }
    for message in held {
        let _ = message
            .ack_with(jetstream::AckKind::Nak(Some(REDELIVER_AFTER)))
            .await;
    }
}

/// How long [`release_buffered`] waits for one more in-flight message.
const IN_FLIGHT_GRACE: Duration = Duration::from_millis(100);
/// When a handed-back message is redelivered (to whoever pulls then).
const REDELIVER_AFTER: Duration = Duration::from_millis(500);
/// More than any pull batch: a bound, not a limit that is ever reached.
const MAX_RELEASED: usize = 100_000;

/// An event a consumer gives up on, on its way to `chat.dead.<consumer>`
/// (stream DEADLETTER): the original payload and headers plus why.
pub struct DeadLetter<'a> {
    pub stream: &'a str,
    pub consumer: &'a str,
    /// Its sequence in `stream`.
    pub sequence: u64,
    /// Its subject in `stream`.
    pub subject: &'a str,
    /// How many times the consumer was given it.
    pub deliveries: i64,
    pub reason: &'a str,
    pub headers: Option<&'a HeaderMap>,
    pub payload: Bytes,
}

/// The longest reason a dead letter carries; a database error can be long.
const MAX_REASON_CHARS: usize = 512;

impl DeadLetter<'_> {
    /// The original headers, minus those the server interprets or sets
    /// (`Nats-*`: a copied `Nats-Msg-Id` would de-duplicate against the
    /// wrong event, a copied `Nats-Expected-*` could refuse the copy, and a
    /// direct get adds `Nats-Stream`, `Nats-Sequence`, …), plus the
    /// `Chat-Dead-*` headers and the dead letter's own `Nats-Msg-Id`.
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(original) = self.headers {
            for (name, values) in original.iter() {
                let name_str: &str = name.as_ref();
                if name_str
                    .get(..5)
                    .is_some_and(|prefix| prefix.eq_ignore_ascii_case("nats-"))
                {
                    continue;
                }
                for value in values {
                    headers.append(name.clone(), value.clone());
                }
            }
        }
        if let Some(id) = self.headers.and_then(|h| h.get(subjects::MSG_ID_HEADER)) {
            headers.insert(subjects::DEAD_MSG_ID_HEADER, id.clone());
        }
        // A header value may not hold a line break; errors sometimes do.
        let reason: String = self
            .reason
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(MAX_REASON_CHARS)
            .collect();
        headers.insert(subjects::DEAD_REASON_HEADER, reason);
        headers.insert(subjects::DEAD_STREAM_HEADER, self.stream);
        headers.insert(subjects::DEAD_SEQ_HEADER, self.sequence.to_string());
        headers.insert(subjects::DEAD_SUBJECT_HEADER, self.subject);
        headers.insert(
            subjects::DEAD_DELIVERIES_HEADER,
            self.deliveries.to_string(),
        );
        headers.insert(
            subjects::MSG_ID_HEADER,
            subjects::dead_letter_id(self.stream, self.consumer, self.sequence),
        );
        headers
    }

    /// Publishes the copy and waits for its PubAck (the context's request
    /// timeout bounds it); only then is the original safe to give up.
    pub async fn publish(&self, js: &jetstream::Context) -> Result<(), DeadLetterError> {
        js.publish_with_headers(
            subjects::dead_letter(self.consumer),
            self.headers(),
            self.payload.clone(),
        )
        .await?
        .await?;
        Ok(())
    }
}

/// Why a dead letter was not stored.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("the message has no delivery info: {0}")]
    NoDeliveryInfo(async_nats::Error),
    #[error("publishing the copy: {0}")]
    Publish(#[from] jetstream::context::PublishError),
}

/// When a message whose dead letter could not be stored comes back.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(5);

/// Gives up on a pulled message this consumer will never process: copies
/// it to `chat.dead.<consumer>`, then terminates it. If the copy is not
/// acknowledged the message is naked with a delay instead, so it comes
/// back rather than being lost (and after `MAX_DELIVER` tries the
/// max-deliveries path copies it). Returns whether it was terminated.
pub async fn dead_letter(
    js: &jetstream::Context,
    message: &jetstream::Message,
    reason: &str,
) -> bool {
    let copied = match message.info() {
        Ok(info) => {
            DeadLetter {
                stream: info.stream,
                consumer: info.consumer,
                sequence: info.stream_sequence,
                subject: message.subject.as_str(),
                deliveries: info.delivered,
                reason,
                headers: message.headers.as_ref(),
                payload: message.payload.clone(),
            }
            .publish(js)
            .await
        }
        Err(e) => Err(DeadLetterError::NoDeliveryInfo(e)),
    };
    match copied {
        Ok(()) => {
            if let Err(e) = message.ack_with(jetstream::AckKind::Term).await {
                // The dead letter is stored; a redelivery copies it again
                // under the same `Nats-Msg-Id`, which JetStream drops.
                tracing::warn!(error = %e, "cannot terminate a dead-lettered event");
            }
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, subject = %message.subject, "cannot store a dead letter; the event comes back");
            let _ = message
                .ack_with(jetstream::AckKind::Nak(Some(DEAD_LETTER_RETRY)))
                .await;
            false
        }
    }
}

/// Reads one subject of a stream from a starting point, oldest first,
/// through a short-lived in-memory consumer, until nothing is left. Used to
/// look for a message from a point in time and by `chatctl replay`; bounded
/// in messages and bytes per request. It creates a consumer each time, so
/// nothing a client triggers at scale should use it: resumes read the inbox
/// with direct gets (`direct`).
pub struct Scan {
    stream: jetstream::stream::Stream<()>,
    consumer: consumer::PullConsumer,
    batch: Option<consumer::pull::Batch>,
    /// Messages the current batch has yielded.
    yielded: usize,
    done: bool,
}

/// Messages and bytes asked for per request.
const SCAN_BATCH: usize = 500;
/// A scan whose stream does not answer for this long fails instead of
/// waiting: a stream that lost its leader (a cluster without quorum) may
/// leave a pull unanswered, and a session replaying its inbox must then
/// answer `unavailable` (the client resumes later) rather than hang with
/// its requests unread. The fault suite's `cluster_loses_quorum` found it.
const SCAN_STALL: Duration = Duration::from_secs(5);
const SCAN_BYTES: usize = 4 * 1024 * 1024;

/// Whether a pull error is the server closing a batch that reached its
/// byte limit (`409 Message Size Exceeds MaxBytes`); async-nats reports it
/// only as text.
fn ends_batch_on_size(error: &str) -> bool {
    error.contains("409") && error.contains("Message Size Exceeds MaxBytes")
}

/// Why a scan could not go on.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("creating the scan's consumer: {0}")]
    Consumer(#[from] jetstream::stream::ConsumerError),
    #[error("no answer from the stream within {SCAN_STALL:?}")]
    Stalled,
    #[error("asking for messages: {0}")]
    Fetch(#[from] consumer::pull::BatchError),
    #[error("reading a message: {0}")]
    Read(async_nats::Error),
}

impl Scan {
    pub async fn open(
        stream: &jetstream::stream::Stream<()>,
        subject: String,
        from: consumer::DeliverPolicy,
    ) -> Result<Self, ScanError> {
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                deliver_policy: from,
                filter_subject: subject,
                ack_policy: consumer::AckPolicy::None,
                // Only a safety net: `close` deletes it.
                inactive_threshold: Duration::from_secs(120),
                memory_storage: true,
                num_replicas: 1,
                ..Default::default()
            })
            .await?;
        Ok(Self {
            stream: stream.clone(),
            consumer,
            batch: None,
            yielded: 0,
            done: false,
        })
    }

    /// The next message, or `None` when the subject has nothing more.
    pub async fn next(&mut self) -> Result<Option<jetstream::Message>, ScanError> {
        use futures::StreamExt;
        loop {
            if self.done {
                return Ok(None);
            }
            if let Some(batch) = &mut self.batch {
                let next = tokio::time::timeout(SCAN_STALL, batch.next())
                    .await
                    .map_err(|_| ScanError::Stalled)?;
                match next {
                    Some(Ok(message)) => {
                        self.yielded += 1;
                        let info = message.info().map_err(ScanError::Read)?;
                        self.done = info.pending == 0;
                        return Ok(Some(message));
                    }
                    // The next message did not fit in what was left of the
                    // batch's bytes: the server ends the batch with a 409,
                    // and the next fetch starts with that message.
                    Some(Err(e)) if self.yielded > 0 && ends_batch_on_size(&e.to_string()) => {
                        self.batch = None;
                        continue;
                    }
                    Some(Err(e)) => return Err(ScanError::Read(e)),
                    None => {
                        // A request that brought nothing: the subject is drained.
                        self.done = self.yielded == 0;
                        self.batch = None;
                        continue;
                    }
                }
            }
            self.yielded = 0;
            let fetch = self
                .consumer
                .fetch()
                .max_messages(SCAN_BATCH)
                .max_bytes(SCAN_BYTES)
                .messages();
            let batch = tokio::time::timeout(SCAN_STALL, fetch)
                .await
                .map_err(|_| ScanError::Stalled)??;
            self.batch = Some(batch);
        }
    }

    /// Deletes the consumer.
    pub async fn close(self) {
        let name = self.consumer.cached_info().name.clone();
        let _ = self.stream.delete_consumer(&name).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_keeps_the_original_headers_but_not_the_servers() {
        let mut original = HeaderMap::new();
        original.insert(subjects::MSG_ID_HEADER, "alice:c1");
        original.insert("Nats-Expected-Stream", "MESSAGES");
        original.insert(subjects::TRACE_HEADER, "00000000000000ff");
        let letter = DeadLetter {
            stream: "MESSAGES",
            consumer: "persister",
            sequence: 42,
            subject: "chat.msg.dm.alice.bob",
            deliveries: 3,
            reason: "bad\r\nthing",
            headers: Some(&original),
            payload: Bytes::from_static(b"x"),
        };
        let headers = letter.headers();
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
        assert_eq!(
            get(subjects::MSG_ID_HEADER).as_deref(),
            Some("dead:MESSAGES:persister:42")
        );
        assert_eq!(get("Nats-Expected-Stream"), None);
        assert_eq!(
            get(subjects::DEAD_MSG_ID_HEADER).as_deref(),
            Some("alice:c1")
        );
        assert_eq!(
            get(subjects::TRACE_HEADER).as_deref(),
            Some("00000000000000ff")
        );
        assert_eq!(
            get(subjects::DEAD_REASON_HEADER).as_deref(),
            Some("bad  thing")
        );
        assert_eq!(
            get(subjects::DEAD_STREAM_HEADER).as_deref(),
            Some("MESSAGES")
        );
        assert_eq!(get(subjects::DEAD_SEQ_HEADER).as_deref(), Some("42"));
        assert_eq!(
            get(subjects::DEAD_SUBJECT_HEADER).as_deref(),
            Some("chat.msg.dm.alice.bob")
        );
        assert_eq!(get(subjects::DEAD_DELIVERIES_HEADER).as_deref(), Some("3"));
    }

    #[test]
    fn backoff_doubles_up_to_its_maximum() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<_> = (0..4).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 350, 350]);
    }
}
