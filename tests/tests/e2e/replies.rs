//! Replies a hostile correspondent cannot make undeliverable (issue 14,
//! item 2), `conversations` paging, and `ref` on `read` and `typing`
//! errors (item 10).

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use chat_shared::rpc::{MAX_REACHABLE_CONVERSATIONS, MAX_REPLY_BYTES};
use chat_tests::{wait_until, Client, System};
use serde_json::{json, Value};

/// Sends `frame` with `ref` = `reference` and returns its reply as it came
/// off the socket (its size in bytes) and parsed; frames before it are
/// dropped.
async fn raw_request(
    client: &mut Client,
    mut frame: Value,
    reference: &str,
) -> Result<(usize, Value)> {
    frame["ref"] = json!(reference);
    client.send(frame).await?;
    loop {
        let text = tokio::time::timeout(Duration::from_secs(10), client.next_raw())
            .await
            .context("no reply in time")?
            .context("the connection ended")?;
        let value: Value = serde_json::from_str(&text)?;
        if value["ref"] == reference {
            return Ok((text.len(), value));
        }
    }
}

/// A text of `chars` characters that JSON-escapes six times larger: a
/// control character is `\u0001` on the wire.
fn swollen(tag: &str, chars: usize) -> String {
    let mut text = tag.to_string();
    text.extend(std::iter::repeat_n('\u{1}', chars - tag.len()));
    text
}

async fn stored(system: &System) -> Result<i64> {
    system
        .count_everywhere("SELECT count(*) FROM messages")
        .await
}

#[tokio::test]
async fn huge_messages_leave_conversations_and_history_answered_in_pages() -> Result<()> {
    let system = System::start().await?;
    let mut mallory = system.connect("mallory", "d").await?;
    // Four texts of 100,000 characters to the victim in a DM (~600 KB each
    // on the wire: before, a default `history` page was 2.4 MB, over
    // NATS's max_payload, and answered `unavailable` every time) and the
    // newest message of three groups (the same for `conversations`).
    let mut sent = HashSet::new();
    for i in 0..4 {
        let text = swollen(&format!("dm{i}"), 100_000);
        let reply = mallory
            .send_message(json!({"to":"victim"}), &text, &format!("dm{i}"))
            .await?;
        ensure!(reply["type"] == "sent", "{reply}");
        sent.insert(reply["id"].as_str().unwrap_or_default().to_string());
    }
    for i in 0..3 {
        let created = mallory
            .request(json!({"type":"group.create","name":format!("g{i}"),"members":["victim"]}))
            .await?;
        let group = created["group"]["id"]
            .as_str()
            .context("a group")?
            .to_string();
        let text = swollen(&format!("g{i}"), 100_000);
        let reply = mallory
            .send_message(
                json!({"conversation":format!("group:{group}")}),
                &text,
                &format!("g{i}"),
            )
            .await?;
        ensure!(reply["type"] == "sent", "{reply}");
    }
    wait_until(|| async {
        stored(&system).await.is_ok_and(|n| n == 7)
            && system.counters_settled().await.unwrap_or(false)
    })
    .await?;

    let mut victim = system.connect("victim", "d").await?;
    let (size, list) = raw_request(&mut victim, json!({"type":"conversations"}), "c").await?;
    ensure!(list["type"] == "conversations", "{list}");
    ensure!(
        size < MAX_REPLY_BYTES,
        "a conversations reply of {size} bytes"
    );
    let items = list["items"].as_array().context("items")?;
    assert_eq!(items.len(), 4);
    assert_eq!(list["more"], false);
    for item in items {
        let preview = item["last"]["text"].as_str().context("a preview")?;
        assert_eq!(preview.chars().count(), 200, "{}", item["conversation"]);
        assert_eq!(item["truncated"], true);
    }

    // `history` with its default limit: cut by bytes, paged to the end.
    let mut seen = HashSet::new();
    let mut before: Option<Value> = None;
    for page in 0.. {
        ensure!(page < 10, "history never ended");
        let mut request = json!({"type":"history","conversation":"dm:mallory:victim"});
        if let Some(before) = &before {
            request["before"] = before.clone();
        }
        let (size, reply) = raw_request(&mut victim, request, &format!("h{page}")).await?;
        ensure!(reply["type"] == "history", "{reply}");
        ensure!(size < MAX_REPLY_BYTES, "a history reply of {size} bytes");
        let messages = reply["messages"].as_array().context("messages")?;
        ensure!(!messages.is_empty(), "an empty page: {}", reply["more"]);
        for message in messages {
            assert_eq!(
                message["text"].as_str().map(|t| t.chars().count()),
                Some(100_000)
            );
            seen.insert(message["id"].as_str().unwrap_or_default().to_string());
        }
        before = messages.last().map(|m| m["id"].clone());
        if reply["more"] == false {
            break;
        }
    }
    assert_eq!(seen, sent);
    Ok(())
}

/// The conversations `client` pages through with `limit`, and the pages'
/// sizes.
async fn page_all(client: &mut Client, limit: u32) -> Result<(Vec<String>, Vec<usize>)> {
    let mut listed = Vec::new();
    let mut sizes = Vec::new();
    let mut next: Option<Value> = None;
    loop {
        ensure!(sizes.len() < 1000, "paging never ended");
        let mut request = json!({"type":"conversations","limit":limit});
        if let Some(next) = &next {
            request["next"] = next.clone();
        }
        let page = client.request(request).await?;
        ensure!(page["type"] == "conversations", "{page}");
        let items = page["items"].as_array().context("items")?;
        sizes.push(items.len());
        listed.extend(
            items
                .iter()
                .map(|i| i["conversation"].as_str().unwrap_or_default().to_string()),
        );
        if page["more"] == false {
            ensure!(page.get("next").is_none(), "a last page with next: {page}");
            return Ok((listed, sizes));
        }
        next = Some(page["next"].clone());
    }
}

