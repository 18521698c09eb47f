//! Rate and connection limits: token buckets per connection, per user (over
//! the user's connections on this edge) and per client IP.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chat_shared::config::LimitsConfig;
use chat_shared::ids::UserId;
use tokio::time::Instant;

/// The window in which refusals count as strikes towards a 4008 close.
const STRIKE_WINDOW: Duration = Duration::from_secs(10);
/// Beyond this many tracked IPs, idle ones are forgotten.
const MAX_TRACKED_IPS: usize = 100_000;

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

    /// Full again: nothing is lost by forgetting it.
    fn is_idle(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last).as_secs_f64() * self.rate >= self.burst
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

/// Edge-wide limit state.
pub struct Limits {
    pub config: LimitsConfig,
    users: Mutex<HashMap<UserId, UserState>>,
    ips: Mutex<HashMap<IpAddr, TokenBucket>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section is a map lookup and a few arithmetic updates: a
    // panic inside cannot leave them inconsistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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
    pub fn new(config: LimitsConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            users: Mutex::new(HashMap::new()),
            ips: Mutex::new(HashMap::new()),
        })
    }

    /// A new connection from `ip`.
    pub fn admit_ip(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut ips = lock(&self.ips);
        if ips.len() >= MAX_TRACKED_IPS {
            ips.retain(|_, bucket| !bucket.is_idle(now));
        }
        ips.entry(ip)
            .or_insert_with(|| TokenBucket::new(self.config.connects_per_ip, now))
            .take(now)
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
        let limits = Limits::new(LimitsConfig {
            connections_per_user: 2,
            ..LimitsConfig::default()
        });
        let user = UserId::parse("u").unwrap();
        let now = Instant::now();
        let first = limits.admit_user(&user, now);
        let second = limits.admit_user(&user, now);
        assert!(first.is_some() && second.is_some());
        assert!(limits.admit_user(&user, now).is_none());
        drop(first);
        assert!(limits.admit_user(&user, now).is_some());
    }
}
