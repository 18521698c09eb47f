//! One WebSocket connection: handshake, resume, then requests and live
//! frames. Its outbound queue and writer are in `outbox`, the resume rules
//! in `resume`, the token and moderation rules in `access`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use chat_shared::delivery::Previous;
use chat_shared::ids::{Cursor, DeviceId, UserId};
use chat_shared::receipts::MessageMeta;
use chat_shared::subjects;
use chat_shared::wire::{
    close, with_cursor, ClientFrame, ErrorCode, RefOnly, SendRequest, ServerFrame,
};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout_at, Instant};
use tracing::Instrument;

use crate::access::{self, AccessError, Stage};
use crate::drain::Ticket;
use crate::hub::{Delivery, HubError, Live, Registration};
use crate::limits::{Strikes, TokenBucket, UserSlot};
use crate::metrics::INVALID_FRAME;
pub(crate) use crate::outbox::Outbox;
use crate::receipts::DeliveredTracker;
use crate::resume::{self, Replay, ResumeError, Start};
use crate::Edge;

/// How long a session waits before it tries a failed refill again, the
/// first time; it doubles with each failure in a row up to
/// [`REFILL_RETRY_MAX`].
const REFILL_RETRY: Duration = Duration::from_secs(1);
const REFILL_RETRY_MAX: Duration = Duration::from_secs(30);

/// When a refill that failed `failures` times in a row is tried again:
/// after a wait that doubles per failure (1 s up to 30 s) plus up to as
/// long again at random. Every session of an edge refills when its live
/// link comes back; on a busy NATS many fail together, and retrying them
/// at a fixed pace kept NATS saturated (measured: 200,000 failed refills
/// in a few minutes on one edge of 19,000 sessions). Backing off lets the
/// load fall until the refills get through.
fn refill_retry_at(failures: u32) -> Instant {
    let wait = REFILL_RETRY
        .saturating_mul(1 << failures.min(5))
        .min(REFILL_RETRY_MAX);
    Instant::now() + wait + wait.mul_f64(rand::random::<f64>())
}

/// A live session's refills from INBOX: whether live frames wait for one
/// (they are in the inbox and come with it), and when a failed one is
/// tried again.
#[derive(Default)]
struct Refill {
    paused: bool,
    retry: Option<Instant>,
    /// Refills that failed in a row; 0 after one succeeds.
    failures: u32,
}

impl Refill {
    /// Takes a refill's outcome: done, live frames flow again; failed,
    /// they keep waiting and the refill is tried again later.
    fn settle(&mut self, result: Result<(), SessionError>, when: &'static str) {
        match result {
            Ok(()) => *self = Self::default(),
            Err(error) => {
                tracing::warn!(%error, when, "cannot refill from the inbox; trying again");
                self.paused = true;
                self.retry = Some(refill_retry_at(self.failures));
                self.failures = self.failures.saturating_add(1);
            }
        }
    }
}
/// Acked cursors are written to KV at most this often per device.
const CURSOR_FLUSH: Duration = Duration::from_secs(2);

pub async fn serve(socket: WebSocket, edge: Arc<Edge>, ticket: Ticket) {
    let (sink, stream) = socket.split();
    let _open = edge.metrics.connection_opened();
    // Frames queued for the writer (CHAT_LIMIT_OUTBOUND_QUEUE). Replies wait
    // for room; live frames go through the hub's own bounded queue first.
    let (out, rx) = crate::outbox::queue(edge.config.limits.outbound_queue, edge.metrics.clone());
    let writer = tokio::spawn(crate::outbox::write_loop(
        sink,
        rx,
        edge.config.idle_timeout(),
    ));
    run_session(stream, out, edge, ticket).await;
    // The outbox is dropped here; the writer sends what is queued, then ends.
    let _ = writer.await;
}

/// A connection's send worker and its queue: sends are handled one at a
/// time, in order (see `send::SEND_QUEUE`).
struct Sends {
    requests: mpsc::Sender<Box<SendRequest>>,
    worker: tokio::task::JoinHandle<()>,
}

