//! What a run cost the broker, as the broker counts it: acked JetStream
//! writes (how far every stream's last sequence moved: KV buckets' streams
//! and every background writer included) and, given nats-server's HTTP
//! monitor, the messages it took in and handed out (`/varz` `in_msgs` and
//! `out_msgs`: publishes, requests and their replies, PubAcks, acks, pulls,
//! deliveries). Each is divided by the messages the run sent. A cluster's
//! monitors are given as a comma-separated list and added up (each node
//! counts only what passed through it).
//!
//! Also the JetStream consumers a step creates ([`ConsumerWatch`]): how
//! many existed before and after, and how many the server announced
//! creating in between (a consumer created and deleted again shows only
//! there).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use async_nats::jetstream;
use chat_shared::Config;
use futures::{StreamExt, TryStreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Between the end of a run and the second reading: what a run's end
/// causes (claims written as its connections close) is counted too.
const SETTLE: Duration = Duration::from_secs(1);

/// The readings taken before a run.
pub struct Meter {
    js: jetstream::Context,
    monitor: Option<String>,
    before: Reading,
}

struct Reading {
    /// Last sequence by stream.
    streams: BTreeMap<String, u64>,
    varz: Option<Varz>,
}

#[derive(Debug, Clone, Copy, serde::Deserialize)]
struct Varz {
    in_msgs: u64,
    out_msgs: u64,
}

#[derive(Debug, PartialEq, serde::Serialize)]
pub struct BrokerCost {
    /// Acked JetStream writes per message sent, over every stream.
    pub writes_per_message: f64,
    /// The same for each stream that grew.
    pub writes_by_stream: BTreeMap<String, f64>,
    /// Messages nats-server took in per message sent (with a monitor).
    pub in_msgs_per_message: Option<f64>,
    /// Messages nats-server handed out per message sent (with a monitor).
    pub out_msgs_per_message: Option<f64>,
}

impl Meter {
    /// Reads the counters over NATS as `config`'s user (one that may list
    /// streams: `admin`) and from `monitor` (`http://host:port`), if given.
    pub async fn start(config: &Config, monitor: Option<String>) -> anyhow::Result<Self> {
        let client = chat_shared::nats::connect(config, "chatctl-bench")
            .await
            .context("connecting to NATS to count the broker's work")?;
        let js = chat_shared::nats::jetstream(client, config);
        let before = read(&js, monitor.as_deref()).await?;
        Ok(Self {
            js,
            monitor,
            before,
        })
    }

    /// Reads again (after a moment for the run's end to settle) and
    /// divides what moved by `messages`.
    pub async fn finish(self, messages: usize) -> anyhow::Result<BrokerCost> {
        tokio::time::sleep(SETTLE).await;
        let after = read(&self.js, self.monitor.as_deref()).await?;
        Ok(cost(&self.before, &after, messages))
    }
}

async fn read(js: &jetstream::Context, monitor: Option<&str>) -> anyhow::Result<Reading> {
    let streams = crate::status::collect(js)
        .await
        .context("reading the streams (the `admin` NATS user may)")?
        .into_iter()
        .map(|stream| (stream.name, stream.last_seq))
        .collect();
    let varz = match monitor {
        Some(urls) => Some(varz_sum(urls).await?),
        None => None,
    };
    Ok(Reading { streams, varz })
}

/// `/varz` of every monitor in the comma-separated `urls`, added up.
async fn varz_sum(urls: &str) -> anyhow::Result<Varz> {
    let mut sum = Varz {
        in_msgs: 0,
        out_msgs: 0,
    };
    for url in monitor_urls(urls) {
        let one = varz(url).await.with_context(|| format!("{url}/varz"))?;
        sum.in_msgs += one.in_msgs;
        sum.out_msgs += one.out_msgs;
    }
    Ok(sum)
}

/// The URLs of a comma-separated list, blanks dropped.
fn monitor_urls(urls: &str) -> impl Iterator<Item = &str> {
    urls.split(',').map(str::trim).filter(|url| !url.is_empty())
}

/// `GET /varz` of the monitor at `http://host:port`.
async fn varz(url: &str) -> anyhow::Result<Varz> {
    let Some(host) = url.strip_prefix("http://") else {
        bail!("the monitor URL must be http://host:port");
    };
    let host = host.trim_end_matches('/');
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    let request = format!("GET /varz HTTP/1.0\r\nHost: {host}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8(response)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body))
            if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") =>
        {
            Ok(serde_json::from_str(body)?)
        }
        _ => bail!(
            "unexpected answer: {}",
            response.lines().next().unwrap_or("")
        ),
    }
}

fn cost(before: &Reading, after: &Reading, messages: usize) -> BrokerCost {
    let per = |count: u64| count as f64 / messages.max(1) as f64;
    let writes_by_stream: BTreeMap<String, u64> = after
        .streams
        .iter()
        .map(|(name, last)| {
            let grew = last.saturating_sub(before.streams.get(name).copied().unwrap_or(0));
            (name.clone(), grew)
        })
        .filter(|(_, grew)| *grew > 0)
        .collect();
    let varz = before.varz.zip(after.varz);
    BrokerCost {
        writes_per_message: per(writes_by_stream.values().sum()),
        writes_by_stream: writes_by_stream
            .into_iter()
            .map(|(name, grew)| (name, per(grew)))
            .collect(),
        in_msgs_per_message: varz.map(|(b, a)| per(a.in_msgs.saturating_sub(b.in_msgs))),
        out_msgs_per_message: varz.map(|(b, a)| per(a.out_msgs.saturating_sub(b.out_msgs))),
    }
}

/// The subject of nats-server's consumer-created advisories (every
/// stream, every consumer).
const CONSUMER_CREATED: &str = "$JS.EVENT.ADVISORY.CONSUMER.CREATED.>";
/// Advisories leave the server after the API reply: how long to wait for
/// a step's last ones.
const ADVISORY_SETTLE: Duration = Duration::from_millis(500);

/// The consumers around one step; see [`ConsumerWatch::finish`].
pub struct ConsumerWatch {
    client: async_nats::Client,
    js: jetstream::Context,
    before: usize,
    created: async_nats::Subscriber,
}

/// JetStream consumers around a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Consumers {
    /// Consumers on every stream before the step.
    pub before: usize,
    /// ... and after it.
    pub after: usize,
    /// Consumers nats-server announced creating during the step.
    pub created: usize,
}

