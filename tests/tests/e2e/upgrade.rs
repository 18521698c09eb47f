//! A database written by the single-server schema (migrations 1 to 13)
//! upgrades in place to the shard-ready one (14: counters, seq, message
//! keys within the conversation; 15: monthly partitions) when the
//! persister starts on it, and reads back as it was written: unread
//! counts, previews, hidden messages, attachments, search, and the last
//! net for idempotent sends.

use anyhow::{ensure, Context, Result};
use chat_shared::idgen::{first_id_at, timestamp_ms};
use chat_shared::ids::MessageId;
use chat_tests::{connect_database, fresh_database, System};
use serde_json::{json, Value};

/// The migrations the single-server schema had, in the order every such
/// database applied them.
const BEFORE: [(i32, &str); 11] = [
    (
        1,
        include_str!("../../../persister/migrations/0001_init.sql"),
    ),
    (
        2,
        include_str!("../../../persister/migrations/0002_outbox_order.sql"),
    ),
    (
        3,
        include_str!("../../../persister/migrations/0003_push_tokens.sql"),
    ),
    (
        4,
        include_str!("../../../persister/migrations/0004_friendships.sql"),
    ),
    (
        5,
        include_str!("../../../persister/migrations/0005_message_changes.sql"),
    ),
    (
        6,
        include_str!("../../../persister/migrations/0006_receipts.sql"),
    ),
    (
        7,
        include_str!("../../../persister/migrations/0007_privacy.sql"),
    ),
    (
        8,
        include_str!("../../../persister/migrations/0008_search_profiles.sql"),
    ),
    (
        9,
        include_str!("../../../persister/migrations/0009_media.sql"),
    ),
    (
        11,
        include_str!("../../../persister/migrations/0011_search_any_script.sql"),
    ),
    (
        13,
        include_str!("../../../persister/migrations/0013_public_avatars.sql"),
    ),
];

/// A message id `minutes_ago` minutes old (the generator's layout).
fn id_at(minutes_ago: u64, sequence: u64) -> i64 {
    let ms = chat_shared::clock::now_ms() - minutes_ago * 60_000;
    (first_id_at(ms).get() | sequence) as i64
}

fn ms_of(id: i64) -> i64 {
    timestamp_ms(MessageId(id as u64)) as i64
}

/// The old schema with a DM and a group written into it, as the old
/// persister wrote them; returns the database's URL and the ids.
async fn old_database() -> Result<(String, Ids)> {
    let url = fresh_database().await?;
    let db = connect_database(&url).await?;
    db.batch_execute(
        "CREATE TABLE schema_migrations (version INT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await?;
    for (version, sql) in BEFORE {
        db.batch_execute(sql).await?;
        db.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&version],
        )
        .await?;
    }
    let ids = Ids {
        read: id_at(180, 1),
        hidden: id_at(120, 2),
        photo: id_at(60, 3),
        mine: id_at(50, 4),
        group_before: id_at(120, 5),
        group_after: id_at(30, 6),
    };
    let media = "ab".repeat(32);
    let photo = json!([{"media":media,"size":3,"sha256":media,"content_type":"image/png",
                        "width":1,"height":1}])
    .to_string();
    let dm = "dm:alice:bob";
    let messages: [(&str, i64, &str, &str, &str, &str); 6] = [
        (dm, ids.read, "bob", "b1", "first, read", "[]"),
        (
            dm,
            ids.hidden,
            "bob",
            "b2",
            "a needle in the old haystack",
            "[]",
        ),
        (dm, ids.photo, "bob", "b3", "", &photo),
        (dm, ids.mine, "alice", "a1", "mine", "[]"),
        (
            "group:g1",
            ids.group_before,
            "bob",
            "g1",
            "before carol",
            "[]",
        ),
        (
            "group:g1",
            ids.group_after,
            "alice",
            "a2",
            "after carol",
            "[]",
        ),
    ];
    for (conversation, id, sender, client_msg_id, body, attachments) in messages {
        db.execute(
            "INSERT INTO messages (conversation, id, sender, body, ts, client_msg_id, attachments)
             VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb)",
            &[
                &conversation,
                &id,
                &sender,
                &body,
                &ms_of(id),
                &client_msg_id,
                &attachments,
            ],
        )
        .await?;
    }
    let at = |minutes_ago: u64| (chat_shared::clock::now_ms() - minutes_ago * 60_000) as i64;
    db.batch_execute(&format!(
        "INSERT INTO conversations (conversation, last_id, activity) VALUES
             ('{dm}', {mine}, {mine}), ('group:g1', {after}, {after});
         INSERT INTO dm_members (user_id, conversation) VALUES ('alice', '{dm}'), ('bob', '{dm}');
         INSERT INTO groups (id, name, owner, created_at) VALUES ('g1', 'Old friends', 'alice', {five});
         INSERT INTO group_members (group_id, user_id, joined_at) VALUES
             ('g1', 'alice', {five}), ('g1', 'bob', {five}), ('g1', 'carol', {ninety});
         INSERT INTO read_state (user_id, conversation, read_up_to) VALUES ('alice', '{dm}', {read});
         INSERT INTO hidden_messages (user_id, conversation, id) VALUES ('alice', '{dm}', {hidden});
         INSERT INTO media (media, size, content_type, width, height, created_at)
             VALUES ('{media}', 3, 'image/png', 1, 1, {five});
         INSERT INTO media_uploaders (media, user_id, uploaded_at) VALUES ('{media}', 'bob', {five});
         INSERT INTO message_attachments (conversation, message_id, position, media)
             VALUES ('{dm}', {photo}, 0, '{media}');",
        mine = ids.mine,
        after = ids.group_after,
        read = ids.read,
        hidden = ids.hidden,
        photo = ids.photo,
        five = at(300),
        ninety = at(90),
    ))
    .await?;
    Ok((url, ids))
}

