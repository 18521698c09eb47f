//! Connecting a backend service and pulling from its durable consumers.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};

use crate::error::StartError;
use crate::{streams, Config};

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

/// Connects as `service`, then creates or updates every stream and bucket.
pub async fn connect_and_provision(
    config: &Config,
    service: &str,
) -> Result<(async_nats::Client, jetstream::Context), StartError> {
    let client = crate::nats::connect(config, service).await?;
    let js = crate::nats::jetstream(client.clone(), config);
    streams::apply(&js, config).await?;
    Ok((client, js))
}

/// A handle on the KV bucket `name` (provisioned by [`connect_and_provision`]).
pub async fn bucket(
    js: &jetstream::Context,
    name: &str,
) -> Result<jetstream::kv::Store, StartError> {
    js.get_key_value(name)
        .await
        .map_err(|e| StartError::JetStream(format!("bucket {name}: {e}")))
}

/// The durable pull consumer `config` on `stream`, created if missing and
/// updated if its definition changed.
pub async fn durable(
    js: &jetstream::Context,
    stream: &str,
    config: consumer::pull::Config,
) -> Result<consumer::PullConsumer, StartError> {
    let name = config.durable_name.clone().unwrap_or_default();
    let handle = js
        .get_stream(stream)
        .await
        .map_err(|e| StartError::JetStream(format!("stream {stream}: {e}")))?;
    // Create or update, so a deployment picks up a changed definition (an
    // ack wait, a limit). A change the server cannot apply in place keeps
    // the existing consumer, loudly.
    match handle.create_consumer(config).await {
        Ok(consumer) => Ok(consumer),
        Err(e) => {
            tracing::warn!(consumer = %name, error = %e, "cannot update the consumer; using it as it is");
            handle
                .get_consumer(&name)
                .await
                .map_err(|e| StartError::JetStream(format!("consumer {name}: {e}")))
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

/// Reads one subject of a stream from a starting point, oldest first,
/// through a short-lived in-memory consumer, until nothing is left. Used to
/// replay an inbox and to look for a message; cheap to open, and bounded in
/// messages and bytes per request.
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
const SCAN_BYTES: usize = 4 * 1024 * 1024;

impl Scan {
    pub async fn open(
        stream: &jetstream::stream::Stream<()>,
        subject: String,
        from: consumer::DeliverPolicy,
    ) -> Result<Self, String> {
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
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            stream: stream.clone(),
            consumer,
            batch: None,
            yielded: 0,
            done: false,
        })
    }

    /// The next message, or `None` when the subject has nothing more.
    pub async fn next(&mut self) -> Result<Option<jetstream::Message>, String> {
        use futures::StreamExt;
        loop {
            if self.done {
                return Ok(None);
            }
            if let Some(batch) = &mut self.batch {
                match batch.next().await {
                    Some(Ok(message)) => {
                        self.yielded += 1;
                        let info = message.info().map_err(|e| e.to_string())?;
                        self.done = info.pending == 0;
                        return Ok(Some(message));
                    }
                    Some(Err(e)) => return Err(e.to_string()),
                    None => {
                        // A request that brought nothing: the subject is drained.
                        self.done = self.yielded == 0;
                        self.batch = None;
                        continue;
                    }
                }
            }
            self.yielded = 0;
            let batch = self
                .consumer
                .fetch()
                .max_messages(SCAN_BATCH)
                .max_bytes(SCAN_BYTES)
                .messages()
                .await
                .map_err(|e| e.to_string())?;
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
    fn backoff_doubles_up_to_its_maximum() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<_> = (0..4).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 350, 350]);
    }
}
