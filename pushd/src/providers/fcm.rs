//! Firebase Cloud Messaging, HTTP v1 API.
//!
//! `POST {fcm_url}/v1/projects/{project_id}/messages:send` with an OAuth 2
//! access token obtained from the service account's key: an RS256 JWT
//! assertion exchanged at its `token_uri` (RFC 7523). The access token is
//! cached and shared by every send until five minutes before it expires.

use std::time::Duration;

use chat_shared::config::PushConfig;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::CONTENT_TYPE;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{send, unix_seconds, Response};
use crate::notification::{Notification, Push, Retraction};
use crate::retry::Attempt;
use crate::PushdError;

const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The longest assertion lifetime Google accepts.
const ASSERTION_LIFETIME: u64 = 3600;
/// Renew an access token this long before it expires, so none expires
/// between being read from the cache and reaching FCM.
const RENEW_BEFORE: Duration = Duration::from_secs(300);

/// The fields of a Google service-account key file that pushd uses.
#[derive(Deserialize)]
struct ServiceAccount {
    project_id: String,
    client_email: String,
    private_key: String,
    private_key_id: Option<String>,
    token_uri: String,
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

struct AccessToken {
    value: String,
    renew_at: Instant,
}

pub struct Fcm {
    client: reqwest::Client,
    send_url: String,
    client_email: String,
    token_uri: String,
    key_id: Option<String>,
    key: EncodingKey,
    /// Held across a token fetch, so concurrent sends wait for one fetch
    /// instead of each making their own.
    access: tokio::sync::Mutex<Option<AccessToken>>,
}

impl Fcm {
    /// FCM, if `fcm_credentials` is set.
    pub(super) fn load(
        config: &PushConfig,
        client: impl FnOnce() -> Result<reqwest::Client, super::ClientError>,
    ) -> Result<Option<Self>, PushdError> {
        let Some(path) = &config.fcm_credentials else {
            return Ok(None);
        };
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            PushdError::provider("fcm", format!("{what} {}: {e}", path.display()))
        };
        let raw = std::fs::read(path).map_err(|e| fail("reading", &e))?;
        let account: ServiceAccount =
            serde_json::from_slice(&raw).map_err(|e| fail("parsing", &e))?;
        let key = EncodingKey::from_rsa_pem(account.private_key.as_bytes())
            .map_err(|e| fail("the private_key of", &e))?;
        Ok(Some(Self {
            client: client().map_err(|e| PushdError::provider("fcm", e))?,
            send_url: format!(
                "{}/v1/projects/{}/messages:send",
                config.fcm_url.trim_end_matches('/'),
                account.project_id
            ),
            client_email: account.client_email,
            token_uri: account.token_uri,
            key_id: account.private_key_id,
            key,
            access: tokio::sync::Mutex::new(None),
        }))
    }

    /// One send to one registration token.
    pub async fn attempt(&self, token: &str, push: &Push) -> Attempt {
        let access = match self.access_token().await {
            Ok(access) => access,
            Err(attempt) => return attempt,
        };
        let request = self
            .client
            .post(&self.send_url)
            .bearer_auth(&access)
            .header(CONTENT_TYPE, "application/json")
            .body(
                match push {
                    Push::Notify(n) => payload(token, n),
                    Push::Retract(r) => retraction_payload(token, r),
                }
                .to_string(),
            );
        let response = match send(request).await {
            Ok(response) => response,
            Err(attempt) => return attempt,
        };
        if response.status == StatusCode::UNAUTHORIZED {
            // Revoked or expired early: the next send fetches a new one.
            let mut cached = self.access.lock().await;
            if cached.as_ref().is_some_and(|t| t.value == access) {
                *cached = None;
            }
        }
        classify(&response)
    }

    async fn access_token(&self) -> Result<String, Attempt> {
        let mut cached = self.access.lock().await;
        if let Some(token) = cached.as_ref().filter(|t| Instant::now() < t.renew_at) {
            return Ok(token.value.clone());
        }
        let fresh = self.fetch_access_token().await?;
        let value = fresh.value.clone();
        *cached = Some(fresh);
        Ok(value)
    }

