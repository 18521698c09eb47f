//! One account against everyone else (issue 14, item 1 and the second half
//! of item 10): quotas over every edge, bounded streams under a flood,
//! bounded push previews, texts refused before queueing, metered pings,
//! acks and refreshes, and `client_msg_id` reuse.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use async_nats::jetstream;
use chat_shared::config::{QuotaConfig, StoreBounds};
use chat_shared::ids::UserId;
use chat_shared::push::{PushJob, PREVIEW_BYTES};
use chat_shared::subjects;
use chat_tests::{streams, Client, System, QUOTA_OFF_SCALE, WAIT};
use serde_json::{json, Value};

fn is_refused(reply: &Value, code: &str) -> bool {
    reply["type"] == "error" && reply["code"] == code
}

/// The retry advice of a `rate_limited` reply, checked to be there.
fn retry_after(reply: &Value) -> anyhow::Result<u64> {
    ensure!(is_refused(reply, "rate_limited"), "{reply}");
    reply["retry_after_ms"]
        .as_u64()
        .filter(|ms| *ms > 0)
        .with_context(|| format!("no retry_after_ms in {reply}"))
}

async fn create_group(client: &mut Client, members: &[&str]) -> anyhow::Result<String> {
    let created = client
        .request(json!({"type":"group.create","name":"g","members":members}))
        .await?;
    let id = created["group"]["id"]
        .as_str()
        .with_context(|| format!("no group in {created}"))?;
    Ok(format!("group:{id}"))
}

/// Waits out the end of the current calendar minute if it is near, so a
/// test of a per-minute quota does not straddle two windows.
async fn away_from_a_minute_boundary() {
    let into_minute = chat_shared::clock::now_ms() % 60_000;
    if into_minute > 45_000 {
        tokio::time::sleep(Duration::from_millis(60_000 - into_minute + 100)).await;
    }
}

#[tokio::test]
async fn a_quota_holds_over_two_edges_while_another_user_sends() -> anyhow::Result<()> {
    const PER_DAY: usize = 12;
    let mut system = System::start_with(|c| {
        c.quota = QuotaConfig {
            messages_per_day: PER_DAY as u64,
            groups_per_day: 2,
            fanout_bytes_per_minute: 100_000,
            ..QUOTA_OFF_SCALE
        }
    })
    .await?;
    let second = system.start_edge().await?;
    let mut mallory_a = system.connect("mallory", "a").await?;
    let mut mallory_b = system.connect_at(second, "mallory", "b", None).await?;
    assert_ne!(mallory_a.welcome["edge"], mallory_b.welcome["edge"]);
    let mut alice = system.connect("alice", "d").await?;
    let mut bob = system.connect_at(second, "bob", "d", None).await?;

    // Half of the day's quota on one edge, the rest on the other.
    let mut accepted = 0;
    let mut refused = None;
    for i in 0..PER_DAY / 2 {
        let sent = mallory_a
            .send_message(json!({"to":"alice"}), "spam", &format!("a{i}"))
            .await?;
        ensure!(sent["type"] == "sent", "{sent}");
        accepted += 1;
    }
    for i in 0..PER_DAY {
        let reply = mallory_b
            .send_message(json!({"to":"alice"}), "spam", &format!("b{i}"))
            .await?;
        if reply["type"] == "sent" {
            accepted += 1;
        } else {
            refused = Some(reply);
            break;
        }
        // Another user on the same edges goes on as usual.
        let sent = bob
            .send_message(json!({"to":"alice"}), "hello", &format!("bob{i}"))
            .await?;
        ensure!(sent["type"] == "sent", "{sent}");
    }
    assert_eq!(
        accepted, PER_DAY,
        "the quota is over both edges, not per edge"
    );
    let refused = refused.context("the second edge never refused")?;
    let wait = retry_after(&refused)?;
    assert!(wait <= 24 * 3600 * 1000, "{refused}");
    // The first edge refuses too: the count is global.
    let again = mallory_a
        .send_message(json!({"to":"alice"}), "spam", "a-late")
        .await?;
    retry_after(&again)?;
    // Others are unaffected, on both edges.
    for (i, client) in [&mut bob, &mut alice].into_iter().enumerate() {
        let sent = client
            .send_message(json!({"to":"carol"}), "still fine", &format!("after{i}"))
            .await?;
        ensure!(sent["type"] == "sent", "{sent}");
    }
    // Nothing refused was stored: alice got exactly the accepted ones.
    let mut from_mallory = 0;
    for frame in alice.drain().await? {
        if frame["type"] == "message" && frame["from"] == "mallory" {
            from_mallory += 1;
        }
    }
    while from_mallory < PER_DAY {
        let frame = alice
            .recv_matching(|f| f["type"] == "message" && f["from"] == "mallory")
            .await?;
        ensure!(frame["text"] == "spam");
        from_mallory += 1;
    }
    let late = alice.next_within(Duration::from_millis(500)).await?;
    assert!(
        late.as_ref().is_none_or(|f| f["from"] != "mallory"),
        "{late:?}"
    );

    // Groups per day, over both edges.
    create_group(&mut mallory_a, &["alice"]).await?;
    create_group(&mut mallory_b, &["bob"]).await?;
    let third = mallory_a
        .request(json!({"type":"group.create","name":"g3","members":["bob"]}))
        .await?;
    retry_after(&third)?;
    create_group(&mut bob, &["alice"]).await?;

    // Fan-out bytes per minute: bob's group of four takes 40,000 bytes of
    // fan-out per 10,000-byte text, so the third within a minute is refused,
    // and a text whose fan-out exceeds the whole quota never fits.
    away_from_a_minute_boundary().await;
    let group = create_group(&mut bob, &["alice", "carol", "dave"]).await?;
    let text = "x".repeat(10_000);
    for i in 0..2 {
        let sent = bob
            .send_message(json!({"conversation":group}), &text, &format!("f{i}"))
            .await?;
        ensure!(sent["type"] == "sent", "{sent}");
    }
    let third = bob
        .send_message(json!({"conversation":group}), &text, "f2")
        .await?;
    retry_after(&third)?;
    let huge = bob
        .send_message(json!({"conversation":group}), &"y".repeat(30_000), "f3")
        .await?;
    assert!(is_refused(&huge, "too_large"), "{huge}");
    Ok(())
}

