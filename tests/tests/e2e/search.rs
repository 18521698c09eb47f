//! v1.1 search and profiles: words in any language, only from the
//! caller's conversations, never deleted or hidden text; pages; profiles.

use std::time::Duration;

use anyhow::{anyhow, ensure};
use chat_tests::{Client, System};
use serde_json::{json, Value};

fn string(value: &Value, field: &str) -> anyhow::Result<String> {
    value[field]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no {field} in {value}"))
}

async fn search(client: &mut Client, frame: Value) -> anyhow::Result<Value> {
    let mut frame = frame;
    frame["type"] = json!("search");
    let page = client.request(frame.clone()).await?;
    ensure!(page["type"] == "search", "{frame} answered {page}");
    Ok(page)
}

fn texts(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|m| m["text"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The search page once it holds `count` items: the history store follows
/// MESSAGES a moment behind delivery.
async fn search_when(client: &mut Client, query: &str, count: usize) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + chat_tests::WAIT;
    loop {
        let page = search(client, json!({"query":query})).await?;
        if texts(&page).len() == count {
            return Ok(page);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "search {query} never found {count}: {page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sent_id(
    client: &mut Client,
    target: Value,
    text: &str,
    id: &str,
) -> anyhow::Result<String> {
    let sent = client.send_message(target, text, id).await?;
    ensure!(sent["type"] == "sent", "send {text}: {sent}");
    string(&sent, "id")
}

async fn refused(client: &mut Client, frame: Value, code: &str) -> anyhow::Result<()> {
    let reply = client.request(frame.clone()).await?;
    ensure!(
        reply["type"] == "error" && reply["code"] == code,
        "{frame} answered {reply}, not {code}"
    );
    Ok(())
}

async fn ok(client: &mut Client, frame: Value) -> anyhow::Result<()> {
    let reply = client.request(frame.clone()).await?;
    ensure!(reply["type"] == "ok", "{frame} answered {reply}");
    Ok(())
}

/// The acceptance test of issue 19's search: a Russian word, an English
/// word and a Japanese substring are found; another conversation's message,
/// a message deleted for everyone and one the caller hid are not, nor a
/// group's once the caller is removed from it.
#[tokio::test]
async fn search_finds_words_in_any_language_only_where_the_caller_may_read() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let mut carol = system.connect("carol", "phone").await?;
    let to_bob = json!({"to":"bob"});
    sent_id(
        &mut alice,
        to_bob.clone(),
        "Встретимся завтра у метро",
        "c1",
    )
    .await?;
    sent_id(
        &mut alice,
        to_bob.clone(),
        "The quarterly report is ready",
        "c2",
    )
    .await?;
    sent_id(
        &mut alice,
        to_bob.clone(),
        "明日は東京で会議があります",
        "c3",
    )
    .await?;
    let erased = sent_id(&mut alice, to_bob.clone(), "pineapple for everyone", "c4").await?;
    let hidden = sent_id(
        &mut bob,
        json!({"to":"alice"}),
        "pineapple hidden by alice",
        "c5",
    )
    .await?;
    // Carol's DM with bob is not alice's to search.
    sent_id(
        &mut carol,
        to_bob.clone(),
        "the quarterly numbers from carol",
        "c6",
    )
    .await?;
    let dm = "dm:alice:bob";
    ok(
        &mut alice,
        json!({"type":"delete","conversation":dm,"id":erased,"for":"everyone"}),
    )
    .await?;
    ok(
        &mut alice,
        json!({"type":"delete","conversation":dm,"id":hidden,"for":"me"}),
    )
    .await?;

    // Words in any case the `simple` configuration folds; whole words, not
    // English stems.
    let page = search_when(&mut alice, "завтра", 1).await?;
    assert_eq!(texts(&page), ["Встретимся завтра у метро"]);
    ensure!(page["more"] == false, "{page}");
    let item = &page["items"][0];
    ensure!(
        item["conversation"] == dm && item["from"] == "alice" && item["id"].is_string(),
        "a search item is a history item: {item}"
    );
    // Bob (in both DMs) finds both; so both are stored when alice, who is
    // in one, finds one.
    search_when(&mut bob, "quarterly", 2).await?;
    search_when(&mut carol, "quarterly", 1).await?;
    let page = search(&mut alice, json!({"query":"QUARTERLY"})).await?;
    assert_eq!(texts(&page), ["The quarterly report is ready"]);
    // A substring of text without spaces.
    let page = search_when(&mut alice, "東京で会議", 1).await?;
    assert_eq!(texts(&page), ["明日は東京で会議があります"]);
    // Both pineapples were stored before the deletes were answered. Bob did
    // not hide his message: he finds it once the erased one is gone; alice
    // finds neither once her hiding is stored.
    let page = search_when(&mut bob, "pineapple", 1).await?;
    assert_eq!(texts(&page), ["pineapple hidden by alice"]);
    search_when(&mut alice, "pineapple", 0).await?;
    let page = search(&mut alice, json!({"query":"everyone"})).await?;
    ensure!(texts(&page).is_empty(), "the erased text was found: {page}");
    // `conversation` narrows; another's conversation yields nothing.
    let page = search(
        &mut bob,
        json!({"query":"quarterly","conversation":"dm:bob:carol"}),
    )
    .await?;
    assert_eq!(texts(&page), ["the quarterly numbers from carol"]);
    let page = search(
        &mut alice,
        json!({"query":"quarterly","conversation":"dm:bob:carol"}),
    )
    .await?;
    ensure!(texts(&page).is_empty(), "alice searched carol's DM: {page}");

    // Membership is checked when the search runs.
    let group = alice
        .request(json!({"type":"group.create","name":"g","members":["bob"]}))
        .await?;
    let group_id = string(&group["group"], "id")?;
    let conversation = format!("group:{group_id}");
    sent_id(
        &mut alice,
        json!({"conversation":conversation}),
        "zebra crossing",
        "c7",
    )
    .await?;
    search_when(&mut bob, "zebra", 1).await?;
    let removed = alice
        .request(json!({"type":"group.remove","group":group_id,"users":["bob"]}))
        .await?;
    ensure!(removed["type"] == "group", "{removed}");
    let page = search(&mut bob, json!({"query":"zebra"})).await?;
    ensure!(texts(&page).is_empty(), "a removed member found {page}");
    search_when(&mut alice, "zebra", 1).await?;
    Ok(())
}

#[tokio::test]
async fn search_pages_with_before_and_limit_and_refuses_bad_input() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut ids = Vec::new();
    for i in 0..5 {
        let text = format!("needle number {i}");
        ids.push(sent_id(&mut alice, json!({"to":"bob"}), &text, &format!("c{i}")).await?);
    }
    search_when(&mut alice, "needle", 5).await?;
    let first = search(&mut alice, json!({"query":"needle","limit":2})).await?;
    assert_eq!(texts(&first), ["needle number 4", "needle number 3"]);
    ensure!(first["more"] == true, "{first}");
    let second = search(
        &mut alice,
        json!({"query":"needle","limit":2,"before":ids[3]}),
    )
    .await?;
    assert_eq!(texts(&second), ["needle number 2", "needle number 1"]);
    ensure!(second["more"] == true, "{second}");
    let last = search(
        &mut alice,
        json!({"query":"needle","limit":2,"before":ids[1]}),
    )
    .await?;
    assert_eq!(texts(&last), ["needle number 0"]);
    ensure!(last["more"] == false, "{last}");

    for bad in [
        json!({"type":"search","query":""}),
        json!({"type":"search","query":"   "}),
        json!({"type":"search","query":"x".repeat(201)}),
        json!({"type":"search","query":"needle","limit":0}),
        json!({"type":"search","query":"needle","limit":101}),
        json!({"type":"search"}),
    ] {
        refused(&mut alice, bad, "bad_request").await?;
    }
    // 200 characters (not bytes) is a query.
    let long = search(&mut alice, json!({"query":"я".repeat(200),"limit":100})).await?;
    ensure!(texts(&long).is_empty(), "{long}");
    Ok(())
}

#[tokio::test]
async fn profiles_round_trip_and_bad_names_are_refused() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    ok(
        &mut alice,
        json!({"type":"profile.set","name":"Алиса 🌸","avatar":null}),
    )
    .await?;
    // An avatar is an image its user uploaded.
    let avatar =
        crate::media::uploaded(&system, "bob", "image/png", &crate::media::png(8, 8)).await?;
    let document = crate::media::uploaded(&system, "alice", "text/plain", b"not a picture").await?;
    ok(
        &mut bob,
        json!({"type":"profile.set","name":"Bob","avatar":avatar}),
    )
    .await?;
    let reply = bob
        .request(json!({"type":"profiles","users":["alice","bob","carol"]}))
        .await?;
    ensure!(reply["type"] == "profiles", "{reply}");
    assert_eq!(
        reply["items"],
        json!([
            {"user":"alice","name":"Алиса 🌸","avatar":null},
            {"user":"bob","name":"Bob","avatar":avatar},
        ]),
        "carol set no profile and is left out"
    );
    // A second set replaces the first.
    ok(&mut alice, json!({"type":"profile.set","name":"Alice"})).await?;
    let reply = bob
        .request(json!({"type":"profiles","users":["alice"]}))
        .await?;
    assert_eq!(
        reply["items"],
        json!([{"user":"alice","name":"Alice","avatar":null}])
    );

    for bad in [
        json!({"type":"profile.set","name":""}),
        json!({"type":"profile.set","name":"  "}),
        json!({"type":"profile.set","name":"n".repeat(65)}),
        json!({"type":"profile.set","name":"a\u{7}b"}),
        json!({"type":"profile.set","name":"ok","avatar":"../etc/passwd"}),
        json!({"type":"profile.set","name":"ok","avatar":""}),
        json!({"type":"profile.set","name":"ok","avatar":"m_01HZX-abc"}),
        // Bob's picture is not her upload; her text is no picture.
        json!({"type":"profile.set","name":"ok","avatar":avatar}),
        json!({"type":"profile.set","name":"ok","avatar":document}),
        json!({"type":"profile.set"}),
    ] {
        refused(&mut alice, bad, "bad_request").await?;
    }
    let users: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
    refused(
        &mut alice,
        json!({"type":"profiles","users":users}),
        "bad_request",
    )
    .await?;
    // Nothing refused was stored.
    let reply = bob
        .request(json!({"type":"profiles","users":["alice"]}))
        .await?;
    assert_eq!(reply["items"][0]["name"], "Alice");
    Ok(())
}
