//! A delete for everyone erases (PROTOCOL.md v1.1): once its `update` is in
//! every member's inbox, the router overwrites every stored copy of the
//! message's text in JetStream (`STREAM.MSG.DELETE` without `no_erase`):
//! the message and its edits on MESSAGES, each member's inbox items of
//! them, and the push jobs for it not sent yet. The persister blanks the
//! row in PostgreSQL.
//!
//! Everything is found without a consumer, by batched direct gets of one
//! subject from a start time: the message's id is time-sortable, so its
//! copies are all stored after the id's time (less [`CLOCK_SLACK_MS`] for
//! the skew between the edge that made the id and the servers). MESSAGES
//! is read up to the delete itself (nothing of the message comes after it),
//! an inbox or the push jobs up to their current end.
//!
//! Erasing is idempotent: a copy already gone answers "no message found",
//! which counts as done, so a retried delete event erases again safely.
//!
//! An edit checked just before the delete but published just after it
//! comes after the delete in the conversation's lane: the router remembers
//! the messages it erased lately ([`Erased`]) and erases such an edit from
//! MESSAGES instead of appending it.

use std::time::Duration;

use async_nats::jetstream::{self, ErrorCode};
use chat_shared::direct::{DirectError, DirectReader, Item};
use chat_shared::idgen::timestamp_ms;
use chat_shared::ids::{ConversationId, MessageId, UserId};
use chat_shared::lru::Lru;
use chat_shared::partitions::Partitions;
use chat_shared::push::PushJob;
use chat_shared::subjects;
use chat_shared::wire::{ChangeEvent, ChangeKind, MessagesEvent};

/// How far before the message id's time its copies are looked for.
const CLOCK_SLACK_MS: u64 = 60_000;
/// Messages per direct-get batch, and their bytes.
const BATCH: usize = 256;
const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// How long one batch may take before the erasure fails (and the delete
/// event is retried).
const STALL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum EraseError {
    #[error("reading {stream}: {source}")]
    Read {
        stream: String,
        #[source]
        source: DirectError,
    },
    #[error("erasing {stream} sequence {sequence}: {reason}")]
    Erase {
        stream: String,
        sequence: u64,
        reason: String,
    },
}

pub struct Eraser {
    nats: async_nats::Client,
    js: jetstream::Context,
    partitions: Partitions,
    erased: Erased,
}

/// How many erased messages the router remembers, for edits that arrive
/// after their message's delete (seconds later at most).
const REMEMBERED: usize = 10_000;

/// The messages erased lately, by conversation and id.
pub struct Erased(std::sync::Mutex<Lru<(ConversationId, MessageId), ()>>);

impl Erased {
    fn new() -> Self {
        Self(std::sync::Mutex::new(Lru::new(REMEMBERED, usize::MAX)))
    }

    fn remember(&self, conversation: &ConversationId, id: MessageId) {
        if let Ok(mut erased) = self.0.lock() {
            erased.insert((conversation.clone(), id), (), 1);
        }
    }

    fn holds(&self, conversation: &ConversationId, id: MessageId) -> bool {
        self.0
            .lock()
            .is_ok_and(|mut erased| erased.get_mut(&(conversation.clone(), id)).is_some())
    }
}

/// Which stored copies belong to the erased message.
struct Target<'a> {
    conversation: &'a ConversationId,
    id: MessageId,
}

