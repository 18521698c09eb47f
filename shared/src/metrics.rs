//! Prometheus metrics, the parts every service shares: the text exposition,
//! a `/metrics` server for services without an HTTP listener of their own
//! (`CHAT_METRICS_ADDR`), and the lag of JetStream consumers.
//!
//! Each service builds one [`Registry`] in its `run`, registers its own
//! metrics into it, and then serves it: the edge on its own listener, the
//! others with [`expose`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{shutdown, Config, StartError};

/// What `prometheus_client` writes: OpenMetrics 1.0 text, which Prometheus
/// reads (it ends with `# EOF`).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How often consumer info is read. A consumer info request is cheap for
/// the server, and Prometheus scrapes every 15 s or so: fresher values
/// would not be seen.
pub const CONSUMER_POLL: Duration = Duration::from_secs(5);

/// Declares a set of metrics: the struct, and `new`, which creates each
/// metric and registers it as `<prefix>_<field>` with the field's doc
/// comment as its help text, so a metric's name and meaning are written
/// once. A field starts as `Default::default()` unless `= <expr>` builds it
/// (a histogram's buckets).
///
/// ```ignore
/// chat_shared::metric_set! {
///     pub struct RouterMetrics in "router" {
///         /// Inbox items appended
///         inbox_appends: Counter,
///     }
/// }
/// ```
#[macro_export]
macro_rules! metric_set {
    (
        $(#[$attr:meta])*
        $vis:vis struct $name:ident in $prefix:literal {
            $(
                $(#[doc = $help:literal])+
                $field:ident: $ty:ty $(= $init:expr)?,
            )*
        }
    ) => {
        $(#[$attr])*
        $vis struct $name {
            $( $(#[doc = $help])+ $field: $ty, )*
        }

        impl $name {
            /// The metrics, registered into `registry`.
            $vis fn new(registry: &mut $crate::metrics::Registry) -> Self {
                let metrics = Self {
                    $( $field: $crate::metric_set!(@init $($init)?), )*
                };
                let scope = registry.sub_registry_with_prefix($prefix);
                $(
                    scope.register(
                        stringify!($field),
                        concat!($($help),+).trim(),
                        metrics.$field.clone(),
                    );
                )*
                metrics
            }
        }
    };
    (@init) => { ::core::default::Default::default() };
    (@init $init:expr) => { $init };
}

/// The `GET /metrics` answer: `registry` as text.
pub fn respond(registry: &Registry) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics").into_response(),
    }
}

/// Binds `CHAT_METRICS_ADDR` when it is set. Called before `run_with`, so a
/// taken port fails at start and tests can pass a listener on port 0.
pub async fn bind(config: &Config) -> Result<Option<TcpListener>, StartError> {
    let Some(addr) = config.metrics_addr else {
        return Ok(None);
    };
    TcpListener::bind(addr)
        .await
        .map(Some)
        .map_err(|source| StartError::Listen { addr, source })
}

/// The tasks behind a service's `/metrics`.
#[derive(Default)]
pub struct Exposition {
    tasks: Vec<JoinHandle<()>>,
}

impl Exposition {
    /// Waits for the tasks, which end once `stop` turned true.
    pub async fn stopped(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Serves `registry`, plus the lag of `consumers` (`(stream, consumer)`),
/// on `listener` at `GET /metrics` until `stop` turns true. Without a
/// listener nothing runs: nobody would read the values, so consumer info is
/// not even asked for.
pub fn expose(
    listener: Option<TcpListener>,
    mut registry: Registry,
    js: &jetstream::Context,
    consumers: &[(String, &'static str)],
    stop: &watch::Receiver<bool>,
) -> Exposition {
    let Some(listener) = listener else {
        return Exposition::default();
    };
    let mut tasks = Vec::with_capacity(2);
    if !consumers.is_empty() {
        tasks.push(watch_consumers(
            &mut registry,
            js.clone(),
            consumers.to_vec(),
            stop.clone(),
        ));
    }
    tasks.push(serve(listener, Arc::new(registry), stop.clone()));
    Exposition { tasks }
}

/// Serves `GET /metrics` from `registry` on `listener` until `stop` turns
/// true.
fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "serving /metrics");
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .with_state(registry);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown::wait(stop))
            .await
        {
            tracing::warn!(error = %e, "metrics server failed");
        }
    })
}

async fn metrics(State(registry): State<Arc<Registry>>) -> Response {
    respond(&registry)
}

/// A durable consumer, named by its stream and its own name.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumerLabels {
    stream: String,
    consumer: &'static str,
}

/// A gauge per consumer.
type PerConsumer = Family<ConsumerLabels, Gauge>;

metric_set! {
    /// What JetStream's consumer info says, per consumer.
    struct ConsumerGauges in "jetstream_consumer" {
        /// Messages in the stream the consumer has not delivered yet (its lag)
        pending: PerConsumer,
        /// Messages delivered and not acked yet
        ack_pending: PerConsumer,
        /// Messages delivered again because no ack came in time
        redelivered: PerConsumer,
        /// Pull requests waiting for messages
        waiting: PerConsumer,
        /// The last stream sequence delivered
        delivered_stream_sequence: PerConsumer,
        /// The stream sequence below which everything is acked
        ack_floor_stream_sequence: PerConsumer,
    }
}

impl ConsumerGauges {
    fn families(&self) -> [&PerConsumer; 6] {
        [
            &self.pending,
            &self.ack_pending,
            &self.redelivered,
            &self.waiting,
            &self.delivered_stream_sequence,
            &self.ack_floor_stream_sequence,
        ]
    }

    fn set(&self, labels: &ConsumerLabels, info: &jetstream::consumer::Info) {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.pending
            .get_or_create(labels)
            .set(gauge(info.num_pending));
        self.ack_pending
            .get_or_create(labels)
            .set(count(info.num_ack_pending));
        self.redelivered
            .get_or_create(labels)
            .set(count(info.num_redelivered));
        self.waiting
            .get_or_create(labels)
            .set(count(info.num_waiting));
        self.delivered_stream_sequence
            .get_or_create(labels)
            .set(gauge(info.delivered.stream_sequence));
        self.ack_floor_stream_sequence
            .get_or_create(labels)
            .set(gauge(info.ack_floor.stream_sequence));
    }

    /// Drops a consumer's values: stale numbers would look like a healthy
    /// consumer while NATS cannot be asked.
    fn forget(&self, labels: &ConsumerLabels) {
        for family in self.families() {
            family.remove(labels);
        }
    }
}

/// Registers the `jetstream_consumer_*` gauges (labels `stream`,
/// `consumer`) for each `(stream, consumer)` and keeps them current from
/// JetStream's consumer info every [`CONSUMER_POLL`] until `stop` turns true.
fn watch_consumers(
    registry: &mut Registry,
    js: jetstream::Context,
    consumers: Vec<(String, &'static str)>,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let gauges = ConsumerGauges::new(registry);
    tokio::spawn(async move {
        let stopped = shutdown::wait(stop);
        tokio::pin!(stopped);
        let mut poll = tokio::time::interval(CONSUMER_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                _ = poll.tick() => {}
            }
            for (stream, consumer) in &consumers {
                let labels = ConsumerLabels {
                    stream: stream.clone(),
                    consumer,
                };
                match consumer_info(&js, stream, consumer).await {
                    Ok(info) => gauges.set(&labels, &info),
                    Err(reason) => {
                        tracing::debug!(%stream, consumer, %reason, "no consumer info");
                        gauges.forget(&labels);
                    }
                }
            }
        }
    })
}

async fn consumer_info(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
) -> Result<jetstream::consumer::Info, LagError> {
    Ok(js
        .get_stream_no_info(stream)
        .await?
        .consumer_info(consumer)
        .await?)
}

/// Why a consumer's lag could not be read.
#[derive(Debug, thiserror::Error)]
enum LagError {
    #[error("the stream: {0}")]
    Stream(#[from] jetstream::context::GetStreamError),
    #[error("the consumer: {0}")]
    Consumer(#[from] jetstream::context::ConsumerInfoError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[tokio::test]
    async fn respond_writes_the_text_format() {
        let mut registry = Registry::default();
        let counter: Counter = Counter::default();
        registry.register("things", "Things seen", counter.clone());
        counter.inc();
        let response = respond(&registry);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers().get(header::CONTENT_TYPE).unwrap(),
            CONTENT_TYPE
        );
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = std::str::from_utf8(&body).unwrap();
        assert!(text.contains("things_total 1\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[tokio::test]
    async fn bind_listens_only_when_configured() {
        assert!(bind(&Config::default()).await.unwrap().is_none());
        let config = Config {
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ..Config::default()
        };
        let listener = bind(&config).await.unwrap().unwrap();
        let taken = Config {
            metrics_addr: Some(listener.local_addr().unwrap()),
            ..Config::default()
        };
        assert!(matches!(bind(&taken).await, Err(StartError::Listen { .. })));
    }

    #[test]
    fn consumer_values_appear_per_consumer_and_vanish_when_unknown() {
        let mut registry = Registry::default();
        let gauges = ConsumerGauges::new(&mut registry);
        let labels = ConsumerLabels {
            stream: "MESSAGES".into(),
            consumer: "router",
        };
        let info: jetstream::consumer::Info = serde_json::from_value(serde_json::json!({
            "stream_name": "MESSAGES",
            "name": "router",
            "created": "2025-01-01T00:00:00Z",
            "config": {"durable_name": "router", "deliver_policy": "all", "ack_policy": "explicit", "replay_policy": "instant"},
            "delivered": {"consumer_seq": 7, "stream_seq": 9},
            "ack_floor": {"consumer_seq": 5, "stream_seq": 8},
            "num_ack_pending": 2,
            "num_redelivered": 1,
            "num_waiting": 1,
            "num_pending": 42
        }))
        .unwrap();
        gauges.set(&labels, &info);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"jetstream_consumer_pending{stream="MESSAGES",consumer="router"} 42"#,
            r#"jetstream_consumer_ack_pending{stream="MESSAGES",consumer="router"} 2"#,
            r#"jetstream_consumer_redelivered{stream="MESSAGES",consumer="router"} 1"#,
            r#"jetstream_consumer_delivered_stream_sequence{stream="MESSAGES",consumer="router"} 9"#,
            r#"jetstream_consumer_ack_floor_stream_sequence{stream="MESSAGES",consumer="router"} 8"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        gauges.forget(&labels);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(!text.contains("router"), "{text}");
    }
}
