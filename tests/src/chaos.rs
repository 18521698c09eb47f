//! The fault-injection checker, after Jepsen's queue checks.
//!
//! A [`Workload`] runs senders and recording devices against a
//! [`Deployment`] (every service its own process, so faults can kill them)
//! while a fault schedule runs. Each sender sends `(sender, seq)` messages
//! with `client_msg_id = <sender>-<seq>` and retries the same id until it
//! gets `sent`; every device records every `message` frame it receives,
//! per connection. After the faults heal and everything drains, [`check`]
//! classifies the history:
//! - lost: acked (`sent`) but missing on some device of some member,
//!   split by where in that sender's stream the gap is (prefix, middle,
//!   postfix);
//! - unexpected: received but never attempted;
//! - duplicates within one connection (PROTOCOL.md: never), and
//!   redeliveries across reconnects (allowed, deduped by `id`);
//! - one attempt stored under two ids;
//! - per-sender order per device;
//! - PostgreSQL: every acked message stored, none stored twice;
//! - dead letters, apart from those of a poison event the scenario
//!   injected on purpose.
//!
//! Every try of every send is logged with when it was written and
//! answered, and how; a fault schedule marks moments
//! ([`Deployment::mark`]), and [`History::window`] counts the answers
//! between two of them (e.g. no `sent` while a quorum is lost).
//!
//! The history is written as JSON lines under `target/chaos/<scenario>/`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chat_shared::ids::UserId;
use chat_shared::{auth, Config};
use futures::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::process::{Service, ServiceProcess};
use crate::servers::{repo_root, NatsCluster, PgCluster};
use crate::{fresh_database, nats_password, NatsServer, JWT_SECRET};

// ------------------------------------------------------------- deployment

/// The NATS side of a deployment.
pub enum Nats {
    Single(NatsServer),
    Cluster(NatsCluster),
}

impl Nats {
    fn url(&self) -> String {
        match self {
            Nats::Single(server) => server.url(),
            Nats::Cluster(cluster) => cluster.url(),
        }
    }
}

/// A whole system with every service in its own process: two edges, a
/// router, a persister, presence and pushd.
pub struct Deployment {
    pub nats: Nats,
    pub config: Config,
    binary: String,
    pub edges: Vec<ServiceProcess>,
    /// The WebSocket URLs the workload's clients use, kept current as
    /// edges are replaced.
    pub edge_urls: EdgeUrls,
    services: HashMap<&'static str, ServiceProcess>,
    /// Time zero of the run: marks, answers and receipts are in ms since.
    epoch: tokio::time::Instant,
    /// What the fault schedule noted, with when.
    marks: Arc<Mutex<Vec<Mark>>>,
    /// `kill -9`s done per service name (`edge` for every edge).
    kills: BTreeMap<&'static str, u32>,
    /// Dead letters a scenario caused on purpose: `(stream, sequence)` of
    /// the original event.
    expected_dead: Vec<(String, u64)>,
}

/// A moment the fault schedule noted ([`Deployment::mark`]).
#[derive(Debug, Clone, Serialize)]
pub struct Mark {
    pub what: String,
    /// ms since the deployment started.
    pub at_ms: u64,
}

/// One event of the DEADLETTER stream.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// `chat.dead.<consumer>`.
    pub subject: String,
    /// The stream and sequence of the original event.
    pub stream: String,
    pub seq: u64,
    pub reason: String,
    pub payload: String,
}

/// The mark a fault schedule sets once its fault is in full effect, and
/// the one it sets just before it starts to heal it: [`scenario`] reports
/// the answers in between as [`Report::during_fault`].
pub const FAULT: &str = "fault";
pub const HEALING: &str = "healing";

impl Deployment {
    /// Starts everything on `nats`; `binary` is
    /// `env!("CARGO_BIN_EXE_service-under-test")`.
    pub async fn start(binary: &str, nats: Nats) -> Result<Self> {
        let database_url = fresh_database().await?;
        let stream_replicas = match &nats {
            Nats::Single(_) => 1,
            Nats::Cluster(cluster) => cluster.len(),
        };
        let config = Config {
            stream_replicas,
            ..crate::test_config(nats.url(), database_url)
        };
        let mut deployment = Self {
            nats,
            config,
            binary: binary.to_string(),
            edges: Vec::new(),
            edge_urls: EdgeUrls::default(),
            services: HashMap::new(),
            epoch: tokio::time::Instant::now(),
            marks: Arc::default(),
            kills: BTreeMap::new(),
            expected_dead: Vec::new(),
        };
        for service in [
            Service::Persister,
            Service::Router,
            Service::Presence,
            Service::Pushd,
        ] {
            let process = deployment.spawn(service).await?;
            deployment.services.insert(service.name(), process);
        }
        for _ in 0..2 {
            deployment.add_edge().await?;
        }
        crate::wait_rpc_ready(&deployment.config).await?;
        crate::wait_presence_leader(&deployment.config).await?;
        Ok(deployment)
    }

    fn config_for(&self, service: Service) -> Config {
        Config {
            nats_user: Some(service.name().into()),
            nats_password: Some(nats_password(service.name()).into()),
            ..self.config.clone()
        }
    }

    async fn spawn(&self, service: Service) -> Result<ServiceProcess> {
        ServiceProcess::spawn(&self.binary, service, &self.config_for(service)).await
    }

    async fn add_edge(&mut self) -> Result<()> {
        let edge = self.spawn(Service::Edge).await?;
        self.edge_urls.add(format!("ws://{}/v1/ws", edge.addr));
        self.edges.push(edge);
        Ok(())
    }

    /// One more edge, connected to NATS at `nats_url` only (one node of a
    /// cluster), among those the clients pick from.
    pub async fn add_edge_on(&mut self, nats_url: String) -> Result<()> {
        let config = Config {
            nats_url,
            ..self.config_for(Service::Edge)
        };
        let edge = ServiceProcess::spawn(&self.binary, Service::Edge, &config).await?;
        self.edge_urls.add(format!("ws://{}/v1/ws", edge.addr));
        self.edges.push(edge);
        Ok(())
    }

    /// `kill -9` of a backend service (not an edge), then a new one.
    pub async fn kill_and_restart(&mut self, service: Service) -> Result<()> {
        self.kill(service).await?;
        self.restart(service).await
    }

    /// `kill -9` of a backend service, which stays down until
    /// [`Deployment::restart`].
    pub async fn kill(&mut self, service: Service) -> Result<()> {
        let mut process = self
            .services
            .remove(service.name())
            .with_context(|| format!("{} is not running", service.name()))?;
        process.kill().await?;
        *self.kills.entry(service.name()).or_default() += 1;
        Ok(())
    }

    /// SIGTERM of a backend service (not an edge), as an orchestrator
    /// stops it; its exit code, once it exited within `within`. It stays
    /// down until [`Deployment::restart`].
    pub async fn stop(&mut self, service: Service, within: Duration) -> Result<Option<i32>> {
        let mut process = self
            .services
            .remove(service.name())
            .with_context(|| format!("{} is not running", service.name()))?;
        process.terminate()?;
        process.wait(within).await
    }

    /// How many times `service` was killed (every edge counts as `Edge`).
    pub fn kills(&self, service: Service) -> u32 {
        self.kills.get(service.name()).copied().unwrap_or(0)
    }

