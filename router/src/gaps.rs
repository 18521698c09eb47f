//! Events lost in flight, recovered in order.
//!
//! The router's consumers take every subject of their stream, so the stream
//! sequences of first deliveries arrive without holes. A hole means the
//! server sent events that never reached us: a pull response on a
//! connection that died (a NATS node killed, a reconnect). JetStream
//! redelivers them only when their ack wait runs out, by which time later
//! events of the same conversation have been routed, and a sender's
//! messages would reach the inboxes out of order (the fault suite's
//! `cluster_rolling_kills` saw exactly that). So on a hole the router
//! reads the missing events from the stream leader and routes them first;
//! the late redelivery is routed again later and de-duplicated by the
//! inbox's `Nats-Msg-Id`.

use std::time::Duration;

use async_nats::jetstream::{self, message::StreamMessage};

/// A hole wider than this is not filled from the stream (the events come
/// back by redelivery, possibly out of order): it would mean reading a
/// large stretch one request at a time while every lane waits.
const MAX_HOLE: u64 = 1024;
const READ_ATTEMPTS: u32 = 3;

/// The stream sequences seen so far on one consumer.
pub struct Sequence {
    stream: jetstream::stream::Stream<()>,
    /// The sequence after the highest one delivered (or the ack floor at
    /// start).
    next: Option<u64>,
}

impl Sequence {
    /// `ack_floor` is the consumer's at start: every event above it that
    /// is still unacknowledged was delivered to a router that is gone (a
    /// kill, a takeover) and would come back only after its ack wait,
    /// behind newer events. Expecting the next delivery right above the
    /// floor makes them a hole, read back and routed first. A consumer
    /// that never acked anything (a new partition, a standby that started
    /// before the first event was routed) expects the stream's `first`
    /// sequence at start: what it holds from there on may have been
    /// delivered to a router that is gone.
    pub fn new(stream: jetstream::stream::Stream<()>, ack_floor: u64, first: u64) -> Self {
        Self {
            stream,
            next: Some(expected_first(ack_floor, first)),
        }
    }

    /// The events missing before the delivered one at `sequence`, read
    /// from the stream, oldest first. A redelivery (below the highest seen)
    /// leaves nothing missing.
    pub async fn missing_before(&mut self, sequence: u64) -> Vec<StreamMessage> {
        let hole = hole(self.next, sequence);
        self.next = Some(
            self.next
                .map_or(sequence + 1, |next| next.max(sequence + 1)),
        );
        let Some(hole) = hole else {
            return Vec::new();
        };
        if hole.end - hole.start > MAX_HOLE {
            tracing::warn!(
                from = hole.start,
                to = hole.end,
                "events lost in flight; too many to read back, they return by redelivery"
            );
            return Vec::new();
        }
        tracing::warn!(
            from = hole.start,
            to = hole.end,
            "events lost in flight; reading them back to route them in order"
        );
        let mut recovered = Vec::new();
        for missing in hole {
            if let Some(event) = self.read(missing).await {
                recovered.push(event);
            }
        }
        recovered
    }

    async fn read(&self, sequence: u64) -> Option<StreamMessage> {
        for attempt in 1..=READ_ATTEMPTS {
            // The leader answers (not a direct get from a replica that may
            // lag behind what it just delivered).
            match self.stream.get_raw_message(sequence).await {
                Ok(event) => return Some(event),
                Err(e) => {
                    tracing::warn!(sequence, attempt, error = %e, "cannot read a missing event");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
            }
        }
        None
    }
}

/// The first sequence a consumer at `ack_floor` expects from a stream
/// whose first sequence is `first` (0 when it never held anything).
fn expected_first(ack_floor: u64, first: u64) -> u64 {
    if ack_floor > 0 {
        ack_floor + 1
    } else {
        first.max(1)
    }
}

/// The sequences between the next expected one and a delivered one, if
/// the delivery skipped any.
fn hole(next: Option<u64>, delivered: u64) -> Option<std::ops::Range<u64>> {
    let next = next?;
    (delivered > next).then_some(next..delivered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hole_is_what_a_first_delivery_skipped() {
        assert_eq!(hole(None, 7), None, "nothing is known before the first");
        assert_eq!(hole(Some(7), 7), None, "the next one");
        assert_eq!(hole(Some(7), 10), Some(7..10));
        assert_eq!(hole(Some(10), 4), None, "a redelivery");
    }

    #[test]
    fn a_consumer_that_never_acked_expects_the_streams_first_event() {
        assert_eq!(expected_first(41, 1), 42, "above the ack floor");
        assert_eq!(expected_first(0, 0), 1, "an empty new stream");
        assert_eq!(expected_first(0, 1), 1);
        assert_eq!(expected_first(0, 500), 500, "older events aged out");
        // The events a gone router was given before the first ack are a
        // hole once a later one is delivered.
        assert_eq!(hole(Some(expected_first(0, 1)), 6), Some(1..6));
    }
}
