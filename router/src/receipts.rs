//! Receipts: stream RECEIPTS (delivered receipts from edges' acks, read
//! receipts from the persister once a read is stored) becomes `receipt`
//! inbox items, with cursors, replayed on resume like messages.
//!
//! Coalesced: at most one item per (conversation, user, kind) per second.
//! The first receipt of a key leaves at once; later ones within the second
//! are merged (the largest `up_to` wins) and leave when it ends, so the
//! newest watermark is never dropped. The events are acked only once their
//! item is in every recipient's inbox: a router that stops holding a merged
//! window loses nothing, its events are redelivered.
//!
//! Who is told is decided in one place, [`recipients`]; only members of
//! the conversation ever are, and (v1.1) never across a block or past
//! someone's `read_receipts: false` (the persister names a read's
//! audience, where the settings are).

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use async_nats::HeaderMap;
use chat_shared::blocks::BlockCache;
use chat_shared::ids::{ConversationId, DeviceId, MessageId, UserId};
use chat_shared::membership::{GroupCache, Members};
use chat_shared::push::RetractReason;
use chat_shared::receipts::{DeliveredEvent, ReadEvent};
use chat_shared::wire::{ErrorCode, ReceiptKind, ServerFrame};
use chat_shared::{consume, shutdown, subjects};
use futures::StreamExt;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::fanout::Fanout;

/// At most one item per key per this long.
const WINDOW: Duration = Duration::from_secs(1);
/// How often windows are checked for a merged receipt that is due.
const TICK: Duration = Duration::from_millis(100);
/// Receipts on their way into inboxes at once.
const IN_FLIGHT: usize = 256;
const PULL_BATCH: usize = 512;
/// When an event whose receipt could not be appended comes back.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What receipts are coalesced by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    conversation: ConversationId,
    user: UserId,
    kind: ReceiptKind,
}

/// A receipt, possibly several merged.
#[derive(Debug, Clone, PartialEq)]
struct Receipt {
    up_to: MessageId,
    /// The device of the newest delivered receipt.
    device: Option<DeviceId>,
    /// Who wrote the acknowledged messages (delivered receipts only).
    senders: BTreeSet<UserId>,
    /// Who may see a read receipt, as the persister decided when it stored
    /// the read (`None`: every member).
    audience: Option<BTreeSet<UserId>>,
}

impl Receipt {
    fn merge(&mut self, newer: Receipt) {
        if newer.up_to >= self.up_to {
            self.up_to = newer.up_to;
            self.device = newer.device;
            self.audience = newer.audience;
        }
        self.senders.extend(newer.senders);
    }
}

/// A receipt ready to append and the events it stands for.
#[derive(Debug)]
struct Batch<M> {
    receipt: Receipt,
    events: Vec<M>,
}

struct Window<M> {
    /// When this key's last item left; the next one waits a [`WINDOW`].
    emitted: Instant,
    merged: Option<Batch<M>>,
}

/// The coalescing windows, generic over the event handle so the timing
/// can be tested without JetStream.
struct Windows<M> {
    open: HashMap<Key, Window<M>>,
}

impl<M> Default for Windows<M> {
    fn default() -> Self {
        Self {
            open: HashMap::new(),
        }
    }
}

impl<M> Windows<M> {
    /// Takes one event: its batch if it may leave `now`, else `None` (held
    /// until [`Windows::due`] hands it out).
    fn offer(&mut self, key: Key, receipt: Receipt, event: M, now: Instant) -> Option<Batch<M>> {
        let batch = Batch {
            receipt,
            events: vec![event],
        };
        match self.open.entry(key) {
            Entry::Vacant(vacant) => {
                vacant.insert(Window {
                    emitted: now,
                    merged: None,
                });
                Some(batch)
            }
            Entry::Occupied(mut occupied) => {
                let window = occupied.get_mut();
                match &mut window.merged {
                    Some(merged) => {
                        merged.receipt.merge(batch.receipt);
                        merged.events.extend(batch.events);
                        None
                    }
                    None if now >= window.emitted + WINDOW => {
                        window.emitted = now;
                        Some(batch)
                    }
                    None => {
                        window.merged = Some(batch);
                        None
                    }
                }
            }
        }
    }