    /// The process id of the running `service` (not an edge).
    pub fn pid(&self, service: Service) -> Option<u32> {
        self.services.get(service.name()).and_then(|p| p.pid())
    }

    /// Whether `service` (not an edge) has a running process.
    pub fn running(&mut self, service: Service) -> bool {
        self.services
            .get_mut(service.name())
            .is_some_and(|p| p.running())
    }

    /// Whether every edge process is running.
    pub fn edges_running(&mut self) -> bool {
        self.edges.iter_mut().all(|edge| edge.running())
    }

    /// ms since the deployment started.
    pub fn now_ms(&self) -> u64 {
        millis_since(self.epoch)
    }

    /// Notes that `what` happens now; returns when (ms since the start).
    pub fn mark(&self, what: &str) -> u64 {
        let at_ms = self.now_ms();
        if let Ok(mut marks) = self.marks.lock() {
            marks.push(Mark {
                what: what.to_string(),
                at_ms,
            });
        }
        at_ms
    }

    /// Declares that the event at `seq` of `stream` is meant to be
    /// dead-lettered (a poison event the scenario injected): its dead
    /// letters are counted as expected, not as a failure.
    pub fn expect_dead_letter(&mut self, stream: &str, seq: u64) {
        self.expected_dead.push((stream.to_string(), seq));
    }

    /// Of `missing` `(device, id)` deliveries, those whose item is in the
    /// device's user's INBOX (appended, but its live frame never reached
    /// the device and its cursor moved past it), read item by item.
    pub async fn missing_but_in_inbox(&self, missing: &[(String, u64)]) -> Result<usize> {
        if missing.is_empty() {
            return Ok(0);
        }
        let js = self.admin_js().await?;
        let mut stream = js.get_stream(chat_shared::subjects::INBOX_STREAM).await?;
        let state = stream.info().await?.state.clone();
        let mut items: HashSet<(String, u64)> = HashSet::new();
        for seq in state.first_sequence..=state.last_sequence {
            let Ok(item) = stream.get_raw_message(seq).await else {
                continue;
            };
            let Some(msg_id) = item.headers.get(chat_shared::subjects::MSG_ID_HEADER) else {
                continue;
            };
            if let Some((id, user)) = msg_id.as_str().rsplit_once(':') {
                if let Ok(id) = id.parse() {
                    items.insert((user.to_string(), id));
                }
            }
        }
        Ok(missing
            .iter()
            .filter(|(device, id)| {
                let user = device.split('/').next().unwrap_or_default();
                items.contains(&(user.to_string(), *id))
            })
            .count())
    }

    /// A JetStream context as the `admin` NATS user.
    pub async fn admin_js(&self) -> Result<async_nats::jetstream::Context> {
        let admin =
            chat_shared::nats::connect(&crate::config_as(&self.config, "admin"), "chaos").await?;
        Ok(async_nats::jetstream::new(admin))
    }

    pub async fn restart(&mut self, service: Service) -> Result<()> {
        let process = self.spawn(service).await?;
        self.services.insert(service.name(), process);
        Ok(())
    }

    /// `kill -9` of edge `index`; a new edge takes its place in the list
    /// clients pick from (their reconnects go to the survivors meanwhile).
    pub async fn kill_edge(&mut self, index: usize) -> Result<()> {
        let mut edge = self.edges.remove(index);
        self.edge_urls.remove(&format!("ws://{}/v1/ws", edge.addr));
        edge.kill().await?;
        *self.kills.entry(Service::Edge.name()).or_default() += 1;
        self.add_edge().await
    }

    /// A client of `user` on one of the edges, read up to `synced`.
    pub async fn connect(&self, user: &str, device: &str) -> Result<crate::Client> {
        let url = self.edge_urls.pick(0).context("no edge")?;
        let mut client = crate::Client::open(&url).await?;
        client
            .send(json!({"type":"hello","token":self.token(user)?,"device":device}))
            .await?;
        client.recv_type("synced").await?;
        Ok(client)
    }

    /// A token for `user`.
    pub fn token(&self, user: &str) -> Result<String> {
        let user = UserId::parse(user).context("a chaos user id")?;
        Ok(auth::mint_hs256(
            JWT_SECRET,
            &user,
            Duration::from_secs(3600),
        )?)
    }

    /// A direct PostgreSQL connection to this deployment's database.
    pub async fn database(&self) -> Result<tokio_postgres::Client> {
        let (client, connection) =
            tokio_postgres::connect(&self.config.database_url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// Every event the DEADLETTER stream holds.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        use chat_shared::subjects;
        let js = self.admin_js().await?;
        let mut stream = js
            .get_stream(subjects::DEADLETTER_STREAM)
            .await
            .context("the DEADLETTER stream")?;
        let state = stream.info().await?.state.clone();
        let mut dead = Vec::new();
        if state.messages == 0 {
            return Ok(dead);
        }
        for seq in state.first_sequence..=state.last_sequence {
            let Ok(message) = stream.get_raw_message(seq).await else {
                continue; // deleted
            };
            let header = |name: &str| {
                message
                    .headers
                    .get(name)
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default()
            };
            dead.push(DeadLetter {
                subject: message.subject.to_string(),
                stream: header(subjects::DEAD_STREAM_HEADER),
                seq: header(subjects::DEAD_SEQ_HEADER).parse().unwrap_or(0),
                reason: header(subjects::DEAD_REASON_HEADER),
                payload: String::from_utf8_lossy(&message.payload).into_owned(),
            });
        }
        Ok(dead)
    }

    /// `(sender, client_msg_id)` pairs stored more than once, counted by
    /// PostgreSQL itself. The unique index on the pair makes this
    /// structurally 0; the query guards against the index going away.
    pub async fn duplicated_in_database(&self) -> Result<usize> {
        let rows = self
            .database()
            .await?
            .query(
                "SELECT sender, client_msg_id FROM messages WHERE sender LIKE 'chaos-%' \
                 GROUP BY 1, 2 HAVING count(*) > 1",
                &[],
            )
            .await?;
        Ok(rows.len())
    }

    /// The process-wide PostgreSQL server, to stop and start it.
    pub async fn postgres(&self) -> Result<&'static PgCluster> {
        PgCluster::shared().await
    }
}

/// The edge URLs clients connect to; a client takes the next one each time
/// it (re)connects.
#[derive(Clone, Default)]
pub struct EdgeUrls(Arc<Mutex<Vec<String>>>);

impl EdgeUrls {
    fn add(&self, url: String) {
        if let Ok(mut urls) = self.0.lock() {
            urls.push(url);
        }
    }

    fn remove(&self, url: &str) {
        if let Ok(mut urls) = self.0.lock() {
            urls.retain(|u| u != url);
        }
    }

    fn pick(&self, turn: usize) -> Option<String> {
        let urls = self.0.lock().ok()?;
        (!urls.is_empty()).then(|| urls[turn % urls.len()].clone())
    }
}

// --------------------------------------------------------------- workload

