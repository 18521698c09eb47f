//! Appends to inboxes, then delivers live, in one global order.
//!
//! A user's cursors are INBOX sequences, and an edge drops a live frame whose
//! cursor is not above the last one it sent. So live deliveries for a user
//! must leave in sequence order, even though many lanes append at once. All
//! appends go out on one connection under one lock, and each is queued in
//! the same order; one task awaits the PubAcks in that order and publishes
//! each delivery. The queue also bounds the PubAcks in flight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_nats::jetstream::{self, context::PublishAckFuture};
use async_nats::HeaderMap;
use bytes::Bytes;
use chat_shared::ids::{Cursor, UserId};
use chat_shared::subjects;
use chat_shared::wire::with_cursor;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::metrics::RouterMetrics;

/// Appends whose PubAck has not been handled yet.
const IN_FLIGHT: usize = 4096;

struct Pending {
    user: UserId,
    frame: Bytes,
    /// Headers every copy carries (a message's receipt metadata, its trace id).
    headers: HeaderMap,
    ack: PublishAckFuture,
    failed: Arc<AtomicBool>,
    /// Set on an event's last append: told whether the whole event went through.
    done: Option<oneshot::Sender<bool>>,
}

pub struct InboxWriter {
    js: jetstream::Context,
    queue: Mutex<mpsc::Sender<Pending>>,
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
            for (index, user) in recipients.iter().enumerate() {
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
                let frame = with_cursor(&pending.frame, cursor);
                if let Err(e) = nats
                    .publish_with_headers(subjects::deliver(&pending.user), headers, frame.into())
                    .await
                {
                    tracing::warn!(error = %e, "live delivery failed");
                    pending.failed.store(true, Ordering::Relaxed);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "inbox append not acknowledged");
                pending.failed.store(true, Ordering::Relaxed);
            }
        }
        if let Some(done) = pending.done {
            let _ = done.send(!pending.failed.load(Ordering::Relaxed));
        }
    }
}