    /// The merged receipts whose window ended by `now`; forgets the keys
    /// that have been quiet for a whole window.
    fn due(&mut self, now: Instant) -> Vec<(Key, Batch<M>)> {
        let mut due = Vec::new();
        self.open.retain(|key, window| {
            if now < window.emitted + WINDOW {
                return true;
            }
            match window.merged.take() {
                Some(batch) => {
                    due.push((key.clone(), batch));
                    window.emitted = now;
                    true
                }
                None => false,
            }
        });
        due
    }

    /// Every held event (at shutdown).
    fn drain(&mut self) -> Vec<M> {
        self.open
            .drain()
            .filter_map(|(_, window)| window.merged)
            .flat_map(|batch| batch.events)
            .collect()
    }
}

/// Who is told about `key`'s receipt among the conversation's `members`
/// (the one place this is decided):
/// - `read`: every member in the read's audience, the reader included
///   (their other devices);
/// - `delivered`: the members who wrote the acknowledged messages, never
///   the user who received them, and nobody across a block with them
///   (`blocked`: everyone across a block from the receipt's user).
///
/// Nobody if the receipt's user is not a member.
fn recipients(key: &Key, receipt: &Receipt, members: &[UserId], blocked: &Members) -> Vec<UserId> {
    if !members.contains(&key.user) {
        tracing::warn!(user = %key.user, "dropping a receipt from a non-member");
        return Vec::new();
    }
    match key.kind {
        ReceiptKind::Read => members
            .iter()
            .filter(|member| {
                receipt
                    .audience
                    .as_ref()
                    .is_none_or(|audience| audience.contains(*member))
            })
            .cloned()
            .collect(),
        ReceiptKind::Delivered => receipt
            .senders
            .iter()
            .filter(|sender| {
                **sender != key.user && members.contains(sender) && !blocked.contains(*sender)
            })
            .cloned()
            .collect(),
    }
}

/// Why an event is not a receipt; it is dead-lettered.
#[derive(Debug, thiserror::Error)]
enum Malformed {
    #[error("unexpected subject {0}")]
    Subject(String),
    #[error("malformed receipt event: {0}")]
    Json(#[from] serde_json::Error),
}

fn decode(message: &jetstream::Message) -> Result<(Key, Receipt), Malformed> {
    match message.subject.as_str() {
        subjects::DELIVERED_RECEIPTS => {
            let event: DeliveredEvent = serde_json::from_slice(&message.payload)?;
            Ok((
                Key {
                    conversation: event.conversation,
                    user: event.user,
                    kind: ReceiptKind::Delivered,
                },
                Receipt {
                    up_to: event.up_to,
                    device: event.device,
                    senders: event.senders.into_iter().collect(),
                    audience: None,
                },
            ))
        }
        subjects::READ_RECEIPTS => {
            let event: ReadEvent = serde_json::from_slice(&message.payload)?;
            Ok((
                Key {
                    conversation: event.conversation,
                    user: event.user,
                    kind: ReceiptKind::Read,
                },
                Receipt {
                    up_to: event.up_to,
                    device: None,
                    senders: BTreeSet::new(),
                    audience: event.audience.map(|users| users.into_iter().collect()),
                },
            ))
        }
        other => Err(Malformed::Subject(other.to_string())),
    }
}

/// Pulls RECEIPTS (as the pinned client of the router priority group) and
/// appends coalesced receipts until `stop`; what is held then is handed
/// back for the next router.
pub async fn consume_receipts(
    router: Arc<Fanout>,
    groups: GroupCache,
    blocks: BlockCache,
    consumer: PullConsumer,
    stop: watch::Receiver<bool>,
) {
    let stopped = shutdown::wait(stop);
    tokio::pin!(stopped);
    let mut windows = Windows::default();
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut tick = tokio::time::interval(TICK);
    let emit = |key: Key, batch: Batch<jetstream::Message>| {
        let (router, groups, blocks, permits) = (
            router.clone(),
            groups.clone(),
            blocks.clone(),
            permits.clone(),
        );
        async move {
            let Ok(permit) = permits.acquire_owned().await else {
                return;
            };
            tokio::spawn(async move {
                append(&router, &groups, &blocks, key, batch).await;
                drop(permit);
            });
        }
    };
    'pulls: loop {
        let Some(mut stream) = consume::open_pull(
            &consumer,
            PULL_BATCH,
            Some(subjects::ROUTER_PRIORITY_GROUP),
            &mut stopped,
        )
        .await
        else {
            break;
        };
        loop {
            tokio::select! {
                _ = &mut stopped => {
                    consume::release_buffered(&mut stream).await;
                    break 'pulls;
                }
                _ = tick.tick() => {
                    for (key, batch) in windows.due(Instant::now()) {
                        emit(key, batch).await;
                    }
                }
                next = stream.next() => match next {
                    Some(Ok(message)) => match decode(&message) {
                        Ok((key, receipt)) => {
                            if let Some(batch) = windows.offer(key.clone(), receipt, message, Instant::now()) {
                                emit(key, batch).await;
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "dead-lettering a receipt event");
                            consume::dead_letter(router.jetstream(), &message, &e.to_string()).await;
                        }
                    },
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "pull stream error");
                        continue 'pulls;
                    }
                    None => continue 'pulls,
                },
            }
        }
    }
    for event in windows.drain() {
        let _ = event.ack_with(AckKind::Nak(Some(RETRY_AFTER))).await;
    }
}

