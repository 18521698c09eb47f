//! `GET /v1/media/<id>` and `GET /v1/media/<id>/thumb`: streamed from the
//! object store, with `Range` (one range; `206`, or `416` past the end),
//! `ETag` (the SHA-256) and `If-None-Match` (`304`).
//!
//! Access: a valid signed URL (`media.url`), or a Bearer token whose user
//! the persister says may see the media, asked at every request. Anything
//! else is `404`, as for a media that does not exist.
//!
//! The object store cannot seek: a range is served by reading the object
//! from its start and dropping the bytes before the range, a chunk at a
//! time, never buffering it.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use chat_shared::ids::MediaId;
use chat_shared::subjects;
use serde::Deserialize;
use tokio::io::AsyncReadExt;

use super::{bearer, visible, MediaError};
use crate::Edge;

/// Bytes read from the store per body frame.
const FRAME_BYTES: usize = 64 * 1024;
/// A media is content, never a page of this origin: no scripts, no
/// plugins, no same-origin rights even if a browser renders it.
const MEDIA_CSP: &str = "default-src 'none'; sandbox";

/// A signed URL's query (`media.url`).
#[derive(Debug, Default, Deserialize)]
pub struct Signature {
    exp: Option<u64>,
    sig: Option<String>,
}

/// Which object of a media.
#[derive(Debug, Clone, Copy)]
enum Variant {
    Original,
    Thumb,
}

pub async fn original(
    State(edge): State<Arc<Edge>>,
    Path(id): Path<String>,
    Query(signature): Query<Signature>,
    headers: HeaderMap,
) -> Response {
    serve(&edge, &id, &signature, &headers, Variant::Original)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn thumb(
    State(edge): State<Arc<Edge>>,
    Path(id): Path<String>,
    Query(signature): Query<Signature>,
    headers: HeaderMap,
) -> Response {
    serve(&edge, &id, &signature, &headers, Variant::Thumb)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn serve(
    edge: &Edge,
    id: &str,
    signature: &Signature,
    headers: &HeaderMap,
    variant: Variant,
) -> Result<Response, MediaError> {
    let media = MediaId::parse(id).map_err(|_| MediaError::NotFound)?;
    authorize(edge, &media, signature, headers).await?;
    let (name, etag) = match variant {
        Variant::Original => (subjects::media_object(&media), format!("\"{media}\"")),
        Variant::Thumb => (subjects::thumb_object(&media), format!("\"{media}.thumb\"")),
    };
    let store = &edge.media.store;
    let info = match chat_shared::objects::live(store, &name).await {
        Ok(Some(info)) => info,
        Ok(None) => return Err(MediaError::NotFound),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a media object");
            return Err(MediaError::Unavailable);
        }
    };
    let mut out = HeaderMap::new();
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        out.insert(header::ETAG, etag);
    }
    let cache = format!(
        "private, max-age={}",
        edge.config.media.cache_max_age.as_secs()
    );
    if let Ok(cache) = HeaderValue::from_str(&cache) {
        out.insert(header::CACHE_CONTROL, cache);
    }
    out.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    out.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    out.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(MEDIA_CSP),
    );
    if fresh(headers, &etag) {
        return Ok((StatusCode::NOT_MODIFIED, out).into_response());
    }
    let content_type = info
        .metadata
        .get(subjects::MEDIA_CONTENT_TYPE_KEY)
        .map(String::as_str)
        .unwrap_or("application/octet-stream");
    if let Ok(value) = HeaderValue::from_str(content_type) {
        out.insert(header::CONTENT_TYPE, value);
    }
    // Pictures show in the page; anything else is saved, never rendered.
    let disposition = if content_type.starts_with("image/") {
        "inline"
    } else {
        "attachment"
    };
    out.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static(disposition),
    );
    let size = info.size as u64;
    let range = requested_range(
        headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
        size,
    )?;
    let (status, start, length) = match range {
        Some((first, last)) => {
            if let Ok(value) = HeaderValue::from_str(&format!("bytes {first}-{last}/{size}")) {
                out.insert(header::CONTENT_RANGE, value);
            }
            (StatusCode::PARTIAL_CONTENT, first, last - first + 1)
        }
        None => (StatusCode::OK, 0, size),
    };
    out.insert(header::CONTENT_LENGTH, length.into());
    let mut object = store.get(&name).await.map_err(|e| {
        tracing::warn!(error = %e, "cannot open a media object");
        MediaError::Unavailable
    })?;
    if start > 0 {
        let skipped = tokio::io::copy(&mut (&mut object).take(start), &mut tokio::io::sink())
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot read a media object");
                MediaError::Unavailable
            })?;
        if skipped != start {
            return Err(MediaError::Unavailable);
        }
    }
    let body = futures::stream::try_unfold(object.take(length), |mut reader| async move {
        let mut frame = BytesMut::with_capacity(FRAME_BYTES);
        let read = reader.read_buf(&mut frame).await?;
        Ok::<_, std::io::Error>((read > 0).then(|| (frame.freeze(), reader)))
    });
    Ok((status, out, Body::from_stream(body)).into_response())
}

