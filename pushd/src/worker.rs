//! Consuming PUSH: one coalescing window per user, one notification per
//! window and token, acks once every token is settled.
//!
//! The first job for a user opens a window of `config.push.coalesce`; jobs
//! for that user arriving meanwhile join it. When it closes the window's
//! message jobs become one [`Notification`], sent to the tokens of the
//! devices the jobs name (every token of the user for a job naming none),
//! with the user's unread total as badge. Retractions in the window go out
//! after it, and drop the window's messages they cover, so a message read
//! before its notification left is never shown.
//! Jobs arriving after the close open the next window. Until their window
//! is settled the jobs are kept alive with in-progress acks, so the
//! consumer's `ack_wait` only runs out for a pushd that is gone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use chat_persister::shards::Shards;
use chat_shared::consume::{self, Backoff};
use chat_shared::ids::{DeviceId, UserId};
use chat_shared::push::{PushJob, PushWork, RetractJob, RetractReason};
use chat_shared::telemetry::TraceId;
use chat_shared::{shutdown, streams, subjects};
use futures::StreamExt;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{interval_at, sleep_until, Instant, Interval};

use crate::ledger::{self, Claim, JobKey, Ledger};
use crate::metrics::PushMetrics;
use crate::mutes;
use crate::notification::{Notification, Push, Retraction};
use crate::providers::{Providers, Token};
use crate::retry::Outcome;
use crate::tokens;

/// Jobs asked for per pull request.
const PULL_BATCH: usize = 256;
/// Users with an open or sending window at once. Past it pulling pauses
/// (the consumer's `max_ack_pending` bounds what is outstanding anyway).
const MAX_WINDOWS: usize = 1024;
/// Jobs queued for one open window; a full queue opens a second window.
const WINDOW_QUEUE: usize = 256;

/// What every window needs.
pub struct Shared {
    /// Mutes and tokens on the home shard, the badge on the user's.
    pub shards: Shards,
    /// For dead letters.
    pub js: jetstream::Context,
    pub providers: Providers,
    pub metrics: PushMetrics,
    pub preview: bool,
    pub coalesce: Duration,
    /// `CHAT_PUSH_MAX_TOKENS_PER_USER`: the most tokens one job goes to.
    pub max_tokens: usize,
    pub ledger: Ledger,
    pub stop: watch::Receiver<bool>,
}

/// A job and the message that carries it.
struct Held {
    message: jetstream::Message,
    job: PushWork,
    key: JobKey,
}

/// How often jobs that are not settled yet get an in-progress ack: three
/// times per `ack_wait`, so one lost ack does not let a job expire.
fn progress_every() -> Duration {
    streams::pushd_consumer().ack_wait / 3
}

/// Pulls jobs until `shared.stop`, then lets the open windows settle.
pub async fn consume(shared: Arc<Shared>, consumer: PullConsumer) {
    let stopped = shutdown::wait(shared.stop.clone());
    tokio::pin!(stopped);
    let mut dispatcher = Dispatcher {
        shared: shared.clone(),
        windows: HashMap::new(),
        // Owned here: dropping `consume` (a crash, an aborted task) drops
        // every window with it, and their jobs come back after `ack_wait`.
        tasks: JoinSet::new(),
        slots: Arc::new(Semaphore::new(MAX_WINDOWS)),
    };
    'pull: loop {
        let Some(mut stream) = consume::open_pull(&consumer, PULL_BATCH, None, &mut stopped).await
        else {
            break;
        };
        loop {
            let next = tokio::select! {
                _ = &mut stopped => {
                    consume::release_buffered(&mut stream).await;
                    break 'pull;
                }
                Some(ended) = dispatcher.tasks.join_next(), if !dispatcher.tasks.is_empty() => {
                    if let Err(e) = ended {
                        tracing::error!(error = %e, "a push window failed");
                    }
                    continue;
                }
                next = stream.next() => next,
            };
            match next {
                Some(Ok(message)) => dispatcher.dispatch(message).await,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "pull stream error");
                    break;
                }
                None => break,
            }
        }
    }
    // Open windows see the stop too: they close now and send what they hold.
    dispatcher.windows.clear();
    while let Some(ended) = dispatcher.tasks.join_next().await {
        if let Err(e) = ended {
            tracing::error!(error = %e, "a push window failed");
        }
    }
}

struct Dispatcher {
    shared: Arc<Shared>,
    windows: HashMap<UserId, mpsc::Sender<Held>>,
    tasks: JoinSet<()>,
    slots: Arc<Semaphore>,
}

