//! End-to-end harness: a real nats-server and PostgreSQL, every service run
//! in-process on the test's runtime, and real WebSocket clients.

pub mod chaos;
pub mod metrics;
pub mod process;
pub mod providers;
pub mod servers;
pub mod streams;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use chat_shared::ids::UserId;
use chat_shared::partitions::Partitions;
use chat_shared::Config;
use chat_shared::{auth, rpc};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

pub use process::{Service, ServiceProcess};
pub use servers::{fresh_database, fresh_database_on, nats_password, NatsServer, PgCluster};

pub const JWT_SECRET: &str = "e2e-test-secret-e2e-test-secret-e2e";
/// How long a test waits for any one expected frame.
pub const WAIT: Duration = Duration::from_secs(15);

/// What [`System::start_with_options`] starts besides the servers, the
/// edge, a router and a presence process.
#[derive(Clone, Copy, Debug)]
pub struct StartOptions {
    /// Start a persister that runs until the system is dropped (default).
    /// Without it nothing runs the migrations or answers RPCs until the test
    /// starts one ([`System::start_persister_task`]).
    pub persister: bool,
}

impl Default for StartOptions {
    fn default() -> Self {
        Self { persister: true }
    }
}

/// A service task started by a test: [`Running::stop`] stops it and waits
/// until its `run` has returned. Dropping it stops it without waiting.
pub struct Running {
    name: &'static str,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn spawn<F, E>(
        name: &'static str,
        run: impl FnOnce(chat_shared::shutdown::Shutdown) -> F,
    ) -> Self
    where
        F: std::future::Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let (tx, rx) = oneshot::channel();
        let running = run(shutdown_on(rx));
        let task = tokio::spawn(async move {
            if let Err(e) = running.await {
                eprintln!("{name}: {e}");
            }
        });
        Self {
            name,
            stop: Some(tx),
            task,
        }
    }

    /// Signals a graceful stop and waits until the service's `run` has
    /// returned (it no longer pulls, writes or answers).
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let name = self.name;
        tokio::time::timeout(WAIT * 2, &mut self.task)
            .await
            .map_err(|_| anyhow!("{name} did not stop within {:?}", WAIT * 2))?
            .with_context(|| format!("{name} task failed"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A whole system: servers plus every service, stopped on drop.
pub struct System {
    pub nats: NatsServer,
    pub config: Config,
    pub edge_addr: SocketAddr,
    stops: Vec<oneshot::Sender<()>>,
    /// The first presence process, which leads until it is stopped.
    presence: Option<oneshot::Sender<()>>,
    /// The first router, the pinned (active) one until it is stopped.
    router: Option<Running>,
    /// Where each service (the last one started of its kind) serves
    /// `/metrics`, when the configuration has a `metrics_addr`.
    metrics_addrs: HashMap<&'static str, SocketAddr>,
}

fn shutdown_on(rx: oneshot::Receiver<()>) -> chat_shared::shutdown::Shutdown {
    Box::pin(async move {
        let _ = rx.await;
    })
}

impl System {
    pub async fn start() -> Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// Starts everything; `adjust` changes the configuration first.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Result<Self> {
        Self::start_with_options(StartOptions::default(), adjust).await
    }

    /// Starts the servers and the services `options` asks for; `adjust`
    /// changes the configuration first.
    pub async fn start_with_options(
        options: StartOptions,
        adjust: impl FnOnce(&mut Config),
    ) -> Result<Self> {
        init_logs();
        let nats = NatsServer::start().await?;
        let database_url = fresh_database().await?;
        let mut config = test_config(nats.url(), database_url);
        for _ in 1..pg_shards_under_test() {
            config.database_urls.push(fresh_database().await?);
        }
        adjust(&mut config);
        let mut system = Self {
            nats,
            config,
            edge_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stops: Vec::new(),
            presence: None,
            router: None,
            metrics_addrs: HashMap::new(),
        };
        if options.persister {
            let persister = system.start_persister();
            system.stops.push(persister);
        }
        system.router = Some(system.start_router_task());
        system.presence = Some(system.start_presence());
        system.edge_addr = system.start_edge().await?;
        if options.persister {
            system.wait_ready().await?;
        } else {
            system.wait_edge_ready().await?;
            system.wait_presence_leader().await?;
        }
        Ok(system)
    }

    /// This service's configuration: its own NATS user.
    pub fn config_for(&self, user: &str) -> Config {
        config_as(&self.config, user)
    }

    fn stop_handle(&mut self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.stops.push(tx);
        rx
    }

    /// Starts a persister that the test stops with [`Running::stop`].
    pub fn start_persister_task(&mut self) -> Running {
        let config = self.config_for("persister");
        let metrics = self.metrics_listener("persister");
        Running::spawn("persister", move |shutdown| {
            chat_persister::run_with(config, metrics, shutdown)
        })
    }

    /// Starts a persister; dropping or firing the returned sender stops it.
    pub fn start_persister(&mut self) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        let config = self.config_for("persister");
        let metrics = self.metrics_listener("persister");
        tokio::spawn(async move {
            if let Err(e) = chat_persister::run_with(config, metrics, shutdown_on(rx)).await {
                eprintln!("persister: {e}");
            }
        });
        tx
    }

    /// Starts a router that the test stops with [`Running::stop`]. While
    /// another router is pinned, it is a hot standby.
    pub fn start_router_task(&mut self) -> Running {
        let config = self.config_for("router");
        let metrics = self.metrics_listener("router");
        Running::spawn("router", move |shutdown| {
            chat_router::run_with(config, metrics, shutdown)
        })
    }

    /// Stops the first router (the one [`System::start`] started, pinned
    /// unless it was stopped before) and waits until its `run` returned;
    /// another router then takes over once the pin times out.
    pub async fn stop_router(&mut self) -> Result<()> {
        match self.router.take() {
            Some(router) => router.stop().await,
            None => bail!("the first router was already stopped"),
        }
    }

    /// Starts a router that runs until the system is dropped.
    pub fn start_router(&mut self) {
        let rx = self.stop_handle();
        let config = self.config_for("router");
        let metrics = self.metrics_listener("router");
        tokio::spawn(async move {
            if let Err(e) = chat_router::run_with(config, metrics, shutdown_on(rx)).await {
                eprintln!("router: {e}");
            }
        });
    }

    /// A listener for `service`'s `/metrics` on the configured
    /// `metrics_addr` (port 0: each service gets a port of its own, read
    /// back here, so nothing races for a port).
    fn metrics_listener(&mut self, service: &'static str) -> Option<tokio::net::TcpListener> {
        let addr = self.config.metrics_addr?;
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|listener| {
                listener.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(listener)
            })
            .expect("a metrics listener on the configured address");
        if let Ok(bound) = listener.local_addr() {
            self.metrics_addrs.insert(service, bound);
        }
        Some(listener)
    }

    /// Where `service` (`router`, `persister`, `presence`) serves
    /// `/metrics`; the edge serves it on [`System::edge_addr`].
    pub fn metrics_addr(&self, service: &str) -> Result<SocketAddr> {
        self.metrics_addrs
            .get(service)
            .copied()
            .with_context(|| format!("{service} serves no /metrics: set metrics_addr"))
    }

    /// Starts a presence process; dropping or firing the sender stops it.
    pub fn start_presence(&mut self) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        let config = self.config_for("presence");
        let metrics = self.metrics_listener("presence");
        tokio::spawn(async move {
            if let Err(e) = chat_presence::run_with(config, metrics, shutdown_on(rx)).await {
                eprintln!("presence: {e}");
            }
        });
        tx
    }

    /// Stops the first presence process (the leader, unless it was stopped
    /// before); its lease is handed over at once.
    pub fn stop_presence(&mut self) {
        if let Some(stop) = self.presence.take() {
            let _ = stop.send(());
        }
    }

    /// Starts an edge as its own process, for tests that kill it: pass
    /// `env!("CARGO_BIN_EXE_service-under-test")` (see
    /// `src/bin/service-under-test.rs`; only integration tests know the path).
    pub async fn spawn_edge_process(&self, binary: &str) -> Result<ServiceProcess> {
        self.spawn_service(binary, Service::Edge).await
    }

    /// Starts `service` as its own process with its own NATS user.
    pub async fn spawn_service(&self, binary: &str, service: Service) -> Result<ServiceProcess> {
        ServiceProcess::spawn(binary, service, &self.config_for(service.name())).await
    }

    pub async fn start_edge(&mut self) -> Result<SocketAddr> {
        let rx = self.stop_handle();
        let (addr, _running) = self.start_edge_task(shutdown_on(rx)).await?;
        Ok(addr)
    }

    /// Starts an edge that stops (drains) when `shutdown` completes; the
    /// handle tells how its `run` ended.
    pub async fn start_edge_task(
        &self,
        shutdown: chat_shared::shutdown::Shutdown,
    ) -> Result<(
        SocketAddr,
        tokio::task::JoinHandle<Result<(), chat_edge::EdgeError>>,
    )> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let config = self.config_for("edge");
        let running = tokio::spawn(async move {
            let result = chat_edge::run(config, listener, shutdown).await;
            if let Err(e) = &result {
                eprintln!("edge: {e}");
            }
            result
        });
        Ok((addr, running))
    }

    /// Waits for the edge's `/readyz` and for the persister's RPC service:
    /// the edge is ready without the persister (requests then get
    /// `unavailable`, as they should), but tests expect a whole system.
    pub async fn wait_ready(&self) -> Result<()> {
        self.wait_edge_ready().await?;
        self.wait_rpc_ready().await?;
        self.wait_presence_leader().await
    }

    /// Waits for the edge's `/readyz`.
    pub async fn wait_edge_ready(&self) -> Result<()> {
        wait_until(|| async {
            http_get(self.edge_addr, "/readyz")
                .await
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
        })
        .await
    }

    /// Waits until a presence process leads (before that, connects are
    /// tracked but not announced).
    pub async fn wait_presence_leader(&self) -> Result<()> {
        wait_presence_leader(&self.config).await
    }

    /// Waits until a persister answers RPCs (its migrations are done and its
    /// subscriptions are in place).
    pub async fn wait_rpc_ready(&self) -> Result<()> {
        wait_rpc_ready(&self.config).await
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.edge_addr)
    }

    /// A token for `user` valid for `ttl`.
    pub fn token_for(&self, user: &str, ttl: Duration) -> String {
        let user = UserId::parse(user).expect("test user ids are valid");
        auth::mint_hs256(JWT_SECRET, &user, ttl).expect("signing works")
    }

    pub fn token(&self, user: &str) -> String {
        let user = UserId::parse(user).expect("test user ids are valid");
        auth::mint_hs256(JWT_SECRET, &user, Duration::from_secs(3600)).expect("signing works")
    }

    /// Connects `user`/`device` and reads up to `synced`.
    pub async fn connect(&self, user: &str, device: &str) -> Result<Client> {
        self.connect_from(user, device, None).await
    }

    pub async fn connect_from(
        &self,
        user: &str,
        device: &str,
        cursor: Option<&str>,
    ) -> Result<Client> {
        self.connect_at(self.edge_addr, user, device, cursor).await
    }

    /// Connects to the edge at `edge` (tests with several edges).
    pub async fn connect_at(
        &self,
        edge: SocketAddr,
        user: &str,
        device: &str,
        cursor: Option<&str>,
    ) -> Result<Client> {
        self.connect_url(
            &format!("ws://{edge}/v1/ws"),
            &self.token(user),
            device,
            cursor,
        )
        .await
    }

    /// Connects to the WebSocket `url` with `token` and reads up to `synced`.
    pub async fn connect_url(
        &self,
        url: &str,
        token: &str,
        device: &str,
        cursor: Option<&str>,
    ) -> Result<Client> {
        let mut client = Client::open(url).await?;
        let mut hello = json!({"type":"hello","token":token,"device":device});
        if let Some(cursor) = cursor {
            hello["cursor"] = json!(cursor);
        }
        client.send(hello).await?;
        let welcome = client.recv().await?;
        if welcome["type"] != "welcome" {
            bail!("expected welcome, got {welcome}");
        }
        client.welcome = welcome;
        loop {
            let frame = client.recv().await?;
            if frame["type"] == "synced" {
                client.synced = frame;
                return Ok(client);
            }
            client.backlog.push(frame);
        }
    }

    /// A direct PostgreSQL connection to this system's database (its
    /// home shard, shard 0, when it has several).
    pub async fn database(&self) -> Result<tokio_postgres::Client> {
        connect_database(self.config.home_database_url()).await
    }

    /// A connection to each of this system's shards, shard 0 first.
    pub async fn databases(&self) -> Result<Vec<tokio_postgres::Client>> {
        databases(&self.config).await
    }

    /// The sum over every shard of `sql`, a query of one `bigint` (a
    /// `count(*)`): what a test that counts rows sees whatever the shards.
    pub async fn count_everywhere(&self, sql: &str) -> Result<i64> {
        let mut total = 0;
        for db in self.databases().await? {
            total += db.query_one(sql, &[]).await?.get::<_, i64>(0);
        }
        Ok(total)
    }

    /// Whether every stored message is counted in its members' rows of
    /// `user_conversations`: the writer commits a batch's messages first
    /// and the counters after (on the users' shards), so a test that reads
    /// `conversations` after counting stored messages waits for this too.
    pub async fn counters_settled(&self) -> Result<bool> {
        let stored = self
            .rows_everywhere(
                "SELECT c.conversation, c.seq,
                        CASE WHEN c.conversation LIKE 'group:%'
                             THEN (SELECT count(*) FROM group_members g
                                    WHERE 'group:' || g.group_id = c.conversation)
                             ELSE 2 END
                 FROM conversations c WHERE c.seq > 0",
            )
            .await?;
        let counted = self
            .rows_everywhere("SELECT conversation, counted_seq FROM user_conversations")
            .await?;
        let mut at: HashMap<String, Vec<i64>> = HashMap::new();
        for row in &counted {
            at.entry(row.get(0)).or_default().push(row.get(1));
        }
        Ok(stored.iter().all(|row| {
            let (conversation, seq, members): (String, i64, i64) =
                (row.get(0), row.get(1), row.get(2));
            let counters = at.get(&conversation).map_or(&[][..], Vec::as_slice);
            counters.iter().filter(|&&c| c >= seq).count() as i64 == members
        }))
    }

    /// The rows `sql` finds on every shard, shard 0's first.
    pub async fn rows_everywhere(&self, sql: &str) -> Result<Vec<tokio_postgres::Row>> {
        rows_everywhere(&self.config, sql).await
    }

    /// A connection to the shard that holds `conversation`'s rows (by the
    /// even map the first persister writes for this system's shards).
    pub async fn database_of(&self, conversation: &str) -> Result<tokio_postgres::Client> {
        let conversation = chat_shared::ids::ConversationId::parse(conversation)?;
        let shard = chat_shared::shards::ShardMap::even(self.config.database_urls.len())
            .of_conversation(&conversation);
        connect_database(&self.config.database_urls[shard]).await
    }

    /// A NATS connection with the admin user.
    pub async fn admin(&self) -> Result<async_nats::Client> {
        Ok(chat_shared::nats::connect(&self.config_for("admin"), "test-admin").await?)
    }
}

