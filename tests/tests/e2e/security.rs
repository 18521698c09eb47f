//! Security, end to end: forged tokens over a real WebSocket, the upgrade's
//! HTTP hardening, hostile ids, membership checks and the edge's NATS
//! permissions. (The verifier's unit tests are in shared/src/auth.rs; the
//! basic bad-token cases are in handshake.rs.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use chat_shared::auth::{self, Claims};
use chat_shared::ids::UserId;
use chat_shared::subjects;
use chat_tests::providers::{APNS_PRIVATE_KEY, FCM_PRIVATE_KEY, FCM_PUBLIC_KEY};
use chat_tests::{streams, Client, Ending, System};
use futures::StreamExt;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "chat";
const RSA_KID: &str = "rsa-1";
const EC_KID: &str = "ec-1";

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(FCM_PRIVATE_KEY.as_bytes()).expect("the test RSA key")
}

fn ec_key() -> EncodingKey {
    EncodingKey::from_ec_pem(APNS_PRIVATE_KEY.as_bytes()).expect("the test EC key")
}

/// Writes a JWK set with the public halves of the given keys.
fn write_jwks(dir: &Path, name: &str, keys: &[(&str, Algorithm, EncodingKey)]) -> PathBuf {
    let keys = keys
        .iter()
        .map(|(kid, alg, key)| {
            let mut jwk = Jwk::from_encoding_key(key, *alg).expect("a JWK from a test key");
            jwk.common.key_id = Some((*kid).to_string());
            jwk
        })
        .collect();
    let path = dir.join(name);
    let text = serde_json::to_string(&JwkSet { keys }).expect("a JWK set serializes");
    std::fs::write(&path, text).expect("writing the JWK set");
    path
}

fn good_claims(sub: &str) -> Claims {
    let now = auth::now_secs();
    Claims {
        sub: sub.into(),
        exp: now + 600,
        nbf: Some(now - 5),
        iat: Some(now),
        iss: Some(ISSUER.into()),
        aud: Some(json!(AUDIENCE)),
    }
}

fn signed(alg: Algorithm, kid: Option<&str>, claims: &Claims, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    auth::sign(&header, claims, key).expect("signing a test token")
}

fn rs256(claims: &Claims) -> String {
    signed(Algorithm::RS256, Some(RSA_KID), claims, &rsa_key())
}

fn es256(claims: &Claims) -> String {
    signed(Algorithm::ES256, Some(EC_KID), claims, &ec_key())
}

/// Sends `hello` with `token`; the error frame and how the connection ended.
async fn refused(url: &str, token: &str) -> anyhow::Result<(Value, Ending)> {
    let mut client = Client::open(url).await?;
    client
        .send(json!({"type":"hello","token":token,"device":"d1"}))
        .await?;
    let error = client.recv().await?;
    Ok((error, client.ending().await?))
}

