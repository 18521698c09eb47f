//! Receipts that survive being offline (PROTOCOL.md v1.1): receipt inbox
//! items with cursors, a read reaching the reader's other devices, the
//! `receipts` request, and reads that never depend on the history writer.

use anyhow::Context as _;
use std::time::Duration;

use chat_tests::{Client, System, WAIT};
use serde_json::{json, Value};
use tokio::time::Instant;

/// Polling until a condition holds, for conditions that need the test's
/// clients (`wait_until` takes a closure that cannot lend them out).
struct Patience(Instant);

impl Patience {
    fn new() -> Self {
        Self(Instant::now() + WAIT)
    }

    /// Waits a moment before the next try; fails once [`WAIT`] is spent.
    async fn again(&self, what: impl std::fmt::Display) -> anyhow::Result<()> {
        anyhow::ensure!(Instant::now() < self.0, "not within {WAIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(())
    }
}

/// The numeric value of a frame's `cursor`.
fn cursor_of(frame: &Value) -> anyhow::Result<u64> {
    frame["cursor"]
        .as_str()
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no cursor in {frame}"))
}

/// The `conversations` item of `conversation`, if it is listed.
async fn listed(client: &mut Client, conversation: &str) -> anyhow::Result<Option<Value>> {
    let list = client.request(json!({"type":"conversations"})).await?;
    Ok(list["items"]
        .as_array()
        .with_context(|| format!("{list}"))?
        .iter()
        .find(|item| item["conversation"] == conversation)
        .cloned())
}

/// A read of a message the reader just got live, while the history writer
/// cannot write it (the test holds a lock on `messages` and
/// `conversations` that the writer's inserts wait for and the read does
/// not need): the read is stored and announced at once, and once the
/// writer catches up every device says the conversation is read.
#[tokio::test]
async fn a_read_while_the_writer_is_held_back_is_not_lost() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "d").await?;
    let mut phone = system.connect("bob", "phone").await?;
    let mut laptop = system.connect("bob", "laptop").await?;

    let mut holder = system.database_of("dm:alice:bob").await?;
    let held = holder.transaction().await?;
    held.batch_execute("LOCK TABLE messages, conversations IN EXCLUSIVE MODE")
        .await?;

    let sent = alice
        .send_message(json!({"to":"bob"}), "read me", "c1")
        .await?;
    anyhow::ensure!(sent["type"] == "sent", "{sent}");
    let id = sent["id"].clone();
    let live = phone.recv_type("message").await?;
    assert_eq!(live["id"], id);
    phone
        .send(json!({"type":"read","conversation":"dm:alice:bob","up_to":id}))
        .await?;

    // The read reaches bob's other device while the message is not stored.
    let receipt = laptop
        .recv_matching(|f| f["type"] == "receipt" && f["kind"] == "read")
        .await?;
    assert_eq!(
        (&receipt["user"], &receipt["up_to"]),
        (&json!("bob"), &id),
        "{receipt}"
    );
    cursor_of(&receipt)?;
    let observer = system.database_of("dm:alice:bob").await?;
    let stored: i64 = observer
        .query_one("SELECT count(*) FROM messages", &[])
        .await?
        .get(0);
    assert_eq!(stored, 0, "the writer was not held back");

    held.rollback().await?;
    for device in [&mut phone, &mut laptop] {
        let patience = Patience::new();
        let item = loop {
            if let Some(item) = listed(device, "dm:alice:bob").await? {
                break item;
            }
            patience.again("the message was never stored").await?;
        };
        assert_eq!(item["unread"], 0, "{item}");
        assert_eq!(item["read_up_to"], id, "{item}");
    }
    Ok(())
}

/// Bob acks and reads while alice has no device online; her device
/// resuming from its cursor gets both receipts from the inbox, with
/// cursors, in cursor order.
#[tokio::test]
async fn an_offline_sender_gets_delivered_and_read_receipts_on_resume() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "d").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let sent = alice
        .send_message(json!({"to":"bob"}), "while you are away", "c1")
        .await?;
    let id = sent["id"].clone();
    let own = alice.recv_type("message").await?;
    let from = own["cursor"].as_str().context("no cursor")?.to_string();
    alice.close().await?;

    let got = bob.recv_type("message").await?;
    assert_eq!(got["id"], id);
    bob.send(json!({"type":"ack","cursor":got["cursor"]}))
        .await?;
    bob.send(json!({"type":"read","conversation":"dm:alice:bob","up_to":id}))
        .await?;

    // Reconnect until both are replayed before `synced`, i.e. stored.
    let patience = Patience::new();
    let backlog = loop {
        let client = system.connect_from("alice", "d", Some(&from)).await?;
        let backlog = client.backlog.clone();
        client.close().await?;
        let replayed = |kind: &str| {
            backlog
                .iter()
                .any(|f| f["type"] == "receipt" && f["kind"] == kind)
        };
        if replayed("delivered") && replayed("read") {
            break backlog;
        }
        patience
            .again(format!("alice's inbox holds {backlog:?}"))
            .await?;
    };

    let cursors = backlog
        .iter()
        .map(cursor_of)
        .collect::<anyhow::Result<Vec<_>>>()?;
    assert!(
        cursors.windows(2).all(|pair| pair[0] < pair[1]),
        "{backlog:?}"
    );
    let receipt = |kind: &str| {
        backlog
            .iter()
            .find(|f| f["type"] == "receipt" && f["kind"] == kind)
            .cloned()
            .unwrap_or_default()
    };
    let mut delivered = receipt("delivered");
    let mut read = receipt("read");
    for frame in [&mut delivered, &mut read] {
        frame.as_object_mut().map(|f| f.remove("cursor"));
    }
    assert_eq!(
        delivered,
        json!({"type":"receipt","conversation":"dm:alice:bob","user":"bob","kind":"delivered","up_to":id,"device":"phone"})
    );
    assert_eq!(
        read,
        json!({"type":"receipt","conversation":"dm:alice:bob","user":"bob","kind":"read","up_to":id})
    );
    Ok(())
}

