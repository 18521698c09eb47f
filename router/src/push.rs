//! Push jobs: after a message is in every inbox, each member other than the
//! sender who has devices with a push token that are not connected gets a
//! job on `chat.push.<user>` (stream PUSH, work queue) for pushd, naming
//! those devices. A read (router/src/receipts.rs) or a delete retracts the
//! notification with a [`RetractJob`] on the same subject.
//!
//! Deciding asks no database: the presence record lists the connected
//! devices, the push bucket the devices with a token (written by the
//! persister), both read through short, bounded caches. A user whose
//! devices are all connected costs no JetStream write.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use chat_shared::ids::{ConversationId, DeviceId, MessageId, UserId};
use chat_shared::presence::PresenceRecord;
use chat_shared::push::{preview, PushDevices, PushJob, RetractJob, RetractReason};
use chat_shared::subjects;
use chat_shared::telemetry::TraceId;
use chat_shared::wire::MessageEvent;
use futures::StreamExt;
use serde::de::DeserializeOwned;

use crate::metrics::RouterMetrics;

/// Bucket reads in flight for one message.
const PRESENCE_READS: usize = 32;
/// A presence answer is reused this long: a group chat's burst asks about
/// the same members again and again, and presence itself is debounced by
/// seconds, so this adds no meaningful staleness.
const PRESENCE_CACHE: Duration = Duration::from_secs(2);
/// A user's token devices are reused this long: they change only when a
/// device registers or unregisters, which a message racing it cannot tell
/// apart from a registration a moment later.
const TOKENS_CACHE: Duration = Duration::from_secs(5);
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
    /// Shared by the lookups of one message's recipients: a clone per
    /// recipient is a pointer, not two KV handles with their stream info.
    lookup: Arc<Lookup>,
    metrics: Arc<RouterMetrics>,
}

/// The two buckets the decision reads, each through its cache; cheap to
/// clone into the futures of one message's members.
#[derive(Clone)]
struct Lookup {
    presence: kv::Store,
    online: Cache<PresenceRecord>,
    tokens: kv::Store,
    token_devices: Cache<PushDevices>,
}

impl Lookup {
    /// `user`'s target from the caches alone, if both answers are fresh:
    /// most recipients of a busy conversation are, and answering them here
    /// spares a future per recipient (a set of them cost the router more
    /// allocator time than the rest of a DM's routing).
    fn cached(&self, user: &UserId) -> Option<Target> {
        let record = self.online.get(user)?;
        let devices = self.token_devices.get(user)?;
        Some(target(record.as_deref(), devices.as_deref()))
    }

    async fn target(self: Arc<Self>, user: UserId) -> (UserId, Target) {
        let (record, devices) = futures::join!(
            read(
                &self.presence,
                &self.online,
                &user,
                subjects::presence_key(&user)
            ),
            read(
                &self.tokens,
                &self.token_devices,
                &user,
                subjects::push_devices_key(&user)
            ),
        );
        let target = target(record.as_deref(), devices.as_deref());
        (user, target)
    }
}

/// Which of a user's devices a message is pushed to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// All connected, or no token: no job.
    Nobody,
    /// These devices hold a token and are not connected.
    Devices(Vec<DeviceId>),
    /// Token devices unknown (registered before the push bucket) and the
    /// user offline: every token, as before per-device push.
    Every,
}

/// The one place the decision is made. A record that could not be read
/// counts as nobody connected: a needless notification beats a missing one.
fn target(presence: Option<&PresenceRecord>, tokens: Option<&PushDevices>) -> Target {
    let connected = |device: &DeviceId| presence.is_some_and(|p| p.is_connected(device));
    match tokens {
        Some(tokens) => {
            let devices: Vec<DeviceId> = tokens
                .devices
                .iter()
                .filter(|d| !connected(d))
                .cloned()
                .collect();
            if devices.is_empty() {
                Target::Nobody
            } else {
                Target::Devices(devices)
            }
        }
        None if presence.is_some_and(PresenceRecord::is_online) => Target::Nobody,
        None => Target::Every,
    }
}

