//! An ejabberd of our own for `chatctl bench --peer ejabberd`: Debian's
//! package (`apt-get install ejabberd`), run as a child `erl` with a
//! generated `ejabberd.yml` in a temporary directory (Mnesia, logs and
//! config all there), listening for c2s on a free loopback port. Killed and
//! its directory removed on drop.
//!
//! Its message archive (`mod_mam`) is off, in Mnesia, or in PostgreSQL
//! ([`Archive::Sql`]): then a database of its own is created on the
//! server the given URL names (ours: both sides persist to the same
//! PostgreSQL), loaded with Debian's schema (`/usr/share/ejabberd/sql/
//! pg.sql`) through `psql`, reached through the pure-Erlang driver of
//! `erlang-p1-pgsql` (only suggested by the ejabberd package:
//! scripts/lib.sh installs it), and dropped on drop.
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
/// Debian's PostgreSQL schema for ejabberd's default ("old", one host)
/// SQL layout; `CHAT_EJABBERD_PG_SCHEMA` overrides.
const PG_SCHEMA: &str = "/usr/share/ejabberd/sql/pg.sql";

/// Where ejabberd keeps its message archive (`mod_mam`, chats and rooms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Archive {
    Off,
    /// ejabberd's default backend.
    Mnesia,
    /// A fresh database on the PostgreSQL server of this URL
    /// (`postgres://user[:password]@host[:port]/database`; the database
    /// named is where `CREATE DATABASE` runs).
    Sql {
        server: String,
    },
}

impl Archive {
    pub fn is_on(&self) -> bool {
        !matches!(self, Self::Off)
    }
}

/// A PostgreSQL URL taken apart for ejabberd's `sql_*` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgUrl {
    pub user: String,
    pub password: String,
    pub host: String,
    pub port: u16,
    pub database: String,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PgUrlError {
    #[error("`{0}`: expected postgres://user[:password]@host[:port]/database")]
    Shape(String),
    #[error("`{0}`: percent-encoded parts are not supported here")]
    Encoded(String),
    #[error("`{0}`: bad port")]
    Port(String),
}

impl std::str::FromStr for PgUrl {
    type Err = PgUrlError;

    fn from_str(url: &str) -> Result<Self, PgUrlError> {
        let shape = || PgUrlError::Shape(url.to_string());
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(shape)?;
        // Query parameters (sslmode, ...) do not concern a loopback bench.
        let rest = rest.split('?').next().unwrap_or(rest);
        if rest.contains('%') {
            return Err(PgUrlError::Encoded(url.to_string()));
        }
        let (userinfo, rest) = rest.rsplit_once('@').ok_or_else(shape)?;
        let (hostport, database) = rest.split_once('/').ok_or_else(shape)?;
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse()
                    .map_err(|_| PgUrlError::Port(url.to_string()))?,
            ),
            None => (hostport, 5432),
        };
        if [user, host, database].iter().any(|part| part.is_empty()) {
            return Err(shape());
        }
        Ok(Self {
            user: user.to_string(),
            password: password.to_string(),
            host: host.to_string(),
            port,
            database: database.to_string(),
        })
    }
}

impl PgUrl {
    /// The same server, another database.
    fn with_database(&self, database: &str) -> Self {
        Self {
            database: database.to_string(),
            ..self.clone()
        }
    }

    /// `psql` against this database, quiet, stopping at the first error.
    fn psql(&self) -> Command {
        let bin = std::env::var_os("PG_BINDIR")
            .map(|dir| PathBuf::from(dir).join("psql"))
            .filter(|psql| psql.is_file())
            .unwrap_or_else(|| PathBuf::from("psql"));
        let mut psql = Command::new(bin);
        psql.args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", &self.host, "-p", &self.port.to_string()])
            .args(["-U", &self.user, "-d", &self.database])
            .env("PGPASSWORD", &self.password)
            .stdin(Stdio::null());
        psql
    }
}

