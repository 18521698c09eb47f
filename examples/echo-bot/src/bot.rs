//! Reads every accepted message from MESSAGES (its own durable consumer) and
//! answers `/echo <text>` with `<text>` in conversations the bot user is in.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, AckKind};
use chat_shared::consume;
use chat_shared::ids::{ClientMsgId, ConversationId, DeviceId, UserId};
use chat_shared::membership::GroupCache;
use chat_shared::shutdown::Shutdown;
use chat_shared::wire::{ErrorCode, MessageEvent, MessagesEvent};
use chat_shared::{auth, Config, StartError};
use futures::StreamExt;

use crate::edge::{Edge, SendOutcome};

const COMMAND: &str = "/echo ";
/// A token minted from the dev secret lives this long; the bot reconnects
/// with a fresh one when the edge closes an expired session.
const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// How often the bot pings the edge (the edge's heartbeat is 25 s by default
/// and closes after 2 x heartbeat + 5 s of silence).
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// How long a message waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// The bot's own settings, beside the shared `CHAT_*` configuration.
pub struct Settings {
    /// `CHAT_BOT_USER` (default `echo-bot`).
    pub user: UserId,
    /// `CHAT_EDGE_WS_URL` (default `ws://127.0.0.1:8080/v1/ws`).
    pub edge_url: String,
    /// `CHAT_BOT_TOKEN`: a JWT for the bot user; without it the bot mints one
    /// with the dev secret (`CHAT_JWT_SECRET` or `CHAT_JWT_SECRET_FILE`).
    pub token: Option<String>,
    /// The bot's device id on the edge.
    pub device: DeviceId,
}

impl Settings {
    pub fn from_env() -> Result<Self, String> {
        let var = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
        let user = var("CHAT_BOT_USER").unwrap_or_else(|| "echo-bot".into());
        Ok(Self {
            user: UserId::parse(user).map_err(|e| format!("CHAT_BOT_USER: {e}"))?,
            edge_url: var("CHAT_EDGE_WS_URL").unwrap_or_else(|| "ws://127.0.0.1:8080/v1/ws".into()),
            token: var("CHAT_BOT_TOKEN"),
            device: DeviceId::parse("echo-bot").map_err(|e| e.to_string())?,
        })
    }
}

/// The text to echo, if `event` is an echo command by someone else.
pub fn echo_text<'a>(event: &'a MessageEvent, bot: &UserId) -> Option<&'a str> {
    if event.from == *bot {
        return None;
    }
    let text = event.text.strip_prefix(COMMAND)?;
    (!text.trim().is_empty()).then_some(text)
}

/// The bot's durable consumer: new messages only, one at a time.
fn consumer_config(bot: &UserId) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(format!("echo-bot-{bot}")),
        description: Some("examples/echo-bot".into()),
        deliver_policy: consumer::DeliverPolicy::New,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 16,
        ..Default::default()
    }
}

pub async fn run(config: Config, settings: Settings, shutdown: Shutdown) -> Result<(), StartError> {
    let nats = chat_shared::nats::connect(&config, "echo-bot").await?;
    let js = chat_shared::nats::jetstream(nats.clone(), &config);
    chat_shared::streams::wait_until_provisioned(&js, &config).await;
    let groups = GroupCache::start(nats, &config.group_cache).await?;
    // One consumer per partition of MESSAGES (one stream unless
    // CHAT_PARTITIONS splits it).
    let mut consumers = Vec::new();
    for partition in config.partitions.all() {
        let stream = partition.messages_stream();
        consumers.push(consume::durable(&js, &stream, consumer_config(&settings.user)).await);
    }
    let mut bot = Bot {
        config,
        settings,
        groups,
        edge: None,
    };
    let mut stopped = shutdown;
    let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
    tracing::info!(user = %bot.settings.user, "echo bot listening");
    'pull: while let Some(mut messages) = open_all(&consumers, &mut stopped).await {
        loop {
            tokio::select! {
                _ = &mut stopped => break 'pull,
                _ = keep_alive.tick() => bot.keep_alive().await,
                drained = drain(&mut bot.edge) => if let Err(e) = drained {
                    tracing::warn!(error = %e, "edge connection lost");
                    bot.edge = None;
                },
                message = messages.next() => match message {
                    Some(Ok(message)) => bot.handle(message).await,
                    Some(Err(e)) => tracing::warn!(error = %e, "pull failed"),
                    None => continue 'pull,
                },
            }
        }
    }
    Ok(())
}

/// One pull stream over the consumers of every partition; `None` once
/// stopped.
async fn open_all(
    consumers: &[consumer::PullConsumer],
    stopped: &mut Shutdown,
) -> Option<futures::stream::SelectAll<consumer::pull::Stream>> {
    let mut streams = Vec::with_capacity(consumers.len());
    for consumer in consumers {
        streams.push(consume::open_pull(consumer, 16, None, stopped).await?);
    }
    Some(futures::stream::select_all(streams))
}

/// Reads the edge's next frame; never completes without a connection.
async fn drain(edge: &mut Option<Edge>) -> Result<(), crate::edge::EdgeError> {
    match edge {
        Some(edge) => edge.drain_one().await,
        None => std::future::pending().await,
    }
}

struct Bot {
    config: Config,
    settings: Settings,
    groups: GroupCache,
    edge: Option<Edge>,
}

/// What to do with one MESSAGES event.
enum Verdict {
    Done,
    Retry(Duration),
}

