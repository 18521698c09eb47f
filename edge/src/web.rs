//! The web client (`web/public/`), embedded in the binary and served at `/`,
//! and the dev-only token endpoint it signs in with.
//!
//! The assets are plain files (no build step) compiled in with
//! `include_bytes!`: an edge binary is the whole product, and what it serves
//! cannot drift from what was tested. Every response carries a strict
//! Content-Security-Policy: scripts and styles from this origin only (no
//! inline code), WebSockets to any edge (a draining edge may send the client
//! to another host).
//!
//! `POST /v1/dev/token` (`{"user":"alice"}` → `{"token":…}`) exists only when
//! `CHAT_DEV_TOKENS=true`: it signs a token for any user name with the
//! configured HS256 secret, which is what a local run wants and what a real
//! deployment must never have. Off, the route does not exist (404). On an
//! address other hosts can reach (not loopback) the edge refuses to start
//! with it unless `CHAT_DEV_TOKENS_PUBLIC=true` says that is meant.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chat_shared::auth;
use chat_shared::ids::UserId;
use chat_shared::Config;
use serde::Deserialize;
use serde_json::json;

use crate::EdgeError;

/// Scripts and styles from this origin only, nothing inline, no plugins, no
/// framing; WebSockets to any host because `reconnect` names other edges.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self' ws: wss:; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// How long a dev token lives unless the request asks otherwise.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// The `ttl_secs` a request may ask for.
const DEV_TOKEN_TTL_RANGE: std::ops::RangeInclusive<u64> = 5..=86_400;
/// A dev token request is a user name; anything longer is not one.
const DEV_TOKEN_BODY_MAX: usize = 1024;

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $file:literal, $content_type:expr) => {
        Asset {
            path: $path,
            content_type: $content_type,
            body: include_bytes!(concat!("../../web/public/", $file)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

static ASSETS: &[Asset] = &[
    asset!("/", "index.html", "text/html; charset=utf-8"),
    asset!("/app.js", "app.js", JS),
    asset!("/attach.js", "attach.js", JS),
    asset!("/changes.js", "changes.js", JS),
    asset!("/client.js", "client.js", JS),
    asset!("/composer.js", "composer.js", JS),
    asset!("/frames.js", "frames.js", JS),
    asset!("/history.js", "history.js", JS),
    asset!("/list.js", "list.js", JS),
    asset!("/media.js", "media.js", JS),
    asset!("/messages.js", "messages.js", JS),
    asset!("/nav.js", "nav.js", JS),
    asset!("/people.js", "people.js", JS),
    asset!("/privacy.js", "privacy.js", JS),
    asset!("/profiles.js", "profiles.js", JS),
    asset!("/search.js", "search.js", JS),
    asset!("/signin.js", "signin.js", JS),
    asset!("/state.js", "state.js", JS),
    asset!("/ui.js", "ui.js", JS),
    asset!("/style.css", "style.css", "text/css; charset=utf-8"),
    asset!("/icon.svg", "icon.svg", "image/svg+xml"),
];

/// A strong ETag: FNV-1a of the bytes, in hex and quotes.
fn etag_of(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("\"{hash:016x}\"")
}

/// The web client's routes, and the dev token endpoint when enabled.
/// Fails when dev tokens are on but there is no HS256 secret to sign with,
/// or when they would be served on `listen`, a non-loopback address,
/// without `CHAT_DEV_TOKENS_PUBLIC=true`.
pub fn routes<S>(config: &Config, listen: std::net::SocketAddr) -> Result<Router<S>, EdgeError>
where
    S: Clone + Send + Sync + 'static,
{
    let mut router = Router::new();
    for asset in ASSETS {
        // Computed once per asset: the assets change only with the binary.
        let etag = etag_of(asset.body);
        router = router.route(
            asset.path,
            get(move |headers: HeaderMap| std::future::ready(serve(asset, &etag, &headers))),
        );
    }
    if !config.dev_tokens {
        return Ok(router);
    }
    check_reach(config, listen)?;
    let secret = auth::dev_secret(config).inspect_err(|_| {
        tracing::error!(
            "CHAT_DEV_TOKENS=true needs an HS256 secret (CHAT_JWT_SECRET or CHAT_JWT_SECRET_FILE)"
        );
    })?;
    tracing::warn!(
        "CHAT_DEV_TOKENS=true: POST /v1/dev/token hands out a token for ANY user name \
         to anyone who can reach this edge; for local development only, never in production"
    );
    if config.jwt_issuer.is_some() || config.jwt_audience.is_some() {
        tracing::warn!(
            "dev tokens carry no iss/aud claims; with CHAT_JWT_ISSUER or CHAT_JWT_AUDIENCE set this edge refuses them"
        );
    }
    let dev = Router::new()
        .route("/v1/dev/token", post(mint_dev_token))
        .with_state(Arc::new(DevTokens { secret }));
    Ok(router.merge(dev))
}

/// Dev tokens only on loopback, unless the operator set the override.
fn check_reach(config: &Config, listen: std::net::SocketAddr) -> Result<(), EdgeError> {
    if listen.ip().to_canonical().is_loopback() || config.dev_tokens_public {
        return Ok(());
    }
    Err(EdgeError::PublicDevTokens { addr: listen })
}

fn serve(asset: &Asset, etag: &str, headers: &HeaderMap) -> Response {
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| {
            tags.split(',')
                .any(|tag| tag.trim().trim_start_matches("W/") == etag)
        });
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let out = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(etag) {
        out.insert(header::ETAG, etag);
    }
    // Revalidate every time (a 304 costs a round trip, not the bytes): a
    // new edge version is picked up at the next load.
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    secure_headers(out);
    response
}

fn secure_headers(out: &mut HeaderMap) {
    out.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    out.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    out.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    out.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
}

struct DevTokens {
    secret: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenRequest {
    user: String,
    #[serde(default)]
    ttl_secs: Option<u64>,
}

async fn mint_dev_token(State(dev): State<Arc<DevTokens>>, body: Bytes) -> Response {
    let refuse =
        |status: StatusCode, message: String| json_response(status, &json!({ "error": message }));
    if body.len() > DEV_TOKEN_BODY_MAX {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, "request too large".into());
    }
    let request: DevTokenRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"user\":\"<user id>\"}}: {e}"),
            )
        }
    };
    let user = match UserId::parse(request.user) {
        Ok(user) => user,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("user: {e}")),
    };
    let ttl = match request.ttl_secs {
        None => DEV_TOKEN_TTL,
        Some(secs) if DEV_TOKEN_TTL_RANGE.contains(&secs) => Duration::from_secs(secs),
        Some(_) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!(
                    "ttl_secs: between {} and {}",
                    DEV_TOKEN_TTL_RANGE.start(),
                    DEV_TOKEN_TTL_RANGE.end()
                ),
            )
        }
    };
    match auth::mint_hs256(&dev.secret, &user, ttl) {
        Ok(token) => {
            tracing::info!(%user, "dev token issued");
            json_response(
                StatusCode::OK,
                &json!({ "token": token, "user": user, "expires_in": ttl.as_secs() }),
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot sign a dev token");
            refuse(StatusCode::INTERNAL_SERVER_ERROR, "cannot sign".into())
        }
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    let out = response.headers_mut();
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    secure_headers(out);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module the page imports but the edge does not serve would only
    /// show as a blank page.
    #[test]
    fn every_file_of_the_web_client_is_served() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../web/public");
        let mut files = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let path = match name.as_str() {
                "index.html" => "/".to_string(),
                _ => format!("/{name}"),
            };
            assert!(
                ASSETS.iter().any(|a| a.path == path),
                "{name} is not served"
            );
            files += 1;
        }
        assert_eq!(files, ASSETS.len());
    }

    #[test]
    fn dev_tokens_stay_on_loopback_unless_overridden() {
        let on = Config {
            dev_tokens: true,
            jwt_secret: Some("0123456789abcdef0123456789abcdef".into()),
            ..Config::default()
        };
        for addr in ["127.0.0.1:8080", "[::1]:8080", "[::ffff:127.0.0.1]:8080"] {
            assert!(check_reach(&on, addr.parse().unwrap()).is_ok(), "{addr}");
        }
        for addr in ["0.0.0.0:8080", "[::]:8080", "10.1.2.3:8080"] {
            let refused = routes::<()>(&on, addr.parse().unwrap()).err();
            assert!(
                matches!(refused, Some(EdgeError::PublicDevTokens { .. })),
                "{addr}: {refused:?}"
            );
            let public = Config {
                dev_tokens_public: true,
                ..on.clone()
            };
            assert!(
                routes::<()>(&public, addr.parse().unwrap()).is_ok(),
                "{addr}"
            );
        }
        // Without dev tokens the address does not matter.
        assert!(routes::<()>(&Config::default(), "0.0.0.0:8080".parse().unwrap()).is_ok());
    }

    #[test]
    fn etags_are_quoted_hex_and_differ_per_asset() {
        for asset in ASSETS {
            let etag = etag_of(asset.body);
            assert_eq!(etag.len(), 18, "{}", asset.path);
            assert!(etag.starts_with('"') && etag.ends_with('"'));
            assert!(etag[1..17].bytes().all(|b| b.is_ascii_hexdigit()));
        }
        let mut tags: Vec<_> = ASSETS.iter().map(|a| etag_of(a.body)).collect();
        tags.sort_unstable();
        tags.dedup();
        assert_eq!(tags.len(), ASSETS.len());
    }

    #[test]
    fn html_loads_only_what_is_embedded() {
        let html = std::str::from_utf8(ASSETS[0].body).expect("utf-8");
        assert!(!html.contains("<script>"), "no inline scripts (CSP)");
        assert!(!html.contains(" style="), "no inline styles (CSP)");
        for reference in html
            .split("src=\"")
            .skip(1)
            .chain(html.split("href=\"").skip(1))
        {
            let path = reference.split('"').next().unwrap_or_default();
            if path.starts_with('/') {
                assert!(
                    ASSETS.iter().any(|a| a.path == path),
                    "{path} is referenced but not embedded"
                );
            }
        }
    }
}
