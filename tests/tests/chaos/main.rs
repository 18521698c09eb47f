//! The fault suite: each scenario runs the chaos workload (tests/src/chaos.rs)
//! against a deployment with every service in its own process while faults
//! hit it, then checks that nothing acked was lost, duplicated or reordered
//! and that PostgreSQL holds every acked message exactly once.
//!
//! The short scenarios run in `./scripts/test`; the long ones (the 3-node
//! cluster, 30 s outages) are `#[ignore]`d and run by `scripts/chaos`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use chat_shared::ids::{ConversationId, UserId};
use chat_shared::partitions::Partitions;
use chat_shared::subjects;
use chat_tests::chaos::{self, Deployment, Nats, Workload};
use chat_tests::servers::NatsCluster;
use chat_tests::{NatsServer, Service};
use serde_json::json;

const BINARY: &str = env!("CARGO_BIN_EXE_service-under-test");

async fn single_node() -> Result<Deployment> {
    Deployment::start(BINARY, Nats::Single(NatsServer::start().await?)).await
}

fn workload(seconds: u64) -> Workload {
    Workload {
        duration: Duration::from_secs(seconds),
        ..Workload::default()
    }
}

async fn pause(seconds: f64) {
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
}

/// SIGTERM of each service in turn under load, as a deployment stops it:
/// each exits (code 0) within its bound, having finished or handed back
/// what it held and flushed NATS, and its successor carries on: nothing
/// lost, duplicated or reordered, and PostgreSQL holds every acked message.
/// A backend service's bound is its shutdown grace plus the hand-back of
/// its pull buffer and the final flush (each bounded by the request
/// timeout); an edge's is its drain timeout plus the same.
#[tokio::test]
async fn stop_each_service_mid_load() -> Result<()> {
    let mut deployment = single_node().await?;
    let config = &deployment.config;
    let backend_bound = config.shutdown_grace + config.request_timeout * 2;
    let edge_bound = config.drain_timeout + config.request_timeout * 2;
    let outcome = chaos::scenario_outcome("stop-each", &mut deployment, &workload(30), |d| {
        Box::pin(async move {
            for service in [
                Service::Router,
                Service::Persister,
                Service::Presence,
                Service::Pushd,
            ] {
                pause(2.0).await;
                d.mark(&format!("{} stopping", service.name()));
                let code = d.stop(service, backend_bound).await?;
                d.mark(&format!("{} stopped", service.name()));
                ensure!(code == Some(0), "{} exited with {code:?}", service.name());
                pause(1.0).await;
                d.restart(service).await?;
            }
            pause(2.0).await;
            d.mark("edge stopping");
            let code = d.stop_edge(0, edge_bound).await?;
            d.mark("edge stopped");
            ensure!(code == Some(0), "the edge exited with {code:?}");
            Ok(())
        })
    })
    .await?;
    outcome.report.assert_clean()?;
    for service in [
        Service::Router,
        Service::Persister,
        Service::Presence,
        Service::Pushd,
    ] {
        assert!(deployment.running(service), "{} is down", service.name());
    }
    assert!(deployment.edges_running());
    Ok(())
}

/// kill -9 of an edge, twice: its clients reconnect elsewhere with their
/// cursors; sends in flight are retried with the same client_msg_id.
#[tokio::test]
async fn kill_edges() -> Result<()> {
    let mut deployment = single_node().await?;
    let report = chaos::scenario("kill-edges", &mut deployment, &workload(12), |d| {
        Box::pin(async move {
            pause(3.0).await;
            d.kill_edge(0).await?;
            pause(4.0).await;
            // The other original edge (index 0 now), which still holds
            // the devices that were never moved.
            d.kill_edge(0).await
        })
    })
    .await?;
    report.assert_clean()?;
    assert!(
        report.reconnects > 0,
        "the kills moved no client: {report:?}"
    );
    Ok(())
}

async fn chaos_rows(d: &Deployment) -> Result<i64> {
    let rows = d
        .rows_everywhere("SELECT count(*) FROM messages WHERE sender LIKE 'chaos-%'")
        .await?;
    Ok(rows.iter().map(|row| row.get::<_, i64>(0)).sum())
}

