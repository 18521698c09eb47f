//! `chatctl replay`: reads the MESSAGES stream, the log of record, by
//! sequence or time range, for one conversation or all of them, and
//! optionally re-publishes what it read into a stream of its own
//! (`REPLAY_<name>`) for reprocessing.
//!
//! A replay reads through a short-lived in-memory consumer (the same scan the
//! edge replays inboxes with) and stops at the end of its range or at the
//! stream's last sequence when it started, whichever comes first: it never
//! waits for new messages.
//!
//! Split into partitions (`CHAT_PARTITIONS`), one conversation is read from
//! its partition's stream; every conversation from all of them at once,
//! merged in message id order (ids are time-sortable). Sequences are per
//! partition, so a sequence range needs a conversation.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::PublishAckFuture, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use chat_shared::consume::Scan;
use chat_shared::ids::{ConversationId, MessageId};
use chat_shared::partitions::Partitions;
use chat_shared::wire::{ChangeEvent, MessageEvent, MessagesEvent};
use chat_shared::{subjects, Config};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
/// The time type of [`Start::Time`] and [`ReplayOptions::until`].
pub use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("bad range: {0}")]
    Range(String),
    #[error("reading stream {stream}: {reason}")]
    Read { stream: String, reason: String },
    #[error("replay stream {stream}: {reason}")]
    Republish { stream: String, reason: String },
}

fn read_error(stream: &str) -> impl Fn(String) -> ReplayError + '_ {
    move |reason| ReplayError::Read {
        stream: stream.to_string(),
        reason,
    }
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The oldest message still in the stream.
    Oldest,
    /// This stream sequence (or the oldest after it).
    Sequence(u64),
    /// The first message stored at or after this time.
    Time(OffsetDateTime),
}

/// What to replay. Both ends are inclusive; without an end the replay stops
/// at the stream's last sequence when it started.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// `None`: every conversation.
    pub conversation: Option<ConversationId>,
    pub start: Start,
    pub to_seq: Option<u64>,
    pub until: Option<OffsetDateTime>,
}

/// One stored message event, as replay prints it (a JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    /// The stream it is in: MESSAGES, or its partition `MESSAGES_<k>`.
    pub stream: String,
    /// Its sequence in that stream.
    pub seq: u64,
    /// When JetStream stored it.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub subject: String,
    pub event: MessageEvent,
    #[serde(skip)]
    msg_id: Option<String>,
    #[serde(skip)]
    payload: Bytes,
}

impl Replayed {
    /// Its `Nats-Msg-Id` (`<sender>:<client_msg_id>` for the edge's events).
    pub fn msg_id(&self) -> Option<&str> {
        self.msg_id.as_deref()
    }
}

/// What a replay yields: an event, or a stored message that is not one
/// (reported, never silently dropped).
#[derive(Debug, Clone)]
pub enum Entry {
    Event(Replayed),
    /// v1.1: an edit, delete or reaction of a message (printed, not
    /// re-published: it names a message by the id it had here).
    Change {
        stream: String,
        seq: u64,
        subject: String,
        change: ChangeEvent,
    },
    Malformed {
        stream: String,
        seq: u64,
        subject: String,
        reason: String,
    },
}

impl Entry {
    /// Where the merge of partitions puts it: by message id; a malformed
    /// entry (no id) as soon as it is read.
    fn order(&self) -> Option<MessageId> {
        match self {
            Self::Event(item) => Some(item.event.id),
            // Its message came before it in the same partition.
            Self::Change { .. } | Self::Malformed { .. } => None,
        }
    }
}

/// An open replay; call [`Replay::close`] when done.
pub struct Replay {
    /// One read per stream (partition), each with its next entry.
    parts: Vec<Part>,
}

/// The read of one stream.
struct Part {
    stream: String,
    scan: Scan,
    /// The last sequence to yield, inclusive.
    last_seq: u64,
    until: Option<OffsetDateTime>,
    /// Its next entry, read ahead for the merge.
    head: Option<Entry>,
    /// Read to the end of its range.
    done: bool,
}

