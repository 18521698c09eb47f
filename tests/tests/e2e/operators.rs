//! Operator tools against a whole system: `chatctl replay` reproduces what
//! clients sent, and `chatctl streams` shows every consumer's progress.

use anyhow::{bail, ensure, Context};
use async_nats::jetstream::{self, consumer};
use chat_shared::ids::ConversationId;
use chat_shared::partitions::Partition;
use chat_shared::subjects;
use chat_shared::wire::MessageEvent;
use chat_tests::{streams, wait_until, Client, System};
use chatctl::replay::{
    Entry, OffsetDateTime, Replay, ReplayName, ReplayOptions, Replayed, Republisher, Start,
};
use chatctl::status::{self, ConsumerState, StreamState};
use serde_json::{json, Value};

/// A message as a client sent it and the system accepted it.
#[derive(Debug, Clone, PartialEq)]
struct Accepted {
    id: String,
    conversation: String,
    from: String,
    text: String,
    client_msg_id: String,
    ts: u64,
}

impl Accepted {
    fn of(event: &MessageEvent) -> Self {
        Self {
            id: event.id.to_string(),
            conversation: event.conversation.to_string(),
            from: event.from.to_string(),
            text: event.text.clone(),
            client_msg_id: event.client_msg_id.to_string(),
            ts: event.ts,
        }
    }
}

/// Sends one message and returns it as accepted (`sent`).
async fn send(
    client: &mut Client,
    from: &str,
    target: Value,
    text: String,
    client_msg_id: String,
) -> anyhow::Result<Accepted> {
    let sent = client.send_message(target, &text, &client_msg_id).await?;
    ensure!(sent["type"] == "sent", "{sent}");
    let field = |name: &str| {
        sent[name]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no {name} in {sent}"))
    };
    Ok(Accepted {
        id: field("id")?,
        conversation: field("conversation")?,
        from: from.into(),
        text,
        client_msg_id,
        ts: sent["ts"].as_u64().context("no ts")?,
    })
}

async fn admin_jetstream(system: &System) -> anyhow::Result<jetstream::Context> {
    Ok(chat_shared::nats::jetstream(
        system.admin().await?,
        &system.config,
    ))
}

fn options(conversation: Option<&str>, start: Start) -> anyhow::Result<ReplayOptions> {
    Ok(ReplayOptions {
        conversation: conversation.map(ConversationId::parse).transpose()?,
        start,
        to_seq: None,
        until: None,
    })
}

/// Runs a replay to its end; a malformed entry fails the test.
async fn replay(js: &jetstream::Context, options: ReplayOptions) -> anyhow::Result<Vec<Replayed>> {
    let mut replay = Replay::open(js, &options, chat_tests::partitions_under_test()).await?;
    let mut items = Vec::new();
    let outcome = async {
        while let Some(entry) = replay.next().await? {
            match entry {
                Entry::Event(item) => items.push(item),
                Entry::Malformed { seq, reason, .. } => bail!("seq {seq} is malformed: {reason}"),
                Entry::Change { seq, .. } => bail!("seq {seq}: no test here changes a message"),
            }
        }
        Ok(())
    }
    .await;
    replay.close().await;
    outcome.map(|()| items)
}

fn accepted(items: &[Replayed]) -> Vec<Accepted> {
    items.iter().map(|item| Accepted::of(&item.event)).collect()
}

/// Alice and bob talk in their DM and in a group with carol, interleaved;
/// returns the group's conversation id and everything accepted, in order.
async fn two_conversations(
    system: &System,
    rounds: usize,
) -> anyhow::Result<(String, Vec<Accepted>)> {
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let created = alice
        .request(json!({"type":"group.create","name":"ops","members":["bob","carol"]}))
        .await?;
    let group = created["group"]["id"]
        .as_str()
        .with_context(|| format!("no group id in {created}"))?;
    let group = format!("group:{group}");
    let mut sent = Vec::new();
    for i in 0..rounds {
        sent.push(
            send(
                &mut alice,
                "alice",
                json!({"to":"bob"}),
                format!("dm {i}"),
                format!("a{i}"),
            )
            .await?,
        );
        sent.push(
            send(
                &mut bob,
                "bob",
                json!({"conversation": group}),
                format!("group {i} ✓"),
                format!("b{i}"),
            )
            .await?,
        );
    }
    Ok((group, sent))
}

