//! PROTOCOL.md "Transport" and "Session": every rule of the handshake.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::kv;
use chat_shared::auth::{self, Claims};
use chat_shared::idgen::{IdError, IdGenerator, MAX_NODE_ID, SEQUENCE_BITS};
use chat_shared::ids::MessageId;
use chat_shared::lease::{LeaseError, NodeLease};
use chat_shared::{streams, subjects};
use chat_tests::{
    config_as, http_get, test_config, wait_until, Client, Ending, NatsServer, System,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_valid_token_gets_welcome_then_synced() -> anyhow::Result<()> {
    let system = System::start().await?;
    let client = system.connect("alice", "phone-1").await?;
    assert_eq!(client.welcome["user"], "alice");
    assert_eq!(client.welcome["device"], "phone-1");
    assert_eq!(client.welcome["heartbeat"], 25);
    assert_eq!(client.welcome["resumed"], true);
    assert!(client.welcome["edge"]
        .as_str()
        .is_some_and(|e| !e.is_empty()));
    assert!(client.synced["cursor"].is_string());
    Ok(())
}

#[tokio::test]
async fn health_and_readiness() -> anyhow::Result<()> {
    let system = System::start().await?;
    assert_eq!(http_get(system.edge_addr, "/healthz").await?.0, 200);
    assert_eq!(http_get(system.edge_addr, "/readyz").await?.0, 200);
    Ok(())
}

#[tokio::test]
async fn no_hello_in_time_closes_4002() -> anyhow::Result<()> {
    let system = System::start_with(|c| c.hello_timeout = Duration::from_secs(1)).await?;
    let mut client = Client::open(&system.ws_url()).await?;
    assert_eq!(client.ending().await?, Ending::Closed(4002));
    Ok(())
}

#[tokio::test]
async fn a_frame_before_hello_is_refused_but_hello_still_works() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut client = Client::open(&system.ws_url()).await?;
    client.send(json!({"type":"ping","ref":"early"})).await?;
    let error = client.recv().await?;
    assert_eq!(error["code"], "bad_request");
    assert_eq!(error["ref"], "early");
    client
        .send(json!({"type":"hello","token":system.token("alice"),"device":"d1"}))
        .await?;
    assert_eq!(client.recv().await?["type"], "welcome");
    Ok(())
}

async fn refused(system: &System, token: &str) -> anyhow::Result<(serde_json::Value, Ending)> {
    let mut client = Client::open(&system.ws_url()).await?;
    client
        .send(json!({"type":"hello","token":token,"device":"d1"}))
        .await?;
    let error = client.recv().await?;
    Ok((error, client.ending().await?))
}

