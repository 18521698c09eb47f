//! Push notifications: the job the router emits for an offline member, the
//! platforms a device may register, and per-platform token validation.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::{ConversationId, MessageId, UserId};

/// `chat.push.<user>` (stream PUSH, work queue): `message` reached `user`'s
/// inbox while none of their devices was online. Published with
/// `Nats-Msg-Id` = `push:<message id>:<user>`, so a redelivered router
/// batch makes no second job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PushJob {
    pub user: UserId,
    pub conversation: ConversationId,
    pub id: MessageId,
    pub from: UserId,
    /// A preview: the start of the message's text, at most 1024 bytes of
    /// UTF-8 cut between characters, ending in `…` when cut.
    pub text: String,
    pub ts: i64,
}

/// The most of a message's text a push job carries, in bytes of UTF-8.
pub const PREVIEW_BYTES: usize = 1024;

/// `text` cut to at most [`PREVIEW_BYTES`] on a character boundary, with
/// `…` at the end when something was cut.
pub fn preview(text: &str) -> String {
    if text.len() <= PREVIEW_BYTES {
        return text.to_string();
    }
    const ELLIPSIS: &str = "…";
    let mut cut = PREVIEW_BYTES - ELLIPSIS.len();
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{ELLIPSIS}", &text[..cut])
}

/// A push provider a device registers a token with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Fcm,
    Apns,
    Webhook,
}

impl Platform {
    pub const ALL: [Platform; 3] = [Platform::Fcm, Platform::Apns, Platform::Webhook];

    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Fcm => "fcm",
            Platform::Apns => "apns",
            Platform::Webhook => "webhook",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// Checks `token`'s shape for this platform, so nothing a provider would
    /// reject for its form is ever stored:
    /// - FCM registration tokens: 1..=4096 of `[A-Za-z0-9_:-]`;
    /// - APNs device tokens: 64..=200 hex digits (32 bytes today; Apple
    ///   warns the length may grow);
    /// - webhook: an opaque id for the receiver, 1..=256 printable ASCII
    ///   characters without spaces.
    pub fn validate_token(self, token: &str) -> Result<(), BadToken> {
        let ok = match self {
            Platform::Fcm => {
                (1..=4096).contains(&token.len())
                    && token
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_:-".contains(&b))
            }
            Platform::Apns => {
                (64..=200).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_hexdigit())
            }
            Platform::Webhook => {
                (1..=256).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_graphic())
            }
        };
        if ok {
            Ok(())
        } else {
            Err(BadToken(self))
        }
    }
}

/// A token that is not of its platform's form; the text tells the client
/// what the form is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", match .0 {
    Platform::Fcm => "an fcm token is 1-4096 of A-Z a-z 0-9 _ : -",
    Platform::Apns => "an apns token is 64-200 hex digits",
    Platform::Webhook => "a webhook token is 1-256 printable ASCII characters, no spaces",
})]
pub struct BadToken(pub Platform);

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_roundtrip() {
        for platform in Platform::ALL {
            assert_eq!(Platform::parse(platform.as_str()), Some(platform));
        }
        assert_eq!(Platform::parse("sms"), None);
    }

    #[test]
    fn previews_are_bounded_and_cut_between_characters() {
        assert_eq!(preview("lunch?"), "lunch?");
        let exact = "x".repeat(PREVIEW_BYTES);
        assert_eq!(preview(&exact), exact);
        for text in ["é".repeat(2000), "😀".repeat(1000), "a".repeat(100_000)] {
            let cut = preview(&text);
            assert!(cut.len() <= PREVIEW_BYTES, "{}", cut.len());
            assert!(cut.ends_with('…'));
            assert!(text.starts_with(cut.trim_end_matches('…')));
        }
    }

    #[test]
    fn tokens_are_checked_per_platform() {
        assert!(Platform::Fcm.validate_token("dGVzdA:APA91b-x_y").is_ok());
        assert!(Platform::Fcm.validate_token("has space").is_err());
        assert!(Platform::Fcm.validate_token("").is_err());
        assert!(Platform::Apns.validate_token(&"ab".repeat(32)).is_ok());
        assert!(Platform::Apns.validate_token(&"zz".repeat(32)).is_err());
        assert!(Platform::Apns.validate_token("abcd").is_err());
        assert!(Platform::Webhook.validate_token("bot-7").is_ok());
        assert!(Platform::Webhook.validate_token("a b").is_err());
        assert!(Platform::Webhook.validate_token(&"x".repeat(257)).is_err());
    }
}
