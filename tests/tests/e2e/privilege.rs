//! Least privilege, end to end: what nats/users.conf refuses a compromised
//! edge (listening in on other services, answering their requests), and
//! the start-up refusals of dev credentials and unsafe key settings. (The
//! edge's refused publishes and JetStream calls are in security.rs.)

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chat_shared::auth::KeyError;
use chat_tests::{nats_password, System, WAIT};
use futures::StreamExt;
use tokio::sync::mpsc;

/// A raw NATS client as `user` (its dev password), as an attacker holding
/// that user's credentials would use it, and the errors the server sends
/// it.
async fn raw_client(
    system: &System,
    user: &str,
) -> Result<(async_nats::Client, mpsc::UnboundedReceiver<String>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let client =
        async_nats::ConnectOptions::with_user_and_password(user.into(), nats_password(user).into())
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        let _ = tx.send(e.to_string());
                    }
                }
            })
            .connect(system.nats.url())
            .await?;
    Ok((client, rx))
}

#[tokio::test]
async fn the_edge_nats_user_cannot_listen_in_or_answer_other_services() -> Result<()> {
    let system = System::start().await?;
    let admin = system.admin().await?;
    let (edge, mut errors) = raw_client(&system, "edge").await?;
    // (what the edge tries to subscribe to, a subject published there)
    let attempts = [
        // Everything.
        (">", "chat.inbox.bob"),
        // Every user's durable inbox.
        ("chat.inbox.>", "chat.inbox.bob"),
        // Other services' replies (the router's member lookups, PubAcks),
        // and the shared prefix of clients without one of their own.
        ("_INBOX_router.>", "_INBOX_router.probe.1"),
        ("_INBOX_persister.>", "_INBOX_persister.probe.1"),
        ("_INBOX_presence.>", "_INBOX_presence.probe.1"),
        ("_INBOX.>", "_INBOX.probe.1"),
        // The persister's requests: a subscriber here could answer the
        // router's member lookup first, with made-up members.
        ("chat.rpc.>", "chat.rpc.probe"),
        ("chat.rpc.members", "chat.rpc.members"),
    ];
    let mut subscriptions = Vec::new();
    for (subject, _) in attempts {
        subscriptions.push((subject, edge.subscribe(subject).await?));
    }
    // Nor may it read the streams it has no business in (push jobs, dead
    // letters) message by message.
    let reads = ["$JS.API.DIRECT.GET.PUSH", "$JS.API.DIRECT.GET.DEADLETTER"];
    for read in reads {
        edge.publish_with_reply(read, edge.new_inbox(), "{\"seq\":1}".into())
            .await?;
    }
    edge.flush().await?;

    // nats-server answers each refused SUB and PUB with a permissions
    // violation.
    let expected: Vec<String> = attempts
        .iter()
        .map(|(subject, _)| format!("subscription to \"{subject}\""))
        .chain(reads.iter().map(|read| format!("publish to \"{read}\"")))
        .map(|what| what.to_lowercase())
        .collect();
    let mut refused = HashSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while refused.len() < expected.len() {
        let error = tokio::time::timeout_at(deadline, errors.recv())
            .await
            .with_context(|| format!("refused so far: {refused:?}"))?
            .context("the error channel closed")?;
        let error = error.to_lowercase();
        for what in &expected {
            if error.contains("permissions violation") && error.contains(what.as_str()) {
                refused.insert(what.clone());
            }
        }
    }

    // Then something is published on each refused subject, and after it
    // on an allowed one as the control: the control arrives, so silence on
    // the others is the refusal, not a dead connection (one publisher's
    // messages reach a client in order). The batch is sent again until the
    // control arrives: under load a fresh subscription sometimes missed the
    // first one (cause not found; a second publish always arrived).
    let mut control = edge.subscribe("chat.deliver.probe").await?;
    edge.flush().await?;
    let arrived = async {
        loop {
            for (_, probe) in attempts {
                admin.publish(probe, "{\"probe\":true}".into()).await?;
            }
            admin.publish("chat.deliver.probe", "{}".into()).await?;
            admin.flush().await?;
            if let Ok(got) = tokio::time::timeout(Duration::from_millis(500), control.next()).await
            {
                return anyhow::Ok(got.is_some());
            }
        }
    };
    let arrived = tokio::time::timeout(WAIT, arrived).await??;
    assert!(arrived, "the allowed subscription ended");
    for (subject, mut subscription) in subscriptions {
        let leaked = tokio::time::timeout(Duration::from_millis(300), subscription.next()).await;
        if let Ok(Some(message)) = leaked {
            bail!(
                "the edge's subscription to {subject} got {}",
                message.subject
            );
        }
    }
    // The system still works for everyone: the real persister answers.
    answers_alice(&system).await
}