#[tokio::test]
async fn bad_tokens_close_4001() -> anyhow::Result<()> {
    let system = System::start().await?;
    let now = auth::now_secs();
    let sign = |claims: &Claims, secret: &str| {
        auth::sign(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let claims = |sub: &str, exp: u64| Claims {
        sub: sub.into(),
        exp,
        nbf: None,
        iat: None,
        iss: None,
        aud: None,
    };
    let expired = sign(&claims("alice", now - 120), chat_tests::JWT_SECRET);
    let (error, ending) = refused(&system, &expired).await?;
    assert_eq!(error["code"], "token_expired");
    assert_eq!(ending, Ending::Closed(4001));

    for token in [
        sign(&claims("alice", now + 600), "some-other-secret"),
        sign(&claims("al.ice", now + 600), chat_tests::JWT_SECRET),
        "garbage".to_string(),
    ] {
        let (error, ending) = refused(&system, &token).await?;
        assert_eq!(error["code"], "unauthorized", "{token}");
        assert_eq!(ending, Ending::Closed(4001), "{token}");
    }
    Ok(())
}

#[tokio::test]
async fn ping_is_answered_and_ref_echoed() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut client = system.connect("alice", "d1").await?;
    client.send(json!({"type":"ping","ref":"p1"})).await?;
    let pong = client.recv().await?;
    assert_eq!(pong, json!({"type":"pong","ref":"p1"}));
    client.send(json!({"type":"ping"})).await?;
    assert_eq!(client.recv().await?, json!({"type":"pong"}));
    Ok(())
}

#[tokio::test]
async fn silence_closes_4003_but_pings_keep_it_open() -> anyhow::Result<()> {
    let system = System::start_with(|c| {
        c.heartbeat = Duration::from_secs(1);
        c.heartbeat_grace = Duration::from_secs(1);
    })
    .await?;
    // Idle timeout is 2 x 1 s + 1 s. WebSocket pings every 500 ms keep a
    // connection alive past it...
    let mut alive = system.connect("alice", "d1").await?;
    for _ in 0..8 {
        alive.send_raw(Message::Ping(vec![1].into())).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    alive.send(json!({"type":"ping","ref":"still"})).await?;
    assert_eq!(alive.recv().await?["ref"], "still");
    // ...while a silent one is closed.
    let mut silent = system.connect("bob", "d1").await?;
    assert_eq!(silent.ending().await?, Ending::Closed(4003));
    Ok(())
}

#[tokio::test]
async fn a_frame_over_one_mebibyte_closes_1009() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut client = system.connect("alice", "d1").await?;
    let text = "x".repeat(1024 * 1024 + 1);
    client.send(json!({"type":"ping","pad":text})).await?;
    assert_eq!(client.ending().await?, Ending::Closed(1009));
    Ok(())
}

#[tokio::test]
async fn bad_frames_answer_bad_request_and_keep_the_connection() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut client = system.connect("alice", "d1").await?;
    client
        .send_raw(Message::Binary(vec![1, 2, 3].into()))
        .await?;
    assert_eq!(client.recv().await?["code"], "bad_request");
    client.send_raw(Message::Text("{not json".into())).await?;
    assert_eq!(client.recv().await?["code"], "bad_request");
    client.send(json!({"type":"teleport","ref":"t1"})).await?;
    let unknown = client.recv().await?;
    assert_eq!(
        (unknown["code"].as_str(), unknown["ref"].as_str()),
        (Some("bad_request"), Some("t1"))
    );
    client.send(json!({"type":"history","ref":"h1"})).await?;
    let missing = client.recv().await?;
    assert_eq!(
        (missing["code"].as_str(), missing["ref"].as_str()),
        (Some("bad_request"), Some("h1"))
    );
    client
        .send(json!({"type":"send","ref":"s1","to":"b.b","text":"x","client_msg_id":"c"}))
        .await?;
    assert_eq!(client.recv().await?["code"], "bad_request");
    // Still open and working.
    client.send(json!({"type":"ping","ref":"after"})).await?;
    assert_eq!(client.recv().await?, json!({"type":"pong","ref":"after"}));
    Ok(())
}

#[tokio::test]
async fn readiness_follows_the_nats_connection() -> anyhow::Result<()> {
    let mut system = System::start().await?;
    let edge = system.edge_addr;
    assert_eq!(http_get(edge, "/readyz").await?.0, 200);
    system.nats.kill().await?;
    let readyz = || async move { http_get(edge, "/readyz").await.ok() };
    wait_until(|| async { readyz().await.is_some_and(|(status, _)| status == 503) }).await?;
    assert_eq!(
        readyz().await,
        Some((503, "nats disconnected".to_string())),
        "not ready while NATS is down"
    );
    // Alive, though: a liveness probe must not restart an edge for an outage
    // it will ride out.
    assert_eq!(http_get(edge, "/healthz").await?.0, 200);
    system.nats.restart().await?;
    wait_until(|| async { readyz().await.is_some_and(|(status, _)| status == 200) }).await?;
    Ok(())
}

/// Node-id leases (`shared/src/lease.rs`) against a real nats-server: the
/// `chat_nodes` bucket as the services provision it, leased with the edge's
/// NATS user as the edge does.
struct Leases {
    nats: NatsServer,
    /// The edge's view of the bucket.
    store: kv::Store,
    /// The admin's view, for what another process would do.
    admin: kv::Store,
    ttl: Duration,
}

