//! Appends to inboxes, then delivers live, in one global order.
//!
//! A user's cursors are INBOX sequences, and an edge drops a live frame whose
//! cursor is not above the last one it sent. So live deliveries for a user
//! must leave in sequence order, even though many lanes append at once. All
//! appends go out on one connection under one lock, and each is queued in
//! the same order; one task awaits the PubAcks in that order and publishes
//! each delivery. The queue also bounds the PubAcks in flight.
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

struct Pending {
    user: UserId,
    frame: Bytes,
    /// Headers every copy carries (a message's receipt metadata, its trace id).
    headers: HeaderMap,
    ack: PublishAckFuture,
    failed: Arc<AtomicBool>,
    /// Set on an event's last append: told whether the whole event went through.
    done: Option<oneshot::Sender<bool>>,
    /// Its share of [`IN_FLIGHT_KIB`], given back once its PubAck is handled.
    _bytes: OwnedSemaphorePermit,
}

pub struct InboxWriter {
    js: jetstream::Context,
    queue: Mutex<mpsc::Sender<Pending>>,
    bytes: Arc<Semaphore>,
}

impl InboxWriter {
    pub fn new(
        nats: async_nats::Client,
        js: jetstream::Context,
        metrics: Arc<RouterMetrics>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        tokio::spawn(deliver_in_order(nats, rx, metrics));
        Self {
            js,
            queue: Mutex::new(tx),
            bytes: Arc::new(Semaphore::new(IN_FLIGHT_KIB)),
        }
    }

    /// Appends `frame` to every recipient's inbox (de-duplicated by
    /// `<event_id>:<user>`) and delivers each item live with its cursor;
    /// both carry `headers`.
    /// Returns once all of it is done; an error means some of it may not be,
    /// and the caller retries the whole event (the appends de-duplicate).
    pub async fn append(
        &self,
        recipients: &[UserId],
        event_id: &str,
        frame: Bytes,
        base: HeaderMap,
    ) -> Result<(), String> {
        let Some(last) = recipients.len().checked_sub(1) else {
            return Ok(());
        };
        let failed = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = oneshot::channel();
        let mut done_tx = Some(done_tx);
        {
            let queue = self.queue.lock().await;
            // Whole KiB, at least one, never more than the bound holds.
            let kib = (frame.len() / 1024 + 1).min(IN_FLIGHT_KIB) as u32;
            for (index, user) in recipients.iter().enumerate() {
                let bytes = self
                    .bytes
                    .clone()
                    .acquire_many_owned(kib)
                    .await
                    .map_err(|_| "delivery task stopped".to_string())?;
                let mut headers = base.clone();
                headers.insert(
                    subjects::MSG_ID_HEADER,
                    subjects::inbox_dedup_id(event_id, user).as_str(),
                );
                let ack = self
                    .js
                    .publish_with_headers(subjects::inbox(user), headers, frame.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                let pending = Pending {
                    user: user.clone(),
                    frame: frame.clone(),
                    headers: base.clone(),
                    ack,
                    failed: failed.clone(),
                    done: if index == last { done_tx.take() } else { None },
                    _bytes: bytes,
                };
                queue
                    .send(pending)
                    .await
                    .map_err(|_| "delivery task stopped".to_string())?;
            }
        }
        match done_rx.await {
            Ok(true) => Ok(()),
            Ok(false) => Err("an inbox append or delivery failed".into()),
            Err(_) => Err("delivery task stopped".into()),
        }
    }
}

async fn deliver_in_order(
    nats: async_nats::Client,
    mut queue: mpsc::Receiver<Pending>,
    metrics: Arc<RouterMetrics>,
) {
    let mut chain = Chain::default();
    while let Some(pending) = queue.recv().await {
        match pending.ack.await {
            Ok(ack) => {
                metrics.inbox_appended();
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
                if let Err(e) = nats
                    .publish_with_headers(subjects::deliver(&pending.user), headers, frame.into())
                    .await
                {
                    tracing::warn!(error = %e, "live delivery failed");
                    chain.failed(&pending.user);
                    pending.failed.store(true, Ordering::Relaxed);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "inbox append not acknowledged");
                // The write may still have happened (only its PubAck was
                // lost) and be committed behind items delivered meanwhile.
                chain.failed(&pending.user);
                pending.failed.store(true, Ordering::Relaxed);
            }
        }
        if let Some(done) = pending.done {
            let _ = done.send(!pending.failed.load(Ordering::Relaxed));
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
        self.make_room();
        self.last.insert(user.clone(), Last::At(sequence));
        Previous::Unstated
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

    #[test]
    fn each_delivery_names_the_users_previous_item() {
        let (alice, bob) = (user("alice"), user("bob"));
        let mut chain = Chain::default();
        assert_eq!(chain.appended(&alice, 1), Previous::Unstated);
        assert_eq!(chain.appended(&bob, 2), Previous::Unstated);
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
        assert_eq!(chain.appended(&bob, 2), Previous::Unstated);
        assert_eq!(chain.appended(&alice, 4), Previous::Unknown);
        assert_eq!(chain.appended(&alice, 6), Previous::At(Cursor(4)));
        // A failure before anything was delivered is remembered too.
        let carol = user("carol");
        chain.failed(&carol);
        assert_eq!(chain.appended(&carol, 7), Previous::Unknown);
    }
}
