//! `chatctl bench dm|group --peer ejabberd`: the `dm` and `group`
//! workloads driven over XMPP ([`crate::xmpp`]) against an ejabberd this
//! process starts ([`crate::ejabberd`]), and the side-by-side report of our
//! rate and latency as a ratio to ejabberd's, from one run on one machine.
//!
//! Same load, same measures as [`crate::bench::dm`] and
//! [`crate::group_bench::group`]:
//! - "send -> sent" is the stream-management ack (XEP-0198 `<a h>`): the
//!   server has handled the stanza (routed it, and archived the sender's
//!   copy when MAM is on), as our `sent` says the message is stored;
//! - the window is the number of sends awaiting that ack;
//! - "send -> delivered" is from the send to the recipient's read of the
//!   message, timed from the send instant carried in the body.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;

use crate::bench::common::per_second;
use crate::bench::common::Percentiles;
use crate::bench::{DmOptions, DmReport};
use crate::group_bench::{expected_deliveries, gather, GroupOptions, GroupReport};
use crate::xmpp::{Event, Session, MUC_DOMAIN};

/// Logins in flight while setting up.
const CONNECT_CONCURRENCY: usize = 16;
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// A run that makes no progress for this long has lost messages.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The server measured against ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Peer {
    Ejabberd,
}

/// ejabberd's message archive (`mod_mam`): on (Mnesia, ejabberd's
/// default) or in PostgreSQL (`sql`: the server ours persists to, a
/// database of its own) for a comparison with our persisted history, off
/// for its in-memory ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mam {
    On,
    Off,
    Sql,
}

impl Mam {
    /// The archive to start ejabberd with; `database_url` is our
    /// PostgreSQL (`CHAT_DATABASE_URL`), used with `sql` only.
    pub fn archive(self, database_url: &str) -> crate::ejabberd::Archive {
        use crate::ejabberd::Archive;
        match self {
            Self::On => Archive::Mnesia,
            Self::Off => Archive::Off,
            Self::Sql => Archive::Sql {
                server: database_url.to_string(),
            },
        }
    }
}

