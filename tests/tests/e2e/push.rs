//! pushd against stand-in providers (`chat_tests::providers`): jobs are
//! published on `chat.push.<user>` as the router does, tokens are rows in
//! `push_tokens`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use async_nats::jetstream;
use axum::http::Version;
use chat_pushd::{PushMetrics, PushdError};
use chat_shared::idgen::{IdGenerator, NodeSlot};
use chat_shared::ids::{ClientMsgId, ConversationId, MessageId, UserId};
use chat_shared::push::{Platform, PushJob};
use chat_shared::wire::MessageEvent;
use chat_shared::{subjects, Config};
use chat_tests::providers::{self, Fakes, Reply};
use chat_tests::{wait_until, System};
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const APNS_TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

/// One pushd, run in-process like the harness runs the other services.
pub(crate) struct Pushd {
    metrics: PushMetrics,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), PushdError>>,
}

impl Pushd {
    pub(crate) fn start(config: Config) -> Self {
        let metrics = PushMetrics::new(&mut Registry::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = Box::pin(async move {
            let _ = stopped.await;
        });
        let task = tokio::spawn(chat_pushd::run_with(config, metrics.clone(), shutdown));
        Self {
            metrics,
            stop: Some(stop),
            task,
        }
    }

    /// A graceful stop, as on SIGTERM.
    pub(crate) async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        Ok((&mut self.task).await??)
    }

    /// A crash: the process is gone between two instructions, no ack, no nak.
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

pub(crate) struct Setup {
    pub(crate) system: System,
    pub(crate) fakes: Fakes,
    pub(crate) js: jetstream::Context,
    db: tokio_postgres::Client,
}

impl Setup {
    pub(crate) async fn start() -> Result<Self> {
        let system = System::start().await?;
        let fakes = Fakes::start().await?;
        let js = jetstream::new(system.admin().await?);
        let db = system.database().await?;
        Ok(Self {
            system,
            fakes,
            js,
            db,
        })
    }

    /// pushd's configuration, pointed at the fakes.
    pub(crate) fn config(&self, coalesce: Duration, preview: bool) -> Config {
        let mut config = self.system.config_for("pushd");
        self.fakes.configure(&mut config);
        config.push.coalesce = coalesce;
        config.push.preview = preview;
        config
    }

    async fn register(
        &self,
        user: &str,
        device: &str,
        platform: Platform,
        token: &str,
    ) -> Result<()> {
        self.db
            .execute(
                "INSERT INTO push_tokens (user_id, device, platform, token, updated_at) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &user,
                    &device,
                    &platform.as_str(),
                    &token,
                    &1_700_000_000_000i64,
                ],
            )
            .await?;
        Ok(())
    }

    async fn tokens_of(&self, user: &str) -> Result<Vec<(String, String)>> {
        let rows = self
            .db
            .query(
                "SELECT platform, token FROM push_tokens WHERE user_id = $1 ORDER BY platform",
                &[&user],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Publishes a job as the router does (`Nats-Msg-Id` included).
    async fn publish(&self, job: &PushJob) -> Result<()> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            subjects::MSG_ID_HEADER,
            subjects::push_dedup_id(&job.id.to_string(), &job.user).as_str(),
        );
        self.js
            .publish_with_headers(
                subjects::push(&job.user),
                headers,
                serde_json::to_vec(job)?.into(),
            )
            .await?
            .await?;
        Ok(())
    }

    /// Jobs not yet acked (PUSH is a work queue: an acked job is removed).
    pub(crate) async fn jobs_left(&self) -> u64 {
        match self.js.get_stream(subjects::PUSH_STREAM).await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => info.state.messages,
                Err(_) => u64::MAX,
            },
            Err(_) => u64::MAX,
        }
    }
}

fn job(user: &str, from: &str, id: u64, text: &str) -> PushJob {
    let user = UserId::parse(user).expect("valid user");
    let from = UserId::parse(from).expect("valid user");
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    PushJob {
        conversation: ConversationId::dm(user.clone(), from.clone()).expect("a dm"),
        user,
        id: MessageId(id),
        from,
        text: text.into(),
        ts,
        devices: None,
        mentioned: false,
    }
}

