//! PROTOCOL.md "Transport" and "Session": every rule of the handshake.

use std::time::Duration;

use chat_shared::auth::{self, Claims};
use chat_tests::{http_get, Client, Ending, System};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_valid_token_gets_welcome_then_synced() -> anyhow::Result<()> {
    let system = System::start().await?;
    let client = system.connect("alice", "phone-1").await?;
    assert_eq!(client.welcome["user"], "alice");
    assert_eq!(client.welcome["device"], "phone-1");
    assert_eq!(client.welcome["heartbeat"], 25);
    assert_eq!(client.welcome["resumed"], true);
    assert!(client.welcome["edge"]
        .as_str()
        .is_some_and(|e| !e.is_empty()));
    assert!(client.synced["cursor"].is_string());
    Ok(())
}

#[tokio::test]
async fn health_and_readiness() -> anyhow::Result<()> {
    let system = System::start().await?;
    assert_eq!(http_get(system.edge_addr, "/healthz").await?.0, 200);
    assert_eq!(http_get(system.edge_addr, "/readyz").await?.0, 200);
    Ok(())
}

#[tokio::test]
async fn no_hello_in_time_closes_4002() -> anyhow::Result<()> {
    let system = System::start_with(|c| c.hello_timeout = Duration::from_secs(1)).await?;
    let mut client = Client::open(&system.ws_url()).await?;
    assert_eq!(client.ending().await?, Ending::Closed(4002));
    Ok(())
}

#[tokio::test]
async fn a_frame_before_hello_is_refused_but_hello_still_works() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut client = Client::open(&system.ws_url()).await?;
    client.send(json!({"type":"ping","ref":"early"})).await?;
    let error = client.recv().await?;
    assert_eq!(error["code"], "bad_request");
    assert_eq!(error["ref"], "early");
    client
        .send(json!({"type":"hello","token":system.token("alice"),"device":"d1"}))
        .await?;
    assert_eq!(client.recv().await?["type"], "welcome");
    Ok(())
}

async fn refused(system: &System, token: &str) -> anyhow::Result<(serde_json::Value, Ending)> {
    let mut client = Client::open(&system.ws_url()).await?;
    client
        .send(json!({"type":"hello","token":token,"device":"d1"}))
        .await?;
    let error = client.recv().await?;
    Ok((error, client.ending().await?))
}

#[tokio::test]
async fn bad_tokens_close_4001() -> anyhow::Result<()> {
    let system = System::start().await?;
    let now = auth::now_secs();
    let sign = |claims: &Claims, secret: &str| {
        auth::sign(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let claims = |sub: &str, exp: u64| Claims {
        sub: sub.into(),
        exp,
        nbf: None,
        iat: None,
        iss: None,
        aud: None,
    };
    let expired = sign(&claims("alice", now - 120), chat_tests::JWT_SECRET);
    let (error, ending) = refused(&system, &expired).await?;
    assert_eq!(error["code"], "token_expired");
    assert_eq!(ending, Ending::Closed(4001));

    for token in [
        sign(&claims("alice", now + 600), "some-other-secret"),
        sign(&claims("al.ice", now + 600), chat_tests::JWT_SECRET),
        "garbage".to_string(),
    ] {
        let (error, ending) = refused(&system, &token).await?;
        assert_eq!(error["code"], "unauthorized", "{token}");
        assert_eq!(ending, Ending::Closed(4001), "{token}");
    }
    Ok(())
}

#[tokio::test]
async fn ping_is_answered_and_ref_echoed() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut client = system.connect("alice", "d1").await?;
    client.send(json!({"type":"ping","ref":"p1"})).await?;
    let pong = client.recv().await?;
    assert_eq!(pong, json!({"type":"pong","ref":"p1"}));
    client.send(json!({"type":"ping"})).await?;
    assert_eq!(client.recv().await?, json!({"type":"pong"}));
    Ok(())
}

#[tokio::test]
async fn silence_closes_4003_but_pings_keep_it_open() -> anyhow::Result<()> {
    let system = System::start_with(|c| {
        c.heartbeat = Duration::from_secs(1);
        c.heartbeat_grace = Duration::from_secs(1);
    })
    .await?;
    // Idle timeout is 2 x 1 s + 1 s. WebSocket pings every 500 ms keep a
    // connection alive past it...
    let mut alive = system.connect("alice", "d1").await?;
    for _ in 0..8 {
        alive.send_raw(Message::Ping(vec![1].into())).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    alive.send(json!({"type":"ping","ref":"still"})).await?;
    assert_eq!(alive.recv().await?["ref"], "still");
    // ...while a silent one is closed.
    let mut silent = system.connect("bob", "d1").await?;
    assert_eq!(silent.ending().await?, Ending::Closed(4003));
    Ok(())
}

#[tokio::test]
async fn a_frame_over_one_mebibyte_closes_1009() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut client = system.connect("alice", "d1").await?;
    let text = "x".repeat(1024 * 1024 + 1);
    client.send(json!({"type":"ping","pad":text})).await?;
    assert_eq!(client.ending().await?, Ending::Closed(1009));
    Ok(())
}

#[tokio::test]
async fn bad_frames_answer_bad_request_and_keep_the_connection() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut client = system.connect("alice", "d1").await?;
    client
        .send_raw(Message::Binary(vec![1, 2, 3].into()))
        .await?;
    assert_eq!(client.recv().await?["code"], "bad_request");
    client.send_raw(Message::Text("{not json".into())).await?;
    assert_eq!(client.recv().await?["code"], "bad_request");
    client.send(json!({"type":"teleport","ref":"t1"})).await?;
    let unknown = client.recv().await?;
    assert_eq!(
        (unknown["code"].as_str(), unknown["ref"].as_str()),
        (Some("bad_request"), Some("t1"))
    );
    client.send(json!({"type":"history","ref":"h1"})).await?;
    let missing = client.recv().await?;
    assert_eq!(
        (missing["code"].as_str(), missing["ref"].as_str()),
        (Some("bad_request"), Some("h1"))
    );
    client
        .send(json!({"type":"send","ref":"s1","to":"b.b","text":"x","client_msg_id":"c"}))
        .await?;
    assert_eq!(client.recv().await?["code"], "bad_request");
    // Still open and working.
    client.send(json!({"type":"ping","ref":"after"})).await?;
    assert_eq!(client.recv().await?, json!({"type":"pong","ref":"after"}));
    Ok(())
}
