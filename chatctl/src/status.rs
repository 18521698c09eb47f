//! `chatctl streams`: the state of every JetStream stream and of every
//! consumer on it, so an operator sees at a glance how far behind the router,
//! the persister or pushd are.

use anyhow::Context;
use async_nats::jetstream::{self, consumer, stream};
use futures::TryStreamExt;
use serde::Serialize;
use time::OffsetDateTime;

/// One stream and its consumers.
#[derive(Debug, Clone, Serialize)]
pub struct StreamState {
    pub name: String,
    pub subjects: Vec<String>,
    pub messages: u64,
    pub bytes: u64,
    pub first_seq: u64,
    /// `None` while the stream is empty.
    #[serde(with = "time::serde::rfc3339::option")]
    pub first_time: Option<OffsetDateTime>,
    pub last_seq: u64,
    /// `None` until the stream has held a message.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_time: Option<OffsetDateTime>,
    pub consumers: Vec<ConsumerState>,
}

/// One consumer's progress. Sequences are stream sequences.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerState {
    pub name: String,
    pub durable: bool,
    /// Empty: the whole stream.
    pub filter_subjects: Vec<String>,
    /// The last message handed to a client.
    pub delivered_seq: u64,
    /// Every message up to here is acknowledged.
    pub ack_floor_seq: u64,
    /// Messages not delivered yet: the consumer's lag.
    pub num_pending: u64,
    /// Delivered, not acknowledged yet.
    pub num_ack_pending: usize,
    pub num_redelivered: usize,
    /// Pull requests waiting for messages (idle, connected clients).
    pub waiting: usize,
    /// The pinned client of each priority group (`group=pin-id`), e.g. the
    /// one active router.
    pub pinned: Vec<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_delivered_time: Option<OffsetDateTime>,
}

/// `chatctl streams ls`: one line per stream.
pub fn render_list(streams: &[StreamState]) -> String {
    streams
        .iter()
        .map(|s| {
            format!(
                "{:<16} messages={:<10} bytes={:<12} first={} last={} consumers={}\n",
                s.name,
                s.messages,
                s.bytes,
                s.first_seq,
                s.last_seq,
                s.consumers.len()
            )
        })
        .collect()
}

/// Reads every stream (KV buckets' streams included) and its consumers,
/// sorted by name.
pub async fn collect(js: &jetstream::Context) -> anyhow::Result<Vec<StreamState>> {
    let infos: Vec<stream::Info> = js
        .streams()
        .try_collect()
        .await
        .context("listing streams")?;
    let mut states = Vec::with_capacity(infos.len());
    for info in infos {
        let name = info.config.name.clone();
        let handle = js
            .get_stream_no_info(&name)
            .await
            .with_context(|| format!("stream {name}"))?;
        let consumers: Vec<consumer::Info> = handle
            .consumers()
            .try_collect()
            .await
            .with_context(|| format!("listing the consumers of {name}"))?;
        states.push(stream_state(info, consumers));
    }
    states.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(states)
}

fn stream_state(info: stream::Info, consumers: Vec<consumer::Info>) -> StreamState {
    let state = &info.state;
    let mut consumers: Vec<ConsumerState> = consumers.into_iter().map(consumer_state).collect();
    consumers.sort_by(|a, b| a.name.cmp(&b.name));
    StreamState {
        subjects: info.config.subjects.clone(),
        messages: state.messages,
        bytes: state.bytes,
        first_seq: state.first_sequence,
        first_time: (state.messages > 0).then_some(state.first_timestamp),
        last_seq: state.last_sequence,
        last_time: (state.last_sequence > 0).then_some(state.last_timestamp),
        consumers,
        name: info.config.name,
    }
}

fn consumer_state(info: consumer::Info) -> ConsumerState {
    let config = &info.config;
    let mut filter_subjects = config.filter_subjects.clone();
    if !config.filter_subject.is_empty() {
        filter_subjects.insert(0, config.filter_subject.clone());
    }
    ConsumerState {
        durable: config.durable_name.is_some(),
        filter_subjects,
        delivered_seq: info.delivered.stream_sequence,
        ack_floor_seq: info.ack_floor.stream_sequence,
        num_pending: info.num_pending,
        num_ack_pending: info.num_ack_pending,
        num_redelivered: info.num_redelivered,
        waiting: info.num_waiting,
        pinned: info
            .priority_groups
            .iter()
            .filter_map(|group| {
                let pin = group.pinned_client_id.as_ref()?;
                Some(format!("{}={pin}", group.group))
            })
            .collect(),
        last_delivered_time: info.delivered.last_active,
        name: info.name,
    }
}

