//! JSON Schemas of every wire type, written to `docs/schemas/`.
//!
//! `cargo test` fails when the committed files are stale; regenerate them
//! with `cargo run -p chatctl -- schemas docs/schemas`.

use schemars::schema_for;

use crate::wire;

/// (file name, pretty JSON) for every published schema.
pub fn all() -> Vec<(&'static str, String)> {
    let render = |schema: schemars::Schema| {
        let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
        text.push('\n');
        text
    };
    vec![
        ("client-frame.json", render(schema_for!(wire::ClientFrame))),
        ("server-frame.json", render(schema_for!(wire::ServerFrame))),
        (
            "message-event.json",
            render(schema_for!(wire::MessageEvent)),
        ),
        ("change-event.json", render(schema_for!(wire::ChangeEvent))),
        (
            "presence-event.json",
            render(schema_for!(wire::PresenceEvent)),
        ),
        ("group-event.json", render(schema_for!(wire::GroupEvent))),
        (
            "delivered-event.json",
            render(schema_for!(crate::receipts::DeliveredEvent)),
        ),
        (
            "read-event.json",
            render(schema_for!(crate::receipts::ReadEvent)),
        ),
        ("push-job.json", render(schema_for!(crate::push::PushJob))),
        ("push-work.json", render(schema_for!(crate::push::PushWork))),
        (
            "push-devices.json",
            render(schema_for!(crate::push::PushDevices)),
        ),
        (
            "device-event.json",
            render(schema_for!(crate::presence::DeviceEvent)),
        ),
        (
            "edge-heartbeat.json",
            render(schema_for!(crate::presence::EdgeHeartbeat)),
        ),
        (
            "typing-event.json",
            render(schema_for!(crate::presence::TypingEvent)),
        ),
        (
            "presence-record.json",
            render(schema_for!(crate::presence::PresenceRecord)),
        ),
        (
            "friend-change.json",
            render(schema_for!(crate::presence::FriendChange)),
        ),
        (
            "moderation-notice.json",
            render(schema_for!(crate::moderation::Notice)),
        ),
        (
            "audit-event.json",
            render(schema_for!(crate::moderation::AuditEvent)),
        ),
    ]
}

/// Writes every schema into `dir`.
pub fn write_all(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, text) in all() {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_schemas_are_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/schemas");
        for (name, text) in super::all() {
            let committed = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
            assert!(
                committed == text,
                "docs/schemas/{name} is stale: run `cargo run -p chatctl -- schemas docs/schemas`"
            );
        }
    }
}
