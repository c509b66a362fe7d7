//! Process control of the local Postgres.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Pid, User};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tracing::Instrument;

use super::conf::{self, Upstream};
use super::marker::{JobMarker, Unfinished};
use super::run_as::RunAs;
use crate::config::PostgresConfig;
use crate::ha::{DataDir, PgRole, Progress};

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("postgres: {0}")]
    Sql(#[from] tokio_postgres::Error),
    /// A clone or rewind source could not be used; nothing was changed.
    #[error("the source is not usable yet: {0}")]
    SourceUnusable(String),
    #[error("{0}")]
    Other(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> PgError {
    let what = what.into();
    move |source| PgError::Io { what, source }
}

pub type Result<T> = std::result::Result<T, PgError>;

/// Owner of the local Postgres: its files, its process, its connection.
pub struct LocalPg {
    pub cfg: PostgresConfig,
    pub node: String,
    /// uid/gid Postgres runs as when the agent is root.
    run_as: RunAs,
    agent_os_user: String,
    child: Mutex<Option<Child>>,
    pub(super) client: Mutex<Option<tokio_postgres::Client>>,
    /// Progress of a running clone, shared with the status publisher.
    pub clone_progress: Arc<std::sync::Mutex<Option<Progress>>>,
    /// Cluster-wide parameters from the dynamic config (local ones win).
    dynamic_parameters: std::sync::Mutex<BTreeMap<String, String>>,
}

impl LocalPg {
    pub fn new(cfg: PostgresConfig, node: String) -> Result<LocalPg> {
        let euid = nix::unistd::geteuid();
        let agent_os_user = User::from_uid(euid)
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| euid.to_string());
        let run_as = RunAs::for_user(&cfg.os_user).map_err(PgError::Other)?;
        Ok(LocalPg {
            cfg,
            node,
            run_as,
            agent_os_user,
            child: Mutex::new(None),
            client: Mutex::new(None),
            clone_progress: Arc::new(std::sync::Mutex::new(None)),
            dynamic_parameters: std::sync::Mutex::new(BTreeMap::new()),
        })
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.cfg.bin_dir.join(name)
    }

    /// A command that runs as the Postgres OS user.
    fn command(&self, program: &str) -> Command {
        self.run_as.command(&self.bin(program))
    }

    fn chown(&self, path: &Path) -> Result<()> {
        self.run_as
            .chown(path)
            .map_err(io_err(format!("chown {}", path.display())))
    }

    /// Writes a file the agent owns, readable only by the Postgres user.
    fn write_owned(&self, path: &Path, contents: &str) -> Result<()> {
        let tmp = path.with_extension("pgha-tmp");
        std::fs::write(&tmp, contents).map_err(io_err(format!("writing {}", tmp.display())))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod"))?;
        self.chown(&tmp)?;
        std::fs::rename(&tmp, path).map_err(io_err(format!("renaming into {}", path.display())))
    }

    /// Creates the directories Postgres needs around its data directory.
    pub fn prepare_dirs(&self) -> Result<()> {
        for dir in [
            &self.cfg.socket_dir,
            self.cfg.data_dir.parent().unwrap_or(Path::new("/")),
        ] {
            std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        self.chown(&self.cfg.socket_dir)
    }

    /// Classifies the data directory without changing it.
    pub async fn inspect_data_dir(&self) -> Result<DataDir> {
        let dir = &self.cfg.data_dir;
        let mut entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(DataDir::Empty),
            Err(e) => {
                return Err(PgError::Io {
                    what: format!("reading {}", dir.display()),
                    source: e,
                })
            }
        };
        if entries.next().is_none() {
            return Ok(DataDir::Empty);
        }
        if !dir.join("PG_VERSION").exists() || !dir.join("global/pg_control").exists() {
            return Ok(DataDir::Unusable);
        }
        match self
            .control_data()
            .await?
            .get("Database system identifier")
            .and_then(|v| v.parse().ok())
        {
            Some(system_identifier) => Ok(DataDir::Initialized { system_identifier }),
            None => Ok(DataDir::Unusable),
        }
    }

    async fn control_data(&self) -> Result<std::collections::HashMap<String, String>> {
        let out = self
            .command("pg_controldata")
            .arg("-D")
            .arg(&self.cfg.data_dir)
            .output()
            .await
            .map_err(io_err("running pg_controldata"))?;
        if !out.status.success() {
            return Err(PgError::Command {
                command: "pg_controldata".into(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect())
    }

    /// The role a stopped data directory last ran in.
    pub async fn last_role(&self) -> Result<Option<PgRole>> {
        if self.cfg.data_dir.join("standby.signal").exists() {
            return Ok(Some(PgRole::Replica));
        }
        let state = self
            .control_data()
            .await?
            .get("Database cluster state")
            .cloned()
            .unwrap_or_default();
        Ok(match state.as_str() {
            "shut down" | "in production" | "shutting down" => Some(PgRole::Primary),
            "shut down in recovery" | "in archive recovery" | "in crash recovery" => {
                Some(PgRole::Replica)
            }
            _ => None,
        })
    }

    /// Location of the shutdown checkpoint of a primary's data directory
    /// that was shut down cleanly: then it is the last record of its WAL.
    /// `None` after a crash or an immediate stop (SIGQUIT by the fence
    /// guard): WAL written after the last checkpoint is not covered by it.
    pub async fn shutdown_checkpoint(&self) -> Result<Option<crate::ha::Lsn>> {
        let control = self.control_data().await?;
        if control.get("Database cluster state").map(String::as_str) != Some("shut down") {
            return Ok(None);
        }
        Ok(control
            .get("Latest checkpoint location")
            .and_then(|v| crate::ha::Lsn::parse(v)))
    }

    /// Creates the (empty) data directory, private to the Postgres user.
    /// Creates the (empty) data directory, owned by the Postgres user.
    pub fn create_data_dir(&self) -> Result<&Path> {
        self.prepare_dirs()?;
        let dir = self.cfg.data_dir.as_path();
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod data dir"))?;
        self.chown(dir)?;
        Ok(dir)
    }

    /// initdb with checksums; keeps the generated postgresql.conf as the base config.
    pub async fn initdb(&self) -> Result<()> {
        let dir = self.create_data_dir()?;
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(dir)
            .arg("--data-checksums")
            .arg("--encoding=UTF8")
            .arg("--locale=C.UTF-8");
        cmd.arg(format!("--username={}", self.cfg.superuser.username))
            .arg("--auth-local=peer")
            .arg("--auth-host=scram-sha-256");
        let pwfile = self.cfg.socket_dir.join(".pgha-initdb-pw");
        if let Some(pw) = &self.cfg.superuser.password {
            self.write_owned(&pwfile, pw.expose())?;
            cmd.arg(format!("--pwfile={}", pwfile.display()));
        }
        let out = cmd.output().await.map_err(io_err("running initdb"));
        let _ = std::fs::remove_file(&pwfile);
        let out = out?;
        if !out.status.success() {
            return Err(PgError::Command {
                command: "initdb".into(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        std::fs::rename(
            dir.join("postgresql.conf"),
            dir.join("postgresql.base.conf"),
        )
        .map_err(io_err("keeping postgresql.conf as postgresql.base.conf"))?;
        Ok(())
    }

    /// Writes postgresql.conf, pg_hba.conf, pg_ident.conf and the standby signal.
    pub fn write_config(&self, standby: bool, upstream: Option<&Upstream>) -> Result<()> {
        let dir = &self.cfg.data_dir;
        let dynamic = self
            .dynamic_parameters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let params = conf::managed_parameters(&self.cfg, &self.node, upstream, &dynamic);
        self.write_owned(
            &dir.join("postgresql.conf"),
            &conf::render_postgresql_conf(&params),
        )?;
        self.write_owned(&dir.join("pg_hba.conf"), &conf::render_pg_hba(&self.cfg))?;
        self.write_owned(
            &dir.join("pg_ident.conf"),
            &conf::render_pg_ident(&self.cfg, &self.agent_os_user),
        )?;
        let signal = dir.join("standby.signal");
        if standby {
            self.write_owned(&signal, "")?;
        } else if signal.exists() {
            std::fs::remove_file(&signal).map_err(io_err("removing standby.signal"))?;
        }
        // A clone carries the source's auto.conf; the agent's own file is the truth.
        let auto = dir.join("postgresql.auto.conf");
        if auto.exists() {
            let text = std::fs::read_to_string(&auto).unwrap_or_default();
            let kept: String = text
                .lines()
                .filter(|l| {
                    !l.trim_start().starts_with("primary_conninfo")
                        && !l.trim_start().starts_with("primary_slot_name")
                        && !l.trim_start().starts_with("synchronous_standby_names")
                })
                .map(|l| format!("{l}\n"))
                .collect();
            if kept != text {
                self.write_owned(&auto, &kept)?;
            }
        }
        Ok(())
    }

    /// Writes `pgha.sync.conf` (included last by postgresql.conf). It stays
    /// in the data directory, so a primary that restarts keeps waiting for
    /// the standbys it waited for.
    pub fn write_sync_conf(&self, standby_names: &str) -> Result<()> {
        self.write_owned(
            &self.cfg.data_dir.join(conf::SYNC_CONF),
            &conf::render_sync_conf(standby_names),
        )
    }

    /// Records the cluster-wide parameters for the next `write_config`;
    /// true when they changed.
    pub fn set_dynamic_parameters(&self, parameters: &BTreeMap<String, String>) -> bool {
        let mut current = self
            .dynamic_parameters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *current == *parameters {
            return false;
        }
        *current = parameters.clone();
        true
    }

    /// PID of a postmaster running on our data directory, from postmaster.pid.
    pub fn postmaster_pid(&self) -> Option<i32> {
        live_postmaster(&self.cfg.data_dir)
    }

    /// Makes a running postmaster reread its configuration (SIGHUP, what
    /// `pg_reload_conf()` sends), also while it does not accept connections
    /// yet, as a standby that is still becoming consistent.
    pub fn signal_reload(&self) -> Result<()> {
        let pid = self
            .postmaster_pid()
            .ok_or_else(|| PgError::Other("no postmaster runs: nothing to reload".into()))?;
        kill(Pid::from_raw(pid), Signal::SIGHUP)
            .map_err(|e| PgError::Other(format!("SIGHUP to postmaster {pid}: {e}")))
    }

    /// Whether our child postmaster exited (reaping it if so).
    pub async fn child_exited(&self) -> Option<String> {
        let mut guard = self.child.lock().await;
        let child = guard.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                *guard = None;
                Some(status.to_string())
            }
            _ => None,
        }
    }

    /// Starts the postmaster as our child and waits until it accepts connections.
    pub async fn start(&self, timeout: Duration) -> Result<()> {
        if self.postmaster_pid().is_some() {
            return Ok(());
        }
        remove_stale_pid_file(&self.cfg.data_dir)?;
        let socket_lock = format!(".s.PGSQL.{}.lock", self.cfg.port);
        remove_stale_lock(&self.cfg.socket_dir.join(socket_lock))?;
        self.prepare_dirs()?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(&self.cfg.data_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The postmaster must not die with the agent's process group on Ctrl-C:
        // the agent decides how it stops.
        cmd.process_group(0);
        let mut child = cmd.spawn().map_err(io_err("starting postgres"))?;
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_log(BufReader::new(err)).in_current_span());
        }
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_log(BufReader::new(out)).in_current_span());
        }
        *self.child.lock().await = Some(child);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child_exited().await {
                return Err(PgError::Other(format!(
                    "postgres exited during start: {status}"
                )));
            }
            // The postmaster announces readiness in postmaster.pid; polling it
            // does not spam the server log with refused connections.
            if matches!(
                self.postmaster_status().as_deref(),
                Some("ready") | Some("standby")
            ) && self.connect().await.is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(PgError::Other(format!(
                    "postgres did not accept connections within {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The status word of postmaster.pid (`starting`, `ready`, `standby`, `stopping`).
    fn postmaster_status(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.cfg.data_dir.join("postmaster.pid")).ok()?;
        text.lines().nth(7).map(|l| l.trim().to_string())
    }

    /// Fast shutdown (sessions are cut), escalating to immediate after `timeout`.
    pub async fn stop(&self, timeout: Duration) -> Result<()> {
        *self.client.lock().await = None;
        let Some(pid) = self.postmaster_pid() else {
            self.child_exited().await;
            return Ok(());
        };
        let pid = Pid::from_raw(pid);
        let _ = kill(pid, Signal::SIGINT);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut escalated = false;
        loop {
            self.child_exited().await;
            if kill(pid, None).is_err() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline && !escalated {
                tracing::warn!("postgres did not stop in time: immediate shutdown");
                let _ = kill(pid, Signal::SIGQUIT);
                escalated = true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clones `from` with pg_basebackup (WAL streamed), publishing progress.
    pub async fn basebackup(&self, from: &Upstream) -> Result<()> {
        let dir = self.create_data_dir()?;
        // Removed by the caller once the copy is configured as a standby.
        self.job_marker()
            .begin(Unfinished::Clone, &from.name)
            .map_err(io_err("writing the clone marker"))?;
        let mut cmd = self.command("pg_basebackup");
        cmd.arg("-D")
            .arg(dir)
            .args(["-X", "stream", "-c", "fast", "--progress", "--no-password"]);
        let hostaddr = crate::net::pick_address(&from.host, from.port, Duration::from_secs(5))
            .await
            .map_err(io_err("connecting to the clone source"))?;
        cmd.arg("-d")
            .arg(source_conninfo(from, hostaddr))
            .arg("-U")
            .arg(&self.cfg.replication.username);
        if let Some(pw) = &self.cfg.replication.password {
            cmd.env("PGPASSWORD", pw.expose());
        }
        for (key, value) in self.cfg.tls.libpq_params(true) {
            cmd.env(libpq_env(key), value);
        }
        cmd.stderr(Stdio::piped()).stdout(Stdio::null());
        let mut child = cmd.spawn().map_err(io_err("starting pg_basebackup"))?;
        let mut stderr = child.stderr.take().expect("piped");
        let mut tail = String::new();
        let mut buf = [0u8; 4096];
        let mut last_logged = tokio::time::Instant::now();
        loop {
            let n = stderr
                .read(&mut buf)
                .await
                .map_err(io_err("reading pg_basebackup output"))?;
            if n == 0 {
                break;
            }
            tail.push_str(&String::from_utf8_lossy(&buf[..n]));
            if let Some(p) = parse_basebackup_progress(&tail) {
                *self.clone_progress.lock().expect("not poisoned") = Some(p);
                if last_logged.elapsed() >= Duration::from_secs(2) {
                    tracing::info!(
                        done_bytes = p.done_bytes,
                        total_bytes = p.total_bytes,
                        "clone progress"
                    );
                    last_logged = tokio::time::Instant::now();
                }
            }
            if tail.len() > 8192 {
                tail.drain(..tail.len() - 4096);
            }
        }
        let status = child
            .wait()
            .await
            .map_err(io_err("waiting for pg_basebackup"))?;
        if let Some(p) = *self.clone_progress.lock().expect("not poisoned") {
            tracing::info!(
                done_bytes = p.done_bytes,
                total_bytes = p.total_bytes,
                "clone finished"
            );
        }
        *self.clone_progress.lock().expect("not poisoned") = None;
        if !status.success() {
            return Err(PgError::Command {
                command: "pg_basebackup".into(),
                status: status.to_string(),
                stderr: last_lines(&tail),
            });
        }
        Ok(())
    }

    /// pg_rewind against the running primary `from`; a no-op when the
    /// timelines did not diverge.
    pub async fn rewind(&self, from: &Upstream) -> Result<()> {
        // pg_rewind reads the source's timeline from its control file, which a
        // freshly promoted primary updates only with its first checkpoint.
        let hostaddr = self
            .checkpoint_source(from)
            .await
            .map_err(|e| PgError::SourceUnusable(e.to_string()))?;
        let mut cmd = self.command("pg_rewind");
        let mut source = format!(
            "{} user={} dbname=postgres",
            source_conninfo(from, hostaddr),
            conf::quote_conninfo(&self.cfg.superuser.username)
        );
        for (key, value) in self.cfg.tls.libpq_params(false) {
            source.push_str(&format!(" {key}={}", conf::quote_conninfo(&value)));
        }
        cmd.arg("-D")
            .arg(&self.cfg.data_dir)
            .arg(format!("--source-server={source}"))
            .arg("--progress");
        if let Some(pw) = &self.cfg.superuser.password {
            cmd.env("PGPASSWORD", pw.expose());
        }
        // pg_rewind needs the config files to start single-user recovery,
        // which refuses a lock file naming a live process.
        self.write_config(false, None)?;
        remove_stale_pid_file(&self.cfg.data_dir)?;
        // From here the directory may be left part rewound: recorded, so
        // that it is never started as it is (see `JobMarker`).
        self.job_marker()
            .begin(Unfinished::Rewind, &from.name)
            .map_err(io_err("writing the rewind marker"))?;
        let out = cmd.output().await.map_err(io_err("running pg_rewind"))?;
        tracing::info!(output = %last_lines(&String::from_utf8_lossy(&out.stderr)), "pg_rewind finished");
        if !out.status.success() {
            return Err(PgError::Command {
                command: "pg_rewind".into(),
                status: out.status.to_string(),
                stderr: last_lines(&String::from_utf8_lossy(&out.stderr)),
            });
        }
        self.write_config(true, Some(from))?;
        self.job_marker()
            .finish()
            .map_err(io_err("removing the rewind marker"))
    }

    /// The record of a rewind or clone in progress, beside the data directory.
    pub fn job_marker(&self) -> JobMarker {
        JobMarker::for_data_dir(&self.cfg.data_dir)
    }
}

/// First line of the history files pgha writes only to steer a promotion.
const TIMELINE_PLACEHOLDER: &str = "# pgha placeholder";

impl LocalPg {
    fn history_file(&self, timeline: u32) -> PathBuf {
        self.cfg
            .data_dir
            .join("pg_wal")
            .join(format!("{timeline:08X}.history"))
    }

    /// The first timeline from `from` on with no history file in pg_wal:
    /// where a promotion steered to `from` actually lands.
    pub fn free_timeline_from(&self, from: u32) -> u32 {
        (from..u32::MAX)
            .find(|t| !self.history_file(*t).exists())
            .unwrap_or(from)
    }

    /// Postgres promotes to the first timeline above its own with no
    /// history file in pg_wal. Writes placeholders for the numbers from
    /// `current + 1` up to `target - 1` that have none, so that it picks
    /// `target`; returns the files written. They stay: a standby that
    /// follows us from a timeline below the gap fetches the history file of
    /// every timeline between its own and ours, and stops streaming at the
    /// first one missing. Their content (a comment, no parent) is read only
    /// by a server running on that timeline, which none of ours ever does:
    /// the member that really took it keeps its own history file.
    pub fn steer_promotion(&self, current: u32, target: u32) -> Result<Vec<PathBuf>> {
        let mut written = Vec::new();
        for t in current.saturating_add(1)..target {
            let path = self.history_file(t);
            if path.exists() {
                continue;
            }
            let text = format!(
                "{TIMELINE_PLACEHOLDER}: timeline {t} was reserved by a member this node never streamed from; written so that its promotion skips the number and goes to {target}\n"
            );
            std::fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))?;
            self.chown(&path)?;
            written.push(path);
        }
        Ok(written)
    }

    /// CHECKPOINT on `from` as the superuser, over TCP; returns the address
    /// it reached.
    async fn checkpoint_source(&self, from: &Upstream) -> Result<std::net::IpAddr> {
        // Host and port are not needed: the stream is connected below.
        let mut cfg = tokio_postgres::Config::new();
        cfg.user(&self.cfg.superuser.username)
            .dbname("postgres")
            .application_name("pgha-rewind");
        if let Some(pw) = &self.cfg.superuser.password {
            cfg.password(pw.expose());
        }
        // Happy Eyeballs over the source's addresses (tokio-postgres alone
        // would try them one after the other).
        let stream = crate::net::connect_tcp_within(&from.host, from.port, Duration::from_secs(5))
            .await
            .map_err(io_err("connecting to the rewind source"))?;
        let reached = stream
            .peer_addr()
            .map_err(io_err("connecting to the rewind source"))?
            .ip();
        let client = if self.cfg.tls.enabled {
            use tokio_postgres::tls::MakeTlsConnect;
            cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
            let mut make = crate::tls::postgres_client(&self.cfg.tls)
                .map_err(|e| PgError::Other(e.to_string()))?;
            let host = from.host.trim_start_matches('[').trim_end_matches(']');
            let tls = MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(&mut make, host)
                .map_err(|e| PgError::Other(format!("TLS to the rewind source: {e}")))?;
            let (client, conn) = cfg.connect_raw(stream, tls).await?;
            tokio::spawn(conn.in_current_span());
            client
        } else {
            let (client, conn) = cfg.connect_raw(stream, tokio_postgres::NoTls).await?;
            tokio::spawn(conn.in_current_span());
            client
        };
        client.batch_execute("CHECKPOINT").await?;
        Ok(reached)
    }
}

/// libpq `host`, `hostaddr` and `port` of a clone or rewind source: the
/// address Happy Eyeballs picked, the name kept for messages and TLS.
fn source_conninfo(from: &Upstream, hostaddr: std::net::IpAddr) -> String {
    format!(
        "host={} hostaddr={} port={}",
        conf::quote_conninfo(from.host.trim_start_matches('[').trim_end_matches(']')),
        conf::quote_conninfo(&hostaddr.to_string()),
        from.port
    )
}

async fn forward_log<R: tokio::io::AsyncRead + Unpin>(reader: BufReader<R>) {
    let mut lines = reader.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(target: "postgres", "{line}");
    }
}

/// The environment variable libpq reads for a connection parameter.
fn libpq_env(key: &str) -> String {
    format!("PG{}", key.to_ascii_uppercase())
}

fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text
        .split(['\n', '\r'])
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// Parses the newest `123/456 kB (27%)` progress report of pg_basebackup.
pub fn parse_basebackup_progress(text: &str) -> Option<Progress> {
    text.split(['\r', '\n']).rev().find_map(|chunk| {
        let chunk = chunk.trim_start();
        let (done, rest) = chunk.split_once('/')?;
        let total = rest.split_whitespace().next()?;
        let kb = |s: &str| s.trim().parse::<u64>().ok().map(|v| v * 1024);
        Some(Progress {
            done_bytes: kb(done)?,
            total_bytes: kb(total)?,
        })
    })
}

/// PID of a postmaster running on `data_dir`, from its postmaster.pid: a live
/// process that is a postgres process. In a container started again after a
/// kill, the PID a dead postmaster left in the file often belongs to another
/// process of the new PID namespace.
fn live_postmaster(data_dir: &Path) -> Option<i32> {
    lock_owner(&data_dir.join("postmaster.pid"))
}

/// The live postgres process a Postgres lock file (postmaster.pid, a
/// socket's `.s.PGSQL.PORT.lock`) names, if any.
fn lock_owner(file: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(file).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    if kill(Pid::from_raw(pid), None).is_err() {
        return None;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => (comm.trim() == "postgres").then_some(pid),
        // No /proc: trust the live PID, as before.
        Err(_) => Some(pid),
    }
}

/// Removes a postmaster.pid that names no live postmaster. Postgres itself
/// (and pg_rewind's single-user recovery) refuses to start while the PID in
/// it is alive, whatever that process is.
fn remove_stale_pid_file(data_dir: &Path) -> Result<bool> {
    remove_stale_lock(&data_dir.join("postmaster.pid"))
}

/// Removes a Postgres lock file that names no live postgres process. The
/// socket directory keeps `.s.PGSQL.PORT.lock` across a killed container
/// like the data directory keeps postmaster.pid, with the same PID trap.
fn remove_stale_lock(file: &Path) -> Result<bool> {
    if !file.exists() || lock_owner(file).is_some() {
        return Ok(false);
    }
    tracing::info!(file = %file.display(), "removing a stale Postgres lock file (no postmaster runs)");
    std::fs::remove_file(file).map_err(io_err("removing a stale Postgres lock file"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    /// Found by chaos-tests ten-primary-kills: a primary killed with its
    /// container came back in a new PID namespace where the PID in its
    /// postmaster.pid belonged to another live process; pg_rewind's
    /// single-user recovery refused to run ("Is another postmaster (PID 23)
    /// running") and the node never rejoined.
    #[test]
    fn a_postmaster_pid_naming_a_live_non_postgres_process_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("postmaster.pid");
        // This test process: alive, and not postgres.
        std::fs::write(&file, format!("{}\n/data\n", std::process::id())).unwrap();
        assert_eq!(super::live_postmaster(dir.path()), None);
        assert!(super::remove_stale_pid_file(dir.path()).unwrap());
        assert!(!file.exists());
        assert!(!super::remove_stale_pid_file(dir.path()).unwrap());
    }

    /// Found by chaos-tests ten-primary-kills (sync on, 3 runs): the socket
    /// directory's lock file of the killed postmaster named a PID alive in
    /// the container's new PID namespace, and every start failed with
    /// "lock file .s.PGSQL.5432.lock already exists".
    #[test]
    fn a_socket_lock_naming_a_live_non_postgres_process_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(".s.PGSQL.5432.lock");
        std::fs::write(&file, format!("{}\n/data\n", std::process::id())).unwrap();
        assert!(super::remove_stale_lock(&file).unwrap());
        assert!(!file.exists());
    }

    use super::*;

    #[test]
    fn basebackup_progress_is_parsed_from_the_last_report() {
        let out = "waiting for checkpoint\r    0/22931 kB (0%), 0/1 tablespace\r22940/22940 kB (100%), 1/1 tablespace\n";
        assert_eq!(
            parse_basebackup_progress(out),
            Some(Progress {
                done_bytes: 22940 * 1024,
                total_bytes: 22940 * 1024
            })
        );
        assert_eq!(parse_basebackup_progress("waiting for checkpoint"), None);
    }
}
