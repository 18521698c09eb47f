//! Observability: every service's `/metrics` is valid Prometheus text and
//! moves as traffic flows; a message's trace id follows it from the edge
//! into MESSAGES, the inbox and the live delivery.

use std::net::SocketAddr;

use anyhow::{ensure, Context, Result};
use chat_shared::ids::{ConversationId, UserId};
use chat_shared::subjects;
use chat_shared::telemetry::TraceId;
use chat_tests::metrics::Scrape;
use chat_tests::{scrape, streams, wait_until, Client, Ending, System};
use futures::StreamExt;
use serde_json::json;

const MESSAGES: usize = 5;

/// Every service serves its own port (0: picked by the OS).
async fn system_with_metrics() -> Result<System> {
    System::start_with(|config| config.metrics_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0))))
        .await
}

/// Waits until `/metrics` at `addr` satisfies `condition`; returns that scrape.
async fn scrape_until(addr: SocketAddr, condition: impl Fn(&Scrape) -> bool) -> Result<Scrape> {
    wait_until(|| async { scrape(addr).await.is_ok_and(|s| condition(&s)) }).await?;
    scrape(addr).await
}

async fn send_messages(alice: &mut Client, bob: &mut Client) -> Result<()> {
    for i in 0..MESSAGES {
        let reply = alice
            .send_message(json!({"to":"bob"}), &format!("m{i}"), &format!("c{i}"))
            .await?;
        ensure!(reply["type"] == "sent", "{reply}");
    }
    for _ in 0..MESSAGES {
        bob.recv_type("message").await?;
    }
    Ok(())
}

#[tokio::test]
async fn metrics_are_valid_text_and_move_as_messages_flow() -> Result<()> {
    let system = system_with_metrics().await?;
    let edge = system.edge_addr;
    let router = system.metrics_addr("router")?;
    let persister = system.metrics_addr("persister")?;
    let presence = system.metrics_addr("presence")?;
    let lag = |stream: &str, consumer: &'static str| {
        let stream = stream.to_string();
        move |s: &Scrape| {
            s.has(
                "jetstream_consumer_pending",
                &[("stream", &stream), ("consumer", consumer)],
            ) && s.has(
                "jetstream_consumer_ack_floor_stream_sequence",
                &[("stream", &stream), ("consumer", consumer)],
            )
        }
    };
    // Each partition's consumers when MESSAGES is split.
    for stream in streams::messages_streams(system.config.partitions) {
        scrape_until(router, lag(&stream, subjects::ROUTER_CONSUMER)).await?;
        scrape_until(persister, lag(&stream, subjects::PERSISTER_CONSUMER)).await?;
    }
    scrape_until(
        router,
        lag(subjects::EVENTS_STREAM, subjects::ROUTER_EVENTS_CONSUMER),
    )
    .await?;
    scrape_until(
        router,
        lag(
            subjects::RECEIPTS_STREAM,
            subjects::ROUTER_RECEIPTS_CONSUMER,
        ),
    )
    .await?;
    scrape_until(
        persister,
        lag(
            subjects::RECEIPTS_STREAM,
            subjects::PERSISTER_RECEIPTS_CONSUMER,
        ),
    )
    .await?;

    let edge_before = scrape(edge).await?;
    let router_before = scrape(router).await?;
    let persister_before = scrape(persister).await?;
    let moved = |after: &Scrape, before: &Scrape, name: &str, labels: &[(&str, &str)]| {
        after.sum(name, labels) - before.sum(name, labels)
    };

    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    send_messages(&mut alice, &mut bob).await?;
    // A refused hello: the edge closes the connection with 4001.
    let mut stranger = Client::open(&system.ws_url()).await?;
    stranger
        .send(json!({"type":"hello","token":"not-a-token","device":"d"}))
        .await?;
    assert_eq!(stranger.ending().await?, Ending::Closed(4001));

    // Frames and closes are counted before a client sees them; a
    // connection is counted as gone only once its task has ended.
    let edge_after = scrape_until(edge, |s| s.sum("edge_connections", &[]) == 2.0).await?;
    let sends = MESSAGES as f64;
    let frames_in = "edge_frames_in_total";
    assert_eq!(
        moved(&edge_after, &edge_before, frames_in, &[("type", "hello")]),
        3.0
    );
    assert_eq!(
        moved(&edge_after, &edge_before, frames_in, &[("type", "send")]),
        sends
    );
    let frames_out = "edge_frames_out_total";
    assert_eq!(
        moved(
            &edge_after,
            &edge_before,
            frames_out,
            &[("type", "welcome")]
        ),
        2.0
    );
    assert_eq!(
        moved(&edge_after, &edge_before, frames_out, &[("type", "sent")]),
        sends
    );
    // Both parties' inboxes get every message; alice's may still be on
    // their way to her.
    assert!(
        moved(
            &edge_after,
            &edge_before,
            frames_out,
            &[("type", "message")]
        ) >= sends
    );
    assert_eq!(
        moved(&edge_after, &edge_before, "edge_send_seconds_count", &[]),
        sends
    );
    assert!(moved(&edge_after, &edge_before, "edge_send_seconds_sum", &[]) > 0.0);
    assert_eq!(
        moved(
            &edge_after,
            &edge_before,
            "edge_sessions_closed_total",
            &[("code", "4001")]
        ),
        1.0
    );

    let router_after = scrape_until(router, |s| {
        moved(
            s,
            &router_before,
            "router_events_routed_total",
            &[("stream", "MESSAGES")],
        ) >= sends
    })
    .await?;
    assert_eq!(
        moved(
            &router_after,
            &router_before,
            "router_events_routed_total",
            &[("stream", "MESSAGES")]
        ),
        sends
    );
    assert_eq!(
        moved(
            &router_after,
            &router_before,
            "router_inbox_appends_total",
            &[]
        ),
        2.0 * sends
    );

    let persister_after = scrape_until(persister, |s| {
        moved(s, &persister_before, "persister_batch_size_sum", &[]) >= sends
    })
    .await?;
    assert_eq!(
        moved(
            &persister_after,
            &persister_before,
            "persister_batch_size_sum",
            &[]
        ),
        sends
    );
    assert!(
        moved(
            &persister_after,
            &persister_before,
            "persister_batch_size_count",
            &[]
        ) >= 1.0
    );
    assert_eq!(
        moved(
            &persister_after,
            &persister_before,
            "persister_rows_written_total",
            &[]
        ),
        sends
    );
    assert!(
        moved(
            &persister_after,
            &persister_before,
            "persister_batch_seconds_count",
            &[]
        ) >= 1.0
    );
    // The harness's readiness probe asked for conversations.
    assert!(persister_after.has(
        "persister_rpc_requests_total",
        &[("method", "conversations"), ("outcome", "ok")]
    ));
    // Everything is routed and stored: nothing is left for the consumers.
    scrape_until(persister, |s| {
        s.sum(
            "jetstream_consumer_pending",
            &[("consumer", subjects::PERSISTER_CONSUMER)],
        ) == 0.0
            && s.sum(
                "jetstream_consumer_ack_floor_stream_sequence",
                &[("consumer", subjects::PERSISTER_CONSUMER)],
            ) >= sends
    })
    .await?;

    scrape_until(presence, |s| {
        s.sum("presence_heartbeats_total", &[]) > 0.0
            && s.sum("presence_changes_total", &[("status", "online")]) >= 2.0
            && s.sum("presence_leader", &[]) == 1.0
    })
    .await?;

    alice.close().await?;
    scrape_until(edge, |s| s.sum("edge_connections", &[]) == 1.0).await?;
    Ok(())
}

