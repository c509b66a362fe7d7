//! Patroni clusters for the side-by-side benchmark (`tests/bench_patroni.rs`):
//! three Patroni agents from a Python virtual environment, run as the
//! `postgres` OS user on the harness's etcd, each with its own loopback
//! ports and data directory. Every agent and Postgres started is stopped on
//! drop, also when the benchmark panics.

#![allow(dead_code)]

use std::fs::{self, File};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::{Pid, User};
use serde_json::Value;

use crate::common::{
    free_port, http_get, http_post, kill_postmaster, kill_processes_under, live_postmaster,
    process_alive, tail, wait_until, Etcd, TestDir, PG_BIN, REPLICATION_PASSWORD,
    SUPERUSER_PASSWORD,
};

/// Patroni's etcd key prefix, apart from pgha's "/pgha".
pub const NAMESPACE: &str = "/patroni-bench/";

/// Lines of each log printed when a benchmark fails.
const LOG_TAIL_LINES: usize = 60;

/// Where `bench/patroni.sh` installs Patroni unless PATRONI_VENV says
/// otherwise: outside /root, which the `postgres` user cannot enter.
pub const DEFAULT_VENV: &str = "/var/tmp/pgha-bench/patroni-venv";

pub fn venv() -> PathBuf {
    std::env::var_os("PATRONI_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_VENV))
}

/// `patroni --version` of the virtual environment, e.g. "patroni 4.1.5".
pub fn version() -> String {
    let out = Command::new(venv().join("bin/patroni"))
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {}/bin/patroni: {e} (bench/patroni.sh installs it)",
                venv().display()
            )
        });
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Patroni's timing keys (bootstrap DCS settings).
#[derive(Debug, Clone, Copy)]
pub struct PatroniTiming {
    pub ttl_s: u64,
    pub loop_wait_s: u64,
    pub retry_timeout_s: u64,
}

impl PatroniTiming {
    /// Patroni's documented defaults.
    pub const DEFAULT: PatroniTiming = PatroniTiming {
        ttl_s: 30,
        loop_wait_s: 10,
        retry_timeout_s: 10,
    };
    /// The lowest TTL Patroni accepts (20 s). loop_wait stays at its default;
    /// retry_timeout comes down to 5 s so that loop_wait + 2 × retry_timeout
    /// still fits in the TTL, as Patroni requires.
    pub const LOWEST_TTL: PatroniTiming = PatroniTiming {
        ttl_s: 20,
        loop_wait_s: 10,
        retry_timeout_s: 5,
    };
}

/// One member as Patroni's `GET /cluster` shows it.
#[derive(Debug, Clone)]
pub struct PatroniMember {
    pub name: String,
    /// "leader", "sync_standby", "replica", ...
    pub role: String,
    /// "running", "streaming", "starting", ...
    pub state: String,
    pub timeline: Option<u64>,
    pub pg_port: u16,
}

