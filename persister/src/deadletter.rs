//! Events JetStream gave up on: after a consumer's `max_deliver` attempts
//! the server publishes an advisory
//! (`$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`) and
//! never delivers the event to that consumer again. The mover reads the
//! event by its stream sequence and copies it to `chat.dead.<consumer>`
//! (stream DEADLETTER) with the reason, so an event a client was told is
//! `sent` is never lost silently.
//!
//! Every persister moves every advisory (core NATS, no queue group): if one
//! persister is down or cannot copy, another does, and the dead letter's
//! `Nats-Msg-Id` (`dead:<stream>:<consumer>:<seq>`) makes the copies one.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream::DirectGetErrorKind};
use chat_shared::consume::{Backoff, DeadLetter, DeadLetterError};
use chat_shared::partitions::Partitions;
use chat_shared::{shutdown, subjects};
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::watch;

use crate::metrics::PersisterMetrics;

/// The streams whose consumers' advisories are moved: every stream a
/// backend consumer reads (not DEADLETTER itself), each partition of
/// MESSAGES on its own, with the family metrics count them under.
fn watched(partitions: Partitions) -> Vec<(String, &'static str)> {
    let mut watched: Vec<(String, &'static str)> = partitions
        .all()
        .map(|p| (p.messages_stream(), subjects::MESSAGES_STREAM))
        .collect();
    for stream in [
        subjects::EVENTS_STREAM,
        subjects::PUSH_STREAM,
        subjects::RECEIPTS_STREAM,
    ] {
        watched.push((stream.to_string(), stream));
    }
    watched
}

/// Tries per advisory. An advisory is a core NATS message and is not sent
/// again, so a copy is retried for a while (about half a minute, NATS or a
/// stream leader being away) before it is given up with an error log.
const MOVE_ATTEMPTS: u32 = 10;

/// The fields of `io.nats.jetstream.advisory.v1.max_deliver` we use.
#[derive(Debug, Deserialize)]
struct MaxDeliveries {
    stream: String,
    consumer: String,
    stream_seq: u64,
    deliveries: i64,
}

/// What one advisory is about, checked: the stream is one of ours and the
/// consumer's name is a single subject token.
#[derive(Debug, PartialEq)]
struct Exhausted {
    stream: String,
    /// The stream's family (`MESSAGES` for each of its partitions).
    family: &'static str,
    consumer: String,
    sequence: u64,
    deliveries: i64,
}

/// Why an advisory names nothing to move.
#[derive(Debug, thiserror::Error)]
enum AdvisoryError {
    #[error("malformed advisory: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("not a watched stream: {0}")]
    Unwatched(String),
    #[error("unusable consumer name {0:?}")]
    Consumer(String),
}

fn parse(payload: &[u8], watched: &[(String, &'static str)]) -> Result<Exhausted, AdvisoryError> {
    let advisory: MaxDeliveries = serde_json::from_slice(payload)?;
    let Some((stream, family)) = watched.iter().find(|(s, _)| *s == advisory.stream) else {
        return Err(AdvisoryError::Unwatched(advisory.stream));
    };
    // The server refuses such names already; checked again because the
    // name becomes a subject token.
    let consumer = advisory.consumer;
    if consumer.is_empty()
        || consumer
            .chars()
            .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control())
    {
        return Err(AdvisoryError::Consumer(consumer));
    }
    Ok(Exhausted {
        stream: stream.clone(),
        family,
        consumer,
        sequence: advisory.stream_seq,
        deliveries: advisory.deliveries,
    })
}

/// Moves dead letters until `stop`.
pub async fn move_dead_letters(
    nats: async_nats::Client,
    js: jetstream::Context,
    partitions: Partitions,
    metrics: Arc<PersisterMetrics>,
    stop: watch::Receiver<bool>,
) {
    let watched = watched(partitions);
    let mut subscriptions = Vec::with_capacity(watched.len());
    for (stream, _) in &watched {
        match nats
            .subscribe(subjects::max_deliveries_advisories(stream))
            .await
        {
            Ok(subscriber) => subscriptions.push(subscriber),
            Err(e) => {
                // Only a closed client fails here; the writer stops too.
                tracing::error!(error = %e, %stream, "cannot watch max-deliveries advisories");
                return;
            }
        }
    }
    let mut advisories = futures::stream::select_all(subscriptions);
    let stopped = shutdown::wait(stop);
    tokio::pin!(stopped);
    loop {
        let advisory = tokio::select! {
            _ = &mut stopped => return,
            advisory = advisories.next() => match advisory {
                Some(advisory) => advisory,
                None => return,
            },
        };
        let exhausted = match parse(&advisory.payload, &watched) {
            Ok(exhausted) => exhausted,
            Err(reason) => {
                tracing::warn!(subject = %advisory.subject, %reason, "ignoring a max-deliveries advisory");
                continue;
            }
        };
        tokio::select! {
            _ = &mut stopped => return,
            _ = move_one(&js, &exhausted, &metrics) => {}
        }
    }
}

/// Copies one exhausted event to `chat.dead.<consumer>`, retrying a while.
#[tracing::instrument(skip_all, fields(
    stream = %exhausted.stream,
    consumer = %exhausted.consumer,
    sequence = exhausted.sequence,
))]
async fn move_one(js: &jetstream::Context, exhausted: &Exhausted, metrics: &PersisterMetrics) {
    let reason = format!("max deliveries: {}", exhausted.deliveries);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut attempts = 0;
    let error = loop {
        attempts += 1;
        match copy(js, exhausted, &reason).await {
            Ok(subject) => {
                tracing::error!(
                    deliveries = exhausted.deliveries,
                    %subject,
                    dead_letter = %subjects::dead_letter(&exhausted.consumer),
                    "an event reached max deliveries; moved to the dead letters"
                );
                metrics.dead_lettered(exhausted.family);
                return;
            }
            Err(e) if e.is_final() || attempts == MOVE_ATTEMPTS => break e,
            Err(e) => {
                tracing::warn!(error = %e, "cannot move a dead letter yet; retrying");
                backoff.wait().await;
            }
        }
    };
    tracing::error!(
        error = %error,
        "giving up moving an event that reached max deliveries"
    );
}

