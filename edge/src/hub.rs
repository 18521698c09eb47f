//! Live deliveries: one `chat.deliver.<user>` subscription per connected user
//! on this edge, shared by all of that user's devices here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use chat_shared::delivery::Previous;
use chat_shared::ids::{Cursor, UserId};
use chat_shared::receipts::MessageMeta;
use chat_shared::subjects;
use futures::StreamExt;
use tokio::sync::{mpsc, watch, OnceCell};

/// One frame for the user's devices, already serialized. Inbox items carry
/// their cursor so a session can drop what its backlog already sent.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub cursor: Option<Cursor>,
    /// A live inbox item's predecessor, as the router tells it.
    pub previous: Previous,
    /// For a message: what its delivered receipt needs.
    pub meta: Option<MessageMeta>,
    /// Checked as UTF-8 once, whatever the number of sessions.
    pub frame: Utf8Bytes,
}

impl Delivery {
    /// Whether a session that has sent the inbox up to `sent_up_to` missed
    /// an item before this one (a live frame lost on the way, or an item
    /// stored after its PubAck was lost): it must read the inbox again.
    pub fn follows_a_gap(&self, sent_up_to: Cursor) -> bool {
        crate::resume::follows_a_gap(self.previous, self.cursor, sent_up_to)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("subscribing to live deliveries: {0}")]
pub struct HubError(String);

/// A session's live queue: the sender and the bytes waiting in it. Boxed:
/// a channel allocates its first 32 slots up front, which for an idle
/// connection is pure overhead (32 pointers instead of 32 deliveries).
type Sessions = Mutex<Vec<(u64, mpsc::Sender<Box<Delivery>>, Arc<AtomicUsize>)>>;

struct UserFeed {
    sessions: Sessions,
    /// An operator's kick, ban or revocation: every session of the user on
    /// this edge closes with 4001 and this reason (see `Hub::kick`).
    kicks: watch::Sender<Option<&'static str>>,
    /// Set once the subscription is confirmed by the server; holds the pump.
    subscribed: OnceCell<tokio::task::AbortHandle>,
}

pub struct Hub {
    client: async_nats::Client,
    users: Mutex<HashMap<UserId, Arc<UserFeed>>>,
    next_session: std::sync::atomic::AtomicU64,
    /// Live frames a session may have waiting before it counts as too slow.
    queue: usize,
    /// Bytes of live frames a session may have waiting (frames are up to
    /// 1 MiB each, so a frame count alone would not bound memory).
    queue_bytes: usize,
    /// How long a new subscription may take to be confirmed.
    confirm_timeout: Duration,
}

/// A session's place in the hub; dropping it leaves.
pub struct Registration {
    hub: Arc<Hub>,
    user: UserId,
    session: u64,
    live: mpsc::Receiver<Box<Delivery>>,
    queued_bytes: Arc<AtomicUsize>,
    kicks: watch::Receiver<Option<&'static str>>,
}

impl Registration {
    /// The next live delivery; `None` once the hub cut this session loose.
    pub async fn recv(&mut self) -> Option<Delivery> {
        let delivery = self.live.recv().await?;
        self.queued_bytes
            .fetch_sub(delivery.frame.len(), Ordering::Relaxed);
        Some(*delivery)
    }

