//! Push notifications for offline users. Until its issue lands it connects,
//! provisions the streams and buckets, and waits.

use chat_shared::shutdown::Shutdown;
use chat_shared::{streams, Config};

#[derive(Debug, thiserror::Error)]
pub enum PushdError {
    #[error(transparent)]
    Nats(#[from] chat_shared::nats::ConnectError),
    #[error(transparent)]
    Provision(#[from] streams::ProvisionError),
}

/// Runs the service until `shutdown` completes.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), PushdError> {
    let nats = chat_shared::nats::connect(&config, "pushd").await?;
    let js = chat_shared::nats::jetstream(nats, &config);
    streams::apply(&js, &config).await?;
    tracing::info!("pushd running");
    shutdown.await;
    tracing::info!("pushd stopped");
    Ok(())
}
