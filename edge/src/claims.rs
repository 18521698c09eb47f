//! `claims`: the `client_msg_id`s of one connection's sender that must be
//! remembered beyond JetStream's duplicate window, written lazily.
//!
//! A send is one JetStream write, the MESSAGES publish: its `Nats-Msg-Id`
//! (`<sender>:<client_msg_id>`) makes JetStream drop a retry within the
//! window (`CHAT_DEDUP_WINDOW_SECS`). A retry after the window is recognised
//! by a claim in the `chat_sent` bucket, written only for a send whose
//! answer the client may not have read:
//!
//! - a send answered `sent` on a connection that stayed open for the
//!   confirmation time after it (twice the idle timeout) was read: the edge
//!   closes a connection silent for the idle timeout, so the client was
//!   there, reading, after the answer went out. Nothing is written for it;
//! - the sends answered within the confirmation time before the connection
//!   closed, for any reason, are written as one batch as it closes;
//! - a send whose outcome is unknown (timed out, no PubAck) is written after
//!   its answer with the id it was tried with: a retry reuses that id.
//!
//! A worker reads the sender's claims (one batched direct get, no
//! consumer) before its first send and again before a send once that read is
//! older than the refresh time, half of what the window leaves after the
//! confirmation time. A batch is written at most the confirmation time after
//! its sends were answered, so a retry that comes later than the window
//! finds it (`Config::check` keeps the window longer than the confirmation
//! time).
//!
//! Not covered: an edge killed outright (not stopped) loses the batches of
//! its connections; a retry of one of their last sends more than the window
//! later is stored again under a new id (PostgreSQL's unique (sender,
//! client_msg_id) keeps history single).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use chat_shared::direct::{DirectError, DirectReader, Item};
use chat_shared::ids::{ClientMsgId, MessageId, UserId};
use chat_shared::wire::MessageEvent;
use chat_shared::{subjects, Config};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::Edge;

/// Items per direct get when reading a sender's claims.
const READ_BATCH: usize = 256;
/// The most read of one sender's claims; a sender with more within the
/// bucket's age has the rest unchecked (and is warned about).
const READ_MAX_BYTES: usize = 4 * 1024 * 1024;
/// Claims per written batch: a value stays far below the server's payload
/// limit.
const BATCH_LINES: usize = 2_000;
/// Tries to write a closing connection's batch.
const WRITE_ATTEMPTS: u32 = 3;

/// A stored claim: `<message id>` (a claim written before digests existed)
/// or `<message id>:<digest>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub id: MessageId,
    pub digest: Option<String>,
}

impl Claim {
    pub fn of(event: &MessageEvent) -> Self {
        Self {
            id: event.id,
            digest: Some(Self::digest(event)),
        }
    }

    /// What identifies the request a `client_msg_id` was first used for:
    /// its conversation and text (SHA-256, first 16 bytes in hex).
    pub fn digest(event: &MessageEvent) -> String {
        let mut hash = Sha256::new();
        hash.update(event.conversation.to_string().as_bytes());
        hash.update([0]);
        hash.update(event.text.as_bytes());
        // Without attachments the digest is what it was before they existed.
        for attachment in &event.attachments {
            hash.update([0]);
            hash.update(attachment.media.as_str().as_bytes());
        }
        chat_shared::hex::encode(&hash.finalize()[..16])
    }

    /// Whether a request with `digest` may be the one this claim is for (a
    /// claim without a digest cannot tell).
    pub fn allows(&self, digest: &str) -> bool {
        self.digest.as_deref().is_none_or(|d| d == digest)
    }

    fn encode(&self) -> String {
        match &self.digest {
            Some(digest) => format!("{}:{digest}", self.id),
            None => self.id.to_string(),
        }
    }

    fn decode(value: &str) -> Option<Self> {
        let (id, digest) = match value.split_once(':') {
            Some((id, digest)) => (id, Some(digest.to_string())),
            None => (value, None),
        };
        Some(Self {
            id: MessageId::parse(id).ok()?,
            digest,
        })
    }
}

