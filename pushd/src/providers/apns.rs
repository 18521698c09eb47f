//! Apple Push Notification service, token-based (`.p8` key) over HTTP/2.
//!
//! `POST {apns_url}/3/device/{token}` with `authorization: bearer <JWT>`:
//! ES256, `kid` = key id, claims `iss` = team id and `iat`. Apple refuses a
//! provider token older than an hour and one refreshed more often than
//! every 20 minutes, so one is made and reused for 50 minutes.

use std::sync::Mutex;
use std::time::Duration;

use chat_shared::config::PushConfig;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{send, unix_seconds, Response};
use crate::notification::{Notification, Push, Retraction};
use crate::retry::Attempt;
use crate::PushdError;

const TOKEN_REUSE: Duration = Duration::from_secs(50 * 60);
/// Apple's limit on `apns-collapse-id`.
const MAX_COLLAPSE_ID: usize = 64;

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: u64,
}

struct ProviderToken {
    value: String,
    made: Instant,
}

pub struct Apns {
    client: reqwest::Client,
    base: String,
    topic: String,
    key_id: String,
    team_id: String,
    key: EncodingKey,
    token: Mutex<Option<ProviderToken>>,
}

impl Apns {
    /// APNs, if `apns_key_file` is set (the configuration check makes sure
    /// the key id, team id and topic are then set too).
    pub(super) fn load(
        config: &PushConfig,
        client: impl FnOnce() -> Result<reqwest::Client, super::ClientError>,
    ) -> Result<Option<Self>, PushdError> {
        let Some(path) = &config.apns_key_file else {
            return Ok(None);
        };
        let setting = |value: &Option<String>, name: &str| {
            value
                .clone()
                .ok_or_else(|| PushdError::provider("apns", format!("{name} is not set")))
        };
        let pem = std::fs::read(path).map_err(|e| {
            PushdError::provider("apns", format!("reading {}: {e}", path.display()))
        })?;
        let key = EncodingKey::from_ec_pem(&pem).map_err(|e| {
            PushdError::provider("apns", format!("the key in {}: {e}", path.display()))
        })?;
        Ok(Some(Self {
            client: client().map_err(|e| PushdError::provider("apns", e))?,
            base: config.apns_url.trim_end_matches('/').to_string(),
            topic: setting(&config.apns_topic, "CHAT_PUSH_APNS_TOPIC")?,
            key_id: setting(&config.apns_key_id, "CHAT_PUSH_APNS_KEY_ID")?,
            team_id: setting(&config.apns_team_id, "CHAT_PUSH_APNS_TEAM_ID")?,
            key,
            token: Mutex::new(None),
        }))
    }

    /// One send to one device token.
    pub async fn attempt(&self, token: &str, push: &Push) -> Attempt {
        let jwt = match self.provider_token() {
            Ok(jwt) => jwt,
            Err(attempt) => return attempt,
        };
        // A retraction is a background push: nothing shown, the app
        // withdraws the notification (Apple requires priority 5 for it).
        let (conversation, push_type, priority, body) = match push {
            Push::Notify(n) => (&n.conversation, "alert", "10", payload(n)),
            Push::Retract(r) => (&r.conversation, "background", "5", retraction_payload(r)),
        };
        let request = self
            .client
            .post(format!("{}/3/device/{token}", self.base))
            .header(AUTHORIZATION, format!("bearer {jwt}"))
            .header("apns-topic", &self.topic)
            .header("apns-push-type", push_type)
            .header("apns-priority", priority)
            .header("apns-collapse-id", collapse_id(&conversation.to_string()))
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_string());
        let response = match send(request).await {
            Ok(response) => response,
            Err(attempt) => return attempt,
        };
        let reason = reason(&response);
        if matches!(
            reason.as_deref(),
            Some("ExpiredProviderToken" | "InvalidProviderToken")
        ) {
            // Make a new one for the next send (clock skew, a key rotated
            // under us); this send itself is not retried.
            self.forget(&jwt);
        }
        classify(&response, reason.as_deref())
    }

    fn provider_token(&self) -> Result<String, Attempt> {
        // A poisoned lock only means another sender panicked mid-update;
        // the cached value is still a whole token or none.
        let mut cached = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(token) = cached.as_ref().filter(|t| t.made.elapsed() < TOKEN_REUSE) {
            return Ok(token.value.clone());
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let claims = Claims {
            iss: &self.team_id,
            iat: unix_seconds(),
        };
        let value = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| Attempt::Failed(format!("signing the provider token: {e}")))?;
        *cached = Some(ProviderToken {
            value: value.clone(),
            made: Instant::now(),
        });
        Ok(value)
    }

    fn forget(&self, stale: &str) {
        let mut cached = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if cached.as_ref().is_some_and(|t| t.value == stale) {
            *cached = None;
        }
    }
}