/// kill -9 of the router and of the persister while messages flow, each
/// restarted after a second. The kills must show: what was sent while the
/// router was down reaches devices only after its restart, and nothing
/// reaches PostgreSQL while the persister is down.
#[tokio::test]
async fn kill_router_and_persister() -> Result<()> {
    let mut deployment = single_node().await?;
    let outcome = chaos::scenario_outcome(
        "kill-router-persister",
        &mut deployment,
        &workload(12),
        |d| {
            Box::pin(async move {
                pause(2.0).await;
                let router = d.pid(Service::Router);
                d.kill(Service::Router).await?;
                d.mark("router killed");
                pause(1.0).await;
                d.mark("router restarting");
                d.restart(Service::Router).await?;
                ensure!(d.pid(Service::Router) != router, "the same router runs");
                pause(2.0).await;
                d.kill(Service::Persister).await?;
                d.mark("persister killed");
                let rows_at_kill = chaos_rows(d).await?;
                pause(1.0).await;
                let rows_before_restart = chaos_rows(d).await?;
                d.mark("persister restarting");
                ensure!(
                    rows_at_kill == rows_before_restart,
                    "{} messages were stored with the persister dead",
                    rows_before_restart - rows_at_kill
                );
                d.restart(Service::Persister).await?;
                pause(2.0).await;
                d.kill_and_restart(Service::Presence).await?;
                d.kill_and_restart(Service::Pushd).await
            })
        },
    )
    .await?;
    outcome.report.assert_clean()?;
    assert_backend_killed_and_running(&mut deployment, 1);
    let history = &outcome.history;
    let mark = |what: &str| {
        history
            .mark(what)
            .with_context(|| format!("no mark {what:?}"))
    };

    // Acked while the router was dead: stored (in JetStream), but on no
    // device before the new router ran.
    let restarting = mark("router restarting")?;
    let during = history.acked_written_between(mark("router killed")?, restarting);
    assert!(
        !during.is_empty(),
        "nothing was acked while the router was down"
    );
    let earliest = during
        .iter()
        .filter_map(|attempt| history.received_at(attempt))
        .map(|(first, _)| first)
        .min()
        .context("none of them was received")?;
    assert!(
        earliest >= restarting,
        "a message sent while the router was down arrived at {earliest} ms, \
         before its restart at {restarting} ms"
    );
    // Acked while the persister was dead (the fault schedule checked that
    // no row was written meanwhile); the clean report says they are all in
    // PostgreSQL now.
    let stored_late = history
        .acked_written_between(mark("persister killed")?, mark("persister restarting")?)
        .len();
    assert!(
        stored_late > 0,
        "nothing was acked while the persister was down"
    );
    println!(
        "kill-router-persister: {} acked with the router down (first delivered {} ms after \
         its restart), {stored_late} with the persister down",
        during.len(),
        earliest - restarting
    );
    Ok(())
}

const POISON: &[u8] = b"{\"not\": \"a message event\"";

/// An operator's consumer that refuses everything: what it is given twice
/// is past its `max_deliver`.
const REFUSER: &str = "chaos-refuser";

/// Publishes the poison on a DM the workload does not use (its users pair
/// 0-1 and 2-3; the router and persister dead-letter it at once as well),
/// has [`REFUSER`] nak it until JetStream gives up and the persister's
/// mover copies it to `chat.dead.chaos-refuser` from the max-deliveries
/// advisory; returns its sequence.
async fn refuse_until_moved(d: &mut Deployment) -> Result<u64> {
    use async_nats::jetstream::{consumer, AckKind};
    use futures::StreamExt;
    let unused = dm("chaos-0", "chaos-2")?;
    let partition = d.config.partitions.of_conversation(&unused);
    let stream_name = partition.messages_stream();
    let js = d.admin_js().await?;
    let ack = js
        .publish(subjects::message_in(&unused, partition), POISON.into())
        .await?
        .await?;
    d.expect_dead_letter(&stream_name, ack.sequence);
    let stream = js.get_stream(&stream_name).await?;
    let refuser: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(REFUSER.into()),
            filter_subject: subjects::message(&unused),
            ack_policy: consumer::AckPolicy::Explicit,
            max_deliver: 2,
            ..Default::default()
        })
        .await?;
    let dead = js.get_stream(subjects::DEADLETTER_STREAM).await?;
    let moved = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            // A pull after the last refusal makes the server notice the
            // event is exhausted and send the advisory.
            let mut batch = refuser
                .fetch()
                .max_messages(1)
                .expires(Duration::from_millis(300))
                .messages()
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| anyhow::anyhow!(e))?;
                message
                    .ack_with(AckKind::Nak(None))
                    .await
                    .map_err(|e| anyhow::anyhow!(e))?;
            }
            if dead
                .direct_get_last_for_subject(subjects::dead_letter(REFUSER))
                .await
                .is_ok()
            {
                return Ok::<_, anyhow::Error>(());
            }
        }
    })
    .await;
    stream.delete_consumer(REFUSER).await?;
    moved.context("the refused event was not moved to the dead letters")??;
    Ok(ack.sequence)
}