/// What one read from the socket means for the session. One lives at a
/// time per connection, on the stack, for one read: boxing the frame would
/// cost an allocation per frame to save bytes nobody holds.
#[allow(clippy::large_enum_variant)]
enum Inbound {
    Frame(ClientFrame),
    /// Answered already (bad frame, control frame); keep going.
    Handled,
    /// The socket is finished.
    Closed,
}

/// Reads one message and turns it into a frame, answering protocol errors
/// (boxed: this future is part of every idle session's state).
async fn read_one<S, E>(stream: &mut S, out: &Outbox) -> Inbound
where
    S: Stream<Item = Result<Message, E>> + Unpin,
    E: std::fmt::Display,
{
    match stream.next().await {
        None => Inbound::Closed,
        Some(Err(e)) => {
            let text = e.to_string();
            // tungstenite reports an oversized frame or message as a capacity
            // error ("Space limit exceeded: …"); PROTOCOL.md answers it with 1009.
            if text.starts_with("Space limit exceeded") {
                Box::pin(out.close(close::TOO_BIG, "frame too big")).await;
            }
            tracing::debug!(error = %text, "socket read failed");
            Inbound::Closed
        }
        Some(Ok(Message::Text(text))) => match serde_json::from_str::<ClientFrame>(&text) {
            Ok(frame) => {
                out.metrics().frame_in(frame.kind());
                Inbound::Frame(frame)
            }
            Err(e) => {
                out.metrics().frame_in(INVALID_FRAME);
                let reference = serde_json::from_str::<RefOnly>(&text)
                    .ok()
                    .and_then(|r| r.reference)
                    .and_then(|r| r.as_str().map(str::to_string));
                Box::pin(out.error(reference.as_deref(), ErrorCode::BadRequest, e.to_string()))
                    .await;
                Inbound::Handled
            }
        },
        Some(Ok(Message::Binary(_))) => {
            out.metrics().frame_in(INVALID_FRAME);
            Box::pin(out.error(
                None,
                ErrorCode::BadRequest,
                "binary frames are not supported; send JSON text frames",
            ))
            .await;
            Inbound::Handled
        }
        Some(Ok(Message::Close(_))) => Inbound::Closed,
        // Pings are answered by the WebSocket layer; they still count as life.
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Inbound::Handled,
    }
}

struct Hello {
    user: UserId,
    device: DeviceId,
    cursor: Option<Cursor>,
    /// Seconds since the epoch when the token stops being valid.
    valid_until: u64,
    /// The token's `iat`, for operators' revocations.
    issued_at: Option<u64>,
}

/// Waits for `hello` and checks its token.
async fn handshake<S, E>(stream: &mut S, out: &Outbox, edge: &Edge) -> Option<Hello>
where
    S: Stream<Item = Result<Message, E>> + Unpin,
    E: std::fmt::Display,
{
    let deadline = Instant::now() + edge.config.hello_timeout;
    loop {
        let Ok(inbound) = timeout_at(deadline, read_one(stream, out)).await else {
            out.close(close::NO_HELLO, "no hello in time").await;
            return None;
        };
        match inbound {
            Inbound::Closed => return None,
            Inbound::Handled => continue,
            Inbound::Frame(ClientFrame::Hello {
                token,
                device,
                cursor,
            }) => {
                return match access::admit(edge, &token) {
                    Ok(identity) => Some(Hello {
                        user: identity.user,
                        valid_until: identity.valid_until,
                        issued_at: identity.issued_at,
                        device,
                        cursor,
                    }),
                    Err(error) => {
                        deny(out, None, &error, Stage::Hello).await;
                        None
                    }
                };
            }
            Inbound::Frame(other) => {
                out.error(
                    other.reference(),
                    ErrorCode::BadRequest,
                    "the first frame must be hello",
                )
                .await;
            }
        }
    }
}

