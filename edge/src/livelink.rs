//! The edge's own NATS connection for live deliveries.
//!
//! async-nats gives every subscription its own channel, and a channel's
//! first block (32 messages, ~6 KiB) is allocated up front: at tens of
//! thousands of users on one edge that was the largest part of an idle
//! connection's memory. This connection carries only the `chat.deliver.<user>`
//! subscriptions — still one server-side subscription per user on this edge,
//! so an edge receives its own users' deliveries and no one else's — and one
//! reader task hands each message to the hub by subscription id: no channel
//! and no task per user.
//!
//! It speaks the part of the NATS client protocol it needs: `CONNECT` with
//! the service's user and password, `SUB`, `UNSUB`, `PING`/`PONG` (a flush:
//! the server has taken every `SUB` sent before the `PING` when it answers),
//! `MSG` and `HMSG`. It reconnects without end, subscribes everything again,
//! and then bumps its [`Link::gaps`], so sessions refill from INBOX what was
//! published while it was away (core NATS keeps nothing for a subscriber
//! that is not there).

use std::collections::{HashMap, VecDeque};
use std::sync::Weak;
use std::time::Duration;

use async_nats::{HeaderMap, ServerAddr};
use bytes::{Buf, Bytes, BytesMut};
use chat_shared::nats::Link;
use chat_shared::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

