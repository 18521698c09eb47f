//! The group membership cache under a flood of lookups (issue 14, item 4):
//! one user sends to many groups, each a key in the edge's, the router's
//! and the presence service's cache; each stays within its bound and counts
//! what it evicted. And the block cache built on it (issue 17, item 3).

use std::net::SocketAddr;

use anyhow::{ensure, Context, Result};
use chat_tests::{scrape, wait_until, System};
use serde_json::json;

const BOUND: usize = 4;
const GROUPS: usize = 12;

#[tokio::test]
async fn a_flood_of_group_lookups_keeps_every_membership_cache_bounded() -> Result<()> {
    let system = System::start_with(|c| {
        c.group_cache.entries = BOUND;
        c.metrics_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let mut groups = Vec::new();
    for i in 0..GROUPS {
        let created = alice
            .request(json!({"type":"group.create","name":format!("g{i}"),"members":["bob"]}))
            .await?;
        let id = created["group"]["id"].as_str().context("a group id")?;
        groups.push(format!("group:{id}"));
    }
    // The edge looks each group up to check alice may send, the router to
    // fan out, presence to pass typing on.
    for (i, group) in groups.iter().enumerate() {
        let sent = alice
            .send_message(json!({"conversation":group}), "hi", &format!("m{i}"))
            .await?;
        ensure!(sent["type"] == "sent", "{sent}");
        alice
            .send(json!({"type":"typing","conversation":group,"active":true}))
            .await?;
    }
    for _ in 0..GROUPS {
        bob.recv_type("message").await?;
    }

    let evicted_at_least = (GROUPS - BOUND) as f64;
    for (service, addr) in [
        ("edge", system.edge_addr),
        ("router", system.metrics_addr("router")?),
        ("presence", system.metrics_addr("presence")?),
    ] {
        let evictions = format!("{service}_group_cache_evictions_total");
        wait_until(|| async {
            scrape(addr)
                .await
                .is_ok_and(|s| s.sum(&evictions, &[("reason", "bound")]) >= evicted_at_least)
        })
        .await
        .with_context(|| format!("{service} never counted {evicted_at_least} evictions"))?;
        let scraped = scrape(addr).await?;
        let entries = scraped.sum(&format!("{service}_group_cache_entries"), &[]);
        assert!(
            (1.0..=BOUND as f64).contains(&entries),
            "{service} caches {entries} groups"
        );
        assert!(scraped.sum(&format!("{service}_group_cache_bytes"), &[]) > 0.0);
    }

    // Evicted is not forgotten: the first group, long pushed out, still works.
    let sent = alice
        .send_message(json!({"conversation":groups[0]}), "again", "again")
        .await?;
    ensure!(sent["type"] == "sent", "{sent}");
    let message = bob
        .recv_matching(|f| f["type"] == "message" && f["text"] == "again")
        .await?;
    assert_eq!(message["conversation"], groups[0]);
    Ok(())
}

/// How many `block_peers` requests the persister has answered.
async fn block_lookups(addr: SocketAddr) -> Result<f64> {
    Ok(scrape(addr)
        .await?
        .sum("persister_rpc_requests_total", &[("method", "block_peers")]))
}

/// Blocks are cached at the edge like membership (issue 17, item 3): a
/// DM's block check asks the persister once per sender, not per send, and
/// a block change drops the cached answer at once.
#[tokio::test]
async fn dm_block_checks_ask_the_persister_once_until_a_block_changes() -> Result<()> {
    let system = System::start_with(|c| {
        c.metrics_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await?;
    let persister = system.metrics_addr("persister")?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    for i in 0..5 {
        let sent = alice
            .send_message(json!({"to":"bob"}), "hi", &format!("m{i}"))
            .await?;
        ensure!(sent["type"] == "sent", "{sent}");
    }
    assert_eq!(block_lookups(persister).await?, 1.0, "one lookup for alice");
    let edge = scrape(system.edge_addr).await?;
    assert_eq!(edge.sum("edge_block_cache_entries", &[]), 1.0);

    let blocked = bob.request(json!({"type":"block","user":"alice"})).await?;
    ensure!(blocked["type"] == "ok", "{blocked}");
    // The change event empties the edge's entry; the next check asks again.
    let deadline = tokio::time::Instant::now() + chat_tests::WAIT;
    for i in 5.. {
        let reply = alice
            .send_message(json!({"to":"bob"}), "hi", &format!("m{i}"))
            .await?;
        if reply["code"] == "forbidden" {
            break;
        }
        ensure!(reply["type"] == "sent", "{reply}");
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the block never took effect"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let asked = block_lookups(persister).await?;
    assert_eq!(asked, 2.0, "one lookup after the change");
    for i in 0..3 {
        let refused = alice
            .send_message(json!({"to":"bob"}), "hi", &format!("r{i}"))
            .await?;
        ensure!(refused["code"] == "forbidden", "{refused}");
    }
    assert_eq!(
        block_lookups(persister).await?,
        asked,
        "refusals are cached too"
    );
    Ok(())
}