/// Tells the client why its token gives no access, and closes the
/// connection (4001) when `error` ends it at `stage`; true if it goes on.
async fn deny(out: &Outbox, reference: Option<&str>, error: &AccessError, stage: Stage) -> bool {
    if let AccessError::Invalid(reason) = error {
        tracing::debug!(%reason, "token refused");
    }
    out.error(reference, error.code(), error.to_string()).await;
    match error.closes(stage) {
        Some(reason) => {
            out.close(close::UNAUTHORIZED, reason).await;
            false
        }
        None => true,
    }
}

async fn run_session<S, E>(mut stream: S, out: Outbox, edge: Arc<Edge>, ticket: Ticket)
where
    S: Stream<Item = Result<Message, E>> + Unpin,
    E: std::fmt::Display,
{
    // Boxed, like the rest of the set-up: only the main loop's state should
    // stay with a connection for its life (see `Session::main_loop`).
    let Some(hello) = Box::pin(handshake(&mut stream, &out, &edge)).await else {
        return;
    };
    let span = tracing::info_span!("session", user = %hello.user, device = %hello.device);
    // `instrument`, not `enter`: a guard held across awaits would tag other
    // tasks' logs with this session.
    authenticated(stream, out, edge, ticket, hello)
        .instrument(span)
        .await;
}

async fn authenticated<S, E>(
    mut stream: S,
    out: Outbox,
    edge: Arc<Edge>,
    mut ticket: Ticket,
    hello: Hello,
) where
    S: Stream<Item = Result<Message, E>> + Unpin,
    E: std::fmt::Display,
{
    let Some((mut session, mut registration, _online)) = Box::pin(open(&out, &edge, hello)).await
    else {
        return;
    };
    session
        .main_loop(&mut stream, &mut registration, &mut ticket)
        .await;
    Box::pin(session.flush_ack()).await;
}

/// Everything from `hello` to `synced`: the hub, the backlog, presence.
/// `None` if the session ends before it is live (the client was told why).
async fn open(
    out: &Outbox,
    edge: &Arc<Edge>,
    hello: Hello,
) -> Option<(Session, Registration, crate::presence::DevicePresence)> {
    let Some(slot) = edge.limits.admit_user(&hello.user, Instant::now()) else {
        out.error(
            None,
            ErrorCode::RateLimited,
            format!(
                "at most {} connections per user on one edge",
                edge.limits.config.connections_per_user
            ),
        )
        .await;
        out.close(close::ABUSE, "too many connections").await;
        return None;
    };
    // Subscribe first, so nothing published from here on can be missed.
    let registration = match edge.hub.register(&hello.user).await {
        Ok(registration) => registration,
        Err(error) => {
            unavailable(out, error.into()).await;
            return None;
        }
    };
    // Checked again now that a kick would reach this session: a ban that
    // landed since `hello` was checked is either seen here or kicks it.
    if let Err(refusal) = edge.moderation.admits(&hello.user, hello.issued_at) {
        deny(out, None, &refusal.into(), Stage::Hello).await;
        return None;
    }
    let mut session = Session {
        valid_until: deadline_of(hello.valid_until),
        sends: TokenBucket::new(edge.limits.config.send_per_connection, Instant::now()),
        requests: TokenBucket::new(edge.limits.config.requests_per_connection, Instant::now()),
        strikes: Strikes::default(),
        slot,
        edge: edge.clone(),
        out: out.clone(),
        user: hello.user,
        device: hello.device,
        sent_up_to: Cursor(0),
        acked: None,
        acked_flushed: None,
        delivered: DeliveredTracker::default(),
    };
    let start = match session.start_cursor(hello.cursor).await {
        Ok(start) => start,
        Err(error) => {
            unavailable(out, error).await;
            return None;
        }
    };
    let welcome = ServerFrame::Welcome {
        user: session.user.clone(),
        device: session.device.clone(),
        edge: edge.id.to_string(),
        heartbeat: edge.config.heartbeat.as_secs(),
        resumed: start.resumed,
    };
    if !out.frame(&welcome).await {
        return None;
    }
    session.sent_up_to = start.cursor;
    if start.backlog {
        if let Err(error) = session.replay_backlog().await {
            unavailable(out, error).await;
            return None;
        }
    }
    if !out
        .frame(&ServerFrame::Synced {
            cursor: session.sent_up_to,
        })
        .await
    {
        return None;
    }
    let online = crate::presence::DevicePresence::connect(
        edge.nats.clone(),
        edge.devices.clone(),
        edge.id.clone(),
        session.user.clone(),
        session.device.clone(),
    );
    session.send_presence_snapshot().await;
    Some((session, registration, online))
}

