//! `MessageId::parse` and `Cursor::parse`, directly and through serde.
//!
//! Invariants: a string is accepted exactly when it is non-empty, all ASCII
//! digits and its value fits in a u64 (checked against an independent
//! computation); the value's decimal form parses back equal, and a string
//! without leading zeros is re-rendered unchanged; the JSON string form
//! agrees with `parse`, and JSON numbers are refused.

#![no_main]

use chat_shared::ids::{Cursor, MessageId};
use libfuzzer_sys::fuzz_target;

/// The value of a decimal string, computed without `str::parse`.
fn oracle(s: &str) -> Option<u64> {
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

fn is_canonical(s: &str) -> bool {
    s == "0" || !s.starts_with('0')
}

macro_rules! check {
    ($ty:ty, $s:expr) => {{
        let s: &str = $s;
        let parsed = <$ty>::parse(s);
        assert_eq!(parsed.as_ref().ok().map(|id| id.get()), oracle(s), "{s:?}");
        let json = serde_json::to_string(s).expect("a str serializes");
        let via_serde = serde_json::from_str::<$ty>(&json);
        assert_eq!(via_serde.ok(), parsed.clone().ok(), "{json}");
        if let Ok(id) = parsed {
            let rendered = id.to_string();
            assert_eq!(<$ty>::parse(&rendered).ok(), Some(id), "{s:?}");
            if is_canonical(s) {
                assert_eq!(rendered, s);
            }
            let json = serde_json::to_string(&id).expect("an id serializes");
            assert_eq!(json, format!("\"{rendered}\""));
            assert_eq!(serde_json::from_str::<$ty>(&json).ok(), Some(id));
            assert!(
                serde_json::from_str::<$ty>(&rendered).is_err(),
                "number {rendered} accepted"
            );
        }
    }};
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    check!(MessageId, &s);
    check!(Cursor, &s);
});