/// Why an exhausted event was not copied.
#[derive(Debug, thiserror::Error)]
enum CopyError {
    #[error("the event is no longer in its stream (aged out, deleted): {0}")]
    Gone(jetstream::stream::DirectGetError),
    #[error("the stream: {0}")]
    Stream(#[from] jetstream::context::GetStreamError),
    #[error("reading the event: {0}")]
    Read(jetstream::stream::DirectGetError),
    #[error(transparent)]
    Store(#[from] DeadLetterError),
}

impl CopyError {
    /// Whether another try cannot help; anything else is NATS or the stream
    /// being away for a while.
    fn is_final(&self) -> bool {
        matches!(self, Self::Gone(_))
    }
}

/// Reads the event and stores its dead letter; returns its subject.
async fn copy(
    js: &jetstream::Context,
    exhausted: &Exhausted,
    reason: &str,
) -> Result<String, CopyError> {
    let stream = js.get_stream_no_info(&exhausted.stream).await?;
    // A direct get may answer from any replica; every stream allows it.
    let original = stream
        .direct_get(exhausted.sequence)
        .await
        .map_err(|e| match e.kind() {
            DirectGetErrorKind::NotFound => CopyError::Gone(e),
            _ => CopyError::Read(e),
        })?;
    DeadLetter {
        stream: &exhausted.stream,
        consumer: &exhausted.consumer,
        sequence: exhausted.sequence,
        subject: original.subject.as_str(),
        deliveries: exhausted.deliveries,
        reason,
        headers: Some(&original.headers),
        payload: original.payload.clone(),
    }
    .publish(js)
    .await?;
    Ok(original.subject.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advisories_are_parsed_and_checked() {
        let advisory = br#"{"type":"io.nats.jetstream.advisory.v1.max_deliver","id":"x",
            "timestamp":"2026-01-01T00:00:00Z","stream":"MESSAGES","consumer":"persister",
            "stream_seq":42,"deliveries":20}"#;
        let one = watched(Partitions::default());
        assert_eq!(
            parse(advisory, &one).ok(),
            Some(Exhausted {
                stream: subjects::MESSAGES_STREAM.into(),
                family: subjects::MESSAGES_STREAM,
                consumer: "persister".into(),
                sequence: 42,
                deliveries: 20,
            })
        );
        let three = watched(Partitions::new(3).unwrap());
        let partitioned =
            br#"{"stream":"MESSAGES_2","consumer":"router","stream_seq":7,"deliveries":20}"#;
        let exhausted = parse(partitioned, &three).unwrap();
        assert_eq!(
            (exhausted.stream.as_str(), exhausted.family),
            ("MESSAGES_2", "MESSAGES")
        );
        assert!(
            parse(advisory, &three).is_err(),
            "MESSAGES is not a stream when split"
        );
        for bad in [
            br#"{"stream":"DEADLETTER","consumer":"x","stream_seq":1,"deliveries":2}"#.as_slice(),
            br#"{"stream":"MESSAGES","consumer":"a.b","stream_seq":1,"deliveries":2}"#,
            br#"{"stream":"MESSAGES","consumer":"","stream_seq":1,"deliveries":2}"#,
            br#"{"stream":"MESSAGES","consumer":">","stream_seq":1,"deliveries":2}"#,
            b"not json",
        ] {
            assert!(
                parse(bad, &one).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
