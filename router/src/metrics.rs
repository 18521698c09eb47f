//! The router's metrics (prefix `router_`); the lag of its consumers comes
//! from [`chat_shared::metrics::watch_consumers`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// The stream an event came from (`MESSAGES` or `EVENTS`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    stream: &'static str,
}

#[derive(Default)]
pub struct RouterMetrics {
    routed: Family<StreamLabels, Counter>,
    dropped: Family<StreamLabels, Counter>,
    retries: Family<StreamLabels, Counter>,
    inbox_appends: Counter,
    push_jobs: Counter,
}

impl RouterMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let router = registry.sub_registry_with_prefix("router");
        router.register(
            "events_routed",
            "Events put into every member's inbox and acked, by stream",
            metrics.routed.clone(),
        );
        router.register(
            "events_dropped",
            "Events that can never be routed (malformed, unknown group), terminated",
            metrics.dropped.clone(),
        );
        router.register(
            "route_retries",
            "Routing attempts that failed for a passing reason and were retried in place",
            metrics.retries.clone(),
        );
        router.register(
            "inbox_appends",
            "Inbox items appended (PubAck received; de-duplicated retries included)",
            metrics.inbox_appends.clone(),
        );
        router.register(
            "push_jobs",
            "Push jobs published for members who were offline",
            metrics.push_jobs.clone(),
        );
        metrics
    }

    pub fn routed(&self, stream: &'static str) {
        self.routed.get_or_create(&StreamLabels { stream }).inc();
    }

    pub fn dropped(&self, stream: &'static str) {
        self.dropped.get_or_create(&StreamLabels { stream }).inc();
    }

    pub fn retried(&self, stream: &'static str) {
        self.retries.get_or_create(&StreamLabels { stream }).inc();
    }

    pub fn inbox_appended(&self) {
        self.inbox_appends.inc();
    }

    pub fn push_jobs_emitted(&self, jobs: u64) {
        self.push_jobs.inc_by(jobs);
    }
}
