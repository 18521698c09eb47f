//! Reading one subject of a stream with batched direct gets (ADR-31).
//!
//! A request to `$JS.API.DIRECT.GET.<stream>` with `seq`, `next_by_subj`,
//! `batch` and `max_bytes` is answered on its reply subject by up to
//! `batch` messages of that subject from `seq` on, oldest first, then an
//! end-of-batch status (`204 EOB`) that tells how many more there are
//! (`Nats-Num-Pending`). Unlike a consumer it leaves no state in the
//! server: nothing is created, replicated or deleted, and any replica
//! answers. A resume reads a user's inbox this way, so reconnecting
//! devices cost the cluster reads only.

use std::time::Duration;

use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures::StreamExt;

use crate::subjects;

/// One stored message of the subject.
#[derive(Debug, Clone)]
pub struct Item {
    /// Its stream sequence.
    pub sequence: u64,
    /// The headers it was published with, plus the server's `Nats-*`.
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// What one request brought.
#[derive(Debug, Default)]
pub struct Page {
    /// Oldest first.
    pub items: Vec<Item>,
    /// Messages of the subject stored after the last item when the server
    /// answered: 0 means the subject was read to its end.
    pub pending: u64,
}

/// `ms` (since the Unix epoch) as RFC 3339.
fn rfc3339(ms: u64) -> Result<String, DirectError> {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .ok_or(DirectError::Time(ms))
}

#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    #[error("{0} ms is not a time a stream can be read from")]
    Time(u64),
    #[error("no answer from the stream within {0:?}")]
    Stalled(Duration),
    #[error("subscribing to the reply subject: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("sending the request: {0}")]
    Request(#[from] async_nats::PublishError),
    #[error("the reply subject closed before the end of the batch")]
    Closed,
    #[error("the stream answered {status} {description}")]
    Status { status: u16, description: String },
    #[error("a reply without a valid {0} header")]
    Header(&'static str),
    #[error("encoding the request: {0}")]
    Encode(#[from] serde_json::Error),
}

/// What one message on the reply subject is.
#[derive(Debug)]
pub enum Reply {
    Item(Item),
    /// The end of the batch, and how many messages are left after it.
    End {
        pending: u64,
    },
    /// Nothing of the subject from the requested sequence on.
    NotFound,
}

/// The status a batch ends with (`NATS/1.0 204 EOB`).
const END_OF_BATCH: u16 = 204;

impl Reply {
    pub fn of(message: async_nats::Message) -> Result<Self, DirectError> {
        let number = |name: &'static str| {
            message
                .headers
                .as_ref()
                .and_then(|headers| headers.get(name))
                .and_then(|value| value.as_str().parse::<u64>().ok())
                .ok_or(DirectError::Header(name))
        };
        match message.status {
            None => {
                let sequence = number(subjects::DIRECT_SEQUENCE_HEADER)?;
                Ok(Reply::Item(Item {
                    sequence,
                    headers: message.headers.unwrap_or_default(),
                    payload: message.payload,
                }))
            }
            Some(status) if status.as_u16() == END_OF_BATCH => Ok(Reply::End {
                pending: number(subjects::DIRECT_PENDING_HEADER)?,
            }),
            Some(StatusCode::NOT_FOUND) => Ok(Reply::NotFound),
            Some(status) => Err(DirectError::Status {
                status: status.as_u16(),
                description: message.description.unwrap_or_default(),
            }),
        }
    }
}

#[derive(serde::Serialize)]
struct Request<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    /// Instead of `seq`: from the first message stored at or after this
    /// time (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    start_time: Option<String>,
    next_by_subj: &'a str,
    batch: usize,
    max_bytes: usize,
}

/// Batched direct gets on one stream over a core NATS connection.
#[derive(Clone)]
pub struct DirectReader {
    client: async_nats::Client,
    api: String,
    /// How long the next reply may take before the read fails: a stream
    /// that lost its leader, or whose replicas are all away, leaves a
    /// request unanswered, and a caller must then fail (a session answers
    /// `unavailable`) rather than hang.
    stall: Duration,
}

impl DirectReader {
    pub fn new(client: async_nats::Client, stream: &str, stall: Duration) -> Self {
        Self {
            client,
            api: subjects::direct_get(stream),
            stall,
        }
    }

