//! What every bench scenario shares: latency percentiles, rates, paced
//! sending, connecting and requests that wait out the edge's limits, and
//! reading a process's resident memory. Scenarios depend on this module,
//! never on each other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use chat_shared::Config;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{connect, Socket};

/// Well within the edge's default heartbeat (25 s).
pub(crate) const PING_EVERY: Duration = Duration::from_secs(10);

/// Connects, retrying while the edge's per-IP connect limit says wait.
pub(crate) async fn connect_paced(
    config: &Config,
    edge: &str,
    user: &str,
) -> anyhow::Result<Socket> {
    for _ in 0..600 {
        match connect(config, edge, user, "bench", None).await {
            Ok((socket, _)) => return Ok(socket),
            Err(e) if format!("{e:#}").contains("429") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
    bail!("{user}: the edge kept refusing connections")
}

/// Sends a request and waits for its reply, waiting out `rate_limited`.
pub(crate) async fn request(
    socket: &mut Socket,
    mut frame: Value,
    reference: &str,
) -> anyhow::Result<Value> {
    frame["ref"] = json!(reference);
    loop {
        socket.send(Message::Text(frame.to_string().into())).await?;
        loop {
            let Some(message) = socket.next().await else {
                bail!("connection closed");
            };
            let Message::Text(text) = message? else {
                continue;
            };
            let reply: Value = serde_json::from_str(&text)?;
            if reply["ref"] != reference {
                continue;
            }
            if reply["code"] == "rate_limited" {
                let wait = reply["retry_after_ms"].as_u64().unwrap_or(100);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                break;
            }
            return Ok(reply);
        }
    }
}

#[derive(Debug, serde::Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(mut micros: Vec<u64>) -> Self {
        micros.sort_unstable();
        let at = |q: f64| {
            let index =
                ((micros.len() as f64 * q).ceil() as usize).clamp(1, micros.len().max(1)) - 1;
            micros.get(index).copied().unwrap_or(0) as f64 / 1000.0
        };
        Self {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: micros.last().copied().unwrap_or(0) as f64 / 1000.0,
        }
    }
}

/// `count / seconds`, 0 for an empty or instant run.
pub fn per_second(count: usize, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    count as f64 / seconds
}

/// `VmRSS` in KiB from the text of `/proc/<pid>/status`.
pub fn vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

fn micros_since(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

/// µs from the send of message `seq` until now.
pub(crate) fn latency(sent_at: &[AtomicU64], seq: usize, start: Instant) -> u64 {
    let at = sent_at
        .get(seq)
        .map(|a| a.load(Ordering::Relaxed))
        .unwrap_or(0);
    micros_since(start).saturating_sub(at.saturating_sub(1))
}

/// Sends `count` messages with at most `window` unanswered, one every
/// `interval` when given (else flat out); returns each send -> `sent`
/// latency in µs.
pub(crate) async fn send(
    socket: Socket,
    to: String,
    count: usize,
    window: usize,
    interval: Option<Duration>,
    sent_at: Arc<Vec<AtomicU64>>,
    start: Instant,
) -> anyhow::Result<Vec<u64>> {
    let (mut write, mut read) = socket.split();
    let window = Arc::new(Semaphore::new(window));
    let reader_window = window.clone();
    let reader_sent_at = sent_at.clone();
    let reader = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(count);
        while latencies.len() < count {
            let Some(message) = read.next().await else {
                bail!("sender connection closed");
            };
            let Message::Text(text) = message? else {
                continue;
            };
            let frame: Value = serde_json::from_str(&text)?;
            match frame["type"].as_str() {
                Some("sent") => {
                    let seq: usize = frame["ref"]
                        .as_str()
                        .and_then(|r| r.parse().ok())
                        .unwrap_or(usize::MAX);
                    latencies.push(latency(&reader_sent_at, seq, start));
                    reader_window.add_permits(1);
                }
                Some("error") => {
                    // Stop the sending loop too, instead of leaving it
                    // waiting for a window that will never open.
                    reader_window.close();
                    if frame["code"] == "rate_limited" {
                        bail!(
                            "send refused by the edge's rate limit: {frame}; for benchmarks start the system with higher CHAT_LIMIT_* (see the README)"
                        );
                    }
                    bail!("send refused: {frame}");
                }
                _ => {}
            }
        }
        Ok(latencies)
    });
    let began = Instant::now();
    for seq in 0..count {
        // Paced: the message is due at its slot, and its latency counts
        // from there even if the window held it back (no coordinated
        // omission).
        let due = interval.map(|interval| began + interval.mul_f64(seq as f64));
        if let Some(due) = due {
            tokio::time::sleep_until(due.into()).await;
        }
        let Ok(permit) = window.acquire().await else {
            break;
        };
        permit.forget();
        let sent = due.map_or_else(
            || micros_since(start),
            |due| due.saturating_duration_since(start).as_micros() as u64,
        );
        sent_at[seq].store(sent + 1, Ordering::Relaxed);
        let frame = json!({"type":"send","ref":seq.to_string(),"to":to,"text":format!("bench message {seq}"),"client_msg_id":format!("b{seq}")});
        write.send(Message::Text(frame.to_string().into())).await?;
    }
    let latencies = reader.await??;
    let _ = write.close().await;
    Ok(latencies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_divide_and_survive_zero_time() {
        assert_eq!(per_second(1000, 0.5), 2000.0);
        assert_eq!(per_second(1000, 0.0), 0.0);
        assert_eq!(per_second(0, 1.0), 0.0);
    }

    #[test]
    fn percentiles_pick_ranks() {
        let p = Percentiles::of((1..=1000).map(|ms| ms * 1000).collect());
        assert_eq!(
            (p.p50, p.p90, p.p99, p.p999, p.max),
            (500.0, 900.0, 990.0, 999.0, 1000.0)
        );
    }

    #[test]
    fn rss_is_read_from_proc_status() {
        let status = "Name:\tchat-edge\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(vm_rss_kib(status), Some(12345));
        assert_eq!(vm_rss_kib("Name:\tx\n"), None);
    }
}
