use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use async_nats::jetstream::{self, consumer::PullConsumer, message::StreamMessage, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use chat_shared::consume::{self, Backoff};
use chat_shared::ids::{ConversationId, UserId};
use chat_shared::membership::GroupCache;
use chat_shared::receipts::MessageMeta;
use chat_shared::subjects;
use chat_shared::telemetry::TraceId;
use chat_shared::wire::{ErrorCode, GroupEvent, MessageEvent, ServerFrame};
use chat_shared::{shutdown, StartError};
use futures::StreamExt;
use tokio::sync::{mpsc, watch, Mutex};
use tracing::Instrument;

use crate::gaps::Sequence;
use crate::inbox::InboxWriter;
use crate::metrics::RouterMetrics;
use crate::push::PushJobs;

/// Lanes per router: conversations hash onto them; each lane is sequential
/// (one event's appends acknowledged before the next event's go out), so
/// lanes are what lets the router wait on many PubAcks at once. A lane is a
/// task and a queue, cheap enough to have many: with 16, the router capped
/// a few dozen busy conversations at 16 round trips to JetStream at a time.
const LANES: usize = 64;
const LANE_QUEUE: usize = 256;
const PULL_BATCH: usize = 512;

/// Why one event could not be routed.
#[derive(Debug)]
enum RouteError {
    /// It can never succeed (malformed event, unknown group): copied to
    /// `chat.dead.<consumer>` and terminated, with a log.
    Poison(String),
    /// NATS or the persister failed; retried in place so order holds.
    Transient(String),
}

/// Which stream an event came from.
#[derive(Clone, Copy)]
enum Source {
    Messages,
    Events,
}

impl Source {
    fn stream(self) -> &'static str {
        match self {
            Self::Messages => subjects::MESSAGES_STREAM,
            Self::Events => subjects::EVENTS_STREAM,
        }
    }
}

pub struct Fanout {
    /// For dead letters; inbox appends go through `inbox`.
    js: jetstream::Context,
    inbox: InboxWriter,
    groups: GroupCache,
    push: PushJobs,
    metrics: Arc<RouterMetrics>,
}

impl Fanout {
    pub fn new(
        nats: async_nats::Client,
        js: jetstream::Context,
        groups: GroupCache,
        push: PushJobs,
        metrics: Arc<RouterMetrics>,
    ) -> Self {
        Self {
            inbox: InboxWriter::new(nats, js.clone(), metrics.clone()),
            js,
            groups,
            push,
            metrics,
        }
    }

    async fn route(
        &self,
        source: Source,
        subject: &str,
        payload: &[u8],
        trace: Option<TraceId>,
    ) -> Result<(), RouteError> {
        match source {
            Source::Messages => self.route_message(subject, payload, trace).await,
            Source::Events => self.route_group_event(payload).await,
        }
    }

    /// Routes an event read back after it was lost in flight (see
    /// `gaps`), retrying in place like a delivery. It is not acked: its
    /// redelivery, routed again and de-duplicated, is.
    async fn settle_recovered(&self, source: Source, event: StreamMessage) {
        let trace = TraceId::from_headers(Some(&event.headers));
        let mut backoff = Backoff::default();
        loop {
            match self
                .route(source, event.subject.as_str(), &event.payload, trace)
                .await
            {
                Ok(()) => return,
                Err(RouteError::Poison(reason)) => {
                    // Its redelivery is dead-lettered.
                    tracing::warn!(subject = %event.subject, %reason, "a recovered event cannot be routed");
                    return;
                }
                Err(RouteError::Transient(reason)) => {
                    tracing::warn!(subject = %event.subject, %reason, "routing a recovered event failed; retrying");
                    self.metrics.retried(source.stream());
                    backoff.wait().await;
                }
            }
        }
    }

    /// Handles one event until it is routed or found to be poison, then
    /// acks it; its logs carry the event's trace id.
    async fn settle(&self, source: Source, message: jetstream::Message) {
        let trace = TraceId::from_headers(message.headers.as_ref());
        let span = tracing::info_span!(
            "route",
            stream = source.stream(),
            trace_id = trace.map(tracing::field::display)
        );
        self.settle_traced(source, message, trace)
            .instrument(span)
            .await
    }

