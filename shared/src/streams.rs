//! JetStream streams, KV buckets and durable consumers, defined once and
//! applied idempotently by every service at start and by `chatctl streams apply`.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};

use crate::config::Config;
use crate::consume::Backoff;
use crate::partitions::Partition;
use crate::subjects;

/// The largest event; a 100,000-character text is at most 400 KB of UTF-8.
const MAX_EVENT_BYTES: i32 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("reading stream {name}: {source}")]
    Read {
        name: String,
        source: jetstream::context::GetStreamError,
    },
    #[error("stream {name}: {source}")]
    Stream {
        name: String,
        source: jetstream::context::CreateStreamError,
    },
    #[error("KV bucket {name}: {source}")]
    Bucket {
        name: String,
        source: jetstream::context::CreateKeyValueError,
    },
}

fn base(name: &str, subjects: &[&str], config: &Config) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        storage: stream::StorageType::File,
        num_replicas: config.stream_replicas,
        duplicate_window: config.dedup_window,
        max_message_size: MAX_EVENT_BYTES,
        allow_direct: true,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

/// A partition's stream: the subjects it captures and the transform that
/// stores them under the unpartitioned subjects (see `partitions`), with
/// its share of the byte bound.
fn partition_of(
    name: String,
    (subjects, transform): (Vec<String>, Option<subjects::Transform>),
    max_bytes: i64,
    config: &Config,
) -> stream::Config {
    let shares = i64::from(config.partitions.count());
    stream::Config {
        subjects,
        subject_transform: transform.map(|t| stream::SubjectTransform {
            source: t.src,
            destination: t.dest,
        }),
        max_bytes: max_bytes / shares,
        ..base(&name, &[], config)
    }
}

/// The log of record: one event per accepted message, in `partition`.
/// Full, it refuses new publishes (the edge answers `unavailable`):
/// dropping the oldest could drop an event not yet routed or stored in
/// PostgreSQL.
pub fn messages(config: &Config, partition: Partition) -> stream::Config {
    stream::Config {
        description: Some("one event per accepted message (PROTOCOL.md)".into()),
        max_age: config.messages_max_age,
        discard: stream::DiscardPolicy::New,
        ..partition_of(
            partition.messages_stream(),
            subjects::messages_partition(partition),
            config.bounds.messages,
            config,
        )
    }
}

/// Per-user inboxes of `partition`; the stream sequence is the cursor (a
/// user's items are all in their partition, so it grows per user). A
/// cache of deliveries that history can rebuild: full, the oldest items
/// go (a resume from before the first kept item answers `resumed:false`),
/// and each user's inbox is capped on its own so one flooded inbox cannot
/// push everyone else's items out.
pub fn inbox(config: &Config, partition: Partition) -> stream::Config {
    stream::Config {
        description: Some("per-user inbox items; the sequence is the cursor".into()),
        max_age: config.inbox_max_age,
        max_messages_per_subject: config.bounds.inbox_items_per_user,
        ..partition_of(
            partition.inbox_stream(),
            subjects::inbox_partition(partition),
            config.bounds.inbox,
            config,
        )
    }
}

/// Push jobs, each consumed once.
pub fn push(config: &Config) -> stream::Config {
    stream::Config {
        description: Some("push notification jobs for offline users".into()),
        retention: stream::RetentionPolicy::WorkQueue,
        max_age: Duration::from_secs(24 * 3600),
        // Notifications are best effort: full, the oldest jobs go.
        max_bytes: config.bounds.push,
        ..base(subjects::PUSH_STREAM, &subjects::PUSH_SUBJECTS, config)
    }
}

/// Membership changes, fanned into inboxes by the router.
pub fn events(config: &Config) -> stream::Config {
    stream::Config {
        description: Some("group membership changes".into()),
        max_age: config.messages_max_age,
        // Full, a publish is refused and the persister keeps the change in
        // its outbox until there is room: none is lost.
        max_bytes: config.bounds.events,
        discard: stream::DiscardPolicy::New,
        ..base(subjects::EVENTS_STREAM, &subjects::EVENTS_SUBJECTS, config)
    }
}

