//! Harness for the cluster tests: a real etcd and real `pgha` agents (which
//! run real Postgres 15) on free loopback ports, each under its own directory
//! in /tmp. Every process started is tracked by PID and stopped on drop, also
//! when the test panics; a failing test prints the tail of every log.

#![allow(dead_code)]

pub mod netns;
pub mod procs;
pub mod proxy;

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::{Pid, User};
use serde::Deserialize;
use serde_json::Value;

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
pub const SUPERUSER_PASSWORD: &str = "su-pass";
pub const REPLICATION_PASSWORD: &str = "repl-pass";
/// Lines of each log printed when a test fails.
const LOG_TAIL_LINES: usize = 60;

/// Cluster tests are heavy (several Postgres instances on two cores): one at a time.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A failed test poisons the lock; the next test must still run.
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Polls `probe` every 100 ms until it returns `Some` or `timeout` passes;
/// panics naming `what` on timeout.
pub fn wait_until<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A loopback port nobody listens on, never handed out twice in this process.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind port 0")
            .local_addr()
            .expect("local addr")
            .port();
        if given.lock().unwrap_or_else(|p| p.into_inner()).insert(port) {
            return port;
        }
    }
}

/// A directory under /tmp that the `postgres` OS user can traverse; removed
/// on drop unless PGHA_TEST_KEEP is set.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(prefix: &str) -> TestDir {
        let path = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/tmp")
            .expect("temp dir")
            .keep();
        // tempfile makes 0700 dirs; Postgres runs as `postgres` below this one.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod test dir");
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("PGHA_TEST_KEEP").is_some() {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Last `n` lines of a file, for failure reports.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits for a child with a deadline; `None` if it is still running.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pid_alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// One blocking HTTP/1.1 GET; returns the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad HTTP answer: {text:?}"),
        )
    };
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, body.to_string()))
}

/// A runtime for the few async clients the harness uses (etcd-client).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// One blocking HTTP/1.1 POST with a JSON body; the status code and the
/// whole answer. Waits up to 130 s for it (a switchover answers when done).
pub fn http_post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(130)))
        .expect("read timeout");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

/// A single-member etcd on free ports with its own data directory.
pub struct Etcd {
    pub url: String,
    client_addr: SocketAddr,
    child: Child,
    log: PathBuf,
    dir: TestDir,
}

impl Etcd {
    /// The address etcd serves clients on.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    pub fn start() -> Etcd {
        let dir = TestDir::new("pgha-etcd-");
        let (client_port, peer_port) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = dir.path().join("etcd.log");
        let out = File::create(&log).expect("etcd log");
        let child = Command::new("etcd")
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .spawn()
            .expect("start etcd (is /usr/bin/etcd installed?)");
        let etcd = Etcd {
            url,
            client_addr: SocketAddr::from(([127, 0, 0, 1], client_port)),
            child,
            log,
            dir,
        };
        // Constructed first: a timeout here panics and Drop still stops etcd.
        wait_until("etcd to report healthy", Duration::from_secs(30), || {
            let (status, body) = http_get(etcd.client_addr, "/health").ok()?;
            (status == 200 && body.contains("\"true\"")).then_some(())
        });
        etcd
    }

    /// Freezes etcd (SIGSTOP): every client request hangs, as with an etcd
    /// that is down; `resume` thaws it.
    pub fn pause(&self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGSTOP);
    }

    pub fn resume(&self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGCONT);
    }

    /// The raw value of `key`, if it exists.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let url = self.url.clone();
        let key = key.to_string();
        runtime()
            .block_on(async move {
                let mut client = etcd_client::Client::connect([url], None).await?;
                let resp = client.get(key, None).await?;
                Ok::<_, etcd_client::Error>(resp.kvs().first().map(|kv| kv.value().to_vec()))
            })
            .expect("etcd get")
    }

    /// Writes `key` (no lease), as an operator or a vanished member would.
    pub fn put(&self, key: &str, value: &str) {
        let url = self.url.clone();
        let (key, value) = (key.to_string(), value.to_string());
        runtime()
            .block_on(async move {
                let mut client = etcd_client::Client::connect([url], None).await?;
                client.put(key, value, None).await.map(|_| ())
            })
            .expect("etcd put")
    }

    /// Deletes `key`.
    pub fn delete(&self, key: &str) {
        let url = self.url.clone();
        let key = key.to_string();
        runtime()
            .block_on(async move {
                let mut client = etcd_client::Client::connect([url], None).await?;
                client.delete(key, None).await.map(|_| ())
            })
            .expect("etcd delete")
    }

    pub fn get_json(&self, key: &str) -> Option<Value> {
        self.get(key)
            .map(|v| serde_json::from_slice(&v).expect("JSON value in etcd"))
    }

    /// Number of keys under `prefix`.
    pub fn count_prefix(&self, prefix: &str) -> usize {
        let url = self.url.clone();
        let prefix = prefix.to_string();
        runtime()
            .block_on(async move {
                let mut client = etcd_client::Client::connect([url], None).await?;
                let opts = etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only();
                let resp = client.get(prefix, Some(opts)).await?;
                Ok::<_, etcd_client::Error>(resp.count() as usize)
            })
            .expect("etcd count")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- etcd log (last {LOG_TAIL_LINES} lines) -----\n{}",
                tail(&self.log, LOG_TAIL_LINES)
            );
        }
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        if wait_child(&mut self.child, Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Agent timing written into each node's config.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub ttl_s: u64,
    pub loop_wait_s: u64,
    pub retry_timeout_s: u64,
}

impl Timing {
    /// The production defaults.
    pub const STANDARD: Timing = Timing {
        ttl_s: 10,
        loop_wait_s: 1,
        retry_timeout_s: 3,
    };
    /// The smallest TTL the config accepts: failover within a few seconds.
    pub const FAST: Timing = Timing {
        ttl_s: 3,
        loop_wait_s: 1,
        retry_timeout_s: 1,
    };
}