impl Drop for System {
    fn drop(&mut self) {
        drop(self.router.take());
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

/// A WebSocket client speaking JSON frames.
pub struct Client {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    pub welcome: Value,
    pub synced: Value,
    /// Frames between `welcome` and `synced`.
    pub backlog: Vec<Value>,
    /// Frames read while looking for another one (a reply), returned by
    /// later reads so nothing is lost.
    pending: std::collections::VecDeque<Value>,
}

/// What the server did to a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    Closed(u16),
    Dropped,
}

impl Client {
    pub async fn open(url: &str) -> Result<Self> {
        let (socket, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
            .await
            .context("websocket connect")?;
        Ok(Self {
            socket,
            welcome: Value::Null,
            synced: Value::Null,
            backlog: Vec::new(),
            pending: Default::default(),
        })
    }

    pub async fn send(&mut self, frame: Value) -> Result<()> {
        self.send_raw(Message::Text(frame.to_string().into())).await
    }

    pub async fn send_raw(&mut self, message: Message) -> Result<()> {
        self.socket.send(message).await.context("websocket send")
    }

    /// The next JSON frame (control frames skipped).
    pub async fn recv(&mut self) -> Result<Value> {
        self.recv_within(WAIT).await
    }

    pub async fn recv_within(&mut self, wait: Duration) -> Result<Value> {
        if let Some(frame) = self.pending.pop_front() {
            return Ok(frame);
        }
        self.read_socket(wait).await
    }

    /// The next JSON frame within `wait`, `None` if none came; an error if
    /// the connection ended (closed, reset) or sent something unreadable.
    pub async fn next_within(&mut self, wait: Duration) -> Result<Option<Value>> {
        if let Some(frame) = self.pending.pop_front() {
            return Ok(Some(frame));
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let Ok(next) = tokio::time::timeout_at(deadline, self.socket.next()).await else {
                return Ok(None);
            };
            match next {
                Some(Ok(Message::Text(text))) => return Ok(Some(serde_json::from_str(&text)?)),
                Some(Ok(Message::Close(frame))) => bail!("closed: {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("socket error: {e}"),
                None => bail!("socket ended"),
            }
        }
    }

    async fn read_socket(&mut self, wait: Duration) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .map_err(|_| anyhow!("no frame within {wait:?}"))?;
            match next {
                Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text)?),
                Some(Ok(Message::Close(frame))) => bail!("closed: {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("socket error: {e}"),
                None => bail!("socket ended"),
            }
        }
    }

