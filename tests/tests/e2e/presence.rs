//! Friends, presence and typing (issue 5), against real servers. The
//! harness runs presence with a 300 ms edge heartbeat, a 1.5 s edge timeout
//! and a 1.5 s debounce.

use std::time::{Duration, Instant};

use chat_tests::{Client, System};
use futures::StreamExt;
use serde_json::{json, Value};

pub(crate) async fn befriend(
    a: &mut Client,
    b: &mut Client,
    a_id: &str,
    b_id: &str,
) -> anyhow::Result<()> {
    let asked = a
        .request(json!({"type":"friend.request","user":b_id}))
        .await?;
    assert_eq!(asked["type"], "ok", "{asked}");
    let note = b.recv_type("friend").await?;
    assert_eq!(note, json!({"type":"friend","user":a_id,"state":"pending"}));
    let accepted = b
        .request(json!({"type":"friend.accept","user":a_id}))
        .await?;
    assert_eq!(accepted["type"], "ok", "{accepted}");
    let note = a
        .recv_matching(|f| f["type"] == "friend" && f["state"] == "friends")
        .await?;
    assert_eq!(note["user"], b_id);
    Ok(())
}

pub(crate) async fn presence_of(
    client: &mut Client,
    user: &str,
    status: &str,
) -> anyhow::Result<Value> {
    client
        .recv_matching(|f| f["type"] == "presence" && f["user"] == user && f["status"] == status)
        .await
}

fn presence_frames(frames: &[Value]) -> Vec<&Value> {
    frames.iter().filter(|f| f["type"] == "presence").collect()
}

#[tokio::test]
async fn friends_see_online_and_offline_and_strangers_see_nothing() -> anyhow::Result<()> {
    let system = System::start().await?;
    let admin = system.admin().await?;
    let mut public = admin.subscribe("chat.presence.bob").await?;
    admin.flush().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut carol = system.connect("carol", "phone").await?;
    let mut bob_edge = system
        .spawn_edge_process(env!("CARGO_BIN_EXE_service-under-test"))
        .await?;
    let mut bob = system
        .connect_at(bob_edge.addr, "bob", "phone", None)
        .await?;
    befriend(&mut alice, &mut bob, "alice", "bob").await?;
    // Becoming friends tells each the other's current presence.
    let seen = presence_of(&mut alice, "bob", "online").await?;
    assert!(seen["last_active"].as_u64().unwrap() > 0);
    presence_of(&mut bob, "alice", "online").await?;

    // A clean close: offline once the debounce has passed.
    bob.close().await?;
    let went = Instant::now();
    let offline = presence_of(&mut alice, "bob", "offline").await?;
    assert!(went.elapsed() >= Duration::from_millis(1000), "debounced");
    assert!(offline["last_active"].as_u64().unwrap() >= seen["last_active"].as_u64().unwrap());

    // Back, on the edge process that is about to be killed.
    let _bob = system
        .connect_at(bob_edge.addr, "bob", "phone", None)
        .await?;
    presence_of(&mut alice, "bob", "online").await?;
    bob_edge.kill().await?;
    let killed = Instant::now();
    presence_of(&mut alice, "bob", "offline").await?;
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "offline {took:?} after the edge died (timeout 1.5 s)"
    );

    // Backend services saw the same story on the public subject.
    let mut story = Vec::new();
    while story.len() < 4 {
        let event = tokio::time::timeout(chat_tests::WAIT, public.next())
            .await?
            .expect("subscription open");
        let event: Value = serde_json::from_slice(&event.payload)?;
        assert_eq!(event["user"], "bob");
        story.push(event["status"].as_str().unwrap().to_string());
    }
    assert_eq!(story, ["online", "offline", "online", "offline"]);
    // carol, not a friend, saw none of it.
    let frames = carol.drain().await?;
    assert!(
        presence_frames(&frames).is_empty(),
        "carol saw presence: {frames:?}"
    );
    let friends = carol.request(json!({"type":"friends"})).await?;
    assert_eq!(friends["items"], json!([]));
    Ok(())
}

