//! The edge: the WebSocket gateway clients connect to.
//!
//! It authenticates connections, speaks PROTOCOL.md, publishes accepted
//! messages to JetStream and forwards live deliveries. It talks to NATS only:
//! **the edge never touches PostgreSQL**; history, groups and the like are
//! asked of the persister over NATS request/reply.

mod access;
mod change;
mod claims;
mod deque;
mod drain;
mod error;
mod forwarded;
mod http;
mod hub;
mod limits;
mod livelink;
mod media;
mod metrics;
mod moderation;
mod outbox;
mod presence;
mod quota;
mod receipts;
mod requests;
mod resume;
mod send;
mod session;
mod web;

use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use axum::extract::{ConnectInfo, State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chat_shared::auth::Verifier;
use chat_shared::blocks::BlockCache;
use chat_shared::direct::DirectReader;
use chat_shared::discovery::Directory;
use chat_shared::idgen::IdGenerator;
use chat_shared::ids::{ConversationId, EdgeId, UserId};
use chat_shared::lease::NodeLease;
use chat_shared::membership::GroupCache;
use chat_shared::partitions::Partition;
use chat_shared::shutdown::{self, Shutdown};
use chat_shared::{streams, subjects, Config, StartError};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use error::EdgeError;
pub use http::{HEADER_READ_TIMEOUT, MAX_HEAD_BYTES};

/// The largest frame or message a client may send (PROTOCOL.md: 1 MiB).
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Per-socket read buffer, held for the connection's life. tungstenite's
/// default is 128 KiB, which would cost 128 KiB per idle connection; clients
/// send small frames (a ping, an ack, a message), and a larger frame has its
/// whole length reserved when its header arrives, whatever this size.
const READ_BUFFER_BYTES: usize = 512;
/// Bytes written to the socket in one go.
const WRITE_BUFFER_BYTES: usize = 8 * 1024;
/// Beyond this much unsent data the socket counts as stuck and writes fail
/// instead of buffering without bound (tungstenite's default is unbounded).
const MAX_WRITE_BUFFER_BYTES: usize = 2 * MAX_FRAME_BYTES;

/// Everything a connection needs, shared by all of them.
pub(crate) struct Edge {
    pub config: Config,
    pub id: EdgeId,
    pub verifier: Verifier,
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    /// The streams the edge reads, one set per partition (index order).
    partitions: Vec<PartitionStreams>,
    pub cursors: kv::Store,
    /// Where sends' `client_msg_id` claims are written (see `claims`)...
    pub claims: kv::Store,
    /// ...and read, without a consumer.
    pub sent: DirectReader,
    pub ids: IdGenerator,
    pub hub: Arc<hub::Hub>,
    pub groups: GroupCache,
    /// Who is across a block from whom (DMs).
    pub blocks: BlockCache,
    /// The presence bucket (snapshots, `friends`).
    pub presence: kv::Store,
    /// This edge's live devices, for presence heartbeats.
    pub devices: Arc<presence::LiveDevices>,
    /// Open connections, and the drain that tells them to go.
    pub connections: Arc<drain::Connections>,
    /// The discovery bucket.
    pub edges: kv::Store,
    /// What the discovery bucket holds, kept current by one watcher.
    pub directory: Directory,
    pub limits: Arc<limits::Limits>,
    /// Operators' bans and revocations, checked at `hello` and `refresh`.
    pub moderation: Arc<moderation::Moderation>,
    /// Per-user quotas shared with the other edges (stream QUOTAS).
    pub quotas: quota::Quotas,
    /// The media object store and the signer of media URLs.
    pub media: media::Media,
    pub metrics: Arc<metrics::EdgeMetrics>,
    /// What `GET /metrics` serves.
    pub registry: prometheus_client::registry::Registry,
    pub stop: watch::Receiver<bool>,
}

/// Handles (no round trip to make) on one partition's streams.
pub(crate) struct PartitionStreams {
    pub partition: Partition,
    pub inbox: jetstream::stream::Stream<()>,
    /// Reads a user's inbox after a cursor without a consumer.
    pub direct: DirectReader,
    pub messages: jetstream::stream::Stream<()>,
}

impl Edge {
    /// The streams of `partition`, one of `config.partitions`.
    fn partition(&self, partition: Partition) -> &PartitionStreams {
        // Built for every partition of the configured count, and a
        // partition's index is below it: the fallback is never taken.
        self.partitions
            .get(partition.index() as usize)
            .unwrap_or(&self.partitions[0])
    }

    /// The streams holding `user`'s inbox.
    pub fn inbox_of(&self, user: &UserId) -> &PartitionStreams {
        self.partition(self.config.partitions.of_user(user))
    }

    /// The streams holding `conversation`'s events.
    pub fn messages_of(&self, conversation: &ConversationId) -> &PartitionStreams {
        self.partition(self.config.partitions.of_conversation(conversation))
    }
}

/// Runs an edge on `listener` until `shutdown` completes.
pub async fn run(
    mut config: Config,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<(), EdgeError> {
    // Without a configured public URL, advertise the address actually bound
    // (right for one host; behind a proxy set CHAT_EDGE_PUBLIC_URL).
    if config.edge_public_url.is_none() {
        if let Ok(addr) = listener.local_addr() {
            config.edge_public_url = Some(format!("ws://{addr}/v1/ws"));
        }
    }
    let verifier = Verifier::from_config(&config)?;
    tracing::info!(sources = %verifier.sources().join("; "), "JWT key sources");
    // The web client, and the dev token endpoint when CHAT_DEV_TOKENS=true.
    let web = web::routes(
        &config,
        listener.local_addr().map_err(EdgeError::ListenerAddress)?,
    )?;
    let id = match &config.edge_id {
        Some(id) => EdgeId::parse(id.clone())?,
        None => EdgeId::parse(format!("edge-{:08x}", rand::random::<u32>()))?,
    };
    let (nats, link) = chat_shared::nats::connect_watched(&config, &format!("edge {id}"))
        .await
        .map_err(StartError::from)?;
    let js = chat_shared::nats::jetstream(nats.clone(), &config);
    // The edge's NATS user may not create streams; the router and persister do.
    streams::wait_until_provisioned(&js, &config).await;
    let bucket = |name: &'static str| chat_shared::consume::bucket(&js, name);
    let stream = |name: String| {
        let js = js.clone();
        async move {
            js.get_stream_no_info(&name)
                .await
                .map_err(|source| StartError::Stream { name, source })
        }
    };
    let mut partitions = Vec::new();
    for partition in config.partitions.all() {
        let inbox = partition.inbox_stream();
        partitions.push(PartitionStreams {
            partition,
            direct: DirectReader::new(nats.clone(), &inbox, resume::INBOX_STALL),
            inbox: stream(inbox).await?,
            messages: stream(partition.messages_stream()).await?,
        });
    }
    let media = media::Media {
        store: js
            .get_object_store(subjects::MEDIA_BUCKET)
            .await
            .map_err(|source| StartError::ObjectStore {
                name: subjects::MEDIA_BUCKET,
                source,
            })?,
        signer: media::Signer::new(config.media.url_key.as_deref()),
    };
    let cursors = bucket(subjects::CURSORS_BUCKET).await;
    let claims = bucket(subjects::SENT_BUCKET).await;
    let sent = DirectReader::new(
        nats.clone(),
        &subjects::bucket_stream(subjects::SENT_BUCKET),
        config.request_timeout,
    );
    let lease = NodeLease::new(
        bucket(subjects::NODES_BUCKET).await,
        id.to_string(),
        config.node_lease_ttl,
    );
    let (node, revision) = lease.acquire().await?;
    let ids = IdGenerator::new(lease.slot());
    // SIGTERM (or an operator's drain request) starts the drain; `stop`
    // fires when it is over and ends everything else.
    let drain_requested = drain::drain_requested(nats.clone(), id.clone());
    let requested = shutdown::fan_out(Box::pin(async move {
        tokio::select! {
            _ = shutdown => {}
            _ = drain_requested => {}
        }
    }));
    let (stop_tx, stop) = watch::channel(false);
    let lease_task = tokio::spawn(lease.keep(node, revision, stop.clone()));
    let groups = GroupCache::start(nats.clone(), &config.group_cache).await?;
    let blocks = BlockCache::start(nats.clone(), &config.group_cache).await?;
    let presence_store = bucket(subjects::PRESENCE_BUCKET).await;
    let edges = bucket(subjects::EDGES_BUCKET).await;
    let directory = Directory::default();
    let directory_task = tokio::spawn(directory.clone().follow(
        edges.clone(),
        config.edge_ttl,
        link.clone(),
        stop.clone(),
    ));
    let devices = Arc::<presence::LiveDevices>::default();
    let heartbeat_task = tokio::spawn(presence::heartbeats(
        nats.clone(),
        id.clone(),
        devices.clone(),
        config.presence_heartbeat,
        stop.clone(),
    ));

    // Live frames (and their bytes) waiting for one session before it
    // counts as too slow: CHAT_LIMIT_LIVE_QUEUE, CHAT_LIMIT_LIVE_QUEUE_BYTES.
    // Deliveries arrive on a connection of their own (see `livelink`).
    let (live, deliveries) =
        livelink::LiveLink::connect(&config, &format!("edge {id} deliveries")).await?;
    let hub = hub::Hub::new(
        live,
        config.limits.live_queue,
        config.limits.live_queue_bytes,
        config.request_timeout,
    );
    let deliveries_task = tokio::spawn(deliveries.run(Arc::downgrade(&hub)));
    // Before the listener: a banned user is refused from the first connection.
    let (moderation, moderation_task) = moderation::start(
        nats.clone(),
        bucket(subjects::MODERATION_BUCKET).await,
        hub.clone(),
        link.clone(),
        stop.clone(),
    )
    .await?;

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(metrics::EdgeMetrics::new(&mut registry));
    groups.register_metrics(registry.sub_registry_with_prefix("edge"));
    blocks.register_metrics(registry.sub_registry_with_prefix("edge"));
    let edge = Arc::new(Edge {
        hub,
        moderation,
        limits: limits::Limits::new(
            config.limits.clone(),
            &config.edge_net,
            metrics.ip_table_evictions(),
        ),
        quotas: quota::Quotas::new(js.clone(), config.quota.clone()),
        media,
        metrics,
        registry,
        config,
        id,
        verifier,
        nats,
        js,
        partitions,
        cursors,
        claims,
        sent,
        ids,
        groups,
        blocks,
        presence: presence_store,
        devices,
        connections: Arc::default(),
        edges: edges.clone(),
        directory,
        stop: stop.clone(),
    });
    let advertiser = tokio::spawn(drain::advertise(edge.clone(), edges, stop.clone()));
    let drainer = tokio::spawn({
        let edge = edge.clone();
        async move {
            shutdown::wait(requested).await;
            drain::drain(&edge).await;
            let _ = stop_tx.send(true);
        }
    });
    let app = Router::new()
        .route("/v1/ws", get(upgrade))
        .route("/v1/edges", get(list_edges))
        .route("/healthz", get(|| async { "ok" }))
        .merge(media::routes())
        .merge(web)
        .route("/metrics", get(serve_metrics))
        .route("/readyz", get(ready))
        .with_state(edge.clone());
    tracing::info!(edge = %edge.id, addr = ?listener.local_addr().ok(), "edge listening");
    http::serve(listener, app, stop).await;
    drainer.abort();
    let _ = advertiser.await;
    let _ = lease_task.await;
    let _ = heartbeat_task.await;
    let _ = directory_task.await;
    let _ = moderation_task.await;
    deliveries_task.abort();
    // The last acks, cursor writes and device-gone reports of the sessions.
    chat_shared::nats::flush_before_exit(&edge.nats, &edge.config).await;
    tracing::info!(edge = %edge.id, "edge stopped");
    Ok(())
}

async fn upgrade(
    State(edge): State<Arc<Edge>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    // Browsers send `Origin` on every WebSocket upgrade and enforce no
    // same-origin rule for it: without this check any page a user visits
    // could open a socket here (a token is still needed to get further).
    if !origin_allowed(&edge.config.allowed_origins, &headers) {
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let client = forwarded::client_ip(peer.ip(), &headers, &edge.config.edge_net.trusted_proxies);
    if let Err(wait) = edge.limits.admit_ip(client, tokio::time::Instant::now()) {
        return too_many(wait, "too many connections from this address");
    }
    let Some(ticket) = edge.connections.open() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining; use /v1/edges").into_response();
    };
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(MAX_WRITE_BUFFER_BYTES)
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| session::serve(socket, edge, ticket))
}

/// Whether the request's `Origin` is on the allow-list; an empty list allows
/// any, and a request without `Origin` (not from a browser) passes.
fn origin_allowed(allowed: &[String], headers: &axum::http::HeaderMap) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let mut origins = headers.get_all(axum::http::header::ORIGIN).iter();
    let (Some(origin), None) = (origins.next(), origins.next()) else {
        // None at all passes; more than one is refused.
        return headers.get(axum::http::header::ORIGIN).is_none();
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim_end_matches('/');
    allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
}

/// This edge's metrics in the Prometheus text format.
async fn serve_metrics(State(edge): State<Arc<Edge>>) -> Response {
    chat_shared::metrics::respond(&edge.registry)
}

/// 429 with `Retry-After` in whole seconds (at least one).
fn too_many(wait: std::time::Duration, why: &'static str) -> Response {
    let retry_after = wait.as_secs().max(1).to_string();
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(axum::http::header::RETRY_AFTER, retry_after)],
        why,
    )
        .into_response()
}

/// The live, non-draining edges, least loaded first, from memory: anyone
/// may ask, so an answer costs JetStream nothing, and each client address
/// is rate-limited like its upgrades.
async fn list_edges(
    State(edge): State<Arc<Edge>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
) -> Response {
    let client = forwarded::client_ip(peer.ip(), &headers, &edge.config.edge_net.trusted_proxies);
    if let Err(wait) = edge
        .limits
        .admit_discovery(client, tokio::time::Instant::now())
    {
        return too_many(wait, "too many discovery requests from this address");
    }
    axum::Json(serde_json::json!({ "edges": drain::live_edges(&edge) })).into_response()
}

/// Ready while NATS is connected and not draining: without NATS the edge can
/// accept nothing, and a draining edge wants no new clients.
async fn ready(State(edge): State<Arc<Edge>>) -> impl IntoResponse {
    if edge.connections.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining");
    }
    match edge.nats.connection_state() {
        async_nats::connection::State::Connected => (StatusCode::OK, "ready"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "nats disconnected"),
    }
}
