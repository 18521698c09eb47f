//! Running several edges (issue 7): discovery, cross-edge delivery, drain,
//! limits, slow consumers and token refresh, against real servers.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chat_tests::{http_get, Client, Ending, System};
use serde_json::{json, Value};

async fn edge_urls(addr: std::net::SocketAddr) -> anyhow::Result<Vec<String>> {
    let (status, body) = http_get(addr, "/v1/edges").await?;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(body.split("\r\n\r\n").last().unwrap_or_default())?;
    Ok(body["edges"]
        .as_array()
        .map(|edges| {
            edges
                .iter()
                .filter_map(|e| e["url"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

#[tokio::test]
async fn two_edges_deliver_across_and_discovery_drops_a_killed_one() -> anyhow::Result<()> {
    let mut system = System::start_with(|c| c.edge_ttl = Duration::from_secs(2)).await?;
    let second = system.start_edge().await?;
    let mut alice_phone = system.connect("alice", "phone").await?;
    let mut alice_laptop = system.connect_at(second, "alice", "laptop", None).await?;
    let mut bob = system.connect_at(second, "bob", "phone", None).await?;
    assert_ne!(alice_phone.welcome["edge"], alice_laptop.welcome["edge"]);

    let sent = bob
        .send_message(json!({"to":"alice"}), "across edges", "x1")
        .await?;
    assert_eq!(sent["type"], "sent", "{sent}");
    for device in [&mut alice_phone, &mut alice_laptop] {
        let message = device.recv_type("message").await?;
        assert_eq!(message["id"], sent["id"]);
    }
    // Presence across edges: friends on different edges see each other.
    alice_phone
        .request(json!({"type":"friend.request","user":"bob"}))
        .await?;
    bob.request(json!({"type":"friend.accept","user":"alice"}))
        .await?;
    let seen = alice_phone
        .recv_matching(|f| f["type"] == "presence" && f["user"] == "bob")
        .await?;
    assert_eq!(seen["status"], "online");

    // Discovery: both in-process edges and a process edge, least loaded first.
    let mut process = system
        .spawn_edge_process(env!("CARGO_BIN_EXE_service-under-test"))
        .await?;
    let process_url = format!("ws://{}/v1/ws", process.addr);
    chat_tests::wait_until(|| {
        let url = process_url.clone();
        async move {
            edge_urls(second)
                .await
                .is_ok_and(|urls| urls.len() == 3 && urls[0] == url)
        }
    })
    .await?;
    let from_first = edge_urls(system.edge_addr).await?;
    assert_eq!(from_first.len(), 3);
    assert_eq!(from_first[0], process_url, "the idle edge comes first");

    process.kill().await?;
    let killed = Instant::now();
    chat_tests::wait_until(|| async {
        edge_urls(second)
            .await
            .is_ok_and(|urls| urls.len() == 2 && !urls.contains(&process_url))
    })
    .await?;
    assert!(
        killed.elapsed() < Duration::from_secs(6),
        "gone within the 2 s TTL (plus expiry sweeps)"
    );
    Ok(())
}

/// Notes a message frame: its text by id, its cursor, and whether its id
/// was seen before.
fn record(
    frame: &Value,
    seen: &mut BTreeMap<String, String>,
    cursor: &mut Option<String>,
    repeats: &mut usize,
) {
    *cursor = frame["cursor"].as_str().map(str::to_string);
    let id = frame["id"].as_str().unwrap_or_default().to_string();
    let text = frame["text"].as_str().unwrap_or_default().to_string();
    if seen.insert(id, text).is_some() {
        *repeats += 1;
    }
}

/// Receives until `count` distinct messages arrived, following `reconnect`
/// to another edge with the last cursor; returns (id -> text) and how many
/// times a reconnect happened.
async fn receive_all(
    system: &System,
    mut client: Client,
    user: &str,
    count: usize,
) -> anyhow::Result<(BTreeMap<String, String>, usize, usize)> {
    let mut seen = BTreeMap::new();
    let mut repeats = 0;
    let mut reconnects = 0;
    let mut cursor: Option<String> = None;
    while seen.len() < count {
        let frame = client.recv().await?;
        match frame["type"].as_str() {
            Some("message") => record(&frame, &mut seen, &mut cursor, &mut repeats),
            Some("reconnect") => {
                reconnects += 1;
                let url = frame["edges"][0].as_str().unwrap_or_default().to_string();
                assert_eq!(client.ending().await?, Ending::Closed(1001));
                client = system
                    .connect_url(&url, &system.token(user), "phone", cursor.as_deref())
                    .await?;
                for frame in std::mem::take(&mut client.backlog) {
                    if frame["type"] == "message" {
                        record(&frame, &mut seen, &mut cursor, &mut repeats);
                    }
                }
            }
            _ => {}
        }
    }
    Ok((seen, repeats, reconnects))
}

#[tokio::test]
async fn draining_an_edge_under_load_loses_and_repeats_nothing() -> anyhow::Result<()> {
    let mut system = System::start_with(|c| {
        c.drain_batch = 1;
        c.drain_batch_interval = Duration::from_millis(100);
        c.drain_timeout = Duration::from_secs(10);
    })
    .await?;
    let stable = system.start_edge().await?;
    let (drained_addr, drained) = {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, running) = system
            .start_edge_task(Box::pin(async move {
                let _ = rx.await;
            }))
            .await?;
        // Keep the trigger; the drain is started through NATS, like chatctl.
        std::mem::forget(tx);
        (addr, running)
    };
    let receiver = system
        .connect_at(drained_addr, "alice", "phone", None)
        .await?;
    let drained_id = receiver.welcome["edge"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut bob = system.connect_at(stable, "bob", "phone", None).await?;
    let mut carol = system
        .connect_at(drained_addr, "carol", "phone", None)
        .await?;

    const EACH: usize = 300;
    let receiving = {
        let system = &system;
        async move { receive_all(system, receiver, "alice", EACH * 2).await }
    };
    let bob_sends = async {
        for i in 0..EACH {
            let sent = bob
                .send_message(json!({"to":"alice"}), &format!("b{i}"), &format!("b{i}"))
                .await?;
            anyhow::ensure!(sent["type"] == "sent", "{sent}");
        }
        anyhow::Ok(())
    };
    // carol is on the edge that drains: she follows `reconnect` and retries
    // what was not confirmed with the same client_msg_id.
    let carol_sends = async {
        let mut i = 0;
        while i < EACH {
            carol
                .send(json!({"type":"send","ref":format!("c{i}"),"to":"alice","text":format!("c{i}"),"client_msg_id":format!("c{i}")}))
                .await?;
            loop {
                let frame = carol.recv().await?;
                match frame["type"].as_str() {
                    Some("sent") if frame["ref"] == format!("c{i}") => {
                        i += 1;
                        break;
                    }
                    Some("reconnect") => {
                        let url = frame["edges"][0].as_str().unwrap_or_default().to_string();
                        assert_eq!(carol.ending().await?, Ending::Closed(1001));
                        carol = system
                            .connect_url(&url, &system.token("carol"), "phone", None)
                            .await?;
                        break; // resend i
                    }
                    Some("error") => anyhow::bail!("carol: {frame}"),
                    _ => {}
                }
            }
        }
        anyhow::Ok(())
    };
    let drain = async {
        // Drain mid-flow: once a third of the messages are in.
        let admin = system.admin().await?;
        let js = async_nats::jetstream::new(admin.clone());
        let messages = chat_tests::streams::messages_streams(system.config.partitions);
        chat_tests::wait_until(|| async {
            chat_tests::streams::stored(&js, &messages)
                .await
                .is_ok_and(|stored| stored as usize >= EACH * 2 / 3)
        })
        .await?;
        let listed = chatctl::edges::list(&js, system.config.edge_ttl).await?;
        anyhow::ensure!(
            listed
                .iter()
                .any(|e| e.id.as_str() == drained_id && !e.draining),
            "chatctl edges: {listed:?}"
        );
        chatctl::edges::drain(&admin, &js, system.config.edge_ttl, &drained_id).await?;
        let started = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(15), drained).await??;
        anyhow::ensure!(ended.is_ok(), "the drained edge's run failed: {ended:?}");
        anyhow::Ok(started.elapsed())
    };
    let (received, bob_done, carol_done, drained_in) =
        tokio::join!(receiving, bob_sends, carol_sends, drain);
    bob_done?;
    carol_done?;
    let drained_in = drained_in?;
    let (seen, repeats, reconnects) = received?;
    assert_eq!(reconnects, 1, "alice followed one reconnect");
    assert_eq!(repeats, 0, "no message twice");
    let mut expected: Vec<String> = (0..EACH)
        .flat_map(|i| [format!("b{i}"), format!("c{i}")])
        .collect();
    expected.sort();
    let mut texts: Vec<String> = seen.values().cloned().collect();
    texts.sort();
    assert_eq!(texts, expected, "every message exactly once");
    assert!(
        drained_in < Duration::from_secs(10),
        "drained in {drained_in:?}"
    );
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_a_process_edge_and_it_exits_zero() -> anyhow::Result<()> {
    let system = System::start_with(|c| c.drain_timeout = Duration::from_secs(5)).await?;
    let mut edge = system
        .spawn_edge_process(env!("CARGO_BIN_EXE_service-under-test"))
        .await?;
    let mut client = system.connect_at(edge.addr, "alice", "phone", None).await?;
    edge.terminate()?;
    let reconnect = client.recv_type("reconnect").await?;
    let urls = reconnect["edges"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        urls,
        vec![json!(system.ws_url())],
        "points at the other edge"
    );
    assert_eq!(client.ending().await?, Ending::Closed(1001));
    assert_eq!(edge.wait(Duration::from_secs(10)).await?, Some(0));
    Ok(())
}

#[tokio::test]
async fn a_fast_sender_is_held_to_its_rate_and_abuse_closes_4008() -> anyhow::Result<()> {
    let system = System::start_with(|c| {
        c.limits.send_per_connection = 5;
        c.limits.send_per_user = 1000;
        c.limits.abuse_strikes = 40;
    })
    .await?;
    let mut alice = system.connect("alice", "phone").await?;
    let _bob = system.connect("bob", "phone").await?;
    let started = Instant::now();
    for i in 0..30 {
        alice
            .send(json!({"type":"send","ref":format!("r{i}"),"to":"bob","text":"hi","client_msg_id":format!("m{i}")}))
            .await?;
    }
    let mut sent: u32 = 0;
    let mut limited = Vec::new();
    for _ in 0..30 {
        let frame = alice
            .recv_matching(|f| f["type"] == "sent" || f["type"] == "error")
            .await?;
        if frame["type"] == "sent" {
            sent += 1;
        } else {
            assert_eq!(frame["code"], "rate_limited", "{frame}");
            limited.push(frame["retry_after_ms"].as_u64().unwrap_or(0));
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // A burst of 10, then 5 per second.
    let allowed = 10.0 + 5.0 * elapsed;
    assert!(
        sent >= 10 && f64::from(sent) <= allowed + 1.0,
        "{sent} sent in {elapsed:.2}s"
    );
    assert_eq!(sent as usize + limited.len(), 30);
    assert!(
        limited.iter().all(|ms| (1..=200).contains(ms)),
        "{limited:?}"
    );

    // Ignoring the refusals: past 40 strikes in 10 s the connection is
    // closed. One frame at a time, each answer read, so the close frame is
    // not lost to a reset caused by frames sent after it.
    let mut closed = None;
    for i in 0..200 {
        alice
            .send(json!({"type":"send","ref":format!("x{i}"),"to":"bob","text":"spam","client_msg_id":format!("x{i}")}))
            .await?;
        // The refusal, then (maybe) the close right behind it.
        let mut ending = alice.recv_or_end().await?.err();
        if ending.is_none() {
            if let Ok(next) =
                tokio::time::timeout(Duration::from_millis(100), alice.recv_or_end()).await
            {
                ending = next?.err();
            }
        }
        if let Some(ending) = ending {
            closed = Some((i, ending));
            break;
        }
    }
    let (after, ending) = closed.expect("closed for abuse");
    assert_eq!(ending, Ending::Closed(4008));
    assert!(after >= 20, "closed after {after} more refusals");
    Ok(())
}

#[tokio::test]
async fn a_client_that_does_not_read_is_cut_off_and_memory_stays_bounded() -> anyhow::Result<()> {
    // A heartbeat far longer than the test: the idle timeout (2 x 60 s + 5 s,
    // which also bounds a stalled write) cannot be what ends the sleeper's
    // connection; only the live queue's bound can, with 1013.
    let system = System::start_with(|c| {
        c.heartbeat = Duration::from_secs(60);
        c.heartbeat_grace = Duration::from_secs(5);
    })
    .await?;
    let edge = system
        .spawn_edge_process(env!("CARGO_BIN_EXE_service-under-test"))
        .await?;
    let mut sleeper = system
        .connect_at(edge.addr, "sleeper", "phone", None)
        .await?;
    let before = edge.rss_bytes()?;
    let mut bob = system.connect("bob", "phone").await?;
    let text = "x".repeat(100_000);
    const MESSAGES: usize = 400; // 40 MB for a client that reads nothing
    let mut peak = before;
    for i in 0..MESSAGES {
        let sent = bob
            .send_message(json!({"to":"sleeper"}), &text, &format!("big{i}"))
            .await?;
        assert_eq!(sent["type"], "sent");
        if i % 10 == 0 {
            peak = peak.max(edge.rss_bytes()?);
        }
    }
    // Now read: what was buffered, then the end of the connection.
    let mut messages = 0;
    let ending = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match sleeper.recv_or_end().await? {
                Ok(frame) => {
                    if frame["type"] == "message" {
                        messages += 1;
                    }
                }
                Err(ending) => return anyhow::Ok(ending),
            }
        }
    })
    .await;
    let Ok(ending) = ending else {
        panic!("the edge kept the stalled connection open");
    };
    assert_eq!(
        ending?,
        Ending::Closed(1013),
        "cut off as too slow (1013), not for a missed heartbeat (4003) or a dropped socket"
    );
    assert!(
        messages < MESSAGES,
        "it was cut off ({messages} of {MESSAGES} arrived)"
    );
    let growth = peak.saturating_sub(before);
    eprintln!(
        "stalled client: {messages} of {MESSAGES} messages arrived; edge RSS {} MiB before, peak growth {} KiB",
        before / (1024 * 1024),
        growth / 1024
    );
    assert!(
        growth < 24 * 1024 * 1024,
        "edge memory grew by {} MiB while 40 MB queued for a stalled client",
        growth / (1024 * 1024)
    );
    Ok(())
}

#[tokio::test]
async fn refresh_keeps_a_connection_and_expiry_closes_4001() -> anyhow::Result<()> {
    let system = System::start_with(|c| c.jwt_leeway = Duration::ZERO).await?;
    let short = system.token_for("alice", Duration::from_secs(2));
    let mut refreshed = system
        .connect_url(&system.ws_url(), &short, "phone", None)
        .await?;
    let mut lapsing = system
        .connect_url(&system.ws_url(), &short, "laptop", None)
        .await?;
    let ok = refreshed
        .request(json!({"type":"refresh","token":system.token("alice")}))
        .await?;
    assert_eq!(ok["type"], "ok", "{ok}");
    let wrong = refreshed
        .request(json!({"type":"refresh","token":"not-a-jwt"}))
        .await?;
    assert_eq!(wrong["code"], "unauthorized");

    let expired = lapsing.recv_type("error").await?;
    assert_eq!(expired["code"], "token_expired");
    assert_eq!(lapsing.ending().await?, Ending::Closed(4001));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pong = refreshed.request(json!({"type":"ping"})).await?;
    assert_eq!(pong["type"], "pong", "the refreshed connection lives on");

    // A token for someone else is refused and ends the connection.
    let bobs = system.token("bob");
    let refused = refreshed
        .request(json!({"type":"refresh","token":bobs}))
        .await?;
    assert_eq!(refused["code"], "unauthorized");
    assert_eq!(refreshed.ending().await?, Ending::Closed(4001));
    Ok(())
}

/// A send from `client` that is not waited for.
async fn send_now(client: &mut Client, reference: &str, to: &str) -> anyhow::Result<()> {
    client
        .send(json!({"type":"send","ref":reference,"to":to,"text":"hi","client_msg_id":reference}))
        .await
}

/// Reads the answers to `count` requests whose `ref` starts with `prefix`:
/// how many were answered, and the `retry_after_ms` of each refusal.
async fn answers(
    client: &mut Client,
    prefix: &str,
    count: usize,
    why: &str,
) -> anyhow::Result<(usize, Vec<u64>)> {
    let mut answered = 0;
    let mut limited = Vec::new();
    for _ in 0..count {
        let frame = client
            .recv_matching(|f| f["ref"].as_str().is_some_and(|r| r.starts_with(prefix)))
            .await?;
        if frame["type"] == "error" {
            assert_eq!(frame["code"], "rate_limited", "{frame}");
            assert!(
                frame["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(why)),
                "refused by the token bucket: {frame}"
            );
            limited.push(frame["retry_after_ms"].as_u64().unwrap_or(0));
        } else {
            answered += 1;
        }
    }
    Ok((answered, limited))
}

#[tokio::test]
async fn a_users_connections_share_the_per_user_send_limit() -> anyhow::Result<()> {
    let system = System::start_with(|c| {
        // Each connection may send 100/s (a burst of 200, never reached
        // here); the user 1/s over all of them (a burst of 2).
        c.limits.send_per_connection = 100;
        c.limits.send_per_user = 1;
    })
    .await?;
    let mut phone = system.connect("alice", "phone").await?;
    let mut laptop = system.connect("alice", "laptop").await?;
    let mut carol = system.connect("carol", "phone").await?;
    let _bob = system.connect("bob", "phone").await?;
    let started = Instant::now();
    // The phone takes the user's burst.
    for i in 0..2 {
        let sent = phone
            .send_message(json!({"to":"bob"}), "hi", &format!("p{i}"))
            .await?;
        assert_eq!(sent["type"], "sent", "{sent}");
    }
    // The laptop has sent nothing yet, but the user's bucket is (nearly)
    // empty: ten sends in a row can only all pass if they take 10 s.
    for i in 0..10 {
        send_now(&mut laptop, &format!("l{i}"), "bob").await?;
    }
    let (sent, limited) = answers(&mut laptop, "l", 10, "sending too fast").await?;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(!limited.is_empty(), "the user's limit held the laptop back");
    assert!(
        limited.iter().all(|ms| (1..=1000).contains(ms)),
        "retry_after_ms within one token's time: {limited:?}"
    );
    // Over both connections: a burst of 2, then 1 per second.
    assert!(
        (2 + sent) as f64 <= 2.0 + elapsed + 1.0,
        "{sent} more sent in {elapsed:.2}s"
    );
    // The limit is the user's, not the edge's: carol sends at once.
    let sent = carol.send_message(json!({"to":"bob"}), "hi", "c0").await?;
    assert_eq!(sent["type"], "sent", "{sent}");
    Ok(())
}

#[tokio::test]
async fn other_requests_have_their_own_per_connection_limit() -> anyhow::Result<()> {
    // 1 request per second, a burst of 2; sends keep the test's high limit.
    let system = System::start_with(|c| c.limits.requests_per_connection = 1).await?;
    let mut alice = system.connect("alice", "phone").await?;
    let _bob = system.connect("bob", "phone").await?;
    let started = Instant::now();
    for i in 0..10 {
        alice
            .send(json!({"type":"conversations","ref":format!("q{i}")}))
            .await?;
    }
    let (answered, limited) = answers(&mut alice, "q", 10, "too many requests").await?;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(answered >= 2, "the burst is answered ({answered})");
    assert!(
        !limited.is_empty(),
        "ten requests in a row were all answered"
    );
    assert!(
        answered as f64 <= 2.0 + elapsed + 1.0,
        "{answered} answered in {elapsed:.2}s"
    );
    assert!(
        limited.iter().all(|ms| (1..=1000).contains(ms)),
        "{limited:?}"
    );
    // Sends have their own bucket (pings share this one since issue 14:
    // abuse::pings_acks_and_refreshes_are_metered).
    let sent = alice.send_message(json!({"to":"bob"}), "hi", "m0").await?;
    assert_eq!(sent["type"], "sent", "{sent}");
    // A client that waits as told is answered.
    let wait = limited.iter().copied().max().unwrap_or(1000);
    tokio::time::sleep(Duration::from_millis(wait + 200)).await;
    let reply = alice.request(json!({"type":"conversations"})).await?;
    assert_ne!(reply["type"], "error", "{reply}");
    Ok(())
}

#[tokio::test]
async fn new_connections_from_one_address_are_rate_limited_with_429() -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    // 1 upgrade per second per client IP, a burst of 2: ten upgrades in a
    // row can only all pass if they take 8 s.
    let system = System::start_with(|c| c.limits.connects_per_ip = 1).await?;
    let url = system.ws_url();
    let mut opened = Vec::new();
    let mut refusal = None;
    for _ in 0..10 {
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((socket, _)) => opened.push(socket),
            Err(WsError::Http(response)) => {
                refusal = Some(response);
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let Some(response) = refusal else {
        panic!("{} upgrades in a row were all accepted", opened.len());
    };
    assert!(opened.len() >= 2, "the burst passes ({})", opened.len());
    assert_eq!(response.status().as_u16(), 429);
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(retry_after, Some(1), "one token's time, in whole seconds");
    // Only upgrades count: plain HTTP is still answered.
    let (status, _) = http_get(system.edge_addr, "/healthz").await?;
    assert_eq!(status, 200);
    // Waiting as told, the address gets in again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut alice = system.connect("alice", "phone").await?;
    let pong = alice.request(json!({"type":"ping"})).await?;
    assert_eq!(pong["type"], "pong", "{pong}");
    Ok(())
}

#[tokio::test]
async fn a_user_past_the_connection_limit_is_refused_with_4008() -> anyhow::Result<()> {
    let system = System::start_with(|c| c.limits.connections_per_user = 2).await?;
    let _phone = system.connect("alice", "phone").await?;
    let laptop = system.connect("alice", "laptop").await?;
    let mut third = Client::open(&system.ws_url()).await?;
    third
        .send(json!({"type":"hello","token":system.token("alice"),"device":"tablet"}))
        .await?;
    let refused = third.recv_or_end().await?;
    let Ok(refused) = refused else {
        panic!("closed without an error frame: {refused:?}");
    };
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert_eq!(third.ending().await?, Ending::Closed(4008));
    // Per user: someone else still gets in.
    let _bob = system.connect("bob", "phone").await?;
    // A connection that ends gives its slot back.
    laptop.close().await?;
    chat_tests::wait_until(|| async { system.connect("alice", "tablet").await.is_ok() }).await?;
    Ok(())
}

#[tokio::test]
async fn a_draining_edge_drops_out_of_discovery() -> anyhow::Result<()> {
    let system = System::start_with(|c| {
        // One client told per batch, a minute apart: with two clients the
        // edge stays draining (and reachable) for the rest of the test.
        c.drain_batch = 1;
        c.drain_batch_interval = Duration::from_secs(60);
        c.drain_timeout = Duration::from_secs(120);
    })
    .await?;
    let (trigger, drain) = tokio::sync::oneshot::channel::<()>();
    let (addr, _running) = system
        .start_edge_task(Box::pin(async move {
            let _ = drain.await;
        }))
        .await?;
    let url = format!("ws://{addr}/v1/ws");
    let alice = system.connect_at(addr, "alice", "phone", None).await?;
    let _bob = system.connect_at(addr, "bob", "phone", None).await?;
    let id = alice.welcome["edge"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    chat_tests::wait_until(|| async {
        edge_urls(system.edge_addr)
            .await
            .is_ok_and(|urls| urls.contains(&url))
    })
    .await?;

    let _ = trigger.send(());
    // Neither edge lists it any more, itself included.
    for listing in [system.edge_addr, addr] {
        chat_tests::wait_until(|| async {
            edge_urls(listing)
                .await
                .is_ok_and(|urls| urls == vec![system.ws_url()])
        })
        .await?;
    }
    // It is dropped for draining, not gone: its entry is fresh and says so.
    let admin = system.admin().await?;
    let js = async_nats::jetstream::new(admin);
    let listed = chatctl::edges::list(&js, system.config.edge_ttl).await?;
    let entry = listed.iter().find(|e| e.id.as_str() == id);
    assert!(
        entry.is_some_and(|e| e.draining && e.connections >= 1),
        "{listed:?}"
    );
    let (status, _) = http_get(addr, "/readyz").await?;
    assert_eq!(status, 503, "a draining edge is not ready");
    Ok(())
}