/// How long after its answer a send counts as read, and how old a read of
/// the claims may get before a send reads them again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timing {
    confirm: Duration,
    refresh: Duration,
}

impl Timing {
    fn of(config: &Config) -> Self {
        let confirm = config.idle_timeout() * 2;
        Self {
            confirm,
            refresh: config.dedup_window.saturating_sub(confirm) / 2,
        }
    }
}

/// One connection's view of its sender's claims, and what it owes the bucket.
pub struct SenderClaims {
    sender: UserId,
    timing: Timing,
    /// The sender's claims by hex client id, as last read, plus this
    /// connection's own unsure ones. One id may have several (attempts on
    /// different connections that each did not see the other's claim).
    known: HashMap<String, Vec<Claim>>,
    read_at: Option<Instant>,
    /// Sends answered `sent` within the confirmation time, oldest first.
    answered: VecDeque<(Instant, String, Claim)>,
    /// The send being published; left here if its outcome never came.
    trying: Option<(String, Claim)>,
    /// Sends of unknown outcome not written yet.
    unsure: Vec<(String, Claim)>,
}

impl SenderClaims {
    pub fn new(sender: UserId, config: &Config) -> Self {
        Self {
            sender,
            timing: Timing::of(config),
            known: HashMap::new(),
            read_at: None,
            answered: VecDeque::new(),
            trying: None,
            unsure: Vec::new(),
        }
    }

    /// The claims on `client_msg_id`, read again first if the last read is
    /// older than the refresh time.
    pub async fn find(
        &mut self,
        reader: &DirectReader,
        client_msg_id: &ClientMsgId,
    ) -> Result<Vec<Claim>, DirectError> {
        let now = Instant::now();
        if self
            .read_at
            .is_none_or(|at| now.duration_since(at) >= self.timing.refresh)
        {
            self.known = read(reader, &self.sender).await?;
            for (key, claim) in &self.unsure {
                self.known
                    .entry(key.clone())
                    .or_default()
                    .push(claim.clone());
            }
            // When the read began: what was written after may be missing.
            self.read_at = Some(now);
        }
        Ok(self
            .known
            .get(&client_msg_id.hex())
            .cloned()
            .unwrap_or_default())
    }

    /// `event` is about to be published: unless [`answered`](Self::answered)
    /// or [`settled`](Self::settled) follows, its outcome is unknown.
    pub fn trying(&mut self, event: &MessageEvent) {
        self.trying = Some((event.client_msg_id.hex(), Claim::of(event)));
    }

    /// The send being published needs no claim of its own (refused, or
    /// stored before under another id, which has its own).
    pub fn settled(&mut self) {
        self.trying = None;
    }

    /// `event` (as stored) was answered `sent`.
    pub fn answered(&mut self, event: &MessageEvent) {
        self.trying = None;
        self.answered
            .push_back((Instant::now(), event.client_msg_id.hex(), Claim::of(event)));
    }

    /// The connection is still open now: the sends answered the
    /// confirmation time ago or earlier were read.
    pub fn still_open(&mut self) {
        let now = Instant::now();
        while self
            .answered
            .front()
            .is_some_and(|(at, _, _)| now.duration_since(*at) >= self.timing.confirm)
        {
            self.answered.pop_front();
        }
    }

    /// Writes the claims of sends whose outcome is unknown, if any; on
    /// failure they wait for the next call or the connection's end.
    pub async fn write_unsure(&mut self, edge: &Edge) {
        if let Some((key, claim)) = self.trying.take() {
            self.known
                .entry(key.clone())
                .or_default()
                .push(claim.clone());
            self.unsure.push((key, claim));
        }
        if self.unsure.is_empty() {
            return;
        }
        match write(edge, &self.sender, &self.unsure).await {
            Ok(()) => {
                edge.metrics.send_claims_written(self.unsure.len() as u64);
                self.unsure.clear();
            }
            Err(error) => tracing::warn!(%error, "send claims not written; trying again later"),
        }
    }