#[tokio::test]
async fn operators_replay_reproduces_the_sent_messages_in_order() -> anyhow::Result<()> {
    let system = System::start().await?;
    let (group, sent) = two_conversations(&system, 6).await?;
    let js = admin_jetstream(&system).await?;

    let partitions = system.config.partitions;
    // Every conversation: in the order sent (merged by id across the
    // partitions when MESSAGES is split), each stream in its own order.
    let all = replay(&js, options(None, Start::Oldest)?).await?;
    assert_eq!(accepted(&all), sent);
    for stream in streams::messages_streams(partitions) {
        let seqs: Vec<u64> = all
            .iter()
            .filter(|item| item.stream == stream)
            .map(|item| item.seq)
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{stream}: {seqs:?}");
    }
    for item in &all {
        let conversation = &item.event.conversation;
        assert_eq!(item.subject, subjects::message(conversation));
        let expected_id = format!("{}:{}", item.event.from, item.event.client_msg_id);
        assert_eq!(item.msg_id(), Some(expected_id.as_str()));
    }

    let mut dm = Vec::new();
    for conversation in ["dm:alice:bob", group.as_str()] {
        let only = replay(&js, options(Some(conversation), Start::Oldest)?).await?;
        let expected: Vec<_> = sent
            .iter()
            .filter(|m| m.conversation == conversation)
            .cloned()
            .collect();
        assert_eq!(expected.len(), 6);
        assert_eq!(accepted(&only), expected, "{conversation}");
        if conversation == "dm:alice:bob" {
            dm = only;
        }
    }

    // A sequence range, inclusive at both ends: of the one stream, or, split,
    // refused without a conversation (each partition has its own sequences).
    let range = |from: u64, to: u64, conversation: Option<&str>| -> anyhow::Result<_> {
        Ok(ReplayOptions {
            to_seq: Some(to),
            ..options(conversation, Start::Sequence(from))?
        })
    };
    let bare = range(all[3].seq, all[7].seq, None)?;
    if partitions.count() == 1 {
        let by_seq = replay(&js, bare).await?;
        assert_eq!(accepted(&by_seq), sent[3..=7]);
    } else {
        assert!(
            Replay::open(&js, &bare, partitions).await.is_err(),
            "a sequence range of which partition?"
        );
    }

    // A range within one conversation, by the sequences of its stream: the
    // DM's 2nd to 4th message (with the group's in between unless split).
    let dm_by_seq = replay(&js, range(dm[1].seq, dm[3].seq, Some("dm:alice:bob"))?).await?;
    let expected: Vec<_> = sent
        .iter()
        .filter(|m| m.conversation == "dm:alice:bob")
        .skip(1)
        .take(3)
        .cloned()
        .collect();
    assert_eq!(accepted(&dm_by_seq), expected);

    // A time range, by the times JetStream stored them.
    let by_time = replay(
        &js,
        ReplayOptions {
            until: Some(all[8].time),
            ..options(None, Start::Time(all[4].time))?
        },
    )
    .await?;
    assert_eq!(accepted(&by_time), sent[4..=8]);

    // Nothing to replay ends at once.
    let nobody = replay(&js, options(Some("dm:carol:dave"), Start::Oldest)?).await?;
    assert!(nobody.is_empty());
    let last = all.last().context("nothing replayed")?;
    let conversation = last.event.conversation.to_string();
    let after_the_end = replay(
        &js,
        options(Some(&conversation), Start::Sequence(last.seq + 1))?,
    )
    .await?;
    assert!(after_the_end.is_empty());
    let future = OffsetDateTime::now_utc() + std::time::Duration::from_secs(3600);
    assert!(replay(&js, options(None, Start::Time(future))?)
        .await?
        .is_empty());
    let backwards = range(2, 1, Some("dm:alice:bob"))?;
    assert!(Replay::open(&js, &backwards, partitions).await.is_err());

    // One JSON line per event: its sequence, time, subject and the event.
    let line = serde_json::to_value(&all[0])?;
    assert_eq!(line["seq"], all[0].seq);
    assert!(line["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(line["subject"], "chat.msg.dm.alice.bob");
    assert_eq!(line["event"]["text"], "dm 0");
    assert_eq!(line["event"]["client_msg_id"], "a0");
    Ok(())
}

#[tokio::test]
async fn operators_replay_republishes_into_its_own_stream() -> anyhow::Result<()> {
    let system = System::start().await?;
    let (group, sent) = two_conversations(&system, 3).await?;
    let js = admin_jetstream(&system).await?;
    let name = ReplayName::parse("e2e")?;

    let only_group = replay(&js, options(Some(&group), Start::Oldest)?).await?;
    for attempt in 0..2 {
        let mut republisher = Republisher::create(&js, name.clone(), &system.config).await?;
        for item in &only_group {
            republisher.publish(item).await?;
        }
        let summary = republisher.finish().await?;
        // Replaying the same range again stores nothing twice (Nats-Msg-Id).
        let (stored, duplicates) = if attempt == 0 { (3, 0) } else { (0, 3) };
        assert_eq!((summary.stored, summary.duplicates), (stored, duplicates));
    }

    let stream = js.get_stream(name.stream()).await?;
    let expected: Vec<_> = sent.iter().filter(|m| m.conversation == group).collect();
    for (seq, (original, expected)) in (1..).zip(only_group.iter().zip(expected)) {
        let copy = stream.get_raw_message(seq).await?;
        assert_eq!(copy.subject.as_str(), name.subject_for(&original.subject));
        let headers = copy.headers;
        let header = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
        assert_eq!(
            header(subjects::MSG_ID_HEADER).as_deref(),
            original.msg_id()
        );
        assert_eq!(
            header(chatctl::replay::REPLAY_SEQ_HEADER),
            Some(original.seq.to_string())
        );
        let event: MessageEvent = serde_json::from_slice(&copy.payload)?;
        assert_eq!(&Accepted::of(&event), expected);
    }
    assert!(stream.get_raw_message(4).await.is_err());
    Ok(())
}

fn consumer<'a>(streams: &'a [StreamState], stream: &str, name: &str) -> Option<&'a ConsumerState> {
    streams
        .iter()
        .find(|s| s.name == stream)?
        .consumers
        .iter()
        .find(|c| c.name == name)
}

