//! `chatctl bench dm`: pairs of users exchanging direct messages over real
//! WebSockets against a running system; reports rates and latencies.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chat_shared::Config;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{connect, Socket};

pub mod broker;
pub mod common;
pub mod cpu;

use chat_shared::subjects::PERSISTER_CONSUMER;
use common::{latency, send, wait_consumed, Percentiles};

#[derive(Debug, Clone)]
pub struct DmOptions {
    pub edge: String,
    pub pairs: usize,
    pub messages: usize,
    /// Sends in flight per sender.
    pub window: usize,
    /// Offered load over all senders, in messages per second; `None` sends
    /// flat out (as fast as the window allows).
    pub rate: Option<f64>,
    /// Sample the resident memory of the system's processes on this
    /// machine (edge, router, persister, presence, pushd, nats-server)
    /// every this often during the run: a soak.
    pub rss_every: Option<Duration>,
    /// nats-server's HTTP monitor (`http://host:port`), for the messages
    /// the broker took in and handed out per DM.
    pub nats_monitor: Option<String>,
    /// The system's processes on this machine whose CPU time (with their
    /// descendants') the run measures, with the load generator's.
    pub cpu_of: Vec<cpu::Watched>,
}

/// What one run measured.
#[derive(Debug, serde::Serialize)]
pub struct DmReport {
    pub pairs: usize,
    pub messages: usize,
    /// `message` frames the recipients received (equals `messages`: a run
    /// waits for every one).
    pub delivered: usize,
    pub seconds: f64,
    pub sent_per_second: f64,
    pub delivered_per_second: f64,
    /// Seconds from the first send until every message was delivered and
    /// the persister had acked it on every partition (after COMMIT: in
    /// PostgreSQL), and the messages per second over that (`None` for a
    /// peer's run).
    pub persisted_seconds: Option<f64>,
    pub persisted_per_second: Option<f64>,
    /// Milliseconds, send -> `sent`.
    pub sent_latency: Percentiles,
    /// Milliseconds, send -> the recipient's `message` frame.
    pub delivered_latency: Percentiles,
    /// The offered load, when the run was paced (latencies are then
    /// measured from each message's scheduled send time, so a stall
    /// counts against every message it delayed).
    pub offered_per_second: Option<f64>,
    /// Resident memory of each process over the run, when sampled.
    pub memory: Vec<crate::memory::Footprint>,
    /// What the run cost the broker per DM (`None` for a peer's run).
    pub broker: Option<broker::BrokerCost>,
    /// CPU per DM over the watched processes and the load generator,
    /// from the first send until a moment after the last delivery (`None`
    /// without `cpu_of`, and for a peer's run).
    pub cpu: Option<cpu::CpuCost>,
}

pub async fn dm(config: &Config, options: DmOptions) -> anyhow::Result<DmReport> {
    if options.pairs == 0 || options.messages == 0 || options.window == 0 {
        bail!("pairs, messages and window must be positive");
    }
    let interval = match options.rate {
        Some(rate) if !(rate.is_finite() && rate > 0.0) => bail!("rate must be positive"),
        Some(rate) => Some(Duration::from_secs_f64(options.pairs as f64 / rate)),
        None => None,
    };
    let sampler = options.rss_every.map(crate::memory::Sampler::start);
    // Fresh user names per run, so earlier runs' inboxes do not interfere.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let start = Instant::now();
    let mut ready = Vec::new();
    let mut receivers = Vec::new();
    for pair in 0..options.pairs {
        // Send instants (µs since `start`, + 1 so 0 means "not yet").
        let sent_at: Arc<Vec<AtomicU64>> =
            Arc::new((0..options.messages).map(|_| AtomicU64::new(0)).collect());
        let from = format!("bench{run}s{pair}");
        let to = format!("bench{run}r{pair}");
        let (receiver, _) = connect(config, &options.edge, &to, "bench", None).await?;
        let (sender, _) = connect(config, &options.edge, &from, "bench", None).await?;
        receivers.push(tokio::spawn(receive(
            receiver,
            options.messages,
            sent_at.clone(),
            start,
        )));
        ready.push((sender, to, sent_at));
    }
    // Every connection is made before any sender starts: rates count the
    // sending only, not the (sequential) connection set-up of the pairs.
    let persister = chat_shared::nats::jetstream(
        chat_shared::nats::connect(config, "chatctl-bench-persisted")
            .await
            .context("connecting to NATS to follow the persister")?,
        config,
    );
    let meter = broker::Meter::start(config, options.nats_monitor.clone()).await?;
    let cpu_meter = match options.cpu_of.as_slice() {
        [] => None,
        watched => Some(cpu::CpuMeter::start(watched.to_vec())?),
    };
    let began = Instant::now();
    let senders: Vec<_> = ready
        .into_iter()
        .map(|(sender, to, sent_at)| {
            tokio::spawn(send(
                sender,
                to,
                options.messages,
                options.window,
                interval,
                sent_at,
                start,
            ))
        })
        .collect();
    let mut sent_latency = Vec::with_capacity(options.pairs * options.messages);
    for task in senders {
        sent_latency.extend(task.await.context("sender task")??);
    }
    let sent_seconds = began.elapsed().as_secs_f64();
    let mut delivered_latency = Vec::with_capacity(options.pairs * options.messages);
    for task in receivers {
        delivered_latency.extend(task.await.context("receiver task")??);
    }
    let seconds = began.elapsed().as_secs_f64();
    let total = options.pairs * options.messages;
    // Delivered is not yet stored: the persister's batches may trail.
    wait_consumed(
        &persister,
        config.partitions,
        PERSISTER_CONSUMER,
        PERSISTED_POLL,
        RECEIVE_STALL,
    )
    .await?;
    let persisted_seconds = began.elapsed().as_secs_f64();
    let memory = match sampler {
        Some(sampler) => sampler.finish().await,
        None => Vec::new(),
    };
    // After the broker's settling moment: the persister's last batches
    // and what closing the connections causes count too.
    let broker = meter.finish(total).await?;
    let cpu = cpu_meter.map(|m| m.finish(total)).transpose()?;
    Ok(DmReport {
        pairs: options.pairs,
        messages: total,
        delivered: delivered_latency.len(),
        seconds,
        sent_per_second: total as f64 / sent_seconds,
        delivered_per_second: total as f64 / seconds,
        persisted_seconds: Some(persisted_seconds),
        persisted_per_second: Some(common::per_second(total, persisted_seconds)),
        sent_latency: Percentiles::of(sent_latency),
        delivered_latency: Percentiles::of(delivered_latency),
        offered_per_second: options.rate,
        memory,
        broker: Some(broker),
        cpu,
    })
}

