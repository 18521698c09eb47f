//! Moving buckets between shards under load (persister/src/moves.rs,
//! `chatctl shards move`): senders keep sending and readers keep reading
//! while a quarter of the buckets moves from one PostgreSQL server to the
//! other; afterwards every message is stored exactly once, on the shard
//! the new map names, the counters are exact, and no read ever lost a
//! message it had shown.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use async_nats::jetstream;
use chat_shared::ids::{ConversationId, UserId};
use chat_shared::shards::{self, ShardMap};
use chat_tests::{fresh_database_on, wait_until_within, Client, PgCluster, System};
use serde_json::json;

const SENDERS: usize = 4;
const RECIPIENTS: usize = 60;
/// Messages each sender sends (round robin over its recipients).
const PER_SENDER: usize = 360;
const WINDOW: usize = 20;
/// The buckets that move from shard 0 to shard 1 (half of shard 0's).
const MOVED: std::ops::RangeInclusive<usize> = 256..=511;

fn recipient(sender: usize, i: usize) -> String {
    format!("m{sender}r{}", i % RECIPIENTS)
}

fn dm(a: &str, b: &str) -> Result<ConversationId> {
    Ok(ConversationId::dm(UserId::parse(a)?, UserId::parse(b)?)?)
}

/// What the senders sent: client_msg_id -> (conversation, id), and how
/// many `sent` replies came while the move ran.
#[derive(Default)]
struct Sent {
    messages: HashMap<String, (String, String)>,
    during_move: usize,
}

/// One sender's load: [`PER_SENDER`] DMs with [`WINDOW`] in flight, and
/// every tenth message to the group too.
async fn send_load(
    mut client: Client,
    sender: usize,
    group: Option<String>,
    moving: Arc<AtomicBool>,
) -> Result<Sent> {
    let mut sent = Sent::default();
    let name = format!("m{sender}");
    for round in 0..PER_SENDER / WINDOW {
        let mut waiting = Vec::new();
        for i in 0..WINDOW {
            let n = round * WINDOW + i;
            let target = match &group {
                Some(group) if n % 10 == 0 => json!({"conversation":group}),
                _ => json!({"to":recipient(sender, n)}),
            };
            let client_msg_id = format!("{name}-{n}");
            let mut frame = json!({"type":"send","ref":client_msg_id,"text":format!("{name} #{n}"),
                                   "client_msg_id":client_msg_id});
            if let (Some(frame), Some(target)) = (frame.as_object_mut(), target.as_object()) {
                frame.extend(target.clone());
            }
            client.send(frame).await?;
            waiting.push(client_msg_id);
        }
        for client_msg_id in waiting {
            let reference = json!(client_msg_id);
            let reply = client.recv_matching(|f| f["ref"] == reference).await?;
            ensure!(reply["type"] == "sent", "{reply}");
            if moving.load(Ordering::SeqCst) {
                sent.during_move += 1;
            }
            let conversation = reply["conversation"].as_str().context("conversation")?;
            let id = reply["id"].as_str().context("id")?;
            sent.messages
                .insert(client_msg_id, (conversation.to_string(), id.to_string()));
        }
    }
    Ok(sent)
}