#[tokio::test]
async fn push_one_job_reaches_fcm_and_apns_once_with_their_auth() -> Result<()> {
    let setup = Setup::start().await?;
    let pushd = Pushd::start(setup.config(Duration::from_millis(200), true));
    setup
        .register("bob", "phone", Platform::Fcm, "fcm-bob-phone")
        .await?;
    setup
        .register("bob", "ipad", Platform::Apns, APNS_TOKEN)
        .await?;
    let (fcm, apns) = (&setup.fakes.fcm, &setup.fakes.apns);

    // APNs takes the request but does not answer yet.
    apns.hold_answers();
    setup.publish(&job("bob", "alice", 101, "lunch?")).await?;
    wait_until(|| async { fcm.requests().len() == 1 && apns.requests().len() == 1 }).await?;
    // FCM has accepted, APNs has not: the job is not acked (an ack now
    // would lose the APNs notification if pushd died). Give a wrong early
    // ack time to land before looking.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        setup.jobs_left().await,
        1,
        "acked before every provider accepted"
    );
    apns.release_answers();
    wait_until(|| async { setup.jobs_left().await == 0 }).await?;
    assert_eq!((fcm.requests().len(), apns.requests().len()), (1, 1));

    let sent = &fcm.requests()[0];
    assert_eq!(sent.method, "POST");
    assert_eq!(
        sent.path,
        format!("/v1/projects/{}/messages:send", providers::FCM_PROJECT)
    );
    assert_eq!(sent.header("authorization"), Some("Bearer ya29.fake-1"));
    assert_eq!(sent.header("content-type"), Some("application/json"));
    assert_eq!(
        sent.json()?,
        json!({"message": {
            "token": "fcm-bob-phone",
            "notification": {"title": "alice", "body": "lunch?"},
            // The badge: bob's unread total, this message not stored yet.
            "data": {"conversation": "dm:alice:bob", "message_id": "101", "from": "alice", "count": "1", "badge": "1"},
            "android": {"priority": "high", "collapse_key": "dm:alice:bob", "notification": {"notification_count": 1}},
            "apns": {
                "headers": {"apns-priority": "10", "apns-collapse-id": "dm:alice:bob"},
                "payload": {"aps": {"sound": "default", "thread-id": "dm:alice:bob", "badge": 1}}
            }
        }})
    );
    let oauth = fcm.oauth_requests();
    assert_eq!(oauth.len(), 1);
    assert_eq!(oauth[0].status, 200);
    assert_eq!(
        oauth[0].header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    let claims = providers::verify_oauth_request(&oauth[0].text(), &fcm.token_uri())?;
    assert_eq!(claims["iss"], providers::FCM_CLIENT_EMAIL);

    let pushed = &apns.requests()[0];
    assert_eq!(pushed.version, Version::HTTP_2);
    assert_eq!(pushed.path, format!("/3/device/{APNS_TOKEN}"));
    assert_eq!(pushed.header("apns-topic"), Some(providers::APNS_TOPIC));
    assert_eq!(pushed.header("apns-push-type"), Some("alert"));
    assert_eq!(pushed.header("apns-priority"), Some("10"));
    assert_eq!(pushed.header("apns-collapse-id"), Some("dm:alice:bob"));
    let authorization = pushed.header("authorization").context("no authorization")?;
    let claims = providers::verify_apns_authorization(authorization)?;
    assert_eq!(claims["iss"], providers::APNS_TEAM_ID);
    assert_eq!(
        pushed.json()?,
        json!({
            "aps": {"alert": {"title": "alice", "body": "lunch?"}, "sound": "default", "thread-id": "dm:alice:bob", "badge": 1},
            "conversation": "dm:alice:bob",
            "message_id": "101",
            "from": "alice",
            "count": 1
        })
    );

    // A second job: the OAuth access token and the APNs JWT are reused.
    setup.publish(&job("bob", "carol", 102, "hi")).await?;
    wait_until(|| async {
        setup.jobs_left().await == 0 && fcm.requests().len() == 2 && apns.requests().len() == 2
    })
    .await?;
    assert_eq!(fcm.oauth_requests().len(), 1);
    assert_eq!(
        fcm.requests()[1].header("authorization"),
        Some("Bearer ya29.fake-1")
    );
    assert_eq!(
        apns.requests()[1].header("authorization"),
        Some(authorization)
    );
    assert_eq!(
        apns.requests()[1].header("apns-collapse-id"),
        Some("dm:bob:carol")
    );
    for provider in [Platform::Fcm, Platform::Apns] {
        assert_eq!(pushd.metrics.sent(provider), 2, "{provider}");
        assert_eq!(pushd.metrics.failed(provider), 0, "{provider}");
        assert_eq!(pushd.metrics.coalesced(provider), 0, "{provider}");
    }
    pushd.stop().await
}

#[tokio::test]
async fn push_coalesces_twenty_jobs_into_one_notification_per_token() -> Result<()> {
    let setup = Setup::start().await?;
    // Wider than the 2 s of publishing, with room for a slow machine.
    let window = Duration::from_secs(4);
    let pushd = Pushd::start(setup.config(window, true));
    setup
        .register("bob", "phone", Platform::Fcm, "fcm-bob-phone")
        .await?;
    setup
        .register("bob", "ipad", Platform::Apns, APNS_TOKEN)
        .await?;
    setup
        .register("bob", "bot", Platform::Webhook, "bot-7")
        .await?;

    let started = Instant::now();
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    for i in 0..20 {
        pace.tick().await;
        setup
            .publish(&job("bob", "alice", 201 + i, &format!("message {i}")))
            .await?;
    }
    let published_in = started.elapsed();
    assert!(published_in < window, "publishing took {published_in:?}");
    wait_until(|| async { setup.jobs_left().await == 0 && setup.fakes.all_requests().len() >= 3 })
        .await?;
    let notified_after = started.elapsed();
    eprintln!("20 jobs published in {published_in:?}; settled after {notified_after:?}");

    let fcm = setup.fakes.fcm.requests();
    let apns = setup.fakes.apns.requests();
    let webhook = setup.fakes.webhook.requests();
    assert_eq!((fcm.len(), apns.len(), webhook.len()), (1, 1, 1));
    let fcm = fcm[0].json()?;
    assert_eq!(fcm["message"]["notification"]["title"], "alice");
    assert_eq!(
        fcm["message"]["notification"]["body"],
        "20 new messages from alice"
    );
    assert_eq!(fcm["message"]["data"]["count"], "20");
    assert_eq!(fcm["message"]["data"]["message_id"], "220");
    let apns = apns[0].json()?;
    assert_eq!(apns["aps"]["alert"]["body"], "20 new messages from alice");
    assert_eq!(apns["count"], 20);
    let webhook = webhook[0].json()?;
    assert_eq!(webhook["count"], 20);
    let ids: Vec<String> = (201..=220).map(|i: u64| i.to_string()).collect();
    assert_eq!(webhook["message_ids"], json!(ids));
    assert_eq!(webhook["messages"][19]["text"], "message 19");
    for provider in Platform::ALL {
        assert_eq!(pushd.metrics.sent(provider), 1, "{provider}");
        assert_eq!(pushd.metrics.coalesced(provider), 19, "{provider}");
    }
    pushd.stop().await
}

