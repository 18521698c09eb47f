//! A short run of every `chatctl bench` scenario against a whole system:
//! proves the load generator works (every message counted, every frame
//! seen). No timing is asserted; speed is what the bench reports.

use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream;
use chat_shared::partitions::Partitions;
use chat_tests::servers::PgCluster;
use chat_tests::{streams, System};
use chatctl::bench::broker::{BrokerCost, ConsumerWatch};
use chatctl::bench::cpu::Watched;
use chatctl::bench::{self, DmOptions};
use chatctl::connect_bench::{self, ConnectOptions};
use chatctl::conversations_bench::{self, ConversationsOptions};
use chatctl::ejabberd::{Archive, Ejabberd};
use chatctl::group_bench::{self, GroupOptions};
use chatctl::media_bench::{self, MediaOptions};
use chatctl::peer_bench;
use chatctl::presence_bench::{self, PresenceOptions};
use chatctl::raw_bench::{self, RawOptions};
use chatctl::resume_bench::{self, ResumeOptions};
use chatctl::search_bench::{self, SearchOptions};
use serde_json::json;

#[tokio::test]
async fn bench_dm_counts_every_message() -> Result<()> {
    let system = System::start().await?;
    // The system runs in this process (nats-server a child of it);
    // PostgreSQL is a postmaster of its own with a backend per connection.
    let postmaster = postmaster_pid().await?;
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
            cpu_of: vec![
                Watched {
                    name: "system".into(),
                    pid: std::process::id(),
                },
                Watched {
                    name: "postgres".into(),
                    pid: postmaster,
                },
            ],
        },
    )
    .await?;
    // Counted by the bench and by the system: every message reached its
    // recipient and the history store.
    assert_eq!(report.delivered, 50);
    // Persisted is timed after delivered, and only once PostgreSQL has
    // every message (the persister acks after COMMIT).
    let persisted = report.persisted_seconds.context("no persisted time")?;
    assert!(persisted >= report.seconds, "{report:?}");
    let stored = system
        .count_everywhere("SELECT count(*) FROM messages")
        .await?;
    assert_eq!(stored, 50);
    // Every watched process is in the CPU report, the load generator as
    // part of "system" (the same process, not counted twice), and the
    // split adds up to the total.
    let cpu = report.cpu.context("no CPU report")?;
    let mut names: Vec<&str> = cpu.by_process.iter().map(|p| p.name.as_str()).collect();
    names.sort_unstable();
    anyhow::ensure!(names == ["postgres", "system"], "{cpu:?}");
    let postgres = cpu.by_process.iter().find(|p| p.name == "postgres");
    anyhow::ensure!(
        postgres.is_some_and(|p| p.pid == postmaster && p.processes > 1),
        "the postmaster's backends are counted: {cpu:?}"
    );
    let sum: f64 = cpu.by_process.iter().map(|p| p.micros_per_message).sum();
    anyhow::ensure!(
        cpu.micros_per_message > 0.0 && (sum - cpu.micros_per_message).abs() < 1e-6,
        "{cpu:?}"
    );
    assert!(report.sent_latency.p50 > 0.0, "{:?}", report.sent_latency);
    wait_stored(&system, 50).await?;
    // A DM is one MESSAGES write and one inbox item each for its sender
    // and its recipient; no claim per send (one batch per connection at
    // most, as it closes).
    let broker = report.broker.context("no broker counters")?;
    check_broker(&broker, system.config.partitions, 2.0, 2.0 / 50.0)?;
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
    check_broker(&broker, system.config.partitions, 5.0, 4.0 / 40.0)?;
    Ok(())
}

