use std::collections::hash_map::DefaultHasher;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, message::StreamMessage, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use chat_shared::consume::{self, Backoff};
use chat_shared::ids::{ConversationId, GroupId, UserId};
use chat_shared::membership::GroupCache;
use chat_shared::partitions::{Partition, Partitions};
use chat_shared::receipts::MessageMeta;
use chat_shared::rpc::RpcError;
use chat_shared::subjects;
use chat_shared::telemetry::TraceId;
use chat_shared::wire::{
    ChangeEvent, ErrorCode, GroupEvent, MessageEvent, MessagesEvent, ServerFrame,
};
use chat_shared::{shutdown, StartError};
use futures::StreamExt;
use tokio::sync::{mpsc, watch, Mutex};
use tracing::Instrument;

use crate::erase::{EraseError, Eraser};
use crate::gaps::Sequence;
use crate::inbox::{AppendError, Appending, InboxWriter, Order};
use crate::metrics::RouterMetrics;
use crate::push::{PushError, PushJobs};
use chat_shared::push::RetractReason;

/// Lanes per router: conversations hash onto them, and a lane handles its
/// events in order. A lane is a task and a queue, cheap enough to have
/// many: with 16, the router capped a few dozen busy conversations at 16
/// round trips to JetStream at a time.
const LANES: usize = 64;
const LANE_QUEUE: usize = 256;
/// Events of one lane whose appends are on their way at once: the next
/// event's appends leave while the previous ones' PubAcks are awaited (each
/// user's in order, see `inbox::Order`), so a busy group is not one round
/// trip per message.
const LANE_WINDOW: usize = 16;
const PULL_BATCH: usize = 512;

