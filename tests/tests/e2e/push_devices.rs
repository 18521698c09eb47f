//! Push per device (issue 17 item 6), end to end: real edges, router,
//! presence, persister and pushd against the stand-in providers. A device
//! that is not connected gets the push while another device of the user is
//! online; a read on any device retracts it on the others; the badge is the
//! user's unread total; a user whose devices are all connected costs no
//! PUSH write.

use anyhow::{ensure, Result};
use async_nats::jetstream;
use chat_shared::ids::UserId;
use chat_shared::subjects;
use chat_tests::providers::Recorded;
use chat_tests::{wait_until, Client};
use serde_json::{json, Value};
use std::time::Duration;

use crate::push::{request_ok, Pushd, Setup};

/// Until `user`'s presence record lists exactly `devices` as connected.
async fn wait_devices(js: &jetstream::Context, user: &str, devices: &[&str]) -> Result<()> {
    let bucket = js.get_key_value(subjects::PRESENCE_BUCKET).await?;
    let key = subjects::presence_key(&UserId::parse(user)?);
    let wanted = json!(devices);
    wait_until(|| {
        let (bucket, key, wanted) = (bucket.clone(), key.clone(), wanted.clone());
        async move {
            match bucket.get(key).await {
                Ok(Some(bytes)) => serde_json::from_slice::<Value>(&bytes)
                    .is_ok_and(|record| record["devices"] == wanted),
                _ => false,
            }
        }
    })
    .await
}

/// Until the router has settled everything it was given: each MESSAGES
/// partition and RECEIPTS, nothing pending and nothing unacked. Its push
/// jobs are written before its acks, so after this no job can still come.
async fn router_settled(setup: &Setup) -> Result<()> {
    let mut consumers: Vec<(String, &str)> = setup
        .system
        .config
        .partitions
        .all()
        .map(|p| (p.messages_stream(), subjects::ROUTER_CONSUMER))
        .collect();
    consumers.push((
        subjects::RECEIPTS_STREAM.to_string(),
        subjects::ROUTER_RECEIPTS_CONSUMER,
    ));
    let js = &setup.js;
    wait_until(|| {
        let consumers = consumers.clone();
        async move {
            for (stream, consumer) in consumers {
                let Ok(stream) = js.get_stream(&stream).await else {
                    return false;
                };
                match stream.consumer_info(consumer).await {
                    Ok(info) if info.num_pending == 0 && info.num_ack_pending == 0 => {}
                    _ => return false,
                }
            }
            true
        }
    })
    .await
}

/// How many jobs were ever written to PUSH (its last sequence: a work
/// queue removes acked jobs, the sequence stays).
async fn push_writes(js: &jetstream::Context) -> Result<u64> {
    let mut stream = js.get_stream(subjects::PUSH_STREAM).await?;
    Ok(stream.info().await?.state.last_sequence)
}

/// The user's server-side unread total: the sum of `unread` over the
/// `conversations` answer.
async fn unread_total(client: &mut Client) -> Result<u64> {
    let page = client.request(json!({"type":"conversations"})).await?;
    ensure!(page["type"] == "conversations", "{page}");
    let items = page["items"].as_array().cloned().unwrap_or_default();
    Ok(items.iter().filter_map(|i| i["unread"].as_u64()).sum())
}

/// Until `client`'s unread total is `expected` (the persister writes
/// behind delivery).
async fn wait_unread(client: &mut Client, expected: u64) -> Result<()> {
    let client = tokio::sync::Mutex::new(client);
    wait_until(|| async {
        let mut client = client.lock().await;
        unread_total(&mut client).await.ok() == Some(expected)
    })
    .await
}

fn fcm_message(request: &Recorded) -> Result<Value> {
    Ok(request.json()?["message"].clone())
}

