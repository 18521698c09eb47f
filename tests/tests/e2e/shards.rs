//! PostgreSQL shards (persister/src/shards.rs): every row lands on the
//! shard the map in KV names for its conversation or user, once, and the
//! answers of `history` and `conversations` are those of one shard.

use std::collections::{BTreeMap, HashSet};

use anyhow::{ensure, Context as _, Result};
use async_nats::jetstream;
use chat_shared::ids::{ConversationId, UserId};
use chat_shared::shards::{ShardMap, MAP_KEY};
use chat_shared::subjects;
use chat_tests::{fresh_database_on, wait_until, Client, PgCluster, System};
use serde_json::{json, Value};

/// Senders, each in DMs with as many recipients of their own: 2,000
/// conversations.
const SENDERS: usize = 4;
const PER_SENDER: usize = 500;
/// A group whose members are on both shards, and its messages.
const GROUP: [&str; 6] = ["s0", "s1", "r0", "r7", "r500", "r1999"];
const GROUP_MESSAGES: usize = 10;
/// Sends in flight per connection.
const WINDOW: usize = 50;
/// Recipients whose lists and histories are compared.
const SAMPLED: [usize; 8] = [0, 1, 7, 499, 500, 1000, 1500, 1999];

fn recipient(sender: usize, i: usize) -> String {
    format!("r{}", sender * PER_SENDER + i)
}

/// Sends `texts` to `targets` with [`WINDOW`] sends in flight.
async fn send_all(client: &mut Client, sends: Vec<(Value, String)>) -> Result<()> {
    for (round, chunk) in sends.chunks(WINDOW).enumerate() {
        for (i, (target, text)) in chunk.iter().enumerate() {
            let mut frame = json!({"type":"send","ref":format!("w{round}.{i}"),"text":text,
                                   "client_msg_id":format!("c{round}.{i}")});
            if let (Some(frame), Some(target)) = (frame.as_object_mut(), target.as_object()) {
                frame.extend(target.clone());
            }
            client.send(frame).await?;
        }
        for i in 0..chunk.len() {
            let reference = json!(format!("w{round}.{i}"));
            let reply = client.recv_matching(|f| f["ref"] == reference).await?;
            ensure!(reply["type"] == "sent", "{reply}");
        }
    }
    Ok(())
}

/// What a page says, without what differs between two runs (ids, times,
/// cursors, the group's random id).
fn normalized(item: &Value) -> Value {
    let mut item = item.clone();
    let conversation = item["conversation"].as_str().unwrap_or_default();
    if conversation.starts_with("group:") {
        item["conversation"] = json!("group:*");
    }
    if let Some(last) = item.get_mut("last").filter(|l| l.is_object()) {
        if last["conversation"]
            .as_str()
            .is_some_and(|c| c.starts_with("group:"))
        {
            last["conversation"] = json!("group:*");
        }
    }
    for noise in ["id", "ts", "cursor", "read_up_to"] {
        if let Some(object) = item.as_object_mut() {
            object.remove(noise);
        }
        if let Some(last) = item.get_mut("last").and_then(Value::as_object_mut) {
            last.remove(noise);
        }
    }
    item
}

/// Every page of `user`'s `conversations`, normalized.
async fn conversations(client: &mut Client) -> Result<Vec<Value>> {
    let mut items = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let mut request = json!({"type":"conversations","limit":200});
        if let Some(next) = &next {
            request["next"] = json!(next);
        }
        let page = client.request(request).await?;
        let listed = page["items"].as_array().context("no items")?;
        items.extend(listed.iter().map(normalized));
        match page["next"].as_str() {
            Some(token) if page["more"] == true => next = Some(token.to_string()),
            _ => return Ok(items),
        }
    }
}

async fn history(client: &mut Client, conversation: &str) -> Result<Vec<Value>> {
    let page = client
        .request(json!({"type":"history","conversation":conversation,"limit":200}))
        .await?;
    Ok(page["messages"]
        .as_array()
        .context("no messages")?
        .iter()
        .map(normalized)
        .collect())
}

