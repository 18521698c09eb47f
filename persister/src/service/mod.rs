//! The request/reply service on `chat.rpc.*` (queue group `persister`).

mod friends;
mod pages;
mod push_tokens;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::HeaderMap;
use chat_shared::config::PushTokenLimits;
use chat_shared::idgen::{EPOCH_MS, NODE_BITS, SEQUENCE_BITS};
use chat_shared::ids::{ClientMsgId, ConversationId, GroupId, MessageId, UserId};
use chat_shared::rpc::{self, Method, RpcError};
use chat_shared::shutdown;
use chat_shared::subjects;
use chat_shared::wire::{
    ErrorCode, GroupEvent, GroupView, MembershipChange, MessageEvent, ReceiptKind, ServerFrame,
};
use deadpool_postgres::{GenericClient, Pool};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Semaphore};

use crate::metrics::{PersisterMetrics, UNKNOWN_METHOD};

/// Requests handled at once by one persister.
const MAX_IN_FLIGHT: usize = 64;
const MAX_GROUP_NAME_CHARS: usize = 200;
/// How long a group change's reply waits for its event to be published.
const OUTBOX_WAIT: Duration = Duration::from_millis(500);
/// How often the outbox is drained regardless: at start (a crash between
/// COMMIT and publish) and then for events whose publish failed.
const OUTBOX_RETRY: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Service {
    pool: Pool,
    nats: async_nats::Client,
    js: jetstream::Context,
    max_group_members: usize,
    push_tokens: PushTokenLimits,
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
    (ms - EPOCH_MS as i64).max(0) << ID_TIME_SHIFT
}

/// Where the timestamp sits in a message id.
const ID_TIME_SHIFT: u32 = NODE_BITS + SEQUENCE_BITS;

fn unavailable(e: impl std::fmt::Display) -> RpcError {
    tracing::warn!(error = %e, "database error");
    RpcError::new(
        ErrorCode::Unavailable,
        "history store unavailable, retry later",
    )
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
            let body = service.dispatch(&method, &request.payload).await;
            if let Err(e) = service.nats.publish(reply_to, body.into()).await {
                tracing::warn!(error = %e, "cannot reply");
            }
            drop(permit);
        });
    }
}

fn parse<T: DeserializeOwned>(payload: &[u8]) -> Result<T, RpcError> {
    serde_json::from_slice(payload).map_err(|e| RpcError::new(ErrorCode::BadRequest, e.to_string()))
}

impl Service {
    pub fn new(
        pool: Pool,
        nats: async_nats::Client,
        js: jetstream::Context,
        max_group_members: usize,
        push_tokens: PushTokenLimits,
        metrics: Arc<PersisterMetrics>,
    ) -> Self {
        Self {
            pool,
            nats,
            js,
            max_group_members,
            push_tokens,
            outbox: Arc::default(),
            metrics,
        }
    }