#[tokio::test]
async fn push_per_device_offline_phone_gets_one_push_and_a_read_on_the_laptop_retracts_it(
) -> Result<()> {
    let setup = Setup::start().await?;
    let pushd = Pushd::start(setup.config(Duration::from_millis(200), true));
    let system = &setup.system;
    let fcm = &setup.fakes.fcm;

    // Both of bob's devices hold a token; only the phone goes away.
    let mut phone = system.connect("bob", "phone").await?;
    request_ok(
        &mut phone,
        json!({"type":"push.register","platform":"fcm","token":"fcm-bob-phone"}),
    )
    .await?;
    let mut laptop = system.connect("bob", "laptop").await?;
    request_ok(
        &mut laptop,
        json!({"type":"push.register","platform":"fcm","token":"fcm-bob-laptop"}),
    )
    .await?;
    let mut alice = system.connect("alice", "phone").await?;
    phone.close().await?;
    wait_devices(&setup.js, "bob", &["laptop"]).await?;

    // Each message: exactly one push, to the phone, while the laptop is
    // online and gets it live; the badge is bob's unread total.
    let mut sent = Vec::new();
    for (n, text) in ["lunch?", "at noon?"].into_iter().enumerate() {
        let message = alice
            .send_message(json!({"to":"bob"}), text, &format!("d{n}"))
            .await?;
        ensure!(message["type"] == "sent", "{message}");
        laptop
            .recv_matching(|f| f["type"] == "message" && f["id"] == message["id"])
            .await?;
        wait_until(|| async { fcm.requests().len() == n + 1 }).await?;
        let push = fcm_message(&fcm.requests()[n])?;
        assert_eq!(push["token"], "fcm-bob-phone", "{push}");
        assert_eq!(push["notification"]["body"], text);
        assert_eq!(push["data"]["message_id"], message["id"]);
        assert_eq!(push["data"]["badge"], (n + 1).to_string());
        assert_eq!(push["android"]["collapse_key"], "dm:alice:bob");
        sent.push(message);
    }
    wait_unread(&mut laptop, 2).await?;

    // A read on the laptop: the phone's notification is retracted (a data
    // push, nothing shown, same collapse key), with the badge now 0.
    let last = sent[1]["id"].clone();
    laptop
        .send(json!({"type":"read","conversation":"dm:alice:bob","up_to":last}))
        .await?;
    wait_until(|| async { fcm.requests().len() == 3 }).await?;
    let retraction = fcm_message(&fcm.requests()[2])?;
    assert_eq!(retraction["token"], "fcm-bob-phone", "{retraction}");
    assert!(retraction.get("notification").is_none(), "{retraction}");
    assert_eq!(retraction["data"]["retract"], "read");
    assert_eq!(retraction["data"]["conversation"], "dm:alice:bob");
    assert_eq!(retraction["data"]["up_to"], last);
    assert_eq!(retraction["data"]["badge"], "0");
    assert_eq!(retraction["android"]["collapse_key"], "dm:alice:bob");
    assert_eq!(
        retraction["apns"]["headers"]["apns-push-type"],
        "background"
    );
    wait_unread(&mut laptop, 0).await?;

    // Nothing else: every job is written and sent, none to the laptop.
    router_settled(&setup).await?;
    wait_until(|| async { setup.jobs_left().await == 0 }).await?;
    assert_eq!(fcm.requests().len(), 3);
    assert_eq!(
        push_writes(&setup.js).await?,
        3,
        "two pushes, one retraction"
    );
    for request in fcm.requests() {
        assert!(
            !request.text().contains("fcm-bob-laptop"),
            "{}",
            request.text()
        );
    }
    pushd.stop().await
}

#[tokio::test]
async fn push_per_device_all_devices_online_write_no_push_job() -> Result<()> {
    let setup = Setup::start().await?;
    let _pushd = Pushd::start(setup.config(Duration::from_millis(200), true));
    let system = &setup.system;

    let mut phone = system.connect("bob", "phone").await?;
    request_ok(
        &mut phone,
        json!({"type":"push.register","platform":"fcm","token":"fcm-bob-phone"}),
    )
    .await?;
    let mut laptop = system.connect("bob", "laptop").await?;
    let mut alice = system.connect("alice", "phone").await?;
    wait_devices(&setup.js, "bob", &["laptop", "phone"]).await?;

    let message = alice
        .send_message(json!({"to":"bob"}), "both here", "o1")
        .await?;
    ensure!(message["type"] == "sent", "{message}");
    for device in [&mut phone, &mut laptop] {
        device
            .recv_matching(|f| f["type"] == "message" && f["id"] == message["id"])
            .await?;
    }
    // A read with every device connected retracts nothing either: the
    // phone learns of it from its inbox.
    laptop
        .send(json!({"type":"read","conversation":"dm:alice:bob","up_to":message["id"]}))
        .await?;
    phone
        .recv_matching(|f| f["type"] == "receipt" && f["kind"] == "read")
        .await?;
    router_settled(&setup).await?;
    assert_eq!(push_writes(&setup.js).await?, 0, "no PUSH write at all");
    assert!(setup.fakes.all_requests().is_empty());
    Ok(())
}