async fn welcomed(system: &System, url: &str, token: &str) -> anyhow::Result<String> {
    let client = system.connect_url(url, token, "d1", None).await?;
    Ok(client.welcome["user"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// An edge that trusts only a JWK set (RS256 `rsa-1`, ES256 `ec-1`) and
/// checks issuer and audience: no shared secret at all.
async fn jwks_system(dir: &Path) -> anyhow::Result<System> {
    let jwks = write_jwks(
        dir,
        "both.json",
        &[
            (RSA_KID, Algorithm::RS256, rsa_key()),
            (EC_KID, Algorithm::ES256, ec_key()),
        ],
    );
    // No secret: with a JWK set the default secret file is not read either.
    System::start_with(|c| {
        c.jwt_secret = None;
        c.jwt_jwks_file = Some(jwks);
        c.jwt_issuer = Some(ISSUER.into());
        c.jwt_audience = Some(AUDIENCE.into());
        c.jwt_leeway = Duration::from_secs(5);
    })
    .await
}

#[tokio::test]
async fn forged_and_invalid_tokens_are_refused_over_the_socket() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let system = jwks_system(dir.path()).await?;
    let url = system.ws_url();
    let now = auth::now_secs();
    // The keys work: a real token of each is accepted.
    assert_eq!(
        welcomed(&system, &url, &rs256(&good_claims("alice"))).await?,
        "alice"
    );
    assert_eq!(
        welcomed(&system, &url, &es256(&good_claims("bob"))).await?,
        "bob"
    );

    // Key confusion: HS256 with the RSA public key's PEM as the HMAC secret,
    // naming the RSA key and naming none.
    let public_pem = EncodingKey::from_secret(FCM_PUBLIC_KEY.as_bytes());
    let confused = signed(
        Algorithm::HS256,
        Some(RSA_KID),
        &good_claims("alice"),
        &public_pem,
    );
    let confused_no_kid = signed(Algorithm::HS256, None, &good_claims("alice"), &public_pem);
    // alg none, with and without a kid, the payload of a good token.
    let payload = rs256(&good_claims("alice"))
        .split('.')
        .nth(1)
        .unwrap_or_default()
        .to_string();
    // {"alg":"none","typ":"JWT","kid":"rsa-1"} and {"alg":"none","typ":"JWT"}
    let none_kid = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIiwia2lkIjoicnNhLTEifQ.{payload}.");
    let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
    // Tampered: alice's signature on mallory's payload.
    let tampered = {
        let good = rs256(&good_claims("alice"));
        let other = rs256(&good_claims("mallory"));
        let parts: Vec<&str> = good.split('.').collect();
        let payload = other.split('.').nth(1).unwrap_or_default();
        format!("{}.{payload}.{}", parts[0], parts[2])
    };
    let future = Claims {
        nbf: Some(now + 300),
        ..good_claims("alice")
    };
    let wrong_aud = Claims {
        aud: Some(json!("other-service")),
        ..good_claims("alice")
    };
    let no_aud = Claims {
        aud: None,
        ..good_claims("alice")
    };
    let wrong_iss = Claims {
        iss: Some("https://evil.test".into()),
        ..good_claims("alice")
    };
    let no_iss = Claims {
        iss: None,
        ..good_claims("alice")
    };
    // Right key, wrong algorithm name in the header (RS384 is not pinned).
    let other_alg = signed(
        Algorithm::RS384,
        Some(RSA_KID),
        &good_claims("alice"),
        &rsa_key(),
    );
    for (what, token) in [
        ("HS256 signed with the RSA public key, kid rsa-1", confused),
        (
            "HS256 signed with the RSA public key, no kid",
            confused_no_kid,
        ),
        ("alg none with kid", none_kid),
        ("alg none", none),
        ("tampered payload", tampered),
        ("future nbf", rs256(&future)),
        ("wrong aud", rs256(&wrong_aud)),
        ("no aud", rs256(&no_aud)),
        ("wrong iss", rs256(&wrong_iss)),
        ("no iss", es256(&no_iss)),
        ("RS384 header on the RS256 key", other_alg),
        (
            "unknown kid",
            signed(
                Algorithm::RS256,
                Some("rsa-2"),
                &good_claims("alice"),
                &rsa_key(),
            ),
        ),
        (
            "EC key under the RSA kid",
            signed(
                Algorithm::ES256,
                Some(RSA_KID),
                &good_claims("alice"),
                &ec_key(),
            ),
        ),
        (
            "HS256 with the test suite's shared secret (not configured here)",
            system.token("alice"),
        ),
    ] {
        let (error, ending) = refused(&url, &token).await?;
        assert_eq!(error["code"], "unauthorized", "{what}: {error}");
        assert_eq!(ending, Ending::Closed(4001), "{what}");
    }
    let expired = Claims {
        exp: now - 120,
        nbf: None,
        ..good_claims("alice")
    };
    for token in [rs256(&expired), es256(&expired)] {
        let (error, ending) = refused(&url, &token).await?;
        assert_eq!(error["code"], "token_expired", "{error}");
        assert_eq!(ending, Ending::Closed(4001));
    }
    Ok(())
}

#[tokio::test]
async fn keys_rotate_by_kid() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut system = jwks_system(dir.path()).await?;
    let url = system.ws_url();
    let old = rs256(&good_claims("alice"));
    let new = es256(&good_claims("alice"));
    // Both keys published: tokens of both are accepted.
    assert_eq!(welcomed(&system, &url, &old).await?, "alice");
    assert_eq!(welcomed(&system, &url, &new).await?, "alice");
    // The old key is withdrawn: an edge started with the new set refuses
    // tokens of the old kid and still accepts the new one.
    system.config.jwt_jwks_file = Some(write_jwks(
        dir.path(),
        "rotated.json",
        &[(EC_KID, Algorithm::ES256, ec_key())],
    ));
    let rotated = system.start_edge().await?;
    let rotated_url = format!("ws://{rotated}/v1/ws");
    chat_tests::wait_until(|| async {
        chat_tests::http_get(rotated, "/readyz")
            .await
            .is_ok_and(|(status, _)| status == 200)
    })
    .await?;
    let (error, ending) = refused(&rotated_url, &old).await?;
    assert_eq!(
        (error["code"].as_str(), ending),
        (Some("unauthorized"), Ending::Closed(4001))
    );
    assert_eq!(welcomed(&system, &rotated_url, &new).await?, "alice");
    Ok(())
}

/// Writes `request` to the edge and reads until the server closes or the
/// head of its answer is complete; `None` if the server closed (or reset)
/// the connection without answering, which may happen while the request is
/// still being written when it is refused early.
async fn raw_http(addr: std::net::SocketAddr, request: &[u8]) -> anyhow::Result<Option<String>> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    // A write error means the server closed early; the read tells the rest.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    let read = async {
        loop {
            let Ok(n) = stream.read(&mut buffer).await else {
                return;
            };
            if n == 0 {
                return;
            }
            answer.extend_from_slice(&buffer[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                return;
            }
        }
    };
    tokio::time::timeout(chat_tests::WAIT, read).await?;
    Ok(Some(String::from_utf8_lossy(&answer).to_string()).filter(|a| !a.is_empty()))
}