/// Appends one coalesced receipt to its recipients' inboxes, then acks
/// its events; on failure they come back after [`RETRY_AFTER`].
async fn append(
    router: &Fanout,
    groups: &GroupCache,
    blocks: &BlockCache,
    key: Key,
    batch: Batch<jetstream::Message>,
) {
    let members = match groups.of_conversation(&key.conversation).await {
        Ok(members) => members,
        // A group that is gone has nobody to tell.
        Err(e) if e.code == ErrorCode::NotFound => Vec::new(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a receipt's group; retrying");
            return settle(batch.events, false).await;
        }
    };
    let blocked = match key.kind {
        ReceiptKind::Delivered => match blocks.peers(&key.user).await {
            Ok(blocked) => blocked,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a receipt's blocks; retrying");
                return settle(batch.events, false).await;
            }
        },
        // A read's audience already leaves out blocks.
        ReceiptKind::Read => Members::default(),
    };
    let recipients = recipients(&key, &batch.receipt, &members, &blocked);
    if recipients.is_empty() {
        return settle(batch.events, true).await;
    }
    let Receipt { up_to, device, .. } = batch.receipt;
    let event_id = subjects::receipt_item_id(key.kind, &key.conversation, &key.user, up_to);
    let frame = ServerFrame::Receipt {
        cursor: None,
        conversation: key.conversation.clone(),
        user: key.user.clone(),
        kind: key.kind,
        up_to,
        device,
    }
    .to_json();
    let appended = router
        .inbox()
        .append(&recipients, &event_id, frame.into(), HeaderMap::new())
        .await;
    if let Err(e) = &appended {
        tracing::warn!(error = %e, "receipt not appended; retrying");
        return settle(batch.events, false).await;
    }
    // A read withdraws the reader's notification on their devices that are
    // not connected; coalesced with the receipt, so at most one per second
    // per conversation. A failure retries the whole receipt (the append and
    // the job de-duplicate).
    let retracted = match key.kind {
        ReceiptKind::Read => router
            .push()
            .retract(&key.user, &key.conversation, up_to, RetractReason::Read)
            .await
            .map_err(|e| tracing::warn!(error = %e, "retraction not queued; retrying")),
        ReceiptKind::Delivered => Ok(()),
    };
    settle(batch.events, retracted.is_ok()).await;
}