/// How often the connection pings the server; two pings unanswered and it
/// counts as dead (a half-open TCP connection would otherwise look idle).
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Connecting and the `CONNECT` handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Waits between reconnect attempts: doubling from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));
/// A control line (`INFO` with a cluster's URLs is the longest) past this
/// is not NATS.
const MAX_CONTROL_LINE: usize = 1024 * 1024;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Where the messages go: the hub, by subscription id.
pub trait Dispatch: Send + Sync + 'static {
    fn dispatch(&self, sid: u64, headers: Option<HeaderMap>, payload: Bytes);
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("CHAT_NATS_URL {0:?}: no usable server URL")]
    NoServer(String),
    #[error("NATS server {0} asks for TLS; the live-delivery connection speaks plain NATS only")]
    Tls(String),
    #[error("connecting to NATS at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("NATS at {addr} did not finish the handshake in time")]
    TimedOut { addr: String },
    #[error("NATS at {addr} closed the connection {when}")]
    Closed { addr: String, when: &'static str },
    #[error("NATS at {addr} refused the connection: {message}")]
    Refused { addr: String, message: String },
    #[error("the live-delivery connection failed: {0}")]
    Lost(std::io::Error),
    #[error("the live-delivery connection dropped: {0}")]
    Dropped(&'static str),
    /// What the server sent is not NATS as we read it.
    #[error("NATS protocol: {0}")]
    Protocol(String),
}

enum Command {
    Subscribe {
        sid: u64,
        subject: String,
    },
    Unsubscribe {
        sid: u64,
    },
    /// Answered once the server has taken everything sent before it.
    Flush(oneshot::Sender<()>),
}

/// Subscribes and unsubscribes on the live-delivery connection; the
/// connection's task ends when every handle is dropped.
#[derive(Clone)]
pub struct LiveLink {
    commands: mpsc::UnboundedSender<Command>,
    state: watch::Receiver<Link>,
}

impl LiveLink {
    /// Connects, and returns the handle and the connection, whose `run`
    /// the caller spawns once the dispatcher exists.
    pub async fn connect(config: &Config, name: &str) -> Result<(Self, Connected), LinkError> {
        let servers = server_addrs(&config.nats_url)?;
        let (commands, queue) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(Link {
            connected: true,
            gaps: 0,
        });
        let mut connection = Connection {
            servers,
            next_server: 0,
            user: config.nats_user.clone(),
            password: config.nats_password.clone(),
            name: name.to_string(),
            commands: queue,
            subscriptions: HashMap::new(),
            state: state_tx,
        };
        let socket = connection.connect_any().await?;
        Ok((Self { commands, state }, connection.with_socket(socket)))
    }

    pub fn subscribe(&self, sid: u64, subject: String) {
        let _ = self.commands.send(Command::Subscribe { sid, subject });
    }

    pub fn unsubscribe(&self, sid: u64) {
        let _ = self.commands.send(Command::Unsubscribe { sid });
    }

    /// Completes when the server has every subscription made before it;
    /// `false` if the connection dropped first.
    pub async fn flush(&self) -> bool {
        let (done, answered) = oneshot::channel();
        if self.commands.send(Command::Flush(done)).is_err() {
            return false;
        }
        answered.await.is_ok()
    }

    /// The connection's state: sessions refill from INBOX after each gap.
    pub fn state(&self) -> watch::Receiver<Link> {
        self.state.clone()
    }
}

/// The connection's task state (see [`LiveLink::connect`]).
pub struct Connection {
    servers: Vec<ServerAddr>,
    next_server: usize,
    user: Option<String>,
    password: Option<String>,
    name: String,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Every live subscription, sent again after a reconnect.
    subscriptions: HashMap<u64, String>,
    state: watch::Sender<Link>,
}

/// A connection that has its first socket, ready to run.
pub struct Connected {
    connection: Connection,
    socket: TcpStream,
}

impl Connection {
    fn with_socket(self, socket: TcpStream) -> Connected {
        Connected {
            connection: self,
            socket,
        }
    }

    /// One attempt over every known server, in turn.
    async fn connect_any(&mut self) -> Result<TcpStream, LinkError> {
        let mut last = LinkError::NoServer(String::new());
        for _ in 0..self.servers.len() {
            let server = self.servers[self.next_server % self.servers.len()].clone();
            self.next_server = self.next_server.wrapping_add(1);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&server)).await {
                Ok(Ok(socket)) => return Ok(socket),
                Ok(Err(error)) => last = error,
                Err(_) => {
                    last = LinkError::TimedOut {
                        addr: describe(&server),
                    }
                }
            }
        }
        Err(last)
    }

    /// TCP, the server's `INFO`, our `CONNECT`, and a `PING` answered with
    /// `PONG` (an authorization error arrives before it).
    async fn handshake(&mut self, server: &ServerAddr) -> Result<TcpStream, LinkError> {
        let addr = describe(server);
        let failed = |source: std::io::Error| LinkError::Connect {
            addr: addr.clone(),
            source,
        };
        if server.tls_required() {
            return Err(LinkError::Tls(addr));
        }
        let mut socket = TcpStream::connect((server.host(), server.port()))
            .await
            .map_err(failed)?;
        // Deliveries are latency-bound and small.
        let _ = socket.set_nodelay(true);
        let mut buffer = BytesMut::with_capacity(4096);
        let info = loop {
            if let Some(op) = next_op(&mut buffer)? {
                break op;
            }
            read_more(&mut socket, &mut buffer, &addr, "before INFO").await?;
        };
        let Op::Info(info) = info else {
            return Err(LinkError::Protocol(
                "the server did not start with INFO".into(),
            ));
        };
        if info.tls_required {
            return Err(LinkError::Tls(addr));
        }
        self.learn(&info.connect_urls);
        let connect = ConnectOptions {
            verbose: false,
            pedantic: false,
            tls_required: false,
            name: &self.name,
            lang: "rust",
            version: env!("CARGO_PKG_VERSION"),
            protocol: 1,
            headers: true,
            no_responders: false,
            echo: false,
            user: server.username().or(self.user.as_deref()),
            pass: server.password().or(self.password.as_deref()),
        };
        let connect = serde_json::to_string(&connect)
            .map_err(|e| LinkError::Protocol(format!("encoding CONNECT: {e}")))?;
        socket
            .write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
            .await
            .map_err(failed)?;
        loop {
            match next_op(&mut buffer)? {
                Some(Op::Pong) => return Ok(socket),
                Some(Op::Err(message)) => return Err(LinkError::Refused { addr, message }),
                Some(Op::Info(info)) => self.learn(&info.connect_urls),
                Some(_) => {}
                None => read_more(&mut socket, &mut buffer, &addr, "during CONNECT").await?,
            }
        }
    }

    /// Adds the cluster's other servers (from `INFO`) to the ones to try.
    fn learn(&mut self, urls: &[String]) {
        for url in urls {
            if let Ok(server) = format!("nats://{url}").parse::<ServerAddr>() {
                let known = self
                    .servers
                    .iter()
                    .any(|s| s.host() == server.host() && s.port() == server.port());
                if !known {
                    self.servers.push(server);
                }
            }
        }
    }

    /// Subscriptions sent, messages dispatched, flushes answered until the
    /// socket fails (an error) or nobody needs the connection any more.
    async fn serve<D: Dispatch>(
        &mut self,
        socket: &mut TcpStream,
        dispatch: &Weak<D>,
    ) -> Result<(), LinkError> {
        let mut buffer = BytesMut::with_capacity(READ_CHUNK);
        // One entry per PING in flight, in order: a flush to answer or a
        // keepalive (`None`).
        let mut pongs: VecDeque<Option<oneshot::Sender<()>>> = VecDeque::new();
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        keepalive.tick().await;
        loop {
            let mut out = Vec::new();
            tokio::select! {
                read = socket.read_buf(&mut buffer) => {
                    if read.map_err(LinkError::Lost)? == 0 {
                        return Err(LinkError::Dropped("the server closed it"));
                    }
                    while let Some(op) = next_op(&mut buffer)? {
                        match op {
                            Op::Msg { sid, headers, payload } => {
                                let Some(dispatch) = dispatch.upgrade() else {
                                    return Ok(());
                                };
                                dispatch.dispatch(sid, headers, payload);
                            }
                            Op::Ping => out.extend_from_slice(b"PONG\r\n"),
                            Op::Pong => {
                                if let Some(Some(flushed)) = pongs.pop_front() {
                                    let _ = flushed.send(());
                                }
                            }
                            Op::Info(info) => self.learn(&info.connect_urls),
                            Op::Err(message) => {
                                // Permission errors leave the connection
                                // open; anything else closes it next.
                                tracing::error!(%message, "NATS refused a live-delivery request");
                            }
                            Op::Ok => {}
                        }
                    }
                    if buffer.capacity() > READ_CHUNK && buffer.is_empty() {
                        // A large message grew it; give that memory back.
                        buffer = BytesMut::with_capacity(READ_CHUNK);
                    } else {
                        buffer.reserve(READ_CHUNK / 4);
                    }
                }
                command = self.commands.recv() => {
                    let Some(command) = command else { return Ok(()) };
                    self.apply(command, &mut out, &mut pongs);
                    // Take what else is queued: one write for all of it.
                    while let Ok(command) = self.commands.try_recv() {
                        self.apply(command, &mut out, &mut pongs);
                    }
                }
                _ = keepalive.tick() => {
                    if pongs.len() >= 2 {
                        return Err(LinkError::Dropped("the server stopped answering PINGs"));
                    }
                    pongs.push_back(None);
                    out.extend_from_slice(b"PING\r\n");
                }
            }
            if !out.is_empty() {
                socket.write_all(&out).await.map_err(LinkError::Lost)?;
            }
        }
    }

    fn apply(
        &mut self,
        command: Command,
        out: &mut Vec<u8>,
        pongs: &mut VecDeque<Option<oneshot::Sender<()>>>,
    ) {
        match command {
            Command::Subscribe { sid, subject } => {
                out.extend_from_slice(format!("SUB {subject} {sid}\r\n").as_bytes());
                self.subscriptions.insert(sid, subject);
            }
            Command::Unsubscribe { sid } => {
                if self.subscriptions.remove(&sid).is_some() {
                    out.extend_from_slice(format!("UNSUB {sid}\r\n").as_bytes());
                }
            }
            Command::Flush(done) => {
                pongs.push_back(Some(done));
                out.extend_from_slice(b"PING\r\n");
            }
        }
        if self.subscriptions.is_empty() && self.subscriptions.capacity() > 64 {
            // Idle again after a crowd: the table's memory goes back.
            self.subscriptions.shrink_to_fit();
        }
    }

    /// Every subscription again, on a fresh socket.
    async fn resubscribe(&self, socket: &mut TcpStream) -> std::io::Result<()> {
        let mut out = Vec::new();
        for (sid, subject) in &self.subscriptions {
            out.extend_from_slice(format!("SUB {subject} {sid}\r\n").as_bytes());
        }
        socket.write_all(&out).await
    }
}