fn upgrade_request(addr: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

#[tokio::test]
async fn the_upgrade_checks_origin_and_never_negotiates_compression() -> anyhow::Result<()> {
    let system = System::start_with(|c| {
        c.allowed_origins = vec!["https://chat.example.com".into()];
    })
    .await?;
    let addr = system.edge_addr;
    let status = |answer: &Option<String>| {
        answer
            .as_deref()
            .and_then(|a| a.split_whitespace().nth(1))
            .map(str::to_string)
    };
    for origin in [
        "https://evil.example.com",
        "https://chat.example.com.evil.com",
        "http://chat.example.com",
        "null",
    ] {
        let answer = raw_http(
            addr,
            upgrade_request(addr, &format!("Origin: {origin}\r\n")).as_bytes(),
        )
        .await?;
        assert_eq!(
            status(&answer).as_deref(),
            Some("403"),
            "{origin}: {answer:?}"
        );
    }
    // Allowed origin (case and a trailing slash do not matter), and no
    // Origin at all (not a browser): upgraded, and permessage-deflate is
    // never negotiated even when offered.
    for extra in [
        "Origin: https://chat.example.com\r\n",
        "Origin: HTTPS://Chat.Example.com/\r\n",
        "",
    ] {
        let offer = format!(
            "{extra}Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits, x-webkit-deflate-frame\r\n"
        );
        let answer = raw_http(addr, upgrade_request(addr, &offer).as_bytes()).await?;
        assert_eq!(
            status(&answer).as_deref(),
            Some("101"),
            "{extra}: {answer:?}"
        );
        let answer = answer.unwrap_or_default().to_ascii_lowercase();
        assert!(
            !answer.contains("sec-websocket-extensions"),
            "an extension was negotiated: {answer}"
        );
    }
    // A browser from the allowed origin speaks the protocol as usual.
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            system.ws_url(),
        )?;
    request
        .headers_mut()
        .insert("Origin", "https://chat.example.com".parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    futures::SinkExt::send(
        &mut socket,
        tokio_tungstenite::tungstenite::Message::Text(
            json!({"type":"hello","token":system.token("alice"),"device":"web"})
                .to_string()
                .into(),
        ),
    )
    .await?;
    let welcome = tokio::time::timeout(chat_tests::WAIT, socket.next()).await?;
    let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(welcome))) = welcome else {
        anyhow::bail!("no welcome: {welcome:?}");
    };
    assert_eq!(serde_json::from_str::<Value>(&welcome)?["type"], "welcome");
    Ok(())
}

