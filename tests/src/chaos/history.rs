//! What the clients did and saw: every attempt and try with its timing,
//! every frame received, and the counts between marks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use super::{Mark, Report};
use crate::servers::repo_root;

/// One message a sender tried to send.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub sender: String,
    pub seq: u64,
    pub client_msg_id: String,
    pub conversation: String,
    /// The id from `sent`, if one came.
    pub acked: Option<u64>,
    /// Tries it took (1 = no retry).
    pub tries: u32,
    /// The longest any one try waited for its answer once it was written
    /// to a connection (or gave up at the send timeout), in ms: how fast a
    /// fault is reported. Time spent waiting for a connection is not in it.
    pub slowest_try_ms: u64,
    /// An error that ends retrying (bad_request, forbidden): must not
    /// happen in a fault run.
    pub refused: Option<String>,
    /// Every try, in order.
    pub log: Vec<Try>,
}

/// One try of a send. Times are ms since the deployment started.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Try {
    /// When the sender handed it to its device's connection.
    pub started_ms: u64,
    /// When it was written to a connection (none took it: `None`).
    pub written_ms: Option<u64>,
    /// When its answer came, or when the sender stopped waiting.
    pub answered_ms: u64,
    /// `sent`; an error code (`unavailable`, `internal`, `rate_limited`,
    /// ...); `disconnected` (the connection ended before an answer);
    /// `timeout` (written, no answer within [`SEND_TIMEOUT`]);
    /// `no_connection` (no connection took it within [`SEND_TIMEOUT`]).
    pub outcome: String,
    /// A `sent` with `duplicate: true`: an earlier try was stored.
    pub duplicate: bool,
}

impl Try {
    /// How long it waited for its answer after it was written.
    pub fn waited_ms(&self) -> Option<u64> {
        self.written_ms
            .map(|written| self.answered_ms.saturating_sub(written))
    }
}

pub(super) fn millis_since(epoch: tokio::time::Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A `sent` answered this long after a fault began may still be for a
/// publish acknowledged before it (its answer was on its way).
pub const IN_FLIGHT_GRACE_MS: u64 = 2_000;

/// What the senders were answered while a fault was on, between two
/// marks (`from_ms`..=`to_ms`). A try "touches" the window when it was
/// started before its end and answered after its start.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Window {
    pub from_ms: u64,
    pub to_ms: u64,
    /// `sent` answered in the window to a try written in it, or more than
    /// [`IN_FLIGHT_GRACE_MS`] into it: acknowledged during the fault.
    /// Not counting duplicates.
    pub sent: usize,
    /// `sent` with `duplicate: true` in the window: a retry of a message
    /// an earlier try had stored (a stream leader can answer that
    /// without a quorum).
    pub sent_duplicate: usize,
    /// `sent` answered early in the window to a try written before it
    /// (acknowledged before the fault, answered after).
    pub sent_in_flight: usize,
    /// Answers in the window, by kind.
    pub unavailable: usize,
    pub disconnected: usize,
    pub other_errors: usize,
    /// Tries touching the window that were written and got no answer
    /// within [`SEND_TIMEOUT`]: a hang.
    pub timed_out: usize,
    /// Tries touching the window that no connection took within
    /// [`SEND_TIMEOUT`] (every session refused or reconnecting).
    pub no_connection: usize,
    /// Tries touching the window that were written and answered.
    pub answered: usize,
    /// The longest of those waited for its answer, in ms.
    pub slowest_answer_ms: u64,
}

/// One `message` frame a device received.
#[derive(Debug, Clone, Serialize)]
pub struct Received {
    /// The device's connection it came on (1 = first).
    pub connection: u32,
    /// When it arrived, ms since the deployment started.
    pub at_ms: u64,
    pub id: u64,
    pub conversation: String,
    pub from: String,
    pub client_msg_id: String,
}

/// Everything a run saw.
#[derive(Debug, Default, Serialize)]
pub struct History {
    pub attempts: Vec<Attempt>,
    /// `<user>/<device>` -> what it received, in order.
    pub received: BTreeMap<String, Vec<Received>>,
    /// Conversation -> its member users.
    pub members: HashMap<String, Vec<String>>,
    /// How many times each device connected.
    pub connections: BTreeMap<String, u32>,
    /// What the fault schedule noted.
    pub marks: Vec<Mark>,
}

impl History {
    pub(super) fn acked(&self) -> impl Iterator<Item = (&Attempt, u64)> {
        self.attempts
            .iter()
            .filter_map(|attempt| attempt.acked.map(|id| (attempt, id)))
    }

    /// `(device, id)` of every acked message a member device lacks.
    pub fn missing_deliveries(&self) -> Vec<(String, u64)> {
        let mut seen: HashMap<&str, HashSet<u64>> = HashMap::new();
        for (device, items) in &self.received {
            seen.insert(device, items.iter().map(|r| r.id).collect());
        }
        let mut missing = Vec::new();
        for (attempt, id) in self.acked() {
            for device in self.devices_of(&attempt.conversation) {
                let got = seen
                    .get(device.as_str())
                    .is_some_and(|ids| ids.contains(&id));
                if !got {
                    missing.push((device, id));
                }
            }
        }
        missing
    }