/// What keeps a session from starting or going on; the client is told
/// only that it is unavailable.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Subscribe(#[from] HubError),
    #[error("reading the device's stored cursor: {0}")]
    StoredCursor(#[from] async_nats::jetstream::kv::EntryError),
    #[error(transparent)]
    Resume(#[from] ResumeError),
}

impl SessionError {
    fn told(&self) -> &'static str {
        match self {
            Self::Subscribe(_) => "service unavailable, retry later",
            Self::StoredCursor(_) | Self::Resume(_) => "inbox unavailable, retry later",
        }
    }
}

/// Ends a session that cannot go on: `unavailable`, then close 1013; the
/// client resumes from its cursor later.
async fn unavailable(out: &Outbox, error: SessionError) {
    tracing::warn!(%error, "session unavailable");
    out.error(None, ErrorCode::Unavailable, error.told()).await;
    out.close(close::TRY_AGAIN_LATER, "unavailable").await;
}

struct Session {
    edge: Arc<Edge>,
    out: Outbox,
    user: UserId,
    device: DeviceId,
    /// The highest inbox cursor sent on this connection.
    sent_up_to: Cursor,
    /// The highest cursor the client acked, and the last one written to KV.
    acked: Option<Cursor>,
    acked_flushed: Option<Cursor>,
    /// Messages sent and acked, for delivered receipts.
    delivered: DeliveredTracker,
    /// When the token expires (extended by `refresh`).
    valid_until: Instant,
    /// This connection's rate limits, and the user's (shared on this edge).
    sends: TokenBucket,
    requests: TokenBucket,
    strikes: Strikes,
    slot: UserSlot,
}

/// The instant a token valid until `valid_until` (seconds since the epoch)
/// stops being valid.
fn deadline_of(valid_until: u64) -> Instant {
    let now = chat_shared::clock::now_secs();
    Instant::now() + Duration::from_secs(valid_until.saturating_sub(now))
}

/// What ends a session's main loop, beyond the socket itself.
enum Exit {
    Done,
    /// The edge drains: finish the sends in flight, then `reconnect`.
    Reconnect(Vec<String>),
}

impl Session {
    /// Where the backlog starts, and whether everything after it still
    /// exists: after the cursor of `hello`, else the device's acked one.
    async fn start_cursor(&mut self, given: Option<Cursor>) -> Result<Start, SessionError> {
        let cursor = match given {
            Some(cursor) => Some(cursor),
            None => {
                let key = subjects::device_cursor_key(&self.user, &self.device);
                match self.edge.cursors.get(&key).await {
                    Ok(Some(value)) => std::str::from_utf8(&value)
                        .ok()
                        .and_then(|v| Cursor::parse(v).ok()),
                    Ok(None) => None,
                    Err(e) => return Err(SessionError::StoredCursor(e)),
                }
            }
        };
        let start = resume::start(self.edge.as_ref(), &self.user, cursor).await?;
        // A cursor read from KV is stored already (as `start` corrects it).
        if given.is_none() && cursor.is_some() {
            self.acked_flushed = Some(start.cursor);
        }
        Ok(start)
    }

