//! Appends to inboxes, then delivers live, in one global order.
//!
//! A user's cursors are INBOX sequences, and an edge drops a live frame whose
//! cursor is not above the last one it sent. So live deliveries for a user
//! must leave in sequence order, even though many lanes append at once. All
//! appends go out on one connection under one lock, and each is queued in
//! the same order; one task awaits the PubAcks in that order and publishes
//! each delivery. The queue also bounds the PubAcks in flight.
//!
//! A lane submits the next event's appends before the previous event's are
//! acknowledged ([`Order`]), but a user's item of the later event leaves
//! only once that user's item of the earlier one is stored: sent before,
//! it could be stored while the earlier one is lost (a reconnect, a leader
//! change) and retried behind it.
//!
//! Live deliveries travel on core NATS, which may lose one (a NATS node
//! dies with it in flight). So each names the user's item before it
//! (`Chat-Prev-Cursor`, see [`Chain`]): an edge that never sent that one
//! reads the inbox again instead of skipping it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_nats::jetstream::{self, context::PublishAckFuture};
use async_nats::HeaderMap;
use bytes::Bytes;
use chat_shared::delivery::Previous;
use chat_shared::ids::{Cursor, UserId};
use chat_shared::partitions::Partitions;
use chat_shared::subjects;
use chat_shared::wire::with_cursor;
use tokio::sync::{mpsc, oneshot, Mutex, OwnedSemaphorePermit, Semaphore};

use crate::metrics::RouterMetrics;

/// Appends whose PubAck has not been handled yet.
const IN_FLIGHT: usize = 4096;
/// Their bytes, in KiB: a count alone would let a few events of large
/// texts to large groups queue gigabytes in front of everyone else's
/// appends (4096 x 1 MiB). With this bound an append waits behind at most
/// this much data, whoever sent it.
const IN_FLIGHT_KIB: usize = 64 * 1024;

/// Why an event's appends did not all go through; the caller retries the
/// whole event (the appends de-duplicate).
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("an inbox append or delivery failed")]
    Failed,
    #[error("the delivery task stopped")]
    Stopped,
}

struct Pending {
    user: UserId,
    frame: Bytes,
    /// Headers every copy carries (a message's receipt metadata, its trace id).
    headers: HeaderMap,
    ack: PublishAckFuture,
    outcome: Outcome,
    /// Its share of [`IN_FLIGHT_KIB`], given back once its PubAck is handled.
    _bytes: OwnedSemaphorePermit,
}

/// One event's appends: when the last reference goes (its submitter's and
/// every append's [`Outcome`]), it tells whether all of them went through.
struct Event {
    failed: AtomicBool,
    done: Option<oneshot::Sender<bool>>,
}

impl Drop for Event {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(!self.failed.load(Ordering::Relaxed));
        }
    }
}

/// What one append reports, to its event and to the lane's next append
/// for the same user. Dropped unhandled (the delivery task is gone), it
/// reports a failure.
struct Outcome {
    event: Arc<Event>,
    stored: Option<oneshot::Sender<bool>>,
    /// Its PubAck arrived: the item is in the inbox.
    appended: bool,
    /// And its live delivery was published.
    delivered: bool,
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !(self.appended && self.delivered) {
            self.event.failed.store(true, Ordering::Relaxed);
        }
        if let Some(stored) = self.stored.take() {
            let _ = stored.send(self.appended);
        }
    }
}

/// A lane's last append per user: the next one for that user leaves only
/// once it is stored. Cleared when the lane has nothing in flight, and
/// rid of stored entries as it grows, so it holds about what is in flight.
pub struct Order {
    last: HashMap<UserId, oneshot::Receiver<bool>>,
    /// Size at which [`Order::forget_stored`] next sweeps.
    sweep_at: usize,
}

/// The smallest [`Order::sweep_at`]: a lane's window of events to groups of
/// 100 stays below it.
const ORDER_SWEEP_MIN: usize = 4096;

impl Default for Order {
    fn default() -> Self {
        Self {
            last: HashMap::new(),
            sweep_at: ORDER_SWEEP_MIN,
        }
    }
}

impl Order {
    /// Whether `user`'s previous item in this lane is stored, if that is
    /// known without waiting (or there is none).
    fn ready_now(&mut self, user: &UserId) -> Option<bool> {
        let Some(stored) = self.last.get_mut(user) else {
            return Some(true);
        };
        let ready = match stored.try_recv() {
            Ok(stored) => stored,
            Err(oneshot::error::TryRecvError::Empty) => return None,
            Err(oneshot::error::TryRecvError::Closed) => false,
        };
        self.last.remove(user);
        Some(ready)
    }

