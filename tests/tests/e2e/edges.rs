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
        chat_tests::wait_until(|| {
            let js = js.clone();
            async move {
                match js.get_stream("MESSAGES").await {
                    Ok(stream) => stream.cached_info().state.messages as usize >= EACH * 2 / 3,
                    Err(_) => false,
                }
            }
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
    let system = System::start_with(|c| {
        c.heartbeat = Duration::from_secs(1);
        c.heartbeat_grace = Duration::from_secs(1);
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
    let mut pinging = true;
    for i in 0..MESSAGES {
        let sent = bob
            .send_message(json!({"to":"sleeper"}), &text, &format!("big{i}"))
            .await?;
        assert_eq!(sent["type"], "sent");
        if i % 10 == 0 {
            peak = peak.max(edge.rss_bytes()?);
            // Writing needs no reading: the sleeper stays alive (heartbeat)
            // until the edge gives up on it.
            if pinging {
                pinging = sleeper.send(json!({"type":"ping"})).await.is_ok();
            }
        }
    }
    // Now read: what was buffered, then the end of the connection.
    let mut messages = 0;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(frame) = sleeper.next_raw().await {
            if frame.contains("\"type\":\"message\"") {
                messages += 1;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the edge kept the stalled connection open");
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