#[tokio::test]
async fn a_reconnect_within_the_debounce_makes_no_presence_frames() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "laptop").await?;
    befriend(&mut alice, &mut bob, "alice", "bob").await?;
    presence_of(&mut alice, "bob", "online").await?;
    alice.drain().await?;

    let closed_at = chat_shared::clock::now_ms();
    bob.close().await?;
    let _bob = system.connect("bob", "laptop").await?;
    // Well past the debounce: nothing may have been announced. (A late copy
    // of bob's first `online`, from before the close, says nothing new; a
    // flap would be an `offline`, or an `online` as of the reconnect.)
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let frames = alice.drain().await?;
    let flapped: Vec<&Value> = presence_frames(&frames)
        .into_iter()
        .filter(|f| {
            f["status"] != "online" || f["last_active"].as_u64().is_none_or(|at| at >= closed_at)
        })
        .collect();
    assert!(flapped.is_empty(), "flapped: {frames:?}");
    let friends = alice.request(json!({"type":"friends"})).await?;
    assert_eq!(friends["items"][0]["status"], "online");
    Ok(())
}

#[tokio::test]
async fn the_snapshot_after_synced_lists_every_friend() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let mut dave = system.connect("dave", "phone").await?;
    befriend(&mut alice, &mut bob, "alice", "bob").await?;
    befriend(&mut alice, &mut dave, "alice", "dave").await?;
    dave.close().await?;
    presence_of(&mut alice, "dave", "offline").await?;
    // erin asked alice; alice asked frank: neither shares presence.
    let mut erin = system.connect("erin", "phone").await?;
    let asked = erin
        .request(json!({"type":"friend.request","user":"alice"}))
        .await?;
    assert_eq!(asked["type"], "ok");
    let asked = alice
        .request(json!({"type":"friend.request","user":"frank"}))
        .await?;
    assert_eq!(asked["type"], "ok");

    let mut again = system.connect("alice", "tablet").await?;
    let frames = again.drain().await?;
    let mut snapshot: Vec<(String, String)> = presence_frames(&frames)
        .iter()
        .map(|f| {
            (
                f["user"].as_str().unwrap().to_string(),
                f["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    snapshot.sort();
    assert_eq!(
        snapshot,
        [
            ("bob".to_string(), "online".to_string()),
            ("dave".to_string(), "offline".to_string())
        ]
    );
    assert!(presence_frames(&frames)
        .iter()
        .all(|f| f["last_active"].as_u64().unwrap() > 0));

    let friends = again.request(json!({"type":"friends"})).await?;
    let items = friends["items"].as_array().unwrap();
    let view = |user: &str| items.iter().find(|i| i["user"] == user).cloned().unwrap();
    assert_eq!(items.len(), 4, "{friends}");
    assert_eq!(view("bob")["state"], "friends");
    assert_eq!(view("bob")["status"], "online");
    assert_eq!(view("dave")["status"], "offline");
    assert!(view("dave")["last_active"].as_u64().unwrap() > 0);
    assert_eq!(view("erin")["state"], "pending");
    assert_eq!(
        view("erin")["last_active"],
        Value::Null,
        "no presence for non-friends"
    );
    assert_eq!(view("frank")["state"], "requested");
    Ok(())
}

#[tokio::test]
async fn friend_requests_follow_the_rules() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let me = alice
        .request(json!({"type":"friend.request","user":"alice"}))
        .await?;
    assert_eq!(me["code"], "bad_request", "{me}");
    let nothing = alice
        .request(json!({"type":"friend.accept","user":"bob"}))
        .await?;
    assert_eq!(nothing["code"], "not_found", "{nothing}");
    let bad = alice
        .request(json!({"type":"friend.request","user":"no.dots"}))
        .await?;
    assert_eq!(bad["code"], "bad_request", "{bad}");

    // Asking someone who already asked you makes you friends.
    alice
        .request(json!({"type":"friend.request","user":"bob"}))
        .await?;
    let ok = bob
        .request(json!({"type":"friend.request","user":"alice"}))
        .await?;
    assert_eq!(ok["type"], "ok");
    let note = alice
        .recv_matching(|f| f["type"] == "friend" && f["state"] == "friends")
        .await?;
    assert_eq!(note["user"], "bob");
    let list = bob.request(json!({"type":"friends"})).await?;
    assert_eq!(list["items"][0]["state"], "friends");

    // Removing ends it on both sides, live.
    let removed = bob
        .request(json!({"type":"friend.remove","user":"alice"}))
        .await?;
    assert_eq!(removed["type"], "ok");
    let note = alice
        .recv_matching(|f| f["type"] == "friend" && f["state"] == "none")
        .await?;
    assert_eq!(note["user"], "bob");
    assert_eq!(
        alice.request(json!({"type":"friends"})).await?["items"],
        json!([])
    );
    // No longer friends: bob's going offline is not alice's business.
    alice.drain().await?;
    bob.close().await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let frames = alice.drain().await?;
    assert!(presence_frames(&frames).is_empty(), "{frames:?}");
    Ok(())
}

#[tokio::test]
async fn typing_reaches_members_only_and_lapses() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let mut carol = system.connect("carol", "phone").await?;
    let created = alice
        .request(json!({"type":"group.create","name":"pair","members":["bob"]}))
        .await?;
    let group = format!("group:{}", created["group"]["id"].as_str().unwrap());

    alice
        .send(json!({"type":"typing","conversation":group,"active":true}))
        .await?;
    let typing = bob.recv_type("typing").await?;
    assert_eq!(
        typing,
        json!({"type":"typing","conversation":group,"user":"alice","active":true})
    );
    // Nobody lapses it: the server does, 6 s after the last refresh.
    let started = Instant::now();
    let lapsed = bob.recv_type("typing").await?;
    assert_eq!(lapsed["active"], false);
    assert_eq!(lapsed["user"], "alice");
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(5000) && after < Duration::from_secs(9),
        "lapsed after {after:?}"
    );

    // A non-member is refused; a DM reaches its other party.
    carol
        .send(json!({"type":"typing","conversation":group,"active":true}))
        .await?;
    let refused = carol.recv_type("error").await?;
    assert_eq!(refused["code"], "forbidden");
    bob.send(json!({"type":"typing","conversation":"dm:alice:bob","active":true}))
        .await?;
    let dm = alice.recv_type("typing").await?;
    assert_eq!(dm["user"], "bob");
    bob.send(json!({"type":"typing","conversation":"dm:alice:bob","active":false}))
        .await?;
    let stopped = alice.recv_type("typing").await?;
    assert_eq!(stopped["active"], false);

    let frames = carol.drain().await?;
    assert!(
        frames.iter().all(|f| f["type"] != "typing"),
        "carol saw typing: {frames:?}"
    );
    let own = alice.drain().await?;
    assert!(
        own.iter()
            .all(|f| f["type"] != "typing" || f["user"] != "alice"),
        "the typist does not get her own typing: {own:?}"
    );
    Ok(())
}