struct Ids {
    read: i64,
    hidden: i64,
    photo: i64,
    mine: i64,
    group_before: i64,
    group_after: i64,
}

/// `user`'s conversations as (conversation, unread, last id).
async fn listed(client: &mut chat_tests::Client) -> Result<Vec<(String, u64, String)>> {
    let page = client.request(json!({"type":"conversations"})).await?;
    let items = page["items"].as_array().context("items")?;
    Ok(items
        .iter()
        .map(|item| {
            (
                item["conversation"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                item["unread"].as_u64().unwrap_or(u64::MAX),
                item["last"]["id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

async fn history(client: &mut chat_tests::Client, conversation: &str) -> Result<Vec<Value>> {
    let page = client
        .request(json!({"type":"history","conversation":conversation,"limit":50}))
        .await?;
    page["messages"].as_array().cloned().context("messages")
}

fn ids_of(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn a_single_server_database_upgrades_in_place_and_reads_as_written() -> Result<()> {
    let (url, ids) = old_database().await?;
    let system = System::start_with(|config| config.database_urls = vec![url.clone()]).await?;
    let (dm, group) = ("dm:alice:bob", "group:g1");
    let s = |id: i64| id.to_string();

    // Counters from the rows: alice read the DM's first message and hid
    // its second; carol joined after the group's first message.
    let mut alice = system.connect("alice", "d").await?;
    assert_eq!(
        listed(&mut alice).await?,
        [
            (group.to_string(), 1, s(ids.group_after)),
            (dm.to_string(), 1, s(ids.mine)),
        ]
    );
    let mut bob = system.connect("bob", "d").await?;
    assert_eq!(
        listed(&mut bob).await?,
        [
            (group.to_string(), 1, s(ids.group_after)),
            (dm.to_string(), 1, s(ids.mine)),
        ]
    );
    let mut carol = system.connect("carol", "d").await?;
    assert_eq!(
        listed(&mut carol).await?,
        [(group.to_string(), 1, s(ids.group_after))]
    );

    // History: alice's hidden message stays hidden from her only, the
    // photo keeps its attachment.
    let theirs = history(&mut bob, dm).await?;
    assert_eq!(
        ids_of(&theirs),
        [s(ids.mine), s(ids.photo), s(ids.hidden), s(ids.read)]
    );
    let photo = &theirs[1]["attachments"][0];
    ensure!(
        photo["content_type"] == "image/png" && photo["width"] == 1,
        "{photo}"
    );
    let hers = history(&mut alice, dm).await?;
    assert_eq!(ids_of(&hers), [s(ids.mine), s(ids.photo), s(ids.read)]);
    assert_eq!(
        ids_of(&history(&mut carol, group).await?),
        [s(ids.group_after), s(ids.group_before)]
    );

    // Search reads the carried-over index; hidden is hidden.
    let found = bob
        .request(json!({"type":"search","query":"needle"}))
        .await?;
    assert_eq!(
        ids_of(found["items"].as_array().context("items")?),
        [s(ids.hidden)]
    );
    let found = alice
        .request(json!({"type":"search","query":"needle"}))
        .await?;
    assert_eq!(found["items"], json!([]), "{found}");

    // A send stored before the upgrade, sent again with its client_msg_id
    // (the edge's claims and the stream's window are new, so only
    // `message_keys` knows it), is not stored twice; a new one is, and
    // counts.
    let again = bob
        .send_message(json!({"to":"alice"}), "first, read", "b1")
        .await?;
    ensure!(again["type"] == "sent", "{again}");
    let new = bob.send_message(json!({"to":"alice"}), "new", "b9").await?;
    let new = new["id"].as_str().context("id")?.to_string();
    let deadline = tokio::time::Instant::now() + chat_tests::WAIT;
    loop {
        let listed = listed(&mut alice).await?;
        if listed
            .iter()
            .any(|(c, unread, last)| c == dm && *unread == 2 && *last == new)
        {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the new message never counted: {listed:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let theirs = history(&mut bob, dm).await?;
    let b1 = theirs.iter().filter(|m| m["client_msg_id"] == "b1").count();
    assert_eq!(b1, 1, "{theirs:?}");
    assert_eq!(theirs.len(), 5, "{theirs:?}");

    // Every row moved into the month partitions; the old tables are gone.
    let db = connect_database(&url).await?;
    let months: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'messages'::regclass",
            &[],
        )
        .await?
        .get(0);
    ensure!(months >= 3, "{months} partitions");
    let gone: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_tables
             WHERE tablename IN ('dm_members', 'messages_unpartitioned')",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(gone, 0);
    Ok(())
}
