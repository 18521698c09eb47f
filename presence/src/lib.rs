//! Online presence and typing fan-out. Until its issue lands it connects,
//! provisions the streams and buckets, and waits.

use chat_shared::shutdown::Shutdown;
use chat_shared::{consume, Config, StartError};

/// Runs the service until `shutdown` completes.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), StartError> {
    consume::connect_and_provision(&config, "presence").await?;
    tracing::info!("presence running");
    shutdown.await;
    tracing::info!("presence stopped");
    Ok(())
}