#[tokio::test]
async fn huge_headers_and_idle_connections_are_cut_off() -> anyhow::Result<()> {
    let system = System::start().await?;
    let addr = system.edge_addr;
    // A 64 KiB request head: refused with 431 (or the connection is closed),
    // never upgraded.
    let padding = "a".repeat(64 * 1024);
    let answer = raw_http(
        addr,
        upgrade_request(addr, &format!("X-Padding: {padding}\r\n")).as_bytes(),
    )
    .await?;
    if let Some(answer) = &answer {
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    }
    // A connection that never sends a request, one that sends half a
    // request head, and one idle after a keep-alive request: all closed by
    // the server within the header read timeout (plus slack).
    let bound = chat_edge::HEADER_READ_TIMEOUT + Duration::from_secs(5);
    let silent = tokio::net::TcpStream::connect(addr).await?;
    let mut partial = tokio::net::TcpStream::connect(addr).await?;
    partial
        .write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n")
        .await?;
    let mut kept = tokio::net::TcpStream::connect(addr).await?;
    kept.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let started = tokio::time::Instant::now();
    let closed = |mut stream: tokio::net::TcpStream| async move {
        let mut buffer = [0u8; 1024];
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout(bound, stream.read(&mut buffer)).await {
                Err(_) => return anyhow::Ok(false),
                Ok(Ok(0) | Err(_)) => return Ok(true),
                Ok(Ok(n)) => seen.extend_from_slice(&buffer[..n]),
            }
        }
    };
    let (silent, partial, kept) = tokio::join!(closed(silent), closed(partial), closed(kept));
    assert!(silent?, "a silent connection was kept open");
    assert!(partial?, "a half-sent request head was waited for");
    assert!(kept?, "an idle keep-alive connection was kept open");
    assert!(started.elapsed() < bound);
    // The edge still serves.
    assert_eq!(chat_tests::http_get(addr, "/healthz").await?.0, 200);
    Ok(())
}

#[tokio::test]
async fn hostile_ids_are_bad_requests_and_the_connection_stays_usable() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "d1").await?;
    let bad_ids = [
        "b.b",
        "*",
        ">",
        "chat.>",
        "b b",
        "b\tb",
        "b\nb",
        "b'; DROP TABLE messages; --",
        "b\"",
        "b%",
        "b\\",
        "",
        &"b".repeat(65),
    ];
    for bad in bad_ids {
        let requests = [
            json!({"type":"send","to":bad,"text":"x","client_msg_id":"c1"}),
            json!({"type":"send","conversation":format!("dm:alice:{bad}"),"text":"x","client_msg_id":"c2"}),
            json!({"type":"send","conversation":format!("group:{bad}"),"text":"x","client_msg_id":"c3"}),
            json!({"type":"history","conversation":format!("group:{bad}")}),
            json!({"type":"history","conversation":format!("dm:{bad}:alice")}),
            json!({"type":"group.info","group":bad}),
            json!({"type":"group.add","group":bad,"users":["bob"]}),
            json!({"type":"group.create","name":"g","members":[bad]}),
            json!({"type":"friend.request","user":bad}),
        ];
        for request in requests {
            let reply = alice.request(request.clone()).await?;
            assert_eq!(reply["code"], "bad_request", "{request} -> {reply}");
        }
        for request in [
            json!({"type":"typing","conversation":format!("group:{bad}"),"active":true}),
            json!({"type":"read","conversation":format!("dm:alice:{bad}"),"up_to":"1"}),
        ] {
            let reply = unreffed(&mut alice, request.clone()).await?;
            assert_eq!(reply["code"], "bad_request", "{request} -> {reply}");
        }
    }
    // client_msg_id is free text (it is hex-encoded before it reaches a
    // KV key) but has a length and no control characters.
    for bad in ["", "b\nb", "b\tb", "b\u{0}", &"b".repeat(65)] {
        let reply = alice.send_message(json!({"to":"bob"}), "x", bad).await?;
        assert_eq!(
            reply["code"], "bad_request",
            "client_msg_id {bad:?}: {reply}"
        );
    }
    // Nothing of that reached the store or anyone's inbox.
    let database = system.database_of("dm:alice:bob").await?;
    let rows = database
        .query_one("SELECT count(*) FROM messages", &[])
        .await?;
    assert_eq!(rows.get::<_, i64>(0), 0);
    // Still usable.
    let sent = alice
        .send_message(json!({"to":"bob"}), "still here", "ok-1")
        .await?;
    assert_eq!(sent["type"], "sent", "{sent}");

    // hello.device: refused, and the handshake can still complete. A user
    // per attempt: the edge releases a closed connection's slot in the
    // per-user connection limit (10) only once it has seen the close.
    for (i, bad) in bad_ids.into_iter().enumerate() {
        let token = system.token(&format!("carol{i}"));
        let mut client = Client::open(&system.ws_url()).await?;
        client
            .send(json!({"type":"hello","token":token,"device":bad}))
            .await?;
        let error = client.recv().await?;
        assert_eq!(error["code"], "bad_request", "device {bad:?}: {error}");
        client
            .send(json!({"type":"hello","token":token,"device":"ok"}))
            .await?;
        let welcome = client.recv().await?;
        assert_eq!(
            welcome["type"], "welcome",
            "after device {bad:?}: {welcome}"
        );
    }
    Ok(())
}

