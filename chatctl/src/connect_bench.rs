//! `chatctl bench connect`: opens N authenticated idle connections (one
//! user each) at a given rate, spread over several 127.0.0.x source
//! addresses so the ephemeral ports of one address do not run out; reports
//! the connect rate and the edge's resident memory per connection.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chat_shared::ids::DeviceId;
use chat_shared::wire::ClientFrame;
use chat_shared::Config;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::bench::common::{clock_ticks_per_second, cpu_ticks, vm_rss_kib, PING_EVERY};
use crate::client::{token, websocket_url};

/// Handshakes in progress at once.
const CONCURRENCY: usize = 64;
/// Below the 20,000 open files a process may have (this one and the edge).
pub const MAX_CONNECTIONS: usize = 18_000;

pub struct ConnectOptions {
    pub edge: String,
    pub connections: usize,
    /// New connections per second.
    pub rate: u32,
    /// Source addresses 127.0.0.1 ..= 127.0.0.<sources>.
    pub sources: u8,
    /// The edge's pid; found with `pgrep -f chat-edge` when absent.
    pub edge_pid: Option<u32>,
    /// How long the edge's CPU is measured with every connection idle.
    pub idle: Duration,
}

/// The open connections, kept alive (pings) until dropped.
pub struct Held(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Held {
    fn drop(&mut self) {
        for keeper in &self.0 {
            keeper.abort();
        }
    }
}

#[derive(Debug, serde::Serialize)]
pub struct ConnectReport {
    pub connections: usize,
    pub seconds: f64,
    pub connects_per_second: f64,
    pub edge_pid: u32,
    /// The edge's VmRSS before and with every connection open, in KiB.
    pub edge_rss_before_kib: u64,
    pub edge_rss_after_kib: u64,
    pub edge_kib_per_connection: f64,
    /// The edge's CPU (user + system, % of one core) over `idle_seconds`
    /// with every connection open and pinging at the heartbeat.
    pub edge_idle_cpu_percent: f64,
    pub idle_seconds: f64,
    /// Handshakes answered `unavailable` (a busy backend) and tried again,
    /// as a real client does after a pause.
    pub retried_handshakes: usize,
}

/// KiB per connection between two RSS readings.
pub fn per_connection(before_kib: u64, after_kib: u64, connections: usize) -> f64 {
    if connections == 0 {
        return 0.0;
    }
    after_kib.saturating_sub(before_kib) as f64 / connections as f64
}

fn edge_rss(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    vm_rss_kib(&status).with_context(|| format!("no VmRSS in {path}"))
}

fn find_edge_pid() -> anyhow::Result<u32> {
    let output = std::process::Command::new("pgrep")
        .args(["-f", "chat-edge"])
        .output()
        .context("running pgrep -f chat-edge")?;
    let pids: Vec<u32> = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    match pids.as_slice() {
        [pid] => Ok(*pid),
        [] => bail!("no chat-edge process found; pass --edge-pid"),
        _ => bail!("several chat-edge processes ({pids:?}); pass --edge-pid"),
    }
}

/// Opens the connections and measures; the connections stay open (and
/// keep pinging) until the returned [`Held`] is dropped, so several
/// processes can hold theirs at once.
pub async fn connect(
    config: &Config,
    options: ConnectOptions,
) -> anyhow::Result<(ConnectReport, Held)> {
    if options.connections == 0 || options.rate == 0 || options.sources == 0 {
        bail!("connections, rate and sources must be positive");
    }
    if options.connections > MAX_CONNECTIONS {
        bail!(
            "at most {MAX_CONNECTIONS} connections: this process and the edge may each hold 20,000 open files"
        );
    }
    let edge_pid = match options.edge_pid {
        Some(pid) => pid,
        None => find_edge_pid()?,
    };
    let url = websocket_url(&options.edge);
    let target: SocketAddr = {
        let request = url
            .strip_prefix("ws://")
            .with_context(|| format!("{url}: only ws:// is supported here"))?;
        let authority = request.split('/').next().unwrap_or(request);
        let mut addrs = tokio::net::lookup_host(authority)
            .await
            .with_context(|| format!("resolving {authority}"))?;
        addrs
            .next()
            .with_context(|| format!("{authority} has no address"))?
    };
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Several processes may open connections at once (scripts/connect-scale).
    let process = std::process::id();
    let rss_before = edge_rss(edge_pid)?;
    eprintln!(
        "opening {} connections at {}/s from {} source addresses",
        options.connections, options.rate, options.sources
    );
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(options.rate)));
    let mut handshakes = Vec::with_capacity(options.connections);
    let started = Instant::now();
    for i in 0..options.connections {
        ticker.tick().await;
        let permit = permits.clone().acquire_owned().await?;
        let source = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            1 + (i % usize::from(options.sources)) as u8,
        ));
        let token = token(
            config,
            &format!("bench{run}p{process}c{i}"),
            Duration::from_secs(3600),
        )?;
        let url = url.clone();
        handshakes.push(tokio::spawn(async move {
            let socket = open_retrying(&url, target, source, &token).await;
            drop(permit);
            // Idle clients must still say something within the heartbeat,
            // from the start: opening many thousands takes longer than it.
            socket.map(|(socket, retries)| (tokio::spawn(keep_alive(socket)), retries))
        }));
    }
    let mut keepers = Vec::with_capacity(options.connections);
    let mut retried_handshakes = 0;
    for handshake in handshakes {
        let (keeper, retries) = handshake.await.context("connect task")??;
        keepers.push(keeper);
        retried_handshakes += retries;
    }
    let seconds = started.elapsed().as_secs_f64();
    // Let the edge settle (presence listings, buffers) before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = edge_rss(edge_pid)?;
    let held = Held(keepers);
    let (ticks_before, idle_from) = (cpu_ticks(edge_pid)?, Instant::now());
    tokio::time::sleep(options.idle).await;
    let idle_ticks = cpu_ticks(edge_pid)?.saturating_sub(ticks_before);
    let idle_seconds = idle_from.elapsed().as_secs_f64();
    let edge_idle_cpu_percent = if idle_seconds > 0.0 {
        100.0 * idle_ticks as f64 / clock_ticks_per_second() / idle_seconds
    } else {
        0.0
    };
    let report = ConnectReport {
        connections: options.connections,
        seconds,
        connects_per_second: crate::bench::common::per_second(options.connections, seconds),
        edge_pid,
        edge_rss_before_kib: rss_before,
        edge_rss_after_kib: rss_after,
        edge_kib_per_connection: per_connection(rss_before, rss_after, options.connections),
        edge_idle_cpu_percent,
        idle_seconds,
        retried_handshakes,
    };
    Ok((report, held))
}