#[tokio::test]
async fn push_retries_503_with_backoff_then_delivers_once() -> Result<()> {
    let setup = Setup::start().await?;
    let fcm = &setup.fakes.fcm;
    let unavailable = json!({"error": {"code": 503, "message": "The service is currently unavailable.", "status": "UNAVAILABLE"}});
    fcm.script([
        Reply::status(503)
            .header("retry-after", "1")
            .json(unavailable.clone()),
        Reply::status(503).json(unavailable),
    ]);
    let pushd = Pushd::start(setup.config(Duration::from_millis(100), true));
    setup
        .register("bob", "phone", Platform::Fcm, "fcm-bob-phone")
        .await?;

    setup
        .publish(&job("bob", "alice", 301, "are you there?"))
        .await?;
    wait_until(|| async { setup.jobs_left().await == 0 && fcm.requests().len() == 3 }).await?;

    let requests = fcm.requests();
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 200]);
    assert!(requests.iter().all(|r| r.body == requests[0].body));
    let first_wait = requests[1].at - requests[0].at;
    let second_wait = requests[2].at - requests[1].at;
    eprintln!("waits between attempts: {first_wait:?} (Retry-After: 1), {second_wait:?}");
    // Retry-After honoured; then the second backoff, 250-500 ms with jitter.
    assert!(first_wait >= Duration::from_secs(1), "{first_wait:?}");
    assert!(second_wait >= Duration::from_millis(250), "{second_wait:?}");
    assert!(second_wait < Duration::from_secs(2), "{second_wait:?}");
    assert_eq!(pushd.metrics.retried(Platform::Fcm), 2);
    assert_eq!(pushd.metrics.sent(Platform::Fcm), 1);
    assert_eq!(pushd.metrics.failed(Platform::Fcm), 0);
    pushd.stop().await
}

#[tokio::test]
async fn push_progress_acks_keep_a_job_alive_past_the_ack_wait() -> Result<()> {
    let setup = Setup::start().await?;
    let fcm = &setup.fakes.fcm;
    // A retry later than the consumer's 10 s ack wait.
    fcm.script([Reply::status(429).header("retry-after", "11")]);
    let pushd = Pushd::start(setup.config(Duration::from_millis(100), true));
    setup
        .register("bob", "phone", Platform::Fcm, "fcm-bob-phone")
        .await?;
    let stream = setup.js.get_stream(subjects::PUSH_STREAM).await?;
    setup.publish(&job("bob", "alice", 351, "later")).await?;
    // Watch the consumer throughout: a job whose ack wait ran out shows
    // as redelivered until it is acked.
    let redelivered = std::cell::Cell::new(0);
    wait_until(|| async {
        if let Ok(info) = stream.clone().consumer_info(subjects::PUSHD_CONSUMER).await {
            redelivered.set(redelivered.get().max(info.num_redelivered));
        }
        setup.jobs_left().await == 0 && fcm.requests().len() == 2
    })
    .await?;

    let requests = fcm.requests();
    let wait = requests[1].at - requests[0].at;
    eprintln!("retried after {wait:?}");
    assert!(wait >= Duration::from_secs(11), "{wait:?}");
    assert_eq!(
        redelivered.get(),
        0,
        "the job was redelivered while retrying"
    );
    assert_eq!(pushd.metrics.sent(Platform::Fcm), 1);
    assert_eq!(pushd.metrics.retried(Platform::Fcm), 1);
    pushd.stop().await
}

