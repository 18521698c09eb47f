//! PostgreSQL: one cluster per test process, a fresh database per call
//! ([`fresh_database`]).

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

use super::*;

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
/// A second cluster, for tests whose shards must be separate servers.
static PG_SECOND: OnceLock<std::result::Result<PgCluster, String>> = OnceLock::new();
static DB_COUNTER: AtomicU64 = AtomicU64::new(0);

impl PgCluster {
    /// The process-wide cluster, started on first use.
    pub async fn shared() -> Result<&'static PgCluster> {
        Self::started(&PG_CLUSTER).await
    }

    /// A second process-wide cluster (another server, port and data
    /// directory), started on first use: a shard that is really elsewhere.
    pub async fn second() -> Result<&'static PgCluster> {
        Self::started(&PG_SECOND).await
    }

    async fn started(
        cell: &'static OnceLock<std::result::Result<PgCluster, String>>,
    ) -> Result<&'static PgCluster> {
        tokio::task::spawn_blocking(move || {
            cell.get_or_init(|| PgCluster::start().map_err(|e| format!("{e:#}")))
                .as_ref()
                .map_err(|e| anyhow!("starting a test PostgreSQL cluster failed: {e}"))
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
    database_in(&admin_url).await
}

/// A new empty database in `cluster`.
pub async fn fresh_database_on(cluster: &PgCluster) -> Result<String> {
    database_in(&cluster.admin_url()).await
}

async fn database_in(admin_url: &str) -> Result<String> {
    let name = format!(
        "t_{}_{}_{}",
        std::process::id(),
        DB_COUNTER.fetch_add(1, Ordering::Relaxed),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let client = connect_with_retry(admin_url).await?;
    client
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .with_context(|| format!("CREATE DATABASE {name}"))?;
    with_database(admin_url, &name)
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
