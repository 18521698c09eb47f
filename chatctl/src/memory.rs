//! Resident memory of the system's processes on this machine, sampled
//! through a run: a soak shows whether memory stays flat under load.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bench::common::vm_rss_kib;

/// The processes sampled (names as in `/proc/<pid>/comm`).
const PROCESSES: [&str; 6] = [
    "chat-edge",
    "chat-router",
    "chat-persister",
    "chat-presence",
    "chat-pushd",
    "nats-server",
];

/// One process's resident memory over a run, in KiB.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Footprint {
    pub process: String,
    pub pid: u32,
    pub first_kib: u64,
    pub last_kib: u64,
    pub max_kib: u64,
    pub samples: usize,
}

impl Footprint {
    fn record(footprints: &mut BTreeMap<u32, Footprint>, process: &str, pid: u32, kib: u64) {
        let entry = footprints.entry(pid).or_insert_with(|| Footprint {
            process: process.to_string(),
            pid,
            first_kib: kib,
            last_kib: kib,
            max_kib: kib,
            samples: 0,
        });
        entry.last_kib = kib;
        entry.max_kib = entry.max_kib.max(kib);
        entry.samples += 1;
    }
}

/// Samples in the background until [`Sampler::finish`].
pub struct Sampler {
    stop: watch::Sender<bool>,
    task: JoinHandle<BTreeMap<u32, Footprint>>,
}

impl Sampler {
    pub fn start(every: Duration) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut footprints = BTreeMap::new();
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => sample(&mut footprints),
                    _ = stopped.changed() => {
                        sample(&mut footprints);
                        return footprints;
                    }
                }
            }
        });
        Self { stop, task }
    }

    /// Takes a last sample and returns every process seen.
    pub async fn finish(self) -> Vec<Footprint> {
        let _ = self.stop.send(true);
        self.task
            .await
            .map(|footprints| footprints.into_values().collect())
            .unwrap_or_default()
    }
}

fn sample(footprints: &mut BTreeMap<u32, Footprint>) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        let Some(process) = PROCESSES.iter().find(|p| **p == comm.trim()) else {
            continue;
        };
        let rss = std::fs::read_to_string(entry.path().join("status"))
            .ok()
            .and_then(|status| vm_rss_kib(&status));
        if let Some(kib) = rss {
            Footprint::record(footprints, process, pid, kib);
        }
    }
}

pub fn print(footprints: &[Footprint]) {
    if footprints.is_empty() {
        return;
    }
    println!("memory (KiB)            pid    first     last      max  samples");
    for f in footprints {
        println!(
            "{:<16} {:>10} {:>8} {:>8} {:>8} {:>8}",
            f.process, f.pid, f.first_kib, f.last_kib, f.max_kib, f.samples
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_footprint_keeps_first_last_and_max() {
        let mut footprints = BTreeMap::new();
        for kib in [100, 180, 150] {
            Footprint::record(&mut footprints, "chat-edge", 7, kib);
        }
        Footprint::record(&mut footprints, "nats-server", 9, 50);
        let edge = &footprints[&7];
        assert_eq!(
            (edge.first_kib, edge.last_kib, edge.max_kib, edge.samples),
            (100, 150, 180, 3)
        );
        assert_eq!(footprints[&9].process, "nats-server");
    }
}