#[tokio::test]
async fn push_invalid_tokens_are_deleted() -> Result<()> {
    let setup = Setup::start().await?;
    setup.fakes.fcm.script([Reply::status(404).json(json!({"error": {
        "code": 404,
        "message": "Requested entity was not found.",
        "status": "NOT_FOUND",
        "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}]
    }}))]);
    setup.fakes.apns.script([Reply::status(410)
        .json(json!({"reason": "Unregistered", "timestamp": 1_700_000_000_000u64}))]);
    // A refusal that is not about the token deletes nothing.
    setup.fakes.webhook.script([Reply::status(400)]);
    let pushd = Pushd::start(setup.config(Duration::from_millis(100), true));
    setup
        .register("bob", "phone", Platform::Fcm, "fcm-bob-phone")
        .await?;
    setup
        .register("bob", "ipad", Platform::Apns, APNS_TOKEN)
        .await?;
    setup
        .register("bob", "bot", Platform::Webhook, "bot-7")
        .await?;
    setup
        .register("carol", "phone", Platform::Fcm, "fcm-carol-phone")
        .await?;

    setup.publish(&job("bob", "alice", 401, "hello")).await?;
    wait_until(|| async { setup.jobs_left().await == 0 && setup.fakes.all_requests().len() == 3 })
        .await?;
    wait_until(|| async { setup.tokens_of("bob").await.map(|t| t.len()).unwrap_or(0) == 1 })
        .await?;
    assert_eq!(
        setup.tokens_of("bob").await?,
        [("webhook".to_string(), "bot-7".to_string())]
    );
    assert_eq!(setup.tokens_of("carol").await?.len(), 1);
    assert_eq!(pushd.metrics.tokens_removed(Platform::Fcm), 1);
    assert_eq!(pushd.metrics.tokens_removed(Platform::Apns), 1);
    assert_eq!(pushd.metrics.tokens_removed(Platform::Webhook), 0);
    for provider in Platform::ALL {
        assert_eq!(pushd.metrics.failed(provider), 1, "{provider}");
        assert_eq!(pushd.metrics.retried(provider), 0, "{provider}");
    }

    // The next job goes to the remaining token only.
    setup
        .publish(&job("bob", "alice", 402, "still there?"))
        .await?;
    wait_until(|| async {
        setup.jobs_left().await == 0 && setup.fakes.webhook.requests().len() == 2
    })
    .await?;
    assert_eq!(setup.fakes.fcm.requests().len(), 1);
    assert_eq!(setup.fakes.apns.requests().len(), 1);
    pushd.stop().await
}

/// Waits until FCM has refused the job at least twice (pushd is retrying).
async fn wait_retrying(setup: &Setup) -> Result<()> {
    wait_until(|| async { setup.fakes.fcm.requests().len() >= 2 }).await
}

fn delivered(setup: &Setup) -> usize {
    setup
        .fakes
        .fcm
        .requests()
        .iter()
        .filter(|r| r.status == 200)
        .count()
}

#[tokio::test]
async fn push_job_survives_pushd_killed_mid_retry() -> Result<()> {
    let setup = Setup::start().await?;
    setup.fakes.fcm.answer_by_default(Reply::status(503));
    setup
        .register("bob", "phone", Platform::Fcm, "fcm-bob-phone")
        .await?;
    let config = setup.config(Duration::from_millis(100), true);
    let first = Pushd::start(config.clone());
    setup
        .publish(&job("bob", "alice", 501, "don't lose me"))
        .await?;
    wait_retrying(&setup).await?;
    first.kill().await;
    let killed = Instant::now();
    let refused = setup.fakes.fcm.requests().len();

    setup
        .fakes
        .fcm
        .answer_by_default(Reply::ok().json(json!({"name": "projects/chat-test/messages/1"})));
    let second = Pushd::start(config);
    wait_until(|| async { setup.jobs_left().await == 0 && delivered(&setup) == 1 }).await?;
    let recovered = killed.elapsed();
    eprintln!("killed after {refused} refused attempts; delivered {recovered:?} later");
    // Redelivered by JetStream once the ack wait ran out (10 s after the
    // last in-progress ack), not handed back by the dead pushd.
    let requests = setup.fakes.fcm.requests();
    assert_eq!(requests.last().map(|r| r.status), Some(200));
    assert!(requests[..requests.len() - 1]
        .iter()
        .all(|r| r.status == 503));
    assert!(recovered < Duration::from_secs(15), "{recovered:?}");
    let body = requests.last().context("a request")?.json()?;
    assert_eq!(body["message"]["data"]["message_id"], "501");
    assert_eq!(second.metrics.sent(Platform::Fcm), 1);
    second.stop().await
}

#[tokio::test]
async fn push_job_survives_pushd_stopped_mid_retry() -> Result<()> {
    let setup = Setup::start().await?;
    setup.fakes.fcm.answer_by_default(Reply::status(503));
    setup
        .register("bob", "phone", Platform::Fcm, "fcm-bob-phone")
        .await?;
    let config = setup.config(Duration::from_millis(100), true);
    let first = Pushd::start(config.clone());
    setup
        .publish(&job("bob", "alice", 601, "don't lose me"))
        .await?;
    wait_retrying(&setup).await?;
    first.stop().await?;
    let stopped = Instant::now();
    // The stopped pushd handed the job back instead of finishing it.
    ensure!(setup.jobs_left().await == 1, "the job is still in PUSH");

    setup
        .fakes
        .fcm
        .answer_by_default(Reply::ok().json(json!({"name": "projects/chat-test/messages/1"})));
    let second = Pushd::start(config);
    wait_until(|| async { setup.jobs_left().await == 0 && delivered(&setup) == 1 }).await?;
    let recovered = stopped.elapsed();
    eprintln!("delivered {recovered:?} after a graceful stop");
    // Handed back with a nak: no wait for the ack wait to run out.
    assert!(recovered < Duration::from_secs(5), "{recovered:?}");
    assert_eq!(second.metrics.sent(Platform::Fcm), 1);
    second.stop().await
}

