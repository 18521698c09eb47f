//! The request/reply service on `chat.rpc.*` (queue group `persister`).

mod changes;
mod friends;
mod groups;
mod media;
mod outbox;
mod pages;
mod privacy;
mod profiles;
mod push_tokens;
mod receipts;
mod search;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use chat_shared::config::PushTokenLimits;
use chat_shared::idgen::{first_id_at, timestamp_ms};
use chat_shared::ids::{ClientMsgId, ConversationId, MessageId, UserId};
use chat_shared::receipts::ReadEvent;
use chat_shared::rpc::{self, Method, RpcError};
use chat_shared::shutdown;
use chat_shared::subjects;
use chat_shared::telemetry::TraceId;
use chat_shared::wire::{ErrorCode, MessageEvent};
use deadpool_postgres::{GenericClient, Pool};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Semaphore};

use crate::metrics::{PersisterMetrics, UNKNOWN_METHOD};
use crate::shards::Shards;
use crate::user_index::{self, Touched};
pub use changes::ChangeRules;

/// Requests handled at once by one persister.
const MAX_IN_FLIGHT: usize = 64;
const MAX_GROUP_NAME_CHARS: usize = 200;
/// How long a group change's reply waits for its event to be published.
const OUTBOX_WAIT: Duration = Duration::from_millis(500);
/// How far a read's `up_to` may be ahead of this persister's clock: an id
/// carries the clock of the edge that made it, which may run a little ahead.
const READ_CLOCK_SKEW_MS: u64 = 2_000;
/// How often the outbox is drained regardless: at start (a crash between
/// COMMIT and publish) and then for events whose publish failed.
const OUTBOX_RETRY: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Service {
    shards: Shards,
    nats: async_nats::Client,
    js: jetstream::Context,
    max_group_members: usize,
    push_tokens: PushTokenLimits,
    rules: ChangeRules,
    /// Which devices hold a push token, for the router (push_tokens.rs).
    push_devices: jetstream::kv::Store,
    /// One outbox drain at a time in this process.
    outbox: Arc<tokio::sync::Mutex<()>>,
    metrics: Arc<PersisterMetrics>,
}

fn now_ms() -> i64 {
    i64::try_from(chat_shared::clock::now_ms()).unwrap_or(i64::MAX)
}

/// A wall-clock time in message-id space, to order groups without messages
/// among conversations by their newest message id.
fn activity_of(ms: i64) -> i64 {
    first_id_at(ms.max(0) as u64).get() as i64
}

/// Maps a PostgreSQL failure to `unavailable`, logging `what` failed; the
/// client learns only that the store is away.
fn unavailable<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> RpcError {
    move |e| {
        tracing::warn!(error = %e, what, "database error");
        RpcError::new(
            ErrorCode::Unavailable,
            "history store unavailable, retry later",
        )
    }
}

/// Column `index` of `row`: a type the code does not expect (a schema out
/// of step) is `internal` for that request, never a panic.
fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    index: usize,
) -> Result<T, RpcError> {
    row.try_get(index).map_err(|e| {
        tracing::error!(error = %e, index, "unexpected column");
        corrupt("row")
    })
}

/// A transaction on `db`.
async fn begin(
    db: &mut deadpool_postgres::Object,
) -> Result<deadpool_postgres::Transaction<'_>, RpcError> {
    db.transaction()
        .await
        .map_err(unavailable("begin a transaction"))
}

async fn connect(pool: &Pool) -> Result<deadpool_postgres::Object, RpcError> {
    pool.get().await.map_err(unavailable("get a connection"))
}

fn corrupt(what: &str) -> RpcError {
    RpcError::new(ErrorCode::Internal, format!("stored {what} is invalid"))
}