    /// Whether `user`'s previous item in this lane is stored (or there is none).
    async fn ready(&mut self, user: &UserId) -> bool {
        match self.last.remove(user) {
            Some(stored) => stored.await.unwrap_or(false),
            None => true,
        }
    }

    fn after(&mut self, user: &UserId, stored: oneshot::Receiver<bool>) {
        self.last.insert(user.clone(), stored);
    }

    /// `user`'s item was not sent: every later one of theirs in the lane
    /// waits for the retry too.
    fn blocked(&mut self, user: &UserId) {
        self.last.insert(user.clone(), failed());
    }

    pub fn clear(&mut self) {
        self.last.clear();
    }

    /// Drops the entries whose item is stored (a later item of that user
    /// would not wait anyway), once the map has grown; a failed one stays.
    pub fn forget_stored(&mut self) {
        if self.last.len() < self.sweep_at {
            return;
        }
        self.last.retain(|_, stored| match stored.try_recv() {
            Ok(true) => false,
            Err(oneshot::error::TryRecvError::Empty) => true,
            // Read now, so it must answer `false` from here on.
            Ok(false) | Err(oneshot::error::TryRecvError::Closed) => {
                *stored = failed();
                true
            }
        });
        self.sweep_at = (self.last.len() * 2).max(ORDER_SWEEP_MIN);
    }
}

/// An answer that is already "not stored".
fn failed() -> oneshot::Receiver<bool> {
    let (tx, rx) = oneshot::channel();
    let _ = tx.send(false);
    rx
}

/// One event's appends, submitted; [`Appending::done`] resolves once every
/// one is handled.
pub struct Appending {
    done: oneshot::Receiver<bool>,
}

impl Appending {
    /// Waits for the appends and their deliveries.
    pub async fn done(self) -> Result<(), AppendError> {
        let mut done = self;
        done.wait().await
    }

    /// Like [`Appending::done`], as a future that can be polled again.
    pub async fn wait(&mut self) -> Result<(), AppendError> {
        match (&mut self.done).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(AppendError::Failed),
            Err(_) => Err(AppendError::Stopped),
        }
    }
}

pub struct InboxWriter {
    js: jetstream::Context,
    /// Which INBOX partition holds each user.
    partitions: Partitions,
    queue: Mutex<mpsc::Sender<Pending>>,
    bytes: Arc<Semaphore>,
}

impl InboxWriter {
    pub fn new(
        nats: async_nats::Client,
        js: jetstream::Context,
        partitions: Partitions,
        metrics: Arc<RouterMetrics>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        tokio::spawn(deliver_in_order(nats, rx, metrics));
        Self {
            js,
            partitions,
            queue: Mutex::new(tx),
            bytes: Arc::new(Semaphore::new(IN_FLIGHT_KIB)),
        }
    }

    /// Appends `frame` to every recipient's inbox (de-duplicated by
    /// `<event_id>:<user>`) and delivers each item live with its cursor;
    /// both carry `headers`. Returns once all of it is done; an error means
    /// some of it may not be, and the caller retries the whole event.
    pub async fn append(
        &self,
        recipients: &[UserId],
        event_id: &str,
        frame: Bytes,
        base: HeaderMap,
    ) -> Result<(), AppendError> {
        self.submit(recipients, event_id, frame, base, &mut Order::default())
            .await
            .done()
            .await
    }

    /// Sends the appends of [`InboxWriter::append`] without waiting for
    /// their PubAcks; each user's item after that user's previous one in
    /// `order` is stored.
    pub async fn submit(
        &self,
        recipients: &[UserId],
        event_id: &str,
        frame: Bytes,
        base: HeaderMap,
        order: &mut Order,
    ) -> Appending {
        let (done, done_rx) = oneshot::channel();
        let event = Arc::new(Event {
            failed: AtomicBool::new(false),
            done: Some(done),
        });
        // Whole KiB, at least one, never more than the bound holds.
        let kib = (frame.len() / 1024 + 1).min(IN_FLIGHT_KIB) as u32;
        let mut users = recipients.iter().peekable();
        while let Some(first) = users.next() {
            // Wait for this user's previous item; then send theirs and every
            // following one that need not wait, under one lock, so an event
            // whose predecessors are stored leaves in one burst.
            let mut ready = order.ready(first).await;
            let queue = self.queue.lock().await;
            let mut user = first;
            loop {
                self.send(
                    &queue, user, ready, event_id, &frame, &base, kib, &event, order,
                )
                .await;
                let Some(next) = users.peek() else { break };
                let Some(now) = order.ready_now(next) else {
                    break;
                };
                (user, ready) = (*next, now);
                users.next();
            }
        }
        Appending { done: done_rx }
    }