#[tokio::test]
async fn a_flood_into_a_group_keeps_streams_bounded_and_others_delivered() -> anyhow::Result<()> {
    const FLOOD: Duration = Duration::from_secs(15);
    const MEMBERS: usize = 20;
    let system = System::start().await?;
    // Shrink the bounds of the running system, as an operator would apply
    // a changed configuration to an existing deployment.
    let partitions = system.config.partitions;
    // MESSAGES keeps history and refuses sends once full; the flood (one
    // conversation, one partition) is not meant to fill it. A bound is
    // divided among the partitions, so each gets room for the whole flood.
    let bounds = StoreBounds {
        messages: (64 << 20) * i64::from(partitions.count()),
        inbox: 8 << 20,
        inbox_items_per_user: 100,
        ..chat_tests::TEST_BOUNDS
    };
    let admin = jetstream::new(system.admin().await?);
    let mut small = system.config.clone();
    small.bounds = bounds.clone();
    chat_shared::streams::apply(&admin, &small).await?;

    let mut flooder = system.connect("flooder", "d").await?;
    let mut alice = system.connect("alice", "d").await?;
    let mut bob = system.connect("bob", "d").await?;
    // Bob is in the flooded group; the rest are made-up ids.
    let mut members: Vec<String> = (0..MEMBERS - 2).map(|i| format!("ghost{i}")).collect();
    members.push("bob".into());
    let created = flooder
        .request(json!({"type":"group.create","name":"flood","members":members}))
        .await?;
    let group = format!(
        "group:{}",
        created["group"]["id"].as_str().context("group id")?
    );

    // About 120 KB of JSON per text (control characters escape to six
    // bytes), 2.4 MB per message over the group's inboxes.
    let text: String = "\u{1}".repeat(20_000);
    let flood = tokio::spawn(async move {
        let started = Instant::now();
        let mut sent = 0u32;
        while started.elapsed() < FLOOD && sent < 200 {
            let reply = flooder
                .send_message(json!({"conversation":group}), &text, &format!("f{sent}"))
                .await?;
            ensure!(reply["type"] == "sent", "{reply}");
            sent += 1;
        }
        anyhow::Ok(sent)
    });
    // Meanwhile alice writes to bob every 300 ms; each must be sent and
    // reach him live, through the flood in his own inbox.
    let talk = tokio::spawn(async move {
        let started = Instant::now();
        let mut ids = Vec::new();
        while started.elapsed() < FLOOD {
            let sent = alice
                .send_message(
                    json!({"to":"bob"}),
                    "still here",
                    &format!("a{}", ids.len()),
                )
                .await?;
            ensure!(sent["type"] == "sent", "{sent}");
            ids.push(sent["id"].as_str().context("id")?.to_string());
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        anyhow::Ok(ids)
    });
    let listen = tokio::spawn(async move {
        let mut got = HashSet::new();
        let mut flooded = 0u32;
        let started = Instant::now();
        while started.elapsed() < FLOOD + WAIT {
            let Some(frame) = bob.next_within(Duration::from_millis(500)).await? else {
                continue;
            };
            if frame["type"] != "message" {
                continue;
            }
            if frame["from"] == "alice" {
                got.insert(frame["id"].as_str().unwrap_or_default().to_string());
            } else {
                flooded += 1;
            }
            if let Some(cursor) = frame["cursor"].as_str() {
                bob.send(json!({"type":"ack","cursor":cursor})).await?;
            }
        }
        anyhow::Ok((got, flooded))
    });
    let flooded_sends = flood.await??;
    let ids = talk.await??;
    let (got, flooded) = listen.await??;
    ensure!(flooded_sends > 10, "the flood sent only {flooded_sends}");
    ensure!(flooded > 0, "bob saw none of the flood");
    for id in &ids {
        ensure!(got.contains(id), "alice's {id} never reached bob");
    }

    // Split into partitions, each stream holds its share of the bound and
    // all of them together no more than the bound.
    let bob_inbox = partitions.of_user(&UserId::parse("bob")?).inbox_stream();
    for (names, bound, inbox) in [
        (streams::inbox_streams(partitions), bounds.inbox, true),
        (
            streams::messages_streams(partitions),
            bounds.messages,
            false,
        ),
    ] {
        let mut total = 0;
        for name in names {
            let info = admin.get_stream(&name).await?.info().await?.clone();
            ensure!(
                info.state.bytes <= info.config.max_bytes as u64,
                "{name} holds {} bytes over its bound {}",
                info.state.bytes,
                info.config.max_bytes
            );
            total += info.state.bytes;
            if inbox {
                ensure!(info.config.max_messages_per_subject == 100, "{name}");
            }
            if name == bob_inbox {
                // The flood wrote far more than the bound into the inbox of
                // every member, bob's among them: the oldest went.
                ensure!(info.state.first_sequence > 1, "{name}: {:?}", info.state);
            }
        }
        ensure!(
            total <= bound as u64,
            "{total} bytes held over the bound {bound}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_push_job_carries_a_bounded_preview() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "d").await?;
    // Bob is offline (never connected): the router makes him a push job.
    let text = "é".repeat(50_000);
    let sent = alice.send_message(json!({"to":"bob"}), &text, "p1").await?;
    ensure!(sent["type"] == "sent", "{sent}");
    let admin = jetstream::new(system.admin().await?);
    let push = admin.get_stream(subjects::PUSH_STREAM).await?;
    let bob = chat_shared::ids::UserId::parse("bob")?;
    let subject = subjects::push(&bob);
    let deadline = Instant::now() + WAIT;
    let job = loop {
        if let Ok(message) = push.get_last_raw_message_by_subject(&subject).await {
            break serde_json::from_slice::<PushJob>(&message.payload)?;
        }
        ensure!(Instant::now() < deadline, "no push job for bob");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(job.text.len() <= PREVIEW_BYTES, "{} bytes", job.text.len());
    assert!(text.starts_with(job.text.trim_end_matches('…')));
    assert!(job.text.len() > PREVIEW_BYTES - 8, "a preview, not nothing");
    Ok(())
}

#[tokio::test]
async fn an_overlong_text_is_refused_before_it_is_queued() -> anyhow::Result<()> {
    const QUEUED: usize = 100;
    let system = System::start().await?;
    let mut alice = system.connect("alice", "d").await?;
    let mut bob = system.connect("bob", "d").await?;
    // More sends than the queue holds, then one too long: it is answered
    // as soon as it is read, ahead of sends queued before it.
    for i in 0..QUEUED {
        alice
            .send(json!({"type":"send","to":"bob","text":"m","client_msg_id":format!("q{i}"),"ref":format!("q{i}")}))
            .await?;
    }
    let long = "x".repeat(MAX_TEXT_CHARS + 1);
    alice
        .send(json!({"type":"send","to":"bob","text":long,"client_msg_id":"long","ref":"long"}))
        .await?;
    let mut order = Vec::new();
    while order.len() < QUEUED + 1 {
        let frame = alice
            .recv_matching(|f| f["type"] == "sent" || f["type"] == "error")
            .await?;
        order.push(frame);
    }
    let position = order
        .iter()
        .position(|f| f["ref"] == "long")
        .context("no answer to the long text")?;
    assert!(
        is_refused(&order[position], "too_large"),
        "{}",
        order[position]
    );
    let last_sent = order
        .iter()
        .rposition(|f| f["type"] == "sent")
        .context("no sent")?;
    assert!(
        position < last_sent,
        "answered at {position}, after every queued send"
    );
    // Nothing of it was stored: bob gets the queued ones only.
    let mut texts = Vec::new();
    while texts.len() < QUEUED {
        let message = bob.recv_type("message").await?;
        texts.push(message["text"].as_str().unwrap_or_default().len());
    }
    assert!(texts.iter().all(|len| *len == 1));
    let late = bob.next_within(Duration::from_millis(500)).await?;
    assert!(late.is_none_or(|f| f["type"] != "message"));
    Ok(())
}

/// PROTOCOL.md's longest text, in characters.
const MAX_TEXT_CHARS: usize = 100_000;

#[tokio::test]
async fn reusing_a_client_msg_id_for_another_message_is_bad_request() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "d").await?;
    let mut bob = system.connect("bob", "d").await?;
    let first = alice
        .send_message(json!({"to":"bob"}), "one", "same")
        .await?;
    ensure!(first["type"] == "sent", "{first}");
    let other_text = alice
        .send_message(json!({"to":"bob"}), "two", "same")
        .await?;
    assert!(is_refused(&other_text, "bad_request"), "{other_text}");
    let other_conversation = alice
        .send_message(json!({"to":"carol"}), "one", "same")
        .await?;
    assert!(
        is_refused(&other_conversation, "bad_request"),
        "{other_conversation}"
    );
    // The same request again is still a duplicate of the first.
    let retry = alice
        .send_message(json!({"to":"bob"}), "one", "same")
        .await?;
    assert_eq!(
        (&retry["type"], &retry["id"], &retry["duplicate"]),
        (&json!("sent"), &first["id"], &json!(true))
    );
    let message = bob.recv_type("message").await?;
    assert_eq!(message["text"], "one");
    let late = bob.next_within(Duration::from_millis(500)).await?;
    assert!(late.is_none_or(|f| f["type"] != "message"));
    Ok(())
}

#[tokio::test]
async fn pings_acks_and_refreshes_are_metered() -> anyhow::Result<()> {
    const BURST: usize = 40;
    let system = System::start_with(|c| c.limits.requests_per_connection = 5).await?;
    let token = system.token("alice");
    for kind in ["ping", "ack", "refresh"] {
        let mut client = system.connect("alice", kind).await?;
        for i in 0..BURST {
            let frame = match kind {
                "ping" => json!({"type":"ping","ref":format!("p{i}")}),
                "ack" => json!({"type":"ack","cursor":"0"}),
                _ => json!({"type":"refresh","token":token,"ref":format!("r{i}")}),
            };
            client.send(frame).await?;
        }
        // Every ping and refresh is answered; acks are answered only when
        // refused. A burst of 40 at 5 per second is refused in part.
        let mut refused = 0;
        let started = Instant::now();
        while let Some(frame) = client.next_within(Duration::from_millis(500)).await? {
            if frame["type"] == "error" {
                retry_after(&frame)?;
                refused += 1;
            }
            ensure!(started.elapsed() < WAIT, "{kind}: no end of replies");
        }
        assert!(
            refused >= BURST / 2,
            "{kind}: only {refused} of {BURST} refused"
        );
    }
    Ok(())
}