/// What the clients do during a run.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Seeds every sender's choice of conversation.
    pub seed: u64,
    /// Users `chaos-0`..: paired into DMs (0-1, 2-3, ...) and all in one
    /// group. Even.
    pub users: usize,
    /// Devices per user; device 0 also sends.
    pub devices: usize,
    /// Pause between one sender's messages.
    pub send_interval: Duration,
    /// How long the senders start new messages.
    pub duration: Duration,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            seed: 42,
            users: 4,
            devices: 2,
            send_interval: Duration::from_millis(40),
            duration: Duration::from_secs(20),
        }
    }
}

/// How long a sender keeps retrying its last message after the run, and
/// how long the devices get to catch up.
const SETTLE: Duration = Duration::from_secs(90);
/// How long one send waits for its reply before it is retried.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// One message a sender tried to send.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub sender: String,
    pub seq: u64,
    pub client_msg_id: String,
    pub conversation: String,
    /// The id from `sent`, if one came.
    pub acked: Option<u64>,
    /// Tries it took (1 = no retry).
    pub tries: u32,
    /// The longest any one try waited for its answer once it was written
    /// to a connection (or gave up at the send timeout), in ms: how fast a
    /// fault is reported. Time spent waiting for a connection is not in it.
    pub slowest_try_ms: u64,
    /// An error that ends retrying (bad_request, forbidden): must not
    /// happen in a fault run.
    pub refused: Option<String>,
    /// Every try, in order.
    pub log: Vec<Try>,
}

/// One try of a send. Times are ms since the deployment started.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Try {
    /// When the sender handed it to its device's connection.
    pub started_ms: u64,
    /// When it was written to a connection (none took it: `None`).
    pub written_ms: Option<u64>,
    /// When its answer came, or when the sender stopped waiting.
    pub answered_ms: u64,
    /// `sent`; an error code (`unavailable`, `internal`, `rate_limited`,
    /// ...); `disconnected` (the connection ended before an answer);
    /// `timeout` (written, no answer within [`SEND_TIMEOUT`]);
    /// `no_connection` (no connection took it within [`SEND_TIMEOUT`]).
    pub outcome: String,
    /// A `sent` with `duplicate: true`: an earlier try was stored.
    pub duplicate: bool,
}

impl Try {
    /// How long it waited for its answer after it was written.
    pub fn waited_ms(&self) -> Option<u64> {
        self.written_ms
            .map(|written| self.answered_ms.saturating_sub(written))
    }
}

fn millis_since(epoch: tokio::time::Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A `sent` answered this long after a fault began may still be for a
/// publish acknowledged before it (its answer was on its way).
pub const IN_FLIGHT_GRACE_MS: u64 = 2_000;

/// What the senders were answered while a fault was on, between two
/// marks (`from_ms`..=`to_ms`). A try "touches" the window when it was
/// started before its end and answered after its start.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Window {
    pub from_ms: u64,
    pub to_ms: u64,
    /// `sent` answered in the window to a try written in it, or more than
    /// [`IN_FLIGHT_GRACE_MS`] into it: acknowledged during the fault.
    /// Not counting duplicates.
    pub sent: usize,
    /// `sent` with `duplicate: true` in the window: a retry of a message
    /// an earlier try had stored (a stream leader can answer that
    /// without a quorum).
    pub sent_duplicate: usize,
    /// `sent` answered early in the window to a try written before it
    /// (acknowledged before the fault, answered after).
    pub sent_in_flight: usize,
    /// Answers in the window, by kind.
    pub unavailable: usize,
    pub disconnected: usize,
    pub other_errors: usize,
    /// Tries touching the window that were written and got no answer
    /// within [`SEND_TIMEOUT`]: a hang.
    pub timed_out: usize,
    /// Tries touching the window that no connection took within
    /// [`SEND_TIMEOUT`] (every session refused or reconnecting).
    pub no_connection: usize,
    /// Tries touching the window that were written and answered.
    pub answered: usize,
    /// The longest of those waited for its answer, in ms.
    pub slowest_answer_ms: u64,
}

/// One `message` frame a device received.
#[derive(Debug, Clone, Serialize)]
pub struct Received {
    /// The device's connection it came on (1 = first).
    pub connection: u32,
    /// When it arrived, ms since the deployment started.
    pub at_ms: u64,
    pub id: u64,
    pub conversation: String,
    pub from: String,
    pub client_msg_id: String,
}

/// Everything a run saw.
#[derive(Debug, Default, Serialize)]
pub struct History {
    pub attempts: Vec<Attempt>,
    /// `<user>/<device>` -> what it received, in order.
    pub received: BTreeMap<String, Vec<Received>>,
    /// Conversation -> its member users.
    pub members: HashMap<String, Vec<String>>,
    /// How many times each device connected.
    pub connections: BTreeMap<String, u32>,
    /// What the fault schedule noted.
    pub marks: Vec<Mark>,
}

impl History {
    fn acked(&self) -> impl Iterator<Item = (&Attempt, u64)> {
        self.attempts
            .iter()
            .filter_map(|attempt| attempt.acked.map(|id| (attempt, id)))
    }

    /// `(device, id)` of every acked message a member device lacks.
    pub fn missing_deliveries(&self) -> Vec<(String, u64)> {
        let mut seen: HashMap<&str, HashSet<u64>> = HashMap::new();
        for (device, items) in &self.received {
            seen.insert(device, items.iter().map(|r| r.id).collect());
        }
        let mut missing = Vec::new();
        for (attempt, id) in self.acked() {
            for device in self.devices_of(&attempt.conversation) {
                let got = seen
                    .get(device.as_str())
                    .is_some_and(|ids| ids.contains(&id));
                if !got {
                    missing.push((device, id));
                }
            }
        }
        missing
    }

    /// Whether every device has every acked message of its conversations.
    fn complete(&self) -> bool {
        let mut seen: HashMap<&str, HashSet<u64>> = HashMap::new();
        for (device, items) in &self.received {
            seen.insert(device, items.iter().map(|r| r.id).collect());
        }
        self.acked().all(|(attempt, id)| {
            self.devices_of(&attempt.conversation).iter().all(|device| {
                seen.get(device.as_str())
                    .is_some_and(|ids| ids.contains(&id))
            })
        })
    }

    /// When `what` was marked first (ms since the start).
    pub fn mark(&self, what: &str) -> Option<u64> {
        self.marks.iter().find(|m| m.what == what).map(|m| m.at_ms)
    }

    /// The answers senders got between `from_ms` and `to_ms`.
    pub fn window(&self, from_ms: u64, to_ms: u64) -> Window {
        let mut window = Window {
            from_ms,
            to_ms,
            ..Window::default()
        };
        for attempt in &self.attempts {
            for try_ in &attempt.log {
                let answered_in = (from_ms..=to_ms).contains(&try_.answered_ms);
                if answered_in {
                    match try_.outcome.as_str() {
                        "sent" if try_.duplicate => window.sent_duplicate += 1,
                        "sent" => {
                            let written_before = try_.written_ms.is_some_and(|w| w < from_ms);
                            if written_before && try_.answered_ms < from_ms + IN_FLIGHT_GRACE_MS {
                                window.sent_in_flight += 1;
                            } else {
                                window.sent += 1;
                            }
                        }
                        "unavailable" => window.unavailable += 1,
                        "disconnected" => window.disconnected += 1,
                        "timeout" | "no_connection" => {}
                        _ => window.other_errors += 1,
                    }
                }
                let touches = try_.started_ms <= to_ms && try_.answered_ms >= from_ms;
                if !touches {
                    continue;
                }
                match (try_.outcome.as_str(), try_.waited_ms()) {
                    ("timeout", _) => window.timed_out += 1,
                    ("no_connection", _) => window.no_connection += 1,
                    (_, Some(waited)) => {
                        window.answered += 1;
                        window.slowest_answer_ms = window.slowest_answer_ms.max(waited);
                    }
                    _ => {}
                }
            }
        }
        window
    }

