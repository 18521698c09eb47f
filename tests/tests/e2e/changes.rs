//! v1.1 messages that change after they are sent: edits, deletes (for
//! everyone: erased everywhere; for me), reactions, replies and mentions.

use std::time::Duration;

use anyhow::{anyhow, ensure, Context};
use chat_shared::direct::DirectReader;
use chat_shared::ids::{ConversationId, UserId};
use chat_shared::presence::PresenceRecord;
use chat_shared::subjects;
use chat_tests::{wait_until, Client, System};
use serde_json::{json, Value};

/// A text found nowhere once its message is deleted for everyone.
const SECRET: &str = "erase-me-7f3a";

fn string(value: &Value, field: &str) -> anyhow::Result<String> {
    value[field]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no {field} in {value}"))
}

async fn ok(client: &mut Client, frame: Value) -> anyhow::Result<()> {
    let reply = client.request(frame.clone()).await?;
    ensure!(reply["type"] == "ok", "{frame} answered {reply}");
    Ok(())
}

async fn refused(client: &mut Client, frame: Value, code: &str) -> anyhow::Result<()> {
    let reply = client.request(frame.clone()).await?;
    ensure!(
        reply["type"] == "error" && reply["code"] == code,
        "{frame} answered {reply}, not {code}"
    );
    Ok(())
}

/// Every payload stored under `subject` in `stream`, read directly.
async fn stored(system: &System, stream: &str, subject: &str) -> anyhow::Result<Vec<String>> {
    let reader = DirectReader::new(system.admin().await?, stream, Duration::from_secs(5));
    let mut payloads = Vec::new();
    let mut from = 1;
    loop {
        let page = reader.page(subject, from, 256, 1 << 22).await?;
        for item in &page.items {
            payloads.push(String::from_utf8_lossy(&item.payload).into_owned());
            from = item.sequence + 1;
        }
        if page.pending == 0 || page.items.is_empty() {
            return Ok(payloads);
        }
    }
}

/// Where the text could be read by a backend or an operator: MESSAGES,
/// both inboxes, the push jobs.
async fn copies_of(system: &System, text: &str) -> anyhow::Result<Vec<String>> {
    let partitions = system.config.partitions;
    let (alice, bob) = (UserId::parse("alice")?, UserId::parse("bob")?);
    let dm = ConversationId::dm(alice.clone(), bob.clone())?;
    let mut places = vec![(
        partitions.of_conversation(&dm).messages_stream(),
        subjects::message(&dm),
    )];
    for user in [&alice, &bob] {
        places.push((
            partitions.of_user(user).inbox_stream(),
            subjects::inbox(user),
        ));
        places.push((subjects::PUSH_STREAM.to_string(), subjects::push(user)));
    }
    let mut found = Vec::new();
    for (stream, subject) in places {
        for payload in stored(system, &stream, &subject).await? {
            if payload.contains(text) {
                found.push(format!("{stream} {subject}: {payload}"));
            }
        }
    }
    Ok(found)
}

async fn history(client: &mut Client, conversation: &str) -> anyhow::Result<Vec<Value>> {
    let page = client
        .request(json!({"type":"history","conversation":conversation}))
        .await?;
    ensure!(page["type"] == "history", "history answered {page}");
    page["messages"]
        .as_array()
        .cloned()
        .ok_or_else(|| anyhow!("no messages in {page}"))
}

