//! Edge discovery: each edge keeps an [`EdgeEntry`] under its id in the
//! `chat_edges` bucket, refreshed well within the bucket's max age, so an
//! edge that dies drops out within `CHAT_EDGE_TTL_MS`.
//!
//! An edge reads the bucket through one [`Directory`]: a watcher that keeps
//! an in-memory copy current, so listing the edges (which anyone may ask
//! for, unauthenticated) costs JetStream nothing. [`list`] reads the bucket
//! afresh, for one-off readers such as `chatctl`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::consume::Backoff;
use crate::ids::EdgeId;
use crate::nats::Link;

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

/// Why the edges bucket could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("listing the edges bucket's keys: {0}")]
    Keys(#[from] kv::HistoryError),
    #[error("reading the edges bucket's keys: {0}")]
    Watch(#[from] kv::WatcherError),
    #[error("reading an edge entry: {0}")]
    Entry(#[from] kv::EntryError),
}

/// Every edge entry younger than `ttl` (the bucket expires older ones too;
/// the age check covers a bucket created with a longer max age), least
/// loaded first, draining edges last.
pub async fn list(
    store: &kv::Store,
    ttl: Duration,
    now_ms: u64,
) -> Result<Vec<EdgeEntry>, ListError> {
    let mut keys = store.keys().await?;
    let mut entries = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key?;
        let Some(bytes) = store.get(&key).await? else {
            continue;
        };
        if let Some(entry) = parse(&key, &bytes) {
            entries.push(entry);
        }
    }
    Ok(live(entries, ttl, now_ms))
}

fn parse(key: &str, bytes: &[u8]) -> Option<EdgeEntry> {
    let entry = serde_json::from_slice::<EdgeEntry>(bytes);
    if entry.is_err() {
        tracing::warn!(%key, "ignoring a malformed edge entry");
    }
    entry.ok()
}

fn is_fresh(entry: &EdgeEntry, ttl: Duration, now_ms: u64) -> bool {
    now_ms.saturating_sub(entry.updated_at) <= ttl.as_millis() as u64
}

/// The entries younger than `ttl`, least loaded first, draining edges last.
fn live(
    entries: impl IntoIterator<Item = EdgeEntry>,
    ttl: Duration,
    now_ms: u64,
) -> Vec<EdgeEntry> {
    let mut entries: Vec<EdgeEntry> = entries
        .into_iter()
        .filter(|e| is_fresh(e, ttl, now_ms))
        .collect();
    entries.sort_by(|a, b| {
        (a.draining, a.connections, &a.id).cmp(&(b.draining, b.connections, &b.id))
    });
    entries
}

/// The `chat_edges` bucket as this process's one watcher last saw it.
#[derive(Clone, Default)]
pub struct Directory {
    entries: Arc<RwLock<HashMap<String, EdgeEntry>>>,
}

impl Directory {
    /// Every edge entry younger than `ttl`, least loaded first, draining
    /// edges last (as [`list`], from memory).
    pub fn list(&self, ttl: Duration, now_ms: u64) -> Vec<EdgeEntry> {
        let entries = self
            .entries
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        live(entries.values().cloned(), ttl, now_ms)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, EdgeEntry>> {
        // Single map operations: poisoning cannot leave the map inconsistent.
        self.entries
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn apply(&self, key: &str, operation: kv::Operation, value: &[u8]) {
        match operation {
            kv::Operation::Put => {
                if let Some(edge) = parse(key, value) {
                    self.write().insert(key.to_string(), edge);
                }
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                self.write().remove(key);
            }
        }
    }

    /// Forgets entries past `ttl`: the bucket expires them without a
    /// delete marker, and edge ids are new with every process.
    fn prune(&self, ttl: Duration, now_ms: u64) {
        self.write().retain(|_, e| is_fresh(e, ttl, now_ms));
    }

    /// Keeps the directory current from `store` until `stop` turns true:
    /// one watch (an ordered consumer replaying the last entry per key,
    /// then following changes), started again after a NATS reconnect (the
    /// server may have lost it) or an error.
    pub async fn follow(
        self,
        store: kv::Store,
        ttl: Duration,
        mut link: watch::Receiver<Link>,
        stop: watch::Receiver<bool>,
    ) {
        let stopped = crate::shutdown::wait(stop);
        tokio::pin!(stopped);
        let retry = || Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut backoff = retry();
        let mut prune = tokio::time::interval(ttl);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let gaps = link.borrow_and_update().gaps;
            let mut watch = tokio::select! {
                _ = &mut stopped => return,
                watch = store.watch_with_history(">") => match watch {
                    Ok(watch) => watch,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch the edges bucket; retrying");
                        tokio::select! {
                            _ = &mut stopped => return,
                            _ = backoff.wait() => continue,
                        }
                    }
                },
            };
            // Keys seen since this watch started; once it has replayed the
            // bucket, any other key was deleted while nobody watched.
            let mut replayed: Option<HashSet<String>> = Some(HashSet::new());
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = prune.tick() => self.prune(ttl, crate::clock::now_ms()),
                    changed = link.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        if link.borrow_and_update().gaps != gaps {
                            break;
                        }
                    }
                    entry = watch.next() => match entry {
                        Some(Ok(entry)) => {
                            backoff = retry();
                            self.apply(&entry.key, entry.operation, &entry.value);
                            if let Some(seen) = replayed.as_mut() {
                                seen.insert(entry.key.clone());
                                if entry.delta == 0 {
                                    self.write().retain(|key, _| seen.contains(key));
                                    replayed = None;
                                }
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "the edges watch failed; watching again");
                            break;
                        }
                        None => break,
                    },
                }
            }
            tokio::select! {
                _ = &mut stopped => return,
                _ = backoff.wait() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(id: &str, connections: usize, draining: bool, updated_at: u64) -> EdgeEntry {
        EdgeEntry {
            id: EdgeId::parse(id.to_string()).unwrap(),
            url: format!("ws://{id}/v1/ws"),
            connections,
            draining,
            updated_at,
        }
    }

    #[test]
    fn listing_drops_old_entries_and_orders_by_load_draining_last() {
        let ttl = Duration::from_secs(15);
        let now = 100_000;
        let entries = vec![
            edge("busy", 9, false, now),
            edge("gone", 0, false, now - 15_001),
            edge("leaving", 0, true, now),
            edge("idle", 1, false, now - 15_000),
        ];
        let ids: Vec<String> = live(entries, ttl, now)
            .into_iter()
            .map(|e| e.id.to_string())
            .collect();
        assert_eq!(ids, ["idle", "busy", "leaving"]);
    }

    #[test]
    fn the_directory_follows_puts_and_deletes_and_prunes_old_entries() {
        let directory = Directory::default();
        let ttl = Duration::from_secs(15);
        let json = |e: &EdgeEntry| serde_json::to_vec(e).unwrap();
        directory.apply("a", kv::Operation::Put, &json(&edge("a", 1, false, 1_000)));
        directory.apply("b", kv::Operation::Put, &json(&edge("b", 0, false, 20_000)));
        directory.apply("c", kv::Operation::Put, b"not json");
        assert_eq!(directory.list(ttl, 20_000).len(), 1, "a is too old to list");
        assert_eq!(directory.list(ttl, 10_000).len(), 2);
        directory.apply("b", kv::Operation::Delete, b"");
        assert_eq!(directory.list(ttl, 10_000).len(), 1);
        directory.prune(ttl, 20_000);
        assert!(directory.write().is_empty(), "a was forgotten");
    }
}