/// The system serves a request that needs the persister (over the edge's
/// NATS user, with the real persister answering).
async fn answers_alice(system: &System) -> Result<()> {
    let mut alice = system.connect("alice", "phone").await?;
    let reply = alice
        .request(serde_json::json!({"type":"conversations"}))
        .await?;
    assert_eq!(reply["type"], "conversations", "{reply}");
    Ok(())
}

/// How a service's run ended, if it failed.
async fn error_of<E: std::fmt::Display>(
    run: impl std::future::Future<Output = Result<(), E>>,
) -> Option<String> {
    run.await.err().map(|e| e.to_string())
}

#[tokio::test]
async fn services_refuse_the_dev_nats_passwords_without_chat_dev() -> Result<()> {
    let system = System::start().await?;
    let outside_dev = |user: &str| {
        let mut config = system.config_for(user);
        config.dev = false;
        config
    };
    let never = || -> chat_shared::shutdown::Shutdown { Box::pin(std::future::pending()) };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let refusals = [
        (
            "edge",
            error_of(chat_edge::run(outside_dev("edge"), listener, never())).await,
        ),
        (
            "router",
            error_of(chat_router::run_with(outside_dev("router"), None, never())).await,
        ),
        (
            "persister",
            error_of(chat_persister::run_with(
                outside_dev("persister"),
                None,
                never(),
            ))
            .await,
        ),
        (
            "presence",
            error_of(chat_presence::run_with(
                outside_dev("presence"),
                None,
                never(),
            ))
            .await,
        ),
        (
            "pushd",
            error_of(chat_pushd::run(outside_dev("pushd"), never())).await,
        ),
    ];
    for (service, refusal) in refusals {
        let refusal = refusal.with_context(|| format!("{service} started"))?;
        assert!(
            refusal.contains("dev password") && refusal.contains("CHAT_DEV=true"),
            "{service}: {refusal}"
        );
    }
    // The same passwords with CHAT_DEV=true are what this system runs on.
    assert!(system.config.dev);
    answers_alice(&system).await
}

/// An edge of `system` started with `adjust`ed settings: how its start
/// ended (it must fail before it serves anything).
async fn edge_start_error(
    system: &mut System,
    adjust: impl FnOnce(&mut chat_shared::Config),
) -> Result<chat_edge::EdgeError> {
    let saved = system.config.clone();
    adjust(&mut system.config);
    let started = system
        .start_edge_task(Box::pin(std::future::pending()))
        .await;
    system.config = saved;
    let (_, running) = started?;
    match tokio::time::timeout(WAIT, running).await?? {
        Ok(()) => bail!("the edge ran"),
        Err(e) => Ok(e),
    }
}

