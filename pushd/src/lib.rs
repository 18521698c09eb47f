//! pushd: push notifications for users' devices that are not connected.
//!
//! The router publishes a [`PushJob`](chat_shared::push::PushJob) on
//! `chat.push.<user>` (stream PUSH, a work queue) for each member with
//! token devices a message found not connected, naming them, and a
//! [`RetractJob`](chat_shared::push::RetractJob) after a read. pushd
//! coalesces one user's jobs over a short window into one notification
//! (badge: the user's unread total), sends it to the named devices' tokens
//! in `push_tokens`, then the window's retractions, through FCM
//! HTTP v1, APNs (HTTP/2) or a signed webhook, retries what is transient,
//! deletes tokens the providers call invalid, and acks the jobs once each
//! token is settled. See `README.md` in this crate for payloads, the retry
//! policy and the delivery guarantees.

mod error;
mod ledger;
mod metrics;
mod mutes;
mod notification;
mod providers;
mod retry;
mod tokens;
mod worker;

use std::sync::Arc;

use chat_shared::shutdown::{self, Shutdown};
use chat_shared::{consume, streams, subjects, Config};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

pub use error::PushdError;
pub use metrics::PushMetrics;
pub use providers::webhook::{SIGNATURE_HEADER, TIMESTAMP_HEADER};

/// Runs pushd until `shutdown` completes, serving its counters and its
/// consumer's lag at `GET /metrics` on `CHAT_METRICS_ADDR` when it is set.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), PushdError> {
    let metrics_listener = chat_shared::metrics::bind(&config).await?;
    let mut registry = Registry::default();
    let metrics = PushMetrics::new(&mut registry);
    run_exposed(config, metrics, metrics_listener, registry, shutdown).await
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
    run_exposed(config, metrics, None, Registry::default(), shutdown).await
}

/// Runs pushd, serving `registry` on `metrics_listener` when given.
async fn run_exposed(
    config: Config,
    metrics: PushMetrics,
    metrics_listener: Option<TcpListener>,
    registry: Registry,
    shutdown: Shutdown,
) -> Result<(), PushdError> {
    let providers = providers::Providers::from_config(&config.push, metrics.clone())?;
    let (nats, js) = consume::connect_and_provision(&config, "pushd").await?;
    let shards = chat_persister::shards::Shards::connect(&config, &js, false).await?;
    let consumer = consume::durable(&js, subjects::PUSH_STREAM, streams::pushd_consumer()).await;
    let stop = shutdown::fan_out(shutdown);
    let exposition = chat_shared::metrics::expose(
        metrics_listener,
        registry,
        &js,
        &[(subjects::PUSH_STREAM.into(), subjects::PUSHD_CONSUMER)],
        &stop,
    );
    let shared = Arc::new(worker::Shared {
        shards,
        js,
        providers,
        metrics,
        preview: config.push.preview,
        coalesce: config.push.coalesce,
        max_tokens: config.push_tokens.per_user,
        ledger: ledger::Ledger::default(),
        stop,
    });
    tracing::info!("pushd running");
    worker::consume(shared, consumer).await;
    exposition.stopped().await;
    chat_shared::nats::flush_before_exit(&nats, &config).await;
    tracing::info!("pushd stopped");
    Ok(())
}
