//! Retry policy: what one provider call came to, and the loop that retries
//! the transient ones with jittered exponential backoff.
//!
//! Retried: 429, 5xx and transport errors (connect, reset, timeout), after
//! `Retry-After` when the provider gives one, else after the backoff. Not
//! retried: every other 4xx. A notification is given up after
//! [`RetryPolicy::max_attempts`] calls or once the next wait would pass
//! [`RetryPolicy::budget`] since the first call.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;
use tokio::sync::watch;
use tokio::time::Instant;

/// What one call to a provider came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    Delivered,
    /// Worth another try, no sooner than `after` when the provider said so.
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// The provider says the token will never work again: delete it.
    InvalidToken(String),
    /// Refused for good (a bad request, our credentials, a payload too big).
    Failed(String),
}

impl Attempt {
    /// A transport failure: the request may or may not have arrived.
    pub fn transport(error: &reqwest::Error) -> Self {
        Self::Retry {
            after: None,
            reason: format!("transport: {error}"),
        }
    }

    /// The status classes every provider shares: 429 and 5xx are worth a
    /// retry (after `Retry-After` if given), anything else not 2xx is final.
    pub fn from_status(status: StatusCode, headers: &HeaderMap, reason: String) -> Self {
        if status.is_success() {
            Self::Delivered
        } else if is_transient(status) {
            Self::Retry {
                after: retry_after(headers),
                reason,
            }
        } else {
            Self::Failed(reason)
        }
    }
}

pub fn is_transient(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// What a notification to one token came to, retries included.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered,
    InvalidToken(String),
    Failed(String),
    /// pushd is stopping: the job goes back to the stream.
    Interrupted,
}