impl Target<'_> {
    /// The message itself or an edit of it, on MESSAGES.
    fn on_messages(&self, payload: &[u8]) -> bool {
        match MessagesEvent::parse(payload) {
            Ok(MessagesEvent::Message(message)) => {
                message.id == self.id && message.conversation == *self.conversation
            }
            Ok(MessagesEvent::Change(change)) => {
                change.kind == ChangeKind::Edit
                    && change.id == self.id
                    && change.conversation == *self.conversation
            }
            Err(_) => false,
        }
    }

    /// A `message` or edit `update` frame of it, in an inbox.
    fn in_inbox(&self, payload: &[u8]) -> bool {
        #[derive(serde::Deserialize)]
        struct Item<'a> {
            #[serde(rename = "type", borrow)]
            kind: &'a str,
            #[serde(default, rename = "kind", borrow)]
            change: Option<&'a str>,
            #[serde(default)]
            conversation: Option<ConversationId>,
            #[serde(default)]
            id: Option<MessageId>,
        }
        let Ok(item) = serde_json::from_slice::<Item>(payload) else {
            return false;
        };
        let copies_text = item.kind == "message"
            || (item.kind == "update" && item.change == Some(ChangeKind::Edit.as_str()));
        copies_text
            && item.id == Some(self.id)
            && item.conversation.as_ref() == Some(self.conversation)
    }

    fn in_push_job(&self, payload: &[u8]) -> bool {
        serde_json::from_slice::<PushJob>(payload)
            .is_ok_and(|job| job.id == self.id && job.conversation == *self.conversation)
    }
}

impl Eraser {
    pub fn new(nats: async_nats::Client, js: jetstream::Context, partitions: Partitions) -> Self {
        Self {
            nats,
            js,
            partitions,
            erased: Erased::new(),
        }
    }

    /// Whether `change` is an edit of a message erased lately (checked
    /// before the delete, published after it).
    pub fn is_late_edit(&self, change: &ChangeEvent) -> bool {
        change.kind == ChangeKind::Edit && self.erased.holds(&change.conversation, change.id)
    }

    /// Erases a late edit's own event from MESSAGES.
    pub async fn erase_late_edit(
        &self,
        change: &ChangeEvent,
        sequence: Option<u64>,
    ) -> Result<(), EraseError> {
        let Some(sequence) = sequence else {
            return Ok(());
        };
        let stream = self
            .partitions
            .of_conversation(&change.conversation)
            .messages_stream();
        self.erase_one(&stream, sequence).await
    }

    /// Erases every copy of the text of the message `delete` deletes;
    /// `delete_sequence` is the delete's own MESSAGES sequence, `members`
    /// whose inboxes got the message.
    pub async fn erase(
        &self,
        delete: &ChangeEvent,
        delete_sequence: Option<u64>,
        members: &[UserId],
    ) -> Result<u64, EraseError> {
        let target = Target {
            conversation: &delete.conversation,
            id: delete.id,
        };
        let since = timestamp_ms(delete.id).saturating_sub(CLOCK_SLACK_MS);
        let messages = self
            .partitions
            .of_conversation(&delete.conversation)
            .messages_stream();
        let mut erased = self
            .erase_matching(
                &messages,
                &subjects::message(&delete.conversation),
                since,
                delete_sequence,
                |payload| target.on_messages(payload),
            )
            .await?;
        for user in members {
            let inbox = self.partitions.of_user(user).inbox_stream();
            erased += self
                .erase_matching(&inbox, &subjects::inbox(user), since, None, |payload| {
                    target.in_inbox(payload)
                })
                .await?;
            erased += self
                .erase_matching(
                    subjects::PUSH_STREAM,
                    &subjects::push(user),
                    since,
                    None,
                    |payload| target.in_push_job(payload),
                )
                .await?;
        }
        self.erased.remember(&delete.conversation, delete.id);
        Ok(erased)
    }

