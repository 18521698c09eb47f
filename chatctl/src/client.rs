//! A tiny WebSocket client and the dev token, for `send`, `tail` and `bench`.

use std::time::Duration;

use anyhow::{bail, Context};
use chat_shared::auth;
use chat_shared::ids::{ClientMsgId, ConversationId, Cursor, DeviceId, UserId};
use chat_shared::wire::{ClientFrame, SendRequest, ServerFrame};
use chat_shared::Config;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Where client commands connect unless told otherwise (`scripts/dev`'s edge).
pub const DEFAULT_EDGE: &str = "ws://127.0.0.1:8080/v1/ws";

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A JWT for `user` signed with the local HS256 secret.
pub fn token(config: &Config, user: &str, ttl: Duration) -> anyhow::Result<String> {
    let user = UserId::parse(user)?;
    let secret = auth::dev_secret(config)?;
    Ok(auth::mint_hs256(&secret, &user, ttl)?)
}

/// A duration written as a number and a unit: `90s`, `30m`, `1h`, `7d`
/// (a bare number is seconds).
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let number: u64 = number
        .parse()
        .with_context(|| format!("bad duration {text:?}"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("bad duration unit in {text:?}: use s, m, h or d"),
    };
    number
        .checked_mul(seconds)
        .map(Duration::from_secs)
        .with_context(|| format!("duration {text:?} is too long"))
}

/// Accepts the edge as `ws://host:port/v1/ws` or as its HTTP base URL
/// (`http://127.0.0.1:8080`, what `scripts/dev` prints).
pub fn websocket_url(edge: &str) -> String {
    let edge = if let Some(rest) = edge.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = edge.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        edge.to_string()
    };
    let after_scheme = edge
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(&edge);
    if after_scheme.trim_end_matches('/').contains('/') {
        edge
    } else {
        format!("{}/v1/ws", edge.trim_end_matches('/'))
    }
}

/// Connects, says hello, and waits for `synced`; returns the socket and the
/// frames of the handshake (welcome, backlog, synced).
pub async fn connect(
    config: &Config,
    edge: &str,
    user: &str,
    device: &str,
    cursor: Option<Cursor>,
) -> anyhow::Result<(Socket, Vec<String>)> {
    let token = token(config, user, Duration::from_secs(3600))?;
    let edge = websocket_url(edge);
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(&edge, None, true)
        .await
        .with_context(|| format!("connecting to {edge}"))?;
    let hello = ClientFrame::Hello {
        token,
        device: DeviceId::parse(device)?,
        cursor,
    };
    socket
        .send(Message::Text(serde_json::to_string(&hello)?.into()))
        .await?;
    let mut handshake = Vec::new();
    while let Some(message) = socket.next().await {
        if let Message::Text(text) = message? {
            let synced = serde_json::from_str::<ServerFrame>(&text)
                .is_ok_and(|f| matches!(f, ServerFrame::Synced { .. }));
            handshake.push(text.to_string());
            if synced {
                return Ok((socket, handshake));
            }
        }
    }
    bail!("connection closed during the handshake")
}

async fn send_frame(socket: &mut Socket, frame: &ClientFrame) -> anyhow::Result<()> {
    let text = serde_json::to_string(frame)?;
    socket.send(Message::Text(text.into())).await?;
    Ok(())
}

/// Where `chatctl send` writes: a user (their DM) or a conversation.
pub enum Target {
    User(UserId),
    Conversation(ConversationId),
}

/// `chatctl send`: sends `text` as `user` and waits for the answer; the
/// `sent` frame, or the refusal as an error. `seen` gets the handshake's
/// frames.
pub async fn send(
    config: &Config,
    edge: &str,
    user: &str,
    target: Target,
    text: String,
    mut seen: impl FnMut(&str),
) -> anyhow::Result<ServerFrame> {
    let (mut socket, handshake) = connect(config, edge, user, "chatctl-send", None).await?;
    handshake.iter().for_each(|frame| seen(frame));
    let (to, conversation) = match target {
        Target::User(to) => (Some(to), None),
        Target::Conversation(conversation) => (None, Some(conversation)),
    };
    let request = SendRequest {
        reference: Some("1".into()),
        to,
        conversation,
        text,
        client_msg_id: ClientMsgId::parse(format!("chatctl-{:016x}", unique_u64()))?,
        reply_to: None,
        mentions: Vec::new(),
        attachments: Vec::new(),
    };
    send_frame(&mut socket, &ClientFrame::Send(request)).await?;
    while let Some(message) = socket.next().await {
        let Message::Text(text) = message? else {
            continue;
        };
        match serde_json::from_str::<ServerFrame>(&text)? {
            sent @ ServerFrame::Sent { .. } => return Ok(sent),
            ServerFrame::Error(error) => {
                bail!("{}: {}", serde_json::to_string(&error.code)?, error.message)
            }
            _ => {}
        }
    }
    bail!("connection closed before `sent`")
}

/// How often `tail` pings: well within the edge's heartbeat (25 s).
const TAIL_PING: Duration = Duration::from_secs(20);

/// `chatctl tail`: follows `user`'s frames as `device` from `cursor`,
/// acking each cursor as a client would; `each` gets every frame's text
/// (the handshake's first). Returns when the edge closes the connection,
/// with its close frame if it sent one (a ban's 4001 says why).
pub async fn tail(
    config: &Config,
    edge: &str,
    user: &str,
    device: &str,
    cursor: Option<Cursor>,
    mut each: impl FnMut(&str),
) -> anyhow::Result<Option<CloseFrame>> {
    let (mut socket, handshake) = connect(config, edge, user, device, cursor).await?;
    handshake.iter().for_each(|frame| each(frame));
    let mut ping = tokio::time::interval(TAIL_PING);
    loop {
        let message = tokio::select! {
            _ = ping.tick() => {
                send_frame(&mut socket, &ClientFrame::Ping { reference: None }).await?;
                continue;
            }
            message = socket.next() => message,
        };
        let Some(message) = message else {
            return Ok(None);
        };
        let text = match message? {
            Message::Text(text) => text,
            Message::Close(frame) => return Ok(frame),
            _ => continue,
        };
        each(&text);
        let cursor = match serde_json::from_str::<ServerFrame>(&text) {
            Ok(ServerFrame::Message { cursor, .. } | ServerFrame::Membership { cursor, .. }) => {
                cursor
            }
            _ => None,
        };
        if let Some(cursor) = cursor {
            send_frame(&mut socket, &ClientFrame::Ack { cursor }).await?;
        }
    }
}

/// A value unlikely to repeat across runs, for client message ids.
pub fn unique_u64() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id()) << 32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_urls_become_websocket_urls() {
        assert_eq!(
            websocket_url("http://127.0.0.1:8080"),
            "ws://127.0.0.1:8080/v1/ws"
        );
        assert_eq!(
            websocket_url("https://chat.example/"),
            "wss://chat.example/v1/ws"
        );
        assert_eq!(websocket_url("ws://h:1/v1/ws"), "ws://h:1/v1/ws");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        assert!(parse_duration("999999999999999999d").is_err());
    }
}
