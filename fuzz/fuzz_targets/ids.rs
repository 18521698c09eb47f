//! Every id parser of `chat_shared::ids` (and the two small ones beside
//! them: push platforms and trace ids) on the same arbitrary string.
//!
//! Invariants, for each parser:
//! - it never panics, and accepts exactly what its documented alphabet allows
//!   (checked against an independent predicate);
//! - an accepted id renders to the same string, parses back equal, and serde
//!   (JSON string) agrees with `parse` in both directions;
//! - an accepted id in every subject/key builder gives a subject with no `*`,
//!   `>`, whitespace or empty token and the expected token count, which the
//!   matching `subjects::parse_*` reads back to the same id.
//!
//! The input is also split at its first NUL into two user ids for
//! `ConversationId::dm`.

#![no_main]

use std::fmt::Debug;

use chat_shared::ids::{ClientMsgId, ConversationId, DeviceId, EdgeId, GroupId, InvalidId, UserId};
use chat_shared::push::Platform;
use chat_shared::subjects;
use chat_shared::telemetry::TraceId;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// `[A-Za-z0-9_-]{1,64}`, written independently of `ids::check_name`.
fn is_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.chars()
            .all(|c| matches!(c, 'A'..='Z' | 'a'..='z' | '0'..='9' | '_' | '-'))
}

/// A NATS subject (or KV key) of exactly `tokens` literal tokens.
fn assert_subject(subject: &str, tokens: usize) {
    assert!(
        !subject.contains(['*', '>']) && !subject.chars().any(char::is_whitespace),
        "{subject:?} has a wildcard or whitespace"
    );
    let parts: Vec<&str> = subject.split('.').collect();
    assert_eq!(parts.len(), tokens, "{subject:?}");
    assert!(
        parts.iter().all(|t| !t.is_empty()),
        "{subject:?} has an empty token"
    );
}

/// Serde agrees with `parse` on `s`, and an accepted id round-trips as JSON.
fn assert_serde<T>(s: &str, parsed: &Result<T, InvalidId>)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug + ToString,
{
    let json = serde_json::to_string(s).expect("a str serializes");
    let via_serde = serde_json::from_str::<T>(&json);
    assert_eq!(via_serde.as_ref().ok(), parsed.as_ref().ok(), "{json}");
    if let Ok(id) = parsed {
        let rendered = id.to_string();
        assert_eq!(rendered, s);
        let out = serde_json::to_string(id).expect("an id serializes");
        assert_eq!(out, json);
        assert_eq!(serde_json::from_str::<T>(&out).ok().as_ref(), Some(id));
    }
}

macro_rules! name_id {
    ($ty:ty, $s:expr) => {{
        let s: &str = $s;
        let parsed = <$ty>::parse(s);
        assert_eq!(parsed.is_ok(), is_name(s), "{s:?}");
        assert_serde(s, &parsed);
        if let Ok(id) = &parsed {
            assert_eq!(id.as_str(), s);
            assert_eq!(<$ty>::parse(id.as_str()).as_ref(), Ok(id));
        }
        parsed.ok()
    }};
}

fn check_user(user: &UserId) {
    for (subject, tokens) in [
        (subjects::inbox(user), 3),
        (subjects::deliver(user), 3),
        (subjects::push(user), 3),
        (subjects::presence(user), 3),
        (subjects::typing(user), 3),
        (subjects::presence_key(user), 2),
    ] {
        assert_subject(&subject, tokens);
    }
    assert_eq!(
        subjects::parse_typing(&subjects::typing(user)).as_ref(),
        Some(user)
    );
    assert_eq!(
        subjects::parse_presence_key(&subjects::presence_key(user)).as_ref(),
        Some(user)
    );
}

fn check_conversation(conversation: &ConversationId) {
    let subject = subjects::message(conversation);
    match conversation {
        ConversationId::Dm { low, high } => {
            assert!(low < high);
            assert!(conversation.is_dm_party(low) && conversation.is_dm_party(high));
            assert_subject(&subject, 5);
        }
        ConversationId::Group(_) => assert_subject(&subject, 4),
    }
    assert_eq!(
        subjects::parse_message(&subject).as_ref(),
        Some(conversation)
    );
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let s: &str = &text;

    let user = name_id!(UserId, s);
    let device = name_id!(DeviceId, s);
    let group = name_id!(GroupId, s);
    let edge = name_id!(EdgeId, s);
    // One alphabet for all four.
    assert!(user.is_some() == device.is_some() && user.is_some() == group.is_some());
    assert_eq!(user.is_some(), edge.is_some());
    if let (Some(user), Some(device)) = (&user, &device) {
        check_user(user);
        assert_subject(&subjects::device_cursor_key(user, device), 2);
    }
    if let Some(group) = &group {
        let subject = subjects::group_event(group);
        assert_subject(&subject, 4);
        assert_eq!(subjects::parse_group_event(&subject).as_ref(), Some(group));
        check_conversation(&ConversationId::Group(group.clone()));
    }
    if let Some(edge) = &edge {
        assert_subject(&subjects::edge_drain(edge), 4);
    }

    // Conversation ids: `dm:<a>:<b>` with a < b, or `group:<id>`.
    let conversation = ConversationId::parse(s);
    let expected = match (s.strip_prefix("dm:"), s.strip_prefix("group:")) {
        (Some(pair), _) => pair
            .split_once(':')
            .is_some_and(|(a, b)| is_name(a) && is_name(b) && a < b),
        (None, Some(g)) => is_name(g),
        (None, None) => false,
    };
    assert_eq!(conversation.is_ok(), expected, "{s:?}");
    assert_serde(s, &conversation);
    if let Ok(conversation) = &conversation {
        check_conversation(conversation);
    }

    // The DM of two users: the input split at its first NUL.
    if let Some((a, b)) = s.split_once('\0') {
        if let (Ok(a), Ok(b)) = (UserId::parse(a), UserId::parse(b)) {
            match ConversationId::dm(a.clone(), b.clone()) {
                Ok(dm) => {
                    assert_ne!(a, b);
                    assert_eq!(ConversationId::dm(b, a).as_ref(), Ok(&dm));
                    assert_eq!(ConversationId::parse(&dm.to_string()).as_ref(), Ok(&dm));
                    check_conversation(&dm);
                }
                Err(_) => assert_eq!(a, b),
            }
        }
    }

    // Client message ids: 1-64 characters, none of them a control character.
    let chars = s.chars().count();
    let cmid = ClientMsgId::parse(s);
    assert_eq!(
        cmid.is_ok(),
        (1..=64).contains(&chars) && !s.chars().any(char::is_control),
        "{s:?}"
    );
    assert_serde(s, &cmid);
    if let Ok(cmid) = &cmid {
        assert_eq!(cmid.as_str(), s);
        let hex = cmid.hex();
        assert_eq!(hex.len(), 2 * s.len());
        assert!(hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        let sender = UserId::parse("sender").expect("a valid id");
        assert_subject(&subjects::sent_key(&sender, cmid), 2);
        assert_eq!(
            subjects::send_dedup_id(&sender, cmid),
            format!("sender:{s}")
        );
    }

    // Push platforms and trace ids.
    if let Some(platform) = Platform::parse(s) {
        assert_eq!(platform.as_str(), s);
    }
    let trace = TraceId::parse(s);
    assert_eq!(
        trace.is_some(),
        s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()),
        "{s:?}"
    );
    if let Some(trace) = trace {
        assert_eq!(trace.to_string(), s.to_ascii_lowercase());
    }
});