/// The human-readable report: per stream a header line, its counters, and a
/// table of its consumers.
pub fn render(streams: &[StreamState]) -> String {
    let mut out = String::new();
    for stream in streams {
        out.push_str(&format!(
            "{}  [{}]\n",
            stream.name,
            stream.subjects.join(" ")
        ));
        out.push_str(&format!(
            "  messages {}  bytes {}  first #{} {}  last #{} {}\n",
            stream.messages,
            human_bytes(stream.bytes),
            stream.first_seq,
            time_or_dash(stream.first_time),
            stream.last_seq,
            time_or_dash(stream.last_time),
        ));
        if stream.consumers.is_empty() {
            out.push_str("  (no consumers)\n\n");
            continue;
        }
        let mut rows = vec![[
            "CONSUMER",
            "DELIVERED",
            "ACK FLOOR",
            "PENDING",
            "ACK PENDING",
            "REDELIVERED",
            "WAITING",
            "FILTER",
            "PINNED",
        ]
        .map(String::from)];
        for consumer in &stream.consumers {
            let kind = if consumer.durable { "" } else { " (ephemeral)" };
            rows.push([
                format!("{}{kind}", consumer.name),
                consumer.delivered_seq.to_string(),
                consumer.ack_floor_seq.to_string(),
                consumer.num_pending.to_string(),
                consumer.num_ack_pending.to_string(),
                consumer.num_redelivered.to_string(),
                consumer.waiting.to_string(),
                if consumer.filter_subjects.is_empty() {
                    "-".into()
                } else {
                    consumer.filter_subjects.join(" ")
                },
                if consumer.pinned.is_empty() {
                    "-".into()
                } else {
                    consumer.pinned.join(" ")
                },
            ]);
        }
        let columns = rows[0].len();
        let widths: Vec<usize> = (0..columns)
            .map(|c| rows.iter().map(|row| row[c].len()).max().unwrap_or(0))
            .collect();
        for row in &rows {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            out.push_str(&format!("  {}\n", cells.join("  ").trim_end()));
        }
        out.push('\n');
    }
    out
}

fn time_or_dash(time: Option<OffsetDateTime>) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time.and_then(|t| t.to_offset(time::UtcOffset::UTC).format(&format).ok())
        .unwrap_or_else(|| "-".into())
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<StreamState> {
        vec![StreamState {
            name: "MESSAGES".into(),
            subjects: vec!["chat.msg.dm.*.*".into(), "chat.msg.group.*".into()],
            messages: 12,
            bytes: 3 * 1024 + 512,
            first_seq: 1,
            first_time: Some(OffsetDateTime::UNIX_EPOCH),
            last_seq: 12,
            last_time: None,
            consumers: vec![ConsumerState {
                name: "router".into(),
                durable: true,
                filter_subjects: vec![],
                delivered_seq: 12,
                ack_floor_seq: 10,
                num_pending: 0,
                num_ack_pending: 2,
                num_redelivered: 0,
                waiting: 1,
                pinned: vec!["router=abc".into()],
                last_delivered_time: None,
            }],
        }]
    }

    #[test]
    fn the_table_shows_counters_and_consumer_progress() {
        let text = render(&sample());
        assert!(text.starts_with("MESSAGES  [chat.msg.dm.*.* chat.msg.group.*]\n"));
        assert!(
            text.contains("messages 12  bytes 3.5 KiB  first #1 1970-01-01T00:00:00Z  last #12 -")
        );
        let header = text.lines().nth(2).unwrap_or_default();
        assert!(header.trim_start().starts_with("CONSUMER"), "{text}");
        let row: Vec<&str> = text
            .lines()
            .nth(3)
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(
            row,
            ["router", "12", "10", "0", "2", "0", "1", "-", "router=abc"]
        );
    }

    #[test]
    fn json_has_every_counter() {
        let value = serde_json::to_value(sample()).unwrap();
        let consumer = &value[0]["consumers"][0];
        for field in [
            "delivered_seq",
            "ack_floor_seq",
            "num_pending",
            "num_ack_pending",
            "num_redelivered",
            "waiting",
        ] {
            assert!(consumer[field].is_u64(), "{field}");
        }
        assert_eq!(value[0]["first_time"], "1970-01-01T00:00:00Z");
        assert!(value[0]["last_time"].is_null());
    }

    #[test]
    fn bytes_are_humanized() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
    }
}
