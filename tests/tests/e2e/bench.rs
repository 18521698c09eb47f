//! A short run of every `chatctl bench` scenario against a whole system:
//! proves the load generator works (every message counted, every frame
//! seen). No timing is asserted; speed is what the bench reports.

use std::time::Duration;

use anyhow::{Context, Result};
use chat_tests::System;
use chatctl::bench::broker::BrokerCost;
use chatctl::bench::{self, DmOptions};
use chatctl::connect_bench::{self, ConnectOptions};
use chatctl::group_bench::{self, GroupOptions};
use chatctl::presence_bench::{self, PresenceOptions};
use chatctl::raw_bench::{self, RawOptions};
use chatctl::resume_bench::{self, ResumeOptions};

#[tokio::test]
async fn bench_dm_counts_every_message() -> Result<()> {
    let system = System::start().await?;
    let report = bench::dm(
        // The broker's counters are read as `admin` (it lists the streams).
        &system.config_for("admin"),
        DmOptions {
            edge: system.ws_url(),
            pairs: 2,
            messages: 25,
            window: 4,
            rate: None,
            rss_every: None,
            nats_monitor: Some(system.nats.monitor_url()),
        },
    )
    .await?;
    // Counted by the bench and by the system: every message reached its
    // recipient and the history store.
    assert_eq!(report.delivered, 50);
    assert!(report.sent_latency.p50 > 0.0, "{:?}", report.sent_latency);
    wait_stored(&system, 50).await?;
    // A DM is one MESSAGES write and one inbox item each for its sender
    // and its recipient; no claim per send (one batch per connection at
    // most, as it closes).
    let broker = report.broker.context("no broker counters")?;
    check_broker(&broker, 2.0, 2.0 / 50.0)?;
    Ok(())
}

#[tokio::test]
async fn bench_group_counts_every_delivery() -> Result<()> {
    let system = System::start().await?;
    let report = group_bench::group(
        &system.config_for("admin"),
        GroupOptions {
            edge: system.ws_url(),
            groups: 2,
            members: 5,
            senders: 2,
            messages: 10,
            window: 4,
            nats_monitor: Some(system.nats.monitor_url()),
        },
    )
    .await?;
    assert_eq!(
        report.deliveries,
        group_bench::expected_deliveries(2, 5, 2, 10)
    );
    wait_stored(&system, 2 * 2 * 10).await?;
    // One inbox item per member, the sender included.
    let broker = report.broker.context("no broker counters")?;
    check_broker(&broker, 5.0, 4.0 / 40.0)?;
    Ok(())
}

/// The broker's counters of a run whose messages each have `inboxes`
/// recipients, sender included, and whose sending connections, one batch
/// of claims each at most, make `batches` per message: exact for the data
/// path's own streams, bounded for what the rest of the system wrote
/// meanwhile.
fn check_broker(broker: &BrokerCost, inboxes: f64, batches: f64) -> Result<()> {
    let of = |stream: &str| broker.writes_by_stream.get(stream).copied().unwrap_or(0.0);
    anyhow::ensure!(of("MESSAGES") == 1.0, "{broker:?}");
    anyhow::ensure!(of("INBOX") == inboxes, "{broker:?}");
    anyhow::ensure!(of("KV_chat_sent") <= batches, "claims per send: {broker:?}");
    let sum: f64 = broker.writes_by_stream.values().sum();
    anyhow::ensure!(
        (broker.writes_per_message - sum).abs() < 1e-9 && sum >= 1.0 + inboxes,
        "{broker:?}"
    );
    // The monitor counts at least the publish and the appends going in,
    // and as many PubAcks coming out.
    let (into, out) = broker
        .in_msgs_per_message
        .zip(broker.out_msgs_per_message)
        .context("no message counts from the monitor")?;
    anyhow::ensure!(into >= 1.0 + inboxes && out >= 1.0 + inboxes, "{broker:?}");
    Ok(())
}

#[tokio::test]
async fn bench_resume_gets_the_whole_backlog_before_synced() -> Result<()> {
    let system = System::start().await?;
    for no_cursor in [false, true] {
        // It also reads the router's consumer over NATS.
        let report = resume_bench::resume(
            &system.config_for("admin"),
            ResumeOptions {
                edge: system.ws_url(),
                backlog: 120,
                window: 16,
                no_cursor,
            },
        )
        .await?;
        assert!(report.resumed);
        assert!(resume_bench::complete(&report), "{report:?}");
        // Each run names its users by the second.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    }
    Ok(())
}

#[tokio::test]
async fn bench_presence_sees_every_friend_come_and_go() -> Result<()> {
    let system = System::start().await?;
    let report = presence_bench::presence(
        &system.config,
        PresenceOptions {
            edge: system.ws_url(),
            friends: 4,
            rounds: 2,
        },
    )
    .await?;
    // Measured, not echoed: an empty sample reads as 0.
    assert!(report.online_fanout.p50 > 0.0, "{:?}", report.online_fanout);
    assert!(report.frames_per_second > 0.0);
    Ok(())
}

#[tokio::test]
async fn bench_raw_acks_every_publish() -> Result<()> {
    let system = System::start().await?;
    let report = raw_bench::raw(
        &system.config_for("admin"),
        RawOptions {
            messages: 2_000,
            window: 64,
            size: 100,
        },
    )
    .await?;
    assert_eq!(report.core_lost, 0);
    assert!(
        report.puback_latency.p50 > 0.0,
        "{:?}",
        report.puback_latency
    );
    assert!(report.jetstream_per_second > 0.0);
    Ok(())
}

#[tokio::test]
async fn bench_connect_opens_every_connection() -> Result<()> {
    let system = System::start().await?;
    let (report, held) = connect_bench::connect(
        &system.config,
        ConnectOptions {
            edge: system.ws_url(),
            connections: 40,
            rate: 200,
            sources: 2,
            // The edge runs inside this test process.
            edge_pid: Some(std::process::id()),
            idle: Duration::from_secs(1),
        },
    )
    .await?;
    assert!(report.edge_rss_after_kib > 0);
    assert!(report.connects_per_second > 0.0);
    // The connections are still open while held: the edge counts them.
    let connections = edge_connections(&system).await?;
    assert!(
        connections >= 40.0,
        "the edge counts {connections} connections"
    );
    drop(held);
    Ok(())
}

/// Waits until PostgreSQL holds `count` messages: the bench's messages
/// went all the way to the history store.
async fn wait_stored(system: &System, count: i64) -> Result<()> {
    let db = system.database().await?;
    let rows = || db.query_one("SELECT count(*) FROM messages", &[]);
    chat_tests::wait_until(|| async { rows().await.is_ok_and(|r| r.get::<_, i64>(0) == count) })
        .await
}

/// The edge's `edge_connections` gauge.
async fn edge_connections(system: &System) -> Result<f64> {
    let (status, body) = chat_tests::http_get(system.edge_addr, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    Ok(chat_tests::metrics::Scrape::parse(&body)?.sum("edge_connections", &[]))
}