    /// The connection is closing: writes the claims of what the client may
    /// not have read.
    pub async fn finish(mut self, edge: &Edge) {
        if let Some(trying) = self.trying.take() {
            self.unsure.push(trying);
        }
        let mut owed = std::mem::take(&mut self.unsure);
        owed.extend(
            self.answered
                .into_iter()
                .map(|(_, key, claim)| (key, claim)),
        );
        if owed.is_empty() {
            return;
        }
        let mut attempt = 1;
        let error = loop {
            match write(edge, &self.sender, &owed).await {
                Ok(()) => {
                    edge.metrics.send_claims_written(owed.len() as u64);
                    return;
                }
                Err(e) if attempt >= WRITE_ATTEMPTS => break e,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                    attempt += 1;
                }
            }
        };
        tracing::error!(
            %error,
            claims = owed.len(),
            "send claims lost: a retry of these sends past the duplicate window would be stored again"
        );
    }
}

/// Writes `claims` as batches under fresh keys.
async fn write(edge: &Edge, sender: &UserId, claims: &[(String, Claim)]) -> Result<(), WriteError> {
    for chunk in claims.chunks(BATCH_LINES) {
        let key = subjects::sent_batch_key(sender, rand::random());
        let put = edge.claims.put(key, encode_batch(chunk).into());
        tokio::time::timeout(edge.config.request_timeout, put)
            .await
            .map_err(|_| WriteError::TimedOut)??;
    }
    Ok(())
}

/// Why a batch of claims was not stored.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("no answer within the request timeout")]
    TimedOut,
    #[error(transparent)]
    Put(#[from] async_nats::jetstream::kv::PutError),
}

fn encode_batch(claims: &[(String, Claim)]) -> String {
    claims
        .iter()
        .map(|(key, claim)| format!("{key} {}\n", claim.encode()))
        .collect()
}

/// Every claim of `sender`, both forms, by hex client id.
async fn read(
    reader: &DirectReader,
    sender: &UserId,
) -> Result<HashMap<String, Vec<Claim>>, DirectError> {
    let subject = subjects::sent_claims(sender);
    // The key within the sender's claims: `<hex id>` or `batch.<nonce>`.
    let prefix = subject.trim_end_matches('>');
    let mut known = HashMap::new();
    let (mut from, mut bytes) = (1, 0);
    loop {
        let page = reader
            .page(&subject, from, READ_BATCH, READ_MAX_BYTES)
            .await?;
        for item in &page.items {
            from = item.sequence + 1;
            bytes += item.payload.len();
            for (key, claim) in entries(prefix, item) {
                known.entry(key).or_insert_with(Vec::new).push(claim);
            }
        }
        if page.pending == 0 || page.items.is_empty() {
            return Ok(known);
        }
        if bytes >= READ_MAX_BYTES {
            tracing::warn!(%sender, bytes, "too many send claims; the oldest are not checked");
            return Ok(known);
        }
    }
}

/// The claims one stored entry holds: none for a deletion marker.
fn entries(prefix: &str, item: &Item) -> Vec<(String, Claim)> {
    if item.headers.get(subjects::KV_OPERATION_HEADER).is_some() {
        return Vec::new();
    }
    let key = item
        .headers
        .get(subjects::DIRECT_SUBJECT_HEADER)
        .and_then(|subject| subject.as_str().strip_prefix(prefix).map(str::to_string));
    match (key, std::str::from_utf8(&item.payload)) {
        (Some(key), Ok(value)) => parse(&key, value),
        _ => Vec::new(),
    }
}