/// How long receipt events wait for the router and the persister: both
/// read them within seconds, so a day covers any outage worth surviving.
const RECEIPTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Receipt events are a few hundred bytes; full, the oldest go (a later
/// receipt carries a larger watermark anyway).
const RECEIPTS_MAX_BYTES: i64 = 1024 * 1024 * 1024;

/// Receipt events (delivered from edges, read from the persister), turned
/// into coalesced inbox items by the router.
pub fn receipts(config: &Config) -> stream::Config {
    stream::Config {
        description: Some("delivered and read receipts".into()),
        max_age: RECEIPTS_MAX_AGE,
        max_bytes: RECEIPTS_MAX_BYTES,
        ..base(
            subjects::RECEIPTS_STREAM,
            &subjects::RECEIPTS_SUBJECTS,
            config,
        )
    }
}

/// Events a consumer gave up on (`chat.dead.<consumer>`): a copy of the
/// original (payload and headers) plus why, kept until an operator deletes
/// it. Dead letters are rare and each one is an event a client was told is
/// `sent`, so nothing ages out.
pub fn deadletter(config: &Config) -> stream::Config {
    stream::Config {
        description: Some("events a consumer gave up on, with the reason".into()),
        max_age: Duration::ZERO,
        // A copy is an event of at most MAX_EVENT_BYTES plus a few headers:
        // only the server's max_payload bounds it, so no copy is refused.
        max_message_size: -1,
        // Full, a copy is refused and the event stays in its stream
        // (redelivered later) until an operator makes room.
        max_bytes: config.bounds.deadletter,
        discard: stream::DiscardPolicy::New,
        ..base(
            subjects::DEADLETTER_STREAM,
            &subjects::DEADLETTER_SUBJECTS,
            config,
        )
    }
}

/// One event per operator action (`chat.audit.<action>`,
/// `shared::moderation::AuditEvent`), kept until the byte bound drops the
/// oldest: an operator's record of who banned, kicked or revoked whom.
pub fn audit(config: &Config) -> stream::Config {
    stream::Config {
        description: Some("one event per operator action".into()),
        max_age: Duration::ZERO,
        max_bytes: config.bounds.audit,
        ..base(subjects::AUDIT_STREAM, &subjects::AUDIT_SUBJECTS, config)
    }
}

/// Per-user quota counters (`chat.quota.<user>.<kind>.<window>`): a
/// counter stream, so an edge adds with `Nats-Incr` and reads the new
/// total in the PubAck, and the edges of one user share the count. Only
/// the last message of a subject (it holds the total) is kept, and a
/// window's subject is dropped a little over a day later.
pub fn quotas(config: &Config) -> stream::Config {
    stream::Config {
        description: Some("per-user quota counters per window".into()),
        max_age: QUOTA_WINDOW_MAX_AGE,
        max_messages_per_subject: 1,
        allow_message_counter: true,
        // Full, the oldest windows go first (they are over already).
        max_bytes: config.bounds.quotas,
        // Counters may not be de-duplicated (each increment counts).
        duplicate_window: Duration::ZERO,
        ..base(subjects::QUOTAS_STREAM, &subjects::QUOTAS_SUBJECTS, config)
    }
}

/// The media object store (JetStream Object Store `chat_media`): the
/// stream async-nats' `create_object_store` would make, defined here so it
/// is provisioned, bounded and kept in step like every other stream.
/// Full, an upload is refused: stored media is never dropped. Chunks of
/// an upload go in before its metadata, so a crash leaves no visible
/// partial object (only chunks nothing names).
pub fn media(config: &Config) -> stream::Config {
    let bucket = subjects::MEDIA_BUCKET;
    stream::Config {
        description: Some("uploaded media and thumbnails (object store)".into()),
        max_age: Duration::ZERO,
        max_bytes: config.bounds.media,
        discard: stream::DiscardPolicy::New,
        // Object metadata replaces itself (`Nats-Rollup: sub`).
        allow_rollup: true,
        // Chunks are published without an id: nothing to de-duplicate.
        duplicate_window: Duration::ZERO,
        ..base(
            &subjects::object_store_stream(bucket),
            &[&format!("$O.{bucket}.C.>"), &format!("$O.{bucket}.M.>")],
            config,
        )
    }
}

/// Thumbnail jobs are a few hundred bytes each.
const MEDIA_JOBS_MAX_BYTES: i64 = 64 * 1024 * 1024;

/// Thumbnail jobs (`chat.media.thumb.<media>`), each taken once by a
/// persister's thumbnailer. Full, the oldest jobs go (an image without a
/// thumbnail is served without one).
pub fn media_jobs(config: &Config) -> stream::Config {
    stream::Config {
        description: Some("thumbnail jobs, one per stored image".into()),
        retention: stream::RetentionPolicy::WorkQueue,
        max_age: Duration::from_secs(7 * 24 * 3600),
        max_bytes: MEDIA_JOBS_MAX_BYTES,
        ..base(
            subjects::MEDIA_JOBS_STREAM,
            &subjects::MEDIA_JOBS_SUBJECTS,
            config,
        )
    }
}

/// Longer than the longest quota window (a day).
pub const QUOTA_WINDOW_MAX_AGE: Duration = Duration::from_secs(25 * 3600);

/// KV buckets refuse writes when full (JetStream fixes their discard
/// policy at `new`).
fn bucket(name: &str, description: &str, max_age: Duration, config: &Config) -> kv::Config {
    kv::Config {
        bucket: name.to_string(),
        description: description.to_string(),
        history: 1,
        max_age,
        max_bytes: config.bounds.buckets,
        storage: stream::StorageType::File,
        num_replicas: config.stream_replicas,
        ..Default::default()
    }
}

/// The shard map bucket's bound: 1,024 buckets as JSON are ~3 KB.
const SHARDS_BUCKET_MAX_BYTES: i64 = 1 << 20;

/// A leader that stops refreshing its lease loses it after this long.
pub const LEADER_LEASE_TTL: Duration = Duration::from_secs(6);

pub fn buckets(config: &Config) -> Vec<kv::Config> {
    vec![
        bucket(
            subjects::NODES_BUCKET,
            "message-id node leases",
            config.node_lease_ttl,
            config,
        ),
        bucket(
            subjects::CURSORS_BUCKET,
            "last acked cursor per device",
            // A cursor older than the inbox is useless; keep it a little longer
            // so the device learns `resumed:false` rather than starting at the head.
            config.inbox_max_age * 2,
            config,
        ),
        kv::Config {
            // One claim per send, kept for days: it gets its own bound.
            max_bytes: config.bounds.sent,
            ..bucket(
                subjects::SENT_BUCKET,
                "client_msg_id claims for idempotent sends",
                config.send_claim_max_age,
                config,
            )
        },
        bucket(
            subjects::PRESENCE_BUCKET,
            "status and last_active per user",
            Duration::ZERO,
            config,
        ),
        bucket(
            subjects::LEADERS_BUCKET,
            "leader leases of hot-standby services",
            LEADER_LEASE_TTL,
            config,
        ),
        bucket(
            subjects::EDGES_BUCKET,
            "live edges for discovery",
            config.edge_ttl,
            config,
        ),
        // Bans and revocations last until an operator lifts them; a ban with
        // an end stays as an inert record after it (one key per user).
        bucket(
            subjects::MODERATION_BUCKET,
            "bans and token revocations per user",
            Duration::ZERO,
            config,
        ),
        // Rewritten whole on each registration; kept as long as the tokens.
        bucket(
            subjects::PUSH_DEVICES_BUCKET,
            "devices with a push token per user",
            Duration::ZERO,
            config,
        ),
        // Written once by the first persister (kept forever): one map of a
        // few KB, so it reserves 1 MiB, not a bucket's share of the disk.
        kv::Config {
            max_bytes: SHARDS_BUCKET_MAX_BYTES,
            ..bucket(
                subjects::SHARDS_BUCKET,
                "which PostgreSQL shard holds each hash bucket",
                Duration::ZERO,
                config,
            )
        },
    ]
}

/// Every stream, in the order they are applied: each partition of
/// MESSAGES and INBOX, then the rest.
pub fn all_streams(config: &Config) -> Vec<stream::Config> {
    let partitions = config.partitions.all();
    let mut all: Vec<stream::Config> = partitions
        .flat_map(|p| [messages(config, p), inbox(config, p)])
        .collect();
    all.extend([
        push(config),
        events(config),
        receipts(config),
        deadletter(config),
        audit(config),
        quotas(config),
        media(config),
        media_jobs(config),
    ]);
    all
}

/// Creates every stream and bucket that is missing and updates those whose
/// definition changed. Safe to run concurrently from many processes. One
/// that exists as defined is left alone: an update is a cluster-wide
/// proposal that a replicated stream refuses while one of its peers is
/// offline ("no suitable peers for placement"), so a service starting
/// while a node is down must not ask for one it does not need.
pub async fn apply(js: &jetstream::Context, config: &Config) -> Result<(), ProvisionError> {
    for definition in all_streams(config) {
        if unchanged(js, &definition).await? {
            continue;
        }
        let name = definition.name.clone();
        tracing::info!(stream = %name, "creating or updating the stream");
        js.create_or_update_stream(definition)
            .await
            .map_err(|source| ProvisionError::Stream { name, source })?;
    }
    for definition in buckets(config) {
        let wanted = bucket_as_stream(&definition);
        if unchanged(js, &wanted).await? {
            continue;
        }
        let name = definition.bucket.clone();
        tracing::info!(bucket = %name, "creating or updating the bucket");
        js.create_or_update_key_value(definition)
            .await
            .map_err(|source| ProvisionError::Bucket { name, source })?;
    }
    Ok(())
}

/// Whether the stream `wanted.name` exists with every field of `wanted`
/// that we set; `false` when it is missing or differs (it gets created or
/// updated).
async fn unchanged(
    js: &jetstream::Context,
    wanted: &stream::Config,
) -> Result<bool, ProvisionError> {
    let name = &wanted.name;
    match js.get_stream(name).await {
        Ok(stream) => match drift(wanted, &stream.cached_info().config) {
            None => Ok(true),
            Some(field) => {
                tracing::info!(stream = %name, field, "the stream's definition changed");
                Ok(false)
            }
        },
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref error)
                    if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            Ok(false)
        }
        Err(source) => Err(ProvisionError::Read {
            name: name.clone(),
            source,
        }),
    }
}

