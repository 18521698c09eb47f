//! `chatctl bench group`: G groups of M members, made with `group.create`
//! over WebSocket, every member connected; S senders per group send N
//! messages each. Reports deliveries per second (messages x members
//! received) and send -> delivered latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chat_shared::Config;
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::bench::broker::{BrokerCost, Meter};
use crate::bench::common::Percentiles;
use crate::bench::common::{connect_paced, request, PING_EVERY};
use crate::client::Socket;

/// Connections opened at once while setting up.
const CONNECT_CONCURRENCY: usize = 16;

#[derive(Debug, Clone, clap::Args)]
pub struct GroupOptions {
    #[arg(long, env = "CHAT_EDGE_URL", default_value = crate::client::DEFAULT_EDGE)]
    pub edge: String,
    #[arg(long, default_value_t = 5)]
    pub groups: usize,
    /// Members per group, the owner included.
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Senders per group (the first members).
    #[arg(long, default_value_t = 2)]
    pub senders: usize,
    /// Messages per sender.
    #[arg(long, default_value_t = 100)]
    pub messages: usize,
    /// Sends in flight per sender.
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// nats-server's HTTP monitor (`http://host:port`), for the messages
    /// the broker took in and handed out per group message.
    #[arg(long, env = "CHAT_NATS_MONITOR_URL")]
    pub nats_monitor: Option<String>,
}

#[derive(Debug, serde::Serialize)]
pub struct GroupReport {
    pub groups: usize,
    pub members: usize,
    pub senders: usize,
    /// Messages sent, over every group.
    pub messages: usize,
    /// `message` frames received by members other than the sender.
    pub deliveries: usize,
    pub seconds: f64,
    pub sent_per_second: f64,
    pub deliveries_per_second: f64,
    /// Milliseconds, send -> each member's `message` frame.
    pub delivered_latency: Percentiles,
    /// What the run cost the broker per group message (`None` for a
    /// peer's run).
    pub broker: Option<BrokerCost>,
}

impl GroupOptions {
    /// Refuses a load that cannot run (the same for us and for ejabberd).
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        let (members, senders) = (self.members, self.senders);
        let empty = [self.groups, senders, self.messages, self.window].contains(&0);
        if empty || members < 2 {
            bail!("groups, senders, messages and window must be positive, members at least 2");
        }
        if senders > members {
            bail!("senders ({senders}) cannot exceed members ({members})");
        }
        Ok(())
    }
}

impl GroupReport {
    /// The report of a run of `options` whose sends were all answered after
    /// `sent_seconds` and whose deliveries (latencies in µs) ended after
    /// `seconds`.
    pub(crate) fn of_run(
        options: &GroupOptions,
        sent_seconds: f64,
        seconds: f64,
        latencies: Vec<u64>,
    ) -> Self {
        let total = options.groups * options.senders * options.messages;
        let deliveries = latencies.len();
        Self {
            groups: options.groups,
            members: options.members,
            senders: options.senders,
            messages: total,
            deliveries,
            seconds,
            sent_per_second: crate::bench::common::per_second(total, sent_seconds),
            deliveries_per_second: crate::bench::common::per_second(deliveries, seconds),
            delivered_latency: Percentiles::of(latencies),
            broker: None,
        }
    }
}

