//! A connection's outbound side: the bounded queue in front of the socket
//! and the one task that writes it.
//!
//! One task owns the socket's writer; everything else reaches it through a
//! bounded queue, so a client that does not read cannot grow our memory.
//! The queue is not a tokio channel: a channel allocates its first block of
//! slots (1.5 KiB here) when it is made, and every idle connection would
//! carry it. This one holds nothing while empty and gives back what a burst
//! made it grow.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use chat_shared::sync::lock;
use chat_shared::wire::{ErrorCode, ServerFrame};
use futures::{Sink, SinkExt};
use tokio::sync::{Notify, Semaphore};

use crate::metrics::{live_kind, EdgeMetrics};

pub enum Outbound {
    Frame(Utf8Bytes),
    Close(u16, &'static str),
}

/// What the outboxes of one connection and its writer share.
struct Queue {
    items: Mutex<VecDeque<Outbound>>,
    /// One permit per free slot; closed when the writer is gone.
    room: Semaphore,
    /// Wakes the writer: an item queued, or the last outbox dropped.
    ready: Notify,
    outboxes: AtomicUsize,
}

impl Queue {
    fn items(&self) -> MutexGuard<'_, VecDeque<Outbound>> {
        // Each critical section is one push or pop.
        lock(&self.items)
    }
}

/// A connection's queue of at most `capacity` frames: the outbox that
/// sessions and workers queue to, and the writer's end.
pub fn queue(capacity: usize, metrics: Arc<EdgeMetrics>) -> (Outbox, Writer) {
    let queue = Arc::new(Queue {
        items: Mutex::new(VecDeque::new()),
        room: Semaphore::new(capacity.max(1)),
        ready: Notify::new(),
        outboxes: AtomicUsize::new(1),
    });
    (
        Outbox {
            queue: queue.clone(),
            metrics,
        },
        Writer(queue),
    )
}

/// Queues frames for the writer task, counting them in the edge's metrics.
/// A send waits for room; it fails once the writer has ended.
pub struct Outbox {
    queue: Arc<Queue>,
    metrics: Arc<EdgeMetrics>,
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.queue.outboxes.fetch_add(1, Ordering::Relaxed);
        Self {
            queue: self.queue.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if self.queue.outboxes.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The writer sends what is queued, then ends.
            self.queue.ready.notify_one();
        }
    }
}

impl Outbox {
    async fn send(&self, item: Outbound) -> bool {
        match self.queue.room.acquire().await {
            Ok(permit) => {
                // The writer gives the slot back when it takes the item.
                permit.forget();
                self.queue.items().push_back(item);
                self.queue.ready.notify_one();
                true
            }
            Err(_) => false,
        }
    }

    pub async fn frame(&self, frame: &ServerFrame) -> bool {
        self.metrics.frame_out(frame.kind());
        self.send(Outbound::Frame(frame.to_json().into())).await
    }

    /// A frame serialized by another service (a live delivery or an inbox item).
    pub async fn raw(&self, frame: Utf8Bytes) -> bool {
        self.metrics.frame_out(live_kind(&frame));
        self.send(Outbound::Frame(frame)).await
    }

    pub fn metrics(&self) -> &EdgeMetrics {
        &self.metrics
    }

    pub async fn error(
        &self,
        reference: Option<&str>,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> bool {
        self.frame(&ServerFrame::error(reference, code, message))
            .await
    }

    pub async fn close(&self, code: u16, reason: &'static str) {
        self.metrics.session_closed(code);
        self.send(Outbound::Close(code, reason)).await;
    }
}

/// The writer task's end of the queue. Dropping it fails every send,
/// waiting or to come.
pub struct Writer(Arc<Queue>);

impl Drop for Writer {
    fn drop(&mut self) {
        self.0.room.close();
    }
}

impl Writer {
    /// The next item, waiting for one; `None` once every outbox is dropped
    /// and the queue is empty.
    async fn recv(&mut self) -> Option<Outbound> {
        loop {
            if let Some(item) = self.try_recv() {
                return Some(item);
            }
            if self.0.outboxes.load(Ordering::Acquire) == 0 {
                // An item queued before the last outbox went is taken first.
                return self.try_recv();
            }
            self.0.ready.notified().await;
        }
    }

