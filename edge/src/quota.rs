//! Per-user quotas over every edge: messages and bytes per minute and per
//! day, fan-out bytes (bytes x recipients) per minute, groups created per
//! day. The counts live in the `QUOTAS` counter stream, one subject per
//! user, kind and window (`chat.quota.<user>.<kind>.<window>`), so two
//! edges serving one user add to the same totals.
//!
//! An edge does not ask the stream for every send: it leases a chunk of a
//! quota (`CHAT_QUOTA_LEASE_MESSAGES` sends' worth, at most a twentieth of
//! the quota) with one `Nats-Incr`, learns the new total from the PubAck,
//! and spends the part of the chunk that lies below the quota locally.
//! Nothing is handed back: the units an edge leased but did not spend are
//! lost for that window. So the global bound holds exactly (no edge spends
//! a unit above the quota) and the price is that a user spread over `E`
//! edges may be refused up to `E - 1` leases (each at most 5 % of the
//! quota) early. A send costs a broker round trip for a kind only when
//! its lease runs out: about one send in `CHAT_QUOTA_LEASE_MESSAGES`, and
//! the kinds that need one are leased concurrently.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream;
use async_nats::HeaderMap;
use chat_shared::config::QuotaConfig;
use chat_shared::ids::UserId;
use chat_shared::subjects;
use chat_shared::wire::{ErrorCode, ErrorFrame, ServerFrame};

/// JetStream's counter header: the signed amount to add.
const INCREMENT_HEADER: &str = "Nats-Incr";
/// Beyond this many users with a ledger on this edge, idle ones are
/// forgotten (which only strands their unspent leases).
const MAX_LEDGERS: usize = 100_000;
/// A lease is at most this fraction of a quota (1/20).
const LEASE_DIVISOR: u64 = 20;

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 24 * 3600 * 1000;

/// One counted quantity in one kind of window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    MessagesPerMinute,
    MessagesPerDay,
    BytesPerMinute,
    BytesPerDay,
    FanoutBytesPerMinute,
    GroupsPerDay,
    /// Bytes uploaded (`POST /v1/media`).
    MediaBytesPerDay,
}

const KINDS: usize = 7;

impl Kind {
    fn index(self) -> usize {
        self as usize
    }

    /// The quantity's token in the counter subject.
    fn counter(self) -> &'static str {
        match self {
            Self::MessagesPerMinute | Self::MessagesPerDay => "messages",
            Self::BytesPerMinute | Self::BytesPerDay => "bytes",
            Self::FanoutBytesPerMinute => "fanout",
            Self::GroupsPerDay => "groups",
            Self::MediaBytesPerDay => "media",
        }
    }

    fn window_ms(self) -> u64 {
        match self {
            Self::MessagesPerMinute | Self::BytesPerMinute | Self::FanoutBytesPerMinute => {
                MINUTE_MS
            }
            Self::MessagesPerDay
            | Self::BytesPerDay
            | Self::GroupsPerDay
            | Self::MediaBytesPerDay => DAY_MS,
        }
    }

    /// The window token: `m<minutes>` or `d<days>` since the epoch.
    fn window(self, index: u64) -> String {
        let unit = if self.window_ms() == MINUTE_MS {
            'm'
        } else {
            'd'
        };
        format!("{unit}{index}")
    }

    fn limit(self, config: &QuotaConfig) -> u64 {
        match self {
            Self::MessagesPerMinute => config.messages_per_minute,
            Self::MessagesPerDay => config.messages_per_day,
            Self::BytesPerMinute => config.bytes_per_minute,
            Self::BytesPerDay => config.bytes_per_day,
            Self::FanoutBytesPerMinute => config.fanout_bytes_per_minute,
            Self::GroupsPerDay => config.groups_per_day,
            Self::MediaBytesPerDay => config.media_bytes_per_day,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::MessagesPerMinute => "messages per minute",
            Self::MessagesPerDay => "messages per day",
            Self::BytesPerMinute => "bytes per minute",
            Self::BytesPerDay => "bytes per day",
            Self::FanoutBytesPerMinute => "fan-out bytes (bytes x recipients) per minute",
            Self::GroupsPerDay => "groups created per day",
            Self::MediaBytesPerDay => "bytes uploaded per day",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("quota of {} reached; retry in {retry_after_ms} ms", .kind.describe())]
    Exhausted { kind: Kind, retry_after_ms: u64 },
    #[error("larger than the whole quota of {}", .kind.describe())]
    TooLarge { kind: Kind },
    #[error("quota counters unavailable, retry later; nothing was accepted")]
    Unavailable,
}

