//! Which jobs this process is working on or has finished, so a redelivered
//! job (an ack lost on the way, an in-progress ack that came too late)
//! causes no second notification. Kept in memory: after a crash the
//! unacked jobs come back and are sent again (at-least-once).

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use chat_shared::push::PushWork;
use tokio::time::Instant;

/// How long a finished job is remembered: far longer than any redelivery
/// of a job acked in time takes.
const REMEMBER: Duration = Duration::from_secs(15 * 60);
/// At most this many finished jobs are remembered; the oldest go first.
const MAX_REMEMBERED: usize = 100_000;

/// A job's identity: one message for one user, or one retraction.
pub type JobKey = String;

pub fn key(work: &PushWork) -> JobKey {
    match work {
        PushWork::Message(job) => format!("{}:{}:{}", job.conversation, job.id, job.user),
        PushWork::Retract(job) => format!(
            "retract:{}:{}:{}:{}",
            job.retract.as_str(),
            job.conversation,
            job.up_to,
            job.user
        ),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Ours to handle.
    New,
    /// Another delivery of it is in a window or being sent.
    InFlight,
    /// Already settled (sent, or given up on) here.
    Done,
}

#[derive(Default)]
pub struct Ledger {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    in_flight: HashSet<JobKey>,
    done: HashSet<JobKey>,
    done_order: VecDeque<(Instant, JobKey)>,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update leaves the sets consistent, so a panic elsewhere
        // while holding the lock does not make them wrong.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn claim(&self, key: &JobKey) -> Claim {
        let mut inner = self.lock();
        inner.forget_old(Instant::now());
        if inner.done.contains(key) {
            Claim::Done
        } else if inner.in_flight.insert(key.clone()) {
            Claim::New
        } else {
            Claim::InFlight
        }
    }

    /// The jobs are settled and acked.
    pub fn finish(&self, keys: impl IntoIterator<Item = JobKey>) {
        let mut inner = self.lock();
        let now = Instant::now();
        for key in keys {
            inner.in_flight.remove(&key);
            if inner.done.insert(key.clone()) {
                inner.done_order.push_back((now, key));
            }
        }
        while inner.done_order.len() > MAX_REMEMBERED {
            if let Some((_, key)) = inner.done_order.pop_front() {
                inner.done.remove(&key);
            }
        }
    }

    /// The jobs went back to the stream unsettled.
    pub fn release(&self, keys: impl IntoIterator<Item = JobKey>) {
        let mut inner = self.lock();
        for key in keys {
            inner.in_flight.remove(&key);
        }
    }
}

impl Inner {
    fn forget_old(&mut self, now: Instant) {
        while let Some((at, _)) = self.done_order.front() {
            if now.duration_since(*at) < REMEMBER {
                break;
            }
            if let Some((_, key)) = self.done_order.pop_front() {
                self.done.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_job_is_claimed_once_until_released_and_remembered_when_done() {
        let ledger = Ledger::default();
        let a: JobKey = "dm:a:b:1:b".into();
        assert_eq!(ledger.claim(&a), Claim::New);
        assert_eq!(ledger.claim(&a), Claim::InFlight);
        ledger.release([a.clone()]);
        assert_eq!(ledger.claim(&a), Claim::New);
        ledger.finish([a.clone()]);
        assert_eq!(ledger.claim(&a), Claim::Done);
        tokio::time::advance(REMEMBER + Duration::from_secs(1)).await;
        assert_eq!(ledger.claim(&a), Claim::New);
    }
}
