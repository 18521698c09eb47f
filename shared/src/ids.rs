//! Validated identifiers.
//!
//! Every id that can reach a NATS subject, a KV key or an SQL query is one of
//! these newtypes, and `parse` (or serde, which calls it) is the only way to
//! build one. The character set `[A-Za-z0-9_-]` contains neither `.` (the NATS
//! token separator) nor `*`/`>` (wildcards) nor whitespace, so a validated id
//! can never change the shape of a subject.

use std::borrow::Cow;
use std::fmt;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why an id was refused. The message is safe to show to a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {reason}")]
pub struct InvalidId {
    pub kind: &'static str,
    pub reason: &'static str,
}

const MAX_NAME_LEN: usize = 64;
const NAME_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";

fn check_name(kind: &'static str, value: &str) -> Result<(), InvalidId> {
    if value.is_empty() {
        return Err(InvalidId {
            kind,
            reason: "must not be empty",
        });
    }
    if value.len() > MAX_NAME_LEN {
        return Err(InvalidId {
            kind,
            reason: "longer than 64 characters",
        });
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(InvalidId {
            kind,
            reason: "only A-Z, a-z, 0-9, '_' and '-' are allowed",
        });
    }
    Ok(())
}

/// What every id made of one checked string has: `as_str`, `Display`, and
/// serde through its `parse` (a bad id is refused while deserializing).
macro_rules! string_id {
    ($name:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Self::parse(String::deserialize(d)?).map_err(serde::de::Error::custom)
            }
        }
    };
}

/// Defines a `[A-Za-z0-9_-]{1,64}` id newtype with parsing, serde and schema.
macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: impl Into<String>) -> Result<Self, InvalidId> {
                let value = value.into();
                check_name($kind, &value)?;
                Ok(Self(value))
            }
        }

        string_id!($name);

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({ "type": "string", "pattern": NAME_PATTERN })
            }
        }
    };
}

name_id!(
    /// A user id; it is the JWT `sub`.
    UserId,
    "user id"
);
name_id!(
    /// A device id chosen by the client (`phone-1`).
    DeviceId,
    "device id"
);
name_id!(
    /// The id part of a `group:<id>` conversation.
    GroupId,
    "group id"
);
name_id!(
    /// An edge node's id, as it appears in `welcome` and in discovery.
    EdgeId,
    "edge id"
);

/// A conversation: a direct chat between two users or a group.
///
/// A DM always stores its two users in byte order, so `dm:alice:bob` and the
/// pair (bob, alice) are the same value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConversationId {
    Dm { low: UserId, high: UserId },
    Group(GroupId),
}

impl ConversationId {
    /// The DM between two different users.
    pub fn dm(a: UserId, b: UserId) -> Result<Self, InvalidId> {
        match a.cmp(&b) {
            std::cmp::Ordering::Less => Ok(Self::Dm { low: a, high: b }),
            std::cmp::Ordering::Greater => Ok(Self::Dm { low: b, high: a }),
            std::cmp::Ordering::Equal => Err(InvalidId {
                kind: "conversation id",
                reason: "a direct conversation needs two different users",
            }),
        }
    }

    pub fn parse(value: &str) -> Result<Self, InvalidId> {
        const KIND: &str = "conversation id";
        if let Some(rest) = value.strip_prefix("dm:") {
            let Some((a, b)) = rest.split_once(':') else {
                return Err(InvalidId {
                    kind: KIND,
                    reason: "expected dm:<a>:<b>",
                });
            };
            let low = UserId::parse(a)?;
            let high = UserId::parse(b)?;
            if low >= high {
                return Err(InvalidId {
                    kind: KIND,
                    reason: "dm:<a>:<b> needs a < b in byte order",
                });
            }
            Ok(Self::Dm { low, high })
        } else if let Some(rest) = value.strip_prefix("group:") {
            Ok(Self::Group(GroupId::parse(rest)?))
        } else {
            Err(InvalidId {
                kind: KIND,
                reason: "expected dm:<a>:<b> or group:<id>",
            })
        }
    }

    /// Whether `user` is one of the two sides of a DM (always false for groups).
    pub fn is_dm_party(&self, user: &UserId) -> bool {
        matches!(self, Self::Dm { low, high } if low == user || high == user)
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dm { low, high } => write!(f, "dm:{low}:{high}"),
            Self::Group(group) => write!(f, "group:{group}"),
        }
    }
}

impl Serialize for ConversationId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConversationId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Cow::<str>::deserialize(d)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for ConversationId {
    fn schema_name() -> Cow<'static, str> {
        "ConversationId".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^(dm:[A-Za-z0-9_-]{1,64}:[A-Za-z0-9_-]{1,64}|group:[A-Za-z0-9_-]{1,64})$"
        })
    }
}