/// `history` once it shows what `ready` waits for: the history store
/// follows MESSAGES a moment behind delivery.
async fn history_when(
    client: &mut Client,
    conversation: &str,
    ready: impl Fn(&[Value]) -> bool,
) -> anyhow::Result<Vec<Value>> {
    let deadline = tokio::time::Instant::now() + chat_tests::WAIT;
    loop {
        let page = history(client, conversation).await?;
        if ready(&page) {
            return Ok(page);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "history never got there: {page:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn by_id<'a>(messages: &'a [Value], id: &str) -> anyhow::Result<&'a Value> {
    messages
        .iter()
        .find(|m| m["id"] == id)
        .ok_or_else(|| anyhow!("message {id} not in {messages:?}"))
}

/// The acceptance test of issue 17: an offline device gets an edit, a
/// reaction and a delete for everyone on resume, in cursor order, and the
/// deleted text is gone from the resumed frames, `history`, MESSAGES (read
/// directly), the inboxes, unsent push jobs and PostgreSQL.
#[tokio::test]
async fn an_offline_device_resumes_changes_in_order_and_a_deleted_text_is_erased(
) -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let bob = system.connect("bob", "phone").await?;
    let cursor = string(&bob.synced, "cursor")?;
    drop(bob);
    // Bob offline, so each message leaves a push job for him in PUSH (no
    // pushd runs here to send it).
    let js = async_nats::jetstream::new(system.admin().await?);
    let presence = js.get_key_value(subjects::PRESENCE_BUCKET).await?;
    let bob_key = subjects::presence_key(&UserId::parse("bob")?);
    wait_until(|| async {
        match presence.get(&bob_key).await {
            Ok(Some(value)) => serde_json::from_slice::<PresenceRecord>(&value)
                .is_ok_and(|record| !record.is_online()),
            _ => false,
        }
    })
    .await
    .context("bob never went offline")?;
    let jobs = || async {
        stored(&system, subjects::PUSH_STREAM, "chat.push.bob")
            .await
            .unwrap_or_default()
    };
    let mut ids = Vec::new();
    for i in 0..5 {
        let text = if i == 4 {
            SECRET.to_string()
        } else {
            format!("m{i}")
        };
        let sent = alice
            .send_message(json!({"to":"bob"}), &text, &format!("c{i}"))
            .await?;
        ensure!(sent["type"] == "sent", "send {i}: {sent}");
        ids.push(string(&sent, "id")?);
    }
    let dm = "dm:alice:bob";
    // The deleted message was edited first: its edit's text goes too.
    let edited_secret = format!("{SECRET} (edited)");
    ok(
        &mut alice,
        json!({"type":"edit","conversation":dm,"id":ids[4],"text":edited_secret}),
    )
    .await?;
    ok(
        &mut alice,
        json!({"type":"edit","conversation":dm,"id":ids[1],"text":"m1 edited"}),
    )
    .await?;
    ok(
        &mut alice,
        json!({"type":"react","conversation":dm,"id":ids[2],"emoji":"👍","on":true}),
    )
    .await?;
    wait_until(|| async { jobs().await.iter().any(|job| job.contains(SECRET)) })
        .await
        .context("no push job for the message to delete")?;
    ok(
        &mut alice,
        json!({"type":"delete","conversation":dm,"id":ids[4],"for":"everyone"}),
    )
    .await?;
    // Erasing follows the delete's appends; wait for it to be done.
    wait_until(|| async {
        copies_of(&system, SECRET)
            .await
            .is_ok_and(|found| found.is_empty())
    })
    .await
    .with_context(|| "the text is still stored after the delete")?;
    // Other messages and their jobs are untouched.
    ensure!(
        jobs().await.iter().any(|job| job.contains("\"m0\"")),
        "the push job of another message was erased"
    );
    ensure!(
        copies_of(&system, "m3").await?.len() >= 3,
        "another message was erased"
    );

    let bob = system.connect_from("bob", "phone", Some(&cursor)).await?;
    ensure!(bob.welcome["resumed"] == true, "{}", bob.welcome);
    let frames = &bob.backlog;
    for frame in frames {
        ensure!(
            !frame.to_string().contains(SECRET),
            "resumed frame with the deleted text: {frame}"
        );
    }
    let cursors: Vec<u64> = frames
        .iter()
        .map(|f| string(f, "cursor").and_then(|c| Ok(c.parse::<u64>()?)))
        .collect::<Result<_, _>>()?;
    ensure!(
        cursors.windows(2).all(|w| w[0] < w[1]),
        "cursors out of order: {cursors:?}"
    );
    let messages: Vec<&Value> = frames.iter().filter(|f| f["type"] == "message").collect();
    let texts: Vec<&str> = messages.iter().filter_map(|m| m["text"].as_str()).collect();
    assert_eq!(texts, ["m0", "m1", "m2", "m3"], "resumed messages");
    let updates: Vec<(String, String)> = frames
        .iter()
        .filter(|f| f["type"] == "update")
        .map(|f| Ok((string(f, "kind")?, string(f, "id")?)))
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(
        updates,
        [
            ("edit".to_string(), ids[1].clone()),
            ("reaction".to_string(), ids[2].clone()),
            ("delete".to_string(), ids[4].clone()),
        ],
        "resumed updates, in cursor order"
    );
    let edit = frames
        .iter()
        .find(|f| f["type"] == "update" && f["kind"] == "edit")
        .ok_or_else(|| anyhow!("no edit"))?;
    ensure!(
        edit["text"] == "m1 edited" && edit["by"] == "alice",
        "{edit}"
    );
    let reaction = frames
        .iter()
        .find(|f| f["kind"] == "reaction")
        .ok_or_else(|| anyhow!("no reaction"))?;
    ensure!(
        reaction["emoji"] == "👍" && reaction["on"] == true,
        "{reaction}"
    );
    // Updates come after the messages they change.
    let last_message = frames
        .iter()
        .rposition(|f| f["type"] == "message")
        .unwrap_or(0);
    let first_update = frames
        .iter()
        .position(|f| f["type"] == "update")
        .unwrap_or(0);
    ensure!(last_message < first_update, "an update before its message");

    let mut bob = bob;
    let page = history_when(&mut bob, dm, |page| {
        by_id(page, &ids[4]).is_ok_and(|m| m["deleted"] == true)
    })
    .await?;
    ensure!(
        !serde_json::to_string(&page)?.contains(SECRET),
        "history shows the deleted text"
    );
    let deleted = by_id(&page, &ids[4])?;
    ensure!(
        deleted["deleted"] == true && deleted.get("text").is_none(),
        "{deleted}"
    );
    let edited = by_id(&page, &ids[1])?;
    ensure!(
        edited["text"] == "m1 edited" && edited["edited_ts"].is_u64(),
        "{edited}"
    );
    let reacted = by_id(&page, &ids[2])?;
    assert_eq!(reacted["reactions"], json!({"👍":["alice"]}), "{reacted}");
    // The conversation's newest message is the deleted one.
    let listed = bob.request(json!({"type":"conversations"})).await?;
    let last = &listed["items"][0]["last"];
    ensure!(
        last["id"] == ids[4].as_str() && last["deleted"] == true && last.get("text").is_none(),
        "{listed}"
    );

    let db = system.database_of("dm:alice:bob").await?;
    let pattern = format!("%{SECRET}%");
    let rows = db
        .query_one(
            "SELECT count(*) FROM messages WHERE body LIKE $1",
            &[&pattern],
        )
        .await?;
    assert_eq!(rows.get::<_, i64>(0), 0, "the text is in PostgreSQL");
    let id: i64 = ids[4].parse()?;
    let row = db
        .query_one(
            "SELECT body, deleted FROM messages WHERE conversation = $1 AND id = $2",
            &[&dm, &id],
        )
        .await?;
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, bool>(1)),
        (String::new(), true)
    );
    Ok(())
}

