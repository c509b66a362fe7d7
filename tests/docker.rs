//! The container image and the compose cluster as users get them: builds a
//! Debian base image (docker/base-image.sh, cached between runs), builds
//! docker/Dockerfile on it with the pgha binary cargo built, brings up
//! docker/compose.yml under a project name of its own, and checks health,
//! replication, every node's router (5432 to the primary, 5434 to a replica)
//! before and after a failover after `docker kill`, rejoin, PID 1 reaping and
//! that `down` leaves nothing behind. Skipped, with a message, when no Docker
//! engine answers.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, psql, wait_until, SUPERUSER_PASSWORD};

/// The default lease TTL the compose nodes run with.
const TTL: Duration = Duration::from_secs(10);
/// From `docker kill` of the primary to another node answering /primary:
/// the lease must expire (TTL), then one loop promotes; `docker exec`
/// polling adds its own latency.
const FAILOVER_BUDGET: Duration = Duration::from_secs(TTL.as_secs() + 5);
const NODES: [&str; 3] = ["n1", "n2", "n3"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs `cmd` and returns its trimmed stdout; panics with its output on failure.
fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn docker(args: &[&str]) -> Command {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    cmd
}

fn docker_answers() -> bool {
    Command::new("docker")
        .arg("info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `docker compose` (v2) if the CLI has it, else `docker-compose` (v1).
fn compose_program() -> Vec<String> {
    let v2 = Command::new("docker")
        .args(["compose", "version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if v2 {
        return vec!["docker".into(), "compose".into()];
    }
    let v1 = Command::new("docker-compose")
        .arg("version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        v1,
        "a Docker engine answers but neither `docker compose` nor `docker-compose` runs \
         (scripts/lib.sh ensure_prereqs installs docker-compose)"
    );
    vec!["docker-compose".into()]
}

/// One compose project of this test. Drop brings it down with its volumes
/// and removes the images the test built, also when the test fails.
struct Project {
    name: String,
    program: Vec<String>,
    env: Vec<(String, String)>,
    images: Vec<String>,
}

impl Project {
    fn compose(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.program[0]);
        cmd.args(&self.program[1..])
            .args(["-p", &self.name, "-f"])
            .arg(repo().join("docker/compose.yml"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn container(&self, service: &str) -> String {
        let id = run_ok(&mut self.compose(&["ps", "-q", service]));
        assert!(!id.is_empty(), "no container for service {service}");
        id
    }

    /// Resources of this project Docker still knows, by compose's label.
    fn leftovers(&self) -> Vec<String> {
        let label = format!("label=com.docker.compose.project={}", self.name);
        let mut left = Vec::new();
        for (kind, args) in [
            ("container", vec!["ps", "-a", "-q", "--filter", &label]),
            ("volume", vec!["volume", "ls", "-q", "--filter", &label]),
            ("network", vec!["network", "ls", "-q", "--filter", &label]),
        ] {
            let out = run(&mut docker(&args));
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                left.push(format!("{kind} {id}"));
            }
        }
        left
    }

    fn logs(&self) -> String {
        let out = run(&mut self.compose(&["logs", "--no-color", "--tail", "40"]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- compose logs ({}) ---\n{}", self.name, self.logs());
        }
        let out = run(&mut self.compose(&["down", "-v", "--remove-orphans", "-t", "20"]));
        if !out.status.success() {
            eprintln!(
                "compose down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for image in &self.images {
            let _ = run(&mut docker(&["rmi", "-f", image]));
        }
    }
}

/// `pgha health` inside a node's container: whether its API answers 200 on `path`.
fn answers_200(container: &str, path: &str) -> bool {
    run(&mut docker(&["exec", container, "pgha", "health", path]))
        .status
        .success()
}

fn health_status(container: &str) -> String {
    run_ok(&mut docker(&[
        "inspect",
        "-f",
        "{{if .State.Health}}{{.State.Health.Status}}{{end}}",
        container,
    ]))
}

/// SQL as the superuser over the node's Unix socket, inside its container.
fn psql_in(container: &str, sql: &str) -> Result<String, String> {
    let out = run(&mut docker(&[
        "exec",
        container,
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
    ]));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Postgres' port in the image; the router takes 5432 (read-write) and 5434
/// (read-only).
const POSTGRES_PORT: &str = "5433";
const ROUTER_RW_PORT: u16 = 5432;
const ROUTER_RO_PORT: u16 = 5434;

/// What a connection reached: `pg_is_in_recovery()`, `inet_server_port()`
/// and the node name (`cluster_name`), as "f|5433|n1".
const WHO: &str = "SELECT pg_is_in_recovery(), inet_server_port(), current_setting('cluster_name')";

/// SQL as the superuser over TCP to `host:port`, run by psql inside the
/// container `from`: what an application on the compose network sees.
fn psql_from(from: &str, host: &str, port: u16, sql: &str) -> Result<String, String> {
    let dsn = format!("host={host} port={port} user=postgres dbname=postgres connect_timeout=5");
    let out = run(&mut docker(&[
        "exec",
        "-e",
        &format!("PGPASSWORD={SUPERUSER_PASSWORD}"),
        from,
        "psql",
        "-X",
        "-q",
        "-A",
        "-t",
        "-F",
        "|",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        &dsn,
        "-c",
        sql,
    ]));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// A container's addresses on the compose network (IPv4, IPv6).
fn addresses(container: &str) -> (String, String) {
    let both = run_ok(&mut docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{.GlobalIPv6Address}}{{end}}",
        container,
    ]));
    let mut parts = both.split_whitespace().map(str::to_string);
    let v4 = parts.next().expect("an IPv4 address");
    let v6 = parts.next().expect("an IPv6 address");
    (v4, v6)
}

/// Zombie processes in a container, as "pid (comm)" from /proc.
fn zombies(container: &str) -> Vec<String> {
    let stats = run_ok(&mut docker(&[
        "exec",
        container,
        "sh",
        "-c",
        "cat /proc/[0-9]*/stat 2>/dev/null",
    ]));
    stats
        .lines()
        .filter_map(|line| {
            // pid (comm) state ...: comm may hold spaces, so split at the last ')'.
            let close = line.rfind(')')?;
            let state = line[close + 1..].split_whitespace().next()?;
            (state == "Z").then(|| line[..=close].to_string())
        })
        .collect()
}

/// The pgha binary cargo built for this test, stripped, where the
/// Dockerfile's pgha-host stage takes it from.
fn stage_host_binary() {
    let binary = Path::new(env!("CARGO_BIN_EXE_pgha"));
    let dest = repo().join("docker/dist/pgha");
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(&dest)
        .arg(binary)
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(binary, &dest).expect("copy the pgha binary into docker/dist");
    }
}

#[test]
fn compose_cluster_fails_over_and_rejoins() {
    if !docker_answers() {
        eprintln!("SKIPPED tests/docker.rs: `docker info` fails, no Docker engine answers");
        return;
    }
    let program = compose_program();

    let started = Instant::now();
    let base = run_ok(&mut Command::new(repo().join("docker/base-image.sh")));
    let base_time = started.elapsed();

    let suffix = format!(
        "{}{:04x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            & 0xffff
    );
    let name = format!("pghatest{suffix}");
    // The stages without the binary are kept between runs, like the base
    // image; only the image holding this build's binary is per run.
    let cache_tag = base.rsplit(':').next().unwrap_or("latest").to_string();
    let tools_image = format!("pgha-test-tools:{cache_tag}");
    let runtime_image = format!("pgha-test-runtime:{cache_tag}");
    let image = format!("pgha-test:{name}");
    let primary_port = free_port();
    let replicas_port = free_port();
    let project = Project {
        name: name.clone(),
        program,
        env: vec![
            ("PGHA_IMAGE".into(), image.clone()),
            ("PGHA_TOOLS_IMAGE".into(), tools_image.clone()),
            ("BASE_IMAGE".into(), base.clone()),
            ("PGHA_BINARY".into(), "host".into()),
            ("PGHA_SUPERUSER_PASSWORD".into(), SUPERUSER_PASSWORD.into()),
            ("PGHA_PRIMARY_PORT".into(), primary_port.to_string()),
            ("PGHA_REPLICAS_PORT".into(), replicas_port.to_string()),
            (
                "PGHA_SUBNET_V6".into(),
                format!("fd00:7067:6861:{:x}::/64", std::process::id() & 0xffff),
            ),
        ],
        images: vec![image.clone()],
    };

    // The Dockerfile users build. The legacy builder builds every stage up
    // to the target, so the stages are named, each build reusing the ones
    // before from the cache (and tagging them, so none is left untagged).
    stage_host_binary();
    let build_started = Instant::now();
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
        );
    }
    let build_time = build_started.elapsed();
    let image_size: u64 = run_ok(&mut docker(&[
        "image",
        "inspect",
        "-f",
        "{{.Size}}",
        &image,
    ]))
    .parse()
    .expect("image size");

    let up_started = Instant::now();
    let up = run(&mut project.compose(&["up", "-d", "--no-build"]));
    assert!(
        up.status.success(),
        "compose up failed (an IPv6 network needs a daemon that allows --ipv6 networks \
         with an explicit subnet):\n{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let nodes: Vec<(String, String)> = NODES
        .iter()
        .map(|n| (n.to_string(), project.container(n)))
        .collect();
    wait_until(
        "three nodes healthy per Docker's health status",
        Duration::from_secs(120),
        || {
            nodes
                .iter()
                .all(|(_, c)| health_status(c) == "healthy")
                .then_some(())
        },
    );
    let healthy_after = up_started.elapsed();

    // Exactly one primary, two running replicas, by the nodes' own APIs.
    let primary = wait_until(
        "exactly one primary and two replicas",
        Duration::from_secs(60),
        || {
            let primaries: Vec<&(String, String)> = nodes
                .iter()
                .filter(|(_, c)| answers_200(c, "/primary"))
                .collect();
            let replicas = nodes
                .iter()
                .filter(|(_, c)| answers_200(c, "/replica"))
                .count();
            (primaries.len() == 1 && replicas == 2).then(|| primaries[0].clone())
        },
    );

    // The agent is PID 1 and reaps what is orphaned in its container.
    let (_, first) = &nodes[0];
    let init = run_ok(&mut docker(&["exec", first, "cat", "/proc/1/cmdline"]));
    assert!(init.starts_with("pgha"), "PID 1 is not the agent: {init:?}");
    // Two short-lived processes orphaned when their shell exits: PID 1
    // adopts them, and a process not reaped stays in /proc as a zombie.
    let orphans = run_ok(&mut docker(&[
        "exec",
        first,
        "sh",
        "-c",
        "sleep 0.2 & echo $!; sleep 0.3 & echo $!; exit 0",
    ]));
    let orphans: Vec<String> = orphans.lines().map(str::to_string).collect();
    assert_eq!(orphans.len(), 2, "orphan pids: {orphans:?}");
    wait_until("orphans reaped by PID 1", Duration::from_secs(10), || {
        let gone = orphans.iter().all(|pid| {
            !run(&mut docker(&[
                "exec",
                first,
                "test",
                "-e",
                &format!("/proc/{pid}"),
            ]))
            .status
            .success()
        });
        gone.then_some(())
    });
    assert_eq!(
        zombies(first),
        Vec::<String>::new(),
        "zombies in the container"
    );

    // A write through HAProxy's primary port reaches both replicas.
    let write = |value: &str| {
        wait_until(
            "a write through HAProxy's primary port",
            Duration::from_secs(30),
            || {
                psql(
                    primary_port,
                    &format!(
                        "CREATE TABLE IF NOT EXISTS docker_test (v text PRIMARY KEY); \
                     INSERT INTO docker_test VALUES ('{value}')"
                    ),
                )
                .ok()
            },
        );
    };
    let replicated_to = |container: &str, value: &str| {
        wait_until(
            &format!("row {value} on {container}"),
            Duration::from_secs(30),
            || {
                psql_in(
                    container,
                    &format!("SELECT count(*) FROM docker_test WHERE v = '{value}'"),
                )
                .ok()
                .filter(|n| n == "1")
            },
        );
    };
    write("before-kill");
    for (_, c) in nodes.iter().filter(|(n, _)| *n != primary.0) {
        replicated_to(c, "before-kill");
    }
    let via_replicas = wait_until(
        "a read through HAProxy's replicas port",
        Duration::from_secs(30),
        || psql(replicas_port, "SELECT pg_is_in_recovery()").ok(),
    );
    assert_eq!(
        via_replicas, "t",
        "HAProxy's replicas port reached a primary"
    );

    // Every node's router: its 5432 reaches the primary's Postgres (5433),
    // by name from another node and by the node's IPv4 and IPv6 address (a
    // dual-stack listener), and from the host through the published port;
    // its 5434 reaches a replica.
    let leader_is = format!("f|{POSTGRES_PORT}|{}", primary.0);
    for (i, (name, container)) in nodes.iter().enumerate() {
        let (_, from) = &nodes[(i + 1) % nodes.len()];
        let (v4, v6) = addresses(container);
        for host in [name.as_str(), &v4, &v6] {
            let reached = wait_until(
                &format!("psql to {host}:{ROUTER_RW_PORT}"),
                Duration::from_secs(30),
                || psql_from(from, host, ROUTER_RW_PORT, WHO).ok(),
            );
            assert_eq!(
                reached, leader_is,
                "{host}:{ROUTER_RW_PORT} ({name}'s router) did not reach the primary"
            );
        }
        let published = run_ok(&mut project.compose(&["port", name, "5432"]));
        let published: u16 = published
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("`port {name} 5432` printed {published:?}"));
        assert_eq!(
            psql(published, WHO),
            Ok(leader_is.clone()),
            "127.0.0.1:{published} ({name}'s router, published) did not reach the primary"
        );
        let replica = wait_until(
            &format!("psql to {name}:{ROUTER_RO_PORT}"),
            Duration::from_secs(30),
            || psql_from(from, name, ROUTER_RO_PORT, WHO).ok(),
        );
        assert!(
            replica.starts_with(&format!("t|{POSTGRES_PORT}|")) && !replica.ends_with(&primary.0),
            "{name}:{ROUTER_RO_PORT} reached {replica:?}, not a replica"
        );
    }

    // docker kill of the primary: another node takes over within the budget.
    let killed_at = Instant::now();
    run_ok(&mut docker(&["kill", &primary.1]));
    let survivors: Vec<&(String, String)> = nodes.iter().filter(|(n, _)| *n != primary.0).collect();
    let new_primary = wait_until(
        "a new primary",
        FAILOVER_BUDGET + Duration::from_secs(30),
        || {
            survivors
                .iter()
                .find(|(_, c)| answers_200(c, "/primary"))
                .map(|p| (*p).clone())
        },
    );
    let failover = killed_at.elapsed();
    assert!(
        failover <= FAILOVER_BUDGET,
        "{} became primary {failover:?} after the kill, more than the {FAILOVER_BUDGET:?} budget",
        new_primary.0
    );
    assert_eq!(
        survivors
            .iter()
            .filter(|(_, c)| answers_200(c, "/primary"))
            .count(),
        1,
        "two primaries after the failover"
    );
    assert_eq!(
        psql_in(
            &new_primary.1,
            "SELECT count(*) FROM docker_test WHERE v = 'before-kill'"
        ),
        Ok("1".to_string()),
        "a replicated row is missing on the new primary"
    );

    // The surviving routers follow the promotion: 5432 of each reaches the
    // new primary (a router never sends a client to a replica, so the first
    // answer must be it), a write through the replica's router is
    // acknowledged by the new primary, and 5434 reaches the replica.
    let new_leader_is = format!("f|{POSTGRES_PORT}|{}", new_primary.0);
    for (i, (name, _)) in survivors.iter().enumerate() {
        let (_, from) = survivors[(i + 1) % survivors.len()];
        let reached = wait_until(
            &format!("psql to {name}:{ROUTER_RW_PORT} after the failover"),
            Duration::from_secs(30),
            || psql_from(from, name, ROUTER_RW_PORT, WHO).ok(),
        );
        assert_eq!(
            reached, new_leader_is,
            "{name}'s router did not reach the new primary after the failover"
        );
    }
    let (replica, _) = survivors
        .iter()
        .find(|(n, _)| *n != new_primary.0)
        .expect("a surviving replica");
    let acked_by = psql_from(
        &new_primary.1,
        replica,
        ROUTER_RW_PORT,
        "INSERT INTO docker_test VALUES ('via-router') \
         RETURNING current_setting('cluster_name'), pg_is_in_recovery()",
    );
    assert_eq!(
        acked_by,
        Ok(format!("{}|f", new_primary.0)),
        "a write through {replica}'s router"
    );
    assert_eq!(
        psql_in(
            &new_primary.1,
            "SELECT count(*) FROM docker_test WHERE v = 'via-router'"
        ),
        Ok("1".to_string()),
        "the write through {replica}'s router is missing on the new primary"
    );
    let read_only = wait_until(
        &format!(
            "psql to {}:{ROUTER_RO_PORT} after the failover",
            new_primary.0
        ),
        Duration::from_secs(60),
        || psql_from(&new_primary.1, &new_primary.0, ROUTER_RO_PORT, WHO).ok(),
    );
    assert_eq!(
        read_only,
        format!("t|{POSTGRES_PORT}|{replica}"),
        "{}:{ROUTER_RO_PORT} after the failover",
        new_primary.0
    );

    // The killed container started again rejoins as a replica.
    run_ok(&mut docker(&["start", &primary.1]));
    wait_until(
        "the old primary healthy again",
        Duration::from_secs(120),
        || (health_status(&primary.1) == "healthy").then_some(()),
    );
    wait_until(
        "the old primary streaming as a replica",
        Duration::from_secs(120),
        || answers_200(&primary.1, "/replica?replication_state=streaming").then_some(()),
    );
    assert!(
        !answers_200(&primary.1, "/primary"),
        "the old primary came back as a primary"
    );
    write("after-rejoin");
    replicated_to(&primary.1, "after-rejoin");
    // The rejoined node's router reaches the new primary too.
    let (_, from) = survivors[0];
    let reached = wait_until(
        &format!("psql to {}:{ROUTER_RW_PORT} after the rejoin", primary.0),
        Duration::from_secs(30),
        || psql_from(from, &primary.0, ROUTER_RW_PORT, WHO).ok(),
    );
    assert_eq!(
        reached, new_leader_is,
        "{}'s router after it rejoined",
        primary.0
    );

    // The README's way to force a failover from inside a container: the
    // rejoined node becomes primary again.
    let (_, other) = survivors
        .iter()
        .find(|(n, _)| *n != new_primary.0)
        .expect("a third node");
    run_ok(&mut docker(&[
        "exec", other, "pgha", "failover", "--to", &primary.0, "--force",
    ]));
    wait_until(
        "the forced failover's target as primary",
        Duration::from_secs(30),
        || answers_200(&primary.1, "/primary").then_some(()),
    );
    wait_until("two streaming replicas", Duration::from_secs(60), || {
        (nodes
            .iter()
            .filter(|(_, c)| answers_200(c, "/replica?replication_state=streaming"))
            .count()
            == 2)
            .then_some(())
    });

    // docker stop sends SIGINT to PID 1, which forwards it: the leader hands
    // over to a replica and exits 0, long before its lease would expire.
    let stopped_at = Instant::now();
    run_ok(&mut docker(&["stop", "-t", "60", &primary.1]));
    let exit_code = run_ok(&mut docker(&[
        "inspect",
        "-f",
        "{{.State.ExitCode}}",
        &primary.1,
    ]));
    assert_eq!(exit_code, "0", "the agent did not stop cleanly on SIGINT");
    let handed_over = wait_until(
        "a primary after docker stop",
        Duration::from_secs(30),
        || {
            nodes
                .iter()
                .filter(|(n, _)| *n != primary.0)
                .find(|(_, c)| answers_200(c, "/primary"))
                .map(|_| stopped_at.elapsed())
        },
    );
    assert!(
        handed_over < TTL,
        "a new primary {handed_over:?} after docker stop: no handover, the lease expired"
    );

    // down leaves nothing of the project behind.
    let down = run(&mut project.compose(&["down", "-v", "-t", "20"]));
    assert!(
        down.status.success(),
        "compose down failed: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert_eq!(
        project.leftovers(),
        Vec::<String>::new(),
        "left after compose down"
    );

    eprintln!(
        "SUMMARY docker: base image {base} ready in {:.1} s, image {} MB built in {:.1} s, \
         compose up to 3 healthy in {:.1} s, {} -> {} promoted {:.1} s after docker kill, \
         handover on docker stop {:.1} s; every router's 5432 reached {} before the kill and {} \
         after it (a write through {replica}'s router acknowledged by {}), 5434 a replica",
        base_time.as_secs_f64(),
        image_size / 1_000_000,
        build_time.as_secs_f64(),
        healthy_after.as_secs_f64(),
        primary.0,
        new_primary.0,
        failover.as_secs_f64(),
        handed_over.as_secs_f64(),
        primary.0,
        new_primary.0,
        new_primary.0
    );
}

/// config/fly.toml.example against the image it deploys: ONE app of three
/// Machines with the same image and config, each taking its identity from
/// the variables the platform sets in it; the [env] table, the secrets and
/// the image's baked-in config make a valid and distinct config per
/// Machine, the router listens where the app's DB_PORT and the check point,
/// and the platform's timings fit the agent's.
#[test]
fn fly_config_example_fits_the_image() {
    /// The port applications connect to (`DB_PORT`), as the file documents.
    const DB_PORT: u16 = 5432;
    let text = std::fs::read_to_string(repo().join("config/fly.toml.example")).unwrap();
    let fly: toml::Table = text.parse().expect("config/fly.toml.example is TOML");
    let str_at = |table: &toml::Table, path: &[&str]| -> String {
        let mut value = table.get(path[0]);
        for key in &path[1..] {
            value = value.and_then(|v| v.get(key));
        }
        match value {
            Some(toml::Value::String(s)) => s.clone(),
            Some(toml::Value::Integer(i)) => i.to_string(),
            other => panic!("fly.toml: {} is {other:?}", path.join(".")),
        }
    };
    let port_at = |path: &[&str]| -> u16 { str_at(&fly, path).parse().unwrap() };
    assert_eq!(str_at(&fly, &["kill_signal"]), "SIGINT");
    let kill_timeout: u64 = str_at(&fly, &["kill_timeout"]).parse().unwrap();
    assert_eq!(kill_timeout, 60);
    assert_eq!(str_at(&fly, &["deploy", "strategy"]), "rolling");
    assert_eq!(str_at(&fly, &["deploy", "max_unavailable"]), "1");
    assert_eq!(str_at(&fly, &["checks", "health", "type"]), "http");
    assert_eq!(str_at(&fly, &["checks", "health", "path"]), "/health");
    assert_eq!(str_at(&fly, &["checks", "health", "interval"]), "10s");
    assert_eq!(str_at(&fly, &["checks", "health", "timeout"]), "3s");
    str_at(&fly, &["checks", "health", "grace_period"]);
    assert_eq!(str_at(&fly, &["checks", "router", "type"]), "tcp");
    assert_eq!(port_at(&["checks", "router", "port"]), DB_PORT);
    assert_eq!(str_at(&fly, &["metrics", "path"]), "/metrics");
    // The private network reaches the Machines; a services section would
    // put the platform's proxy (and, on deploy, public addresses) in front.
    for section in ["services", "http_service"] {
        assert!(!fly.contains_key(section), "fly.toml has [{section}]");
    }

    // Nothing per node in [env]: the platform gives each Machine its identity.
    let fly_env = fly["env"].as_table().expect("[env]");
    for per_node in [
        "PGHA_NAME",
        "PGHA_REGION",
        "PGHA_POSTGRESQL_ADVERTISE_HOST",
        "PGHA_API_ADVERTISE_URL",
        "PGHA_TLS_SERVICE_NAMES",
    ] {
        assert!(!fly_env.contains_key(per_node), "[env] sets {per_node}");
    }
    // What `fly secrets set` adds, as the file's comment says.
    let ca = pgha::tls::pki::create_ca(
        "pgha cluster CA",
        std::time::SystemTime::now(),
        Duration::from_secs(86_400),
    )
    .unwrap();
    let mut common: std::collections::BTreeMap<String, String> = fly_env
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_str().expect("env values are strings").to_string(),
            )
        })
        .collect();
    for (var, value) in [
        ("PGHA_POSTGRESQL_REPLICATION_PASSWORD", "set-as-a-secret"),
        ("PGHA_POSTGRESQL_SUPERUSER_PASSWORD", "set-as-a-secret"),
        ("PGHA_API_TOKEN", "set-as-a-secret"),
        ("PGHA_TLS_CA_CERT", ca.cert_pem.as_str()),
        ("PGHA_TLS_CA_KEY", ca.key_pem.expose()),
    ] {
        common.insert(var.into(), value.into());
    }
    let app = str_at(&fly, &["app"]);
    let region = str_at(&fly, &["primary_region"]);
    let image_file = repo().join("docker/pgha.toml");
    let image_config = std::fs::read_to_string(&image_file).unwrap();
    let machines = [
        ("3d8d9e1b2c4e89", "fdaa:0:c037:a7b:c207:e395:9a80:2"),
        ("e784079b449483", "fdaa:0:c037:a7b:c5:7d2a:1b4c:2"),
        ("148e272a0d3d89", "fdaa:0:c037:a7b:1f2:4a0e:8c33:2"),
    ];
    let mut names = Vec::new();
    for (machine_id, private_ip) in machines {
        // What the platform sets in every Machine.
        let mut env = common.clone();
        env.insert("FLY_APP_NAME".into(), app.clone());
        env.insert("FLY_MACHINE_ID".into(), machine_id.into());
        env.insert("FLY_PRIVATE_IP".into(), private_ip.into());
        env.insert("FLY_REGION".into(), region.clone());
        let cfg =
            pgha::config::Config::parse(&image_config, &image_file, &env).unwrap_or_else(|e| {
                panic!("fly [env] on the image's config, Machine {machine_id}: {e}")
            });
        assert_eq!(cfg.name, machine_id);
        assert_eq!(cfg.region.as_deref(), Some(region.as_str()));
        assert_eq!(cfg.postgresql.advertise_host, private_ip);
        assert_eq!(
            cfg.api.advertise_url,
            format!(
                "http://[{private_ip}]:{}",
                port_at(&["checks", "health", "port"])
            )
        );
        assert!(cfg.tls.enabled && cfg.tls.shared_ca());
        let sans: Vec<String> = cfg.tls.names.iter().map(ToString::to_string).collect();
        for san in [format!("DNS:{app}.internal"), format!("IP:{private_ip}")] {
            assert!(sans.contains(&san), "{machine_id}: {san} not in {sans:?}");
        }

        // DB_HOST=<app>.internal DB_PORT=5432 reaches the router of any
        // Machine, over IPv6; Postgres itself is on another port.
        assert!(
            cfg.router.enabled,
            "the image's config (docker/pgha.toml) does not enable the router"
        );
        assert_eq!(cfg.router.listen.port(), DB_PORT, "router.listen");
        assert!(
            cfg.router.listen.is_ipv6() && cfg.router.listen.ip().is_unspecified(),
            "the router listens on {}, not on every IPv6 address",
            cfg.router.listen
        );
        assert_ne!(
            cfg.postgresql.port, DB_PORT,
            "Postgres takes the router's port"
        );

        assert!(
            cfg.timing.shutdown_timeout < Duration::from_secs(kill_timeout),
            "a graceful stop may outlast kill_timeout"
        );
        let mount = str_at(&fly, &["mounts", "destination"]);
        assert!(
            cfg.postgresql.data_dir.starts_with(&mount),
            "the data directory {} is not on the volume {mount}",
            cfg.postgresql.data_dir.display()
        );
        for port_key in [&["checks", "health", "port"][..], &["metrics", "port"][..]] {
            let port = port_at(port_key);
            assert!(
                cfg.api.listen.iter().any(|a| a.port() == port),
                "fly.toml {} = {port}, but the API listens on {:?}",
                port_key.join("."),
                cfg.api.listen
            );
        }
        names.push(cfg.name);
    }
    names.sort();
    names.dedup();
    assert_eq!(names.len(), machines.len(), "Machines share a name");
}