    /// The acked attempts whose successful try was written between
    /// `from_ms` and `to_ms`: sent while a fault was on.
    pub fn acked_written_between(&self, from_ms: u64, to_ms: u64) -> Vec<&Attempt> {
        self.attempts
            .iter()
            .filter(|attempt| {
                attempt.acked.is_some()
                    && attempt.log.last().is_some_and(|t| {
                        t.outcome == "sent"
                            && t.written_ms.is_some_and(|w| (from_ms..=to_ms).contains(&w))
                    })
            })
            .collect()
    }

    /// When the first device of `attempt`'s conversation received it
    /// (ms since the start), and when the last one did.
    pub fn received_at(&self, attempt: &Attempt) -> Option<(u64, u64)> {
        let id = attempt.acked?;
        let mut first: Option<u64> = None;
        let mut last: Option<u64> = None;
        for device in self.devices_of(&attempt.conversation) {
            let at = self
                .received
                .get(&device)?
                .iter()
                .find(|r| r.id == id)?
                .at_ms;
            first = Some(first.map_or(at, |f| f.min(at)));
            last = Some(last.map_or(at, |l| l.max(at)));
        }
        first.zip(last)
    }

    fn devices_of(&self, conversation: &str) -> Vec<String> {
        let users = self.members.get(conversation).cloned().unwrap_or_default();
        self.received
            .keys()
            .filter(|device| {
                let user = device.split('/').next().unwrap_or_default();
                users.iter().any(|member| member == user)
            })
            .cloned()
            .collect()
    }

    /// Writes the history as JSON lines under `target/chaos/<scenario>/`.
    pub fn write(&self, scenario: &str, report: &Report) -> Result<PathBuf> {
        let dir = repo_root().join("target/chaos").join(scenario);
        std::fs::create_dir_all(&dir)?;
        let lines = |items: Vec<String>| items.join("\n") + "\n";
        let attempts = self
            .attempts
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()?;
        std::fs::write(dir.join("attempts.jsonl"), lines(attempts))?;
        for (device, items) in &self.received {
            let received = items
                .iter()
                .map(serde_json::to_string)
                .collect::<Result<Vec<_>, _>>()?;
            let name = device.replace('/', "-");
            std::fs::write(dir.join(format!("{name}.jsonl")), lines(received))?;
        }
        std::fs::write(
            dir.join("marks.json"),
            serde_json::to_string_pretty(&self.marks)?,
        )?;
        std::fs::write(
            dir.join("report.json"),
            serde_json::to_string_pretty(report)?,
        )?;
        Ok(dir)
    }
}

/// A request from a sender to its device's connection.
struct Request {
    frame: Value,
    reply: oneshot::Sender<Value>,
    /// When the frame went out on a connection (unset while there is
    /// none): the answer time is measured from here.
    written: Arc<std::sync::OnceLock<tokio::time::Instant>>,
}

/// Runs `workload` against `deployment`'s edges while `faults` runs, then
/// lets everything settle and returns the history. `faults` gets the
/// deployment and must leave it healed.
pub async fn run<F>(deployment: &mut Deployment, workload: &Workload, faults: F) -> Result<History>
where
    F: for<'a> FnOnce(
        &'a mut Deployment,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<()>> + 'a>>,
{
    if workload.users < 2 || workload.users % 2 != 0 || workload.devices == 0 {
        bail!("a workload needs an even number of users and at least one device");
    }
    let users: Vec<String> = (0..workload.users).map(|i| format!("chaos-{i}")).collect();
    let group = create_group(deployment, &users).await?;
    let mut members: HashMap<String, Vec<String>> = HashMap::new();
    members.insert(format!("group:{group}"), users.clone());
    for pair in users.chunks(2) {
        members.insert(format!("dm:{}:{}", pair[0], pair[1]), pair.to_vec());
    }

    let (stop_devices, devices_stopped) = watch::channel(false);
    let (stop_senders, senders_stopped) = watch::channel(false);
    let logs: Arc<Mutex<BTreeMap<String, Vec<Received>>>> = Arc::default();
    let connections: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let mut device_tasks = Vec::new();
    let mut senders = Vec::new();
    let (ready_tx, mut ready_rx) = mpsc::channel(workload.users * workload.devices);
    for (index, user) in users.iter().enumerate() {
        let token = deployment.token(user)?;
        for device in 0..workload.devices {
            let name = format!("{user}/d{device}");
            if let Ok(mut logs) = logs.lock() {
                logs.insert(name.clone(), Vec::new());
            }
            let (requests_tx, requests_rx) = mpsc::channel(1);
            let connection = DeviceConnection {
                name,
                device: format!("d{device}"),
                token: token.clone(),
                urls: deployment.edge_urls.clone(),
                turn: index + device,
                logs: logs.clone(),
                connections: connections.clone(),
                requests: (device == 0).then_some(requests_rx),
                ready: Some(ready_tx.clone()),
                stop: devices_stopped.clone(),
                epoch: deployment.epoch,
            };
            device_tasks.push(tokio::spawn(connection.run()));
            if device == 0 {
                let partner = users[index ^ 1].clone();
                let (low, high) = if *user < partner {
                    (user.clone(), partner.clone())
                } else {
                    (partner.clone(), user.clone())
                };
                let sender = Sender {
                    user: user.clone(),
                    partner,
                    dm: format!("dm:{low}:{high}"),
                    group: format!("group:{group}"),
                    rng: StdRng::seed_from_u64(workload.seed.wrapping_add(index as u64)),
                    interval: workload.send_interval,
                    requests: requests_tx,
                    stop: senders_stopped.clone(),
                    epoch: deployment.epoch,
                };
                senders.push(sender);
            }
        }
    }
    // Every device has its first `synced` before anyone sends: a device's
    // first hello carries no cursor and starts at the head, so a message
    // sent before it would not be its to receive.
    drop(ready_tx);
    for _ in 0..workload.users * workload.devices {
        tokio::time::timeout(SETTLE, ready_rx.recv())
            .await
            .context("the devices did not all connect")?
            .context("a device stopped before it connected")?;
    }
    let sender_tasks: Vec<_> = senders
        .into_iter()
        .map(|sender| tokio::spawn(sender.run()))
        .collect();

    let duration = workload.duration;
    let stopper = async {
        tokio::time::sleep(duration).await;
        let _ = stop_senders.send(true);
    };
    let (faulted, ()) = tokio::join!(faults(deployment), stopper);
    let mut attempts = Vec::new();
    for task in sender_tasks {
        attempts.extend(task.await.context("a sender task")?);
    }
    let mut history = History {
        attempts,
        received: BTreeMap::new(),
        members,
        connections: BTreeMap::new(),
        marks: Vec::new(),
    };
    // Let every device catch up, then stop them.
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        history.received = logs.lock().map(|l| l.clone()).unwrap_or_default();
        if history.complete() || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop_devices.send(true);
    for task in device_tasks {
        let _ = task.await;
    }
    history.received = logs.lock().map(|l| l.clone()).unwrap_or_default();
    history.connections = connections.lock().map(|c| c.clone()).unwrap_or_default();
    history.marks = deployment
        .marks
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    faulted.context("the fault schedule")?;
    Ok(history)
}

