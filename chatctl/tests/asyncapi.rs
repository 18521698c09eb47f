//! `docs/asyncapi.yaml` has the AsyncAPI 3 shape, its references resolve, and
//! it describes every frame type of the wire enums, so it cannot silently
//! fall behind `shared/src/wire.rs`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

fn document() -> Value {
    let path = docs().join("asyncapi.yaml");
    let text = std::fs::read_to_string(&path).expect("docs/asyncapi.yaml is readable");
    serde_norway::from_str(&text).expect("docs/asyncapi.yaml is valid YAML")
}

/// The `type` of every variant of a generated frame schema
/// (`client-frame.json` or `server-frame.json`), straight from the Rust enum.
fn frame_types(schema_file: &str) -> BTreeSet<String> {
    let (_, text) = chat_shared::schema::all()
        .into_iter()
        .find(|(name, _)| *name == schema_file)
        .expect("a generated schema");
    let schema: Value = serde_json::from_str(&text).expect("generated JSON");
    schema["oneOf"]
        .as_array()
        .expect("a tagged enum is a oneOf")
        .iter()
        .map(|variant| {
            variant["properties"]["type"]["const"]
                .as_str()
                .expect("every variant has a constant type")
                .to_string()
        })
        .collect()
}

/// Follows a local `#/a/b` reference.
fn resolve<'a>(document: &'a Value, reference: &str) -> Option<&'a Value> {
    document.pointer(reference.strip_prefix('#')?)
}

fn reference(value: &Value) -> &str {
    value["$ref"].as_str().unwrap_or_default()
}

/// Every `$ref` anywhere under `value`.
fn references(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                match (key.as_str(), item) {
                    ("$ref", Value::String(target)) => out.push(target.clone()),
                    _ => references(item, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| references(item, out)),
        _ => {}
    }
}

#[test]
fn it_has_the_asyncapi_3_structure() {
    let document = document();
    assert!(document["asyncapi"]
        .as_str()
        .is_some_and(|v| v.starts_with("3.")));
    assert!(document["info"]["title"].is_string());
    assert!(document["info"]["version"].is_string());
    let channels = document["channels"].as_object().expect("channels");
    let operations = document["operations"].as_object().expect("operations");
    assert!(document["components"]["messages"].is_object());
    for (name, channel) in channels {
        assert!(channel["address"].is_string(), "channel {name}");
        for (key, message) in channel["messages"].as_object().expect("messages") {
            assert!(
                resolve(&document, reference(message)).is_some(),
                "channel {name} message {key}"
            );
        }
        // Every `{parameter}` of an address is declared, and nothing else.
        let address = channel["address"].as_str().unwrap_or_default();
        let used: BTreeSet<&str> = address
            .split('{')
            .skip(1)
            .filter_map(|rest| rest.split_once('}').map(|(p, _)| p))
            .collect();
        let declared: BTreeSet<&str> = channel["parameters"]
            .as_object()
            .map(|p| p.keys().map(String::as_str).collect())
            .unwrap_or_default();
        assert_eq!(used, declared, "channel {name}");
    }
    for (name, operation) in operations {
        let action = operation["action"].as_str();
        assert!(
            matches!(action, Some("send" | "receive")),
            "operation {name}"
        );
        let channel = reference(&operation["channel"]);
        assert!(resolve(&document, channel).is_some(), "operation {name}");
        let replies = operation["reply"]["messages"]
            .as_array()
            .into_iter()
            .flatten();
        for message in operation["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .chain(replies)
        {
            let target = reference(message);
            assert!(
                target.starts_with("#/channels/") && resolve(&document, target).is_some(),
                "operation {name}: {target}"
            );
        }
        // An operation's own messages belong to its channel.
        for message in operation["messages"].as_array().into_iter().flatten() {
            assert!(
                reference(message).starts_with(&format!("{channel}/messages/")),
                "operation {name}"
            );
        }
    }
}

#[test]
fn every_reference_resolves() {
    let document = document();
    let mut targets = Vec::new();
    references(&document, &mut targets);
    assert!(!targets.is_empty());
    for target in targets {
        if let Some(local) = target.strip_prefix('#') {
            assert!(document.pointer(local).is_some(), "{target}");
        } else {
            let (file, pointer) = target.split_once('#').unwrap_or((&target, ""));
            let path = docs().join(file);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{target}: {}: {e}", path.display()));
            let schema: Value = serde_json::from_str(&text).expect("a JSON schema");
            assert!(schema.pointer(pointer).is_some(), "{target}");
        }
    }
}

/// The frame messages of one side: (type constant, component name), from the
/// payloads that constrain `schema_file` to one `type`.
fn documented_frames(document: &Value, schema_file: &str) -> Vec<(String, String)> {
    let messages = document["components"]["messages"]
        .as_object()
        .expect("component messages");
    messages
        .iter()
        .filter_map(|(name, message)| {
            let parts = message["payload"]["allOf"].as_array()?;
            let frame_schema = parts
                .iter()
                .any(|part| reference(part) == format!("./schemas/{schema_file}"));
            let constant = parts
                .iter()
                .find_map(|part| part["properties"]["type"]["const"].as_str())?;
            frame_schema.then(|| (constant.to_string(), name.clone()))
        })
        .collect()
}

fn check_side(schema_file: &str, operation: &str, action: &str) {
    let document = document();
    let documented = documented_frames(&document, schema_file);
    let listed: Vec<&str> = document["operations"][operation]["messages"]
        .as_array()
        .expect("the catch-all operation")
        .iter()
        .map(reference)
        .collect();
    assert_eq!(
        document["operations"][operation]["action"].as_str(),
        Some(action)
    );
    for frame in frame_types(schema_file) {
        let Some((_, component)) = documented.iter().find(|(t, _)| *t == frame) else {
            panic!(
                "docs/asyncapi.yaml has no message for the `{frame}` frame of {schema_file}: \
                 add components/messages/<side>-{frame} (payload: allOf [{{$ref: ./schemas/{schema_file}}}, \
                 type const {frame}]), list it in channels/websocket and in operations/{operation}"
            )
        };
        let in_channel = format!("#/channels/websocket/messages/{component}");
        assert!(
            resolve(&document, &in_channel).is_some(),
            "`{frame}`: {in_channel}"
        );
        assert!(
            listed.contains(&in_channel.as_str()),
            "`{frame}` is not in operations/{operation}"
        );
    }
}

#[test]
fn every_client_frame_type_is_documented() {
    check_side("client-frame.json", "receiveClientFrames", "receive");
}

#[test]
fn every_server_frame_type_is_documented() {
    check_side("server-frame.json", "sendServerFrames", "send");
}
