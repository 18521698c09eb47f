//! What the leader says: presence changes to the bucket, the public subject
//! and online friends; typing to the other members.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use chat_shared::blocks::BlockCache;
use chat_shared::ids::{ConversationId, UserId};
use chat_shared::membership::GroupCache;
use chat_shared::presence::{self, FriendChange, PresenceRecord, TypingEvent};
use chat_shared::rpc;
use chat_shared::subjects;
use chat_shared::wire::{PresenceEvent, PresenceStatus, ServerFrame};
use futures::StreamExt;
use tokio::time::Instant;

use crate::metrics::PresenceMetrics;
use crate::now_ms;
use crate::tracker::{Change, Tracker};

/// PROTOCOL.md: typing lapses after 6 s without a refresh.
const TYPING_LAPSE: Duration = Duration::from_secs(6);
/// A friend list is refetched after this long even without a change event
/// (which core NATS may lose in a disconnect).
const FRIENDS_TTL: Duration = Duration::from_secs(60);

pub struct Speaker {
    nats: async_nats::Client,
    store: kv::Store,
    groups: GroupCache,
    blocks: BlockCache,
    /// Each user's friends with no block between them, and whether the
    /// user shows them `last_active`.
    friends: HashMap<UserId, (Arc<rpc::PresenceAudience>, Instant)>,
    typing: HashMap<(ConversationId, UserId), Instant>,
    metrics: Arc<PresenceMetrics>,
}

impl Speaker {
    pub fn new(
        nats: async_nats::Client,
        store: kv::Store,
        groups: GroupCache,
        blocks: BlockCache,
        metrics: Arc<PresenceMetrics>,
    ) -> Self {
        Self {
            nats,
            store,
            groups,
            blocks,
            friends: HashMap::new(),
            typing: HashMap::new(),
            metrics,
        }
    }

    async fn announce(&mut self, tracker: &Tracker, changes: Vec<Change>) {
        for change in changes {
            self.announce_one(tracker, change).await;
        }
    }

    /// Announces `changes`, then rewrites the records of the users whose
    /// connected devices changed (`devices`, from
    /// [`Tracker::take_device_changes`]) without telling anyone: friends
    /// see no presence frame for a second device. A user announced now is
    /// written once, by the announcement.
    pub async fn speak(&mut self, tracker: &Tracker, changes: Vec<Change>, devices: Vec<Change>) {
        let announced: HashSet<UserId> = changes.iter().map(|c| c.user.clone()).collect();
        self.announce(tracker, changes).await;
        for change in devices.into_iter().filter(|c| !announced.contains(&c.user)) {
            self.store(tracker, &change).await;
        }
    }

    /// The user's record: `change`'s status with the devices connected now.
    async fn store(&self, tracker: &Tracker, change: &Change) {
        let record = PresenceRecord {
            status: change.status,
            last_active: change.last_active,
            devices: Some(tracker.devices_of(&change.user)),
        };
        match serde_json::to_vec(&record) {
            Ok(body) => {
                if let Err(e) = self
                    .store
                    .put(subjects::presence_key(&change.user), body.into())
                    .await
                {
                    tracing::warn!(user = %change.user, error = %e, "cannot store presence");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode presence"),
        }
    }

    /// One KV write, one public event, one frame per online friend.
    #[tracing::instrument(skip_all, fields(user = %change.user))]
    async fn announce_one(&mut self, tracker: &Tracker, change: Change) {
        self.store(tracker, &change).await;
        let event = PresenceEvent {
            user: change.user,
            status: change.status,
            last_active: change.last_active,
        };
        tracing::debug!(user = %event.user, status = ?event.status, "presence change");
        self.metrics.announced(event.status);
        if let Ok(body) = serde_json::to_vec(&event) {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                subjects::MSG_ID_HEADER,
                subjects::presence_event_id(&event.user, event.status, event.last_active).as_str(),
            );
            if let Err(e) = self
                .nats
                .publish_with_headers(subjects::presence(&event.user), headers, body.into())
                .await
            {
                tracing::warn!(error = %e, "cannot publish presence");
            }
        }
        let Some(audience) = self.friends_of(&event.user).await else {
            return;
        };
        let frame =
            ServerFrame::Presence(presence::as_seen(event, audience.shows_last_active)).to_json();
        for friend in audience
            .friends
            .iter()
            .map(|peer| &peer.user)
            .filter(|f| tracker.is_online(f))
        {
            self.publish(subjects::deliver(friend), frame.clone().into_bytes())
                .await;
        }
    }

    async fn publish(&self, subject: String, body: Vec<u8>) {
        if let Err(e) = self.nats.publish(subject, body.into()).await {
            tracing::warn!(error = %e, "cannot publish presence");
        }
    }

    async fn friends_of(&mut self, user: &UserId) -> Option<Arc<rpc::PresenceAudience>> {
        if let Some((friends, at)) = self.friends.get(user) {
            if at.elapsed() < FRIENDS_TTL {
                return Some(friends.clone());
            }
        }
        match rpc::call::<rpc::FriendsOf>(&self.nats, &rpc::UserRequest { user: user.clone() })
            .await
        {
            Ok(friends) => {
                let friends = Arc::new(friends);
                self.friends
                    .insert(user.clone(), (friends.clone(), Instant::now()));
                Some(friends)
            }
            Err(e) => {
                tracing::warn!(%user, error = %e, "no friend list; presence not fanned out");
                None
            }
        }
    }

    /// Forgets both friend lists; new friends learn each other's presence
    /// at once rather than at the next change.
    #[tracing::instrument(skip_all, fields(users = ?change.users))]
    pub async fn friends_changed(&mut self, change: &FriendChange, is_leader: bool) {
        for user in &change.users {
            self.friends.remove(user);
        }
        if !(is_leader && change.friends) {
            return;
        }
        let [a, b] = &change.users;
        for (about, to) in [(a, b), (b, a)] {
            let shows = !change.hides_last_active.contains(about);
            let record = match self.store.get(subjects::presence_key(about)).await {
                Ok(Some(bytes)) => serde_json::from_slice::<PresenceRecord>(&bytes).ok(),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read presence");
                    None
                }
            };
            let record = record.unwrap_or(PresenceRecord {
                status: PresenceStatus::Offline,
                last_active: 0,
                devices: None,
            });
            let event = PresenceEvent {
                user: about.clone(),
                status: record.status,
                last_active: record.last_active,
            };
            let frame = ServerFrame::Presence(presence::as_seen(event, shows));
            self.publish(subjects::deliver(to), frame.to_json().into_bytes())
                .await;
        }
    }