async fn create_group(deployment: &Deployment, users: &[String]) -> Result<String> {
    let mut client = deployment.connect(&users[0], "setup").await?;
    let reply = client
        .request(json!({"type":"group.create","name":"chaos","members":&users[1..]}))
        .await?;
    let id = reply["group"]["id"]
        .as_str()
        .with_context(|| format!("group.create answered {reply}"))?
        .to_string();
    client.close().await?;
    Ok(id)
}

struct Sender {
    user: String,
    partner: String,
    dm: String,
    group: String,
    rng: StdRng,
    interval: Duration,
    requests: mpsc::Sender<Request>,
    stop: watch::Receiver<bool>,
    epoch: tokio::time::Instant,
}

impl Sender {
    async fn run(mut self) -> Vec<Attempt> {
        let mut attempts = Vec::new();
        for seq in 0.. {
            if *self.stop.borrow() {
                break;
            }
            let to_group = self.rng.random_bool(0.5);
            let client_msg_id = format!("{}-{seq}", self.user);
            let mut frame = json!({
                "type": "send",
                "text": format!("chaos {} {seq}", self.user),
                "client_msg_id": client_msg_id,
            });
            let conversation = if to_group {
                frame["conversation"] = json!(self.group);
                self.group.clone()
            } else {
                frame["to"] = json!(self.partner);
                self.dm.clone()
            };
            let mut attempt = Attempt {
                sender: self.user.clone(),
                seq,
                client_msg_id,
                conversation,
                acked: None,
                tries: 0,
                slowest_try_ms: 0,
                refused: None,
                log: Vec::new(),
            };
            self.deliver(&mut attempt, frame).await;
            attempts.push(attempt);
            tokio::time::sleep(self.interval).await;
        }
        attempts
    }

    /// Retries `frame` until `sent`, a refusal, or the settle time after
    /// the run is over.
    async fn deliver(&mut self, attempt: &mut Attempt, frame: Value) {
        let mut give_up = None;
        loop {
            let now = tokio::time::Instant::now();
            if *self.stop.borrow() {
                let at = *give_up.get_or_insert(now + SETTLE);
                if now > at {
                    return;
                }
            }
            attempt.tries += 1;
            let started_ms = millis_since(self.epoch);
            let (reply, answer) = oneshot::channel();
            let written = Arc::new(std::sync::OnceLock::new());
            let request = Request {
                frame: frame.clone(),
                reply,
                written: written.clone(),
            };
            let answered = tokio::time::timeout(SEND_TIMEOUT, async {
                self.requests.send(request).await.ok()?;
                answer.await.ok()
            })
            .await;
            let answered_ms = millis_since(self.epoch);
            let written_ms = written.get().map(|at| {
                let at = at.saturating_duration_since(self.epoch).as_millis();
                u64::try_from(at).unwrap_or(u64::MAX)
            });
            let outcome = match &answered {
                Ok(Some(reply)) if reply["type"] == "sent" => "sent".to_string(),
                Ok(Some(reply)) => reply["code"].as_str().unwrap_or("error").to_string(),
                // The connection took the request and dropped it unwritten.
                Ok(None) => "disconnected".to_string(),
                Err(_) if written_ms.is_some() => "timeout".to_string(),
                Err(_) => "no_connection".to_string(),
            };
            let duplicate = matches!(&answered, Ok(Some(reply)) if reply["duplicate"] == true);
            let try_ = Try {
                started_ms,
                written_ms,
                answered_ms,
                outcome,
                duplicate,
            };
            if let Some(waited) = try_.waited_ms() {
                attempt.slowest_try_ms = attempt.slowest_try_ms.max(waited);
            }
            attempt.log.push(try_);
            let retry_in = match answered {
                Ok(Some(reply)) if reply["type"] == "sent" => {
                    attempt.acked = reply["id"].as_str().and_then(|id| id.parse().ok());
                    return;
                }
                Ok(Some(reply)) => match reply["code"].as_str() {
                    Some("unavailable" | "internal" | "disconnected") => 100,
                    Some("rate_limited") => reply["retry_after_ms"].as_u64().unwrap_or(100),
                    _ => {
                        attempt.refused = Some(reply.to_string());
                        return;
                    }
                },
                // No connection, or no answer in time: the same id again.
                _ => 100,
            };
            tokio::time::sleep(Duration::from_millis(retry_in)).await;
        }
    }
}

/// One device: connects to an edge, resumes from its last cursor after
/// every disconnect, records messages, acks, and carries its sender's
/// requests.
struct DeviceConnection {
    name: String,
    device: String,
    token: String,
    urls: EdgeUrls,
    turn: usize,
    logs: Arc<Mutex<BTreeMap<String, Vec<Received>>>>,
    connections: Arc<Mutex<BTreeMap<String, u32>>>,
    requests: Option<mpsc::Receiver<Request>>,
    /// Told once, at the first `synced`.
    ready: Option<mpsc::Sender<()>>,
    stop: watch::Receiver<bool>,
    epoch: tokio::time::Instant,
}

