//! The persister: the only process that touches PostgreSQL.
//!
//! It writes every MESSAGES event into `messages` in batches (one multi-row
//! `INSERT … ON CONFLICT DO NOTHING` per shard per batch, acked after every
//! shard committed, so a redelivery or a restart writes nothing twice),
//! keeps each member's unread counter (`user_index`) and answers the
//! request/reply service `chat.rpc.*` (queue group `persister`) for history,
//! conversations, groups and read state.
//!
//! It stores delivered watermarks from stream RECEIPTS (`watermarks`), and
//! publishes a read's receipt event there once the read is stored.
//!
//! PostgreSQL is split into shards (`shards`): a conversation's rows on
//! one, a user's on one, by the shard map in KV.
//!
//! `unread` is the one definition of a user's unread total, shared with
//! pushd (the badge).
//!
//! It makes the thumbnails of uploaded images (`thumbs`, its own task on
//! stream MEDIA_JOBS) and answers who may see a media.
//!
//! It also keeps the dead letters (`deadletter`): an event any backend
//! consumer reached max deliveries on is copied to `chat.dead.<consumer>`.

pub mod db;
mod deadletter;
mod error;
mod metrics;
mod migrations;
mod months;
pub mod moves;
mod service;
pub mod shards;
mod thumbs;
pub mod unread;
mod user_index;
mod watermarks;
mod writer;

use std::sync::Arc;

use chat_shared::shutdown::{self, Shutdown};
use chat_shared::{consume, streams, subjects, Config};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

pub use error::PersisterError;

/// Runs the persister until `shutdown` completes, serving `/metrics` on
/// `metrics_listener` when given.
pub async fn run_with(
    config: Config,
    metrics_listener: Option<TcpListener>,
    shutdown: Shutdown,
) -> Result<(), PersisterError> {
    let (nats, js) = consume::connect_and_provision(&config, "persister").await?;
    let shards = shards::Shards::connect(&config, &js, true).await?;
    migrations::run_all(&shards).await?;
    shards::own_from_map(&shards).await?;
    months::ensure(&shards).await?;
    let mut consumers = Vec::new();
    for partition in config.partitions.all() {
        let stream = partition.messages_stream();
        consumers.push(consume::durable(&js, &stream, streams::persister_consumer()).await);
    }
    let delivered = consume::durable(
        &js,
        subjects::RECEIPTS_STREAM,
        streams::persister_receipts_consumer(),
    )
    .await;
    let thumbnailer = consume::durable(
        &js,
        subjects::MEDIA_JOBS_STREAM,
        streams::thumbnailer_consumer(),
    )
    .await;
    let media = js
        .get_object_store(subjects::MEDIA_BUCKET)
        .await
        .map_err(|source| chat_shared::StartError::ObjectStore {
            name: subjects::MEDIA_BUCKET,
            source,
        })?;
    let stop = shutdown::fan_out(shutdown);
    let mut registry = Registry::default();
    let metrics = Arc::new(metrics::PersisterMetrics::new(&mut registry));
    let exposition = chat_shared::metrics::expose(
        metrics_listener,
        registry,
        &js,
        &config
            .partitions
            .all()
            .map(|p| (p.messages_stream(), subjects::PERSISTER_CONSUMER))
            .chain([(
                subjects::RECEIPTS_STREAM.to_string(),
                subjects::PERSISTER_RECEIPTS_CONSUMER,
            )])
            .collect::<Vec<_>>(),
        &stop,
    );
    let push_devices = consume::bucket(&js, subjects::PUSH_DEVICES_BUCKET).await;
    let service = service::Service::new(
        shards.clone(),
        nats.clone(),
        js.clone(),
        service::Policy {
            max_group_members: config.max_group_members,
            push_tokens: config.push_tokens.clone(),
            changes: service::ChangeRules {
                edit: config.edit_window,
                delete: config.delete_window,
                partitions: config.partitions,
            },
        },
        push_devices,
        metrics.clone(),
    );
    tracing::info!("persister running");
    let rpc = tokio::spawn(service::serve(service, stop.clone()));
    let mover = tokio::spawn(deadletter::move_dead_letters(
        nats.clone(),
        js.clone(),
        config.partitions,
        metrics.clone(),
        stop.clone(),
    ));
    let months = tokio::spawn(months::keep_ahead(shards.clone(), stop.clone()));
    let watermarks = tokio::spawn(watermarks::store_delivered(
        shards.clone(),
        js.clone(),
        delivered,
        stop.clone(),
    ));
    // The media's rows are on the home shard.
    let thumbs = tokio::spawn(thumbs::make_thumbnails(
        shards.home().clone(),
        media,
        thumbnailer,
        config.media.max_pixels,
        stop.clone(),
    ));
    // One writer per MESSAGES partition, each pulling its own consumer.
    let writers = consumers.into_iter().map(|consumer| {
        writer::write_messages(
            shards.clone(),
            js.clone(),
            consumer,
            metrics.clone(),
            stop.clone(),
        )
    });
    let written: Result<(), PersisterError> = futures::future::join_all(writers)
        .await
        .into_iter()
        .collect();
    let _ = rpc.await;
    let _ = mover.await;
    let _ = watermarks.await;
    let _ = thumbs.await;
    let _ = months.await;
    exposition.stopped().await;
    chat_shared::nats::flush_before_exit(&nats, &config).await;
    tracing::info!("persister stopped");
    written
}