/// The load generator's side of a connection: small buffers, like the
/// edge's, so one process can hold tens of thousands (tungstenite's default
/// read buffer alone is 128 KiB a socket).
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
}

type Plain = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Connects from `source`, says hello and waits for `synced`.
/// Handshake tries per connection before the run fails. `unavailable`
/// means "retry later" (PROTOCOL.md); a saturated box (every edge, load
/// process and nats-server on two cores) answers it in bursts, so the
/// load waits longer each time, as a client should.
const HANDSHAKE_TRIES: usize = 10;
/// The longest wait between two tries.
const HANDSHAKE_BACKOFF_MAX: Duration = Duration::from_secs(8);

/// [`open`], trying again after 1, 2, 4, 8, 8, ... seconds when the edge
/// answers `unavailable`; returns the socket and how many tries were
/// repeated.
async fn open_retrying(
    url: &str,
    target: SocketAddr,
    source: IpAddr,
    token: &str,
) -> anyhow::Result<(Plain, usize)> {
    let mut retries = 0;
    loop {
        match open(url, target, source, token.to_string()).await {
            Ok(socket) => return Ok((socket, retries)),
            Err(e) if retries + 1 < HANDSHAKE_TRIES && e.to_string().contains("unavailable") => {
                let wait = Duration::from_secs(1 << retries.min(3)).min(HANDSHAKE_BACKOFF_MAX);
                retries += 1;
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn open(
    url: &str,
    target: SocketAddr,
    source: IpAddr,
    token: String,
) -> anyhow::Result<Plain> {
    let tcp = TcpSocket::new_v4()?;
    tcp.bind(SocketAddr::new(source, 0))
        .with_context(|| format!("binding {source}"))?;
    let stream = tcp
        .connect(target)
        .await
        .with_context(|| format!("connecting {source} -> {target}"))?;
    let (mut socket, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(client_config()))
        .await
        .map_err(|e| {
            if e.to_string().contains("429") {
                anyhow::anyhow!("the edge refused a connection (429): raise CHAT_LIMIT_CONNECTS_PER_IP_PER_SEC (see the README) or lower --rate")
            } else {
                anyhow::Error::new(e).context(format!("WebSocket handshake with {url}"))
            }
        })?;
    let hello = ClientFrame::Hello {
        token,
        device: DeviceId::parse("bench")?,
        cursor: None,
    };
    socket
        .send(Message::Text(serde_json::to_string(&hello)?.into()))
        .await?;
    while let Some(message) = socket.next().await {
        let Message::Text(text) = message? else {
            continue;
        };
        let frame: Value = serde_json::from_str(&text)?;
        match frame["type"].as_str() {
            Some("synced") => return Ok(socket),
            Some("error") => bail!("hello refused: {frame}"),
            _ => {}
        }
    }
    bail!("connection closed during the handshake")
}

async fn keep_alive(socket: Plain) {
    let (mut sink, mut stream) = socket.split();
    let ping = Message::Text(json!({"type":"ping"}).to_string().into());
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    // One task per connection, so aborting it closes the connection.
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if sink.send(ping.clone()).await.is_err() {
                    return;
                }
            }
            // Drain whatever the edge sends (pongs, presence) so it never backs up.
            next = stream.next() => {
                if !matches!(next, Some(Ok(_))) {
                    return;
                }
            }
        }
    }
}

pub fn print(report: &ConnectReport) {
    println!(
        "connect: {} idle connections in {:.2} s: {:.0} connects/s",
        report.connections, report.seconds, report.connects_per_second
    );
    println!(
        "edge (pid {}) RSS {} KiB -> {} KiB: {:.1} KiB per connection",
        report.edge_pid,
        report.edge_rss_before_kib,
        report.edge_rss_after_kib,
        report.edge_kib_per_connection
    );
    println!(
        "edge CPU with every connection idle (pinging): {:.1}% of one core over {:.0} s",
        report.edge_idle_cpu_percent, report.idle_seconds
    );
    if report.retried_handshakes > 0 {
        println!(
            "{} handshakes were answered `unavailable` and tried again",
            report.retried_handshakes
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_per_connection() {
        assert_eq!(per_connection(1000, 3000, 100), 20.0);
        assert_eq!(per_connection(3000, 1000, 100), 0.0);
        assert_eq!(per_connection(1000, 3000, 0), 0.0);
    }
}