/// Runs `psql` and fails with its output if it does.
fn run_psql(mut psql: Command, what: &str) -> anyhow::Result<()> {
    let out = psql
        .output()
        .with_context(|| format!("{what}: running psql (PostgreSQL's client; PG_BINDIR)"))?;
    if !out.status.success() {
        bail!(
            "{what}: psql failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The archive's own database while ejabberd runs; dropped after it.
struct SqlArchive {
    /// Where `CREATE/DROP DATABASE` run.
    admin: PgUrl,
    /// The archive's database.
    db: PgUrl,
}

impl SqlArchive {
    fn create(server: &str) -> anyhow::Result<Self> {
        let admin: PgUrl = server.parse()?;
        let name = format!("chatctl_ejabberd_{:016x}", crate::client::unique_u64());
        let db = admin.with_database(&name);
        let mut create = admin.psql();
        create.args(["-c", &format!("CREATE DATABASE {name}")]);
        run_psql(create, "creating ejabberd's archive database")?;
        let archive = Self { admin, db };
        let schema = std::env::var("CHAT_EJABBERD_PG_SCHEMA").unwrap_or_else(|_| PG_SCHEMA.into());
        let mut load = archive.db.psql();
        load.args(["-f", &schema]);
        // On failure `archive` drops here, and the database with it.
        run_psql(load, &format!("loading {schema}"))?;
        Ok(archive)
    }
}

impl Drop for SqlArchive {
    fn drop(&mut self) {
        // FORCE: a pool connection of a just-killed ejabberd may linger.
        let mut drop = self.admin.psql();
        drop.args([
            "-c",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db.database),
        ]);
        if let Err(e) = run_psql(drop, "dropping ejabberd's archive database") {
            eprintln!("{e:#}");
        }
    }
}

/// A running ejabberd.
pub struct Ejabberd {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
    version: String,
    archive: Archive,
    /// Dropped after the child is killed (see `Drop`).
    sql: Option<SqlArchive>,
}

impl Ejabberd {
    /// Starts ejabberd with its message archive (`mod_mam`, for chats and
    /// rooms) off, in Mnesia or in PostgreSQL and waits until its c2s port
    /// accepts connections.
    pub async fn start(archive: Archive) -> anyhow::Result<Self> {
        let (libs, version) = find_ejabberd()?;
        let sql = match &archive {
            Archive::Sql { server } => Some(SqlArchive::create(server)?),
            Archive::Off | Archive::Mnesia => None,
        };
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
        std::fs::write(
            &config,
            config_yaml(port, sql.as_ref().map(|s| &s.db), archive.is_on()),
        )
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
            archive,
            sql,
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

    pub fn archive(&self) -> &Archive {
        &self.archive
    }

    /// The archive's PostgreSQL database, with [`Archive::Sql`].
    pub fn archive_database(&self) -> Option<&PgUrl> {
        self.sql.as_ref().map(|sql| &sql.db)
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
        // Only now that nothing is connected to it.
        drop(self.sql.take());
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
/// for chats and rooms when asked: in `sql`'s database (ejabberd's
/// default SQL layout, `new_sql_schema: false`, which `pg.sql` creates),
/// else in Mnesia. Everything else stays in Mnesia.
fn config_yaml(port: u16, sql: Option<&PgUrl>, mam: bool) -> String {
    let (db_type, sql_settings) = match sql {
        Some(db) => (
            "sql",
            format!(
                "sql_type: pgsql\nsql_server: \"{}\"\nsql_port: {}\nsql_database: \"{}\"\nsql_username: \"{}\"\nsql_password: \"{}\"\nnew_sql_schema: false\n",
                db.host, db.port, db.database, db.user, db.password
            ),
        ),
        None => ("mnesia", String::new()),
    };
    let mam_module = if mam {
        format!("  mod_mam:\n    db_type: {db_type}\n    default: always\n")
    } else {
        String::new()
    };
    format!(
        r#"{sql_settings}hosts: [localhost]
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
        assert!(config_yaml(5222, None, true).contains("  mod_mam:\n    db_type: mnesia\n"));
        assert!(config_yaml(5222, None, true).contains("      mam: true\n"));
        assert!(!config_yaml(5222, None, false).contains("mod_mam"));
        assert!(config_yaml(5222, None, false).contains("      mam: false\n"));
        assert!(config_yaml(15222, None, false).contains("  - port: 15222\n"));
        assert!(!config_yaml(5222, None, true).contains("sql_"));
    }

    #[test]
    fn an_sql_archive_names_its_database() {
        let db: PgUrl = "postgres://chat@127.0.0.1:5433/chatctl_ejabberd_1"
            .parse()
            .unwrap();
        let yaml = config_yaml(5222, Some(&db), true);
        assert!(yaml.contains("  mod_mam:\n    db_type: sql\n"), "{yaml}");
        for line in [
            "sql_type: pgsql\n",
            "sql_server: \"127.0.0.1\"\n",
            "sql_port: 5433\n",
            "sql_database: \"chatctl_ejabberd_1\"\n",
            "sql_username: \"chat\"\n",
            "sql_password: \"\"\n",
            "default_db: mnesia\n",
        ] {
            assert!(yaml.contains(line), "{line} in {yaml}");
        }
    }

    #[test]
    fn postgres_urls_are_taken_apart() {
        let url: PgUrl = "postgres://chat:pw@127.0.0.1:5433/chat?sslmode=disable"
            .parse()
            .unwrap();
        assert_eq!(
            url,
            PgUrl {
                user: "chat".into(),
                password: "pw".into(),
                host: "127.0.0.1".into(),
                port: 5433,
                database: "chat".into()
            }
        );
        let plain: PgUrl = "postgresql://u@db/x".parse().unwrap();
        assert_eq!((plain.port, plain.password.as_str()), (5432, ""));
        assert_eq!(url.with_database("other").database, "other");
        for bad in [
            "mysql://u@h/x",
            "postgres://h/x",
            "postgres://u@h",
            "postgres://u@h:x/d",
            "postgres://u@h/",
            "postgres://u%40x@h/d",
        ] {
            assert!(bad.parse::<PgUrl>().is_err(), "{bad}");
        }
    }
}