/// Who may change what, and when: only the author edits, within the edit
/// window; an unknown id is `not_found`; past the delete window the author
/// may no longer delete for everyone, a group's owner still may.
#[tokio::test]
async fn only_the_author_edits_within_the_windows_and_a_group_owner_deletes_any_time(
) -> anyhow::Result<()> {
    let system = System::start_with(|c| {
        c.edit_window = Duration::from_secs(1);
        c.delete_window = Duration::from_secs(1);
    })
    .await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let mut carol = system.connect("carol", "phone").await?;
    let group = alice
        .request(json!({"type":"group.create","name":"g","members":["bob","carol"]}))
        .await?;
    let conversation = format!("group:{}", string(&group["group"], "id")?);
    let sent = bob
        .send_message(json!({"conversation":conversation}), "hello", "b1")
        .await?;
    let id = string(&sent, "id")?;
    let edit = |text: &str| json!({"type":"edit","conversation":conversation,"id":id,"text":text});
    refused(&mut alice, edit("not mine"), "forbidden").await?;
    refused(
        &mut bob,
        json!({"type":"edit","conversation":conversation,"id":"12345","text":"x"}),
        "not_found",
    )
    .await?;
    refused(
        &mut bob,
        json!({"type":"react","conversation":conversation,"id":id,"emoji":"","on":true}),
        "bad_request",
    )
    .await?;
    // Past the window (1 s here) the author's own edit is refused.
    let deadline = tokio::time::Instant::now() + chat_tests::WAIT;
    for attempt in 0.. {
        let reply = bob.request(edit(&format!("edit {attempt}"))).await?;
        if reply["code"] == "forbidden" {
            break;
        }
        ensure!(reply["type"] == "ok", "edit in the window answered {reply}");
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the edit window never closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delete = json!({"type":"delete","conversation":conversation,"id":id,"for":"everyone"});
    refused(&mut bob, delete.clone(), "forbidden").await?;
    refused(&mut carol, delete.clone(), "forbidden").await?;
    // The owner may at any time; everyone gets the update.
    ok(&mut alice, delete.clone()).await?;
    for client in [&mut alice, &mut bob, &mut carol] {
        let update = client
            .recv_matching(|f| f["type"] == "update" && f["kind"] == "delete")
            .await?;
        ensure!(
            update["kind"] == "delete" && update["id"] == id.as_str() && update["by"] == "alice",
            "{update}"
        );
    }
    // Nothing left to edit or react to.
    refused(
        &mut bob,
        json!({"type":"react","conversation":conversation,"id":id,"emoji":"x","on":true}),
        "not_found",
    )
    .await?;
    let page = history_when(&mut carol, &conversation, |page| {
        by_id(page, &id).is_ok_and(|m| m["deleted"] == true)
    })
    .await?;
    let deleted = by_id(&page, &id)?;
    ensure!(
        deleted["deleted"] == true && deleted.get("text").is_none(),
        "{deleted}"
    );
    Ok(())
}

/// Every change is idempotent: repeated, it answers `ok` and makes no
/// second update; a reaction taken back and given again is two changes.
#[tokio::test]
async fn repeated_changes_answer_ok_and_update_once() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let sent = alice
        .send_message(json!({"to":"bob"}), "hello", "a1")
        .await?;
    let id = string(&sent, "id")?;
    let dm = "dm:alice:bob";
    let react = |emoji: &str, on: bool| json!({"type":"react","conversation":dm,"id":id,"emoji":emoji,"on":on});
    let edit = json!({"type":"edit","conversation":dm,"id":id,"text":"hello!"});
    for frame in [
        react("👍", true),
        react("👍", true),
        edit.clone(),
        edit.clone(),
        react("👍", false),
        react("👍", false),
        react("👍", true),
    ] {
        ok(bob_or_alice(&frame, &mut alice, &mut bob), frame.clone()).await?;
    }
    // A last, different change marks the end of what bob gets.
    ok(&mut alice, react("🎉", true)).await?;
    let mut seen = Vec::new();
    loop {
        let update = bob.recv_type("update").await?;
        let done = update["emoji"] == "🎉";
        seen.push((
            string(&update, "kind")?,
            update["emoji"].as_str().unwrap_or_default().to_string(),
            update["on"].as_bool(),
            string(&update, "by")?,
        ));
        if done {
            break;
        }
    }
    let expected = [
        ("reaction", "👍", Some(true), "bob"),
        ("edit", "", None, "alice"),
        ("reaction", "👍", Some(false), "bob"),
        ("reaction", "👍", Some(true), "bob"),
        ("reaction", "🎉", Some(true), "alice"),
    ]
    .map(|(k, e, on, by)| (k.to_string(), e.to_string(), on, by.to_string()));
    assert_eq!(seen, expected, "one update per change");
    let page = history_when(&mut alice, dm, |page| {
        by_id(page, &id).is_ok_and(|m| m["reactions"].get("🎉").is_some())
    })
    .await?;
    let message = by_id(&page, &id)?;
    assert_eq!(
        message["reactions"],
        json!({"🎉":["alice"],"👍":["bob"]}),
        "{message}"
    );
    ensure!(message["text"] == "hello!", "{message}");
    // One connection's changes apply in the order sent: given and at once
    // taken back, a reaction ends taken back.
    bob.send(react("🔥", true)).await?;
    bob.send(react("🔥", false)).await?;
    for on in [true, false] {
        let update = alice
            .recv_matching(|f| f["type"] == "update" && f["emoji"] == "🔥")
            .await?;
        ensure!(update["on"] == on, "{update}");
    }
    Ok(())
}

