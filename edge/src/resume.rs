//! Where a session's backlog starts and how it is read: the start cursor,
//! the replay of the inbox after it, and the gap rule that sends a session
//! back to the inbox. The rules are written against [`InboxReader`], so
//! they are tested without NATS; [`Edge`] reads the real inbox with
//! batched direct gets, which create no consumer (at millions of devices
//! reconnecting every minute or two, one consumer per resume would be
//! thousands of consumer creations a second).

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::stream::DirectGetErrorKind;
use chat_shared::delivery::Previous;
use chat_shared::direct::{DirectError, Item, Page};
use chat_shared::ids::{Cursor, UserId};
use chat_shared::subjects;

use crate::Edge;

/// Messages asked for per direct get.
pub const REPLAY_BATCH: usize = 500;
/// Bytes asked for per direct get: a page of inbox items is held in memory
/// while it is forwarded (plus at most one item past this bound).
pub const REPLAY_BYTES: usize = 4 * 1024 * 1024;
/// An inbox read whose next reply does not come for this long fails
/// instead of waiting: a stream that lost its leader (a cluster without
/// quorum) may leave a request unanswered, and a session replaying its
/// inbox must then answer `unavailable` (the client resumes later) rather
/// than hang with its requests unread. The fault suite's
/// `cluster_loses_quorum` found it.
pub const INBOX_STALL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("reading the inbox: {0}")]
    Read(#[from] DirectError),
    #[error("reading the inbox's bounds: {0}")]
    Bounds(#[from] async_nats::jetstream::context::GetStreamError),
    #[error("reading the user's latest inbox item: {0}")]
    Head(async_nats::jetstream::stream::DirectGetError),
    #[error("the inbox said {pending} items follow {after} but sent none")]
    EmptyPage { after: u64, pending: u64 },
}

/// What a session needs of the inbox stream.
pub trait InboxReader {
    /// The first and last sequence of the stream holding `user`'s inbox
    /// (their partition of INBOX).
    fn bounds(&self, user: &UserId)
        -> impl Future<Output = Result<(u64, u64), ResumeError>> + Send;
    /// The sequence of `user`'s latest item, 0 if there is none.
    fn head(&self, user: &UserId) -> impl Future<Output = Result<u64, ResumeError>> + Send;
    /// The next page of `user`'s items from sequence `from` on.
    fn page(
        &self,
        user: &UserId,
        from: u64,
    ) -> impl Future<Output = Result<Page, ResumeError>> + Send;
}

impl InboxReader for Edge {
    async fn bounds(&self, user: &UserId) -> Result<(u64, u64), ResumeError> {
        let stream = self
            .js
            .get_stream(self.inbox_of(user).partition.inbox_stream())
            .await?;
        let state = &stream.cached_info().state;
        Ok((state.first_sequence, state.last_sequence))
    }

    async fn head(&self, user: &UserId) -> Result<u64, ResumeError> {
        match self
            .inbox_of(user)
            .inbox
            .direct_get_last_for_subject(subjects::inbox(user))
            .await
        {
            Ok(message) => Ok(message.sequence),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(0),
            Err(e) => Err(ResumeError::Head(e)),
        }
    }

    async fn page(&self, user: &UserId, from: u64) -> Result<Page, ResumeError> {
        Ok(self
            .inbox_of(user)
            .direct
            .page(&subjects::inbox(user), from, REPLAY_BATCH, REPLAY_BYTES)
            .await?)
    }
}

/// Where a resume from `cursor` starts, and whether everything after it
/// still exists, given the inbox's first and last sequence.
///
/// Items after `cursor` up to `first - 1` have expired: some may have been
/// this user's, so the resume is not `resumed`. A cursor beyond the end
/// was never handed out; it would hide every later item, so the replay
/// starts at the end instead (and is not `resumed` either).
pub fn start_at(cursor: Cursor, first: u64, last: u64) -> (Cursor, bool) {
    let in_range = cursor.0 <= last;
    let resumed = in_range && cursor.0.saturating_add(1) >= first;
    let start = if in_range { cursor } else { Cursor(last) };
    (start, resumed)
}

/// Where a session's backlog starts, and whether there may be one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// The items after it are the backlog.
    pub cursor: Cursor,
    /// `welcome.resumed`: nothing after the device's cursor is gone.
    pub resumed: bool,
    /// Whether the inbox may hold items after `cursor` now. When it does
    /// not, the backlog read is skipped: the session subscribed to live
    /// deliveries before `start` read the inbox, so whatever is stored
    /// later arrives live (or, if its frame is lost, through the gap rule).
    /// Most connections are reconnects with nothing new: one read fewer
    /// each.
    pub backlog: bool,
}

/// Where a session's backlog starts: after `cursor` (as [`start_at`]
/// corrects it), or for a device without one at the user's head, after
/// their latest item (then there is no backlog).
pub async fn start<R: InboxReader>(
    reader: &R,
    user: &UserId,
    cursor: Option<Cursor>,
) -> Result<Start, ResumeError> {
    match cursor {
        Some(cursor) => {
            let (first, last) = reader.bounds(user).await?;
            let (cursor, resumed) = start_at(cursor, first, last);
            Ok(Start {
                cursor,
                resumed,
                backlog: cursor.0 < last,
            })
        }
        None => Ok(Start {
            cursor: Cursor(reader.head(user).await?),
            resumed: true,
            backlog: false,
        }),
    }
}

