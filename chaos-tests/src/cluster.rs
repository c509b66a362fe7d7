//! The topology under test: docker/compose.yml (3 etcd members, 3 pgha nodes,
//! HAProxy) brought up under a project name of its own, with an override that
//! shortens the timing and sets the synchronous mode. The image is built the
//! way tests/docker.rs builds it: docker/base-image.sh (Debian 12 from the
//! host's apt mirror, no registry), then docker/Dockerfile's stages with the
//! host-built pgha binary. Drop brings the project down with its volumes and
//! removes the per-run image, also on panic.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub const NODES: [&str; 3] = ["n1", "n2", "n3"];
pub const ETCDS: [&str; 3] = ["etcd1", "etcd2", "etcd3"];
pub const SUPERUSER_PASSWORD: &str = "chaos-superuser";
pub const API_TOKEN: &str = "chaos-operator-token";
/// Postgres in the image (its 5432 belongs to the router).
pub const PG_PORT: u16 = 5433;
/// The router's read-write listener in the image.
pub const ROUTER_PORT: u16 = 5432;

/// Timing the nodes run with: short, so a scenario costs seconds, within
/// the config's rule loop_wait + 2 x retry_timeout <= ttl.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub ttl: Duration,
    pub loop_wait: Duration,
    pub retry_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            ttl: Duration::from_secs(5),
            loop_wait: Duration::from_secs(1),
            retry_timeout: Duration::from_secs(2),
        }
    }
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("chaos-tests lives in the workspace")
        .to_path_buf()
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs `cmd`, returns its trimmed stdout, or an error with its output.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = run(cmd);
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn docker(args: &[&str]) -> Command {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    cmd
}