#[tokio::test]
async fn an_edge_refuses_weak_or_ambiguous_keys_at_start() -> Result<()> {
    let mut system = System::start().await?;
    let dir = tempfile::tempdir()?;
    // A 31-byte HS256 secret, from the setting or from a named file.
    let short = "0123456789abcdef0123456789abcde";
    let refused = edge_start_error(&mut system, |c| c.jwt_secret = Some(short.into())).await?;
    assert!(
        matches!(
            refused,
            chat_edge::EdgeError::Keys(KeyError::ShortSecret { bytes: 31, .. })
        ),
        "{refused}"
    );
    let file = dir.path().join("jwt_secret");
    std::fs::write(&file, short)?;
    let refused = edge_start_error(&mut system, |c| {
        c.jwt_secret = None;
        c.jwt_secret_file = Some(file.clone());
    })
    .await?;
    assert!(
        matches!(
            refused,
            chat_edge::EdgeError::Keys(KeyError::ShortSecret { .. })
        ),
        "{refused}"
    );
    // A JWK set without an audience: any token its issuer made for another
    // service would open a session here.
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, r#"{"keys":[]}"#)?;
    let refused = edge_start_error(&mut system, |c| {
        c.jwt_jwks_file = Some(jwks.clone());
        c.jwt_audience = None;
    })
    .await?;
    assert!(
        matches!(refused, chat_edge::EdgeError::Keys(KeyError::NoAudience)),
        "{refused}"
    );
    // The system's own edge (a 35-byte secret) serves.
    let alice = system.connect("alice", "phone").await?;
    assert_eq!(alice.welcome["user"], "alice");
    Ok(())
}

/// What other parts of the edge do with its NATS user (nats/users.conf
/// grants it ahead of them): per-user quota counters in a stream with the
/// totals read from the PubAck, moderation notices on `chat.mod.>`, and
/// ordered watches on the `chat_moderation` and `chat_edges` buckets. Each
/// is done here as the edge's user, with the edge's own reply prefix, and
/// must work; the stream and bucket are made as admin where the system
/// does not provision them yet.
#[tokio::test]
async fn the_edge_nats_user_can_still_meter_watch_and_hear_moderation() -> Result<()> {
    use async_nats::jetstream::{self, kv, stream};
    let system = System::start().await?;
    let admin = jetstream::new(system.admin().await?);
    admin
        .get_or_create_stream(stream::Config {
            name: "QUOTAS".into(),
            subjects: vec!["chat.quota.>".into()],
            ..Default::default()
        })
        .await?;
    let moderation = match admin.get_key_value("chat_moderation").await {
        Ok(store) => store,
        Err(_) => {
            admin
                .create_key_value(kv::Config {
                    bucket: "chat_moderation".into(),
                    ..Default::default()
                })
                .await?
        }
    };
    let edges = admin.get_key_value("chat_edges").await?;

    let edge = chat_shared::nats::connect(&system.config_for("edge"), "test-edge-jobs").await?;
    let js = chat_shared::nats::jetstream(edge.clone(), &system.config);
    // A quota increment and its PubAck.
    // The system's QUOTAS stream counts (`allow_msg_counter`): a publish
    // without `Nats-Incr` would be refused whatever the user's rights.
    let mut increment = async_nats::HeaderMap::new();
    increment.insert("Nats-Incr", "1");
    let ack = js
        .publish_with_headers("chat.quota.alice.msgs.min", increment, "".into())
        .await?
        .await?;
    assert_eq!(ack.stream, "QUOTAS");
    // Moderation notices.
    let mut notices = edge.subscribe("chat.mod.>").await?;
    edge.flush().await?;
    // Ordered watches of both buckets.
    let mut bans = js
        .get_key_value("chat_moderation")
        .await?
        .watch_all()
        .await?;
    let mut live = js.get_key_value("chat_edges").await?.watch_all().await?;
    moderation.put("ban.mallory", "{}".into()).await?;
    edges.put("edge-probe", "{}".into()).await?;
    let operator = system.admin().await?;
    operator.publish("chat.mod.mallory", "{}".into()).await?;
    operator.flush().await?;
    let notice = tokio::time::timeout(WAIT, notices.next()).await?;
    assert_eq!(
        notice.context("notices ended")?.subject.as_str(),
        "chat.mod.mallory"
    );
    let ban = tokio::time::timeout(WAIT, bans.next())
        .await?
        .context("the moderation watch ended")??;
    assert_eq!(ban.key, "ban.mallory");
    // The edge bucket also holds the system's own edge: wait for the probe.
    loop {
        let entry = tokio::time::timeout(WAIT, live.next())
            .await?
            .context("the edges watch ended")??;
        if entry.key == "edge-probe" {
            break;
        }
    }
    Ok(())
}
