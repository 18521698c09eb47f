//! The system under test: every service its own process, on one NATS
//! server or a cluster, with PostgreSQL, and the moments a fault schedule
//! marks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use chat_shared::ids::UserId;
use chat_shared::partitions::Partitions;
use chat_shared::{auth, Config};
use serde::Serialize;
use serde_json::json;

use super::history::millis_since;
use crate::process::{Service, ServiceProcess};
use crate::servers::{NatsCluster, PgCluster};
use crate::{fresh_database, nats_password, NatsServer, JWT_SECRET};

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
    pub(super) epoch: tokio::time::Instant,
    /// What the fault schedule noted, with when.
    pub(super) marks: Arc<Mutex<Vec<Mark>>>,
    /// `kill -9`s done per service name (`edge` for every edge).
    kills: BTreeMap<&'static str, u32>,
    /// Dead letters a scenario caused on purpose: `(stream, sequence)` of
    /// the original event.
    pub(super) expected_dead: Vec<(String, u64)>,
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

/// How many partitions MESSAGES and INBOX have on the cluster unless
/// `CHAT_PARTITIONS` says otherwise.
pub const CLUSTER_PARTITIONS: u32 = 3;

/// The cluster's partitions: `CHAT_PARTITIONS` if set (`CHAT_PARTITIONS=1
/// scripts/chaos -E 'test(cluster)'` runs the cluster unsplit), else
/// [`CLUSTER_PARTITIONS`].
fn cluster_partitions() -> Partitions {
    crate::partitions_from_env()
        .unwrap_or_else(|| Partitions::new(CLUSTER_PARTITIONS).unwrap_or_default())
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
        // The cluster is where partitions matter: its scenarios run with
        // MESSAGES and INBOX split unless told otherwise.
        let (stream_replicas, partitions) = match &nats {
            Nats::Single(_) => (1, crate::partitions_under_test()),
            Nats::Cluster(cluster) => (cluster.len(), cluster_partitions()),
        };
        let mut config = Config {
            stream_replicas,
            partitions,
            ..crate::test_config(nats.url(), database_url)
        };
        for _ in 1..crate::pg_shards_under_test() {
            config.database_urls.push(fresh_database().await?);
        }
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

    /// SIGTERM of edge `index`, which drains (its clients go to the other
    /// edges); its exit code, once it exited within `within`. A new edge
    /// takes its place in the list clients pick from.
    pub async fn stop_edge(&mut self, index: usize, within: Duration) -> Result<Option<i32>> {
        let mut edge = self.edges.remove(index);
        self.edge_urls.remove(&format!("ws://{}/v1/ws", edge.addr));
        edge.terminate()?;
        let code = edge.wait(within).await?;
        self.add_edge().await?;
        Ok(code)
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
        let mut items: HashSet<(String, u64)> = HashSet::new();
        for partition in self.config.partitions.all() {
            let mut stream = js.get_stream(partition.inbox_stream()).await?;
            let state = stream.info().await?.state.clone();
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
    /// PostgreSQL itself on each shard (a conversation's rows are on one).
    /// `message_keys` makes this structurally 0; the query guards against
    /// the claim going away.
    pub async fn duplicated_in_database(&self) -> Result<usize> {
        let rows = crate::rows_everywhere(
            &self.config,
            "SELECT sender, client_msg_id FROM messages WHERE sender LIKE 'chaos-%' \
             GROUP BY 1, 2 HAVING count(*) > 1",
        )
        .await?;
        Ok(rows.len())
    }

    /// The rows `sql` finds on every shard of this deployment.
    pub async fn rows_everywhere(&self, sql: &str) -> Result<Vec<tokio_postgres::Row>> {
        crate::rows_everywhere(&self.config, sql).await
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

    pub(super) fn pick(&self, turn: usize) -> Option<String> {
        let urls = self.0.lock().ok()?;
        (!urls.is_empty()).then(|| urls[turn % urls.len()].clone())
    }
}
