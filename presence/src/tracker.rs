//! Who is online, as a pure state machine over edge reports and time, so
//! every rule (debounce, dead edges, repaired events) is unit-tested
//! without servers. Every presence process runs one; only the leader
//! publishes what it decides.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chat_shared::ids::{DeviceId, EdgeId, UserId};
use chat_shared::presence::{DeviceEvent, EdgeHeartbeat, LiveDevice};
use chat_shared::wire::PresenceStatus;
use tokio::time::Instant;

/// A decided change: publish it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub user: UserId,
    pub status: PresenceStatus,
    /// ms since the epoch: when they came online or were last seen.
    pub last_active: u64,
}

struct EdgeEntry {
    last_seen: Instant,
    devices: HashSet<LiveDevice>,
}

#[derive(Default)]
struct UserEntry {
    devices: HashSet<(EdgeId, DeviceId)>,
    /// Announced online (an entry exists only for users online or leaving).
    online: bool,
    /// ms since the epoch when they were announced online: the record's
    /// `last_active` while they stay online.
    online_since: u64,
    /// The last device left at this instant (and wall-clock ms); offline is
    /// announced once the debounce has passed without a return.
    leaving: Option<(Instant, u64)>,
}

pub struct Tracker {
    edges: HashMap<EdgeId, EdgeEntry>,
    users: HashMap<UserId, UserEntry>,
    /// Users whose set of connected devices changed since the last
    /// [`Tracker::take_device_changes`]: their record is rewritten (push
    /// goes to exactly the devices not connected), without an announcement.
    devices_changed: HashSet<UserId>,
    edge_timeout: Duration,
    debounce: Duration,
}

/// The wall clock at `at`, given the wall clock `now_ms` at `now`.
fn wall_ms(at: Instant, now: Instant, now_ms: u64) -> u64 {
    now_ms.saturating_sub(now.saturating_duration_since(at).as_millis() as u64)
}

impl Tracker {
    pub fn new(edge_timeout: Duration, debounce: Duration) -> Self {
        Self {
            edges: HashMap::new(),
            users: HashMap::new(),
            devices_changed: HashSet::new(),
            edge_timeout,
            debounce,
        }
    }

    pub fn is_online(&self, user: &UserId) -> bool {
        self.users.get(user).is_some_and(|entry| entry.online)
    }

    /// The devices of `user` connected now, sorted, each once (a device
    /// moving between edges may briefly be on two).
    pub fn devices_of(&self, user: &UserId) -> Vec<DeviceId> {
        let mut devices: Vec<DeviceId> = self
            .users
            .get(user)
            .map(|entry| entry.devices.iter().map(|(_, d)| d.clone()).collect())
            .unwrap_or_default();
        devices.sort();
        devices.dedup();
        devices
    }

    /// The users whose connected devices changed while they stayed online,
    /// with their status and `last_active`; forgets them. A user who went
    /// offline meanwhile is left out: the offline announcement writes them.
    pub fn take_device_changes(&mut self) -> Vec<Change> {
        let changed = std::mem::take(&mut self.devices_changed);
        changed
            .into_iter()
            .filter_map(|user| {
                let entry = self.users.get(&user).filter(|entry| entry.online)?;
                Some(Change {
                    last_active: entry.online_since,
                    status: PresenceStatus::Online,
                    user,
                })
            })
            .collect()
    }

    /// Users announced online (for a new leader's reconciliation).
    pub fn online_users(&self) -> impl Iterator<Item = &UserId> {
        self.users
            .iter()
            .filter(|(_, entry)| entry.online)
            .map(|(user, _)| user)
    }

    pub fn device(&mut self, event: DeviceEvent, now: Instant, now_ms: u64) -> Vec<Change> {
        let edge = self.edges.entry(event.edge.clone()).or_insert(EdgeEntry {
            last_seen: now,
            devices: HashSet::new(),
        });
        edge.last_seen = now;
        let live = LiveDevice {
            user: event.user,
            device: event.device,
        };
        let mut changes = Vec::new();
        if event.online {
            edge.devices.insert(live.clone());
            self.arrive(live, event.edge, now_ms, &mut changes);
        } else {
            edge.devices.remove(&live);
            self.leave(&live, &event.edge, now, now_ms);
        }
        changes
    }

    /// The edge's full list: repairs any lost connect or disconnect.
    pub fn heartbeat(
        &mut self,
        heartbeat: EdgeHeartbeat,
        now: Instant,
        now_ms: u64,
    ) -> Vec<Change> {
        let listed: HashSet<LiveDevice> = heartbeat.devices.into_iter().collect();
        let previous = match self.edges.get_mut(&heartbeat.edge) {
            Some(entry) => {
                entry.last_seen = now;
                std::mem::replace(&mut entry.devices, listed.clone())
            }
            None => {
                self.edges.insert(
                    heartbeat.edge.clone(),
                    EdgeEntry {
                        last_seen: now,
                        devices: listed.clone(),
                    },
                );
                HashSet::new()
            }
        };
        let mut changes = Vec::new();
        for gone in previous.difference(&listed) {
            self.leave(gone, &heartbeat.edge, now, now_ms);
        }
        for live in listed.difference(&previous) {
            self.arrive(live.clone(), heartbeat.edge.clone(), now_ms, &mut changes);
        }
        changes
    }

