//! What a run cost in CPU, over every process of the system and the load
//! generator: user + system time from `/proc/<pid>/stat` (through
//! [`crate::bench::common::ProcStat`]) before and after, divided by the
//! messages delivered, with the split by process.
//!
//! A watched process counts with its descendants: PostgreSQL is a
//! postmaster and a backend per connection, and backends may come and go
//! during a run. A live descendant counts its own time; one that exited
//! and was reaped counts in its parent's `cutime`/`cstime`, so the sum
//! over the tree moves by exactly what the tree spent between readings.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use crate::bench::common::{clock_ticks_per_second, ProcError, ProcStat};

/// The name the load generator (this process) is reported under.
pub const LOAD_GENERATOR: &str = "chatctl (load)";

/// A process to watch: `name=pid`, e.g. `postgres=4242`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("`{0}`: expected NAME=PID, e.g. postgres=4242")]
    Spec(String),
    #[error(transparent)]
    Proc(#[from] ProcError),
}

impl std::str::FromStr for Watched {
    type Err = CpuError;

    fn from_str(spec: &str) -> Result<Self, CpuError> {
        let Some((name, pid)) = spec.split_once('=') else {
            return Err(CpuError::Spec(spec.to_string()));
        };
        let name = name.trim();
        match pid.trim().parse::<u32>() {
            Ok(pid) if pid > 0 && !name.is_empty() => Ok(Self {
                name: name.to_string(),
                pid,
            }),
            _ => Err(CpuError::Spec(spec.to_string())),
        }
    }
}

/// One process tree's share of a run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProcessCpu {
    pub name: String,
    pub pid: u32,
    /// Processes in the tree at the second reading (the root included).
    pub processes: usize,
    /// CPU seconds (user + system) spent during the run.
    pub cpu_seconds: f64,
    /// µs of CPU per message delivered.
    pub micros_per_message: f64,
}

/// What a run cost in CPU.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CpuCost {
    /// µs of CPU per message delivered, over every process watched and
    /// the load generator.
    pub micros_per_message: f64,
    /// Wall-clock seconds between the readings.
    pub seconds: f64,
    /// CPU seconds over wall seconds: how many cores the run kept busy.
    pub cores_busy: f64,
    /// Largest share first.
    pub by_process: Vec<ProcessCpu>,
}

/// The readings taken before a run.
pub struct CpuMeter {
    watched: Vec<Watched>,
    before: Vec<u64>,
    started: Instant,
}

impl CpuMeter {
    /// Reads every watched tree, and this process as the load generator
    /// unless it is watched already (a test system runs in-process).
    pub fn start(mut watched: Vec<Watched>) -> Result<Self, CpuError> {
        let own = std::process::id();
        if !watched.iter().any(|w| w.pid == own) {
            watched.push(Watched {
                name: LOAD_GENERATOR.to_string(),
                pid: own,
            });
        }
        let table = ProcessTable::read();
        let before = watched
            .iter()
            .map(|w| table.tree_ticks(w.pid))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            watched,
            before,
            started: Instant::now(),
        })
    }

    /// Reads again and divides what each tree spent by `messages`.
    pub fn finish(self, messages: usize) -> Result<CpuCost, CpuError> {
        let table = ProcessTable::read();
        let seconds = self.started.elapsed().as_secs_f64();
        let mut spent = Vec::with_capacity(self.watched.len());
        for (watched, before) in self.watched.into_iter().zip(self.before) {
            let after = table.tree_ticks(watched.pid)?;
            let processes = table.tree(watched.pid).len();
            spent.push((watched, processes, after.saturating_sub(before)));
        }
        Ok(cost(spent, clock_ticks_per_second(), messages, seconds))
    }
}

/// Every process's stat at one instant (those that vanish while being
/// read are left out: they were reaped, and count in their parent).
struct ProcessTable {
    stats: HashMap<u32, ProcStat>,
    children: HashMap<u32, Vec<u32>>,
}

impl ProcessTable {
    fn read() -> Self {
        let mut stats = HashMap::new();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let pid = entry.file_name().to_str().and_then(|s| s.parse().ok());
                if let Some(pid) = pid {
                    if let Ok(stat) = ProcStat::read(pid) {
                        stats.insert(pid, stat);
                    }
                }
            }
        }
        Self::of(stats)
    }

    fn of(stats: HashMap<u32, ProcStat>) -> Self {
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for (pid, stat) in &stats {
            children.entry(stat.ppid).or_default().push(*pid);
        }
        Self { stats, children }
    }

    /// `root` and its live descendants.
    fn tree(&self, root: u32) -> Vec<u32> {
        let mut tree = vec![root];
        let mut at = 0;
        while let Some(pid) = tree.get(at).copied() {
            if let Some(children) = self.children.get(&pid) {
                tree.extend(children.iter().copied().filter(|c| *c != pid));
            }
            at += 1;
        }
        tree
    }

    /// The CPU ticks of `root`'s tree: every live member's own and reaped
    /// children's time. Fails if `root` itself is gone.
    fn tree_ticks(&self, root: u32) -> Result<u64, CpuError> {
        if !self.stats.contains_key(&root) {
            // Read it alone for the error that says why.
            ProcStat::read(root)?;
        }
        Ok(self
            .tree(root)
            .iter()
            .filter_map(|pid| self.stats.get(pid))
            .map(ProcStat::with_reaped_ticks)
            .sum())
    }
}

