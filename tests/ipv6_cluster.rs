//! A 3-node cluster on an IPv6-only network: every machine is a network
//! namespace without any IPv4 address (not even 127.0.0.1), joined by a
//! bridge, and every name (`etcd.internal`, `n1.internal`, ...) resolves to
//! an AAAA record only, through each namespace's /etc/hosts. Nodes use the
//! default listeners (API on `[::]:8008`, Postgres on `*:5432`); n3
//! advertises its IPv6 literal instead of a name. Bootstrap, replication, a
//! failover, the old primary rejoining and `pgha list` are checked from a
//! fifth machine, the client.

mod common;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use common::netns::{Host, NetLab};
use common::{
    kill_postmaster, kill_processes_under, live_postmaster, tail, wait_until, TestDir, PG_BIN,
    REPLICATION_PASSWORD, SUPERUSER_PASSWORD,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const NODES: [&str; 3] = ["n1", "n2", "n3"];

struct Node {
    name: String,
    host: Host,
    /// What other machines use to reach it: a name, or n3's IPv6 literal.
    address: String,
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    agent: Option<Child>,
}

impl Node {
    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn api_url(&self) -> String {
        format!("http://{}", pgha::net::host_port(&self.address, 8008))
    }
}

struct V6Cluster {
    nodes: Vec<Node>,
    etcd: Option<Child>,
    etcd_log: PathBuf,
    client: Host,
    dir: TestDir,
    lab: NetLab,
}

impl V6Cluster {
    fn start() -> V6Cluster {
        let mut lab = NetLab::new();
        let etcd_host = lab.add_host("etcd", false);
        let hosts: Vec<Host> = NODES.iter().map(|n| lab.add_host(n, false)).collect();
        let client = lab.add_host("client", false);
        let names = lab.aaaa_only_hosts();
        for h in hosts.iter().chain([&etcd_host, &client]) {
            lab.write_hosts(h, &names);
        }
        let dir = TestDir::new("pgha-ipv6-");

        let nodes = hosts
            .into_iter()
            .map(|host| {
                let name = host.name.clone();
                let node_dir = dir.path().join(&name);
                fs::create_dir_all(&node_dir).expect("node dir");
                let address = if name == "n3" {
                    host.ipv6.to_string()
                } else {
                    format!("{name}.internal")
                };
                let config = node_dir.join("pgha.toml");
                fs::write(&config, node_config(&name, &address, &node_dir)).expect("node config");
                Node {
                    name,
                    host,
                    address,
                    log: node_dir.join("agent.log"),
                    config,
                    dir: node_dir,
                    agent: None,
                }
            })
            .collect();
        let mut cluster = V6Cluster {
            nodes,
            etcd: None,
            etcd_log: dir.path().join("etcd.log"),
            client,
            dir,
            lab,
        };
        for n in &mut cluster.nodes {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&n.dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let out = File::create(&cluster.etcd_log).expect("etcd log");
        // Spawned once `cluster` exists, whose drop stops it.
        let etcd = cluster
            .lab
            .command(&etcd_host, "etcd")
            .arg("--name=e")
            .arg(format!(
                "--data-dir={}",
                cluster.dir.path().join("etcd").display()
            ))
            // Its own address: given "[::]" in this namespace without IPv4,
            // etcd 3.4 logged "serving ... on 0.0.0.0:2379" and refused
            // IPv6 clients.
            .arg(format!(
                "--listen-client-urls=http://[{}]:2379",
                etcd_host.ipv6
            ))
            .arg("--advertise-client-urls=http://etcd.internal:2379")
            .arg("--listen-peer-urls=http://[::1]:2380")
            .arg("--initial-advertise-peer-urls=http://[::1]:2380")
            .arg("--initial-cluster=e=http://[::1]:2380")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .spawn()
            .expect("start etcd");

        cluster.etcd = Some(etcd);
        wait_until("etcd to serve clients", Duration::from_secs(30), || {
            fs::read_to_string(&cluster.etcd_log)
                .ok()?
                .contains("ready to serve client requests")
                .then_some(())
        });
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i);
        }
        cluster
    }

    fn spawn(&mut self, index: usize) {
        let node = &self.nodes[index];
        assert!(node.agent.is_none(), "{} already runs", node.name);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("agent log");
        let mut cmd = self.lab.command(&node.host, env!("CARGO_BIN_EXE_pgha"));
        cmd.arg("run").arg("--config").arg(&node.config);
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("PGHA_") {
                cmd.env_remove(var);
            }
        }
        // `ip netns exec` execs the command: this PID is the agent's.
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start pgha");
        self.nodes[index].agent = Some(child);
    }

    /// Runs `program` on the client machine.
    fn on_client(&self, program: &str, args: &[&str]) -> Output {
        self.lab
            .command(&self.client, program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"))
    }

    /// `pgha list --json` through `node`'s API, from the client machine.
    fn members_via(&self, node: &Node) -> Option<Vec<Value>> {
        let out = self.on_client(
            env!("CARGO_BIN_EXE_pgha"),
            &["list", "--json", "--api", &node.api_url()],
        );
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The members as any running node sees them.
    fn members(&self) -> Option<Vec<Value>> {
        self.nodes
            .iter()
            .filter(|n| n.agent.is_some())
            .find_map(|n| self.members_via(n))
    }

    /// Waits for one leader running as primary and every other running
    /// node streaming from it on its timeline; returns the leader's name.
    fn wait_healthy(&self, expect_members: usize, timeout: Duration) -> String {
        wait_until("a leader and streaming replicas", timeout, || {
            let members = self.members()?;
            let leaders: Vec<&Value> = members
                .iter()
                .filter(|m| {
                    m["leader"] == true && m["role"] == "primary" && m["state"] == "running"
                })
                .collect();
            let [leader] = leaders[..] else { return None };
            let streaming = members
                .iter()
                .filter(|m| {
                    m["role"] == "replica"
                        && m["state"] == "streaming"
                        && m["timeline"] == leader["timeline"]
                })
                .count();
            (members.len() == expect_members && streaming == expect_members - 1)
                .then(|| leader["name"].as_str().unwrap().to_string())
        })
    }

    /// psql on the client machine; `hosts` is a libpq host list.
    fn psql(&self, hosts: &str, extra: &str, sql: &str) -> Result<String, String> {
        let conninfo = format!(
            "host={hosts} port=5432 user=postgres password={SUPERUSER_PASSWORD} \
             dbname=postgres connect_timeout=3 {extra}"
        );
        let out = self.on_client(
            &format!("{PG_BIN}/psql"),
            &[
                "-X",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &conninfo,
                "-c",
                sql,
            ],
        );
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn all_hosts(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.address.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Writes `value` through whichever node takes writes.
    fn write(&self, value: &str) {
        let sql = format!("INSERT INTO t VALUES ('{value}')");
        wait_until("a write on the primary", Duration::from_secs(20), || {
            self.psql(&self.all_hosts(), "target_session_attrs=read-write", &sql)
                .ok()
        });
    }

    /// Waits until `node` has replayed `value`.
    fn wait_replayed(&self, node: &Node, value: &str) {
        let sql = format!("SELECT count(*) FROM t WHERE v = '{value}'");
        wait_until(
            &format!("{value} on {}", node.name),
            Duration::from_secs(20),
            || (self.psql(&node.address, "", &sql).ok()? == "1").then_some(()),
        );
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).expect("node")
    }

    /// SIGKILL of `name`'s agent and Postgres: the machine dies.
    fn crash(&mut self, name: &str) {
        let node = self.nodes.iter_mut().find(|n| n.name == name).unwrap();
        let postmaster = live_postmaster(&node.data_dir());
        if let Some(mut agent) = node.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        if let Some(pid) = postmaster {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        wait_until(
            "the crashed postmaster to go",
            Duration::from_secs(10),
            || live_postmaster(&node.data_dir()).is_none().then_some(()),
        );
    }
}

impl Drop for V6Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        // SIGKILL: a graceful stop would have each leader try to hand over
        // to a node that is stopping too, and wait for it in vain.
        for n in &mut self.nodes {
            if panicking {
                eprintln!("----- {} agent log -----\n{}", n.name, tail(&n.log, 60));
            }
            if let Some(mut agent) = n.agent.take() {
                let _ = agent.kill();
                let _ = agent.wait();
            }
            kill_postmaster(&n.data_dir());
        }
        kill_processes_under(self.dir.path());
        if let Some(mut etcd) = self.etcd.take() {
            if panicking {
                eprintln!("----- etcd log -----\n{}", tail(&self.etcd_log, 30));
            }
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
        // Then `dir` and `lab` drop: files, namespaces, /etc/netns entries.
    }
}

fn node_config(name: &str, address: &str, dir: &Path) -> String {
    format!(
        r#"scope = "v6"
name = "{name}"

[etcd]
endpoints = ["http://etcd.internal:2379"]

[postgresql]
data_dir = "{data}"
bin_dir = "{PG_BIN}"
advertise_host = "{address}"

[postgresql.superuser]
password = "{SUPERUSER_PASSWORD}"

[postgresql.replication]
password = "{REPLICATION_PASSWORD}"

[api]
advertise_url = "http://{api}"

[timing]
ttl = "3s"
loop_wait = "1s"
retry_timeout = "1s"
"#,
        data = dir.join("data").display(),
        api = pgha::net::host_port(address, 8008),
    )
}

#[test]
fn three_nodes_on_an_ipv6_only_network_bootstrap_replicate_fail_over_and_list() {
    let _serial = common::serial();
    let mut cluster = V6Cluster::start();

    // Bootstrap and clones (pg_basebackup by AAAA-only name or literal).
    let leader = cluster.wait_healthy(3, Duration::from_secs(90));
    let members = cluster.members().unwrap();
    let n3 = members.iter().find(|m| m["name"] == "n3").unwrap();
    let n3_v6 = cluster.node("n3").host.ipv6;
    assert_eq!(n3["host"], format!("[{n3_v6}]:5432"), "{n3}");
    assert_eq!(n3["api_url"], format!("http://[{n3_v6}]:8008"));
    let n1 = members.iter().find(|m| m["name"] == "n1").unwrap();
    assert_eq!(n1["host"], "n1.internal:5432");

    // The table, through the API of the node that advertises a literal.
    let out = cluster.on_client(
        env!("CARGO_BIN_EXE_pgha"),
        &["list", "--api", &cluster.node("n3").api_url()],
    );
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains(&format!("(leader: {leader})")), "{table}");
    assert!(table.contains(&format!("| [{n3_v6}]:5432 ")), "{table}");
    assert!(table.contains("| n2.internal:5432 "), "{table}");
    assert_eq!(table.matches("| Replica ").count(), 2, "{table}");
    // The CLI's default API URL (localhost) on a machine without IPv4.
    let leader_node = cluster.node(&leader);
    let out = cluster
        .lab
        .command(&leader_node.host, env!("CARGO_BIN_EXE_pgha"))
        .args(["list", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Replication.
    cluster
        .psql(
            &cluster.all_hosts(),
            "target_session_attrs=read-write",
            "CREATE TABLE t (v text)",
        )
        .unwrap();
    cluster.write("before");
    for n in &cluster.nodes {
        cluster.wait_replayed(n, "before");
    }

    // Failover: the leader's machine dies.
    cluster.crash(&leader);
    let new_leader = cluster.wait_healthy(2, Duration::from_secs(60));
    assert_ne!(new_leader, leader);
    cluster.write("after");
    let survivors: Vec<&Node> = cluster.nodes.iter().filter(|n| n.name != leader).collect();
    for n in survivors {
        cluster.wait_replayed(n, "before");
        cluster.wait_replayed(n, "after");
    }

    // The old primary comes back (pg_rewind by name or literal) and follows.
    let index = cluster.nodes.iter().position(|n| n.name == leader).unwrap();
    let log_before = fs::metadata(&cluster.nodes[index].log).unwrap().len() as usize;
    cluster.spawn(index);
    cluster.wait_healthy(3, Duration::from_secs(90));
    cluster.wait_replayed(cluster.node(&leader), "after");
    let log = fs::read_to_string(&cluster.nodes[index].log).unwrap();
    let this_run = &log[log_before..];
    assert!(
        this_run.contains("action=rewind") && this_run.contains("pg_rewind finished"),
        "{leader} rejoined without pg_rewind"
    );
    assert!(
        !this_run.contains("action=clone"),
        "{leader} was cloned again"
    );
}