/// Runs the workload on `system` and returns every answer compared.
async fn run(system: &System) -> Result<BTreeMap<String, Vec<Value>>> {
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        senders.push(system.connect(&format!("s{s}"), "d").await?);
    }
    let created = senders[0]
        .request(json!({"type":"group.create","name":"both shards","members":GROUP[1..]}))
        .await?;
    let group = created["group"]["id"].as_str().context("a group")?;
    let group = format!("group:{group}");
    for (s, client) in senders.iter_mut().enumerate() {
        let mut sends: Vec<(Value, String)> = (0..PER_SENDER)
            .map(|i| {
                (
                    json!({"to":recipient(s, i)}),
                    format!("hello {}", recipient(s, i)),
                )
            })
            .collect();
        if s < 2 {
            sends.extend(
                (0..GROUP_MESSAGES / 2)
                    .map(|i| (json!({"conversation":group}), format!("s{s} to all {i}"))),
            );
        }
        send_all(client, sends).await?;
    }
    let messages = (SENDERS * PER_SENDER + GROUP_MESSAGES) as i64;
    wait_until(|| async {
        system
            .count_everywhere("SELECT count(*) FROM messages")
            .await
            .is_ok_and(|n| n == messages)
    })
    .await?;
    // Every counter settled: each recipient has one unread, each group
    // member the group's messages of others.
    let unread = (SENDERS * PER_SENDER) as i64 + (GROUP.len() as i64 - 2) * 10 + 2 * 5;
    wait_until(|| async {
        system
            .count_everywhere("SELECT COALESCE(sum(unread), 0)::bigint FROM user_conversations")
            .await
            .is_ok_and(|n| n == unread)
    })
    .await?;

    let mut answers = BTreeMap::new();
    for (s, client) in senders.iter_mut().enumerate() {
        answers.insert(format!("s{s} conversations"), conversations(client).await?);
    }
    answers.insert(
        "group history".into(),
        history(&mut senders[0], &group).await?,
    );
    for i in SAMPLED {
        let user = format!("r{i}");
        let mut client = system.connect(&user, "d").await?;
        answers.insert(
            format!("{user} conversations"),
            conversations(&mut client).await?,
        );
        let dm = ConversationId::dm(
            UserId::parse(&user)?,
            UserId::parse(format!("s{}", i / PER_SENDER))?,
        )?;
        answers.insert(
            format!("{dm} history"),
            history(&mut client, &dm.to_string()).await?,
        );
    }
    Ok(answers)
}

/// The map the persister wrote into KV.
async fn stored_map(system: &System) -> Result<ShardMap> {
    let js = jetstream::new(system.admin().await?);
    let bucket = js.get_key_value(subjects::SHARDS_BUCKET).await?;
    let map = bucket.get(MAP_KEY).await?.context("no shard map")?;
    Ok(ShardMap::decode(&map)?)
}

