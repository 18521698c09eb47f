//! Retried sends (same `client_msg_id`) inside and beyond JetStream's
//! duplicate window, and the lazily written claims that cover the latter
//! (edge/src/claims.rs).

use std::time::Duration;

use anyhow::{ensure, Context as _};
use async_nats::jetstream;
use chat_shared::hex;
use chat_tests::{streams, Client, System};
use futures::StreamExt;
use serde_json::{json, Value};

/// Messages MESSAGES (every partition of it) holds.
async fn stored_events(system: &System) -> anyhow::Result<u64> {
    let js = jetstream::new(system.admin().await?);
    let messages = streams::messages_streams(system.config.partitions);
    streams::stored(&js, &messages).await
}

/// The `chat_sent` keys of `user` (claims of either form).
async fn claim_keys(system: &System, user: &str) -> anyhow::Result<Vec<String>> {
    let js = jetstream::new(system.admin().await?);
    let bucket = js.get_key_value("chat_sent").await?;
    let mut keys = bucket.keys().await?;
    let mut mine = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key?;
        if key.starts_with(&format!("{user}.")) {
            mine.push(key);
        }
    }
    Ok(mine)
}

/// Every claim line (`<hex client id> <id>:<digest>`) stored for `user`.
async fn claim_lines(system: &System, user: &str) -> anyhow::Result<Vec<String>> {
    let js = jetstream::new(system.admin().await?);
    let bucket = js.get_key_value("chat_sent").await?;
    let mut lines = Vec::new();
    for key in claim_keys(system, user).await? {
        let value = bucket
            .get(&key)
            .await?
            .context("a listed key has no value")?;
        lines.extend(String::from_utf8(value.to_vec())?.lines().map(String::from));
    }
    Ok(lines)
}

async fn send(client: &mut Client, text: &str, client_msg_id: &str) -> anyhow::Result<Value> {
    client
        .send_message(json!({"to":"bob"}), text, client_msg_id)
        .await
}

#[tokio::test]
async fn a_retry_inside_and_beyond_the_dedup_window_answers_the_first_message() -> anyhow::Result<()>
{
    // A window short enough to wait out (the default is 15 minutes).
    const WINDOW: Duration = Duration::from_secs(6);
    let system = System::start_with(|config| config.dedup_window = WINDOW).await?;
    let mut bob = system.connect("bob", "phone").await?;
    let mut first_connection = system.connect("alice", "phone").await?;
    let first = send(&mut first_connection, "once", "late-1").await?;
    ensure!(
        first["type"] == "sent" && first["duplicate"] == false,
        "{first}"
    );
    // The connection ends right after the answer, as if it had been lost
    // with the answer in flight.
    first_connection.close().await?;

    let mut alice = system.connect("alice", "phone").await?;
    let inside = send(&mut alice, "once", "late-1").await?;
    assert_eq!(
        (&inside["id"], &inside["ts"], &inside["duplicate"]),
        (&first["id"], &first["ts"], &json!(true)),
        "inside the window: {inside}"
    );

    // JetStream forgets the id once the window has passed.
    tokio::time::sleep(WINDOW + Duration::from_secs(2)).await;
    let beyond = send(&mut alice, "once", "late-1").await?;
    assert_eq!(
        (&beyond["id"], &beyond["ts"], &beyond["duplicate"]),
        (&first["id"], &first["ts"], &json!(true)),
        "beyond the window: {beyond}"
    );
    let other_text = send(&mut alice, "twice", "late-1").await?;
    assert_eq!(
        (&other_text["type"], &other_text["code"]),
        (&json!("error"), &json!("bad_request")),
        "{other_text}"
    );

    // One message: stored once, delivered once.
    assert_eq!(stored_events(&system).await?, 1);
    let message = bob.recv_type("message").await?;
    assert_eq!(message["id"], first["id"]);
    let late = bob.next_within(Duration::from_millis(500)).await?;
    assert!(
        late.as_ref().is_none_or(|f| f["type"] != "message"),
        "{late:?}"
    );
    Ok(())
}

#[tokio::test]
async fn only_sends_answered_shortly_before_their_connection_ended_are_claimed(
) -> anyhow::Result<()> {
    // Idle timeout 2 x 1 + 1 = 3 s: a send counts as read once its
    // connection stayed open 6 s after the answer.
    let system = System::start_with(|config| {
        config.heartbeat = Duration::from_secs(1);
        config.heartbeat_grace = Duration::from_secs(1);
    })
    .await?;
    let mut alice = system.connect("alice", "phone").await?;
    let read = send(&mut alice, "read", "kept-open").await?;
    ensure!(read["type"] == "sent", "{read}");
    // The client stays (and pings) past the confirmation time, then leaves.
    for _ in 0..8 {
        let pong = alice.request(json!({"type":"ping"})).await?;
        ensure!(pong["type"] == "pong", "{pong}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    alice.close().await?;
    // A send whose connection ends at once is claimed as that connection
    // closes; the claims are written in one batch, after the first's.
    let mut alice = system.connect("alice", "laptop").await?;
    let unread = send(&mut alice, "unread", "closed-at-once").await?;
    ensure!(unread["type"] == "sent", "{unread}");
    alice.close().await?;

    let claimed = format!(
        "{} {}:",
        hex::encode("closed-at-once"),
        unread["id"].as_str().unwrap_or("?")
    );
    chat_tests::wait_until(|| async {
        claim_lines(&system, "alice")
            .await
            .is_ok_and(|lines| lines.iter().any(|line| line.starts_with(&claimed)))
    })
    .await?;
    let lines = claim_lines(&system, "alice").await?;
    assert_eq!(lines.len(), 1, "only the unread send: {lines:?}");
    assert_eq!(claim_keys(&system, "alice").await?.len(), 1);
    Ok(())
}