/// Sends a frame that has no `ref` (`read`, `typing`) and waits for the
/// error it causes.
async fn unreffed(client: &mut Client, frame: Value) -> anyhow::Result<Value> {
    client.send(frame).await?;
    client
        .recv_matching(|f| f["type"] == "error" && f.get("ref").is_none())
        .await
}

/// What someone outside `conversation` tries: every one must be refused.
async fn refused_everything(
    client: &mut Client,
    conversation: &str,
    up_to: &str,
) -> anyhow::Result<()> {
    for request in [
        json!({"type":"history","conversation":conversation}),
        json!({"type":"send","conversation":conversation,"text":"hi","client_msg_id":format!("x-{}", conversation.replace(':', "-"))}),
    ] {
        let reply = client.request(request.clone()).await?;
        assert_eq!(reply["code"], "forbidden", "{request} -> {reply}");
    }
    for request in [
        json!({"type":"read","conversation":conversation,"up_to":up_to}),
        json!({"type":"typing","conversation":conversation,"active":true}),
    ] {
        let reply = unreffed(client, request.clone()).await?;
        assert_eq!(reply["code"], "forbidden", "{request} -> {reply}");
    }
    Ok(())
}

#[tokio::test]
async fn non_members_and_removed_members_see_nothing() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "d1").await?;
    let mut bob = system.connect("bob", "d1").await?;
    let mut carol = system.connect("carol", "d1").await?;
    let created = alice
        .request(json!({"type":"group.create","name":"team","members":["bob"]}))
        .await?;
    let group = created["group"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!group.is_empty(), "{created}");
    let conversation = format!("group:{group}");
    bob.recv_type("membership").await?;
    let sent = alice
        .send_message(json!({"conversation":conversation}), "secret", "s1")
        .await?;
    let id = sent["id"].as_str().unwrap_or_default().to_string();
    bob.recv_type("message").await?;

    // An outsider: no history, no info, no typing, no read receipts, for the
    // group and for someone else's DM.
    let dm = alice
        .send_message(json!({"to":"bob"}), "just us", "d1")
        .await?;
    assert_eq!(dm["type"], "sent");
    refused_everything(&mut carol, &conversation, &id).await?;
    let dm_id = dm["id"].as_str().unwrap_or_default().to_string();
    refused_everything(&mut carol, "dm:alice:bob", &dm_id).await?;
    let info = carol
        .request(json!({"type":"group.info","group":group}))
        .await?;
    assert_eq!(info["code"], "forbidden");

    // The members saw none of it.
    for member in [&mut alice, &mut bob] {
        let frames = member.drain().await?;
        assert!(
            frames
                .iter()
                .all(|f| f["type"] != "typing" && f["type"] != "receipt" && f["text"] != "hi"),
            "{frames:?}"
        );
    }

    // Bob is removed: at once he can no longer read, type, send or ask.
    let removed = alice
        .request(json!({"type":"group.remove","group":group,"users":["bob"]}))
        .await?;
    assert_eq!(removed["type"], "group", "{removed}");
    assert_eq!(bob.recv_type("membership").await?["event"], "removed");
    refused_everything(&mut bob, &conversation, &id).await?;
    let info = bob
        .request(json!({"type":"group.info","group":group}))
        .await?;
    assert_eq!(info["code"], "forbidden");
    // ...and receives nothing more of the group.
    alice
        .send(json!({"type":"typing","conversation":conversation,"active":true}))
        .await?;
    alice
        .send_message(json!({"conversation":conversation}), "after", "s2")
        .await?;
    let frames = bob.drain().await?;
    assert!(
        frames
            .iter()
            .all(|f| f["conversation"] != conversation.as_str()),
        "{frames:?}"
    );
    Ok(())
}