impl Connected {
    /// Serves until the hub and every handle are gone, reconnecting as
    /// often as it takes.
    pub async fn run<D: Dispatch>(self, dispatch: Weak<D>) {
        let Self {
            mut connection,
            mut socket,
        } = self;
        let mut backoff = BACKOFF.0;
        loop {
            match connection.serve(&mut socket, &dispatch).await {
                Ok(()) => return,
                Err(error) => tracing::warn!(%error, "live-delivery connection lost; reconnecting"),
            }
            connection.state.send_modify(|link| link.connected = false);
            socket = loop {
                if dispatch.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF.1);
                match connection.connect_any().await {
                    Ok(mut socket) => match connection.resubscribe(&mut socket).await {
                        Ok(()) => break socket,
                        Err(error) => tracing::warn!(%error, "resubscribing live deliveries"),
                    },
                    Err(error) => tracing::warn!(%error, "live-delivery connection"),
                }
            };
            backoff = BACKOFF.0;
            // What was published meanwhile is in INBOX only.
            connection.state.send_modify(|link| {
                link.connected = true;
                link.gaps += 1;
            });
            tracing::info!("live-delivery connection back; sessions refill from INBOX");
        }
    }
}

/// Reads more of the handshake into `buffer`; why not, if it cannot.
async fn read_more(
    socket: &mut TcpStream,
    buffer: &mut BytesMut,
    addr: &str,
    when: &'static str,
) -> Result<(), LinkError> {
    match socket.read_buf(buffer).await {
        Ok(0) => Err(LinkError::Closed {
            addr: addr.to_string(),
            when,
        }),
        Ok(_) => Ok(()),
        Err(source) => Err(LinkError::Connect {
            addr: addr.to_string(),
            source,
        }),
    }
}