impl Replay {
    /// Opens a replay of `options` over the MESSAGES partitions of
    /// `partitions`.
    pub async fn open(
        js: &jetstream::Context,
        options: &ReplayOptions,
        partitions: Partitions,
    ) -> Result<Self, ReplayError> {
        if let (Start::Sequence(from), Some(to)) = (options.start, options.to_seq) {
            if from > to {
                return Err(ReplayError::Range(format!(
                    "--from-seq {from} is after --to-seq {to}"
                )));
            }
        }
        if let (Start::Time(since), Some(until)) = (options.start, options.until) {
            if since > until {
                return Err(ReplayError::Range("--since is after --until".into()));
            }
        }
        let streams: Vec<String> = match &options.conversation {
            Some(conversation) => vec![partitions.of_conversation(conversation).messages_stream()],
            None => partitions.all().map(|p| p.messages_stream()).collect(),
        };
        let by_sequence = matches!(options.start, Start::Sequence(_)) || options.to_seq.is_some();
        if streams.len() > 1 && by_sequence {
            return Err(ReplayError::Range(
                "MESSAGES is split into partitions, each with its own sequences: \
                 a sequence range needs --conversation"
                    .into(),
            ));
        }
        let mut parts = Vec::with_capacity(streams.len());
        for stream in streams {
            if let Some(part) = Part::open(js, stream, options).await? {
                parts.push(part);
            }
        }
        Ok(Self { parts })
    }

    /// The next entry (in stream order; across partitions in message id
    /// order), or `None` at the end of the range.
    pub async fn next(&mut self) -> Result<Option<Entry>, ReplayError> {
        for part in &mut self.parts {
            part.read_ahead().await?;
        }
        let next = self
            .parts
            .iter_mut()
            .filter(|part| part.head.is_some())
            .min_by_key(|part| part.head.as_ref().and_then(Entry::order));
        Ok(next.and_then(|part| part.head.take()))
    }

    /// Deletes the replay's consumers.
    pub async fn close(self) {
        for part in self.parts {
            part.scan.close().await;
        }
    }
}

impl Part {
    /// `None` when the stream holds nothing in the range.
    async fn open(
        js: &jetstream::Context,
        stream: String,
        options: &ReplayOptions,
    ) -> Result<Option<Self>, ReplayError> {
        let error = read_error(&stream);
        let mut handle = js
            .get_stream(&stream)
            .await
            .map_err(|e| error(e.to_string()))?;
        let state = handle
            .info()
            .await
            .map_err(|e| error(e.to_string()))?
            .state
            .clone();
        let last_seq = options
            .to_seq
            .map_or(state.last_sequence, |to| to.min(state.last_sequence));
        let empty = state.messages == 0
            || last_seq < state.first_sequence
            || matches!(options.start, Start::Sequence(from) if from > last_seq);
        if empty {
            return Ok(None);
        }
        let deliver_policy = match options.start {
            Start::Oldest => consumer::DeliverPolicy::All,
            Start::Sequence(start_sequence) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start_sequence.max(1),
            },
            Start::Time(start_time) => consumer::DeliverPolicy::ByStartTime { start_time },
        };
        // No filter (an empty subject) reads every conversation.
        let filter = options
            .conversation
            .as_ref()
            .map(subjects::message)
            .unwrap_or_default();
        let handle = js
            .get_stream_no_info(&stream)
            .await
            .map_err(|e| error(e.to_string()))?;
        let scan = Scan::open(&handle, filter, deliver_policy)
            .await
            .map_err(|e| e.to_string())
            .map_err(error)?;
        Ok(Some(Self {
            stream,
            scan,
            last_seq,
            until: options.until,
            head: None,
            done: false,
        }))
    }

    /// Reads its next entry unless it holds one or is done.
    async fn read_ahead(&mut self) -> Result<(), ReplayError> {
        if self.head.is_none() && !self.done {
            self.head = self.read().await?;
            self.done = self.head.is_none();
        }
        Ok(())
    }

    async fn read(&mut self) -> Result<Option<Entry>, ReplayError> {
        let error = read_error(&self.stream);
        let Some(message) = self.scan.next().await.map_err(|e| error(e.to_string()))? else {
            return Ok(None);
        };
        let info = message.info().map_err(|e| error(e.to_string()))?;
        let (seq, time) = (info.stream_sequence, info.published);
        if seq > self.last_seq || self.until.is_some_and(|until| time > until) {
            return Ok(None);
        }
        let subject = message.subject.to_string();
        let stream = self.stream.clone();
        let entry = match MessagesEvent::parse(&message.payload) {
            Ok(MessagesEvent::Change(change)) => Entry::Change {
                stream,
                seq,
                subject,
                change,
            },
            Ok(MessagesEvent::Message(event)) => Entry::Event(Replayed {
                stream,
                seq,
                time,
                subject,
                event,
                msg_id: message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(subjects::MSG_ID_HEADER))
                    .map(|v| v.as_str().to_string()),
                payload: message.payload.clone(),
            }),
            Err(e) => Entry::Malformed {
                stream,
                seq,
                subject,
                reason: e.to_string(),
            },
        };
        Ok(Some(entry))
    }
}