/// How long a receiver waits for the next message before the run fails
/// (and the persister for its last).
const RECEIVE_STALL: Duration = Duration::from_secs(60);
/// How often the persister's progress is read after the last delivery:
/// the persisted rate is exact to about this.
const PERSISTED_POLL: Duration = Duration::from_millis(20);

/// Reads `count` messages, acking as it goes; returns each send -> delivered
/// latency in µs.
async fn receive(
    mut socket: Socket,
    count: usize,
    sent_at: Arc<Vec<AtomicU64>>,
    start: Instant,
) -> anyhow::Result<Vec<u64>> {
    let mut latencies = Vec::with_capacity(count);
    // A run may last long (a soak); it fails only when delivery stops.
    while latencies.len() < count {
        let Ok(Some(message)) = tokio::time::timeout(RECEIVE_STALL, socket.next()).await else {
            bail!(
                "received {} of {count} messages, then nothing for {RECEIVE_STALL:?}",
                latencies.len()
            );
        };
        let Message::Text(text) = message? else {
            continue;
        };
        let frame: Value = serde_json::from_str(&text)?;
        if frame["type"] != "message" {
            continue;
        }
        let seq: usize = frame["client_msg_id"]
            .as_str()
            .and_then(|c| c.strip_prefix('b'))
            .and_then(|s| s.parse().ok())
            .unwrap_or(usize::MAX);
        latencies.push(latency(&sent_at, seq, start));
        if latencies.len() % 100 == 0 {
            let ack = json!({"type":"ack","cursor":frame["cursor"]});
            socket.send(Message::Text(ack.to_string().into())).await?;
        }
    }
    let _ = socket.close(None).await;
    Ok(latencies)
}

pub fn print(report: &DmReport) {
    let offered = report
        .offered_per_second
        .map(|rate| format!(" (offered {rate:.0}/s)"))
        .unwrap_or_default();
    println!(
        "dm: {} pairs, {} messages in {:.2} s{offered}: {:.0} sent/s, {:.0} delivered/s",
        report.pairs,
        report.messages,
        report.seconds,
        report.sent_per_second,
        report.delivered_per_second
    );
    if let Some(rate) = report.persisted_per_second {
        println!(
            "delivered and persisted (the persister's last ack) after {:.2} s: {rate:.0}/s",
            report.persisted_seconds.unwrap_or_default()
        );
    }
    println!("latency (ms)        p50      p90      p99    p99.9      max");
    for (name, p) in [
        ("send -> sent", &report.sent_latency),
        ("send -> delivered", &report.delivered_latency),
    ] {
        println!(
            "{name:<17} {:>7.2}  {:>7.2}  {:>7.2}  {:>7.2}  {:>7.2}",
            p.p50, p.p90, p.p99, p.p999, p.max
        );
    }
    crate::memory::print(&report.memory);
    if let Some(broker) = &report.broker {
        broker::print(broker);
    }
    if let Some(cost) = &report.cpu {
        cpu::print(cost);
    }
}
