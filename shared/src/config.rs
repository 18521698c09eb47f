//! Configuration from environment variables.
//!
//! One struct for every service: each reads the fields it needs. The defaults
//! make `./scripts/dev` work with no settings; tests build a `Config` in code
//! (`Config { nats_url, ..Config::default() }`) instead of touching the
//! process environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::netaddr::IpRange;
use crate::partitions::{Partitions, MAX_PARTITIONS};

#[derive(Debug, Clone)]
pub struct Config {
    /// `CHAT_NATS_URL`
    pub nats_url: String,
    /// `CHAT_NATS_USER` / `CHAT_NATS_PASSWORD`: this service's NATS identity.
    pub nats_user: Option<String>,
    pub nats_password: Option<String>,
    /// The PostgreSQL shards (persister, pushd): `CHAT_DATABASE_URLS`, a
    /// comma-separated list (shard 0 first), or `CHAT_DATABASE_URL`, one
    /// shard. Which shard holds which rows is the shard map in the KV
    /// bucket `chat_shards` (`crate::shards`), written by the first
    /// persister as an even split over these URLs; shard 0 also holds the
    /// social tables (friendships, blocks, settings, profiles, push tokens,
    /// mutes), which are not split yet (docs/scaling.md).
    pub database_urls: Vec<String>,
    /// `CHAT_DATABASE_POOL` connections
    pub database_pool_size: usize,
    /// `CHAT_EDGE_ADDR`: where the edge listens.
    pub edge_addr: SocketAddr,
    /// `CHAT_EDGE_ID`: defaults to a random id per process.
    pub edge_id: Option<String>,
    /// `CHAT_JWT_SECRET`: HS256 secret (local/dev).
    pub jwt_secret: Option<String>,
    /// `CHAT_JWT_SECRET_FILE`: file holding the HS256 secret, used when
    /// `CHAT_JWT_SECRET` is unset. Unnamed, [`DEFAULT_JWT_SECRET_FILE`]
    /// (which `./scripts/dev` writes) is read only when no JWK set is
    /// configured: a production edge never picks up a stray dev secret.
    pub jwt_secret_file: Option<PathBuf>,
    /// `CHAT_JWT_JWKS_FILE`: a JWK set of public keys (RS256, ES256, EdDSA)
    /// selected by `kid`, for production issuers.
    pub jwt_jwks_file: Option<PathBuf>,
    /// `CHAT_JWT_ISSUER` / `CHAT_JWT_AUDIENCE`: checked when set. With a
    /// JWK set the audience is required (a token minted by the same issuer
    /// for another service must not open a session here).
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    /// `CHAT_JWT_LEEWAY_SECS`: clock skew allowed on `exp`/`nbf`.
    pub jwt_leeway: Duration,
    /// `CHAT_DEV_TOKENS`: `true` makes the edge hand out a token for any user
    /// name (`POST /v1/dev/token`, for the web client in local runs). Off
    /// unless set to exactly `true`; never in production.
    pub dev_tokens: bool,
    /// `CHAT_DEV_TOKENS_PUBLIC`: `true` lets an edge with dev tokens listen
    /// on a non-loopback address (a LAN demo); without it such an edge
    /// refuses to start, since anyone who reaches it could sign in as anyone.
    pub dev_tokens_public: bool,
    /// `CHAT_DEV`: `true` marks a local run (`./scripts/dev`, the tests):
    /// only then does a service accept the dev NATS passwords checked in to
    /// nats/users.conf.
    pub dev: bool,
    /// `CHAT_HEARTBEAT_SECS`: the `heartbeat` announced in `welcome`.
    pub heartbeat: Duration,
    /// `CHAT_HEARTBEAT_GRACE_SECS`: a connection silent for
    /// 2 x heartbeat + grace is closed (PROTOCOL.md: grace = 5 s).
    pub heartbeat_grace: Duration,
    /// `CHAT_HELLO_TIMEOUT_SECS`: the first frame must arrive within this.
    pub hello_timeout: Duration,
    /// `CHAT_MAX_GROUP_MEMBERS`, owner included.
    pub max_group_members: usize,
    /// `CHAT_STREAM_REPLICAS`: 1 on one node, 3 on the cluster.
    pub stream_replicas: usize,
    /// `CHAT_PARTITIONS`: how many streams MESSAGES and INBOX are split
    /// into (1 to 16, default 1; see `partitions`). Every service of a
    /// deployment must use the same number.
    pub partitions: Partitions,
    /// `CHAT_INBOX_MAX_AGE_SECS`: how long inbox items stay resumable.
    pub inbox_max_age: Duration,
    /// `CHAT_MESSAGES_MAX_AGE_SECS`: how long MESSAGES stays replayable (0 = forever).
    pub messages_max_age: Duration,
    /// `CHAT_DEDUP_WINDOW_SECS`: JetStream's `Nats-Msg-Id` window.
    pub dedup_window: Duration,
    /// `CHAT_SEND_CLAIM_MAX_AGE_SECS`: how long a `client_msg_id` is remembered
    /// for idempotent retries beyond the JetStream window.
    pub send_claim_max_age: Duration,
    /// `CHAT_EDIT_WINDOW_SECS`: how long after its `ts` the author may edit
    /// a message (PROTOCOL.md v1.1, default 900).
    pub edit_window: Duration,
    /// `CHAT_DELETE_WINDOW_SECS`: how long after its `ts` the author may
    /// delete a message for everyone (default 172800; a group's owner may
    /// at any time).
    pub delete_window: Duration,
    /// `CHAT_NODE_LEASE_SECS`: TTL of a message-id node lease.
    pub node_lease_ttl: Duration,
    /// `CHAT_REQUEST_TIMEOUT_MS`: NATS request/PubAck timeout; past it a
    /// client gets `unavailable`.
    pub request_timeout: Duration,
    /// `CHAT_LOG_FORMAT`: `text` (default) or `json`.
    pub log_json: bool,
    /// `CHAT_METRICS_ADDR`: where a service without an HTTP listener of its
    /// own serves `GET /metrics` (the edge serves it on `CHAT_EDGE_ADDR`).
    pub metrics_addr: Option<SocketAddr>,
    /// `CHAT_PRESENCE_HEARTBEAT_MS`: how often each edge lists its live
    /// devices to the presence service.
    pub presence_heartbeat: Duration,
    /// `CHAT_PRESENCE_TIMEOUT_MS`: an edge silent this long is dead, and its
    /// devices are offline.
    pub presence_timeout: Duration,
    /// `CHAT_PRESENCE_DEBOUNCE_MS`: a user whose last device left is
    /// announced offline only if none came back within this.
    pub presence_debounce: Duration,
    /// `CHAT_EDGE_PUBLIC_URL`: the WebSocket URL clients use to reach this
    /// edge, published for discovery; defaults to `ws://<CHAT_EDGE_ADDR>/v1/ws`.
    pub edge_public_url: Option<String>,
    /// `CHAT_ALLOWED_ORIGINS`: comma-separated `Origin` values (e.g.
    /// `https://chat.example.com`) a WebSocket upgrade may come from; any
    /// other `Origin` gets 403. Empty (unset) allows any origin. Requests
    /// without an `Origin` header (non-browser clients) are not affected.
    pub allowed_origins: Vec<String>,
    /// `CHAT_EDGE_TTL_MS`: an edge's discovery entry lives this long without
    /// a refresh (the `chat_edges` bucket's max age).
    pub edge_ttl: Duration,
    /// `CHAT_DRAIN_TIMEOUT_SECS`: how long a draining edge waits for its
    /// clients to leave before it exits anyway.
    pub drain_timeout: Duration,
    /// `CHAT_DRAIN_BATCH` clients are told to reconnect every
    /// `CHAT_DRAIN_BATCH_INTERVAL_MS`, so they do not all land on the other
    /// edges in the same instant.
    pub drain_batch: usize,
    pub drain_batch_interval: Duration,
    /// Rate and connection limits (edge).
    pub limits: LimitsConfig,
    /// Push providers (pushd). Each is off until configured.
    pub push: PushConfig,
    /// Client addresses, discovery and the per-address table (edge).
    pub edge_net: EdgeNetConfig,
    /// The group membership cache (router, edge, presence).
    pub group_cache: GroupCacheConfig,
    /// How many push tokens one user may hold (persister, pushd).
    pub push_tokens: PushTokenLimits,
    /// Byte bounds of the streams and buckets (applied at start).
    pub bounds: StoreBounds,
    /// Per-user quotas over all edges (edge).
    pub quota: QuotaConfig,
    /// Uploads, downloads and thumbnails (edge, persister).
    pub media: MediaConfig,
    /// `CHAT_SHUTDOWN_GRACE_MS`: how long a stopping router waits for the
    /// events its lanes have in flight; what is not done by then comes back
    /// by redelivery.
    pub shutdown_grace: Duration,
}