impl DeviceConnection {
    async fn run(mut self) {
        let mut cursor: Option<String> = None;
        let mut connection = 0u32;
        let mut quick_failures = 0u32;
        while !*self.stop.borrow() {
            self.turn += 1;
            let Some(url) = self.urls.pick(self.turn) else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(Ok((socket, _))) = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_tungstenite::connect_async(url.as_str()),
            )
            .await
            else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            connection += 1;
            if let Ok(mut connections) = self.connections.lock() {
                connections.insert(self.name.clone(), connection);
            }
            let started = tokio::time::Instant::now();
            self.session(socket, connection, &mut cursor).await;
            // A session refused at once (the backend is away) is retried
            // after a growing pause, as real clients back off.
            if started.elapsed() < Duration::from_secs(2) {
                quick_failures += 1;
                let pause = 100u64 << quick_failures.min(4);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            } else {
                quick_failures = 0;
            }
        }
    }

    /// One connection, until it ends or the run stops.
    async fn session(
        &mut self,
        socket: tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        connection: u32,
        cursor: &mut Option<String>,
    ) {
        let (mut sink, mut stream) = socket.split();
        let mut hello = json!({"type":"hello","token":self.token,"device":self.device});
        if let Some(cursor) = cursor.as_ref() {
            hello["cursor"] = json!(cursor);
        }
        if sink
            .send(Message::Text(hello.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
        let mut synced = false;
        let mut in_flight: HashMap<String, oneshot::Sender<Value>> = HashMap::new();
        let mut next_ref = 0u64;
        let mut acked_cursor: Option<String> = None;
        let mut ack_tick = tokio::time::interval(Duration::from_millis(500));
        let mut ping_tick = tokio::time::interval(Duration::from_secs(5));
        let mut stop = self.stop.clone();
        loop {
            let requests = self.requests.as_mut().filter(|_| synced);
            tokio::select! {
                _ = stop.changed() => return,
                frame = stream.next() => {
                    let frame: Value = match frame {
                        Some(Ok(Message::Text(text))) => match serde_json::from_str(&text) {
                            Ok(frame) => frame,
                            Err(_) => continue,
                        },
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                        Some(Ok(_)) => continue,
                    };
                    match frame["type"].as_str() {
                        Some("synced") => {
                            synced = true;
                            if let Some(ready) = self.ready.take() {
                                let _ = ready.send(()).await;
                            }
                            // The head: a device that received nothing yet
                            // resumes from here, not from the newest item
                            // at its next connect (PROTOCOL.md: clients
                            // store every cursor they are given).
                            if let Some(c) = frame["cursor"].as_str() {
                                if cursor.is_none() {
                                    *cursor = Some(c.to_string());
                                }
                            }
                        }
                        Some("message") => {
                            self.record(connection, &frame);
                            if let Some(c) = frame["cursor"].as_str() {
                                *cursor = Some(c.to_string());
                            }
                        }
                        Some("membership") => {
                            if let Some(c) = frame["cursor"].as_str() {
                                *cursor = Some(c.to_string());
                            }
                        }
                        _ => {
                            if let Some(reply) = frame["ref"].as_str().and_then(|r| in_flight.remove(r)) {
                                let _ = reply.send(frame);
                            }
                        }
                    }
                }
                request = async {
                    match requests {
                        Some(requests) => requests.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let Some(mut request) = request else { continue };
                    next_ref += 1;
                    let reference = format!("s{next_ref}");
                    request.frame["ref"] = json!(reference);
                    if sink.send(Message::Text(request.frame.to_string().into())).await.is_err() {
                        break;
                    }
                    let _ = request.written.set(tokio::time::Instant::now());
                    in_flight.insert(reference, request.reply);
                }
                _ = ack_tick.tick() => {
                    if cursor.is_some() && *cursor != acked_cursor {
                        let ack = json!({"type":"ack","cursor":cursor});
                        if sink.send(Message::Text(ack.to_string().into())).await.is_err() {
                            break;
                        }
                        acked_cursor = cursor.clone();
                    }
                }
                _ = ping_tick.tick() => {
                    if sink.send(Message::Text(json!({"type":"ping"}).to_string().into())).await.is_err() {
                        break;
                    }
                }
            }
        }
        // The connection is gone: its requests get an answer now (the
        // sender retries with the same client_msg_id).
        for (_, reply) in in_flight {
            let _ = reply.send(json!({"type":"error","code":"disconnected"}));
        }
    }

    fn record(&self, connection: u32, frame: &Value) {
        let text = |field: &str| frame[field].as_str().unwrap_or_default().to_string();
        let Some(id) = frame["id"].as_str().and_then(|id| id.parse().ok()) else {
            return;
        };
        let received = Received {
            connection,
            at_ms: millis_since(self.epoch),
            id,
            conversation: text("conversation"),
            from: text("from"),
            client_msg_id: text("client_msg_id"),
        };
        if let Ok(mut logs) = self.logs.lock() {
            logs.entry(self.name.clone()).or_default().push(received);
        }
    }
}

// ---------------------------------------------------------------- checker

/// A row of the history store.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: u64,
    pub sender: String,
    pub client_msg_id: String,
}

/// What [`check`] found.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Report {
    pub attempted: usize,
    pub acked: usize,
    /// Attempted, never acked (the run ended first): may or may not exist.
    pub unacked: usize,
    /// Attempts refused with a client error (must be 0).
    pub refused: usize,
    /// Sends that needed more than one try.
    pub retried: usize,
    /// The longest one try of any send waited for its answer, in ms (a
    /// try that got none counts [`SEND_TIMEOUT`]).
    pub slowest_try_ms: u64,
    /// Tries written to a connection that got no answer within
    /// [`SEND_TIMEOUT`].
    pub timed_out_tries: usize,
    /// acked x member devices.
    pub expected_deliveries: usize,
    pub lost: usize,
    pub lost_prefix: usize,
    pub lost_middle: usize,
    pub lost_postfix: usize,
    /// Of the lost, those whose item is in the member's INBOX: appended,
    /// but never delivered to that device (its live frame was lost and
    /// its cursor moved past it, so no resume brings it).
    pub lost_but_in_inbox: usize,
    /// Received, but no sender attempted it.
    pub unexpected: usize,
    /// The same id twice on one connection (PROTOCOL.md: never).
    pub duplicated_in_connection: usize,
    /// The same id again on a later connection of a device (deduped by id;
    /// allowed, counted for information).
    pub redelivered_after_reconnect: usize,
    /// One attempt seen under two different ids.
    pub stored_twice: usize,
    /// A device saw a sender's messages in one conversation out of order.
    pub out_of_order: usize,
    /// Device connections beyond the first.
    pub reconnects: usize,
    /// Acked, but not in PostgreSQL.
    pub missing_in_database: usize,
    /// (sender, client_msg_id) stored more than once in PostgreSQL.
    pub duplicated_in_database: usize,
    /// Events in the DEADLETTER stream the scenario did not cause on
    /// purpose: a consumer gave up on one, or one exhausted its
    /// deliveries (a database outage must not do that).
    pub dead_letters: u64,
    /// Dead letters of the poison events the scenario injected
    /// ([`Deployment::expect_dead_letter`]).
    pub dead_letters_expected: u64,
    /// The answers between the marks [`FAULT`] and [`HEALING`], where the
    /// scenario set them.
    pub during_fault: Option<Window>,
}

impl Report {
    /// Fails unless nothing was lost, duplicated, reordered or refused.
    pub fn assert_clean(&self) -> Result<()> {
        let problems = [
            ("lost", self.lost),
            ("unexpected", self.unexpected),
            (
                "duplicated within a connection",
                self.duplicated_in_connection,
            ),
            ("stored twice", self.stored_twice),
            ("out of order", self.out_of_order),
            ("refused", self.refused),
            ("missing in the database", self.missing_in_database),
            ("duplicated in the database", self.duplicated_in_database),
            (
                "dead-lettered",
                usize::try_from(self.dead_letters).unwrap_or(usize::MAX),
            ),
        ];
        let found: Vec<String> = problems
            .iter()
            .filter(|(_, count)| *count > 0)
            .map(|(what, count)| format!("{count} {what}"))
            .collect();
        if !found.is_empty() {
            bail!("the checker found: {} ({self:?})", found.join(", "));
        }
        if self.acked == 0 {
            bail!("nothing was acked: the run proves nothing ({self:?})");
        }
        Ok(())
    }
}

