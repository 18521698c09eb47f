//! Rate and connection limits: token buckets per connection, per user (over
//! the user's connections on this edge) and per client address (IPv6 per
//! /64, see [`crate::forwarded`]), in tables of a fixed size.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_shared::config::{EdgeNetConfig, LimitsConfig};
use chat_shared::ids::UserId;
use chat_shared::lru::Lru;
use chat_shared::sync::lock;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use crate::forwarded::rate_key;

/// The window in which refusals count as strikes towards a 4008 close.
const STRIKE_WINDOW: Duration = Duration::from_secs(10);

/// `rate` tokens per second, holding at most `2 x rate`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, now: Instant) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            burst: rate * 2.0,
            tokens: rate * 2.0,
            last: now,
        }
    }

    /// Takes a token, or says how long until one is available.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// Refusals a connection ignored: coming back before the `retry_after_ms`
/// it was given is a strike; too many strikes in a short time is abuse. A
/// client that waits as told is never struck, however often it is limited.
#[derive(Debug, Default)]
pub struct Strikes {
    recent: std::collections::VecDeque<Instant>,
    /// When the last refusal said the client could try again.
    not_before: Option<Instant>,
}

impl Strikes {
    /// Records a refusal that told the client to wait `wait`; `true` once
    /// more than `limit` refusals within the window were ignored advice.
    pub fn strike(&mut self, now: Instant, wait: Duration, limit: u32) -> bool {
        let ignored_advice = self.not_before.is_some_and(|t| now < t);
        self.not_before = Some(now + wait);
        if !ignored_advice {
            return false;
        }
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > STRIKE_WINDOW)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        self.recent.len() > limit as usize
    }
}

struct UserState {
    connections: usize,
    sends: Arc<Mutex<TokenBucket>>,
}

/// A token bucket per client address, at most a fixed number of them:
/// past it the address seen longest ago is forgotten (its bucket is most
/// likely full again). A new client always gets a bucket, and memory stays
/// bounded however many addresses an attacker has.
struct IpTable {
    rate: u32,
    buckets: Lru<IpAddr, TokenBucket>,
}

impl IpTable {
    fn new(rate: u32, size: usize) -> Mutex<Self> {
        Mutex::new(Self {
            rate,
            buckets: Lru::new(size, usize::MAX),
        })
    }

    /// Takes a token for `ip`'s key; also says how many addresses were
    /// forgotten to make room for it.
    fn take(&mut self, ip: IpAddr, now: Instant) -> (Result<(), Duration>, usize) {
        let key = rate_key(ip);
        if let Some(bucket) = self.buckets.get_mut(&key) {
            return (bucket.take(now), 0);
        }
        let mut bucket = TokenBucket::new(self.rate, now);
        let taken = bucket.take(now);
        (taken, self.buckets.insert(key, bucket, 0))
    }
}

/// Edge-wide limit state.
pub struct Limits {
    pub config: LimitsConfig,
    users: Mutex<HashMap<UserId, UserState>>,
    /// WebSocket upgrades per client address.
    connects: Mutex<IpTable>,
    /// `GET /v1/edges` per client address.
    discovery: Mutex<IpTable>,
    /// Addresses forgotten because a table was full.
    ip_evictions: Counter,
}

/// A user's admission on this edge; dropping it frees the slot.
pub struct UserSlot {
    limits: Arc<Limits>,
    user: UserId,
    /// The user's send bucket, shared by their connections on this edge.
    pub sends: Arc<Mutex<TokenBucket>>,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut users = lock(&self.limits.users);
        if let Some(state) = users.get_mut(&self.user) {
            state.connections = state.connections.saturating_sub(1);
            if state.connections == 0 {
                users.remove(&self.user);
            }
        }
    }
}

impl UserSlot {
    pub fn take_send(&self, now: Instant) -> Result<(), Duration> {
        lock(&self.sends).take(now)
    }
}

impl Limits {
    /// Limits as configured; `ip_evictions` counts addresses forgotten
    /// because a per-address table was full.
    pub fn new(config: LimitsConfig, net: &EdgeNetConfig, ip_evictions: Counter) -> Arc<Self> {
        Arc::new(Self {
            connects: IpTable::new(config.connects_per_ip, net.tracked_ips),
            discovery: IpTable::new(net.discovery_per_ip, net.tracked_ips),
            config,
            users: Mutex::new(HashMap::new()),
            ip_evictions,
        })
    }

    fn admit(&self, table: &Mutex<IpTable>, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let (taken, evicted) = lock(table).take(ip, now);
        self.ip_evictions.inc_by(evicted as u64);
        taken
    }

    /// A new connection from client address `ip`.
    pub fn admit_ip(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        self.admit(&self.connects, ip, now)
    }

