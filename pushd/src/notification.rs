//! What one user is told about a window of push jobs: one notification,
//! whatever the number of jobs, built once and sent to each of their tokens;
//! and the retractions that withdraw one after a read or a delete.

use chat_shared::ids::{ConversationId, MessageId, UserId};
use chat_shared::push::{PushJob, RetractReason};

/// A lock screen shows about two lines; FCM and APNs refuse payloads over
/// 4 KB. Previews are cut to this many characters.
const MAX_PREVIEW_CHARS: usize = 200;

/// One message a notification stands for.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: MessageId,
    pub conversation: ConversationId,
    pub from: UserId,
    pub ts: i64,
    /// The job's preview (at most `PREVIEW_BYTES` of the text), kept only
    /// when previews are on; webhooks get it as is.
    pub text: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub user: UserId,
    pub title: String,
    pub body: String,
    /// The newest message's conversation, sender and id: where a tap leads.
    pub conversation: ConversationId,
    pub from: UserId,
    pub message_id: MessageId,
    /// Oldest first, one per distinct message.
    pub items: Vec<Item>,
    /// The user's unread total when it was sent, if it could be read.
    pub badge: Option<u64>,
}

/// A data push withdrawing the notification about `conversation`: the
/// app removes it if the message it shows is covered (up to `up_to` for a
/// read, exactly `up_to` for a delete), and sets the badge. Same collapse
/// id as the notification, so a device that had not shown it yet gets
/// this instead.
#[derive(Debug, Clone, PartialEq)]
pub struct Retraction {
    pub user: UserId,
    pub conversation: ConversationId,
    pub reason: RetractReason,
    pub up_to: MessageId,
    pub badge: Option<u64>,
}

/// What one provider call carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Push {
    Notify(Notification),
    Retract(Retraction),
}

impl Push {
    pub fn user(&self) -> &UserId {
        match self {
            Push::Notify(n) => &n.user,
            Push::Retract(r) => &r.user,
        }
    }

    /// How many messages it stands for (a retraction none).
    pub fn count(&self) -> usize {
        match self {
            Push::Notify(n) => n.count(),
            Push::Retract(_) => 0,
        }
    }
}

impl Notification {
    /// One notification for `jobs` (all for one user), or `None` for none.
    ///
    /// - one message: title = sender, body = its text (or "New message from
    ///   alice" without previews);
    /// - several from one sender: title = sender, body = "3 new messages
    ///   from alice";
    /// - several senders: title = "New messages", body = "5 new messages".
    ///
    /// A message that appears twice (a redelivered job) counts once.
    pub fn coalesce(jobs: &[PushJob], preview: bool) -> Option<Self> {
        let mut items: Vec<Item> = Vec::with_capacity(jobs.len());
        for job in jobs {
            if items
                .iter()
                .any(|i| i.id == job.id && i.conversation == job.conversation)
            {
                continue;
            }
            items.push(Item {
                id: job.id,
                conversation: job.conversation.clone(),
                from: job.from.clone(),
                ts: job.ts,
                // Cut again: a job from an older router may carry a whole text.
                text: preview.then(|| chat_shared::push::preview(&job.text)),
            });
        }
        // Message ids grow with time; the timestamp alone may tie.
        items.sort_by_key(|i| (i.ts, i.id));
        let newest = items.last()?.clone();
        let count = items.len();
        let one_sender = items.iter().all(|i| i.from == newest.from);
        let (title, body) = if count == 1 {
            let body = match &newest.text {
                Some(text) => shorten(text),
                None => format!("New message from {}", newest.from),
            };
            (newest.from.to_string(), body)
        } else if one_sender {
            (
                newest.from.to_string(),
                format!("{count} new messages from {}", newest.from),
            )
        } else {
            ("New messages".to_string(), format!("{count} new messages"))
        };
        Some(Self {
            user: jobs.first()?.user.clone(),
            title,
            body,
            conversation: newest.conversation,
            from: newest.from,
            message_id: newest.id,
            items,
            badge: None,
        })
    }

    /// How many messages this notification stands for.
    pub fn count(&self) -> usize {
        self.items.len()
    }
}

fn shorten(text: &str) -> String {
    match text.char_indices().nth(MAX_PREVIEW_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn job(from: &str, id: u64, text: &str) -> PushJob {
        let bob = UserId::parse("bob").unwrap();
        let sender = UserId::parse(from).unwrap();
        PushJob {
            user: bob.clone(),
            conversation: ConversationId::dm(sender.clone(), bob).unwrap(),
            id: MessageId(id),
            from: sender,
            text: text.into(),
            ts: 1_700_000_000_000 + id as i64,
            devices: None,
            mentioned: false,
        }
    }

    #[test]
    fn one_message_shows_sender_and_text() {
        let n = Notification::coalesce(&[job("alice", 1, "lunch?")], true).unwrap();
        assert_eq!((n.title.as_str(), n.body.as_str()), ("alice", "lunch?"));
        assert_eq!(n.count(), 1);
        assert_eq!(n.conversation.to_string(), "dm:alice:bob");
        assert_eq!(n.items[0].text.as_deref(), Some("lunch?"));
    }

    #[test]
    fn without_preview_no_text_is_kept() {
        let n = Notification::coalesce(&[job("alice", 1, "lunch?")], false).unwrap();
        assert_eq!(n.body, "New message from alice");
        assert!(n.items.iter().all(|i| i.text.is_none()));
        assert!(!format!("{n:?}").contains("lunch"));
    }

    #[test]
    fn one_sender_is_counted() {
        let jobs: Vec<_> = (1..=3).map(|i| job("alice", i, "x")).collect();
        let n = Notification::coalesce(&jobs, true).unwrap();
        assert_eq!(n.title, "alice");
        assert_eq!(n.body, "3 new messages from alice");
        assert_eq!(n.message_id, MessageId(3));
    }

    #[test]
    fn several_senders_are_summed_and_the_newest_leads() {
        let jobs = vec![
            job("carol", 5, "x"),
            job("alice", 1, "x"),
            job("alice", 2, "x"),
            job("dave", 3, "x"),
            job("alice", 4, "x"),
        ];
        let n = Notification::coalesce(&jobs, true).unwrap();
        assert_eq!(n.title, "New messages");
        assert_eq!(n.body, "5 new messages");
        assert_eq!(n.from.as_str(), "carol");
        assert_eq!(n.message_id, MessageId(5));
        let ids: Vec<u64> = n.items.iter().map(|i| i.id.get()).collect();
        assert_eq!(ids, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_repeated_job_counts_once() {
        let jobs = vec![job("alice", 1, "a"), job("alice", 1, "a")];
        let n = Notification::coalesce(&jobs, true).unwrap();
        assert_eq!(n.count(), 1);
        assert_eq!(n.body, "a");
    }

    #[test]
    fn long_previews_are_cut_on_a_character() {
        let text = "é".repeat(1000);
        let n = Notification::coalesce(&[job("alice", 1, &text)], true).unwrap();
        assert_eq!(n.body.chars().count(), MAX_PREVIEW_CHARS + 1);
        assert!(n.body.ends_with('…'));
        let kept = n.items[0].text.as_deref().unwrap_or_default();
        assert!(kept.len() <= chat_shared::push::PREVIEW_BYTES);
        assert!(text.starts_with(kept.trim_end_matches('…')));
    }

    #[test]
    fn no_jobs_no_notification() {
        assert!(Notification::coalesce(&[], true).is_none());
    }
}
