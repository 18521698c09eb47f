//! `chatctl bench resume`: a receiver goes offline, another user sends it
//! K messages, then the receiver connects again (with its last cursor, or
//! none) and the bench times `hello` -> `synced` and checks that all K
//! arrived before `synced`. It also counts the JetStream consumers the
//! resume created (none: an inbox is read with batched direct gets).

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chat_shared::ids::{Cursor, DeviceId};
use chat_shared::subjects::ROUTER_CONSUMER;
use chat_shared::wire::ClientFrame;
use chat_shared::Config;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::bench::broker::{ConsumerWatch, Consumers};
use crate::bench::common::wait_consumed;
use crate::client::{connect, token, websocket_url};

#[derive(clap::Args)]
pub struct ResumeOptions {
    #[arg(long, env = "CHAT_EDGE_URL", default_value = crate::client::DEFAULT_EDGE)]
    pub edge: String,
    /// Messages in the backlog.
    #[arg(long, default_value_t = 10_000)]
    pub backlog: usize,
    /// Sends in flight while building the backlog.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Resume without a cursor (from the device's acked point) instead of
    /// the cursor of the last `synced`.
    #[arg(long)]
    pub no_cursor: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct ResumeReport {
    pub backlog: usize,
    pub with_cursor: bool,
    /// `resumed` in `welcome`.
    pub resumed: bool,
    /// Seconds spent building the backlog (send -> `sent`, then the router).
    pub fill_seconds: f64,
    /// Milliseconds from sending `hello` to `welcome`.
    pub welcome_ms: f64,
    /// Milliseconds from sending `hello` to `synced`.
    pub synced_ms: f64,
    /// Distinct backlog messages that arrived before `synced`.
    pub before_synced: usize,
    /// Backlog messages per second during the resume.
    pub messages_per_second: f64,
    /// JetStream consumers before and after the resume, and created
    /// during it (from hello until the connection is closed).
    pub consumers: Consumers,
}

/// Whether a resume delivered the whole backlog before `synced`.
pub fn complete(report: &ResumeReport) -> bool {
    report.before_synced == report.backlog
}

pub async fn resume(config: &Config, options: ResumeOptions) -> anyhow::Result<ResumeReport> {
    if options.backlog == 0 || options.window == 0 {
        bail!("backlog and window must be positive");
    }
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let receiver = format!("bench{run}rr");
    let sender = format!("bench{run}rs");
    // The receiver's device exists and has a cursor before it goes offline.
    let (socket, handshake) = connect(config, &options.edge, &receiver, "bench", None).await?;
    let cursor = handshake
        .iter()
        .filter_map(|text| serde_json::from_str::<Value>(text).ok())
        .find(|frame| frame["type"] == "synced")
        .and_then(|frame| frame["cursor"].as_str().and_then(|c| c.parse().ok()))
        .map(Cursor);
    if options.no_cursor {
        // A hello without a cursor resumes from the device's acked point,
        // and a device that never acked starts at the head: ack the head
        // and close cleanly, which stores it.
        let mut socket = socket;
        if let Some(cursor) = cursor {
            let ack = json!({"type":"ack","cursor":cursor.0.to_string()});
            socket.send(Message::Text(ack.to_string().into())).await?;
        }
        let _ = socket.close(None).await;
        while let Some(Ok(_)) = socket.next().await {}
    } else {
        drop(socket);
    }

    eprintln!(
        "sending {} messages to {receiver} (offline)",
        options.backlog
    );
    let filling = Instant::now();
    let (socket, _) = connect(config, &options.edge, &sender, "bench", None).await?;
    let sent_at = Arc::new((0..options.backlog).map(|_| AtomicU64::new(0)).collect());
    crate::bench::common::send(
        socket,
        receiver.clone(),
        options.backlog,
        options.window,
        None,
        sent_at,
        filling,
    )
    .await?;
    wait_for_router(config).await?;
    let fill_seconds = filling.elapsed().as_secs_f64();

    eprintln!("resuming {receiver}");
    let token = token(config, &receiver, Duration::from_secs(3600))?;
    let url = websocket_url(&options.edge);
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(&url, None, true)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let hello = ClientFrame::Hello {
        token,
        device: DeviceId::parse("bench")?,
        cursor: if options.no_cursor { None } else { cursor },
    };
    let hello = Message::Text(serde_json::to_string(&hello)?.into());
    let consumers = ConsumerWatch::start(config).await?;
    let started = Instant::now();
    socket.send(hello).await?;
    let mut seen = HashSet::with_capacity(options.backlog);
    let mut welcome = None;
    let mut resumed = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let synced = loop {
        let Ok(Some(message)) = tokio::time::timeout_at(deadline, socket.next()).await else {
            bail!(
                "no `synced` within 120 s ({} backlog messages so far)",
                seen.len()
            );
        };
        let Message::Text(text) = message? else {
            continue;
        };
        let frame: Value = serde_json::from_str(&text)?;
        match frame["type"].as_str() {
            Some("welcome") => {
                welcome = Some(started.elapsed());
                resumed = frame["resumed"].as_bool().unwrap_or(false);
            }
            Some("message") if frame["from"] == sender.as_str() => {
                if let Some(id) = frame["client_msg_id"].as_str() {
                    seen.insert(id.to_string());
                }
            }
            Some("synced") => break started.elapsed(),
            Some("error") => bail!("resume refused: {frame}"),
            _ => {}
        }
    };
    let _ = socket.close(None).await;
    let consumers = consumers.finish().await?;
    Ok(ResumeReport {
        backlog: options.backlog,
        with_cursor: !options.no_cursor && cursor.is_some(),
        resumed,
        fill_seconds,
        welcome_ms: welcome.unwrap_or_default().as_secs_f64() * 1000.0,
        synced_ms: synced.as_secs_f64() * 1000.0,
        before_synced: seen.len(),
        messages_per_second: crate::bench::common::per_second(seen.len(), synced.as_secs_f64()),
        consumers,
    })
}

/// Waits until the router has fanned out everything in MESSAGES (every
/// partition), so the whole backlog is in the receiver's inbox before it
/// connects.
async fn wait_for_router(config: &Config) -> anyhow::Result<()> {
    let client = chat_shared::nats::connect(config, "chatctl-bench-resume").await?;
    let js = chat_shared::nats::jetstream(client, config);
    let (poll, limit) = (Duration::from_millis(100), Duration::from_secs(60));
    wait_consumed(&js, config.partitions, ROUTER_CONSUMER, poll, limit).await
}

pub fn print(report: &ResumeReport) {
    println!(
        "resume: {} messages backlog ({} cursor, resumed: {}), filled in {:.2} s",
        report.backlog,
        if report.with_cursor {
            "with"
        } else {
            "without"
        },
        report.resumed,
        report.fill_seconds
    );
    println!(
        "hello -> welcome {:.1} ms, hello -> synced {:.1} ms ({:.0} msg/s)",
        report.welcome_ms, report.synced_ms, report.messages_per_second
    );
    println!(
        "{} of {} backlog messages before synced{}",
        report.before_synced,
        report.backlog,
        if complete(report) { "" } else { ": INCOMPLETE" }
    );
    let c = &report.consumers;
    println!(
        "JetStream consumers: {} created by the resume ({} before, {} after)",
        c.created, c.before, c.after
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_means_everything_before_synced() {
        let mut report = ResumeReport {
            backlog: 10,
            with_cursor: true,
            resumed: true,
            fill_seconds: 1.0,
            welcome_ms: 1.0,
            synced_ms: 2.0,
            before_synced: 10,
            messages_per_second: 5000.0,
            consumers: Consumers {
                before: 9,
                after: 9,
                created: 0,
            },
        };
        assert!(complete(&report));
        report.before_synced = 9;
        assert!(!complete(&report));
    }
}
