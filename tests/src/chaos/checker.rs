//! The checks over a history and what PostgreSQL stored.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;

use super::history::{Attempt, History, Window};
use super::workload::SETTLE;
use super::Deployment;

/// A row of the history store.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: u64,
    pub sender: String,
    pub client_msg_id: String,
}

/// What [`check`] found.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Report {
    pub attempted: usize,
    pub acked: usize,
    /// Attempted, never acked (the run ended first): may or may not exist.
    pub unacked: usize,
    /// Attempts refused with a client error (must be 0).
    pub refused: usize,
    /// Sends that needed more than one try.
    pub retried: usize,
    /// The longest one try of any send waited for its answer, in ms (a
    /// try that got none counts [`SEND_TIMEOUT`]).
    pub slowest_try_ms: u64,
    /// Tries written to a connection that got no answer within
    /// [`SEND_TIMEOUT`].
    pub timed_out_tries: usize,
    /// acked x member devices.
    pub expected_deliveries: usize,
    pub lost: usize,
    pub lost_prefix: usize,
    pub lost_middle: usize,
    pub lost_postfix: usize,
    /// Of the lost, those whose item is in the member's INBOX: appended,
    /// but never delivered to that device (its live frame was lost and
    /// its cursor moved past it, so no resume brings it).
    pub lost_but_in_inbox: usize,
    /// Received, but no sender attempted it.
    pub unexpected: usize,
    /// The same id twice on one connection (PROTOCOL.md: never).
    pub duplicated_in_connection: usize,
    /// The same id again on a later connection of a device (deduped by id;
    /// allowed, counted for information).
    pub redelivered_after_reconnect: usize,
    /// One attempt seen under two different ids.
    pub stored_twice: usize,
    /// A device saw a sender's messages in one conversation out of order.
    pub out_of_order: usize,
    /// Device connections beyond the first.
    pub reconnects: usize,
    /// Acked, but not in PostgreSQL.
    pub missing_in_database: usize,
    /// (sender, client_msg_id) stored more than once in PostgreSQL.
    pub duplicated_in_database: usize,
    /// Events in the DEADLETTER stream the scenario did not cause on
    /// purpose: a consumer gave up on one, or one exhausted its
    /// deliveries (a database outage must not do that).
    pub dead_letters: u64,
    /// Dead letters of the poison events the scenario injected
    /// ([`Deployment::expect_dead_letter`]).
    pub dead_letters_expected: u64,
    /// The answers between the marks [`FAULT`] and [`HEALING`], where the
    /// scenario set them.
    pub during_fault: Option<Window>,
}

impl Report {
    /// Fails unless nothing was lost, duplicated, reordered or refused.
    pub fn assert_clean(&self) -> Result<()> {
        let problems = [
            ("lost", self.lost),
            ("unexpected", self.unexpected),
            (
                "duplicated within a connection",
                self.duplicated_in_connection,
            ),
            ("stored twice", self.stored_twice),
            ("out of order", self.out_of_order),
            ("refused", self.refused),
            ("missing in the database", self.missing_in_database),
            ("duplicated in the database", self.duplicated_in_database),
            (
                "dead-lettered",
                usize::try_from(self.dead_letters).unwrap_or(usize::MAX),
            ),
        ];
        let found: Vec<String> = problems
            .iter()
            .filter(|(_, count)| *count > 0)
            .map(|(what, count)| format!("{count} {what}"))
            .collect();
        if !found.is_empty() {
            bail!("the checker found: {} ({self:?})", found.join(", "));
        }
        if self.acked == 0 {
            bail!("nothing was acked: the run proves nothing ({self:?})");
        }
        Ok(())
    }
}

