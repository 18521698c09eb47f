//! Discovery and drain.
//!
//! The edge advertises itself in the `chat_edges` bucket (refreshed every
//! third of the TTL) and lists the live edges on `GET /v1/edges` from its
//! [`Directory`](chat_shared::discovery::Directory). On SIGTERM
//! or `chatctl drain <edge>` it drains: it stops taking connections, marks
//! itself draining, tells its clients in batches to `reconnect` (with the
//! other edges' URLs), and waits a bounded time for them to leave.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::kv;
use chat_shared::clock::now_ms;
use chat_shared::discovery::EdgeEntry;
use chat_shared::ids::EdgeId;
use chat_shared::sync::lock;
use tokio::sync::{oneshot, watch, Notify};

use crate::Edge;

/// The edge's open connections, each with a way to be told to reconnect.
#[derive(Default)]
pub struct Connections {
    draining: AtomicBool,
    next: AtomicU64,
    open: Mutex<HashMap<u64, Option<oneshot::Sender<Vec<String>>>>>,
    /// Signalled whenever a connection ends (the drain waits on it).
    ended: Notify,
}

/// A connection's place; dropping it ends the connection's count.
pub struct Ticket {
    connections: Arc<Connections>,
    id: u64,
    /// Fires with the other edges' URLs when this edge drains.
    pub reconnect: oneshot::Receiver<Vec<String>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.connections.open).remove(&self.id);
        self.connections.ended.notify_waiters();
    }
}

impl Connections {
    /// A new connection; `None` while draining.
    pub fn open(self: &Arc<Self>) -> Option<Ticket> {
        if self.is_draining() {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.open).insert(id, Some(tx));
        Some(Ticket {
            connections: self.clone(),
            id,
            reconnect: rx,
        })
    }

    pub fn count(&self) -> usize {
        lock(&self.open).len()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

fn entry(edge: &Edge) -> EdgeEntry {
    EdgeEntry {
        id: edge.id.clone(),
        url: edge.config.public_url(),
        connections: edge.connections.count(),
        draining: edge.connections.is_draining(),
        updated_at: now_ms(),
    }
}

async fn advertise_once(store: &kv::Store, edge: &Edge) {
    let Ok(body) = serde_json::to_vec(&entry(edge)) else {
        return;
    };
    if let Err(e) = store.put(edge.id.as_str(), body.into()).await {
        tracing::warn!(error = %e, "cannot advertise this edge");
    }
}

/// Keeps this edge's discovery entry fresh until `stop`, then removes it.
pub async fn advertise(edge: Arc<Edge>, store: kv::Store, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(edge.config.edge_ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        advertise_once(&store, &edge).await;
    }
    if let Err(e) = store.delete(edge.id.as_str()).await {
        tracing::debug!(error = %e, "cannot remove this edge's entry");
    }
}

/// Live, non-draining edges, least loaded first.
pub fn live_edges(edge: &Edge) -> Vec<EdgeEntry> {
    let mut entries = edge.directory.list(edge.config.edge_ttl, now_ms());
    entries.retain(|e| !e.draining);
    entries
}

/// Drains this edge: returns once every client has left or the drain
/// timeout passed.
pub async fn drain(edge: &Edge) {
    let connections = &edge.connections;
    connections.draining.store(true, Ordering::Relaxed);
    advertise_once(&edge.edges, edge).await;
    let others: Vec<String> = live_edges(edge)
        .into_iter()
        .filter(|e| e.id != edge.id)
        .map(|e| e.url)
        .collect();
    if others.is_empty() {
        tracing::warn!("no other edge is listed; clients reconnect through the load balancer");
    }
    let deadline = tokio::time::Instant::now() + edge.config.drain_timeout;
    let notices: Vec<oneshot::Sender<Vec<String>>> = lock(&connections.open)
        .values_mut()
        .filter_map(Option::take)
        .collect();
    tracing::info!(
        edge = %edge.id,
        clients = notices.len(),
        others = others.len(),
        "draining"
    );
    let batch = edge.config.drain_batch.max(1);
    let mut remaining = notices;
    while !remaining.is_empty() {
        let rest = remaining.split_off(batch.min(remaining.len()));
        for notice in remaining {
            let _ = notice.send(others.clone());
        }
        remaining = rest;
        if !remaining.is_empty() {
            tokio::time::sleep(edge.config.drain_batch_interval).await;
        }
    }
    loop {
        let ended = connections.ended.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        if connections.count() == 0 {
            tracing::info!(edge = %edge.id, "drained");
            return;
        }
        if tokio::time::timeout_at(deadline, ended).await.is_err() {
            tracing::warn!(edge = %edge.id, left = connections.count(), "drain timed out");
            return;
        }
    }
}

/// Completes on an operator's `chatctl drain <edge>`.
pub async fn drain_requested(nats: async_nats::Client, id: EdgeId) {
    let subject = chat_shared::subjects::edge_drain(&id);
    match nats.subscribe(subject).await {
        Ok(mut requests) => {
            use futures::StreamExt;
            if requests.next().await.is_some() {
                tracing::info!(edge = %id, "drain requested by an operator");
                return;
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot listen for drain requests"),
    }
    // Without a subscription only a signal drains this edge.
    std::future::pending::<()>().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_count_and_stop_when_draining() {
        let connections = Arc::new(Connections::default());
        let first = connections.open();
        assert!(first.is_some());
        assert_eq!(connections.count(), 1);
        connections.draining.store(true, Ordering::Relaxed);
        assert!(connections.open().is_none());
        drop(first);
        assert_eq!(connections.count(), 0);
    }
}