    async fn fetch_access_token(&self) -> Result<AccessToken, Attempt> {
        let iat = unix_seconds();
        let claims = AssertionClaims {
            iss: &self.client_email,
            scope: SCOPE,
            aud: &self.token_uri,
            iat,
            exp: iat + ASSERTION_LIFETIME,
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.key_id.clone();
        let assertion = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| Attempt::Failed(format!("signing the OAuth assertion: {e}")))?;
        let request = self
            .client
            .post(&self.token_uri)
            .form(&[("grant_type", GRANT_TYPE), ("assertion", &assertion)]);
        let response = send(request).await?;
        if !response.status.is_success() {
            let reason = format!(
                "OAuth token endpoint: {}: {}",
                response.status,
                response.excerpt()
            );
            return Err(Attempt::from_status(
                response.status,
                &response.headers,
                reason,
            ));
        }
        let parsed: TokenResponse = serde_json::from_slice(&response.body)
            .map_err(|e| Attempt::Failed(format!("OAuth token response: {e}")))?;
        let lifetime = Duration::from_secs(parsed.expires_in);
        let early = RENEW_BEFORE.min(lifetime / 2);
        Ok(AccessToken {
            value: parsed.access_token,
            renew_at: Instant::now() + lifetime - early,
        })
    }
}

/// The `messages:send` body. `data` values must all be strings.
pub fn payload(token: &str, n: &Notification) -> Value {
    let conversation = n.conversation.to_string();
    let mut payload = json!({
        "message": {
            "token": token,
            "notification": { "title": n.title, "body": n.body },
            "data": {
                "conversation": conversation,
                "message_id": n.message_id.to_string(),
                "from": n.from.to_string(),
                "count": n.count().to_string(),
            },
            "android": { "priority": "high", "collapse_key": conversation },
            // For iOS apps that receive through FCM: the same grouping and
            // replacement as the direct APNs provider.
            "apns": {
                "headers": {
                    "apns-priority": "10",
                    "apns-collapse-id": super::apns::collapse_id(&conversation),
                },
                "payload": { "aps": { "sound": "default", "thread-id": conversation } },
            },
        }
    });
    if let Some(badge) = n.badge {
        let message = &mut payload["message"];
        message["data"]["badge"] = json!(badge.to_string());
        message["android"]["notification"] = json!({ "notification_count": badge });
        message["apns"]["payload"]["aps"]["badge"] = json!(badge);
    }
    payload
}

/// A data-only message (no `notification`: nothing is shown) with the
/// notification's collapse key, so the app withdraws it and sets the badge.
pub fn retraction_payload(token: &str, r: &Retraction) -> Value {
    let conversation = r.conversation.to_string();
    let mut aps = json!({ "content-available": 1 });
    let mut data = json!({
        "retract": r.reason.as_str(),
        "conversation": conversation,
        "up_to": r.up_to.to_string(),
    });
    if let Some(badge) = r.badge {
        aps["badge"] = json!(badge);
        data["badge"] = json!(badge.to_string());
    }
    json!({
        "message": {
            "token": token,
            "data": data,
            "android": { "priority": "high", "collapse_key": conversation },
            "apns": {
                "headers": {
                    "apns-priority": "5",
                    "apns-push-type": "background",
                    "apns-collapse-id": super::apns::collapse_id(&conversation),
                },
                "payload": { "aps": aps },
            },
        }
    })
}

#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    error: ErrorInfo,
}

#[derive(Deserialize, Default)]
struct ErrorInfo {
    #[serde(default)]
    message: String,
    #[serde(default)]
    details: Vec<Value>,
}

impl ErrorInfo {
    /// The `errorCode` of the `FcmError` detail.
    fn fcm_code(&self) -> Option<&str> {
        self.details
            .iter()
            .find(|d| d["@type"].as_str().is_some_and(|t| t.ends_with("FcmError")))
            .and_then(|d| d["errorCode"].as_str())
    }

    /// Whether a `BadRequest` detail (or failing that the message) blames
    /// the registration token rather than another field of the request.
    fn blames_token(&self) -> bool {
        let field_violation = self.details.iter().any(|d| {
            d["fieldViolations"]
                .as_array()
                .is_some_and(|v| v.iter().any(|f| f["field"] == "message.token"))
        });
        field_violation || self.message.contains("registration token")
    }
}