impl ConsumerWatch {
    /// Counts the consumers and starts listening for creations, as
    /// `config`'s user (one that may list streams and read advisories:
    /// `admin`).
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        let client = chat_shared::nats::connect(config, "chatctl-bench-consumers")
            .await
            .context("connecting to NATS to count consumers")?;
        let created = client
            .subscribe(CONSUMER_CREATED)
            .await
            .context("subscribing to consumer advisories")?;
        // The subscription is in place before the first count.
        client.flush().await.context("flushing")?;
        let js = chat_shared::nats::jetstream(client.clone(), config);
        let before = consumer_count(&js).await?;
        Ok(Self {
            client,
            js,
            before,
            created,
        })
    }

    /// Counts again, and the advisories seen since [`ConsumerWatch::start`].
    pub async fn finish(mut self) -> anyhow::Result<Consumers> {
        tokio::time::sleep(ADVISORY_SETTLE).await;
        let after = consumer_count(&self.js).await?;
        self.client.flush().await.context("flushing")?;
        let mut created = 0;
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(50), self.created.next()).await
        {
            created += 1;
        }
        Ok(Consumers {
            before: self.before,
            after,
            created,
        })
    }
}

/// Consumers over every stream (KV buckets' included).
async fn consumer_count(js: &jetstream::Context) -> anyhow::Result<usize> {
    let infos: Vec<jetstream::stream::Info> = js
        .streams()
        .try_collect()
        .await
        .context("listing streams (the `admin` NATS user may)")?;
    Ok(infos.iter().map(|info| info.state.consumer_count).sum())
}

pub fn print(cost: &BrokerCost) {
    let by_stream: Vec<String> = cost
        .writes_by_stream
        .iter()
        .map(|(name, per)| format!("{name} {per:.2}"))
        .collect();
    println!(
        "broker per message: {:.2} acked JetStream writes ({})",
        cost.writes_per_message,
        by_stream.join(", ")
    );
    match (cost.in_msgs_per_message, cost.out_msgs_per_message) {
        (Some(into), Some(out)) => {
            println!("broker per message: {into:.2} messages in, {out:.2} out (nats-server /varz)")
        }
        _ => println!("broker per message: messages in/out need --nats-monitor"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(streams: &[(&str, u64)], varz: Option<(u64, u64)>) -> Reading {
        Reading {
            streams: streams.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
            varz: varz.map(|(in_msgs, out_msgs)| Varz { in_msgs, out_msgs }),
        }
    }

    #[test]
    fn what_moved_is_divided_by_the_messages() {
        let before = reading(
            &[("MESSAGES", 10), ("INBOX", 20), ("KV_chat_nodes", 3)],
            Some((100, 200)),
        );
        let after = reading(
            &[
                ("MESSAGES", 110),
                ("INBOX", 220),
                ("KV_chat_nodes", 3),
                ("NEW", 5),
            ],
            Some((1100, 1700)),
        );
        let cost = cost(&before, &after, 100);
        assert_eq!(cost.writes_per_message, 3.05);
        assert_eq!(
            cost.writes_by_stream,
            BTreeMap::from([
                ("INBOX".to_string(), 2.0),
                ("MESSAGES".to_string(), 1.0),
                ("NEW".to_string(), 0.05)
            ])
        );
        assert_eq!(cost.in_msgs_per_message, Some(10.0));
        assert_eq!(cost.out_msgs_per_message, Some(15.0));
        // Without a monitor there are no message counts.
        let blind = super::cost(&reading(&[], None), &reading(&[("MESSAGES", 1)], None), 1);
        assert_eq!(blind.in_msgs_per_message, None);
    }

    #[test]
    fn monitors_are_a_comma_separated_list() {
        let urls: Vec<&str> =
            monitor_urls("http://127.0.0.1:8231, http://127.0.0.1:8232,,").collect();
        assert_eq!(urls, ["http://127.0.0.1:8231", "http://127.0.0.1:8232"]);
        assert_eq!(monitor_urls("http://h:1").count(), 1);
    }
}
