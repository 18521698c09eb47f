//! NATS connection set-up shared by every service.

use std::time::Duration;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
#[error("connecting to NATS at {url}: {source}")]
pub struct ConnectError {
    pub url: String,
    pub source: async_nats::ConnectError,
}

/// Connects as this service's NATS user. Reconnects are automatic and
/// unbounded; requests (and PubAcks) time out after `request_timeout`, so a
/// NATS outage turns into a fast `unavailable` instead of a hang.
pub async fn connect(config: &Config, name: &str) -> Result<async_nats::Client, ConnectError> {
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
        .connect(&config.nats_url)
        .await
        .map_err(|source| ConnectError {
            url: config.nats_url.clone(),
            source,
        })
}

/// A JetStream context whose PubAck waits are bounded like requests.
pub fn jetstream(client: async_nats::Client, config: &Config) -> async_nats::jetstream::Context {
    let mut context = async_nats::jetstream::new(client);
    context.set_timeout(config.request_timeout);
    context
}
