//! NATS connection set-up shared by every service.

use std::time::Duration;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("CHAT_NATS_URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error(
        "nats-server {found} at {url} is older than {MIN_SERVER_VERSION}, the oldest this system runs on"
    )]
    ServerTooOld { url: String, found: String },
    #[error(
        "CHAT_NATS_PASSWORD of NATS user {user:?} is a dev password checked in to nats/users.conf: \
         set a secret of your own (and the same in the server's users.conf), or CHAT_DEV=true for a local run"
    )]
    DevPassword { user: String },
    #[error(
        "CHAT_NATS_USER {user:?}: only letters, digits, '-' and '_' (it names the inbox prefix)"
    )]
    BadUser { user: String },
}

/// `nats/users.conf`, compiled in: its `<USER>_PASSWORD = "..."` lines are
/// the checked-in dev passwords, which a service refuses outside a dev run
/// ([`Config::dev`]). One source of truth: scripts/lib.sh and the test
/// harness read the same lines.
const USERS_CONF: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../nats/users.conf"));

/// Every `(user, password)` of a `<USER>_PASSWORD = "..."` line of `conf`,
/// the user in lower case (comments, which mention that format, are not
/// such lines).
fn password_lines(conf: &str) -> impl Iterator<Item = (String, &str)> {
    conf.lines().filter_map(|line| {
        let (key, value) = line.trim().split_once('=')?;
        let user = key.trim().strip_suffix("_PASSWORD")?;
        if user.is_empty() || !user.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        let password = value.trim().strip_prefix('"')?.split('"').next()?;
        Some((user.to_ascii_lowercase(), password))
    })
}

/// The checked-in dev password of NATS user `user` (`edge`, `router`,
/// `persister`, `presence`, `pushd`, `admin`), if `nats/users.conf` has one.
pub fn dev_password(user: &str) -> Option<&'static str> {
    password_lines(USERS_CONF)
        .find(|(name, _)| name.eq_ignore_ascii_case(user))
        .map(|(_, password)| password)
}

fn is_dev_password(password: &str) -> bool {
    password_lines(USERS_CONF).any(|(_, dev)| dev == password)
}

/// The prefix of this user's reply subjects (`_INBOX_<user>`, or NATS's
/// `_INBOX` without a user). Each service's replies, PubAcks and consumer
/// deliveries arrive under its own prefix, so nats/users.conf can let each
/// user subscribe to its own inboxes only: a compromised edge cannot read
/// another service's replies or answer its requests (no prefix is under
/// another one or under `_INBOX.>`).
pub fn inbox_prefix(user: Option<&str>) -> Result<String, ConnectError> {
    match user {
        None => Ok("_INBOX".into()),
        Some(user)
            if !user.is_empty()
                && user
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
        {
            Ok(format!("_INBOX_{user}"))
        }
        Some(user) => Err(ConnectError::BadUser { user: user.into() }),
    }
}

/// The oldest nats-server accepted. JetStream releases before 2.14 lost
/// acknowledged writes in fault scenarios that later ones fixed (Jepsen's
/// NATS analyses); an older server is refused at start rather than trusted.
pub const MIN_SERVER_VERSION: &str = "2.14.0";

/// `major.minor.patch` of a version string like `2.15.1` or `2.14.0-beta.2`.
fn version_triple(version: &str) -> Option<(u64, u64, u64)> {
    let core = version.trim_start_matches('v').split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

fn check_server(client: &async_nats::Client, url: &str) -> Result<(), ConnectError> {
    let found = client.server_info().version;
    let too_old = match (version_triple(&found), version_triple(MIN_SERVER_VERSION)) {
        (Some(found), Some(minimum)) => found < minimum,
        _ => true,
    };
    if too_old {
        return Err(ConnectError::ServerTooOld {
            url: url.to_string(),
            found,
        });
    }
    Ok(())
}

/// What a process knows about its NATS connection, for those that must
/// notice lost core-NATS messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Link {
    pub connected: bool,
    /// Bumped whenever core messages may have been lost: after each
    /// reconnect, and when the server reported this client a slow consumer.
    pub gaps: u64,
}

