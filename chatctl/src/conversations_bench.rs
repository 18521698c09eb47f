//! `chatctl bench conversations`: one user in N DM conversations (one
//! message from each of N other users, so every conversation has one
//! unread), then its first `conversations` page asked R times, one at a
//! time, and the latency of each. The list is the user's rows with their
//! unread counters (persister/src/user_index.rs), so the time should not
//! grow with what the conversations hold.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chat_shared::subjects::PERSISTER_CONSUMER;
use chat_shared::Config;
use serde_json::json;

use crate::bench::common::{connect_paced, request, wait_consumed, Percentiles};

#[derive(clap::Args)]
pub struct ConversationsOptions {
    #[arg(long, env = "CHAT_EDGE_URL", default_value = crate::client::DEFAULT_EDGE)]
    pub edge: String,
    /// Conversations the user is in.
    #[arg(long, default_value_t = 1000)]
    pub conversations: usize,
    /// `conversations` requests timed.
    #[arg(long, default_value_t = 500)]
    pub requests: usize,
    /// The page size asked for (1 to 200).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
}

#[derive(Debug, serde::Serialize)]
pub struct ConversationsReport {
    pub conversations: usize,
    pub requests: usize,
    /// Items in each page.
    pub items: usize,
    /// Unread messages the first page counted (one per listed conversation).
    pub unread: u64,
    /// Seconds to send the messages and see them listed.
    pub setup_seconds: f64,
    /// `conversations` request -> reply, milliseconds.
    pub latency_ms: Percentiles,
}

pub async fn conversations(
    config: &Config,
    options: ConversationsOptions,
) -> anyhow::Result<ConversationsReport> {
    if options.conversations == 0 || options.requests == 0 {
        bail!("conversations and requests must be positive");
    }
    let run = crate::client::unique_u64();
    let user = format!("bench{run}c");
    let setup = Instant::now();
    eprintln!(
        "{} users each send {user} one message",
        options.conversations
    );
    for i in 0..options.conversations {
        let mut socket = connect_paced(config, &options.edge, &format!("bench{run}p{i}")).await?;
        let frame =
            json!({"type":"send","to":user,"text":format!("hello {i}"),"client_msg_id":"c"});
        let reply = request(&mut socket, frame, "s").await?;
        if reply["type"] != "sent" {
            bail!("send {i}: {reply}");
        }
    }
    let client = chat_shared::nats::connect(config, "chatctl").await?;
    let js = chat_shared::nats::jetstream(client, config);
    let (poll, limit) = (Duration::from_millis(100), Duration::from_secs(120));
    wait_consumed(&js, config.partitions, PERSISTER_CONSUMER, poll, limit).await?;
    let mut socket = connect_paced(config, &options.edge, &user).await?;
    let page = json!({"type":"conversations","limit":options.limit});
    // The counters follow the messages' commit by a moment.
    let expected = options.conversations.min(options.limit as usize);
    let deadline = Instant::now() + limit;
    let first = loop {
        let reply = request(&mut socket, page.clone(), "first").await?;
        let items = reply["items"].as_array().map_or(0, Vec::len);
        let unread: u64 = reply["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|item| item["unread"].as_u64())
            .sum();
        if items == expected && unread == expected as u64 {
            break reply;
        }
        if Instant::now() > deadline {
            bail!("{user} lists {items} conversations with {unread} unread, not {expected}");
        }
        tokio::time::sleep(poll).await;
    };
    let setup_seconds = setup.elapsed().as_secs_f64();

    eprintln!("{} x conversations of {user}", options.requests);
    let mut micros = Vec::with_capacity(options.requests);
    for i in 0..options.requests {
        let started = Instant::now();
        let reply = request(&mut socket, page.clone(), &format!("q{i}")).await?;
        micros.push(started.elapsed().as_micros() as u64);
        if reply["type"] != "conversations" {
            bail!("request {i}: {reply}");
        }
    }
    let items = first["items"].as_array().context("no items")?;
    Ok(ConversationsReport {
        conversations: options.conversations,
        requests: options.requests,
        items: items.len(),
        unread: items
            .iter()
            .filter_map(|item| item["unread"].as_u64())
            .sum(),
        setup_seconds,
        latency_ms: Percentiles::of(micros),
    })
}

pub fn print(report: &ConversationsReport) {
    println!(
        "conversations: a user in {} conversations, {} requests of a {}-item page ({} unread), set up in {:.2} s",
        report.conversations, report.requests, report.items, report.unread, report.setup_seconds
    );
    let l = &report.latency_ms;
    println!("latency (ms)        p50      p90      p99    p99.9      max");
    println!(
        "request -> reply {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
        l.p50, l.p90, l.p99, l.p999, l.max
    );
}