/// Reactions come from bob, edits from alice (the author).
fn bob_or_alice<'a>(frame: &Value, alice: &'a mut Client, bob: &'a mut Client) -> &'a mut Client {
    if frame["type"] == "react" {
        bob
    } else {
        alice
    }
}

/// A delete for `me` reaches only the caller's devices and hides the
/// message from the caller's history only.
#[tokio::test]
async fn a_delete_for_me_reaches_only_the_callers_devices() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut phone = system.connect("alice", "phone").await?;
    let mut laptop = system.connect("alice", "laptop").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let sent = bob
        .send_message(json!({"to":"alice"}), "hide me", "b1")
        .await?;
    let id = string(&sent, "id")?;
    let dm = "dm:alice:bob";
    ok(
        &mut phone,
        json!({"type":"delete","conversation":dm,"id":id,"for":"me"}),
    )
    .await?;
    for device in [&mut phone, &mut laptop] {
        let update = device.recv_type("update").await?;
        ensure!(
            update["kind"] == "delete" && update["for"] == "me" && update["id"] == id.as_str(),
            "{update}"
        );
    }
    // Bob's next frame after the message is alice's next message, not the
    // delete.
    let next = phone
        .send_message(json!({"to":"bob"}), "after", "a1")
        .await?;
    ensure!(next["type"] == "sent", "{next}");
    let mut frames = Vec::new();
    loop {
        let frame = bob.recv().await?;
        let done = frame["type"] == "message" && frame["text"] == "after";
        frames.push(frame);
        if done {
            break;
        }
    }
    ensure!(
        frames.iter().all(|f| f["type"] != "update"),
        "bob got alice's delete for me: {frames:?}"
    );
    history_when(&mut phone, dm, |page| by_id(page, &id).is_err()).await?;
    let theirs = history(&mut bob, dm).await?;
    ensure!(by_id(&theirs, &id)?["text"] == "hide me");
    // A message she hid is not unread for alice (she never read it). The
    // counters follow the hide's commit by a moment (on alice's shard).
    let deadline = tokio::time::Instant::now() + chat_tests::WAIT;
    loop {
        let list = phone.request(json!({"type":"conversations"})).await?;
        let item = list["items"]
            .as_array()
            .and_then(|items| items.iter().find(|i| i["conversation"] == dm))
            .ok_or_else(|| anyhow::anyhow!("no {dm} in {list}"))?;
        if item["unread"] == 0 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "a hidden message counts as unread: {item}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Again: `ok`, nothing new.
    ok(
        &mut laptop,
        json!({"type":"delete","conversation":dm,"id":id,"for":"me"}),
    )
    .await?;
    Ok(())
}

