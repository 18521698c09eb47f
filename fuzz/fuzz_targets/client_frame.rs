//! The edge's parse of an incoming text frame (`edge/src/session.rs`):
//! `serde_json::from_str::<ClientFrame>`, and on failure the `RefOnly` parse
//! that recovers the request's `ref` for the error reply.
//!
//! Invariants: neither parse panics; an accepted frame serializes, its
//! `type` is `kind()`, its `ref` is `reference()`, and the JSON parses back
//! to an equal frame that serializes to the same bytes.

#![no_main]

use chat_shared::wire::{ClientFrame, RefOnly};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A WebSocket text frame is UTF-8 by the time the edge sees it; bytes
    // that are not still go through `from_slice`, which must refuse them.
    let Ok(text) = std::str::from_utf8(data) else {
        assert!(serde_json::from_slice::<ClientFrame>(data).is_err());
        return;
    };
    let frame = match serde_json::from_str::<ClientFrame>(text) {
        Ok(frame) => frame,
        Err(_) => {
            let _ = serde_json::from_str::<RefOnly>(text)
                .ok()
                .and_then(|r| r.reference)
                .and_then(|r| r.as_str().map(str::to_string));
            return;
        }
    };
    assert_eq!(
        serde_json::from_slice::<ClientFrame>(data).ok().as_ref(),
        Some(&frame)
    );
    let json = serde_json::to_string(&frame).expect("an accepted frame serializes");
    let value: serde_json::Value = serde_json::from_str(&json).expect("our own JSON parses");
    assert_eq!(value["type"], frame.kind(), "{json}");
    assert_eq!(
        value.get("ref").and_then(|r| r.as_str()),
        frame.reference(),
        "{json}"
    );
    let again: ClientFrame = match serde_json::from_str(&json) {
        Ok(again) => again,
        Err(e) => panic!("{json} does not parse back: {e}"),
    };
    assert_eq!(again, frame, "{json}");
    assert_eq!(
        serde_json::to_string(&again).ok().as_deref(),
        Some(json.as_str())
    );
});
