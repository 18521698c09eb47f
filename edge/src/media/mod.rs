//! Media over HTTP (PROTOCOL.md v1.1 "Media"): `POST /v1/media` streams an
//! upload into the JetStream Object Store, `GET /v1/media/<id>` (and
//! `/thumb`) streams it back. Who may see a media is the persister's answer
//! (`chat.rpc.media_access`): the edge never touches PostgreSQL.

mod download;
mod signed;
mod sniff;
mod upload;

use std::sync::Arc;

use async_nats::jetstream::object_store::ObjectStore;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chat_shared::auth::Identity;
use chat_shared::ids::{MediaId, UserId};
use chat_shared::rpc::{self, MediaInfo, RpcError};
use chat_shared::wire::{ErrorCode, ServerFrame};
use serde_json::json;

pub use signed::Signer;

use crate::quota::QuotaError;
use crate::Edge;

/// The edge's handles for media.
pub struct Media {
    pub store: ObjectStore,
    pub signer: Signer,
}

/// The media routes.
pub fn routes() -> Router<Arc<Edge>> {
    Router::new()
        .route("/v1/media", post(upload::upload))
        .route("/v1/media/{id}", get(download::original))
        .route("/v1/media/{id}/thumb", get(download::thumb))
}

/// Why a media request fails; [`IntoResponse`] is the one place each
/// becomes a status and a JSON body.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("missing or invalid token")]
    Unauthorized,
    /// Also for a media the caller may not see: its existence is not told.
    #[error("no such media")]
    NotFound,
    #[error("Content-Length is required")]
    LengthRequired,
    #[error("the body is empty")]
    Empty,
    #[error("larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("the upload ended before Content-Length bytes arrived")]
    Aborted,
    #[error("range not satisfiable")]
    Range { size: u64 },
    #[error(transparent)]
    Quota(#[from] QuotaError),
    #[error("{}", .0.message)]
    Rpc(RpcError),
    #[error("media store unavailable, retry later")]
    Unavailable,
}

impl MediaError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::LengthRequired => StatusCode::LENGTH_REQUIRED,
            Self::Empty | Self::BadRequest(_) | Self::Aborted => StatusCode::BAD_REQUEST,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unsupported(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Range { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            Self::Quota(QuotaError::Exhausted { .. }) => StatusCode::TOO_MANY_REQUESTS,
            Self::Quota(QuotaError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Quota(QuotaError::Unavailable) | Self::Unavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Rpc(e) => match e.code {
                ErrorCode::NotFound | ErrorCode::Forbidden => StatusCode::NOT_FOUND,
                ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
                ErrorCode::Unauthorized | ErrorCode::TokenExpired => StatusCode::UNAUTHORIZED,
                ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }
}

impl IntoResponse for MediaError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response =
            (status, axum::Json(json!({ "error": self.to_string() }))).into_response();
        let out = response.headers_mut();
        out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match &self {
            Self::Quota(QuotaError::Exhausted { retry_after_ms, .. }) => {
                out.insert(
                    header::RETRY_AFTER,
                    retry_after_ms.div_ceil(1000).max(1).into(),
                );
            }
            Self::Range { size } => {
                if let Ok(range) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    out.insert(header::CONTENT_RANGE, range);
                }
            }
            _ => {}
        }
        response
    }
}

/// The user of the request's `Authorization: Bearer` token, verified as a
/// WebSocket `hello` is (signature, expiry, bans, revocations).
fn bearer(edge: &Edge, headers: &HeaderMap) -> Result<Identity, MediaError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(MediaError::Unauthorized)?;
    crate::access::admit(edge, token.trim()).map_err(|e| {
        tracing::debug!(error = %e, "media request refused");
        MediaError::Unauthorized
    })
}

/// The metadata of those of `media` that `user` may see, asked of the
/// persister now (a member removed a moment ago is refused).
pub async fn visible(
    edge: &Edge,
    user: &UserId,
    media: Vec<MediaId>,
) -> Result<Vec<MediaInfo>, RpcError> {
    rpc::call::<rpc::MediaAccess>(
        &edge.nats,
        &rpc::MediaAccessRequest {
            user: user.clone(),
            media,
        },
    )
    .await
}

/// The answer to `media.url`: signed paths for a media `user` may see.
pub async fn signed_url(
    edge: &Edge,
    user: &UserId,
    reference: Option<String>,
    media: MediaId,
) -> Result<ServerFrame, RpcError> {
    if visible(edge, user, vec![media.clone()]).await?.is_empty() {
        return Err(RpcError::new(ErrorCode::NotFound, "no such media"));
    }
    let expires = chat_shared::clock::now_ms() + edge.config.media.url_ttl.as_millis() as u64;
    let signature = edge.media.signer.sign(&media, expires);
    let query = format!("exp={expires}&sig={signature}");
    Ok(ServerFrame::MediaUrl {
        reference,
        url: format!("/v1/media/{media}?{query}"),
        thumb: format!("/v1/media/{media}/thumb?{query}"),
        expires,
    })
}