    /// Sends `user`'s append if `ready` (their previous item is stored), or
    /// marks it blocked; `queue` is the held lock.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        queue: &mpsc::Sender<Pending>,
        user: &UserId,
        ready: bool,
        event_id: &str,
        frame: &Bytes,
        base: &HeaderMap,
        kib: u32,
        event: &Arc<Event>,
        order: &mut Order,
    ) {
        if !ready {
            event.failed.store(true, Ordering::Relaxed);
            order.blocked(user);
            return;
        }
        let (stored, stored_rx) = oneshot::channel();
        order.after(user, stored_rx);
        // Dropped unsent, the outcome reports the failure.
        let outcome = Outcome {
            event: event.clone(),
            stored: Some(stored),
            appended: false,
            delivered: false,
        };
        let Ok(bytes) = self.bytes.clone().acquire_many_owned(kib).await else {
            return;
        };
        let mut headers = base.clone();
        headers.insert(
            subjects::MSG_ID_HEADER,
            subjects::inbox_dedup_id(event_id, user).as_str(),
        );
        let ack = match self
            .js
            .publish_with_headers(
                subjects::inbox_in(user, self.partitions.of_user(user)),
                headers,
                frame.clone(),
            )
            .await
        {
            Ok(ack) => ack,
            Err(e) => {
                tracing::warn!(error = %e, "inbox append not sent");
                return;
            }
        };
        let pending = Pending {
            user: user.clone(),
            frame: frame.clone(),
            headers: base.clone(),
            ack,
            outcome,
            _bytes: bytes,
        };
        let _ = queue.send(pending).await;
    }
}