/// A claim under its own key (`<hex id>`, value a [`Claim`]) or a batch
/// (`batch.<nonce>`, one `<hex id> <claim>` per line).
fn parse(key: &str, value: &str) -> Vec<(String, Claim)> {
    if key.contains('.') {
        value
            .lines()
            .filter_map(|line| {
                let (key, claim) = line.split_once(' ')?;
                Some((key.to_string(), Claim::decode(claim)?))
            })
            .collect()
    } else {
        Claim::decode(value)
            .map(|claim| vec![(key.to_string(), claim)])
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_shared::ids::ConversationId;

    fn event(conversation: &str, text: &str) -> MessageEvent {
        MessageEvent::sent(
            MessageId(7),
            ConversationId::parse(conversation).unwrap(),
            UserId::parse("alice").unwrap(),
            text.into(),
            0,
            ClientMsgId::parse("c1").unwrap(),
        )
    }

    #[test]
    fn claims_read_back_in_both_forms() {
        let claim = Claim::of(&event("group:g", "hi"));
        assert_eq!(Claim::decode(&claim.encode()), Some(claim.clone()));
        // A claim under its own key, written before digests: the id alone.
        assert_eq!(
            parse("6331", "42"),
            vec![(
                "6331".to_string(),
                Claim {
                    id: MessageId(42),
                    digest: None
                }
            )]
        );
        assert_eq!(parse("6331", "x:y"), vec![]);
        // A batch: one claim per line, a bad line skipped.
        let other = Claim {
            id: MessageId(9),
            digest: Some("ab".into()),
        };
        let batch = encode_batch(&[
            ("6331".into(), claim.clone()),
            ("6332".into(), other.clone()),
        ]);
        assert_eq!(
            parse("batch.00ff", &format!("{batch}junk\n")),
            vec![("6331".to_string(), claim), ("6332".to_string(), other)]
        );
    }

    #[test]
    fn the_digest_tells_conversation_and_text_apart() {
        let base = Claim::digest(&event("group:g", "hi"));
        assert_eq!(base, Claim::digest(&event("group:g", "hi")));
        assert_ne!(base, Claim::digest(&event("group:h", "hi")));
        assert_ne!(base, Claim::digest(&event("group:g", "hi!")));
        // The separator keeps conversation and text from running together.
        assert_ne!(
            Claim::digest(&event("group:g", "ab")),
            Claim::digest(&event("group:ga", "b"))
        );
        let claim = Claim::of(&event("group:g", "hi"));
        assert!(claim.allows(&base));
        assert!(!claim.allows(&Claim::digest(&event("group:g", "ho"))));
        let old = Claim {
            digest: None,
            ..claim
        };
        assert!(old.allows("anything"));
    }

    #[test]
    fn the_refresh_leaves_room_for_a_batch_before_the_window_ends() {
        let config = Config {
            dedup_window: Duration::from_secs(900),
            heartbeat: Duration::from_secs(25),
            heartbeat_grace: Duration::from_secs(5),
            ..Config::default()
        };
        let timing = Timing::of(&config);
        assert_eq!(timing.confirm, Duration::from_secs(110));
        assert_eq!(timing.refresh, Duration::from_secs(395));
        // A batch written at most `confirm` after a send is read by a
        // refresh no older than `refresh` at any retry a window later.
        assert!(timing.confirm + timing.refresh < config.dedup_window);
        // A window shorter than the confirmation time reads before each send.
        let short = Config {
            dedup_window: Duration::from_secs(60),
            ..config
        };
        assert_eq!(Timing::of(&short).refresh, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn only_sends_not_confirmed_by_an_open_connection_are_owed() {
        let config = Config {
            heartbeat: Duration::from_secs(1),
            heartbeat_grace: Duration::from_secs(1),
            ..Config::default()
        };
        let mut claims = SenderClaims::new(UserId::parse("alice").unwrap(), &config);
        claims.answered(&event("group:g", "old"));
        tokio::time::advance(Duration::from_secs(6)).await;
        claims.answered(&event("group:g", "new"));
        claims.still_open();
        let owed: Vec<_> = claims.answered.iter().map(|(_, _, c)| c.clone()).collect();
        assert_eq!(owed, vec![Claim::of(&event("group:g", "new"))]);
        // A publish that never settled is owed as well.
        claims.trying(&event("group:g", "lost"));
        assert!(claims.trying.is_some());
        claims.answered(&event("group:g", "lost"));
        assert!(claims.trying.is_none());
    }
}
