//! The message path: send, fan-out, resume, groups, history, receipts.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context as _;
use chat_tests::{wait_until, wait_until_within, Client, StartOptions, System};
use serde_json::{json, Value};

/// Reads `count` message frames, skipping other frames.
async fn messages(client: &mut Client, count: usize) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let frame = client.recv().await?;
        if frame["type"] == "message" {
            out.push(frame);
        }
    }
    Ok(out)
}

/// Asserts nothing more of `kind` arrives for a moment, on a connection
/// that is still alive: a connection that ended fails (it would receive
/// nothing either), and a ping must be answered afterwards (the server
/// answers it after whatever it had queued for this connection).
async fn quiet(client: &mut Client, kind: &str) -> anyhow::Result<()> {
    while let Some(frame) = client
        .next_within(Duration::from_millis(500))
        .await
        .context("the connection ended while waiting for quiet")?
    {
        anyhow::ensure!(frame["type"] != kind, "unexpected {frame}");
    }
    let late = client
        .drain()
        .await
        .context("no pong after the quiet period")?;
    for frame in late {
        anyhow::ensure!(frame["type"] != kind, "unexpected {frame}");
    }
    Ok(())
}

/// Sends "m<i>" (client id "c<i>") to bob for every i in `range`, each
/// answered `sent`; returns the `sent` frames.
async fn send_to_bob(
    client: &mut Client,
    range: std::ops::Range<usize>,
) -> anyhow::Result<Vec<Value>> {
    let mut sent = Vec::with_capacity(range.len());
    for i in range {
        let reply = client
            .send_message(json!({"to":"bob"}), &format!("m{i}"), &format!("c{i}"))
            .await?;
        anyhow::ensure!(reply["type"] == "sent", "{reply}");
        sent.push(reply);
    }
    Ok(sent)
}

fn cursor(frame: &Value) -> u64 {
    frame["cursor"]
        .as_str()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_dm_reaches_every_device_of_both_users_once_in_order() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice_phone = system.connect("alice", "phone").await?;
    let mut alice_laptop = system.connect("alice", "laptop").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let mut sent_ids = Vec::new();
    for sent in send_to_bob(&mut alice_phone, 0..20).await? {
        assert_eq!(sent["conversation"], "dm:alice:bob");
        assert_eq!(sent["duplicate"], false);
        sent_ids.push(sent["id"].as_str().unwrap().to_string());
    }
    for client in [&mut alice_phone, &mut alice_laptop, &mut bob] {
        let got = messages(client, 20).await?;
        let ids: Vec<_> = got
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids, sent_ids);
        assert!(got.windows(2).all(|w| cursor(&w[0]) < cursor(&w[1])));
        assert_eq!(got[3]["text"], "m3");
        assert_eq!(got[3]["from"], "alice");
        assert_eq!(got[3]["client_msg_id"], "c3");
        quiet(client, "message").await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_retried_send_is_one_message_with_one_id() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let first = alice
        .send_message(json!({"to":"bob"}), "once", "same-id")
        .await?;
    for _ in 0..2 {
        let retry = alice
            .send_message(json!({"to":"bob"}), "once", "same-id")
            .await?;
        assert_eq!(retry["id"], first["id"]);
        assert_eq!(retry["ts"], first["ts"]);
        assert_eq!(retry["duplicate"], true);
    }
    let got = messages(&mut bob, 1).await?;
    assert_eq!(got[0]["id"], first["id"]);
    quiet(&mut bob, "message").await?;
    Ok(())
}

#[tokio::test]
async fn send_is_validated() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let too_long = "é".repeat(100_001);
    assert_eq!(
        alice
            .send_message(json!({"to":"bob"}), &too_long, "big")
            .await?["code"],
        "too_large"
    );
    let just_fits = "é".repeat(100_000);
    assert_eq!(
        alice
            .send_message(json!({"to":"bob"}), &just_fits, "fits")
            .await?["type"],
        "sent"
    );
    assert_eq!(
        alice.send_message(json!({"to":"bob"}), "", "empty").await?["code"],
        "bad_request"
    );
    assert_eq!(
        alice
            .send_message(json!({"to":"alice"}), "me", "self")
            .await?["code"],
        "bad_request"
    );
    let both = json!({"to":"bob","conversation":"dm:alice:bob"});
    assert_eq!(
        alice.send_message(both, "x", "both").await?["code"],
        "bad_request"
    );
    let other = json!({"conversation":"dm:bob:carol"});
    assert_eq!(
        alice.send_message(other, "x", "other").await?["code"],
        "forbidden"
    );
    let unknown_group = json!({"conversation":"group:nope"});
    assert_eq!(
        alice.send_message(unknown_group, "x", "g").await?["code"],
        "not_found"
    );
    Ok(())
}

