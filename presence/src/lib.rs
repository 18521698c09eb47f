//! Online presence and typing.
//!
//! Every presence process follows the edges' reports (device events and
//! heartbeats) into a [`tracker::Tracker`], so a standby is always warm; the
//! one holding the leader lease ([`Leadership`]) speaks: it writes each
//! change to the presence bucket (one KV write, also when only the set of
//! connected devices changed, which is not announced), publishes it on
//! `chat.presence.<user>` and sends a `presence` frame to each online
//! friend's delivery subject (one pass over the friend list). It also fans
//! `typing` out to the other members' online devices and lapses it.

mod metrics;
mod speaker;
pub mod tracker;

use std::sync::Arc;
use std::time::Duration;

use chat_shared::blocks::BlockCache;
use chat_shared::lease::Leadership;
use chat_shared::membership::GroupCache;
use chat_shared::presence::{DeviceEvent, EdgeHeartbeat, FriendChange, TypingEvent};
use chat_shared::shutdown::{self, Shutdown};
use chat_shared::{consume, streams, subjects, Config, StartError};
use futures::StreamExt;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::PresenceMetrics;
use crate::speaker::Speaker;
use crate::tracker::Tracker;

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error(transparent)]
    Start(#[from] StartError),
}

/// How often debounces, dead edges and typing lapses are checked.
const TICK: Duration = Duration::from_millis(250);

pub(crate) use chat_shared::clock::now_ms;

fn decode<T: DeserializeOwned>(message: &async_nats::Message) -> Option<T> {
    match serde_json::from_slice(&message.payload) {
        Ok(value) => Some(value),
        Err(e) => {
            tracing::warn!(subject = %message.subject, error = %e, "ignoring a malformed report");
            None
        }
    }
}

/// Runs the service until `shutdown` completes, serving `/metrics` on
/// `metrics_listener` when given.
pub async fn run_with(
    config: Config,
    metrics_listener: Option<TcpListener>,
    shutdown: Shutdown,
) -> Result<(), PresenceError> {
    let (nats, js) = consume::connect_and_provision(&config, "presence").await?;
    let store = consume::bucket(&js, subjects::PRESENCE_BUCKET).await;
    let leaders = consume::bucket(&js, subjects::LEADERS_BUCKET).await;
    let subscribe = |subject: &'static str| {
        let nats = nats.clone();
        async move {
            nats.subscribe(subject)
                .await
                .map_err(|source| StartError::Subscribe { subject, source })
        }
    };
    let mut devices = subscribe(subjects::EDGE_DEVICES).await?;
    let mut heartbeats = subscribe(subjects::EDGE_HEARTBEATS).await?;
    let mut typing = subscribe(subjects::ALL_TYPING).await?;
    let mut friend_changes = subscribe(subjects::FRIEND_CHANGES).await?;
    let groups = GroupCache::start(nats.clone(), &config.group_cache).await?;
    let blocks = BlockCache::start(nats.clone(), &config.group_cache).await?;

    let stop = shutdown::fan_out(shutdown);
    let mut registry = Registry::default();
    let metrics = Arc::new(PresenceMetrics::new(&mut registry));
    groups.register_metrics(registry.sub_registry_with_prefix("presence"));
    blocks.register_metrics(registry.sub_registry_with_prefix("presence"));
    let exposition = chat_shared::metrics::expose(metrics_listener, registry, &js, &[], &stop);
    let (leading_tx, mut leading) = watch::channel(false);
    let holder = format!("presence-{:08x}", rand::random::<u32>());
    let campaign = tokio::spawn(
        Leadership::new(
            leaders,
            subjects::PRESENCE_LEADER_KEY,
            holder.clone(),
            streams::LEADER_LEASE_TTL,
        )
        .run(leading_tx, stop.clone()),
    );
    let started = Instant::now();
    let mut tracker = Tracker::new(config.presence_timeout, config.presence_debounce);
    let mut speaker = Speaker::new(nats.clone(), store, groups, blocks, metrics.clone());
    // A new leader compares what it knows with the bucket once it has heard
    // every edge's heartbeat (one timeout after its own start).
    let mut reconcile_at: Option<Instant> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopped = shutdown::wait(stop);
    tokio::pin!(stopped);
    tracing::info!(%holder, "presence running");
    loop {
        let is_leader = *leading.borrow();
        tokio::select! {
            _ = &mut stopped => break,
            Some(message) = devices.next() => {
                if let Some(event) = decode::<DeviceEvent>(&message) {
                    let changes = tracker.device(event, Instant::now(), now_ms());
                    let devices = tracker.take_device_changes();
                    if is_leader { speaker.speak(&tracker, changes, devices).await; }
                }
            }
            Some(message) = heartbeats.next() => {
                if let Some(heartbeat) = decode::<EdgeHeartbeat>(&message) {
                    metrics.heartbeat();
                    let changes = tracker.heartbeat(heartbeat, Instant::now(), now_ms());
                    let devices = tracker.take_device_changes();
                    if is_leader { speaker.speak(&tracker, changes, devices).await; }
                }
            }
            Some(message) = typing.next() => {
                // Typing is not state worth keeping warm: a standby ignores it
                // and clients lapse it themselves after 6 s.
                if is_leader {
                    if let (Some(user), Some(event)) = (
                        subjects::parse_typing(&message.subject),
                        decode::<TypingEvent>(&message),
                    ) {
                        speaker.typing(&tracker, user, event, Instant::now()).await;
                    }
                }
            }
            Some(message) = friend_changes.next() => {
                if let Some(change) = decode::<FriendChange>(&message) {
                    speaker.friends_changed(&change, is_leader).await;
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let changes = tracker.tick(now, now_ms());
                let devices = tracker.take_device_changes();
                if is_leader {
                    speaker.speak(&tracker, changes, devices).await;
                    speaker.lapse_typing(&tracker, now).await;
                    if reconcile_at.is_some_and(|at| now >= at) {
                        reconcile_at = None;
                        speaker.reconcile(&tracker).await;
                    }
                }
            }
            changed = leading.changed() => {
                if changed.is_err() { break; }
                let is_leader = *leading.borrow_and_update();
                metrics.leading(is_leader);
                if is_leader {
                    reconcile_at = Some((started + config.presence_timeout).max(Instant::now()));
                } else {
                    reconcile_at = None;
                }
            }
        }
    }
    let _ = campaign.await;
    exposition.stopped().await;
    // The last announcements and the lease release.
    chat_shared::nats::flush_before_exit(&nats, &config).await;
    tracing::info!("presence stopped");
    Ok(())
}
