//! `POST /v1/media`: the body streamed into the object store, never held
//! whole.
//!
//! The bytes go to a temporary object (`upload.<nonce>`) chunk by chunk
//! while their SHA-256 is computed and their first bytes are checked
//! against the declared type. Then the object is renamed to its id (the
//! SHA-256), or, when an object of that id exists (the same bytes uploaded
//! before, by anyone), the temporary one is deleted: the same bytes are
//! stored once. Object store metadata is written after the chunks, so a
//! crash mid-upload leaves chunks no object names, never a partial object
//! under a media id. A refusal found in the bytes (a lying type, a body
//! cut short) ends the object early and deletes it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_nats::jetstream::object_store::{
    ObjectMetadata, UpdateMetadata, UpdateMetadataErrorKind,
};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chat_shared::ids::MediaId;
use chat_shared::rpc::{self, MediaInfo};
use chat_shared::subjects;
use futures::{Stream, StreamExt};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::sniff::{Declared, HEAD_BYTES};
use super::{bearer, MediaError};
use crate::quota::Kind;
use crate::Edge;

pub async fn upload(State(edge): State<Arc<Edge>>, headers: HeaderMap, body: Body) -> Response {
    match store(&edge, &headers, body).await {
        Ok(info) => {
            let mut reply = json!({
                "media": info.media,
                "size": info.size,
                "sha256": info.media,
                "content_type": info.content_type,
            });
            if let (Some(width), Some(height)) = (info.width, info.height) {
                reply["width"] = width.into();
                reply["height"] = height.into();
            }
            (StatusCode::CREATED, axum::Json(reply)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn store(edge: &Edge, headers: &HeaderMap, body: Body) -> Result<MediaInfo, MediaError> {
    let user = bearer(edge, headers)?.user;
    let declared = Declared::parse(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    )?;
    // The length is known before a byte is read: the size limit and the
    // quota are settled first, and a refusal costs nothing.
    let length: u64 = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or(MediaError::LengthRequired)?;
    let limit = edge.config.media.max_bytes;
    if length > limit {
        return Err(MediaError::TooLarge(limit));
    }
    if length == 0 {
        return Err(MediaError::Empty);
    }
    edge.quotas
        .spend(&user, &[(Kind::MediaBytesPerDay, length)])
        .await?;
    let store = &edge.media.store;
    let temporary = subjects::upload_object(rand::random());
    let mut intake = Intake::new(body.into_data_stream(), length, declared.clone());
    let put = store
        .put(
            ObjectMetadata {
                name: temporary.clone(),
                metadata: HashMap::from([(
                    subjects::MEDIA_CONTENT_TYPE_KEY.to_string(),
                    declared.content_type.clone(),
                )]),
                ..Default::default()
            },
            &mut intake,
        )
        .await;
    if let Err(e) = put {
        tracing::warn!(error = %e, "cannot store an upload");
        // Its chunks, if any were written, are named by no object.
        return Err(MediaError::Unavailable);
    }
    let checked = match intake.finish() {
        Ok(checked) => checked,
        Err(refusal) => {
            discard(edge, &temporary).await;
            return Err(refusal);
        }
    };
    let media = MediaId::of_digest(&checked.digest);
    name_it(edge, &temporary, &media).await?;
    let info = MediaInfo {
        media,
        size: length,
        content_type: declared.content_type,
        width: checked.dimensions.map(|(w, _)| w),
        height: checked.dimensions.map(|(_, h)| h),
    };
    // Only once the persister has it may the id be used (attachments,
    // avatars, downloads): the reply waits for it.
    rpc::call::<rpc::MediaStored>(&edge.nats, &rpc::MediaStoredRequest { user, media: info })
        .await
        .map_err(MediaError::Rpc)
}

/// Renames the temporary object to `media`, or drops it when `media` is
/// stored already (also when another upload of the same bytes renames
/// its own first). The rename looks the new name up itself and refuses a
/// taken one, so no lookup of ours goes before it.
async fn name_it(edge: &Edge, temporary: &str, media: &MediaId) -> Result<(), MediaError> {
    let renamed = edge
        .media
        .store
        .update_metadata(
            temporary,
            UpdateMetadata {
                name: subjects::media_object(media),
                ..Default::default()
            },
        )
        .await;
    match renamed {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == UpdateMetadataErrorKind::NameAlreadyInUse => {
            discard(edge, temporary).await;
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot name a media object");
            discard(edge, temporary).await;
            Err(MediaError::Unavailable)
        }
    }
}

/// Deletes a temporary object (its chunks are purged).
async fn discard(edge: &Edge, temporary: &str) {
    if let Err(e) = edge.media.store.delete(temporary).await {
        tracing::warn!(error = %e, object = temporary, "cannot delete a temporary upload");
    }
}

/// What the bytes of a complete upload were.
struct Checked {
    digest: [u8; 32],
    dimensions: Option<(u32, u32)>,
}

/// The request body as the object store reads it: hashed and checked on
/// the way, one body frame held at a time. A refusal ends the stream (end
/// of file, not an error, so the store finishes a short object that is
/// then deleted) and is reported by [`Intake::finish`].
struct Intake<S> {
    body: S,
    /// What is left of the body frame being read.
    pending: Bytes,
    expected: u64,
    received: u64,
    hash: Sha256,
    declared: Declared,
    /// The first bytes, until they are checked.
    head: Option<Vec<u8>>,
    dimensions: Option<(u32, u32)>,
    refusal: Option<MediaError>,
    ended: bool,
}

impl<S> Intake<S> {
    fn new(body: S, expected: u64, declared: Declared) -> Self {
        Self {
            body,
            pending: Bytes::new(),
            expected,
            received: 0,
            hash: Sha256::new(),
            declared,
            head: Some(Vec::new()),
            dimensions: None,
            refusal: None,
            ended: false,
        }
    }

    /// Checks the first bytes once there are enough of them (or all).
    fn check_head(&mut self, all: bool) {
        let ready = self
            .head
            .as_ref()
            .is_some_and(|head| all || head.len() >= HEAD_BYTES);
        if !ready {
            return;
        }
        if let Some(head) = self.head.take() {
            match self.declared.check(&head) {
                Ok(dimensions) => self.dimensions = dimensions,
                Err(refusal) => self.refusal = Some(refusal),
            }
        }
    }

    fn finish(self) -> Result<Checked, MediaError> {
        if let Some(refusal) = self.refusal {
            return Err(refusal);
        }
        if !self.ended || self.received != self.expected {
            return Err(MediaError::Aborted);
        }
        Ok(Checked {
            digest: self.hash.finalize().into(),
            dimensions: self.dimensions,
        })
    }
}

impl<S> tokio::io::AsyncRead for Intake<S>
where
    S: Stream<Item = Result<Bytes, axum::Error>> + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let mut wrote = false;
        loop {
            if this.refusal.is_some() || this.ended || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if !this.pending.is_empty() {
                let n = buf.remaining().min(this.pending.len());
                buf.put_slice(&this.pending.split_to(n));
                wrote = true;
                continue;
            }
            match this.body.poll_next_unpin(cx) {
                // Fill the store's chunk with what has arrived, no more.
                Poll::Pending if wrote => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.ended = true;
                    this.check_head(true);
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "upload body failed");
                    this.refusal = Some(MediaError::Aborted);
                }
                Poll::Ready(Some(Ok(frame))) => {
                    this.received += frame.len() as u64;
                    if this.received > this.expected {
                        this.refusal = Some(MediaError::Aborted);
                        continue;
                    }
                    this.hash.update(&frame);
                    if let Some(head) = &mut this.head {
                        let wanted = HEAD_BYTES.saturating_sub(head.len()).min(frame.len());
                        head.extend_from_slice(&frame[..wanted]);
                    }
                    this.check_head(false);
                    this.pending = frame;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn intake(
        frames: Vec<&'static [u8]>,
        expected: u64,
        declared: &str,
    ) -> Intake<impl Stream<Item = Result<Bytes, axum::Error>> + Unpin> {
        let body = futures::stream::iter(frames.into_iter().map(|f| Ok(Bytes::from_static(f))));
        Intake::new(body, expected, Declared::parse(Some(declared)).unwrap())
    }

    #[tokio::test]
    async fn the_bytes_pass_through_hashed() {
        let mut reader = intake(vec![b"hello ", b"world"], 11, "text/plain");
        let mut out = Vec::new();
        reader.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"hello world");
        let checked = reader.finish().unwrap();
        assert_eq!(
            checked.digest,
            <[u8; 32]>::from(Sha256::digest(b"hello world"))
        );
    }

    #[tokio::test]
    async fn a_short_body_or_a_lying_type_is_refused() {
        let mut short = intake(vec![b"hello"], 11, "text/plain");
        short.read_to_end(&mut Vec::new()).await.unwrap();
        assert!(matches!(short.finish(), Err(MediaError::Aborted)));
        let mut lie = intake(vec![b"not a png at all"], 16, "image/png");
        lie.read_to_end(&mut Vec::new()).await.unwrap();
        assert!(matches!(lie.finish(), Err(MediaError::Unsupported(_))));
    }
}
