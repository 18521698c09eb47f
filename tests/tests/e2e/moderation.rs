//! Operators' moderation (issue 14 item 9): `chatctl user ban|unban|kick|
//! revoke` against a system with two edges. A banned or revoked user's
//! sessions close with 4001 on every edge, their `hello` is refused, the
//! records outlive the edges, and every action is on the AUDIT stream;
//! other users are untouched.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chat_shared::auth::{self, Claims};
use chat_shared::ids::UserId;
use chat_shared::moderation::{Action, AuditEvent, Ban};
use chat_shared::subjects;
use chat_tests::{http_get, wait_until, Client, Ending, System};
use chatctl::moderation::Moderator;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// The issue's bound: a user's sessions close within 1 s of the action.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

fn user(name: &str) -> UserId {
    UserId::parse(name).expect("test user ids are valid")
}

/// A system with a second edge, ready.
async fn two_edges() -> anyhow::Result<(System, SocketAddr)> {
    let mut system = System::start().await?;
    let second = system.start_edge().await?;
    wait_ready(second).await?;
    Ok((system, second))
}

async fn wait_ready(edge: SocketAddr) -> anyhow::Result<()> {
    wait_until(|| async move {
        http_get(edge, "/readyz")
            .await
            .is_ok_and(|(status, _)| status == 200)
    })
    .await
}

/// chatctl's moderation, as the admin user, acting as `ops`.
async fn moderator(system: &System) -> anyhow::Result<Moderator> {
    let admin = system.admin().await?;
    let js = chat_shared::nats::jetstream(admin.clone(), &system.config);
    Moderator::new(admin, js, "ops".into()).await
}

/// Says hello to `edge` with `token`; the error and how the connection
/// ended, or `None` if it was welcomed.
async fn hello(edge: SocketAddr, token: &str) -> anyhow::Result<Option<(Value, Ending)>> {
    let mut client = Client::open(&format!("ws://{edge}/v1/ws")).await?;
    client
        .send(json!({"type":"hello","token":token,"device":"probe"}))
        .await?;
    let reply = client.recv().await?;
    if reply["type"] == "welcome" {
        return Ok(None);
    }
    Ok(Some((reply, client.ending().await?)))
}

/// Asserts `token` is refused at `hello` on every edge as an operator's
/// refusal: `unauthorized`, then 4001.
async fn refused_everywhere(edges: &[SocketAddr], token: &str) -> anyhow::Result<()> {
    for edge in edges {
        let Some((error, ending)) = hello(*edge, token).await? else {
            anyhow::bail!("edge {edge} welcomed the user");
        };
        assert_eq!(error["code"], "unauthorized", "{error}");
        assert_eq!(ending, Ending::Closed(4001));
    }
    Ok(())
}

/// Waits until every edge welcomes `token` again (edges learn of a lifted
/// ban from their bucket watchers).
async fn welcomed_everywhere(edges: &[SocketAddr], token: &str) -> anyhow::Result<()> {
    for edge in edges {
        wait_until(|| async move { matches!(hello(*edge, token).await, Ok(None)) }).await?;
    }
    Ok(())
}

/// Waits for each session to be closed with 4001; returns how long after
/// `since` the last one was.
async fn all_closed_4001(sessions: &mut [&mut Client], since: Instant) -> anyhow::Result<Duration> {
    for session in sessions.iter_mut() {
        assert_eq!(session.ending().await?, Ending::Closed(4001));
    }
    Ok(since.elapsed())
}

/// Untouched sessions still answer.
async fn still_served(sessions: &mut [&mut Client]) -> anyhow::Result<()> {
    for session in sessions.iter_mut() {
        let pong = session.request(json!({"type":"ping"})).await?;
        assert_eq!(pong["type"], "pong", "{pong}");
    }
    Ok(())
}