const MIB: i64 = 1024 * 1024;
const GIB: i64 = 1024 * MIB;

/// How large each stream and KV bucket may grow, in bytes; what happens
/// when one is full is in docs/architecture.md ("Bounded storage").
#[derive(Debug, Clone)]
pub struct StoreBounds {
    /// `CHAT_MESSAGES_MAX_BYTES`: the log of record; full, it refuses new
    /// sends (`unavailable`) and never drops an unrouted event. Split into
    /// partitions, each gets an equal share.
    pub messages: i64,
    /// `CHAT_INBOX_MAX_BYTES`: inbox items; full, the oldest go first.
    /// Split into partitions, each gets an equal share.
    pub inbox: i64,
    /// `CHAT_INBOX_MAX_ITEMS_PER_USER`: one user's inbox keeps at most this
    /// many items, so one flooded inbox cannot push everyone else's out.
    pub inbox_items_per_user: i64,
    /// `CHAT_PUSH_MAX_BYTES`: push jobs; full, the oldest go first.
    pub push: i64,
    /// `CHAT_EVENTS_MAX_BYTES`: membership changes; full, the persister
    /// keeps new ones in its outbox until there is room.
    pub events: i64,
    /// `CHAT_DEADLETTER_MAX_BYTES`: dead letters; full, an event given up
    /// on stays in its stream (retried) until an operator makes room.
    pub deadletter: i64,
    /// `CHAT_QUOTAS_MAX_BYTES`: quota counters; full, the oldest windows go.
    pub quotas: i64,
    /// `CHAT_AUDIT_MAX_BYTES`: operators' audit events (a few hundred bytes
    /// each, so the default keeps about a million); full, the oldest go.
    pub audit: i64,
    /// `CHAT_SENT_MAX_BYTES`: `client_msg_id` claims; full, sends go on
    /// without a claim (idempotent within the JetStream window only).
    pub sent: i64,
    /// `CHAT_BUCKET_MAX_BYTES`: each other KV bucket (cursors, presence,
    /// leases, edges); full, writes to it fail.
    pub buckets: i64,
    /// `CHAT_MEDIA_STORE_MAX_BYTES`: the media object store; full, uploads
    /// are refused (`503`) and nothing stored is dropped.
    pub media: i64,
}

impl Default for StoreBounds {
    fn default() -> Self {
        // Sized for one box with about 60 GB of free disk.
        Self {
            messages: 8 * GIB,
            inbox: 8 * GIB,
            inbox_items_per_user: 10_000,
            push: GIB,
            events: GIB,
            deadletter: GIB,
            quotas: 256 * MIB,
            audit: 256 * MIB,
            sent: GIB,
            buckets: 256 * MIB,
            // JetStream reserves a stream's bound on disk when it is made:
            // the other bounds already take ~23 GiB, so media starts small.
            media: GIB,
        }
    }
}

/// Per-user quotas, counted in NATS (stream QUOTAS) so every edge shares
/// them. Minute windows are calendar minutes, day windows UTC days. Bytes
/// are a text's size as JSON.
#[derive(Debug, Clone)]
pub struct QuotaConfig {
    /// `CHAT_QUOTA_MESSAGES_PER_MIN` / `CHAT_QUOTA_MESSAGES_PER_DAY`
    pub messages_per_minute: u64,
    pub messages_per_day: u64,
    /// `CHAT_QUOTA_BYTES_PER_MIN` / `CHAT_QUOTA_BYTES_PER_DAY`
    pub bytes_per_minute: u64,
    pub bytes_per_day: u64,
    /// `CHAT_QUOTA_FANOUT_BYTES_PER_MIN`: bytes times recipients.
    pub fanout_bytes_per_minute: u64,
    /// `CHAT_QUOTA_GROUPS_PER_DAY`: groups created.
    pub groups_per_day: u64,
    /// `CHAT_QUOTA_MEDIA_BYTES_PER_DAY`: bytes uploaded (`POST /v1/media`).
    pub media_bytes_per_day: u64,
    /// `CHAT_QUOTA_LEASE_MESSAGES`: an edge takes this many sends' worth
    /// of a quota at a time (never more than a twentieth of it), so most
    /// sends cost no broker round trip.
    pub lease_messages: u64,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            messages_per_minute: 120,
            messages_per_day: 10_000,
            bytes_per_minute: 4 * MIB as u64,
            bytes_per_day: 64 * MIB as u64,
            fanout_bytes_per_minute: 32 * MIB as u64,
            groups_per_day: 50,
            media_bytes_per_day: GIB as u64,
            lease_messages: 10,
        }
    }
}

/// Media: uploads (edge), signed URLs (edge) and thumbnails (persister).
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// `CHAT_MEDIA_MAX_BYTES`: the largest upload (`413` beyond it).
    pub max_bytes: u64,
    /// `CHAT_MEDIA_URL_KEY`: the HMAC key of signed media URLs, the same on
    /// every edge. Unset, each edge makes a random one at start (its URLs
    /// then work only on that edge, until it restarts).
    pub url_key: Option<String>,
    /// `CHAT_MEDIA_URL_TTL_SECS`: how long a signed URL works.
    pub url_ttl: Duration,
    /// `CHAT_MEDIA_CACHE_SECS`: `Cache-Control: private, max-age` of a
    /// download (the bytes of an id never change).
    pub cache_max_age: Duration,
    /// `CHAT_MEDIA_MAX_PIXELS`: the largest image (width x height) the
    /// thumbnailer decodes; a larger one gets no thumbnail.
    pub max_pixels: u64,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            max_bytes: 100 * MIB as u64,
            url_key: None,
            url_ttl: Duration::from_secs(300),
            cache_max_age: Duration::from_secs(3600),
            max_pixels: 40_000_000,
        }
    }
}

/// Abuse limits, enforced by each edge. Rates are tokens per second with a
/// burst of twice the rate.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// `CHAT_LIMIT_SEND_PER_SEC`: sends per connection.
    pub send_per_connection: u32,
    /// `CHAT_LIMIT_USER_SEND_PER_SEC`: sends per user, over all of the
    /// user's connections on one edge.
    pub send_per_user: u32,
    /// `CHAT_LIMIT_REQUESTS_PER_SEC`: other requests per connection.
    pub requests_per_connection: u32,
    /// `CHAT_LIMIT_CONNECTIONS_PER_USER`: connections of one user on one edge.
    pub connections_per_user: usize,
    /// `CHAT_LIMIT_CONNECTS_PER_IP_PER_SEC`: new connections per client IP.
    pub connects_per_ip: u32,
    /// `CHAT_LIMIT_ABUSE_STRIKES`: ignored refusals (requests sent again
    /// before their `retry_after_ms`) within 10 s after which the connection
    /// is closed with 4008.
    pub abuse_strikes: u32,
    /// `CHAT_LIMIT_LIVE_QUEUE`: live frames waiting for one session; a
    /// session that falls further behind is closed with 1013 (it resumes
    /// from its cursor).
    pub live_queue: usize,
    /// `CHAT_LIMIT_LIVE_QUEUE_BYTES`: the same bound in bytes (a frame may
    /// be up to 1 MiB, so a count alone would not bound memory).
    pub live_queue_bytes: usize,
    /// `CHAT_LIMIT_OUTBOUND_QUEUE`: frames waiting for one connection's
    /// socket writer.
    pub outbound_queue: usize,
}