    /// Sends every inbox item after `sent_up_to`, oldest first.
    async fn replay_backlog(&mut self) -> Result<(), SessionError> {
        let edge = self.edge.clone();
        let user = self.user.clone();
        let mut replay = Replay::after(edge.as_ref(), &user, self.sent_up_to);
        while let Some(item) = replay.next().await? {
            let cursor = Cursor(item.sequence);
            let Ok(frame) = Utf8Bytes::try_from(with_cursor(&item.payload, cursor)) else {
                tracing::error!("skipping an inbox item that is not UTF-8");
                continue;
            };
            let delivery = Delivery {
                cursor: Some(cursor),
                previous: Previous::Unstated,
                meta: MessageMeta::from_headers(&item.headers),
                frame,
            };
            if !self.forward(delivery).await {
                // The client is gone.
                break;
            }
        }
        Ok(())
    }

    /// Sends one delivery unless this connection already sent it.
    async fn forward(&mut self, delivery: Delivery) -> bool {
        if let Some(cursor) = delivery.cursor {
            if cursor <= self.sent_up_to {
                return true;
            }
            self.sent_up_to = cursor;
            if let Some(meta) = delivery.meta {
                self.delivered.sent(cursor, meta);
            }
        }
        self.out.raw(delivery.frame).await
    }

    fn start_send_worker(&self) -> Sends {
        let (requests, queue) = mpsc::channel(crate::send::SEND_QUEUE);
        let worker = tokio::spawn(crate::send::send_worker(
            self.edge.clone(),
            self.user.clone(),
            self.out.clone(),
            queue,
        ));
        Sends { requests, worker }
    }

