//! Blocks, privacy settings (PROTOCOL.md v1.1 "Blocks, mutes, privacy"),
//! against real servers. Mutes are tested with pushd in `push.rs`.
//!
//! What a user must *not* see is proven with a marker: an event they do
//! see that the same process publishes after the hidden one, on the same
//! NATS connection, so the hidden frame (had it been sent) would have
//! arrived first.

use anyhow::{ensure, Result};
use async_nats::jetstream;
use chat_tests::{Client, System};
use serde_json::{json, Value};

use crate::presence::{befriend, presence_of};
use crate::push::wait_presence;

async fn ok(client: &mut Client, frame: Value) -> Result<()> {
    let reply = client.request(frame.clone()).await?;
    ensure!(reply["type"] == "ok", "{frame} answered {reply}");
    Ok(())
}

/// `frame`'s error code, failing if it was not refused.
async fn refused(client: &mut Client, frame: Value) -> Result<String> {
    let reply = client.request(frame.clone()).await?;
    ensure!(reply["type"] == "error", "{frame} answered {reply}");
    Ok(reply["code"].as_str().unwrap_or_default().to_string())
}

/// A group `owner` makes with `members`: its conversation id and group id.
async fn group(owner: &mut Client, members: &[&str]) -> Result<(String, String)> {
    let created = owner
        .request(json!({"type":"group.create","name":"g","members":members}))
        .await?;
    ensure!(created["type"] == "group", "{created}");
    let id = created["group"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Ok((format!("group:{id}"), id))
}

async fn sent(client: &mut Client, target: Value, text: &str, cmid: &str) -> Result<Value> {
    let reply = client.send_message(target, text, cmid).await?;
    ensure!(reply["type"] == "sent", "{text}: {reply}");
    Ok(reply)
}

/// The `message` frame carrying `id`, frames before it kept for later.
async fn message(client: &mut Client, id: &Value) -> Result<Value> {
    client
        .recv_matching(|f| f["type"] == "message" && f["id"] == *id)
        .await
}

/// Waits until `id` is in `conversation`'s history (the persister has
/// it), so a `read` up to it is not clamped below it.
async fn stored(client: &mut Client, conversation: &str, id: &Value) -> Result<()> {
    let deadline = tokio::time::Instant::now() + chat_tests::WAIT;
    while tokio::time::Instant::now() < deadline {
        let page = client
            .request(json!({"type":"history","conversation":conversation}))
            .await?;
        if page["messages"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["id"] == *id))
        {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    anyhow::bail!("{id} never stored in {conversation}")
}

/// The first frame matching `wanted`, failing if one matching `hidden`
/// came before it.
async fn first_without(
    client: &mut Client,
    wanted: impl Fn(&Value) -> bool,
    hidden: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let frame = client.recv_matching(|f| wanted(f) || hidden(f)).await?;
    ensure!(!hidden(&frame), "saw a hidden frame: {frame}");
    Ok(frame)
}

fn from_user<'a>(kind: &'a str, user: &'a str) -> impl Fn(&Value) -> bool + 'a {
    move |f| f["type"] == kind && f["user"] == user
}

#[tokio::test]
async fn a_block_refuses_dms_and_group_adds_and_unblock_restores_them() -> Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let mut carol = system.connect("carol", "phone").await?;
    let (shared, _) = group(&mut carol, &["alice", "bob"]).await?;

    ok(&mut bob, json!({"type":"block","user":"alice"})).await?;
    ok(&mut bob, json!({"type":"block","user":"alice"})).await?;
    let list = bob.request(json!({"type":"blocked"})).await?;
    assert_eq!(list["items"], json!(["alice"]), "{list}");
    assert_eq!(
        alice.request(json!({"type":"blocked"})).await?["items"],
        json!([])
    );
    assert_eq!(
        refused(&mut bob, json!({"type":"block","user":"bob"})).await?,
        "bad_request"
    );

    // A DM either way is refused, and nothing is stored.
    let dm = alice
        .send_message(json!({"to":"bob"}), "let me in", "b1")
        .await?;
    assert_eq!(dm["code"], "forbidden", "{dm}");
    let dm = bob
        .send_message(json!({"to":"alice"}), "go away", "b2")
        .await?;
    assert_eq!(dm["code"], "forbidden", "{dm}");
    let history = bob
        .request(json!({"type":"history","conversation":"dm:alice:bob"}))
        .await?;
    assert_eq!(history["messages"], json!([]), "{history}");

    // Group messages are unaffected.
    let said = sent(&mut alice, json!({"conversation":shared}), "all here", "g1").await?;
    message(&mut bob, &said["id"]).await?;

    // The blocked user cannot add the blocker to a group, at creation or
    // later; the blocker may add them.
    let create = json!({"type":"group.create","name":"x","members":["bob","carol"]});
    assert_eq!(refused(&mut alice, create).await?, "forbidden");
    let (_, mine) = group(&mut alice, &["carol"]).await?;
    let add = json!({"type":"group.add","group":mine,"users":["bob"]});
    assert_eq!(refused(&mut alice, add.clone()).await?, "forbidden");
    let info = alice
        .request(json!({"type":"group.info","group":mine}))
        .await?;
    assert_eq!(info["group"]["members"].as_array().map(Vec::len), Some(2));
    group(&mut bob, &["alice"]).await?;

    // Unblocking restores both.
    ok(&mut bob, json!({"type":"unblock","user":"alice"})).await?;
    ok(&mut bob, json!({"type":"unblock","user":"alice"})).await?;
    assert_eq!(
        bob.request(json!({"type":"blocked"})).await?["items"],
        json!([])
    );
    // The edge's block cache drops the pair when the change event arrives,
    // which may be a moment after the `ok`.
    let mut attempt = 0;
    let dm = loop {
        attempt += 1;
        let reply = alice
            .send_message(json!({"to":"bob"}), "friends again?", "b3")
            .await?;
        if reply["type"] == "sent" || attempt == 100 {
            break reply;
        }
        ensure!(reply["code"] == "forbidden", "{reply}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    ensure!(dm["type"] == "sent", "{dm}");
    message(&mut bob, &dm["id"]).await?;
    let added = alice.request(add).await?;
    assert_eq!(added["type"], "group", "{added}");
    Ok(())
}

#[tokio::test]
async fn a_block_hides_presence_both_ways_and_unblock_restores_it() -> Result<()> {
    let system = System::start().await?;
    let js = jetstream::new(system.admin().await?);
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let mut dave = system.connect("dave", "phone").await?;
    befriend(&mut alice, &mut bob, "alice", "bob").await?;
    befriend(&mut alice, &mut dave, "alice", "dave").await?;
    presence_of(&mut alice, "bob", "online").await?;
    presence_of(&mut alice, "dave", "online").await?;
    // A friendship made before presence announced a user online shows
    // them offline first: drop those frames, they say nothing of blocks.
    alice.drain().await?;

    ok(&mut bob, json!({"type":"block","user":"alice"})).await?;
    // `friends`: still a friend, but no presence (bob is online).
    let friends = alice.request(json!({"type":"friends"})).await?;
    let view = |user: &str| {
        friends["items"]
            .as_array()
            .and_then(|items| items.iter().find(|i| i["user"] == user))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(
        view("bob"),
        json!({"user":"bob","state":"friends","status":"offline","last_active":null})
    );
    assert_eq!(view("dave")["status"], "online");
    let theirs = bob.request(json!({"type":"friends"})).await?;
    assert_eq!(theirs["items"][0]["status"], "offline", "{theirs}");
    assert_eq!(theirs["items"][0]["last_active"], Value::Null);

    // The snapshot after `synced` leaves the other out, both ways.
    let mut tablet = system.connect("alice", "tablet").await?;
    let frames = tablet.drain().await?;
    let users: Vec<&Value> = frames
        .iter()
        .filter(|f| f["type"] == "presence")
        .map(|f| &f["user"])
        .collect();
    assert_eq!(users, [&json!("dave")], "{frames:?}");
    let mut bob_tablet = system.connect("bob", "tablet").await?;
    let frames = bob_tablet.drain().await?;
    assert!(frames.iter().all(|f| f["type"] != "presence"), "{frames:?}");

    // Live changes: bob goes offline, then (marker) dave does; alice hears
    // only of dave.
    bob.close().await?;
    bob_tablet.close().await?;
    wait_presence(&js, "bob", "offline").await?;
    dave.close().await?;
    first_without(
        &mut alice,
        |f| f["type"] == "presence" && f["user"] == "dave" && f["status"] == "offline",
        from_user("presence", "bob"),
    )
    .await?;
    // And back online: still nothing of bob (marker: dave again).
    let mut bob = system.connect("bob", "phone").await?;
    wait_presence(&js, "bob", "online").await?;
    let _dave = system.connect("dave", "phone").await?;
    first_without(
        &mut alice,
        |f| f["type"] == "presence" && f["user"] == "dave" && f["status"] == "online",
        from_user("presence", "bob"),
    )
    .await?;

    // Unblocking shows each the other's presence at once.
    ok(&mut bob, json!({"type":"unblock","user":"alice"})).await?;
    presence_of(&mut alice, "bob", "online").await?;
    presence_of(&mut bob, "alice", "online").await?;
    let friends = alice.request(json!({"type":"friends"})).await?;
    let bob_view = friends["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["user"] == "bob"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(bob_view["status"], "online", "{friends}");
    assert!(bob_view["last_active"].as_u64().is_some_and(|t| t > 0));
    let mut again = system.connect("alice", "laptop").await?;
    let frames = again.drain().await?;
    assert!(
        frames
            .iter()
            .any(|f| f["type"] == "presence" && f["user"] == "bob"),
        "{frames:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_block_hides_typing_and_receipts_both_ways_and_unblock_restores_them() -> Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let mut carol = system.connect("carol", "phone").await?;
    let (trio, _) = group(&mut carol, &["alice", "bob"]).await?;
    ok(&mut bob, json!({"type":"block","user":"alice"})).await?;

    // Typing: alice's reaches carol, not bob; bob's reaches carol, not
    // alice. Markers: carol's typing, after, reaches both.
    let typing = |active: bool| json!({"type":"typing","conversation":trio,"active":active});
    alice.send(typing(true)).await?;
    carol
        .recv_matching(|f| f["type"] == "typing" && f["user"] == "alice")
        .await?;
    bob.send(typing(true)).await?;
    carol
        .recv_matching(|f| f["type"] == "typing" && f["user"] == "bob")
        .await?;
    carol.send(typing(true)).await?;
    first_without(
        &mut bob,
        from_user("typing", "carol"),
        from_user("typing", "alice"),
    )
    .await?;
    first_without(
        &mut alice,
        from_user("typing", "carol"),
        from_user("typing", "bob"),
    )
    .await?;

    // Delivered receipts: one ack of bob's covers alice's and carol's
    // messages; carol hears of it, alice does not.
    let from_alice = sent(&mut alice, json!({"conversation":trio}), "a1", "a1").await?;
    let from_carol = sent(&mut carol, json!({"conversation":trio}), "c1", "c1").await?;
    message(&mut bob, &from_alice["id"]).await?;
    let last = message(&mut bob, &from_carol["id"]).await?;
    bob.send(json!({"type":"ack","cursor":last["cursor"]}))
        .await?;
    let delivered = |user: &'static str| {
        move |f: &Value| f["type"] == "receipt" && f["kind"] == "delivered" && f["user"] == user
    };
    carol.recv_matching(delivered("bob")).await?;
    // Read receipts: bob's reaches carol only; alice's reaches carol only.
    stored(&mut bob, &trio, &from_carol["id"]).await?;
    bob.send(json!({"type":"read","conversation":trio,"up_to":from_carol["id"]}))
        .await?;
    let read = |user: &'static str| {
        move |f: &Value| f["type"] == "receipt" && f["kind"] == "read" && f["user"] == user
    };
    carol.recv_matching(read("bob")).await?;
    alice
        .send(json!({"type":"read","conversation":trio,"up_to":from_carol["id"]}))
        .await?;
    carol.recv_matching(read("alice")).await?;

    // Unblocked: typing, delivered and read receipts flow again, and
    // nothing from the blocked time arrives before them.
    ok(&mut bob, json!({"type":"unblock","user":"alice"})).await?;
    let again = sent(&mut alice, json!({"conversation":trio}), "a2", "a2").await?;
    let got = message(&mut bob, &again["id"]).await?;
    bob.send(json!({"type":"ack","cursor":got["cursor"]}))
        .await?;
    let receipt = first_without(&mut alice, delivered("bob"), |f| {
        delivered("bob")(f) && f["up_to"] != again["id"]
    })
    .await?;
    assert_eq!(receipt["up_to"], again["id"]);
    stored(&mut bob, &trio, &again["id"]).await?;
    bob.send(json!({"type":"read","conversation":trio,"up_to":again["id"]}))
        .await?;
    let receipt = first_without(&mut alice, read("bob"), |f| {
        read("bob")(f) && f["up_to"] != again["id"]
    })
    .await?;
    assert_eq!(receipt["up_to"], again["id"]);
    let reply = sent(&mut bob, json!({"conversation":trio}), "b1", "b1").await?;
    stored(&mut alice, &trio, &reply["id"]).await?;
    alice
        .send(json!({"type":"read","conversation":trio,"up_to":reply["id"]}))
        .await?;
    let receipt = first_without(&mut bob, read("alice"), |f| {
        read("alice")(f) && f["up_to"] != reply["id"]
    })
    .await?;
    assert_eq!(receipt["up_to"], reply["id"]);
    alice.send(typing(false)).await?;
    let seen = bob
        .recv_matching(|f| f["type"] == "typing" && f["user"] == "alice")
        .await?;
    assert_eq!(seen["active"], false);
    Ok(())
}

#[tokio::test]
async fn group_adds_friends_lets_only_friends_add() -> Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let mut carol = system.connect("carol", "phone").await?;
    befriend(&mut alice, &mut bob, "alice", "bob").await?;

    let defaults = bob.request(json!({"type":"settings"})).await?;
    assert_eq!(
        defaults,
        json!({"type":"settings","ref":defaults["ref"],"last_seen":"everyone","group_adds":"everyone","read_receipts":true})
    );
    let set = bob
        .request(json!({"type":"settings","group_adds":"friends"}))
        .await?;
    assert_eq!(
        (&set["last_seen"], &set["group_adds"], &set["read_receipts"]),
        (&json!("everyone"), &json!("friends"), &json!(true)),
        "{set}"
    );
    assert_eq!(
        bob.request(json!({"type":"settings"})).await?["group_adds"],
        "friends"
    );
    let bad = json!({"type":"settings","group_adds":"nobody"});
    assert_eq!(refused(&mut bob, bad).await?, "bad_request");

    // carol is no friend of bob's: refused at creation and on add.
    let create = json!({"type":"group.create","name":"x","members":["bob"]});
    assert_eq!(refused(&mut carol, create).await?, "forbidden");
    let (_, hers) = group(&mut carol, &["alice"]).await?;
    let add = json!({"type":"group.add","group":hers,"users":["bob"]});
    assert_eq!(refused(&mut carol, add.clone()).await?, "forbidden");
    // alice is.
    let (_, with_bob) = group(&mut alice, &["bob"]).await?;
    assert!(!with_bob.is_empty());

    let open = bob
        .request(json!({"type":"settings","group_adds":"everyone"}))
        .await?;
    assert_eq!(open["group_adds"], "everyone");
    let added = carol.request(add).await?;
    assert_eq!(added["type"], "group", "{added}");
    Ok(())
}

#[tokio::test]
async fn read_receipts_false_sends_none_and_sees_none() -> Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let mut bob_laptop = system.connect("bob", "laptop").await?;
    let off = bob
        .request(json!({"type":"settings","read_receipts":false}))
        .await?;
    assert_eq!(off["read_receipts"], false, "{off}");
    let dm = "dm:alice:bob";
    let read = |user: &'static str| {
        move |f: &Value| f["type"] == "receipt" && f["kind"] == "read" && f["user"] == user
    };

    // bob reads: his other device hears of it (that is how it learns),
    // alice does not; his unread count follows.
    let m1 = sent(&mut alice, json!({"to":"bob"}), "one", "m1").await?;
    stored(&mut bob, dm, &m1["id"]).await?;
    bob.send(json!({"type":"read","conversation":dm,"up_to":m1["id"]}))
        .await?;
    let own = bob_laptop.recv_matching(read("bob")).await?;
    assert_eq!(own["up_to"], m1["id"]);
    let list = bob.request(json!({"type":"conversations"})).await?;
    assert_eq!(list["items"][0]["unread"], 0, "{list}");
    assert_eq!(list["items"][0]["read_up_to"], m1["id"]);

    // alice reads: bob sees none of it (alice's own device does).
    let m2 = sent(&mut bob, json!({"to":"alice"}), "two", "m2").await?;
    stored(&mut alice, dm, &m2["id"]).await?;
    alice
        .send(json!({"type":"read","conversation":dm,"up_to":m2["id"]}))
        .await?;
    alice.recv_matching(read("alice")).await?;

    // Back on: the next reads flow both ways, and neither earlier one
    // arrives before them.
    let on = bob
        .request(json!({"type":"settings","read_receipts":true}))
        .await?;
    assert_eq!(on["read_receipts"], true);
    let m3 = sent(&mut alice, json!({"to":"bob"}), "three", "m3").await?;
    stored(&mut bob, dm, &m3["id"]).await?;
    bob.send(json!({"type":"read","conversation":dm,"up_to":m3["id"]}))
        .await?;
    let seen = first_without(&mut alice, read("bob"), |f| {
        read("bob")(f) && f["up_to"] != m3["id"]
    })
    .await?;
    assert_eq!(seen["up_to"], m3["id"]);
    let m4 = sent(&mut bob, json!({"to":"alice"}), "four", "m4").await?;
    stored(&mut alice, dm, &m4["id"]).await?;
    alice
        .send(json!({"type":"read","conversation":dm,"up_to":m4["id"]}))
        .await?;
    let seen = first_without(&mut bob_laptop, read("alice"), |f| {
        read("alice")(f) && f["up_to"] != m4["id"]
    })
    .await?;
    assert_eq!(seen["up_to"], m4["id"]);
    Ok(())
}

#[tokio::test]
async fn last_seen_nobody_hides_last_active_from_friends() -> Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    befriend(&mut alice, &mut bob, "alice", "bob").await?;
    presence_of(&mut alice, "bob", "online").await?;
    // Any frame from before the setting (an `offline` sent at the
    // friendship, if bob was not announced yet) goes.
    alice.drain().await?;
    let set = bob
        .request(json!({"type":"settings","last_seen":"nobody"}))
        .await?;
    assert_eq!(set["last_seen"], "nobody", "{set}");

    // `friends`: the status stays, `last_active` is null.
    let friends = alice.request(json!({"type":"friends"})).await?;
    assert_eq!(
        friends["items"][0],
        json!({"user":"bob","state":"friends","status":"online","last_active":null})
    );
    // `presence` frames keep v1's shape: `last_active` is 0 (unknown).
    let mut tablet = system.connect("alice", "tablet").await?;
    let snapshot = tablet
        .recv_matching(|f| f["type"] == "presence" && f["user"] == "bob")
        .await?;
    assert_eq!(snapshot["status"], "online");
    assert_eq!(snapshot["last_active"], 0, "{snapshot}");
    bob.close().await?;
    let offline = presence_of(&mut alice, "bob", "offline").await?;
    assert_eq!(offline["last_active"], 0, "{offline}");
    // bob's own view of alice is unchanged.
    let mut bob = system.connect("bob", "phone").await?;
    let online = presence_of(&mut alice, "bob", "online").await?;
    assert_eq!(online["last_active"], 0);
    let mine = bob.request(json!({"type":"friends"})).await?;
    assert!(mine["items"][0]["last_active"]
        .as_u64()
        .is_some_and(|t| t > 0));

    // A new friend who hides it is shown with it hidden at once too.
    let mut carol = system.connect("carol", "phone").await?;
    let set = carol
        .request(json!({"type":"settings","last_seen":"nobody"}))
        .await?;
    assert_eq!(set["last_seen"], "nobody", "{set}");
    befriend(&mut alice, &mut carol, "alice", "carol").await?;
    let met = presence_of(&mut alice, "carol", "online").await?;
    assert_eq!(met["last_active"], 0, "{met}");
    let other_way = presence_of(&mut carol, "alice", "online").await?;
    assert!(other_way["last_active"].as_u64().is_some_and(|t| t > 0));

    // `friends` shows it to friends, as `everyone` does: presence is
    // shared between friends only.
    let set = bob
        .request(json!({"type":"settings","last_seen":"friends"}))
        .await?;
    assert_eq!(set["last_seen"], "friends");
    let friends = alice.request(json!({"type":"friends"})).await?;
    assert!(
        friends["items"][0]["last_active"]
            .as_u64()
            .is_some_and(|t| t > 0),
        "{friends}"
    );
    Ok(())
}