    /// A discovery request from client address `ip`.
    pub fn admit_discovery(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        self.admit(&self.discovery, ip, now)
    }

    /// One more connection of `user`; `None` past the per-user limit.
    pub fn admit_user(self: &Arc<Self>, user: &UserId, now: Instant) -> Option<UserSlot> {
        let mut users = lock(&self.users);
        let state = users.entry(user.clone()).or_insert_with(|| UserState {
            connections: 0,
            sends: Arc::new(Mutex::new(TokenBucket::new(self.config.send_per_user, now))),
        });
        if state.connections >= self.config.connections_per_user {
            return None;
        }
        state.connections += 1;
        Some(UserSlot {
            limits: self.clone(),
            user: user.clone(),
            sends: state.sends.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10, t0);
        for _ in 0..20 {
            assert!(bucket.take(t0).is_ok());
        }
        let wait = bucket.take(t0).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100));
        assert!(bucket.take(t0 + Duration::from_millis(100)).is_ok());
        assert!(bucket.take(t0 + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn only_ignored_advice_is_a_strike() {
        let t0 = Instant::now();
        let wait = Duration::from_millis(100);
        let mut strikes = Strikes::default();
        // Limited again and again, but always after waiting as told.
        for i in 0..100 {
            assert!(!strikes.strike(t0 + wait * i, wait, 2));
        }
        // Coming back at once, three times: the third is over the limit.
        let t1 = t0 + wait * 200;
        assert!(!strikes.strike(t1, wait, 2));
        assert!(!strikes.strike(t1, wait, 2));
        assert!(!strikes.strike(t1, wait, 2));
        assert!(strikes.strike(t1, wait, 2));
        let later = t1 + STRIKE_WINDOW + Duration::from_secs(1);
        assert!(!strikes.strike(later, wait, 2), "old strikes expire");
    }

    #[test]
    fn users_get_a_bounded_number_of_connections() {
        let limits = Limits::new(
            LimitsConfig {
                connections_per_user: 2,
                ..LimitsConfig::default()
            },
            &EdgeNetConfig::default(),
            Counter::default(),
        );
        let user = UserId::parse("u").unwrap();
        let now = Instant::now();
        let first = limits.admit_user(&user, now);
        let second = limits.admit_user(&user, now);
        assert!(first.is_some() && second.is_some());
        assert!(limits.admit_user(&user, now).is_none());
        drop(first);
        assert!(limits.admit_user(&user, now).is_some());
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// 1 connect per second per address (a burst of 2), `tracked`
    /// addresses at most, evictions counted in `evictions`.
    fn one_connect_per_second(tracked: usize, evictions: &Counter) -> Arc<Limits> {
        Limits::new(
            LimitsConfig {
                connects_per_ip: 1,
                ..LimitsConfig::default()
            },
            &EdgeNetConfig {
                tracked_ips: tracked,
                ..EdgeNetConfig::default()
            },
            evictions.clone(),
        )
    }

    #[test]
    fn an_ipv6_client_is_limited_per_64() {
        let limits = one_connect_per_second(100, &Counter::default());
        let now = Instant::now();
        // A burst of 2 for the whole /64, whatever address within it.
        assert!(limits.admit_ip(ip("2001:db8:0:1::1"), now).is_ok());
        assert!(limits.admit_ip(ip("2001:db8:0:1::2"), now).is_ok());
        assert!(limits.admit_ip(ip("2001:db8:0:1:ffff::3"), now).is_err());
        assert!(
            limits.admit_ip(ip("2001:db8:0:2::1"), now).is_ok(),
            "another /64"
        );
        // Discovery has its own buckets.
        assert!(limits.admit_discovery(ip("2001:db8:0:1::1"), now).is_ok());
    }

    #[test]
    fn a_full_address_table_forgets_the_oldest_and_counts_it() {
        let evictions = Counter::default();
        let limits = one_connect_per_second(3, &evictions);
        let now = Instant::now();
        let first = ip("192.0.2.1");
        for _ in 0..2 {
            assert!(limits.admit_ip(first, now).is_ok());
        }
        assert!(limits.admit_ip(first, now).is_err(), "its burst is used up");
        // A flood of new addresses: each is let in, the table never grows
        // past three, and the longest unseen address is forgotten.
        for i in 2..=100 {
            assert!(limits.admit_ip(ip(&format!("192.0.2.{i}")), now).is_ok());
            assert!(lock(&limits.connects).buckets.len() <= 3);
        }
        assert_eq!(evictions.get(), 97);
        assert!(
            limits.admit_ip(first, now).is_ok(),
            "forgotten, so new again"
        );
    }
}
