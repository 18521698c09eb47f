//! The router's metrics (prefix `router_`); the lag of its consumers comes
//! from [`chat_shared::metrics::watch_consumers`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// The stream an event came from (`MESSAGES` or `EVENTS`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    stream: &'static str,
}

chat_shared::metric_set! {
    pub struct RouterMetrics in "router" {
        /// Events put into every member's inbox and acked, by stream
        events_routed: Family<StreamLabels, Counter>,
        /// Events that can never be routed (malformed, unknown group), terminated
        events_dropped: Family<StreamLabels, Counter>,
        /// Routing attempts that failed for a passing reason and were retried in place
        route_retries: Family<StreamLabels, Counter>,
        /// Inbox items appended (PubAck received; de-duplicated retries included)
        inbox_appends: Counter,
        /// Push jobs published for members who were offline
        push_jobs: Counter,
    }
}

impl RouterMetrics {
    pub fn routed(&self, stream: &'static str) {
        self.events_routed
            .get_or_create(&StreamLabels { stream })
            .inc();
    }

    pub fn dropped(&self, stream: &'static str) {
        self.events_dropped
            .get_or_create(&StreamLabels { stream })
            .inc();
    }

    pub fn retried(&self, stream: &'static str) {
        self.route_retries
            .get_or_create(&StreamLabels { stream })
            .inc();
    }

    pub fn inbox_appended(&self) {
        self.inbox_appends.inc();
    }

    pub fn push_jobs_emitted(&self, jobs: u64) {
        self.push_jobs.inc_by(jobs);
    }
}
