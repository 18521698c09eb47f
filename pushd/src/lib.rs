//! Push notifications for offline users. Until its issue lands it connects,
//! provisions the streams and buckets, and waits.

use chat_shared::shutdown::Shutdown;
use chat_shared::{consume, Config, StartError};

/// Runs the service until `shutdown` completes.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), StartError> {
    consume::connect_and_provision(&config, "pushd").await?;
    tracing::info!("pushd running");
    shutdown.await;
    tracing::info!("pushd stopped");
    Ok(())
}