/// Runs [`apply`] until it succeeds, waiting with backoff while JetStream
/// cannot do it (a node down or paused, no leader yet, no quorum): a
/// service that starts during an outage waits for the cluster instead of
/// exiting, and says what it waits for.
pub async fn provision(js: &jetstream::Context, config: &Config) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    let mut attempt = 1u32;
    while let Err(e) = apply(js, config).await {
        tracing::warn!(attempt, error = %e, "cannot provision the streams yet; retrying");
        attempt = attempt.saturating_add(1);
        backoff.wait().await;
    }
}

/// The KV stream a bucket definition becomes (`KV_<bucket>`), in the fields
/// [`drift`] compares; async-nats makes the rest of it.
fn bucket_as_stream(bucket: &kv::Config) -> stream::Config {
    stream::Config {
        name: format!("KV_{}", bucket.bucket),
        description: Some(bucket.description.clone()),
        subjects: vec![format!("$KV.{}.>", bucket.bucket)],
        max_messages_per_subject: bucket.history.max(1),
        max_bytes: bucket.max_bytes,
        max_age: bucket.max_age,
        storage: bucket.storage,
        num_replicas: bucket.num_replicas,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

/// The first field we set in `wanted` that `existing` (as the server
/// reports it) does not have; `None` when no update is needed. The server
/// writes "no limit" as -1 where we may leave 0, and picks a duplicate
/// window of its own when we set none.
pub fn drift(wanted: &stream::Config, existing: &stream::Config) -> Option<&'static str> {
    fn limit<T: Into<i64>>(value: T) -> i64 {
        let value = value.into();
        if value <= 0 {
            -1
        } else {
            value
        }
    }
    fn sorted(subjects: &[String]) -> Vec<&str> {
        let mut subjects: Vec<&str> = subjects.iter().map(String::as_str).collect();
        subjects.sort_unstable();
        subjects
    }
    let checks = [
        (
            "subjects",
            sorted(&wanted.subjects) == sorted(&existing.subjects),
        ),
        (
            "subject_transform",
            wanted.subject_transform == existing.subject_transform,
        ),
        ("storage", wanted.storage == existing.storage),
        (
            "num_replicas",
            wanted.num_replicas.max(1) == existing.num_replicas.max(1),
        ),
        ("retention", wanted.retention == existing.retention),
        ("discard", wanted.discard == existing.discard),
        (
            "max_bytes",
            limit(wanted.max_bytes) == limit(existing.max_bytes),
        ),
        (
            "max_messages",
            limit(wanted.max_messages) == limit(existing.max_messages),
        ),
        (
            "max_messages_per_subject",
            limit(wanted.max_messages_per_subject) == limit(existing.max_messages_per_subject),
        ),
        (
            "max_message_size",
            limit(wanted.max_message_size) == limit(existing.max_message_size),
        ),
        ("max_age", wanted.max_age == existing.max_age),
        (
            "duplicate_window",
            wanted.duplicate_window.is_zero()
                || wanted.duplicate_window == existing.duplicate_window,
        ),
        ("allow_direct", wanted.allow_direct == existing.allow_direct),
        (
            "allow_message_counter",
            wanted.allow_message_counter == existing.allow_message_counter,
        ),
        (
            "description",
            wanted.description.is_none() || wanted.description == existing.description,
        ),
    ];
    checks
        .into_iter()
        .find(|(_, same)| !same)
        .map(|(field, _)| field)
}

/// Waits until every stream and bucket exists, for services whose NATS user
/// may not create them (the edge): the router and persister provision them.
pub async fn wait_until_provisioned(js: &jetstream::Context, config: &Config) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let mut missing = None;
        for definition in all_streams(config) {
            if js.get_stream(&definition.name).await.is_err() {
                missing = Some(definition.name);
                break;
            }
        }
        if missing.is_none() {
            for bucket in buckets(config) {
                if js.get_key_value(&bucket.bucket).await.is_err() {
                    missing = Some(bucket.bucket);
                    break;
                }
            }
        }
        let Some(missing) = missing else { return };
        tracing::info!(%missing, "waiting for the streams to be provisioned");
        backoff.wait().await;
    }
}