impl QuotaError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Exhausted { .. } => ErrorCode::RateLimited,
            Self::TooLarge { .. } => ErrorCode::TooLarge,
            Self::Unavailable => ErrorCode::Unavailable,
        }
    }

    /// The reply to a request refused by a quota.
    pub fn frame(&self, reference: Option<&str>) -> ServerFrame {
        let retry_after_ms = match self {
            Self::Exhausted { retry_after_ms, .. } => Some(*retry_after_ms),
            Self::TooLarge { .. } | Self::Unavailable => None,
        };
        ServerFrame::Error(ErrorFrame {
            reference: reference.map(str::to_string),
            code: self.code(),
            message: self.to_string(),
            retry_after_ms,
        })
    }
}

/// What this edge holds of one quota in one window.
#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    window: u64,
    /// Leased units not spent yet.
    remaining: u64,
    /// The global total reached the quota: leasing more is pointless.
    exhausted: bool,
}

#[derive(Debug, Default)]
struct Ledger {
    slots: [Slot; KINDS],
}

impl Ledger {
    /// The slot of `kind`, emptied if its window is over.
    fn slot(&mut self, kind: Kind, window: u64) -> &mut Slot {
        let slot = &mut self.slots[kind.index()];
        if slot.window != window {
            *slot = Slot {
                window,
                ..Slot::default()
            };
        }
        slot
    }
}

/// The edge's quota state: one ledger per user with a connection or a
/// recent request here.
pub struct Quotas {
    js: jetstream::Context,
    config: QuotaConfig,
    ledgers: Mutex<HashMap<UserId, Arc<tokio::sync::Mutex<Ledger>>>>,
}

impl Quotas {
    pub fn new(js: jetstream::Context, config: QuotaConfig) -> Self {
        Self {
            js,
            config,
            ledgers: Mutex::new(HashMap::new()),
        }
    }

    fn ledger(&self, user: &UserId) -> Arc<tokio::sync::Mutex<Ledger>> {
        // A map lookup: a panic inside cannot leave it inconsistent.
        let mut ledgers = chat_shared::sync::lock(&self.ledgers);
        if ledgers.len() >= MAX_LEDGERS && !ledgers.contains_key(user) {
            ledgers.retain(|_, ledger| Arc::strong_count(ledger) > 1);
        }
        ledgers.entry(user.clone()).or_default().clone()
    }

    /// Spends `costs` of `user`'s quotas, all or none: refused, nothing is
    /// spent (leased units stay for the next request).
    pub async fn spend(&self, user: &UserId, costs: &[(Kind, u64)]) -> Result<(), QuotaError> {
        let now = chat_shared::clock::now_ms();
        let ledger = self.ledger(user);
        // One request of this user at a time on this edge: two sends must
        // not both lease for the same shortfall.
        let mut ledger = ledger.lock().await;
        let mut leases = Vec::new();
        for &(kind, cost) in costs {
            let limit = kind.limit(&self.config);
            if cost > limit {
                return Err(QuotaError::TooLarge { kind });
            }
            let slot = ledger.slot(kind, now / kind.window_ms());
            if slot.remaining < cost && !slot.exhausted {
                let wanted = (cost - slot.remaining).max(
                    (limit / LEASE_DIVISOR).min(cost.saturating_mul(self.config.lease_messages)),
                );
                leases.push(self.lease(user, kind, now / kind.window_ms(), wanted));
            }
        }
        for (kind, window, leased) in futures::future::join_all(leases).await {
            let granted = leased?;
            let slot = ledger.slot(kind, window);
            slot.remaining += granted.usable;
            slot.exhausted |= granted.exhausted;
        }
        let mut refusal: Option<QuotaError> = None;
        for &(kind, cost) in costs {
            let window_ms = kind.window_ms();
            if ledger.slot(kind, now / window_ms).remaining < cost {
                let retry_after_ms = (window_ms - now % window_ms).max(1);
                if refusal.as_ref().is_none_or(|r| {
                    matches!(r, QuotaError::Exhausted { retry_after_ms: t, .. } if *t < retry_after_ms)
                }) {
                    refusal = Some(QuotaError::Exhausted {
                        kind,
                        retry_after_ms,
                    });
                }
            }
        }
        if let Some(refusal) = refusal {
            return Err(refusal);
        }
        for &(kind, cost) in costs {
            ledger.slot(kind, now / kind.window_ms()).remaining -= cost;
        }
        Ok(())
    }

