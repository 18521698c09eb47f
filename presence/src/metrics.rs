//! The presence service's metrics (prefix `presence_`).

use chat_shared::wire::PresenceStatus;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

chat_shared::metric_set! {
    pub struct PresenceMetrics in "presence" {
        /// Presence changes announced (by the leader), by status
        changes: Family<StatusLabels, Counter>,
        /// Edge heartbeats received
        heartbeats: Counter,
        /// Typing frames sent to members' delivery subjects (lapses included)
        typing_frames: Counter,
        /// 1 while this process holds the presence leader lease
        leader: Gauge,
    }
}

impl PresenceMetrics {
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