/// The DM between two of the workload's users.
fn dm(a: &str, b: &str) -> Result<ConversationId> {
    Ok(ConversationId::dm(UserId::parse(a)?, UserId::parse(b)?)?)
}

/// A poison event (a real conversation's subject, a payload nobody can
/// decode) among steady traffic: the router and the persister each copy it
/// to the dead letters and move on; everything real is delivered and
/// stored, without a stall.
#[tokio::test]
async fn poison_message() -> Result<()> {
    let mut deployment = single_node().await?;
    let poisoned = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let (seq, refused_seq) = (poisoned.clone(), refused.clone());
    // MESSAGES, or the partitions of it that hold the poisoned DM and the
    // refused one's.
    let partitions = deployment.config.partitions;
    let conversation = dm("chaos-0", "chaos-1")?;
    let partition = partitions.of_conversation(&conversation);
    let poison_stream = partition.messages_stream();
    let refused_stream = partitions
        .of_conversation(&dm("chaos-0", "chaos-2")?)
        .messages_stream();
    let stream_name = poison_stream.clone();
    let outcome = chaos::scenario_outcome("poison-message", &mut deployment, &workload(12), |d| {
        Box::pin(async move {
            pause(4.0).await;
            let js = d.admin_js().await?;
            let ack = js
                .publish(
                    subjects::message_in(&conversation, partition),
                    POISON.into(),
                )
                .await?
                .await?;
            d.mark("poison");
            d.expect_dead_letter(&stream_name, ack.sequence);
            seq.store(ack.sequence, Ordering::SeqCst);
            // And one that a consumer keeps refusing until JetStream gives
            // up (max deliveries, an advisory), on a DM nobody else uses.
            let sequence = refuse_until_moved(d).await?;
            refused_seq.store(sequence, Ordering::SeqCst);
            d.mark("refused poison moved");
            Ok(())
        })
    })
    .await?;
    outcome.report.assert_clean()?;
    let seq = poisoned.load(Ordering::SeqCst);

    // One dead letter per consumer of MESSAGES, each the poison itself.
    let dead_for = |stream: &str, seq: u64| {
        let mut found: Vec<(&str, &str)> = outcome
            .dead_letters
            .iter()
            .filter(|dead| dead.stream == stream && dead.seq == seq)
            .map(|dead| {
                assert_eq!(dead.payload.as_bytes(), POISON, "{dead:?}");
                assert!(!dead.reason.is_empty(), "{dead:?}");
                (dead.subject.as_str(), dead.reason.as_str())
            })
            .collect();
        found.sort_unstable();
        found
    };
    let in_process = dead_for(&poison_stream, seq);
    let consumers: Vec<&str> = in_process.iter().map(|(subject, _)| *subject).collect();
    assert_eq!(
        consumers,
        [
            subjects::dead_letter(subjects::PERSISTER_CONSUMER),
            subjects::dead_letter(subjects::ROUTER_CONSUMER),
        ],
        "{:?}",
        outcome.dead_letters
    );
    // The refused one: also moved from the advisory, after 2 deliveries.
    let refused_seq = refused.load(Ordering::SeqCst);
    let moved = dead_for(&refused_stream, refused_seq);
    let refuser = subjects::dead_letter(REFUSER);
    assert!(
        moved
            .iter()
            .any(|(subject, reason)| *subject == refuser && *reason == "max deliveries: 2"),
        "no max-deliveries dead letter of seq {refused_seq}: {:?}",
        outcome.dead_letters
    );
    assert_eq!(
        outcome.report.dead_letters_expected, 5,
        "{:?}",
        outcome.dead_letters
    );

    // Nothing stalled behind it: what was sent after it reached every
    // member device promptly.
    let history = &outcome.history;
    let after =
        history.acked_written_between(history.mark("poison").context("no poison mark")?, u64::MAX);
    assert!(
        after.len() > 50,
        "little was sent after the poison: {}",
        after.len()
    );
    let slowest = after
        .iter()
        .map(|attempt| {
            let answered = attempt.log.last().map_or(0, |t| t.answered_ms);
            let (_, last) = history.received_at(attempt).unwrap_or((0, u64::MAX));
            last.saturating_sub(answered)
        })
        .max()
        .unwrap_or(0);
    assert!(
        slowest < 5_000,
        "a message sent after the poison took {slowest} ms to reach its last device"
    );
    // Both consumers acked past it.
    let messages = deployment
        .admin_js()
        .await?
        .get_stream(&poison_stream)
        .await?;
    for consumer in [subjects::ROUTER_CONSUMER, subjects::PERSISTER_CONSUMER] {
        let info = messages.consumer_info(consumer).await?;
        assert!(
            info.ack_floor.stream_sequence > seq,
            "{consumer} did not get past the poison (seq {seq}): {:?}",
            info.ack_floor
        );
    }
    println!(
        "poison-message: poison at seq {seq}; {} messages acked after it, the slowest reached \
         its last device {slowest} ms after its `sent`",
        after.len()
    );
    Ok(())
}

