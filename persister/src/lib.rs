//! The persister: the only process that touches PostgreSQL.
//!
//! It writes every MESSAGES event into `messages` in batches (one multi-row
//! `INSERT … ON CONFLICT DO NOTHING` per batch, acked after COMMIT, so a
//! redelivery or a restart writes nothing twice), and answers the
//! request/reply service `chat.rpc.*` (queue group `persister`) for history,
//! conversations, groups and read state.

mod error;
mod migrations;
mod service;
mod writer;

use chat_shared::shutdown::{self, Shutdown};
use chat_shared::{consume, streams, subjects, Config};

pub use error::PersisterError;

/// Runs the persister until `shutdown` completes.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), PersisterError> {
    let pool = chat_shared::db::connect_pool(&config)
        .map_err(|e| PersisterError::Database(e.to_string()))?;
    migrations::run(&pool).await?;
    let (nats, js) = consume::connect_and_provision(&config, "persister").await?;
    let consumer = consume::durable(
        &js,
        subjects::MESSAGES_STREAM,
        streams::persister_consumer(),
    )
    .await?;
    let stop = shutdown::fan_out(shutdown);
    let service = service::Service::new(
        pool.clone(),
        nats.clone(),
        js.clone(),
        config.max_group_members,
    );
    tracing::info!("persister running");
    let rpc = tokio::spawn(service::serve(service, stop.clone()));
    let written = writer::write_messages(pool, consumer, stop).await;
    let _ = rpc.await;
    tracing::info!("persister stopped");
    written
}
