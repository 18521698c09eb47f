//! What every bench scenario shares: latency percentiles, rates, paced
//! sending, connecting and requests that wait out the edge's limits, and
//! reading a process's resident memory and CPU time from `/proc` (the one
//! reader of `/proc/<pid>/stat`). Scenarios depend on this module, never
//! on each other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
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

/// Waits until `consumer` (the router's, the persister's) has taken and
/// acked everything in MESSAGES, every partition; polls every `poll`,
/// fails after `limit`.
pub(crate) async fn wait_consumed(
    js: &async_nats::jetstream::Context,
    partitions: chat_shared::partitions::Partitions,
    consumer: &str,
    poll: Duration,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    for partition in partitions.all() {
        let name = partition.messages_stream();
        let stream = js.get_stream(&name).await.context(name)?;
        loop {
            let info = stream
                .consumer_info(consumer)
                .await
                .with_context(|| format!("consumer {consumer}"))?;
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("{consumer} still had messages pending after {limit:?}");
            }
            tokio::time::sleep(poll).await;
        }
    }
    Ok(())
}

/// A `rate_limited` that asks to wait longer than this (ms) is a quota.
const QUOTA_WAIT_MS: u64 = 10_000;

/// Sends a request and waits for its reply, waiting out `rate_limited`
/// unless it is a quota's.
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
                // A rate limit clears in moments; a per-user quota only
                // with its minute or day: a benchmark must not wait that.
                if wait > QUOTA_WAIT_MS {
                    bail!("{reference}: refused for {wait} ms, a per-user quota: {reply}; for benchmarks start the system with higher CHAT_QUOTA_* (scripts/bench does)");
                }
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

/// A `/proc/<pid>/stat` that could not be read or made sense of.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no parent pid and CPU times after the command name")]
    Malformed { path: String },
}

/// What the bench reads from `/proc/<pid>/stat`: the parent and the CPU
/// times in clock ticks, the process's own (every thread) and those of
/// its children it has waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub ppid: u32,
    pub utime: u64,
    pub stime: u64,
    pub cutime: u64,
    pub cstime: u64,
}

impl ProcStat {
    /// Parses the text of `/proc/<pid>/stat`. The command name (2nd
    /// field, in parentheses) may hold spaces and parentheses, so fields
    /// are counted after its last `)`: state, ppid, ..., utime (14th
    /// field), stime, cutime, cstime (17th).
    pub fn parse(stat: &str) -> Option<Self> {
        let after_name = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = after_name.split_whitespace().take(15).collect();
        let [_state, ppid, _pgrp, _session, _tty, _tpgid, _flags, _minflt, _cminflt, _majflt, _cmajflt, utime, stime, cutime, cstime] =
            fields.as_slice()
        else {
            return None;
        };
        Some(Self {
            ppid: ppid.parse().ok()?,
            utime: utime.parse().ok()?,
            stime: stime.parse().ok()?,
            cutime: cutime.parse().ok()?,
            cstime: cstime.parse().ok()?,
        })
    }

    /// Reads `/proc/<pid>/stat`.
    pub fn read(pid: u32) -> Result<Self, ProcError> {
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).map_err(|source| ProcError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&stat).ok_or(ProcError::Malformed { path })
    }

    /// utime + stime: the process's own CPU time.
    pub fn own_ticks(&self) -> u64 {
        self.utime + self.stime
    }

    /// Its own CPU time and that of the children it has reaped (a
    /// postmaster's exited backends end up here).
    pub fn with_reaped_ticks(&self) -> u64 {
        self.own_ticks() + self.cutime + self.cstime
    }
}

/// CPU time (user + system) of `pid` in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64, ProcError> {
    ProcStat::read(pid).map(|stat| stat.own_ticks())
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux if unknown).
pub fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .filter(|ticks: &f64| *ticks > 0.0)
        .unwrap_or(100.0)
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
                            "send refused by the edge's rate limit or a per-user quota: {frame}; for benchmarks start the system with higher CHAT_LIMIT_* and CHAT_QUOTA_* (see the README; scripts/bench does)"
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
    fn proc_stat_is_read_after_the_command_name() {
        // A name with spaces and parentheses must not shift the fields.
        let stat = "4242 (chat (edge) x) S 1 2 3 4 5 6 7 8 9 10 250 50 7 3 20 0 8 0 100";
        let parsed = ProcStat::parse(stat);
        assert_eq!(
            parsed,
            Some(ProcStat {
                ppid: 1,
                utime: 250,
                stime: 50,
                cutime: 7,
                cstime: 3
            })
        );
        assert_eq!(parsed.map(|s| s.own_ticks()), Some(300));
        assert_eq!(parsed.map(|s| s.with_reaped_ticks()), Some(310));
        assert_eq!(ProcStat::parse("4242 (x) S 1 2"), None);
        assert_eq!(ProcStat::parse("no name at all"), None);
        assert_eq!(
            ProcStat::parse("1 (x) S 1 2 3 4 5 6 7 8 9 10 -1 50 0 0"),
            None
        );
    }

    #[test]
    fn this_process_has_a_stat() {
        let own = ProcStat::read(std::process::id()).unwrap();
        assert!(own.ppid > 0);
        assert!(matches!(
            ProcStat::read(u32::MAX),
            Err(ProcError::Read { .. })
        ));
    }

    #[test]
    fn rss_is_read_from_proc_status() {
        let status = "Name:\tchat-edge\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(vm_rss_kib(status), Some(12345));
        assert_eq!(vm_rss_kib("Name:\tx\n"), None);
    }
}