/// Defines a u64 newtype that travels as a decimal JSON string.
macro_rules! decimal_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl $name {
            pub fn parse(value: &str) -> Result<Self, InvalidId> {
                // `u64::from_str` accepts a leading '+', which is not a decimal string.
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(InvalidId { kind: $kind, reason: "expected a decimal string" });
                }
                value
                    .parse()
                    .map(Self)
                    .map_err(|_| InvalidId { kind: $kind, reason: "does not fit in 64 bits" })
            }

            pub fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = Cow::<str>::deserialize(d)?;
                Self::parse(&raw).map_err(serde::de::Error::custom)
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({ "type": "string", "pattern": "^[0-9]{1,20}$" })
            }
        }
    };
}

decimal_id!(
    /// A message id: unique, and larger for later messages of a conversation.
    MessageId,
    "message id"
);
decimal_id!(
    /// A position in one user's inbox. It is the INBOX stream sequence of the
    /// item, so it only grows; clients treat it as opaque.
    Cursor,
    "cursor"
);

/// The client's idempotency key for `send`: 1-64 characters, no control
/// characters (it travels inside the `Nats-Msg-Id` header).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientMsgId(String);

impl ClientMsgId {
    pub fn parse(value: impl Into<String>) -> Result<Self, InvalidId> {
        const KIND: &str = "client_msg_id";
        let value = value.into();
        let chars = value.chars().count();
        if chars == 0 {
            return Err(InvalidId {
                kind: KIND,
                reason: "must not be empty",
            });
        }
        if chars > MAX_NAME_LEN {
            return Err(InvalidId {
                kind: KIND,
                reason: "longer than 64 characters",
            });
        }
        if value.chars().any(char::is_control) {
            return Err(InvalidId {
                kind: KIND,
                reason: "control characters are not allowed",
            });
        }
        Ok(Self(value))
    }

    /// A form of the id made only of `[0-9a-f]`, fit for a KV key.
    pub fn hex(&self) -> String {
        crate::hex::encode(&self.0)
    }
}

string_id!(ClientMsgId);

impl JsonSchema for ClientMsgId {
    fn schema_name() -> Cow<'static, str> {
        "ClientMsgId".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "minLength": 1, "maxLength": 64 })
    }
}

/// A media object's id: the SHA-256 of its bytes as 64 lowercase hex
/// digits, so the same bytes uploaded twice are one object (and the id is
/// the download's `ETag`). Hex has no `.`, `*` or `>`: it is safe in an
/// object name and a subject.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MediaId(String);

/// Hex digits in a [`MediaId`].
const MEDIA_ID_LEN: usize = 64;

impl MediaId {
    pub fn parse(value: impl Into<String>) -> Result<Self, InvalidId> {
        let value = value.into();
        if value.len() != MEDIA_ID_LEN
            || !value
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(InvalidId {
                kind: "media id",
                reason: "expected 64 lowercase hex digits (a SHA-256)",
            });
        }
        Ok(Self(value))
    }

    /// The id of the bytes whose SHA-256 is `digest`.
    pub fn of_digest(digest: &[u8; 32]) -> Self {
        Self(crate::hex::encode(digest))
    }
}

string_id!(MediaId);