#[tokio::test]
async fn push_webhook_signature_verifies() -> Result<()> {
    let setup = Setup::start().await?;
    let pushd = Pushd::start(setup.config(Duration::from_millis(100), true));
    setup
        .register("bob", "bot", Platform::Webhook, "bot-7")
        .await?;
    setup.publish(&job("bob", "alice", 701, "ship it")).await?;
    wait_until(|| async {
        setup.jobs_left().await == 0 && setup.fakes.webhook.requests().len() == 1
    })
    .await?;

    let hook = &setup.fakes.webhook.requests()[0];
    assert_eq!(hook.path, "/hook");
    assert_eq!(hook.header("content-type"), Some("application/json"));
    providers::verify_webhook_signature(hook, providers::WEBHOOK_SECRET)?;
    assert!(providers::verify_webhook_signature(hook, "another secret").is_err());
    let mut tampered = hook.clone();
    tampered.body = hook.text().replace("ship it", "sink it").into();
    assert!(providers::verify_webhook_signature(&tampered, providers::WEBHOOK_SECRET).is_err());

    let body = hook.json()?;
    let ts = body["messages"][0]["ts"].clone();
    assert_eq!(
        body,
        json!({
            "user": "bob",
            "token": "bot-7",
            "conversation": "dm:alice:bob",
            "from": "alice",
            "count": 1,
            "message_ids": ["701"],
            "title": "alice",
            "body": "ship it",
            "messages": [{"id": "701", "conversation": "dm:alice:bob", "from": "alice", "ts": ts, "text": "ship it"}],
            "badge": 1
        })
    );
    assert_eq!(pushd.metrics.sent(Platform::Webhook), 1);
    pushd.stop().await
}

#[tokio::test]
async fn push_preview_off_sends_no_text() -> Result<()> {
    let setup = Setup::start().await?;
    let pushd = Pushd::start(setup.config(Duration::from_millis(100), false));
    setup
        .register("bob", "phone", Platform::Fcm, "fcm-bob-phone")
        .await?;
    setup
        .register("bob", "ipad", Platform::Apns, APNS_TOKEN)
        .await?;
    setup
        .register("bob", "bot", Platform::Webhook, "bot-7")
        .await?;
    setup
        .publish(&job("bob", "alice", 801, "the secret plans"))
        .await?;
    wait_until(|| async { setup.jobs_left().await == 0 && setup.fakes.all_requests().len() == 3 })
        .await?;

    for request in setup.fakes.all_requests() {
        let text = request.text();
        assert!(
            !text.contains("secret"),
            "{} leaks the text: {text}",
            request.path
        );
    }
    let fcm: Value = setup.fakes.fcm.requests()[0].json()?;
    assert_eq!(
        fcm["message"]["notification"],
        json!({"title": "alice", "body": "New message from alice"})
    );
    let apns: Value = setup.fakes.apns.requests()[0].json()?;
    assert_eq!(apns["aps"]["alert"]["body"], "New message from alice");
    let webhook: Value = setup.fakes.webhook.requests()[0].json()?;
    assert_eq!(webhook["body"], "New message from alice");
    assert!(webhook["messages"][0].get("text").is_none());
    pushd.stop().await
}

/// The presence record of `user` says `status`.
pub(crate) async fn wait_presence(js: &jetstream::Context, user: &str, status: &str) -> Result<()> {
    let bucket = js.get_key_value(subjects::PRESENCE_BUCKET).await?;
    let key = subjects::presence_key(&UserId::parse(user)?);
    wait_until(|| {
        let (bucket, key) = (bucket.clone(), key.clone());
        async move {
            match bucket.get(key).await {
                Ok(Some(bytes)) => serde_json::from_slice::<Value>(&bytes)
                    .is_ok_and(|record| record["status"] == status),
                _ => false,
            }
        }
    })
    .await
}