fn describe(server: &ServerAddr) -> String {
    format!("{}:{}", server.host(), server.port())
}

/// The servers of `CHAT_NATS_URL` (comma-separated), as the main
/// connection reads them.
fn server_addrs(urls: &str) -> Result<Vec<ServerAddr>, LinkError> {
    let servers: Vec<ServerAddr> = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .filter_map(|url| url.parse().ok())
        .collect();
    if servers.is_empty() {
        return Err(LinkError::NoServer(urls.to_string()));
    }
    Ok(servers)
}

#[derive(serde::Serialize)]
struct ConnectOptions<'a> {
    verbose: bool,
    pedantic: bool,
    tls_required: bool,
    name: &'a str,
    lang: &'a str,
    version: &'a str,
    protocol: u8,
    headers: bool,
    no_responders: bool,
    echo: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pass: Option<&'a str>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct Info {
    #[serde(default)]
    tls_required: bool,
    #[serde(default)]
    connect_urls: Vec<String>,
}

/// What the server says, as far as this connection cares.
#[derive(Debug)]
enum Op {
    Info(Info),
    Msg {
        sid: u64,
        headers: Option<HeaderMap>,
        payload: Bytes,
    },
    Ping,
    Pong,
    Ok,
    Err(String),
}

fn protocol(what: impl std::fmt::Display) -> LinkError {
    LinkError::Protocol(what.to_string())
}