    /// The operator's kicks of this user from the registration on.
    pub fn kicks(&self) -> Kicks {
        Kicks(self.kicks.clone())
    }
}

/// An operator's kicks of one user (a clone keeps what its original has
/// seen, so a kick between registering and asking is not missed).
pub struct Kicks(watch::Receiver<Option<&'static str>>);

impl Kicks {
    /// Completes when an operator shuts the user out, with the reason.
    pub async fn next(&mut self) -> &'static str {
        loop {
            if self.0.changed().await.is_err() {
                // The feed is gone, and with it the session's live queue,
                // which ends the session.
                return std::future::pending().await;
            }
            if let Some(reason) = *self.0.borrow_and_update() {
                return reason;
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave them inconsistent (each
    // critical section is a single push/retain), so poisoning is ignored.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Hub {
    pub fn new(
        client: async_nats::Client,
        queue: usize,
        queue_bytes: usize,
        confirm_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            users: Mutex::new(HashMap::new()),
            next_session: Default::default(),
            // A channel of 0 would panic; configuration refuses it, and a
            // `Config` built in code gets the smallest working queue.
            queue: queue.max(1),
            queue_bytes,
            confirm_timeout,
        })
    }

    /// Joins the user's feed. When this returns, every delivery published
    /// from now on reaches the returned receiver: the subscription has been
    /// confirmed by the server (flush), which is what makes backlog + live
    /// gapless.
    pub async fn register(self: &Arc<Self>, user: &UserId) -> Result<Registration, HubError> {
        let (tx, live) = mpsc::channel(self.queue);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let session = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let feed = {
            let mut users = lock(&self.users);
            let feed = users
                .entry(user.clone())
                .or_insert_with(|| {
                    Arc::new(UserFeed {
                        sessions: Mutex::new(Vec::new()),
                        kicks: watch::Sender::new(None),
                        subscribed: OnceCell::new(),
                    })
                })
                .clone();
            lock(&feed.sessions).push((session, tx, queued_bytes.clone()));
            feed
        };
        let registration = Registration {
            hub: self.clone(),
            user: user.clone(),
            session,
            live,
            queued_bytes,
            kicks: feed.kicks.subscribe(),
        };
        feed.subscribed
            .get_or_try_init(|| async {
                let subscriber = self
                    .client
                    .subscribe(subjects::deliver(user))
                    .await
                    .map_err(|e| HubError(e.to_string()))?;
                tokio::time::timeout(self.confirm_timeout, self.client.flush())
                    .await
                    .map_err(|_| HubError("NATS did not confirm the subscription in time".into()))?
                    .map_err(|e| HubError(e.to_string()))?;
                let task = tokio::spawn(pump(
                    subscriber,
                    Arc::downgrade(self),
                    self.queue_bytes,
                    user.clone(),
                    Arc::downgrade(&feed),
                ));
                Ok::<_, HubError>(task.abort_handle())
            })
            .await?;
        Ok(registration)
    }

    /// Closes every session of `user` on this edge (4001, `reason`).
    pub fn kick(&self, user: &UserId, reason: &'static str) {
        if let Some(feed) = lock(&self.users).get(user) {
            feed.kicks.send_replace(Some(reason));
        }
    }

    fn leave(&self, user: &UserId, session: u64) {
        let mut users = lock(&self.users);
        let Some(feed) = users.get(user) else { return };
        let now_empty = {
            let mut sessions = lock(&feed.sessions);
            sessions.retain(|(id, _, _)| *id != session);
            sessions.is_empty()
        };
        if now_empty {
            if let Some(feed) = users.remove(user) {
                if let Some(task) = feed.subscribed.get() {
                    task.abort();
                }
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.leave(&self.user, self.session);
    }
}

/// Copies each delivery to every session of the user. A session whose queue
/// is full (in frames, or past `budget` bytes) is cut loose (its receiver
/// closes and it disconnects; the client resumes from its cursor) so one
/// slow device never holds up the others.
/// If the subscription itself ends, every session of the user is cut loose
/// the same way, and the next connection subscribes afresh.
async fn pump(
    mut subscriber: async_nats::Subscriber,
    hub: std::sync::Weak<Hub>,
    budget: usize,
    user: UserId,
    feed: std::sync::Weak<UserFeed>,
) {
    while let Some(message) = subscriber.next().await {
        let Some(feed) = feed.upgrade() else { return };
        let headers = message.headers.as_ref();
        let cursor = headers
            .and_then(|h| h.get(subjects::CURSOR_HEADER))
            .and_then(|v| Cursor::parse(v.as_str()).ok());
        let previous = Previous::from_headers(headers);
        let meta = headers.and_then(MessageMeta::from_headers);
        let Ok(frame) = Utf8Bytes::try_from(message.payload) else {
            tracing::error!("dropping a delivery that is not UTF-8");
            continue;
        };
        let delivery = Delivery {
            cursor,
            previous,
            meta,
            frame,
        };
        let size = delivery.frame.len();
        lock(&feed.sessions).retain(|(_, tx, queued)| {
            if queued.load(Ordering::Relaxed) + size > budget {
                tracing::warn!("session too slow for live deliveries (bytes); disconnecting it");
                return false;
            }
            match tx.try_send(Box::new(delivery.clone())) {
                Ok(()) => {
                    queued.fetch_add(size, Ordering::Relaxed);
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!("session too slow for live deliveries; disconnecting it");
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }
    tracing::warn!(%user, "live delivery subscription ended; disconnecting the user's sessions");
    let (Some(hub), Some(feed)) = (hub.upgrade(), feed.upgrade()) else {
        return;
    };
    let mut users = lock(&hub.users);
    if users
        .get(&user)
        .is_some_and(|current| Arc::ptr_eq(current, &feed))
    {
        users.remove(&user);
    }
    lock(&feed.sessions).clear();
}