    /// Answers one request, counting it by method and outcome.
    async fn dispatch(&self, method: &str, payload: &[u8]) -> Vec<u8> {
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
            rpc::FriendAsk => friend_request,
            rpc::FriendAccept => friend_accept,
            rpc::FriendRemove => friend_remove,
            rpc::FriendList => friend_list,
            rpc::FriendsOf => friends_of,
            rpc::PushRegister => push_register,
            rpc::PushUnregister => push_unregister,
        )
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, RpcError> {
        self.pool.get().await.map_err(unavailable)
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
                    .map_err(unavailable)?;
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

    async fn read(&self, request: rpc::ReadRequest) -> Result<(), RpcError> {
        let mut db = self.client().await?;
        self.check_access(&db, &request.user, &request.conversation)
            .await?;
        let tx = db.transaction().await.map_err(unavailable)?;
        // Nobody reads past the newest message: a larger `up_to` would hide
        // messages not sent yet.
        let newest: Option<i64> = tx
            .query_opt(
                "SELECT last_id FROM conversations WHERE conversation = $1",
                &[&request.conversation.to_string()],
            )
            .await
            .map_err(unavailable)?
            .and_then(|row| row.get(0));
        let Some(newest) = newest else {
            return Ok(());
        };
        let up_to = (request.up_to.get().min(i64::MAX as u64) as i64).min(newest);
        let moved = tx
            .execute(
                "INSERT INTO read_state (user_id, conversation, read_up_to) VALUES ($1, $2, $3)
                 ON CONFLICT (user_id, conversation) DO UPDATE SET read_up_to = EXCLUDED.read_up_to
                 WHERE read_state.read_up_to < EXCLUDED.read_up_to",
                &[
                    &request.user.as_str(),
                    &request.conversation.to_string(),
                    &up_to,
                ],
            )
            .await
            .map_err(unavailable)?;
        let members = self
            .conversation_members(&tx, &request.conversation)
            .await?;
        tx.commit().await.map_err(unavailable)?;
        if moved == 0 {
            // Read state only moves forward; an older `read` says nothing new.
            return Ok(());
        }
        let receipt = ServerFrame::Receipt {
            conversation: request.conversation,
            user: request.user,
            kind: ReceiptKind::Read,
            up_to: MessageId(up_to as u64),
        }
        .to_json();
        for member in members {
            let _ = self
                .nats
                .publish(subjects::deliver(&member), receipt.clone().into())
                .await;
        }
        Ok(())
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

    async fn group_members(
        &self,
        db: &impl GenericClient,
        group: &GroupId,
    ) -> Result<Vec<UserId>, RpcError> {
        let rows = db
            .query(
                "SELECT user_id FROM group_members WHERE group_id = $1 ORDER BY joined_at, user_id",
                &[&group.as_str()],
            )
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|row| UserId::parse(row.get::<_, String>(0)).map_err(|_| corrupt("member")))
            .collect()
    }

    /// The group's row, or `not_found`.
    async fn group_row(
        &self,
        db: &impl GenericClient,
        group: &GroupId,
        lock: bool,
    ) -> Result<(String, UserId), RpcError> {
        let sql = if lock {
            "SELECT name, owner FROM groups WHERE id = $1 FOR UPDATE"
        } else {
            "SELECT name, owner FROM groups WHERE id = $1"
        };
        let row = db
            .query_opt(sql, &[&group.as_str()])
            .await
            .map_err(unavailable)?
            .ok_or_else(|| RpcError::new(ErrorCode::NotFound, "no such group"))?;
        let owner = UserId::parse(row.get::<_, String>(1)).map_err(|_| corrupt("owner"))?;
        Ok((row.get(0), owner))
    }

    async fn members(&self, request: rpc::MembersRequest) -> Result<Vec<UserId>, RpcError> {
        let db = self.client().await?;
        self.group_row(&db, &request.group, false).await?;
        self.group_members(&db, &request.group).await
    }

    async fn group_info(&self, request: rpc::GroupRequest) -> Result<GroupView, RpcError> {
        let db = self.client().await?;
        let (name, owner) = self.group_row(&db, &request.group, false).await?;
        let members = self.group_members(&db, &request.group).await?;
        if !members.contains(&request.user) {
            return Err(RpcError::new(
                ErrorCode::Forbidden,
                "not a member of this group",
            ));
        }
        Ok(GroupView {
            id: request.group,
            name,
            owner,
            members,
        })
    }

    async fn group_create(&self, request: rpc::GroupCreateRequest) -> Result<GroupView, RpcError> {
        let name = request.name.trim().to_string();
        if name.is_empty() || name.chars().count() > MAX_GROUP_NAME_CHARS || name.contains('\0') {
            return Err(RpcError::new(
                ErrorCode::BadRequest,
                "a group name has 1 to 200 characters and no NUL",
            ));
        }
        let members = self.distinct_members(
            std::iter::once(request.user.clone()).chain(request.members),
            &HashSet::new(),
            self.max_group_members,
        )?;
        let group = GroupId::parse(format!("g{:016x}", rand::random::<u64>()))
            .map_err(|_| corrupt("group id"))?;
        let now = now_ms();
        let mut db = self.client().await?;
        let tx = db.transaction().await.map_err(unavailable)?;
        tx.execute(
            "INSERT INTO groups (id, name, owner, created_at) VALUES ($1, $2, $3, $4)",
            &[&group.as_str(), &name, &request.user.as_str(), &now],
        )
        .await
        .map_err(unavailable)?;
        let ids: Vec<&str> = members.iter().map(UserId::as_str).collect();
        tx.execute(
            "INSERT INTO group_members (group_id, user_id, joined_at) SELECT $1, u, $2 FROM UNNEST($3::text[]) AS u",
            &[&group.as_str(), &now, &ids],
        )
        .await
        .map_err(unavailable)?;
        tx.execute(
            "INSERT INTO conversations (conversation, last_id, activity) VALUES ($1, NULL, $2)",
            &[
                &ConversationId::Group(group.clone()).to_string(),
                &activity_of(now),
            ],
        )
        .await
        .map_err(unavailable)?;
        self.record_event(
            &tx,
            &group,
            MembershipChange::Created,
            members.clone(),
            &request.user,
            members.clone(),
        )
        .await?;
        tx.commit().await.map_err(unavailable)?;
        self.publish_outbox_after_change().await;
        Ok(GroupView {
            id: group,
            name,
            owner: request.user,
            members,
        })
    }

    /// `users` without repeats and without those in `except`, refused as
    /// `too_large` once more than `room` remain (checked as it goes, so a
    /// huge list costs no more than `room` entries).
    fn distinct_members(
        &self,
        users: impl IntoIterator<Item = UserId>,
        except: &HashSet<&UserId>,
        room: usize,
    ) -> Result<Vec<UserId>, RpcError> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for user in users {
            if except.contains(&user) || !seen.insert(user.clone()) {
                continue;
            }
            if out.len() == room {
                return Err(RpcError::new(
                    ErrorCode::TooLarge,
                    format!("a group holds at most {} members", self.max_group_members),
                ));
            }
            out.push(user);
        }
        Ok(out)
    }