impl Dispatcher {
    #[tracing::instrument(skip_all, fields(subject = %message.subject, user, trace_id))]
    async fn dispatch(&mut self, message: jetstream::Message) {
        let span = tracing::Span::current();
        if let Some(trace) = TraceId::from_headers(message.headers.as_ref()) {
            span.record("trace_id", tracing::field::display(trace));
        }
        let job = match decode(&message) {
            Ok(job) => job,
            Err(reason) => {
                tracing::error!(%reason, "dead-lettering a malformed push job");
                // Copied to `chat.dead.pushd` before it is terminated.
                consume::dead_letter(&self.shared.js, &message, &reason.to_string()).await;
                return;
            }
        };
        span.record("user", tracing::field::display(job.user()));
        let key = ledger::key(&job);
        match self.shared.ledger.claim(&key) {
            Claim::New => {}
            Claim::Done => {
                tracing::debug!(%key, "push job already sent");
                ack(&message, AckKind::Ack).await;
                return;
            }
            Claim::InFlight => {
                // The window holding the earlier delivery acks the job
                // (acks name the stream sequence); this copy is dropped
                // unacked after pushing its deadline back.
                tracing::debug!(%key, "push job redelivered while in flight");
                ack(&message, AckKind::Progress).await;
                return;
            }
        }
        let mut held = Held { message, job, key };
        if let Some(window) = self.windows.get(held.job.user()) {
            match window.try_send(held) {
                Ok(()) => return,
                // Closed (it is sending now) or full: open the next window.
                Err(mpsc::error::TrySendError::Closed(back))
                | Err(mpsc::error::TrySendError::Full(back)) => held = back,
            }
        }
        let Some(slot) = self.slot(&held).await else {
            // Stopping: hand the job back for another pushd.
            ack(&held.message, AckKind::Nak(None)).await;
            self.shared.ledger.release([held.key]);
            return;
        };
        if self.windows.len() >= MAX_WINDOWS {
            self.windows.retain(|_, window| !window.is_closed());
        }
        let (tx, rx) = mpsc::channel(WINDOW_QUEUE);
        self.windows.insert(held.job.user().clone(), tx);
        self.tasks
            .spawn(window(self.shared.clone(), held, rx, slot));
    }

    /// A free window slot, keeping `held` alive while none is; `None` if
    /// pushd stops meanwhile.
    async fn slot(&self, held: &Held) -> Option<OwnedSemaphorePermit> {
        let stopped = shutdown::wait(self.shared.stop.clone());
        let acquire = self.slots.clone().acquire_owned();
        tokio::pin!(stopped, acquire);
        let mut tick = progress_interval();
        loop {
            tokio::select! {
                slot = &mut acquire => return slot.ok(),
                _ = &mut stopped => return None,
                _ = tick.tick() => ack(&held.message, AckKind::Progress).await,
            }
        }
    }
}

/// Why a PUSH message is no job; it is dead-lettered with this reason.
#[derive(Debug, thiserror::Error)]
enum DecodeError {
    #[error("malformed push job: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("a job for {0} on another user's subject")]
    WrongSubject(UserId),
}

fn decode(message: &jetstream::Message) -> Result<PushWork, DecodeError> {
    let job: PushWork = serde_json::from_slice(&message.payload)?;
    if message.subject.as_str() != subjects::push(job.user()) {
        return Err(DecodeError::WrongSubject(job.user().clone()));
    }
    Ok(job)
}

fn progress_interval() -> Interval {
    let every = progress_every();
    interval_at(Instant::now() + every, every)
}

async fn ack(message: &jetstream::Message, kind: AckKind) {
    if let Err(e) = message.ack_with(kind).await {
        // A lost ack is redelivery, which the ledger absorbs.
        tracing::warn!(error = %e, ?kind, subject = %message.subject, "cannot ack a push job");
    }
}

async fn progress(held: &[Held]) {
    for job in held {
        ack(&job.message, AckKind::Progress).await;
    }
}

