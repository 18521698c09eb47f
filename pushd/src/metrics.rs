//! pushd's counters, most per provider (`provider` = `fcm` | `apns` | `webhook`).
//!
//! Registered into a `Registry` the caller owns, so whoever serves
//! `/metrics` (or a test) reads them from there; [`PushMetrics`] is also a
//! cheap handle (its families are shared) with getters for tests.

use chat_shared::push::Platform;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabel {
    provider: &'static str,
}

fn label(platform: Platform) -> ProviderLabel {
    ProviderLabel {
        provider: platform.as_str(),
    }
}

/// A counter per provider.
type PerProvider = Family<ProviderLabel, Counter>;

chat_shared::metric_set! {
    /// Counters of notifications per provider, registered with the prefix
    /// `push_` (the text format adds `_total`). Cloning shares the counters.
    #[derive(Debug, Clone, Default)]
    pub struct PushMetrics in "push" {
        /// Notifications a provider accepted
        sent: PerProvider,
        /// Notifications given up on: refused for good, an invalid token, or out of retries
        failed: PerProvider,
        /// Provider calls retried after a 429, a 5xx or a transport error
        retried: PerProvider,
        /// Jobs folded into another job's notification (n jobs in one notification count n-1)
        coalesced: PerProvider,
        /// Device tokens deleted because the provider called them invalid
        tokens_removed: PerProvider,
        /// Jobs given no notification because their conversation is muted (v1.1 `mute`)
        muted: Counter,
    }
}

impl PushMetrics {
    pub fn sent(&self, platform: Platform) -> u64 {
        self.sent.get_or_create(&label(platform)).get()
    }

    pub fn failed(&self, platform: Platform) -> u64 {
        self.failed.get_or_create(&label(platform)).get()
    }

    pub fn retried(&self, platform: Platform) -> u64 {
        self.retried.get_or_create(&label(platform)).get()
    }

    pub fn coalesced(&self, platform: Platform) -> u64 {
        self.coalesced.get_or_create(&label(platform)).get()
    }

    pub fn tokens_removed(&self, platform: Platform) -> u64 {
        self.tokens_removed.get_or_create(&label(platform)).get()
    }

    pub(crate) fn count_sent(&self, platform: Platform) {
        self.sent.get_or_create(&label(platform)).inc();
    }

    pub(crate) fn count_failed(&self, platform: Platform) {
        self.failed.get_or_create(&label(platform)).inc();
    }

    pub(crate) fn count_retried(&self, platform: Platform) {
        self.retried.get_or_create(&label(platform)).inc();
    }

    pub(crate) fn count_coalesced(&self, platform: Platform, jobs: u64) {
        self.coalesced.get_or_create(&label(platform)).inc_by(jobs);
    }

    pub(crate) fn count_token_removed(&self, platform: Platform) {
        self.tokens_removed.get_or_create(&label(platform)).inc();
    }

    pub fn muted(&self) -> u64 {
        self.muted.get()
    }

    pub(crate) fn count_muted(&self, jobs: u64) {
        self.muted.inc_by(jobs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn counters_are_exposed_per_provider() {
        let mut registry = Registry::default();
        let metrics = PushMetrics::new(&mut registry);
        metrics.count_sent(Platform::Fcm);
        metrics.count_retried(Platform::Apns);
        metrics.count_retried(Platform::Apns);
        metrics.count_coalesced(Platform::Webhook, 19);
        assert_eq!(metrics.sent(Platform::Fcm), 1);
        assert_eq!(metrics.retried(Platform::Apns), 2);
        assert_eq!(metrics.clone().coalesced(Platform::Webhook), 19);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"push_sent_total{provider="fcm"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"push_retried_total{provider="apns"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"push_coalesced_total{provider="webhook"} 19"#),
            "{text}"
        );
    }
}