#[tokio::test]
async fn resume_after_500_offline_while_500_arrive_live() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let bob = system.connect("bob", "phone").await?;
    let start = bob.synced["cursor"].as_str().unwrap().to_string();
    drop(bob);
    send_to_bob(&mut alice, 0..500).await?;
    // Bob comes back with his cursor while alice keeps sending from another task.
    let url_system = &system;
    let sender = async {
        let mut alice2 = url_system.connect("alice", "laptop").await?;
        send_to_bob(&mut alice2, 500..1000).await?;
        Ok::<_, anyhow::Error>(())
    };
    let receiver = async {
        let mut bob = url_system
            .connect_from("bob", "phone", Some(&start))
            .await?;
        assert_eq!(bob.welcome["resumed"], true);
        let mut texts: Vec<String> = bob
            .backlog
            .iter()
            .filter(|f| f["type"] == "message")
            .map(|f| f["text"].as_str().unwrap_or_default().to_string())
            .collect();
        let mut last = bob.backlog.iter().map(cursor).max().unwrap_or(0);
        while texts.len() < 1000 {
            let frame = bob.recv().await?;
            if frame["type"] == "message" {
                anyhow::ensure!(cursor(&frame) > last, "cursor went back");
                last = cursor(&frame);
                texts.push(frame["text"].as_str().unwrap_or_default().to_string());
            }
        }
        quiet(&mut bob, "message").await?;
        Ok::<_, anyhow::Error>(texts)
    };
    let (sent, texts) = tokio::join!(sender, receiver);
    sent?;
    let texts = texts?;
    let expected: Vec<String> = (0..1000).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, expected);
    Ok(())
}

#[tokio::test]
async fn reconnect_without_cursor_resumes_from_the_last_ack() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    send_to_bob(&mut alice, 0..3).await?;
    let got = messages(&mut bob, 3).await?;
    bob.send(json!({"type":"ack","cursor":got[1]["cursor"]}))
        .await?;
    // Closing flushes the acked cursor.
    drop(bob);
    send_to_bob(&mut alice, 3..5).await?;
    // The acked cursor is written when the old connection closes; retry until
    // the edge has done so.
    let mut again = system.connect("bob", "phone").await?;
    for _ in 0..50 {
        if again.backlog.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        again = system.connect("bob", "phone").await?;
    }
    let texts: Vec<_> = again
        .backlog
        .iter()
        .map(|f| f["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(texts, ["m2", "m3", "m4"]);
    // A brand-new device starts at the head.
    let tablet = system.connect("bob", "tablet").await?;
    assert!(tablet.backlog.is_empty());
    Ok(())
}

#[tokio::test]
async fn an_expired_cursor_is_not_resumed() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    send_to_bob(&mut alice, 0..3).await?;
    // Expire the inbox: everything up to now is gone.
    let admin = system.admin().await?;
    let js = async_nats::jetstream::new(admin);
    let inboxes: Vec<String> = system
        .config
        .partitions
        .all()
        .map(|p| p.inbox_stream())
        .collect();
    wait_until(|| {
        let (js, inboxes) = (js.clone(), inboxes.clone());
        async move {
            let mut items = 0;
            for inbox in &inboxes {
                match js.get_stream(inbox).await {
                    Ok(stream) => items += stream.cached_info().state.messages,
                    Err(_) => return false,
                }
            }
            items >= 6
        }
    })
    .await?;
    for inbox in &inboxes {
        js.get_stream(inbox).await?.purge().await?;
    }
    let bob = system.connect_from("bob", "phone", Some("1")).await?;
    assert_eq!(bob.welcome["resumed"], false);
    Ok(())
}