/// Whether a live item that follows `previous` (as the router tells it)
/// with cursor `cursor` shows that a session which sent the inbox up to
/// `sent_up_to` missed one: a live frame lost on the way, or an item
/// stored after its PubAck was lost. The session reads the inbox again.
pub fn follows_a_gap(previous: Previous, cursor: Option<Cursor>, sent_up_to: Cursor) -> bool {
    match (previous, cursor) {
        (Previous::At(previous), _) => previous > sent_up_to,
        (Previous::Unknown, Some(cursor)) => cursor > sent_up_to,
        _ => false,
    }
}

/// A user's inbox items after a cursor, oldest first, a page at a time,
/// until the inbox has nothing more (items stored while it reads included).
pub struct Replay<'a, R> {
    reader: &'a R,
    user: &'a UserId,
    /// The sequence the next page starts at.
    next: u64,
    page: VecDeque<Item>,
    /// Items stored after the last page, as the server counted them.
    pending: u64,
    /// Whether a page was asked for yet.
    started: bool,
}

impl<'a, R: InboxReader> Replay<'a, R> {
    pub fn after(reader: &'a R, user: &'a UserId, cursor: Cursor) -> Self {
        Self {
            reader,
            user,
            next: cursor.0.saturating_add(1),
            page: VecDeque::new(),
            pending: 0,
            started: false,
        }
    }

