//! MESSAGES and INBOX as a test sees them: one stream each, or split into
//! partitions (`CHAT_PARTITIONS`, see `chat_shared::partitions`). Tests name
//! them through here, never as `"MESSAGES"`, so each runs as it is against
//! either layout.

use anyhow::{Context as _, Result};
use async_nats::jetstream;
use chat_shared::partitions::{Partition, Partitions};

/// `MESSAGES`, or every partition's `MESSAGES_<k>`, in index order.
pub fn messages_streams(partitions: Partitions) -> Vec<String> {
    partitions.all().map(Partition::messages_stream).collect()
}

/// `INBOX`, or every partition's `INBOX_<k>`, in index order.
pub fn inbox_streams(partitions: Partitions) -> Vec<String> {
    partitions.all().map(Partition::inbox_stream).collect()
}

/// How many messages `streams` hold together (every partition of a family
/// holds its share).
pub async fn stored(js: &jetstream::Context, streams: &[String]) -> Result<u64> {
    let mut total = 0;
    for name in streams {
        let mut stream = js.get_stream(name).await.with_context(|| name.clone())?;
        total += stream.info().await?.state.messages;
    }
    Ok(total)
}