/// kill -9 of nats-server (file store), restarted after 2 s.
#[tokio::test]
async fn kill_nats_server() -> Result<()> {
    let mut deployment = single_node().await?;
    let report = chaos::scenario("kill-nats", &mut deployment, &workload(12), |d| {
        Box::pin(async move {
            pause(4.0).await;
            if let Nats::Single(server) = &mut d.nats {
                server.kill().await?;
                pause(2.0).await;
                server.restart().await?;
            }
            Ok(())
        })
    })
    .await?;
    report.assert_clean()?;
    assert!(report.retried > 0, "the outage failed no send: {report:?}");
    Ok(())
}

/// PostgreSQL stopped: the persister backs off and catches up; sends go on
/// (JetStream holds them), nothing is lost.
#[tokio::test]
async fn postgres_outage() -> Result<()> {
    postgres_down_for(Duration::from_secs(5), "postgres-5s").await
}

#[tokio::test]
#[ignore = "long: run by scripts/chaos"]
async fn postgres_outage_30s() -> Result<()> {
    postgres_down_for(Duration::from_secs(30), "postgres-30s").await
}

async fn postgres_down_for(outage: Duration, name: &str) -> Result<()> {
    let mut deployment = single_node().await?;
    let seconds = outage.as_secs() + 10;
    let report = chaos::scenario(name, &mut deployment, &workload(seconds), |d| {
        Box::pin(async move {
            pause(3.0).await;
            let postgres = d.postgres().await?;
            tokio::task::spawn_blocking(|| postgres.stop()).await??;
            // Meanwhile history cannot be read, and says so at once.
            let mut reader = d.connect("chaos-0", "reader").await?;
            let reply = reader
                .request(json!({"type":"history","conversation":"dm:chaos-0:chaos-1"}))
                .await?;
            anyhow::ensure!(
                reply["type"] == "error" && reply["code"] == "unavailable",
                "history during the outage answered {reply}"
            );
            reader.close().await?;
            tokio::time::sleep(outage).await;
            tokio::task::spawn_blocking(|| postgres.start_again()).await??;
            Ok(())
        })
    })
    .await?;
    report.assert_clean()
}

async fn cluster() -> Result<Deployment> {
    Deployment::start(BINARY, Nats::Cluster(NatsCluster::start().await?)).await
}