impl Bot {
    async fn handle(&mut self, message: jetstream::Message) {
        let verdict = match MessagesEvent::parse(&message.payload) {
            Ok(MessagesEvent::Message(event)) => self.answer(&event).await,
            // Edits, deletes and reactions are not commands.
            Ok(MessagesEvent::Change(_)) => Verdict::Done,
            Err(e) => {
                tracing::warn!(subject = %message.subject, error = %e, "not a message event");
                Verdict::Done
            }
        };
        let ack = match verdict {
            Verdict::Done => AckKind::Ack,
            Verdict::Retry(after) => AckKind::Nak(Some(after)),
        };
        if let Err(e) = message.ack_with(ack).await {
            tracing::warn!(error = %e, "cannot ack; the message will come again");
        }
    }

    async fn answer(&mut self, event: &MessageEvent) -> Verdict {
        let Some(text) = echo_text(event, &self.settings.user) else {
            return Verdict::Done;
        };
        match self.is_member(&event.conversation).await {
            Ok(true) => {}
            Ok(false) => return Verdict::Done,
            Err(after) => return Verdict::Retry(after),
        }
        // One answer per command, even if this event comes again: the edge
        // makes a send idempotent on (sender, client_msg_id).
        let Ok(client_msg_id) = ClientMsgId::parse(format!("echo-{}", event.id)) else {
            return Verdict::Done;
        };
        let edge = match self.edge.take() {
            Some(edge) => edge,
            None => match self.connect().await {
                Ok(edge) => edge,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach the edge");
                    return Verdict::Retry(RETRY_AFTER);
                }
            },
        };
        let edge = self.edge.insert(edge);
        match edge
            .send(event.conversation.clone(), text.to_string(), client_msg_id)
            .await
        {
            Ok(SendOutcome::Sent) => {
                tracing::info!(conversation = %event.conversation, id = %event.id, "echoed");
                Verdict::Done
            }
            Ok(SendOutcome::Refused(error)) => match error.code {
                ErrorCode::Unavailable | ErrorCode::RateLimited | ErrorCode::Internal => {
                    let after = error
                        .retry_after_ms
                        .map_or(RETRY_AFTER, Duration::from_millis);
                    Verdict::Retry(after)
                }
                _ => {
                    tracing::warn!(code = ?error.code, message = %error.message, "echo refused");
                    Verdict::Done
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "edge connection lost");
                self.edge = None;
                Verdict::Retry(RETRY_AFTER)
            }
        }
    }

    /// Whether the bot may write to `conversation`; `Err` to try later.
    async fn is_member(&self, conversation: &ConversationId) -> Result<bool, Duration> {
        match conversation {
            ConversationId::Dm { .. } => Ok(conversation.is_dm_party(&self.settings.user)),
            ConversationId::Group(group) => match self.groups.members(group).await {
                Ok(members) => Ok(members.contains(&self.settings.user)),
                Err(e) if e.code == ErrorCode::NotFound => Ok(false),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check group membership");
                    Err(RETRY_AFTER)
                }
            },
        }
    }

    async fn connect(&self) -> Result<Edge, crate::edge::EdgeError> {
        let token = match &self.settings.token {
            Some(token) => token.clone(),
            None => auth::dev_secret(&self.config)
                .map_err(|e| e.to_string())
                .and_then(|secret| {
                    auth::mint_hs256(&secret, &self.settings.user, TOKEN_TTL)
                        .map_err(|e| e.to_string())
                })
                .map_err(crate::edge::EdgeError::Refused)?,
        };
        Edge::connect(&self.settings.edge_url, token, &self.settings.device).await
    }

    async fn keep_alive(&mut self) {
        if let Some(edge) = &mut self.edge {
            if let Err(e) = edge.keep_alive().await {
                tracing::warn!(error = %e, "edge connection lost");
                self.edge = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_shared::ids::MessageId;

    fn event(from: &str, text: &str) -> MessageEvent {
        MessageEvent::sent(
            MessageId(1),
            ConversationId::parse("dm:alice:echo-bot").unwrap(),
            UserId::parse(from).unwrap(),
            text.into(),
            0,
            ClientMsgId::parse("c").unwrap(),
        )
    }

    #[test]
    fn only_echo_commands_of_others_are_answered() {
        let bot = UserId::parse("echo-bot").unwrap();
        assert_eq!(
            echo_text(&event("alice", "/echo hi there"), &bot),
            Some("hi there")
        );
        assert_eq!(echo_text(&event("alice", "/echo  x "), &bot), Some(" x "));
        assert_eq!(echo_text(&event("alice", "hello"), &bot), None);
        assert_eq!(echo_text(&event("alice", "/echo"), &bot), None);
        assert_eq!(echo_text(&event("alice", "/echo   "), &bot), None);
        assert_eq!(echo_text(&event("alice", "/echoes x"), &bot), None);
        // Its own answers never trigger it, even `/echo /echo x` -> `/echo x`.
        assert_eq!(echo_text(&event("echo-bot", "/echo x"), &bot), None);
    }

    #[test]
    fn the_consumer_starts_at_new_messages_and_acks_explicitly() {
        let config = consumer_config(&UserId::parse("echo-bot").unwrap());
        assert_eq!(config.durable_name.as_deref(), Some("echo-bot-echo-bot"));
        assert_eq!(config.deliver_policy, consumer::DeliverPolicy::New);
        assert_eq!(config.ack_policy, consumer::AckPolicy::Explicit);
    }
}
