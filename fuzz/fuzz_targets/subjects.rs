//! The parsers of `chat_shared::subjects` on arbitrary subjects and keys.
//!
//! Invariants: they never panic, and whatever they accept is exactly what the
//! matching builder renders for the id they return (so a subject is read
//! back only in its one canonical form).

#![no_main]

use chat_shared::subjects;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let s: &str = &text;
    // The prefixes are tried too, so the fuzzer need not find them first.
    for candidate in [
        s.to_string(),
        format!("chat.msg.{s}"),
        format!("chat.msg.dm.{s}"),
        format!("chat.msg.group.{s}"),
    ] {
        if let Some(conversation) = subjects::parse_message(&candidate) {
            assert_eq!(subjects::message(&conversation), candidate);
        }
    }
    for candidate in [s.to_string(), format!("chat.event.group.{s}")] {
        if let Some(group) = subjects::parse_group_event(&candidate) {
            assert_eq!(subjects::group_event(&group), candidate);
        }
    }
    for candidate in [s.to_string(), format!("chat.typing.{s}")] {
        if let Some(user) = subjects::parse_typing(&candidate) {
            assert_eq!(subjects::typing(&user), candidate);
        }
    }
    for candidate in [s.to_string(), format!("user.{s}")] {
        if let Some(user) = subjects::parse_presence_key(&candidate) {
            assert_eq!(subjects::presence_key(&user), candidate);
        }
    }
});
