//! An ejabberd of our own for `chatctl bench --peer ejabberd`: Debian's
//! package (`apt-get install ejabberd`), run as a child `erl` with a
//! generated `ejabberd.yml` in a temporary directory (Mnesia, logs and
//! config all there), listening for c2s on a free loopback port. Killed and
//! its directory removed on drop.
//!
//! The VM runs without Erlang distribution (no `-sname`), so no epmd is
//! started and nothing outlives the child. Debian's service is never used.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::xmpp::MUC_DOMAIN;

/// How long ejabberd may take to listen (about 2 s here).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running ejabberd.
pub struct Ejabberd {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
    version: String,
    mam: bool,
}

impl Ejabberd {
    /// Starts ejabberd with message archiving (`mod_mam`, for chats and
    /// rooms) on or off and waits until its c2s port accepts connections.
    pub async fn start(mam: bool) -> anyhow::Result<Self> {
        let (libs, version) = find_ejabberd()?;
        let erl = std::env::var("CHAT_ERL").unwrap_or_else(|_| "erl".into());
        let dir = std::env::temp_dir().join(format!(
            "chatctl-ejabberd-{:016x}",
            crate::client::unique_u64()
        ));
        std::fs::create_dir_all(dir.join("spool"))
            .with_context(|| format!("creating {}", dir.display()))?;
        // Free now; ejabberd binds it a moment later (a small race that the
        // readiness check below would report).
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port")?
            .port();
        let config = dir.join("ejabberd.yml");
        std::fs::write(&config, config_yaml(port, mam))
            .with_context(|| format!("writing {}", config.display()))?;
        let log = std::fs::File::create(dir.join("erl.log")).context("creating erl.log")?;
        let child = Command::new(&erl)
            .args(["-noinput", "+K", "true", "+P", "1000000"])
            .arg("-mnesia")
            .arg("dir")
            .arg(format!("\"{}\"", dir.join("spool").display()))
            .args(["-s", "ejabberd"])
            .env("EJABBERD_CONFIG_PATH", &config)
            .env("EJABBERD_LOG_PATH", dir.join("ejabberd.log"))
            .env("ERL_CRASH_DUMP", dir.join("erl_crash.dump"))
            .env("ERL_LIBS", &libs)
            .env("HOME", &dir)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cloning the log handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!("starting {erl} (is ejabberd installed? apt-get install ejabberd)")
            })?;
        let mut server = Self {
            child,
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            version,
            mam,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    /// The c2s address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// As its code directory is named: `23.01` for Debian bookworm's package.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn mam(&self) -> bool {
        self.mam
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "ejabberd exited ({status}) during start-up:\n{}",
                    self.log_tail()
                );
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "ejabberd not listening on {} after {START_TIMEOUT:?}:\n{}",
                    self.addr,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of the VM's output and of ejabberd's log.
    fn log_tail(&self) -> String {
        ["erl.log", "ejabberd.log"]
            .iter()
            .map(|name| {
                let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                format!("--- {name}\n{tail}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Ejabberd {
    fn drop(&mut self) {
        // SIGKILL: the state is thrown away with the directory, so there
        // is nothing for a graceful stop to save. `erl` execs the VM, so
        // this is the VM's pid; its port helper exits with it.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Debian installs ejabberd's code as `/usr/lib/<triplet>/ejabberd-<version>`
/// (`ERL_LIBS` is that directory's parent); `CHAT_EJABBERD_LIBS` overrides.
fn find_ejabberd() -> anyhow::Result<(PathBuf, String)> {
    let candidates: Vec<PathBuf> = match std::env::var_os("CHAT_EJABBERD_LIBS") {
        Some(dir) => vec![PathBuf::from(dir)],
        None => std::fs::read_dir("/usr/lib")
            .map(|entries| {
                let mut dirs: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_dir())
                    .collect();
                dirs.push(PathBuf::from("/usr/lib"));
                dirs
            })
            .unwrap_or_default(),
    };
    for libs in candidates {
        if let Some(version) = ejabberd_in(&libs) {
            return Ok((libs, version));
        }
    }
    bail!("ejabberd not found under /usr/lib/*/ejabberd-*/ (apt-get install ejabberd, or set CHAT_EJABBERD_LIBS)")
}

fn ejabberd_in(libs: &Path) -> Option<String> {
    std::fs::read_dir(libs).ok()?.find_map(|entry| {
        let entry = entry.ok()?;
        let name = entry.file_name().into_string().ok()?;
        let version = name.strip_prefix("ejabberd-")?;
        entry
            .path()
            .join("ebin/ejabberd.app")
            .is_file()
            .then(|| version.to_owned())
    })
}

/// The whole configuration: loopback only, anonymous SASL, no traffic
/// shaping or queue limits that would throttle a benchmark, MUC, and MAM
/// (ejabberd's default Mnesia backend) for chats and rooms when asked.
fn config_yaml(port: u16, mam: bool) -> String {
    let mam_module = if mam {
        "  mod_mam:\n    db_type: mnesia\n    default: always\n"
    } else {
        ""
    };
    format!(
        r#"hosts: [localhost]
loglevel: warning
auth_method: [anonymous]
anonymous_protocol: sasl_anon
allow_multiple_connections: true
default_db: mnesia
certfiles: []
max_fsm_queue: 10000000
shaper_rules:
  c2s_shaper: none
access_rules:
  c2s:
    allow: all
listen:
  - port: {port}
    ip: "127.0.0.1"
    module: ejabberd_c2s
    shaper: none
    access: c2s
    backlog: 4096
    max_stanza_size: 1048576
    max_fsm_queue: 10000000
modules:
  mod_disco: {{}}
  mod_stream_mgmt:
    max_ack_queue: infinity
    ack_timeout: infinity
  mod_muc:
    host: "{MUC_DOMAIN}"
    access: all
    access_create: all
    max_users: 100000
    max_user_conferences: 100000
    history_size: 0
    min_message_interval: 0
    min_presence_interval: 0
    default_room_options:
      max_users: 100000
      mam: {mam}
{mam_module}"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mam_is_loaded_only_when_asked() {
        assert!(config_yaml(5222, true).contains("  mod_mam:\n"));
        assert!(config_yaml(5222, true).contains("      mam: true\n"));
        assert!(!config_yaml(5222, false).contains("mod_mam"));
        assert!(config_yaml(5222, false).contains("      mam: false\n"));
        assert!(config_yaml(15222, false).contains("  - port: 15222\n"));
    }
}