    /// Dead edges and finished debounces.
    pub fn tick(&mut self, now: Instant, now_ms: u64) -> Vec<Change> {
        let dead: Vec<EdgeId> = self
            .edges
            .iter()
            .filter(|(_, entry)| {
                now.saturating_duration_since(entry.last_seen) >= self.edge_timeout
            })
            .map(|(edge, _)| edge.clone())
            .collect();
        for edge in dead {
            let Some(entry) = self.edges.remove(&edge) else {
                continue;
            };
            tracing::warn!(%edge, devices = entry.devices.len(), "edge silent; its devices are offline");
            // Its devices were last seen with its last heartbeat: the
            // debounce counts from there, so a dead edge's users go offline
            // at the timeout, not timeout + debounce.
            for live in &entry.devices {
                self.leave(
                    live,
                    &edge,
                    entry.last_seen,
                    wall_ms(entry.last_seen, now, now_ms),
                );
            }
        }
        let mut changes = Vec::new();
        self.users.retain(|user, entry| {
            let Some((since, left_ms)) = entry.leaving else {
                return true;
            };
            if !entry.devices.is_empty() || now.saturating_duration_since(since) < self.debounce {
                return true;
            }
            if entry.online {
                changes.push(Change {
                    user: user.clone(),
                    status: PresenceStatus::Offline,
                    last_active: left_ms,
                });
            }
            false
        });
        changes
    }

    fn arrive(&mut self, live: LiveDevice, edge: EdgeId, now_ms: u64, changes: &mut Vec<Change>) {
        let entry = self.users.entry(live.user.clone()).or_default();
        if entry.devices.insert((edge, live.device)) {
            self.devices_changed.insert(live.user.clone());
        }
        entry.leaving = None;
        if !entry.online {
            entry.online = true;
            entry.online_since = now_ms;
            changes.push(Change {
                user: live.user,
                status: PresenceStatus::Online,
                last_active: now_ms,
            });
        }
    }