    /// Reads `subject` of `stream` from `since_ms` (up to `until`, a
    /// sequence, or its end) and erases what `matches`.
    async fn erase_matching(
        &self,
        stream: &str,
        subject: &str,
        since_ms: u64,
        until: Option<u64>,
        matches: impl Fn(&[u8]) -> bool,
    ) -> Result<u64, EraseError> {
        let reader = DirectReader::new(self.nats.clone(), stream, STALL);
        let read_error = |source| EraseError::Read {
            stream: stream.to_string(),
            source,
        };
        let mut page = reader
            .page_since(subject, since_ms, BATCH, BATCH_BYTES)
            .await
            .map_err(read_error)?;
        let mut erased = 0;
        loop {
            let mut next = None;
            for Item {
                sequence, payload, ..
            } in &page.items
            {
                if until.is_some_and(|until| *sequence >= until) {
                    return Ok(erased);
                }
                if matches(payload) {
                    self.erase_one(stream, *sequence).await?;
                    erased += 1;
                }
                next = Some(sequence + 1);
            }
            match next {
                Some(next) if page.pending > 0 => {
                    page = reader
                        .page(subject, next, BATCH, BATCH_BYTES)
                        .await
                        .map_err(read_error)?;
                }
                _ => return Ok(erased),
            }
        }
    }

    async fn erase_one(&self, stream: &str, sequence: u64) -> Result<(), EraseError> {
        let error = |reason: String| EraseError::Erase {
            stream: stream.to_string(),
            sequence,
            reason,
        };
        let handle = self
            .js
            .get_stream_no_info(stream)
            .await
            .map_err(|e| error(e.to_string()))?;
        match handle.delete_message(sequence).await {
            Ok(_) => Ok(()),
            Err(e) => match e.kind() {
                // Gone already (an earlier attempt, or a push job sent meanwhile).
                jetstream::stream::DeleteMessageErrorKind::JetStream(ref js)
                    if js.error_code() == ErrorCode::NO_MESSAGE_FOUND =>
                {
                    Ok(())
                }
                _ => Err(error(e.to_string())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erased_messages_are_remembered() {
        let erased = Erased::new();
        let dm = ConversationId::parse("dm:a:b").unwrap();
        let other = ConversationId::parse("dm:a:c").unwrap();
        erased.remember(&dm, MessageId(7));
        assert!(erased.holds(&dm, MessageId(7)));
        assert!(!erased.holds(&other, MessageId(7)));
        assert!(!erased.holds(&dm, MessageId(8)));
    }

    #[test]
    fn only_copies_of_the_message_text_are_targets() {
        let conversation = ConversationId::parse("dm:a:b").unwrap();
        let target = Target {
            conversation: &conversation,
            id: MessageId(7),
        };
        let message = br#"{"id":"7","conversation":"dm:a:b","from":"a","text":"secret","ts":1,"client_msg_id":"c"}"#;
        let other = br#"{"id":"8","conversation":"dm:a:b","from":"a","text":"keep","ts":1,"client_msg_id":"d"}"#;
        let edit = br#"{"kind":"edit","id":"7","conversation":"dm:a:b","by":"a","ts":2,"text":"secret 2"}"#;
        let reaction = br#"{"kind":"reaction","id":"7","conversation":"dm:a:b","by":"b","ts":2,"emoji":"x","on":true}"#;
        assert!(target.on_messages(message));
        assert!(target.on_messages(edit));
        assert!(!target.on_messages(other));
        assert!(!target.on_messages(reaction));
        let frame = br#"{"cursor":"3","type":"message","id":"7","conversation":"dm:a:b","from":"a","text":"secret","ts":1,"client_msg_id":"c"}"#;
        let update = br#"{"type":"update","kind":"edit","id":"7","conversation":"dm:a:b","by":"a","ts":2,"text":"secret 2"}"#;
        let delete = br#"{"type":"update","kind":"delete","id":"7","conversation":"dm:a:b","by":"a","ts":3,"for":"everyone"}"#;
        let elsewhere = br#"{"type":"message","id":"7","conversation":"dm:a:c","from":"a","text":"x","ts":1,"client_msg_id":"c"}"#;
        assert!(target.in_inbox(frame));
        assert!(target.in_inbox(update));
        assert!(!target.in_inbox(delete));
        assert!(!target.in_inbox(elsewhere));
        assert!(!target.in_inbox(b"{"));
        let job =
            br#"{"user":"b","conversation":"dm:a:b","id":"7","from":"a","text":"secret","ts":1}"#;
        assert!(target.in_push_job(job));
    }
}
