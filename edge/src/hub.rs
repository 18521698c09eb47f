//! Live deliveries: one `chat.deliver.<user>` subscription per connected user
//! on this edge, shared by all of that user's devices here, on the edge's
//! live-delivery connection (`livelink`), which hands every message to
//! [`Hub::dispatch`] by subscription id.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use chat_shared::delivery::Previous;
use chat_shared::ids::{Cursor, UserId};
use chat_shared::nats::Link;
use chat_shared::receipts::MessageMeta;
use chat_shared::subjects;
use chat_shared::sync::lock;
use tokio::sync::{watch, Notify, OnceCell};

use crate::livelink::{Dispatch, LiveLink};

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
pub struct HubError(&'static str);

/// One session's live queue. Not a channel: an idle session's queue holds
/// no buffer at all, and one that emptied gives its memory back.
#[derive(Default)]
struct SessionQueue {
    items: Mutex<Queued>,
    ready: Notify,
}

#[derive(Default)]
struct Queued {
    frames: VecDeque<Arc<Delivery>>,
    bytes: usize,
    /// Cut loose: what is queued is still taken, then the session ends.
    closed: bool,
    /// An operator shut the user out: the session ends with this reason,
    /// before anything still queued.
    kicked: Option<&'static str>,
}

/// What a session's live queue has for it next.
pub enum Live {
    Delivery(Delivery),
    /// An operator's kick, ban or revocation (see [`Hub::kick`]); the
    /// reason is [`Registration::kicked`].
    Kicked,
    /// Cut loose: it fell too far behind.
    CutLoose,
}

impl SessionQueue {
    /// Queues `delivery` unless the session is too far behind (`frames`
    /// queued, or `budget` bytes), in which case it is cut loose: false.
    fn offer(&self, delivery: &Arc<Delivery>, frames: usize, budget: usize) -> bool {
        let size = delivery.frame.len();
        let kept = {
            let mut queued = lock(&self.items);
            if queued.closed {
                false
            } else if queued.frames.len() >= frames {
                tracing::warn!("session too slow for live deliveries; disconnecting it");
                queued.closed = true;
                false
            } else if queued.bytes + size > budget {
                tracing::warn!("session too slow for live deliveries (bytes); disconnecting it");
                queued.closed = true;
                false
            } else {
                queued.frames.push_back(delivery.clone());
                queued.bytes += size;
                true
            }
        };
        // A stored permit if the session is not waiting: nothing is missed.
        self.ready.notify_one();
        kept
    }

    fn close(&self) {
        lock(&self.items).closed = true;
        self.ready.notify_one();
    }

    fn kick(&self, reason: &'static str) {
        lock(&self.items).kicked = Some(reason);
        self.ready.notify_one();
    }

    /// A kick first, then the next delivery, then the end of a queue cut
    /// loose and emptied.
    async fn next(&self) -> Live {
        loop {
            {
                let mut queued = lock(&self.items);
                if queued.kicked.is_some() {
                    return Live::Kicked;
                }
                if let Some(delivery) = crate::deque::pop_front(&mut queued.frames) {
                    queued.bytes -= delivery.frame.len();
                    drop(queued);
                    return Live::Delivery(Arc::unwrap_or_clone(delivery));
                }
                if queued.closed {
                    return Live::CutLoose;
                }
            }
            self.ready.notified().await;
        }
    }
}

struct UserFeed {
    /// The subscription's id on the live-delivery connection.
    sid: u64,
    sessions: Mutex<Vec<Arc<SessionQueue>>>,
    /// Set once the server has confirmed the subscription.
    subscribed: OnceCell<()>,
}

#[derive(Default)]
struct Feeds {
    users: HashMap<UserId, Arc<UserFeed>>,
    by_sid: HashMap<u64, Arc<UserFeed>>,
    next_sid: u64,
}

pub struct Hub {
    link: LiveLink,
    feeds: Mutex<Feeds>,
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
    live: Arc<SessionQueue>,
}

impl Registration {
    /// What the hub has for this session next: an operator's kick of the
    /// user from the registration on, a live delivery, or the end.
    pub async fn recv(&mut self) -> Live {
        self.live.next().await
    }

    /// Whether an operator has shut the user out since the registration.
    pub fn kicked(&self) -> Option<&'static str> {
        lock(&self.live.items).kicked
    }
}