/// `reply_to` and `mentions` are stored and come back on the `message`
/// frame and in `history`.
#[tokio::test]
async fn replies_and_mentions_round_trip() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let first = alice
        .send_message(json!({"to":"bob"}), "first", "a1")
        .await?;
    let first = string(&first, "id")?;
    let reply = bob
        .request(json!({
            "type":"send","to":"alice","text":"re: first @alice","client_msg_id":"b1",
            "reply_to":first,"mentions":["alice"]
        }))
        .await?;
    ensure!(reply["type"] == "sent", "{reply}");
    let id = string(&reply, "id")?;
    let frame = alice
        .recv_matching(|f| f["type"] == "message" && f["id"] == id.as_str())
        .await?;
    ensure!(
        frame["reply_to"] == first.as_str() && frame["mentions"] == json!(["alice"]),
        "{frame}"
    );
    let page = history_when(&mut alice, "dm:alice:bob", |page| by_id(page, &id).is_ok()).await?;
    let stored = by_id(&page, &id)?;
    ensure!(
        stored["reply_to"] == first.as_str() && stored["mentions"] == json!(["alice"]),
        "{stored}"
    );
    let too_many: Vec<String> = (0..51).map(|i| format!("u{i}")).collect();
    refused(
        &mut bob,
        json!({"type":"send","to":"alice","text":"x","client_msg_id":"b2","mentions":too_many}),
        "bad_request",
    )
    .await?;
    Ok(())
}

/// An edit checked before a delete for everyone but stored after it (two
/// devices racing) is erased by the router, never delivered.
#[tokio::test]
async fn an_edit_stored_after_its_delete_is_erased_not_delivered() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let sent = alice
        .send_message(json!({"to":"bob"}), "soon gone", "a1")
        .await?;
    let id = string(&sent, "id")?;
    let dm = ConversationId::parse("dm:alice:bob")?;
    ok(
        &mut alice,
        json!({"type":"delete","conversation":"dm:alice:bob","id":id,"for":"everyone"}),
    )
    .await?;
    bob.recv_matching(|f| f["type"] == "update" && f["kind"] == "delete")
        .await?;
    // What the losing device's edge publishes after its check passed.
    let late = chat_shared::wire::ChangeEvent {
        kind: chat_shared::wire::ChangeKind::Edit,
        conversation: dm.clone(),
        id: chat_shared::ids::MessageId(id.parse()?),
        by: UserId::parse("alice")?,
        ts: chat_shared::clock::now_ms(),
        text: Some(SECRET.into()),
        emoji: None,
        on: None,
        scope: None,
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(subjects::MSG_ID_HEADER, "late-edit");
    let js = async_nats::jetstream::new(system.admin().await?);
    let partition = system.config.partitions.of_conversation(&dm);
    js.publish_with_headers(
        subjects::message_in(&dm, partition),
        headers,
        serde_json::to_vec(&late)?.into(),
    )
    .await?
    .await?;
    // The next message reaches bob with no edit before it.
    let marker = alice
        .send_message(json!({"to":"bob"}), "marker", "a2")
        .await?;
    ensure!(marker["type"] == "sent", "{marker}");
    loop {
        let frame = bob.recv().await?;
        ensure!(
            frame["kind"] != "edit",
            "the late edit was delivered: {frame}"
        );
        if frame["text"] == "marker" {
            break;
        }
    }
    wait_until(|| async {
        copies_of(&system, SECRET)
            .await
            .is_ok_and(|found| found.is_empty())
    })
    .await
    .context("the late edit is still stored")?;
    Ok(())
}
