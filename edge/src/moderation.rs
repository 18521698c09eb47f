//! Operators' bans, kicks and token revocations (`chatctl user …`), as this
//! edge enforces them.
//!
//! An in-memory copy of the `chat_moderation` bucket answers `hello` and
//! `refresh` without a NATS round trip. Two paths fill it: the notices on
//! `chat.mod.<user>` (at once, but core NATS may lose one) and one watcher
//! of the bucket per edge (made afresh after each reconnect, so a lost
//! notice is made up within moments). Both carry KV revisions and the newer
//! one wins, so their order does not matter. A change that shuts a user out
//! closes the user's sessions on this edge with 4001, through the hub.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use chat_shared::clock::now_secs;
use chat_shared::consume::Backoff;
use chat_shared::ids::UserId;
use chat_shared::moderation::{Ban, Notice, Revocation};
use chat_shared::nats::Link;
use chat_shared::subjects::{self, ModerationKey};
use chat_shared::sync::lock;
use chat_shared::StartError;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use crate::hub::Hub;

/// How long the first read of the bucket may wait for its next entry.
const LOAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How soon a watcher that failed is made again.
const REWATCH_DELAY: Duration = Duration::from_secs(1);
/// The close reason of a kick (no record: the user may come back at once).
const KICKED: &str = "kicked by an operator";

/// Why a user is shut out; the text is what the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("banned by an operator")]
    Banned,
    #[error("token revoked by an operator; sign in again")]
    Revoked,
}

impl Refusal {
    /// The close frame's reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Banned => "banned",
            Self::Revoked => "token revoked",
        }
    }
}

/// One key's newest known value and its KV revision. A deletion is kept as
/// `None` with its revision, so an older notice cannot bring the value back.
struct Versioned<T> {
    revision: u64,
    value: Option<T>,
}

impl<T> Default for Versioned<T> {
    fn default() -> Self {
        Self {
            revision: 0,
            value: None,
        }
    }
}

impl<T> Versioned<T> {
    /// Takes `value` if `revision` is newer; whether it did.
    fn set(&mut self, revision: u64, value: Option<T>) -> bool {
        if revision <= self.revision {
            return false;
        }
        self.revision = revision;
        self.value = value;
        true
    }
}

#[derive(Default)]
struct Standing {
    ban: Versioned<Ban>,
    revocation: Versioned<Revocation>,
}

enum Change {
    Ban(Option<Ban>),
    Revoke(Option<Revocation>),
}

/// This edge's copy of the bucket: one entry per user an operator ever
/// banned or revoked (operator actions, so it stays small).
#[derive(Default)]
pub struct Moderation {
    users: Mutex<HashMap<UserId, Standing>>,
}

impl Moderation {
    /// Whether `user`, with a token issued at `issued_at`, may be served.
    pub fn admits(&self, user: &UserId, issued_at: Option<u64>) -> Result<(), Refusal> {
        self.admits_at(user, issued_at, now_secs())
    }

    fn admits_at(&self, user: &UserId, issued_at: Option<u64>, now: u64) -> Result<(), Refusal> {
        let users = lock(&self.users);
        let Some(standing) = users.get(user) else {
            return Ok(());
        };
        if standing.ban.value.as_ref().is_some_and(|b| b.holds_at(now)) {
            return Err(Refusal::Banned);
        }
        if standing
            .revocation
            .value
            .as_ref()
            .is_some_and(|r| r.revokes(issued_at))
        {
            return Err(Refusal::Revoked);
        }
        Ok(())
    }

    /// Records `change` of `user` at `revision`; the refusal the user's open
    /// sessions now get, if the change is news and shuts them out.
    fn apply(&self, user: &UserId, revision: u64, change: Change, now: u64) -> Option<Refusal> {
        let mut users = lock(&self.users);
        let standing = users.entry(user.clone()).or_default();
        match change {
            Change::Ban(ban) => {
                let holds = ban.as_ref().is_some_and(|b| b.holds_at(now));
                (standing.ban.set(revision, ban) && holds).then_some(Refusal::Banned)
            }
            Change::Revoke(revocation) => {
                let revokes = revocation.is_some();
                (standing.revocation.set(revision, revocation) && revokes)
                    .then_some(Refusal::Revoked)
            }
        }
    }

    /// Applies a change and closes the user's sessions here if it says so.
    fn enforce(&self, hub: &Hub, user: &UserId, revision: u64, change: Change) {
        if let Some(refusal) = self.apply(user, revision, change, now_secs()) {
            tracing::info!(%user, reason = refusal.reason(), "closing the user's sessions");
            hub.kick(user, refusal.reason());
        }
    }