/// Every event on the AUDIT stream, in order.
async fn audit_trail(system: &System) -> anyhow::Result<Vec<AuditEvent>> {
    let js = chat_shared::nats::jetstream(system.admin().await?, &system.config);
    let mut stream = js.get_stream(subjects::AUDIT_STREAM).await?;
    let last = stream.info().await?.state.last_sequence;
    let mut events = Vec::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await?;
        assert!(message.subject.starts_with("chat.audit."));
        events.push(serde_json::from_slice(&message.payload)?);
    }
    Ok(events)
}

#[tokio::test]
async fn a_ban_closes_the_users_sessions_on_every_edge_and_refuses_hello() -> anyhow::Result<()> {
    let (system, second) = two_edges().await?;
    let edges = [system.edge_addr, second];
    let mut alice_phone = system.connect("alice", "phone").await?;
    let mut alice_laptop = system.connect_at(second, "alice", "laptop", None).await?;
    let mut bob_phone = system.connect("bob", "phone").await?;
    let mut bob_laptop = system.connect_at(second, "bob", "laptop", None).await?;
    let moderator = moderator(&system).await?;

    moderator
        .ban(&user("alice"), None, Some("spam".into()))
        .await?;
    let returned = Instant::now();
    let took = all_closed_4001(&mut [&mut alice_phone, &mut alice_laptop], returned).await?;
    assert!(
        took < CLOSE_WITHIN,
        "sessions closed {took:?} after the ban"
    );
    refused_everywhere(&edges, &system.token("alice")).await?;
    still_served(&mut [&mut bob_phone, &mut bob_laptop]).await?;
    let sent = bob_phone
        .send_message(json!({"to":"carol"}), "still here", "m1")
        .await?;
    assert_eq!(sent["type"], "sent", "{sent}");

    let trail = audit_trail(&system).await?;
    assert_eq!(trail.len(), 1, "{trail:?}");
    assert_eq!(trail[0].action, Action::Ban);
    assert_eq!(trail[0].user, user("alice"));
    assert_eq!(trail[0].by, "ops");
    assert_eq!(trail[0].reason.as_deref(), Some("spam"));
    Ok(())
}

#[tokio::test]
async fn a_ban_with_an_end_expires_and_unban_lifts_one_without() -> anyhow::Result<()> {
    let (system, second) = two_edges().await?;
    let edges = [system.edge_addr, second];
    let moderator = moderator(&system).await?;
    let alice = user("alice");

    // An end in the past is an operator's typo, refused before any write.
    let past = auth::now_secs() - 60;
    assert!(moderator.ban(&alice, Some(past), None).await.is_err());
    welcomed_everywhere(&edges, &system.token("alice")).await?;

    let until = auth::now_secs() + 2;
    moderator.ban(&alice, Some(until), None).await?;
    refused_everywhere(&edges, &system.token("alice")).await?;
    // Nobody lifts it: it ends by itself.
    welcomed_everywhere(&edges, &system.token("alice")).await?;
    assert!(auth::now_secs() >= until, "let in before the ban ended");

    moderator.ban(&alice, None, None).await?;
    refused_everywhere(&edges, &system.token("alice")).await?;
    moderator.unban(&alice, Some("appeal".into())).await?;
    welcomed_everywhere(&edges, &system.token("alice")).await?;

    let actions: Vec<_> = audit_trail(&system)
        .await?
        .into_iter()
        .map(|e| (e.action, e.until))
        .collect();
    assert_eq!(
        actions,
        [
            (Action::Ban, Some(until)),
            (Action::Ban, None),
            (Action::Unban, None)
        ]
    );
    Ok(())
}