/// Why one event could not be routed. Poison ([`RouteError::is_poison`])
/// can never succeed: it is copied to `chat.dead.<consumer>` and
/// terminated, with a log. The rest is NATS or the persister failing,
/// retried in place so order holds.
#[derive(Debug, thiserror::Error)]
enum RouteError {
    #[error("unexpected subject {0}")]
    Subject(String),
    #[error("malformed message event: {0}")]
    MalformedMessage(serde_json::Error),
    #[error("the event's conversation does not match its subject")]
    WrongConversation,
    #[error("a change without a Nats-Msg-Id or a sequence")]
    Unnamed,
    #[error("a change without what its kind needs")]
    IncompleteChange,
    #[error("unknown group {0}")]
    UnknownGroup(GroupId),
    #[error("malformed group event: {0}")]
    MalformedGroupEvent(serde_json::Error),
    #[error("group members: {0}")]
    Members(RpcError),
    #[error(transparent)]
    Append(#[from] AppendError),
    #[error(transparent)]
    Push(#[from] PushError),
    #[error(transparent)]
    Erase(#[from] EraseError),
}

impl RouteError {
    fn is_poison(&self) -> bool {
        match self {
            Self::Subject(_)
            | Self::MalformedMessage(_)
            | Self::WrongConversation
            | Self::Unnamed
            | Self::IncompleteChange
            | Self::UnknownGroup(_)
            | Self::MalformedGroupEvent(_) => true,
            Self::Members(_) | Self::Append(_) | Self::Push(_) | Self::Erase(_) => false,
        }
    }
}

/// Which stream an event came from: a partition of MESSAGES, or EVENTS.
#[derive(Clone, Copy)]
pub enum Source {
    Messages(Partition),
    Events,
}

impl Source {
    /// The stream family, as metrics label it.
    fn family(self) -> &'static str {
        match self {
            Self::Messages(_) => subjects::MESSAGES_STREAM,
            Self::Events => subjects::EVENTS_STREAM,
        }
    }

    /// The MESSAGES partition's index.
    fn partition(self) -> Option<u32> {
        match self {
            Self::Messages(partition) => Some(partition.index()),
            Self::Events => None,
        }
    }

    /// The stream itself.
    fn stream(self) -> String {
        match self {
            Self::Messages(partition) => partition.messages_stream(),
            Self::Events => subjects::EVENTS_STREAM.to_string(),
        }
    }
}

pub struct Fanout {
    /// For dead letters; inbox appends go through `inbox`.
    js: jetstream::Context,
    inbox: InboxWriter,
    groups: GroupCache,
    push: PushJobs,
    eraser: Eraser,
    metrics: Arc<RouterMetrics>,
}

impl Fanout {
    pub fn new(
        nats: async_nats::Client,
        js: jetstream::Context,
        partitions: Partitions,
        groups: GroupCache,
        push: PushJobs,
        metrics: Arc<RouterMetrics>,
    ) -> Self {
        Self {
            inbox: InboxWriter::new(nats.clone(), js.clone(), partitions, metrics.clone()),
            eraser: Eraser::new(nats, js.clone(), partitions),
            js,
            groups,
            push,
            metrics,
        }
    }

    /// The one inbox writer: every append goes through it, so each user's
    /// live deliveries leave in cursor order (receipts included).
    pub fn inbox(&self) -> &InboxWriter {
        &self.inbox
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Push jobs and their retractions (a read in receipts.rs, a delete).
    pub fn push(&self) -> &PushJobs {
        &self.push
    }

    /// Routes an event read back after it was lost in flight (see
    /// `gaps`), retrying in place like a delivery until routed (`true`) or
    /// stopped.
    /// It is not acked: its redelivery, routed again and de-duplicated, is.
    async fn settle_recovered(&self, source: Source, event: StreamMessage, stop: &Stop) -> bool {
        let trace = TraceId::from_headers(Some(&event.headers));
        let mut backoff = Backoff::default();
        loop {
            let stored = Stored {
                subject: event.subject.as_str(),
                payload: &event.payload,
                headers: Some(&event.headers),
                sequence: Some(event.sequence),
            };
            match self.route(source, stored, trace).await {
                Ok(()) => return true,
                Err(e) if e.is_poison() => {
                    // Its redelivery is dead-lettered.
                    tracing::warn!(subject = %event.subject, error = %e, "a recovered event cannot be routed");
                    return true;
                }
                Err(e) => {
                    tracing::warn!(subject = %event.subject, error = %e, "routing a recovered event failed; retrying");
                    self.metrics.retried(source.family());
                    if stop.wait(&mut backoff).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Handles one event until it is routed or found to be poison, then
    /// acks it; its logs carry the event's trace id. On shutdown it stops
    /// retrying and hands the event back: `false`.
    async fn settle(&self, source: Source, message: jetstream::Message, stop: &Stop) -> bool {
        let trace = TraceId::from_headers(message.headers.as_ref());
        self.settle_traced(source, message, trace, stop)
            .instrument(route_span(source, trace))
            .await
    }

    async fn settle_traced(
        &self,
        source: Source,
        message: jetstream::Message,
        trace: Option<TraceId>,
        stop: &Stop,
    ) -> bool {
        let mut backoff = Backoff::default();
        loop {
            match self.route(source, Stored::of(&message), trace).await {
                Ok(()) => break,
                Err(e) if e.is_poison() => {
                    self.dead_letter(source, &message, &e.to_string()).await;
                    return true;
                }
                Err(e) => {
                    tracing::warn!(subject = %message.subject, error = %e, "routing failed; retrying");
                    self.metrics.retried(source.family());
                    // Keep the event ours while we retry, instead of letting it be
                    // redelivered behind later events of its conversation.
                    let _ = message.ack_with(AckKind::Progress).await;
                    if stop.wait(&mut backoff).await {
                        release(&message).await;
                        return false;
                    }
                }
            }
        }
        self.acked(source, &message).await;
        true
    }

    async fn dead_letter(&self, source: Source, message: &jetstream::Message, reason: &str) {
        tracing::error!(subject = %message.subject, %reason, "dead-lettering an event that cannot be routed");
        // Not routed, but not lost: the copy is stored before the event is
        // terminated (else it comes back later).
        if consume::dead_letter(&self.js, message, reason).await {
            self.metrics.dropped(source.family());
        }
    }

    async fn acked(&self, source: Source, message: &jetstream::Message) {
        self.metrics.routed(source.family());
        if let Err(e) = message.ack().await {
            tracing::warn!(error = %e, "ack failed; the event will be redelivered and de-duplicated");
        }
    }

    /// Starts routing a MESSAGES event in a lane: its appends are sent and
    /// [`Fanout::finish`] completes it. An event that cannot start now is
    /// handed back to be settled in place.
    async fn start(
        &self,
        source: Source,
        message: jetstream::Message,
        order: &mut Order,
    ) -> Result<Option<InFlight>, jetstream::Message> {
        let trace = TraceId::from_headers(message.headers.as_ref());
        let prepared = self.prepare_message(Stored::of(&message), trace).await;
        let prepared = match prepared {
            Ok(prepared) => prepared,
            Err(e) if e.is_poison() => {
                self.dead_letter(source, &message, &e.to_string())
                    .instrument(route_span(source, trace))
                    .await;
                return Ok(None);
            }
            Err(_) => return Err(message),
        };
        let appending = self
            .inbox
            .submit(
                &prepared.recipients,
                &prepared.event_id,
                prepared.frame.clone(),
                prepared.headers.clone(),
                order,
            )
            .await;
        Ok(Some(InFlight {
            message,
            prepared,
            appending,
            trace,
        }))
    }

    /// Completes a started event once its appends are done: its push jobs,
    /// then the ack. Anything that failed is retried in place (routing the
    /// event again; the appends de-duplicate); `false` if it was handed
    /// back at shutdown instead.
    async fn finish(&self, source: Source, event: InFlight, appended: bool, stop: &Stop) -> bool {
        let InFlight {
            message,
            prepared,
            trace,
            ..
        } = event;
        if appended {
            let completed = self
                .complete(&prepared, trace)
                .instrument(route_span(source, trace))
                .await;
            match completed {
                Ok(()) => {
                    self.acked(source, &message).await;
                    return true;
                }
                Err(reason) => {
                    tracing::warn!(subject = %message.subject, %reason, "push jobs or erasure failed; retrying")
                }
            }
        }
        self.metrics.retried(source.family());
        self.settle(source, message, stop).await
    }

    async fn route(
        &self,
        source: Source,
        stored: Stored<'_>,
        trace: Option<TraceId>,
    ) -> Result<(), RouteError> {
        match source {
            Source::Messages(_) => self.route_message(stored, trace).await,
            Source::Events => self.route_group_event(stored.payload).await,
        }
    }

    async fn route_message(
        &self,
        stored: Stored<'_>,
        trace: Option<TraceId>,
    ) -> Result<(), RouteError> {
        let prepared = self.prepare_message(stored, trace).await?;
        self.append(
            &prepared.recipients,
            &prepared.event_id,
            prepared.frame.clone(),
            prepared.headers.clone(),
        )
        .await?;
        self.complete(&prepared, trace).await
    }

    /// What follows an event's appends: a message's push jobs; for a
    /// delete for everyone, erasing the message's text (see `erase`).
    async fn complete(
        &self,
        prepared: &Prepared,
        trace: Option<TraceId>,
    ) -> Result<(), RouteError> {
        match &prepared.then {
            Then::Push(event) => Ok(self.push.emit(event, &prepared.recipients, trace).await?),
            Then::Erase(change, sequence) => {
                let erased = self
                    .eraser
                    .erase(change, *sequence, &prepared.recipients)
                    .await?;
                tracing::info!(id = %change.id, erased, "message erased");
                // A notification already shown for it is withdrawn on every
                // member's devices but the deleter's (who needs none).
                // All at once: one member's lookup and PubAck does not wait
                // for the last (at most a group's worth in flight).
                let retractions =
                    prepared
                        .recipients
                        .iter()
                        .filter(|m| **m != change.by)
                        .map(|member| {
                            self.push.retract(
                                member,
                                &change.conversation,
                                change.id,
                                RetractReason::Delete,
                            )
                        });
                futures::future::try_join_all(retractions).await?;
                Ok(())
            }
            Then::EraseLateEdit(change, sequence) => {
                self.eraser.erase_late_edit(change, *sequence).await?;
                tracing::info!(id = %change.id, "an edit of an erased message erased");
                Ok(())
            }
            Then::Nothing => Ok(()),
        }
    }

    /// Checks a MESSAGES event and resolves its members and frame.
    async fn prepare_message(
        &self,
        stored: Stored<'_>,
        trace: Option<TraceId>,
    ) -> Result<Prepared, RouteError> {
        let subject = stored.subject;
        let conversation = subjects::parse_message(subject)
            .ok_or_else(|| RouteError::Subject(subject.to_string()))?;
        let event = MessagesEvent::parse(stored.payload).map_err(RouteError::MalformedMessage)?;
        if *event.conversation() != conversation {
            return Err(RouteError::WrongConversation);
        }
        let event = match event {
            MessagesEvent::Message(message) => message,
            MessagesEvent::Change(change) => {
                return self.prepare_change(change, stored, trace).await
            }
        };
        let recipients = self.members(&conversation).await?;
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
        Ok(Prepared {
            recipients,
            event_id: event.id.to_string(),
            frame: frame.to_json().into(),
            headers,
            then: Then::Push(Box::new(event)),
        })
    }

    /// A change of a message (v1.1): an `update` item for every member (for
    /// a delete for `me`, the caller only), appended like a message so it
    /// keeps its place in the conversation's order. No push.
    async fn prepare_change(
        &self,
        change: ChangeEvent,
        stored: Stored<'_>,
        trace: Option<TraceId>,
    ) -> Result<Prepared, RouteError> {
        if !change.is_complete() {
            return Err(RouteError::IncompleteChange);
        }
        let late = self.eraser.is_late_edit(&change);
        let recipients = if late {
            // Nobody gets it: its text belongs to a deleted message.
            Vec::new()
        } else if change.is_private() {
            vec![change.by.clone()]
        } else {
            self.members(&change.conversation).await?
        };
        // The change's own Nats-Msg-Id names it uniquely (see
        // `subjects::change_dedup_id`); one published without it is named
        // by its sequence.
        let event_id = stored
            .headers
            .and_then(|headers| headers.get(subjects::MSG_ID_HEADER))
            .map(|id| id.as_str().to_string())
            .or_else(|| {
                stored
                    .sequence
                    .map(|seq| format!("seq:{subject}:{seq}", subject = stored.subject))
            })
            .ok_or(RouteError::Unnamed)?;
        let mut headers = HeaderMap::new();
        if let Some(trace) = trace {
            trace.add_to(&mut headers);
        }
        let frame = ServerFrame::Update {
            cursor: None,
            change: change.clone(),
        };
        let then = if late {
            Then::EraseLateEdit(Box::new(change), stored.sequence)
        } else if change.erases() {
            Then::Erase(Box::new(change), stored.sequence)
        } else {
            Then::Nothing
        };
        Ok(Prepared {
            recipients,
            event_id,
            frame: frame.to_json().into(),
            headers,
            then,
        })
    }

    /// A conversation's members: a DM's two users, a group's members.
    async fn members(&self, conversation: &ConversationId) -> Result<Vec<UserId>, RouteError> {
        match self.groups.of_conversation(conversation).await {
            Ok(members) => Ok(members),
            Err(e) if e.code == ErrorCode::NotFound => match conversation {
                ConversationId::Group(group) => Err(RouteError::UnknownGroup(group.clone())),
                ConversationId::Dm { .. } => Err(RouteError::Members(e)),
            },
            Err(e) => Err(RouteError::Members(e)),
        }
    }

    async fn route_group_event(&self, payload: &[u8]) -> Result<(), RouteError> {
        let event: GroupEvent =
            serde_json::from_slice(payload).map_err(RouteError::MalformedGroupEvent)?;
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
        Ok(self
            .inbox
            .append(recipients, event_id, frame, headers)
            .await?)
    }
}

/// A MESSAGES event ready to append.
struct Prepared {
    recipients: Vec<UserId>,
    event_id: String,
    frame: Bytes,
    /// Headers every copy carries.
    headers: HeaderMap,
    then: Then,
}

/// What is done once an event is in every inbox.
enum Then {
    /// A message: push jobs for the members offline.
    Push(Box<MessageEvent>),
    /// A delete for everyone (with its MESSAGES sequence): erase the text.
    Erase(Box<ChangeEvent>, Option<u64>),
    /// An edit of a message erased before it was routed: erase it too.
    EraseLateEdit(Box<ChangeEvent>, Option<u64>),
    Nothing,
}

/// A stored event as a delivery or a read-back gives it.
#[derive(Clone, Copy)]
struct Stored<'a> {
    subject: &'a str,
    payload: &'a [u8],
    headers: Option<&'a HeaderMap>,
    sequence: Option<u64>,
}

impl<'a> Stored<'a> {
    fn of(message: &'a jetstream::Message) -> Self {
        Self {
            subject: message.subject.as_str(),
            payload: &message.payload,
            headers: message.headers.as_ref(),
            sequence: message.info().ok().map(|info| info.stream_sequence),
        }
    }
}

/// A MESSAGES event whose appends are on their way.
struct InFlight {
    message: jetstream::Message,
    prepared: Prepared,
    appending: Appending,
    trace: Option<TraceId>,
}

fn route_span(source: Source, trace: Option<TraceId>) -> tracing::Span {
    tracing::info_span!(
        "route",
        stream = source.family(),
        partition = source.partition(),
        trace_id = trace.map(tracing::field::display)
    )
}

/// Hands an event back at shutdown so the next router gets it at once
/// rather than after the ack wait.
async fn release(message: &jetstream::Message) {
    let _ = message
        .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
        .await;
}

/// The shutdown signal as lanes and retry loops see it.
#[derive(Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits out `backoff`'s next delay; `true` (at once) if the router is
    /// stopping, so a retry loop ends instead of holding shutdown up.
    async fn wait(&self, backoff: &mut Backoff) -> bool {
        let mut stop = self.0.clone();
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => true,
            _ = backoff.wait() => self.is_set(),
        }
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
/// pull loop (which runs them one at a time). Read at start, waiting while
/// JetStream cannot answer (a node down or paused).
async fn sequence_of(
    router: &Fanout,
    source: Source,
    consumer: &PullConsumer,
) -> Arc<Mutex<Sequence>> {
    let what = format!("the {} stream and consumer", source.stream());
    let (stream, ack_floor, first) = consume::until_ready(&what, || async {
        let stream = router.js.get_stream_no_info(source.stream()).await?;
        let mut consumer = consumer.clone();
        let ack_floor = consumer.info().await?.ack_floor.stream_sequence;
        let first = router
            .js
            .get_stream(source.stream())
            .await?
            .cached_info()
            .state
            .first_sequence;
        Ok::<_, async_nats::Error>((stream, ack_floor, first))
    })
    .await;
    Arc::new(Mutex::new(Sequence::new(stream, ack_floor, first)))
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

/// Pulls one partition of MESSAGES (as the pinned client of the router
/// priority group on that partition's consumer) and spreads events over
/// the lanes by conversation. On shutdown it stops pulling, lets each lane
/// finish what it has in flight and hand back what it has not started, and
/// waits for them at most `grace`.
pub async fn consume_messages(
    router: Arc<Fanout>,
    partition: Partition,
    consumer: PullConsumer,
    stop: watch::Receiver<bool>,
    grace: Duration,
) -> Result<(), StartError> {
    let source = Source::Messages(partition);
    let sequence = sequence_of(&router, source, &consumer).await;
    let mut tasks = tokio::task::JoinSet::new();
    let lanes: Arc<Vec<mpsc::Sender<Work>>> = Arc::new(
        (0..LANES)
            .map(|_| {
                let (tx, rx) = mpsc::channel::<Work>(LANE_QUEUE);
                tasks.spawn(lane(router.clone(), source, rx, Stop(stop.clone())));
                tx
            })
            .collect(),
    );
    let pulled = pull(consumer, stop, {
        let lanes = lanes.clone();
        move |message| {
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
        }
    })
    .await;
    // Closing the queues ends each lane once it has emptied its own.
    drop(lanes);
    let joined =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if joined.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "lanes still busy after the shutdown grace; their events return by redelivery"
        );
    }
    pulled
}

/// One lane: starts its events in order, up to [`LANE_WINDOW`] with appends
/// on their way, and completes them in the same order. An event that must
/// be retried (its members could not be read, an append failed) is retried
/// in place with nothing later completed meanwhile, so a conversation's
/// events enter every inbox in stream order. Once the router stops, what
/// is in flight is finished and what is queued is handed back; after one
/// event is handed back, every later one is too (acking a later one would
/// let the next router append it first).
async fn lane(router: Arc<Fanout>, source: Source, mut queue: mpsc::Receiver<Work>, stop: Stop) {
    let mut lane = Lane {
        router,
        source,
        stop,
        order: Order::default(),
        in_flight: VecDeque::new(),
        handed_back: false,
    };
    loop {
        let next = tokio::select! {
            biased;
            appended = oldest(&mut lane.in_flight) => {
                lane.finish_oldest(appended).await;
                continue;
            }
            next = queue.recv(), if lane.in_flight.len() < LANE_WINDOW => next,
        };
        let Some(work) = next else { break };
        lane.handle(work).await;
    }
    lane.finish_all().await;
}

struct Lane {
    router: Arc<Fanout>,
    /// The MESSAGES partition it routes.
    source: Source,
    stop: Stop,
    order: Order,
    in_flight: VecDeque<InFlight>,
    /// An event was handed back unrouted (shutdown).
    handed_back: bool,
}

impl Lane {
    async fn handle(&mut self, work: Work) {
        if self.stop.is_set() || self.handed_back {
            if let Work::Delivered(message) = work {
                release(&message).await;
            }
            self.handed_back = true;
            return;
        }
        match work {
            Work::Delivered(message) => match self
                .router
                .start(self.source, message, &mut self.order)
                .await
            {
                Ok(Some(event)) => self.in_flight.push_back(event),
                Ok(None) => {}
                Err(message) => {
                    self.finish_all().await;
                    if self.handed_back {
                        release(&message).await;
                    } else {
                        self.handed_back =
                            !self.router.settle(self.source, message, &self.stop).await;
                    }
                }
            },
            Work::Recovered(event) => {
                self.finish_all().await;
                if !self.handed_back {
                    self.handed_back = !self
                        .router
                        .settle_recovered(self.source, event, &self.stop)
                        .await;
                }
            }
        }
    }

    async fn finish_oldest(&mut self, appended: bool) {
        let Some(event) = self.in_flight.pop_front() else {
            return;
        };
        if self.handed_back {
            release(&event.message).await;
        } else {
            self.handed_back = !self
                .router
                .finish(self.source, event, appended, &self.stop)
                .await;
        }
        if self.in_flight.is_empty() {
            self.order.clear();
        } else {
            self.order.forget_stored();
        }
    }

    async fn finish_all(&mut self) {
        while let Some(front) = self.in_flight.front_mut() {
            let appended = front.appending.wait().await.is_ok();
            self.finish_oldest(appended).await;
        }
    }
}

/// Whether the oldest event in flight got all its appends through; pending
/// forever when nothing is in flight.
async fn oldest(in_flight: &mut VecDeque<InFlight>) -> bool {
    match in_flight.front_mut() {
        Some(event) => event.appending.wait().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Pulls EVENTS in one lane: membership changes are few and must stay ordered.
pub async fn consume_events(
    router: Arc<Fanout>,
    consumer: PullConsumer,
    stop: watch::Receiver<bool>,
) -> Result<(), StartError> {
    let sequence = sequence_of(&router, Source::Events, &consumer).await;
    let halt = Stop(stop.clone());
    pull(consumer, stop, |message| {
        let (router, sequence, halt) = (router.clone(), sequence.clone(), halt.clone());
        async move {
            for event in missing_before(&sequence, &message).await {
                if !router.settle_recovered(Source::Events, event, &halt).await {
                    release(&message).await;
                    return false;
                }
            }
            // Handed back at shutdown: nothing after it may be routed first.
            router.settle(Source::Events, message, &halt).await
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
