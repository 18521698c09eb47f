//! `chatctl bench raw`: the ceiling of our path on this box, measured
//! against the running system's nats-server with no chat service in the
//! way: async JetStream publishes (with PubAcks, a bounded window in flight)
//! into a temporary R1 file stream, and core NATS publish -> subscribe.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use bytes::Bytes;
use chat_shared::Config;
use futures::stream::FuturesUnordered;
use futures::StreamExt;

use crate::bench::common::{per_second, Percentiles};

/// The temporary stream; no chat stream listens on `bench.raw.>`.
pub const STREAM: &str = "BENCH_RAW";
const SUBJECTS: &str = "bench.raw.>";

#[derive(clap::Args)]
pub struct RawOptions {
    /// Messages per part (JetStream, then core NATS).
    #[arg(long, default_value_t = 200_000)]
    pub messages: usize,
    /// PubAcks in flight.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
}

#[derive(Debug, serde::Serialize)]
pub struct RawReport {
    pub messages: usize,
    pub size: usize,
    pub window: usize,
    /// Acked JetStream publishes per second.
    pub jetstream_per_second: f64,
    /// Milliseconds, publish -> PubAck.
    pub puback_latency: Percentiles,
    /// Core NATS messages received per second by one subscriber.
    pub core_per_second: f64,
    /// Core NATS messages the subscriber did not get (slow consumer).
    pub core_lost: usize,
}

pub async fn raw(config: &Config, options: RawOptions) -> anyhow::Result<RawReport> {
    if options.messages == 0 || options.window == 0 {
        bail!("messages and window must be positive");
    }
    let client = chat_shared::nats::connect(config, "chatctl-bench-raw").await?;
    let js = chat_shared::nats::jetstream(client.clone(), config);
    let payload = Bytes::from(vec![b'x'; options.size]);

    // A stream left over by an interrupted run would hold old messages.
    let _ = js.delete_stream(STREAM).await;
    js.create_stream(StreamConfig {
        name: STREAM.into(),
        subjects: vec![SUBJECTS.into()],
        storage: StorageType::File,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .with_context(|| {
        format!("creating the stream {STREAM} (the NATS user needs JetStream admin rights: source .chat/env)")
    })?;
    let measured = jetstream_part(&js, &options, payload.clone()).await;
    // Delete even when the run failed.
    let deleted = js.delete_stream(STREAM).await;
    let (jetstream_per_second, puback_latency) = measured?;
    deleted.with_context(|| format!("deleting the stream {STREAM}"))?;

    let (core_per_second, core_lost) = core_part(&client, &options, payload).await?;
    Ok(RawReport {
        messages: options.messages,
        size: options.size,
        window: options.window,
        jetstream_per_second,
        puback_latency,
        core_per_second,
        core_lost,
    })
}

async fn jetstream_part(
    js: &async_nats::jetstream::Context,
    options: &RawOptions,
    payload: Bytes,
) -> anyhow::Result<(f64, Percentiles)> {
    let mut in_flight = FuturesUnordered::new();
    let mut latencies = Vec::with_capacity(options.messages);
    let started = Instant::now();
    for seq in 0..options.messages {
        if in_flight.len() >= options.window {
            if let Some(latency) = in_flight.next().await {
                latencies.push(latency?);
            }
        }
        let at = Instant::now();
        let ack = js
            .publish(format!("bench.raw.{}", seq % 16), payload.clone())
            .await
            .context("JetStream publish")?;
        in_flight.push(async move {
            ack.await.context("PubAck")?;
            anyhow::Ok(at.elapsed().as_micros() as u64)
        });
    }
    while let Some(latency) = in_flight.next().await {
        latencies.push(latency?);
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok((
        per_second(options.messages, seconds),
        Percentiles::of(latencies),
    ))
}

/// Publishes as fast as the client buffers allow and counts what one
/// subscriber receives; stops waiting after a second of silence.
async fn core_part(
    client: &async_nats::Client,
    options: &RawOptions,
    payload: Bytes,
) -> anyhow::Result<(f64, usize)> {
    let subject = format!("bench.core.{}", crate::client::unique_u64());
    let mut subscriber = client.subscribe(subject.clone()).await?;
    // The subscription must be in place at the server before publishing.
    client.flush().await?;
    let count = options.messages;
    let receiver = tokio::spawn(async move {
        let mut received = 0usize;
        let mut last = Instant::now();
        while received < count {
            match tokio::time::timeout(Duration::from_secs(1), subscriber.next()).await {
                Ok(Some(_)) => {
                    received += 1;
                    last = Instant::now();
                }
                Ok(None) | Err(_) => break,
            }
        }
        (received, last)
    });
    let started = Instant::now();
    for _ in 0..count {
        client.publish(subject.clone(), payload.clone()).await?;
    }
    client.flush().await?;
    let (received, last) = receiver.await.context("core subscriber task")?;
    let seconds = last.duration_since(started).as_secs_f64();
    Ok((per_second(received, seconds), count - received))
}

pub fn print(report: &RawReport) {
    println!(
        "raw: {} messages of {} bytes per part, {} PubAcks in flight",
        report.messages, report.size, report.window
    );
    println!(
        "JetStream publish (R1 file stream {STREAM}): {:.0} acked msg/s",
        report.jetstream_per_second
    );
    println!(
        "core NATS pub -> sub (1 subscriber):        {:.0} msg/s ({} lost)",
        report.core_per_second, report.core_lost
    );
    let p = &report.puback_latency;
    println!("latency (ms)        p50      p90      p99    p99.9      max");
    println!(
        "publish -> PubAck {:>7.2}  {:>7.2}  {:>7.2}  {:>7.2}  {:>7.2}",
        p.p50, p.p90, p.p99, p.p999, p.max
    );
}