/// What an FCM answer means. Tokens are dropped for `UNREGISTERED` (the
/// app was uninstalled or the token expired; FCM answers 404) and for
/// `INVALID_ARGUMENT` about the token itself; a 404 without
/// `UNREGISTERED` (a wrong project id) deletes nothing.
fn classify(response: &Response) -> Attempt {
    if response.status.is_success() {
        return Attempt::Delivered;
    }
    let reason = format!("{}: {}", response.status, response.excerpt());
    let error = serde_json::from_slice::<ErrorBody>(&response.body)
        .unwrap_or_default()
        .error;
    match error.fcm_code() {
        Some("UNREGISTERED") => Attempt::InvalidToken(reason),
        Some("INVALID_ARGUMENT") if error.blames_token() => Attempt::InvalidToken(reason),
        _ => Attempt::from_status(response.status, &response.headers, reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::tests::job;
    use reqwest::header::{HeaderMap, RETRY_AFTER};

    fn answer(status: u16, body: Value) -> Response {
        Response {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: body.to_string().into(),
        }
    }

    fn fcm_error(code: u16, status: &str, fcm_code: &str, message: &str) -> Value {
        json!({"error": {"code": code, "message": message, "status": status, "details": [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": fcm_code}
        ]}})
    }

    #[test]
    fn payload_has_the_v1_shape() {
        let jobs: Vec<_> = (1..=3).map(|i| job("alice", i, "hi")).collect();
        let n = Notification::coalesce(&jobs, true).unwrap();
        let body = payload("tok-1", &n);
        assert_eq!(
            body,
            json!({"message": {
                "token": "tok-1",
                "notification": {"title": "alice", "body": "3 new messages from alice"},
                "data": {"conversation": "dm:alice:bob", "message_id": "3", "from": "alice", "count": "3"},
                "android": {"priority": "high", "collapse_key": "dm:alice:bob"},
                "apns": {
                    "headers": {"apns-priority": "10", "apns-collapse-id": "dm:alice:bob"},
                    "payload": {"aps": {"sound": "default", "thread-id": "dm:alice:bob"}}
                }
            }})
        );
        assert!(body["message"]["data"]
            .as_object()
            .unwrap()
            .values()
            .all(Value::is_string));
    }

    #[test]
    fn answers_are_classified() {
        assert_eq!(
            classify(&answer(200, json!({"name": "projects/p/messages/1"}))),
            Attempt::Delivered
        );
        let unregistered = fcm_error(
            404,
            "NOT_FOUND",
            "UNREGISTERED",
            "Requested entity was not found.",
        );
        assert!(matches!(
            classify(&answer(404, unregistered)),
            Attempt::InvalidToken(_)
        ));
        let bad_token = fcm_error(
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "The registration token is not a valid FCM registration token",
        );
        assert!(matches!(
            classify(&answer(400, bad_token)),
            Attempt::InvalidToken(_)
        ));
        let bad_field = fcm_error(
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "Invalid value at 'message.data[0].value'",
        );
        assert!(matches!(
            classify(&answer(400, bad_field)),
            Attempt::Failed(_)
        ));
        assert!(matches!(
            classify(&answer(404, json!({}))),
            Attempt::Failed(_)
        ));
        let mismatch = fcm_error(
            403,
            "PERMISSION_DENIED",
            "SENDER_ID_MISMATCH",
            "SenderId mismatch",
        );
        assert!(matches!(
            classify(&answer(403, mismatch)),
            Attempt::Failed(_)
        ));
        assert!(matches!(
            classify(&answer(401, json!({}))),
            Attempt::Failed(_)
        ));
        let mut quota = answer(
            429,
            fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", "quota"),
        );
        quota.headers.insert(RETRY_AFTER, "12".parse().unwrap());
        assert!(matches!(
            classify(&quota),
            Attempt::Retry { after: Some(d), .. } if d == Duration::from_secs(12)
        ));
        assert!(matches!(
            classify(&answer(503, json!({}))),
            Attempt::Retry { after: None, .. }
        ));
        let garbage = Response {
            status: StatusCode::BAD_GATEWAY,
            headers: HeaderMap::new(),
            body: "<html>".into(),
        };
        assert!(matches!(classify(&garbage), Attempt::Retry { .. }));
    }
}
