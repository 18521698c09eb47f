//! Delivered receipts: edges report what users' devices acked
//! (`chat.receipt.delivered`); the router tells the messages' senders.
//! Edges may not publish to `chat.deliver.>` themselves, so a receipt can
//! only ever become a `receipt` frame, and only between members of the
//! conversation, and (v1.1) never across a block.

use chat_shared::blocks::BlockCache;
use chat_shared::ids::{ConversationId, UserId};
use chat_shared::membership::{GroupCache, Members};
use chat_shared::receipts::DeliveredEvent;
use chat_shared::shutdown;
use chat_shared::subjects;
use chat_shared::wire::{ReceiptKind, ServerFrame};
use futures::StreamExt;
use tokio::sync::watch;

pub async fn forward_delivered(
    nats: async_nats::Client,
    groups: GroupCache,
    blocks: BlockCache,
    stop: watch::Receiver<bool>,
) {
    let mut reports = match nats
        .queue_subscribe(subjects::DELIVERED_RECEIPTS, subjects::ROUTER_QUEUE.into())
        .await
    {
        Ok(subscriber) => subscriber,
        Err(e) => {
            tracing::error!(error = %e, "cannot receive delivered receipts");
            return;
        }
    };
    let stopped = shutdown::wait(stop);
    tokio::pin!(stopped);
    loop {
        let report = tokio::select! {
            _ = &mut stopped => return,
            report = reports.next() => match report {
                Some(report) => report,
                None => return,
            },
        };
        let Ok(event) = serde_json::from_slice::<DeliveredEvent>(&report.payload) else {
            tracing::warn!("dropping a malformed delivered receipt");
            continue;
        };
        let members = match &event.conversation {
            ConversationId::Dm { low, high } => vec![low.clone(), high.clone()],
            ConversationId::Group(group) => match groups.members(group).await {
                Ok(members) => members.iter().cloned().collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check a delivered receipt's group");
                    continue;
                }
            },
        };
        if !members.contains(&event.user) {
            tracing::warn!(user = %event.user, "dropping a receipt from a non-member");
            continue;
        }
        // The one hook of blocks on delivered receipts.
        let blocked = match blocks.peers(&event.user).await {
            Ok(blocked) => blocked,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check a delivered receipt's blocks");
                continue;
            }
        };
        let frame = ServerFrame::Receipt {
            conversation: event.conversation,
            user: event.user.clone(),
            kind: ReceiptKind::Delivered,
            up_to: event.up_to,
        }
        .to_json();
        for sender in event
            .senders
            .iter()
            .filter(|s| sees_delivered_receipt(&event.user, s, &members, &blocked))
        {
            if let Err(e) = nats
                .publish(subjects::deliver(sender), frame.clone().into())
                .await
            {
                tracing::warn!(error = %e, "cannot deliver a receipt");
            }
        }
    }
}

/// Whether `sender` is told that `reader` received their messages: a
/// member other than the reader, with no block between them.
fn sees_delivered_receipt(
    reader: &UserId,
    sender: &UserId,
    members: &[UserId],
    blocked: &Members,
) -> bool {
    sender != reader && members.contains(sender) && !blocked.contains(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    #[test]
    fn delivered_receipts_reach_member_senders_with_no_block_between() {
        let members = [user("alice"), user("bob"), user("carol")];
        let blocked: Members = std::sync::Arc::new([user("alice")].into_iter().collect());
        let none = Members::default();
        let bob = user("bob");
        assert!(sees_delivered_receipt(
            &bob,
            &user("carol"),
            &members,
            &blocked
        ));
        assert!(!sees_delivered_receipt(
            &bob,
            &user("alice"),
            &members,
            &blocked
        ));
        assert!(sees_delivered_receipt(
            &bob,
            &user("alice"),
            &members,
            &none
        ));
        assert!(
            !sees_delivered_receipt(&bob, &bob, &members, &none),
            "not to the reader"
        );
        assert!(
            !sees_delivered_receipt(&bob, &user("dave"), &members, &none),
            "members only"
        );
    }
}