/// [`connect`], also reporting the connection's [`Link`] as it changes.
pub async fn connect_watched(
    config: &Config,
    name: &str,
) -> Result<(async_nats::Client, tokio::sync::watch::Receiver<Link>), ConnectError> {
    let (tx, rx) = tokio::sync::watch::channel(Link {
        connected: true,
        gaps: 0,
    });
    let options = options(config, name)?.event_callback(move |event| {
        let tx = tx.clone();
        async move {
            match event {
                async_nats::Event::Disconnected => tx.send_modify(|link| link.connected = false),
                async_nats::Event::Connected => tx.send_modify(|link| {
                    link.connected = true;
                    link.gaps += 1;
                }),
                async_nats::Event::SlowConsumer(_) => tx.send_modify(|link| link.gaps += 1),
                _ => {}
            }
        }
    });
    Ok((open(options, config).await?, rx))
}

/// Connects as this service's NATS user. Reconnects are automatic and
/// unbounded; requests (and PubAcks) time out after `request_timeout`, so a
/// NATS outage turns into a fast `unavailable` instead of a hang.
pub async fn connect(config: &Config, name: &str) -> Result<async_nats::Client, ConnectError> {
    open(options(config, name)?, config).await
}

/// Connects with `options` and checks the server's version.
async fn open(
    options: async_nats::ConnectOptions,
    config: &Config,
) -> Result<async_nats::Client, ConnectError> {
    let client = options
        .connect(server_addrs(&config.nats_url)?)
        .await
        .map_err(|source| ConnectError::Connect {
            url: config.nats_url.clone(),
            source,
        })?;
    check_server(&client, &config.nats_url)?;
    Ok(client)
}