/// Waits for every member's task, each `measure`d as when its last send
/// was answered and its delivery latencies: returns the seconds until the
/// last send was answered, until every task ended, and every latency; or
/// the first failure.
pub(crate) async fn gather<T>(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<T>>>,
    began: Instant,
    expected: usize,
    measure: impl Fn(T) -> (Option<Instant>, Vec<u64>),
) -> anyhow::Result<(f64, f64, Vec<u64>)> {
    let mut latencies = Vec::with_capacity(expected);
    let mut sent_seconds = 0.0;
    let mut failure = None;
    for task in tasks {
        match task.await.context("member task")? {
            Ok(measured) => {
                let (sent_done, delivered) = measure(measured);
                if let Some(done) = sent_done {
                    sent_seconds = f64::max(sent_seconds, done.duration_since(began).as_secs_f64());
                }
                latencies.extend(delivered);
            }
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    let seconds = began.elapsed().as_secs_f64();
    match failure {
        Some(e) => Err(e),
        None => Ok((sent_seconds, seconds, latencies)),
    }
}

/// Deliveries one run should produce: every message reaches every member
/// but its sender.
pub fn expected_deliveries(
    groups: usize,
    members: usize,
    senders: usize,
    messages: usize,
) -> usize {
    groups * senders * messages * members.saturating_sub(1)
}

/// The index into the send-instant table of message `n` of sender `s` of
/// group `g`, as carried in its `client_msg_id` (`g<g>s<s>n<n>`).
fn parse_client_msg_id(id: &str, senders: usize, messages: usize) -> Option<usize> {
    let rest = id.strip_prefix('g')?;
    let (g, rest) = rest.split_once('s')?;
    let (s, n) = rest.split_once('n')?;
    let (g, s, n): (usize, usize, usize) = (g.parse().ok()?, s.parse().ok()?, n.parse().ok()?);
    if s >= senders || n >= messages {
        return None;
    }
    Some((g * senders + s) * messages + n)
}

pub async fn group(config: &Config, options: GroupOptions) -> anyhow::Result<GroupReport> {
    let GroupOptions {
        groups,
        members,
        senders,
        messages,
        window,
        ..
    } = options;
    options.check()?;
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = |g: usize, m: usize| format!("bench{run}g{g}m{m}");
    eprintln!(
        "connecting {} members ({groups} groups of {members})",
        groups * members
    );
    let edge = options.edge.clone();
    let mut sockets: Vec<Option<Socket>> = (0..groups * members).map(|_| None).collect();
    let mut connecting = futures::stream::iter(0..groups * members)
        .map(|i| {
            let (edge, user) = (edge.clone(), name(i / members, i % members));
            async move { (i, connect_paced(config, &edge, &user).await) }
        })
        .buffer_unordered(CONNECT_CONCURRENCY);
    while let Some((i, socket)) = connecting.next().await {
        sockets[i] = Some(socket?);
    }
    drop(connecting);

    eprintln!("creating {groups} groups");
    let mut conversations = Vec::with_capacity(groups);
    for g in 0..groups {
        let Some(owner) = sockets[g * members].as_mut() else {
            bail!("group {g}: owner not connected");
        };
        let others: Vec<String> = (1..members).map(|m| name(g, m)).collect();
        let reply = request(
            owner,
            json!({"type":"group.create","name":format!("bench {g}"),"members":others}),
            &format!("create{g}"),
        )
        .await?;
        let Some(id) = reply["group"]["id"].as_str() else {
            bail!("group.create: {reply} (more than CHAT_MAX_GROUP_MEMBERS members?)");
        };
        conversations.push(format!("group:{id}"));
    }

    let total = groups * senders * messages;
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let start = Instant::now();
    let mut readers = Vec::with_capacity(groups * members);
    let mut writers: Vec<JoinHandle<anyhow::Result<()>>> = Vec::with_capacity(groups * members);
    for (i, socket) in sockets.into_iter().enumerate() {
        let Some(socket) = socket else {
            bail!("member {i} not connected");
        };
        let (g, m) = (i / members, i % members);
        let is_sender = m < senders;
        let expected = (senders - usize::from(is_sender)) * messages;
        let (sink, stream) = socket.split();
        let sender_window = is_sender.then(|| Arc::new(Semaphore::new(window)));
        readers.push(tokio::spawn(read_member(
            stream,
            Member {
                me: name(g, m),
                conversation: conversations[g].clone(),
                expected,
                sends: if is_sender { messages } else { 0 },
                senders,
                messages,
            },
            sender_window.clone(),
            sent_at.clone(),
            start,
        )));
        writers.push(tokio::spawn(write_member(
            sink,
            sender_window.map(|window| Sends {
                conversation: conversations[g].clone(),
                first: (g * senders + m) * messages,
                prefix: format!("g{g}s{m}n"),
                count: messages,
                window,
            }),
            sent_at.clone(),
            start,
        )));
    }
    eprintln!("sending {total} messages");
    let meter = Meter::start(config, options.nats_monitor.clone()).await?;
    let began = Instant::now();
    let expected = expected_deliveries(groups, members, senders, messages);
    let gathered = gather(readers, began, expected, |measured| measured).await;
    for writer in writers {
        writer.abort();
    }
    let (sent_seconds, seconds, latencies) = gathered?;
    let broker = meter.finish(total).await?;
    Ok(GroupReport {
        broker: Some(broker),
        ..GroupReport::of_run(&options, sent_seconds, seconds, latencies)
    })
}

struct Member {
    me: String,
    conversation: String,
    /// Deliveries to wait for.
    expected: usize,
    /// `sent` replies to wait for.
    sends: usize,
    senders: usize,
    messages: usize,
}

struct Sends {
    conversation: String,
    /// This sender's first index in the send-instant table.
    first: usize,
    prefix: String,
    count: usize,
    window: Arc<Semaphore>,
}

/// Sends (for a sender) under the window, then keeps the connection alive
/// with pings until aborted.
async fn write_member(
    mut sink: SplitSink<Socket, Message>,
    sends: Option<Sends>,
    sent_at: Arc<Vec<AtomicU64>>,
    start: Instant,
) -> anyhow::Result<()> {
    if let Some(sends) = sends {
        for n in 0..sends.count {
            let Ok(permit) = sends.window.acquire().await else {
                // The reader saw an error and closed the window.
                return Ok(());
            };
            permit.forget();
            if let Some(at) = sent_at.get(sends.first + n) {
                at.store(start.elapsed().as_micros() as u64 + 1, Ordering::Relaxed);
            }
            let frame = json!({"type":"send","ref":n.to_string(),"conversation":sends.conversation,
                "text":format!("bench group message {n}"),"client_msg_id":format!("{}{n}", sends.prefix)});
            sink.send(Message::Text(frame.to_string().into())).await?;
        }
    }
    let ping = Message::Text(json!({"type":"ping"}).to_string().into());
    loop {
        tokio::time::sleep(PING_EVERY).await;
        sink.send(ping.clone()).await?;
    }
}

/// Reads a member's frames until it has every expected delivery (and, for
/// a sender, every `sent`); returns when its last `sent` arrived and each
/// delivery's latency in µs.
async fn read_member(
    mut stream: futures::stream::SplitStream<Socket>,
    member: Member,
    window: Option<Arc<Semaphore>>,
    sent_at: Arc<Vec<AtomicU64>>,
    start: Instant,
) -> anyhow::Result<(Option<Instant>, Vec<u64>)> {
    let mut latencies = Vec::with_capacity(member.expected);
    let mut sent = 0;
    let mut sent_done = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while latencies.len() < member.expected || sent < member.sends {
        let Ok(Some(message)) = tokio::time::timeout_at(deadline, stream.next()).await else {
            bail!(
                "{}: {} of {} deliveries, {sent} of {} sent",
                member.me,
                latencies.len(),
                member.expected,
                member.sends
            );
        };
        let Message::Text(text) = message.with_context(|| format!("{}: connection", member.me))?
        else {
            continue;
        };
        let frame: Value = serde_json::from_str(&text)?;
        match frame["type"].as_str() {
            Some("message")
                if frame["conversation"] == member.conversation.as_str()
                    && frame["from"] != member.me.as_str() =>
            {
                let Some(index) = frame["client_msg_id"]
                    .as_str()
                    .and_then(|id| parse_client_msg_id(id, member.senders, member.messages))
                else {
                    continue;
                };
                let at = sent_at
                    .get(index)
                    .map(|a| a.load(Ordering::Relaxed))
                    .unwrap_or(0);
                let now = start.elapsed().as_micros() as u64;
                latencies.push(now.saturating_sub(at.saturating_sub(1)));
            }
            Some("sent") => {
                sent += 1;
                if sent == member.sends {
                    sent_done = Some(Instant::now());
                }
                if let Some(window) = &window {
                    window.add_permits(1);
                }
            }
            Some("error") => {
                if let Some(window) = &window {
                    window.close();
                }
                if frame["code"] == "rate_limited" {
                    bail!(
                        "{}: send refused by the edge's rate limit or a per-user quota: {frame}; for benchmarks start the system with higher CHAT_LIMIT_* and CHAT_QUOTA_* (see the README; scripts/bench does)",
                        member.me
                    );
                }
                bail!("{}: refused: {frame}", member.me);
            }
            _ => {}
        }
    }
    Ok((sent_done, latencies))
}

pub fn print(report: &GroupReport) {
    println!(
        "group: {} groups of {} members, {} senders each, {} messages in {:.2} s",
        report.groups, report.members, report.senders, report.messages, report.seconds
    );
    println!(
        "{:.0} sent/s, {} deliveries, {:.0} deliveries/s",
        report.sent_per_second, report.deliveries, report.deliveries_per_second
    );
    let p = &report.delivered_latency;
    println!("latency (ms)        p50      p90      p99    p99.9      max");
    println!(
        "send -> delivered {:>7.2}  {:>7.2}  {:>7.2}  {:>7.2}  {:>7.2}",
        p.p50, p.p90, p.p99, p.p999, p.max
    );
    if let Some(broker) = &report.broker {
        crate::bench::broker::print(broker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_but_the_sender_gets_each_message() {
        assert_eq!(expected_deliveries(5, 100, 2, 50), 5 * 2 * 50 * 99);
        assert_eq!(expected_deliveries(1, 1, 1, 10), 0);
    }

    #[test]
    fn client_msg_ids_index_the_send_table() {
        assert_eq!(parse_client_msg_id("g0s0n0", 2, 50), Some(0));
        assert_eq!(parse_client_msg_id("g1s1n3", 2, 50), Some(153));
        assert_eq!(parse_client_msg_id("g1s2n3", 2, 50), None);
        assert_eq!(parse_client_msg_id("g1s1n50", 2, 50), None);
        assert_eq!(parse_client_msg_id("b12", 2, 50), None);
    }
}