    /// The first frame of `kind`; frames before it stay queued for later reads.
    pub async fn recv_type(&mut self, kind: &str) -> Result<Value> {
        self.recv_matching(|frame| frame["type"] == kind).await
    }

    /// Every frame received so far (waiting ones included): sends a ping
    /// and collects until its pong, which the server sends after whatever
    /// it had already queued for this connection.
    pub async fn drain(&mut self) -> Result<Vec<Value>> {
        self.send(json!({"type":"ping","ref":"drain"})).await?;
        let mut frames: Vec<Value> = self.pending.drain(..).collect();
        loop {
            let frame = self.read_socket(WAIT).await?;
            if frame["type"] == "pong" && frame["ref"] == "drain" {
                return Ok(frames);
            }
            frames.push(frame);
        }
    }

    pub async fn recv_matching(&mut self, wanted: impl Fn(&Value) -> bool) -> Result<Value> {
        if let Some(index) = self.pending.iter().position(&wanted) {
            return Ok(self.pending.remove(index).unwrap_or_default());
        }
        loop {
            let frame = self.read_socket(WAIT).await?;
            if wanted(&frame) {
                return Ok(frame);
            }
            self.pending.push_back(frame);
        }
    }

    /// The next text frame as it came, `None` once the connection ended.
    pub async fn next_raw(&mut self) -> Option<String> {
        loop {
            match self.socket.next().await? {
                Ok(Message::Text(text)) => return Some(text.to_string()),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Closes the connection cleanly (close frame, then the server's reply).
    pub async fn close(mut self) -> Result<()> {
        self.socket.close(None).await?;
        while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, self.socket.next()).await {}
        Ok(())
    }

    /// Waits until the server closes the connection; returns its close code.
    pub async fn ending(&mut self) -> Result<Ending> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .map_err(|_| anyhow!("connection still open"))?;
            match next {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return Ok(Ending::Closed(u16::from(frame.code)))
                }
                Some(Ok(Message::Close(None))) => {
                    return Ok(Ending::Closed(u16::from(CloseCode::Status)))
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Ok(Ending::Dropped),
            }
        }
    }

    /// The next frame, or how the connection ended.
    pub async fn recv_or_end(&mut self) -> Result<std::result::Result<Value, Ending>> {
        if let Some(frame) = self.pending.pop_front() {
            return Ok(Ok(frame));
        }
        loop {
            let next = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .map_err(|_| anyhow!("no frame within {WAIT:?}"))?;
            return Ok(match next {
                Some(Ok(Message::Text(text))) => Ok(serde_json::from_str(&text)?),
                Some(Ok(Message::Close(Some(frame)))) => Err(Ending::Closed(u16::from(frame.code))),
                Some(Ok(Message::Close(None))) => Err(Ending::Closed(u16::from(CloseCode::Status))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => Err(Ending::Dropped),
            });
        }
    }

    /// Sends a request with a fresh `ref` and waits for the reply with that `ref`.
    pub async fn request(&mut self, mut frame: Value) -> Result<Value> {
        let reference = format!("r{}", rand_ref());
        frame["ref"] = json!(reference);
        self.send(frame).await?;
        let reference = json!(reference);
        self.recv_matching(|reply| reply["ref"] == reference).await
    }

    /// Sends a DM or group message and waits for its `sent` (or error).
    pub async fn send_message(
        &mut self,
        target: Value,
        text: &str,
        client_msg_id: &str,
    ) -> Result<Value> {
        let mut frame = json!({"type":"send","text":text,"client_msg_id":client_msg_id});
        if let Some(object) = frame.as_object_mut() {
            if let Some(fields) = target.as_object() {
                for (k, v) in fields {
                    object.insert(k.clone(), v.clone());
                }
            }
        }
        self.request(frame).await
    }
}

fn rand_ref() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The configuration every test system starts from: the test JWT secret,
/// presence on a test's time scale (the defaults are seconds), and limits
/// high enough for tests that send as fast as they can (the limit tests
/// lower them).
pub fn test_config(nats_url: String, database_url: String) -> Config {
    Config {
        nats_url,
        database_urls: vec![database_url],
        jwt_secret: Some(JWT_SECRET.into()),
        // The dev NATS passwords of nats/users.conf are accepted only so.
        dev: true,
        database_pool_size: 4,
        presence_heartbeat: Duration::from_millis(300),
        presence_timeout: Duration::from_millis(1500),
        presence_debounce: Duration::from_millis(1500),
        limits: chat_shared::config::LimitsConfig {
            send_per_connection: 100_000,
            send_per_user: 100_000,
            requests_per_connection: 100_000,
            connects_per_ip: 100_000,
            ..Default::default()
        },
        edge_net: chat_shared::config::EdgeNetConfig {
            discovery_per_ip: 100_000,
            ..Default::default()
        },
        quota: QUOTA_OFF_SCALE,
        bounds: TEST_BOUNDS,
        partitions: partitions_under_test(),
        ..Config::default()
    }
}

/// How many partitions MESSAGES and INBOX have in the systems tests start:
/// `CHAT_PARTITIONS` of the test process (`CHAT_PARTITIONS=3 cargo nextest
/// run …` runs the suites split), else one.
pub fn partitions_under_test() -> Partitions {
    partitions_from_env().unwrap_or_default()
}

/// `CHAT_PARTITIONS` of the test process, if set.
///
/// # Panics
/// If it is set to anything but a valid count: a typo must not quietly
/// test the unsplit system.
pub fn partitions_from_env() -> Option<Partitions> {
    let count = std::env::var("CHAT_PARTITIONS").ok()?;
    Some(
        count
            .parse()
            .ok()
            .and_then(Partitions::new)
            .unwrap_or_else(|| panic!("CHAT_PARTITIONS={count:?} is not a partition count")),
    )
}

/// The streams' and buckets' byte bounds in test systems. nats-server
/// reserves every bound on disk when a stream is made and, without a
/// `max_file_store`, allows 75 % of the disk that is free when it starts:
/// the defaults (about 23 GiB, sized for one real box) made every test
/// server of a parallel run refuse its streams ("insufficient storage
/// resources") once the disk had less than ~31 GB free. These hold far
/// more than any test writes (the abuse tests set their own, smaller ones).
pub const TEST_BOUNDS: chat_shared::config::StoreBounds = chat_shared::config::StoreBounds {
    messages: GIB,
    inbox: GIB,
    inbox_items_per_user: 10_000,
    push: 128 * MIB,
    events: 128 * MIB,
    deadletter: 128 * MIB,
    quotas: 64 * MIB,
    audit: 64 * MIB,
    sent: 128 * MIB,
    buckets: 64 * MIB,
    // A test uploads at most 50 MiB.
    media: 256 * MIB,
};
const MIB: i64 = 1024 * 1024;
const GIB: i64 = 1024 * MIB;

/// How many PostgreSQL shards each test system has:
/// `CHAT_TEST_PG_SHARDS` (`scripts/test` runs the persister's tests a
/// second time with 2), else one. The shards are databases of the test
/// cluster; `shards::*` also runs them as separate clusters.
///
/// # Panics
/// If `CHAT_TEST_PG_SHARDS` is set to anything but 1 to 8.
pub fn pg_shards_under_test() -> usize {
    match std::env::var("CHAT_TEST_PG_SHARDS") {
        Ok(count) => count
            .parse()
            .ok()
            .filter(|n| (1..=8).contains(n))
            .unwrap_or_else(|| panic!("CHAT_TEST_PG_SHARDS={count:?} is not 1 to 8")),
        Err(_) => 1,
    }
}

/// A connection to each shard of `config`, shard 0 first.
pub async fn databases(config: &Config) -> Result<Vec<tokio_postgres::Client>> {
    let mut all = Vec::new();
    for url in &config.database_urls {
        all.push(connect_database(url).await?);
    }
    Ok(all)
}

/// The rows `sql` finds on every shard of `config`, shard 0's first.
pub async fn rows_everywhere(config: &Config, sql: &str) -> Result<Vec<tokio_postgres::Row>> {
    let mut rows = Vec::new();
    for db in databases(config).await? {
        rows.extend(db.query(sql, &[]).await?);
    }
    Ok(rows)
}

/// A client of one database, its connection driven on this runtime.
pub async fn connect_database(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Quotas no test reaches unless it lowers them (the abuse tests do).
pub const QUOTA_OFF_SCALE: chat_shared::config::QuotaConfig = chat_shared::config::QuotaConfig {
    messages_per_minute: 1 << 40,
    messages_per_day: 1 << 40,
    bytes_per_minute: 1 << 50,
    bytes_per_day: 1 << 50,
    fanout_bytes_per_minute: 1 << 50,
    groups_per_day: 1 << 40,
    media_bytes_per_day: 1 << 50,
    lease_messages: 10,
};

/// `config` for NATS user `user` (its dev password).
pub fn config_as(config: &Config, user: &str) -> Config {
    Config {
        nats_user: Some(user.into()),
        nats_password: Some(nats_password(user).into()),
        ..config.clone()
    }
}

/// Waits until a presence process of the system configured by `config`
/// leads.
pub async fn wait_presence_leader(config: &Config) -> Result<()> {
    let admin = chat_shared::nats::connect(&config_as(config, "admin"), "test-admin").await?;
    let js = async_nats::jetstream::new(admin);
    let leaders = js
        .get_key_value(chat_shared::subjects::LEADERS_BUCKET)
        .await?;
    wait_until(|| {
        let leaders = leaders.clone();
        async move {
            matches!(
                leaders
                    .get(chat_shared::subjects::PRESENCE_LEADER_KEY)
                    .await,
                Ok(Some(_))
            )
        }
    })
    .await
}

/// Waits until a persister of the system configured by `config` answers
/// RPCs.
pub async fn wait_rpc_ready(config: &Config) -> Result<()> {
    let nats = chat_shared::nats::connect(&config_as(config, "admin"), "test-admin").await?;
    let probe = rpc::ConversationsRequest {
        user: UserId::parse("readiness-probe").expect("a valid user id"),
        limit: 1,
        next: None,
    };
    wait_until(|| {
        let nats = nats.clone();
        let probe = probe.clone();
        async move { rpc::call::<rpc::Conversations>(&nats, &probe).await.is_ok() }
    })
    .await
}

/// Polls `condition` every 50 ms until it holds, failing after [`WAIT`].
pub async fn wait_until<F, Fut>(condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_until_within(WAIT, condition).await
}

/// Polls `condition` every 50 ms until it holds, failing after `wait`.
pub async fn wait_until_within<F, Fut>(wait: Duration, mut condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        if condition().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("condition not met within {wait:?}")
}

/// `GET /metrics` from `addr`, parsed strictly.
pub async fn scrape(addr: SocketAddr) -> Result<metrics::Scrape> {
    let (status, body) = http_get(addr, "/metrics").await?;
    if status != 200 {
        bail!("GET /metrics from {addr}: status {status}");
    }
    metrics::Scrape::parse(&body).with_context(|| format!("/metrics from {addr}:\n{body}"))
}

/// A minimal HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    http_get_on(stream, path, "").await
}

/// [`http_get`] on a connection made by the caller (from a chosen local
/// address, say), with `headers` (`Name: value\r\n` lines) added.
pub async fn http_get_on(
    mut stream: tokio::net::TcpStream,
    path: &str,
    headers: &str,
) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = stream.peer_addr()?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP response"))?;
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Ok((status, body))
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}