    fn leave(&mut self, live: &LiveDevice, edge: &EdgeId, at: Instant, at_ms: u64) {
        let Some(entry) = self.users.get_mut(&live.user) else {
            return;
        };
        if entry.devices.remove(&(edge.clone(), live.device.clone())) {
            self.devices_changed.insert(live.user.clone());
        }
        if entry.devices.is_empty() && entry.leaving.is_none() {
            entry.leaving = Some((at, at_ms));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(15);
    const DEBOUNCE: Duration = Duration::from_secs(5);

    fn ids(edge: &str, user: &str, device: &str) -> (EdgeId, UserId, DeviceId) {
        (
            EdgeId::parse(edge.to_string()).unwrap(),
            UserId::parse(user).unwrap(),
            DeviceId::parse(device).unwrap(),
        )
    }

    fn event(edge: &str, user: &str, device: &str, online: bool) -> DeviceEvent {
        let (edge, user, device) = ids(edge, user, device);
        DeviceEvent {
            edge,
            user,
            device,
            online,
        }
    }

    fn heartbeat(edge: &str, devices: &[(&str, &str)]) -> EdgeHeartbeat {
        EdgeHeartbeat {
            edge: EdgeId::parse(edge.to_string()).unwrap(),
            devices: devices
                .iter()
                .map(|(user, device)| LiveDevice {
                    user: UserId::parse(*user).unwrap(),
                    device: DeviceId::parse(*device).unwrap(),
                })
                .collect(),
        }
    }

    fn statuses(changes: &[Change]) -> Vec<(String, PresenceStatus)> {
        changes
            .iter()
            .map(|c| (c.user.to_string(), c.status))
            .collect()
    }

    #[test]
    fn online_with_the_first_device_offline_after_the_last_and_the_debounce() {
        let mut tracker = Tracker::new(TIMEOUT, DEBOUNCE);
        let t0 = Instant::now();
        let up = tracker.device(event("e1", "alice", "phone", true), t0, 1_000);
        assert_eq!(statuses(&up), [("alice".into(), PresenceStatus::Online)]);
        assert_eq!(up[0].last_active, 1_000);
        assert!(tracker
            .device(event("e1", "alice", "laptop", true), t0, 1_000)
            .is_empty());
        assert!(tracker
            .device(event("e1", "alice", "phone", false), t0, 1_000)
            .is_empty());
        assert!(
            tracker.tick(t0 + DEBOUNCE * 2, 11_000).is_empty(),
            "laptop still on"
        );
        let t1 = t0 + Duration::from_secs(20);
        assert!(tracker
            .device(event("e1", "alice", "laptop", false), t1, 21_000)
            .is_empty());
        assert!(tracker
            .tick(t1 + DEBOUNCE - Duration::from_millis(1), 25_999)
            .is_empty());
        let down = tracker.tick(t1 + DEBOUNCE, 26_000);
        assert_eq!(statuses(&down), [("alice".into(), PresenceStatus::Offline)]);
        assert_eq!(
            down[0].last_active, 21_000,
            "last seen when the last device left"
        );
        assert!(!tracker.is_online(&UserId::parse("alice").unwrap()));
    }

    #[test]
    fn a_reconnect_within_the_debounce_changes_nothing() {
        let mut tracker = Tracker::new(TIMEOUT, DEBOUNCE);
        let t0 = Instant::now();
        tracker.device(event("e1", "bob", "phone", true), t0, 0);
        tracker.device(event("e1", "bob", "phone", false), t0, 0);
        let back = tracker.device(event("e2", "bob", "phone", true), t0 + DEBOUNCE / 2, 0);
        assert!(back.is_empty());
        assert!(tracker.tick(t0 + DEBOUNCE * 3, 0).is_empty());
        assert!(tracker.is_online(&UserId::parse("bob").unwrap()));
    }

    #[test]
    fn a_silent_edge_takes_its_devices_offline_at_the_timeout() {
        let mut tracker = Tracker::new(TIMEOUT, DEBOUNCE);
        let t0 = Instant::now();
        tracker.heartbeat(heartbeat("e1", &[("carol", "d")]), t0, 50_000);
        tracker.heartbeat(heartbeat("e2", &[("dave", "d")]), t0, 50_000);
        let t1 = t0 + TIMEOUT;
        // e2 keeps beating; e1 fell silent at t0.
        tracker.heartbeat(heartbeat("e2", &[("dave", "d")]), t1, 65_000);
        let down = tracker.tick(t1, 65_000);
        assert_eq!(statuses(&down), [("carol".into(), PresenceStatus::Offline)]);
        assert_eq!(
            down[0].last_active, 50_000,
            "last seen with the edge's last heartbeat"
        );
    }

    #[test]
    fn heartbeats_repair_lost_events() {
        let mut tracker = Tracker::new(TIMEOUT, DEBOUNCE);
        let t0 = Instant::now();
        // The connect event was lost; the heartbeat brings erin online.
        let up = tracker.heartbeat(heartbeat("e1", &[("erin", "d")]), t0, 0);
        assert_eq!(statuses(&up), [("erin".into(), PresenceStatus::Online)]);
        // The disconnect was lost; the next heartbeat no longer lists her.
        tracker.heartbeat(heartbeat("e1", &[]), t0 + Duration::from_secs(5), 0);
        let down = tracker.tick(t0 + Duration::from_secs(10), 0);
        assert_eq!(statuses(&down), [("erin".into(), PresenceStatus::Offline)]);
    }

    #[test]
    fn device_changes_are_reported_apart_from_announcements() {
        let mut tracker = Tracker::new(TIMEOUT, DEBOUNCE);
        let t0 = Instant::now();
        let alice = UserId::parse("alice").unwrap();
        let device = |d: &str| DeviceId::parse(d).unwrap();
        tracker.device(event("e1", "alice", "laptop", true), t0, 1_000);
        // Coming online is announced; the device change adds nothing more.
        assert!(tracker
            .take_device_changes()
            .iter()
            .all(|c| c.user == alice));
        let phone = tracker.device(event("e2", "alice", "phone", true), t0, 2_000);
        assert!(phone.is_empty(), "a second device is no announcement");
        assert_eq!(
            tracker.devices_of(&alice),
            [device("laptop"), device("phone")]
        );
        let changed = tracker.take_device_changes();
        assert_eq!(
            statuses(&changed),
            [("alice".into(), PresenceStatus::Online)]
        );
        assert_eq!(
            changed[0].last_active, 1_000,
            "online since the first device"
        );
        assert!(tracker.take_device_changes().is_empty());
        // A repeated report changes nothing.
        tracker.heartbeat(heartbeat("e2", &[("alice", "phone")]), t0, 2_000);
        assert!(tracker.take_device_changes().is_empty());
        tracker.device(event("e2", "alice", "phone", false), t0, 3_000);
        assert_eq!(tracker.devices_of(&alice), [device("laptop")]);
        assert_eq!(tracker.take_device_changes().len(), 1);
        // Gone offline meanwhile: the announcement writes the record.
        tracker.device(event("e1", "alice", "laptop", false), t0, 4_000);
        let down = tracker.tick(t0 + DEBOUNCE, 9_000);
        assert_eq!(statuses(&down), [("alice".into(), PresenceStatus::Offline)]);
        assert!(tracker.take_device_changes().is_empty());
        assert!(tracker.devices_of(&alice).is_empty());
    }

    #[test]
    fn repeated_reports_are_idempotent() {
        let mut tracker = Tracker::new(TIMEOUT, DEBOUNCE);
        let t0 = Instant::now();
        let first = tracker.device(event("e1", "frank", "d", true), t0, 0);
        let hb = tracker.heartbeat(heartbeat("e1", &[("frank", "d")]), t0, 0);
        let again = tracker.device(event("e1", "frank", "d", true), t0, 0);
        assert_eq!(first.len(), 1);
        assert!(hb.is_empty() && again.is_empty());
    }
}