/// A signed URL decides alone; otherwise the Bearer token's user must be
/// one the persister lets see the media.
async fn authorize(
    edge: &Edge,
    media: &MediaId,
    signature: &Signature,
    headers: &HeaderMap,
) -> Result<(), MediaError> {
    if let (Some(expires), Some(sig)) = (signature.exp, &signature.sig) {
        let now = chat_shared::clock::now_ms();
        return match edge.media.signer.verify(media, expires, sig, now) {
            true => Ok(()),
            false => Err(MediaError::NotFound),
        };
    }
    let user = bearer(edge, headers)?.user;
    let allowed = visible(edge, &user, vec![media.clone()])
        .await
        .map_err(MediaError::Rpc)?;
    if allowed.is_empty() {
        return Err(MediaError::NotFound);
    }
    Ok(())
}

/// Whether `If-None-Match` names `etag` (or is `*`).
fn fresh(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| {
            tags.split(',').any(|tag| {
                let tag = tag.trim();
                tag == "*" || tag.trim_start_matches("W/") == etag
            })
        })
}

/// The first and last byte of a single `bytes=` range of an object of
/// `size` bytes; `None` to serve it whole (no range, a malformed one, or
/// several, which RFC 9110 lets a server ignore); `416` when it starts
/// past the end.
fn requested_range(header: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, MediaError> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let unsatisfiable = MediaError::Range { size };
    match (first.parse::<u64>(), last.parse::<u64>()) {
        // The last `n` bytes.
        (Err(_), Ok(n)) if first.is_empty() => {
            if n == 0 || size == 0 {
                return Err(unsatisfiable);
            }
            Ok(Some((size.saturating_sub(n), size - 1)))
        }
        (Ok(first), Err(_)) if last.is_empty() => {
            if first >= size {
                return Err(unsatisfiable);
            }
            Ok(Some((first, size - 1)))
        }
        (Ok(first), Ok(last)) if first <= last => {
            if first >= size {
                return Err(unsatisfiable);
            }
            Ok(Some((first, last.min(size - 1))))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_one_span_within_the_object() {
        let range = |h: &str| requested_range(Some(h), 100).map_err(|e| e.to_string());
        assert_eq!(range("bytes=0-9"), Ok(Some((0, 9))));
        assert_eq!(range("bytes=90-"), Ok(Some((90, 99))));
        assert_eq!(range("bytes=95-200"), Ok(Some((95, 99))));
        assert_eq!(range("bytes=-10"), Ok(Some((90, 99))));
        assert_eq!(range("bytes=-500"), Ok(Some((0, 99))));
        assert_eq!(range("bytes=0-1,5-6"), Ok(None));
        assert_eq!(range("items=0-1"), Ok(None));
        assert_eq!(range("bytes=9-3"), Ok(None));
        assert_eq!(range("bytes=x-"), Ok(None));
        assert!(range("bytes=100-").is_err());
        assert!(range("bytes=100-200").is_err());
        assert!(range("bytes=-0").is_err());
        assert_eq!(requested_range(None, 100).ok(), Some(None));
    }

    #[test]
    fn if_none_match_names_the_etag() {
        let mut headers = HeaderMap::new();
        assert!(!fresh(&headers, "\"a\""));
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"b\", W/\"a\""),
        );
        assert!(fresh(&headers, "\"a\""));
        assert!(!fresh(&headers, "\"c\""));
    }
}