    async fn settle_traced(
        &self,
        source: Source,
        message: jetstream::Message,
        trace: Option<TraceId>,
    ) {
        let mut backoff = Backoff::default();
        loop {
            match self
                .route(source, message.subject.as_str(), &message.payload, trace)
                .await
            {
                Ok(()) => break,
                Err(RouteError::Poison(reason)) => {
                    tracing::error!(subject = %message.subject, %reason, "dead-lettering an event that cannot be routed");
                    // Not routed, but not lost: the copy is stored before
                    // the event is terminated (else it comes back later).
                    if consume::dead_letter(&self.js, &message, &reason).await {
                        self.metrics.dropped(source.stream());
                    }
                    return;
                }
                Err(RouteError::Transient(reason)) => {
                    tracing::warn!(subject = %message.subject, %reason, "routing failed; retrying");
                    self.metrics.retried(source.stream());
                    // Keep the event ours while we retry, instead of letting it be
                    // redelivered behind later events of its conversation.
                    let _ = message.ack_with(AckKind::Progress).await;
                    backoff.wait().await;
                }
            }
        }
        self.metrics.routed(source.stream());
        if let Err(e) = message.ack().await {
            tracing::warn!(error = %e, "ack failed; the event will be redelivered and de-duplicated");
        }
    }

    async fn route_message(
        &self,
        subject: &str,
        payload: &[u8],
        trace: Option<TraceId>,
    ) -> Result<(), RouteError> {
        let conversation = subjects::parse_message(subject)
            .ok_or_else(|| RouteError::Poison(format!("unexpected subject {subject}")))?;
        let event: MessageEvent = serde_json::from_slice(payload)
            .map_err(|e| RouteError::Poison(format!("malformed message event: {e}")))?;
        if event.conversation != conversation {
            return Err(RouteError::Poison(
                "event conversation does not match its subject".into(),
            ));
        }
        let recipients: Vec<UserId> = match &conversation {
            ConversationId::Dm { low, high } => vec![low.clone(), high.clone()],
            ConversationId::Group(group) => match self.groups.members(group).await {
                Ok(members) => members.iter().cloned().collect(),
                Err(e) if e.code == ErrorCode::NotFound => {
                    return Err(RouteError::Poison(format!("unknown group {group}")))
                }
                Err(e) => return Err(RouteError::Transient(e.to_string())),
            },
        };
        let event_id = event.id.to_string();
        let mut headers = HeaderMap::new();
        MessageMeta {
            conversation,
            id: event.id,
            from: event.from.clone(),
        }
        .add_to(&mut headers);
        if let Some(trace) = trace {
            trace.add_to(&mut headers);
        }
        let frame = ServerFrame::Message {
            cursor: None,
            message: event.clone(),
        };
        self.append(&recipients, &event_id, frame.to_json().into(), headers)
            .await?;
        self.push
            .emit(&event, &recipients, trace)
            .await
            .map_err(RouteError::Transient)
    }

    async fn route_group_event(&self, payload: &[u8]) -> Result<(), RouteError> {
        let event: GroupEvent = serde_json::from_slice(payload)
            .map_err(|e| RouteError::Poison(format!("malformed group event: {e}")))?;
        self.groups.invalidate(&event.group);
        let mut recipients = event.members.clone();
        for user in &event.users {
            if !recipients.contains(user) {
                recipients.push(user.clone());
            }
        }
        let frame = ServerFrame::Membership {
            cursor: None,
            conversation: ConversationId::Group(event.group.clone()),
            event: event.event,
            users: event.users.clone(),
            by: event.by.clone(),
        };
        self.append(
            &recipients,
            &event.id,
            frame.to_json().into(),
            HeaderMap::new(),
        )
        .await
    }

    async fn append(
        &self,
        recipients: &[UserId],
        event_id: &str,
        frame: Bytes,
        headers: HeaderMap,
    ) -> Result<(), RouteError> {
        self.inbox
            .append(recipients, event_id, frame, headers)
            .await
            .map_err(RouteError::Transient)
    }
}

fn lane_of(subject: &str) -> usize {
    let mut hasher = DefaultHasher::new();
    subject.hash(&mut hasher);
    (hasher.finish() % LANES as u64) as usize
}

/// What a lane routes.
// Deliveries are the common case and the large variant: boxing them would
// allocate once per event to save stack in a rare one.
#[allow(clippy::large_enum_variant)]
enum Work {
    /// A delivery: acked once routed.
    Delivered(jetstream::Message),
    /// An event read back after it was lost in flight.
    Recovered(StreamMessage),
}

