//! Services as child processes (`src/bin/service-under-test.rs`), for tests
//! that kill or stop them.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chat_shared::Config;
use tokio::io::AsyncBufReadExt;

use crate::{http_get, wait_until, JWT_SECRET, WAIT};

/// A service a test can run as its own process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Edge,
    Router,
    Persister,
    Presence,
    Pushd,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Service::Edge => "edge",
            Service::Router => "router",
            Service::Persister => "persister",
            Service::Presence => "presence",
            Service::Pushd => "pushd",
        }
    }
}

/// The environment that gives a service process `config` (the settings the
/// tests change; everything else keeps its default).
fn environment(config: &Config) -> Vec<(&'static str, String)> {
    let millis = |d: Duration| d.as_millis().to_string();
    let secs = |d: Duration| d.as_secs().to_string();
    let bounds = config
        .bounds
        .settings()
        .map(|(name, bytes)| (name, bytes.to_string()));
    let mut environment = vec![
        ("CHAT_NATS_URL", config.nats_url.clone()),
        (
            "CHAT_NATS_USER",
            config.nats_user.clone().unwrap_or_default(),
        ),
        (
            "CHAT_NATS_PASSWORD",
            config.nats_password.clone().unwrap_or_default(),
        ),
        ("CHAT_DEV", config.dev.to_string()),
        ("CHAT_DATABASE_URLS", config.database_urls.join(",")),
        ("CHAT_DATABASE_POOL", config.database_pool_size.to_string()),
        ("CHAT_JWT_SECRET", JWT_SECRET.into()),
        ("CHAT_EDGE_ADDR", "127.0.0.1:0".into()),
        ("CHAT_STREAM_REPLICAS", config.stream_replicas.to_string()),
        ("CHAT_PARTITIONS", config.partitions.count().to_string()),
        ("CHAT_REQUEST_TIMEOUT_MS", millis(config.request_timeout)),
        ("CHAT_SHUTDOWN_GRACE_MS", millis(config.shutdown_grace)),
        (
            "CHAT_PRESENCE_HEARTBEAT_MS",
            millis(config.presence_heartbeat),
        ),
        ("CHAT_PRESENCE_TIMEOUT_MS", millis(config.presence_timeout)),
        (
            "CHAT_PRESENCE_DEBOUNCE_MS",
            millis(config.presence_debounce),
        ),
        ("CHAT_HEARTBEAT_SECS", secs(config.heartbeat)),
        ("CHAT_HEARTBEAT_GRACE_SECS", secs(config.heartbeat_grace)),
        ("CHAT_EDGE_TTL_MS", millis(config.edge_ttl)),
        ("CHAT_DRAIN_TIMEOUT_SECS", secs(config.drain_timeout)),
        ("CHAT_JWT_LEEWAY_SECS", secs(config.jwt_leeway)),
        (
            "CHAT_LIMIT_SEND_PER_SEC",
            config.limits.send_per_connection.to_string(),
        ),
        (
            "CHAT_LIMIT_USER_SEND_PER_SEC",
            config.limits.send_per_user.to_string(),
        ),
        (
            "CHAT_LIMIT_REQUESTS_PER_SEC",
            config.limits.requests_per_connection.to_string(),
        ),
        (
            "CHAT_LIMIT_CONNECTS_PER_IP_PER_SEC",
            config.limits.connects_per_ip.to_string(),
        ),
        (
            "CHAT_LIMIT_DISCOVERY_PER_IP_PER_SEC",
            config.edge_net.discovery_per_ip.to_string(),
        ),
        ("RUST_LOG", "warn".into()),
    ];
    environment.extend(bounds);
    environment
}

/// A service in its own process; dropping it kills the process.
pub struct ServiceProcess {
    child: tokio::process::Child,
    pub service: Service,
    /// The edge's address; for the other services, where `/metrics` is.
    pub addr: SocketAddr,
}

impl ServiceProcess {
    /// Starts `service` from `binary` (pass
    /// `env!("CARGO_BIN_EXE_service-under-test")`: only integration tests
    /// know the path) and waits until it serves HTTP.
    pub async fn spawn(binary: &str, service: Service, config: &Config) -> Result<Self> {
        let mut command = tokio::process::Command::new(binary);
        command
            .arg(service.name())
            .env_clear()
            .envs(environment(config))
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {} ({binary})", service.name()))?;
        let stdout = child.stdout.take().context("service stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .context("service process did not start in time")??
            .context("service process exited before listening")?;
        let addr = line
            .strip_prefix("listening ")
            .context("unexpected service output")?
            .parse()?;
        let probe = if service == Service::Edge {
            "/readyz"
        } else {
            "/metrics"
        };
        wait_until(|| async {
            http_get(addr, probe)
                .await
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
        })
        .await?;
        Ok(Self {
            child,
            service,
            addr,
        })
    }

    fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.child.id().context("the process already exited")?;
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill {signal} {pid} failed");
        }
        Ok(())
    }

    /// SIGTERM, as an orchestrator stops a pod: the service shuts down
    /// gracefully (an edge drains).
    pub fn terminate(&self) -> Result<()> {
        self.signal("-TERM")
    }

    /// Waits for the process to exit; its exit code.
    pub async fn wait(&mut self, within: Duration) -> Result<Option<i32>> {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .context("the process did not exit in time")??;
        Ok(status.code())
    }

    /// Resident memory of the process, from /proc.
    pub fn rss_bytes(&self) -> Result<u64> {
        let pid = self.child.id().context("the process exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .context("no VmRSS")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kib * 1024)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `kill -9`: no close frames, no disconnect reports, no acks. Fails
    /// unless the process was running and died of that SIGKILL, so a
    /// fault schedule cannot "kill" a process that had already crashed.
    pub async fn kill(&mut self) -> Result<()> {
        use std::os::unix::process::ExitStatusExt;
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} had already exited ({status}) when it was to be killed",
                self.service.name()
            );
        }
        self.child.start_kill()?;
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .context("the killed process did not exit in time")??;
        if status.signal() != Some(9) {
            bail!(
                "{} exited with {status}, not by the SIGKILL",
                self.service.name()
            );
        }
        Ok(())
    }
}
