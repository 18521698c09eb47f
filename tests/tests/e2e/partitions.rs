//! MESSAGES and INBOX split into partitions (`CHAT_PARTITIONS`), on one
//! server, whatever `CHAT_PARTITIONS` the suite runs with.

use std::collections::{BTreeSet, HashMap};

use anyhow::{ensure, Context};
use chat_shared::ids::{ConversationId, UserId};
use chat_shared::partitions::Partitions;
use chat_shared::subjects;
use chat_tests::{Client, NatsServer, System};
use chatctl::replay::{Entry, Replay, ReplayOptions, Replayed, Start};
use serde_json::{json, Value};

fn three() -> anyhow::Result<Partitions> {
    Partitions::new(3).context("3 partitions")
}

fn user(name: &str) -> anyhow::Result<UserId> {
    Ok(UserId::parse(name)?)
}

fn cursor(frame: &Value) -> u64 {
    frame["cursor"]
        .as_str()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Message frames of `client` until `count` arrived, backlog first.
async fn messages(client: &mut Client, count: usize) -> anyhow::Result<Vec<Value>> {
    let mut got: Vec<Value> = client
        .backlog
        .iter()
        .filter(|f| f["type"] == "message")
        .cloned()
        .collect();
    while got.len() < count {
        let frame = client.recv().await?;
        if frame["type"] == "message" {
            got.push(frame);
        }
    }
    Ok(got)
}

/// Each conversation's texts in the order `frames` has them.
fn per_conversation(frames: &[Value]) -> HashMap<String, Vec<String>> {
    let mut texts: HashMap<String, Vec<String>> = HashMap::new();
    for frame in frames {
        texts
            .entry(
                frame["conversation"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
            .or_default()
            .push(frame["text"].as_str().unwrap_or_default().to_string());
    }
    texts
}

/// Cursors only grow, and no item comes twice.
fn strictly_increasing(frames: &[Value]) -> anyhow::Result<()> {
    for pair in frames.windows(2) {
        ensure!(
            cursor(&pair[0]) < cursor(&pair[1]),
            "cursor {} then {}",
            pair[0],
            pair[1]
        );
    }
    Ok(())
}

/// DMs and a group's messages on three partitions: each member gets every
/// conversation in the order sent, cursors (sequences of the member's own
/// INBOX partition) only grow, a resume from a cursor misses nothing and
/// repeats nothing, and history has everything (the persister reads every
/// partition). The streams hold the unpartitioned subjects; `chatctl
/// replay` merges them and `chatctl streams` shows each one's lag.
#[tokio::test]
async fn split_streams_keep_dms_groups_and_resumes_in_order() -> anyhow::Result<()> {
    const ROUNDS: usize = 15;
    let partitions = three()?;
    // bob and dave live in different INBOX partitions, alice's DMs with
    // them in different MESSAGES partitions.
    let (alice, bob, dave) = (user("alice")?, user("bob")?, user("dave")?);
    ensure!(partitions.of_user(&bob) != partitions.of_user(&dave));
    let (with_bob, with_dave) = (
        ConversationId::dm(alice.clone(), bob.clone())?,
        ConversationId::dm(alice.clone(), dave.clone())?,
    );
    ensure!(partitions.of_conversation(&with_bob) != partitions.of_conversation(&with_dave));

    let system = System::start_with(|c| c.partitions = partitions).await?;
    let mut sender = system.connect("alice", "phone").await?;
    let mut dave_live = system.connect("dave", "phone").await?;
    let bob_first = system.connect("bob", "phone").await?;
    let bob_start = bob_first.synced["cursor"]
        .as_str()
        .context("synced cursor")?
        .to_string();
    drop(bob_first);
    let created = sender
        .request(json!({"type":"group.create","name":"p","members":["bob","dave","erin"]}))
        .await?;
    let group = format!(
        "group:{}",
        created["group"]["id"].as_str().context("group id")?
    );
    for i in 0..ROUNDS {
        for (to, label) in [
            (json!({"to":"bob"}), "b"),
            (json!({"to":"dave"}), "d"),
            (json!({"conversation":group}), "g"),
        ] {
            let sent = sender
                .send_message(to, &format!("{label}{i}"), &format!("{label}-{i}"))
                .await?;
            ensure!(sent["type"] == "sent", "{sent}");
        }
    }
    let expected =
        |label: &str| -> Vec<String> { (0..ROUNDS).map(|i| format!("{label}{i}")).collect() };

    // Live, across two MESSAGES partitions into dave's INBOX partition.
    let dave_got = messages(&mut dave_live, 2 * ROUNDS).await?;
    strictly_increasing(&dave_got)?;
    let texts = per_conversation(&dave_got);
    assert_eq!(texts.get(&with_dave.to_string()), Some(&expected("d")));
    assert_eq!(texts.get(&group), Some(&expected("g")));

    // Resumed from before all of it, then again from the middle.
    let mut bob_phone = system
        .connect_from("bob", "phone", Some(&bob_start))
        .await?;
    ensure!(
        bob_phone.welcome["resumed"] == true,
        "{}",
        bob_phone.welcome
    );
    let bob_got = messages(&mut bob_phone, 2 * ROUNDS).await?;
    strictly_increasing(&bob_got)?;
    let texts = per_conversation(&bob_got);
    assert_eq!(texts.get(&with_bob.to_string()), Some(&expected("b")));
    assert_eq!(texts.get(&group), Some(&expected("g")));
    drop(bob_phone);
    let middle = bob_got[ROUNDS - 1]["cursor"]
        .as_str()
        .context("cursor")?
        .to_string();
    let mut bob_again = system.connect_from("bob", "phone", Some(&middle)).await?;
    let rest = messages(&mut bob_again, ROUNDS).await?;
    assert_eq!(rest, bob_got[ROUNDS..], "the resume from the middle");
    ensure!(bob_again.synced["cursor"] == bob_got[2 * ROUNDS - 1]["cursor"]);

    // The streams: split, each event in its conversation's partition and
    // each item in its user's, under the subjects PROTOCOL.md names.
    let js = async_nats::jetstream::new(system.admin().await?);
    for gone in [subjects::MESSAGES_STREAM, subjects::INBOX_STREAM] {
        ensure!(js.get_stream(gone).await.is_err(), "{gone} exists");
    }
    let mut stored = 0;
    for partition in partitions.all() {
        let mut stream = js.get_stream(partition.messages_stream()).await?;
        stored += stream.info().await?.state.messages;
    }
    ensure!(stored == 3 * ROUNDS as u64, "{stored} events stored");
    let in_partition = [
        (
            partitions.of_conversation(&with_bob).messages_stream(),
            subjects::message(&with_bob),
        ),
        (
            partitions.of_user(&bob).inbox_stream(),
            subjects::inbox(&bob),
        ),
    ];
    let mut last = 0;
    for (stream, subject) in in_partition {
        let stored = js
            .get_stream(&stream)
            .await?
            .direct_get_last_for_subject(&subject)
            .await?;
        ensure!(
            stored.subject.as_str() == subject,
            "{stream}: {}",
            stored.subject
        );
        last = stored.sequence;
    }
    ensure!(
        last == cursor(&bob_got[2 * ROUNDS - 1]),
        "bob's cursor is his INBOX partition's sequence"
    );

    // `chatctl replay` merges the partitions in id order; one conversation
    // is read from its own partition.
    let all = replayed(&js, None, Start::Oldest, partitions).await?;
    ensure!(all.len() == 3 * ROUNDS, "{} replayed", all.len());
    ensure!(
        all.windows(2).all(|w| w[0].event.id < w[1].event.id),
        "not in id order"
    );
    let streams: BTreeSet<&str> = all.iter().map(|r| r.stream.as_str()).collect();
    ensure!(streams.len() >= 2, "from one partition only: {streams:?}");
    let texts = per_conversation(
        &all.iter()
            .map(
                |r| json!({"conversation": r.event.conversation.to_string(), "text": r.event.text}),
            )
            .collect::<Vec<_>>(),
    );
    assert_eq!(texts.get(&with_dave.to_string()), Some(&expected("d")));
    let one = replayed(&js, Some(with_bob.clone()), Start::Sequence(1), partitions).await?;
    let texts: Vec<&str> = one.iter().map(|r| r.event.text.as_str()).collect();
    assert_eq!(texts, expected("b"));
    let by_sequence = ReplayOptions {
        conversation: None,
        start: Start::Sequence(1),
        to_seq: None,
        until: None,
    };
    ensure!(
        Replay::open(&js, &by_sequence, partitions).await.is_err(),
        "sequences of which partition?"
    );

    // `chatctl streams`: each partition with its router's and persister's lag.
    chat_tests::wait_until(|| async {
        let Ok(states) = chatctl::status::collect(&js).await else {
            return false;
        };
        partitions.all().all(|partition| {
            states
                .iter()
                .find(|s| s.name == partition.messages_stream())
                .is_some_and(|s| {
                    ["persister", "router"].iter().all(|name| {
                        s.consumers.iter().any(|c| {
                            c.name == *name && c.num_pending == 0 && c.num_ack_pending == 0
                        })
                    })
                })
        })
    })
    .await
    .context("every partition's consumers caught up")?;

    // History comes from PostgreSQL: every partition was persisted (and
    // acked, as just seen).
    for (conversation, label) in [(with_bob.to_string(), "b"), (group.clone(), "g")] {
        let history = sender
            .request(json!({"type":"history","conversation":conversation,"limit":100}))
            .await?;
        let mut texts: Vec<String> = history["messages"]
            .as_array()
            .context("history")?
            .iter()
            .map(|m| m["text"].as_str().unwrap_or_default().to_string())
            .collect();
        texts.sort_by_key(|t| t[1..].parse::<usize>().unwrap_or(usize::MAX));
        assert_eq!(texts, expected(label), "history of {conversation}");
    }

    Ok(())
}

/// Every event `chatctl replay` yields for `conversation` (all when `None`).
async fn replayed(
    js: &async_nats::jetstream::Context,
    conversation: Option<ConversationId>,
    start: Start,
    partitions: Partitions,
) -> anyhow::Result<Vec<Replayed>> {
    let options = ReplayOptions {
        conversation,
        start,
        to_seq: None,
        until: None,
    };
    let mut replay = Replay::open(js, &options, partitions).await?;
    let mut items = Vec::new();
    let outcome = async {
        while let Some(entry) = replay.next().await? {
            match entry {
                Entry::Event(item) => items.push(item),
                Entry::Malformed { stream, seq, .. } => anyhow::bail!("{stream} {seq} malformed"),
                Entry::Change { stream, seq, .. } => {
                    anyhow::bail!("{stream} {seq}: unexpected change")
                }
            }
        }
        Ok(())
    }
    .await;
    replay.close().await;
    outcome.map(|()| items)
}

/// The account mapping an operator adds so that a publisher sending to the
/// unpartitioned subjects reaches the same partitions (docs/scaling.md).
fn server_mapping(count: u32) -> String {
    format!(
        "mappings {{\n\
         \"chat.msg.dm.*.*\": \"chat.msg.{{{{partition({count},1,2)}}}}.dm.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}\"\n\
         \"chat.msg.group.*\": \"chat.msg.{{{{partition({count},1)}}}}.group.{{{{wildcard(1)}}}}\"\n\
         \"chat.inbox.*\": \"chat.inbox.{{{{partition({count},1)}}}}.{{{{wildcard(1)}}}}\"\n\
         }}"
    )
}

/// The partition shared/ computes is the one nats-server's `partition()`
/// picks: through the account mapping, an event published on its plain
/// subject lands in the stream `partitions` names, stored under that plain
/// subject.
#[tokio::test]
async fn partition_agrees_with_the_server_mapping() -> anyhow::Result<()> {
    let partitions = three()?;
    let nats = NatsServer::start_with_config(&server_mapping(partitions.count())).await?;
    let config = chat_shared::Config {
        partitions,
        ..chat_tests::config_as(&chat_tests::test_config(nats.url(), String::new()), "admin")
    };
    let client = chat_shared::nats::connect(&config, "test-admin").await?;
    let js = async_nats::jetstream::new(client);
    chat_shared::streams::apply(&js, &config).await?;
    let mut seen = BTreeSet::new();
    for n in 0..60 {
        let (a, b) = (user(&format!("u{n}"))?, user(&format!("v{}", n * 7))?);
        let dm = ConversationId::dm(a.clone(), b)?;
        let group = ConversationId::parse(&format!("group:g{n}"))?;
        for conversation in [dm, group] {
            let ack = js
                .publish(subjects::message(&conversation), "{}".into())
                .await?
                .await?;
            let partition = partitions.of_conversation(&conversation);
            assert_eq!(ack.stream, partition.messages_stream(), "{conversation}");
            seen.insert(ack.stream);
        }
        let ack = js.publish(subjects::inbox(&a), "{}".into()).await?.await?;
        assert_eq!(ack.stream, partitions.of_user(&a).inbox_stream(), "{a}");
        seen.insert(ack.stream);
    }
    ensure!(seen.len() == 6, "every partition was used: {seen:?}");
    let stored = js
        .get_stream(partitions.of_user(&user("u0")?).inbox_stream())
        .await?
        .direct_get_last_for_subject(subjects::inbox(&user("u0")?))
        .await?;
    ensure!(stored.subject.as_str() == "chat.inbox.u0");
    Ok(())
}