/// The partitions of MESSAGES and INBOX on the 3-node cluster: R3, each
/// stream's replicas in three distinct zones (`az:` tags, `unique_tag`),
/// and the partitions' leaders spread over more than one node.
#[tokio::test]
async fn cluster_partitions_spread_over_nodes_and_zones() -> Result<()> {
    let cluster = NatsCluster::start().await?;
    let config = chat_shared::Config {
        stream_replicas: cluster.len(),
        partitions: Partitions::new(chat_tests::chaos::CLUSTER_PARTITIONS).context("partitions")?,
        ..chat_tests::config_as(
            &chat_tests::test_config(cluster.url(), String::new()),
            "admin",
        )
    };
    let js = async_nats::jetstream::new(chat_shared::nats::connect(&config, "placement").await?);
    chat_shared::streams::provision(&js, &config).await;
    let streams: Vec<String> = config
        .partitions
        .all()
        .flat_map(|p| [p.messages_stream(), p.inbox_stream()])
        .collect();
    let mut leaders = std::collections::BTreeSet::new();
    for name in &streams {
        let mut placed = None;
        for _ in 0..100 {
            let mut stream = js.get_stream(name).await?;
            let info = stream.info().await?.clone();
            let cluster_info = info.cluster.context("no cluster info")?;
            if let Some(leader) = cluster_info.leader.clone() {
                let mut nodes = vec![leader.clone()];
                nodes.extend(cluster_info.replicas.iter().map(|r| r.name.clone()));
                if nodes.len() == 3 {
                    placed = Some((leader, nodes));
                    break;
                }
            }
            pause(0.1).await;
        }
        let (leader, nodes) =
            placed.with_context(|| format!("{name} has no leader and 2 peers"))?;
        let zones: std::collections::BTreeSet<String> =
            nodes.iter().filter_map(|n| cluster.zone_of(n)).collect();
        ensure!(
            zones.len() == 3,
            "{name}'s replicas {nodes:?} are in zones {zones:?}"
        );
        leaders.insert(leader);
    }
    println!("partition leaders on {leaders:?}");
    ensure!(
        leaders.len() >= 2,
        "every partition is led by {leaders:?}: one node takes every write"
    );
    Ok(())
}

/// The 3-node cluster with R3 streams: kill -9 one node every few seconds
/// for a minute (each restarted before the next goes).
#[tokio::test]
#[ignore = "long: run by scripts/chaos"]
async fn cluster_rolling_kills() -> Result<()> {
    let mut deployment = cluster().await?;
    let report = chaos::scenario(
        "cluster-rolling-kills",
        &mut deployment,
        &workload(70),
        |d| {
            Box::pin(async move {
                for round in 0..10 {
                    pause(3.0).await;
                    if let Nats::Cluster(cluster) = &mut d.nats {
                        let node = round % cluster.len();
                        cluster.kill(node);
                        pause(2.0).await;
                        cluster.restart(node).await?;
                    }
                }
                Ok(())
            })
        },
    )
    .await?;
    report.assert_clean()
}

/// Two of three nodes killed: no quorum, so nothing is acked meanwhile,
/// and the sends are answered `unavailable`, fast; after the restart
/// nothing acked is missing.
#[tokio::test]
#[ignore = "long: run by scripts/chaos"]
async fn cluster_loses_quorum() -> Result<()> {
    let mut deployment = cluster().await?;
    // A third edge on the node that survives: its sessions live through
    // the outage (no reconnect, no inbox refill), so their sends must be
    // answered `unavailable`. The other two edges are on any node; when
    // theirs is killed they reconnect and their sessions close.
    let survivor = match &deployment.nats {
        Nats::Cluster(cluster) => cluster.node_url(0),
        Nats::Single(_) => anyhow::bail!("not a cluster"),
    };
    deployment.add_edge_on(survivor).await?;
    let report = chaos::scenario("cluster-no-quorum", &mut deployment, &workload(40), |d| {
        Box::pin(async move {
            pause(5.0).await;
            let Nats::Cluster(cluster) = &mut d.nats else {
                anyhow::bail!("not a cluster");
            };
            // Killed and reaped: from here no publish can reach a quorum.
            cluster.kill(1);
            cluster.kill(2);
            d.mark(chaos::FAULT);
            pause(15.0).await;
            d.mark(chaos::HEALING);
            let Nats::Cluster(cluster) = &mut d.nats else {
                anyhow::bail!("not a cluster");
            };
            cluster.restart(1).await?;
            cluster.restart(2).await?;
            Ok(())
        })
    })
    .await?;
    report.assert_clean()?;
    assert!(report.retried > 0, "the outage failed no send: {report:?}");
    let window = report.during_fault.clone().context("no fault window")?;
    // Nothing new was acked without a quorum (a `sent` for a publish acked
    // just before the kill may still arrive early in the window; a
    // duplicate's original was stored before).
    assert_eq!(window.sent, 0, "acked without a quorum: {window:?}");
    // The sends were refused as `unavailable`, not merely cut off.
    assert!(
        window.unavailable > 0,
        "no send was answered `unavailable` without a quorum: {window:?}"
    );
    // Every written send was answered, fast: none waited for the client's
    // own timeout, and the slowest answer is within a few seconds (the
    // protocol's deadline is 2 s per NATS request; this box is busy).
    assert_eq!(
        window.timed_out,
        0,
        "a send got no answer within {:?}: {window:?}",
        chaos::SEND_TIMEOUT
    );
    assert!(window.answered > 0, "no send was answered: {window:?}");
    assert!(
        window.slowest_answer_ms < 5_000,
        "a send waited {} ms for its answer without a quorum: {window:?}",
        window.slowest_answer_ms
    );
    Ok(())
}