/// The broker's counters of a run whose messages each have `inboxes`
/// recipients, sender included, and whose sending connections, one batch
/// of claims each at most, make `batches` per message: exact for the data
/// path's own streams, bounded for what the rest of the system wrote
/// meanwhile. MESSAGES and INBOX are counted over their partitions when
/// `partitions` splits them (each partition's share a fraction of the
/// messages, hence the tolerance).
fn check_broker(
    broker: &BrokerCost,
    partitions: Partitions,
    inboxes: f64,
    batches: f64,
) -> Result<()> {
    let of = |stream: &str| broker.writes_by_stream.get(stream).copied().unwrap_or(0.0);
    let of_all = |names: Vec<String>| names.iter().map(|name| of(name)).sum::<f64>();
    let messages = of_all(streams::messages_streams(partitions));
    let inbox = of_all(streams::inbox_streams(partitions));
    anyhow::ensure!((messages - 1.0).abs() < 1e-9, "{broker:?}");
    anyhow::ensure!((inbox - inboxes).abs() < 1e-9, "{broker:?}");
    anyhow::ensure!(of("KV_chat_sent") <= batches, "claims per send: {broker:?}");
    let sum: f64 = broker.writes_by_stream.values().sum();
    anyhow::ensure!(
        (broker.writes_per_message - sum).abs() < 1e-9 && sum >= 1.0 + inboxes,
        "{broker:?}"
    );
    // The monitor counts at least each send's publish going in and its
    // PubAck coming out. Not more exactly: its counters are per client
    // connection (added after each read), and in runs on a busy box the
    // appends of a window were seen below the stream sequences they wrote
    // (6.9 writes but 4.2 messages in per message).
    let (into, out) = broker
        .in_msgs_per_message
        .zip(broker.out_msgs_per_message)
        .context("no message counts from the monitor")?;
    anyhow::ensure!(into >= 1.0 && out >= 1.0, "{broker:?}");
    Ok(())
}

#[tokio::test]
async fn bench_resume_gets_the_whole_backlog_before_synced() -> Result<()> {
    // The presence leader lists its whole bucket once, through a consumer
    // (presence/src/speaker.rs reconcile), `presence_timeout` after it
    // starts: with the tests' 1.5 s that fell inside a resume now and then
    // and was counted as the resume's. Put it past the end of the test, so
    // that every consumer created while a resume runs is the resume's.
    let system =
        System::start_with(|config| config.presence_timeout = Duration::from_secs(600)).await?;
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
        // An inbox is read with direct gets: no consumer, not even one
        // created and deleted again.
        assert_eq!(report.consumers.created, 0, "{report:?}");
        assert_eq!(report.consumers.before, report.consumers.after);
        assert!(report.consumers.before > 0, "the services' own consumers");
        // Each run names its users by the second.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    }
    // The count the resume reports is one that sees a consumer made.
    let admin = system.config_for("admin");
    let watch = ConsumerWatch::start(&admin).await?;
    let js = jetstream::new(system.admin().await?);
    let stream = js.get_stream("EVENTS").await?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config::default())
        .await?;
    let seen = watch.finish().await?;
    assert_eq!(seen.created, 1, "{seen:?}");
    assert_eq!(seen.after, seen.before + 1, "{seen:?}");
    drop(consumer);
    Ok(())
}

#[tokio::test]
async fn bench_media_uploads_and_downloads_every_round() -> Result<()> {
    let system = System::start().await?;
    let report = media_bench::media(
        &system.config_for("admin"),
        MediaOptions {
            edge: system.ws_url(),
            size_mib: 2,
            rounds: 2,
        },
    )
    .await?;
    // Every round's download had the upload's SHA-256 (else an error).
    assert_eq!((report.rounds, report.size_bytes), (2, 2 * 1024 * 1024));
    assert!(report.upload_mb_per_second > 0.0 && report.download_mb_per_second > 0.0);
    Ok(())
}