impl JsonSchema for MediaId {
    fn schema_name() -> Cow<'static, str> {
        "MediaId".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "pattern": "^[0-9a-f]{64}$" })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn media_ids_are_sha256_hex() {
        let id = MediaId::of_digest(&[0xab; 32]);
        assert_eq!(id.as_str(), "ab".repeat(32));
        assert_eq!(
            MediaId::parse(id.as_str()).map(|m| m.0),
            Ok("ab".repeat(32))
        );
        for bad in [
            "",
            "AB",
            &"AB".repeat(32),
            &"a".repeat(63),
            &"g".repeat(64),
            "../x",
        ] {
            assert!(MediaId::parse(bad).is_err(), "{bad}");
        }
    }
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_accept_the_documented_alphabet() {
        assert!(UserId::parse("alice").is_ok());
        assert!(UserId::parse("A-z_09").is_ok());
        assert!(UserId::parse("x".repeat(64)).is_ok());
    }

    #[test]
    fn names_refuse_subject_and_sql_metacharacters() {
        for bad in [
            "", "a.b", "a*", ">", "a b", "a\tb", "a'b", "a;b", "al\u{e9}", "a:b", "a/b", "a\nb",
        ] {
            assert!(UserId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(UserId::parse("x".repeat(65)).is_err());
    }

    #[test]
    fn dm_conversations_are_ordered_pairs() {
        let alice = UserId::parse("alice").unwrap();
        let bob = UserId::parse("bob").unwrap();
        let conv = ConversationId::dm(bob.clone(), alice.clone()).unwrap();
        assert_eq!(conv.to_string(), "dm:alice:bob");
        assert_eq!(ConversationId::parse("dm:alice:bob").unwrap(), conv);
        assert!(ConversationId::parse("dm:bob:alice").is_err());
        assert!(ConversationId::parse("dm:alice:alice").is_err());
        assert!(ConversationId::dm(alice.clone(), alice.clone()).is_err());
        assert!(conv.is_dm_party(&bob));
    }

    #[test]
    fn conversation_ids_refuse_malformed_input() {
        for bad in [
            "",
            "dm:",
            "dm:a",
            "dm:a:b:c",
            "group:",
            "group:a.b",
            "chan:x",
            "dm:a:>",
        ] {
            assert!(ConversationId::parse(bad).is_err(), "{bad:?} accepted");
        }
        let group = ConversationId::parse("group:team-1").unwrap();
        assert_eq!(group.to_string(), "group:team-1");
    }

    #[test]
    fn decimal_ids_travel_as_strings() {
        let id: MessageId = serde_json::from_str("\"18446744073709551615\"").unwrap();
        assert_eq!(id.get(), u64::MAX);
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"18446744073709551615\""
        );
        for bad in [
            "\"\"",
            "\"+1\"",
            "\"-1\"",
            "\"1.0\"",
            "\"18446744073709551616\"",
            "12",
        ] {
            assert!(
                serde_json::from_str::<MessageId>(bad).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn client_msg_ids_allow_unicode_but_not_control_characters() {
        assert!(ClientMsgId::parse("✓".repeat(64)).is_ok());
        assert!(ClientMsgId::parse("✓".repeat(65)).is_err());
        assert!(ClientMsgId::parse("a\r\nb").is_err());
        assert_eq!(ClientMsgId::parse("a.b").unwrap().hex(), "612e62");
    }

    proptest! {
        #[test]
        fn parsed_names_never_contain_subject_metacharacters(s in "\\PC{0,80}") {
            if let Ok(id) = UserId::parse(s) {
                prop_assert!(!id.as_str().contains(['.', '*', '>', ' ']));
            }
        }

        #[test]
        fn conversation_ids_roundtrip(a in "[A-Za-z0-9_-]{1,64}", b in "[A-Za-z0-9_-]{1,64}") {
            let (a, b) = (UserId::parse(a).unwrap(), UserId::parse(b).unwrap());
            if a != b {
                let conv = ConversationId::dm(a, b).unwrap();
                prop_assert_eq!(ConversationId::parse(&conv.to_string()).unwrap(), conv);
            }
        }
    }

    /// `[A-Za-z0-9_-]{1,64}`, written independently of `check_name`.
    fn is_name(s: &str) -> bool {
        (1..=64).contains(&s.len())
            && s.chars()
                .all(|c| matches!(c, 'A'..='Z' | 'a'..='z' | '0'..='9' | '_' | '-'))
    }

    /// Strings near and far from the name alphabet.
    fn name_like() -> impl Strategy<Value = String> {
        prop_oneof![
            "[A-Za-z0-9_-]{0,70}",
            "[A-Za-z0-9_.*> :\t\n-]{0,12}",
            "\\PC{0,80}",
            any::<String>(),
        ]
    }

    /// Parses `s` as every name id; each agrees with the alphabet, and an
    /// accepted one renders to `s`, parses back equal and round-trips as JSON.
    fn check_name_ids(s: &str) -> Result<(), TestCaseError> {
        macro_rules! check {
            ($ty:ty) => {{
                let parsed = <$ty>::parse(s);
                prop_assert_eq!(parsed.is_ok(), is_name(s), "{} {:?}", stringify!($ty), s);
                let json = serde_json::to_string(s).unwrap();
                prop_assert_eq!(serde_json::from_str::<$ty>(&json).ok(), parsed.clone().ok());
                if let Ok(id) = parsed {
                    prop_assert_eq!(id.as_str(), s);
                    prop_assert_eq!(id.to_string(), s);
                    prop_assert_eq!(<$ty>::parse(id.as_str()), Ok(id.clone()));
                    prop_assert_eq!(serde_json::to_string(&id).unwrap(), json);
                }
            }};
        }
        check!(UserId);
        check!(DeviceId);
        check!(GroupId);
        check!(EdgeId);
        Ok(())
    }

    /// The value of a decimal string, computed without `str::parse`.
    fn decimal_value(s: &str) -> Option<u64> {
        if s.is_empty() {
            return None;
        }
        s.bytes().try_fold(0u64, |acc, b| {
            if !b.is_ascii_digit() {
                return None;
            }
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        })
    }

    proptest! {
        #[test]
        fn name_ids_accept_exactly_their_alphabet_and_roundtrip(s in name_like()) {
            check_name_ids(&s)?;
        }

        #[test]
        fn generated_name_ids_always_parse(s in "[A-Za-z0-9_-]{1,64}") {
            prop_assert!(is_name(&s));
            check_name_ids(&s)?;
        }

        #[test]
        fn conversation_ids_never_panic_and_accepted_ones_roundtrip(
            s in prop_oneof![
                "dm:[a-c0-9_.:>*-]{0,12}",
                "group:[A-Za-z0-9_.> -]{0,12}",
                "(dm|group|chan)?:?\\PC{0,20}",
                any::<String>(),
            ]
        ) {
            let parsed = ConversationId::parse(&s);
            let json = serde_json::to_string(&s).unwrap();
            prop_assert_eq!(serde_json::from_str::<ConversationId>(&json).ok(), parsed.clone().ok());
            if let Ok(conv) = parsed {
                // Only the canonical form is accepted: it renders back unchanged.
                prop_assert_eq!(conv.to_string(), s.clone());
                prop_assert_eq!(ConversationId::parse(&conv.to_string()), Ok(conv.clone()));
                prop_assert_eq!(serde_json::to_string(&conv).unwrap(), json);
                if let ConversationId::Dm { low, high } = &conv {
                    prop_assert!(low < high);
                }
            }
        }

        #[test]
        fn generated_conversation_ids_always_parse(
            a in "[A-Za-z0-9_-]{1,64}",
            b in "[A-Za-z0-9_-]{1,64}",
        ) {
            let group = ConversationId::parse(&format!("group:{a}")).unwrap();
            prop_assert_eq!(group, ConversationId::Group(GroupId::parse(a.clone()).unwrap()));
            let (low, high) = if a < b { (&a, &b) } else { (&b, &a) };
            let dm = ConversationId::parse(&format!("dm:{low}:{high}"));
            prop_assert_eq!(dm.is_ok(), a != b);
        }

        #[test]
        fn decimal_ids_never_panic_and_accepted_ones_roundtrip(
            s in prop_oneof!["[0-9]{0,22}", "[0-9+ .e-]{0,6}", "\\PC{0,24}", any::<String>()]
        ) {
            let expected = decimal_value(&s);
            let message = MessageId::parse(&s);
            let cursor = Cursor::parse(&s);
            prop_assert_eq!(message.as_ref().ok().map(|id| id.get()), expected);
            prop_assert_eq!(cursor.as_ref().ok().map(|id| id.get()), expected);
            let json = serde_json::to_string(&s).unwrap();
            prop_assert_eq!(serde_json::from_str::<MessageId>(&json).ok(), message.clone().ok());
            prop_assert_eq!(serde_json::from_str::<Cursor>(&json).ok(), cursor.clone().ok());
            if let (Ok(message), Ok(cursor)) = (message, cursor) {
                prop_assert_eq!(MessageId::parse(&message.to_string()), Ok(message));
                prop_assert_eq!(Cursor::parse(&cursor.to_string()), Ok(cursor));
                if s == "0" || !s.starts_with('0') {
                    prop_assert_eq!(message.to_string(), s.clone());
                }
            }
        }

        #[test]
        fn generated_decimal_ids_always_parse(n in any::<u64>()) {
            let text = n.to_string();
            prop_assert_eq!(MessageId::parse(&text), Ok(MessageId(n)));
            prop_assert_eq!(Cursor::parse(&text), Ok(Cursor(n)));
            let json = serde_json::to_string(&MessageId(n)).unwrap();
            prop_assert_eq!(&json, &format!("\"{text}\""));
            prop_assert_eq!(serde_json::from_str::<MessageId>(&json).unwrap(), MessageId(n));
            prop_assert_eq!(serde_json::from_str::<Cursor>(&json).unwrap(), Cursor(n));
        }

        #[test]
        fn client_msg_ids_never_panic_and_accepted_ones_roundtrip(
            s in prop_oneof!["\\PC{0,70}", "[a-z\r\n\t\u{0}\u{7f} ]{0,8}", any::<String>()]
        ) {
            let chars = s.chars().count();
            let parsed = ClientMsgId::parse(s.clone());
            prop_assert_eq!(
                parsed.is_ok(),
                (1..=64).contains(&chars) && !s.chars().any(char::is_control)
            );
            let json = serde_json::to_string(&s).unwrap();
            prop_assert_eq!(serde_json::from_str::<ClientMsgId>(&json).ok(), parsed.clone().ok());
            if let Ok(id) = parsed {
                prop_assert_eq!(id.as_str(), s.as_str());
                prop_assert_eq!(ClientMsgId::parse(id.to_string()), Ok(id.clone()));
                let hex = id.hex();
                prop_assert_eq!(hex.len(), 2 * s.len());
                prop_assert!(hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
            }
        }

        #[test]
        fn generated_client_msg_ids_always_parse(s in "\\PC{1,64}") {
            prop_assert_eq!(ClientMsgId::parse(s.clone()).map(|id| id.to_string()), Ok(s));
        }
    }
}
