//! Resume with a backlog larger than one fetch from JetStream.

use anyhow::{ensure, Context};
use std::time::Duration;

use chat_shared::consume::Scan;
use chat_shared::direct::{DirectReader, Page};
use chat_shared::ids::UserId;
use chat_shared::subjects;
use chat_tests::System;
use futures::StreamExt;
use serde_json::json;

/// Texts of the largest size a send allows (100,000 characters): 60 of them
/// are ~6 MB, more than the 4 MiB one inbox fetch carries, so the replay
/// must go on past a batch the server ends on its byte limit.
#[tokio::test]
async fn a_backlog_larger_than_one_fetch_is_replayed_whole() -> anyhow::Result<()> {
    const MESSAGES: usize = 60;
    let system = System::start_with(|c| {
        c.limits.send_per_connection = 1000;
        c.limits.send_per_user = 1000;
    })
    .await?;
    let mut alice = system.connect("alice", "phone").await?;
    let bob = system.connect("bob", "phone").await?;
    let start = bob.synced["cursor"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("synced without a cursor: {}", bob.synced))?;
    drop(bob);
    for i in 0..MESSAGES {
        let text = format!("{i:03}{}", "x".repeat(100_000 - 3));
        let sent = alice
            .send_message(json!({"to":"bob"}), &text, &format!("big-{i}"))
            .await?;
        anyhow::ensure!(sent["type"] == "sent", "send {i}: {sent}");
    }
    let bob = system.connect_from("bob", "phone", Some(&start)).await?;
    anyhow::ensure!(
        bob.welcome["resumed"] == true,
        "not resumed: {}",
        bob.welcome
    );
    let prefixes: Vec<String> = bob
        .backlog
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| {
            f["text"]
                .as_str()
                .unwrap_or_default()
                .chars()
                .take(3)
                .collect()
        })
        .collect();
    let expected: Vec<String> = (0..MESSAGES).map(|i| format!("{i:03}")).collect();
    assert_eq!(prefixes, expected, "the backlog before synced");
    Ok(())
}

/// A stored inbox item for bob like the router's: `template` (a message
/// frame bob received) with another text and id, and no cursor.
fn inbox_item(template: &serde_json::Value, text: &str, id: u64) -> anyhow::Result<Vec<u8>> {
    let mut frame = template.clone();
    let object = frame
        .as_object_mut()
        .ok_or_else(|| anyhow::anyhow!("not an object: {template}"))?;
    object.remove("cursor");
    object.insert("text".into(), json!(text));
    object.insert("id".into(), json!(id.to_string()));
    object.insert("client_msg_id".into(), json!(format!("injected-{id}")));
    Ok(serde_json::to_vec(&frame)?)
}