/// Reads `conversations`' histories again and again until `done`; fails if
/// a read ever misses a message an earlier read showed. Returns the reads.
async fn read_load(
    mut client: Client,
    conversations: Vec<String>,
    done: Arc<AtomicBool>,
    reads: Arc<AtomicUsize>,
) -> Result<()> {
    let mut shown: HashMap<String, HashSet<String>> = HashMap::new();
    while !done.load(Ordering::SeqCst) {
        for conversation in &conversations {
            let page = client
                .request(json!({"type":"history","conversation":conversation,"limit":200}))
                .await?;
            if page["type"] == "error" {
                // A read is never fenced; an error here is a failure.
                anyhow::bail!("history of {conversation}: {page}");
            }
            let ids: HashSet<String> = page["messages"]
                .as_array()
                .context("messages")?
                .iter()
                .filter_map(|m| m["id"].as_str().map(str::to_string))
                .collect();
            let before = shown.entry(conversation.clone()).or_default();
            let lost: Vec<&String> = before.difference(&ids).collect();
            ensure!(
                lost.is_empty(),
                "{conversation}: a read lost {lost:?} it had shown"
            );
            *before = ids;
            reads.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The map in KV, as `chatctl shards` reads it (tested against the bucket
/// itself in `shards::`).
async fn stored_map(system: &System) -> Result<ShardMap> {
    chatctl::shards::map(&jetstream::new(system.admin().await?)).await
}

/// A group whose conversation is in the moving buckets (group ids are
/// random: a few tries).
async fn group_in_moved_buckets(client: &mut Client) -> Result<String> {
    for _ in 0..64 {
        let created = client
            .request(json!({"type":"group.create","name":"moving","members":["m1r1","m2r2"]}))
            .await?;
        let id = created["group"]["id"].as_str().context("a group")?;
        let conversation = format!("group:{id}");
        let bucket = shards::of_conversation(&ConversationId::parse(&conversation)?);
        if MOVED.contains(&bucket) {
            return Ok(conversation);
        }
    }
    anyhow::bail!("no group landed in the moving buckets")
}

#[tokio::test]
async fn a_bucket_move_under_load_loses_and_duplicates_nothing() -> Result<()> {
    let elsewhere = fresh_database_on(PgCluster::second().await?).await?;
    let system = System::start_with(move |config| {
        config.database_urls.truncate(1);
        config.database_urls.push(elsewhere);
    })
    .await?;
    assert_eq!(stored_map(&system).await?, ShardMap::even(2));
    let mut owner = system.connect("m0", "d").await?;
    let group = group_in_moved_buckets(&mut owner).await?;
    drop(owner);

    // m0's conversations read throughout: the group and DMs in the moving
    // buckets (m0 sends every tenth message to the group, so recipients
    // 0, 10, ... get none).
    let mut watched = vec![group.clone()];
    for i in (0..RECIPIENTS).filter(|i| i % 10 != 0) {
        let conversation = dm("m0", &recipient(0, i))?;
        if MOVED.contains(&shards::of_conversation(&conversation)) && watched.len() < 6 {
            watched.push(conversation.to_string());
        }
    }
    ensure!(watched.len() >= 3, "too few DMs in the moving buckets");

    let moving = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let client = system.connect(&format!("m{s}"), "d").await?;
        let group = (s == 0).then(|| group.clone());
        senders.push(tokio::spawn(send_load(client, s, group, moving.clone())));
    }
    let reader = tokio::spawn(read_load(
        system.connect("m0", "reader").await?,
        watched.clone(),
        done.clone(),
        reads.clone(),
    ));

    // Under way: some messages stored, then the move.
    wait_until_within(Duration::from_secs(60), || async {
        system
            .count_everywhere("SELECT count(*) FROM messages")
            .await
            .is_ok_and(|n| n >= 200)
    })
    .await?;
    let reads_before = reads.load(Ordering::Relaxed);
    moving.store(true, Ordering::SeqCst);
    let js = jetstream::new(system.admin().await?);
    let report = chat_persister::moves::move_buckets(
        &system.config,
        &js,
        MOVED,
        1,
        Duration::from_millis(500),
    )
    .await?;
    moving.store(false, Ordering::SeqCst);
    let reads_during = reads.load(Ordering::Relaxed) - reads_before;

    let mut sent = Sent::default();
    for sender in senders {
        let one = sender.await??;
        sent.during_move += one.during_move;
        sent.messages.extend(one.messages);
    }
    done.store(true, Ordering::SeqCst);
    reader.await??;
    eprintln!(
        "move: {report:?}; {} sends and {reads_during} reads during it",
        sent.during_move
    );
    ensure!(
        sent.during_move > 0,
        "no send overlapped the move: {report:?}"
    );
    ensure!(reads_during > 0, "no read overlapped the move");
    assert_eq!(report.from, [0]);
    ensure!(
        report.rows_copied > 0 && report.rows_deleted > 0,
        "{report:?}"
    );

    // The map names shard 1 for the moved buckets, shard 0 keeps the rest.
    let map = stored_map(&system).await?;
    for bucket in 0..shards::BUCKETS {
        let expected = if bucket < 256 { 0 } else { 1 };
        assert_eq!(map.shard(bucket), expected, "bucket {bucket}");
    }

    // Every message stored exactly once, on the shard the map names.
    let total = SENDERS * PER_SENDER;
    assert_eq!(sent.messages.len(), total);
    wait_until_within(Duration::from_secs(60), || async {
        system
            .count_everywhere("SELECT count(*) FROM messages")
            .await
            .is_ok_and(|n| n == total as i64)
    })
    .await
    .with_context(|| format!("{report:?}"))?;
    let mut stored: BTreeMap<String, usize> = BTreeMap::new();
    for (shard, db) in system.databases().await?.iter().enumerate() {
        for row in &db
            .query("SELECT conversation, client_msg_id FROM messages", &[])
            .await?
        {
            let conversation: String = row.get(0);
            ensure!(
                map.of_conversation(&ConversationId::parse(&conversation)?) == shard,
                "{conversation} on shard {shard} after the move"
            );
            *stored.entry(row.get(1)).or_default() += 1;
        }
        for row in &db
            .query("SELECT user_id FROM user_conversations", &[])
            .await?
        {
            let user = UserId::parse(row.get::<_, String>(0))?;
            ensure!(map.of_user(&user) == shard, "{user}'s row on shard {shard}");
        }
    }
    let duplicated: Vec<_> = stored.iter().filter(|(_, n)| **n > 1).collect();
    ensure!(duplicated.is_empty(), "stored twice: {duplicated:?}");
    let lost: Vec<_> = sent
        .messages
        .keys()
        .filter(|id| !stored.contains_key(*id))
        .collect();
    ensure!(lost.is_empty(), "lost: {lost:?}");

    // Counters exact: every DM message is one unread for its recipient,
    // every group message one for each of the two other members.
    let group_messages = PER_SENDER / 10;
    let unread = (total - group_messages) + 2 * group_messages;
    wait_until_within(Duration::from_secs(30), || async {
        system
            .count_everywhere("SELECT COALESCE(sum(unread), 0)::bigint FROM user_conversations")
            .await
            .is_ok_and(|n| n == unread as i64)
    })
    .await?;

    // Reads after: each watched history is exactly what was sent to it.
    let mut reader = system.connect("m0", "after").await?;
    for conversation in &watched {
        let page = reader
            .request(json!({"type":"history","conversation":conversation,"limit":200}))
            .await?;
        let mut ids: Vec<String> = page["messages"]
            .as_array()
            .context("messages")?
            .iter()
            .filter_map(|m| m["id"].as_str().map(str::to_string))
            .collect();
        ids.sort();
        let mut expected: Vec<String> = sent
            .messages
            .values()
            .filter(|(c, _)| c == conversation)
            .map(|(_, id)| id.clone())
            .collect();
        expected.sort();
        assert_eq!(ids, expected, "{conversation}");
    }
    Ok(())
}

/// The SQL half of a move: `chat_bucket` is `shared::shards::bucket`, and
/// `chat_fence` refuses a bucket its shard does not own (the error every
/// writer retries) and passes one it does.
#[tokio::test]
async fn the_fence_refuses_what_the_shard_does_not_own_and_sql_hashes_as_rust() -> Result<()> {
    let system = System::start().await?;
    let db = system.database().await?;
    for key in [
        "",
        "alice",
        "dm:alice:bob",
        "group:g0123456789abcdef",
        "ünïcode-ключ-東京",
    ] {
        let sql: i32 = db
            .query_one("SELECT chat_bucket($1)", &[&key])
            .await?
            .get(0);
        assert_eq!(sql as usize, shards::bucket(key), "{key:?}");
    }
    let owned: i64 = db
        .query_one("SELECT count(*) FROM shard_buckets WHERE owned", &[])
        .await?
        .get(0);
    let expected = if system.config.database_urls.len() == 1 {
        1024
    } else {
        512
    };
    assert_eq!(owned, expected, "shard 0 owns its share of the even map");
    let map = stored_map(&system).await?;
    let mine = (0..shards::BUCKETS as i32)
        .find(|&b| map.shard(b as usize) == 0)
        .context("a bucket of shard 0")?;
    db.execute("SELECT chat_fence($1)", &[&vec![mine]]).await?;
    db.execute(
        "UPDATE shard_buckets SET owned = false WHERE bucket = $1",
        &[&mine],
    )
    .await?;
    let refused = db
        .execute("SELECT chat_fence($1)", &[&vec![mine]])
        .await
        .err()
        .context("the fence let a write through")?;
    assert_eq!(refused.code().map(|c| c.code()), Some("CHMOV"), "{refused}");
    Ok(())
}