#[tokio::test]
async fn operators_streams_show_consumers_and_their_lag() -> anyhow::Result<()> {
    let system = System::start().await?;
    let js = admin_jetstream(&system).await?;
    let partitions = system.config.partitions;
    // A durable consumer that never pulls, on MESSAGES or on each of its
    // partitions: its lag is every message.
    for name in streams::messages_streams(partitions) {
        js.get_stream(name)
            .await?
            .create_consumer(consumer::pull::Config {
                durable_name: Some("operators-audit".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await?;
    }
    let (_, sent) = two_conversations(&system, 3).await?;
    // What each MESSAGES stream holds: the messages of the conversations in
    // its partition (all of them when there is one).
    let mut held = vec![0u64; partitions.count() as usize];
    for message in &sent {
        let conversation = ConversationId::parse(&message.conversation)?;
        held[partitions.of_conversation(&conversation).index() as usize] += 1;
    }
    let held: Vec<(Partition, u64)> = partitions.all().zip(held).collect();

    // The router and the persister catch up: nothing pending, all acked.
    let caught_up = |streams: &[StreamState], name: &str| {
        held.iter().all(|(partition, total)| {
            consumer(streams, &partition.messages_stream(), name).is_some_and(|c| {
                c.num_pending == 0 && c.num_ack_pending == 0 && c.ack_floor_seq == *total
            })
        })
    };
    wait_until(|| async {
        status::collect(&js).await.is_ok_and(|streams| {
            caught_up(&streams, subjects::ROUTER_CONSUMER)
                && caught_up(&streams, subjects::PERSISTER_CONSUMER)
        })
    })
    .await?;

    let mut inbox_and_push = streams::inbox_streams(partitions);
    inbox_and_push.push(subjects::PUSH_STREAM.to_string());
    let streams = status::collect(&js).await?;
    for (partition, total) in held.iter().copied() {
        let name = partition.messages_stream();
        let messages = streams
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("no {name}"))?;
        assert_eq!(
            (messages.messages, messages.last_seq),
            (total, total),
            "{name}"
        );
        if total > 0 {
            assert_eq!(messages.first_seq, 1, "{name}");
            assert!(
                messages.first_time.is_some()
                    && messages.last_time <= Some(OffsetDateTime::now_utc()),
                "{name}"
            );
        }
        assert_eq!(
            messages.subjects,
            subjects::messages_partition(partition).0,
            "{name}"
        );
        for consumer_name in [subjects::ROUTER_CONSUMER, subjects::PERSISTER_CONSUMER] {
            let state = consumer(&streams, &name, consumer_name)
                .with_context(|| format!("{name} {consumer_name}"))?;
            assert!(state.durable, "{name} {consumer_name}");
            assert_eq!(state.delivered_seq, total, "{name} {consumer_name}");
        }
        let audit = consumer(&streams, &name, "operators-audit")
            .with_context(|| format!("no audit consumer on {name}"))?;
        assert_eq!(
            (audit.num_pending, audit.delivered_seq),
            (total, 0),
            "{name}"
        );

        let table = status::render(std::slice::from_ref(messages));
        let audit_row = table
            .lines()
            .find(|line| line.trim_start().starts_with("operators-audit"))
            .with_context(|| format!("no audit row for {name}"))?;
        let cells: Vec<&str> = audit_row.split_whitespace().collect();
        // CONSUMER DELIVERED "ACK FLOOR" PENDING ...
        assert_eq!(cells[1..4], ["0", "0", &total.to_string()], "{name}");
    }
    // The group's creation went through EVENTS and the router's consumer there.
    let events = consumer(
        &streams,
        subjects::EVENTS_STREAM,
        subjects::ROUTER_EVENTS_CONSUMER,
    )
    .context("no router-events consumer")?;
    assert_eq!(events.num_pending, 0);
    for stream in inbox_and_push {
        assert!(streams.iter().any(|s| s.name == stream), "{stream}");
    }

    let table = status::render(&streams);
    assert!(table.contains("router"));
    assert!(table.contains("persister"));
    Ok(())
}

/// `chatctl send` and `chatctl tail` through the library: the tail sees
/// the sent message live and acks its cursor, which the edge stores as the
/// device's.
#[tokio::test]
async fn chatctl_send_reaches_a_tail_that_acks_it() -> anyhow::Result<()> {
    use std::time::Duration;

    use chat_shared::ids::{DeviceId, UserId};
    use chat_shared::wire::ServerFrame;
    use chatctl::client::{self, Target};

    let system = System::start().await?;
    let (config, edge) = (system.config.clone(), system.ws_url());
    let (frames_tx, mut frames) = tokio::sync::mpsc::unbounded_channel::<String>();
    let tail = tokio::spawn(async move {
        client::tail(&config, &edge, "bob", "tail-1", None, |frame| {
            let _ = frames_tx.send(frame.to_string());
        })
        .await
    });
    // The tail's handshake ends with `synced`: only then is it live.
    let synced = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(frame) = frames.recv().await {
            if frame.contains("\"synced\"") {
                return true;
            }
        }
        false
    })
    .await?;
    ensure!(synced, "the tail ended before synced");
    let sent = client::send(
        &system.config,
        &system.ws_url(),
        "alice",
        Target::User(UserId::parse("bob")?),
        "from chatctl".into(),
        |_| {},
    )
    .await?;
    let ServerFrame::Sent { id, .. } = sent else {
        bail!("send answered {sent:?}");
    };
    let cursor = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(frame) = frames.recv().await {
            let value: Value = serde_json::from_str(&frame)?;
            if value["type"] == "message" && value["id"] == id.to_string() {
                ensure!(value["text"] == "from chatctl", "{value}");
                return Ok(value["cursor"].as_str().map(str::to_owned));
            }
        }
        bail!("the tail ended before the message")
    })
    .await??
    .context("a live message carries its cursor")?;
    // The edge writes a device's acked cursor every 2 s at most.
    let cursors = jetstream::new(system.admin().await?)
        .get_key_value(subjects::CURSORS_BUCKET)
        .await?;
    let key = subjects::device_cursor_key(&UserId::parse("bob")?, &DeviceId::parse("tail-1")?);
    wait_until(|| {
        let (cursors, key, cursor) = (cursors.clone(), key.clone(), cursor.clone());
        async move {
            let stored = cursors.get(&key).await.ok().flatten();
            stored.is_some_and(|v| v.as_ref() == cursor.as_bytes())
        }
    })
    .await
    .context("the tail's ack was not stored as the device's cursor")?;
    ensure!(!tail.is_finished(), "the tail stopped: {:?}", tail.await?);
    tail.abort();
    Ok(())
}