pub fn docker_answers() -> bool {
    Command::new("docker")
        .arg("info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn quiet_ok(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `docker compose` (v2) if the CLI has it, else `docker-compose` (v1).
fn compose_program() -> Result<Vec<String>> {
    if quiet_ok("docker", &["compose", "version"]) {
        return Ok(vec!["docker".into(), "compose".into()]);
    }
    if quiet_ok("docker-compose", &["version"]) {
        return Ok(vec!["docker-compose".into()]);
    }
    bail!("a Docker engine answers but neither `docker compose` nor `docker-compose` runs")
}

/// Polls `probe` until it returns Some, or fails after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Container addresses as Docker reports them now. A container that was
/// stopped and started or reconnected may come back with another address,
/// so the clients take them from here at every (re)connection.
#[derive(Clone, Default)]
pub struct AddressBook(Arc<Mutex<HashMap<String, IpAddr>>>);

impl AddressBook {
    pub fn get(&self, node: &str) -> Option<IpAddr> {
        self.0.lock().unwrap().get(node).copied()
    }
    fn set(&self, node: &str, ip: Option<IpAddr>) {
        let mut map = self.0.lock().unwrap();
        match ip {
            Some(ip) => map.insert(node.to_string(), ip),
            None => map.remove(node),
        };
    }
}

/// One compose project: the cluster of a suite run.
pub struct Cluster {
    pub name: String,
    program: Vec<String>,
    env: Vec<(String, String)>,
    override_file: PathBuf,
    images: Vec<String>,
    pub primary_port: u16,
    pub timing: Timing,
    pub sync_mode: String,
    containers: HashMap<String, String>,
    pub addresses: AddressBook,
    refresher: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    network: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The pgha binary the image gets: `PGHA_BIN`, else the workspace's
/// target/release or target/debug build, whichever is newer.
pub fn pgha_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("PGHA_BIN") {
        return Ok(PathBuf::from(p));
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("target"));
    let newest = ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("pgha"))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max();
    match newest {
        Some((_, p)) => Ok(p),
        None => bail!(
            "no pgha binary under {}: run `cargo build --bin pgha` first or set PGHA_BIN",
            target.display()
        ),
    }
}

impl Cluster {
    /// Builds the images and brings the cluster up with one primary and a
    /// synchronous standby (when `sync_mode` is not off).
    pub fn start(timing: Timing, sync_mode: &str) -> Result<Cluster> {
        let program = compose_program()?;
        let started = Instant::now();
        let base = run_ok(&mut Command::new(repo().join("docker/base-image.sh")))
            .context("docker/base-image.sh")?;
        let suffix = format!(
            "{}{:04x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
                & 0xffff
        );
        let name = format!("pghachaos{suffix}");
        let cache_tag = base.rsplit(':').next().unwrap_or("latest").to_string();
        // Shared with tests/docker.rs: the stages without the binary.
        let tools_image = format!("pgha-test-tools:{cache_tag}");
        let runtime_image = format!("pgha-test-runtime:{cache_tag}");
        let image = format!("pgha-chaos:{name}");

        let binary = pgha_binary()?;
        let dest = repo().join("docker/dist/pgha");
        let stripped = quiet_ok(
            "strip",
            &[
                "-o",
                dest.to_str().unwrap(),
                binary.to_str().context("binary path")?,
            ],
        );
        if !stripped {
            std::fs::copy(&binary, &dest).context("copy pgha into docker/dist")?;
        }
        for (target, tag) in [
            ("cluster-tools", &tools_image),
            ("runtime", &runtime_image),
            ("pgha-host", &image),
        ] {
            run_ok(
                docker(&[
                    "build",
                    "-q",
                    "-f",
                    "docker/Dockerfile",
                    "--target",
                    target,
                    "--build-arg",
                    &format!("BASE_IMAGE={base}"),
                    "--build-arg",
                    "PGHA_BINARY=host",
                    "-t",
                    tag,
                    ".",
                ])
                .current_dir(repo()),
            )?;
        }
        eprintln!(
            "chaos: image {image} built on {base} in {:.0} s",
            started.elapsed().as_secs_f64()
        );

        let override_file = std::env::temp_dir().join(format!("{name}-override.yml"));
        std::fs::write(&override_file, override_yaml(&timing, sync_mode))?;
        let primary_port = free_port();
        let mut cluster = Cluster {
            name: name.clone(),
            program,
            env: vec![
                ("PGHA_IMAGE".into(), image.clone()),
                ("PGHA_TOOLS_IMAGE".into(), tools_image),
                ("BASE_IMAGE".into(), base),
                ("PGHA_BINARY".into(), "host".into()),
                ("PGHA_SUPERUSER_PASSWORD".into(), SUPERUSER_PASSWORD.into()),
                ("PGHA_API_TOKEN".into(), API_TOKEN.into()),
                ("PGHA_PRIMARY_PORT".into(), primary_port.to_string()),
                ("PGHA_REPLICAS_PORT".into(), free_port().to_string()),
                (
                    "PGHA_SUBNET_V6".into(),
                    format!("fd00:7067:6863:{:x}::/64", std::process::id() & 0xffff),
                ),
            ],
            override_file,
            images: vec![image],
            primary_port,
            timing,
            sync_mode: sync_mode.to_string(),
            containers: HashMap::new(),
            addresses: AddressBook::default(),
            refresher: None,
            network: format!("{name}_pgha"),
        };
        let up_started = Instant::now();
        run_ok(&mut cluster.compose(&["up", "-d", "--no-build"]))
            .context("compose up (an IPv6 network needs a daemon that allows --ipv6 networks)")?;
        for service in NODES.iter().chain(ETCDS.iter()).chain(["haproxy"].iter()) {
            let id = run_ok(&mut cluster.compose(&["ps", "-q", service]))?;
            if id.is_empty() {
                bail!("no container for service {service}");
            }
            cluster.containers.insert(service.to_string(), id);
        }
        cluster.start_refresher();
        eprintln!(
            "chaos: compose project {name} up in {:.0} s",
            up_started.elapsed().as_secs_f64()
        );
        Ok(cluster)
    }

    pub fn compose(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.program[0]);
        cmd.args(&self.program[1..])
            .args(["-p", &self.name, "-f"])
            .arg(repo().join("docker/compose.yml"))
            .arg("-f")
            .arg(&self.override_file)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    pub fn container(&self, service: &str) -> &str {
        &self.containers[service]
    }

    pub fn network(&self) -> &str {
        &self.network
    }

    fn start_refresher(&mut self) {
        let stop = Arc::new(AtomicBool::new(false));
        let book = self.addresses.clone();
        let ids: Vec<(String, String)> = NODES
            .iter()
            .map(|n| (n.to_string(), self.containers[*n].clone()))
            .collect();
        let network = self.network.clone();
        refresh_addresses(&book, &ids, &network);
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1000));
                refresh_addresses(&book, &ids, &network);
            }
        });
        self.refresher = Some((stop, handle));
    }

    pub fn api(&self, node: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.addresses.get(node)?, 8008))
    }

    /// Whether `node`'s API answers 200 on `path` (a short timeout: a paused
    /// or cut-off node is simply not answering).
    pub fn answers_200(&self, node: &str, path: &str) -> bool {
        self.api(node).is_some_and(|a| {
            crate::http::get(a, path, Duration::from_millis(500)).is_ok_and(|(s, _)| s == 200)
        })
    }

    pub fn get_json(&self, node: &str, path: &str) -> Option<serde_json::Value> {
        let (status, body) =
            crate::http::get(self.api(node)?, path, Duration::from_millis(800)).ok()?;
        (status == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// `docker <verb> ... <container of service>`.
    pub fn docker_on(&self, args: &[&str], service: &str) -> Result<String> {
        let mut all: Vec<&str> = args.to_vec();
        all.push(self.container(service));
        run_ok(&mut docker(&all))
    }

    pub fn logs(&self, tail: usize) -> String {
        let out = run(&mut self.compose(&["logs", "--no-color", "--tail", &tail.to_string()]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// psql as the superuser over the node's Unix socket, inside its container.
    pub fn psql_in(&self, node: &str, sql: &str) -> Result<String> {
        run_ok(&mut docker(&[
            "exec",
            self.container(node),
            "psql",
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "/var/lib/pgha",
            "-p",
            "5433",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            sql,
        ]))
    }
}

fn refresh_addresses(book: &AddressBook, ids: &[(String, String)], network: &str) {
    for (node, id) in ids {
        let fmt = format!("{{{{with index .NetworkSettings.Networks \"{network}\"}}}}{{{{.IPAddress}}}}{{{{end}}}}");
        let out = run(&mut docker(&["inspect", "-f", &fmt, id]));
        if !out.status.success() {
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        book.set(node, text.trim().parse().ok());
    }
}

fn override_yaml(timing: &Timing, sync_mode: &str) -> String {
    let mut env = format!(
        "      PGHA_TIMING_TTL: \"{}s\"\n      PGHA_TIMING_LOOP_WAIT: \"{}ms\"\n      PGHA_TIMING_RETRY_TIMEOUT: \"{}ms\"\n",
        timing.ttl.as_secs(),
        timing.loop_wait.as_millis(),
        timing.retry_timeout.as_millis()
    );
    env.push_str(&format!(
        "      PGHA_CLUSTER_SYNCHRONOUS_MODE: \"{sync_mode}\"\n"
    ));
    // The agents' log filter, for a run that needs their debug lines.
    if let Ok(filter) = std::env::var("CHAOS_PGHA_LOG") {
        env.push_str(&format!("      RUST_LOG: \"{filter}\"\n"));
    }
    let mut yaml = String::from(
        "# Written by chaos-tests: short timing and the synchronous mode under test.\nservices:\n",
    );
    for node in NODES {
        yaml.push_str(&format!("  {node}:\n    environment:\n{env}"));
    }
    yaml
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.refresher.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
        }
        if std::thread::panicking() || std::env::var_os("CHAOS_LOGS").is_some() {
            eprintln!("--- compose logs ({}) ---\n{}", self.name, self.logs(60));
        }
        // Whatever a scenario left paused or disconnected must not keep
        // `down` from removing it.
        for id in self.containers.values() {
            let _ = run(&mut docker(&["unpause", id]));
        }
        let out = run(&mut self.compose(&["down", "-v", "--remove-orphans", "-t", "5"]));
        if !out.status.success() {
            eprintln!(
                "chaos: compose down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for image in &self.images {
            let _ = run(&mut docker(&["rmi", "-f", image]));
        }
        let _ = std::fs::remove_file(&self.override_file);
    }
}
