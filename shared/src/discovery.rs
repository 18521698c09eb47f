//! Edge discovery: each edge keeps an [`EdgeEntry`] under its id in the
//! `chat_edges` bucket, refreshed well within the bucket's max age, so an
//! edge that dies drops out within `CHAT_EDGE_TTL_MS`.

use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::EdgeId;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EdgeEntry {
    pub id: EdgeId,
    /// The WebSocket URL clients connect to.
    pub url: String,
    /// Open WebSocket connections.
    pub connections: usize,
    /// Draining edges take no new connections.
    pub draining: bool,
    /// ms since the epoch of the last refresh.
    pub updated_at: u64,
}

/// Every edge entry younger than `ttl` (the bucket expires older ones too;
/// the age check covers a bucket created with a longer max age), least
/// loaded first, draining edges last.
pub async fn list(store: &kv::Store, ttl: Duration, now_ms: u64) -> Result<Vec<EdgeEntry>, String> {
    let mut keys = store.keys().await.map_err(|e| e.to_string())?;
    let mut entries = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| e.to_string())?;
        let Some(bytes) = store.get(&key).await.map_err(|e| e.to_string())? else {
            continue;
        };
        let Ok(entry) = serde_json::from_slice::<EdgeEntry>(&bytes) else {
            tracing::warn!(%key, "ignoring a malformed edge entry");
            continue;
        };
        if now_ms.saturating_sub(entry.updated_at) <= ttl.as_millis() as u64 {
            entries.push(entry);
        }
    }
    entries.sort_by(|a, b| {
        (a.draining, a.connections, &a.id).cmp(&(b.draining, b.connections, &b.id))
    });
    Ok(entries)
}