/// The servers of `CHAT_NATS_URL`: one URL or several, comma-separated
/// (the seed nodes of a cluster, so a service starts while any one of them
/// is up; the client learns the rest of the cluster from the server).
fn server_addrs(urls: &str) -> Result<Vec<async_nats::ServerAddr>, ConnectError> {
    let bad = |reason: String| ConnectError::BadUrl {
        url: urls.to_string(),
        reason,
    };
    let addrs = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| bad(format!("{url}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(bad("no server URL".into()));
    }
    Ok(addrs)
}

fn options(config: &Config, name: &str) -> Result<async_nats::ConnectOptions, ConnectError> {
    if let (Some(user), Some(password)) = (&config.nats_user, &config.nats_password) {
        if !config.dev && is_dev_password(password) {
            return Err(ConnectError::DevPassword { user: user.clone() });
        }
    }
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .custom_inbox_prefix(inbox_prefix(config.nats_user.as_deref())?)
        .request_timeout(Some(config.request_timeout))
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        // Published messages wait here while disconnected; bounded so an outage
        // cannot grow memory without limit.
        .client_capacity(65_536)
        .subscription_capacity(65_536);
    if let (Some(user), Some(password)) = (&config.nats_user, &config.nats_password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    Ok(options)
}

/// Sends what the client still buffers (acks, naks handing work back, last
/// publishes) before a service returns: dropping the client discards it,
/// and a nak that never left turns into a wait for the ack wait.
pub async fn flush_before_exit(client: &async_nats::Client, config: &Config) {
    match tokio::time::timeout(config.request_timeout, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not flush to NATS before exiting"),
        Err(_) => tracing::warn!("NATS flush timed out before exiting"),
    }
}

/// A JetStream context whose PubAck waits are bounded like requests.
pub fn jetstream(client: async_nats::Client, config: &Config) -> async_nats::jetstream::Context {
    let mut context = async_nats::jetstream::new(client);
    context.set_timeout(config.request_timeout);
    context
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_number() {
        assert_eq!(version_triple("2.15.1"), Some((2, 15, 1)));
        assert_eq!(version_triple("v2.14.0-beta.2"), Some((2, 14, 0)));
        assert_eq!(version_triple("2.10"), Some((2, 10, 0)));
        assert_eq!(version_triple("garbage"), None);
        assert!(version_triple("2.9.25") < version_triple(MIN_SERVER_VERSION));
        assert!(version_triple("2.14.0") >= version_triple(MIN_SERVER_VERSION));
        assert!(version_triple("3.0.0") > version_triple(MIN_SERVER_VERSION));
    }

    #[test]
    fn dev_passwords_come_from_users_conf() {
        for user in ["edge", "router", "persister", "presence", "pushd", "admin"] {
            let password = dev_password(user).unwrap();
            assert_eq!(password, format!("{user}-dev-password"));
            assert!(is_dev_password(password));
        }
        assert_eq!(dev_password("nobody"), None);
        assert!(!is_dev_password("a-real-secret"));
        // users.conf's comments quote the format; they are not passwords.
        assert!(!is_dev_password("..."));
    }

    #[test]
    fn users_conf_names_every_partition_stream() {
        // A partition's stream missing from a right shows only as a
        // timeout; users.conf spells them out up to the largest count.
        let partitions = crate::partitions::Partitions::new(crate::partitions::MAX_PARTITIONS)
            .unwrap_or_default();
        for partition in partitions.all() {
            let (inbox, messages) = (partition.inbox_stream(), partition.messages_stream());
            for right in [
                format!("$JS.API.DIRECT.GET.{inbox}.>"),
                format!("$JS.API.DIRECT.GET.{messages}.>"),
                format!("$JS.API.CONSUMER.CREATE.{messages}.>"),
                format!("$JS.API.STREAM.MSG.GET.{messages}"),
            ] {
                assert!(USERS_CONF.contains(&format!("\"{right}\"")), "{right}");
            }
        }
    }

    fn as_user(user: &str, password: &str, dev: bool) -> Config {
        Config {
            nats_user: Some(user.into()),
            nats_password: Some(password.into()),
            dev,
            ..Config::default()
        }
    }

    #[test]
    fn dev_passwords_are_refused_unless_chat_dev() {
        let dev = dev_password("router").unwrap();
        let refused = options(&as_user("router", dev, false), "router").unwrap_err();
        assert!(matches!(refused, ConnectError::DevPassword { .. }));
        assert!(refused.to_string().contains("CHAT_DEV=true"), "{refused}");
        // Another user's dev password is just as public.
        assert!(options(
            &as_user("router", dev_password("edge").unwrap(), false),
            "r"
        )
        .is_err());
        assert!(options(&as_user("router", dev, true), "router").is_ok());
        assert!(options(&as_user("router", "a-real-secret", false), "router").is_ok());
    }

    #[test]
    fn each_user_has_its_own_inbox_prefix() {
        assert_eq!(inbox_prefix(None).unwrap(), "_INBOX");
        assert_eq!(inbox_prefix(Some("edge")).unwrap(), "_INBOX_edge");
        assert_eq!(inbox_prefix(Some("push_d-2")).unwrap(), "_INBOX_push_d-2");
        for bad in ["", "a.b", "a*", ">", "a b"] {
            assert!(
                matches!(inbox_prefix(Some(bad)), Err(ConnectError::BadUser { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn nats_urls_are_one_or_a_comma_separated_list() {
        assert_eq!(server_addrs("nats://127.0.0.1:4222").unwrap().len(), 1);
        let cluster =
            server_addrs("nats://10.0.0.1:4222, nats://10.0.0.2:4222,nats://10.0.0.3:4222")
                .unwrap();
        assert_eq!(cluster.len(), 3);
        assert_eq!(cluster[1].port(), 4222);
        assert!(matches!(
            server_addrs(" , "),
            Err(ConnectError::BadUrl { .. })
        ));
        assert!(matches!(
            server_addrs("nats://a:4222,nats://b:notaport"),
            Err(ConnectError::BadUrl { .. })
        ));
    }
}