/// Events on `subject` within `window`.
async fn collect(
    subscriber: &mut async_nats::Subscriber,
    window: Duration,
) -> anyhow::Result<Vec<String>> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, subscriber.next()).await {
        let event: Value = serde_json::from_slice(&event.payload)?;
        seen.push(format!(
            "{} {}",
            event["user"].as_str().unwrap_or_default(),
            event["status"].as_str().unwrap_or_default()
        ));
    }
    Ok(seen)
}

#[tokio::test]
async fn a_standby_presence_speaks_once_and_takes_over_warm() -> anyhow::Result<()> {
    let mut system = System::start().await?;
    let _standby = system.start_presence();
    let admin = system.admin().await?;
    let mut public = admin.subscribe("chat.presence.*").await?;
    admin.flush().await?;

    let bob = system.connect("bob", "phone").await?;
    assert_eq!(
        collect(&mut public, Duration::from_secs(2)).await?,
        ["bob online"],
        "exactly once"
    );

    // The leader goes; the standby, which followed every report, leads.
    system.stop_presence();
    system.wait_presence_leader().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // It knew bob was online: his leaving is announced, once.
    bob.close().await?;
    let _carol = system.connect("carol", "phone").await?;
    let mut seen = collect(&mut public, Duration::from_secs(4)).await?;
    seen.sort();
    assert_eq!(seen, ["bob offline", "carol online"]);
    Ok(())
}