impl PushJobs {
    pub fn new(
        js: jetstream::Context,
        presence: kv::Store,
        tokens: kv::Store,
        metrics: Arc<RouterMetrics>,
    ) -> Self {
        let lookup = Arc::new(Lookup {
            presence,
            online: Cache::new(PRESENCE_CACHE),
            tokens,
            token_devices: Cache::new(TOKENS_CACHE),
        });
        Self {
            js,
            lookup,
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
        let mut targets = Vec::new();
        let mut misses = Vec::new();
        for user in push_candidates(members, &event.from) {
            match self.lookup.cached(&user) {
                Some(target) => targets.push((user, target)),
                None => misses.push(user),
            }
        }
        if !misses.is_empty() {
            let lookup = self.lookup.clone();
            // Owned futures only: a stream of futures borrowing `self` trips
            // the compiler's `Send` inference for the spawned lane task.
            let read: Vec<(UserId, Target)> = futures::stream::iter(misses)
                .map(move |user| lookup.clone().target(user))
                .buffer_unordered(PRESENCE_READS)
                .collect()
                .await;
            targets.extend(read);
        }
        let event_id = event.id.to_string();
        // One preview for every job: a job never carries the whole text
        // ("📷 Photo" for a picture without text).
        let text = preview(&event.summary());
        let mut acks = Vec::with_capacity(targets.len());
        for (user, target) in targets {
            let devices = match target {
                Target::Nobody => continue,
                Target::Devices(devices) => Some(devices),
                Target::Every => None,
            };
            let job = PushJob {
                user: user.clone(),
                conversation: event.conversation.clone(),
                id: event.id,
                from: event.from.clone(),
                text: text.clone(),
                ts: event.ts as i64,
                devices,
                mentioned: event.mentions.contains(&user),
            };
            let dedup = subjects::push_dedup_id(&event_id, &user);
            acks.push(self.publish(&user, &job, &dedup, trace).await?);
        }
        // At most a group's worth (100) in flight: bounded by the group limit.
        let jobs = acks.len() as u64;
        for ack in acks {
            ack.await.map_err(PushError::Unacknowledged)?;
        }
        self.metrics.push_jobs_emitted(jobs);
        Ok(())
    }

    /// Withdraws `user`'s notification about `conversation` on their
    /// devices that are not connected (a connected device learns of the
    /// read or delete from its inbox and clears its own): after a read up
    /// to `up_to` (router/src/receipts.rs), or after the message `up_to`
    /// was deleted (the delete path calls this for each member but the
    /// deleter). A user with no such device costs no write; a repeat of the
    /// same retraction is de-duplicated.
    pub async fn retract(
        &self,
        user: &UserId,
        conversation: &ConversationId,
        up_to: MessageId,
        reason: RetractReason,
    ) -> Result<(), PushError> {
        let devices = match self.lookup.clone().target(user.clone()).await.1 {
            Target::Nobody => return Ok(()),
            Target::Devices(devices) => Some(devices),
            Target::Every => None,
        };
        let job = RetractJob {
            user: user.clone(),
            conversation: conversation.clone(),
            retract: reason,
            up_to,
            devices,
        };
        let dedup = subjects::retract_dedup_id(reason, conversation, up_to, user);
        self.publish(user, &job, &dedup, None)
            .await?
            .await
            .map_err(PushError::Unacknowledged)?;
        self.metrics.push_jobs_emitted(1);
        Ok(())
    }

    async fn publish(
        &self,
        user: &UserId,
        job: &impl serde::Serialize,
        dedup: &str,
        trace: Option<TraceId>,
    ) -> Result<jetstream::context::PublishAckFuture, PushError> {
        let body = serde_json::to_vec(job)?;
        let mut headers = HeaderMap::new();
        headers.insert(subjects::MSG_ID_HEADER, dedup);
        if let Some(trace) = trace {
            trace.add_to(&mut headers);
        }
        self.js
            .publish_with_headers(subjects::push(user), headers, body.into())
            .await
            .map_err(PushError::Publish)
    }
}

/// Who may get a push job for a message: every member but its sender, who
/// wrote it and needs no notification of it, online or not.
fn push_candidates(members: &[UserId], from: &UserId) -> Vec<UserId> {
    members.iter().filter(|m| *m != from).cloned().collect()
}

/// A cached answer (`None`: no record) and when it was read.
type Entry<V> = (Option<Arc<V>>, Instant);

/// Recent answers of one bucket per user, bounded in age and number.
struct Cache<V> {
    entries: Arc<Mutex<HashMap<UserId, Entry<V>>>>,
    ttl: Duration,
}

impl<V> Clone for Cache<V> {
    fn clone(&self) -> Self {
        Self {
            entries: self.entries.clone(),
            ttl: self.ttl,
        }
    }
}

impl<V> Cache<V> {
    fn new(ttl: Duration) -> Self {
        Self {
            entries: Arc::default(),
            ttl,
        }
    }