/// Classifies `history` and the rows `stored` in PostgreSQL.
pub fn check(history: &History, stored: &[Stored]) -> Report {
    let mut report = Report {
        attempted: history.attempts.len(),
        ..Default::default()
    };
    let attempted: HashMap<(&str, &str), &Attempt> = history
        .attempts
        .iter()
        .map(|a| ((a.sender.as_str(), a.client_msg_id.as_str()), a))
        .collect();
    for attempt in &history.attempts {
        match (attempt.acked, &attempt.refused) {
            (Some(_), _) => report.acked += 1,
            (None, Some(_)) => report.refused += 1,
            (None, None) => report.unacked += 1,
        }
        if attempt.tries > 1 {
            report.retried += 1;
        }
        report.timed_out_tries += attempt
            .log
            .iter()
            .filter(|t| t.outcome == "timeout")
            .count();
        report.slowest_try_ms = report.slowest_try_ms.max(attempt.slowest_try_ms);
    }
    report.reconnects = history
        .connections
        .values()
        .map(|c| c.saturating_sub(1) as usize)
        .sum();

    // Ids seen per attempt, across all devices.
    let mut ids_of_attempt: HashMap<(&str, &str), HashSet<u64>> = HashMap::new();
    for (attempt, id) in history.acked() {
        ids_of_attempt
            .entry((attempt.sender.as_str(), attempt.client_msg_id.as_str()))
            .or_default()
            .insert(id);
    }

    for (device, items) in &history.received {
        let mut per_connection: HashSet<(u32, u64)> = HashSet::new();
        let mut seen: HashSet<u64> = HashSet::new();
        // (conversation, sender) -> last seq seen, for order.
        let mut last_seq: HashMap<(&str, &str), u64> = HashMap::new();
        for item in items {
            if !per_connection.insert((item.connection, item.id)) {
                report.duplicated_in_connection += 1;
                continue;
            }
            if !seen.insert(item.id) {
                report.redelivered_after_reconnect += 1;
                continue;
            }
            let key = (item.from.as_str(), item.client_msg_id.as_str());
            let Some(attempt) = attempted.get(&key) else {
                report.unexpected += 1;
                continue;
            };
            ids_of_attempt.entry(key).or_default().insert(item.id);
            let order_key = (item.conversation.as_str(), item.from.as_str());
            if let Some(previous) = last_seq.get(&order_key) {
                if attempt.seq <= *previous {
                    report.out_of_order += 1;
                }
            }
            last_seq.insert(order_key, attempt.seq);
        }

        // Lost: acked messages of this device's conversations it lacks,
        // by where they sit in each sender's stream.
        let user = device.split('/').next().unwrap_or_default();
        let mut streams: BTreeMap<&str, Vec<(u64, bool)>> = BTreeMap::new();
        for (attempt, id) in history.acked() {
            let member = history
                .members
                .get(&attempt.conversation)
                .is_some_and(|users| users.iter().any(|u| u == user));
            if member {
                streams
                    .entry(attempt.sender.as_str())
                    .or_default()
                    .push((attempt.seq, seen.contains(&id)));
            }
        }
        for stream in streams.values_mut() {
            stream.sort_unstable();
            report.expected_deliveries += stream.len();
            let first = stream.iter().position(|(_, got)| *got);
            let last = stream.iter().rposition(|(_, got)| *got);
            for (index, (_, got)) in stream.iter().enumerate() {
                if *got {
                    continue;
                }
                report.lost += 1;
                match (first, last) {
                    (Some(first), _) if index < first => report.lost_prefix += 1,
                    (_, Some(last)) if index > last => report.lost_postfix += 1,
                    (Some(_), Some(_)) => report.lost_middle += 1,
                    _ => report.lost_postfix += 1,
                }
            }
        }
    }
    report.stored_twice = ids_of_attempt.values().filter(|ids| ids.len() > 1).count();

    let mut stored_ids: HashSet<u64> = HashSet::new();
    let mut stored_keys: HashMap<(&str, &str), usize> = HashMap::new();
    for row in stored {
        stored_ids.insert(row.id);
        *stored_keys
            .entry((row.sender.as_str(), row.client_msg_id.as_str()))
            .or_default() += 1;
    }
    report.missing_in_database = history
        .acked()
        .filter(|(_, id)| !stored_ids.contains(id))
        .count();
    report.duplicated_in_database = stored_keys.values().filter(|n| **n > 1).count();
    report
}

