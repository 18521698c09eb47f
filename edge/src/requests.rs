//! Requests answered by the persister's request/reply service (history,
//! conversations, groups, read state). Each runs in its own task, at most
//! [`MAX_IN_FLIGHT`] per connection; replies carry the request's `ref`.
//! Changes of messages (`edit`, `delete`, `react`) are the exception: one
//! connection's are handled one at a time in the order sent, since each is
//! checked against the state the previous one left (a reaction given and
//! at once taken back must end taken back).

use std::sync::Arc;

use chat_shared::ids::{ConversationId, DeviceId, MessageId, UserId};
use chat_shared::rpc::{self, RpcError};
use std::collections::HashMap;

use chat_shared::presence::TypingEvent;
use chat_shared::subjects;
use chat_shared::wire::{
    ClientFrame, ErrorCode, ErrorFrame, FriendState, FriendView, PresenceEvent, PresenceStatus,
    ServerFrame, DEFAULT_SEARCH_LIMIT, MAX_QUERY_CHARS, MAX_SEARCH_LIMIT,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::change::{self, ChangeError};
use crate::quota::QuotaError;
use crate::send::SendError;

use crate::session::Outbox;
use crate::Edge;

const MAX_IN_FLIGHT: usize = 16;
/// What a refused request is told to wait.
const RETRY_AFTER_MS: u64 = 200;
const DEFAULT_HISTORY_LIMIT: u32 = 50;
const DEFAULT_CONVERSATIONS_LIMIT: u32 = 100;
/// The largest `limit` of `history` and `conversations`.
const MAX_PAGE_LIMIT: u32 = 200;

/// Why a request is answered with an error. [`RequestError::frame`] is the
/// one place it becomes what the client reads.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("limit must be 1..={MAX_PAGE_LIMIT}")]
    Limit,
    #[error("limit must be 1..={MAX_SEARCH_LIMIT}")]
    SearchLimit,
    #[error("query must be 1..={MAX_QUERY_CHARS} characters")]
    Query,
    /// The persister's (or the presence bucket's) answer, meant for clients.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// `typing` where the user may not write.
    #[error(transparent)]
    Send(#[from] SendError),
    #[error(transparent)]
    Quota(#[from] QuotaError),
    /// `edit`, `delete`, `react`.
    #[error(transparent)]
    Change(#[from] ChangeError),
    /// Our own frame did not encode; the client learns nothing more.
    #[error("cannot encode {0}")]
    Encode(&'static str, #[source] serde_json::Error),
}

impl RequestError {
    fn frame(&self, reference: Option<&str>) -> ServerFrame {
        match self {
            Self::Limit | Self::SearchLimit | Self::Query => {
                ServerFrame::error(reference, ErrorCode::BadRequest, self.to_string())
            }
            Self::Rpc(e) => ServerFrame::error(reference, e.code, e.message.clone()),
            Self::Send(e) => e.frame(reference),
            Self::Quota(e) => e.frame(reference),
            Self::Change(e) => e.frame(reference),
            Self::Encode(..) => {
                tracing::error!(error = %self, "request failed");
                ServerFrame::error(reference, ErrorCode::Internal, "internal error")
            }
        }
    }
}

/// `limit`, or the default, if it is 1..=[`MAX_PAGE_LIMIT`].
fn page_limit(limit: Option<u32>, default: u32) -> Result<u32, RequestError> {
    let limit = limit.unwrap_or(default);
    if (1..=MAX_PAGE_LIMIT).contains(&limit) {
        Ok(limit)
    } else {
        Err(RequestError::Limit)
    }
}

/// A `search` request for the persister, if its `query` and `limit` are in
/// bounds.
fn search_request(
    user: UserId,
    query: String,
    conversation: Option<ConversationId>,
    before: Option<MessageId>,
    limit: Option<u32>,
) -> Result<rpc::SearchRequest, RequestError> {
    let limit = limit.unwrap_or(DEFAULT_SEARCH_LIMIT);
    if !(1..=MAX_SEARCH_LIMIT).contains(&limit) {
        return Err(RequestError::SearchLimit);
    }
    let chars = query.chars().count();
    if chars == 0 || chars > MAX_QUERY_CHARS || query.trim().is_empty() {
        return Err(RequestError::Query);
    }
    Ok(rpc::SearchRequest {
        user,
        query,
        conversation,
        before,
        limit,
    })
}

pub struct Requests {
    edge: Arc<Edge>,
    user: UserId,
    device: DeviceId,
    out: Outbox,
    permits: Arc<Semaphore>,
    /// The connection's changes, in order (started with the first one).
    changes: std::sync::OnceLock<mpsc::Sender<(ClientFrame, OwnedSemaphorePermit)>>,
}

/// Whether `frame` changes a message (and so waits for the connection's
/// earlier changes).
fn is_change(frame: &ClientFrame) -> bool {
    matches!(
        frame,
        ClientFrame::Edit { .. } | ClientFrame::Delete { .. } | ClientFrame::React { .. }
    )
}

impl Requests {
    pub fn new(edge: Arc<Edge>, user: UserId, device: DeviceId, out: Outbox) -> Self {
        Self {
            edge,
            user,
            device,
            out,
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            changes: std::sync::OnceLock::new(),
        }
    }

    /// The queue of this connection's changes, and the task answering them
    /// one at a time; it ends when the connection's `Requests` is dropped.
    fn change_queue(&self) -> &mpsc::Sender<(ClientFrame, OwnedSemaphorePermit)> {
        self.changes.get_or_init(|| {
            // Each queued change holds a permit: the queue never has more.
            let (queue, mut changes) =
                mpsc::channel::<(ClientFrame, OwnedSemaphorePermit)>(MAX_IN_FLIGHT);
            let (edge, user, out) = (self.edge.clone(), self.user.clone(), self.out.clone());
            let device = self.device.clone();
            tokio::spawn(async move {
                while let Some((frame, permit)) = changes.recv().await {
                    let reference = frame.reference().map(str::to_string);
                    let reply = match answer(&edge, user.clone(), &device, frame).await {
                        Ok(Some(reply)) => reply,
                        Ok(None) => continue,
                        Err(e) => e.frame(reference.as_deref()),
                    };
                    out.frame(&reply).await;
                    drop(permit);
                }
            });
            queue
        })
    }

    /// Starts answering `frame` in its own task. With every slot taken the
    /// request is refused at once (`rate_limited`), so the session never
    /// stops reading and forwarding while the persister is slow.
    pub async fn handle(&self, frame: ClientFrame) {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            let refusal = ServerFrame::Error(ErrorFrame {
                reference: frame.reference().map(str::to_string),
                code: ErrorCode::RateLimited,
                message: format!("at most {MAX_IN_FLIGHT} requests at once per connection"),
                retry_after_ms: Some(RETRY_AFTER_MS),
            });
            self.out.frame(&refusal).await;
            return;
        };
        if is_change(&frame) {
            // The worker is gone only with the connection.
            let _ = self.change_queue().send((frame, permit)).await;
            return;
        }
        let (edge, user, out) = (self.edge.clone(), self.user.clone(), self.out.clone());
        let device = self.device.clone();
        tokio::spawn(async move {
            let reference = frame.reference().map(str::to_string);
            let reply = match answer(&edge, user, &device, frame).await {
                Ok(Some(reply)) => reply,
                Ok(None) => return,
                Err(e) => e.frame(reference.as_deref()),
            };
            out.frame(&reply).await;
            drop(permit);
        });
    }
}

/// `user`'s friends and open requests; presence for accepted friends with
/// no block between them only (PROTOCOL.md: presence is shared between
/// friends only), so anyone else shows as offline with no `last_active`;
/// a friend whose `last_seen` is `nobody` shows their status with
/// `last_active: null`.
async fn friend_views(edge: &Edge, user: UserId) -> Result<Vec<FriendView>, RpcError> {
    let entries = rpc::call::<rpc::FriendList>(&edge.nats, &rpc::UserRequest { user }).await?;
    let shares = |entry: &rpc::FriendEntry| entry.state == FriendState::Friends && entry.presence;
    let friends = entries
        .iter()
        .filter(|entry| shares(entry))
        .map(|entry| entry.user.clone())
        .collect();
    let mut presence: HashMap<UserId, PresenceEvent> =
        crate::presence::read(&edge.presence, friends)
            .await?
            .into_iter()
            .map(|event| (event.user.clone(), event))
            .collect();
    Ok(entries
        .into_iter()
        .map(|entry| match presence.remove(&entry.user) {
            Some(event) if shares(&entry) => FriendView {
                last_active: entry.last_active.then_some(event.last_active),
                user: entry.user,
                state: entry.state,
                status: event.status,
            },
            _ => FriendView {
                user: entry.user,
                state: entry.state,
                status: PresenceStatus::Offline,
                last_active: None,
            },
        })
        .collect())
}

fn push_token(
    user: UserId,
    device: &DeviceId,
    platform: chat_shared::push::Platform,
    token: String,
) -> rpc::PushTokenRequest {
    rpc::PushTokenRequest {
        user,
        device: device.clone(),
        platform,
        token,
    }
}

/// The reply to one request, `None` for requests that have none.
async fn answer(
    edge: &Edge,
    user: UserId,
    device: &DeviceId,
    frame: ClientFrame,
) -> Result<Option<ServerFrame>, RequestError> {
    let nats = &edge.nats;
    let reply = match frame {
        ClientFrame::History {
            reference,
            conversation,
            before,
            limit,
        } => {
            let limit = page_limit(limit, DEFAULT_HISTORY_LIMIT)?;
            let page = rpc::call::<rpc::History>(
                nats,
                &rpc::HistoryRequest {
                    user,
                    conversation: conversation.clone(),
                    before,
                    limit,
                },
            )
            .await?;
            ServerFrame::History {
                reference,
                conversation,
                messages: page.messages,
                more: page.more,
            }
        }
        ClientFrame::Conversations {
            reference,
            limit,
            next,
        } => {
            let request = rpc::ConversationsRequest {
                user,
                limit: page_limit(limit, DEFAULT_CONVERSATIONS_LIMIT)?,
                next,
            };
            let page = rpc::call::<rpc::Conversations>(nats, &request).await?;
            ServerFrame::Conversations {
                reference,
                items: page.items,
                more: page.more,
                next: page.next,
            }
        }
        ClientFrame::GroupCreate {
            reference,
            name,
            members,
        } => {
            // Counted when asked, created or not: a refused create still
            // cost the persister a transaction.
            edge.quotas
                .spend(&user, &[(crate::quota::Kind::GroupsPerDay, 1)])
                .await?;
            let request = rpc::GroupCreateRequest {
                user,
                name,
                members,
            };
            let group = rpc::call::<rpc::GroupCreate>(nats, &request).await?;
            ServerFrame::Group { reference, group }
        }
        ClientFrame::GroupAdd {
            reference,
            group,
            users,
        } => {
            let request = rpc::GroupChangeRequest { user, group, users };
            let group = rpc::call::<rpc::GroupAdd>(nats, &request).await?;
            ServerFrame::Group { reference, group }
        }
        ClientFrame::GroupRemove {
            reference,
            group,
            users,
        } => {
            let request = rpc::GroupChangeRequest { user, group, users };
            let group = rpc::call::<rpc::GroupRemove>(nats, &request).await?;
            ServerFrame::Group { reference, group }
        }
        ClientFrame::GroupLeave { reference, group } => {
            rpc::call::<rpc::GroupLeave>(nats, &rpc::GroupRequest { user, group }).await?;
            ServerFrame::Ok { reference }
        }
        ClientFrame::GroupInfo { reference, group } => {
            let group =
                rpc::call::<rpc::GroupInfo>(nats, &rpc::GroupRequest { user, group }).await?;
            ServerFrame::Group { reference, group }
        }
        // `read` and `typing` answer nothing when they work; their errors
        // carry their `ref` like any request's.
        ClientFrame::Read {
            conversation,
            up_to,
            ..
        } => {
            rpc::call::<rpc::Read>(
                nats,
                &rpc::ReadRequest {
                    user,
                    conversation,
                    up_to,
                },
            )
            .await?;
            return Ok(None);
        }
        ClientFrame::Receipts {
            reference,
            conversation,
        } => {
            let request = rpc::ConversationRequest {
                user,
                conversation: conversation.clone(),
            };
            let members = rpc::call::<rpc::Receipts>(nats, &request).await?;
            ServerFrame::Receipts {
                reference,
                conversation,
                members,
            }
        }
        ClientFrame::Typing {
            conversation,
            active,
            ..
        } => {
            crate::send::check_may_write(edge, &user, &conversation).await?;
            let event = TypingEvent {
                conversation,
                active,
            };
            let body = serde_json::to_vec(&event).map_err(|e| RequestError::Encode("typing", e))?;
            // Typing is best effort: it is not stored, and a lost frame is
            // refreshed by the client within seconds.
            if let Err(e) = nats.publish(subjects::typing(&user), body.into()).await {
                tracing::debug!(error = %e, "typing not forwarded");
            }
            return Ok(None);
        }
        ClientFrame::FriendRequest {
            reference,
            user: other,
        } => {
            rpc::call::<rpc::FriendAsk>(nats, &rpc::FriendRequest { user, other }).await?;
            ServerFrame::Ok { reference }
        }
        ClientFrame::FriendAccept {
            reference,
            user: other,
        } => {
            rpc::call::<rpc::FriendAccept>(nats, &rpc::FriendRequest { user, other }).await?;
            ServerFrame::Ok { reference }
        }
        ClientFrame::FriendRemove {
            reference,
            user: other,
        } => {
            rpc::call::<rpc::FriendRemove>(nats, &rpc::FriendRequest { user, other }).await?;
            ServerFrame::Ok { reference }
        }
        ClientFrame::Friends { reference } => ServerFrame::Friends {
            reference,
            items: friend_views(edge, user).await?,
        },
        ClientFrame::PushRegister {
            reference,
            platform,
            token,
        } => {
            let request = push_token(user, device, platform, token);
            rpc::call::<rpc::PushRegister>(nats, &request).await?;
            ServerFrame::Ok { reference }
        }
        ClientFrame::PushUnregister {
            reference,
            platform,
            token,
        } => {
            let request = push_token(user, device, platform, token);
            rpc::call::<rpc::PushUnregister>(nats, &request).await?;
            ServerFrame::Ok { reference }
        }
        ClientFrame::Edit {
            reference,
            conversation,
            id,
            text,
        } => {
            let change = rpc::Change::Edit { text };
            change::apply(edge, &user, change::Request::of(conversation, id, change)).await?;
            ServerFrame::Ok { reference }
        }
        ClientFrame::Delete {
            reference,
            conversation,
            id,
            scope,
        } => {
            let change = rpc::Change::Delete { scope };
            change::apply(edge, &user, change::Request::of(conversation, id, change)).await?;
            ServerFrame::Ok { reference }
        }
        ClientFrame::React {
            reference,
            conversation,
            id,
            emoji,
            on,
        } => {
            let change = rpc::Change::Reaction { emoji, on };
            change::apply(edge, &user, change::Request::of(conversation, id, change)).await?;
            ServerFrame::Ok { reference }
        }
        ClientFrame::Block {
            reference,
            user: other,
        } => {
            rpc::call::<rpc::Block>(nats, &rpc::BlockRequest { user, other }).await?;
            ServerFrame::Ok { reference }
        }
        ClientFrame::Unblock {
            reference,
            user: other,
        } => {
            rpc::call::<rpc::Unblock>(nats, &rpc::BlockRequest { user, other }).await?;
            ServerFrame::Ok { reference }
        }
        ClientFrame::Blocked { reference } => ServerFrame::Blocked {
            reference,
            items: rpc::call::<rpc::BlockList>(nats, &rpc::UserRequest { user }).await?,
        },
        ClientFrame::Mute {
            reference,
            conversation,
            until,
        } => {
            let request = rpc::MuteRequest {
                user,
                conversation,
                until,
            };
            rpc::call::<rpc::Mute>(nats, &request).await?;
            ServerFrame::Ok { reference }
        }
        ClientFrame::Settings { reference, change } => ServerFrame::Settings {
            reference,
            settings: rpc::call::<rpc::Settings>(nats, &rpc::SettingsRequest { user, change })
                .await?,
        },
        ClientFrame::Search {
            reference,
            query,
            conversation,
            before,
            limit,
        } => {
            let request = search_request(user, query, conversation, before, limit)?;
            let page = rpc::call::<rpc::Search>(nats, &request).await?;
            ServerFrame::Search {
                reference,
                items: page.items,
                more: page.more,
            }
        }
        ClientFrame::ProfileSet {
            reference,
            name,
            avatar,
        } => {
            let request = rpc::ProfileSetRequest { user, name, avatar };
            rpc::call::<rpc::ProfileSet>(nats, &request).await?;
            ServerFrame::Ok { reference }
        }
        ClientFrame::MediaUrl { reference, media } => {
            crate::media::signed_url(edge, &user, reference, media).await?
        }
        ClientFrame::Profiles { reference, users } => ServerFrame::Profiles {
            reference,
            items: rpc::call::<rpc::Profiles>(nats, &rpc::ProfilesRequest { user, users }).await?,
        },
        // Handled by the session itself.
        ClientFrame::Hello { .. }
        | ClientFrame::Ping { .. }
        | ClientFrame::Ack { .. }
        | ClientFrame::Refresh { .. }
        | ClientFrame::Send(_) => return Ok(None),
    };
    Ok(Some(reply))
}