#[derive(Debug, Clone)]
pub struct Options {
    pub scope: String,
    pub timing: Timing,
    /// Each node reaches etcd through its own [`EtcdProxy`] (see
    /// [`Node::etcd_proxy`]), which a test can cut to isolate that node.
    pub etcd_proxy: bool,
    /// `region = ...` of a node, by node name.
    pub regions: BTreeMap<String, String>,
    /// TOML tables appended to every node's config (e.g. `[cluster]`).
    pub extra_toml: String,
    /// TOML tables appended to one node's config, by node name (e.g.
    /// `[tags]`). A table must not appear in both this and `extra_toml`.
    pub node_toml: BTreeMap<String, String>,
    /// Lines added to every node's `[postgresql]` table.
    pub postgresql_lines: String,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            scope: "t".into(),
            timing: Timing::STANDARD,
            etcd_proxy: false,
            regions: BTreeMap::new(),
            extra_toml: String::new(),
            node_toml: BTreeMap::new(),
            postgresql_lines: String::new(),
        }
    }
}

/// One member of `GET /cluster`.
#[derive(Debug, Clone, Deserialize)]
pub struct MemberView {
    pub name: String,
    pub role: String,
    pub state: String,
    pub timeline: Option<u32>,
    pub lag_bytes: Option<u64>,
    /// How far this member's replayed WAL is behind the leader's position.
    #[serde(default)]
    pub replay_lag_bytes: Option<u64>,
    /// WAL replay paused on this replica (`pg_wal_replay_pause()`).
    #[serde(default)]
    pub replay_paused: bool,
    /// Primary: its write position; replica: its replay position (`X/Y`).
    #[serde(default)]
    pub wal_position: Option<String>,
    pub api_url: String,
    pub pg_port: u16,
    #[serde(default)]
    pub leader: bool,
    /// Only in `/status`: the leader this node sees.
    #[serde(default)]
    pub cluster_leader: Option<String>,
}

/// `GET /cluster` as one node sees it.
#[derive(Debug, Clone, Deserialize)]
pub struct ClusterView {
    pub scope: String,
    /// False when the answering node cannot read etcd: its view is old.
    #[serde(default = "yes")]
    pub dcs_reachable: bool,
    pub leader: Option<String>,
    pub members: Vec<MemberView>,
}

fn yes() -> bool {
    true
}

impl ClusterView {
    /// Members that are the leader and run as a primary.
    pub fn primaries(&self) -> Vec<&MemberView> {
        self.members
            .iter()
            .filter(|m| m.role == "primary" && m.state == "running")
            .collect()
    }

    pub fn streaming_replicas(&self) -> Vec<&MemberView> {
        self.members
            .iter()
            .filter(|m| m.role == "replica" && m.state == "streaming")
            .collect()
    }

    pub fn member(&self, name: &str) -> Option<&MemberView> {
        self.members.iter().find(|m| m.name == name)
    }

    /// Exactly one running primary and `replicas` replicas streaming on its
    /// timeline.
    pub fn is_healthy(&self, replicas: usize) -> bool {
        let primaries = self.primaries();
        primaries.len() == 1
            && self
                .streaming_replicas()
                .iter()
                .filter(|m| m.timeline == primaries[0].timeline)
                .count()
                == replicas
    }
}

/// One pgha agent: its directory, config, log and process.
pub struct Node {
    pub name: String,
    pub pg_port: u16,
    pub api_port: u16,
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Present when the cluster runs with `Options::etcd_proxy`.
    etcd_proxy: Option<EtcdProxy>,
    agent: Option<Child>,
    /// Byte offset in `log` where the current run of the agent starts.
    run_log_start: u64,
    last_exit: Option<ExitStatus>,
}

impl Node {
    fn new(root: &Path, name: &str, etcd: &Etcd, opts: &Options) -> Node {
        let etcd_proxy = opts
            .etcd_proxy
            .then(|| EtcdProxy::start(etcd.client_addr()));
        let etcd_url = match &etcd_proxy {
            Some(proxy) => proxy.url(),
            None => etcd.url.clone(),
        };
        let dir = root.join(name);
        fs::create_dir_all(&dir).expect("node dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod node dir");
        let (pg_port, api_port) = (free_port(), free_port());
        let data_dir = dir.join("data");
        let config = dir.join("pgha.toml");
        let t = opts.timing;
        let region = opts
            .regions
            .get(name)
            .map(|r| format!("region = \"{r}\"\n"))
            .unwrap_or_default();
        let mut text = format!(
            r#"scope = "{scope}"
name = "{name}"
{region}
[etcd]
endpoints = ["{etcd_url}"]

[postgresql]
data_dir = "{data_dir}"
bin_dir = "{PG_BIN}"
listen_addresses = "127.0.0.1"
port = {pg_port}
advertise_host = "127.0.0.1"
{postgresql_lines}

[postgresql.superuser]
password = "{SUPERUSER_PASSWORD}"

[postgresql.replication]
password = "{REPLICATION_PASSWORD}"

[api]
listen = ["127.0.0.1:{api_port}"]
advertise_url = "http://127.0.0.1:{api_port}"

[timing]
ttl = "{ttl}s"
loop_wait = "{loop_wait}s"
retry_timeout = "{retry}s"
"#,
            scope = opts.scope,
            postgresql_lines = opts.postgresql_lines,
            data_dir = data_dir.display(),
            ttl = t.ttl_s,
            loop_wait = t.loop_wait_s,
            retry = t.retry_timeout_s,
        );
        for extra in [Some(&opts.extra_toml), opts.node_toml.get(name)]
            .into_iter()
            .flatten()
            .filter(|t| !t.is_empty())
        {
            text.push('\n');
            text.push_str(extra);
            text.push('\n');
        }
        fs::write(&config, text).expect("write node config");
        Node {
            name: name.to_string(),
            pg_port,
            api_port,
            log: dir.join("agent.log"),
            dir,
            data_dir,
            config,
            etcd_proxy,
            agent: None,
            run_log_start: 0,
            last_exit: None,
        }
    }