#[tokio::test]
async fn bench_search_finds_exactly_what_it_planted() -> Result<()> {
    let system = System::start().await?;
    // It reads the shard map from KV: an operator's NATS user.
    let report = search_bench::search(
        &system.config_for("admin"),
        SearchOptions {
            edge: system.ws_url(),
            messages: 20_000,
            conversations: 10,
            foreign: 2_000,
            rounds: 2,
            limit: 20,
        },
    )
    .await?;
    // Each page is exactly as big as the planted hits allow, from the
    // searcher's conversations only, every item holding the query.
    assert_eq!(report.wrong, 0, "{report:#?}");
    assert_eq!(report.failed, 0, "{report:#?}");
    assert_eq!(report.queries.len(), 12, "six queries, in all and in one");
    let frequent = report
        .queries
        .iter()
        .find(|q| q.query == "東京" && !q.scoped)
        .context("the Japanese query")?;
    assert!(
        frequent.planted > 20 && frequent.items == 20 && frequent.more,
        "{frequent:?}"
    );
    assert!(
        report.queries.iter().any(|q| q.scoped && q.items > 0),
        "{report:#?}"
    );
    // The rows are the persister's: the searcher's list and `history`
    // read them back.
    let mut searcher = system.connect(&report.searcher, "d").await?;
    let listed = searcher.request(json!({"type":"conversations"})).await?;
    let listed = listed["items"].as_array().context("conversations")?;
    assert_eq!(listed.len(), 10, "{listed:?}");
    let page = searcher
        .request(json!({"type":"history","conversation":report.busiest,"limit":5}))
        .await?;
    let items = page["messages"].as_array().context("history")?;
    assert_eq!(items.len(), 5, "{page}");
    assert!(items
        .iter()
        .all(|m| m["conversation"] == report.busiest.as_str()));
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

/// ejabberd with its archive in PostgreSQL (`--mam sql`): the same loads
/// as the other peer runs, and every message is in its archive table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_against_ejabberd_archiving_in_postgres() -> Result<()> {
    let system = System::start().await?;
    let server = Ejabberd::start(Archive::Sql {
        server: system.config.home_database_url().to_string(),
    })
    .await?;
    let archive = server.archive_database().context("no archive database")?;
    let archive_url = format!(
        "postgres://{}@{}:{}/{}",
        archive.user, archive.host, archive.port, archive.database
    );
    let dm = peer_bench::dm(
        server.addr(),
        &DmOptions {
            edge: String::new(),
            pairs: 2,
            messages: 20,
            window: 8,
            rate: None,
            rss_every: None,
            nats_monitor: None,
            cpu_of: Vec::new(),
        },
    )
    .await?;
    assert_eq!(dm.delivered, 40);
    let (groups, members, senders, messages) = (1, 4, 2, 5);
    let group = peer_bench::group(
        server.addr(),
        &GroupOptions {
            edge: String::new(),
            groups,
            members,
            senders,
            messages,
            window: 4,
            nats_monitor: None,
        },
    )
    .await?;
    assert_eq!(
        group.deliveries,
        group_bench::expected_deliveries(groups, members, senders, messages)
    );
    // A chat is archived for its sender and its recipient; a room's
    // message once, for the room.
    let (db, connection) = tokio_postgres::connect(&archive_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let archived = || db.query_one("SELECT count(*) FROM archive", &[]);
    let expected = 2 * 40 + (groups * senders * messages) as i64;
    chat_tests::wait_until(|| async {
        archived()
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) >= expected)
    })
    .await
    .with_context(|| format!("expected {expected} archived rows"))?;
    drop(db);
    // Stopping ejabberd drops its database.
    let name = archive.database.clone();
    drop(server);
    let ours = system.database().await?;
    let left = ours
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await?;
    assert_eq!(left.get::<_, i64>(0), 0, "{name} left behind");
    Ok(())
}

/// The pid of the tests' PostgreSQL postmaster (first line of
/// `postmaster.pid` in its data directory).
async fn postmaster_pid() -> Result<u32> {
    let cluster = PgCluster::shared().await?;
    let path = cluster.dir().join("data/postmaster.pid");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    text.lines()
        .next()
        .and_then(|pid| pid.trim().parse().ok())
        .with_context(|| format!("no pid in {}", path.display()))
}

/// Waits until PostgreSQL holds `count` messages: the bench's messages
/// went all the way to the history store.
async fn wait_stored(system: &System, count: i64) -> Result<()> {
    let rows = || system.count_everywhere("SELECT count(*) FROM messages");
    chat_tests::wait_until(|| async { rows().await.is_ok_and(|n| n == count) }).await
}

/// The edge's `edge_connections` gauge.
async fn edge_connections(system: &System) -> Result<f64> {
    let (status, body) = chat_tests::http_get(system.edge_addr, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    Ok(chat_tests::metrics::Scrape::parse(&body)?.sum("edge_connections", &[]))
}

/// `bench conversations` makes a user a member of N conversations with one
/// unread each and times their first page: every page it timed is full.
#[tokio::test]
async fn bench_conversations_times_a_full_first_page() -> Result<()> {
    let system = System::start().await?;
    let report = conversations_bench::conversations(
        &system.config_for("admin"),
        ConversationsOptions {
            edge: system.ws_url(),
            conversations: 30,
            requests: 20,
            limit: 25,
        },
    )
    .await?;
    assert_eq!(report.items, 25);
    assert_eq!(report.unread, 25);
    assert_eq!(report.requests, 20);
    assert!(report.latency_ms.p50 > 0.0 && report.latency_ms.p50 <= report.latency_ms.max);
    Ok(())
}
