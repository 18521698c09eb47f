//! `chatctl`: tokens, streams, schemas, and a tiny client to watch messages flow.

use std::time::Duration;

use anyhow::{bail, Context};
use chat_shared::auth;
use chat_shared::ids::{ClientMsgId, ConversationId, Cursor, DeviceId, UserId};
use chat_shared::wire::{ClientFrame, SendRequest, ServerFrame};
use chat_shared::{schema, streams, Config};
use clap::{Parser, Subcommand};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

mod bench;

#[derive(Parser)]
#[command(name = "chatctl", about = "Operate and try the chat backend", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a JWT for USER signed with the local HS256 secret.
    Token {
        user: String,
        /// Lifetime: 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Manage JetStream streams and KV buckets.
    Streams {
        #[command(subcommand)]
        action: StreamsAction,
    },
    /// Write the JSON Schemas of every wire type into DIR.
    Schemas { dir: std::path::PathBuf },
    /// Send one message as USER.
    Send {
        /// Sender.
        #[arg(long = "as")]
        user: String,
        /// Recipient of a DM.
        #[arg(long, conflicts_with = "conversation")]
        to: Option<String>,
        /// A conversation id (dm:a:b or group:id).
        #[arg(long)]
        conversation: Option<String>,
        text: String,
        #[arg(
            long,
            env = "CHAT_EDGE_URL",
            default_value = "ws://127.0.0.1:8080/v1/ws"
        )]
        edge: String,
    },
    /// Load a running system and measure it.
    Bench {
        #[command(subcommand)]
        scenario: BenchScenario,
    },
    /// Connect as USER and print every frame as a JSON line.
    Tail {
        #[arg(long = "as")]
        user: String,
        #[arg(long, default_value = "chatctl")]
        device: String,
        /// Resume after this cursor.
        #[arg(long)]
        cursor: Option<u64>,
        #[arg(
            long,
            env = "CHAT_EDGE_URL",
            default_value = "ws://127.0.0.1:8080/v1/ws"
        )]
        edge: String,
    },
}

#[derive(Subcommand)]
enum BenchScenario {
    /// Pairs of users sending direct messages; rates and latencies.
    Dm {
        #[arg(long, default_value_t = 20)]
        pairs: usize,
        /// Messages per pair.
        #[arg(long, default_value_t = 500)]
        messages: usize,
        /// Sends in flight per sender.
        #[arg(long, default_value_t = 32)]
        window: usize,
        #[arg(
            long,
            env = "CHAT_EDGE_URL",
            default_value = "ws://127.0.0.1:8080/v1/ws"
        )]
        edge: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum StreamsAction {
    /// Create or update every stream and bucket.
    Apply,
    /// List streams with their message counts.
    Ls,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::from_env()?;
    match cli.command {
        Command::Token { user, ttl } => {
            println!("{}", token(&config, &user, parse_ttl(&ttl)?)?);
        }
        Command::Streams { action } => {
            let client = chat_shared::nats::connect(&config, "chatctl").await?;
            let js = chat_shared::nats::jetstream(client, &config);
            match action {
                StreamsAction::Apply => {
                    streams::apply(&js, &config).await?;
                    println!("streams and buckets applied");
                }
                StreamsAction::Ls => {
                    let mut names = js.stream_names();
                    while let Some(name) = names.next().await {
                        let name = name?;
                        let mut stream = js.get_stream(&name).await?;
                        let info = stream.info().await?;
                        println!(
                            "{name:<16} messages={:<10} bytes={:<12} first={} last={} consumers={}",
                            info.state.messages,
                            info.state.bytes,
                            info.state.first_sequence,
                            info.state.last_sequence,
                            info.state.consumer_count
                        );
                    }
                }
            }
        }
        Command::Schemas { dir } => {
            schema::write_all(&dir).with_context(|| format!("writing {}", dir.display()))?;
            println!("schemas written to {}", dir.display());
        }
        Command::Send {
            user,
            to,
            conversation,
            text,
            edge,
        } => {
            let (mut socket, handshake) =
                connect(&config, &edge, &user, "chatctl-send", None).await?;
            for frame in handshake {
                eprintln!("{frame}");
            }
            let request = SendRequest {
                reference: Some("1".into()),
                to: to.map(UserId::parse).transpose()?,
                conversation: conversation
                    .map(|c| ConversationId::parse(&c))
                    .transpose()?,
                text,
                client_msg_id: ClientMsgId::parse(format!("chatctl-{:016x}", rand_u64()))?,
            };
            socket
                .send(Message::Text(
                    serde_json::to_string(&ClientFrame::Send(request))?.into(),
                ))
                .await?;
            while let Some(message) = socket.next().await {
                if let Message::Text(text) = message? {
                    let frame: ServerFrame = serde_json::from_str(&text)?;
                    match frame {
                        ServerFrame::Sent { .. } => {
                            println!("{text}");
                            return Ok(());
                        }
                        ServerFrame::Error(error) => {
                            bail!("{}: {}", serde_json::to_string(&error.code)?, error.message)
                        }
                        _ => {}
                    }
                }
            }
            bail!("connection closed before `sent`");
        }
        Command::Bench {
            scenario:
                BenchScenario::Dm {
                    pairs,
                    messages,
                    window,
                    edge,
                    json,
                },
        } => {
            let options = bench::DmOptions {
                edge,
                pairs,
                messages,
                window,
            };
            let report = bench::dm(&config, options).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                bench::print(&report);
            }
        }
        Command::Tail {
            user,
            device,
            cursor,
            edge,
        } => {
            let (mut socket, handshake) =
                connect(&config, &edge, &user, &device, cursor.map(Cursor)).await?;
            for frame in handshake {
                println!("{frame}");
            }
            let mut ping = tokio::time::interval(Duration::from_secs(20));
            loop {
                tokio::select! {
                    _ = ping.tick() => socket.send(Message::Text(r#"{"type":"ping"}"#.into())).await?,
                    message = socket.next() => {
                        let Some(message) = message else { break };
                        match message? {
                            Message::Text(text) => {
                                println!("{text}");
                                if let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) {
                                    if let Some(cursor) = value.get("cursor").and_then(|c| c.as_str()) {
                                        let ack = serde_json::json!({"type": "ack", "cursor": cursor});
                                        socket.send(Message::Text(ack.to_string().into())).await?;
                                    }
                                }
                            }
                            Message::Close(frame) => {
                                eprintln!("closed: {frame:?}");
                                break;
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn rand_u64() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id()) << 32
}

fn token(config: &Config, user: &str, ttl: Duration) -> anyhow::Result<String> {
    let user = UserId::parse(user)?;
    let secret = auth::dev_secret(config)?;
    Ok(auth::mint_hs256(&secret, &user, ttl)?)
}

fn parse_ttl(text: &str) -> anyhow::Result<Duration> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let number: u64 = number
        .parse()
        .with_context(|| format!("bad ttl {text:?}"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("bad ttl unit in {text:?}: use s, m, h or d"),
    };
    Ok(Duration::from_secs(number * seconds))
}

/// Accepts the edge as `ws://host:port/v1/ws` or as its HTTP base URL
/// (`http://127.0.0.1:8080`, what `scripts/dev` prints).
fn websocket_url(edge: &str) -> String {
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

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects, says hello, and waits for `synced`; returns the socket and the
/// frames of the handshake (welcome, backlog, synced).
async fn connect(
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
    fn ttls_parse() {
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