#[tokio::test]
async fn groups_membership_and_limits() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut owner = system.connect("owner", "d").await?;
    let mut member = system.connect("m1", "d").await?;
    let mut outsider = system.connect("outsider", "d").await?;
    // The owner and 100 members are one too many: refused, and nothing is
    // created (m1, in both lists, hears only of the group created next).
    let over: Vec<String> = (1..=100).map(|i| format!("m{i}")).collect();
    let refused_create = owner
        .request(json!({"type":"group.create","name":"crowd","members":over}))
        .await?;
    assert_eq!(refused_create["type"], "error", "{refused_create}");
    assert_eq!(refused_create["code"], "too_large", "{refused_create}");
    let members: Vec<String> = (1..100).map(|i| format!("m{i}")).collect();
    let created = owner
        .request(json!({"type":"group.create","name":"team","members":members}))
        .await?;
    assert_eq!(created["type"], "group", "{created}");
    let group = created["group"]["id"].as_str().unwrap().to_string();
    assert_eq!(created["group"]["members"].as_array().unwrap().len(), 100);
    assert_eq!(created["group"]["owner"], "owner");
    let membership = member.recv_type("membership").await?;
    assert_eq!(membership["event"], "created");
    assert_eq!(membership["conversation"], format!("group:{group}"));
    let listed = member.request(json!({"type":"conversations"})).await?;
    let groups: Vec<&str> = listed["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i["conversation"].as_str())
                .filter(|c| c.starts_with("group:"))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(groups, [format!("group:{group}")], "{listed}");

    let conversation = json!({"conversation": format!("group:{group}")});
    let too_many = owner
        .request(json!({"type":"group.add","group":group,"users":["m100"]}))
        .await?;
    assert_eq!(too_many["code"], "too_large");
    let refused = outsider
        .send_message(conversation.clone(), "let me in", "o1")
        .await?;
    assert_eq!(refused["code"], "forbidden");
    let info = outsider
        .request(json!({"type":"group.info","group":group}))
        .await?;
    assert_eq!(info["code"], "forbidden");
    let not_owner = member
        .request(json!({"type":"group.remove","group":group,"users":["m2"]}))
        .await?;
    assert_eq!(not_owner["code"], "forbidden");

    let sent = owner
        .send_message(conversation.clone(), "hi team", "g1")
        .await?;
    assert_eq!(sent["type"], "sent");
    assert_eq!(messages(&mut member, 1).await?[0]["text"], "hi team");

    let removed = owner
        .request(json!({"type":"group.remove","group":group,"users":["m1"]}))
        .await?;
    assert_eq!(removed["group"]["members"].as_array().unwrap().len(), 99);
    let event = member.recv_type("membership").await?;
    assert_eq!(
        (event["event"].as_str(), event["users"][0].as_str()),
        (Some("removed"), Some("m1"))
    );
    let after = member
        .send_message(conversation.clone(), "still here?", "m1-1")
        .await?;
    assert_eq!(after["code"], "forbidden");
    owner
        .send_message(conversation.clone(), "after removal", "g2")
        .await?;
    quiet(&mut member, "message").await?;

    let added = owner
        .request(json!({"type":"group.add","group":group,"users":["outsider"]}))
        .await?;
    assert_eq!(added["group"]["members"].as_array().unwrap().len(), 100);
    assert_eq!(outsider.recv_type("membership").await?["event"], "added");
    // What was said before joining is not unread for the newcomer.
    let list = outsider.request(json!({"type":"conversations"})).await?;
    let item = list["items"]
        .as_array()
        .and_then(|items| {
            items
                .iter()
                .find(|i| i["conversation"] == format!("group:{group}"))
        })
        .cloned()
        .unwrap_or_default();
    assert_eq!(item["unread"], 0, "{list}");
    assert_eq!(item["last"]["text"], "after removal");
    let left = outsider
        .request(json!({"type":"group.leave","group":group}))
        .await?;
    assert_eq!(left["type"], "ok");
    assert_eq!(outsider.recv_type("membership").await?["event"], "left");
    Ok(())
}

#[tokio::test]
async fn history_conversations_and_read_state() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "d").await?;
    let mut bob = system.connect("bob", "d").await?;
    let ids: Vec<String> = send_to_bob(&mut alice, 0..7)
        .await?
        .iter()
        .map(|sent| sent["id"].as_str().unwrap().to_string())
        .collect();
    // The persister writes asynchronously; wait until it has all seven.
    wait_until(|| listable(&system, 7)).await?;
    let page = bob
        .request(json!({"type":"history","conversation":"dm:alice:bob","limit":3}))
        .await?;
    let texts: Vec<_> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].clone())
        .collect();
    assert_eq!(texts, [json!("m6"), json!("m5"), json!("m4")]);
    assert_eq!(page["more"], true);
    let before = page["messages"][2]["id"].clone();
    let rest = bob
        .request(json!({"type":"history","conversation":"dm:alice:bob","before":before,"limit":10}))
        .await?;
    assert_eq!(rest["messages"].as_array().unwrap().len(), 4);
    assert_eq!(rest["more"], false);
    let forbidden = system
        .connect("carol", "d")
        .await?
        .request(json!({"type":"history","conversation":"dm:alice:bob"}))
        .await?;
    assert_eq!(forbidden["code"], "forbidden");
    let bad_limit = bob
        .request(json!({"type":"history","conversation":"dm:alice:bob","limit":201}))
        .await?;
    assert_eq!(bad_limit["code"], "bad_request");

    let list = bob.request(json!({"type":"conversations"})).await?;
    let item = &list["items"][0];
    assert_eq!(item["conversation"], "dm:alice:bob");
    assert_eq!(item["unread"], 7);
    assert_eq!(item["last"]["text"], "m6");
    assert_eq!(item["read_up_to"], Value::Null);

    bob.send(json!({"type":"read","conversation":"dm:alice:bob","up_to":ids[4]}))
        .await?;
    let mut receipt = alice.recv_type("receipt").await?;
    // v1.1: receipts are inbox items.
    assert!(receipt.as_object_mut().unwrap().remove("cursor").is_some());
    assert_eq!(
        receipt,
        json!({"type":"receipt","conversation":"dm:alice:bob","user":"bob","kind":"read","up_to":ids[4]})
    );
    let list = bob.request(json!({"type":"conversations"})).await?;
    assert_eq!(list["items"][0]["unread"], 2);
    assert_eq!(list["items"][0]["read_up_to"], json!(ids[4]));
    // Read state never goes back.
    bob.send(json!({"type":"read","conversation":"dm:alice:bob","up_to":ids[1]}))
        .await?;
    let list = bob.request(json!({"type":"conversations"})).await?;
    assert_eq!(list["items"][0]["read_up_to"], json!(ids[4]));
    // Nobody reads past what has been sent: an id from the future is refused.
    let refused = bob
        .request(json!({"type":"read","conversation":"dm:alice:bob","up_to":"9223372036854775807"}))
        .await?;
    assert_eq!(refused["code"], "bad_request");
    let list = bob.request(json!({"type":"conversations"})).await?;
    assert_eq!(list["items"][0]["read_up_to"], json!(ids[4]));
    bob.send(json!({"type":"read","conversation":"dm:alice:bob","up_to":ids[6]}))
        .await?;
    assert_eq!(alice.recv_type("receipt").await?["up_to"], json!(ids[6]));
    let list = bob.request(json!({"type":"conversations"})).await?;
    assert_eq!(list["items"][0]["unread"], 0);
    Ok(())
}