/// The HS256 secret file of a local run (`./scripts/dev` writes it); see
/// [`Config::jwt_secret_file`].
pub const DEFAULT_JWT_SECRET_FILE: &str = ".chat/jwt_secret";

/// The largest frame (PROTOCOL.md: 1 MiB): a live queue must hold one.
const LARGEST_FRAME_BYTES: usize = 1024 * 1024;
/// Queue lengths beyond this are a mistake (and near `usize::MAX` a panic
/// when the channel is built).
const LONGEST_QUEUE: usize = 1_000_000;

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            send_per_connection: 20,
            send_per_user: 50,
            requests_per_connection: 20,
            connections_per_user: 10,
            connects_per_ip: 20,
            abuse_strikes: 50,
            live_queue: 4096,
            live_queue_bytes: 4 * LARGEST_FRAME_BYTES,
            outbound_queue: 64,
        }
    }
}

/// How the edge tells clients apart by address, and what it keeps per
/// address.
#[derive(Debug, Clone)]
pub struct EdgeNetConfig {
    /// `CHAT_TRUSTED_PROXIES`: comma-separated addresses or ranges
    /// (`10.0.0.0/8`, `2001:db8::/32`) of load balancers in front of the
    /// edge. Only a connection from one of them has its client address read
    /// from `X-Forwarded-For` (the right-most address not itself a trusted
    /// proxy); anyone else's `X-Forwarded-For` is ignored. Empty by default.
    pub trusted_proxies: Vec<IpRange>,
    /// `CHAT_LIMIT_DISCOVERY_PER_IP_PER_SEC`: `GET /v1/edges` per client
    /// address (an IPv6 client counts per /64).
    pub discovery_per_ip: u32,
    /// `CHAT_LIMIT_TRACKED_IPS`: client addresses whose rate buckets are
    /// kept; past it the least recently seen are forgotten (counted in
    /// `edge_ip_table_evictions_total`).
    pub tracked_ips: usize,
}

impl Default for EdgeNetConfig {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            discovery_per_ip: 5,
            tracked_ips: 100_000,
        }
    }
}

/// Bounds of the group membership cache, whose keys any user can choose
/// (every group they send to).
#[derive(Debug, Clone)]
pub struct GroupCacheConfig {
    /// `CHAT_GROUP_CACHE_ENTRIES`: groups cached at most.
    pub entries: usize,
    /// `CHAT_GROUP_CACHE_BYTES`: their estimated size at most.
    pub bytes: usize,
    /// `CHAT_GROUP_CACHE_TTL_MS`: an entry is asked for again after this
    /// (a safety net for a missed invalidation) and swept out once older.
    pub ttl: Duration,
}

impl Default for GroupCacheConfig {
    fn default() -> Self {
        Self {
            entries: 10_000,
            bytes: 32 * 1024 * 1024,
            ttl: Duration::from_secs(30),
        }
    }
}

/// pushd's providers and policy. Endpoint URLs are settings so a test (or a
/// regional proxy) can stand in for Google's and Apple's servers.
#[derive(Debug, Clone)]
pub struct PushConfig {
    /// `CHAT_PUSH_FCM_URL`: FCM HTTP v1 base URL.
    pub fcm_url: String,
    /// `CHAT_PUSH_FCM_CREDENTIALS`: a Google service-account JSON key file
    /// (`project_id`, `client_email`, `private_key`, `token_uri`); FCM is
    /// off without it.
    pub fcm_credentials: Option<PathBuf>,
    /// `CHAT_PUSH_APNS_URL`: APNs base URL (HTTP/2).
    pub apns_url: String,
    /// `CHAT_PUSH_APNS_KEY_FILE`: the `.p8` ES256 signing key; APNs is off
    /// without it. `CHAT_PUSH_APNS_KEY_ID`, `CHAT_PUSH_APNS_TEAM_ID` and
    /// `CHAT_PUSH_APNS_TOPIC` (the app's bundle id) are then required.
    pub apns_key_file: Option<PathBuf>,
    pub apns_key_id: Option<String>,
    pub apns_team_id: Option<String>,
    pub apns_topic: Option<String>,
    /// `CHAT_PUSH_WEBHOOK_URL`: where webhook notifications are POSTed;
    /// webhooks are off without it. `CHAT_PUSH_WEBHOOK_SECRET` signs them
    /// (HMAC-SHA256) and is then required.
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<String>,
    /// `CHAT_PUSH_PREVIEW`: put the message text in notifications (`true`,
    /// the default) or only "new message from alice" (`false`, for privacy).
    pub preview: bool,
    /// `CHAT_PUSH_COALESCE_MS`: jobs for one user within this window become
    /// one notification ("3 new messages from alice").
    pub coalesce: Duration,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            fcm_url: "https://fcm.googleapis.com".into(),
            fcm_credentials: None,
            apns_url: "https://api.push.apple.com".into(),
            apns_key_file: None,
            apns_key_id: None,
            apns_team_id: None,
            apns_topic: None,
            webhook_url: None,
            webhook_secret: None,
            preview: true,
            coalesce: Duration::from_secs(3),
        }
    }
}

/// Caps on one user's push tokens: one message to a user makes at most
/// this many provider requests, however many tokens were registered. Past
/// a cap, a registration drops the user's least recently registered token
/// (or device): a cap that refused instead would leave someone whose old
/// phones never unregistered with no way to register the new one.
#[derive(Debug, Clone)]
pub struct PushTokenLimits {
    /// `CHAT_PUSH_MAX_TOKENS_PER_USER`: tokens over all devices and
    /// platforms.
    pub per_user: usize,
    /// `CHAT_PUSH_MAX_DEVICES_PER_USER`: devices with at least one token.
    pub devices_per_user: usize,
}

/// More tokens than this per user is a mistake (and a push amplifier).
const MOST_PUSH_TOKENS: usize = 1000;

impl Default for PushTokenLimits {
    fn default() -> Self {
        Self {
            per_user: 10,
            devices_per_user: 5,
        }
    }
}

impl PushTokenLimits {
    fn read(&mut self, reader: &mut Reader<'_>) {
        reader.parse("CHAT_PUSH_MAX_TOKENS_PER_USER", &mut self.per_user);
        reader.parse("CHAT_PUSH_MAX_DEVICES_PER_USER", &mut self.devices_per_user);
    }