    /// Starts the agent, appending its output to `log`.
    fn spawn(&mut self) {
        assert!(self.agent.is_none(), "{}: agent already running", self.name);
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        self.run_log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        writeln!(
            log,
            "===== test harness: starting agent {} =====",
            self.name
        )
        .expect("write log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgha"));
        cmd.arg("run").arg("--config").arg(&self.config);
        // Only the config file decides: no PGHA_* overrides from the caller.
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("PGHA_") {
                cmd.env_remove(var);
            }
        }
        cmd.env(
            "RUST_LOG",
            std::env::var("PGHA_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start pgha");
        self.agent = Some(child);
        self.last_exit = None;
    }

    pub fn api_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.api_port))
    }

    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// Status code of `GET path` on this node's API.
    pub fn get_status_code(&self, path: &str) -> Option<u16> {
        http_get(self.api_addr(), path)
            .ok()
            .map(|(status, _)| status)
    }

    pub fn get_json(&self, path: &str) -> Option<Value> {
        let (_, body) = http_get(self.api_addr(), path).ok()?;
        serde_json::from_str(&body).ok()
    }

    pub fn cluster_view(&self) -> Option<ClusterView> {
        let (status, body) = http_get(self.api_addr(), "/cluster").ok()?;
        if status != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }

    pub fn agent_pid(&self) -> Option<i32> {
        self.agent.as_ref().map(|c| c.id() as i32)
    }

    pub fn is_running(&mut self) -> bool {
        match self.agent.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(Ok(Some(status))) => {
                self.last_exit = Some(status);
                self.agent = None;
                false
            }
            _ => false,
        }
    }

    /// Waits for the agent to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.agent.as_mut()?;
        let status = wait_child(child, timeout)?;
        self.agent = None;
        self.last_exit = Some(status);
        Some(status)
    }

    /// SIGKILLs the agent. Its Postgres keeps running, unless the agent held
    /// the leader lease: then the agent's fence guard stops it.
    pub fn kill9(&mut self) {
        let mut child = self
            .agent
            .take()
            .unwrap_or_else(|| panic!("{}: agent not running", self.name));
        let _ = child.kill();
        self.last_exit = child.wait().ok();
    }

    /// SIGKILLs the agent and then its whole Postgres (postmaster and backends).
    pub fn kill9_with_postgres(&mut self) {
        let postmaster = self
            .postmaster_pid()
            .unwrap_or_else(|| panic!("{}: no running postmaster", self.name));
        self.kill9();
        // The agent starts the postmaster in its own process group: kill the group.
        let _ = killpg(Pid::from_raw(postmaster), Signal::SIGKILL);
        wait_until(
            &format!("{}: postmaster {postmaster} to die", self.name),
            Duration::from_secs(10),
            || (!pid_alive(postmaster)).then_some(()),
        );
    }

    /// Freezes the agent (SIGSTOP). Its Postgres and fence guard run on.
    pub fn sigstop(&self) {
        let pid = self
            .agent_pid()
            .unwrap_or_else(|| panic!("{}: agent not running", self.name));
        kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP the agent");
    }

    /// Resumes an agent frozen by [`Node::sigstop`].
    pub fn sigcont(&self) {
        if let Some(pid) = self.agent_pid() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
    }

    /// The proxy this node reaches etcd through (`Options::etcd_proxy`).
    pub fn etcd_proxy(&self) -> &EtcdProxy {
        self.etcd_proxy
            .as_ref()
            .unwrap_or_else(|| panic!("{}: started without Options::etcd_proxy", self.name))
    }

    /// SIGTERMs the agent and waits for it to exit (it stops Postgres first).
    pub fn sigterm(&mut self) -> ExitStatus {
        self.sigterm_no_wait();
        self.wait_exit(Duration::from_secs(40))
            .unwrap_or_else(|| panic!("{}: agent did not exit after SIGTERM", self.name))
    }

    fn sigterm_no_wait(&mut self) {
        if let Some(pid) = self.agent_pid() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }

    /// Starts the agent again after kill9/sigterm, on the same config, data and log.
    pub fn restart(&mut self) {
        assert!(
            !self.is_running(),
            "{}: restart while the agent still runs",
            self.name
        );
        self.spawn();
    }

    pub fn last_exit(&self) -> Option<ExitStatus> {
        self.last_exit
    }

    /// The whole agent log (all runs).
    pub fn log_text(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The log of the current (or last) run only.
    pub fn current_run_log(&self) -> String {
        let bytes = fs::read(&self.log).unwrap_or_default();
        let start = (self.run_log_start as usize).min(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    /// PID of a live postmaster on this node's data directory.
    pub fn postmaster_pid(&self) -> Option<i32> {
        live_postmaster(&self.data_dir)
    }

    /// Runs `sql` with psql over TCP as the superuser; stdout, trimmed.
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        psql(self.pg_port, sql)
    }

    /// Like `psql`, panicking on error.
    pub fn query(&self, sql: &str) -> String {
        self.psql(sql)
            .unwrap_or_else(|e| panic!("{}: {sql}: {e}", self.name))
    }

    /// Stops the agent and any Postgres it left behind; for teardown.
    fn stop_everything(&mut self, agent_timeout: Duration) {
        if let Some(child) = self.agent.as_mut() {
            if wait_child(child, agent_timeout).is_none() {
                eprintln!("{}: agent ignored SIGTERM: SIGKILL", self.name);
                let _ = child.kill();
                let _ = child.wait();
            }
            self.agent = None;
        }
        kill_postmaster(&self.data_dir);
    }
}

/// Runs `sql` against 127.0.0.1:`port` as the superuser.
pub fn psql(port: u16, sql: &str) -> Result<String, String> {
    let out = Command::new(Path::new(PG_BIN).join("psql"))
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .arg("-p")
        .arg(port.to_string())
        .arg("-c")
        .arg(sql)
        .env("PGPASSWORD", SUPERUSER_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "3")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// A postmaster PID from `data_dir/postmaster.pid`, only if that process is
/// alive and really is a postgres on this data directory (PIDs get reused).
pub fn live_postmaster(data_dir: &Path) -> Option<i32> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    (cmdline.contains("postgres") && cmdline.contains(&*data_dir.to_string_lossy())).then_some(pid)
}

/// Stops a postmaster left on `data_dir`: SIGQUIT (immediate shutdown),
/// then SIGKILL to its process group.
pub fn kill_postmaster(data_dir: &Path) {
    let Some(pid) = live_postmaster(data_dir) else {
        return;
    };
    eprintln!(
        "killing leftover postmaster {pid} on {}",
        data_dir.display()
    );
    let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if pid_alive(pid) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Processes whose command line names a path below `root` (agents, fence
/// guards, postmasters, pg_basebackup...): `root` is unique to one test, so
/// these were all started by it.
pub fn processes_under(root: &Path) -> Vec<(i32, String)> {
    let needle = format!("{}/", root.display());
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if pid != me && cmdline.contains(&needle) {
            found.push((pid, cmdline.trim().to_string()));
        }
    }
    found
}

/// SIGKILLs whatever still runs with a path below `root` in its command line.
pub fn kill_processes_under(root: &Path) {
    for (pid, cmdline) in processes_under(root) {
        eprintln!("killing leftover process {pid}: {cmdline}");
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// The `Database system identifier` of a data directory, by pg_controldata.
pub fn system_identifier(data_dir: &Path) -> Option<u64> {
    let out = Command::new(Path::new(PG_BIN).join("pg_controldata"))
        .arg("-D")
        .arg(data_dir)
        .env("LC_ALL", "C")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Database system identifier:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Creates `data_dir` (mode 0700) owned by the OS user `postgres`.
fn postgres_owned_dir(data_dir: &Path) {
    let user = User::from_name("postgres")
        .expect("getpwnam")
        .expect("OS user postgres");
    fs::create_dir_all(data_dir).expect("create data dir");
    fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700)).expect("chmod data dir");
    std::os::unix::fs::chown(data_dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .expect("chown data dir");
}

/// Runs the pgha CLI; returns (exit code, stdout, stderr).
/// The caller's own `PGHA_*` variables (`PGHA_TEST_KEEP`, ...) are not
/// passed on: only `env` is.
pub fn pgha(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgha"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PGHA_") {
            cmd.env_remove(key);
        }
    }
    let out = cmd
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run pgha");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A Postgres started by the test on a data directory of its own (a
/// restored copy, say), as the `postgres` user on 127.0.0.1:`port`; stopped
/// (SIGQUIT, then SIGKILL) when dropped.
pub struct StandalonePostgres {
    pub data_dir: PathBuf,
    pub port: u16,
    log: PathBuf,
    child: std::process::Child,
}

impl StandalonePostgres {
    /// Starts it; its socket goes into `socket_dir` (created for it).
    pub fn start(data_dir: &Path, socket_dir: &Path) -> StandalonePostgres {
        postgres_owned_dir(socket_dir);
        let port = free_port();
        let log_path = socket_dir.join("postgres.log");
        let log = fs::File::create(&log_path).expect("postgres log");
        let child = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Path::new(PG_BIN).join("postgres"))
            .arg("-D")
            .arg(data_dir)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-k")
            .arg(socket_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        StandalonePostgres {
            data_dir: data_dir.to_owned(),
            port,
            log: log_path,
            child,
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for StandalonePostgres {
    fn drop(&mut self) {
        kill_postmaster(&self.data_dir);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a Postgres on a restored copy and waits (at most `within`) until
/// it has recovered and promoted (out of recovery).
pub fn recovered(data_dir: &Path, sockets: &Path, within: Duration) -> StandalonePostgres {
    let pg = StandalonePostgres::start(data_dir, sockets);
    let port = pg.port;
    let began = Instant::now();
    loop {
        if let Ok(out) = psql(port, "SELECT pg_is_in_recovery()") {
            if out == "f" {
                break;
            }
        }
        assert!(
            began.elapsed() < within,
            "the restored copy did not finish recovery within {within:?}:\n{}",
            pg.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    pg
}

/// Forces a segment switch on the node on `port` and waits until that
/// segment is in the archive (pg_stat_archiver says so).
pub fn archive_now(port: u16) {
    let segment = psql(port, "SELECT pg_walfile_name(pg_switch_wal())").expect("switch");
    wait_until(
        &format!("segment {segment} archived"),
        Duration::from_secs(30),
        || {
            let last = psql(
                port,
                "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
            )
            .ok()?;
            (last.as_str() >= segment.as_str() && !last.is_empty()).then_some(())
        },
    );
}

/// Creates `data_dir` owned by `postgres` and runs initdb into it as that user.
pub fn initdb_as_postgres(data_dir: &Path) {
    postgres_owned_dir(data_dir);
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(Path::new(PG_BIN).join("initdb"))
        .arg("-D")
        .arg(data_dir)
        .args([
            "--no-sync",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Replaces `data_dir` with a `pg_basebackup -X none` of the Postgres on
/// 127.0.0.1:`port`, as the postgres user: a copy that needs WAL only a
/// primary can send before it becomes consistent (what a rewind cut short
/// leaves is no better). Started as a standby while no primary runs, it
/// waits for that WAL for good.
pub fn replace_with_copy_lacking_wal(data_dir: &Path, port: u16) {
    if data_dir.exists() {
        fs::remove_dir_all(data_dir).expect("remove the old data dir");
    }
    postgres_owned_dir(data_dir);
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(Path::new(PG_BIN).join("pg_basebackup"))
        .arg("-D")
        .arg(data_dir)
        .args([
            "-X",
            "none",
            "-c",
            "fast",
            "--no-sync",
            "-h",
            "127.0.0.1",
            "-U",
            "replicator",
        ])
        .arg("-p")
        .arg(port.to_string())
        .env("PGPASSWORD", REPLICATION_PASSWORD)
        .stdin(Stdio::null())
        .output()
        .expect("run pg_basebackup");
    assert!(
        out.status.success(),
        "pg_basebackup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything that identifies a directory tree's contents: per path its
/// kind, mode, owner, mtime, size and bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct DirSnapshot(BTreeMap<PathBuf, Entry>);

#[derive(Debug, PartialEq, Eq)]
pub enum Entry {
    Dir {
        mode: u32,
        uid: u32,
        gid: u32,
        mtime_ns: i128,
    },
    File {
        mode: u32,
        uid: u32,
        gid: u32,
        mtime_ns: i128,
        size: u64,
        content: Vec<u8>,
    },
    Symlink {
        target: PathBuf,
    },
}

impl DirSnapshot {
    pub fn take(root: &Path) -> DirSnapshot {
        let mut entries = BTreeMap::new();
        walk(root, root, &mut entries);
        DirSnapshot(entries)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Paths whose entry differs between the two snapshots.
    pub fn diff(&self, after: &DirSnapshot) -> Vec<String> {
        let mut out = Vec::new();
        for (path, before) in &self.0 {
            match after.0.get(path) {
                None => out.push(format!("removed: {}", path.display())),
                Some(now) if now != before => out.push(format!("changed: {}", path.display())),
                Some(_) => {}
            }
        }
        for path in after.0.keys().filter(|p| !self.0.contains_key(*p)) {
            out.push(format!("added: {}", path.display()));
        }
        out
    }
}

fn walk(root: &Path, path: &Path, entries: &mut BTreeMap<PathBuf, Entry>) {
    let meta =
        fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    let rel = path.strip_prefix(root).expect("below root").to_path_buf();
    let mtime_ns = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
    let (mode, uid, gid) = (meta.mode(), meta.uid(), meta.gid());
    if meta.file_type().is_symlink() {
        entries.insert(
            rel,
            Entry::Symlink {
                target: fs::read_link(path).expect("readlink"),
            },
        );
    } else if meta.is_dir() {
        entries.insert(
            rel,
            Entry::Dir {
                mode,
                uid,
                gid,
                mtime_ns,
            },
        );
        for child in fs::read_dir(path).expect("read_dir") {
            walk(root, &child.expect("dir entry").path(), entries);
        }
    } else {
        let content = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        entries.insert(
            rel,
            Entry::File {
                mode,
                uid,
                gid,
                mtime_ns,
                size: meta.len(),
                content,
            },
        );
    }
}

/// An etcd (own or shared) and pgha nodes in one test directory.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub etcd: Arc<Etcd>,
    pub opts: Options,
    dir: TestDir,
}

impl Cluster {
    /// A fresh etcd and `n` nodes (n1..nN) started from empty directories.
    pub fn start(n: usize, opts: Options) -> Cluster {
        Cluster::start_on(Arc::new(Etcd::start()), n, opts)
    }

    /// `n` nodes on a shared etcd, all started in one go (no waiting in between).
    pub fn start_on(etcd: Arc<Etcd>, n: usize, opts: Options) -> Cluster {
        let mut cluster = Cluster {
            nodes: Vec::new(),
            etcd,
            dir: TestDir::new("pgha-it-"),
            opts,
        };
        for i in 1..=n {
            let node = Node::new(
                cluster.dir.path(),
                &format!("n{i}"),
                &cluster.etcd,
                &cluster.opts,
            );
            cluster.nodes.push(node);
        }
        for node in &mut cluster.nodes {
            node.spawn();
        }
        cluster
    }

    /// Adds a node named `name`; `prepare` may fill its data directory before
    /// the agent starts.
    pub fn add_node(&mut self, name: &str, prepare: impl FnOnce(&Node)) -> &mut Node {
        let node = Node::new(self.dir.path(), name, &self.etcd, &self.opts);
        prepare(&node);
        self.nodes.push(node);
        let node = self.nodes.last_mut().expect("just pushed");
        node.spawn();
        node
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Postgres ports of all nodes, in node order.
    pub fn pg_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.pg_port).collect()
    }

    /// The node whose Postgres listens on `port`.
    pub fn node_by_port(&self, port: u16) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.pg_port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    /// `/cluster` from the first node whose agent runs, answers and reads
    /// etcd; from a node cut off from etcd (its view is as old as its last
    /// read) only when no node can read it.
    pub fn view(&mut self) -> Option<ClusterView> {
        let mut stale = None;
        for node in &mut self.nodes {
            if node.is_running() {
                if let Some(v) = node.cluster_view() {
                    if v.dcs_reachable {
                        return Some(v);
                    }
                    stale.get_or_insert(v);
                }
            }
        }
        stale
    }

    /// Polls `/cluster` until `pred` holds; panics with the last view on timeout.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&ClusterView) -> bool,
    ) -> ClusterView {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Some(v) = self.view() {
                if pred(&v) {
                    return v;
                }
                last = Some(v);
            }
            if Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting for {what}; last /cluster: {last:#?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A switchover from `from` to `to` through `from`'s API, retried
    /// while the leader does not yet see `to` fit (412); returns when done.
    pub fn switch_over(&self, from: &str, to: &str) {
        let api = self.node(from).api_addr();
        let body = format!(r#"{{"leader":"{from}","candidate":"{to}"}}"#);
        wait_until(
            &format!("a switchover from {from} to {to}"),
            Duration::from_secs(60),
            || match http_post(api, "/switchover", &body) {
                (200, _) => Some(()),
                (412, _) => {
                    std::thread::sleep(Duration::from_millis(500));
                    None
                }
                (status, answer) => panic!("switchover answered {status}: {answer}"),
            },
        );
    }

    /// `/status` of every running agent: each node's own, current snapshot.
    /// (`/cluster` shows other members as their etcd keys say, and the key
    /// of a SIGKILLed agent outlives it by up to a TTL.) `None` unless all answer.
    pub fn live_statuses(&mut self) -> Option<Vec<MemberView>> {
        let mut out = Vec::new();
        for node in &mut self.nodes {
            if node.is_running() {
                let (status, body) = http_get(node.api_addr(), "/status").ok()?;
                if status != 200 {
                    return None;
                }
                out.push(serde_json::from_str(&body).ok()?);
            }
        }
        Some(out)
    }

    /// Waits until every running agent reports on its own: one the leader
    /// and running primary, all others streaming replicas of that leader on
    /// its timeline.
    /// Returns `/cluster` as seen then.
    pub fn wait_healthy(&mut self, timeout: Duration) -> ClusterView {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Some(statuses) = self.live_statuses() {
                let primaries: Vec<&MemberView> = statuses
                    .iter()
                    .filter(|m| m.role == "primary" && m.state == "running" && m.leader)
                    .collect();
                let healthy = primaries.len() == 1
                    && statuses
                        .iter()
                        .all(|m| m.cluster_leader.as_deref() == Some(primaries[0].name.as_str()))
                    && statuses
                        .iter()
                        .filter(|m| m.name != primaries[0].name)
                        .all(|m| {
                            // A standby whose history diverged connects (and
                            // briefly shows "streaming") but stays on the old
                            // timeline: it does not follow the primary.
                            m.role == "replica"
                                && m.state == "streaming"
                                && m.timeline == primaries[0].timeline
                        });
                if healthy {
                    let replicas = statuses.len() - 1;
                    // /cluster converges too once the members' keys are rewritten.
                    return self.wait_for("/cluster to agree with /status", timeout, |v| {
                        v.is_healthy(replicas)
                    });
                }
                last = Some(statuses);
            }
            if Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting for a healthy cluster; last /status of each node: {last:#?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The node `/cluster` names as the running primary.
    pub fn primary(&mut self) -> &Node {
        let view = self.wait_for("a primary", Duration::from_secs(60), |v| {
            v.primaries().len() == 1
        });
        let name = view.primaries()[0].name.clone();
        self.node(&name)
    }

    /// SIGTERMs every running agent at once and waits up to `timeout` for
    /// them; returns how each of those exited (`None`: still running).
    pub fn sigterm_all(&mut self, timeout: Duration) -> Vec<(String, Option<ExitStatus>)> {
        let mut stopping = Vec::new();
        for node in &mut self.nodes {
            if node.is_running() {
                node.sigterm_no_wait();
                stopping.push(node.name.clone());
            }
        }
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        for name in stopping {
            let node = self.node_mut(&name);
            let status = node.wait_exit(deadline.saturating_duration_since(Instant::now()));
            out.push((name, status));
        }
        out
    }

    /// SIGTERMs every agent at once, waits up to `timeout` for all of them,
    /// SIGKILLs the rest and kills any Postgres left behind.
    pub fn stop_all(&mut self, timeout: Duration) {
        for node in &mut self.nodes {
            // A frozen agent (a test that failed mid-SIGSTOP) must hear the SIGTERM.
            node.sigcont();
            node.sigterm_no_wait();
        }
        let deadline = Instant::now() + timeout;
        for node in &mut self.nodes {
            node.stop_everything(deadline.saturating_duration_since(Instant::now()));
        }
    }

    /// Processes still running from this cluster's directory.
    pub fn leftover_processes(&self) -> Vec<(i32, String)> {
        processes_under(self.dir.path())
    }

    /// Panics, naming them, if processes from this cluster's directory still
    /// run after `timeout` (a killed child may take a moment to go).
    pub fn assert_no_leftovers(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.leftover_processes();
            if left.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                panic!("processes left running after every agent exited: {left:#?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in &self.nodes {
                eprintln!(
                    "----- {} agent log {} (last {LOG_TAIL_LINES} lines) -----\n{}",
                    node.name,
                    node.log.display(),
                    tail(&node.log, LOG_TAIL_LINES)
                );
            }
        }
        self.stop_all(Duration::from_secs(10));
        // Postmasters were stopped above; this catches anything else the agents
        // left (a fence guard, a pg_basebackup) before the directory goes.
        kill_processes_under(self.dir.path());
    }
}

// ---------------------------------------------------------------------------
// Fault injection and client-side observation for the failover tests
// ---------------------------------------------------------------------------

/// Whether `pid` is a live process (not gone, not a zombie waiting to be reaped).
pub fn process_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// A small current-thread runtime for one harness thread (writer, probe,
/// proxy): a stall of the test thread never holds them up.
fn thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A TCP forwarder on a free loopback port in front of etcd, one per node.
/// `cut()` closes every open connection and refuses new ones (accepts and
/// drops them) until `heal()`: the node loses etcd, the rest does not.
pub struct EtcdProxy {
    pub port: u16,
    cut: Arc<tokio::sync::watch::Sender<bool>>,
    shutdown: tokio_util::sync::CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl EtcdProxy {
    pub fn start(target: SocketAddr) -> EtcdProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy port");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let port = listener.local_addr().expect("proxy addr").port();
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let stop = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name(format!("etcd-proxy-{port}"))
            .spawn(move || {
                thread_runtime().block_on(forward(listener, target, cut_rx, stop));
            })
            .expect("spawn proxy thread");
        EtcdProxy {
            port,
            cut: Arc::new(cut),
            shutdown,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Closes all current connections and refuses new ones.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }
}

impl Drop for EtcdProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn forward(
    listener: TcpListener,
    target: SocketAddr,
    cut: tokio::sync::watch::Receiver<bool>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let mut inbound = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        if *cut.borrow() {
            drop(inbound);
            continue;
        }
        let mut cut = cut.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                return;
            };
            // Dropping both streams closes both connections.
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = cut.wait_for(|c| *c) => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// The table every [`Writer`] inserts into.
pub const WRITES_TABLE: &str = "pgha_writes";

/// Creates [`WRITES_TABLE`] through `node` (the primary).
pub fn create_writes_table(node: &Node) {
    create_writes_table_on_port(node.pg_port);
}

/// Creates [`WRITES_TABLE`] on the Postgres at 127.0.0.1:`port` (a primary
/// not run by pgha, e.g. Patroni's in the side-by-side benchmark).
pub fn create_writes_table_on_port(port: u16) {
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {WRITES_TABLE} (
             writer text NOT NULL,
             seq bigint NOT NULL,
             server_port int NOT NULL,
             timeline int NOT NULL,
             ts timestamptz NOT NULL DEFAULT clock_timestamp(),
             PRIMARY KEY (writer, seq))"
    );
    psql(port, &sql).unwrap_or_else(|e| panic!("port {port}: {sql}: {e}"));
}

/// The `seq`s of `writer`'s rows as the Postgres on `port` has them.
pub fn stored_seqs(port: u16, writer: &str) -> Result<HashSet<i64>, String> {
    let out = psql(
        port,
        &format!("SELECT seq FROM {WRITES_TABLE} WHERE writer = '{writer}'"),
    )?;
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.parse().map_err(|e| format!("bad seq {l:?}: {e}")))
        .collect()
}

/// What the server said about one acknowledged insert.
#[derive(Debug, Clone, PartialEq)]
pub struct Ack {
    /// When the client received the acknowledgement.
    pub at: Instant,
    /// `inet_server_port()` of the server that committed it.
    pub port: u16,
    /// Timeline of that server's WAL insert position at the time.
    pub timeline: u32,
    /// Server-side `clock_timestamp()` of the row, seconds since the epoch.
    pub server_epoch: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Acked(Ack),
    /// The statement failed with an ERROR: not committed.
    Rejected {
        at: Instant,
        error: String,
    },
    /// Sent, but no answer (connection lost, FATAL, timeout): it may or may
    /// not be committed.
    Unknown {
        at: Instant,
        error: String,
    },
}

/// One insert the writer sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub seq: i64,
    pub sent_at: Instant,
    pub outcome: Outcome,
}

impl Attempt {
    pub fn ack(&self) -> Option<&Ack> {
        match &self.outcome {
            Outcome::Acked(a) => Some(a),
            _ => None,
        }
    }
}

/// Everything one writer did.
#[derive(Debug, Clone, Default)]
pub struct WriterLog {
    pub writer: String,
    pub attempts: Vec<Attempt>,
    /// Connection attempts that failed (refused, read-only, timed out).
    pub connect_failures: Vec<(Instant, String)>,
}

impl WriterLog {
    pub fn acked(&self) -> impl Iterator<Item = (&Attempt, &Ack)> {
        self.attempts.iter().filter_map(|a| Some((a, a.ack()?)))
    }

    pub fn acked_count(&self) -> usize {
        self.acked().count()
    }

    pub fn unknown_count(&self) -> usize {
        self.attempts
            .iter()
            .filter(|a| matches!(a.outcome, Outcome::Unknown { .. }))
            .count()
    }

    /// The last acknowledgement received at or before `at`.
    pub fn last_ack_before(&self, at: Instant) -> Option<&Ack> {
        self.acked()
            .map(|(_, a)| a)
            .filter(|a| a.at <= at)
            .max_by_key(|a| a.at)
    }

    /// The first acknowledgement received after `at`.
    pub fn first_ack_after(&self, at: Instant) -> Option<&Ack> {
        self.acked()
            .map(|(_, a)| a)
            .filter(|a| a.at > at)
            .min_by_key(|a| a.at)
    }

    /// Client-seen write unavailability around `at`: from the last
    /// acknowledgement before it to the first one after it.
    pub fn outage_around(&self, at: Instant) -> Option<Duration> {
        Some(self.first_ack_after(at)?.at - self.last_ack_before(at)?.at)
    }

    /// Acknowledged inserts whose rows are not in `stored`.
    pub fn lost(&self, stored: &HashSet<i64>) -> Vec<i64> {
        self.acked()
            .map(|(a, _)| a.seq)
            .filter(|s| !stored.contains(s))
            .collect()
    }
}

/// A client that inserts a row into [`WRITES_TABLE`] every `every` through
/// one libpq connection string (multi-host with
/// `target_session_attrs=read-write`, or one node directly), reconnecting
/// on error, and records every attempt's outcome.
pub struct Writer {
    pub name: String,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<WriterLog>>,
    thread: Option<JoinHandle<()>>,
}

/// How long one connection attempt or one insert may take.
const WRITER_TIMEOUT: Duration = Duration::from_secs(2);

impl Writer {
    /// Writes to whichever of `ports` accepts writes, as an application
    /// with a multi-host connection string would.
    pub fn multi_host(name: &str, ports: &[u16], every: Duration) -> Writer {
        let hosts = vec!["127.0.0.1"; ports.len()].join(",");
        let ports = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        Writer::start(
            name,
            &format!("host={hosts} port={ports} user=postgres password={SUPERUSER_PASSWORD} dbname=postgres target_session_attrs=read-write connect_timeout=1"),
            every,
        )
    }

    /// Writes to one node only, whatever its role: shows whether that node
    /// takes writes.
    pub fn direct(name: &str, port: u16, every: Duration) -> Writer {
        Writer::start(
            name,
            &format!("host=127.0.0.1 port={port} user=postgres password={SUPERUSER_PASSWORD} dbname=postgres connect_timeout=1"),
            every,
        )
    }

    /// Like [`Writer::direct`], but with a new connection for every insert
    /// (an application without a pool, or a pool's new connections), each
    /// allowed `connect_within` to connect: shows whether new connections
    /// are held or refused across a role change.
    pub fn reconnecting(
        name: &str,
        port: u16,
        every: Duration,
        connect_within: Duration,
    ) -> Writer {
        Writer::spawn(
            name,
            &format!("host=127.0.0.1 port={port} user=postgres password={SUPERUSER_PASSWORD} dbname=postgres"),
            every,
            Sessions::OnePerWrite { connect_within },
        )
    }

    fn start(name: &str, conninfo: &str, every: Duration) -> Writer {
        Writer::spawn(name, conninfo, every, Sessions::Kept)
    }

    fn spawn(name: &str, conninfo: &str, every: Duration, sessions: Sessions) -> Writer {
        let config: tokio_postgres::Config = conninfo.parse().expect("connection string");
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(WriterLog {
            writer: name.to_string(),
            ..WriterLog::default()
        }));
        let thread = {
            let (stop, log, name) = (stop.clone(), log.clone(), name.to_string());
            std::thread::Builder::new()
                .name(format!("writer-{name}"))
                .spawn(move || {
                    thread_runtime().block_on(write_loop(config, name, every, sessions, stop, log));
                })
                .expect("spawn writer thread")
        };
        Writer {
            name: name.to_string(),
            stop,
            log,
            thread: Some(thread),
        }
    }

    /// A copy of the log so far.
    pub fn log(&self) -> WriterLog {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until the writer has an acknowledgement received after `after`.
    pub fn wait_for_ack_after(&self, after: Instant, timeout: Duration) -> Ack {
        wait_until(
            &format!("writer {}: an acknowledged write", self.name),
            timeout,
            || self.log().first_ack_after(after).cloned(),
        )
    }

    /// Waits until the writer has an acknowledgement from the server on
    /// `port` received after `after`.
    pub fn wait_for_ack_on(&self, port: u16, after: Instant, timeout: Duration) -> Ack {
        wait_until(
            &format!("writer {}: a write acknowledged by port {port}", self.name),
            timeout,
            || {
                self.log()
                    .acked()
                    .map(|(_, a)| a)
                    .find(|a| a.at > after && a.port == port)
                    .cloned()
            },
        )
    }

    /// Stops the writer (the insert in flight finishes) and returns its log.
    pub fn stop(mut self) -> WriterLog {
        self.halt();
        self.log()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.halt();
    }
}

/// How a writer uses its connections.
#[derive(Debug, Clone, Copy)]
enum Sessions {
    /// One connection, kept until it fails (connects within WRITER_TIMEOUT).
    Kept,
    /// A new connection for every insert.
    OnePerWrite { connect_within: Duration },
}

async fn write_loop(
    config: tokio_postgres::Config,
    name: String,
    every: Duration,
    sessions: Sessions,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<WriterLog>>,
) {
    let connect_within = match sessions {
        Sessions::Kept => WRITER_TIMEOUT,
        Sessions::OnePerWrite { connect_within } => connect_within,
    };
    let insert = format!(
        "INSERT INTO {WRITES_TABLE} (writer, seq, server_port, timeline)
         VALUES ($1, $2, inet_server_port(),
                 ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int)
         RETURNING server_port, timeline, extract(epoch FROM ts)::float8"
    );
    let record =
        |f: &mut dyn FnMut(&mut WriterLog)| f(&mut log.lock().unwrap_or_else(|p| p.into_inner()));
    let mut session: Option<(tokio_postgres::Client, tokio_postgres::Statement)> = None;
    let mut seq: i64 = 0;
    let mut next = tokio::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep_until(next).await;
        next = (next + every).max(tokio::time::Instant::now());
        let (client, statement) = match &session {
            Some(s) => s,
            None => {
                let connected = tokio::time::timeout(connect_within, async {
                    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                    tokio::spawn(connection);
                    let statement = client.prepare(&insert).await?;
                    Ok::<_, tokio_postgres::Error>((client, statement))
                })
                .await;
                match connected {
                    Ok(Ok(s)) => session.insert(s),
                    Ok(Err(e)) => {
                        record(&mut |l| l.connect_failures.push((Instant::now(), e.to_string())));
                        continue;
                    }
                    Err(_) => {
                        record(&mut |l| {
                            l.connect_failures
                                .push((Instant::now(), "timed out".into()))
                        });
                        continue;
                    }
                }
            }
        };
        seq += 1;
        let sent_at = Instant::now();
        let answer =
            tokio::time::timeout(WRITER_TIMEOUT, client.query_one(statement, &[&name, &seq])).await;
        let at = Instant::now();
        let outcome = match answer {
            Ok(Ok(row)) => Outcome::Acked(Ack {
                at,
                port: row.get::<_, i32>(0) as u16,
                timeline: row.get::<_, i32>(1) as u32,
                server_epoch: row.get(2),
            }),
            Ok(Err(e)) => {
                // An ERROR aborts the statement; a FATAL or a lost connection
                // leaves the outcome open.
                let rejected =
                    e.as_db_error().is_some_and(|d| d.severity() == "ERROR") && !client.is_closed();
                if rejected {
                    Outcome::Rejected {
                        at,
                        error: e.to_string(),
                    }
                } else {
                    session = None;
                    Outcome::Unknown {
                        at,
                        error: e.to_string(),
                    }
                }
            }
            Err(_) => {
                session = None;
                Outcome::Unknown {
                    at,
                    error: "timed out".into(),
                }
            }
        };
        record(&mut |l| {
            l.attempts.push(Attempt {
                seq,
                sent_at,
                outcome: outcome.clone(),
            })
        });
        if matches!(sessions, Sessions::OnePerWrite { .. }) {
            session = None;
        }
    }
}

/// One round of [`RoleProbe`]: `pg_is_in_recovery()` of each port, asked at
/// the same moment (`None`: no answer).
#[derive(Debug, Clone)]
pub struct ProbeRound {
    pub at: Instant,
    pub in_recovery: Vec<(u16, Option<bool>)>,
}

impl ProbeRound {
    /// Ports that answered `pg_is_in_recovery() = false`: writable primaries.
    pub fn primaries(&self) -> Vec<u16> {
        self.in_recovery
            .iter()
            .filter(|(_, r)| *r == Some(false))
            .map(|(p, _)| *p)
            .collect()
    }
}

/// Asks every node `SELECT pg_is_in_recovery()` every `every`, all nodes in
/// parallel over kept-open connections, and records each round.
pub struct RoleProbe {
    stop: Arc<AtomicBool>,
    rounds: Arc<Mutex<Vec<ProbeRound>>>,
    thread: Option<JoinHandle<()>>,
}

impl RoleProbe {
    pub fn start(ports: &[u16], every: Duration) -> RoleProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, rounds, ports) = (stop.clone(), rounds.clone(), ports.to_vec());
            std::thread::Builder::new()
                .name("role-probe".into())
                .spawn(move || {
                    thread_runtime().block_on(probe_loop(ports, every, stop, rounds));
                })
                .expect("spawn probe thread")
        };
        RoleProbe {
            stop,
            rounds,
            thread: Some(thread),
        }
    }

    pub fn rounds(&self) -> Vec<ProbeRound> {
        self.rounds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The first round after `since` in which `port` answered as a primary.
    pub fn first_primary_after(&self, port: u16, since: Instant) -> Option<Instant> {
        self.rounds()
            .iter()
            .find(|r| r.at >= since && r.primaries().contains(&port))
            .map(|r| r.at)
    }

    pub fn stop(mut self) -> Vec<ProbeRound> {
        self.halt();
        self.rounds()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RoleProbe {
    fn drop(&mut self) {
        self.halt();
    }
}

async fn probe_loop(
    ports: Vec<u16>,
    every: Duration,
    stop: Arc<AtomicBool>,
    rounds: Arc<Mutex<Vec<ProbeRound>>>,
) {
    let limit = Duration::from_millis(500);
    let mut clients: Vec<Option<tokio_postgres::Client>> = ports.iter().map(|_| None).collect();
    let mut next = tokio::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep_until(next).await;
        next = (next + every).max(tokio::time::Instant::now());
        let at = Instant::now();
        let asks = ports.iter().zip(clients.iter_mut()).map(|(&port, slot)| async move {
            if slot.is_none() {
                let conninfo = format!("host=127.0.0.1 port={port} user=postgres password={SUPERUSER_PASSWORD} dbname=postgres connect_timeout=1");
                let config: tokio_postgres::Config = conninfo.parse().expect("connection string");
                if let Ok(Ok((client, connection))) =
                    tokio::time::timeout(limit, config.connect(tokio_postgres::NoTls)).await
                {
                    tokio::spawn(connection);
                    *slot = Some(client);
                }
            }
            let client = slot.as_ref()?;
            let answer =
                tokio::time::timeout(limit, client.query_one("SELECT pg_is_in_recovery()", &[]))
                    .await;
            match answer {
                Ok(Ok(row)) => Some(row.get::<_, bool>(0)),
                _ => {
                    *slot = None;
                    None
                }
            }
        });
        let answers = futures_util::future::join_all(asks).await;
        let round = ProbeRound {
            at,
            in_recovery: ports.iter().copied().zip(answers).collect(),
        };
        rounds.lock().unwrap_or_else(|p| p.into_inner()).push(round);
    }
}