/// Waits for the `sent` (or error) of every pipelined send in `range` of
/// [`send_pipelined`]; returns the ids, failing on anything but `sent`.
async fn sent_ids(
    client: &mut Client,
    range: std::ops::Range<usize>,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(range.len());
    for i in range {
        let reference = json!(format!("s{i}"));
        let reply = client.recv_matching(|f| f["ref"] == reference).await?;
        anyhow::ensure!(reply["type"] == "sent", "{reply}");
        ids.push(reply["id"].as_str().unwrap_or_default().to_string());
    }
    Ok(ids)
}

async fn stored(system: &System) -> anyhow::Result<i64> {
    system
        .count_everywhere("SELECT count(*) FROM messages")
        .await
}

/// Whether `count` messages are stored and counted for their members (what
/// `conversations` answers from).
async fn listable(system: &System, count: i64) -> bool {
    stored(system).await.is_ok_and(|n| n == count)
        && system.counters_settled().await.unwrap_or(false)
}

/// The conversations `client`'s user is in, newest activity first, as
/// (conversation, last message's text).
async fn listed(client: &mut Client) -> anyhow::Result<Vec<(String, String)>> {
    let list = client.request(json!({"type":"conversations"})).await?;
    Ok(list["items"]
        .as_array()
        .with_context(|| format!("{list}"))?
        .iter()
        .map(|item| {
            (
                item["conversation"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                item["last"]["text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect())
}

#[tokio::test]
async fn conversations_are_listed_newest_activity_first() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut bob = system.connect("bob", "d").await?;
    let mut others = HashMap::new();
    for user in ["alice", "carol", "dave"] {
        others.insert(user, system.connect(user, "d").await?);
    }
    let pairs = |order: &[(&str, &str)]| -> Vec<(String, String)> {
        order
            .iter()
            .map(|(c, t)| (c.to_string(), t.to_string()))
            .collect()
    };
    // Updated in an order that is neither the names' nor its reverse.
    let mut sent = 0;
    for (user, text) in [("carol", "c1"), ("alice", "a1"), ("dave", "d1")] {
        let client = others.get_mut(user).context("a client")?;
        let reply = client.send_message(json!({"to":"bob"}), text, text).await?;
        anyhow::ensure!(reply["type"] == "sent", "{reply}");
        sent += 1;
    }
    wait_until(|| listable(&system, sent)).await?;
    assert_eq!(
        listed(&mut bob).await?,
        pairs(&[
            ("dm:bob:dave", "d1"),
            ("dm:alice:bob", "a1"),
            ("dm:bob:carol", "c1")
        ])
    );
    // New activity moves a conversation to the top: a message from the
    // other side, then one of bob's own.
    let carol = others.get_mut("carol").context("carol")?;
    let reply = carol.send_message(json!({"to":"bob"}), "c2", "c2").await?;
    anyhow::ensure!(reply["type"] == "sent", "{reply}");
    sent += 1;
    wait_until(|| listable(&system, sent)).await?;
    assert_eq!(
        listed(&mut bob).await?,
        pairs(&[
            ("dm:bob:carol", "c2"),
            ("dm:bob:dave", "d1"),
            ("dm:alice:bob", "a1")
        ])
    );
    let reply = bob.send_message(json!({"to":"alice"}), "b1", "b1").await?;
    anyhow::ensure!(reply["type"] == "sent", "{reply}");
    sent += 1;
    wait_until(|| listable(&system, sent)).await?;
    let expected = pairs(&[
        ("dm:alice:bob", "b1"),
        ("dm:bob:carol", "c2"),
        ("dm:bob:dave", "d1"),
    ]);
    assert_eq!(listed(&mut bob).await?, expected);
    // The other side sees the same conversation on top.
    let alice = others.get_mut("alice").context("alice")?;
    assert_eq!(
        listed(alice).await?.first(),
        Some(&("dm:alice:bob".to_string(), "b1".to_string()))
    );
    Ok(())
}

#[tokio::test]
async fn every_message_is_stored_once_across_a_persister_restart() -> anyhow::Result<()> {
    let mut system = System::start_with_options(StartOptions { persister: false }, |_| {}).await?;
    // The only persister (it also runs the migrations).
    let first = system.start_persister_task();
    system.wait_rpc_ready().await?;
    let mut alice = system.connect("alice", "d").await?;
    let mut carol = system.connect("carol", "d").await?;
    let mut ids = Vec::new();

    // Messages flow from two senders while the persister is stopped.
    send_pipelined(&mut alice, json!({"to":"bob"}), "alice", 0..100).await?;
    send_pipelined(&mut carol, json!({"to":"bob"}), "carol", 0..100).await?;
    wait_until(|| async { stored(&system).await.is_ok_and(|n| n > 0) }).await?;
    first.stop().await?;
    ids.extend(sent_ids(&mut alice, 0..100).await?);
    ids.extend(sent_ids(&mut carol, 0..100).await?);

    // No persister at all now: sends are still accepted (they are durable
    // in JetStream), nothing is written, requests are unavailable.
    let stopped_at = stored(&system).await?;
    send_pipelined(&mut alice, json!({"to":"bob"}), "alice", 100..150).await?;
    send_pipelined(&mut carol, json!({"to":"bob"}), "carol", 100..150).await?;
    ids.extend(sent_ids(&mut alice, 100..150).await?);
    ids.extend(sent_ids(&mut carol, 100..150).await?);
    let history = alice
        .request(json!({"type":"history","conversation":"dm:alice:bob"}))
        .await?;
    assert_eq!(history["code"], "unavailable", "{history}");
    assert_eq!(
        stored(&system).await?,
        stopped_at,
        "nothing writes while stopped"
    );
    assert!(stopped_at < 300);

    // A new persister takes the backlog and what keeps coming.
    let _second = system.start_persister_task();
    send_pipelined(&mut alice, json!({"to":"bob"}), "alice", 150..200).await?;
    send_pipelined(&mut carol, json!({"to":"bob"}), "carol", 150..200).await?;
    ids.extend(sent_ids(&mut alice, 150..200).await?);
    ids.extend(sent_ids(&mut carol, 150..200).await?);
    // A stopped persister hands back what it holds, but an event pushed
    // into its pull request after that returns only after the consumer's
    // ack wait (30 s): allow for that redelivery.
    let catch_up = Duration::from_secs(30) + chat_tests::WAIT * 2;
    let caught_up = wait_until_within(catch_up, || async {
        stored(&system).await.is_ok_and(|n| n >= 400)
    })
    .await;
    if let Err(e) = caught_up {
        anyhow::bail!("{e}: {} of 400 stored", stored(&system).await?);
    }
    // Give a duplicate write a moment to show before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stored(&system).await?, 400);
    // Every shard's rows together: a copy on another shard is a duplicate.
    let rows = system
        .rows_everywhere("SELECT id, body, sender, client_msg_id FROM messages")
        .await?;
    let sends: HashSet<(String, String)> = rows.iter().map(|r| (r.get(2), r.get(3))).collect();
    assert_eq!(sends.len(), rows.len(), "a send stored twice");
    let stored_ids: HashSet<String> = rows
        .iter()
        .map(|r| r.get::<_, i64>(0).to_string())
        .collect();
    let sent: HashSet<String> = ids.into_iter().collect();
    assert_eq!(sent.len(), 400);
    assert_eq!(stored_ids, sent);
    let bodies: HashSet<String> = rows.iter().map(|r| r.get(1)).collect();
    let expected: HashSet<String> = ["alice", "carol"]
        .iter()
        .flat_map(|who| (0..200).map(move |i| format!("{who}:{i}")))
        .collect();
    assert_eq!(bodies, expected);
    Ok(())
}

#[tokio::test]
async fn a_nats_outage_answers_unavailable_fast_and_recovers() -> anyhow::Result<()> {
    let mut system = System::start().await?;
    let mut alice = system.connect("alice", "d").await?;
    // Bob stays connected to the same edge through the outage.
    let mut bob = system.connect("bob", "d").await?;
    assert_eq!(
        alice
            .send_message(json!({"to":"bob"}), "before", "c0")
            .await?["type"],
        "sent"
    );
    system.nats.kill().await?;
    let started = std::time::Instant::now();
    let reply = alice
        .send_message(json!({"to":"bob"}), "during", "c1")
        .await?;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    assert!(
        started.elapsed() <= Duration::from_millis(2500),
        "took {:?}",
        started.elapsed()
    );
    system.nats.restart().await?;
    let mut recovered = false;
    for _ in 0..100 {
        let reply = alice
            .send_message(json!({"to":"bob"}), "after", "c2")
            .await?;
        if reply["type"] == "sent" {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "sends never recovered");
    // Bob gets both accepted messages once each, in order, whether live or
    // through the refill from his inbox after the reconnect.
    let texts: Vec<_> = messages(&mut bob, 2)
        .await?
        .iter()
        .map(|m| m["text"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(texts, ["before", "after"]);
    quiet(&mut bob, "message").await?;
    Ok(())
}

/// Sends `send` frames for every i in `range` without waiting for any
/// answer (text `<prefix>:<i>`, client id `c<i>`).
async fn send_pipelined(
    client: &mut Client,
    target: Value,
    prefix: &str,
    range: std::ops::Range<usize>,
) -> anyhow::Result<()> {
    for i in range {
        let mut frame = json!({"type":"send","ref":format!("s{i}"),"text":format!("{prefix}:{i}"),"client_msg_id":format!("c{i}")});
        if let (Some(frame), Some(target)) = (frame.as_object_mut(), target.as_object()) {
            frame.extend(target.clone());
        }
        client.send(frame).await?;
    }
    Ok(())
}

/// Reads frames until `got` holds `count` message frames, waiting up to
/// `wait` for each; an `error` frame fails.
async fn collect_messages(
    client: &mut Client,
    got: &mut Vec<Value>,
    count: usize,
    wait: Duration,
) -> anyhow::Result<()> {
    while got.len() < count {
        let frame = client
            .recv_within(wait)
            .await
            .with_context(|| format!("{} of {count} messages", got.len()))?;
        match frame["type"].as_str() {
            Some("message") => got.push(frame),
            Some("error") => anyhow::bail!("{frame}"),
            _ => {}
        }
    }
    Ok(())
}

/// The texts of `got` per conversation, in arrival order.
fn texts_by_conversation(got: &[Value]) -> HashMap<String, Vec<String>> {
    let mut by: HashMap<String, Vec<String>> = HashMap::new();
    for frame in got {
        by.entry(frame["conversation"].as_str().unwrap_or_default().into())
            .or_default()
            .push(frame["text"].as_str().unwrap_or_default().into());
    }
    by
}

#[tokio::test]
async fn two_routers_never_reorder_a_conversation() -> anyhow::Result<()> {
    const SENDERS: usize = 4;
    // Per conversation: sent before the active router stops, and after.
    const BEFORE: usize = 30;
    const AFTER: usize = 30;
    // The takeover waits for the pin to time out (10 s) on a busy machine.
    const TAKEOVER: Duration = Duration::from_secs(60);
    let mut system = System::start().await?;
    let mut bob_phone = system.connect("bob", "phone").await?;
    let mut bob_laptop = system.connect("bob", "laptop").await?;
    let mut carol = system.connect("carol", "d").await?;
    let mut owner = system.connect("owner", "d").await?;
    let created = owner
        .request(json!({"type":"group.create","name":"g","members":["bob","carol"]}))
        .await?;
    let group = format!(
        "group:{}",
        created["group"]["id"].as_str().context("group id")?
    );
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        senders.push(system.connect(&format!("s{s}"), "d").await?);
    }
    // The first router routes (so it holds the pin) before the standby starts.
    let mut phone_got = Vec::new();
    let warm = owner
        .send_message(json!({"conversation":group}), "warm-up", "warm")
        .await?;
    anyhow::ensure!(warm["type"] == "sent", "{warm}");
    collect_messages(&mut bob_phone, &mut phone_got, 1, chat_tests::WAIT).await?;
    system.start_router();

    // Every sender has sends in flight (pipelined) while the active router
    // is stopped mid-stream; the standby must take over where it stopped.
    for (s, sender) in senders.iter_mut().enumerate() {
        send_pipelined(sender, json!({"to":"bob"}), &format!("s{s}"), 0..BEFORE).await?;
    }
    send_pipelined(&mut owner, json!({"conversation":group}), "g", 0..BEFORE).await?;
    collect_messages(&mut bob_phone, &mut phone_got, 2, chat_tests::WAIT).await?;
    system.stop_router().await?;
    for (s, sender) in senders.iter_mut().enumerate() {
        send_pipelined(
            sender,
            json!({"to":"bob"}),
            &format!("s{s}"),
            BEFORE..BEFORE + AFTER,
        )
        .await?;
    }
    send_pipelined(
        &mut owner,
        json!({"conversation":group}),
        "g",
        BEFORE..BEFORE + AFTER,
    )
    .await?;

    let each = BEFORE + AFTER;
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for s in 0..SENDERS {
        expected.insert(
            format!("dm:bob:s{s}"),
            (0..each).map(|i| format!("s{s}:{i}")).collect(),
        );
    }
    let mut group_texts = vec!["warm-up".to_string()];
    group_texts.extend((0..each).map(|i| format!("g:{i}")));
    expected.insert(group.clone(), group_texts);

    // Every device of every member: bob's two see everything, each sender
    // its own conversation, carol and the owner the group.
    let mut devices: Vec<(String, &mut Client, Vec<Value>, Vec<String>)> = vec![
        (
            "bob/phone".into(),
            &mut bob_phone,
            phone_got,
            expected.keys().cloned().collect(),
        ),
        (
            "bob/laptop".into(),
            &mut bob_laptop,
            Vec::new(),
            expected.keys().cloned().collect(),
        ),
        ("carol".into(), &mut carol, Vec::new(), vec![group.clone()]),
        ("owner".into(), &mut owner, Vec::new(), vec![group.clone()]),
    ];
    for (s, sender) in senders.iter_mut().enumerate() {
        devices.push((
            format!("s{s}"),
            sender,
            Vec::new(),
            vec![format!("dm:bob:s{s}")],
        ));
    }
    for (name, client, got, conversations) in &mut devices {
        let count = conversations.iter().map(|c| expected[c].len()).sum();
        collect_messages(client, got, count, TAKEOVER)
            .await
            .with_context(|| name.clone())?;
        let by = texts_by_conversation(got);
        for conversation in conversations.iter() {
            assert_eq!(
                by.get(conversation),
                Some(&expected[conversation]),
                "{name}: {conversation}"
            );
        }
        assert_eq!(by.len(), conversations.len(), "{name}: {by:?}");
        assert!(
            got.windows(2).all(|w| cursor(&w[0]) < cursor(&w[1])),
            "{name}: live cursors must grow"
        );
        quiet(client, "message")
            .await
            .with_context(|| name.clone())?;
    }
    Ok(())
}

#[tokio::test]
async fn a_cursor_from_the_future_is_not_trusted() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    send_to_bob(&mut alice, 0..2).await?;
    // `sent` means stored in MESSAGES; wait until the router has put both
    // into bob's inbox, so neither can arrive live after the hello below.
    let bob_id = chat_shared::ids::UserId::parse("bob")?;
    let inbox = async_nats::jetstream::new(system.admin().await?)
        .get_stream(system.config.partitions.of_user(&bob_id).inbox_stream())
        .await?;
    let bob_inbox = chat_shared::subjects::inbox(&bob_id);
    wait_until(|| async {
        inbox
            .direct_get_last_for_subject(bob_inbox.clone())
            .await
            .is_ok_and(|last| String::from_utf8_lossy(&last.payload).contains("\"m1\""))
    })
    .await?;
    // A cursor the server never handed out must not hide later items.
    let mut bob = system
        .connect_from("bob", "phone", Some("18446744073709551615"))
        .await?;
    assert_eq!(bob.welcome["resumed"], false);
    send_to_bob(&mut alice, 2..3).await?;
    assert_eq!(messages(&mut bob, 1).await?[0]["text"], "m2");
    Ok(())
}

#[tokio::test]
async fn many_conversations_into_one_inbox_arrive_live_in_cursor_order() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut bob = system.connect("bob", "phone").await?;
    let senders = 12;
    let each = 40;
    let mut clients = Vec::new();
    for s in 0..senders {
        clients.push(system.connect(&format!("sender{s}"), "d").await?);
    }
    // Pipelined sends from every sender at once: the router's lanes append
    // to bob's inbox concurrently.
    for i in 0..each {
        for (s, client) in clients.iter_mut().enumerate() {
            client
                .send(json!({"type":"send","to":"bob","text":format!("{s}:{i}"),"client_msg_id":format!("c{i}")}))
                .await?;
        }
    }
    let got = messages(&mut bob, senders * each).await?;
    assert!(
        got.windows(2).all(|w| cursor(&w[0]) < cursor(&w[1])),
        "live cursors must grow"
    );
    let distinct: HashSet<&str> = got.iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(distinct.len(), senders * each);
    quiet(&mut bob, "message").await?;
    Ok(())
}

#[tokio::test]
async fn an_event_the_database_refuses_does_not_stall_history() -> anyhow::Result<()> {
    use chat_shared::subjects;
    let system = System::start().await?;
    // Published behind the edge's back: PostgreSQL refuses NUL in text.
    let admin = async_nats::jetstream::new(system.admin().await?);
    let poison = json!({"id":"1","conversation":"dm:alice:bob","from":"alice","text":"a\u{0}b","ts":1,"client_msg_id":"poison"})
        .to_string();
    let alice_bob = chat_shared::ids::ConversationId::parse("dm:alice:bob")?;
    let messages = system.config.partitions.of_conversation(&alice_bob);
    let poison_seq = admin
        .publish(
            subjects::message_in(&alice_bob, messages),
            poison.clone().into(),
        )
        .await?
        .await?
        .sequence;
    let mut alice = system.connect("alice", "d").await?;
    let mut bob = system.connect("bob", "d").await?;
    let ids: Vec<String> = send_to_bob(&mut alice, 0..5)
        .await?
        .iter()
        .map(|sent| sent["id"].as_str().unwrap_or_default().to_string())
        .collect();
    let db = system.database_of("dm:alice:bob").await?;
    wait_until(|| async { stored(&system).await.is_ok_and(|n| n == 5) }).await?;

    // Refused: the persister copied it to its dead letters, then
    // terminated it (nothing of MESSAGES is left pending or unacked).
    let dead_letters = admin.get_stream(subjects::DEADLETTER_STREAM).await?;
    let subject = subjects::dead_letter(subjects::PERSISTER_CONSUMER);
    wait_until(|| async {
        dead_letters
            .direct_get_last_for_subject(subject.clone())
            .await
            .is_ok()
    })
    .await
    .context("a dead letter of the persister")?;
    let dead = dead_letters.direct_get_last_for_subject(subject).await?;
    assert_eq!(dead.payload.as_ref(), poison.as_bytes());
    let header = |name: &str| dead.headers.get(name).map(|v| v.as_str().to_string());
    assert_eq!(
        header(subjects::DEAD_SEQ_HEADER),
        Some(poison_seq.to_string())
    );
    assert_eq!(
        header(subjects::DEAD_SUBJECT_HEADER).as_deref(),
        Some("chat.msg.dm.alice.bob")
    );
    let reason = header(subjects::DEAD_REASON_HEADER).unwrap_or_default();
    assert!(
        !reason.is_empty() && !reason.starts_with("max deliveries"),
        "refused by the database, not given up on: {reason:?}"
    );
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = admin
        .get_stream(messages.messages_stream())
        .await?
        .get_consumer(subjects::PERSISTER_CONSUMER)
        .await
        .map_err(|e| anyhow::anyhow!("the persister's consumer: {e}"))?;
    let mut settled = false;
    for _ in 0..100 {
        let info = consumer.info().await?;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(settled, "the persister left MESSAGES events unsettled");
    let poison_rows = db
        .query_one(
            "SELECT count(*) FROM messages WHERE client_msg_id = 'poison'",
            &[],
        )
        .await?
        .get::<_, i64>(0);
    assert_eq!(poison_rows, 0);

    // History serves what was stored around it.
    let page = bob
        .request(json!({"type":"history","conversation":"dm:alice:bob","limit":10}))
        .await?;
    let got: Vec<(String, String)> = page["messages"]
        .as_array()
        .context("messages")?
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap_or_default().to_string(),
                m["text"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = (0..5)
        .rev()
        .map(|i| (ids[i].clone(), format!("m{i}")))
        .collect();
    assert_eq!(got, expected, "{page}");
    assert_eq!(page["more"], false);
    Ok(())
}

#[tokio::test]
async fn a_claim_older_than_the_dedup_window_that_was_never_published_is_published(
) -> anyhow::Result<()> {
    use chat_shared::idgen::{EPOCH_MS, NODE_BITS, SEQUENCE_BITS};
    use chat_shared::ids::{ClientMsgId, UserId};
    let system = System::start().await?;
    // An edge claimed (alice, "old-1") 20 minutes ago and died before publishing.
    let now_ms = chat_shared::auth::now_secs() * 1000;
    let old_id = ((now_ms - 20 * 60 * 1000 - EPOCH_MS) << (NODE_BITS + SEQUENCE_BITS))
        | (1 << SEQUENCE_BITS);
    let key =
        chat_shared::subjects::sent_key(&UserId::parse("alice")?, &ClientMsgId::parse("old-1")?);
    let admin = async_nats::jetstream::new(system.admin().await?);
    admin
        .get_key_value("chat_sent")
        .await?
        .put(key, old_id.to_string().into())
        .await?;

    let mut alice = system.connect("alice", "d").await?;
    let mut bob = system.connect("bob", "d").await?;
    let sent = alice
        .send_message(json!({"to":"bob"}), "late retry", "old-1")
        .await?;
    assert_eq!(sent["type"], "sent", "{sent}");
    assert_eq!(sent["id"], old_id.to_string());
    assert_eq!(sent["duplicate"], false);
    assert_eq!(messages(&mut bob, 1).await?[0]["id"], old_id.to_string());
    // Retrying again finds it stored.
    let again = alice
        .send_message(json!({"to":"bob"}), "late retry", "old-1")
        .await?;
    assert_eq!(
        (again["id"].as_str(), again["duplicate"].as_bool()),
        (Some(old_id.to_string().as_str()), Some(true))
    );
    quiet(&mut bob, "message").await?;
    Ok(())
}

#[tokio::test]
async fn acks_become_delivered_receipts_for_the_senders() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "d").await?;
    let mut bob = system.connect("bob", "d").await?;
    let ids: Vec<String> = send_to_bob(&mut alice, 0..3)
        .await?
        .iter()
        .map(|sent| sent["id"].as_str().unwrap().to_string())
        .collect();
    let got = messages(&mut bob, 3).await?;
    bob.send(json!({"type":"ack","cursor":got[1]["cursor"]}))
        .await?;
    let mut receipt = alice.recv_type("receipt").await?;
    // v1.1: receipts are inbox items, and a delivered one names the device.
    assert!(receipt.as_object_mut().unwrap().remove("cursor").is_some());
    assert_eq!(
        receipt,
        json!({"type":"receipt","conversation":"dm:alice:bob","user":"bob","kind":"delivered","up_to":ids[1],"device":"d"})
    );
    bob.send(json!({"type":"ack","cursor":got[2]["cursor"]}))
        .await?;
    assert_eq!(alice.recv_type("receipt").await?["up_to"], json!(ids[2]));

    // In a group only the sender hears that a member received its message.
    let created = alice
        .request(json!({"type":"group.create","name":"trio","members":["bob","carol"]}))
        .await?;
    let group = created["group"]["id"].as_str().unwrap().to_string();
    let mut carol = system.connect("carol", "d").await?;
    let sent = alice
        .send_message(
            json!({"conversation": format!("group:{group}")}),
            "hi",
            "g1",
        )
        .await?;
    let message = messages(&mut bob, 1).await?.remove(0);
    bob.send(json!({"type":"ack","cursor":message["cursor"]}))
        .await?;
    let receipt = alice.recv_type("receipt").await?;
    assert_eq!(
        (receipt["user"].as_str(), receipt["up_to"].as_str()),
        (Some("bob"), sent["id"].as_str())
    );
    assert_eq!(receipt["conversation"], format!("group:{group}"));
    quiet(&mut carol, "receipt").await?;
    Ok(())
}