pub fn members(view: &Value) -> Vec<PatroniMember> {
    view["members"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| PatroniMember {
                    name: m["name"].as_str().unwrap_or_default().to_string(),
                    role: m["role"].as_str().unwrap_or_default().to_string(),
                    state: m["state"].as_str().unwrap_or_default().to_string(),
                    timeline: m["timeline"].as_u64(),
                    pg_port: m["port"].as_u64().unwrap_or_default() as u16,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One Patroni agent: its directory, config, log and process.
pub struct PatroniNode {
    pub name: String,
    pub pg_port: u16,
    pub api_port: u16,
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    agent: Option<Child>,
}

impl PatroniNode {
    pub fn api_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.api_port))
    }

    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// PID of the Patroni (Python) process: setpriv execs it, so it is
    /// the child we spawned.
    pub fn agent_pid(&self) -> Option<i32> {
        self.agent.as_ref().map(|c| c.id() as i32)
    }

    pub fn postmaster_pid(&self) -> Option<i32> {
        live_postmaster(&self.data_dir)
    }

    fn spawn(&mut self) {
        assert!(self.agent.is_none(), "{}: agent already running", self.name);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("patroni log");
        // Postgres refuses to run as root, and Patroni runs it as itself.
        let child = Command::new("setpriv")
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(venv().join("bin/patroni"))
            .arg(&self.config)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", &self.dir)
            .env("LC_ALL", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start patroni");
        self.agent = Some(child);
    }

    /// SIGKILLs Patroni and its whole Postgres (postmaster and backends).
    pub fn kill9_with_postgres(&mut self) {
        let postmaster = self
            .postmaster_pid()
            .unwrap_or_else(|| panic!("{}: no running postmaster", self.name));
        let mut child = self
            .agent
            .take()
            .unwrap_or_else(|| panic!("{}: agent not running", self.name));
        let _ = child.kill();
        // Patroni starts the postmaster in a session of its own: the group
        // takes the backends too.
        let _ = killpg(Pid::from_raw(postmaster), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(postmaster), Signal::SIGKILL);
        let _ = child.wait();
        wait_until(
            &format!("{}: postmaster {postmaster} to die", self.name),
            Duration::from_secs(10),
            || (!process_alive(postmaster)).then_some(()),
        );
    }

    /// Starts Patroni again on the same config, data and log.
    pub fn restart(&mut self) {
        self.spawn();
    }

    fn stop_everything(&mut self, timeout: Duration) {
        if let Some(mut child) = self.agent.take() {
            let deadline = Instant::now() + timeout;
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() >= deadline {
                    eprintln!("{}: patroni ignored SIGTERM: SIGKILL", self.name);
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        kill_postmaster(&self.data_dir);
    }
}

/// A Patroni cluster of `n` members on a shared etcd.
pub struct PatroniCluster {
    pub scope: String,
    pub nodes: Vec<PatroniNode>,
    dir: TestDir,
}

impl PatroniCluster {
    /// Writes the configs and starts all members in one go.
    pub fn start_on(etcd: &Etcd, n: usize, scope: &str, timing: PatroniTiming) -> PatroniCluster {
        let dir = TestDir::new("pgha-patroni-");
        let postgres = User::from_name("postgres")
            .expect("getpwnam")
            .expect("OS user postgres");
        let mut nodes = Vec::new();
        for i in 1..=n {
            let name = format!("p{i}");
            let node_dir = dir.path().join(&name);
            fs::create_dir_all(&node_dir).expect("node dir");
            fs::set_permissions(&node_dir, fs::Permissions::from_mode(0o700)).expect("chmod");
            std::os::unix::fs::chown(
                &node_dir,
                Some(postgres.uid.as_raw()),
                Some(postgres.gid.as_raw()),
            )
            .expect("chown node dir");
            let (pg_port, api_port) = (free_port(), free_port());
            let node = PatroniNode {
                pg_port,
                api_port,
                data_dir: node_dir.join("data"),
                config: node_dir.join("patroni.yml"),
                log: node_dir.join("patroni.log"),
                dir: node_dir,
                name,
                agent: None,
            };
            let yaml = render_config(&node, scope, etcd.client_addr(), timing);
            fs::write(&node.config, yaml).expect("write patroni config");
            std::os::unix::fs::chown(
                &node.config,
                Some(postgres.uid.as_raw()),
                Some(postgres.gid.as_raw()),
            )
            .expect("chown config");
            File::create(&node.log).expect("patroni log");
            nodes.push(node);
        }
        let mut cluster = PatroniCluster {
            scope: scope.to_string(),
            nodes,
            dir,
        };
        for node in &mut cluster.nodes {
            node.spawn();
        }
        cluster
    }

    pub fn node(&self, name: &str) -> &PatroniNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no patroni node {name}"))
    }

    pub fn node_mut(&mut self, name: &str) -> &mut PatroniNode {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no patroni node {name}"))
    }

    pub fn pg_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.pg_port).collect()
    }

    /// `GET /cluster` from the first running member that answers.
    pub fn view(&self) -> Option<Value> {
        self.nodes
            .iter()
            .filter(|n| n.agent.is_some())
            .find_map(|n| {
                let (status, body) = http_get(n.api_addr(), "/cluster").ok()?;
                (status == 200)
                    .then(|| serde_json::from_str(&body).ok())
                    .flatten()
            })
    }

    /// Waits for one running leader and every other member streaming on its
    /// timeline (and, with `need_sync`, one of them its synchronous
    /// standby). Returns the members then.
    pub fn wait_healthy(&self, timeout: Duration, need_sync: bool) -> Vec<PatroniMember> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Some(view) = self.view() {
                let ms = members(&view);
                let leaders: Vec<&PatroniMember> = ms
                    .iter()
                    .filter(|m| m.role == "leader" && m.state == "running")
                    .collect();
                let healthy = leaders.len() == 1
                    && ms.len() == self.nodes.len()
                    && ms.iter().filter(|m| m.name != leaders[0].name).all(|m| {
                        (m.role == "replica" || m.role == "sync_standby")
                            && m.state == "streaming"
                            && m.timeline == leaders[0].timeline
                    })
                    && (!need_sync || ms.iter().any(|m| m.role == "sync_standby"));
                if healthy {
                    return ms;
                }
                last = Some(view);
            }
            if Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting for a healthy Patroni cluster; last /cluster: {last:#?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asks the leader's REST API for a switchover to `candidate`; Patroni
    /// answers once it is done.
    pub fn switchover(&self, leader: &str, candidate: &str) -> (u16, String) {
        http_post(
            self.node(leader).api_addr(),
            "/switchover",
            &format!(r#"{{"leader":"{leader}","candidate":"{candidate}"}}"#),
        )
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in &self.nodes {
                eprintln!(
                    "----- patroni {} log {} (last {LOG_TAIL_LINES} lines) -----\n{}",
                    node.name,
                    node.log.display(),
                    tail(&node.log, LOG_TAIL_LINES)
                );
            }
        }
        // SIGTERM: Patroni stops its Postgres (fast shutdown) and exits.
        for node in &self.nodes {
            if let Some(pid) = node.agent_pid() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &mut self.nodes {
            node.stop_everything(deadline.saturating_duration_since(Instant::now()));
        }
        kill_processes_under(self.dir.path());
    }
}

/// Patroni's YAML for one member. Synchronous mode on, slots and pg_rewind as
/// in a typical production setup; the same passwords as the pgha clusters,
/// so one writer works against either.
fn render_config(node: &PatroniNode, scope: &str, etcd: SocketAddr, t: PatroniTiming) -> String {
    format!(
        r#"scope: {scope}
namespace: {NAMESPACE}
name: {name}
log:
  level: INFO
restapi:
  listen: 127.0.0.1:{api}
  connect_address: 127.0.0.1:{api}
etcd3:
  hosts: {etcd}
bootstrap:
  dcs:
    ttl: {ttl}
    loop_wait: {loop_wait}
    retry_timeout: {retry}
    maximum_lag_on_failover: 1048576
    synchronous_mode: true
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_log_hints: "on"
        max_wal_senders: 10
        max_replication_slots: 10
  initdb:
    - data-checksums
    - encoding: UTF8
    - locale: C.UTF-8
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {data}
  bin_dir: {PG_BIN}
  pgpass: {dir}/pgpass
  authentication:
    superuser:
      username: postgres
      password: {SUPERUSER_PASSWORD}
    replication:
      username: replicator
      password: {REPLICATION_PASSWORD}
  pg_hba:
    - local all all trust
    - host replication replicator 127.0.0.1/32 scram-sha-256
    - host all all 127.0.0.1/32 scram-sha-256
  parameters:
    unix_socket_directories: {dir}
"#,
        name = node.name,
        api = node.api_port,
        pg = node.pg_port,
        ttl = t.ttl_s,
        loop_wait = t.loop_wait_s,
        retry = t.retry_timeout_s,
        data = node.data_dir.display(),
        dir = node.dir.display(),
    )
}