    /// Whether every device has every acked message of its conversations.
    pub(super) fn complete(&self) -> bool {
        let mut seen: HashMap<&str, HashSet<u64>> = HashMap::new();
        for (device, items) in &self.received {
            seen.insert(device, items.iter().map(|r| r.id).collect());
        }
        self.acked().all(|(attempt, id)| {
            self.devices_of(&attempt.conversation).iter().all(|device| {
                seen.get(device.as_str())
                    .is_some_and(|ids| ids.contains(&id))
            })
        })
    }

    /// When `what` was marked first (ms since the start).
    pub fn mark(&self, what: &str) -> Option<u64> {
        self.marks.iter().find(|m| m.what == what).map(|m| m.at_ms)
    }

    /// The answers senders got between `from_ms` and `to_ms`.
    pub fn window(&self, from_ms: u64, to_ms: u64) -> Window {
        let mut window = Window {
            from_ms,
            to_ms,
            ..Window::default()
        };
        for attempt in &self.attempts {
            for try_ in &attempt.log {
                let answered_in = (from_ms..=to_ms).contains(&try_.answered_ms);
                if answered_in {
                    match try_.outcome.as_str() {
                        "sent" if try_.duplicate => window.sent_duplicate += 1,
                        "sent" => {
                            let written_before = try_.written_ms.is_some_and(|w| w < from_ms);
                            if written_before && try_.answered_ms < from_ms + IN_FLIGHT_GRACE_MS {
                                window.sent_in_flight += 1;
                            } else {
                                window.sent += 1;
                            }
                        }
                        "unavailable" => window.unavailable += 1,
                        "disconnected" => window.disconnected += 1,
                        "timeout" | "no_connection" => {}
                        _ => window.other_errors += 1,
                    }
                }
                let touches = try_.started_ms <= to_ms && try_.answered_ms >= from_ms;
                if !touches {
                    continue;
                }
                match (try_.outcome.as_str(), try_.waited_ms()) {
                    ("timeout", _) => window.timed_out += 1,
                    ("no_connection", _) => window.no_connection += 1,
                    (_, Some(waited)) => {
                        window.answered += 1;
                        window.slowest_answer_ms = window.slowest_answer_ms.max(waited);
                    }
                    _ => {}
                }
            }
        }
        window
    }

    /// The acked attempts whose successful try was written between
    /// `from_ms` and `to_ms`: sent while a fault was on.
    pub fn acked_written_between(&self, from_ms: u64, to_ms: u64) -> Vec<&Attempt> {
        self.attempts
            .iter()
            .filter(|attempt| {
                attempt.acked.is_some()
                    && attempt.log.last().is_some_and(|t| {
                        t.outcome == "sent"
                            && t.written_ms.is_some_and(|w| (from_ms..=to_ms).contains(&w))
                    })
            })
            .collect()
    }

    /// When the first device of `attempt`'s conversation received it
    /// (ms since the start), and when the last one did.
    pub fn received_at(&self, attempt: &Attempt) -> Option<(u64, u64)> {
        let id = attempt.acked?;
        let mut first: Option<u64> = None;
        let mut last: Option<u64> = None;
        for device in self.devices_of(&attempt.conversation) {
            let at = self
                .received
                .get(&device)?
                .iter()
                .find(|r| r.id == id)?
                .at_ms;
            first = Some(first.map_or(at, |f| f.min(at)));
            last = Some(last.map_or(at, |l| l.max(at)));
        }
        first.zip(last)
    }

    fn devices_of(&self, conversation: &str) -> Vec<String> {
        let users = self.members.get(conversation).cloned().unwrap_or_default();
        self.received
            .keys()
            .filter(|device| {
                let user = device.split('/').next().unwrap_or_default();
                users.iter().any(|member| member == user)
            })
            .cloned()
            .collect()
    }

    /// Writes the history as JSON lines under `target/chaos/<scenario>/`.
    pub fn write(&self, scenario: &str, report: &Report) -> Result<PathBuf> {
        let dir = repo_root().join("target/chaos").join(scenario);
        std::fs::create_dir_all(&dir)?;
        let lines = |items: Vec<String>| items.join("\n") + "\n";
        let attempts = self
            .attempts
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()?;
        std::fs::write(dir.join("attempts.jsonl"), lines(attempts))?;
        for (device, items) in &self.received {
            let received = items
                .iter()
                .map(serde_json::to_string)
                .collect::<Result<Vec<_>, _>>()?;
            let name = device.replace('/', "-");
            std::fs::write(dir.join(format!("{name}.jsonl")), lines(received))?;
        }
        std::fs::write(
            dir.join("marks.json"),
            serde_json::to_string_pretty(&self.marks)?,
        )?;
        std::fs::write(
            dir.join("report.json"),
            serde_json::to_string_pretty(report)?,
        )?;
        Ok(dir)
    }
}
