//! The fault-injection checker, after Jepsen's queue checks.
//!
//! A [`Workload`] runs senders and recording devices against a
//! [`Deployment`] (every service its own process, so faults can kill them)
//! while a fault schedule runs. Each sender sends `(sender, seq)` messages
//! with `client_msg_id = <sender>-<seq>` and retries the same id until it
//! gets `sent`; every device records every `message` frame it receives,
//! per connection. After the faults heal and everything drains, [`check`]
//! classifies the history:
//! - lost: acked (`sent`) but missing on some device of some member,
//!   split by where in that sender's stream the gap is (prefix, middle,
//!   postfix);
//! - unexpected: received but never attempted;
//! - duplicates within one connection (PROTOCOL.md: never), and
//!   redeliveries across reconnects (allowed, deduped by `id`);
//! - one attempt stored under two ids;
//! - per-sender order per device;
//! - PostgreSQL: every acked message stored, none stored twice;
//! - dead letters, apart from those of a poison event the scenario
//!   injected on purpose.
//!
//! Every try of every send is logged with when it was written and
//! answered, and how; a fault schedule marks moments
//! ([`Deployment::mark`]), and [`History::window`] counts the answers
//! between two of them (e.g. no `sent` while a quorum is lost).
//!
//! The history is written as JSON lines under `target/chaos/<scenario>/`.

mod checker;
mod deployment;
mod history;
mod workload;

pub use checker::*;
pub use deployment::*;
pub use history::*;
pub use workload::*;

use std::future::Future;

use anyhow::Result;

/// What a scenario saw and found.
pub struct Outcome {
    pub report: Report,
    pub history: History,
    /// Everything in the DEADLETTER stream afterwards.
    pub dead_letters: Vec<DeadLetter>,
}

/// Runs a scenario end to end: the workload under `faults`, the checks,
/// the history written to `target/chaos/<scenario>/`, and a line for the
/// log. Returns the report (the caller asserts).
pub async fn scenario<F>(
    name: &str,
    deployment: &mut Deployment,
    workload: &Workload,
    faults: F,
) -> Result<Report>
where
    F: for<'a> FnOnce(
        &'a mut Deployment,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<()>> + 'a>>,
{
    Ok(scenario_outcome(name, deployment, workload, faults)
        .await?
        .report)
}

/// [`scenario`], also returning the history and the dead letters for
/// assertions about when things happened.
pub async fn scenario_outcome<F>(
    name: &str,
    deployment: &mut Deployment,
    workload: &Workload,
    faults: F,
) -> Result<Outcome>
where
    F: for<'a> FnOnce(
        &'a mut Deployment,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<()>> + 'a>>,
{
    let history = run(deployment, workload, faults).await?;
    let stored = stored_messages(deployment, &history).await?;
    let mut report = check(&history, &stored);
    if report.lost > 0 {
        report.lost_but_in_inbox = deployment
            .missing_but_in_inbox(&history.missing_deliveries())
            .await?;
    }
    report.duplicated_in_database = report
        .duplicated_in_database
        .max(deployment.duplicated_in_database().await?);
    let dead_letters = deployment.dead_letters().await?;
    let expected = |dead: &DeadLetter| {
        deployment
            .expected_dead
            .iter()
            .any(|(stream, seq)| *stream == dead.stream && *seq == dead.seq)
    };
    report.dead_letters_expected = dead_letters.iter().filter(|d| expected(d)).count() as u64;
    report.dead_letters = dead_letters.len() as u64 - report.dead_letters_expected;
    if let (Some(from), Some(to)) = (history.mark(FAULT), history.mark(HEALING)) {
        report.during_fault = Some(history.window(from, to));
    }
    let dir = history.write(name, &report)?;
    let dead_lines = dead_letters
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<Vec<_>, _>>()?;
    std::fs::write(dir.join("dead_letters.jsonl"), dead_lines.join("\n") + "\n")?;
    if let Some(window) = &report.during_fault {
        println!("chaos {name}: during the fault {window:?}");
    }
    println!(
        "chaos {name}: attempted {} acked {} lost {} duplicated {} (in connection) \
         redelivered {} stored twice {} out of order {} reconnects {} retried {} slowest try {} ms \
         timed-out tries {} db missing {} db duplicated {} dead letters {} (+{} expected) -> {}",
        report.attempted,
        report.acked,
        report.lost,
        report.duplicated_in_connection,
        report.redelivered_after_reconnect,
        report.stored_twice,
        report.out_of_order,
        report.reconnects,
        report.retried,
        report.slowest_try_ms,
        report.timed_out_tries,
        report.missing_in_database,
        report.duplicated_in_database,
        report.dead_letters,
        report.dead_letters_expected,
        dir.display()
    );
    Ok(Outcome {
        report,
        history,
        dead_letters,
    })
}