/// Classifies `history` and the rows `stored` in PostgreSQL.
pub fn check(history: &History, stored: &[Stored]) -> Report {
    let mut report = Report {
        attempted: history.attempts.len(),
        ..Default::default()
    };
    let attempted: HashMap<(&str, &str), &Attempt> = history
        .attempts
        .iter()
        .map(|a| ((a.sender.as_str(), a.client_msg_id.as_str()), a))
        .collect();
    for attempt in &history.attempts {
        match (attempt.acked, &attempt.refused) {
            (Some(_), _) => report.acked += 1,
            (None, Some(_)) => report.refused += 1,
            (None, None) => report.unacked += 1,
        }
        if attempt.tries > 1 {
            report.retried += 1;
        }
        report.timed_out_tries += attempt
            .log
            .iter()
            .filter(|t| t.outcome == "timeout")
            .count();
        report.slowest_try_ms = report.slowest_try_ms.max(attempt.slowest_try_ms);
    }
    report.reconnects = history
        .connections
        .values()
        .map(|c| c.saturating_sub(1) as usize)
        .sum();

    // Ids seen per attempt, across all devices.
    let mut ids_of_attempt: HashMap<(&str, &str), HashSet<u64>> = HashMap::new();
    for (attempt, id) in history.acked() {
        ids_of_attempt
            .entry((attempt.sender.as_str(), attempt.client_msg_id.as_str()))
            .or_default()
            .insert(id);
    }

    for (device, items) in &history.received {
        let mut per_connection: HashSet<(u32, u64)> = HashSet::new();
        let mut seen: HashSet<u64> = HashSet::new();
        // (conversation, sender) -> last seq seen, for order.
        let mut last_seq: HashMap<(&str, &str), u64> = HashMap::new();
        for item in items {
            if !per_connection.insert((item.connection, item.id)) {
                report.duplicated_in_connection += 1;
                continue;
            }
            if !seen.insert(item.id) {
                report.redelivered_after_reconnect += 1;
                continue;
            }
            let key = (item.from.as_str(), item.client_msg_id.as_str());
            let Some(attempt) = attempted.get(&key) else {
                report.unexpected += 1;
                continue;
            };
            ids_of_attempt.entry(key).or_default().insert(item.id);
            let order_key = (item.conversation.as_str(), item.from.as_str());
            if let Some(previous) = last_seq.get(&order_key) {
                if attempt.seq <= *previous {
                    report.out_of_order += 1;
                }
            }
            last_seq.insert(order_key, attempt.seq);
        }

        // Lost: acked messages of this device's conversations it lacks,
        // by where they sit in each sender's stream.
        let user = device.split('/').next().unwrap_or_default();
        let mut streams: BTreeMap<&str, Vec<(u64, bool)>> = BTreeMap::new();
        for (attempt, id) in history.acked() {
            let member = history
                .members
                .get(&attempt.conversation)
                .is_some_and(|users| users.iter().any(|u| u == user));
            if member {
                streams
                    .entry(attempt.sender.as_str())
                    .or_default()
                    .push((attempt.seq, seen.contains(&id)));
            }
        }
        for stream in streams.values_mut() {
            stream.sort_unstable();
            report.expected_deliveries += stream.len();
            let first = stream.iter().position(|(_, got)| *got);
            let last = stream.iter().rposition(|(_, got)| *got);
            for (index, (_, got)) in stream.iter().enumerate() {
                if *got {
                    continue;
                }
                report.lost += 1;
                match (first, last) {
                    (Some(first), _) if index < first => report.lost_prefix += 1,
                    (_, Some(last)) if index > last => report.lost_postfix += 1,
                    (Some(_), Some(_)) => report.lost_middle += 1,
                    _ => report.lost_postfix += 1,
                }
            }
        }
    }
    report.stored_twice = ids_of_attempt.values().filter(|ids| ids.len() > 1).count();

    let mut stored_ids: HashSet<u64> = HashSet::new();
    let mut stored_keys: HashMap<(&str, &str), usize> = HashMap::new();
    for row in stored {
        stored_ids.insert(row.id);
        *stored_keys
            .entry((row.sender.as_str(), row.client_msg_id.as_str()))
            .or_default() += 1;
    }
    report.missing_in_database = history
        .acked()
        .filter(|(_, id)| !stored_ids.contains(id))
        .count();
    report.duplicated_in_database = stored_keys.values().filter(|n| **n > 1).count();
    report
}