    /// Up to `batch` messages of `subject` from sequence `from` on, ending
    /// with the first one that brings the page to `max_bytes` (the server
    /// checks after sending, so a page passes the bound by at most one
    /// message, and always holds one if any is left).
    pub async fn page(
        &self,
        subject: &str,
        from: u64,
        batch: usize,
        max_bytes: usize,
    ) -> Result<Page, DirectError> {
        let request = Request {
            seq: Some(from),
            start_time: None,
            next_by_subj: subject,
            batch,
            max_bytes,
        };
        self.request(&request).await
    }

    /// Like [`DirectReader::page`], from the first message of `subject`
    /// stored at or after `since_ms` (ms since the Unix epoch, stream time).
    pub async fn page_since(
        &self,
        subject: &str,
        since_ms: u64,
        batch: usize,
        max_bytes: usize,
    ) -> Result<Page, DirectError> {
        let request = Request {
            seq: None,
            start_time: Some(rfc3339(since_ms)?),
            next_by_subj: subject,
            batch,
            max_bytes,
        };
        self.request(&request).await
    }

    async fn request(&self, request: &Request<'_>) -> Result<Page, DirectError> {
        let body = serde_json::to_vec(request)?;
        let reply = self.client.new_inbox();
        // Subscribed before the request goes out, on the same connection:
        // the server sees the interest before it answers.
        let mut replies = self.client.subscribe(reply.clone()).await?;
        self.client
            .publish_with_reply(self.api.clone(), reply, body.into())
            .await?;
        let mut page = Page::default();
        loop {
            let message = tokio::time::timeout(self.stall, replies.next())
                .await
                .map_err(|_| DirectError::Stalled(self.stall))?
                .ok_or(DirectError::Closed)?;
            match Reply::of(message)? {
                Reply::Item(item) => page.items.push(item),
                Reply::End { pending } => {
                    page.pending = pending;
                    return Ok(page);
                }
                Reply::NotFound => return Ok(page),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(
        status: Option<u16>,
        headers: &[(&str, &str)],
        payload: &str,
    ) -> async_nats::Message {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        async_nats::Message {
            subject: "_INBOX.x".into(),
            reply: None,
            payload: Bytes::from(payload.to_string()),
            headers: Some(map),
            status: status.and_then(|s| StatusCode::from_u16(s).ok()),
            description: None,
            length: 0,
        }
    }

    #[test]
    fn an_item_carries_its_sequence_headers_and_payload() {
        let reply = Reply::of(message(
            None,
            &[("Nats-Sequence", "42"), ("Chat-Kind", "message")],
            "{}",
        ));
        let Ok(Reply::Item(item)) = reply else {
            panic!("not an item: {reply:?}");
        };
        assert_eq!(item.sequence, 42);
        assert_eq!(item.payload, Bytes::from_static(b"{}"));
        assert_eq!(
            item.headers.get("Chat-Kind").map(|v| v.as_str()),
            Some("message")
        );
    }

    #[test]
    fn the_end_of_a_batch_tells_what_is_left() {
        let reply = Reply::of(message(
            Some(204),
            &[("Nats-Num-Pending", "7"), ("Nats-Last-Sequence", "9")],
            "",
        ));
        assert!(matches!(reply, Ok(Reply::End { pending: 7 })), "{reply:?}");
    }

    #[test]
    fn not_found_is_an_empty_read_and_other_statuses_are_errors() {
        assert!(matches!(
            Reply::of(message(Some(404), &[], "")),
            Ok(Reply::NotFound)
        ));
        assert!(matches!(
            Reply::of(message(Some(408), &[], "")),
            Err(DirectError::Status { status: 408, .. })
        ));
        assert!(matches!(
            Reply::of(message(Some(503), &[], "")),
            Err(DirectError::Status { status: 503, .. })
        ));
    }

    #[test]
    fn a_reply_without_its_numbers_is_refused() {
        assert!(matches!(
            Reply::of(message(None, &[], "x")),
            Err(DirectError::Header("Nats-Sequence"))
        ));
        assert!(matches!(
            Reply::of(message(Some(204), &[("Nats-Num-Pending", "x")], "")),
            Err(DirectError::Header("Nats-Num-Pending"))
        ));
    }

    #[test]
    fn the_request_is_the_adr_31_batch_form() {
        assert_eq!(
            rfc3339(1_500).ok().as_deref(),
            Some("1970-01-01T00:00:01.5Z")
        );
        let body = serde_json::to_value(Request {
            seq: Some(5),
            start_time: None,
            next_by_subj: "chat.inbox.alice",
            batch: 500,
            max_bytes: 1024,
        })
        .unwrap_or_default();
        assert_eq!(
            body,
            serde_json::json!({"seq":5,"next_by_subj":"chat.inbox.alice","batch":500,"max_bytes":1024})
        );
    }
}