/// The persister keeps the push bucket in step with `push_tokens`: an
/// unregistered device is no longer pushed, even while not connected.
#[tokio::test]
async fn push_per_device_unregistered_device_is_not_pushed() -> Result<()> {
    let setup = Setup::start().await?;
    let _pushd = Pushd::start(setup.config(Duration::from_millis(200), true));
    let system = &setup.system;
    let bucket = setup
        .js
        .get_key_value(subjects::PUSH_DEVICES_BUCKET)
        .await?;
    let key = subjects::push_devices_key(&UserId::parse("bob")?);
    let record = || async {
        let bytes = bucket.get(key.clone()).await?.unwrap_or_default();
        anyhow::Ok(serde_json::from_slice::<Value>(&bytes)?)
    };

    let mut phone = system.connect("bob", "phone").await?;
    let register = json!({"type":"push.register","platform":"fcm","token":"fcm-bob-phone"});
    request_ok(&mut phone, register.clone()).await?;
    assert_eq!(record().await?, json!({"devices": ["phone"]}));
    let mut unregister = register;
    unregister["type"] = json!("push.unregister");
    request_ok(&mut phone, unregister).await?;
    assert_eq!(record().await?, json!({"devices": []}));

    let mut laptop = system.connect("bob", "laptop").await?;
    let mut alice = system.connect("alice", "phone").await?;
    phone.close().await?;
    wait_devices(&setup.js, "bob", &["laptop"]).await?;
    let message = alice
        .send_message(json!({"to":"bob"}), "anyone?", "u1")
        .await?;
    ensure!(message["type"] == "sent", "{message}");
    laptop
        .recv_matching(|f| f["type"] == "message" && f["id"] == message["id"])
        .await?;
    router_settled(&setup).await?;
    assert_eq!(push_writes(&setup.js).await?, 0);
    assert!(setup.fakes.all_requests().is_empty());
    Ok(())
}

/// A delete for everyone withdraws the notification the message made on
/// the devices that got it (PROTOCOL.md v1.1: a delete retracts).
#[tokio::test]
async fn push_per_device_a_delete_for_everyone_retracts_the_notification() -> Result<()> {
    let setup = Setup::start().await?;
    let pushd = Pushd::start(setup.config(Duration::from_millis(200), true));
    let system = &setup.system;
    let fcm = &setup.fakes.fcm;
    let mut phone = system.connect("bob", "phone").await?;
    request_ok(
        &mut phone,
        json!({"type":"push.register","platform":"fcm","token":"fcm-bob-phone"}),
    )
    .await?;
    let mut laptop = system.connect("bob", "laptop").await?;
    let mut alice = system.connect("alice", "phone").await?;
    phone.close().await?;
    wait_devices(&setup.js, "bob", &["laptop"]).await?;

    let message = alice
        .send_message(json!({"to":"bob"}), "wrong chat, sorry", "x1")
        .await?;
    ensure!(message["type"] == "sent", "{message}");
    wait_until(|| async { fcm.requests().len() == 1 }).await?;
    let push = fcm_message(&fcm.requests()[0])?;
    assert_eq!(push["notification"]["body"], "wrong chat, sorry");

    let delete = json!({
        "type":"delete","conversation":"dm:alice:bob","id":message["id"],"for":"everyone"
    });
    request_ok(&mut alice, delete).await?;
    laptop
        .recv_matching(|f| f["type"] == "update" && f["kind"] == "delete")
        .await?;
    wait_until(|| async { fcm.requests().len() == 2 }).await?;
    let retraction = fcm_message(&fcm.requests()[1])?;
    assert_eq!(retraction["token"], "fcm-bob-phone", "{retraction}");
    assert!(retraction.get("notification").is_none(), "{retraction}");
    assert_eq!(retraction["data"]["retract"], "delete", "{retraction}");
    assert_eq!(retraction["data"]["up_to"], message["id"], "{retraction}");
    assert_eq!(retraction["android"]["collapse_key"], "dm:alice:bob");
    // The deleter's own devices get nothing.
    router_settled(&setup).await?;
    assert_eq!(fcm.requests().len(), 2, "one push, one retraction");
    pushd.stop().await
}