#[tokio::test]
async fn metrics_trace_id_follows_a_message_into_the_inbox_and_live_delivery() -> Result<()> {
    let system = System::start().await?;
    let admin = system.admin().await?;
    let mut live = admin.subscribe("chat.deliver.bob").await?;
    admin.flush().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let sent = alice
        .send_message(json!({"to":"bob"}), "traced", "t1")
        .await?;
    ensure!(sent["type"] == "sent", "{sent}");

    let js = async_nats::jetstream::new(admin.clone());
    let trace_of = |headers: Option<&async_nats::HeaderMap>| {
        let raw = headers
            .and_then(|h| h.get(subjects::TRACE_HEADER))
            .map(|v| v.as_str().to_string())
            .context("no trace header")?;
        ensure!(TraceId::parse(&raw).is_some(), "not a trace id: {raw:?}");
        Ok(raw)
    };
    // MESSAGES and INBOX, or the DM's and each user's partition of them.
    let partitions = system.config.partitions;
    let (alice_id, bob_id) = (UserId::parse("alice")?, UserId::parse("bob")?);
    let dm = ConversationId::dm(alice_id.clone(), bob_id.clone())?;
    let messages = js
        .get_stream(partitions.of_conversation(&dm).messages_stream())
        .await?;
    let event = messages
        .get_last_raw_message_by_subject(&subjects::message(&dm))
        .await?;
    let trace = trace_of(Some(&event.headers))?;

    for user in [&alice_id, &bob_id] {
        let item = js
            .get_stream(partitions.of_user(user).inbox_stream())
            .await?
            .get_last_raw_message_by_subject(&subjects::inbox(user))
            .await?;
        assert_eq!(trace_of(Some(&item.headers))?, trace, "{user}'s inbox item");
    }

    let delivery = tokio::time::timeout(chat_tests::WAIT, async {
        while let Some(message) = live.next().await {
            if message.payload.starts_with(br#"{"cursor""#) {
                return Some(message);
            }
        }
        None
    })
    .await?
    .context("no live delivery")?;
    assert_eq!(trace_of(delivery.headers.as_ref())?, trace);

    // A second send is a new attempt with its own trace id.
    alice
        .send_message(json!({"to":"bob"}), "again", "t2")
        .await?;
    let second = messages
        .get_last_raw_message_by_subject(&subjects::message(&dm))
        .await?;
    assert_ne!(trace_of(Some(&second.headers))?, trace);
    Ok(())
}
