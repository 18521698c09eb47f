//! Dead letters: an event a consumer can never process goes to
//! `chat.dead.<consumer>` with its reason, and traffic around it flows on;
//! an event a consumer was given `max_deliver` times is copied there by the
//! persister's mover.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use async_nats::jetstream::{self, consumer, message::StreamMessage, AckKind};
use chat_shared::ids::{ConversationId, UserId};
use chat_shared::subjects;
use chat_tests::{scrape, wait_until, Client, System};
use futures::StreamExt;
use serde_json::{json, Value};

const POISON: &[u8] = b"{\"not\": \"a message event\"";

fn alice_bob() -> Result<ConversationId> {
    Ok(ConversationId::dm(
        UserId::parse("alice")?,
        UserId::parse("bob")?,
    )?)
}

async fn admin_js(system: &System) -> Result<jetstream::Context> {
    Ok(jetstream::new(system.admin().await?))
}

/// The newest dead letter of `consumer`, once there is one.
async fn dead_letter(js: &jetstream::Context, consumer: &str) -> Result<StreamMessage> {
    let stream = js
        .get_stream(subjects::DEADLETTER_STREAM)
        .await
        .context("DEADLETTER is provisioned")?;
    let subject = subjects::dead_letter(consumer);
    wait_until(|| async {
        stream
            .direct_get_last_for_subject(subject.clone())
            .await
            .is_ok()
    })
    .await
    .with_context(|| format!("a dead letter on {subject}"))?;
    Ok(stream.direct_get_last_for_subject(subject).await?)
}

fn header(message: &StreamMessage, name: &str) -> Option<String> {
    message.headers.get(name).map(|v| v.as_str().to_string())
}

/// Reads message frames until one with `text` arrives; returns the texts seen.
async fn texts_until(client: &mut Client, text: &str) -> Result<Vec<String>> {
    let mut seen = Vec::new();
    loop {
        let frame: Value = client.recv_type("message").await?;
        let got = frame["text"].as_str().unwrap_or_default().to_string();
        seen.push(got.clone());
        if got == text {
            return Ok(seen);
        }
    }
}

async fn stored_texts(system: &System) -> Result<Vec<String>> {
    let db = system.database_of("dm:alice:bob").await?;
    let rows = db
        .query(
            "SELECT body FROM messages WHERE conversation = 'dm:alice:bob' ORDER BY id",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
}

#[tokio::test]
async fn a_poison_event_is_dead_lettered_and_traffic_flows_around_it() -> Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let js = admin_js(&system).await?;
    let dm = alice_bob()?;
    // MESSAGES, or the DM's partition of it.
    let partition = system.config.partitions.of_conversation(&dm);
    let stream_name = partition.messages_stream();

    let before = alice
        .send_message(json!({"to":"bob"}), "before", "c-before")
        .await?;
    ensure!(before["type"] == "sent", "{before}");
    // A real conversation's subject, a payload nobody can decode: published
    // where the edge publishes the DM's events, stored under `conversation`.
    let conversation = subjects::message(&dm);
    let poison = js
        .publish(subjects::message_in(&dm, partition), POISON.into())
        .await?
        .await?;
    let after = alice
        .send_message(json!({"to":"bob"}), "after", "c-after")
        .await?;
    ensure!(after["type"] == "sent", "{after}");

    // Delivered live, in order, with nothing in between.
    assert_eq!(texts_until(&mut bob, "after").await?, ["before", "after"]);
    // And stored.
    wait_until(|| async {
        stored_texts(&system)
            .await
            .is_ok_and(|texts| texts == ["before", "after"])
    })
    .await?;

    for consumer in [subjects::PERSISTER_CONSUMER, subjects::ROUTER_CONSUMER] {
        let dead = dead_letter(&js, consumer).await?;
        assert_eq!(dead.payload.as_ref(), POISON, "{consumer}");
        let reason = header(&dead, subjects::DEAD_REASON_HEADER).unwrap_or_default();
        assert!(!reason.is_empty(), "{consumer}: no reason");
        assert!(
            !reason.starts_with("max deliveries"),
            "{consumer}: {reason}"
        );
        assert_eq!(
            header(&dead, subjects::DEAD_STREAM_HEADER),
            Some(stream_name.clone())
        );
        assert_eq!(
            header(&dead, subjects::DEAD_SEQ_HEADER),
            Some(poison.sequence.to_string())
        );
        assert_eq!(
            header(&dead, subjects::DEAD_SUBJECT_HEADER),
            Some(conversation.clone())
        );
        assert_eq!(
            header(&dead, subjects::DEAD_DELIVERIES_HEADER).as_deref(),
            Some("1")
        );
    }

    // Both consumers are past the poison event: nothing waits for an ack.
    let messages = js.get_stream(&stream_name).await?;
    for consumer in [subjects::PERSISTER_CONSUMER, subjects::ROUTER_CONSUMER] {
        wait_until(|| async {
            let messages = messages.clone();
            messages.consumer_info(consumer).await.is_ok_and(|info| {
                info.num_ack_pending == 0
                    && info.num_pending == 0
                    && info.ack_floor.stream_sequence > poison.sequence
            })
        })
        .await
        .with_context(|| format!("{consumer} moved past the poison event"))?;
    }
    Ok(())
}

