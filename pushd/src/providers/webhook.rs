//! Webhooks: a signed JSON POST to `webhook_url` per notification.
//!
//! Signature: `X-Chat-Signature: sha256=<hex HMAC-SHA256(secret,
//! "<X-Chat-Timestamp>.<body>")>`, with `X-Chat-Timestamp` the sending
//! time in Unix seconds. A receiver recomputes it over the raw body,
//! compares in constant time, and refuses timestamps more than a few
//! minutes old (replays).

use chat_shared::config::PushConfig;
use hmac::{Hmac, Mac};
use reqwest::header::CONTENT_TYPE;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Sha256;

use super::{send, unix_seconds};
use crate::notification::{Notification, Push, Retraction};
use crate::retry::Attempt;
use crate::PushdError;

pub const TIMESTAMP_HEADER: &str = "x-chat-timestamp";
pub const SIGNATURE_HEADER: &str = "x-chat-signature";

pub struct Webhook {
    client: reqwest::Client,
    url: String,
    /// Keyed with the secret once; cloned per signature.
    key: Hmac<Sha256>,
}

impl Webhook {
    /// Webhooks, if `webhook_url` is set (the configuration check makes
    /// sure the secret is then set too).
    pub(super) fn load(
        config: &PushConfig,
        client: impl FnOnce() -> Result<reqwest::Client, super::ClientError>,
    ) -> Result<Option<Self>, PushdError> {
        let Some(url) = &config.webhook_url else {
            return Ok(None);
        };
        let secret = config.webhook_secret.clone().ok_or_else(|| {
            PushdError::provider("webhook", "CHAT_PUSH_WEBHOOK_SECRET is not set")
        })?;
        let key = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
            .map_err(|e| PushdError::provider("webhook", e))?;
        Ok(Some(Self {
            client: client().map_err(|e| PushdError::provider("webhook", e))?,
            url: url.clone(),
            key,
        }))
    }

    pub async fn attempt(&self, token: &str, push: &Push) -> Attempt {
        let body = match push {
            Push::Notify(n) => body(token, n),
            Push::Retract(r) => retraction_body(token, r),
        }
        .to_string();
        let timestamp = unix_seconds().to_string();
        let request = self
            .client
            .post(&self.url)
            .header(CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, &timestamp)
            .header(SIGNATURE_HEADER, signature(&self.key, &timestamp, &body))
            .body(body);
        let response = match send(request).await {
            Ok(response) => response,
            Err(attempt) => return attempt,
        };
        let reason = format!("{}: {}", response.status, response.excerpt());
        // 410 Gone: the receiver no longer knows this token.
        if response.status == StatusCode::GONE {
            return Attempt::InvalidToken(reason);
        }
        Attempt::from_status(response.status, &response.headers, reason)
    }
}

/// `sha256=<hex>` of HMAC-SHA256 over `<timestamp>.<body>`.
pub fn signature(key: &Hmac<Sha256>, timestamp: &str, body: &str) -> String {
    let mut mac = key.clone();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex = chat_shared::hex::encode(digest);
    format!("sha256={hex}")
}

/// The JSON a webhook receives; `text` appears only with previews on.
pub fn body(token: &str, n: &Notification) -> Value {
    let messages: Vec<Value> = n
        .items
        .iter()
        .map(|item| {
            let mut message = json!({
                "id": item.id.to_string(),
                "conversation": item.conversation.to_string(),
                "from": item.from.to_string(),
                "ts": item.ts,
            });
            if let Some(text) = &item.text {
                message["text"] = json!(text);
            }
            message
        })
        .collect();
    json!({
        "user": n.user.to_string(),
        "token": token,
        "conversation": n.conversation.to_string(),
        "from": n.from.to_string(),
        "count": n.count(),
        "message_ids": n.items.iter().map(|i| i.id.to_string()).collect::<Vec<_>>(),
        "title": n.title,
        "body": n.body,
        "messages": messages,
        "badge": n.badge,
    })
}

/// The JSON a webhook receives for a retraction: `retract` tells it apart
/// from a notification.
pub fn retraction_body(token: &str, r: &Retraction) -> Value {
    json!({
        "user": r.user.to_string(),
        "token": token,
        "retract": r.reason.as_str(),
        "conversation": r.conversation.to_string(),
        "up_to": r.up_to.to_string(),
        "badge": r.badge,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::tests::job;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        let key = Hmac::<Sha256>::new_from_slice(b"secret").unwrap();
        // printf '1700000000.{}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            signature(&key, "1700000000", "{}"),
            "sha256=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
        assert_ne!(
            signature(&key, "1700000000", "{}"),
            signature(&key, "1700000001", "{}")
        );
    }

    #[test]
    fn a_retraction_names_what_it_withdraws_and_the_badge() {
        let job = job("alice", 1, "x");
        let r = Retraction {
            user: job.user,
            conversation: job.conversation,
            reason: chat_shared::push::RetractReason::Read,
            up_to: chat_shared::ids::MessageId(9),
            badge: Some(3),
        };
        assert_eq!(
            retraction_body("bot-7", &r),
            json!({"user": "bob", "token": "bot-7", "retract": "read",
                   "conversation": "dm:alice:bob", "up_to": "9", "badge": 3})
        );
    }

    #[test]
    fn body_carries_texts_only_with_preview() {
        let jobs = [job("alice", 1, "one"), job("alice", 2, "two")];
        let n = Notification::coalesce(&jobs, true).unwrap();
        let with = body("bot-7", &n);
        assert_eq!(with["user"], "bob");
        assert_eq!(with["token"], "bot-7");
        assert_eq!(with["count"], 2);
        assert_eq!(with["message_ids"], json!(["1", "2"]));
        assert_eq!(with["messages"][1]["text"], "two");
        let n = Notification::coalesce(&jobs, false).unwrap();
        let without = body("bot-7", &n).to_string();
        assert!(
            !without.contains("one") && !without.contains("two"),
            "{without}"
        );
    }
}