#[tokio::test]
async fn conversations_page_through_everything_up_to_the_cap() -> Result<()> {
    let system = System::start().await?;
    let mut bob = system.connect("bob", "d").await?;
    for i in 0..7 {
        let reply = bob
            .send_message(json!({"to":format!("u{i}")}), "hi", &format!("c{i}"))
            .await?;
        ensure!(reply["type"] == "sent", "{reply}");
    }
    wait_until(|| async {
        stored(&system).await.is_ok_and(|n| n == 7)
            && system.counters_settled().await.unwrap_or(false)
    })
    .await?;
    let newest_first: Vec<String> = (0..7).rev().map(|i| format!("dm:bob:u{i}")).collect();
    let (listed, sizes) = page_all(&mut bob, 3).await?;
    assert_eq!(listed, newest_first);
    assert_eq!(sizes, [3, 3, 1]);
    // A v1 client's plain request is the first page of 100.
    let plain = bob.request(json!({"type":"conversations"})).await?;
    assert_eq!(plain["items"].as_array().map(Vec::len), Some(7));
    assert_eq!(plain["more"], false);

    for bad in [
        json!({"type":"conversations","limit":0}),
        json!({"type":"conversations","limit":201}),
        json!({"type":"conversations","next":"not a token"}),
    ] {
        let reply = bob.request(bad.clone()).await?;
        assert_eq!(reply["code"], "bad_request", "{bad} answered {reply}");
    }

    // Bob in 600 more (older) conversations: he pages through his first
    // 500 and no further. His list is his rows of `user_conversations`,
    // on his shard (written on every shard here: only his is read).
    for db in system.databases().await? {
        db.execute(
            "INSERT INTO user_conversations (user_id, conversation, activity)
             SELECT 'bob', 'dm:bob:z' || lpad(i::text, 4, '0'), i FROM generate_series(1, 600) i",
            &[],
        )
        .await?;
    }
    let (listed, sizes) = page_all(&mut bob, 200).await?;
    assert_eq!(listed.len() as i64, MAX_REACHABLE_CONVERSATIONS);
    assert_eq!(sizes, [200, 200, 100]);
    assert_eq!(listed[..7], newest_first[..]);
    assert_eq!(listed.last().map(String::as_str), Some("dm:bob:z0108"));
    assert_eq!(listed.iter().collect::<HashSet<_>>().len(), listed.len());
    let plain = bob.request(json!({"type":"conversations"})).await?;
    assert_eq!(plain["items"].as_array().map(Vec::len), Some(100));
    assert_eq!(plain["more"], true);
    Ok(())
}

#[tokio::test]
async fn read_and_typing_errors_echo_their_ref() -> Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "d").await?;
    let created = alice
        .request(json!({"type":"group.create","name":"private","members":["bob"]}))
        .await?;
    let group = created["group"]["id"]
        .as_str()
        .context("a group")?
        .to_string();
    let reply = alice.send_message(json!({"to":"bob"}), "hi", "c1").await?;
    ensure!(reply["type"] == "sent", "{reply}");
    let id = reply["id"].clone();

    // carol, in neither, sends the raw frames a foreign client would.
    let mut carol = system.connect("carol", "d").await?;
    carol
        .send(json!({"type":"read","ref":"r-read","conversation":"dm:alice:bob","up_to":id}))
        .await?;
    let error = carol.recv_type("error").await?;
    assert_eq!(error["ref"], "r-read", "{error}");
    assert_eq!(error["code"], "forbidden", "{error}");
    carol
        .send(json!({"type":"typing","ref":"r-typing","conversation":format!("group:{group}"),"active":true}))
        .await?;
    let error = carol.recv_type("error").await?;
    assert_eq!(error["ref"], "r-typing", "{error}");
    assert_eq!(error["code"], "forbidden", "{error}");
    // Without a `ref` (v1) the error still comes, without one.
    carol
        .send(json!({"type":"read","conversation":"dm:alice:bob","up_to":id}))
        .await?;
    let error = carol.recv_type("error").await?;
    assert_eq!(error.get("ref"), None, "{error}");
    assert_eq!(error["code"], "forbidden", "{error}");
    Ok(())
}

#[tokio::test]
async fn friend_requests_from_many_accounts_cannot_swell_a_friends_reply() -> Result<()> {
    let system = System::start().await?;
    let db = system.database().await?;
    // 4,999 accounts (the longest ids) have asked the victim already; the
    // 5,000th asks through the edge, and the next is refused.
    db.execute(
        "INSERT INTO friendships (user_id, other, state, since)
         SELECT 'victim', lpad(i::text, 64, '0'), 'pending', 0 FROM generate_series(1, 4999) i",
        &[],
    )
    .await?;
    let mut last = system.connect("puppet", "d").await?;
    let asked = last
        .request(json!({"type":"friend.request","user":"victim"}))
        .await?;
    assert_eq!(asked["type"], "ok", "{asked}");
    let mut mallory = system.connect("mallory", "d").await?;
    let refused = mallory
        .request(json!({"type":"friend.request","user":"victim"}))
        .await?;
    assert_eq!(refused["code"], "too_large", "{refused}");

    let mut victim = system.connect("victim", "d").await?;
    let (size, list) = raw_request(&mut victim, json!({"type":"friends"}), "f").await?;
    ensure!(list["type"] == "friends", "{list}");
    ensure!(size < MAX_REPLY_BYTES, "a friends reply of {size} bytes");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(5000));
    Ok(())
}