async fn deliver_in_order(
    nats: async_nats::Client,
    mut queue: mpsc::Receiver<Pending>,
    metrics: Arc<RouterMetrics>,
) {
    let mut chain = Chain::default();
    while let Some(pending) = queue.recv().await {
        let mut outcome = pending.outcome;
        match pending.ack.await {
            Ok(ack) => {
                metrics.inbox_appended();
                outcome.appended = true;
                // A duplicate ack carries the original sequence: delivering it
                // again is harmless (connections drop cursors they already
                // sent) and covers a crash between the append and the delivery.
                let cursor = Cursor(ack.sequence);
                let mut headers = pending.headers;
                headers.insert(subjects::CURSOR_HEADER, cursor.to_string().as_str());
                chain
                    .appended(&pending.user, ack.sequence)
                    .add_to(&mut headers);
                let frame = with_cursor(&pending.frame, cursor);
                match nats
                    .publish_with_headers(subjects::deliver(&pending.user), headers, frame.into())
                    .await
                {
                    Ok(()) => outcome.delivered = true,
                    Err(e) => {
                        tracing::warn!(error = %e, "live delivery failed");
                        chain.failed(&pending.user);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "inbox append not acknowledged");
                // The write may still have happened (only its PubAck was
                // lost) and be committed behind items delivered meanwhile.
                chain.failed(&pending.user);
            }
        }
    }
}

/// The last inbox item the router delivered to each user, so each delivery
/// can name its predecessor. Fed in PubAck order, which is inbox order.
#[derive(Default)]
struct Chain {
    last: HashMap<UserId, Last>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Last {
    At(u64),
    Unknown,
}

/// Users remembered; beyond this the known links are forgotten (those users
/// lose the check until their next item) and the unknown ones kept.
const CHAIN_USERS: usize = 1_000_000;

impl Chain {
    /// `user`'s item at `sequence` was acknowledged; its delivery's link.
    fn appended(&mut self, user: &UserId, sequence: u64) -> Previous {
        // Per delivery: a known user is updated in place, not re-keyed.
        if let Some(last) = self.last.get_mut(user) {
            let previous = match *last {
                // Stored before (a duplicate append): its predecessor was
                // named when it was first delivered.
                Last::At(at) if sequence <= at => return Previous::Unstated,
                Last::At(at) => Previous::At(Cursor(at)),
                Last::Unknown => Previous::Unknown,
            };
            *last = Last::At(sequence);
            return previous;
        }
        // A user this router has not delivered to: it cannot name the
        // predecessor, and one may be missing. A router that took over (or
        // restarted) re-routes the events its predecessor left half done,
        // and may deliver newer items before them: if those said nothing,
        // a session would move its cursor past the older item for good.
        // `Unknown` makes the session read the inbox once if it is behind.
        self.make_room();
        self.last.insert(user.clone(), Last::At(sequence));
        Previous::Unknown
    }

    /// An append or a delivery for `user` failed.
    fn failed(&mut self, user: &UserId) {
        if !self.last.contains_key(user) {
            self.make_room();
        }
        self.last.insert(user.clone(), Last::Unknown);
    }

    fn make_room(&mut self) {
        if self.last.len() >= CHAIN_USERS {
            self.last.retain(|_, last| *last == Last::Unknown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    fn answered(stored: bool) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(stored);
        rx
    }

    #[tokio::test]
    async fn a_users_next_item_waits_for_the_previous_one_to_be_stored() {
        let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
        let mut order = Order::default();
        assert!(order.ready(&alice).await, "nothing before it");
        order.after(&alice, answered(true));
        order.after(&bob, answered(false));
        let (carol_stored, carol_rx) = oneshot::channel();
        order.after(&carol, carol_rx);
        assert!(order.ready(&alice).await);
        assert!(!order.ready(&bob).await, "bob's previous item was lost");
        // Carol's is still on its way: her next item waits for it.
        let waiting = tokio::spawn(async move { order.ready(&carol).await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let _ = carol_stored.send(true);
        assert!(waiting.await.unwrap());
    }

    #[tokio::test]
    async fn forgetting_stored_items_keeps_failed_and_pending_ones() {
        let mut order = Order::default();
        let users: Vec<UserId> = (0..ORDER_SWEEP_MIN)
            .map(|i| user(&format!("u{i}")))
            .collect();
        for user in &users {
            order.after(user, answered(true));
        }
        order.blocked(&users[0]);
        let (_pending, rx) = oneshot::channel();
        order.after(&users[1], rx);
        order.forget_stored();
        assert_eq!(order.last.len(), 2);
        assert!(!order.ready(&users[0]).await, "a failed item still blocks");
        assert!(order.ready(&users[2]).await);
    }

    #[test]
    fn each_delivery_names_the_users_previous_item() {
        let (alice, bob) = (user("alice"), user("bob"));
        let mut chain = Chain::default();
        // The first delivery to a user names no item: this router may not
        // have seen the one before it.
        assert_eq!(chain.appended(&alice, 1), Previous::Unknown);
        assert_eq!(chain.appended(&bob, 2), Previous::Unknown);
        assert_eq!(chain.appended(&alice, 3), Previous::At(Cursor(1)));
        assert_eq!(chain.appended(&bob, 7), Previous::At(Cursor(2)));
        assert_eq!(chain.appended(&alice, 9), Previous::At(Cursor(3)));
    }

    #[test]
    fn a_duplicate_append_names_nothing_and_moves_nothing() {
        let alice = user("alice");
        let mut chain = Chain::default();
        chain.appended(&alice, 5);
        chain.appended(&alice, 8);
        assert_eq!(chain.appended(&alice, 5), Previous::Unstated);
        assert_eq!(chain.appended(&alice, 8), Previous::Unstated);
        assert_eq!(chain.appended(&alice, 11), Previous::At(Cursor(8)));
    }

    #[test]
    fn after_a_failure_the_next_delivery_says_unknown_once() {
        let (alice, bob) = (user("alice"), user("bob"));
        let mut chain = Chain::default();
        chain.appended(&alice, 1);
        chain.failed(&alice);
        // Another user is not affected.
        chain.appended(&bob, 2);
        assert_eq!(chain.appended(&bob, 3), Previous::At(Cursor(2)));
        assert_eq!(chain.appended(&alice, 4), Previous::Unknown);
        assert_eq!(chain.appended(&alice, 6), Previous::At(Cursor(4)));
        // A failure before anything was delivered is remembered too.
        let carol = user("carol");
        chain.failed(&carol);
        assert_eq!(chain.appended(&carol, 7), Previous::Unknown);
    }
}