#[tokio::test]
async fn an_event_past_max_deliveries_is_moved_to_the_dead_letters() -> Result<()> {
    let system = System::start_with(|config| {
        config.metrics_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)))
    })
    .await?;
    let mut alice = system.connect("alice", "phone").await?;
    let js = admin_js(&system).await?;
    let sent = alice
        .send_message(json!({"to":"bob"}), "exhaust me", "c-exhaust")
        .await?;
    ensure!(sent["type"] == "sent", "{sent}");

    // A consumer of our own that refuses the event until JetStream gives up,
    // on MESSAGES or the DM's partition of it.
    const NAME: &str = "deadletter-test";
    let stream_name = system
        .config
        .partitions
        .of_conversation(&alice_bob()?)
        .messages_stream();
    let stream = js.get_stream(&stream_name).await?;
    let test_consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(NAME.into()),
            filter_subject: subjects::message(&alice_bob()?),
            ack_policy: consumer::AckPolicy::Explicit,
            max_deliver: 2,
            ..Default::default()
        })
        .await?;
    let mut refused = Vec::new();
    let moved = tokio::time::timeout(chat_tests::WAIT, async {
        loop {
            // Another pull after the last refusal is what makes the server
            // notice the event is exhausted and send the advisory.
            let mut batch = test_consumer
                .fetch()
                .max_messages(1)
                .expires(Duration::from_millis(300))
                .messages()
                .await?;
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| anyhow::anyhow!(e))?;
                refused.push(
                    message
                        .info()
                        .map_err(|e| anyhow::anyhow!(e))?
                        .stream_sequence,
                );
                message
                    .ack_with(AckKind::Nak(None))
                    .await
                    .map_err(|e| anyhow::anyhow!(e))?;
            }
            let dead = stream_of_dead(&js, NAME).await;
            if let Some(dead) = dead {
                return Ok::<_, anyhow::Error>(dead);
            }
        }
    })
    .await
    .context("the event was not moved to the dead letters")??;

    assert_eq!(
        refused.len(),
        2,
        "delivered twice, then given up: {refused:?}"
    );
    assert!(refused.windows(2).all(|w| w[0] == w[1]));
    let header = |name: &str| header(&moved, name);
    assert_eq!(
        header(subjects::DEAD_REASON_HEADER).as_deref(),
        Some("max deliveries: 2")
    );
    assert_eq!(
        header(subjects::DEAD_DELIVERIES_HEADER).as_deref(),
        Some("2")
    );
    assert_eq!(
        header(subjects::DEAD_SEQ_HEADER),
        Some(refused[0].to_string())
    );
    assert_eq!(
        header(subjects::DEAD_STREAM_HEADER),
        Some(stream_name.clone())
    );
    assert_eq!(
        header(subjects::DEAD_SUBJECT_HEADER),
        Some(subjects::message(&alice_bob()?))
    );
    let event: Value = serde_json::from_slice(&moved.payload)?;
    assert_eq!(event["text"], "exhaust me");
    assert_eq!(event["id"], sent["id"]);
    // The original's trace id came along, and its dedup id under another
    // name (a direct get of the dead letter adds `Nats-Sequence` and
    // friends itself, so their absence cannot be checked from here).
    assert!(header(subjects::TRACE_HEADER).is_some());
    assert_eq!(
        header(subjects::DEAD_MSG_ID_HEADER),
        Some("alice:c-exhaust".to_string())
    );
    assert_eq!(
        header(subjects::MSG_ID_HEADER),
        Some(subjects::dead_letter_id(&stream_name, NAME, refused[0]))
    );

    // Counted by the persister, under the family of every partition.
    let persister = system.metrics_addr("persister")?;
    wait_until(|| async {
        scrape(persister).await.is_ok_and(|s| {
            s.sum(
                "persister_max_deliveries_moved_total",
                &[("stream", subjects::MESSAGES_STREAM)],
            ) == 1.0
        })
    })
    .await?;
    Ok(())
}

/// The dead letter of `consumer`, if there is one yet.
async fn stream_of_dead(js: &jetstream::Context, consumer: &str) -> Option<StreamMessage> {
    let stream = js.get_stream(subjects::DEADLETTER_STREAM).await.ok()?;
    stream
        .direct_get_last_for_subject(subjects::dead_letter(consumer))
        .await
        .ok()
}

#[tokio::test]
async fn the_edge_may_not_write_dead_letters() -> Result<()> {
    let system = System::start().await?;
    let edge = chat_shared::nats::connect(&system.config_for("edge"), "test-edge").await?;
    let js = jetstream::new(edge);
    let refused = match js
        .publish(
            subjects::dead_letter("persister"),
            b"forged".as_slice().into(),
        )
        .await
    {
        Err(_) => true,
        Ok(ack) => ack.await.is_err(),
    };
    assert!(refused, "the edge stored a dead letter");
    let admin = admin_js(&system).await?;
    assert!(stream_of_dead(&admin, subjects::PERSISTER_CONSUMER)
        .await
        .is_none());
    Ok(())
}