/// The stream sequences a consumer has seen, shared by the futures of its
/// pull loop (which runs them one at a time).
async fn sequence_of(
    router: &Fanout,
    source: Source,
    consumer: &mut PullConsumer,
) -> Result<Arc<Mutex<Sequence>>, StartError> {
    let stream = router
        .js
        .get_stream_no_info(source.stream())
        .await
        .map_err(|e| StartError::JetStream(format!("stream {}: {e}", source.stream())))?;
    let ack_floor = consumer
        .info()
        .await
        .map_err(|e| StartError::JetStream(format!("consumer on {}: {e}", source.stream())))?
        .ack_floor
        .stream_sequence;
    Ok(Arc::new(Mutex::new(Sequence::new(stream, ack_floor))))
}

/// The events lost in flight before `message`, read back from the stream.
async fn missing_before(
    sequence: &Mutex<Sequence>,
    message: &jetstream::Message,
) -> Vec<StreamMessage> {
    match message.info() {
        Ok(info) => {
            let delivered = info.stream_sequence;
            sequence.lock().await.missing_before(delivered).await
        }
        Err(_) => Vec::new(),
    }
}

/// Pulls MESSAGES (as the pinned client of the router priority group) and
/// spreads events over the lanes by conversation.
pub async fn consume_messages(
    router: Arc<Fanout>,
    consumer: PullConsumer,
    stop: watch::Receiver<bool>,
) -> Result<(), StartError> {
    let mut consumer = consumer;
    let sequence = sequence_of(&router, Source::Messages, &mut consumer).await?;
    let lanes: Arc<Vec<mpsc::Sender<Work>>> = Arc::new(
        (0..LANES)
            .map(|_| {
                let (tx, mut rx) = mpsc::channel::<Work>(LANE_QUEUE);
                let router = router.clone();
                tokio::spawn(async move {
                    while let Some(work) = rx.recv().await {
                        match work {
                            Work::Delivered(message) => {
                                router.settle(Source::Messages, message).await
                            }
                            Work::Recovered(event) => {
                                router.settle_recovered(Source::Messages, event).await
                            }
                        }
                    }
                });
                tx
            })
            .collect(),
    );
    pull(consumer, stop, |message| {
        let lanes = lanes.clone();
        let sequence = sequence.clone();
        async move {
            for event in missing_before(&sequence, &message).await {
                let lane = &lanes[lane_of(event.subject.as_str())];
                if lane.send(Work::Recovered(event)).await.is_err() {
                    return false;
                }
            }
            let lane = &lanes[lane_of(&message.subject)];
            lane.send(Work::Delivered(message)).await.is_ok()
        }
    })
    .await
}

/// Pulls EVENTS in one lane: membership changes are few and must stay ordered.
pub async fn consume_events(
    router: Arc<Fanout>,
    consumer: PullConsumer,
    stop: watch::Receiver<bool>,
) -> Result<(), StartError> {
    let mut consumer = consumer;
    let sequence = sequence_of(&router, Source::Events, &mut consumer).await?;
    pull(consumer, stop, |message| {
        let router = router.clone();
        let sequence = sequence.clone();
        async move {
            for event in missing_before(&sequence, &message).await {
                router.settle_recovered(Source::Events, event).await;
            }
            router.settle(Source::Events, message).await;
            true
        }
    })
    .await
}

/// The pull loop shared by both consumers: reconnects the message stream
/// after errors and stops on shutdown.
async fn pull<F, Fut>(
    consumer: PullConsumer,
    stop: watch::Receiver<bool>,
    mut handle: F,
) -> Result<(), StartError>
where
    F: FnMut(jetstream::Message) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let stopped = shutdown::wait(stop);
    tokio::pin!(stopped);
    loop {
        let Some(mut stream) = consume::open_pull(
            &consumer,
            PULL_BATCH,
            Some(subjects::ROUTER_PRIORITY_GROUP),
            &mut stopped,
        )
        .await
        else {
            return Ok(());
        };
        loop {
            tokio::select! {
                _ = &mut stopped => {
                    consume::release_buffered(&mut stream).await;
                    return Ok(());
                }
                next = stream.next() => match next {
                    Some(Ok(message)) => {
                        if !handle(message).await {
                            return Ok(());
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "pull stream error");
                        // Heartbeat or pin errors end this stream; open another.
                        break;
                    }
                    None => break,
                },
            }
        }
    }
}
