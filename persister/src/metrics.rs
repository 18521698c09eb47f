//! The persister's metrics (prefix `persister_`); the lag of its consumer
//! comes from [`chat_shared::metrics::watch_consumers`].

use std::time::Duration;

use chat_shared::rpc::RpcError;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

/// Events per batch: one at a time when idle, up to `MAX_BATCH` (1000)
/// under load.
const BATCH_SIZES: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];
/// One transaction of up to 1000 rows: milliseconds, seconds when the
/// database struggles (retries included).
const BATCH_SECONDS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Requests are one or two queries each.
const RPC_SECONDS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// The `method` label of a request for a method that does not exist.
pub const UNKNOWN_METHOD: &str = "unknown";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    /// `ok`, or the error code of the reply.
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    stream: &'static str,
}

chat_shared::metric_set! {
    pub struct PersisterMetrics in "persister" {
        /// MESSAGES events per batch written
        batch_size: Histogram = Histogram::new(BATCH_SIZES),
        /// Time to write a batch and ack its events (retries included)
        batch_seconds: Histogram = Histogram::new(BATCH_SECONDS),
        /// Message rows inserted (rows already there, from redeliveries, not counted)
        rows_written: Counter,
        /// MESSAGES events the database will never take, copied to the dead letters and terminated
        events_dropped: Counter,
        /// Events a consumer reached max deliveries on, copied to the dead letters, by stream
        max_deliveries_moved: Family<StreamLabels, Counter>,
        /// chat.rpc.* requests answered, by method and outcome (ok or the error code)
        rpc_requests: Family<RpcLabels, Counter>,
        /// Time to answer a chat.rpc.* request, by method
        rpc_seconds: Family<MethodLabels, Histogram> =
            Family::new_with_constructor(|| Histogram::new(RPC_SECONDS)),
    }
}

impl PersisterMetrics {
    pub fn batch_stored(&self, events: usize, took: Duration) {
        self.batch_size.observe(events as f64);
        self.batch_seconds.observe(took.as_secs_f64());
    }

    pub fn rows_written(&self, rows: u64) {
        self.rows_written.inc_by(rows);
    }

    pub fn event_dropped(&self) {
        self.events_dropped.inc();
    }

    pub fn dead_lettered(&self, stream: &'static str) {
        self.max_deliveries_moved
            .get_or_create(&StreamLabels { stream })
            .inc();
    }

    pub fn rpc_answered<T>(
        &self,
        method: &'static str,
        result: &Result<T, RpcError>,
        took: Duration,
    ) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) => e.code.as_str(),
        };
        self.rpc_requests
            .get_or_create(&RpcLabels { method, outcome })
            .inc();
        self.rpc_seconds
            .get_or_create(&MethodLabels { method })
            .observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_shared::wire::ErrorCode;
    use prometheus_client::registry::Registry;

    #[test]
    fn requests_are_counted_by_method_and_outcome() {
        let mut registry = Registry::default();
        let metrics = PersisterMetrics::new(&mut registry);
        metrics.rpc_answered("history", &Ok::<(), RpcError>(()), Duration::from_millis(1));
        metrics.rpc_answered::<()>(
            "history",
            &Err(RpcError::new(ErrorCode::Forbidden, "no")),
            Duration::from_millis(1),
        );
        metrics.batch_stored(3, Duration::from_millis(4));
        metrics.rows_written(3);
        metrics.dead_lettered("MESSAGES");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"persister_rpc_requests_total{method="history",outcome="ok"} 1"#,
            r#"persister_rpc_requests_total{method="history",outcome="forbidden"} 1"#,
            r#"persister_rpc_seconds_count{method="history"} 2"#,
            "persister_batch_size_sum 3.0",
            "persister_batch_seconds_count 1",
            "persister_rows_written_total 3",
            r#"persister_max_deliveries_moved_total{stream="MESSAGES"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