/// 2,000 DMs and a group on two shards that are two PostgreSQL servers:
/// each message is stored once, on the shard the map names; each user's
/// rows on theirs; and every `conversations` and `history` answer is the
/// one a single shard gives.
#[tokio::test]
async fn two_thousand_conversations_land_where_the_map_says_and_read_as_one_shard() -> Result<()> {
    let elsewhere = fresh_database_on(PgCluster::second().await?).await?;
    let two = System::start_with(move |config| {
        config.database_urls.truncate(1);
        config.database_urls.push(elsewhere);
    })
    .await?;
    let sharded = run(&two).await?;

    let map = stored_map(&two).await?;
    assert_eq!(map, ShardMap::even(2));
    // What `chatctl shards` shows operators is that map.
    let js = jetstream::new(two.admin().await?);
    assert_eq!(chatctl::shards::map(&js).await?, map);
    assert_eq!(
        chatctl::shards::render(&map),
        "BUCKETS       COUNT SHARD\n0-511           512     0\n512-1023        512     1\n"
    );
    let r0 = UserId::parse("r0")?;
    assert_eq!(
        chatctl::shards::locate(&map, "r0")?,
        format!(
            "user r0: bucket {}, shard {}",
            chat_shared::shards::of_user(&r0),
            map.of_user(&r0)
        )
    );
    let mut seen = HashSet::new();
    for (shard, db) in two.databases().await?.iter().enumerate() {
        let rows = db
            .query("SELECT conversation, id FROM messages", &[])
            .await?;
        ensure!(!rows.is_empty(), "shard {shard} holds no message");
        for row in &rows {
            let conversation: String = row.get(0);
            let parsed = ConversationId::parse(&conversation)?;
            ensure!(
                map.of_conversation(&parsed) == shard,
                "{conversation} on shard {shard}"
            );
            ensure!(
                seen.insert((conversation, row.get::<_, i64>(1))),
                "stored twice"
            );
        }
        for row in &db
            .query("SELECT user_id FROM user_conversations", &[])
            .await?
        {
            let user = UserId::parse(row.get::<_, String>(0))?;
            ensure!(map.of_user(&user) == shard, "{user}'s row on shard {shard}");
        }
        let groups: i64 = db
            .query_one("SELECT count(*) FROM groups", &[])
            .await?
            .get(0);
        let group_here = rows
            .iter()
            .any(|r| r.get::<_, String>(0).starts_with("group:"));
        assert_eq!(
            groups,
            i64::from(group_here),
            "the group's row with its messages"
        );
    }
    assert_eq!(seen.len(), SENDERS * PER_SENDER + GROUP_MESSAGES);
    drop(two);

    let one = System::start_with(|config| config.database_urls.truncate(1)).await?;
    let single = run(&one).await?;
    assert_eq!(stored_map(&one).await?, ShardMap::even(1));
    assert_eq!(
        sharded.keys().collect::<Vec<_>>(),
        single.keys().collect::<Vec<_>>()
    );
    for (what, answer) in &sharded {
        assert_eq!(Some(answer), single.get(what), "{what} differs");
    }
    assert_eq!(sharded["s2 conversations"].len(), PER_SENDER);
    assert_eq!(sharded["r7 conversations"].len(), 2, "a DM and the group");
    Ok(())
}

/// `messages` is split by month of its ids (migration 0015): this month
/// and the next two exist before anything is sent, a message lands in its
/// month (not the default partition), and a month detaches as a table of
/// its own, taking its messages out of history.
#[tokio::test]
async fn messages_land_in_their_month_which_detaches_whole() -> Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "d").await?;
    let sent = alice
        .send_message(json!({"to":"bob"}), "this month", "m1")
        .await?;
    ensure!(sent["type"] == "sent", "{sent}");
    let db = system.database_of("dm:alice:bob").await?;
    wait_until(|| async {
        db.query_one("SELECT count(*) FROM messages", &[])
            .await
            .is_ok_and(|row| row.get::<_, i64>(0) == 1)
    })
    .await?;
    let month: String = db
        .query_one("SELECT tableoid::regclass::text FROM messages", &[])
        .await?
        .get(0);
    let now: String = db
        .query_one("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY_MM')", &[])
        .await?
        .get(0);
    assert_eq!(month, format!("messages_{now}"));
    let ahead: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'messages'::regclass
               AND c.relname IN (
                   'messages_' || to_char(now() AT TIME ZONE 'UTC', 'YYYY_MM'),
                   'messages_' || to_char((now() + interval '1 month') AT TIME ZONE 'UTC', 'YYYY_MM'),
                   'messages_' || to_char((now() + interval '2 months') AT TIME ZONE 'UTC', 'YYYY_MM'))",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(ahead, 3, "this month and the next two exist");
    let history = alice
        .request(json!({"type":"history","conversation":"dm:alice:bob"}))
        .await?;
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(1));

    db.batch_execute(&format!("ALTER TABLE messages DETACH PARTITION {month}"))
        .await?;
    let kept: i64 = db
        .query_one(&format!("SELECT count(*) FROM {month}"), &[])
        .await?
        .get(0);
    assert_eq!(kept, 1, "the detached month keeps its rows");
    let history = alice
        .request(json!({"type":"history","conversation":"dm:alice:bob"}))
        .await?;
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(0));
    Ok(())
}