#[tokio::test]
async fn a_kick_closes_every_session_but_lets_the_user_reconnect() -> anyhow::Result<()> {
    let (system, second) = two_edges().await?;
    let mut alice_phone = system.connect("alice", "phone").await?;
    let mut alice_laptop = system.connect_at(second, "alice", "laptop", None).await?;
    let mut bob = system.connect_at(second, "bob", "phone", None).await?;
    let moderator = moderator(&system).await?;

    moderator.kick(&user("alice"), None).await?;
    let returned = Instant::now();
    let took = all_closed_4001(&mut [&mut alice_phone, &mut alice_laptop], returned).await?;
    assert!(
        took < CLOSE_WITHIN,
        "sessions closed {took:?} after the kick"
    );
    // No record: the same token connects again at once, on either edge.
    let mut again = system.connect("alice", "phone").await?;
    let mut again_there = system.connect_at(second, "alice", "laptop", None).await?;
    still_served(&mut [&mut again, &mut again_there, &mut bob]).await?;

    let trail = audit_trail(&system).await?;
    assert_eq!(trail.len(), 1);
    assert_eq!(trail[0].action, Action::Kick);
    Ok(())
}

#[tokio::test]
async fn a_revocation_refuses_older_tokens_at_hello_and_refresh() -> anyhow::Result<()> {
    let (system, second) = two_edges().await?;
    let edges = [system.edge_addr, second];
    let old = system.token("alice");
    let mut phone = system
        .connect_url(&system.ws_url(), &old, "phone", None)
        .await?;
    let mut laptop = system
        .connect_url(&format!("ws://{second}/v1/ws"), &old, "laptop", None)
        .await?;
    let mut bob = system.connect("bob", "phone").await?;
    let moderator = moderator(&system).await?;

    let revoked = moderator
        .revoke(&user("alice"), Some("stolen phone".into()))
        .await?;
    let returned = Instant::now();
    let took = all_closed_4001(&mut [&mut phone, &mut laptop], returned).await?;
    assert!(
        took < CLOSE_WITHIN,
        "sessions closed {took:?} after the revocation"
    );
    refused_everywhere(&edges, &old).await?;
    // A token without `iat` cannot show it is newer.
    let no_iat = auth::sign(
        &Header::new(Algorithm::HS256),
        &Claims {
            sub: "alice".into(),
            exp: auth::now_secs() + 600,
            nbf: None,
            iat: None,
            iss: None,
            aud: None,
        },
        &EncodingKey::from_secret(chat_tests::JWT_SECRET.as_bytes()),
    )?;
    refused_everywhere(&edges, &no_iat).await?;

    // A token issued after the revocation's second is accepted...
    wait_until(|| async { auth::now_secs() > revoked.at }).await?;
    let fresh = system.token("alice");
    let mut renewed = system
        .connect_url(&format!("ws://{second}/v1/ws"), &fresh, "laptop", None)
        .await?;
    still_served(&mut [&mut renewed, &mut bob]).await?;
    // ...but refreshing it with an old one ends the session.
    let refused = renewed
        .request(json!({"type":"refresh","token":old}))
        .await?;
    assert_eq!(refused["code"], "unauthorized", "{refused}");
    assert_eq!(renewed.ending().await?, Ending::Closed(4001));

    let trail = audit_trail(&system).await?;
    assert_eq!(trail.len(), 1);
    assert_eq!(trail[0].action, Action::Revoke);
    assert_eq!(trail[0].reason.as_deref(), Some("stolen phone"));
    Ok(())
}

#[tokio::test]
async fn bans_and_revocations_outlive_the_edges() -> anyhow::Result<()> {
    let mut system = System::start().await?;
    let old_carol = system.token("carol");
    let moderator = moderator(&system).await?;
    moderator.ban(&user("alice"), None, None).await?;
    let revoked = moderator.revoke(&user("carol"), None).await?;
    wait_until(|| async { auth::now_secs() > revoked.at }).await?;

    // An edge started after the actions heard no notice: it reads the bucket.
    let fresh_edge = system.start_edge().await?;
    wait_ready(fresh_edge).await?;
    refused_everywhere(&[fresh_edge], &system.token("alice")).await?;
    refused_everywhere(&[fresh_edge], &old_carol).await?;
    let mut carol = system
        .connect_at(fresh_edge, "carol", "phone", None)
        .await?;
    let mut bob = system.connect_at(fresh_edge, "bob", "phone", None).await?;
    still_served(&mut [&mut carol, &mut bob]).await?;
    Ok(())
}