/// In a group, a read on bob's phone reaches his laptop (and the other
/// members) as a receipt item, and his laptop's `conversations` says read.
#[tokio::test]
async fn a_read_on_one_device_reaches_the_readers_other_devices() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "d").await?;
    let mut phone = system.connect("bob", "phone").await?;
    let mut laptop = system.connect("bob", "laptop").await?;
    let mut carol = system.connect("carol", "d").await?;
    let created = alice
        .request(json!({"type":"group.create","name":"trio","members":["bob","carol"]}))
        .await?;
    let conversation = format!(
        "group:{}",
        created["group"]["id"].as_str().unwrap_or_default()
    );
    let sent = alice
        .send_message(json!({"conversation":conversation}), "hello all", "g1")
        .await?;
    let id = sent["id"].clone();
    phone.recv_type("message").await?;
    laptop.recv_type("message").await?;
    phone
        .send(json!({"type":"read","conversation":conversation,"up_to":id}))
        .await?;

    let is_read = |f: &Value| f["type"] == "receipt" && f["kind"] == "read";
    for client in [&mut laptop, &mut phone, &mut alice, &mut carol] {
        let receipt = client.recv_matching(is_read).await?;
        assert_eq!(
            (
                &receipt["conversation"],
                &receipt["user"],
                &receipt["up_to"]
            ),
            (&json!(conversation), &json!("bob"), &id),
            "{receipt}"
        );
        cursor_of(&receipt)?;
    }
    let item = listed(&mut laptop, &conversation)
        .await?
        .context("not listed")?;
    assert_eq!((&item["unread"], &item["read_up_to"]), (&json!(0), &id));
    Ok(())
}

/// `receipts` answers each member's delivered watermark (the newest message
/// any of their devices acked) and read watermark; non-members are refused.
#[tokio::test]
async fn receipts_answers_watermarks_and_refuses_non_members() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "d").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let mut carol = system.connect("carol", "d").await?;
    let created = alice
        .request(json!({"type":"group.create","name":"trio","members":["bob","carol"]}))
        .await?;
    let conversation = format!(
        "group:{}",
        created["group"]["id"].as_str().unwrap_or_default()
    );
    let mut ids = Vec::new();
    for (n, text) in ["one", "two"].iter().enumerate() {
        let sent = alice
            .send_message(json!({"conversation":conversation}), text, &format!("g{n}"))
            .await?;
        ids.push(sent["id"].clone());
    }
    // Bob acks both and reads the first; carol acks the first only.
    let bob_got = [
        bob.recv_type("message").await?,
        bob.recv_type("message").await?,
    ];
    let carol_got = carol.recv_type("message").await?;
    bob.send(json!({"type":"ack","cursor":bob_got[1]["cursor"]}))
        .await?;
    carol
        .send(json!({"type":"ack","cursor":carol_got["cursor"]}))
        .await?;
    bob.send(json!({"type":"read","conversation":conversation,"up_to":ids[0]}))
        .await?;

    let expected = json!([
        {"user":"alice","delivered_up_to":null,"read_up_to":null},
        {"user":"bob","delivered_up_to":ids[1],"read_up_to":ids[0]},
        {"user":"carol","delivered_up_to":ids[0],"read_up_to":null},
    ]);
    let patience = Patience::new();
    let answer = loop {
        let answer = alice
            .request(json!({"type":"receipts","conversation":conversation}))
            .await?;
        if answer["members"] == expected {
            break answer;
        }
        patience.again(format!("last answer: {answer}")).await?;
    };
    assert_eq!(answer["type"], "receipts");
    assert_eq!(answer["conversation"], json!(conversation));

    let mut dave = system.connect("dave", "d").await?;
    for (client, conversation) in [
        (&mut dave, conversation.as_str()),
        (&mut carol, "dm:alice:bob"),
    ] {
        let refused = client
            .request(json!({"type":"receipts","conversation":conversation}))
            .await?;
        assert_eq!(
            (&refused["type"], &refused["code"]),
            (&json!("error"), &json!("forbidden")),
            "{refused}"
        );
    }
    Ok(())
}