/// The report of each tree's ticks (with its process count) spent over
/// `seconds`, for `messages` messages.
fn cost(
    spent: Vec<(Watched, usize, u64)>,
    ticks_per_second: f64,
    messages: usize,
    seconds: f64,
) -> CpuCost {
    let messages = messages.max(1) as f64;
    // Two trees of one name (several edges) are reported apart, by pid.
    let mut by_process: Vec<ProcessCpu> = spent
        .into_iter()
        .map(|(watched, processes, ticks)| {
            let cpu_seconds = ticks as f64 / ticks_per_second;
            ProcessCpu {
                name: watched.name,
                pid: watched.pid,
                processes,
                cpu_seconds,
                micros_per_message: cpu_seconds * 1e6 / messages,
            }
        })
        .collect();
    by_process.sort_by(|a, b| {
        b.cpu_seconds
            .total_cmp(&a.cpu_seconds)
            .then_with(|| a.name.cmp(&b.name))
    });
    let total: f64 = by_process.iter().map(|p| p.cpu_seconds).sum();
    CpuCost {
        micros_per_message: total * 1e6 / messages,
        seconds,
        cores_busy: if seconds > 0.0 { total / seconds } else { 0.0 },
        by_process,
    }
}

/// µs per message by name, several trees of one name added up.
pub fn by_name(cost: &CpuCost) -> BTreeMap<String, f64> {
    let mut names = BTreeMap::new();
    for p in &cost.by_process {
        *names.entry(p.name.clone()).or_insert(0.0) += p.micros_per_message;
    }
    names
}

pub fn print(cost: &CpuCost) {
    println!(
        "CPU per message: {:.1} µs over every process ({:.2} cores busy over {:.2} s)",
        cost.micros_per_message, cost.cores_busy, cost.seconds
    );
    for p in &cost.by_process {
        println!(
            "  {:<18} pid {:>7} ({:>3} proc) {:>8.1} µs  {:>7.2} s",
            p.name, p.pid, p.processes, p.micros_per_message, p.cpu_seconds
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(ppid: u32, utime: u64, stime: u64, cutime: u64, cstime: u64) -> ProcStat {
        ProcStat {
            ppid,
            utime,
            stime,
            cutime,
            cstime,
        }
    }

    #[test]
    fn watched_processes_are_name_equals_pid() {
        let w: Watched = "postgres=4242".parse().unwrap();
        assert_eq!((w.name.as_str(), w.pid), ("postgres", 4242));
        for bad in ["postgres", "=12", "edge=", "edge=x", "edge=0", "edge=-3"] {
            assert!(bad.parse::<Watched>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_tree_counts_live_members_and_what_they_reaped() {
        // 10: a postmaster with two backends (11, 12), one with a child
        // of its own (13); 20: a process outside the tree.
        let table = ProcessTable::of(HashMap::from([
            (10, stat(1, 100, 50, 30, 20)),
            (11, stat(10, 10, 5, 0, 0)),
            (12, stat(10, 7, 3, 1, 1)),
            (13, stat(12, 4, 0, 0, 0)),
            (20, stat(1, 1000, 1000, 0, 0)),
        ]));
        let mut tree = table.tree(10);
        tree.sort_unstable();
        assert_eq!(tree, vec![10, 11, 12, 13]);
        assert_eq!(table.tree_ticks(10).unwrap(), 200 + 15 + 12 + 4);
        assert_eq!(table.tree_ticks(13).unwrap(), 4);
    }

    #[test]
    fn a_reaped_backend_moves_into_its_parent_without_changing_the_sum() {
        // Backend 11 spent 15 ticks by the first reading, 40 by its exit;
        // the postmaster reaped it (cutime + cstime) and spent 5 itself.
        let before = ProcessTable::of(HashMap::from([
            (10, stat(1, 100, 0, 0, 0)),
            (11, stat(10, 10, 5, 0, 0)),
        ]));
        let after = ProcessTable::of(HashMap::from([(10, stat(1, 105, 0, 30, 10))]));
        let spent = after.tree_ticks(10).unwrap() - before.tree_ticks(10).unwrap();
        assert_eq!(spent, 5 + (40 - 15));
    }

    #[test]
    fn cost_divides_by_messages_and_splits_by_process() {
        let w = |name: &str, pid| Watched {
            name: name.to_string(),
            pid,
        };
        let cost = cost(
            vec![
                (w("edge", 1), 1, 300),
                (w("postgres", 2), 9, 100),
                (w("chatctl (load)", 3), 1, 600),
            ],
            100.0,
            10_000,
            4.0,
        );
        // 10 CPU seconds over 10,000 messages in 4 s.
        assert!((cost.micros_per_message - 1000.0).abs() < 1e-9);
        assert!((cost.cores_busy - 2.5).abs() < 1e-9);
        let names: Vec<&str> = cost.by_process.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["chatctl (load)", "edge", "postgres"]);
        assert!((cost.by_process[1].micros_per_message - 300.0).abs() < 1e-9);
        assert_eq!(cost.by_process[2].processes, 9);
        let sum: f64 = by_name(&cost).values().sum();
        assert!((sum - cost.micros_per_message).abs() < 1e-9);
        // Nothing delivered or no time: no division by zero.
        let empty = super::cost(vec![(w("edge", 1), 1, 0)], 100.0, 0, 0.0);
        assert_eq!((empty.micros_per_message, empty.cores_busy), (0.0, 0.0));
    }

    #[test]
    fn this_process_is_measured_as_the_load_generator() {
        let meter = CpuMeter::start(Vec::new()).unwrap();
        // Burn a little CPU so the reading moves.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let cost = meter.finish(1).unwrap();
        assert_eq!(cost.by_process.len(), 1);
        assert_eq!(cost.by_process[0].name, LOAD_GENERATOR);
        assert_eq!(cost.by_process[0].pid, std::process::id());
        // A watched pid that does not exist is refused at the start.
        let gone = CpuMeter::start(vec![Watched {
            name: "gone".into(),
            pid: u32::MAX,
        }]);
        assert!(matches!(gone, Err(CpuError::Proc(_))));
    }
}