/// The next whole operation at the front of `buffer`, taken from it;
/// `None` until one has arrived whole.
fn next_op(buffer: &mut BytesMut) -> Result<Option<Op>, LinkError> {
    let Some(end) = buffer.windows(2).position(|w| w == b"\r\n") else {
        if buffer.len() > MAX_CONTROL_LINE {
            return Err(protocol("a control line without end"));
        }
        return Ok(None);
    };
    let line = std::str::from_utf8(&buffer[..end])
        .map_err(|_| protocol("a control line that is not UTF-8"))?;
    let (verb, args) = line.split_once([' ', '\t']).unwrap_or((line, ""));
    let args = args.trim();
    let op = match verb.to_ascii_uppercase().as_str() {
        "MSG" | "HMSG" => {
            let headed = verb.eq_ignore_ascii_case("HMSG");
            let fields: Vec<&str> = args.split_ascii_whitespace().collect();
            // subject sid [reply] [header bytes] total bytes
            let sizes = if headed { 2 } else { 1 };
            if fields.len() != 2 + sizes && fields.len() != 3 + sizes {
                return Err(protocol(format!("malformed {verb}: {line}")));
            }
            let number = |s: &str| {
                s.parse::<usize>()
                    .map_err(|_| protocol(format!("malformed {verb}: {line}")))
            };
            let sid = fields[1]
                .parse::<u64>()
                .map_err(|_| protocol(format!("malformed {verb}: {line}")))?;
            let total = number(fields[fields.len() - 1])?;
            let header_len = if headed {
                number(fields[fields.len() - 2])?
            } else {
                0
            };
            if header_len > total {
                return Err(protocol(format!("malformed {verb}: {line}")));
            }
            let start = end + 2;
            if buffer.len() < start + total + 2 {
                // Room for the whole message, so it is read in few calls.
                buffer.reserve(start + total + 2 - buffer.len());
                return Ok(None);
            }
            if &buffer[start + total..start + total + 2] != b"\r\n" {
                return Err(protocol(format!("{verb} payload without its CRLF")));
            }
            let headers = if headed {
                Some(parse_headers(&buffer[start..start + header_len])?)
            } else {
                None
            };
            // Copied out: a small delivery held by a slow session must not
            // keep a whole read buffer alive.
            let payload = Bytes::copy_from_slice(&buffer[start + header_len..start + total]);
            buffer.advance(start + total + 2);
            return Ok(Some(Op::Msg {
                sid,
                headers,
                payload,
            }));
        }
        "PING" => Op::Ping,
        "PONG" => Op::Pong,
        "+OK" => Op::Ok,
        "-ERR" => Op::Err(args.trim_matches('\'').to_string()),
        "INFO" => Op::Info(serde_json::from_str(args).map_err(|e| protocol(format!("INFO: {e}")))?),
        _ => return Err(protocol(format!("unexpected {line:?}"))),
    };
    buffer.advance(end + 2);
    Ok(Some(op))
}

