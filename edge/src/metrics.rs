//! The edge's metrics (prefix `edge_`), served on its own listener at
//! `GET /metrics`.
//!
//! Everything here runs per frame, so labels are `&'static str` (no
//! allocation) and the frame type of an outbound frame is known where the
//! frame is built, or read from the first bytes of a live frame that another
//! service serialized. Frames and closes are counted as they are handed to
//! the connection's writer, before a client can see them, so a client that
//! got an answer finds it counted.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// The `type` label of inbound frames that did not parse (or were binary).
pub const INVALID_FRAME: &str = "invalid";

/// Send latencies: a PubAck on one node is about a millisecond, the request
/// timeout is 2 s.
const SEND_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// What live frames can be (the frames other services put on
/// `chat.deliver.<user>` or in inboxes); anything else counts as `other`.
const LIVE_KINDS: [&str; 7] = [
    "message",
    "membership",
    "receipt",
    "presence",
    "typing",
    "friend",
    // v1.1: a change of a message.
    "update",
];

/// How far into a live frame its `type` is looked for: past a spliced-in
/// cursor (`{"cursor":"<up to 20 digits>",`) and the longest kind.
const TYPE_LOOKAHEAD: usize = 80;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FrameLabels {
    r#type: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    code: u16,
}

chat_shared::metric_set! {
    pub struct EdgeMetrics in "edge" {
        /// Open WebSocket connections
        connections: Gauge,
        /// Frames received from clients, by type (`invalid`: not a frame)
        frames_in: Family<FrameLabels, Counter>,
        /// Frames sent to clients, by type
        frames_out: Family<FrameLabels, Counter>,
        /// From taking up a `send` to its answer (`sent` or an error)
        send_seconds: Histogram = Histogram::new(SEND_BUCKETS),
        /// Connections the edge closed, by WebSocket close code
        sessions_closed: Family<CloseLabels, Counter>,
        /// Live deliveries that named a predecessor the session never sent: the inbox was read again
        live_gaps: Counter,
        /// Client addresses whose rate buckets were forgotten because a per-address table was full
        ip_table_evictions: Counter,
        /// client_msg_id claims written to chat_sent: sends whose answer the client may not have read
        send_claims_written: Counter,
    }
}

impl EdgeMetrics {
    pub fn send_claims_written(&self, claims: u64) {
        self.send_claims_written.inc_by(claims);
    }

    /// The counter the per-address tables count their evictions in.
    pub fn ip_table_evictions(&self) -> Counter {
        self.ip_table_evictions.clone()
    }

    pub fn live_gap(&self) {
        self.live_gaps.inc();
    }

    /// Counts a connection as open until the returned guard is dropped.
    pub fn connection_opened(&self) -> OpenConnection {
        self.connections.inc();
        OpenConnection(self.connections.clone())
    }

    pub fn frame_in(&self, kind: &'static str) {
        self.frames_in
            .get_or_create(&FrameLabels { r#type: kind })
            .inc();
    }

    pub fn frame_out(&self, kind: &'static str) {
        self.frames_out
            .get_or_create(&FrameLabels { r#type: kind })
            .inc();
    }

    pub fn send_answered(&self, took: Duration) {
        self.send_seconds.observe(took.as_secs_f64());
    }

    pub fn session_closed(&self, code: u16) {
        self.sessions_closed
            .get_or_create(&CloseLabels { code })
            .inc();
    }
}

/// An open connection; dropping it counts the connection as gone.
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The `type` of a live frame (serialized by another service), read from
/// its first bytes without parsing it: serde writes an internally tagged
/// enum's tag first, and a cursor spliced in by `with_cursor` comes before it.
pub fn live_kind(frame: &str) -> &'static str {
    const KEY: &[u8] = br#""type":""#;
    let head = &frame.as_bytes()[..frame.len().min(TYPE_LOOKAHEAD)];
    let Some(start) = head
        .windows(KEY.len())
        .position(|window| window == KEY)
        .map(|at| at + KEY.len())
    else {
        return "other";
    };
    let value = &head[start..];
    let Some(end) = value.iter().position(|b| *b == b'"') else {
        return "other";
    };
    LIVE_KINDS
        .into_iter()
        .find(|kind| kind.as_bytes() == &value[..end])
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_shared::ids::{ConversationId, Cursor, MessageId, UserId};
    use chat_shared::wire::{with_cursor, ReceiptKind, ServerFrame};
    use prometheus_client::registry::Registry;

    #[test]
    fn live_frames_are_counted_by_their_type() {
        let receipt = ServerFrame::Receipt {
            cursor: None,
            conversation: ConversationId::parse("dm:a:b").unwrap(),
            user: UserId::parse("a").unwrap(),
            kind: ReceiptKind::Read,
            up_to: MessageId(1),
            device: None,
        };
        assert_eq!(live_kind(&receipt.to_json()), receipt.kind());
        let stored = br#"{"type":"membership","conversation":"group:g"}"#;
        let live = with_cursor(stored, Cursor(u64::MAX));
        assert_eq!(live_kind(std::str::from_utf8(&live).unwrap()), "membership");
        assert_eq!(live_kind(r#"{"type":"welcome"}"#), "other");
        assert_eq!(live_kind(r#"{"type":"mess"#), "other");
        assert_eq!(live_kind(""), "other");
        assert_eq!(
            live_kind(&format!(r#"{{"x":"{}","type":"message"}}"#, "y".repeat(80))),
            "other"
        );
    }

    #[test]
    fn counters_move_and_connections_come_and_go() {
        let mut registry = Registry::default();
        let metrics = EdgeMetrics::new(&mut registry);
        let open = metrics.connection_opened();
        metrics.frame_in("send");
        metrics.frame_out("sent");
        metrics.frame_out(live_kind(r#"{"cursor":"3","type":"message"}"#));
        metrics.send_answered(Duration::from_millis(2));
        metrics.session_closed(4003);
        let text = encode(&registry);
        for line in [
            "edge_connections 1",
            r#"edge_frames_in_total{type="send"} 1"#,
            r#"edge_frames_out_total{type="sent"} 1"#,
            r#"edge_frames_out_total{type="message"} 1"#,
            "edge_send_seconds_count 1",
            r#"edge_send_seconds_bucket{le="0.0025"} 1"#,
            r#"edge_sessions_closed_total{code="4003"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        drop(open);
        assert!(encode(&registry).contains("edge_connections 0"));
    }

    fn encode(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }
}