pub async fn serve(service: Service, stop: watch::Receiver<bool>) {
    let mut requests = match service
        .nats
        .queue_subscribe(subjects::ALL_RPC, subjects::PERSISTER_QUEUE.into())
        .await
    {
        Ok(subscriber) => subscriber,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve requests");
            return;
        }
    };
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let stopped = shutdown::wait(stop);
    tokio::pin!(stopped);
    let mut outbox_retry = tokio::time::interval(OUTBOX_RETRY);
    loop {
        let request = tokio::select! {
            _ = &mut stopped => break,
            _ = outbox_retry.tick() => {
                let service = service.clone();
                tokio::spawn(async move { service.publish_outbox().await });
                continue;
            }
            request = requests.next() => match request { Some(r) => r, None => break },
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let service = service.clone();
        tokio::spawn(async move {
            let Some(reply_to) = request.reply.clone() else {
                return;
            };
            let method = request
                .subject
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_string();
            let trace = TraceId::from_headers(request.headers.as_ref());
            let body = service.dispatch(&method, trace, &request.payload).await;
            if let Err(e) = service.nats.publish(reply_to, body.into()).await {
                tracing::warn!(error = %e, "cannot reply");
            }
            drop(permit);
        });
    }
}

/// The request, or `bad_request`; the parser's words stay in our log.
fn parse<T: DeserializeOwned>(payload: &[u8]) -> Result<T, RpcError> {
    serde_json::from_slice(payload).map_err(|e| {
        tracing::warn!(error = %e, "malformed request");
        RpcError::new(ErrorCode::BadRequest, "malformed request")
    })
}

/// Who is asking, for the request's span: every request but the backend's
/// `members` names its user.
#[derive(serde::Deserialize)]
struct Caller {
    user: Option<UserId>,
}

/// The settings the requests are answered by.
pub struct Policy {
    pub max_group_members: usize,
    pub push_tokens: PushTokenLimits,
    pub changes: ChangeRules,
}

impl Service {
    pub fn new(
        shards: Shards,
        nats: async_nats::Client,
        js: jetstream::Context,
        policy: Policy,
        push_devices: jetstream::kv::Store,
        metrics: Arc<PersisterMetrics>,
    ) -> Self {
        let Policy {
            max_group_members,
            push_tokens,
            changes: rules,
        } = policy;
        Self {
            shards,
            nats,
            js,
            max_group_members,
            push_tokens,
            rules,
            push_devices,
            outbox: Arc::default(),
            metrics,
        }
    }

    /// Answers one request, counting it by method and outcome.
    #[tracing::instrument(skip_all, fields(method, user, trace_id))]
    async fn dispatch(&self, method: &str, trace: Option<TraceId>, payload: &[u8]) -> Vec<u8> {
        let span = tracing::Span::current();
        span.record("method", method);
        if let Some(trace) = trace {
            span.record("trace_id", tracing::field::display(trace));
        }
        if let Ok(Caller { user: Some(user) }) = serde_json::from_slice(payload) {
            span.record("user", tracing::field::display(user));
        }
        let started = Instant::now();
        macro_rules! route {
            ($($m:ty => $handler:ident),* $(,)?) => {
                match method {
                    $(<$m>::NAME => {
                        let result = match parse(payload) {
                            Ok(request) => self.$handler(request).await,
                            Err(e) => Err(e),
                        };
                        self.metrics.rpc_answered(<$m>::NAME, &result, started.elapsed());
                        rpc::encode_reply(result)
                    })*
                    other => {
                        let result = Err(RpcError::new(ErrorCode::NotFound, format!("no method {other}")));
                        self.metrics.rpc_answered(UNKNOWN_METHOD, &result, started.elapsed());
                        rpc::encode_reply::<()>(result)
                    }
                }
            };
        }
        route!(
            rpc::History => history,
            rpc::Conversations => conversations,
            rpc::GroupCreate => group_create,
            rpc::GroupAdd => group_add,
            rpc::GroupRemove => group_remove,
            rpc::GroupLeave => group_leave,
            rpc::GroupInfo => group_info,
            rpc::Members => members,
            rpc::Read => read,
            rpc::Receipts => receipts,
            rpc::FriendAsk => friend_request,
            rpc::FriendAccept => friend_accept,
            rpc::FriendRemove => friend_remove,
            rpc::FriendList => friend_list,
            rpc::FriendsOf => friends_of,
            rpc::PushRegister => push_register,
            rpc::PushUnregister => push_unregister,
            rpc::CheckChange => change_check,
            rpc::Block => block,
            rpc::Unblock => unblock,
            rpc::BlockList => blocked,
            rpc::BlockPeers => block_peers,
            rpc::Mute => mute,
            rpc::Settings => settings,
            rpc::Search => search,
            rpc::ProfileSet => profile_set,
            rpc::Profiles => profiles,
            rpc::MediaStored => media_stored,
            rpc::MediaAccess => media_access,
        )
    }