#[tokio::test]
async fn the_edge_nats_user_cannot_reach_internal_subjects_or_admin_apis() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "d1").await?;
    let sent = alice
        .send_message(json!({"to":"bob"}), "keep me", "k1")
        .await?;
    assert_eq!(sent["type"], "sent");
    let admin = system.admin().await?;
    let js = async_nats::jetstream::new(admin.clone());
    // Every partition of MESSAGES and INBOX when they are split.
    let partitions = system.config.partitions;
    let messages_streams = streams::messages_streams(partitions);
    let inbox_streams = streams::inbox_streams(partitions);
    let watched: Vec<String> = messages_streams
        .iter()
        .chain(&inbox_streams)
        .cloned()
        .chain([subjects::PUSH_STREAM.to_string()])
        .collect();
    // The message reached MESSAGES and both inboxes.
    chat_tests::wait_until(|| async {
        let (Ok(events), Ok(items)) = (
            streams::stored(&js, &messages_streams).await,
            streams::stored(&js, &inbox_streams).await,
        ) else {
            return false;
        };
        events >= 1 && items >= 2
    })
    .await?;
    let before = stream_counts(&js, &watched).await?;
    let mut max_messages = Vec::new();
    for name in &messages_streams {
        max_messages.push(js.get_stream(name).await?.info().await?.config.max_messages);
    }

    let edge = chat_shared::nats::connect(&system.config_for("edge"), "test-edge-creds").await?;
    let bob = UserId::parse("bob")?;
    // An inbox item is published on its partition's subject when INBOX is
    // split (`chat.inbox.<k>.bob`), else on its own.
    let bob_inbox = subjects::inbox_in(&bob, partitions.of_user(&bob));
    let mut forbidden = vec![
        "chat.inbox.bob",
        "chat.deliver.bob",
        "chat.presence.bob",
        "chat.push.bob",
        "chat.control.drain.some-edge",
        "chat.event.group.team",
        "chat.event.friend",
        // Keys nobody else writes during the test.
        "$KV.chat_presence.mallory",
        "$KV.chat_push_devices.mallory",
        "$KV.chat_leaders.forged",
    ];
    if !forbidden.contains(&bob_inbox.as_str()) {
        forbidden.push(&bob_inbox);
    }
    let mut watchers = Vec::new();
    for subject in &forbidden {
        watchers.push((subject, admin.subscribe(subject.to_string()).await?));
    }
    // A control: an allowed subject does get through after the forged
    // publishes (one publisher's messages arrive in order), so silence
    // below means refusal, not a broken test. The batch is sent again until
    // the control arrives: under load the first control was sometimes not
    // delivered (as in privilege.rs; a second one always was).
    let mut control = admin.subscribe("chat.typing.probe").await?;
    admin.flush().await?;
    let arrived = async {
        loop {
            for subject in &forbidden {
                edge.publish(subject.to_string(), "{\"forged\":true}".into())
                    .await?;
            }
            edge.publish("chat.typing.probe", "{}".into()).await?;
            edge.flush().await?;
            if let Ok(got) = tokio::time::timeout(Duration::from_millis(500), control.next()).await
            {
                return anyhow::Ok(got.is_some());
            }
        }
    };
    let arrived = tokio::time::timeout(chat_tests::WAIT, arrived).await??;
    assert!(arrived, "the allowed subscription ended");
    for (subject, mut watcher) in watchers {
        let leaked = tokio::time::timeout(Duration::from_millis(300), watcher.next()).await;
        assert!(leaked.is_err(), "the edge could publish to {subject}");
    }

    // JetStream admin API: no answer (the server drops the request), and no
    // effect. Asked all at once: each refusal costs a timeout.
    let mut attempts = vec![
        (
            "$JS.API.STREAM.CREATE.EVIL".to_string(),
            json!({"name":"EVIL","subjects":["evil.>"]}).to_string(),
        ),
        ("$JS.API.CONSUMER.CREATE.PUSH".to_string(), String::new()),
    ];
    for name in &messages_streams {
        attempts.extend([
            (format!("$JS.API.STREAM.PURGE.{name}"), String::new()),
            (format!("$JS.API.STREAM.DELETE.{name}"), String::new()),
            (
                format!("$JS.API.STREAM.UPDATE.{name}"),
                json!({"name":name,"subjects":["chat.msg.>"],"max_msgs":1}).to_string(),
            ),
            (
                format!("$JS.API.STREAM.MSG.DELETE.{name}"),
                json!({"seq":1}).to_string(),
            ),
        ]);
    }
    for name in &inbox_streams {
        attempts.extend([
            (format!("$JS.API.STREAM.PURGE.{name}"), String::new()),
            (format!("$JS.API.STREAM.DELETE.{name}"), String::new()),
            // Resume reads INBOX by direct gets: the edge needs no consumer there.
            (
                format!("$JS.API.CONSUMER.CREATE.{name}"),
                json!({"stream_name":name,"config":{"filter_subject":subjects::inbox(&bob)}})
                    .to_string(),
            ),
        ]);
    }
    let answers = futures::future::join_all(attempts.iter().map(|(subject, body)| {
        let edge = edge.clone();
        async move {
            let answer = tokio::time::timeout(
                Duration::from_secs(3),
                edge.request(subject.clone(), body.clone().into()),
            )
            .await;
            (subject, answer)
        }
    }))
    .await;
    for (subject, answer) in answers {
        if let Ok(Ok(reply)) = answer {
            anyhow::bail!(
                "the edge got an answer from {subject}: {}",
                String::from_utf8_lossy(&reply.payload)
            );
        }
    }
    let after = stream_counts(&js, &watched).await?;
    assert_eq!(before, after, "a stream changed");
    assert!(
        js.get_stream("EVIL").await.is_err(),
        "the edge created a stream"
    );
    for (name, max_messages) in messages_streams.iter().zip(max_messages) {
        assert_eq!(
            js.get_stream(name).await?.info().await?.config.max_messages,
            max_messages,
            "the edge changed {name}"
        );
    }

    // The durable consumers of the router and the persister: the edge may
    // neither delete them nor pull (and ack) from them, which would keep
    // messages from being routed or stored.
    let stolen_inbox = edge.new_inbox();
    let mut stolen = edge.subscribe(stolen_inbox.clone()).await?;
    let pull = json!({"batch":10,"expires":10_000_000_000u64}).to_string();
    let durables: Vec<(&String, &str)> = messages_streams
        .iter()
        .flat_map(|name| {
            [subjects::PERSISTER_CONSUMER, subjects::ROUTER_CONSUMER].map(|durable| (name, durable))
        })
        .collect();
    for (name, durable) in &durables {
        edge.publish_with_reply(
            format!("$JS.API.CONSUMER.MSG.NEXT.{name}.{durable}"),
            stolen_inbox.clone(),
            pull.clone().into(),
        )
        .await?;
    }
    edge.flush().await?;
    let deletes = futures::future::join_all(durables.iter().map(|(name, durable)| {
        let edge = edge.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(3),
                edge.request(
                    format!("$JS.API.CONSUMER.DELETE.{name}.{durable}"),
                    "".into(),
                ),
            )
            .await
        }
    }))
    .await;
    for answer in deletes {
        if let Ok(Ok(reply)) = answer {
            anyhow::bail!(
                "the edge deleted a consumer: {}",
                String::from_utf8_lossy(&reply.payload)
            );
        }
    }
    for (name, durable) in &durables {
        assert!(
            js.get_stream(*name)
                .await?
                .consumer_info(*durable)
                .await
                .is_ok(),
            "the edge deleted the {durable} consumer of {name}"
        );
    }
    // A message sent now is routed back to its sender and stored at once,
    // and none of it reached the edge's pull requests.
    let sent = alice
        .send_message(json!({"to":"bob"}), "after", "k2")
        .await?;
    assert_eq!(sent["type"], "sent");
    let echoed = alice.recv_matching(|f| f["text"] == "after").await?;
    assert_eq!(echoed["type"], "message");
    let database = system.database_of("dm:alice:bob").await?;
    chat_tests::wait_until(|| {
        let database = &database;
        async move {
            database
                .query_one("SELECT count(*) FROM messages WHERE body = 'after'", &[])
                .await
                .is_ok_and(|row| row.get::<_, i64>(0) == 1)
        }
    })
    .await?;
    let leaked = tokio::time::timeout(Duration::from_millis(300), stolen.next()).await;
    assert!(leaked.is_err(), "the edge pulled from a durable consumer");
    Ok(())
}

/// How many messages each of `names` holds, by name.
async fn stream_counts(
    js: &async_nats::jetstream::Context,
    names: &[String],
) -> anyhow::Result<Vec<(String, u64)>> {
    let mut counts = Vec::new();
    for name in names {
        let stored = streams::stored(js, std::slice::from_ref(name)).await?;
        counts.push((name.clone(), stored));
    }
    Ok(counts)
}