    async fn group_add(&self, request: rpc::GroupChangeRequest) -> Result<GroupView, RpcError> {
        self.change_members(request, MembershipChange::Added).await
    }

    async fn group_remove(&self, request: rpc::GroupChangeRequest) -> Result<GroupView, RpcError> {
        self.change_members(request, MembershipChange::Removed)
            .await
    }

    /// Owner-only add/remove.
    async fn change_members(
        &self,
        request: rpc::GroupChangeRequest,
        change: MembershipChange,
    ) -> Result<GroupView, RpcError> {
        if request.users.is_empty() {
            return Err(RpcError::new(
                ErrorCode::BadRequest,
                "users must not be empty",
            ));
        }
        let mut db = self.client().await?;
        let tx = db.transaction().await.map_err(unavailable)?;
        let (name, owner) = self.group_row(&tx, &request.group, true).await?;
        let before = self.group_members(&tx, &request.group).await?;
        let before_set: HashSet<&UserId> = before.iter().collect();
        if !before_set.contains(&request.user) {
            return Err(RpcError::new(
                ErrorCode::Forbidden,
                "not a member of this group",
            ));
        }
        if owner != request.user {
            return Err(RpcError::new(
                ErrorCode::Forbidden,
                "only the owner changes members",
            ));
        }
        let affected: Vec<UserId> = match change {
            MembershipChange::Added => {
                let room = self.max_group_members.saturating_sub(before.len());
                let new =
                    self.distinct_members(request.users.iter().cloned(), &before_set, room)?;
                let ids: Vec<&str> = new.iter().map(UserId::as_str).collect();
                tx.execute(
                    "INSERT INTO group_members (group_id, user_id, joined_at) SELECT $1, u, $2 FROM UNNEST($3::text[]) AS u
                     ON CONFLICT DO NOTHING",
                    &[&request.group.as_str(), &now_ms(), &ids],
                )
                .await
                .map_err(unavailable)?;
                new
            }
            _ => {
                if request.users.contains(&owner) {
                    return Err(RpcError::new(
                        ErrorCode::BadRequest,
                        "the owner leaves with group.leave",
                    ));
                }
                let gone: Vec<UserId> = request
                    .users
                    .iter()
                    .filter(|u| before_set.contains(u))
                    .cloned()
                    .collect();
                let ids: Vec<&str> = gone.iter().map(UserId::as_str).collect();
                tx.execute(
                    "DELETE FROM group_members WHERE group_id = $1 AND user_id = ANY($2::text[])",
                    &[&request.group.as_str(), &ids],
                )
                .await
                .map_err(unavailable)?;
                gone
            }
        };
        let after = self.group_members(&tx, &request.group).await?;
        let changed = !affected.is_empty();
        if changed {
            self.record_event(
                &tx,
                &request.group,
                change,
                affected,
                &request.user,
                after.clone(),
            )
            .await?;
        }
        tx.commit().await.map_err(unavailable)?;
        if changed {
            self.publish_outbox_after_change().await;
        }
        Ok(GroupView {
            id: request.group,
            name,
            owner,
            members: after,
        })
    }