/// Reads the chaos users' messages from PostgreSQL, waiting (up to the
/// settle time) until every acked one is there: the persister may lag.
pub async fn stored_messages(deployment: &Deployment, history: &History) -> Result<Vec<Stored>> {
    let acked: HashSet<u64> = history.acked().map(|(_, id)| id).collect();
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let rows = deployment
            .rows_everywhere(
                "SELECT id, sender, client_msg_id FROM messages WHERE sender LIKE 'chaos-%'",
            )
            .await;
        if let Ok(rows) = &rows {
            let stored: Vec<Stored> = rows
                .iter()
                .map(|row| Stored {
                    id: row.get::<_, i64>(0) as u64,
                    sender: row.get(1),
                    client_msg_id: row.get(2),
                })
                .collect();
            let ids: HashSet<u64> = stored.iter().map(|s| s.id).collect();
            if acked.is_subset(&ids) || tokio::time::Instant::now() > deadline {
                return Ok(stored);
            }
        } else if tokio::time::Instant::now() > deadline {
            return rows.map(|_| Vec::new());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::chaos::{Received, Try};

    fn attempt(sender: &str, seq: u64, conversation: &str, acked: Option<u64>) -> Attempt {
        Attempt {
            sender: sender.into(),
            seq,
            client_msg_id: format!("{sender}-{seq}"),
            conversation: conversation.into(),
            acked,
            tries: 1,
            slowest_try_ms: 0,
            refused: None,
            log: Vec::new(),
        }
    }

    fn got(connection: u32, id: u64, from: &str, seq: u64) -> Received {
        Received {
            connection,
            at_ms: 0,
            id,
            conversation: "dm:a:b".into(),
            from: from.into(),
            client_msg_id: format!("{from}-{seq}"),
        }
    }

    fn history(received: Vec<Received>) -> History {
        let mut members = HashMap::new();
        members.insert("dm:a:b".to_string(), vec!["a".to_string(), "b".to_string()]);
        let mut by_device = BTreeMap::new();
        by_device.insert("b/d0".to_string(), received);
        History {
            attempts: (0..5)
                .map(|seq| attempt("a", seq, "dm:a:b", Some(100 + seq)))
                .collect(),
            received: by_device,
            members,
            connections: BTreeMap::new(),
            marks: Vec::new(),
        }
    }

    fn stored_all() -> Vec<Stored> {
        (0..5)
            .map(|seq| Stored {
                id: 100 + seq,
                sender: "a".into(),
                client_msg_id: format!("a-{seq}"),
            })
            .collect()
    }

    #[test]
    fn a_complete_history_is_clean() {
        let history = history((0..5).map(|seq| got(1, 100 + seq, "a", seq)).collect());
        assert!(history.complete());
        let report = check(&history, &stored_all());
        assert_eq!(report.acked, 5);
        assert_eq!(report.expected_deliveries, 5);
        report.assert_clean().unwrap();
    }

    #[test]
    fn gaps_are_lost_by_position() {
        // Received 1 and 3 of 0..5: 0 is a prefix loss, 2 middle, 4 postfix.
        let history = history(vec![got(1, 101, "a", 1), got(1, 103, "a", 3)]);
        assert!(!history.complete());
        assert_eq!(
            history.missing_deliveries(),
            [100, 102, 104].map(|id| ("b/d0".to_string(), id))
        );
        let report = check(&history, &stored_all());
        assert_eq!(
            (
                report.lost,
                report.lost_prefix,
                report.lost_middle,
                report.lost_postfix
            ),
            (3, 1, 1, 1)
        );
        assert!(report.assert_clean().is_err());
    }

    #[test]
    fn duplicates_within_a_connection_fail_and_across_reconnects_do_not() {
        let mut items: Vec<Received> = (0..5).map(|seq| got(1, 100 + seq, "a", seq)).collect();
        items.push(got(2, 104, "a", 4));
        let report = check(&history(items.clone()), &stored_all());
        assert_eq!(report.redelivered_after_reconnect, 1);
        report.assert_clean().unwrap();

        items.push(got(2, 104, "a", 4));
        let report = check(&history(items), &stored_all());
        assert_eq!(report.duplicated_in_connection, 1);
        assert!(report.assert_clean().is_err());
    }

    #[test]
    fn unexpected_reordered_and_split_messages_are_found() {
        let items: Vec<Received> = vec![
            got(1, 100, "a", 0),
            got(1, 102, "a", 2),
            got(1, 101, "a", 1),
            got(1, 103, "a", 3),
            got(1, 104, "a", 4),
            // A second id for attempt a-4, and a message nobody sent.
            got(1, 999, "a", 4),
            got(1, 555, "z", 0),
        ];
        let report = check(&history(items), &stored_all());
        assert_eq!(report.out_of_order, 2, "{report:?}");
        assert_eq!(report.stored_twice, 1);
        assert_eq!(report.unexpected, 1);
        assert!(report.assert_clean().is_err());
    }

    #[test]
    fn the_database_must_hold_every_acked_message_once() {
        let history = history((0..5).map(|seq| got(1, 100 + seq, "a", seq)).collect());
        let mut stored = stored_all();
        stored.remove(0);
        stored.push(Stored {
            id: 777,
            sender: "a".into(),
            client_msg_id: "a-3".into(),
        });
        let report = check(&history, &stored);
        assert_eq!(report.missing_in_database, 1);
        assert_eq!(report.duplicated_in_database, 1);
        assert!(report.assert_clean().is_err());
    }

    #[test]
    fn answers_during_a_fault_are_classified() {
        let t = |started: u64, written: Option<u64>, answered: u64, outcome: &str| Try {
            started_ms: started,
            written_ms: written,
            answered_ms: answered,
            outcome: outcome.into(),
            duplicate: false,
        };
        let mut history = history(Vec::new());
        // The fault is on from 1,000 to 12,000 ms.
        history.attempts[0].log = vec![
            // Acked before the fault, answered just after it began.
            t(900, Some(900), 1_100, "sent"),
        ];
        history.attempts[1].log = vec![
            t(1_500, Some(1_500), 3_500, "unavailable"),
            // Hung: counted although answered after the window.
            t(3_600, Some(3_600), 13_600, "timeout"),
            // After the fault.
            t(13_700, Some(13_700), 13_800, "sent"),
        ];
        history.attempts[2].log = vec![
            t(500, Some(500), 1_500, "disconnected"),
            t(2_000, None, 12_000, "no_connection"),
        ];
        history.attempts[3].log = vec![
            // Written during the fault and acked: what must not happen
            // without a quorum.
            t(5_000, Some(5_000), 5_100, "sent"),
        ];
        history.attempts[4].log = vec![
            // Written before, but acked long after the fault began.
            t(200, Some(200), 3_500, "sent"),
            Try {
                duplicate: true,
                ..t(4_000, Some(4_000), 4_050, "sent")
            },
        ];
        let window = history.window(1_000, 12_000);
        assert_eq!(
            window,
            Window {
                from_ms: 1_000,
                to_ms: 12_000,
                sent: 2,
                sent_duplicate: 1,
                sent_in_flight: 1,
                unavailable: 1,
                disconnected: 1,
                other_errors: 0,
                timed_out: 1,
                no_connection: 1,
                answered: 6,
                slowest_answer_ms: 3_300,
            }
        );
    }

    #[test]
    fn a_run_that_acked_nothing_proves_nothing() {
        let mut history = history(Vec::new());
        for attempt in &mut history.attempts {
            attempt.acked = None;
        }
        let report = check(&history, &[]);
        assert_eq!(report.unacked, 5);
        assert!(report.assert_clean().is_err());
    }
}