impl Leases {
    /// `request_timeout` bounds each KV request (the services use 2 s).
    async fn start(ttl: Duration, request_timeout: Duration) -> anyhow::Result<Self> {
        let nats = NatsServer::start().await?;
        let mut config = test_config(nats.url(), String::new());
        config.node_lease_ttl = ttl;
        config.request_timeout = request_timeout;
        let admin = chat_shared::nats::connect(&config_as(&config, "admin"), "lease-admin").await?;
        let admin = chat_shared::nats::jetstream(admin, &config);
        streams::apply(&admin, &config).await?;
        let edge = chat_shared::nats::connect(&config_as(&config, "edge"), "lease-edge").await?;
        let edge = chat_shared::nats::jetstream(edge, &config);
        Ok(Self {
            store: edge.get_key_value(subjects::NODES_BUCKET).await?,
            admin: admin.get_key_value(subjects::NODES_BUCKET).await?,
            nats,
            ttl,
        })
    }

    fn leaser(&self, holder: &str) -> NodeLease {
        NodeLease::new(self.store.clone(), holder, self.ttl)
    }

    /// Who holds `node` per the bucket.
    async fn holder(&self, node: u16) -> anyhow::Result<Option<String>> {
        Ok(self
            .admin
            .get(node.to_string())
            .await?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
}

/// The node id encoded in a message id.
fn node_of(id: MessageId) -> u16 {
    ((id.0 >> SEQUENCE_BITS) & u64::from(MAX_NODE_ID)) as u16
}

/// What `ids` issues now: its node id, or `None` when it refuses.
fn issuing(ids: &IdGenerator) -> Option<u16> {
    match ids.next_id() {
        Ok(id) => Some(node_of(id)),
        Err(IdError::NoLease) => None,
        Err(e) => panic!("unexpected id error: {e}"),
    }
}

#[tokio::test]
async fn concurrent_node_leases_are_distinct_and_a_released_one_is_reused() -> anyhow::Result<()> {
    // A thousand creates queue up at once: on a busy machine one may wait
    // longer than the services' 2 s, which is not what this test is about.
    let leases = Leases::start(Duration::from_secs(60), Duration::from_secs(30)).await?;
    let all = usize::from(MAX_NODE_ID) + 1;
    // Every node id at once, all racing for the same keys.
    let racers: Vec<_> = (0..all)
        .map(|i| {
            let lease = leases.leaser(&format!("p{i}"));
            tokio::spawn(async move {
                let (node, revision) = lease.acquire().await?;
                anyhow::Ok((lease, node, revision))
            })
        })
        .collect();
    let mut held = Vec::with_capacity(all);
    for racer in racers {
        held.push(racer.await??);
    }
    let nodes: HashSet<u16> = held.iter().map(|(_, node, _)| *node).collect();
    assert_eq!(nodes.len(), all, "two leasers got the same node id");
    // Each one's generator issues ids with its own node id.
    for (lease, node, _) in held.iter().step_by(97) {
        assert_eq!(issuing(&IdGenerator::new(lease.slot())), Some(*node));
    }
    for (i, (_, node, _)) in held.iter().enumerate().step_by(97) {
        assert_eq!(leases.holder(*node).await?, Some(format!("p{i}")));
    }

    // None left.
    let late = leases.leaser("late");
    assert!(
        matches!(late.acquire().await, Err(LeaseError::Exhausted(n)) if n as usize == all),
        "a 1025th leaser got a node id"
    );
    assert_eq!(issuing(&IdGenerator::new(late.slot())), None);

    // One is released (as at shutdown): the latecomer gets exactly that id.
    let (lease, node, revision) = held.swap_remove(0);
    let slot = lease.slot();
    let (stop, stopped) = watch::channel(false);
    let keeping = tokio::spawn(lease.keep(node, revision, stopped));
    stop.send_replace(true);
    keeping.await?;
    assert_eq!(
        issuing(&IdGenerator::new(slot)),
        None,
        "released, still issuing"
    );
    assert_eq!(leases.holder(node).await?, None);
    assert_eq!(late.acquire().await?.0, node);
    assert_eq!(issuing(&IdGenerator::new(late.slot())), Some(node));
    assert_eq!(leases.holder(node).await?, Some("late".to_string()));
    Ok(())
}

#[tokio::test]
async fn a_lost_node_lease_stops_its_ids_and_another_id_is_leased() -> anyhow::Result<()> {
    let leases = Leases::start(Duration::from_secs(6), Duration::from_secs(2)).await?;
    let lease = leases.leaser("edge-a");
    let (node, revision) = lease.acquire().await?;
    let ids = IdGenerator::new(lease.slot());
    assert_eq!(issuing(&ids), Some(node));
    let (stop, stopped) = watch::channel(false);
    let keeping = tokio::spawn(lease.keep(node, revision, stopped));

    // Someone else now holds the key (the lease ran out while this process
    // was paused, and another took it).
    // It refreshes the key as a holder does, by revision, so the key stays
    // until somebody else writes or deletes it.
    let taken = leases.admin.put(node.to_string(), "edge-b".into()).await?;
    let taker = {
        let admin = leases.admin.clone();
        tokio::spawn(async move {
            let mut revision = taken;
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                match admin
                    .update(node.to_string(), "edge-b".into(), revision)
                    .await
                {
                    Ok(next) => revision = next,
                    Err(_) => return,
                }
            }
        })
    };
    // The next refresh notices; the generator never issues `node` again and
    // moves to a free id.
    wait_until(|| async { issuing(&ids).is_some_and(|n| n != node) }).await?;
    let moved = issuing(&ids).context("a new lease")?;
    for _ in 0..20 {
        assert_ne!(issuing(&ids), Some(node), "issuing a lost node id");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It never wrote over the key it lost.
    assert_eq!(leases.holder(node).await?, Some("edge-b".to_string()));
    assert_eq!(leases.holder(moved).await?, Some("edge-a".to_string()));

    // Stopping releases the new one, not the one taken over.
    stop.send_replace(true);
    keeping.await?;
    assert_eq!(issuing(&ids), None);
    assert_eq!(leases.holder(moved).await?, None);
    assert_eq!(leases.holder(node).await?, Some("edge-b".to_string()));
    taker.abort();
    Ok(())
}

#[tokio::test]
async fn an_unrefreshed_node_lease_stops_ids_before_it_expires() -> anyhow::Result<()> {
    let ttl = Duration::from_secs(3);
    let mut leases = Leases::start(ttl, Duration::from_secs(2)).await?;
    let lease = leases.leaser("edge-a");
    let (node, revision) = lease.acquire().await?;
    let ids = IdGenerator::new(lease.slot());
    let (stop, stopped) = watch::channel(false);
    let keeping = tokio::spawn(lease.keep(node, revision, stopped));
    assert_eq!(issuing(&ids), Some(node));

    // No refresh can reach the bucket now. The last one was sent before
    // this instant, so the lease counts as ours for at most 60 % of the TTL
    // from here: ids stop before the key can expire for anybody else.
    leases.nats.kill().await?;
    tokio::time::sleep(ttl.mul_f64(0.6) + Duration::from_millis(200)).await;
    assert_eq!(
        issuing(&ids),
        None,
        "issuing ids on a lease it cannot refresh"
    );

    // Back: the lease is refreshed (or, if the key expired meanwhile, a
    // fresh one is taken) and ids flow again.
    leases.nats.restart().await?;
    wait_until(|| async { issuing(&ids).is_some() }).await?;
    let now = issuing(&ids).context("a lease")?;
    assert_eq!(leases.holder(now).await?, Some("edge-a".to_string()));
    stop.send_replace(true);
    keeping.await?;
    Ok(())
}