    /// A connection to the home shard (shard 0): the social tables.
    async fn client(&self) -> Result<deadpool_postgres::Object, RpcError> {
        connect(self.shards.home()).await
    }

    /// A connection to the shard of `conversation`'s rows.
    async fn conversation_db(
        &self,
        conversation: &ConversationId,
    ) -> Result<deadpool_postgres::Object, RpcError> {
        connect(self.shards.conversation(conversation)).await
    }

    /// A connection to the shard of `user`'s rows.
    async fn user_db(&self, user: &UserId) -> Result<deadpool_postgres::Object, RpcError> {
        connect(self.shards.user(user)).await
    }

    /// Brings unread counters up to date after a change; `unavailable` if
    /// PostgreSQL is away (the change stays; a retry settles it).
    async fn settle(&self, touched: &Touched) -> Result<(), RpcError> {
        user_index::settle(&self.shards, touched)
            .await
            .map_err(unavailable("settle unread counters"))
    }

    /// Members only: a DM's two users, a group's current members.
    async fn check_access(
        &self,
        db: &impl GenericClient,
        user: &UserId,
        conversation: &ConversationId,
    ) -> Result<(), RpcError> {
        match conversation {
            ConversationId::Dm { .. } if conversation.is_dm_party(user) => Ok(()),
            ConversationId::Dm { .. } => {
                Err(RpcError::new(ErrorCode::Forbidden, "not your conversation"))
            }
            ConversationId::Group(group) => {
                let member = db
                    .query_opt(
                        "SELECT 1 FROM group_members WHERE group_id = $1 AND user_id = $2",
                        &[&group.as_str(), &user.as_str()],
                    )
                    .await
                    .map_err(unavailable("read group_members"))?;
                match member {
                    Some(_) => Ok(()),
                    None => Err(RpcError::new(
                        ErrorCode::Forbidden,
                        "not a member of this group",
                    )),
                }
            }
        }
    }

    /// Stores a read and publishes its receipt event (stream RECEIPTS; the
    /// router fans it out to every member's devices, the reader's too).
    async fn read(&self, request: rpc::ReadRequest) -> Result<(), RpcError> {
        // Nobody reads past what has been sent: an `up_to` from the future
        // would hide messages not sent yet. The bound is the clock, not the
        // newest stored message: delivery runs ahead of this process's
        // writer, so a device that read a message it had just received live
        // would lose its read (and stay unread on every device).
        if not_sent_yet(request.up_to, chat_shared::clock::now_ms()) {
            return Err(RpcError::new(
                ErrorCode::BadRequest,
                "up_to is not a message id yet",
            ));
        }
        let up_to = i64::try_from(request.up_to.get())
            .map_err(|_| RpcError::new(ErrorCode::BadRequest, "up_to is not a message id"))?;
        let members = self
            .members_of(&request.user, &request.conversation)
            .await?;
        // Stored whether or not the conversation's messages are yet: they
        // are counted against it once they are.
        let mut db = self.user_db(&request.user).await?;
        let tx = begin(&mut db).await?;
        crate::shards::fence(&tx, [chat_shared::shards::of_user(&request.user)])
            .await
            .map_err(unavailable("fence read_state"))?;
        let row = tx
            .query_one(
                "INSERT INTO read_state (user_id, conversation, read_up_to) VALUES ($1, $2, $3)
                 ON CONFLICT (user_id, conversation)
                 DO UPDATE SET read_up_to = GREATEST(read_state.read_up_to, EXCLUDED.read_up_to)
                 RETURNING read_up_to",
                &[
                    &request.user.as_str(),
                    &request.conversation.to_string(),
                    &up_to,
                ],
            )
            .await
            .map_err(unavailable("upsert read_state"))?;
        tx.commit()
            .await
            .map_err(unavailable("commit read_state"))?;
        let stored: i64 = column(&row, 0)?;
        if stored != up_to {
            // Read state only moves forward; an older `read` says nothing new.
            return Ok(());
        }
        // The unread counter is counted again from the new mark (also for a
        // repeated `read`: one that failed here settles now).
        let mut touched = Touched::default();
        touched.recount(&request.conversation, &request.user);
        self.settle(&touched).await?;
        // Who may see it (blocks, `read_receipts`) is decided here, where
        // the settings are; the router tells exactly these members.
        // Published for a repeated `read` too, under the same
        // `Nats-Msg-Id`: a client that retries after `unavailable` (the
        // read stored, its event not) gets its receipt out, and JetStream
        // drops the copy otherwise.
        let audience = self
            .read_receipt_audience(&self.client().await?, &request.user, members)
            .await?;
        self.publish_read(ReadEvent {
            conversation: request.conversation,
            user: request.user,
            up_to: request.up_to,
            audience: Some(audience),
        })
        .await
    }