    /// The cached answer, if fresh: `Some(None)` is a cached absence.
    fn get(&self, user: &UserId) -> Option<Option<Arc<V>>> {
        let entries = self.entries.lock().ok()?;
        let (value, at) = entries.get(user)?;
        (at.elapsed() < self.ttl).then(|| value.clone())
    }

    fn put(&self, user: UserId, value: Option<Arc<V>>) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= PRESENCE_CACHE_MAX {
                let ttl = self.ttl;
                entries.retain(|_, (_, at)| at.elapsed() < ttl);
                if entries.len() >= PRESENCE_CACHE_MAX {
                    entries.clear();
                }
            }
            entries.insert(user, (value, Instant::now()));
        }
    }
}

/// `user`'s record at `key` in `store`, through `cache`. A record that
/// cannot be read or decoded is taken as absent (and not cached).
async fn read<V: DeserializeOwned>(
    store: &kv::Store,
    cache: &Cache<V>,
    user: &UserId,
    key: String,
) -> Option<Arc<V>> {
    let what = store.name.as_str();
    if let Some(cached) = cache.get(user) {
        return cached;
    }
    let value = match store.get(key).await {
        Ok(Some(bytes)) => match serde_json::from_slice::<V>(&bytes) {
            Ok(value) => Some(Arc::new(value)),
            Err(e) => {
                tracing::warn!(%user, error = %e, what, "unreadable record; taken as absent");
                return None;
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(%user, error = %e, what, "cannot read a bucket; taken as absent");
            return None;
        }
    };
    cache.put(user.clone(), value.clone());
    value
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

    fn devices(names: &[&str]) -> Vec<DeviceId> {
        names.iter().map(|n| DeviceId::parse(*n).unwrap()).collect()
    }

    fn record(online: bool, connected: Option<&[&str]>) -> PresenceRecord {
        PresenceRecord {
            status: if online {
                chat_shared::wire::PresenceStatus::Online
            } else {
                chat_shared::wire::PresenceStatus::Offline
            },
            last_active: 1,
            devices: connected.map(devices),
        }
    }

    #[test]
    fn only_token_devices_that_are_not_connected_are_pushed() {
        let tokens = PushDevices {
            devices: devices(&["phone", "tablet"]),
        };
        // The laptop is online, the phone and tablet are not.
        let laptop = record(true, Some(&["laptop"]));
        assert_eq!(
            target(Some(&laptop), Some(&tokens)),
            Target::Devices(devices(&["phone", "tablet"]))
        );
        let phone_on = record(true, Some(&["laptop", "phone"]));
        assert_eq!(
            target(Some(&phone_on), Some(&tokens)),
            Target::Devices(devices(&["tablet"]))
        );
        // All token devices connected: no job, no write.
        let all = record(true, Some(&["phone", "tablet"]));
        assert_eq!(target(Some(&all), Some(&tokens)), Target::Nobody);
        // No token: nobody, online or not.
        let none = PushDevices { devices: vec![] };
        assert_eq!(target(None, Some(&none)), Target::Nobody);
        // Offline, or no record at all: every token device.
        assert_eq!(
            target(None, Some(&tokens)),
            Target::Devices(devices(&["phone", "tablet"]))
        );
        // An old record without devices: the user's status decides.
        assert_eq!(
            target(Some(&record(true, None)), Some(&tokens)),
            Target::Nobody
        );
        // Token devices unknown: as before per-device push.
        assert_eq!(target(Some(&laptop), None), Target::Nobody);
        assert_eq!(target(Some(&record(false, Some(&[]))), None), Target::Every);
        assert_eq!(target(None, None), Target::Every);
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