    async fn group_leave(&self, request: rpc::GroupRequest) -> Result<(), RpcError> {
        let mut db = self.client().await?;
        let tx = db.transaction().await.map_err(unavailable)?;
        let (_, owner) = self.group_row(&tx, &request.group, true).await?;
        let removed = tx
            .execute(
                "DELETE FROM group_members WHERE group_id = $1 AND user_id = $2",
                &[&request.group.as_str(), &request.user.as_str()],
            )
            .await
            .map_err(unavailable)?;
        if removed == 0 {
            return Err(RpcError::new(
                ErrorCode::Forbidden,
                "not a member of this group",
            ));
        }
        let after = self.group_members(&tx, &request.group).await?;
        if owner == request.user {
            // Ownership passes to the longest-standing member.
            if let Some(heir) = after.first() {
                tx.execute(
                    "UPDATE groups SET owner = $2 WHERE id = $1",
                    &[&request.group.as_str(), &heir.as_str()],
                )
                .await
                .map_err(unavailable)?;
            }
        }
        self.record_event(
            &tx,
            &request.group,
            MembershipChange::Left,
            vec![request.user.clone()],
            &request.user,
            after,
        )
        .await?;
        tx.commit().await.map_err(unavailable)?;
        self.publish_outbox_after_change().await;
        Ok(())
    }

    /// Writes a membership event into the outbox inside the change's
    /// transaction; [`Service::publish_outbox`] publishes it after COMMIT.
    async fn record_event(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        group: &GroupId,
        change: MembershipChange,
        users: Vec<UserId>,
        by: &UserId,
        members: Vec<UserId>,
    ) -> Result<(), RpcError> {
        let version: i64 = tx
            .query_one(
                "UPDATE groups SET version = version + 1 WHERE id = $1 RETURNING version",
                &[&group.as_str()],
            )
            .await
            .map_err(unavailable)?
            .get(0);
        let event = GroupEvent {
            id: format!("{group}/{version}"),
            group: group.clone(),
            event: change,
            users,
            by: by.clone(),
            members,
            ts: now_ms() as u64,
        };
        let body = serde_json::to_vec(&event).map_err(|_| corrupt("event"))?;
        tx.execute(
            "INSERT INTO group_event_outbox (id, body) VALUES ($1, $2)",
            &[&event.id, &body],
        )
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn publish_raw(&self, id: &str, group: &GroupId, body: Vec<u8>) -> bool {
        let mut headers = HeaderMap::new();
        headers.insert(subjects::MSG_ID_HEADER, id);
        match self
            .js
            .publish_with_headers(subjects::group_event(group), headers, body.into())
            .await
        {
            Ok(ack) => match ack.await {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(error = %e, id, "group event not acknowledged; kept in the outbox");
                    false
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, id, "cannot publish group event; kept in the outbox");
                false
            }
        }
    }

    /// Publishes the outbox after a change, waiting a little so that caches
    /// are usually invalidated before the requester hears back, but never
    /// holding the reply hostage to a slow NATS: the drain goes on in the
    /// background (and the periodic drain retries what fails).
    async fn publish_outbox_after_change(&self) {
        let service = self.clone();
        let drain = tokio::spawn(async move { service.publish_outbox().await });
        let _ = tokio::time::timeout(OUTBOX_WAIT, drain).await;
    }

    /// Publishes every committed event still in the outbox, oldest first,
    /// removing each once JetStream has it; stops at the first failure so a
    /// group's events never overtake each other. Runs after every change and
    /// at start (for a crash between COMMIT and publish). Repeats are safe:
    /// the event id is the `Nats-Msg-Id`.
    async fn publish_outbox(&self) {
        let _one_at_a_time = self.outbox.lock().await;
        let Ok(db) = self.client().await else { return };
        let Ok(rows) = db
            .query("SELECT id, body FROM group_event_outbox ORDER BY seq", &[])
            .await
        else {
            return;
        };
        for row in rows {
            let (id, body): (String, Vec<u8>) = (row.get(0), row.get(1));
            let Some(group) = id.split_once('/').and_then(|(g, _)| GroupId::parse(g).ok()) else {
                tracing::error!(%id, "dropping an outbox event with a malformed id");
                let _ = db
                    .execute("DELETE FROM group_event_outbox WHERE id = $1", &[&id])
                    .await;
                continue;
            };
            if !self.publish_raw(&id, &group, body).await {
                return;
            }
            let _ = db
                .execute("DELETE FROM group_event_outbox WHERE id = $1", &[&id])
                .await;
        }
    }
}

fn message_from_row(
    conversation: ConversationId,
    id: i64,
    sender: String,
    body: String,
    ts: i64,
    client_msg_id: String,
) -> Result<MessageEvent, RpcError> {
    Ok(MessageEvent {
        id: MessageId(id as u64),
        conversation,
        from: UserId::parse(sender).map_err(|_| corrupt("sender"))?,
        text: body,
        ts: ts as u64,
        client_msg_id: ClientMsgId::parse(client_msg_id).map_err(|_| corrupt("client_msg_id"))?,
    })
}