#[tokio::test]
async fn a_ban_whose_notice_is_lost_still_closes_sessions_through_the_watcher() -> anyhow::Result<()>
{
    let (system, second) = two_edges().await?;
    let mut alice_phone = system.connect("alice", "phone").await?;
    let mut alice_laptop = system.connect_at(second, "alice", "laptop", None).await?;
    let mut bob = system.connect("bob", "phone").await?;
    // The record as chatctl writes it, with no notice on chat.mod.alice.
    let js = chat_shared::nats::jetstream(system.admin().await?, &system.config);
    let bucket = js.get_key_value(subjects::MODERATION_BUCKET).await?;
    let ban = Ban {
        at: auth::now_secs(),
        until: None,
    };
    bucket
        .put(
            subjects::ban_key(&user("alice")),
            serde_json::to_vec(&ban)?.into(),
        )
        .await?;
    let written = Instant::now();
    let took = all_closed_4001(&mut [&mut alice_phone, &mut alice_laptop], written).await?;
    assert!(
        took < CLOSE_WITHIN,
        "sessions closed {took:?} after the write"
    );
    refused_everywhere(&[system.edge_addr, second], &system.token("alice")).await?;
    still_served(&mut [&mut bob]).await?;
    Ok(())
}

#[tokio::test]
async fn an_edge_can_neither_ban_nor_kick() -> anyhow::Result<()> {
    let system = System::start().await?;
    let mut bob = system.connect("bob", "phone").await?;
    let edge = chat_shared::nats::connect(&system.config_for("edge"), "compromised-edge").await?;
    let js = chat_shared::nats::jetstream(edge.clone(), &system.config);
    let bucket = js.get_key_value(subjects::MODERATION_BUCKET).await?;
    let ban = serde_json::to_vec(&Ban {
        at: auth::now_secs(),
        until: None,
    })?;
    assert!(
        bucket
            .put(subjects::ban_key(&user("bob")), ban.into())
            .await
            .is_err(),
        "the edge user wrote a ban"
    );
    // A kick it publishes is dropped by nats-server. Had it passed, the
    // edges would act on it before the operator's kick of carol published
    // after it (one server, one subscription, one task in order).
    let mut carol = system.connect("carol", "phone").await?;
    edge.publish(
        subjects::moderation_notice(&user("bob")),
        r#"{"action":"kick"}"#.into(),
    )
    .await?;
    edge.flush().await?;
    moderator(&system).await?.kick(&user("carol"), None).await?;
    assert_eq!(carol.ending().await?, Ending::Closed(4001));
    still_served(&mut [&mut bob]).await?;
    welcomed_everywhere(&[system.edge_addr], &system.token("bob")).await?;
    Ok(())
}

#[tokio::test]
async fn the_watcher_follows_the_bucket_across_a_nats_restart() -> anyhow::Result<()> {
    let mut system = System::start().await?;
    let mut alice = system.connect("alice", "phone").await?;
    system.nats.kill().await?;
    system.nats.restart().await?;
    system.wait_edge_ready().await?;
    let mut bob = system.connect("bob", "phone").await?;
    // Written with no notice: only a watcher that survived the outage (made
    // afresh after the reconnect) can tell the edge.
    let js = chat_shared::nats::jetstream(system.admin().await?, &system.config);
    let bucket = js.get_key_value(subjects::MODERATION_BUCKET).await?;
    let ban = Ban {
        at: auth::now_secs(),
        until: None,
    };
    bucket
        .put(
            subjects::ban_key(&user("alice")),
            serde_json::to_vec(&ban)?.into(),
        )
        .await?;
    assert_eq!(alice.ending().await?, Ending::Closed(4001));
    refused_everywhere(&[system.edge_addr], &system.token("alice")).await?;
    still_served(&mut [&mut bob]).await?;
    Ok(())
}
