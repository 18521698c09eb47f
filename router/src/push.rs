//! Push jobs: after a message is in every inbox, each member other than the
//! sender whose presence record says offline gets a job on
//! `chat.push.<user>` (stream PUSH, work queue) for pushd.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use chat_shared::ids::UserId;
use chat_shared::presence::PresenceRecord;
use chat_shared::push::{preview, PushJob};
use chat_shared::subjects;
use chat_shared::telemetry::TraceId;
use chat_shared::wire::MessageEvent;
use futures::StreamExt;

use crate::metrics::RouterMetrics;

/// Presence reads in flight for one message.
const PRESENCE_READS: usize = 32;
/// A presence answer is reused this long: a group chat's burst asks about
/// the same members again and again, and presence itself is debounced by
/// seconds, so this adds no meaningful staleness.
const PRESENCE_CACHE: Duration = Duration::from_secs(2);
/// Bound on cached answers, so the cache cannot grow with the user base.
const PRESENCE_CACHE_MAX: usize = 100_000;

/// Why the push jobs of a message were not all stored; the router retries
/// the message.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("encoding a push job: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("publishing a push job: {0}")]
    Publish(jetstream::context::PublishError),
    #[error("a push job was not acknowledged: {0}")]
    Unacknowledged(jetstream::context::PublishError),
}

pub struct PushJobs {
    js: jetstream::Context,
    presence: kv::Store,
    online: PresenceCache,
    metrics: Arc<RouterMetrics>,
}

type PresenceCache = Arc<Mutex<HashMap<UserId, (bool, Instant)>>>;

impl PushJobs {
    pub fn new(js: jetstream::Context, presence: kv::Store, metrics: Arc<RouterMetrics>) -> Self {
        Self {
            js,
            presence,
            online: PresenceCache::default(),
            metrics,
        }
    }

    /// Emits the jobs for `event` (with its trace id) and waits for their
    /// PubAcks; an error makes the router retry the event (appends and jobs
    /// de-duplicate).
    pub async fn emit(
        &self,
        event: &MessageEvent,
        members: &[UserId],
        trace: Option<TraceId>,
    ) -> Result<(), PushError> {
        let candidates = push_candidates(members, &event.from);
        let (presence, cache) = (self.presence.clone(), self.online.clone());
        // Owned futures only: a stream of futures borrowing `self` trips
        // the compiler's `Send` inference for the spawned lane task.
        let checks: Vec<(UserId, bool)> = futures::stream::iter(candidates)
            .map(move |user| is_online(presence.clone(), cache.clone(), user))
            .buffer_unordered(PRESENCE_READS)
            .collect()
            .await;
        let offline: Vec<UserId> = checks
            .into_iter()
            .filter(|(_, online)| !online)
            .map(|(user, _)| user)
            .collect();
        let event_id = event.id.to_string();
        // One preview for every job: a job never carries the whole text.
        let text = preview(&event.text);
        let mut acks = Vec::with_capacity(offline.len());
        for user in &offline {
            let job = PushJob {
                user: user.clone(),
                conversation: event.conversation.clone(),
                id: event.id,
                from: event.from.clone(),
                text: text.clone(),
                ts: event.ts as i64,
            };
            let body = serde_json::to_vec(&job)?;
            let mut headers = HeaderMap::new();
            headers.insert(
                subjects::MSG_ID_HEADER,
                subjects::push_dedup_id(&event_id, user).as_str(),
            );
            if let Some(trace) = trace {
                trace.add_to(&mut headers);
            }
            let ack = self
                .js
                .publish_with_headers(subjects::push(user), headers, body.into())
                .await
                .map_err(PushError::Publish)?;
            acks.push(ack);
        }
        // At most a group's worth (100) in flight: bounded by the group limit.
        let jobs = acks.len() as u64;
        for ack in acks {
            ack.await.map_err(PushError::Unacknowledged)?;
        }
        self.metrics.push_jobs_emitted(jobs);
        Ok(())
    }
}

/// Who may get a push job for a message: every member but its sender, who
/// wrote it and needs no notification of it, online or not.
fn push_candidates(members: &[UserId], from: &UserId) -> Vec<UserId> {
    members.iter().filter(|m| *m != from).cloned().collect()
}

/// Whether `user` is online per the presence bucket. If it cannot be read, the user is
/// taken as offline: a needless notification beats a missing one.
async fn is_online(presence: kv::Store, cache: PresenceCache, user: UserId) -> (UserId, bool) {
    if let Ok(entries) = cache.lock() {
        if let Some((online, at)) = entries.get(&user) {
            if at.elapsed() < PRESENCE_CACHE {
                return (user, *online);
            }
        }
    }
    let online = match presence.get(subjects::presence_key(&user)).await {
        Ok(Some(bytes)) => serde_json::from_slice::<PresenceRecord>(&bytes)
            .map(|record| record.is_online())
            .unwrap_or(false),
        Ok(None) => false,
        Err(e) => {
            tracing::warn!(%user, error = %e, "cannot read presence; pushing anyway");
            false
        }
    };
    if let Ok(mut entries) = cache.lock() {
        if entries.len() >= PRESENCE_CACHE_MAX {
            entries.retain(|_, (_, at)| at.elapsed() < PRESENCE_CACHE);
            if entries.len() >= PRESENCE_CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(user.clone(), (online, Instant::now()));
    }
    (user, online)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(names: &[&str]) -> Vec<UserId> {
        names.iter().map(|n| UserId::parse(*n).unwrap()).collect()
    }

    #[test]
    fn the_sender_is_never_a_push_candidate() {
        let alice = UserId::parse("alice").unwrap();
        // A conversation of two: only the other one.
        assert_eq!(
            push_candidates(&users(&["alice", "bob"]), &alice),
            users(&["bob"])
        );
        // A group: everyone else, in member order.
        assert_eq!(
            push_candidates(&users(&["bob", "alice", "carol", "dave"]), &alice),
            users(&["bob", "carol", "dave"])
        );
        // Writing to yourself notifies nobody.
        assert!(push_candidates(&users(&["alice"]), &alice).is_empty());
    }

    #[test]
    fn a_sender_outside_the_member_list_removes_nobody() {
        // A sender that just left a group: every remaining member may be
        // notified, and nobody is dropped for sharing a prefix with her.
        let alice = UserId::parse("alice").unwrap();
        assert_eq!(
            push_candidates(&users(&["alice2", "bob", "carol"]), &alice),
            users(&["alice2", "bob", "carol"])
        );
    }
}
