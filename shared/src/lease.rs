//! Leases on message-id node ids, held in the `chat_nodes` KV bucket.
//!
//! A process creates key `<node>` (create fails if it exists, so two live
//! processes never hold one id) and refreshes it well within the bucket's
//! TTL by a revision-checked update. The [`NodeSlot`] is only marked valid
//! until a safety margin before the TTL, measured from *before* each refresh
//! was sent: if refreshes stop (NATS unreachable), the generator stops issuing
//! ids before anybody else could take the node id over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use rand::Rng;

use crate::idgen::{NodeSlot, MAX_NODE_ID};

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("all {0} node ids are taken")]
    Exhausted(u32),
    #[error("node lease bucket: {0}")]
    Store(#[from] kv::CreateError),
}

pub struct NodeLease {
    store: kv::Store,
    holder: String,
    ttl: Duration,
    slot: Arc<NodeSlot>,
}

impl NodeLease {
    pub fn new(store: kv::Store, holder: impl Into<String>, ttl: Duration) -> Self {
        Self {
            store,
            holder: holder.into(),
            ttl,
            slot: NodeSlot::empty(),
        }
    }

    pub fn slot(&self) -> Arc<NodeSlot> {
        self.slot.clone()
    }

    /// How long after a successful write the lease still counts as ours.
    fn validity(&self) -> Duration {
        self.ttl.mul_f64(0.6)
    }

    /// Takes a free node id, trying them all from a random start.
    pub async fn acquire(&self) -> Result<(u16, u64), LeaseError> {
        let count = u32::from(MAX_NODE_ID) + 1;
        let start = rand::rng().random_range(0..count);
        for offset in 0..count {
            let node = ((start + offset) % count) as u16;
            let sent_at = Instant::now();
            match self
                .store
                .create(node.to_string(), self.holder.clone().into())
                .await
            {
                Ok(revision) => {
                    self.slot.grant(node, sent_at + self.validity());
                    tracing::info!(node, holder = %self.holder, "node id leased");
                    return Ok((node, revision));
                }
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                Err(e) => return Err(LeaseError::Store(e)),
            }
        }
        Err(LeaseError::Exhausted(count))
    }

    /// Keeps the lease alive until `stop` completes, then releases it.
    /// Acquires a new node id when the old one was lost.
    pub async fn keep(
        self,
        node: u16,
        revision: u64,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut held = Some((node, revision));
        let mut tick = tokio::time::interval(self.ttl / 5);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            held = match held {
                Some((node, revision)) => {
                    let sent_at = Instant::now();
                    match self
                        .store
                        .update(node.to_string(), self.holder.clone().into(), revision)
                        .await
                    {
                        Ok(revision) => {
                            self.slot.grant(node, sent_at + self.validity());
                            Some((node, revision))
                        }
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                            tracing::error!(node, "node id lease lost; acquiring another");
                            self.slot.revoke();
                            None
                        }
                        // A transient error: the slot expires on its own if
                        // this goes on too long.
                        Err(e) => {
                            tracing::warn!(node, error = %e, "node lease refresh failed");
                            Some((node, revision))
                        }
                    }
                }
                None => self.acquire().await.ok(),
            };
        }
        self.slot.revoke();
        if let Some((node, _)) = held {
            let _ = self.store.delete(node.to_string()).await;
        }
    }
}

/// Leadership of a hot-standby service: every process keeps its state warm,
/// and the holder of `key` in the leaders bucket is the one that speaks.
/// The key expires with the bucket's `max_age` when its holder stops
/// refreshing it, so a dead leader is replaced within about one TTL.
pub struct Leadership {
    store: kv::Store,
    key: String,
    holder: String,
    ttl: Duration,
}

impl Leadership {
    pub fn new(
        store: kv::Store,
        key: impl Into<String>,
        holder: impl Into<String>,
        ttl: Duration,
    ) -> Self {
        Self {
            store,
            key: key.into(),
            holder: holder.into(),
            ttl,
        }
    }

    /// Campaigns and refreshes until `stop`, reporting whether this process
    /// leads on `leading`. A refresh that fails for any reason steps down at
    /// once: two leaders for a moment would double events, none for a moment
    /// only delays them.
    pub async fn run(
        self,
        leading: tokio::sync::watch::Sender<bool>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut revision: Option<u64> = None;
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            revision = match revision {
                Some(held) => match self
                    .store
                    .update(&self.key, self.holder.clone().into(), held)
                    .await
                {
                    Ok(next) => Some(next),
                    Err(e) => {
                        tracing::warn!(key = %self.key, error = %e, "leadership lost");
                        None
                    }
                },
                None => match self
                    .store
                    .create(&self.key, self.holder.clone().into())
                    .await
                {
                    Ok(first) => {
                        tracing::info!(key = %self.key, holder = %self.holder, "leading");
                        Some(first)
                    }
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => None,
                    Err(e) => {
                        tracing::warn!(key = %self.key, error = %e, "cannot campaign");
                        None
                    }
                },
            };
            leading.send_if_modified(|now| {
                let changed = *now != revision.is_some();
                *now = revision.is_some();
                changed
            });
        }
        if revision.is_some() {
            leading.send_replace(false);
            // Hand over now rather than after the TTL.
            let _ = self.store.delete(&self.key).await;
        }
    }
}