/// How many times a consumer is given one event before JetStream gives up
/// on it (advisory `MAX_DELIVERIES`, and the persister copies it to
/// `chat.dead.<consumer>`). Not small: a shutdown's hand-back, an ack lost
/// to a NATS restart and a killed process's ack wait each count as a
/// delivery, while failures a service can wait out (a database or a
/// persister that is away) are retried in place with in-progress acks and
/// do not count. Twenty redeliveries of one event without a success is a
/// poison event, not bad luck.
pub const MAX_DELIVER: i64 = 20;

/// The router's consumer on MESSAGES. One client is pinned at a time (a
/// priority group), so several router processes never reorder a
/// conversation; the others wait as hot standbys.
pub fn router_consumer() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(subjects::ROUTER_CONSUMER.into()),
        description: Some("fan-out into inboxes".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 10_000,
        max_deliver: MAX_DELIVER,
        priority_policy: consumer::PriorityPolicy::PinnedClient,
        priority_groups: vec![subjects::ROUTER_PRIORITY_GROUP.into()],
        priority_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

/// The router's consumer on EVENTS (membership changes), pinned likewise.
pub fn router_events_consumer() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(subjects::ROUTER_EVENTS_CONSUMER.into()),
        name: None,
        ..router_consumer()
    }
}