    fn check(&self, problems: &mut Vec<String>) {
        for (name, value) in [
            ("CHAT_PUSH_MAX_TOKENS_PER_USER", self.per_user),
            ("CHAT_PUSH_MAX_DEVICES_PER_USER", self.devices_per_user),
        ] {
            if !(1..=MOST_PUSH_TOKENS).contains(&value) {
                problems.push(format!("{name}: must be between 1 and {MOST_PUSH_TOKENS}"));
            }
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_user: None,
            nats_password: None,
            database_urls: vec!["postgres://chat@127.0.0.1:5433/chat".into()],
            database_pool_size: 8,
            edge_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            edge_id: None,
            jwt_secret: None,
            jwt_secret_file: None,
            jwt_jwks_file: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway: Duration::from_secs(30),
            dev_tokens: false,
            dev_tokens_public: false,
            dev: false,
            heartbeat: Duration::from_secs(25),
            heartbeat_grace: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(10),
            max_group_members: 100,
            stream_replicas: 1,
            partitions: Partitions::default(),
            inbox_max_age: Duration::from_secs(7 * 24 * 3600),
            messages_max_age: Duration::from_secs(30 * 24 * 3600),
            dedup_window: Duration::from_secs(15 * 60),
            send_claim_max_age: Duration::from_secs(7 * 24 * 3600),
            edit_window: Duration::from_secs(900),
            delete_window: Duration::from_secs(172_800),
            node_lease_ttl: Duration::from_secs(30),
            request_timeout: Duration::from_secs(2),
            log_json: false,
            metrics_addr: None,
            edge_public_url: None,
            allowed_origins: Vec::new(),
            edge_ttl: Duration::from_secs(15),
            drain_timeout: Duration::from_secs(30),
            drain_batch: 500,
            drain_batch_interval: Duration::from_millis(200),
            limits: LimitsConfig::default(),
            presence_heartbeat: Duration::from_secs(5),
            presence_timeout: Duration::from_secs(16),
            presence_debounce: Duration::from_secs(5),
            push: PushConfig::default(),
            edge_net: EdgeNetConfig::default(),
            group_cache: GroupCacheConfig::default(),
            push_tokens: PushTokenLimits::default(),
            bounds: StoreBounds::default(),
            quota: QuotaConfig::default(),
            media: MediaConfig::default(),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Every problem found in the environment, reported at once.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .problems.join("\n  "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads settings through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut config = Self::default();
        let mut reader = Reader {
            lookup: &lookup,
            problems: Vec::new(),
        };
        reader.string("CHAT_NATS_URL", &mut config.nats_url);
        config.nats_user = reader.optional("CHAT_NATS_USER");
        config.nats_password = reader.optional("CHAT_NATS_PASSWORD");
        if let Some(url) = reader.optional("CHAT_DATABASE_URL") {
            config.database_urls = vec![url];
        }
        if let Some(urls) = reader.optional("CHAT_DATABASE_URLS") {
            config.database_urls = urls
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(String::from)
                .collect();
        }
        reader.parse("CHAT_DATABASE_POOL", &mut config.database_pool_size);
        reader.parse("CHAT_EDGE_ADDR", &mut config.edge_addr);
        config.edge_id = reader.optional("CHAT_EDGE_ID");
        config.jwt_secret = reader.optional("CHAT_JWT_SECRET");
        config.jwt_secret_file = reader.optional("CHAT_JWT_SECRET_FILE").map(PathBuf::from);
        config.jwt_jwks_file = reader.optional("CHAT_JWT_JWKS_FILE").map(PathBuf::from);
        config.jwt_issuer = reader.optional("CHAT_JWT_ISSUER");
        config.jwt_audience = reader.optional("CHAT_JWT_AUDIENCE");
        reader.seconds("CHAT_JWT_LEEWAY_SECS", &mut config.jwt_leeway);
        reader.parse("CHAT_DEV_TOKENS", &mut config.dev_tokens);
        reader.parse("CHAT_DEV_TOKENS_PUBLIC", &mut config.dev_tokens_public);
        reader.parse("CHAT_DEV", &mut config.dev);
        reader.seconds("CHAT_HEARTBEAT_SECS", &mut config.heartbeat);
        reader.seconds("CHAT_HEARTBEAT_GRACE_SECS", &mut config.heartbeat_grace);
        reader.seconds("CHAT_HELLO_TIMEOUT_SECS", &mut config.hello_timeout);
        reader.parse("CHAT_MAX_GROUP_MEMBERS", &mut config.max_group_members);
        reader.parse("CHAT_STREAM_REPLICAS", &mut config.stream_replicas);
        let mut partitions = config.partitions.count();
        reader.parse("CHAT_PARTITIONS", &mut partitions);
        match Partitions::new(partitions) {
            Some(valid) => config.partitions = valid,
            None => reader.problems.push(format!(
                "CHAT_PARTITIONS: must be between 1 and {MAX_PARTITIONS}"
            )),
        }
        reader.seconds("CHAT_INBOX_MAX_AGE_SECS", &mut config.inbox_max_age);
        reader.seconds("CHAT_MESSAGES_MAX_AGE_SECS", &mut config.messages_max_age);
        reader.seconds("CHAT_DEDUP_WINDOW_SECS", &mut config.dedup_window);
        reader.seconds(
            "CHAT_SEND_CLAIM_MAX_AGE_SECS",
            &mut config.send_claim_max_age,
        );
        reader.seconds("CHAT_NODE_LEASE_SECS", &mut config.node_lease_ttl);
        reader.seconds("CHAT_EDIT_WINDOW_SECS", &mut config.edit_window);
        reader.seconds("CHAT_DELETE_WINDOW_SECS", &mut config.delete_window);
        reader.millis("CHAT_REQUEST_TIMEOUT_MS", &mut config.request_timeout);
        reader.millis("CHAT_SHUTDOWN_GRACE_MS", &mut config.shutdown_grace);
        if let Some(format) = reader.optional("CHAT_LOG_FORMAT") {
            match format.as_str() {
                "json" => config.log_json = true,
                "text" => config.log_json = false,
                other => reader.problems.push(format!(
                    "CHAT_LOG_FORMAT: expected text or json, got {other:?}"
                )),
            }
        }
        config.metrics_addr = reader.optional_parse("CHAT_METRICS_ADDR");
        config.edge_public_url = reader.optional("CHAT_EDGE_PUBLIC_URL");
        if let Some(origins) = reader.optional("CHAT_ALLOWED_ORIGINS") {
            config.allowed_origins = origins
                .split(',')
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .collect();
        }
        reader.millis("CHAT_EDGE_TTL_MS", &mut config.edge_ttl);
        reader.seconds("CHAT_DRAIN_TIMEOUT_SECS", &mut config.drain_timeout);
        reader.parse("CHAT_DRAIN_BATCH", &mut config.drain_batch);
        reader.millis(
            "CHAT_DRAIN_BATCH_INTERVAL_MS",
            &mut config.drain_batch_interval,
        );
        let limits = &mut config.limits;
        reader.parse("CHAT_LIMIT_SEND_PER_SEC", &mut limits.send_per_connection);
        reader.parse("CHAT_LIMIT_USER_SEND_PER_SEC", &mut limits.send_per_user);
        reader.parse(
            "CHAT_LIMIT_REQUESTS_PER_SEC",
            &mut limits.requests_per_connection,
        );
        reader.parse(
            "CHAT_LIMIT_CONNECTIONS_PER_USER",
            &mut limits.connections_per_user,
        );
        reader.parse(
            "CHAT_LIMIT_CONNECTS_PER_IP_PER_SEC",
            &mut limits.connects_per_ip,
        );
        reader.parse("CHAT_LIMIT_ABUSE_STRIKES", &mut limits.abuse_strikes);
        reader.parse("CHAT_LIMIT_LIVE_QUEUE", &mut limits.live_queue);
        reader.parse("CHAT_LIMIT_LIVE_QUEUE_BYTES", &mut limits.live_queue_bytes);
        reader.parse("CHAT_LIMIT_OUTBOUND_QUEUE", &mut limits.outbound_queue);
        reader.millis("CHAT_PRESENCE_HEARTBEAT_MS", &mut config.presence_heartbeat);
        reader.millis("CHAT_PRESENCE_TIMEOUT_MS", &mut config.presence_timeout);
        reader.millis("CHAT_PRESENCE_DEBOUNCE_MS", &mut config.presence_debounce);
        reader.string("CHAT_PUSH_FCM_URL", &mut config.push.fcm_url);
        config.push.fcm_credentials = reader
            .optional("CHAT_PUSH_FCM_CREDENTIALS")
            .map(PathBuf::from);
        reader.string("CHAT_PUSH_APNS_URL", &mut config.push.apns_url);
        config.push.apns_key_file = reader
            .optional("CHAT_PUSH_APNS_KEY_FILE")
            .map(PathBuf::from);
        config.push.apns_key_id = reader.optional("CHAT_PUSH_APNS_KEY_ID");
        config.push.apns_team_id = reader.optional("CHAT_PUSH_APNS_TEAM_ID");
        config.push.apns_topic = reader.optional("CHAT_PUSH_APNS_TOPIC");
        config.push.webhook_url = reader.optional("CHAT_PUSH_WEBHOOK_URL");
        config.push.webhook_secret = reader.optional("CHAT_PUSH_WEBHOOK_SECRET");
        reader.parse("CHAT_PUSH_PREVIEW", &mut config.push.preview);
        reader.millis("CHAT_PUSH_COALESCE_MS", &mut config.push.coalesce);
        if let Some(proxies) = reader.optional("CHAT_TRUSTED_PROXIES") {
            for proxy in proxies.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                match proxy.parse() {
                    Ok(range) => config.edge_net.trusted_proxies.push(range),
                    Err(e) => reader.problems.push(format!("CHAT_TRUSTED_PROXIES: {e}")),
                }
            }
        }
        let net = &mut config.edge_net;
        reader.parse(
            "CHAT_LIMIT_DISCOVERY_PER_IP_PER_SEC",
            &mut net.discovery_per_ip,
        );
        reader.parse("CHAT_LIMIT_TRACKED_IPS", &mut net.tracked_ips);
        let cache = &mut config.group_cache;
        reader.parse("CHAT_GROUP_CACHE_ENTRIES", &mut cache.entries);
        reader.parse("CHAT_GROUP_CACHE_BYTES", &mut cache.bytes);
        reader.millis("CHAT_GROUP_CACHE_TTL_MS", &mut cache.ttl);
        config.push_tokens.read(&mut reader);
        reader.store_bounds(&mut config.bounds);
        reader.quotas(&mut config.quota);
        reader.parse("CHAT_MEDIA_MAX_BYTES", &mut config.media.max_bytes);
        config.media.url_key = reader.optional("CHAT_MEDIA_URL_KEY");
        reader.seconds("CHAT_MEDIA_URL_TTL_SECS", &mut config.media.url_ttl);
        reader.seconds("CHAT_MEDIA_CACHE_SECS", &mut config.media.cache_max_age);
        reader.parse("CHAT_MEDIA_MAX_PIXELS", &mut config.media.max_pixels);
        let mut problems = reader.problems;
        problems.extend(config.check());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Cross-field rules.
    fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(Duration::from_millis(100)..=Duration::from_secs(600)).contains(&self.shutdown_grace) {
            problems.push("CHAT_SHUTDOWN_GRACE_MS: between 100 and 600000".into());
        }
        if !(2..=10_000).contains(&self.max_group_members) {
            problems.push("CHAT_MAX_GROUP_MEMBERS: must be between 2 and 10000".into());
        }
        if ![1, 3, 5].contains(&self.stream_replicas) {
            problems.push("CHAT_STREAM_REPLICAS: must be 1, 3 or 5".into());
        }
        if self.dedup_window < Duration::from_secs(60) {
            problems.push("CHAT_DEDUP_WINDOW_SECS: must be at least 60".into());
        }
        // A send's claim is written up to twice the idle timeout after its
        // answer (edge/src/claims.rs); it must be stored before the window
        // that covers the send without it ends.
        if self.dedup_window <= self.idle_timeout() * 2 {
            problems.push(
                "CHAT_DEDUP_WINDOW_SECS: must be longer than twice the idle timeout \
                 (2 x (2 x CHAT_HEARTBEAT_SECS + CHAT_HEARTBEAT_GRACE_SECS))"
                    .into(),
            );
        }
        if self.heartbeat.is_zero() {
            problems.push("CHAT_HEARTBEAT_SECS: must be positive".into());
        }
        if self.node_lease_ttl < Duration::from_secs(3) {
            problems.push("CHAT_NODE_LEASE_SECS: must be at least 3".into());
        }
        // Beyond ten years a duration only invites arithmetic overflow.
        let longest = Duration::from_secs(10 * 365 * 24 * 3600);
        for (name, value) in [
            ("CHAT_JWT_LEEWAY_SECS", self.jwt_leeway),
            ("CHAT_HEARTBEAT_SECS", self.heartbeat),
            ("CHAT_HEARTBEAT_GRACE_SECS", self.heartbeat_grace),
            ("CHAT_HELLO_TIMEOUT_SECS", self.hello_timeout),
            ("CHAT_INBOX_MAX_AGE_SECS", self.inbox_max_age),
            ("CHAT_MESSAGES_MAX_AGE_SECS", self.messages_max_age),
            ("CHAT_DEDUP_WINDOW_SECS", self.dedup_window),
            ("CHAT_SEND_CLAIM_MAX_AGE_SECS", self.send_claim_max_age),
            ("CHAT_EDIT_WINDOW_SECS", self.edit_window),
            ("CHAT_DELETE_WINDOW_SECS", self.delete_window),
            ("CHAT_NODE_LEASE_SECS", self.node_lease_ttl),
            ("CHAT_REQUEST_TIMEOUT_MS", self.request_timeout),
            ("CHAT_PRESENCE_HEARTBEAT_MS", self.presence_heartbeat),
            ("CHAT_PRESENCE_TIMEOUT_MS", self.presence_timeout),
            ("CHAT_PRESENCE_DEBOUNCE_MS", self.presence_debounce),
            ("CHAT_EDGE_TTL_MS", self.edge_ttl),
            ("CHAT_DRAIN_TIMEOUT_SECS", self.drain_timeout),
            ("CHAT_DRAIN_BATCH_INTERVAL_MS", self.drain_batch_interval),
        ] {
            if value > longest {
                problems.push(format!("{name}: at most ten years"));
            }
        }
        let push = &self.push;
        if push.apns_key_file.is_some()
            && (push.apns_key_id.is_none()
                || push.apns_team_id.is_none()
                || push.apns_topic.is_none())
        {
            problems.push(
                "CHAT_PUSH_APNS_KEY_FILE: needs CHAT_PUSH_APNS_KEY_ID, CHAT_PUSH_APNS_TEAM_ID and CHAT_PUSH_APNS_TOPIC".into(),
            );
        }
        if push.webhook_url.is_some() && push.webhook_secret.is_none() {
            problems.push("CHAT_PUSH_WEBHOOK_URL: needs CHAT_PUSH_WEBHOOK_SECRET".into());
        }
        if push.coalesce > Duration::from_secs(60) {
            problems.push("CHAT_PUSH_COALESCE_MS: at most 60000".into());
        }
        if self.edge_ttl < Duration::from_secs(1) {
            problems.push("CHAT_EDGE_TTL_MS: at least 1000".into());
        }
        if self.drain_batch == 0 {
            problems.push("CHAT_DRAIN_BATCH: must be positive".into());
        }
        let limits = &self.limits;
        for (name, value) in [
            ("CHAT_LIMIT_SEND_PER_SEC", limits.send_per_connection),
            ("CHAT_LIMIT_USER_SEND_PER_SEC", limits.send_per_user),
            (
                "CHAT_LIMIT_REQUESTS_PER_SEC",
                limits.requests_per_connection,
            ),
            ("CHAT_LIMIT_CONNECTS_PER_IP_PER_SEC", limits.connects_per_ip),
            ("CHAT_LIMIT_ABUSE_STRIKES", limits.abuse_strikes),
        ] {
            if value == 0 {
                problems.push(format!("{name}: must be positive"));
            }
        }
        if limits.connections_per_user == 0 {
            problems.push("CHAT_LIMIT_CONNECTIONS_PER_USER: must be positive".into());
        }
        for (name, value) in [
            ("CHAT_LIMIT_LIVE_QUEUE", limits.live_queue),
            ("CHAT_LIMIT_OUTBOUND_QUEUE", limits.outbound_queue),
        ] {
            if !(1..=LONGEST_QUEUE).contains(&value) {
                problems.push(format!("{name}: must be between 1 and {LONGEST_QUEUE}"));
            }
        }
        if limits.live_queue_bytes < LARGEST_FRAME_BYTES {
            problems.push(format!(
                "CHAT_LIMIT_LIVE_QUEUE_BYTES: at least {LARGEST_FRAME_BYTES} (one largest frame)"
            ));
        }
        if self.presence_heartbeat.is_zero() {
            problems.push("CHAT_PRESENCE_HEARTBEAT_MS: must be positive".into());
        }
        if self.presence_timeout < self.presence_heartbeat * 2 {
            problems.push(
                "CHAT_PRESENCE_TIMEOUT_MS: must be at least twice CHAT_PRESENCE_HEARTBEAT_MS"
                    .into(),
            );
        }
        if !(1..=crate::shards::MAX_SHARDS).contains(&self.database_urls.len()) {
            problems.push(format!(
                "CHAT_DATABASE_URLS: 1 to {} URLs",
                crate::shards::MAX_SHARDS
            ));
        }
        if self.database_pool_size == 0 {
            problems.push("CHAT_DATABASE_POOL: must be positive".into());
        }
        problems.extend(self.bounds.check());
        problems.extend(self.quota.check());
        self.push_tokens.check(&mut problems);
        problems.extend(self.check_edge_net_and_group_cache());
        problems
    }

    fn check_edge_net_and_group_cache(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.edge_net.discovery_per_ip == 0 {
            problems.push("CHAT_LIMIT_DISCOVERY_PER_IP_PER_SEC: must be positive".into());
        }
        for (name, value) in [
            ("CHAT_LIMIT_TRACKED_IPS", self.edge_net.tracked_ips),
            ("CHAT_GROUP_CACHE_ENTRIES", self.group_cache.entries),
        ] {
            if !(1..=LONGEST_QUEUE).contains(&value) {
                problems.push(format!("{name}: must be between 1 and {LONGEST_QUEUE}"));
            }
        }
        if self.group_cache.bytes == 0 {
            problems.push("CHAT_GROUP_CACHE_BYTES: must be positive".into());
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.group_cache.ttl) {
            problems.push("CHAT_GROUP_CACHE_TTL_MS: between 1000 and 3600000".into());
        }
        problems.extend(self.media.check());
        problems
    }

    /// The URL clients reach this edge at, for discovery and `reconnect`.
    pub fn public_url(&self) -> String {
        self.edge_public_url
            .clone()
            .unwrap_or_else(|| format!("ws://{}/v1/ws", self.edge_addr))
    }

    /// Shard 0, the home shard: the social tables, and the one database of
    /// tools that need one (`chatctl bench --peer`'s archive).
    pub fn home_database_url(&self) -> &str {
        self.database_urls.first().map_or("", String::as_str)
    }

    /// The silence after which a connection is closed with 4003.
    pub fn idle_timeout(&self) -> Duration {
        self.heartbeat * 2 + self.heartbeat_grace
    }
}

impl StoreBounds {
    /// Every byte bound with the setting that gives it (a service started
    /// with these variables gets these bounds).
    pub fn settings(&self) -> [(&'static str, i64); 10] {
        [
            ("CHAT_MESSAGES_MAX_BYTES", self.messages),
            ("CHAT_INBOX_MAX_BYTES", self.inbox),
            ("CHAT_PUSH_MAX_BYTES", self.push),
            ("CHAT_EVENTS_MAX_BYTES", self.events),
            ("CHAT_DEADLETTER_MAX_BYTES", self.deadletter),
            ("CHAT_QUOTAS_MAX_BYTES", self.quotas),
            ("CHAT_AUDIT_MAX_BYTES", self.audit),
            ("CHAT_SENT_MAX_BYTES", self.sent),
            ("CHAT_BUCKET_MAX_BYTES", self.buckets),
            ("CHAT_MEDIA_STORE_MAX_BYTES", self.media),
        ]
    }

    fn check(&self) -> Vec<String> {
        // A stream must hold a few of its largest messages (1 MiB each).
        let mut problems = Vec::new();
        for (name, value) in self.settings() {
            if value < 4 * MIB {
                problems.push(format!("{name}: at least {} (4 MiB)", 4 * MIB));
            }
        }
        if self.inbox_items_per_user < 100 {
            problems.push("CHAT_INBOX_MAX_ITEMS_PER_USER: at least 100".into());
        }
        problems
    }
}

impl MediaConfig {
    fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.max_bytes == 0 {
            problems.push("CHAT_MEDIA_MAX_BYTES: must be positive".into());
        }
        if self.url_key.as_ref().is_some_and(|key| key.len() < 32) {
            problems.push("CHAT_MEDIA_URL_KEY: at least 32 bytes".into());
        }
        if !(Duration::from_secs(10)..=Duration::from_secs(24 * 3600)).contains(&self.url_ttl) {
            problems.push("CHAT_MEDIA_URL_TTL_SECS: between 10 and 86400".into());
        }
        if self.cache_max_age > Duration::from_secs(365 * 24 * 3600) {
            problems.push("CHAT_MEDIA_CACHE_SECS: at most a year".into());
        }
        if !(1..=1 << 32).contains(&self.max_pixels) {
            problems.push("CHAT_MEDIA_MAX_PIXELS: between 1 and 2^32".into());
        }
        problems
    }
}

impl QuotaConfig {
    fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, value) in [
            ("CHAT_QUOTA_MESSAGES_PER_MIN", self.messages_per_minute),
            ("CHAT_QUOTA_MESSAGES_PER_DAY", self.messages_per_day),
            ("CHAT_QUOTA_BYTES_PER_MIN", self.bytes_per_minute),
            ("CHAT_QUOTA_BYTES_PER_DAY", self.bytes_per_day),
            (
                "CHAT_QUOTA_FANOUT_BYTES_PER_MIN",
                self.fanout_bytes_per_minute,
            ),
            ("CHAT_QUOTA_GROUPS_PER_DAY", self.groups_per_day),
            ("CHAT_QUOTA_MEDIA_BYTES_PER_DAY", self.media_bytes_per_day),
            ("CHAT_QUOTA_LEASE_MESSAGES", self.lease_messages),
        ] {
            // Past 2^53 a counter's total no longer fits JSON numbers exactly.
            if !(1..=1 << 53).contains(&value) {
                problems.push(format!("{name}: must be between 1 and 2^53"));
            }
        }
        problems
    }
}