/// Reads a time bound: RFC 3339 (`2025-01-31T12:00:00Z`) or a time ago
/// (`90s`, `10m`, `2h`, `7d`).
pub fn parse_instant(text: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    if let Ok(instant) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(instant);
    }
    let ago = crate::client::parse_duration(text)
        .map_err(|_| format!("{text:?}: expected RFC 3339 or a time ago like 10m, 2h, 7d"))?;
    now.checked_sub(time::Duration::try_from(ago).map_err(|e| e.to_string())?)
        .ok_or_else(|| format!("{text:?} is too long ago"))
}

/// The name of a replay target: 1-32 of `[A-Za-z0-9_-]`, so it is safe in a
/// stream name and as one subject token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayName(String);

#[derive(Debug, thiserror::Error)]
#[error("replay name {0:?}: expected 1-32 of A-Z a-z 0-9 _ -")]
pub struct InvalidReplayName(String);

impl ReplayName {
    pub fn parse(value: &str) -> Result<Self, InvalidReplayName> {
        let valid = (1..=32).contains(&value.len())
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(Self(value.to_string()))
        } else {
            Err(InvalidReplayName(value.to_string()))
        }
    }

    /// `REPLAY_<name>`.
    pub fn stream(&self) -> String {
        format!("REPLAY_{}", self.0)
    }

    /// `replay.<name>.>`: what the replay stream captures.
    pub fn stream_subjects(&self) -> String {
        format!("replay.{}.>", self.0)
    }

    /// `replay.<name>.<original subject>`: the original subject stays
    /// readable, so a consumer of the replay filters by conversation the way
    /// it would on MESSAGES.
    pub fn subject_for(&self, original: &str) -> String {
        format!("replay.{}.{original}", self.0)
    }
}

impl fmt::Display for ReplayName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The MESSAGES stream (partition) of a re-published event.
pub const REPLAY_STREAM_HEADER: &str = "Chat-Replay-Stream";
/// Its sequence there.
pub const REPLAY_SEQ_HEADER: &str = "Chat-Replay-Seq";
/// When MESSAGES stored the re-published event (RFC 3339).
pub const REPLAY_TIME_HEADER: &str = "Chat-Replay-Time";

/// How long a replay stream keeps what it was given.
const REPLAY_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// PubAcks awaited at once.
const MAX_ACKS_IN_FLIGHT: usize = 256;
/// As large as a MESSAGES event may be.
const MAX_EVENT_BYTES: i32 = 1024 * 1024;

/// The replay stream: limits retention (kept 7 days, or until deleted), the
/// deployment's replicas, and MESSAGES' de-duplication window, so replaying
/// the same range twice within it stores each event once.
pub fn replay_stream(name: &ReplayName, config: &Config) -> stream::Config {
    stream::Config {
        name: name.stream(),
        description: Some("events re-published by chatctl replay".into()),
        subjects: vec![name.stream_subjects()],
        storage: stream::StorageType::File,
        num_replicas: config.stream_replicas,
        duplicate_window: config.dedup_window,
        max_age: REPLAY_MAX_AGE,
        max_message_size: MAX_EVENT_BYTES,
        allow_direct: true,
        ..Default::default()
    }
}

/// What a re-publish did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RepublishSummary {
    /// Stored in the replay stream.
    pub stored: u64,
    /// Dropped by the replay stream as duplicates (same `Nats-Msg-Id` within
    /// its window).
    pub duplicates: u64,
}

/// Copies replayed events into `REPLAY_<name>`, with their `Nats-Msg-Id`,
/// waiting for every PubAck (at most [`MAX_ACKS_IN_FLIGHT`] at a time).
pub struct Republisher {
    js: jetstream::Context,
    name: ReplayName,
    acks: VecDeque<PublishAckFuture>,
    summary: RepublishSummary,
}