/// The router's consumer on RECEIPTS, pinned likewise. An event is acked
/// once its coalesced receipt is in the inboxes, which is at most a
/// coalescing window (a second) after it arrives.
pub fn router_receipts_consumer() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(subjects::ROUTER_RECEIPTS_CONSUMER.into()),
        name: None,
        ..router_consumer()
    }
}

/// The persister's consumer on RECEIPTS: delivered watermarks only (read
/// state is stored before its event is published).
pub fn persister_receipts_consumer() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(subjects::PERSISTER_RECEIPTS_CONSUMER.into()),
        description: Some("delivered watermarks".into()),
        filter_subject: subjects::DELIVERED_RECEIPTS.into(),
        ..persister_consumer()
    }
}

/// pushd's consumer on PUSH. A job is acked once every provider accepted it
/// or failed for good; meanwhile (coalescing, retrying) pushd sends an
/// in-progress ack every `ack_wait / 3`. So `ack_wait` only runs out for a
/// pushd that is gone, and is short so that its jobs go to the next pushd
/// within seconds.
pub fn pushd_consumer() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(subjects::PUSHD_CONSUMER.into()),
        description: Some("push notification sender".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(10),
        max_ack_pending: 10_000,
        max_deliver: MAX_DELIVER,
        ..Default::default()
    }
}