    /// Adds `amount` to the global counter; returns what of it lies below
    /// the quota. The lease's future owns its arguments (no borrow of the
    /// ledger across the join).
    fn lease(
        &self,
        user: &UserId,
        kind: Kind,
        window: u64,
        amount: u64,
    ) -> impl std::future::Future<Output = (Kind, u64, Result<Granted, QuotaError>)> {
        let js = self.js.clone();
        let subject = subjects::quota(user, kind.counter(), &kind.window(window));
        let limit = kind.limit(&self.config);
        async move {
            let mut headers = HeaderMap::new();
            headers.insert(INCREMENT_HEADER, format!("+{amount}").as_str());
            let total = async {
                let ack = js
                    .publish_with_headers(subject, headers, bytes::Bytes::new())
                    .await?
                    .await?;
                ack.value
                    .as_deref()
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or(LeaseError::NoTotal(ack.value))
            }
            .await;
            let granted = match total {
                Ok(total) => Ok(Granted::of(total, amount, limit)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot lease a quota");
                    Err(QuotaError::Unavailable)
                }
            };
            (kind, window, granted)
        }
    }
}

/// Why a counter did not answer with its new total.
#[derive(Debug, thiserror::Error)]
enum LeaseError {
    #[error("adding to the counter: {0}")]
    Publish(#[from] async_nats::jetstream::context::PublishError),
    #[error("no counter value in the PubAck: {0:?}")]
    NoTotal(Option<String>),
}

/// What one lease brought.
#[derive(Debug, PartialEq, Eq)]
struct Granted {
    /// Units below the quota: this edge may spend them.
    usable: u64,
    /// The total reached the quota.
    exhausted: bool,
}

impl Granted {
    /// The lease took the units `(total - amount, total]` of the window.
    fn of(total: u64, amount: u64, limit: u64) -> Self {
        let first = total.saturating_sub(amount);
        Self {
            usable: total.min(limit).saturating_sub(first),
            exhausted: total >= limit,
        }
    }
}

/// A text's size as it is stored: its length as a JSON string (without the
/// quotes). Control characters take six bytes each (`\u0001`), so a text of
/// them weighs six times its length.
pub fn json_bytes(text: &str) -> u64 {
    text.chars()
        .map(|c| match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8() as u64,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_usable_only_below_the_quota() {
        // Alone: all of it.
        assert_eq!(
            Granted::of(10, 10, 100),
            Granted {
                usable: 10,
                exhausted: false
            }
        );
        // Another edge took 95 first: only 5 of ours are left.
        assert_eq!(
            Granted::of(105, 10, 100),
            Granted {
                usable: 5,
                exhausted: true
            }
        );
        // Far past it: nothing.
        assert_eq!(
            Granted::of(500, 10, 100),
            Granted {
                usable: 0,
                exhausted: true
            }
        );
    }

    #[test]
    fn json_bytes_counts_escapes() {
        assert_eq!(json_bytes("abc"), 3);
        assert_eq!(json_bytes("é"), 2);
        assert_eq!(json_bytes("a\"b\n"), 6);
        assert_eq!(json_bytes("\u{1}\u{1f}"), 12);
        for text in ["plain", "q\"uote\\", "\u{1}\u{7}\t\r", "😀 é"] {
            let encoded = serde_json::to_string(text).unwrap_or_default();
            assert_eq!(json_bytes(text) as usize, encoded.len() - 2, "{text:?}");
        }
    }

    #[test]
    fn windows_are_calendar_minutes_and_days() {
        assert_eq!(Kind::MessagesPerMinute.window(5), "m5");
        assert_eq!(Kind::GroupsPerDay.window(20424), "d20424");
        assert_eq!(Kind::BytesPerDay.counter(), Kind::BytesPerMinute.counter());
        assert_ne!(
            Kind::MessagesPerDay.counter(),
            Kind::FanoutBytesPerMinute.counter()
        );
    }
}