/// The streams every send writes (every partition of MESSAGES and INBOX):
/// a leader of these frozen stalls sends.
fn send_path_streams(d: &Deployment) -> Vec<String> {
    let mut streams: Vec<String> = d
        .config
        .partitions
        .all()
        .flat_map(|p| [p.messages_stream(), p.inbox_stream()])
        .collect();
    streams.push("KV_chat_sent".into());
    streams
}

/// An admin connection to node `index` of the cluster only.
async fn admin_on(d: &Deployment, index: usize) -> Result<async_nats::Client> {
    let Nats::Cluster(cluster) = &d.nats else {
        anyhow::bail!("not a cluster");
    };
    let config = chat_shared::Config {
        nats_url: cluster.node_url(index),
        nats_user: Some("admin".into()),
        nats_password: Some(chat_tests::nats_password("admin").into()),
        ..d.config.clone()
    };
    Ok(chat_shared::nats::connect(&config, "chaos-admin").await?)
}

/// The server name of `stream`'s RAFT leader, as `nats` sees it.
/// Whether the node named `name` leads `stream` now (false if unknown).
async fn leads(nats: &async_nats::Client, stream: &str, name: &str) -> bool {
    stream_leader(nats, stream).await.ok().flatten().as_deref() == Some(name)
}

async fn stream_leader(nats: &async_nats::Client, stream: &str) -> Result<Option<String>> {
    let js = async_nats::jetstream::new(nats.clone());
    let mut stream = js.get_stream(stream).await?;
    let info = stream.info().await?;
    Ok(info.cluster.as_ref().and_then(|c| c.leader.clone()))
}

/// Moves the leaders of [`send_path_streams`] to node `index` (a stepdown
/// with that node preferred, repeated until it leads).
async fn lead_on(d: &Deployment, index: usize) -> Result<()> {
    let Nats::Cluster(cluster) = &d.nats else {
        anyhow::bail!("not a cluster");
    };
    let name = cluster.node_name(index);
    let admin = admin_on(d, index).await?;
    for stream in send_path_streams(d) {
        let stream = stream.as_str();
        let mut moved = false;
        for _ in 0..10 {
            if leads(&admin, stream, &name).await {
                moved = true;
                break;
            }
            let request = json!({"placement": {"preferred": name}}).to_string();
            let _ = admin
                .request(
                    format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
                    request.into(),
                )
                .await;
            for _ in 0..20 {
                pause(0.25).await;
                if leads(&admin, stream, &name).await {
                    break;
                }
            }
        }
        ensure!(moved, "{stream}'s leader could not be moved to {name}");
    }
    Ok(())
}

