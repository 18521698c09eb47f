//! The presence service's metrics (prefix `presence_`).

use chat_shared::wire::PresenceStatus;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Default)]
pub struct PresenceMetrics {
    changes: Family<StatusLabels, Counter>,
    heartbeats: Counter,
    typing_frames: Counter,
    leader: Gauge,
}

impl PresenceMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let presence = registry.sub_registry_with_prefix("presence");
        presence.register(
            "changes",
            "Presence changes announced (by the leader), by status",
            metrics.changes.clone(),
        );
        presence.register(
            "heartbeats",
            "Edge heartbeats received",
            metrics.heartbeats.clone(),
        );
        presence.register(
            "typing_frames",
            "Typing frames sent to members' delivery subjects (lapses included)",
            metrics.typing_frames.clone(),
        );
        presence.register(
            "leader",
            "1 while this process holds the presence leader lease",
            metrics.leader.clone(),
        );
        metrics
    }

    pub fn announced(&self, status: PresenceStatus) {
        let status = match status {
            PresenceStatus::Online => "online",
            PresenceStatus::Offline => "offline",
        };
        self.changes.get_or_create(&StatusLabels { status }).inc();
    }

    pub fn heartbeat(&self) {
        self.heartbeats.inc();
    }

    pub fn typing_frame_sent(&self) {
        self.typing_frames.inc();
    }

    pub fn leading(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }
}
