//! The fault suite: each scenario runs the chaos workload (tests/src/chaos.rs)
//! against a deployment with every service in its own process while faults
//! hit it, then checks that nothing acked was lost, duplicated or reordered
//! and that PostgreSQL holds every acked message exactly once.
//!
//! The short scenarios run in `./scripts/test`; the long ones (the 3-node
//! cluster, 30 s outages) are `#[ignore]`d and run by `scripts/chaos`.

use std::time::Duration;

use anyhow::Result;
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

/// kill -9 of the router and of the persister while messages flow, each
/// restarted after a second.
#[tokio::test]
async fn kill_router_and_persister() -> Result<()> {
    let mut deployment = single_node().await?;
    let report = chaos::scenario(
        "kill-router-persister",
        &mut deployment,
        &workload(12),
        |d| {
            Box::pin(async move {
                pause(2.0).await;
                d.kill(Service::Router).await?;
                pause(1.0).await;
                d.restart(Service::Router).await?;
                pause(2.0).await;
                d.kill(Service::Persister).await?;
                pause(1.0).await;
                d.restart(Service::Persister).await?;
                pause(2.0).await;
                d.kill_and_restart(Service::Presence).await?;
                d.kill_and_restart(Service::Pushd).await
            })
        },
    )
    .await?;
    report.assert_clean()
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

/// Two of three nodes killed: no quorum, so nothing is acked meanwhile;
/// after the restart nothing acked is missing.
#[tokio::test]
#[ignore = "long: run by scripts/chaos"]
async fn cluster_loses_quorum() -> Result<()> {
    let mut deployment = cluster().await?;
    let report = chaos::scenario("cluster-no-quorum", &mut deployment, &workload(40), |d| {
        Box::pin(async move {
            pause(5.0).await;
            if let Nats::Cluster(cluster) = &mut d.nats {
                cluster.kill(1);
                cluster.kill(2);
                pause(15.0).await;
                cluster.restart(1).await?;
                cluster.restart(2).await?;
            }
            Ok(())
        })
    })
    .await?;
    report.assert_clean()?;
    assert!(report.retried > 0, "the outage failed no send: {report:?}");
    // Without a quorum every send is answered (`unavailable`), none hangs.
    assert!(
        report.slowest_try_ms < chaos::SEND_TIMEOUT.as_millis() as u64,
        "a send waited {} ms for an answer",
        report.slowest_try_ms
    );
    Ok(())
}

/// SIGSTOP of one node for 30 s, then SIGCONT.
#[tokio::test]
#[ignore = "long: run by scripts/chaos"]
async fn cluster_node_paused() -> Result<()> {
    let mut deployment = cluster().await?;
    let report = chaos::scenario("cluster-node-paused", &mut deployment, &workload(45), |d| {
        Box::pin(async move {
            pause(5.0).await;
            if let Nats::Cluster(cluster) = &mut d.nats {
                cluster.pause(0)?;
                pause(30.0).await;
                cluster.resume(0)?;
            }
            Ok(())
        })
    })
    .await?;
    report.assert_clean()
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
    report.assert_clean()
}
