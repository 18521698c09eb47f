//! Provisioning at start-up: an unchanged system is left alone (an update
//! is a proposal a replicated stream refuses while a peer is offline), and
//! a stream JetStream will not take yet is waited for, not a reason to exit.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, stream};
use chat_shared::{streams, subjects, Config};
use chat_tests::{config_as, test_config, NatsServer};
use futures::StreamExt;

/// Where the server reports every JetStream API request it served.
const API_AUDIT: &str = "$JS.EVENT.ADVISORY.API";

async fn admin(config: &Config) -> anyhow::Result<(async_nats::Client, jetstream::Context)> {
    let client = chat_shared::nats::connect(&config_as(config, "admin"), "provisioning").await?;
    let js = chat_shared::nats::jetstream(client.clone(), config);
    Ok((client, js))
}

/// The JetStream API subjects requested while `run` ran, as the server's
/// audit advisories report them. An account-info request after `run`
/// marks the end, but the server sends advisories from several goroutines,
/// so one of `run`'s may arrive after the marker's: reading goes on until
/// the marker arrived and `complete` holds of what did (otherwise a late
/// one would count against the next window).
async fn api_requests_during<F>(
    client: &async_nats::Client,
    js: &jetstream::Context,
    complete: impl Fn(&[String]) -> bool,
    run: F,
) -> anyhow::Result<Vec<String>>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut audit = client.subscribe(API_AUDIT).await?;
    client.flush().await?;
    run.await?;
    js.query_account().await?;
    let mut requests = Vec::new();
    let mut marked = false;
    loop {
        let advisory = tokio::time::timeout(Duration::from_secs(10), audit.next())
            .await
            .context("no API advisory within 10 s")?
            .context("advisory subscription ended")?;
        let advisory: serde_json::Value = serde_json::from_slice(&advisory.payload)?;
        let subject = advisory["request"]["subject"]
            .as_str()
            .or_else(|| advisory["subject"].as_str())
            .context("an API advisory without a subject")?
            .to_string();
        if subject == "$JS.API.INFO" {
            marked = true;
        } else {
            requests.push(subject);
        }
        if marked && complete(&requests) {
            return Ok(requests);
        }
    }
}

fn writes(requests: &[String]) -> Vec<&String> {
    requests
        .iter()
        .filter(|s| s.contains(".CREATE.") || s.contains(".UPDATE."))
        .collect()
}

#[tokio::test]
async fn provisioning_an_unchanged_system_writes_nothing() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let mut config = test_config(nats.url(), String::new());
    let (client, js) = admin(&config).await?;
    let names: Vec<String> = streams::all_streams(&config)
        .into_iter()
        .map(|s| s.name)
        .chain(
            streams::buckets(&config)
                .into_iter()
                .map(|b| format!("KV_{}", b.bucket)),
        )
        .collect();
    let created = |requests: &[String], name: &str| {
        requests
            .iter()
            .any(|s| s.as_str() == format!("$JS.API.STREAM.CREATE.{name}"))
    };
    let every_created = |requests: &[String]| names.iter().all(|name| created(requests, name));
    // The first run creates every stream and bucket: the window waits for
    // each create (a missing one fails it after 10 s).
    api_requests_during(&client, &js, every_created, async {
        Ok(streams::apply(&js, &config).await?)
    })
    .await?;

    let again = api_requests_during(&client, &js, |_| true, async {
        Ok(streams::apply(&js, &config).await?)
    })
    .await?;
    assert!(
        !again.is_empty(),
        "the second run read the streams: {again:?}"
    );
    assert_eq!(writes(&again), Vec::<&String>::new(), "nothing changed");

    // A changed bound is one update of that stream only: of each of its
    // partitions when INBOX is split (each holds a share of the bound).
    config.bounds.inbox += 1024;
    let mut inbox_updates: Vec<String> = chat_tests::streams::inbox_streams(config.partitions)
        .iter()
        .map(|name| format!("$JS.API.STREAM.UPDATE.{name}"))
        .collect();
    inbox_updates.sort();
    let updated = |requests: &[String]| inbox_updates.iter().all(|u| requests.contains(u));
    let changed = api_requests_during(&client, &js, updated, async {
        Ok(streams::apply(&js, &config).await?)
    })
    .await?;
    let mut changed = writes(&changed);
    changed.sort();
    assert_eq!(changed, inbox_updates.iter().collect::<Vec<_>>());
    Ok(())
}

#[tokio::test]
async fn provisioning_waits_for_a_stream_it_cannot_create_yet() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let config = test_config(nats.url(), String::new());
    let (_client, js) = admin(&config).await?;
    // Another stream holds AUDIT's subjects: JetStream refuses AUDIT (its
    // subjects overlap) until it is gone.
    js.create_stream(stream::Config {
        name: "BLOCKER".into(),
        subjects: subjects::AUDIT_SUBJECTS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ..Default::default()
    })
    .await?;
    let provisioning = tokio::spawn({
        let (js, config) = (js.clone(), config.clone());
        async move { streams::provision(&js, &config).await }
    });
    // The streams before AUDIT are made, and it keeps trying.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while js.get_stream(subjects::DEADLETTER_STREAM).await.is_err() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "DEADLETTER never made"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !provisioning.is_finished(),
        "provisioning gave up or skipped AUDIT"
    );
    assert!(js.get_stream(subjects::AUDIT_STREAM).await.is_err());

    js.delete_stream("BLOCKER").await?;
    tokio::time::timeout(Duration::from_secs(30), provisioning)
        .await
        .context("provisioning did not finish once AUDIT could be made")??;
    for definition in streams::all_streams(&config) {
        js.get_stream(&definition.name).await?;
    }
    for bucket in streams::buckets(&config) {
        js.get_key_value(&bucket.bucket).await?;
    }
    Ok(())
}
