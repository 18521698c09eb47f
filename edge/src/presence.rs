//! The edge's part in presence: it reports device connects and disconnects
//! and, every `CHAT_PRESENCE_HEARTBEAT_MS`, one heartbeat listing all its
//! live devices; it reads the presence bucket for snapshots. The presence
//! service decides who is online.

use std::collections::HashMap;
use std::sync::Mutex;

use async_nats::jetstream::kv;
use chat_shared::ids::{DeviceId, EdgeId, UserId};
use chat_shared::presence::{DeviceEvent, EdgeHeartbeat, LiveDevice, PresenceRecord};
use chat_shared::rpc::{self, RpcError};
use chat_shared::subjects;
use chat_shared::wire::{ErrorCode, PresenceEvent, PresenceStatus};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::watch;

/// KV reads in flight for one snapshot.
const SNAPSHOT_READS: usize = 32;

/// The devices connected to this edge (a device connected twice counts
/// until both connections are gone).
#[derive(Default)]
pub struct LiveDevices(Mutex<HashMap<LiveDevice, usize>>);

impl LiveDevices {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<LiveDevice, usize>) -> T) -> T {
        // Each critical section is one map operation: a panic cannot leave
        // the map half-changed, so poisoning is ignored.
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut map)
    }

    fn snapshot(&self) -> Vec<LiveDevice> {
        self.with(|map| map.keys().cloned().collect())
    }
}

/// Reports one device's connection to presence; dropping it reports the
/// disconnect.
pub struct DevicePresence {
    nats: async_nats::Client,
    devices: std::sync::Arc<LiveDevices>,
    event: DeviceEvent,
}

impl DevicePresence {
    pub fn connect(
        nats: async_nats::Client,
        devices: std::sync::Arc<LiveDevices>,
        edge: EdgeId,
        user: UserId,
        device: DeviceId,
    ) -> Self {
        let live = LiveDevice {
            user: user.clone(),
            device: device.clone(),
        };
        devices.with(|map| *map.entry(live).or_default() += 1);
        let event = DeviceEvent {
            edge,
            user,
            device,
            online: true,
        };
        publish(&nats, subjects::EDGE_DEVICES, &event);
        Self {
            nats,
            devices,
            event,
        }
    }
}

impl Drop for DevicePresence {
    fn drop(&mut self) {
        let live = LiveDevice {
            user: self.event.user.clone(),
            device: self.event.device.clone(),
        };
        let gone = self.devices.with(|map| match map.get_mut(&live) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            _ => {
                map.remove(&live);
                true
            }
        });
        if gone {
            self.event.online = false;
            publish(&self.nats, subjects::EDGE_DEVICES, &self.event);
        }
    }
}

/// Publishes without waiting: core NATS buffers it in the client, and a
/// lost event is repaired by the next heartbeat.
fn publish(nats: &async_nats::Client, subject: &'static str, body: &impl Serialize) {
    let Ok(body) = serde_json::to_vec(body) else {
        return;
    };
    let nats = nats.clone();
    tokio::spawn(async move {
        if let Err(e) = nats.publish(subject, body.into()).await {
            tracing::debug!(error = %e, "cannot report presence");
        }
    });
}

/// Sends this edge's heartbeat until `stop`.
pub async fn heartbeats(
    nats: async_nats::Client,
    edge: EdgeId,
    devices: std::sync::Arc<LiveDevices>,
    every: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let heartbeat = EdgeHeartbeat {
            edge: edge.clone(),
            devices: devices.snapshot(),
        };
        match serde_json::to_vec(&heartbeat) {
            Ok(body) => {
                if let Err(e) = nats.publish(subjects::EDGE_HEARTBEATS, body.into()).await {
                    tracing::warn!(error = %e, "cannot send the presence heartbeat");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode the presence heartbeat"),
        }
    }
}

/// The presence of each of `users`, read from the presence bucket. A user
/// presence has never seen is offline since 0.
pub async fn read(store: &kv::Store, users: Vec<UserId>) -> Result<Vec<PresenceEvent>, RpcError> {
    futures::stream::iter(users)
        .map(|user| async move {
            let entry = store
                .get(subjects::presence_key(&user))
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "cannot read presence");
                    RpcError::new(ErrorCode::Unavailable, "presence unavailable, retry later")
                })?;
            let record = entry
                .and_then(|bytes| serde_json::from_slice::<PresenceRecord>(&bytes).ok())
                .unwrap_or(PresenceRecord {
                    status: PresenceStatus::Offline,
                    last_active: 0,
                    devices: None,
                });
            Ok(PresenceEvent {
                user,
                status: record.status,
                last_active: record.last_active,
            })
        })
        .buffered(SNAPSHOT_READS)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// The presence of every friend of `user` with no block between them
/// (the persister's `friends_of`), each `last_active` hidden where that
/// friend's `last_seen` says so: the snapshot after `synced`.
pub async fn of_friends(
    nats: &async_nats::Client,
    store: &kv::Store,
    user: UserId,
) -> Result<Vec<PresenceEvent>, RpcError> {
    let audience = rpc::call::<rpc::FriendsOf>(nats, &rpc::UserRequest { user }).await?;
    let shows: HashMap<UserId, bool> = audience
        .friends
        .iter()
        .map(|peer| (peer.user.clone(), peer.shows_last_active))
        .collect();
    let friends = audience.friends.into_iter().map(|peer| peer.user).collect();
    Ok(read(store, friends)
        .await?
        .into_iter()
        .map(|event| {
            let shown = shows.get(&event.user).copied().unwrap_or(false);
            chat_shared::presence::as_seen(event, shown)
        })
        .collect())
}
