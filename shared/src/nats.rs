//! NATS connection set-up shared by every service.

use std::time::Duration;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
#[error("connecting to NATS at {url}: {source}")]
pub struct ConnectError {
    pub url: String,
    pub source: async_nats::ConnectError,
}

/// What a process knows about its NATS connection, for those that must
/// notice lost core-NATS messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Link {
    pub connected: bool,
    /// Bumped whenever core messages may have been lost: after each
    /// reconnect, and when the server reported this client a slow consumer.
    pub gaps: u64,
}

/// [`connect`], also reporting the connection's [`Link`] as it changes.
pub async fn connect_watched(
    config: &Config,
    name: &str,
) -> Result<(async_nats::Client, tokio::sync::watch::Receiver<Link>), ConnectError> {
    let (tx, rx) = tokio::sync::watch::channel(Link {
        connected: true,
        gaps: 0,
    });
    let options = options(config, name).event_callback(move |event| {
        let tx = tx.clone();
        async move {
            match event {
                async_nats::Event::Disconnected => tx.send_modify(|link| link.connected = false),
                async_nats::Event::Connected => tx.send_modify(|link| {
                    link.connected = true;
                    link.gaps += 1;
                }),
                async_nats::Event::SlowConsumer(_) => tx.send_modify(|link| link.gaps += 1),
                _ => {}
            }
        }
    });
    let client = options
        .connect(&config.nats_url)
        .await
        .map_err(|source| ConnectError {
            url: config.nats_url.clone(),
            source,
        })?;
    Ok((client, rx))
}

/// Connects as this service's NATS user. Reconnects are automatic and
/// unbounded; requests (and PubAcks) time out after `request_timeout`, so a
/// NATS outage turns into a fast `unavailable` instead of a hang.
pub async fn connect(config: &Config, name: &str) -> Result<async_nats::Client, ConnectError> {
    options(config, name)
        .connect(&config.nats_url)
        .await
        .map_err(|source| ConnectError {
            url: config.nats_url.clone(),
            source,
        })
}

fn options(config: &Config, name: &str) -> async_nats::ConnectOptions {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .request_timeout(Some(config.request_timeout))
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        // Published messages wait here while disconnected; bounded so an outage
        // cannot grow memory without limit.
        .client_capacity(65_536)
        .subscription_capacity(65_536);
    if let (Some(user), Some(password)) = (&config.nats_user, &config.nats_password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    options
}

/// A JetStream context whose PubAck waits are bounded like requests.
pub fn jetstream(client: async_nats::Client, config: &Config) -> async_nats::jetstream::Context {
    let mut context = async_nats::jetstream::new(client);
    context.set_timeout(config.request_timeout);
    context
}