/// Longest `Retry-After` honoured; beyond it the budget gives up anyway.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// `Retry-After` in delta-seconds, the form FCM and APNs use. An HTTP-date
/// (allowed by RFC 9110, used by neither) is ignored: the backoff applies.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs = value.parse::<u64>().unwrap_or(u64::MAX);
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    parse_retry_after(headers.get(RETRY_AFTER)?.to_str().ok()?)
}

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// The first backoff; each later one doubles, up to `max_delay`.
    pub first: Duration,
    pub max_delay: Duration,
    /// Calls per notification and token, the first included.
    pub max_attempts: u32,
    /// Time from the first call after which no retry is started.
    pub budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            first: Duration::from_millis(250),
            max_delay: Duration::from_secs(30),
            max_attempts: 8,
            budget: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (0 for the first): "equal
    /// jitter", uniform in [d/2, d] for the exponential d, so that many
    /// senders refused at once do not come back at once; at least the
    /// provider's `Retry-After`.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let exponential = self
            .first
            .saturating_mul(2u32.saturating_pow(retry))
            .min(self.max_delay);
        let half = exponential / 2;
        let jitter = rand::rng().random_range(Duration::ZERO..=half);
        let backoff = half + jitter;
        retry_after.map_or(backoff, |after| after.max(backoff))
    }

    /// Calls `attempt` until it settles, waiting between retries. `retried`
    /// is told of each retry just before it is made. Stops early (returning
    /// [`Outcome::Interrupted`]) once `stop` turns true; a call under way is
    /// not cut short.
    pub async fn run<F, Fut>(
        &self,
        stop: watch::Receiver<bool>,
        mut attempt: F,
        mut retried: impl FnMut(),
    ) -> Outcome
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Attempt>,
    {
        let started = Instant::now();
        let stopped = chat_shared::shutdown::wait(stop.clone());
        tokio::pin!(stopped);
        let mut calls = 0;
        loop {
            calls += 1;
            let (after, reason) = match attempt().await {
                Attempt::Delivered => return Outcome::Delivered,
                Attempt::InvalidToken(reason) => return Outcome::InvalidToken(reason),
                Attempt::Failed(reason) => return Outcome::Failed(reason),
                Attempt::Retry { after, reason } => (after, reason),
            };
            if calls >= self.max_attempts {
                return Outcome::Failed(format!("gave up after {calls} calls: {reason}"));
            }
            let delay = self.delay(calls - 1, after);
            if started.elapsed() + delay > self.budget {
                return Outcome::Failed(format!(
                    "gave up: a retry in {delay:?} would pass the {:?} budget: {reason}",
                    self.budget
                ));
            }
            tracing::debug!(%reason, ?delay, calls, "provider call failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut stopped => return Outcome::Interrupted,
            }
            if *stop.borrow() {
                return Outcome::Interrupted;
            }
            retried();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    #[test]
    fn retry_after_is_seconds() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 30 "), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("0"), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("99999999999999999999999"),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("1.5"), None);
        assert_eq!(parse_retry_after(""), None);
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
    }

    #[test]
    fn statuses_are_classified() {
        let headers = HeaderMap::new();
        let classify = |code: u16| {
            Attempt::from_status(StatusCode::from_u16(code).unwrap(), &headers, "r".into())
        };
        assert_eq!(classify(200), Attempt::Delivered);
        assert_eq!(classify(204), Attempt::Delivered);
        for code in [429, 500, 502, 503, 504] {
            assert!(matches!(classify(code), Attempt::Retry { .. }), "{code}");
        }
        for code in [400, 401, 403, 404, 410, 413] {
            assert!(matches!(classify(code), Attempt::Failed(_)), "{code}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(
            Attempt::from_status(StatusCode::SERVICE_UNAVAILABLE, &headers, "r".into()),
            Attempt::Retry {
                after: Some(Duration::from_secs(3)),
                reason: "r".into()
            }
        );
    }

    #[test]
    fn delays_grow_with_jitter_and_honour_retry_after() {
        let policy = RetryPolicy::default();
        for _ in 0..100 {
            let first = policy.delay(0, None);
            assert!((Duration::from_millis(125)..=Duration::from_millis(250)).contains(&first));
            let third = policy.delay(2, None);
            assert!((Duration::from_millis(500)..=Duration::from_millis(1000)).contains(&third));
            let late = policy.delay(40, None);
            assert!((Duration::from_secs(15)..=Duration::from_secs(30)).contains(&late));
            assert_eq!(
                policy.delay(0, Some(Duration::from_secs(5))),
                Duration::from_secs(5)
            );
        }
    }

    fn scripted(
        attempts: Vec<Attempt>,
    ) -> (
        impl FnMut() -> std::future::Ready<Attempt>,
        Arc<Mutex<usize>>,
    ) {
        let calls = Arc::new(Mutex::new(0));
        let counter = calls.clone();
        let mut script: VecDeque<Attempt> = attempts.into();
        let attempt = move || {
            *counter.lock().unwrap() += 1;
            std::future::ready(script.pop_front().unwrap_or(Attempt::Delivered))
        };
        (attempt, calls)
    }

    fn unavailable() -> Attempt {
        Attempt::Retry {
            after: None,
            reason: "503".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_until_delivered() {
        let (_tx, stop) = watch::channel(false);
        let (attempt, calls) = scripted(vec![unavailable(), unavailable()]);
        let mut retried = 0;
        let started = Instant::now();
        let outcome = RetryPolicy::default()
            .run(stop, attempt, || retried += 1)
            .await;
        assert_eq!(outcome, Outcome::Delivered);
        assert_eq!(*calls.lock().unwrap(), 3);
        assert_eq!(retried, 2);
        // 125..250 ms, then 250..500 ms.
        assert!(started.elapsed() >= Duration::from_millis(375));
        assert!(started.elapsed() <= Duration::from_millis(750));
    }

    #[tokio::test(start_paused = true)]
    async fn final_answers_are_not_retried() {
        let (_tx, stop) = watch::channel(false);
        let (attempt, calls) = scripted(vec![Attempt::InvalidToken("410".into())]);
        let outcome = RetryPolicy::default().run(stop, attempt, || {}).await;
        assert_eq!(outcome, Outcome::InvalidToken("410".into()));
        assert_eq!(*calls.lock().unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_bounded() {
        let (_tx, stop) = watch::channel(false);
        let (attempt, calls) = scripted(vec![unavailable(); 20]);
        let outcome = RetryPolicy::default().run(stop, attempt, || {}).await;
        assert!(matches!(outcome, Outcome::Failed(r) if r.contains("after 8 calls")));
        assert_eq!(*calls.lock().unwrap(), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_past_the_budget_gives_up_at_once() {
        let (_tx, stop) = watch::channel(false);
        let long = Attempt::Retry {
            after: Some(Duration::from_secs(3600)),
            reason: "429".into(),
        };
        let (attempt, calls) = scripted(vec![long]);
        let started = Instant::now();
        let outcome = RetryPolicy::default().run(stop, attempt, || {}).await;
        assert!(matches!(outcome, Outcome::Failed(r) if r.contains("budget")));
        assert_eq!(*calls.lock().unwrap(), 1);
        assert!(started.elapsed() < Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_interrupts_a_backoff() {
        let (tx, stop) = watch::channel(false);
        let (attempt, calls) = scripted(vec![Attempt::Retry {
            after: Some(Duration::from_secs(60)),
            reason: "503".into(),
        }]);
        let run =
            tokio::spawn(async move { RetryPolicy::default().run(stop, attempt, || {}).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        tx.send(true).unwrap();
        assert_eq!(run.await.unwrap(), Outcome::Interrupted);
        assert_eq!(*calls.lock().unwrap(), 1);
    }
}