    /// Waits for whatever comes next until the session ends. What it does
    /// then (a refill, a request, an ack flush) runs boxed: a future is as
    /// large as its largest state, and tens of thousands of idle sessions
    /// would each carry the largest of those all the time.
    async fn main_loop<S, E>(
        &mut self,
        stream: &mut S,
        registration: &mut Registration,
        ticket: &mut Ticket,
    ) where
        S: Stream<Item = Result<Message, E>> + Unpin,
        E: std::fmt::Display,
    {
        let idle = self.edge.config.idle_timeout();
        let mut deadline = Instant::now() + idle;
        let mut flush = tokio::time::interval(CURSOR_FLUSH);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stopped = chat_shared::shutdown::wait(self.edge.stop.clone());
        tokio::pin!(stopped);
        // The send worker starts with the first send: most connections are
        // idle most of the time, and a queue and a task each cost memory.
        let mut sends: Option<Sends> = None;
        let mut link = self.edge.hub.link();
        let mut gaps_seen = link.borrow_and_update().gaps;
        // While NATS is away live frames may be missing; until the inbox has
        // been read again none is forwarded, so no later cursor is sent (and
        // acked) ahead of a missing one. A refill that could not read the
        // inbox (a busy or leaderless stream) is tried again later, live
        // frames held back meanwhile, instead of closing the session: under
        // load, closing sessions would add reconnects to the load.
        let mut refill = Refill::default();
        let mut exit = Exit::Done;
        let requests = crate::requests::Requests::new(
            self.edge.clone(),
            self.user.clone(),
            self.device.clone(),
            self.out.clone(),
        );
        loop {
            // Checked first, so a kick is not kept waiting by a busy socket.
            if let Some(reason) = registration.kicked() {
                Box::pin(self.out.error(None, ErrorCode::Unauthorized, reason)).await;
                Box::pin(self.out.close(close::UNAUTHORIZED, reason)).await;
                break;
            }
            tokio::select! {
                biased;
                _ = &mut stopped => {
                    self.out.close(close::GOING_AWAY, "server shutting down").await;
                    break;
                }
                _ = sleep_until(deadline) => {
                    self.out.close(close::HEARTBEAT_MISSED, "heartbeat missed").await;
                    break;
                }
                _ = sleep_until(self.valid_until) => {
                    self.out.error(None, ErrorCode::TokenExpired, "token expired; refresh before it does").await;
                    self.out.close(close::UNAUTHORIZED, "token expired").await;
                    break;
                }
                edges = &mut ticket.reconnect => {
                    if let Ok(edges) = edges {
                        exit = Exit::Reconnect(edges);
                        break;
                    }
                }
                inbound = read_one(stream, &self.out) => {
                    deadline = Instant::now() + idle;
                    match inbound {
                        Inbound::Closed => break,
                        Inbound::Handled => {}
                        Inbound::Frame(ClientFrame::Send(request)) => {
                            let now = Instant::now();
                            let limited = self.sends.take(now).and_then(|()| self.slot.take_send(now));
                            if let Err(wait) = limited {
                                if !Box::pin(self.refuse(request.reference.as_deref(), wait, "sending too fast")).await {
                                    break;
                                }
                            } else if let Err(refusal) = crate::send::validate_send(&request) {
                                // Refused at once: a send that can never be
                                // accepted takes no place in the send queue.
                                self.out.frame(&refusal.frame(request.reference.as_deref())).await;
                            } else {
                                let queue = sends.get_or_insert_with(|| self.start_send_worker());
                                if queue.requests.send(Box::new(request)).await.is_err() {
                                    break;
                                }
                            }
                        }
                        // Every other frame, `ping`, `ack` and `refresh`
                        // included, takes a request token: each costs work.
                        Inbound::Frame(frame) => {
                            if let Err(wait) = self.requests.take(Instant::now()) {
                                if !Box::pin(self.refuse(frame.reference(), wait, "too many requests")).await {
                                    break;
                                }
                                continue;
                            }
                            match frame {
                                ClientFrame::Ping { reference } => {
                                    self.out.frame(&ServerFrame::Pong { reference }).await;
                                }
                                ClientFrame::Ack { cursor } => {
                                    // Nothing beyond what this connection sent can
                                    // have been received; a larger ack would make a
                                    // later resume skip items.
                                    let cursor = cursor.min(self.sent_up_to);
                                    if self.acked.is_none_or(|a| cursor > a) {
                                        self.acked = Some(cursor);
                                        self.delivered.acked(cursor, &self.user);
                                    }
                                }
                                ClientFrame::Hello { .. } => {
                                    self.out.error(None, ErrorCode::BadRequest, "already said hello").await;
                                }
                                ClientFrame::Refresh { reference, token } => {
                                    if !Box::pin(self.refresh(reference, &token)).await {
                                        break;
                                    }
                                }
                                other => Box::pin(requests.handle(other)).await,
                            }
                        }
                    }
                }
                changed = link.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let now = *link.borrow_and_update();
                    if !now.connected || now.gaps != gaps_seen {
                        refill.paused = true;
                    }
                    if now.connected && now.gaps != gaps_seen {
                        gaps_seen = now.gaps;
                        // Every session of the edge refills at once here: one
                        // that cannot (NATS busy with the others) stays
                        // paused and tries again later, spread out, rather
                        // than dropping its client.
                        let result = Box::pin(self.replay_backlog()).await;
                        refill.settle(result, "after the live link came back");
                    }
                }
                live = registration.recv() => match live {
                    // Handled at the top of the loop.
                    Live::Kicked => {}
                    // Paused, the frame is in the inbox and comes with the refill.
                    Live::Delivery(_) if refill.paused => {}
                    Live::Delivery(delivery) if delivery.follows_a_gap(self.sent_up_to) => {
                        // The inbox holds the missed item and this one, in order.
                        self.edge.metrics.live_gap();
                        let result = Box::pin(self.replay_backlog()).await;
                        refill.settle(result, "after a gap");
                    }
                    Live::Delivery(delivery) => {
                        // Boxed: the live path is frequent, but its state
                        // would otherwise sit in every idle session.
                        if !Box::pin(self.forward(delivery)).await {
                            break;
                        }
                    }
                    Live::CutLoose => {
                        // The hub cut us loose: we fell too far behind.
                        self.out.close(close::TRY_AGAIN_LATER, "too slow; resume from your cursor").await;
                        break;
                    }
                },
                _ = sleep_until(refill.retry.unwrap_or(deadline)), if refill.retry.is_some() => {
                    refill.retry = None;
                    let result = Box::pin(self.replay_backlog()).await;
                    refill.settle(result, "again");
                }
                _ = flush.tick() => Box::pin(self.flush_ack()).await,
            }
        }
        if let Some(Sends { requests, worker }) = sends {
            drop(requests);
            let _ = worker.await;
        }
        if let Exit::Reconnect(edges) = exit {
            // After the sends in flight were answered: a client that follows
            // `reconnect` and resumes from its cursor misses nothing.
            self.out
                .frame(&ServerFrame::Reconnect {
                    reason: "edge draining".into(),
                    edges,
                })
                .await;
            self.out.close(close::GOING_AWAY, "edge draining").await;
        }
    }

    /// One `presence` frame per friend. Without it the client only learns
    /// of changes; if it cannot be read now the session goes on without it
    /// (the next change of each friend still arrives).
    async fn send_presence_snapshot(&self) {
        match crate::presence::of_friends(&self.edge.nats, &self.edge.presence, self.user.clone())
            .await
        {
            Ok(friends) => {
                for friend in friends {
                    if !self.out.frame(&ServerFrame::Presence(friend)).await {
                        return;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "no presence snapshot"),
        }
    }

    /// Answers a request refused by a rate limit; `false` once the
    /// connection has been refused so often it is closed as abuse (4008).
    async fn refuse(&mut self, reference: Option<&str>, wait: Duration, why: &str) -> bool {
        let retry_after_ms = (wait.as_millis() as u64).max(1);
        let refusal = ServerFrame::Error(chat_shared::wire::ErrorFrame {
            reference: reference.map(str::to_string),
            code: ErrorCode::RateLimited,
            message: format!("{why}; retry in {retry_after_ms} ms"),
            retry_after_ms: Some(retry_after_ms),
        });
        self.out.frame(&refusal).await;
        if self
            .strikes
            .strike(Instant::now(), wait, self.edge.limits.config.abuse_strikes)
        {
            tracing::warn!("closing an abusive connection");
            self.out.close(close::ABUSE, "rate limits ignored").await;
            return false;
        }
        true
    }

    /// `refresh`: a new token for the same user extends the connection.
    /// Any other token is refused and closes the connection: it was
    /// authenticated as someone the new token does not vouch for.
    async fn refresh(&mut self, reference: Option<String>, token: &str) -> bool {
        match access::renew(self.edge.as_ref(), &self.user, token) {
            Ok(identity) => {
                self.valid_until = deadline_of(identity.valid_until);
                self.out.frame(&ServerFrame::Ok { reference }).await;
                true
            }
            Err(error) => deny(&self.out, reference.as_deref(), &error, Stage::Refresh).await,
        }
    }

    /// Writes the acked cursor to KV if it moved (coalesced per device) and
    /// reports the delivered receipts gathered since the last flush (to
    /// stream RECEIPTS, which captures the subject; the router makes them
    /// inbox items).
    async fn flush_ack(&mut self) {
        for receipt in self.delivered.take(&self.user, &self.device) {
            match serde_json::to_vec(&receipt) {
                Ok(body) => {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(
                        subjects::MSG_ID_HEADER,
                        subjects::delivered_event_id(
                            &receipt.conversation,
                            &receipt.user,
                            &self.device,
                            receipt.up_to,
                        )
                        .as_str(),
                    );
                    if let Err(e) = self
                        .edge
                        .nats
                        .publish_with_headers(subjects::DELIVERED_RECEIPTS, headers, body.into())
                        .await
                    {
                        tracing::warn!(error = %e, "cannot report delivered receipts");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot encode a delivered receipt"),
            }
        }
        let Some(acked) = self.acked else { return };
        if self.acked_flushed.is_some_and(|f| f >= acked) {
            return;
        }
        let key = subjects::device_cursor_key(&self.user, &self.device);
        match self.edge.cursors.put(&key, acked.to_string().into()).await {
            Ok(_) => self.acked_flushed = Some(acked),
            Err(e) => tracing::warn!(error = %e, "cannot store the acked cursor"),
        }
    }
}