impl Republisher {
    /// Creates the replay stream, or reuses it (events are appended).
    pub async fn create(
        js: &jetstream::Context,
        name: ReplayName,
        config: &Config,
    ) -> Result<Self, ReplayError> {
        js.create_or_update_stream(replay_stream(&name, config))
            .await
            .map_err(|e| ReplayError::Republish {
                stream: name.stream(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            js: js.clone(),
            name,
            acks: VecDeque::new(),
            summary: RepublishSummary::default(),
        })
    }

    /// The stream it publishes into.
    pub fn stream(&self) -> String {
        self.name.stream()
    }

    fn error(&self, reason: impl fmt::Display) -> ReplayError {
        ReplayError::Republish {
            stream: self.name.stream(),
            reason: reason.to_string(),
        }
    }

    pub async fn publish(&mut self, item: &Replayed) -> Result<(), ReplayError> {
        if self.acks.len() >= MAX_ACKS_IN_FLIGHT {
            self.await_oldest_ack().await?;
        }
        let mut headers = HeaderMap::new();
        if let Some(msg_id) = item.msg_id() {
            headers.insert(subjects::MSG_ID_HEADER, msg_id);
        }
        headers.insert(REPLAY_STREAM_HEADER, item.stream.as_str());
        headers.insert(REPLAY_SEQ_HEADER, item.seq.to_string().as_str());
        let time = item.time.format(&Rfc3339).map_err(|e| self.error(e))?;
        headers.insert(REPLAY_TIME_HEADER, time.as_str());
        let ack = self
            .js
            .publish_with_headers(
                self.name.subject_for(&item.subject),
                headers,
                item.payload.clone(),
            )
            .await
            .map_err(|e| self.error(e))?;
        self.acks.push_back(ack);
        Ok(())
    }

    async fn await_oldest_ack(&mut self) -> Result<(), ReplayError> {
        let Some(ack) = self.acks.pop_front() else {
            return Ok(());
        };
        let ack = ack.await.map_err(|e| self.error(e))?;
        if ack.duplicate {
            self.summary.duplicates += 1;
        } else {
            self.summary.stored += 1;
        }
        Ok(())
    }

    /// Waits for the outstanding PubAcks.
    pub async fn finish(mut self) -> Result<RepublishSummary, ReplayError> {
        while !self.acks.is_empty() {
            self.await_oldest_ack().await?;
        }
        Ok(self.summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_are_rfc3339_or_a_time_ago() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        assert_eq!(parse_instant("2023-11-14T22:13:20Z", now).unwrap(), now);
        assert_eq!(
            parse_instant("2023-11-14T23:13:20+01:00", now).unwrap(),
            now
        );
        assert_eq!(
            parse_instant("10m", now).unwrap(),
            now - time::Duration::minutes(10)
        );
        assert_eq!(
            parse_instant("2d", now).unwrap(),
            now - time::Duration::days(2)
        );
        assert!(parse_instant("yesterday", now).is_err());
        assert!(parse_instant("2023-11-14", now).is_err());
        assert!(parse_instant("999999999999d", now).is_err());
    }

    #[test]
    fn replay_names_are_one_safe_token() {
        let name = ReplayName::parse("incident-42").unwrap();
        assert_eq!(name.stream(), "REPLAY_incident-42");
        assert_eq!(name.stream_subjects(), "replay.incident-42.>");
        assert_eq!(
            name.subject_for("chat.msg.dm.alice.bob"),
            "replay.incident-42.chat.msg.dm.alice.bob"
        );
        for bad in ["", "a.b", "a*", "a>", "a b", "x/y", &"n".repeat(33)] {
            assert!(ReplayName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_replay_stream_keeps_the_dedup_window_and_expires() {
        let config = Config::default();
        let definition = replay_stream(&ReplayName::parse("x").unwrap(), &config);
        assert_eq!(definition.name, "REPLAY_x");
        assert_eq!(definition.subjects, ["replay.x.>"]);
        assert_eq!(definition.duplicate_window, config.dedup_window);
        assert_eq!(definition.max_age, REPLAY_MAX_AGE);
    }
}
