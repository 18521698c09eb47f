//! Who a connection is and whether it may go on: the token of `hello` and
//! of each `refresh`, checked against operators' bans and revocations, and
//! what the client is told when it may not. Written against [`Gate`], so
//! the rules are tested without keys or NATS.

use chat_shared::auth::{AuthError, Identity};
use chat_shared::ids::UserId;
use chat_shared::wire::ErrorCode;

use crate::moderation::Refusal;
use crate::Edge;

/// What decides access: token verification and operators' moderation.
pub trait Gate {
    fn verify(&self, token: &str) -> Result<Identity, AuthError>;
    fn admits(&self, user: &UserId, issued_at: Option<u64>) -> Result<(), Refusal>;
}

impl Gate for Edge {
    fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.verifier.verify(token)
    }

    fn admits(&self, user: &UserId, issued_at: Option<u64>) -> Result<(), Refusal> {
        self.moderation.admits(user, issued_at)
    }
}

/// Why a token does not give access; the text is what the client is told.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("token expired")]
    Expired,
    /// The reason is logged, not told: it would help forge a token.
    #[error("invalid token")]
    Invalid(String),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("the token is for another user")]
    OtherUser,
}

/// Where a token is presented.
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    Hello,
    Refresh,
}

impl AccessError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Expired => ErrorCode::TokenExpired,
            Self::Invalid(_) | Self::Refused(_) | Self::OtherUser => ErrorCode::Unauthorized,
        }
    }

    /// The reason the connection closes with (4001), or `None` if it goes
    /// on: a `refresh` with a bad or expired token leaves the current one
    /// in force, while one for another user, a ban or a revocation ends it.
    pub fn closes(&self, stage: Stage) -> Option<&'static str> {
        match (self, stage) {
            (Self::Refused(refusal), _) => Some(refusal.reason()),
            (Self::Expired, Stage::Hello) => Some("token expired"),
            (Self::OtherUser, _) | (Self::Invalid(_), Stage::Hello) => Some("unauthorized"),
            (Self::Expired | Self::Invalid(_), Stage::Refresh) => None,
        }
    }
}

impl From<AuthError> for AccessError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Expired => Self::Expired,
            AuthError::Invalid(reason) => Self::Invalid(reason),
        }
    }
}

/// Who the token of `hello` says the connection is, if they may connect.
pub fn admit<G: Gate>(gate: &G, token: &str) -> Result<Identity, AccessError> {
    let identity = gate.verify(token)?;
    gate.admits(&identity.user, identity.issued_at)?;
    Ok(identity)
}

/// The identity a `refresh` token gives a connection of `user`: it must be
/// the same user, still admitted.
pub fn renew<G: Gate>(gate: &G, user: &UserId, token: &str) -> Result<Identity, AccessError> {
    let identity = gate.verify(token)?;
    if identity.user != *user {
        return Err(AccessError::OtherUser);
    }
    gate.admits(&identity.user, identity.issued_at)?;
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens are `<user>` (valid), `<user>@<iat>`, `expired` or anything
    /// else (invalid); `banned` is banned, and tokens issued before 100
    /// are revoked.
    struct FakeGate;

    impl Gate for FakeGate {
        fn verify(&self, token: &str) -> Result<Identity, AuthError> {
            if token == "expired" {
                return Err(AuthError::Expired);
            }
            let (user, issued_at) = match token.split_once('@') {
                Some((user, iat)) => (user, iat.parse().ok()),
                None => (token, None),
            };
            let user = UserId::parse(user).map_err(|e| AuthError::Invalid(e.to_string()))?;
            Ok(Identity {
                user,
                valid_until: 1_000,
                issued_at,
            })
        }

        fn admits(&self, user: &UserId, issued_at: Option<u64>) -> Result<(), Refusal> {
            if user.as_str() == "banned" {
                return Err(Refusal::Banned);
            }
            if issued_at.is_some_and(|iat| iat < 100) {
                return Err(Refusal::Revoked);
            }
            Ok(())
        }
    }

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn hello_admits_a_valid_token_of_a_user_in_good_standing() {
        let identity = admit(&FakeGate, "alice@150").map(|i| (i.user, i.issued_at));
        assert_eq!(identity, Ok((user("alice"), Some(150))));
    }

    #[test]
    fn every_refusal_at_hello_closes_the_connection() {
        for (token, error, reason) in [
            ("expired", AccessError::Expired, "token expired"),
            (
                "not a user!",
                AccessError::Invalid(String::new()),
                "unauthorized",
            ),
            ("banned", AccessError::Refused(Refusal::Banned), "banned"),
            (
                "alice@50",
                AccessError::Refused(Refusal::Revoked),
                "token revoked",
            ),
        ] {
            let Err(refused) = admit(&FakeGate, token) else {
                panic!("{token} admitted");
            };
            assert_eq!(
                std::mem::discriminant(&refused),
                std::mem::discriminant(&error),
                "{token}"
            );
            assert_eq!(refused.closes(Stage::Hello), Some(reason), "{token}");
        }
    }

    #[test]
    fn a_refresh_must_be_for_the_same_user() {
        let alice = user("alice");
        assert!(renew(&FakeGate, &alice, "alice@200").is_ok());
        let other = renew(&FakeGate, &alice, "bob");
        assert!(matches!(other, Err(AccessError::OtherUser)));
        assert_eq!(
            AccessError::OtherUser.closes(Stage::Refresh),
            Some("unauthorized")
        );
    }

    #[test]
    fn a_bad_refresh_leaves_the_current_token_in_force_but_a_ban_ends_it() {
        let alice = user("alice");
        assert!(matches!(
            renew(&FakeGate, &alice, "expired"),
            Err(AccessError::Expired)
        ));
        assert_eq!(AccessError::Expired.closes(Stage::Refresh), None);
        assert_eq!(
            AccessError::Invalid("x".into()).closes(Stage::Refresh),
            None
        );
        let revoked = renew(&FakeGate, &alice, "alice@10");
        let Err(revoked) = revoked else {
            panic!("a revoked token renewed the connection");
        };
        assert_eq!(revoked.closes(Stage::Refresh), Some("token revoked"));
    }

    #[test]
    fn the_client_is_told_the_code_and_not_why_a_token_is_invalid() {
        let invalid = AccessError::Invalid("bad signature".into());
        assert_eq!(invalid.code(), ErrorCode::Unauthorized);
        assert_eq!(invalid.to_string(), "invalid token");
        assert_eq!(AccessError::Expired.code(), ErrorCode::TokenExpired);
        assert_eq!(
            AccessError::Refused(Refusal::Banned).to_string(),
            "banned by an operator"
        );
    }
}