/// `NATS/1.0[ status]\r\nName: value\r\n...\r\n\r\n` into a header map.
fn parse_headers(block: &[u8]) -> Result<HeaderMap, LinkError> {
    let text = std::str::from_utf8(block).map_err(|_| protocol("headers that are not UTF-8"))?;
    let mut lines = text.split("\r\n");
    if !lines
        .next()
        .is_some_and(|first| first.starts_with("NATS/1.0"))
    {
        return Err(protocol("headers without the NATS/1.0 line"));
    }
    let mut headers = HeaderMap::new();
    for line in lines.filter(|line| !line.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(protocol(format!("a header line without ':': {line:?}")));
        };
        headers.append(name.trim(), value.trim());
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(input: &[u8]) -> Vec<Op> {
        let mut buffer = BytesMut::from(input);
        let mut ops = Vec::new();
        while let Some(op) = next_op(&mut buffer).unwrap() {
            ops.push(op);
        }
        assert!(buffer.is_empty(), "left over: {buffer:?}");
        ops
    }

    #[test]
    fn messages_with_and_without_headers_and_reply_are_read_whole() {
        let input = b"MSG chat.deliver.bob 7 5\r\nhello\r\n\
            HMSG chat.deliver.bob 8 _INBOX.x 29 31\r\nNATS/1.0\r\nChat-Cursor: 42\r\n\r\nhi\r\n\
            PING\r\nPONG\r\n+OK\r\n-ERR 'Permissions Violation'\r\n";
        let ops = ops(input);
        assert_eq!(ops.len(), 6, "{ops:?}");
        match &ops[0] {
            Op::Msg {
                sid,
                headers,
                payload,
            } => {
                assert_eq!(
                    (*sid, headers.is_none(), &payload[..]),
                    (7, true, &b"hello"[..])
                );
            }
            other => panic!("{other:?}"),
        }
        match &ops[1] {
            Op::Msg {
                sid,
                headers,
                payload,
            } => {
                assert_eq!((*sid, &payload[..]), (8, &b"hi"[..]));
                let cursor = headers.as_ref().and_then(|h| h.get("Chat-Cursor"));
                assert_eq!(cursor.map(|v| v.as_str()), Some("42"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(ops[2], Op::Ping));
        assert!(matches!(ops[3], Op::Pong));
        assert!(matches!(ops[4], Op::Ok));
        assert!(matches!(&ops[5], Op::Err(m) if m == "Permissions Violation"));
    }

    #[test]
    fn a_message_split_across_reads_waits_for_its_end() {
        let whole = b"MSG a.b 1 10\r\n0123456789\r\nPING\r\n";
        for cut in 1..whole.len() {
            let mut buffer = BytesMut::from(&whole[..cut]);
            let first = next_op(&mut buffer).unwrap();
            if cut < 26 {
                assert!(first.is_none(), "cut at {cut}");
                buffer.extend_from_slice(&whole[cut..]);
                assert!(matches!(
                    next_op(&mut buffer).unwrap(),
                    Some(Op::Msg { .. })
                ));
            } else {
                assert!(matches!(first, Some(Op::Msg { .. })));
                buffer.extend_from_slice(&whole[cut..]);
            }
            assert!(matches!(next_op(&mut buffer).unwrap(), Some(Op::Ping)));
            assert!(buffer.is_empty());
        }
    }

    #[test]
    fn info_is_read_for_tls_and_cluster_urls() {
        let ops = ops(b"INFO {\"server_id\":\"x\",\"tls_required\":true,\"connect_urls\":[\"10.0.0.2:4222\"]}\r\n");
        match &ops[0] {
            Op::Info(info) => {
                assert!(info.tls_required);
                assert_eq!(info.connect_urls, ["10.0.0.2:4222"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn what_is_not_nats_is_refused() {
        for input in [
            &b"HELLO\r\n"[..],
            b"MSG a 1\r\n",
            b"MSG a x 2\r\nhi\r\n",
            b"MSG a 1 2\r\nhiXX",
            b"HMSG a 1 9 2\r\nNATS/1.0\r\n",
            b"HMSG a 1 4 6\r\nHTTPhi\r\n",
        ] {
            let mut buffer = BytesMut::from(input);
            assert!(
                next_op(&mut buffer).is_err(),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn server_urls_are_read_like_the_main_connection() {
        let servers = server_addrs("nats://a:4222, nats://b:4223").unwrap();
        assert_eq!(
            servers.iter().map(describe).collect::<Vec<_>>(),
            ["a:4222", "b:4223"]
        );
        assert!(server_addrs(" , ").is_err());
    }

    /// A NATS server that plays a script over one accepted connection.
    struct FakeServer {
        lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>>,
        write: tokio::net::tcp::OwnedWriteHalf,
    }

    impl FakeServer {
        async fn accept(listener: &tokio::net::TcpListener) -> Self {
            use tokio::io::AsyncBufReadExt;
            let (socket, _) = listener.accept().await.unwrap();
            let (read, write) = socket.into_split();
            let mut server = Self {
                lines: tokio::io::BufReader::new(read).lines(),
                write,
            };
            server
                .send("INFO {\"server_id\":\"fake\",\"headers\":true}\r\n")
                .await;
            let connect = server.line().await;
            assert!(connect.starts_with("CONNECT {"), "{connect}");
            assert!(connect.contains("\"user\":\"edge\""), "{connect}");
            assert!(connect.contains("\"headers\":true"), "{connect}");
            server.expect("PING").await;
            server.send("PONG\r\n").await;
            server
        }

        async fn line(&mut self) -> String {
            let next = tokio::time::timeout(Duration::from_secs(5), self.lines.next_line());
            next.await.unwrap().unwrap().unwrap()
        }

        async fn expect(&mut self, line: &str) {
            assert_eq!(self.line().await, line);
        }

        async fn send(&mut self, text: &str) {
            self.write.write_all(text.as_bytes()).await.unwrap();
        }
    }

    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<(u64, Option<String>, Bytes)>>);

    impl Dispatch for Recorder {
        fn dispatch(&self, sid: u64, headers: Option<HeaderMap>, payload: Bytes) {
            let cursor = headers.and_then(|h| h.get("Chat-Cursor").map(|v| v.to_string()));
            self.0.lock().unwrap().push((sid, cursor, payload));
        }
    }

    #[tokio::test]
    async fn subscriptions_are_confirmed_dispatched_and_made_again_after_a_reconnect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = Config {
            nats_url: format!("nats://{}", listener.local_addr().unwrap()),
            nats_user: Some("edge".into()),
            nats_password: Some("secret".into()),
            ..Config::default()
        };
        let (accepted, connected) = tokio::join!(
            FakeServer::accept(&listener),
            LiveLink::connect(&config, "test")
        );
        let mut server = accepted;
        let (link, connection) = connected.unwrap();
        let recorder = std::sync::Arc::new(Recorder::default());
        let task = tokio::spawn(connection.run(std::sync::Arc::downgrade(&recorder)));

        link.subscribe(1, "chat.deliver.bob".into());
        let flushed = tokio::spawn({
            let link = link.clone();
            async move { link.flush().await }
        });
        server.expect("SUB chat.deliver.bob 1").await;
        server.expect("PING").await;
        server.send("PONG\r\n").await;
        assert!(flushed.await.unwrap(), "the flush is answered by the PONG");

        server
            .send("HMSG chat.deliver.bob 1 29 31\r\nNATS/1.0\r\nChat-Cursor: 42\r\n\r\nhi\r\nPING\r\n")
            .await;
        server.expect("PONG").await;
        assert_eq!(
            recorder.0.lock().unwrap().as_slice(),
            [(1, Some("42".to_string()), Bytes::from_static(b"hi"))]
        );

        // The server goes away: the link reconnects, subscribes again and
        // tells sessions that live frames may be missing.
        let mut state = link.state();
        assert_eq!(state.borrow_and_update().gaps, 0);
        drop(server);
        let mut server = FakeServer::accept(&listener).await;
        server.expect("SUB chat.deliver.bob 1").await;
        tokio::time::timeout(
            Duration::from_secs(5),
            state.wait_for(|link| link.connected && link.gaps == 1),
        )
        .await
        .unwrap()
        .unwrap();

        link.unsubscribe(1);
        server.expect("UNSUB 1").await;
        // Without a dispatcher the connection has no one to serve.
        drop(recorder);
        server.send("MSG chat.deliver.bob 1 2\r\nhi\r\n").await;
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