struct Reader<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
    problems: Vec<String>,
}

impl Reader<'_> {
    fn optional(&mut self, key: &str) -> Option<String> {
        (self.lookup)(key).filter(|v| !v.is_empty())
    }

    fn string(&mut self, key: &str, into: &mut String) {
        if let Some(value) = self.optional(key) {
            *into = value;
        }
    }

    fn parse<T: std::str::FromStr>(&mut self, key: &str, into: &mut T)
    where
        T::Err: std::fmt::Display,
    {
        if let Some(value) = self.optional(key) {
            match value.parse() {
                Ok(parsed) => *into = parsed,
                Err(e) => self.problems.push(format!("{key}: {value:?}: {e}")),
            }
        }
    }

    /// A setting that has no default: `None` when unset.
    fn optional_parse<T: std::str::FromStr>(&mut self, key: &str) -> Option<T>
    where
        T::Err: std::fmt::Display,
    {
        let value = self.optional(key)?;
        match value.parse() {
            Ok(parsed) => Some(parsed),
            Err(e) => {
                self.problems.push(format!("{key}: {value:?}: {e}"));
                None
            }
        }
    }

    fn store_bounds(&mut self, bounds: &mut StoreBounds) {
        self.parse("CHAT_MESSAGES_MAX_BYTES", &mut bounds.messages);
        self.parse("CHAT_INBOX_MAX_BYTES", &mut bounds.inbox);
        self.parse(
            "CHAT_INBOX_MAX_ITEMS_PER_USER",
            &mut bounds.inbox_items_per_user,
        );
        self.parse("CHAT_PUSH_MAX_BYTES", &mut bounds.push);
        self.parse("CHAT_EVENTS_MAX_BYTES", &mut bounds.events);
        self.parse("CHAT_DEADLETTER_MAX_BYTES", &mut bounds.deadletter);
        self.parse("CHAT_QUOTAS_MAX_BYTES", &mut bounds.quotas);
        self.parse("CHAT_AUDIT_MAX_BYTES", &mut bounds.audit);
        self.parse("CHAT_SENT_MAX_BYTES", &mut bounds.sent);
        self.parse("CHAT_BUCKET_MAX_BYTES", &mut bounds.buckets);
        self.parse("CHAT_MEDIA_STORE_MAX_BYTES", &mut bounds.media);
    }

    fn quotas(&mut self, quota: &mut QuotaConfig) {
        self.parse(
            "CHAT_QUOTA_MESSAGES_PER_MIN",
            &mut quota.messages_per_minute,
        );
        self.parse("CHAT_QUOTA_MESSAGES_PER_DAY", &mut quota.messages_per_day);
        self.parse("CHAT_QUOTA_BYTES_PER_MIN", &mut quota.bytes_per_minute);
        self.parse("CHAT_QUOTA_BYTES_PER_DAY", &mut quota.bytes_per_day);
        self.parse(
            "CHAT_QUOTA_FANOUT_BYTES_PER_MIN",
            &mut quota.fanout_bytes_per_minute,
        );
        self.parse("CHAT_QUOTA_GROUPS_PER_DAY", &mut quota.groups_per_day);
        self.parse(
            "CHAT_QUOTA_MEDIA_BYTES_PER_DAY",
            &mut quota.media_bytes_per_day,
        );
        self.parse("CHAT_QUOTA_LEASE_MESSAGES", &mut quota.lease_messages);
    }

    fn millis(&mut self, key: &str, into: &mut Duration) {
        let mut ms = into.as_millis() as u64;
        self.parse(key, &mut ms);
        *into = Duration::from_millis(ms);
    }

    fn seconds(&mut self, key: &str, into: &mut Duration) {
        let mut secs = into.as_secs();
        self.parse(key, &mut secs);
        *into = Duration::from_secs(secs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_need_no_settings() {
        let config = from(&[]).unwrap();
        assert_eq!(config.edge_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(config.idle_timeout(), Duration::from_secs(55));
        assert!(config.dedup_window >= Duration::from_secs(600));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = from(&[
            ("CHAT_EDGE_ADDR", "nope"),
            ("CHAT_HEARTBEAT_SECS", "-1"),
            ("CHAT_STREAM_REPLICAS", "2"),
            ("CHAT_LOG_FORMAT", "xml"),
            ("CHAT_INBOX_MAX_AGE_SECS", "18446744073709551615"),
            ("CHAT_PARTITIONS", "17"),
        ])
        .unwrap_err();
        assert_eq!(err.problems.len(), 6, "{err}");
    }

    #[test]
    fn settings_override_defaults() {
        let config = from(&[
            ("CHAT_NATS_URL", "nats://10.0.0.1:4222"),
            ("CHAT_HEARTBEAT_SECS", "5"),
            ("CHAT_REQUEST_TIMEOUT_MS", "700"),
            ("CHAT_PARTITIONS", "3"),
        ])
        .unwrap();
        assert_eq!(config.partitions.count(), 3);
        assert_eq!(config.nats_url, "nats://10.0.0.1:4222");
        assert_eq!(config.heartbeat, Duration::from_secs(5));
        assert_eq!(config.request_timeout, Duration::from_millis(700));
    }

    #[test]
    fn database_urls_is_a_list_and_database_url_one_shard() {
        let one = from(&[("CHAT_DATABASE_URL", "postgres://a/x")]).unwrap();
        assert_eq!(one.database_urls, ["postgres://a/x"]);
        let two = from(&[
            ("CHAT_DATABASE_URL", "postgres://a/x"),
            ("CHAT_DATABASE_URLS", "postgres://a/x, postgres://b/y"),
        ])
        .unwrap();
        assert_eq!(two.database_urls, ["postgres://a/x", "postgres://b/y"]);
        assert!(from(&[("CHAT_DATABASE_URLS", ",")]).is_err());
    }

    #[test]
    fn the_dedup_window_outlasts_twice_the_idle_timeout() {
        // Idle 2 x 300 + 5 s: a send's claim may be written 1,210 s after it.
        let err = from(&[("CHAT_HEARTBEAT_SECS", "300")]).unwrap_err();
        assert!(err.to_string().contains("CHAT_DEDUP_WINDOW_SECS"), "{err}");
        assert!(from(&[
            ("CHAT_HEARTBEAT_SECS", "300"),
            ("CHAT_DEDUP_WINDOW_SECS", "1300")
        ])
        .is_ok());
    }

    #[test]
    fn shutdown_grace_is_a_bounded_setting() {
        assert_eq!(from(&[]).unwrap().shutdown_grace, Duration::from_secs(10));
        let config = from(&[("CHAT_SHUTDOWN_GRACE_MS", "2500")]).unwrap();
        assert_eq!(config.shutdown_grace, Duration::from_millis(2500));
        for bad in ["0", "600001"] {
            assert!(from(&[("CHAT_SHUTDOWN_GRACE_MS", bad)]).is_err(), "{bad}");
        }
    }

    #[test]
    fn dev_tokens_are_off_unless_exactly_true() {
        assert!(!from(&[]).unwrap().dev_tokens);
        assert!(from(&[("CHAT_DEV_TOKENS", "true")]).unwrap().dev_tokens);
        assert!(!from(&[("CHAT_DEV_TOKENS", "false")]).unwrap().dev_tokens);
        for sloppy in ["1", "yes", "TRUE", "on"] {
            assert!(from(&[("CHAT_DEV_TOKENS", sloppy)]).is_err(), "{sloppy}");
        }
    }

    #[test]
    fn dev_switches_are_off_unless_exactly_true() {
        let config = from(&[]).unwrap();
        assert!(!config.dev && !config.dev_tokens_public);
        let config = from(&[("CHAT_DEV", "true"), ("CHAT_DEV_TOKENS_PUBLIC", "true")]).unwrap();
        assert!(config.dev && config.dev_tokens_public);
        for key in ["CHAT_DEV", "CHAT_DEV_TOKENS_PUBLIC"] {
            assert!(from(&[(key, "1")]).is_err(), "{key}");
        }
    }

    #[test]
    fn the_jwt_secret_file_is_none_unless_named() {
        assert_eq!(from(&[]).unwrap().jwt_secret_file, None);
        let config = from(&[("CHAT_JWT_SECRET_FILE", "/run/secrets/jwt")]).unwrap();
        assert_eq!(
            config.jwt_secret_file.as_deref(),
            Some(std::path::Path::new("/run/secrets/jwt"))
        );
    }

    #[test]
    fn allowed_origins_are_a_trimmed_list() {
        assert!(from(&[]).unwrap().allowed_origins.is_empty());
        let config = from(&[(
            "CHAT_ALLOWED_ORIGINS",
            " https://chat.example.com/ ,,http://localhost:8080",
        )])
        .unwrap();
        assert_eq!(
            config.allowed_origins,
            ["https://chat.example.com", "http://localhost:8080"]
        );
    }

    #[test]
    fn slow_consumer_bounds_are_settings() {
        let limits = from(&[]).unwrap().limits;
        assert_eq!(limits.live_queue, 4096);
        assert_eq!(limits.live_queue_bytes, 4 * 1024 * 1024);
        assert_eq!(limits.outbound_queue, 64);
        let limits = from(&[
            ("CHAT_LIMIT_LIVE_QUEUE", "100"),
            ("CHAT_LIMIT_LIVE_QUEUE_BYTES", "2097152"),
            ("CHAT_LIMIT_OUTBOUND_QUEUE", "8"),
        ])
        .unwrap()
        .limits;
        assert_eq!(
            (
                limits.live_queue,
                limits.live_queue_bytes,
                limits.outbound_queue
            ),
            (100, 2 * 1024 * 1024, 8)
        );
        let err = from(&[
            ("CHAT_LIMIT_LIVE_QUEUE", "0"),
            ("CHAT_LIMIT_LIVE_QUEUE_BYTES", "1000"),
            ("CHAT_LIMIT_OUTBOUND_QUEUE", "18446744073709551615"),
        ])
        .unwrap_err();
        assert_eq!(err.problems.len(), 3, "{err}");
    }

    #[test]
    fn push_token_caps_are_settings() {
        let caps = from(&[]).unwrap().push_tokens;
        assert_eq!((caps.per_user, caps.devices_per_user), (10, 5));
        let caps = from(&[
            ("CHAT_PUSH_MAX_TOKENS_PER_USER", "3"),
            ("CHAT_PUSH_MAX_DEVICES_PER_USER", "2"),
        ])
        .unwrap()
        .push_tokens;
        assert_eq!((caps.per_user, caps.devices_per_user), (3, 2));
        let err = from(&[
            ("CHAT_PUSH_MAX_TOKENS_PER_USER", "0"),
            ("CHAT_PUSH_MAX_DEVICES_PER_USER", "1001"),
        ])
        .unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
    }

    #[test]
    fn metrics_addr_is_off_unless_set() {
        assert_eq!(from(&[]).unwrap().metrics_addr, None);
        let config = from(&[("CHAT_METRICS_ADDR", "127.0.0.1:9101")]).unwrap();
        assert_eq!(
            config.metrics_addr,
            Some(SocketAddr::from(([127, 0, 0, 1], 9101)))
        );
        assert_eq!(
            from(&[("CHAT_METRICS_ADDR", "9101")])
                .unwrap_err()
                .problems
                .len(),
            1
        );
    }

    #[test]
    fn trusted_proxies_and_the_address_table_are_settings() {
        let net = from(&[]).unwrap().edge_net;
        assert!(net.trusted_proxies.is_empty());
        assert_eq!((net.discovery_per_ip, net.tracked_ips), (5, 100_000));
        let net = from(&[
            ("CHAT_TRUSTED_PROXIES", " 10.0.0.0/8, ,::1,2001:db8::/32"),
            ("CHAT_LIMIT_DISCOVERY_PER_IP_PER_SEC", "2"),
            ("CHAT_LIMIT_TRACKED_IPS", "1000"),
        ])
        .unwrap()
        .edge_net;
        let proxies: Vec<String> = net.trusted_proxies.iter().map(|p| p.to_string()).collect();
        assert_eq!(proxies, ["10.0.0.0/8", "::1/128", "2001:db8::/32"]);
        assert_eq!((net.discovery_per_ip, net.tracked_ips), (2, 1000));
        let err = from(&[
            (
                "CHAT_TRUSTED_PROXIES",
                "10.0.0.0/8,lb.example.com,10.0.0.0/40",
            ),
            ("CHAT_LIMIT_DISCOVERY_PER_IP_PER_SEC", "0"),
            ("CHAT_LIMIT_TRACKED_IPS", "0"),
        ])
        .unwrap_err();
        assert_eq!(err.problems.len(), 4, "{err}");
    }

    #[test]
    fn store_bounds_and_quotas_are_settings() {
        let config = from(&[]).unwrap();
        assert_eq!(config.bounds.messages, 8 * GIB);
        assert_eq!(config.bounds.inbox_items_per_user, 10_000);
        assert_eq!(config.quota.messages_per_minute, 120);
        assert_eq!(config.quota.groups_per_day, 50);
        let config = from(&[
            ("CHAT_INBOX_MAX_BYTES", "67108864"),
            ("CHAT_QUOTA_BYTES_PER_DAY", "1000"),
            ("CHAT_QUOTA_GROUPS_PER_DAY", "3"),
        ])
        .unwrap();
        assert_eq!(config.bounds.inbox, 64 * MIB);
        assert_eq!(config.quota.bytes_per_day, 1000);
        assert_eq!(config.quota.groups_per_day, 3);
        let err = from(&[
            ("CHAT_MESSAGES_MAX_BYTES", "1000"),
            ("CHAT_INBOX_MAX_ITEMS_PER_USER", "5"),
            ("CHAT_QUOTA_MESSAGES_PER_MIN", "0"),
            ("CHAT_QUOTA_LEASE_MESSAGES", "x"),
        ])
        .unwrap_err();
        assert_eq!(err.problems.len(), 4, "{err}");
    }

    #[test]
    fn media_settings_are_read_and_checked() {
        let config = from(&[]).unwrap();
        assert_eq!(config.media.max_bytes, 100 * MIB as u64);
        assert_eq!(config.media.url_ttl, Duration::from_secs(300));
        assert_eq!(config.quota.media_bytes_per_day, GIB as u64);
        let config = from(&[
            ("CHAT_MEDIA_MAX_BYTES", "1000"),
            ("CHAT_MEDIA_URL_KEY", &"k".repeat(32)),
            ("CHAT_MEDIA_STORE_MAX_BYTES", "67108864"),
            ("CHAT_QUOTA_MEDIA_BYTES_PER_DAY", "5000"),
        ])
        .unwrap();
        assert_eq!(config.media.max_bytes, 1000);
        assert_eq!(config.media.url_key.as_deref(), Some(&*"k".repeat(32)));
        assert_eq!(config.bounds.media, 64 * MIB);
        assert_eq!(config.quota.media_bytes_per_day, 5000);
        let err = from(&[
            ("CHAT_MEDIA_MAX_BYTES", "0"),
            ("CHAT_MEDIA_URL_KEY", "short"),
            ("CHAT_MEDIA_URL_TTL_SECS", "1"),
            ("CHAT_MEDIA_MAX_PIXELS", "0"),
        ])
        .unwrap_err();
        assert_eq!(err.problems.len(), 4, "{err}");
    }

    #[test]
    fn the_group_cache_is_bounded_by_settings() {
        let cache = from(&[]).unwrap().group_cache;
        assert_eq!(
            (cache.entries, cache.bytes, cache.ttl),
            (10_000, 32 * 1024 * 1024, Duration::from_secs(30))
        );
        let cache = from(&[
            ("CHAT_GROUP_CACHE_ENTRIES", "50"),
            ("CHAT_GROUP_CACHE_BYTES", "65536"),
            ("CHAT_GROUP_CACHE_TTL_MS", "5000"),
        ])
        .unwrap()
        .group_cache;
        assert_eq!(
            (cache.entries, cache.bytes, cache.ttl),
            (50, 65536, Duration::from_secs(5))
        );
        let err = from(&[
            ("CHAT_GROUP_CACHE_ENTRIES", "0"),
            ("CHAT_GROUP_CACHE_BYTES", "0"),
            ("CHAT_GROUP_CACHE_TTL_MS", "10"),
        ])
        .unwrap_err();
        assert_eq!(err.problems.len(), 3, "{err}");
    }
}
