//! The monthly partitions of `messages` (migration 0015), created ahead of
//! time on every shard: at start, this month and the next two, and again
//! every few hours, so a message never waits for its month and an old
//! month is a table of its own to detach (docs/scaling.md).

use std::time::Duration;

use chat_shared::idgen::{EPOCH_MS, NODE_BITS, SEQUENCE_BITS};
use chat_shared::shutdown;
use tokio::sync::watch;

use crate::shards::Shards;
use crate::PersisterError;

/// How far ahead months exist: at least two whole months.
const AHEAD: Duration = Duration::from_secs(62 * 24 * 3600);
/// How often the months ahead are checked.
const EVERY: Duration = Duration::from_secs(6 * 3600);

/// Creates the missing months from now to [`AHEAD`] on every shard.
pub async fn ensure(shards: &Shards) -> Result<(), PersisterError> {
    let now = chat_shared::clock::now_ms() as i64;
    let until = now + AHEAD.as_millis() as i64;
    for (_, pool) in shards.all() {
        create(&**pool.get().await?, now, until)
            .await
            .map_err(|source| PersisterError::Database {
                what: "create the months of messages",
                source,
            })?;
    }
    Ok(())
}

/// Creates the missing months from the one holding `from_ms` to the one
/// holding `to_ms` (ms since 1970) on one shard.
pub(crate) async fn create(
    db: &tokio_postgres::Client,
    from_ms: i64,
    to_ms: i64,
) -> Result<(), tokio_postgres::Error> {
    let shift = (NODE_BITS + SEQUENCE_BITS) as i32;
    db.execute(
        "SELECT chat_message_months($1, $2, $3, $4)",
        &[&from_ms, &to_ms, &(EPOCH_MS as i64), &shift],
    )
    .await
    .map(|_| ())
}

/// Keeps the months ahead until `stop`; a failure is retried at the next
/// round (two months of margin).
pub async fn keep_ahead(shards: Shards, stop: watch::Receiver<bool>) {
    let stopped = shutdown::wait(stop);
    tokio::pin!(stopped);
    let mut every = tokio::time::interval(EVERY);
    every.tick().await;
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = every.tick() => {
                if let Err(e) = ensure(&shards).await {
                    tracing::warn!(error = %e, "months of messages not created; retrying later");
                }
            }
        }
    }
}