/// One user's window: collect, send, settle.
async fn window(
    shared: Arc<Shared>,
    first: Held,
    mut queue: mpsc::Receiver<Held>,
    _slot: OwnedSemaphorePermit,
) {
    let mut held = vec![first];
    let mut tick = progress_interval();
    let stopped = shutdown::wait(shared.stop.clone());
    let closed = sleep_until(Instant::now() + shared.coalesce);
    tokio::pin!(stopped, closed);
    loop {
        tokio::select! {
            _ = &mut closed => break,
            _ = &mut stopped => break,
            next = queue.recv() => match next {
                Some(job) => held.push(job),
                None => break,
            },
            _ = tick.tick() => progress(&held).await,
        }
    }
    // Whatever was queued before the close is in; later jobs open a new window.
    queue.close();
    while let Ok(job) = queue.try_recv() {
        held.push(job);
    }
    let jobs: Vec<PushWork> = held.iter().map(|h| h.job.clone()).collect();
    let send = deliver(&shared, &jobs);
    tokio::pin!(send);
    let settled = loop {
        tokio::select! {
            settled = &mut send => break settled,
            _ = tick.tick() => progress(&held).await,
        }
    };
    let keys = held.iter().map(|h| h.key.clone()).collect::<Vec<_>>();
    if settled {
        for job in &held {
            ack(&job.message, AckKind::Ack).await;
        }
        shared.ledger.finish(keys);
    } else {
        // Interrupted by a stop: back to the stream for the next pushd.
        for job in &held {
            ack(&job.message, AckKind::Nak(None)).await;
        }
        shared.ledger.release(keys);
    }
}

/// Sends the window's notification, then its retractions. `true` once
/// every token is settled (sent, or failed for good); `false` if a stop
/// interrupted it.
async fn deliver(shared: &Shared, work: &[PushWork]) -> bool {
    let Some(user) = work.first().map(|w| w.user().clone()) else {
        return true;
    };
    let (all, retractions) = split(work);
    let jobs = mutes::unmuted(shared.shards.home(), &user, all.clone()).await;
    shared.metrics.count_muted((all.len() - jobs.len()) as u64);
    if jobs.is_empty() && retractions.is_empty() {
        // Everything muted: nothing to send, so no badge to count.
        return true;
    }
    // Muted conversations still count in the badge, they only send nothing.
    let badge = badge(shared, &user, &all).await;
    let mut settled = true;
    if let Some(mut notification) = Notification::coalesce(&jobs, shared.preview) {
        notification.badge = badge;
        let devices = devices_of(jobs.iter().map(|j| j.devices.as_deref()));
        settled &= send(shared, &Push::Notify(notification), devices.as_deref()).await;
    }
    for job in retractions {
        let retraction = Retraction {
            user: job.user.clone(),
            conversation: job.conversation.clone(),
            reason: job.retract,
            up_to: job.up_to,
            badge,
        };
        let devices = job.devices.as_deref();
        settled &= send(shared, &Push::Retract(retraction), devices).await;
    }
    settled
}

/// The window's message jobs that no retraction in it covers, and its
/// retractions, reads merged per conversation (the newest mark, every
/// device named) and deletes once each.
fn split(work: &[PushWork]) -> (Vec<PushJob>, Vec<RetractJob>) {
    let mut retractions: Vec<RetractJob> = Vec::new();
    for job in work.iter().filter_map(|w| match w {
        PushWork::Retract(job) => Some(job),
        PushWork::Message(_) => None,
    }) {
        let same = retractions.iter_mut().find(|r| {
            r.conversation == job.conversation
                && r.retract == job.retract
                && (job.retract == RetractReason::Read || r.up_to == job.up_to)
        });
        match same {
            Some(merged) => {
                merged.up_to = merged.up_to.max(job.up_to);
                let devices = [merged.devices.as_deref(), job.devices.as_deref()];
                merged.devices = devices_of(devices.into_iter());
            }
            None => retractions.push(job.clone()),
        }
    }
    let covered = |job: &PushJob| {
        retractions.iter().any(|r| {
            r.conversation == job.conversation
                && match r.retract {
                    RetractReason::Read => job.id <= r.up_to,
                    RetractReason::Delete => job.id == r.up_to,
                }
        })
    };
    let jobs = work
        .iter()
        .filter_map(|w| match w {
            PushWork::Message(job) if !covered(job) => Some(job.clone()),
            _ => None,
        })
        .collect();
    (jobs, retractions)
}

/// The devices several jobs name together: `None` (every token) if any
/// names none.
fn devices_of<'a>(named: impl Iterator<Item = Option<&'a [DeviceId]>>) -> Option<Vec<DeviceId>> {
    let mut all = Vec::new();
    for devices in named {
        all.extend_from_slice(devices?);
    }
    all.sort();
    all.dedup();
    Some(all)
}