    fn try_recv(&mut self) -> Option<Outbound> {
        let item = crate::deque::pop_front(&mut self.0.items())?;
        self.0.room.add_permits(1);
        Some(item)
    }
}

/// Frames written before one flush: under load several are queued, and one
/// write (one syscall, one TCP segment train) for all of them costs far less
/// than one each. Bounded so a busy socket still flushes often.
const WRITE_BATCH: usize = 64;

/// Writes frames until the session ends. A client that takes nothing for
/// `stall` (it stopped reading; its TCP window is full) is dropped: the
/// queues in front of the writer are bounded, and this bounds the time.
pub async fn write_loop<S>(mut sink: S, mut rx: Writer, stall: Duration)
where
    S: Sink<Message> + Unpin,
{
    'session: while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut fed = 0;
        while let Some(item) = next.take() {
            match item {
                Outbound::Frame(text) => {
                    if !within(stall, sink.feed(Message::Text(text))).await {
                        return;
                    }
                    fed += 1;
                    if fed < WRITE_BATCH {
                        next = rx.try_recv();
                    }
                }
                Outbound::Close(code, reason) => {
                    let frame = CloseFrame {
                        code,
                        reason: reason.into(),
                    };
                    // `send` flushes the frames fed before the close.
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    break 'session;
                }
            }
        }
        if !within(stall, sink.flush()).await {
            return;
        }
    }
    let _ = sink.close().await;
}

/// Runs one write of the socket, bounded by `stall`; false if the socket
/// failed or the client stopped taking data.
async fn within<F, E>(stall: Duration, write: F) -> bool
where
    F: std::future::Future<Output = Result<(), E>>,
{
    match tokio::time::timeout(stall, write).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            tracing::info!("client stopped reading; dropping the connection");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::channel::mpsc as sink;
    use futures::StreamExt;

    use super::*;

    const STALL: Duration = Duration::from_secs(30);

    fn outbox(capacity: usize) -> (Outbox, Writer) {
        let metrics = EdgeMetrics::new(&mut prometheus_client::registry::Registry::default());
        queue(capacity, Arc::new(metrics))
    }

    fn text(message: &Message) -> String {
        match message {
            Message::Text(text) => text.to_string(),
            Message::Close(Some(frame)) => format!("close {} {}", frame.code, frame.reason),
            other => format!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn frames_are_written_in_order_and_nothing_after_a_close() {
        let (socket, written) = sink::unbounded();
        let (queue, rx) = outbox(8);
        for frame in ["a", "b"] {
            assert!(queue.raw(frame.into()).await);
        }
        queue.close(1013, "unavailable").await;
        assert!(queue.raw("late".into()).await);
        write_loop(socket, rx, STALL).await;
        let written: Vec<String> = written.map(|m| text(&m)).collect().await;
        assert_eq!(written, ["a", "b", "close 1013 unavailable"]);
        assert!(!queue.raw("after the writer".into()).await);
    }

    #[tokio::test]
    async fn the_writer_ends_with_its_queue() {
        let (socket, written) = sink::unbounded();
        let (queue, rx) = outbox(8);
        let copy = queue.clone();
        assert!(queue.raw("a".into()).await);
        drop(queue);
        assert!(copy.raw("b".into()).await);
        drop(copy);
        write_loop(socket, rx, STALL).await;
        let written: Vec<String> = written.map(|m| text(&m)).collect().await;
        assert_eq!(written, ["a", "b"]);
    }

    #[tokio::test]
    async fn a_full_queue_makes_the_sender_wait_for_the_writer() {
        let (queue, mut rx) = outbox(2);
        assert!(queue.raw("a".into()).await);
        assert!(queue.raw("b".into()).await);
        let third = tokio::spawn({
            let queue = queue.clone();
            async move { queue.raw("c".into()).await }
        });
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "a third frame waits for room");
        assert!(matches!(rx.recv().await, Some(Outbound::Frame(f)) if f.as_str() == "a"));
        assert!(matches!(third.await, Ok(true)));
        // The queue is full again (b, c): a sender still waiting when the
        // writer goes is answered false.
        let fourth = tokio::spawn({
            let queue = queue.clone();
            async move { queue.raw("e".into()).await }
        });
        tokio::task::yield_now().await;
        drop(rx);
        assert!(matches!(fourth.await, Ok(false)));
    }

    #[tokio::test]
    async fn an_emptied_queue_gives_its_memory_back() {
        let (queue, mut rx) = outbox(64);
        for _ in 0..40 {
            assert!(queue.raw("x".into()).await);
        }
        while rx.try_recv().is_some() {}
        assert_eq!(rx.0.items().capacity(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_dropped_after_the_stall() {
        // Room for one message, and nobody reads it: the next write waits.
        let (socket, _unread) = sink::channel::<Message>(0);
        let (queue, rx) = outbox(8);
        for frame in ["a", "b", "c"] {
            assert!(queue.raw(frame.into()).await);
        }
        let started = tokio::time::Instant::now();
        // It ends although its queue is still open, after the stall.
        write_loop(socket, rx, STALL).await;
        assert!(started.elapsed() >= STALL);
        assert!(
            !queue.raw("d".into()).await,
            "the writer let go of its queue"
        );
    }
}
