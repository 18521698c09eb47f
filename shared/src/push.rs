//! Push notifications: the jobs the router emits for members' devices that
//! are not connected (and the retractions after a read or a delete), the
//! platforms a device may register, and per-platform token validation.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::{ConversationId, DeviceId, MessageId, UserId};

/// `chat.push.<user>` (stream PUSH, work queue): `message` reached `user`'s
/// inbox while some of their devices with a push token were not connected
/// (`devices`). Published with
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
    /// The devices to notify: those with a push token that were not
    /// connected. Absent: every token of the user (jobs from routers before
    /// per-device push, and users whose token devices are not known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceId>>,
    /// v1.1: the message names `user` in its `mentions`, so a mute does
    /// not hold the push back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mentioned: bool,
}

/// `chat.push.<user>` (stream PUSH, same work queue as [`PushJob`]): the
/// notification about `conversation` on `user`'s devices is out of date.
/// pushd sends each token of `devices` a data push with the
/// conversation as collapse id and the user's unread total as badge; the
/// app removes the notification if it shows a message the retraction
/// covers. Published with `Nats-Msg-Id` = [`crate::subjects::retract_dedup_id`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RetractJob {
    pub user: UserId,
    pub conversation: ConversationId,
    /// Why: `read` covers every message up to `up_to`, `delete` only the
    /// message `up_to`.
    pub retract: RetractReason,
    pub up_to: MessageId,
    /// The devices to tell: those with a token that are not connected
    /// (a connected one learns of the read or delete from its inbox).
    /// Absent: every token of the user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceId>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RetractReason {
    Read,
    Delete,
}

impl RetractReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RetractReason::Read => "read",
            RetractReason::Delete => "delete",
        }
    }
}

/// What a PUSH message carries. Told apart by shape (a retraction has
/// `retract`, a message job has `from`), so jobs from older routers still
/// decode as [`PushWork::Message`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum PushWork {
    Message(PushJob),
    Retract(RetractJob),
}

impl PushWork {
    pub fn user(&self) -> &UserId {
        match self {
            PushWork::Message(job) => &job.user,
            PushWork::Retract(job) => &job.user,
        }
    }
}

/// The push bucket's record of a user (key `user.<id>`): the devices that
/// hold a push token, written by the persister on each `push.register` and
/// `push.unregister`, read by the router so that deciding whom to push asks
/// no database. It may list a device whose token a provider has since
/// invalidated (pushd then finds no token for it); it never misses a
/// registered one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PushDevices {
    pub devices: Vec<DeviceId>,
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
    fn push_work_is_told_apart_by_shape() {
        let user = UserId::parse("bob").unwrap();
        let conversation = ConversationId::parse("dm:alice:bob").unwrap();
        // A job from a router before per-device push: no `devices`.
        let old = r#"{"user":"bob","conversation":"dm:alice:bob","id":"7","from":"alice","text":"hi","ts":1}"#;
        let PushWork::Message(job) = serde_json::from_str(old).unwrap() else {
            panic!("a message job decoded as a retraction");
        };
        assert_eq!(job.devices, None);
        let retract = PushWork::Retract(RetractJob {
            user: user.clone(),
            conversation,
            retract: RetractReason::Read,
            up_to: MessageId(7),
            devices: None,
        });
        let text = serde_json::to_string(&retract).unwrap();
        assert_eq!(
            text,
            r#"{"user":"bob","conversation":"dm:alice:bob","retract":"read","up_to":"7"}"#
        );
        assert_eq!(serde_json::from_str::<PushWork>(&text).unwrap(), retract);
        assert_eq!(retract.user(), &user);
        assert!(serde_json::from_str::<PushWork>(r#"{"user":"bob"}"#).is_err());
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