    /// The next item, or `None` once the inbox is read to its end.
    pub async fn next(&mut self) -> Result<Option<Item>, ResumeError> {
        loop {
            if let Some(item) = self.page.pop_front() {
                return Ok(Some(item));
            }
            if self.started && self.pending == 0 {
                return Ok(None);
            }
            let page = self.reader.page(self.user, self.next).await?;
            self.started = true;
            self.pending = page.pending;
            let Some(last) = page.items.last() else {
                if page.pending > 0 {
                    // Asking again would get the same answer forever.
                    return Err(ResumeError::EmptyPage {
                        after: self.next,
                        pending: page.pending,
                    });
                }
                return Ok(None);
            };
            self.next = last.sequence.saturating_add(1);
            self.page = page.items.into();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use async_nats::HeaderMap;
    use bytes::Bytes;

    use super::*;

    /// An inbox in memory: (sequence, user) pairs, read `batch` at a time.
    struct FakeInbox {
        items: Mutex<Vec<(u64, &'static str)>>,
        first: u64,
        batch: usize,
        pages: AtomicUsize,
        /// A page answered with nothing although items are pending.
        broken: bool,
    }

    impl FakeInbox {
        fn new(items: &[(u64, &'static str)], batch: usize) -> Self {
            Self {
                items: Mutex::new(items.to_vec()),
                first: items.first().map_or(1, |(s, _)| *s),
                batch,
                pages: AtomicUsize::new(0),
                broken: false,
            }
        }

        fn of(&self, user: &UserId) -> Vec<u64> {
            self.items
                .lock()
                .map(|items| {
                    items
                        .iter()
                        .filter(|(_, u)| *u == user.as_str())
                        .map(|(s, _)| *s)
                        .collect()
                })
                .unwrap_or_default()
        }
    }

    impl InboxReader for FakeInbox {
        async fn bounds(&self, _user: &UserId) -> Result<(u64, u64), ResumeError> {
            let last = self
                .items
                .lock()
                .expect("the fake inbox's lock")
                .last()
                .map_or(0, |(s, _)| *s);
            Ok((self.first, last))
        }

        async fn head(&self, user: &UserId) -> Result<u64, ResumeError> {
            Ok(self.of(user).last().copied().unwrap_or(0))
        }

        async fn page(&self, user: &UserId, from: u64) -> Result<Page, ResumeError> {
            self.pages.fetch_add(1, Ordering::Relaxed);
            let matching: Vec<u64> = self.of(user).into_iter().filter(|s| *s >= from).collect();
            let sent = if self.broken { 0 } else { self.batch };
            let items: Vec<Item> = matching
                .iter()
                .take(sent)
                .map(|sequence| Item {
                    sequence: *sequence,
                    headers: HeaderMap::new(),
                    payload: Bytes::from(sequence.to_string()),
                })
                .collect();
            Ok(Page {
                pending: (matching.len() - items.len()) as u64,
                items,
            })
        }
    }

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    async fn replay_all<R: InboxReader>(
        reader: &R,
        user: &UserId,
        after: u64,
    ) -> Result<Vec<u64>, ResumeError> {
        let mut replay = Replay::after(reader, user, Cursor(after));
        let mut seen = Vec::new();
        while let Some(item) = replay.next().await? {
            seen.push(item.sequence);
        }
        Ok(seen)
    }

    #[tokio::test]
    async fn a_replay_reads_page_after_page_until_nothing_is_left() -> Result<(), ResumeError> {
        let items: Vec<(u64, &str)> = (1..=25)
            .map(|s| (s, if s % 2 == 0 { "bob" } else { "alice" }))
            .collect();
        let inbox = FakeInbox::new(&items, 3);
        let seen = replay_all(&inbox, &user("bob"), 4).await?;
        assert_eq!(seen, [6, 8, 10, 12, 14, 16, 18, 20, 22, 24]);
        // 10 items, 3 a page: 4 pages, the last one ending with 0 pending.
        assert_eq!(inbox.pages.load(Ordering::Relaxed), 4);
        Ok(())
    }

    #[tokio::test]
    async fn an_empty_inbox_is_one_request() -> Result<(), ResumeError> {
        let inbox = FakeInbox::new(&[(1, "alice")], 3);
        assert!(replay_all(&inbox, &user("bob"), 0).await?.is_empty());
        assert_eq!(inbox.pages.load(Ordering::Relaxed), 1);
        Ok(())
    }

    #[tokio::test]
    async fn items_stored_during_a_replay_are_read_too() -> Result<(), ResumeError> {
        let inbox = FakeInbox::new(&[(1, "bob"), (2, "bob")], 1);
        let bob = user("bob");
        let mut replay = Replay::after(&inbox, &bob, Cursor(0));
        let mut seen = Vec::new();
        while let Some(item) = replay.next().await? {
            if item.sequence == 1 {
                if let Ok(mut items) = inbox.items.lock() {
                    items.push((3, "bob"));
                }
            }
            seen.push(item.sequence);
        }
        assert_eq!(seen, [1, 2, 3]);
        Ok(())
    }

    #[tokio::test]
    async fn a_page_with_nothing_but_pending_items_fails_instead_of_looping() {
        let mut inbox = FakeInbox::new(&[(1, "bob")], 3);
        inbox.broken = true;
        let result = replay_all(&inbox, &user("bob"), 0).await;
        assert!(
            matches!(
                result,
                Err(ResumeError::EmptyPage {
                    after: 1,
                    pending: 1
                })
            ),
            "{result:?}"
        );
    }

    #[test]
    fn a_cursor_in_the_stream_resumes_from_itself() {
        assert_eq!(start_at(Cursor(7), 1, 10), (Cursor(7), true));
        assert_eq!(start_at(Cursor(10), 1, 10), (Cursor(10), true));
        // Just before the first item: nothing was lost.
        assert_eq!(start_at(Cursor(4), 5, 10), (Cursor(4), true));
    }

    #[test]
    fn a_cursor_below_the_first_item_is_not_resumed() {
        assert_eq!(start_at(Cursor(3), 5, 10), (Cursor(3), false));
        assert_eq!(start_at(Cursor(0), 2, 10), (Cursor(0), false));
    }

    #[test]
    fn a_cursor_beyond_the_end_is_replaced_by_the_end() {
        assert_eq!(start_at(Cursor(11), 1, 10), (Cursor(10), false));
        assert_eq!(start_at(Cursor(u64::MAX), 1, 10), (Cursor(10), false));
    }

    #[tokio::test]
    async fn a_device_without_a_cursor_starts_after_its_users_latest_item(
    ) -> Result<(), ResumeError> {
        let inbox = FakeInbox::new(&[(1, "bob"), (2, "alice"), (3, "bob"), (4, "alice")], 3);
        let at = |cursor, resumed, backlog| Start {
            cursor: Cursor(cursor),
            resumed,
            backlog,
        };
        assert_eq!(start(&inbox, &user("bob"), None).await?, at(3, true, false));
        assert_eq!(
            start(&inbox, &user("carol"), None).await?,
            at(0, true, false)
        );
        // Past the end: the end, nothing to read.
        assert_eq!(
            start(&inbox, &user("bob"), Some(Cursor(9))).await?,
            at(4, false, false)
        );
        // Behind the end: the inbox may hold the user's items after it.
        assert_eq!(
            start(&inbox, &user("bob"), Some(Cursor(1))).await?,
            at(1, true, true)
        );
        Ok(())
    }

    #[test]
    fn a_live_item_after_one_never_sent_is_a_gap() {
        // The router names the predecessor.
        assert!(follows_a_gap(
            Previous::At(Cursor(5)),
            Some(Cursor(9)),
            Cursor(4)
        ));
        assert!(!follows_a_gap(
            Previous::At(Cursor(5)),
            Some(Cursor(9)),
            Cursor(5)
        ));
        // It could not: only the item's own cursor tells.
        assert!(follows_a_gap(Previous::Unknown, Some(Cursor(9)), Cursor(8)));
        assert!(!follows_a_gap(
            Previous::Unknown,
            Some(Cursor(9)),
            Cursor(9)
        ));
        // Frames that are not inbox items, or predate the rule.
        assert!(!follows_a_gap(
            Previous::Unstated,
            Some(Cursor(9)),
            Cursor(1)
        ));
        assert!(!follows_a_gap(Previous::Unknown, None, Cursor(1)));
    }
}
