//! The bot's one WebSocket connection to an edge: it answers through the
//! client protocol, like any user, so the edge assigns the message id,
//! checks membership and makes the send idempotent.

use std::time::Duration;

use chat_shared::ids::{ClientMsgId, ConversationId, Cursor, DeviceId};
use chat_shared::wire::{ClientFrame, ErrorFrame, SendRequest, ServerFrame};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long the edge has to answer `hello` or a `send`.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("connecting to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("the edge refused hello: {0}")]
    Refused(String),
    #[error("the connection ended: {0}")]
    Closed(String),
    #[error("no reply within {REPLY_TIMEOUT:?}")]
    Timeout,
}

/// What became of a `send`.
pub enum SendOutcome {
    Sent,
    Refused(ErrorFrame),
}

pub struct Edge {
    socket: Socket,
    /// The newest inbox cursor received, and the newest one acked.
    received: Option<Cursor>,
    acked: Option<Cursor>,
    next_ref: u64,
}

impl Edge {
    /// Connects and says hello; the backlog that follows `welcome` is read
    /// like any other frame.
    pub async fn connect(url: &str, token: String, device: &DeviceId) -> Result<Self, EdgeError> {
        let (socket, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
            .await
            .map_err(|e| EdgeError::Connect {
                url: url.into(),
                reason: e.to_string(),
            })?;
        let mut edge = Self {
            socket,
            received: None,
            acked: None,
            next_ref: 0,
        };
        edge.write(&ClientFrame::Hello {
            token,
            device: device.clone(),
            cursor: None,
        })
        .await?;
        let welcome = tokio::time::timeout(REPLY_TIMEOUT, async {
            loop {
                match edge.read().await? {
                    ServerFrame::Welcome { user, edge: id, .. } => {
                        tracing::info!(%user, edge = %id, "connected to an edge");
                        return Ok(());
                    }
                    ServerFrame::Error(error) => return Err(EdgeError::Refused(error.message)),
                    _ => {}
                }
            }
        });
        welcome.await.map_err(|_| EdgeError::Timeout)??;
        Ok(edge)
    }

    /// Sends `text` into `conversation` and waits for its `sent` or `error`.
    pub async fn send(
        &mut self,
        conversation: ConversationId,
        text: String,
        client_msg_id: ClientMsgId,
    ) -> Result<SendOutcome, EdgeError> {
        self.next_ref += 1;
        let reference = format!("echo-{}", self.next_ref);
        self.write(&ClientFrame::Send(SendRequest {
            reference: Some(reference.clone()),
            to: None,
            conversation: Some(conversation),
            text,
            client_msg_id,
            reply_to: None,
            mentions: Vec::new(),
            attachments: Vec::new(),
        }))
        .await?;
        let reply = async {
            loop {
                match self.read().await? {
                    ServerFrame::Sent {
                        reference: Some(r), ..
                    } if r == reference => return Ok(SendOutcome::Sent),
                    ServerFrame::Error(error) if error.reference.as_deref() == Some(&reference) => {
                        return Ok(SendOutcome::Refused(error))
                    }
                    _ => {}
                }
            }
        };
        tokio::time::timeout(REPLY_TIMEOUT, reply)
            .await
            .map_err(|_| EdgeError::Timeout)?
    }

    /// Reads (and drops) the next frame: the bot's own inbox, which must be
    /// drained or the edge closes a connection that falls behind.
    pub async fn drain_one(&mut self) -> Result<(), EdgeError> {
        self.read().await.map(drop)
    }

    /// The heartbeat, and an ack of what was received so a reconnect
    /// resumes after it instead of replaying the bot's inbox.
    pub async fn keep_alive(&mut self) -> Result<(), EdgeError> {
        self.write(&ClientFrame::Ping { reference: None }).await?;
        if let Some(cursor) = self.received.filter(|c| Some(*c) != self.acked) {
            self.write(&ClientFrame::Ack { cursor }).await?;
            self.acked = Some(cursor);
        }
        Ok(())
    }

    async fn write(&mut self, frame: &ClientFrame) -> Result<(), EdgeError> {
        let text = serde_json::to_string(frame).map_err(|e| EdgeError::Closed(e.to_string()))?;
        self.socket
            .send(Message::Text(text.into()))
            .await
            .map_err(|e| EdgeError::Closed(e.to_string()))
    }

    /// The next frame the bot understands; frames of types added after it was
    /// built are skipped.
    async fn read(&mut self) -> Result<ServerFrame, EdgeError> {
        loop {
            let message = match self.socket.next().await {
                Some(Ok(message)) => message,
                Some(Err(e)) => return Err(EdgeError::Closed(e.to_string())),
                None => return Err(EdgeError::Closed("end of stream".into())),
            };
            let text = match message {
                Message::Text(text) => text,
                Message::Close(frame) => return Err(EdgeError::Closed(format!("{frame:?}"))),
                _ => continue,
            };
            let Ok(frame) = serde_json::from_str::<ServerFrame>(&text) else {
                tracing::debug!(frame = %text, "skipping a frame this bot does not know");
                continue;
            };
            if let ServerFrame::Message {
                cursor: Some(cursor),
                ..
            }
            | ServerFrame::Membership {
                cursor: Some(cursor),
                ..
            }
            | ServerFrame::Synced { cursor } = &frame
            {
                self.received = self.received.max(Some(*cursor));
            }
            return Ok(frame);
        }
    }
}