    async fn conversation_members(
        &self,
        db: &impl GenericClient,
        conversation: &ConversationId,
    ) -> Result<Vec<UserId>, RpcError> {
        match conversation {
            ConversationId::Dm { low, high } => Ok(vec![low.clone(), high.clone()]),
            ConversationId::Group(group) => self.group_members(db, group).await,
        }
    }

    /// [`Service::members_with`] on the conversation's shard.
    async fn members_of(
        &self,
        user: &UserId,
        conversation: &ConversationId,
    ) -> Result<Vec<UserId>, RpcError> {
        let db = self.conversation_db(conversation).await?;
        self.members_with(&db, user, conversation).await
    }

    /// The members of `conversation`, if `user` is one (else `forbidden`,
    /// as [`Service::check_access`]): one read for the check and the list.
    async fn members_with(
        &self,
        db: &impl GenericClient,
        user: &UserId,
        conversation: &ConversationId,
    ) -> Result<Vec<UserId>, RpcError> {
        let members = self.conversation_members(db, conversation).await?;
        match conversation {
            _ if members.contains(user) => Ok(members),
            ConversationId::Dm { .. } => {
                Err(RpcError::new(ErrorCode::Forbidden, "not your conversation"))
            }
            ConversationId::Group(_) => Err(RpcError::new(
                ErrorCode::Forbidden,
                "not a member of this group",
            )),
        }
    }
}

/// Whether `id`'s time is beyond `now_ms` by more than the clock skew
/// edges may have: no message with that id can have been sent yet.
fn not_sent_yet(id: MessageId, now_ms: u64) -> bool {
    timestamp_ms(id) > now_ms.saturating_add(READ_CLOCK_SKEW_MS)
}

fn message_from_row(
    conversation: ConversationId,
    id: i64,
    sender: String,
    body: String,
    ts: i64,
    client_msg_id: String,
) -> Result<MessageEvent, RpcError> {
    Ok(MessageEvent::sent(
        MessageId(id as u64),
        conversation,
        UserId::parse(sender).map_err(|_| corrupt("sender"))?,
        body,
        ts as u64,
        ClientMsgId::parse(client_msg_id).map_err(|_| corrupt("client_msg_id"))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_shared::idgen::EPOCH_MS;

    #[test]
    fn a_read_may_name_any_id_up_to_the_clock_and_its_skew() {
        let now = EPOCH_MS + 1_000_000;
        let id_at = |ms: u64| MessageId(first_id_at(ms).get() | 0x3f_ffff);
        assert!(!not_sent_yet(id_at(EPOCH_MS), now));
        assert!(!not_sent_yet(id_at(now), now));
        assert!(!not_sent_yet(id_at(now + READ_CLOCK_SKEW_MS), now));
        assert!(not_sent_yet(id_at(now + READ_CLOCK_SKEW_MS + 1), now));
        assert!(not_sent_yet(MessageId(u64::MAX), now));
    }
}
