//! A connection's outbound side: the bounded queue in front of the socket
//! and the one task that writes it.
//!
//! One task owns the socket's writer; everything else reaches it through a
//! bounded channel, so a client that does not read cannot grow our memory.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use chat_shared::wire::{ErrorCode, ServerFrame};
use futures::{Sink, SinkExt};
use tokio::sync::mpsc;

use crate::metrics::{live_kind, EdgeMetrics};

pub enum Outbound {
    Frame(Utf8Bytes),
    Close(u16, &'static str),
}

/// Sends frames to the writer task, counting them in the edge's metrics.
#[derive(Clone)]
pub struct Outbox(mpsc::Sender<Outbound>, Arc<EdgeMetrics>);

impl Outbox {
    pub fn new(queue: mpsc::Sender<Outbound>, metrics: Arc<EdgeMetrics>) -> Self {
        Self(queue, metrics)
    }

    pub async fn frame(&self, frame: &ServerFrame) -> bool {
        self.1.frame_out(frame.kind());
        self.0
            .send(Outbound::Frame(frame.to_json().into()))
            .await
            .is_ok()
    }

    /// A frame serialized by another service (a live delivery or an inbox item).
    pub async fn raw(&self, frame: Utf8Bytes) -> bool {
        self.1.frame_out(live_kind(&frame));
        self.0.send(Outbound::Frame(frame)).await.is_ok()
    }

    pub fn metrics(&self) -> &EdgeMetrics {
        &self.1
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
        self.1.session_closed(code);
        let _ = self.0.send(Outbound::Close(code, reason)).await;
    }
}

/// Frames written before one flush: under load several are queued, and one
/// write (one syscall, one TCP segment train) for all of them costs far less
/// than one each. Bounded so a busy socket still flushes often.
const WRITE_BATCH: usize = 64;

/// Writes frames until the session ends. A client that takes nothing for
/// `stall` (it stopped reading; its TCP window is full) is dropped: the
/// queues in front of the writer are bounded, and this bounds the time.
pub async fn write_loop<S>(mut sink: S, mut rx: mpsc::Receiver<Outbound>, stall: Duration)
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
                        next = rx.try_recv().ok();
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
        let (queue, rx) = mpsc::channel(8);
        for frame in ["a", "b"] {
            let _ = queue.send(Outbound::Frame(frame.into())).await;
        }
        let _ = queue.send(Outbound::Close(1013, "unavailable")).await;
        let _ = queue.send(Outbound::Frame("late".into())).await;
        write_loop(socket, rx, STALL).await;
        let written: Vec<String> = written.map(|m| text(&m)).collect().await;
        assert_eq!(written, ["a", "b", "close 1013 unavailable"]);
    }

    #[tokio::test]
    async fn the_writer_ends_with_its_queue() {
        let (socket, written) = sink::unbounded();
        let (queue, rx) = mpsc::channel(8);
        let _ = queue.send(Outbound::Frame("a".into())).await;
        drop(queue);
        write_loop(socket, rx, STALL).await;
        let written: Vec<String> = written.map(|m| text(&m)).collect().await;
        assert_eq!(written, ["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_dropped_after_the_stall() {
        // Room for one message, and nobody reads it: the next write waits.
        let (socket, _unread) = sink::channel::<Message>(0);
        let (queue, rx) = mpsc::channel(8);
        for frame in ["a", "b", "c"] {
            let _ = queue.send(Outbound::Frame(frame.into())).await;
        }
        let started = tokio::time::Instant::now();
        // It ends although its queue is still open, after the stall.
        write_loop(socket, rx, STALL).await;
        assert!(started.elapsed() >= STALL);
        assert!(queue.is_closed(), "the writer let go of its queue");
    }
}