/// SIGSTOP of one node for 30 s, then SIGCONT. The node leads the
/// streams every send writes when it freezes, so the fault hits: another
/// node must be elected while it is frozen, and sends are retried.
#[tokio::test]
#[ignore = "long: run by scripts/chaos"]
async fn cluster_node_paused() -> Result<()> {
    let mut deployment = cluster().await?;
    lead_on(&deployment, 0).await?;
    let report = chaos::scenario("cluster-node-paused", &mut deployment, &workload(45), |d| {
        Box::pin(async move {
            pause(5.0).await;
            // Still the leader of what every send writes.
            let other = admin_on(d, 1).await?;
            for stream in send_path_streams(d) {
                let leader = stream_leader(&other, &stream).await?;
                ensure!(
                    leader.as_deref() == Some("n1"),
                    "{stream} is led by {leader:?}, not by the node to pause"
                );
            }
            let Nats::Cluster(cluster) = &mut d.nats else {
                anyhow::bail!("not a cluster");
            };
            cluster.pause(0)?;
            let paused = d.mark(chaos::FAULT);
            // Another node takes over (a partition of) MESSAGES while n1
            // is frozen.
            let messages = d
                .config
                .partitions
                .all()
                .next()
                .map(|p| p.messages_stream())
                .context("no MESSAGES partition")?;
            let mut elected = None;
            while d.now_ms() < paused + 25_000 {
                pause(0.25).await;
                let leader = stream_leader(&other, &messages).await;
                if let Ok(Some(leader)) = leader {
                    if leader != "n1" {
                        elected = Some(leader);
                        break;
                    }
                }
            }
            let elected =
                elected.with_context(|| format!("no new {messages} leader while n1 was frozen"))?;
            let took = d.mark(&format!("{messages} led by {elected}")) - paused;
            println!("cluster-node-paused: {elected} leads {messages} {took} ms after the pause");
            tokio::time::sleep(Duration::from_millis(
                (paused + 30_000).saturating_sub(d.now_ms()),
            ))
            .await;
            d.mark(chaos::HEALING);
            let Nats::Cluster(cluster) = &mut d.nats else {
                anyhow::bail!("not a cluster");
            };
            cluster.resume(0)?;
            Ok(())
        })
    })
    .await?;
    report.assert_clean()?;
    // Sends in flight to the frozen leader got no PubAck: answered
    // `unavailable` until the election, and retried.
    assert!(report.retried > 0, "the pause failed no send: {report:?}");
    let window = report.during_fault.clone().context("no fault window")?;
    assert!(
        window.unavailable > 0,
        "no send was answered `unavailable` while the leader was frozen: {window:?}"
    );
    assert_eq!(window.timed_out, 0, "a send hung: {window:?}");
    Ok(())
}

/// Every backend process killed in turn, repeatedly, for a minute.
#[tokio::test]
#[ignore = "long: run by scripts/chaos"]
async fn rolling_process_kills() -> Result<()> {
    let mut deployment = single_node().await?;
    let report = chaos::scenario(
        "rolling-process-kills",
        &mut deployment,
        &workload(60),
        |d| {
            Box::pin(async move {
                let order = [
                    Service::Router,
                    Service::Persister,
                    Service::Presence,
                    Service::Pushd,
                ];
                for round in 0..12 {
                    pause(2.0).await;
                    if round % 3 == 2 {
                        d.kill_edge(round % 2).await?;
                    } else {
                        d.kill_and_restart(order[round % order.len()]).await?;
                    }
                }
                Ok(())
            })
        },
    )
    .await?;
    report.assert_clean()?;
    // Every kill hit a running process (the harness fails one that finds
    // its process already gone or that did not die of the SIGKILL), and
    // each was replaced: 8 backend kills, two of each service, 4 of edges.
    assert_backend_killed_and_running(&mut deployment, 2);
    assert_eq!(deployment.kills(Service::Edge), 4);
    assert!(deployment.edges_running(), "an edge died");
    assert!(
        report.reconnects > 0,
        "the edge kills moved no client: {report:?}"
    );
    Ok(())
}

/// Each backend service was killed `times` times and runs again.
fn assert_backend_killed_and_running(deployment: &mut Deployment, times: u32) {
    for service in [
        Service::Router,
        Service::Persister,
        Service::Presence,
        Service::Pushd,
    ] {
        assert_eq!(deployment.kills(service), times, "{service:?}");
        assert!(deployment.running(service), "{service:?} is not running");
    }
}