    fn entry(&self, hub: &Hub, entry: &kv::Entry) {
        let Some(key) = subjects::parse_moderation_key(&entry.key) else {
            tracing::warn!(key = %entry.key, "ignoring an unknown moderation key");
            return;
        };
        let put = matches!(entry.operation, Operation::Put);
        let (user, change) = match key {
            ModerationKey::Ban(user) => {
                let Some(ban) = value(put, entry) else { return };
                (user, Change::Ban(ban))
            }
            ModerationKey::Revoke(user) => {
                let Some(revocation) = value(put, entry) else {
                    return;
                };
                (user, Change::Revoke(revocation))
            }
        };
        self.enforce(hub, &user, entry.revision, change);
    }

    fn notice(&self, hub: &Hub, message: &async_nats::Message) {
        let Some(user) = subjects::parse_moderation_notice(&message.subject) else {
            tracing::warn!(subject = %message.subject, "ignoring a notice for no valid user");
            return;
        };
        match serde_json::from_slice::<Notice>(&message.payload) {
            Ok(Notice::Kick) => {
                tracing::info!(%user, "kicked by an operator");
                hub.kick(&user, KICKED);
            }
            Ok(Notice::Ban { revision, ban }) => {
                self.enforce(hub, &user, revision, Change::Ban(Some(ban)))
            }
            Ok(Notice::Revoke {
                revision,
                revocation,
            }) => self.enforce(hub, &user, revision, Change::Revoke(Some(revocation))),
            Err(e) => tracing::warn!(%user, error = %e, "ignoring a malformed moderation notice"),
        }
    }
}

/// A put's value (`Some(Some(_))`), a deletion (`Some(None)`), or `None`
/// for a value that does not parse (logged; chatctl writes no such thing).
fn value<T: DeserializeOwned>(put: bool, entry: &kv::Entry) -> Option<Option<T>> {
    if !put {
        return Some(None);
    }
    match serde_json::from_slice(&entry.value) {
        Ok(value) => Some(Some(value)),
        Err(e) => {
            tracing::error!(key = %entry.key, error = %e, "ignoring a malformed moderation record");
            None
        }
    }
}

/// Reads the whole bucket, then follows it and the notices until `stop`.
/// Returns once the copy is complete, so the edge refuses a banned user
/// from its first connection on.
pub async fn start(
    nats: async_nats::Client,
    store: kv::Store,
    hub: Arc<Hub>,
    link: watch::Receiver<Link>,
    stop: watch::Receiver<bool>,
) -> Result<(Arc<Moderation>, tokio::task::JoinHandle<()>), StartError> {
    let moderation = Arc::new(Moderation::default());
    // Subscribed before the bucket is read: a notice sent meanwhile is not lost.
    let notices = nats
        .subscribe(subjects::ALL_MODERATION_NOTICES)
        .await
        .map_err(|source| StartError::Subscribe {
            subject: subjects::ALL_MODERATION_NOTICES,
            source,
        })?;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let watch = loop {
        match load(&store, &moderation, &hub).await {
            Ok(watch) => break watch,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the moderation bucket; retrying");
                backoff.wait().await;
            }
        }
    };
    let task = tokio::spawn(follow(
        moderation.clone(),
        store,
        hub,
        notices,
        watch,
        link,
        stop,
    ));
    Ok((moderation, task))
}

