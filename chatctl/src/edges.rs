//! The discovery view and drain requests.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use chat_shared::discovery::{self, EdgeEntry};
use chat_shared::ids::EdgeId;
use chat_shared::subjects;

/// Every edge with a fresh entry (draining ones included, last).
pub async fn list(js: &jetstream::Context, ttl: Duration) -> anyhow::Result<Vec<EdgeEntry>> {
    let store = js
        .get_key_value(subjects::EDGES_BUCKET)
        .await
        .context("the edges bucket")?;
    discovery::list(&store, ttl, chat_shared::clock::now_ms())
        .await
        .context("listing edges")
}

pub fn render(edges: &[EdgeEntry]) -> String {
    let mut out = format!(
        "{:<20} {:>11} {:<9} {}\n",
        "EDGE", "CONNECTIONS", "STATE", "URL"
    );
    for edge in edges {
        out.push_str(&format!(
            "{:<20} {:>11} {:<9} {}\n",
            edge.id,
            edge.connections,
            if edge.draining { "draining" } else { "live" },
            edge.url
        ));
    }
    out
}

/// Asks `edge` to drain (as SIGTERM would); it must be listed, so a typo
/// is an error rather than a message nobody hears.
pub async fn drain(
    client: &async_nats::Client,
    js: &jetstream::Context,
    ttl: Duration,
    edge: &str,
) -> anyhow::Result<()> {
    let edge = EdgeId::parse(edge.to_string()).context("edge id")?;
    let edges = list(js, ttl).await?;
    anyhow::ensure!(
        edges.iter().any(|e| e.id == edge),
        "no live edge {edge} (see chatctl edges)"
    );
    client
        .publish(subjects::edge_drain(&edge), "drain".into())
        .await?;
    client.flush().await?;
    Ok(())
}