/// `apns-collapse-id`: the conversation, so a newer notification replaces
/// an older one about the same conversation. Ids longer than Apple's 64
/// bytes become their SHA-256 in hex (64 characters).
pub fn collapse_id(conversation: &str) -> String {
    if conversation.len() <= MAX_COLLAPSE_ID {
        conversation.to_string()
    } else {
        chat_shared::hex::encode(Sha256::digest(conversation.as_bytes()))
    }
}

/// The notification body: `aps` for the system, the rest for the app.
pub fn payload(n: &Notification) -> Value {
    let conversation = n.conversation.to_string();
    let mut payload = json!({
        "aps": {
            "alert": { "title": n.title, "body": n.body },
            "sound": "default",
            "thread-id": conversation,
        },
        "conversation": conversation,
        "message_id": n.message_id.to_string(),
        "from": n.from.to_string(),
        "count": n.count(),
    });
    if let Some(badge) = n.badge {
        payload["aps"]["badge"] = json!(badge);
    }
    payload
}

/// A background push: `content-available` wakes the app to withdraw the
/// notification; `badge` is set by the system.
pub fn retraction_payload(r: &Retraction) -> Value {
    let mut aps = json!({ "content-available": 1 });
    if let Some(badge) = r.badge {
        aps["badge"] = json!(badge);
    }
    json!({
        "aps": aps,
        "retract": r.reason.as_str(),
        "conversation": r.conversation.to_string(),
        "up_to": r.up_to.to_string(),
    })
}

#[derive(Deserialize)]
struct ErrorBody {
    reason: String,
}

/// APNs's `reason` for a refusal.
fn reason(response: &Response) -> Option<String> {
    serde_json::from_slice::<ErrorBody>(&response.body)
        .ok()
        .map(|e| e.reason)
}

/// Tokens are dropped for 410 (`Unregistered`, `ExpiredToken`) and for
/// 400 `BadDeviceToken`.
fn classify(response: &Response, reason: Option<&str>) -> Attempt {
    let text = format!("{}: {}", response.status, response.excerpt());
    match (response.status, reason) {
        (StatusCode::GONE, _) | (StatusCode::BAD_REQUEST, Some("BadDeviceToken")) => {
            Attempt::InvalidToken(text)
        }
        (status, _) => Attempt::from_status(status, &response.headers, text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::tests::job;
    use reqwest::header::HeaderMap;

    fn answer(status: u16, reason: Option<&str>) -> Attempt {
        let body = reason.map_or(String::new(), |r| json!({ "reason": r }).to_string());
        let response = Response {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: body.into(),
        };
        classify(&response, super::reason(&response).as_deref())
    }

    #[test]
    fn payload_has_the_aps_shape() {
        let n = Notification::coalesce(&[job("alice", 7, "lunch?")], true).unwrap();
        assert_eq!(
            payload(&n),
            json!({
                "aps": {
                    "alert": {"title": "alice", "body": "lunch?"},
                    "sound": "default",
                    "thread-id": "dm:alice:bob"
                },
                "conversation": "dm:alice:bob",
                "message_id": "7",
                "from": "alice",
                "count": 1
            })
        );
    }

    #[test]
    fn collapse_ids_fit_in_64_bytes() {
        assert_eq!(collapse_id("group:g1"), "group:g1");
        let long = format!("dm:{}:{}", "a".repeat(64), "b".repeat(64));
        let id = collapse_id(&long);
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(
            id,
            collapse_id(&format!("dm:{}:{}", "a".repeat(64), "c".repeat(64)))
        );
    }

    #[test]
    fn answers_are_classified() {
        assert_eq!(answer(200, None), Attempt::Delivered);
        assert!(matches!(
            answer(410, Some("Unregistered")),
            Attempt::InvalidToken(_)
        ));
        assert!(matches!(
            answer(410, Some("ExpiredToken")),
            Attempt::InvalidToken(_)
        ));
        assert!(matches!(
            answer(400, Some("BadDeviceToken")),
            Attempt::InvalidToken(_)
        ));
        assert!(matches!(
            answer(400, Some("DeviceTokenNotForTopic")),
            Attempt::Failed(_)
        ));
        assert!(matches!(
            answer(400, Some("PayloadTooLarge")),
            Attempt::Failed(_)
        ));
        assert!(matches!(
            answer(403, Some("ExpiredProviderToken")),
            Attempt::Failed(_)
        ));
        assert!(matches!(
            answer(429, Some("TooManyRequests")),
            Attempt::Retry { .. }
        ));
        assert!(matches!(
            answer(500, Some("InternalServerError")),
            Attempt::Retry { .. }
        ));
        assert!(matches!(
            answer(503, Some("ServiceUnavailable")),
            Attempt::Retry { .. }
        ));
    }
}