#[tokio::test]
async fn push_whole_path_offline_member_gets_one_per_token_online_gets_none() -> Result<()> {
    let setup = Setup::start().await?;
    let _pushd = Pushd::start(setup.config(Duration::from_millis(300), true));
    let system = &setup.system;
    let (fcm, apns) = (&setup.fakes.fcm, &setup.fakes.apns);

    // Tokens arrive through the protocol, from the devices themselves.
    let mut bob = system.connect("bob", "phone").await?;
    for (platform, token) in [("fcm", "fcm-bob-phone"), ("apns", APNS_TOKEN)] {
        let ok = bob
            .request(json!({"type":"push.register","platform":platform,"token":token}))
            .await?;
        ensure!(ok["type"] == "ok", "{ok}");
    }
    let refused = bob
        .request(json!({"type":"push.register","platform":"apns","token":"not hex"}))
        .await?;
    ensure!(refused["code"] == "bad_request", "{refused}");
    let mut alice = system.connect("alice", "phone").await?;
    let ok = alice
        .request(json!({"type":"push.register","platform":"fcm","token":"fcm-alice"}))
        .await?;
    ensure!(ok["type"] == "ok", "{ok}");
    assert_eq!(
        setup.tokens_of("bob").await?,
        [
            ("apns".to_string(), APNS_TOKEN.to_string()),
            ("fcm".to_string(), "fcm-bob-phone".to_string())
        ]
    );

    // bob offline: one notification per token. (alice, the sender, is
    // online here; `push_never_goes_to_the_sender_even_when_offline` is
    // the test that she is never pushed her own message.)
    bob.close().await?;
    wait_presence(&setup.js, "bob", "offline").await?;
    let sent = alice
        .send_message(json!({"to":"bob"}), "are you there?", "p1")
        .await?;
    ensure!(sent["type"] == "sent", "{sent}");
    wait_until(|| async { fcm.requests().len() == 1 && apns.requests().len() == 1 }).await?;
    let to_fcm = fcm.requests()[0].json()?;
    assert_eq!(to_fcm["message"]["token"], "fcm-bob-phone");
    assert_eq!(to_fcm["message"]["notification"]["title"], "alice");
    assert_eq!(to_fcm["message"]["notification"]["body"], "are you there?");
    assert_eq!(to_fcm["message"]["data"]["message_id"], sent["id"]);
    let to_apns = apns.requests()[0].json()?;
    assert_eq!(to_apns["aps"]["alert"]["body"], "are you there?");
    assert_eq!(apns.requests()[0].path, format!("/3/device/{APNS_TOKEN}"));
    wait_until(|| async { setup.jobs_left().await == 0 }).await?;

    // bob online: nothing is pushed (the router's presence cache lives 2 s).
    let mut bob = system.connect("bob", "phone").await?;
    wait_presence(&setup.js, "bob", "online").await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let sent = alice
        .send_message(json!({"to":"bob"}), "here you are", "p2")
        .await?;
    ensure!(sent["type"] == "sent", "{sent}");
    let live = bob.recv_type("message").await?;
    assert_eq!(live["id"], sent["id"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fcm.requests().len(), 1, "no push for an online user");
    assert_eq!(apns.requests().len(), 1);
    assert_eq!(setup.jobs_left().await, 0);
    Ok(())
}

pub(crate) async fn request_ok(client: &mut chat_tests::Client, frame: Value) -> Result<()> {
    let reply = client.request(frame.clone()).await?;
    ensure!(reply["type"] == "ok", "{frame} answered {reply}");
    Ok(())
}

/// The requests `provider` received that carry `token`.
fn to_token(provider: &providers::FakeProvider, token: &str) -> usize {
    provider
        .requests()
        .iter()
        .filter(|r| r.path.contains(token) || r.text().contains(token))
        .count()
}

/// Which device of which user holds `token`.
async fn holder(setup: &Setup, token: &str) -> Result<Option<(String, String)>> {
    let row = setup
        .db
        .query_opt(
            "SELECT user_id, device FROM push_tokens WHERE token = $1",
            &[&token],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// Before issue 14 a token registered by another account moved to it, so
/// anyone who learned a token took over its notifications. Now only its
/// holder moves it (between their own devices); another account is refused.
#[tokio::test]
async fn push_unregistered_tokens_get_nothing_and_only_their_holder_moves_them() -> Result<()> {
    let setup = Setup::start().await?;
    let _pushd = Pushd::start(setup.config(Duration::from_millis(300), true));
    let system = &setup.system;
    let (fcm, apns, webhook) = (&setup.fakes.fcm, &setup.fakes.apns, &setup.fakes.webhook);

    let mut bob = system.connect("bob", "phone").await?;
    for (platform, token) in [
        ("fcm", "fcm-bob-phone"),
        ("apns", APNS_TOKEN),
        ("webhook", "bob-hook"),
    ] {
        request_ok(
            &mut bob,
            json!({"type":"push.register","platform":platform,"token":token}),
        )
        .await?;
    }
    // bob signs his phone out of FCM.
    request_ok(
        &mut bob,
        json!({"type":"push.unregister","platform":"fcm","token":"fcm-bob-phone"}),
    )
    .await?;
    // mallory cannot unregister a token that is not hers (`ok` regardless).
    let mut mallory = system.connect("mallory", "laptop").await?;
    request_ok(
        &mut mallory,
        json!({"type":"push.unregister","platform":"webhook","token":"bob-hook"}),
    )
    .await?;
    // carol registers bob's APNs token (learned, or on the iPad bob did not
    // sign out of): refused, it stays bob's.
    let mut carol = system.connect("carol", "ipad").await?;
    let refused = carol
        .request(json!({"type":"push.register","platform":"apns","token":APNS_TOKEN}))
        .await?;
    ensure!(refused["code"] == "forbidden", "{refused}");
    assert!(setup.tokens_of("carol").await?.is_empty());
    // bob registers it again from his tablet: it moves between his devices.
    let mut tablet = system.connect("bob", "tablet").await?;
    request_ok(
        &mut tablet,
        json!({"type":"push.register","platform":"apns","token":APNS_TOKEN}),
    )
    .await?;
    assert_eq!(
        holder(&setup, APNS_TOKEN).await?,
        Some(("bob".to_string(), "tablet".to_string()))
    );
    assert_eq!(
        setup.tokens_of("bob").await?,
        [
            ("apns".to_string(), APNS_TOKEN.to_string()),
            ("webhook".to_string(), "bob-hook".to_string())
        ]
    );

    bob.close().await?;
    tablet.close().await?;
    carol.close().await?;
    wait_presence(&setup.js, "bob", "offline").await?;
    wait_presence(&setup.js, "carol", "offline").await?;
    let mut alice = system.connect("alice", "phone").await?;

    // To bob: his webhook and his tablet, once each. Once that job is
    // acked, every token pushd found for him has had its request (it sends
    // to all, then acks).
    let sent = alice
        .send_message(json!({"to":"bob"}), "for bob", "u1")
        .await?;
    ensure!(sent["type"] == "sent", "{sent}");
    wait_until(|| async {
        setup.jobs_left().await == 0
            && to_token(webhook, "bob-hook") == 1
            && apns.requests().len() == 1
    })
    .await?;
    assert_eq!(
        to_token(fcm, "fcm-bob-phone"),
        0,
        "pushed to an unregistered token"
    );
    let to_bob = &apns.requests()[0];
    assert_eq!(to_bob.path, format!("/3/device/{APNS_TOKEN}"));
    assert_eq!(to_bob.json()?["aps"]["alert"]["body"], "for bob");

    // To carol: nothing, she holds no token.
    let sent = alice
        .send_message(json!({"to":"carol"}), "for carol", "u2")
        .await?;
    ensure!(sent["type"] == "sent", "{sent}");
    wait_until(|| async { setup.jobs_left().await == 0 }).await?;
    assert_eq!(apns.requests().len(), 1, "pushed carol to bob's token");
    assert_eq!(fcm.requests().len(), 0);
    assert_eq!(webhook.requests().len(), 1);
    Ok(())
}

#[tokio::test]
async fn push_tokens_are_capped_per_user_and_per_device() -> Result<()> {
    let setup = Setup::start().await?;
    let system = &setup.system;
    let caps = Config::default().push_tokens;
    // dave registers an FCM token on 7 devices, one after another: only
    // the 5 most recent devices keep theirs.
    let register = |device: String, platform: &'static str, token: String| async move {
        let mut client = system.connect("dave", &device).await?;
        request_ok(
            &mut client,
            json!({"type":"push.register","platform":platform,"token":token}),
        )
        .await?;
        client.close().await
    };
    for i in 0..7 {
        register(format!("d{i}"), "fcm", format!("dave-fcm-{i}")).await?;
    }
    let tokens = setup.tokens_of("dave").await?;
    assert_eq!(tokens.len(), caps.devices_per_user, "{tokens:?}");
    for i in 0..2 {
        assert_eq!(holder(&setup, &format!("dave-fcm-{i}")).await?, None);
    }
    // A webhook token on each of those 5 devices makes 10; the 11th token
    // drops the oldest (d2's FCM token), never the one being registered.
    for i in 2..7 {
        register(format!("d{i}"), "webhook", format!("dave-hook-{i}")).await?;
    }
    assert_eq!(setup.tokens_of("dave").await?.len(), caps.per_user);
    register("d6".into(), "apns", APNS_TOKEN.into()).await?;
    assert_eq!(setup.tokens_of("dave").await?.len(), caps.per_user);
    assert_eq!(holder(&setup, "dave-fcm-2").await?, None);
    assert_eq!(
        holder(&setup, APNS_TOKEN).await?,
        Some(("dave".to_string(), "d6".to_string()))
    );

    // Rows from before the caps (written straight into PostgreSQL) do not
    // amplify either: one job for erin, with 15 tokens, makes 10 requests.
    let pushd = Pushd::start(setup.config(Duration::from_millis(100), true));
    for i in 0..15 {
        setup
            .register(
                "erin",
                &format!("e{i}"),
                Platform::Webhook,
                &format!("erin-{i}"),
            )
            .await?;
    }
    setup.publish(&job("erin", "alice", 901, "hello")).await?;
    wait_until(|| async { setup.jobs_left().await == 0 }).await?;
    assert_eq!(setup.fakes.webhook.requests().len(), caps.per_user);
    pushd.stop().await
}

/// A message enters MESSAGES from a backend service (as an operator's
/// replay or a bot on NATS would publish it), so its sender has no device
/// online and presence cannot be what keeps her from being notified.
/// Returns where it was stored: the stream (MESSAGES or the conversation's
/// partition of it) and its sequence there.
async fn publish_as_backend(
    setup: &Setup,
    from: &str,
    to: &str,
    text: &str,
) -> Result<(String, u64)> {
    let (from, to) = (UserId::parse(from)?, UserId::parse(to)?);
    let ids = IdGenerator::new(NodeSlot::fixed(1000));
    let id = ids.next_id()?;
    let event = MessageEvent::sent(
        id,
        ConversationId::dm(from.clone(), to)?,
        from.clone(),
        text.into(),
        chat_shared::idgen::timestamp_ms(id),
        ClientMsgId::parse(format!("backend-{id}"))?,
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        subjects::MSG_ID_HEADER,
        subjects::send_dedup_id(&event.from, &event.client_msg_id).as_str(),
    );
    let partition = setup
        .system
        .config
        .partitions
        .of_conversation(&event.conversation);
    let ack = setup
        .js
        .publish_with_headers(
            subjects::message_in(&event.conversation, partition),
            headers,
            serde_json::to_vec(&event)?.into(),
        )
        .await?
        .await?;
    Ok((ack.stream, ack.sequence))
}

#[tokio::test]
async fn push_never_goes_to_the_sender_even_when_offline() -> Result<()> {
    let setup = Setup::start().await?;
    let pushd = Pushd::start(setup.config(Duration::from_millis(300), true));
    let fcm = &setup.fakes.fcm;
    // Neither has ever connected: both are offline, both have a token.
    setup
        .register("alice", "phone", Platform::Fcm, "fcm-alice-phone")
        .await?;
    setup
        .register("bob", "phone", Platform::Fcm, "fcm-bob-phone")
        .await?;
    let (stream, sequence) = publish_as_backend(&setup, "alice", "bob", "from the backend").await?;

    // The router acks the event only after every push job it emitted for
    // it is in PUSH; pushd acks a job only after its provider answered. So
    // once both are done, a job for alice would have reached FCM.
    let messages = setup.js.get_stream(&stream).await?;
    wait_until(|| async {
        let routed = match messages
            .clone()
            .consumer_info(subjects::ROUTER_CONSUMER)
            .await
        {
            Ok(info) => info.ack_floor.stream_sequence >= sequence,
            Err(_) => false,
        };
        routed && setup.jobs_left().await == 0 && to_token(fcm, "fcm-bob-phone") == 1
    })
    .await?;
    let to_bob = fcm.requests()[0].json()?;
    assert_eq!(
        to_bob["message"]["notification"]["body"],
        "from the backend"
    );
    assert_eq!(
        to_token(fcm, "fcm-alice-phone"),
        0,
        "the sender was pushed her own message"
    );
    assert_eq!(fcm.requests().len(), 1);
    assert_eq!(pushd.metrics.sent(Platform::Fcm), 1);
    pushd.stop().await
}

/// Jobs ever stored in PUSH (acked ones included: it is a work queue).
async fn jobs_made(setup: &Setup) -> u64 {
    match setup.js.get_stream(subjects::PUSH_STREAM).await {
        Ok(mut stream) => match stream.info().await {
            Ok(info) => info.state.last_sequence,
            Err(_) => 0,
        },
        Err(_) => 0,
    }
}

/// PROTOCOL.md v1.1 `mute`: no push for a muted conversation, which still
/// counts unread, unless the message mentions the user; other
/// conversations push as before, and unmuting restores the pushes.
#[tokio::test]
async fn push_muted_conversation_counts_unread_but_sends_no_push() -> Result<()> {
    let setup = Setup::start().await?;
    let pushd = Pushd::start(setup.config(Duration::from_millis(300), true));
    let system = &setup.system;
    let fcm = &setup.fakes.fcm;
    let mut bob = system.connect("bob", "phone").await?;
    let register = json!({"type":"push.register","platform":"fcm","token":"fcm-bob"});
    request_ok(&mut bob, register).await?;
    let hour_from_now =
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64 + 3_600_000;
    let mute = json!({"type":"mute","conversation":"dm:alice:bob","until":hour_from_now});
    request_ok(&mut bob, mute).await?;
    let theirs = json!({"type":"mute","conversation":"dm:alice:carol","until":hour_from_now});
    let refused = bob.request(theirs).await?;
    ensure!(refused["code"] == "forbidden", "{refused}");
    bob.close().await?;
    wait_presence(&setup.js, "bob", "offline").await?;

    // The muted message's job is made and settled without a push.
    let mut alice = system.connect("alice", "phone").await?;
    let muted = alice
        .send_message(json!({"to":"bob"}), "muted", "p1")
        .await?;
    ensure!(muted["type"] == "sent", "{muted}");
    wait_until(|| async { jobs_made(&setup).await == 1 && setup.jobs_left().await == 0 }).await?;
    assert_eq!(pushd.metrics.muted(), 1);
    // Another conversation pushes; it is the only push so far.
    let mut carol = system.connect("carol", "phone").await?;
    let loud = carol
        .send_message(json!({"to":"bob"}), "not muted", "p2")
        .await?;
    ensure!(loud["type"] == "sent", "{loud}");
    wait_until(|| async { fcm.requests().len() == 1 }).await?;
    let pushed = fcm.requests()[0].json()?;
    assert_eq!(pushed["message"]["notification"]["body"], "not muted");
    // A message that mentions bob pushes through the mute.
    let mention = alice
        .request(json!({
            "type":"send","to":"bob","text":"hey @bob","client_msg_id":"p1m","mentions":["bob"]
        }))
        .await?;
    ensure!(mention["type"] == "sent", "{mention}");
    wait_until(|| async { fcm.requests().len() == 2 }).await?;
    let pushed = fcm.requests()[1].json()?;
    assert_eq!(pushed["message"]["notification"]["body"], "hey @bob");

    // Unmuted (`until: null`), the conversation pushes again.
    let mut bob = system.connect("bob", "phone").await?;
    request_ok(
        &mut bob,
        json!({"type":"mute","conversation":"dm:alice:bob","until":null}),
    )
    .await?;
    bob.close().await?;
    wait_presence(&setup.js, "bob", "offline").await?;
    let again = alice
        .send_message(json!({"to":"bob"}), "unmuted", "p3")
        .await?;
    ensure!(again["type"] == "sent", "{again}");
    wait_until(|| async { fcm.requests().len() == 3 }).await?;
    let pushed = fcm.requests()[2].json()?;
    assert_eq!(pushed["message"]["notification"]["body"], "unmuted");

    // Muted or not, every message counted unread.
    let mut bob = system.connect("bob", "phone").await?;
    let list = bob.request(json!({"type":"conversations"})).await?;
    let unread = |conversation: &str| {
        list["items"]
            .as_array()
            .and_then(|items| items.iter().find(|i| i["conversation"] == conversation))
            .map(|item| item["unread"].clone())
    };
    assert_eq!(unread("dm:alice:bob"), Some(json!(3)), "{list}");
    assert_eq!(unread("dm:bob:carol"), Some(json!(1)), "{list}");
    assert_eq!(pushd.metrics.muted(), 1);
    pushd.stop().await
}