/// The persister's consumer on MESSAGES.
pub fn persister_consumer() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(subjects::PERSISTER_CONSUMER.into()),
        description: Some("history writer".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 20_000,
        max_deliver: MAX_DELIVER,
        ..Default::default()
    }
}

/// The persister's thumbnailer on MEDIA_JOBS. A job that fails
/// (an undecodable or too large image) is acked, not retried: the few
/// deliveries allow for a worker that died mid-job, never for a bomb.
pub fn thumbnailer_consumer() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(subjects::THUMBNAILER_CONSUMER.into()),
        description: Some("thumbnails of stored images".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(60),
        max_ack_pending: 64,
        max_deliver: 3,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partitions::Partitions;

    /// The one partition of an unsplit deployment.
    fn only() -> Partition {
        Partitions::default().all().next().unwrap()
    }

    #[test]
    fn dedup_window_is_at_least_ten_minutes_by_default() {
        let config = Config::default();
        for definition in [
            messages(&config, only()),
            inbox(&config, only()),
            events(&config),
            receipts(&config),
            deadletter(&config),
        ] {
            assert!(
                definition.duplicate_window >= Duration::from_secs(600),
                "{}",
                definition.name
            );
            assert!(definition.allow_direct);
        }
        assert_eq!(push(&config).retention, stream::RetentionPolicy::WorkQueue);
    }

    #[test]
    fn every_backend_consumer_gives_up_eventually_and_dead_letters_stay() {
        for consumer in [
            router_consumer(),
            router_events_consumer(),
            router_receipts_consumer(),
            persister_consumer(),
            persister_receipts_consumer(),
            pushd_consumer(),
        ] {
            assert_eq!(consumer.max_deliver, MAX_DELIVER);
        }
        let config = Config::default();
        let dead = deadletter(&config);
        assert_eq!(dead.max_age, Duration::ZERO);
        assert_eq!(dead.storage, stream::StorageType::File);
        assert_eq!(dead.subjects, ["chat.dead.>"]);
        assert!(all_streams(&config).iter().any(|s| s.name == "DEADLETTER"));
    }

    /// A definition as the server reports it back: "no limit" as -1, a
    /// duplicate window of its own where none was set.
    fn as_reported(mut config: stream::Config) -> stream::Config {
        for limit in [
            &mut config.max_messages,
            &mut config.max_messages_per_subject,
        ] {
            if *limit == 0 {
                *limit = -1;
            }
        }
        if config.max_message_size == 0 {
            config.max_message_size = -1;
        }
        if config.duplicate_window.is_zero() {
            config.duplicate_window = Duration::from_secs(120);
        }
        config.subjects.reverse();
        config
    }

    #[test]
    fn a_stream_as_defined_needs_no_update() {
        let config = Config::default();
        for wanted in all_streams(&config) {
            assert_eq!(
                drift(&wanted, &as_reported(wanted.clone())),
                None,
                "{}",
                wanted.name
            );
        }
        for bucket in buckets(&config) {
            let wanted = bucket_as_stream(&bucket);
            assert_eq!(
                drift(&wanted, &as_reported(wanted.clone())),
                None,
                "{}",
                wanted.name
            );
        }
    }

    #[test]
    fn each_field_we_set_is_compared() {
        let config = Config::default();
        let wanted = inbox(&config, only());
        type Change = fn(&mut stream::Config);
        let changed: [(&str, Change); 15] = [
            ("subjects", |c| c.subjects.push("chat.other.>".into())),
            ("subject_transform", |c| {
                c.subject_transform = Some(stream::SubjectTransform {
                    source: "chat.inbox.1.>".into(),
                    destination: "chat.inbox.>".into(),
                })
            }),
            ("storage", |c| c.storage = stream::StorageType::Memory),
            ("num_replicas", |c| c.num_replicas = 3),
            ("retention", |c| {
                c.retention = stream::RetentionPolicy::WorkQueue
            }),
            ("discard", |c| c.discard = stream::DiscardPolicy::New),
            ("max_bytes", |c| c.max_bytes += 1),
            ("max_messages", |c| c.max_messages = 5),
            ("max_messages_per_subject", |c| {
                c.max_messages_per_subject += 1
            }),
            ("max_message_size", |c| c.max_message_size = 10),
            ("max_age", |c| c.max_age += Duration::from_secs(1)),
            ("duplicate_window", |c| {
                c.duplicate_window += Duration::from_secs(1)
            }),
            ("allow_direct", |c| c.allow_direct = false),
            ("allow_message_counter", |c| c.allow_message_counter = true),
            ("description", |c| c.description = Some("another".into())),
        ];
        for (field, change) in changed {
            let mut existing = as_reported(wanted.clone());
            change(&mut existing);
            assert_eq!(drift(&wanted, &existing), Some(field));
        }
        // What we leave to the server is not compared.
        let mut existing = as_reported(wanted.clone());
        existing.max_consumers = 7;
        existing.compression = Some(stream::Compression::S2);
        assert_eq!(drift(&wanted, &existing), None);
    }

    #[test]
    fn partitions_split_messages_and_inbox_and_their_bounds() {
        let config = Config {
            partitions: Partitions::new(3).unwrap(),
            ..Config::default()
        };
        let names: Vec<String> = all_streams(&config).into_iter().map(|s| s.name).collect();
        for name in [
            "MESSAGES_0",
            "INBOX_0",
            "MESSAGES_1",
            "INBOX_1",
            "MESSAGES_2",
            "INBOX_2",
            "PUSH",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
        }
        assert!(!names.iter().any(|n| n == "MESSAGES" || n == "INBOX"));
        let second = config.partitions.all().nth(1).unwrap();
        let inbox = inbox(&config, second);
        assert_eq!(inbox.subjects, ["chat.inbox.1.*"]);
        assert_eq!(
            inbox
                .subject_transform
                .as_ref()
                .map(|t| t.destination.as_str()),
            Some("chat.inbox.>")
        );
        assert_eq!(inbox.max_bytes, config.bounds.inbox / 3);
        assert_eq!(
            inbox.max_messages_per_subject, config.bounds.inbox_items_per_user,
            "the cap is per user, whatever the partition"
        );
        assert_eq!(
            messages(&config, second).max_bytes,
            config.bounds.messages / 3
        );
        // Unsplit, nothing is transformed.
        assert!(all_streams(&Config::default())
            .iter()
            .all(|s| s.subject_transform.is_none()));
    }

    #[test]
    fn every_stream_and_bucket_is_bounded_in_bytes() {
        let config = Config::default();
        for stream in all_streams(&config) {
            assert!(stream.max_bytes > 0, "{}", stream.name);
        }
        for bucket in buckets(&config) {
            assert!(bucket.max_bytes > 0, "{}", bucket.bucket);
        }
        // The log of record refuses rather than drops; the inbox cache drops
        // the oldest, and per user.
        assert_eq!(
            messages(&config, only()).discard,
            stream::DiscardPolicy::New
        );
        assert_eq!(inbox(&config, only()).discard, stream::DiscardPolicy::Old);
        assert!(inbox(&config, only()).max_messages_per_subject > 0);
        let quotas = quotas(&config);
        assert!(quotas.allow_message_counter);
        assert!(quotas.max_age > Duration::from_secs(24 * 3600));
    }
}
