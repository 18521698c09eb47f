//! Operators' moderation: what `chatctl user ban|unban|kick|revoke` writes
//! and every edge reads.
//!
//! The record of truth is the `chat_moderation` KV bucket (`ban.<user>`,
//! `revoke.<user>`), so bans and revocations survive restarts; a core-NATS
//! [`Notice`] on `chat.mod.<user>` makes every edge act at once, and each
//! action leaves one [`AuditEvent`] on the AUDIT stream. Times are seconds
//! since the epoch, the unit of a JWT's `iat` and `exp`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::UserId;

/// The value of `ban.<user>`: the user may not connect until `until`
/// (forever without it). A lifted ban is a deleted key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Ban {
    /// When the operator banned the user.
    pub at: u64,
    /// The first second the user is let in again; absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
}

impl Ban {
    /// Whether the ban still holds at `now`: a ban with an end expires by
    /// itself, no operator or write needed.
    pub fn holds_at(&self, now: u64) -> bool {
        self.until.is_none_or(|until| now < until)
    }
}

/// The value of `revoke.<user>`: every token of the user issued at or
/// before `at` is refused. Seconds are the JWT's unit, so a token issued in
/// the same second as the revocation is refused too (it cannot be told
/// apart from one issued just before); one issued a second later passes.
/// A token without `iat` cannot show it is newer and is refused while a
/// revocation exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Revocation {
    pub at: u64,
}

impl Revocation {
    /// Whether a token issued at `issued_at` (its `iat`) is revoked.
    pub fn revokes(&self, issued_at: Option<u64>) -> bool {
        issued_at.is_none_or(|iat| iat <= self.at)
    }
}

/// What `chat.mod.<user>` tells every edge. Ban and revoke carry the record
/// and its KV revision, so an edge applies them before its bucket watcher
/// sees the write (a client that reconnects at once is already refused)
/// and never lets an older notice undo a newer write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Notice {
    /// Close the user's sessions; they may connect again.
    Kick,
    Ban {
        revision: u64,
        ban: Ban,
    },
    Revoke {
        revision: u64,
        revocation: Revocation,
    },
}

/// The operator actions, as audit subjects and events name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Ban,
    Unban,
    Kick,
    Revoke,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ban => "ban",
            Self::Unban => "unban",
            Self::Kick => "kick",
            Self::Revoke => "revoke",
        }
    }
}

/// One operator action on the AUDIT stream (`chat.audit.<action>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AuditEvent {
    pub action: Action,
    /// The user acted on.
    pub user: UserId,
    /// The operator (`--operator`, else `$USER`).
    pub by: String,
    /// Why, as the operator wrote it (`--reason`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When, in seconds since the epoch.
    pub at: u64,
    /// A ban's end, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ban_with_an_end_expires_by_itself() {
        let ban = Ban {
            at: 100,
            until: Some(200),
        };
        assert!(ban.holds_at(199));
        assert!(!ban.holds_at(200));
        assert!(Ban {
            at: 100,
            until: None
        }
        .holds_at(u64::MAX));
    }

    #[test]
    fn a_revocation_refuses_tokens_up_to_its_second_and_those_without_iat() {
        let revocation = Revocation { at: 100 };
        assert!(revocation.revokes(Some(99)));
        assert!(revocation.revokes(Some(100)));
        assert!(!revocation.revokes(Some(101)));
        assert!(revocation.revokes(None));
    }

    #[test]
    fn notices_are_tagged_by_action() {
        let notice = Notice::Ban {
            revision: 7,
            ban: Ban { at: 1, until: None },
        };
        let json = serde_json::to_value(&notice).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"action":"ban","revision":7,"ban":{"at":1}})
        );
        assert_eq!(serde_json::from_value::<Notice>(json).unwrap(), notice);
        assert_eq!(
            serde_json::to_value(Notice::Kick).unwrap(),
            serde_json::json!({"action":"kick"})
        );
    }
}