impl Hub {
    pub fn new(
        link: LiveLink,
        queue: usize,
        queue_bytes: usize,
        confirm_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            link,
            feeds: Mutex::default(),
            // A queue of 0 would cut every session loose; configuration
            // refuses it, and a `Config` built in code gets the smallest.
            queue: queue.max(1),
            queue_bytes,
            confirm_timeout,
        })
    }

    /// The live-delivery connection's state: a gap means frames may have
    /// been lost, and sessions refill from INBOX.
    pub fn link(&self) -> watch::Receiver<Link> {
        self.link.state()
    }

    /// Joins the user's feed. When this returns, every delivery published
    /// from now on reaches the registration: the subscription has been
    /// confirmed by the server (flush), which is what makes backlog + live
    /// gapless.
    pub async fn register(self: &Arc<Self>, user: &UserId) -> Result<Registration, HubError> {
        let live = Arc::new(SessionQueue::default());
        let feed = {
            let mut feeds = lock(&self.feeds);
            let feed = match feeds.users.get(user) {
                Some(feed) => feed.clone(),
                None => {
                    feeds.next_sid += 1;
                    let feed = Arc::new(UserFeed {
                        sid: feeds.next_sid,
                        sessions: Mutex::default(),
                        subscribed: OnceCell::new(),
                    });
                    feeds.users.insert(user.clone(), feed.clone());
                    feeds.by_sid.insert(feed.sid, feed.clone());
                    self.link.subscribe(feed.sid, subjects::deliver(user));
                    feed
                }
            };
            lock(&feed.sessions).push(live.clone());
            feed
        };
        let registration = Registration {
            hub: self.clone(),
            user: user.clone(),
            live,
        };
        feed.subscribed
            .get_or_try_init(|| async {
                match tokio::time::timeout(self.confirm_timeout, self.link.flush()).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(HubError("the NATS connection dropped")),
                    Err(_) => Err(HubError("NATS did not confirm the subscription in time")),
                }
            })
            .await?;
        Ok(registration)
    }

    /// Closes every session of `user` on this edge (4001, `reason`); a
    /// session registered later is not affected.
    pub fn kick(&self, user: &UserId, reason: &'static str) {
        if let Some(feed) = lock(&self.feeds).users.get(user) {
            for session in lock(&feed.sessions).iter() {
                session.kick(reason);
            }
        }
    }

    fn leave(&self, user: &UserId, live: &Arc<SessionQueue>) {
        let mut feeds = lock(&self.feeds);
        let Some(feed) = feeds.users.get(user) else {
            return;
        };
        let now_empty = {
            let mut sessions = lock(&feed.sessions);
            sessions.retain(|queue| !Arc::ptr_eq(queue, live));
            sessions.is_empty()
        };
        if now_empty {
            if let Some(feed) = feeds.users.remove(user) {
                feeds.by_sid.remove(&feed.sid);
                self.link.unsubscribe(feed.sid);
            }
        }
    }
}

/// Copies each delivery to every session of its user. A session whose
/// queue is full (in frames, or in bytes) is cut loose (its queue closes and
/// it disconnects; the client resumes from its cursor) so one slow device
/// never holds up the others.
impl Dispatch for Hub {
    fn dispatch(&self, sid: u64, headers: Option<HeaderMap>, payload: Bytes) {
        // A message for a subscription just dropped has no one to go to.
        let Some(feed) = lock(&self.feeds).by_sid.get(&sid).cloned() else {
            return;
        };
        let headers = headers.as_ref();
        let Ok(frame) = Utf8Bytes::try_from(payload) else {
            tracing::error!("dropping a delivery that is not UTF-8");
            return;
        };
        let delivery = Arc::new(Delivery {
            cursor: headers
                .and_then(|h| h.get(subjects::CURSOR_HEADER))
                .and_then(|v| Cursor::parse(v.as_str()).ok()),
            previous: Previous::from_headers(headers),
            meta: headers.and_then(MessageMeta::from_headers),
            frame,
        });
        lock(&feed.sessions).retain(|queue| queue.offer(&delivery, self.queue, self.queue_bytes));
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.live.close();
        self.hub.leave(&self.user, &self.live);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(cursor: u64, text: &'static str) -> Arc<Delivery> {
        Arc::new(Delivery {
            cursor: Some(Cursor(cursor)),
            previous: Previous::Unstated,
            meta: None,
            frame: Utf8Bytes::from_static(text),
        })
    }

    async fn cursor_of(queue: &SessionQueue) -> Option<u64> {
        match queue.next().await {
            Live::Delivery(delivery) => delivery.cursor.map(|c| c.0),
            Live::Kicked | Live::CutLoose => None,
        }
    }

    #[tokio::test]
    async fn deliveries_come_in_order_and_an_emptied_queue_gives_its_memory_back() {
        let queue = SessionQueue::default();
        for cursor in 1..=100 {
            assert!(queue.offer(&delivery(cursor, "x"), 1000, 1 << 20));
        }
        for cursor in 1..=100 {
            assert_eq!(cursor_of(&queue).await, Some(cursor));
        }
        let queued = lock(&queue.items);
        assert_eq!((queued.bytes, queued.frames.capacity()), (0, 0));
    }

    #[tokio::test]
    async fn a_session_too_far_behind_in_frames_or_bytes_is_cut_loose_after_what_it_has() {
        let by_count = SessionQueue::default();
        assert!(by_count.offer(&delivery(1, "a"), 2, 1 << 20));
        assert!(by_count.offer(&delivery(2, "b"), 2, 1 << 20));
        assert!(!by_count.offer(&delivery(3, "c"), 2, 1 << 20));
        assert!(
            !by_count.offer(&delivery(4, "d"), 2, 1 << 20),
            "stays cut loose"
        );
        assert_eq!(cursor_of(&by_count).await, Some(1));
        assert_eq!(cursor_of(&by_count).await, Some(2));
        assert!(matches!(by_count.next().await, Live::CutLoose));

        let by_bytes = SessionQueue::default();
        assert!(by_bytes.offer(&delivery(1, "12345"), 100, 8));
        assert!(!by_bytes.offer(&delivery(2, "6789"), 100, 8));
        assert_eq!(cursor_of(&by_bytes).await, Some(1));
        assert!(matches!(by_bytes.next().await, Live::CutLoose));
    }

    #[tokio::test]
    async fn a_kick_comes_before_what_is_queued_and_wakes_a_waiting_session() {
        let queue = Arc::new(SessionQueue::default());
        assert!(queue.offer(&delivery(1, "a"), 10, 1 << 20));
        queue.kick("banned");
        assert!(matches!(queue.next().await, Live::Kicked));

        let idle = Arc::new(SessionQueue::default());
        let waiting = tokio::spawn({
            let idle = idle.clone();
            async move { matches!(idle.next().await, Live::Kicked) }
        });
        tokio::task::yield_now().await;
        idle.kick("kicked");
        assert!(waiting.await.unwrap());
    }
}
