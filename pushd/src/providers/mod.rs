//! The three providers and what they share: HTTP clients (rustls on
//! *ring*), a bound on concurrent calls, the retry policy and the counters.

pub mod apns;
pub mod fcm;
pub mod webhook;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chat_shared::config::PushConfig;
use chat_shared::push::Platform;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use rustls_platform_verifier::BuilderVerifierExt;
use tokio::sync::{watch, Semaphore};

use crate::metrics::PushMetrics;
use crate::notification::Push;
use crate::retry::{Attempt, Outcome, RetryPolicy};
use crate::PushdError;

/// Provider calls in flight at once, over all providers: enough to keep
/// HTTP/2 connections busy, few enough that a burst does not open
/// hundreds of sockets or exhaust a provider's quota in one go.
const MAX_CONCURRENT_CALLS: usize = 64;
/// One provider call, connection included. Kept under the consumer's
/// `ack_wait`, though in-progress acks cover a slow call anyway.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A device token as stored in `push_tokens`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub platform: Platform,
    pub token: String,
    /// When it was registered; a token re-registered after this is not
    /// deleted for an answer about the old registration.
    pub updated_at: i64,
}

pub struct Providers {
    fcm: Option<fcm::Fcm>,
    apns: Option<apns::Apns>,
    webhook: Option<webhook::Webhook>,
    calls: Semaphore,
    policy: RetryPolicy,
    metrics: PushMetrics,
}

impl Providers {
    /// The configured providers; one whose settings are missing is off,
    /// one whose key files are unusable is an error at start.
    pub fn from_config(config: &PushConfig, metrics: PushMetrics) -> Result<Self, PushdError> {
        let fcm = fcm::Fcm::load(config, || client(Protocols::Any))?;
        let apns = apns::Apns::load(config, || client(Protocols::Http2Only))?;
        let webhook = webhook::Webhook::load(config, || client(Protocols::Any))?;
        for (platform, on) in [
            (Platform::Fcm, fcm.is_some()),
            (Platform::Apns, apns.is_some()),
            (Platform::Webhook, webhook.is_some()),
        ] {
            tracing::info!(provider = %platform, enabled = on, "push provider");
        }
        Ok(Self {
            fcm,
            apns,
            webhook,
            calls: Semaphore::new(MAX_CONCURRENT_CALLS),
            policy: RetryPolicy::default(),
            metrics,
        })
    }

    /// Sends `push` to one token, retrying transient failures, and counts
    /// the result.
    pub async fn deliver(
        &self,
        token: &Token,
        push: &Push,
        stop: watch::Receiver<bool>,
    ) -> Outcome {
        let platform = token.platform;
        let retried = || self.metrics.count_retried(platform);
        let outcome = match platform {
            Platform::Fcm => match &self.fcm {
                Some(fcm) => {
                    let call = || self.limited(fcm.attempt(&token.token, push));
                    self.policy.run(stop, call, retried).await
                }
                None => Outcome::Failed("FCM is not configured".into()),
            },
            Platform::Apns => match &self.apns {
                Some(apns) => {
                    let call = || self.limited(apns.attempt(&token.token, push));
                    self.policy.run(stop, call, retried).await
                }
                None => Outcome::Failed("APNs is not configured".into()),
            },
            Platform::Webhook => match &self.webhook {
                Some(webhook) => {
                    let call = || self.limited(webhook.attempt(&token.token, push));
                    self.policy.run(stop, call, retried).await
                }
                None => Outcome::Failed("webhooks are not configured".into()),
            },
        };
        match &outcome {
            Outcome::Delivered => self.metrics.count_sent(platform),
            Outcome::InvalidToken(_) | Outcome::Failed(_) => self.metrics.count_failed(platform),
            Outcome::Interrupted => {}
        }
        outcome
    }

    /// Runs one call once a slot among [`MAX_CONCURRENT_CALLS`] is free.
    async fn limited(&self, call: impl Future<Output = Attempt>) -> Attempt {
        match self.calls.acquire().await {
            Ok(_slot) => call.await,
            // Never closed; should it be, calling without a slot is harmless.
            Err(_) => call.await,
        }
    }
}

enum Protocols {
    /// HTTP/2 when the server offers it (ALPN), else HTTP/1.1.
    Any,
    /// HTTP/2 only, also over cleartext (prior knowledge, h2c): APNs
    /// speaks nothing else, and tests stand in for it over `http://`.
    Http2Only,
}

/// An HTTP client on rustls with the *ring* provider (aws-lc-rs is not
/// built: it needs cmake and minutes of C compilation), verifying servers
/// with the platform's trust store.
/// Why a provider's HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

fn client(protocols: Protocols) -> Result<reqwest::Client, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_platform_verifier()?
        .with_no_client_auth();
    let builder = reqwest::Client::builder()
        .timeout(CALL_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .user_agent(concat!("chat-pushd/", env!("CARGO_PKG_VERSION")));
    let builder = match protocols {
        Protocols::Any => {
            tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            builder
        }
        Protocols::Http2Only => {
            tls.alpn_protocols = vec![b"h2".to_vec()];
            builder.http2_prior_knowledge()
        }
    };
    Ok(builder.tls_backend_preconfigured(tls).build()?)
}

/// A provider's answer, read whole (they are small).
struct Response {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Response {
    /// A short, printable excerpt of the body for logs and failure reasons.
    fn excerpt(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        text.chars().take(300).collect()
    }
}

/// Sends `request` and reads the answer; a transport failure is a retry.
async fn send(request: reqwest::RequestBuilder) -> Result<Response, Attempt> {
    let response = request.send().await.map_err(|e| Attempt::transport(&e))?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.map_err(|e| Attempt::transport(&e))?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

use chat_shared::clock::now_secs as unix_seconds;

#[cfg(test)]
mod tests {
    use super::*;

    /// The TLS stack is usable without a process-wide crypto provider: a
    /// server that is not TLS gives a transport error, not a panic.
    #[tokio::test]
    async fn https_runs_on_ring_without_a_default_provider() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut socket, _)) = listener.accept().await {
                let _ = socket.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
            }
        });
        for protocols in [Protocols::Any, Protocols::Http2Only] {
            let client = client(protocols).unwrap();
            let attempt = match send(client.get(format!("https://{addr}/"))).await {
                Ok(_) => panic!("a plain-text server passed a TLS handshake"),
                Err(attempt) => attempt,
            };
            assert!(matches!(attempt, Attempt::Retry { .. }), "{attempt:?}");
        }
    }

    #[test]
    fn unusable_key_files_stop_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.p8");
        std::fs::write(&bad, "not a key").unwrap();
        let config = PushConfig {
            apns_key_file: Some(bad.clone()),
            apns_key_id: Some("K".into()),
            apns_team_id: Some("T".into()),
            apns_topic: Some("com.example".into()),
            ..PushConfig::default()
        };
        let error = Providers::from_config(&config, PushMetrics::default())
            .err()
            .unwrap();
        assert!(error.to_string().starts_with("apns: the key in"), "{error}");
        let config = PushConfig {
            fcm_credentials: Some(dir.path().join("missing.json")),
            ..PushConfig::default()
        };
        let error = Providers::from_config(&config, PushMetrics::default())
            .err()
            .unwrap();
        assert!(error.to_string().starts_with("fcm: reading"), "{error}");
    }
}
