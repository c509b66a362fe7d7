//! Clients of a cluster through a proxy: HAProxy configured as Patroni
//! users configure it, pgha's own routers, and pgbench.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{free_port, psql, Node, Options, TestDir, Timing, PG_BIN, SUPERUSER_PASSWORD};

/// `haproxy`, or `None` after saying loudly that the check is skipped.
pub fn haproxy() -> Option<PathBuf> {
    for p in [
        "/usr/sbin/haproxy",
        "/usr/bin/haproxy",
        "/usr/local/sbin/haproxy",
    ] {
        if Path::new(p).exists() {
            return Some(PathBuf::from(p));
        }
    }
    eprintln!("\n!!!!! haproxy not found: SKIPPING the HAProxy tests (apt-get install haproxy; scripts/test installs it) !!!!!\n");
    None
}

/// An HAProxy in front of a cluster, configured as Patroni users do:
/// one port reaching the primary, one reaching the replicas.
pub struct HaProxy {
    pub primary_port: u16,
    pub replica_port: u16,
    child: Child,
    log: PathBuf,
    _dir: TestDir,
}

impl HaProxy {
    pub fn start(binary: &Path, nodes: &[Node]) -> HaProxy {
        HaProxy::start_with(binary, nodes, 200, 100)
    }

    /// With `maxconn` in `global` and `server_maxconn` on every server
    /// line (HAProxy queues connections over it).
    pub fn start_with(
        binary: &Path,
        nodes: &[Node],
        maxconn: usize,
        server_maxconn: usize,
    ) -> HaProxy {
        let dir = TestDir::new("pgha-haproxy-");
        let (primary_port, replica_port) = (free_port(), free_port());
        let servers = |check: &str| {
            nodes
                .iter()
                .map(|n| {
                    format!(
                        "    server {} 127.0.0.1:{} maxconn {server_maxconn} check port {} # {check}\n",
                        n.name, n.pg_port, n.api_port
                    )
                })
                .collect::<String>()
        };
        let cfg = format!(
            "global\n    maxconn {maxconn}\n\n\
             defaults\n    mode tcp\n    retries 2\n    timeout connect 2s\n    timeout client 30m\n    timeout server 30m\n    timeout check 2s\n\n\
             listen primary\n    bind 127.0.0.1:{primary_port}\n    option httpchk GET /primary\n    http-check expect status 200\n\
             \x20   default-server inter 1s fall 2 rise 1 on-marked-down shutdown-sessions\n{}\n\
             listen replicas\n    bind 127.0.0.1:{replica_port}\n    balance roundrobin\n    option httpchk GET /replica\n    http-check expect status 200\n\
             \x20   default-server inter 1s fall 2 rise 1 on-marked-down shutdown-sessions\n{}",
            servers("/primary"),
            servers("/replica"),
        );
        let path = dir.path().join("haproxy.cfg");
        fs::write(&path, cfg).unwrap();
        let log = dir.path().join("haproxy.log");
        let out = fs::File::create(&log).unwrap();
        let child = Command::new(binary)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start haproxy");
        HaProxy {
            primary_port,
            replica_port,
            child,
            log,
            _dir: dir,
        }
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- haproxy log -----\n{}", super::tail(&self.log, 40));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pg_is_in_recovery()|inet_server_port()` through a proxy port.
pub fn where_am_i(port: u16) -> Option<(bool, u16)> {
    let out = psql(
        port,
        "SELECT pg_is_in_recovery()::text || '|' || inet_server_port()",
    )
    .ok()?;
    let (recovery, server_port) = out.split_once('|')?;
    Some((recovery == "true", server_port.parse().ok()?))
}

impl HaProxy {
    /// The pid of the HAProxy process.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

/// Each node's router listeners (read-write, read-only), by node name.
pub struct Routers {
    pub rw: Vec<(String, u16)>,
    pub ro: Vec<(String, u16)>,
}

impl Routers {
    pub fn rw(&self, node: &str) -> u16 {
        self.rw.iter().find(|(n, _)| n == node).expect("node").1
    }
    pub fn ro(&self, node: &str) -> u16 {
        self.ro.iter().find(|(n, _)| n == node).expect("node").1
    }
}

pub fn with_routers(n: usize) -> (Options, Routers) {
    let mut opts = Options {
        timing: Timing::FAST,
        ..Options::default()
    };
    let mut routers = Routers {
        rw: Vec::new(),
        ro: Vec::new(),
    };
    for i in 1..=n {
        let name = format!("n{i}");
        let (rw, ro) = (free_port(), free_port());
        opts.node_toml.insert(
            name.clone(),
            format!(
                "[router]\nenabled = true\nlisten = \"127.0.0.1:{rw}\"\nreplica_listen = \"127.0.0.1:{ro}\"\nhold_timeout = \"10s\"\n"
            ),
        );
        routers.rw.push((name.clone(), rw));
        routers.ro.push((name, ro));
    }
    (opts, routers)
}

pub fn pgbench(port: u16, args: &[&str]) -> Result<String, String> {
    let out = Command::new(Path::new(PG_BIN).join("pgbench"))
        .args(["-h", "127.0.0.1", "-U", "postgres"])
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .arg("postgres")
        .env("PGPASSWORD", SUPERUSER_PASSWORD)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running pgbench: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// `number of transactions actually processed: N` of a pgbench report.
pub fn processed(report: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

pub type Landing = (Instant, Option<(bool, u16)>);

/// New connections through one HAProxy port, from a few threads each
/// opening one every `every` (a connection's authentication takes
/// longer than that in a debug build), each asking where it landed.
pub struct ProxyClients {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<Landing>>>,
}

impl ProxyClients {
    const THREADS: usize = 3;

    pub fn start(port: u16, every: Duration) -> ProxyClients {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..Self::THREADS)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || connect_until(port, every, &stop))
            })
            .collect();
        ProxyClients { stop, threads }
    }

    pub fn stop(&mut self) -> Vec<Landing> {
        self.stop.store(true, Ordering::Relaxed);
        let mut landings: Vec<Landing> = self
            .threads
            .drain(..)
            .flat_map(|t| t.join().expect("client thread"))
            .collect();
        landings.sort_by_key(|(at, _)| *at);
        landings
    }
}

impl Drop for ProxyClients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub fn connect_until(port: u16, every: Duration, stop: &AtomicBool) -> Vec<Landing> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let config: tokio_postgres::Config = format!(
        "host=127.0.0.1 port={port} user=postgres password={} dbname=postgres connect_timeout=2",
        SUPERUSER_PASSWORD
    )
    .parse()
    .expect("connection string");
    let mut landings = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let round = Instant::now();
        let landed = runtime.block_on(async {
            let limit = Duration::from_secs(2);
            let (client, connection) =
                tokio::time::timeout(limit, config.connect(tokio_postgres::NoTls))
                    .await
                    .ok()?
                    .ok()?;
            tokio::spawn(connection);
            let sql = "SELECT pg_is_in_recovery(), inet_server_port()";
            let row = tokio::time::timeout(limit, client.query_one(sql, &[]))
                .await
                .ok()?
                .ok()?;
            Some((row.get::<_, bool>(0), row.get::<_, i32>(1) as u16))
        });
        landings.push((Instant::now(), landed));
        std::thread::sleep(every.saturating_sub(round.elapsed()));
    }
    landings
}