/// Live deliveries go over core NATS, which may lose one (a NATS node dies
/// with it in flight). The next one names the item before it; a session
/// that never sent that item reads the inbox again instead of skipping it.
#[tokio::test]
async fn a_live_frame_lost_on_the_way_is_read_from_the_inbox() -> anyhow::Result<()> {
    use chat_shared::ids::Cursor;
    use chat_shared::subjects;

    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let sent = alice
        .send_message(json!({"to":"bob"}), "first", "c1")
        .await?;
    anyhow::ensure!(sent["type"] == "sent", "{sent}");
    let first = bob.recv_type("message").await?;
    anyhow::ensure!(first["text"] == "first", "{first}");
    // The router's first delivery to bob says "unknown" (it cannot know
    // what came before): the edge may have counted a gap for it already.
    let gaps_before = live_gaps(&system).await?;

    // What the router does for two more items, but the first one's live
    // frame is lost: both are appended, only the second is published live.
    let admin = system.admin().await?;
    let js = async_nats::jetstream::new(admin.clone());
    let bob_id = chat_shared::ids::UserId::parse("bob")?;
    let mut appended = Vec::new();
    for (text, id) in [("lost", 1_000_001), ("after", 1_000_002)] {
        let item = inbox_item(&first, text, id)?;
        let partition = system.config.partitions.of_user(&bob_id);
        let ack = js
            .publish(subjects::inbox_in(&bob_id, partition), item.clone().into())
            .await?
            .await?;
        appended.push((Cursor(ack.sequence), item));
    }
    let (lost, _) = appended[0].clone();
    let (after, item) = appended[1].clone();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(subjects::CURSOR_HEADER, after.to_string().as_str());
    headers.insert(subjects::PREV_CURSOR_HEADER, lost.to_string().as_str());
    admin
        .publish_with_headers(
            subjects::deliver(&bob_id),
            headers,
            chat_shared::wire::with_cursor(&item, after).into(),
        )
        .await?;
    admin.flush().await?;

    let got = [
        bob.recv_type("message").await?,
        bob.recv_type("message").await?,
    ];
    let seen: Vec<(&str, &str)> = got
        .iter()
        .map(|f| {
            (
                f["text"].as_str().unwrap_or_default(),
                f["cursor"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("lost", lost.to_string().as_str()),
            ("after", after.to_string().as_str())
        ]
    );
    // Nothing twice: the live frame of "after" was not forwarded as well.
    let more = bob.drain().await?;
    assert!(
        more.iter().all(|f| f["type"] != "message"),
        "a message twice: {more:?}"
    );
    let gaps = live_gaps(&system).await? - gaps_before;
    assert_eq!(gaps, 1.0, "the edge counted the gap once");
    Ok(())
}

/// The edge's count of live deliveries that followed a gap.
async fn live_gaps(system: &System) -> anyhow::Result<f64> {
    let (status, metrics) = chat_tests::http_get(system.edge_addr, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    Ok(chat_tests::metrics::Scrape::parse(&metrics)?.sum("edge_live_gaps_total", &[]))
}

/// The router names each user's previous inbox item on every live delivery.
#[tokio::test]
async fn live_deliveries_name_the_users_previous_item() -> anyhow::Result<()> {
    use chat_shared::subjects;
    use futures::StreamExt;

    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let admin = system.admin().await?;
    let bob_id = chat_shared::ids::UserId::parse("bob")?;
    let mut live = admin.subscribe(subjects::deliver(&bob_id)).await?;
    admin.flush().await?;
    for i in 0..3 {
        let sent = alice
            .send_message(json!({"to":"bob"}), &format!("m{i}"), &format!("c{i}"))
            .await?;
        anyhow::ensure!(sent["type"] == "sent", "{sent}");
    }
    let mut links = Vec::new();
    while links.len() < 3 {
        let delivery = tokio::time::timeout(std::time::Duration::from_secs(10), live.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("subscription ended"))?;
        let header = |name: &str| {
            delivery
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
        };
        links.push((
            header(subjects::CURSOR_HEADER),
            header(subjects::PREV_CURSOR_HEADER),
        ));
    }
    // Bob's first item from this router names "unknown" (the router
    // cannot know what came before it); each later one the one before.
    assert_eq!(
        links[0].1.as_deref(),
        Some(subjects::PREV_CURSOR_UNKNOWN),
        "{links:?}"
    );
    assert_eq!(links[1].1, links[0].0, "{links:?}");
    assert_eq!(links[2].1, links[1].0, "{links:?}");
    assert!(
        links.iter().all(|(cursor, _)| cursor.is_some()),
        "{links:?}"
    );
    Ok(())
}

/// Every consumer-create request on any stream, as nats-server receives
/// it (the ephemeral and the named form of the API subject), and a marker
/// to know when all earlier ones have arrived.
struct ConsumerCreates {
    admin: async_nats::Client,
    marker: String,
    requests: async_nats::Subscriber,
}

impl ConsumerCreates {
    async fn watch(system: &System) -> anyhow::Result<Self> {
        let admin = system.admin().await?;
        let requests = admin.subscribe("$JS.API.CONSUMER.CREATE.>").await?;
        admin.flush().await?;
        Ok(Self {
            admin,
            // A prefix of every INBOX partition's name too (`INBOX_<k>`).
            marker: format!("$JS.API.CONSUMER.CREATE.{}", subjects::INBOX_STREAM),
            requests,
        })
    }

    /// The create requests seen since the last count: each one caused by a
    /// resume was answered before the resume ended, so it reached the
    /// server before a marker published now.
    async fn count(&mut self) -> anyhow::Result<usize> {
        self.admin
            .publish(self.marker.clone(), "marker".into())
            .await?;
        self.admin.flush().await?;
        let mut seen = 0;
        loop {
            let request = tokio::time::timeout(chat_tests::WAIT, self.requests.next())
                .await
                .context("the marker never arrived")?
                .context("subscription ended")?;
            if request.payload.as_ref() == b"marker" {
                return Ok(seen);
            }
            // The presence leader lists its whole bucket once when it takes
            // the lead, whenever that happens; a read for a session would
            // name the user.
            let whole_bucket =
                format!("\"filter_subject\":\"$KV.{}.>\"", subjects::PRESENCE_BUCKET);
            if String::from_utf8_lossy(&request.payload).contains(&whole_bucket) {
                continue;
            }
            seen += 1;
        }
    }
}

#[tokio::test]
async fn a_thousand_resumes_create_no_consumer() -> anyhow::Result<()> {
    const RESUMES: usize = 1000;
    const BACKLOG: usize = 3;
    let system = System::start_with(|c| c.limits.connects_per_ip = 1_000_000).await?;
    let mut alice = system.connect("alice", "phone").await?;
    let bob = system.connect("bob", "phone").await?;
    let start = bob.synced["cursor"]
        .as_str()
        .map(str::to_string)
        .context("synced without a cursor")?;
    bob.close().await?;
    for i in 0..BACKLOG {
        let sent = alice
            .send_message(json!({"to":"bob"}), &format!("m{i}"), &format!("c{i}"))
            .await?;
        ensure!(sent["type"] == "sent", "send {i}: {sent}");
    }
    let mut creates = ConsumerCreates::watch(&system).await?;

    // The control: the counter sees the consumer a scan of the inbox creates.
    let js = async_nats::jetstream::new(creates.admin.clone());
    let bob_id = UserId::parse("bob")?;
    let inbox = js
        .get_stream_no_info(system.config.partitions.of_user(&bob_id).inbox_stream())
        .await?;
    let scan = Scan::open(
        &inbox,
        subjects::inbox(&bob_id),
        async_nats::jetstream::consumer::DeliverPolicy::All,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    scan.close().await;
    ensure!(creates.count().await? == 1, "the counter missed a scan");

    // Resumes from the cursor before the backlog (each replays it whole)
    // and, every tenth, from the device's stored cursor.
    for i in 0..RESUMES {
        let cursor = (i % 10 != 0).then_some(start.as_str());
        let bob = system.connect_from("bob", "tablet", cursor).await?;
        if cursor.is_some() {
            let texts: Vec<&str> = bob
                .backlog
                .iter()
                .filter(|f| f["type"] == "message")
                .filter_map(|f| f["text"].as_str())
                .collect();
            ensure!(texts == ["m0", "m1", "m2"], "resume {i}: {:?}", bob.backlog);
        }
        bob.close().await?;
    }
    assert_eq!(
        creates.count().await?,
        0,
        "consumers created by {RESUMES} resumes"
    );
    Ok(())
}

/// The reader against the real server: pages end on their count or their
/// bytes with what is left after them, only the user's subject is read,
/// and past the end is an empty page, not an error.
#[tokio::test]
async fn direct_gets_page_a_users_inbox_by_count_and_bytes() -> anyhow::Result<()> {
    let system = System::start().await?;
    let admin = system.admin().await?;
    let js = async_nats::jetstream::new(admin.clone());
    let partitions = system.config.partitions;
    let (bob_id, alice_id) = (UserId::parse("bob")?, UserId::parse("alice")?);
    let bob = subjects::inbox(&bob_id);
    let publish_bob = subjects::inbox_in(&bob_id, partitions.of_user(&bob_id));
    let publish_alice = subjects::inbox_in(&alice_id, partitions.of_user(&alice_id));
    let mut bobs = Vec::new();
    for i in 0..5 {
        let text = format!("{i}{}", "x".repeat(3000));
        bobs.push(
            js.publish(publish_bob.clone(), text.into())
                .await?
                .await?
                .sequence,
        );
        js.publish(publish_alice.clone(), "other".into())
            .await?
            .await?;
    }
    let reader = DirectReader::new(
        admin,
        &partitions.of_user(&bob_id).inbox_stream(),
        Duration::from_secs(5),
    );
    let sequences = |page: &Page| page.items.iter().map(|i| i.sequence).collect::<Vec<_>>();

    let first = reader.page(&bob, 1, 3, 1 << 20).await?;
    assert_eq!((sequences(&first), first.pending), (bobs[..3].to_vec(), 2));
    assert!(first.items[0].payload.starts_with(b"0xxx"));
    let rest = reader.page(&bob, bobs[2] + 1, 3, 1 << 20).await?;
    assert_eq!((sequences(&rest), rest.pending), (bobs[3..].to_vec(), 0));

    // Less than two items' bytes: the page ends with the item that passes
    // the bound (the server checks after sending), and says what is left.
    let small = reader.page(&bob, 1, 500, 5_000).await?;
    assert_eq!((sequences(&small), small.pending), (bobs[..2].to_vec(), 3));

    let past = reader.page(&bob, bobs[4] + 1, 500, 1 << 20).await?;
    assert_eq!((sequences(&past), past.pending), (vec![], 0));
    Ok(())
}