    /// Forwards `user`'s typing in a conversation to its other members'
    /// online devices.
    #[tracing::instrument(skip_all, fields(%user, conversation = %event.conversation))]
    pub async fn typing(
        &mut self,
        tracker: &Tracker,
        user: UserId,
        event: TypingEvent,
        now: Instant,
    ) {
        let key = (event.conversation, user);
        if event.active {
            self.typing.insert(key.clone(), now + TYPING_LAPSE);
        } else {
            self.typing.remove(&key);
        }
        self.send_typing(tracker, key.0, key.1, event.active).await;
    }

    /// Tells the members of every typing that lapsed.
    pub async fn lapse_typing(&mut self, tracker: &Tracker, now: Instant) {
        let lapsed: Vec<(ConversationId, UserId)> = self
            .typing
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for key in lapsed {
            self.typing.remove(&key);
            self.send_typing(tracker, key.0, key.1, false).await;
        }
    }

    async fn send_typing(
        &self,
        tracker: &Tracker,
        conversation: ConversationId,
        user: UserId,
        active: bool,
    ) {
        let members = match self.groups.of_conversation(&conversation).await {
            Ok(members) => members,
            Err(e) => {
                tracing::warn!(%conversation, error = %e, "no members; typing dropped");
                return;
            }
        };
        // The edge checked membership when the frame came in; a member
        // removed since then types to nobody.
        if !members.contains(&user) {
            return;
        }
        // Nobody sees the typing of someone across a block from them.
        let blocked = match self.blocks.peers(&user).await {
            Ok(blocked) => blocked,
            Err(e) => {
                tracing::warn!(%user, error = %e, "no blocks; typing dropped");
                return;
            }
        };
        let frame = ServerFrame::Typing {
            conversation,
            user: user.clone(),
            active,
        }
        .to_json();
        for member in members
            .iter()
            .filter(|m| **m != user && !blocked.contains(*m) && tracker.is_online(m))
        {
            self.publish(subjects::deliver(member), frame.clone().into_bytes())
                .await;
            self.metrics.typing_frame_sent();
        }
    }

    /// A new leader's repair of what the bucket says: users online here but
    /// not there (announced while no one led), and users the bucket still
    /// has online that no edge reports (a leader died before announcing
    /// them offline). Reads every record once: O(users), at takeover only.
    pub async fn reconcile(&mut self, tracker: &Tracker) {
        let keys = match self.store.keys().await {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list presence records; not reconciled");
                return;
            }
        };
        let keys: Vec<String> = keys.filter_map(|k| async move { k.ok() }).collect().await;
        let now = now_ms();
        let change = |user: UserId, online: bool| Change {
            user,
            status: if online {
                PresenceStatus::Online
            } else {
                PresenceStatus::Offline
            },
            last_active: now,
        };
        let mut recorded = HashSet::new();
        let mut changes = Vec::new();
        let mut devices = Vec::new();
        for key in keys {
            let Some(user) = subjects::parse_presence_key(&key) else {
                continue;
            };
            let Ok(Some(bytes)) = self.store.get(&key).await else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<PresenceRecord>(&bytes) else {
                continue;
            };
            let online = tracker.is_online(&user);
            if record.is_online() != online {
                changes.push(change(user.clone(), online));
            } else if online && record.devices.as_ref() != Some(&tracker.devices_of(&user)) {
                // Devices that came or went while no one led: rewritten
                // quietly, keeping the announced `last_active`.
                devices.push(Change {
                    last_active: record.last_active,
                    ..change(user.clone(), true)
                });
            }
            recorded.insert(user);
        }
        // Online here, never written there.
        changes.extend(
            tracker
                .online_users()
                .filter(|user| !recorded.contains(*user))
                .map(|user| change(user.clone(), true)),
        );
        tracing::info!(
            repaired = changes.len(),
            devices = devices.len(),
            "presence reconciled"
        );
        self.speak(tracker, changes, devices).await;
    }
}
