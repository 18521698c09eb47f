//! pushd: push notifications for users with no device online.
//!
//! The router publishes a [`PushJob`](chat_shared::push::PushJob) on
//! `chat.push.<user>` (stream PUSH, a work queue) for each member a message
//! found offline. pushd coalesces one user's jobs over a short window into
//! one notification, sends it to every token in `push_tokens` through FCM
//! HTTP v1, APNs (HTTP/2) or a signed webhook, retries what is transient,
//! deletes tokens the providers call invalid, and acks the jobs once each
//! token is settled. See `README.md` in this crate for payloads, the retry
//! policy and the delivery guarantees.

mod error;
mod ledger;
mod metrics;
mod notification;
mod providers;
mod retry;
mod tokens;
mod worker;

use std::sync::Arc;

use chat_shared::shutdown::{self, Shutdown};
use chat_shared::{consume, streams, subjects, Config};
use prometheus_client::registry::Registry;

pub use error::PushdError;
pub use metrics::PushMetrics;
pub use providers::webhook::{SIGNATURE_HEADER, TIMESTAMP_HEADER};

/// Runs pushd until `shutdown` completes, with counters nobody reads.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), PushdError> {
    let mut registry = Registry::default();
    run_with(config, PushMetrics::new(&mut registry), shutdown).await
}

/// Runs pushd until `shutdown` completes, counting into `metrics`.
///
/// On shutdown it stops pulling, closes the open windows and sends them;
/// a notification still retrying then stops and its jobs are handed back
/// (nak) for the next pushd.
pub async fn run_with(
    config: Config,
    metrics: PushMetrics,
    shutdown: Shutdown,
) -> Result<(), PushdError> {
    let providers = providers::Providers::from_config(&config.push, metrics.clone())?;
    let pool =
        chat_shared::db::connect_pool(&config).map_err(|e| PushdError::Database(e.to_string()))?;
    let (_nats, js) = consume::connect_and_provision(&config, "pushd").await?;
    let consumer = consume::durable(&js, subjects::PUSH_STREAM, streams::pushd_consumer()).await?;
    let shared = Arc::new(worker::Shared {
        pool,
        providers,
        metrics,
        preview: config.push.preview,
        coalesce: config.push.coalesce,
        ledger: ledger::Ledger::default(),
        stop: shutdown::fan_out(shutdown),
    });
    tracing::info!("pushd running");
    worker::consume(shared, consumer).await;
    tracing::info!("pushd stopped");
    Ok(())
}