/// The user's unread total, with `jobs` not yet stored, or `None` if
/// PostgreSQL cannot say now: a notification without a badge beats a late
/// one.
async fn badge(shared: &Shared, user: &UserId, jobs: &[PushJob]) -> Option<u64> {
    let pending: Vec<_> = jobs
        .iter()
        .map(|j| (j.conversation.clone(), j.id))
        .collect();
    let total = match shared.shards.user(user).get().await {
        Ok(db) => chat_persister::unread::total(&db, user, &pending)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    total
        .map_err(|error| tracing::warn!(%user, %error, "no unread total; sending without a badge"))
        .ok()
}

/// Sends `push` to the tokens of `devices` (all the user's for `None`).
async fn send(shared: &Shared, push: &Push, devices: Option<&[DeviceId]>) -> bool {
    let user = push.user();
    let Some(tokens) = user_tokens(shared, user, devices).await else {
        return false;
    };
    if tokens.is_empty() {
        tracing::debug!(%user, "no push tokens");
        return true;
    }
    let sends = tokens.iter().map(|token| async move {
        let outcome = shared
            .providers
            .deliver(token, push, shared.stop.clone())
            .await;
        (token, outcome)
    });
    let mut settled = true;
    for (token, outcome) in futures::future::join_all(sends).await {
        let provider = token.platform;
        match outcome {
            Outcome::Delivered => {}
            Outcome::Interrupted => {
                settled = false;
                continue;
            }
            Outcome::Failed(reason) => {
                tracing::warn!(%user, %provider, %reason, "push failed");
            }
            Outcome::InvalidToken(reason) => {
                tracing::info!(%user, %provider, %reason, "removing an invalid push token");
                match tokens::remove(shared.shards.home(), token).await {
                    Ok(true) => shared.metrics.count_token_removed(provider),
                    Ok(false) => {}
                    // It stays; the next notification finds it invalid again.
                    Err(e) => tracing::warn!(error = %e, "cannot remove a push token"),
                }
            }
        }
        let folded = push.count().saturating_sub(1) as u64;
        if folded > 0 {
            shared.metrics.count_coalesced(provider, folded);
        }
    }
    settled
}

/// The user's tokens on `devices` (all for `None`), retrying while
/// PostgreSQL is away; `None` on stop.
async fn user_tokens(
    shared: &Shared,
    user: &UserId,
    devices: Option<&[DeviceId]>,
) -> Option<Vec<Token>> {
    let mut backoff = Backoff::default();
    let stopped = shutdown::wait(shared.stop.clone());
    tokio::pin!(stopped);
    loop {
        match tokens::of_user(shared.shards.home(), user, devices, shared.max_tokens).await {
            Ok(tokens) => return Some(tokens),
            Err(e) => tracing::warn!(error = %e, %user, "cannot read push tokens; retrying"),
        }
        tokio::select! {
            _ = backoff.wait() => {}
            _ = &mut stopped => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::tests::job;
    use chat_shared::ids::MessageId;

    fn device(name: &str) -> DeviceId {
        DeviceId::parse(name).unwrap()
    }

    fn message(id: u64, devices: Option<&[&str]>) -> PushWork {
        let mut job = job("alice", id, "x");
        job.devices = devices.map(|d| d.iter().map(|n| device(n)).collect());
        PushWork::Message(job)
    }

    fn retract(reason: RetractReason, up_to: u64, devices: &[&str]) -> PushWork {
        let PushWork::Message(job) = message(1, None) else {
            unreachable!()
        };
        PushWork::Retract(RetractJob {
            user: job.user,
            conversation: job.conversation,
            retract: reason,
            up_to: MessageId(up_to),
            devices: Some(devices.iter().map(|n| device(n)).collect()),
        })
    }

    #[test]
    fn a_retraction_drops_the_messages_it_covers_and_reads_merge() {
        let work = [
            message(1, Some(&["phone"])),
            message(2, Some(&["phone"])),
            message(3, Some(&["tablet"])),
            message(4, Some(&["phone"])),
            retract(RetractReason::Read, 2, &["phone"]),
            retract(RetractReason::Read, 1, &["tablet"]),
            retract(RetractReason::Delete, 4, &["phone"]),
        ];
        let (jobs, retractions) = split(&work);
        let ids: Vec<u64> = jobs.iter().map(|j| j.id.get()).collect();
        assert_eq!(ids, [3], "read up to 2, 4 deleted");
        assert_eq!(retractions.len(), 2);
        assert_eq!(retractions[0].up_to, MessageId(2), "the newest read mark");
        assert_eq!(
            retractions[0].devices,
            Some(vec![device("phone"), device("tablet")])
        );
        assert_eq!(retractions[1].retract, RetractReason::Delete);
    }

    #[test]
    fn jobs_name_their_devices_together_unless_one_names_none() {
        let phone: &[DeviceId] = &[device("phone")];
        let both: &[DeviceId] = &[device("tablet"), device("phone")];
        assert_eq!(
            devices_of([Some(phone), Some(both)].into_iter()),
            Some(vec![device("phone"), device("tablet")])
        );
        assert_eq!(devices_of([Some(phone), None].into_iter()), None);
    }
}
