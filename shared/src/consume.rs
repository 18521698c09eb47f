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

/// The durable pull consumer `config` on `stream`, created if missing.
pub async fn durable(
    js: &jetstream::Context,
    stream: &str,
    config: consumer::pull::Config,
) -> Result<consumer::PullConsumer, StartError> {
    let name = config.durable_name.clone().unwrap_or_default();
    js.get_stream(stream)
        .await
        .map_err(|e| StartError::JetStream(format!("stream {stream}: {e}")))?
        .get_or_create_consumer(&name, config)
        .await
        .map_err(|e| StartError::JetStream(format!("consumer {name}: {e}")))
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
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30));
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
