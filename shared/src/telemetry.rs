//! Tracing set-up shared by every binary, and the trace id that follows a
//! message from the edge through the router to the persister.

use std::fmt;

use async_nats::HeaderMap;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::subjects;

/// Logs to stderr; `RUST_LOG` filters (default `info`), `CHAT_LOG_FORMAT=json`
/// switches to JSON lines, each with a `service` field: with several
/// services' logs in one place that is how a line is told apart.
pub fn init(service: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests running several services) is harmless.
    let _ = if json {
        builder
            .json()
            .event_format(WithService::new(service, format::Format::default().json()))
            .try_init()
    } else {
        builder.try_init()
    };
}

/// A JSON event format with `"service":"<name>"` as the first field.
struct WithService<F> {
    /// The name as a JSON string, quotes and escapes included.
    service: String,
    inner: F,
}

impl<F> WithService<F> {
    fn new(service: &str, inner: F) -> Self {
        Self {
            service: serde_json::Value::from(service).to_string(),
            inner,
        }
    }
}

impl<S, N, F> FormatEvent<S, N> for WithService<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"service\":{},{rest}", self.service),
            None => writer.write_str(&line),
        }
    }
}

/// Which message a log line is about, across processes: 16 hex digits,
/// random per accepted `send`, carried in the [`subjects::TRACE_HEADER`]
/// header. Random rather than the message id, because a retried send keeps
/// its id but is a new attempt with its own path through the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceId(u64);

impl TraceId {
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// Exactly 16 hex digits; anything else is not a trace id of ours.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 16 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(text, 16).ok().map(Self)
    }

    /// The trace id in `headers`, if there is a valid one.
    pub fn from_headers(headers: Option<&HeaderMap>) -> Option<Self> {
        Self::parse(headers?.get(subjects::TRACE_HEADER)?.as_str())
    }

    pub fn add_to(self, headers: &mut HeaderMap) {
        headers.insert(subjects::TRACE_HEADER, self.to_string().as_str());
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[test]
    fn trace_ids_roundtrip_through_headers() {
        let id = TraceId::random();
        let text = id.to_string();
        assert_eq!(text.len(), 16);
        assert_eq!(TraceId::parse(&text), Some(id));
        let mut headers = HeaderMap::new();
        id.add_to(&mut headers);
        assert_eq!(TraceId::from_headers(Some(&headers)), Some(id));
        assert_eq!(TraceId::from_headers(None), None);
        assert_eq!(TraceId(0xab).to_string(), "00000000000000ab");
        for bad in [
            "",
            "abc",
            "00000000000000ag",
            "+0000000000000ab",
            "00000000000000abc",
        ] {
            assert_eq!(TraceId::parse(bad), None, "{bad}");
        }
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Self;
        fn make_writer(&'a self) -> Self {
            self.clone()
        }
    }

    #[test]
    fn json_lines_carry_the_service_and_span_fields() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .json()
            .event_format(WithService::new("router", format::Format::default().json()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("route", trace_id = %TraceId(0x1f));
            let _entered = span.enter();
            tracing::warn!(reason = "x", "routing failed");
        });
        let bytes = captured.0.lock().unwrap().clone();
        let line: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(line["service"], "router");
        assert_eq!(line["span"]["trace_id"], "000000000000001f");
        assert_eq!(line["fields"]["message"], "routing failed");
    }
}