/// Our number divided by ejabberd's: rate above 1 means we deliver more
/// per second, latency above 1 means we are slower.
#[derive(Debug, serde::Serialize)]
pub struct Ratios {
    pub delivered_per_second: f64,
    pub delivered_p50: f64,
    pub delivered_p99: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct DmComparison {
    pub peer: Peer,
    pub peer_version: String,
    pub mam: Mam,
    pub window: usize,
    pub ours: DmReport,
    pub ejabberd: DmReport,
    /// ours / ejabberd.
    pub ratio: Ratios,
}

#[derive(Debug, serde::Serialize)]
pub struct GroupComparison {
    pub peer: Peer,
    pub peer_version: String,
    pub mam: Mam,
    pub window: usize,
    pub ours: GroupReport,
    pub ejabberd: GroupReport,
    /// ours / ejabberd.
    pub ratio: Ratios,
}

fn ratio(ours: f64, theirs: f64) -> f64 {
    if theirs > 0.0 {
        ours / theirs
    } else {
        f64::NAN
    }
}

impl Ratios {
    fn of(ours: (f64, &Percentiles), theirs: (f64, &Percentiles)) -> Self {
        Self {
            delivered_per_second: ratio(ours.0, theirs.0),
            delivered_p50: ratio(ours.1.p50, theirs.1.p50),
            delivered_p99: ratio(ours.1.p99, theirs.1.p99),
        }
    }
}

/// Our `dm` run (already measured) next to the same load on ejabberd;
/// `database_url` as in [`Mam::archive`].
pub async fn compare_dm(
    ours: DmReport,
    options: &DmOptions,
    mam: Mam,
    database_url: &str,
) -> anyhow::Result<DmComparison> {
    eprintln!("starting ejabberd (mam {mam:?})");
    let server = crate::ejabberd::Ejabberd::start(mam.archive(database_url)).await?;
    let theirs = dm(server.addr(), options).await?;
    Ok(DmComparison {
        peer: Peer::Ejabberd,
        peer_version: server.version().to_owned(),
        mam,
        window: options.window,
        ratio: Ratios::of(
            (ours.delivered_per_second, &ours.delivered_latency),
            (theirs.delivered_per_second, &theirs.delivered_latency),
        ),
        ours,
        ejabberd: theirs,
    })
}

/// Our `group` run (already measured) next to the same load on ejabberd;
/// `database_url` as in [`Mam::archive`].
pub async fn compare_group(
    ours: GroupReport,
    options: &GroupOptions,
    mam: Mam,
    database_url: &str,
) -> anyhow::Result<GroupComparison> {
    eprintln!("starting ejabberd (mam {mam:?})");
    let server = crate::ejabberd::Ejabberd::start(mam.archive(database_url)).await?;
    let theirs = group(server.addr(), options).await?;
    Ok(GroupComparison {
        peer: Peer::Ejabberd,
        peer_version: server.version().to_owned(),
        mam,
        window: options.window,
        ratio: Ratios::of(
            (ours.deliveries_per_second, &ours.delivered_latency),
            (theirs.deliveries_per_second, &theirs.delivered_latency),
        ),
        ours,
        ejabberd: theirs,
    })
}

/// Logs in `count` anonymous sessions.
async fn sessions(addr: SocketAddr, count: usize) -> anyhow::Result<Vec<Session>> {
    let mut logins = futures::stream::iter(0..count)
        .map(|_| Session::connect(addr, LOGIN_TIMEOUT))
        .buffered(CONNECT_CONCURRENCY);
    let mut sessions = Vec::with_capacity(count);
    while let Some(session) = logins.next().await {
        sessions.push(session.context("xmpp login")?);
    }
    Ok(sessions)
}

/// µs since `start`.
fn micros(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

/// A body carrying its send instant: `<µs since start>:<label>`.
fn body(at: u64, label: &str) -> String {
    format!("{at}:{label}")
}

/// Send -> now in µs, from a body made by [`body`]; `None` for anything else.
fn latency_of(body: &str, start: Instant) -> Option<u64> {
    let (sent, _) = body.split_once(':')?;
    let sent: u64 = sent.parse().ok()?;
    Some(micros(start).saturating_sub(sent))
}

/// What one connection does in a run.
struct Plan {
    /// Where its messages go: a full JID (chat) or a room (groupchat).
    to: Option<String>,
    groupchat: bool,
    /// Label prefix of its messages.
    prefix: String,
    sends: usize,
    window: usize,
    /// Deliveries to wait for.
    expected: usize,
    /// Only messages from JIDs starting with this count...
    from_prefix: String,
    /// ...except those from exactly this one (a room's echo of our own).
    not_from: Option<String>,
}

/// What one connection measured.
#[derive(Default)]
struct Measured {
    acked: Vec<u64>,
    delivered: Vec<u64>,
    /// When the last ack arrived.
    sent_done: Option<Instant>,
}

/// Sends under the window and reads acks and deliveries until both are
/// complete.
async fn drive(mut session: Session, plan: Plan, start: Instant) -> anyhow::Result<Measured> {
    let mut measured = Measured {
        acked: Vec::with_capacity(plan.sends),
        delivered: Vec::with_capacity(plan.expected),
        sent_done: None,
    };
    // (h the server's ack reaches once it has handled the message, send µs)
    let mut in_flight: VecDeque<(u64, u64)> = VecDeque::with_capacity(plan.window);
    let mut next = 0;
    while measured.acked.len() < plan.sends || measured.delivered.len() < plan.expected {
        while next < plan.sends && in_flight.len() < plan.window {
            let Some(to) = plan.to.as_deref() else {
                bail!("a sender without a destination");
            };
            let at = micros(start);
            let label = format!("{}{next}", plan.prefix);
            let text = body(at, &label);
            let h = if plan.groupchat {
                session.send_groupchat(to, &label, &text).await?
            } else {
                session.send_chat(to, &label, &text).await?
            };
            in_flight.push_back((h, at));
            next += 1;
        }
        let Ok(event) = tokio::time::timeout(STALL_TIMEOUT, session.events.recv()).await else {
            bail!(
                "{}: stalled at {} of {} acks, {} of {} deliveries",
                session.jid,
                measured.acked.len(),
                plan.sends,
                measured.delivered.len(),
                plan.expected
            );
        };
        match event {
            Some(Event::Acked(h)) => {
                while in_flight.front().is_some_and(|(due, _)| *due <= h) {
                    if let Some((_, at)) = in_flight.pop_front() {
                        measured.acked.push(micros(start).saturating_sub(at));
                    }
                }
                if measured.acked.len() == plan.sends && measured.sent_done.is_none() {
                    measured.sent_done = Some(Instant::now());
                }
            }
            Some(Event::Message { from, body, .. }) => {
                if from.starts_with(&plan.from_prefix)
                    && plan.not_from.as_deref() != Some(from.as_str())
                {
                    if let Some(latency) = latency_of(&body, start) {
                        measured.delivered.push(latency);
                    }
                }
            }
            Some(Event::Joined { .. }) => {}
            Some(Event::Closed(why)) => bail!("{}: {why}", session.jid),
            None => bail!("{}: reader gone", session.jid),
        }
    }
    Ok(measured)
}

/// The `dm` workload over XMPP: `pairs` senders, each sending `messages`
/// chats to its own receiver with at most `window` unacked.
pub async fn dm(addr: SocketAddr, options: &DmOptions) -> anyhow::Result<DmReport> {
    let DmOptions {
        pairs,
        messages,
        window,
        ..
    } = *options;
    if pairs == 0 || messages == 0 || window == 0 {
        bail!("pairs, messages and window must be positive");
    }
    if options.rate.is_some() {
        bail!("--rate is not supported with --peer: both sides run flat out");
    }
    eprintln!("xmpp: logging in {} users", 2 * pairs);
    let mut all = sessions(addr, 2 * pairs).await?.into_iter();
    let start = Instant::now();
    let mut senders = Vec::with_capacity(pairs);
    let mut receivers = Vec::with_capacity(pairs);
    // Anonymous logins get random JIDs: pair them in login order.
    while let (Some(sender), Some(receiver)) = (all.next(), all.next()) {
        let receive = Plan {
            to: None,
            groupchat: false,
            prefix: String::new(),
            sends: 0,
            window,
            expected: messages,
            from_prefix: sender.jid.clone(),
            not_from: None,
        };
        let send = Plan {
            to: Some(receiver.jid.clone()),
            groupchat: false,
            prefix: "b".into(),
            sends: messages,
            window,
            expected: 0,
            from_prefix: String::new(),
            not_from: None,
        };
        receivers.push(tokio::spawn(drive(receiver, receive, start)));
        senders.push(tokio::spawn(drive(sender, send, start)));
    }
    eprintln!("xmpp: sending {} messages", pairs * messages);
    let began = Instant::now();
    let mut sent_latency = Vec::with_capacity(pairs * messages);
    for task in senders {
        sent_latency.extend(task.await.context("sender task")??.acked);
    }
    let sent_seconds = began.elapsed().as_secs_f64();
    let mut delivered_latency = Vec::with_capacity(pairs * messages);
    for task in receivers {
        delivered_latency.extend(task.await.context("receiver task")??.delivered);
    }
    let seconds = began.elapsed().as_secs_f64();
    let total = pairs * messages;
    Ok(DmReport {
        pairs,
        messages: total,
        delivered: delivered_latency.len(),
        seconds,
        sent_per_second: per_second(total, sent_seconds),
        delivered_per_second: per_second(delivered_latency.len(), seconds),
        persisted_seconds: None,
        persisted_per_second: None,
        sent_latency: Percentiles::of(sent_latency),
        delivered_latency: Percentiles::of(delivered_latency),
        offered_per_second: None,
        memory: Vec::new(),
        broker: None,
        cpu: None,
    })
}

/// The `group` workload over XMPP: one MUC room per group, every member
/// joined, the first `senders` members send `messages` each.
pub async fn group(addr: SocketAddr, options: &GroupOptions) -> anyhow::Result<GroupReport> {
    let (groups, members, senders) = (options.groups, options.members, options.senders);
    let (messages, window) = (options.messages, options.window);
    options.check()?;
    let run = crate::client::unique_u64();
    let room = |g: usize| format!("bench{run:x}g{g}@{MUC_DOMAIN}");
    eprintln!(
        "xmpp: logging in {} members ({groups} rooms of {members})",
        groups * members
    );
    let sessions = sessions(addr, groups * members).await?;
    eprintln!("xmpp: joining {groups} rooms");
    let mut joining = futures::stream::iter(sessions.into_iter().enumerate())
        .map(|(i, mut session)| {
            let room = room(i / members);
            async move {
                session
                    .join(&room, &format!("m{}", i % members), LOGIN_TIMEOUT)
                    .await
                    .map(|()| (i, session))
            }
        })
        // Joins in member order so the first member creates the room.
        .buffered(1);
    let mut joined = Vec::with_capacity(groups * members);
    while let Some(session) = joining.next().await {
        joined.push(session.context("joining a room")?);
    }
    drop(joining);

    let total = groups * senders * messages;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(groups * members);
    for (i, session) in joined {
        let (g, m) = (i / members, i % members);
        let is_sender = m < senders;
        let plan = Plan {
            to: Some(room(g)),
            groupchat: true,
            prefix: format!("g{g}s{m}n"),
            sends: if is_sender { messages } else { 0 },
            window,
            expected: (senders - usize::from(is_sender)) * messages,
            from_prefix: format!("{}/", room(g)),
            not_from: Some(format!("{}/m{m}", room(g))),
        };
        tasks.push(tokio::spawn(drive(session, plan, start)));
    }
    eprintln!("xmpp: sending {total} messages");
    let began = Instant::now();
    let expected = expected_deliveries(groups, members, senders, messages);
    let measure = |m: Measured| (m.sent_done, m.delivered);
    let (sent_seconds, seconds, latencies) = gather(tasks, began, expected, measure).await?;
    Ok(GroupReport::of_run(
        options,
        sent_seconds,
        seconds,
        latencies,
    ))
}

fn print_ratios(
    title: &str,
    rate: &str,
    ours: (f64, &Percentiles),
    theirs: (f64, &Percentiles),
    ratio: &Ratios,
) {
    println!("{title}");
    println!(
        "{:<26} {:>12} {:>12} {:>14}",
        "", "ours", "ejabberd", "ours/ejabberd"
    );
    println!(
        "{rate:<26} {:>12.0} {:>12.0} {:>14.3}",
        ours.0, theirs.0, ratio.delivered_per_second
    );
    println!(
        "{:<26} {:>12.2} {:>12.2} {:>14.3}",
        "send -> delivered p50 (ms)", ours.1.p50, theirs.1.p50, ratio.delivered_p50
    );
    println!(
        "{:<26} {:>12.2} {:>12.2} {:>14.3}",
        "send -> delivered p99 (ms)", ours.1.p99, theirs.1.p99, ratio.delivered_p99
    );
}

pub fn print_dm(c: &DmComparison) {
    println!("== ours");
    crate::bench::print(&c.ours);
    println!("== ejabberd {} (mam {:?})", c.peer_version, c.mam);
    crate::bench::print(&c.ejabberd);
    println!();
    print_ratios(
        &format!(
            "dm, {} pairs x {} messages, window {}: ours vs ejabberd {} (mam {:?})",
            c.ours.pairs,
            c.ours.messages / c.ours.pairs.max(1),
            c.window,
            c.peer_version,
            c.mam
        ),
        "delivered/s",
        (c.ours.delivered_per_second, &c.ours.delivered_latency),
        (
            c.ejabberd.delivered_per_second,
            &c.ejabberd.delivered_latency,
        ),
        &c.ratio,
    );
}

pub fn print_group(c: &GroupComparison) {
    println!("== ours");
    crate::group_bench::print(&c.ours);
    println!("== ejabberd {} (mam {:?})", c.peer_version, c.mam);
    crate::group_bench::print(&c.ejabberd);
    println!();
    print_ratios(
        &format!(
            "group, {} x {} members, {} senders, window {}: ours vs ejabberd {} (mam {:?})",
            c.ours.groups, c.ours.members, c.ours.senders, c.window, c.peer_version, c.mam
        ),
        "deliveries/s",
        (c.ours.deliveries_per_second, &c.ours.delivered_latency),
        (
            c.ejabberd.deliveries_per_second,
            &c.ejabberd.delivered_latency,
        ),
        &c.ratio,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_the_send_instant() {
        let start = Instant::now() - Duration::from_millis(5);
        let b = body(micros(start), "g0s1n2");
        assert!(b.ends_with(":g0s1n2"));
        assert!(latency_of(&b, start).is_some_and(|us| us < 1_000_000));
        assert_eq!(latency_of("hello", start), None);
        assert_eq!(latency_of("x:1", start), None);
    }

    #[test]
    fn ratios_are_ours_over_theirs() {
        assert_eq!(ratio(50.0, 100.0), 0.5);
        assert!(ratio(1.0, 0.0).is_nan());
    }
}