/// Reads the chaos users' messages from PostgreSQL, waiting (up to the
/// settle time) until every acked one is there: the persister may lag.
pub async fn stored_messages(deployment: &Deployment, history: &History) -> Result<Vec<Stored>> {
    let acked: HashSet<u64> = history.acked().map(|(_, id)| id).collect();
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let rows = match deployment.database().await {
            Ok(db) => db
                .query(
                    "SELECT id, sender, client_msg_id FROM messages WHERE sender LIKE 'chaos-%'",
                    &[],
                )
                .await
                .map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        if let Ok(rows) = &rows {
            let stored: Vec<Stored> = rows
                .iter()
                .map(|row| Stored {
                    id: row.get::<_, i64>(0) as u64,
                    sender: row.get(1),
                    client_msg_id: row.get(2),
                })
                .collect();
            let ids: HashSet<u64> = stored.iter().map(|s| s.id).collect();
            if acked.is_subset(&ids) || tokio::time::Instant::now() > deadline {
                return Ok(stored);
            }
        } else if tokio::time::Instant::now() > deadline {
            return rows.map(|_| Vec::new());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What a scenario saw and found.
pub struct Outcome {
    pub report: Report,
    pub history: History,
    /// Everything in the DEADLETTER stream afterwards.
    pub dead_letters: Vec<DeadLetter>,
}

/// Runs a scenario end to end: the workload under `faults`, the checks,
/// the history written to `target/chaos/<scenario>/`, and a line for the
/// log. Returns the report (the caller asserts).
pub async fn scenario<F>(
    name: &str,
    deployment: &mut Deployment,
    workload: &Workload,
    faults: F,
) -> Result<Report>
where
    F: for<'a> FnOnce(
        &'a mut Deployment,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<()>> + 'a>>,
{
    Ok(scenario_outcome(name, deployment, workload, faults)
        .await?
        .report)
}

/// [`scenario`], also returning the history and the dead letters for
/// assertions about when things happened.
pub async fn scenario_outcome<F>(
    name: &str,
    deployment: &mut Deployment,
    workload: &Workload,
    faults: F,
) -> Result<Outcome>
where
    F: for<'a> FnOnce(
        &'a mut Deployment,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<()>> + 'a>>,
{
    let history = run(deployment, workload, faults).await?;
    let stored = stored_messages(deployment, &history).await?;
    let mut report = check(&history, &stored);
    if report.lost > 0 {
        report.lost_but_in_inbox = deployment
            .missing_but_in_inbox(&history.missing_deliveries())
            .await?;
    }
    report.duplicated_in_database = report
        .duplicated_in_database
        .max(deployment.duplicated_in_database().await?);
    let dead_letters = deployment.dead_letters().await?;
    let expected = |dead: &DeadLetter| {
        deployment
            .expected_dead
            .iter()
            .any(|(stream, seq)| *stream == dead.stream && *seq == dead.seq)
    };
    report.dead_letters_expected = dead_letters.iter().filter(|d| expected(d)).count() as u64;
    report.dead_letters = dead_letters.len() as u64 - report.dead_letters_expected;
    if let (Some(from), Some(to)) = (history.mark(FAULT), history.mark(HEALING)) {
        report.during_fault = Some(history.window(from, to));
    }
    let dir = history.write(name, &report)?;
    let dead_lines = dead_letters
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<Vec<_>, _>>()?;
    std::fs::write(dir.join("dead_letters.jsonl"), dead_lines.join("\n") + "\n")?;
    if let Some(window) = &report.during_fault {
        println!("chaos {name}: during the fault {window:?}");
    }
    println!(
        "chaos {name}: attempted {} acked {} lost {} duplicated {} (in connection) \
         redelivered {} stored twice {} out of order {} reconnects {} retried {} slowest try {} ms \
         timed-out tries {} db missing {} db duplicated {} dead letters {} (+{} expected) -> {}",
        report.attempted,
        report.acked,
        report.lost,
        report.duplicated_in_connection,
        report.redelivered_after_reconnect,
        report.stored_twice,
        report.out_of_order,
        report.reconnects,
        report.retried,
        report.slowest_try_ms,
        report.timed_out_tries,
        report.missing_in_database,
        report.duplicated_in_database,
        report.dead_letters,
        report.dead_letters_expected,
        dir.display()
    );
    Ok(Outcome {
        report,
        history,
        dead_letters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(sender: &str, seq: u64, conversation: &str, acked: Option<u64>) -> Attempt {
        Attempt {
            sender: sender.into(),
            seq,
            client_msg_id: format!("{sender}-{seq}"),
            conversation: conversation.into(),
            acked,
            tries: 1,
            slowest_try_ms: 0,
            refused: None,
            log: Vec::new(),
        }
    }

    fn got(connection: u32, id: u64, from: &str, seq: u64) -> Received {
        Received {
            connection,
            at_ms: 0,
            id,
            conversation: "dm:a:b".into(),
            from: from.into(),
            client_msg_id: format!("{from}-{seq}"),
        }
    }

    fn history(received: Vec<Received>) -> History {
        let mut members = HashMap::new();
        members.insert("dm:a:b".to_string(), vec!["a".to_string(), "b".to_string()]);
        let mut by_device = BTreeMap::new();
        by_device.insert("b/d0".to_string(), received);
        History {
            attempts: (0..5)
                .map(|seq| attempt("a", seq, "dm:a:b", Some(100 + seq)))
                .collect(),
            received: by_device,
            members,
            connections: BTreeMap::new(),
            marks: Vec::new(),
        }
    }

    fn stored_all() -> Vec<Stored> {
        (0..5)
            .map(|seq| Stored {
                id: 100 + seq,
                sender: "a".into(),
                client_msg_id: format!("a-{seq}"),
            })
            .collect()
    }

    #[test]
    fn a_complete_history_is_clean() {
        let history = history((0..5).map(|seq| got(1, 100 + seq, "a", seq)).collect());
        assert!(history.complete());
        let report = check(&history, &stored_all());
        assert_eq!(report.acked, 5);
        assert_eq!(report.expected_deliveries, 5);
        report.assert_clean().unwrap();
    }

    #[test]
    fn gaps_are_lost_by_position() {
        // Received 1 and 3 of 0..5: 0 is a prefix loss, 2 middle, 4 postfix.
        let history = history(vec![got(1, 101, "a", 1), got(1, 103, "a", 3)]);
        assert!(!history.complete());
        assert_eq!(
            history.missing_deliveries(),
            [100, 102, 104].map(|id| ("b/d0".to_string(), id))
        );
        let report = check(&history, &stored_all());
        assert_eq!(
            (
                report.lost,
                report.lost_prefix,
                report.lost_middle,
                report.lost_postfix
            ),
            (3, 1, 1, 1)
        );
        assert!(report.assert_clean().is_err());
    }

    #[test]
    fn duplicates_within_a_connection_fail_and_across_reconnects_do_not() {
        let mut items: Vec<Received> = (0..5).map(|seq| got(1, 100 + seq, "a", seq)).collect();
        items.push(got(2, 104, "a", 4));
        let report = check(&history(items.clone()), &stored_all());
        assert_eq!(report.redelivered_after_reconnect, 1);
        report.assert_clean().unwrap();

        items.push(got(2, 104, "a", 4));
        let report = check(&history(items), &stored_all());
        assert_eq!(report.duplicated_in_connection, 1);
        assert!(report.assert_clean().is_err());
    }

    #[test]
    fn unexpected_reordered_and_split_messages_are_found() {
        let items: Vec<Received> = vec![
            got(1, 100, "a", 0),
            got(1, 102, "a", 2),
            got(1, 101, "a", 1),
            got(1, 103, "a", 3),
            got(1, 104, "a", 4),
            // A second id for attempt a-4, and a message nobody sent.
            got(1, 999, "a", 4),
            got(1, 555, "z", 0),
        ];
        let report = check(&history(items), &stored_all());
        assert_eq!(report.out_of_order, 2, "{report:?}");
        assert_eq!(report.stored_twice, 1);
        assert_eq!(report.unexpected, 1);
        assert!(report.assert_clean().is_err());
    }

    #[test]
    fn the_database_must_hold_every_acked_message_once() {
        let history = history((0..5).map(|seq| got(1, 100 + seq, "a", seq)).collect());
        let mut stored = stored_all();
        stored.remove(0);
        stored.push(Stored {
            id: 777,
            sender: "a".into(),
            client_msg_id: "a-3".into(),
        });
        let report = check(&history, &stored);
        assert_eq!(report.missing_in_database, 1);
        assert_eq!(report.duplicated_in_database, 1);
        assert!(report.assert_clean().is_err());
    }

    #[test]
    fn answers_during_a_fault_are_classified() {
        let t = |started: u64, written: Option<u64>, answered: u64, outcome: &str| Try {
            started_ms: started,
            written_ms: written,
            answered_ms: answered,
            outcome: outcome.into(),
            duplicate: false,
        };
        let mut history = history(Vec::new());
        // The fault is on from 1,000 to 12,000 ms.
        history.attempts[0].log = vec![
            // Acked before the fault, answered just after it began.
            t(900, Some(900), 1_100, "sent"),
        ];
        history.attempts[1].log = vec![
            t(1_500, Some(1_500), 3_500, "unavailable"),
            // Hung: counted although answered after the window.
            t(3_600, Some(3_600), 13_600, "timeout"),
            // After the fault.
            t(13_700, Some(13_700), 13_800, "sent"),
        ];
        history.attempts[2].log = vec![
            t(500, Some(500), 1_500, "disconnected"),
            t(2_000, None, 12_000, "no_connection"),
        ];
        history.attempts[3].log = vec![
            // Written during the fault and acked: what must not happen
            // without a quorum.
            t(5_000, Some(5_000), 5_100, "sent"),
        ];
        history.attempts[4].log = vec![
            // Written before, but acked long after the fault began.
            t(200, Some(200), 3_500, "sent"),
            Try {
                duplicate: true,
                ..t(4_000, Some(4_000), 4_050, "sent")
            },
        ];
        let window = history.window(1_000, 12_000);
        assert_eq!(
            window,
            Window {
                from_ms: 1_000,
                to_ms: 12_000,
                sent: 2,
                sent_duplicate: 1,
                sent_in_flight: 1,
                unavailable: 1,
                disconnected: 1,
                other_errors: 0,
                timed_out: 1,
                no_connection: 1,
                answered: 6,
                slowest_answer_ms: 3_300,
            }
        );
    }

    #[test]
    fn a_run_that_acked_nothing_proves_nothing() {
        let mut history = history(Vec::new());
        for attempt in &mut history.attempts {
            attempt.acked = None;
        }
        let report = check(&history, &[]);
        assert_eq!(report.unacked, 5);
        assert!(report.assert_clean().is_err());
    }
}
