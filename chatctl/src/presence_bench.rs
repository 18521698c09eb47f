//! `chatctl bench presence`: one user with N friends, all of them online,
//! goes online and offline repeatedly; measures how long each change takes
//! to reach every friend and the presence frames delivered per second.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chat_shared::Config;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::bench::common::{connect_paced, request, Percentiles, PING_EVERY};
use crate::client::Socket;

#[derive(clap::Args)]
pub struct PresenceOptions {
    #[arg(long, env = "CHAT_EDGE_URL", default_value = crate::client::DEFAULT_EDGE)]
    pub edge: String,
    #[arg(long, default_value_t = 500)]
    pub friends: usize,
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
}

#[derive(Debug, serde::Serialize)]
pub struct PresenceReport {
    pub friends: usize,
    pub rounds: usize,
    /// Milliseconds from the hub's connect to each friend's `online` frame.
    pub online_fanout: Percentiles,
    /// Milliseconds from the first friend's `offline` frame to each
    /// friend's (the offline itself waits for the debounce).
    pub offline_spread: Percentiles,
    /// Presence frames delivered per second while a change fans out
    /// (friends / time from first to last frame), median over rounds.
    pub frames_per_second: f64,
}

pub async fn presence(config: &Config, options: PresenceOptions) -> anyhow::Result<PresenceReport> {
    if options.friends == 0 || options.rounds == 0 {
        bail!("friends and rounds must be positive");
    }
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let hub = format!("bench{run}hub");
    eprintln!(
        "connecting {} friends and making them friends of {hub}",
        options.friends
    );
    // Every friend reports (its index, the status it saw, when).
    let (tx, mut seen) = mpsc::unbounded_channel::<(usize, String, Instant)>();
    for index in 0..options.friends {
        let name = format!("bench{run}f{index}");
        let mut socket = connect_paced(config, &options.edge, &name).await?;
        let reply = request(
            &mut socket,
            json!({"type":"friend.request","user":hub}),
            "ask",
        )
        .await?;
        if reply["type"] != "ok" {
            bail!("{name}: friend.request: {reply}");
        }
        watch_friend(socket, index, hub.clone(), tx.clone());
    }
    let mut hub_socket = connect_paced(config, &options.edge, &hub).await?;
    for i in 0..options.friends {
        let reply = request(
            &mut hub_socket,
            json!({"type":"friend.accept","user":format!("bench{run}f{i}")}),
            &format!("a{i}"),
        )
        .await?;
        if reply["type"] != "ok" {
            bail!("{hub}: friend.accept: {reply}");
        }
    }
    drop(hub_socket);
    drop(tx);
    // Wait for the hub's first offline (after the accepts) to settle.
    collect(
        &mut seen,
        "offline",
        options.friends,
        Duration::from_secs(60),
    )
    .await?;

    let mut online = Vec::new();
    let mut offline = Vec::new();
    let mut rates = Vec::new();
    for round in 0..options.rounds {
        let started = Instant::now();
        let hub_socket = connect_paced(config, &options.edge, &hub).await?;
        let arrivals = collect(
            &mut seen,
            "online",
            options.friends,
            Duration::from_secs(60),
        )
        .await
        .with_context(|| format!("round {round}: online"))?;
        online.extend(
            arrivals
                .iter()
                .map(|t| t.duration_since(started).as_micros() as u64),
        );
        rates.push(rate(&arrivals));
        drop(hub_socket);
        let arrivals = collect(
            &mut seen,
            "offline",
            options.friends,
            Duration::from_secs(60),
        )
        .await
        .with_context(|| format!("round {round}: offline"))?;
        if let Some(first) = arrivals.iter().min() {
            offline.extend(
                arrivals
                    .iter()
                    .map(|t| t.duration_since(*first).as_micros() as u64),
            );
        }
        rates.push(rate(&arrivals));
        eprintln!("round {} of {} done", round + 1, options.rounds);
    }
    rates.sort_by(f64::total_cmp);
    Ok(PresenceReport {
        friends: options.friends,
        rounds: options.rounds,
        online_fanout: Percentiles::of(online),
        offline_spread: Percentiles::of(offline),
        frames_per_second: rates.get(rates.len() / 2).copied().unwrap_or(0.0),
    })
}

/// Keeps a friend's connection alive and reports each presence frame about
/// `hub` it receives.
fn watch_friend(
    socket: Socket,
    index: usize,
    hub: String,
    tx: mpsc::UnboundedSender<(usize, String, Instant)>,
) {
    let (mut sink, mut stream) = socket.split();
    // Idle clients must still say something within the heartbeat.
    tokio::spawn(async move {
        let ping = Message::Text(json!({"type":"ping"}).to_string().into());
        loop {
            tokio::time::sleep(PING_EVERY).await;
            if sink.send(ping.clone()).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            let Message::Text(text) = message else {
                continue;
            };
            let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if frame["type"] == "presence" && frame["user"] == hub.as_str() {
                let status = frame["status"].as_str().unwrap_or_default().to_string();
                if tx.send((index, status, Instant::now())).is_err() {
                    return;
                }
            }
        }
    });
}

/// Frames per second between the first and the last arrival.
fn rate(arrivals: &[Instant]) -> f64 {
    let (Some(first), Some(last)) = (arrivals.iter().min(), arrivals.iter().max()) else {
        return 0.0;
    };
    let seconds = last.duration_since(*first).as_secs_f64().max(0.001);
    arrivals.len() as f64 / seconds
}

/// Waits until every friend saw `status`; their arrival instants.
async fn collect(
    seen: &mut mpsc::UnboundedReceiver<(usize, String, Instant)>,
    status: &str,
    friends: usize,
    within: Duration,
) -> anyhow::Result<Vec<Instant>> {
    let mut arrivals: Vec<Option<Instant>> = vec![None; friends];
    let mut count = 0;
    let deadline = tokio::time::Instant::now() + within;
    while count < friends {
        let Ok(Some((index, got, at))) = tokio::time::timeout_at(deadline, seen.recv()).await
        else {
            bail!("{count} of {friends} friends saw {status}");
        };
        if got == status && arrivals[index].is_none() {
            arrivals[index] = Some(at);
            count += 1;
        }
    }
    Ok(arrivals.into_iter().flatten().collect())
}

pub fn print(report: &PresenceReport) {
    println!(
        "presence: 1 user with {} online friends, {} online/offline rounds",
        report.friends, report.rounds
    );
    println!(
        "fan-out: {:.0} presence frames/s delivered (median over changes)",
        report.frames_per_second
    );
    println!("latency (ms)               p50      p90      p99      max");
    for (name, p) in [
        ("connect -> friend online", &report.online_fanout),
        ("first -> each offline", &report.offline_spread),
    ] {
        println!(
            "{name:<24} {:>7.2}  {:>7.2}  {:>7.2}  {:>7.2}",
            p.p50, p.p90, p.p99, p.max
        );
    }
}