async fn settle(events: Vec<jetstream::Message>, done: bool) {
    for event in events {
        let acked = if done {
            event.ack().await
        } else {
            event.ack_with(AckKind::Nak(Some(RETRY_AFTER))).await
        };
        if let Err(e) = acked {
            tracing::warn!(error = %e, "receipt event ack failed; it will be redelivered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    fn key(kind: ReceiptKind) -> Key {
        Key {
            conversation: ConversationId::parse("group:g").unwrap(),
            user: user("bob"),
            kind,
        }
    }

    fn receipt(up_to: u64, device: &str, sender: &str) -> Receipt {
        Receipt {
            up_to: MessageId(up_to),
            device: Some(DeviceId::parse(device).unwrap()),
            senders: [user(sender)].into_iter().collect(),
            audience: None,
        }
    }

    #[test]
    fn one_item_per_key_per_window_and_the_newest_watermark_survives() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut windows = Windows::default();
        let delivered = key(ReceiptKind::Delivered);
        // The first leaves at once.
        let first = windows.offer(delivered.clone(), receipt(10, "a", "alice"), 1, at(0));
        assert_eq!(first.map(|b| b.events), Some(vec![1]));
        // Another kind is another key.
        assert!(windows
            .offer(
                key(ReceiptKind::Read),
                receipt(10, "a", "alice"),
                2,
                at(100)
            )
            .is_some());
        // Within the window: merged, held; an older one does not win.
        assert!(windows
            .offer(delivered.clone(), receipt(30, "b", "alice"), 3, at(200))
            .is_none());
        assert!(windows
            .offer(delivered.clone(), receipt(20, "a", "carol"), 4, at(300))
            .is_none());
        assert!(windows.due(at(900)).is_empty());
        let due = windows.due(at(1000));
        assert_eq!(due.len(), 1);
        let (due_key, batch) = &due[0];
        assert_eq!(due_key, &delivered);
        assert_eq!(batch.events, vec![3, 4]);
        assert_eq!(batch.receipt.up_to, MessageId(30));
        assert_eq!(batch.receipt.device, Some(DeviceId::parse("b").unwrap()));
        assert_eq!(batch.receipt.senders.len(), 2);
        // The next one waits a window after that item, not after the first.
        assert!(windows
            .offer(delivered.clone(), receipt(40, "a", "alice"), 5, at(1500))
            .is_none());
        assert!(windows.due(at(1900)).is_empty());
        assert_eq!(windows.due(at(2000)).len(), 1);
        // Quiet keys are forgotten; the next receipt leaves at once.
        assert!(windows.due(at(3100)).is_empty());
        assert!(windows.open.is_empty());
        assert!(windows
            .offer(delivered, receipt(50, "a", "alice"), 6, at(3200))
            .is_some());
    }

    #[test]
    fn held_events_are_handed_back_at_shutdown() {
        let now = Instant::now();
        let mut windows = Windows::default();
        let delivered = key(ReceiptKind::Delivered);
        windows.offer(delivered.clone(), receipt(1, "a", "alice"), 1, now);
        windows.offer(delivered, receipt(2, "a", "alice"), 2, now);
        assert_eq!(windows.drain(), vec![2]);
    }

    #[test]
    fn reads_reach_every_member_and_delivered_only_the_senders() {
        let members = [user("alice"), user("bob"), user("carol")];
        let none = Members::default();
        let read = recipients(
            &key(ReceiptKind::Read),
            &receipt(1, "a", "alice"),
            &members,
            &none,
        );
        assert_eq!(read, members.to_vec());
        let mut merged = receipt(1, "a", "alice");
        merged.merge(receipt(2, "a", "bob"));
        merged.merge(receipt(3, "a", "dave"));
        let delivered = recipients(&key(ReceiptKind::Delivered), &merged, &members, &none);
        assert_eq!(delivered, vec![user("alice")]);
        let outsider = recipients(&key(ReceiptKind::Read), &merged, &members[..1], &none);
        assert!(outsider.is_empty());
    }

    #[test]
    fn blocks_and_read_audiences_narrow_who_is_told() {
        let members = [user("alice"), user("bob"), user("carol")];
        // bob's delivered receipt for alice's and carol's messages; alice
        // and bob are across a block.
        let mut delivered = receipt(1, "a", "alice");
        delivered.merge(receipt(2, "a", "carol"));
        let blocked: Members = Arc::new([user("alice")].into_iter().collect());
        assert_eq!(
            recipients(&key(ReceiptKind::Delivered), &delivered, &members, &blocked),
            vec![user("carol")]
        );
        // A read told only to its audience (the persister left carol out).
        let mut read = receipt(3, "a", "alice");
        read.audience = Some([user("bob"), user("alice")].into_iter().collect());
        assert_eq!(
            recipients(
                &key(ReceiptKind::Read),
                &read,
                &members,
                &Members::default()
            ),
            vec![user("alice"), user("bob")]
        );
    }
}
