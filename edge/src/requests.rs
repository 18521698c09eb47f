//! Requests answered by the persister's request/reply service (history,
//! conversations, groups, read state). Each runs in its own task, at most
//! [`MAX_IN_FLIGHT`] per connection; replies carry the request's `ref`.

use std::sync::Arc;

use chat_shared::ids::UserId;
use chat_shared::rpc::{self, RpcError};
use chat_shared::wire::{ClientFrame, ErrorCode, ErrorFrame, ServerFrame};
use tokio::sync::Semaphore;

use crate::session::Outbox;
use crate::Edge;

const MAX_IN_FLIGHT: usize = 16;
/// What a refused request is told to wait.
const RETRY_AFTER_MS: u64 = 200;
const DEFAULT_HISTORY_LIMIT: u32 = 50;
const MAX_HISTORY_LIMIT: u32 = 200;

pub struct Requests {
    edge: Arc<Edge>,
    user: UserId,
    out: Outbox,
    permits: Arc<Semaphore>,
}

impl Requests {
    pub fn new(edge: Arc<Edge>, user: UserId, out: Outbox) -> Self {
        Self {
            edge,
            user,
            out,
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
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
        let (edge, user, out) = (self.edge.clone(), self.user.clone(), self.out.clone());
        tokio::spawn(async move {
            let reference = frame.reference().map(str::to_string);
            let reply = match answer(&edge, user, frame).await {
                Ok(Some(reply)) => reply,
                Ok(None) => return,
                Err(e) => ServerFrame::error(reference.as_deref(), e.code, e.message),
            };
            out.frame(&reply).await;
            drop(permit);
        });
    }
}

/// The reply to one request, `None` for requests that have none.
async fn answer(
    edge: &Edge,
    user: UserId,
    frame: ClientFrame,
) -> Result<Option<ServerFrame>, RpcError> {
    let nats = &edge.nats;
    let reply = match frame {
        ClientFrame::History {
            reference,
            conversation,
            before,
            limit,
        } => {
            let limit = limit.unwrap_or(DEFAULT_HISTORY_LIMIT);
            if !(1..=MAX_HISTORY_LIMIT).contains(&limit) {
                return Err(RpcError::new(
                    ErrorCode::BadRequest,
                    "limit must be 1..=200",
                ));
            }
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
        ClientFrame::Conversations { reference } => ServerFrame::Conversations {
            reference,
            items: rpc::call::<rpc::Conversations>(nats, &rpc::UserRequest { user }).await?,
        },
        ClientFrame::GroupCreate {
            reference,
            name,
            members,
        } => {
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
        ClientFrame::Read {
            conversation,
            up_to,
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
        ClientFrame::Typing { .. } => return Ok(None),
        ClientFrame::FriendRequest { .. }
        | ClientFrame::FriendAccept { .. }
        | ClientFrame::FriendRemove { .. }
        | ClientFrame::Friends { .. }
        | ClientFrame::PushRegister { .. }
        | ClientFrame::PushUnregister { .. }
        | ClientFrame::Refresh { .. } => {
            return Err(RpcError::new(
                ErrorCode::Internal,
                "this request is not supported by this server yet",
            ));
        }
        // Handled by the session itself.
        ClientFrame::Hello { .. }
        | ClientFrame::Ping { .. }
        | ClientFrame::Ack { .. }
        | ClientFrame::Send(_) => return Ok(None),
    };
    Ok(Some(reply))
}