/// Why the moderation bucket could not be read (start-up retries).
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("watching the bucket: {0}")]
    Watch(#[from] kv::WatchError),
    #[error("reading the bucket's status: {0}")]
    Status(#[from] kv::StatusError),
    #[error("reading an entry: {0}")]
    Entry(#[from] kv::WatcherError),
    #[error("no entry in time")]
    Slow,
    #[error("the watcher ended")]
    Ended,
}

/// A watcher of every key, after it delivered the bucket as it is now.
async fn load(
    store: &kv::Store,
    moderation: &Moderation,
    hub: &Hub,
) -> Result<kv::Watch, LoadError> {
    let mut watch = store.watch_with_history(">").await?;
    // An empty bucket delivers nothing to wait for. Asked after the watcher
    // exists: anything stored by then is delivered to it.
    let stored = store.status().await?.values();
    if stored == 0 {
        return Ok(watch);
    }
    loop {
        let entry = tokio::time::timeout(LOAD_TIMEOUT, watch.next())
            .await
            .map_err(|_| LoadError::Slow)?
            .ok_or(LoadError::Ended)??;
        moderation.entry(hub, &entry);
        if entry.delta == 0 {
            return Ok(watch);
        }
    }
}

async fn next_entry(watch: &mut Option<kv::Watch>) -> Option<Result<kv::Entry, kv::WatcherError>> {
    match watch {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}

async fn follow(
    moderation: Arc<Moderation>,
    store: kv::Store,
    hub: Arc<Hub>,
    mut notices: async_nats::Subscriber,
    watch: kv::Watch,
    mut link: watch::Receiver<Link>,
    stop: watch::Receiver<bool>,
) {
    let stopped = chat_shared::shutdown::wait(stop);
    tokio::pin!(stopped);
    let mut watch = Some(watch);
    let mut rewatch_at: Option<Instant> = None;
    let mut gaps_seen = link.borrow_and_update().gaps;
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            notice = notices.next() => match notice {
                Some(message) => moderation.notice(&hub, &message),
                // Only a closed client ends a subscription.
                None => return,
            },
            entry = next_entry(&mut watch) => match entry {
                Some(Ok(entry)) => moderation.entry(&hub, &entry),
                ended => {
                    if let Some(Err(e)) = ended {
                        tracing::warn!(error = %e, "moderation watcher failed");
                    }
                    watch = None;
                    rewatch_at = Some(Instant::now() + REWATCH_DELAY);
                }
            },
            _ = sleep_until(rewatch_at.unwrap_or_else(Instant::now)), if rewatch_at.is_some() => {
                // Replays the last value of every key; the revisions make
                // what this edge already knows a no-op.
                match store.watch_with_history(">").await {
                    Ok(fresh) => {
                        watch = Some(fresh);
                        rewatch_at = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch the moderation bucket");
                        rewatch_at = Some(Instant::now() + REWATCH_DELAY);
                    }
                }
            }
            changed = link.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = *link.borrow_and_update();
                // Notices published while the link was down are lost; a
                // fresh watcher reads what they said from the bucket.
                if now.connected && now.gaps != gaps_seen {
                    gaps_seen = now.gaps;
                    watch = None;
                    rewatch_at = Some(Instant::now());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> UserId {
        UserId::parse("alice").unwrap()
    }

    #[test]
    fn a_ban_refuses_until_it_ends_or_is_lifted() {
        let m = Moderation::default();
        let ban = Ban {
            at: 100,
            until: Some(200),
        };
        assert_eq!(
            m.apply(&alice(), 1, Change::Ban(Some(ban)), 100),
            Some(Refusal::Banned)
        );
        assert_eq!(m.admits_at(&alice(), Some(50), 150), Err(Refusal::Banned));
        assert_eq!(m.admits_at(&alice(), Some(50), 200), Ok(()));
        // Lifted, then an older notice of the ban arrives: it stays lifted.
        assert_eq!(m.apply(&alice(), 2, Change::Ban(None), 150), None);
        let again = Ban {
            at: 100,
            until: None,
        };
        assert_eq!(m.apply(&alice(), 1, Change::Ban(Some(again)), 150), None);
        assert_eq!(m.admits_at(&alice(), Some(50), 150), Ok(()));
        let bob = UserId::parse("bob").unwrap();
        assert_eq!(m.admits_at(&bob, None, 150), Ok(()));
    }

    #[test]
    fn an_expired_ban_closes_nothing() {
        let m = Moderation::default();
        let past = Ban {
            at: 10,
            until: Some(20),
        };
        assert_eq!(m.apply(&alice(), 1, Change::Ban(Some(past)), 100), None);
        assert_eq!(m.admits_at(&alice(), None, 100), Ok(()));
    }

    #[test]
    fn a_revocation_refuses_older_tokens_only_and_each_change_once() {
        let m = Moderation::default();
        let change = || Change::Revoke(Some(Revocation { at: 100 }));
        assert_eq!(m.apply(&alice(), 3, change(), 100), Some(Refusal::Revoked));
        // The watcher delivering what the notice already said: no second close.
        assert_eq!(m.apply(&alice(), 3, change(), 100), None);
        assert_eq!(m.admits_at(&alice(), Some(99), 100), Err(Refusal::Revoked));
        assert_eq!(m.admits_at(&alice(), None, 100), Err(Refusal::Revoked));
        assert_eq!(m.admits_at(&alice(), Some(101), 101), Ok(()));
    }
}
