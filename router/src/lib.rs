//! The router: turns accepted messages and membership changes into inbox
//! items, one per member, and live deliveries.
//!
//! For each MESSAGES event it resolves the members (a DM's two users, a
//! group's members), appends one item to each member's inbox
//! (`chat.inbox.<user>`, de-duplicated by `<event id>:<user>` so a redelivery
//! appends nothing twice), and after each PubAck publishes the item with its
//! cursor on `chat.deliver.<user>`. The MESSAGES event is acked last.
//!
//! Order: one router process is active at a time (the consumer's pinned
//! client); inside it, events are spread over lanes by conversation. A lane
//! has several events' appends on their way at once but sends a user's item
//! only after that user's previous one in the lane is stored, and completes
//! its events in order, so a conversation's messages enter every inbox in
//! stream order.
//!
//! Members other than the sender with devices that hold a push token and
//! are not connected (per the presence and push buckets) get a push job
//! naming those devices; a read retracts it (`push`).
//!
//! A change of a message (v1.1 edit, delete, reaction) on MESSAGES becomes
//! an `update` item the same way (no push); a delete for everyone then
//! erases every stored copy of the text (`erase`).
//!
//! It also turns receipt events (stream RECEIPTS: delivered from edges,
//! read from the persister) into coalesced `receipt` inbox items
//! (`receipts`).

mod erase;
mod fanout;
mod gaps;
mod inbox;
mod metrics;
mod push;
mod receipts;

use std::sync::Arc;

use chat_shared::blocks::BlockCache;
use chat_shared::membership::GroupCache;
use chat_shared::shutdown::{self, Shutdown};
use chat_shared::{consume, streams, subjects, Config, StartError};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Why the router could not start, or stopped other than by its shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("a consumer task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs the router until `shutdown` completes, serving `/metrics` on
/// `CHAT_METRICS_ADDR` when it is set.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), RouterError> {
    let metrics_listener = chat_shared::metrics::bind(&config).await?;
    run_with(config, metrics_listener, shutdown).await
}

/// Runs the router until `shutdown` completes, serving `/metrics` on
/// `metrics_listener` when given.
pub async fn run_with(
    config: Config,
    metrics_listener: Option<TcpListener>,
    shutdown: Shutdown,
) -> Result<(), RouterError> {
    let (nats, js) = consume::connect_and_provision(&config, "router").await?;
    let mut messages = Vec::new();
    for partition in config.partitions.all() {
        let stream = partition.messages_stream();
        let consumer = consume::durable(&js, &stream, streams::router_consumer()).await;
        messages.push((partition, consumer));
    }
    let events = consume::durable(
        &js,
        subjects::EVENTS_STREAM,
        streams::router_events_consumer(),
    )
    .await;
    let receipts = consume::durable(
        &js,
        subjects::RECEIPTS_STREAM,
        streams::router_receipts_consumer(),
    )
    .await;
    let groups = GroupCache::start(nats.clone(), &config.group_cache).await?;
    let blocks = BlockCache::start(nats.clone(), &config.group_cache).await?;
    let presence = consume::bucket(&js, subjects::PRESENCE_BUCKET).await;
    let push_devices = consume::bucket(&js, subjects::PUSH_DEVICES_BUCKET).await;
    let stop = shutdown::fan_out(shutdown);
    let mut registry = Registry::default();
    let metrics = Arc::new(metrics::RouterMetrics::new(&mut registry));
    groups.register_metrics(registry.sub_registry_with_prefix("router"));
    blocks.register_metrics(registry.sub_registry_with_prefix("router"));
    let mut consumers: Vec<(String, &str)> = config
        .partitions
        .all()
        .map(|p| (p.messages_stream(), subjects::ROUTER_CONSUMER))
        .collect();
    consumers.push((
        subjects::EVENTS_STREAM.into(),
        subjects::ROUTER_EVENTS_CONSUMER,
    ));
    consumers.push((
        subjects::RECEIPTS_STREAM.into(),
        subjects::ROUTER_RECEIPTS_CONSUMER,
    ));
    let exposition =
        chat_shared::metrics::expose(metrics_listener, registry, &js, &consumers, &stop);
    let push = push::PushJobs::new(js.clone(), presence, push_devices, metrics.clone());
    let router = Arc::new(fanout::Fanout::new(
        nats.clone(),
        js,
        config.partitions,
        groups.clone(),
        push,
        metrics,
    ));
    tracing::info!("router running");
    // One pull loop per MESSAGES partition, each the pinned client of its
    // own consumer (or a standby for it); all append through one writer.
    let message_loops: Vec<_> = messages
        .into_iter()
        .map(|(partition, consumer)| {
            tokio::spawn(fanout::consume_messages(
                router.clone(),
                partition,
                consumer,
                stop.clone(),
                config.shutdown_grace,
            ))
        })
        .collect();
    let receipt_loop = tokio::spawn(receipts::consume_receipts(
        router.clone(),
        groups,
        blocks,
        receipts,
        stop.clone(),
    ));
    let event_loop = tokio::spawn(fanout::consume_events(router, events, stop.clone()));
    let (messages, events, _, _) = tokio::join!(
        futures::future::join_all(message_loops),
        event_loop,
        receipt_loop,
        exposition.stopped()
    );
    for result in messages.into_iter().chain([events]) {
        result??;
    }
    chat_shared::nats::flush_before_exit(&nats, &config).await;
    tracing::info!("router stopped");
    Ok(())
}
