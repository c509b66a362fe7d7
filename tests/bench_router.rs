//! The router in every agent against a direct connection and against
//! HAProxy (as in `config/haproxy.cfg`), side by side in one run (issue 17),
//! run by `bench/router.sh` (ignored by `cargo test`). Three nodes with
//! their routers on, release build, real etcd, PostgreSQL 15, pgbench and
//! HAProxy, all on loopback. Measures:
//! 1. pgbench select-only and TPC-B tps (8 clients): direct to the primary,
//!    through the router of a replica node and of the primary node, through
//!    HAProxy's primary port; select-only also on the read-only side;
//! 2. new connections per second and their connect latency (TCP, startup,
//!    password authentication), 8 threads each opening one after another;
//! 3. N idle connections (default 10,000) held through the router and
//!    through HAProxy: the extra RSS of each;
//! 4. SIGKILLs and switchovers: from the promotion (a 5 ms probe of
//!    `pg_is_in_recovery()`) to the first write acknowledged through each,
//!    a new connection per write; and every new connection's landing:
//!    read-write ports on a read-only node, read-only ports on the primary.
//!
//! Prints a table and writes `bench/router-results.md`. Environment:
//! PGHA_BENCH_SECS (pgbench run length, default 30), PGHA_BENCH_CLIENTS
//! (default 8), PGHA_BENCH_IDLE (default 10000), PGHA_BENCH_ROUNDS (kills
//! and switchovers each, default 3).

mod common;

use std::fmt::Write as _;
use std::fs;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::procs::{command_output, load_average, memory_gib, rss_kib, stat_fields};
use common::proxy::{haproxy, pgbench, with_routers, HaProxy, Landing, ProxyClients, Routers};
use common::{
    create_writes_table, serial, wait_until, Cluster, RoleProbe, Timing, Writer, SUPERUSER_PASSWORD,
};

/// A pgbench target: what it is, and its port.
type Target = (&'static str, u16);

const HEALTHY: Duration = Duration::from_secs(120);
const WRITE_EVERY: Duration = Duration::from_millis(10);
const LAND_EVERY: Duration = Duration::from_millis(20);

fn env_number(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `tps = X (without initial connection time)` of a pgbench report.
fn tps(report: &str) -> f64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no tps in the pgbench report:\n{report}"))
}

/// The soft "Max open files" of this process (its children inherit it).
fn open_files_limit() -> usize {
    fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(1024)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// `threads` threads open a connection (TCP, startup, password), run
/// `SELECT 1` and close it, one after another, for `run`: every connect's
/// latency, and the failures.
fn connect_storm(port: u16, threads: usize, run: Duration) -> (Vec<Duration>, usize) {
    let until = Instant::now() + run;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let config: tokio_postgres::Config = format!(
                    "host=127.0.0.1 port={port} user=postgres password={SUPERUSER_PASSWORD} dbname=postgres connect_timeout=5"
                )
                .parse()
                .expect("conninfo");
                let (mut took, mut failed) = (Vec::new(), 0usize);
                while Instant::now() < until {
                    let start = Instant::now();
                    let ok = rt.block_on(async {
                        let (client, conn) = config.connect(tokio_postgres::NoTls).await.ok()?;
                        let done = tokio::spawn(conn);
                        let connected = start.elapsed();
                        client.simple_query("SELECT 1").await.ok()?;
                        drop(client);
                        let _ = done.await;
                        Some(connected)
                    });
                    match ok {
                        Some(d) => took.push(d),
                        None => failed += 1,
                    }
                }
                (took, failed)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut failed = 0;
    for h in handles {
        let (t, f) = h.join().expect("connect thread");
        all.extend(t);
        failed += f;
    }
    all.sort();
    (all, failed)
}

/// Children of `pid` (Postgres backends of a postmaster).
fn children(pid: i32) -> usize {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| {
            stat_fields(p)
                .and_then(|f| f.get(1)?.parse::<i32>().ok())
                .is_some_and(|pp| pp == pid)
        })
        .count()
}

/// What holding idle connections through one proxy cost.
struct Idle {
    held: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
    open_took: Duration,
}

impl Idle {
    fn extra_mib(&self) -> f64 {
        self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64 / 1024.0
    }
}

/// Opens `n` TCP connections to `port` that send nothing (each reaches
/// Postgres, which forks a backend that waits for the startup packet up to
/// `authentication_timeout`), in batches, until `backends` of the
/// postmaster show them; measures `pid`'s RSS before and after.
fn hold_idle(port: u16, n: usize, pid: i32, postmaster: i32) -> Idle {
    let base = children(postmaster);
    let rss_before_kib = rss_kib(pid);
    let start = Instant::now();
    let mut held: Vec<TcpStream> = Vec::with_capacity(n);
    const BATCH: usize = 250;
    while held.len() < n {
        for _ in 0..BATCH.min(n - held.len()) {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => held.push(s),
                Err(e) => {
                    eprintln!("idle: connect {} failed: {e}", held.len());
                    break;
                }
            }
        }
        // Let the proxy and the postmaster catch up with the batch.
        let want = base + held.len() * 95 / 100;
        let deadline = Instant::now() + Duration::from_secs(20);
        while children(postmaster) < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if children(postmaster) < want {
            eprintln!(
                "idle: postmaster has {} backends for {} connections: stop here",
                children(postmaster) - base,
                held.len()
            );
            break;
        }
    }
    let open_took = start.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let backends = children(postmaster).saturating_sub(base);
    let idle = Idle {
        held: backends.min(held.len()),
        rss_before_kib,
        rss_after_kib: rss_kib(pid),
        open_took,
    };
    drop(held);
    wait_until(
        "the idle backends to exit",
        Duration::from_secs(120),
        || (children(postmaster) <= base + 5).then_some(()),
    );
    idle
}

/// One change of primary: when the probe saw the new one writable, and the
/// first write acknowledged after it through each writer.
struct Change {
    what: &'static str,
    router_ms: Option<f64>,
    haproxy_ms: Option<f64>,
}

fn first_ack_ms(writer: &Writer, port: u16, promoted: Instant, timeout: Duration) -> Option<f64> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(a) = writer
            .log()
            .acked()
            .map(|(_, a)| a)
            .find(|a| a.port == port && a.at >= promoted)
        {
            return Some(a.at.duration_since(promoted).as_secs_f64() * 1000.0);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// New connections through one port, each asking where it landed.
struct Lander {
    what: &'static str,
    /// The port serves writes: landing on a node in recovery is wrong
    /// (else landing on a writable one is).
    read_write: bool,
    clients: ProxyClients,
}

fn wrong(landings: &[Landing], read_write: bool) -> (usize, usize) {
    let connected: Vec<_> = landings.iter().filter_map(|(_, l)| *l).collect();
    let wrong = connected
        .iter()
        .filter(|(in_recovery, _)| *in_recovery == read_write)
        .count();
    (wrong, connected.len())
}

#[test]
#[ignore = "benchmark of about 12 minutes: run bench/router.sh"]
fn router_against_direct_and_haproxy() {
    let _serial = serial();
    let run_started = Instant::now();
    let secs = env_number("PGHA_BENCH_SECS", 30);
    let clients = env_number("PGHA_BENCH_CLIENTS", 8);
    // The agent and HAProxy each hold two sockets per idle connection: the
    // file descriptor limit (which they inherit) bounds how many.
    let fd_limit = open_files_limit();
    let idle_n =
        (env_number("PGHA_BENCH_IDLE", 10_000) as usize).min(fd_limit.saturating_sub(1_000) / 2);
    let rounds = env_number("PGHA_BENCH_ROUNDS", 3) as usize;
    let load_start = load_average();
    let haproxy_bin = haproxy().expect("haproxy (bench/router.sh installs it)");

    let (mut opts, routers): (_, Routers) = with_routers(3);
    opts.timing = Timing::FAST;
    // Every idle connection is a forked backend waiting for its startup
    // packet: the postmaster admits 2 x (max_connections + workers) of them.
    opts.extra_toml = format!(
        "[postgresql.parameters]\nmax_connections = {}\nauthentication_timeout = \"600s\"\n",
        idle_n / 2 + 200
    );
    let mut cluster = Cluster::start(3, opts);
    let view = cluster.wait_healthy(HEALTHY);
    let primary = view.primaries()[0].name.clone();
    let replica = view.streaming_replicas()[0].name.clone();
    let primary_port = cluster.node(&primary).pg_port;
    let replica_port = cluster.node(&replica).pg_port;
    // HAProxy as in config/haproxy.cfg, its limits raised for the idle
    // connections (it would queue them over maxconn).
    let proxy = HaProxy::start_with(&haproxy_bin, &cluster.nodes, idle_n + 200, idle_n + 100);
    wait_until(
        "HAProxy's primary port to reach the primary",
        Duration::from_secs(30),
        || {
            (0..5)
                .all(|_| {
                    common::proxy::where_am_i(proxy.primary_port) == Some((false, primary_port))
                })
                .then_some(())
        },
    );
    wait_until(
        "HAProxy's replicas port to reach replicas",
        Duration::from_secs(30),
        || {
            (0..5)
                .all(|_| common::proxy::where_am_i(proxy.replica_port).is_some_and(|(r, _)| r))
                .then_some(())
        },
    );
    pgbench(primary_port, &["-i", "-q", "-s", "10"]).expect("pgbench -i");
    let _ = common::psql(primary_port, "CHECKPOINT");

    // 1. Throughput, the targets interleaved.
    let c = clients.to_string();
    let rw_targets = [
        ("direct to the primary", primary_port),
        ("router on a replica node (rw)", routers.rw(&replica)),
        ("router on the primary node (rw)", routers.rw(&primary)),
        ("HAProxy primary port", proxy.primary_port),
    ];
    let ro_targets = [
        ("direct to a replica", replica_port),
        ("router read-only port (replica node)", routers.ro(&replica)),
        ("HAProxy replicas port", proxy.replica_port),
    ];
    let mut rows: Vec<(String, String, String, String)> = Vec::new();
    // Each target runs in slices of at most 10 s, round-robin, so that
    // whatever else loads the machine falls on all of them alike; a
    // target's tps is its transactions over its time.
    let slices = secs.div_ceil(10).max(1);
    let slice = (secs / slices).max(1).to_string();
    let mut results: Vec<(&str, &str, f64)> = Vec::new();
    let groups: [(&str, Option<&str>, &[Target]); 3] = [
        ("select-only", Some("-S"), &rw_targets),
        ("TPC-B", None, &rw_targets),
        ("select-only, read-only side", Some("-S"), &ro_targets),
    ];
    for (mode, extra, targets) in groups {
        let mut sums = vec![0.0f64; targets.len()];
        for _ in 0..slices {
            for (i, (name, port)) in targets.iter().enumerate() {
                let mut args = vec!["-n", "-c", &c, "-j", "2", "-T", &slice];
                args.extend(extra);
                let report =
                    pgbench(*port, &args).unwrap_or_else(|e| panic!("pgbench {name}: {e}"));
                sums[i] += tps(&report);
            }
        }
        for (i, (name, _)) in targets.iter().enumerate() {
            let v = sums[i] / slices as f64;
            eprintln!("bench: {mode} {name}: {v:.0} tps");
            results.push((mode, name, v));
        }
    }
    let get = |mode: &str, name: &str| {
        results
            .iter()
            .find(|(m, n, _)| *m == mode && *n == name)
            .map(|r| r.2)
            .expect("measured")
    };
    let mut targets_met = Vec::new();
    for (mode, base, need) in [
        ("select-only", "direct to the primary", 0.9),
        ("TPC-B", "direct to the primary", 0.95),
    ] {
        let direct = get(mode, base);
        let hap = get(mode, "HAProxy primary port");
        for (name, _) in rw_targets {
            let v = get(mode, name);
            let target = match name {
                "router on a replica node (rw)" | "router on the primary node (rw)" => {
                    let met = v >= need * direct && v >= hap;
                    targets_met.push((format!("{mode} tps, {name}"), met));
                    format!(
                        ">= {need} x direct and >= HAProxy: {}",
                        if met { "met" } else { "MISSED" }
                    )
                }
                _ => String::new(),
            };
            rows.push((
                format!("{mode} tps ({clients} clients, {secs} s), {name}"),
                format!("{v:.0}"),
                format!("{:.3}", v / direct),
                target,
            ));
        }
    }
    let ro_direct = get("select-only, read-only side", "direct to a replica");
    for (name, _) in ro_targets {
        let v = get("select-only, read-only side", name);
        rows.push((
            format!("select-only tps, read-only side, {name}"),
            format!("{v:.0}"),
            format!("{:.3}", v / ro_direct),
            String::new(),
        ));
    }

    // 2. Connection setup.
    let storm = Duration::from_secs(secs.min(15));
    let mut direct_rate = 0.0;
    for (name, port) in [
        ("direct to the primary", primary_port),
        ("router on a replica node (rw)", routers.rw(&replica)),
        ("HAProxy primary port", proxy.primary_port),
    ] {
        let (lat, failed) = connect_storm(port, clients as usize, storm);
        let rate = lat.len() as f64 / storm.as_secs_f64();
        if direct_rate == 0.0 {
            direct_rate = rate;
        }
        eprintln!(
            "bench: connections {name}: {rate:.0}/s, p50 {}, p99 {}, failed {failed}",
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99))
        );
        rows.push((
            format!("new connections per second ({clients} threads, connect + SELECT 1), {name}"),
            format!("{rate:.0}"),
            format!("{:.3}", rate / direct_rate),
            format!("{failed} failed"),
        ));
        rows.push((
            format!("connect latency p50 / p99, {name}"),
            format!(
                "{} / {}",
                ms(percentile(&lat, 0.5)),
                ms(percentile(&lat, 0.99))
            ),
            String::new(),
            String::new(),
        ));
    }

    // 3. Idle connections through the router of a replica node (relayed
    // to the primary) and through HAProxy, one after the other.
    let postmaster = cluster
        .node(&primary)
        .postmaster_pid()
        .expect("primary runs");
    let agent = cluster.node(&replica).agent_pid().expect("agent runs");
    let router_idle = hold_idle(routers.rw(&replica), idle_n, agent, postmaster);
    let hap_idle = hold_idle(proxy.primary_port, idle_n, proxy.pid(), postmaster);
    for (name, idle) in [
        ("pgha agent (router)", &router_idle),
        ("HAProxy", &hap_idle),
    ] {
        eprintln!(
            "bench: idle {name}: {} held, RSS {} -> {} KiB (+{:.1} MiB), opened in {:.1} s",
            idle.held,
            idle.rss_before_kib,
            idle.rss_after_kib,
            idle.extra_mib(),
            idle.open_took.as_secs_f64()
        );
    }
    let idle_met = router_idle.extra_mib() < 64.0 && router_idle.held >= idle_n * 95 / 100;
    targets_met.push(("idle connections: agent RSS".to_string(), idle_met));
    rows.push((
        format!(
            "extra RSS holding {} idle connections, pgha agent (router)",
            router_idle.held
        ),
        format!("{:.1} MiB", router_idle.extra_mib()),
        format!(
            "{:.3}",
            router_idle.extra_mib() / hap_idle.extra_mib().max(0.001)
        ),
        format!("< 64 MiB: {}", if idle_met { "met" } else { "MISSED" }),
    ));
    rows.push((
        format!(
            "extra RSS holding {} idle connections, HAProxy",
            hap_idle.held
        ),
        format!("{:.1} MiB", hap_idle.extra_mib()),
        "1.000".into(),
        String::new(),
    ));
    rows.push((
        "agent RSS before the idle connections (the whole agent)".into(),
        format!("{:.1} MiB", router_idle.rss_before_kib as f64 / 1024.0),
        String::new(),
        String::new(),
    ));

    // 4. Changes of primary. `anchor` is the node whose routers the
    // clients use; it is never the node killed.
    let anchor = replica.clone();
    let pg_ports = cluster.pg_ports();
    let probe = RoleProbe::start(&pg_ports, Duration::from_millis(5));
    create_writes_table(cluster.node(&primary));
    let connect_within = Duration::from_secs(10);
    let via_router = Writer::reconnecting(
        "via-router",
        routers.rw(&anchor),
        WRITE_EVERY,
        connect_within,
    );
    let via_haproxy = Writer::reconnecting(
        "via-haproxy",
        proxy.primary_port,
        WRITE_EVERY,
        connect_within,
    );
    let mut landers = vec![
        Lander {
            what: "router read-write port",
            read_write: true,
            clients: ProxyClients::start(routers.rw(&anchor), LAND_EVERY),
        },
        Lander {
            what: "router read-only port",
            read_write: false,
            clients: ProxyClients::start(routers.ro(&anchor), LAND_EVERY),
        },
        Lander {
            what: "HAProxy primary port",
            read_write: true,
            clients: ProxyClients::start(proxy.primary_port, LAND_EVERY),
        },
        Lander {
            what: "HAProxy replicas port",
            read_write: false,
            clients: ProxyClients::start(proxy.replica_port, LAND_EVERY),
        },
    ];
    let mut changes: Vec<Change> = Vec::new();
    let current_primary =
        |cluster: &mut Cluster| cluster.wait_healthy(HEALTHY).primaries()[0].name.clone();
    for round in 0..rounds {
        // A switchover to a node other than the anchor.
        let from = current_primary(&mut cluster);
        let to = cluster
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .find(|n| *n != from && *n != anchor)
            .expect("a third node");
        let to_port = cluster.node(&to).pg_port;
        let asked = Instant::now();
        cluster.switch_over(&from, &to);
        let promoted = wait_until(
            "the switchover's promotion",
            Duration::from_secs(30),
            || probe.first_primary_after(to_port, asked),
        );
        changes.push(Change {
            what: "switchover",
            router_ms: first_ack_ms(&via_router, to_port, promoted, Duration::from_secs(20)),
            haproxy_ms: first_ack_ms(&via_haproxy, to_port, promoted, Duration::from_secs(20)),
        });
        // SIGKILL of that primary (not the anchor).
        let victim = current_primary(&mut cluster);
        assert_ne!(victim, anchor, "round {round}: the anchor leads");
        let killed = Instant::now();
        cluster.node_mut(&victim).kill9_with_postgres();
        let (new_port, promoted) = wait_until(
            "a promotion after the kill",
            Duration::from_secs(60),
            || {
                pg_ports
                    .iter()
                    .filter(|&&p| p != cluster.node(&victim).pg_port)
                    .find_map(|&p| probe.first_primary_after(p, killed).map(|at| (p, at)))
            },
        );
        changes.push(Change {
            what: "SIGKILL of the primary",
            router_ms: first_ack_ms(&via_router, new_port, promoted, Duration::from_secs(20)),
            haproxy_ms: first_ack_ms(&via_haproxy, new_port, promoted, Duration::from_secs(20)),
        });
        cluster.node_mut(&victim).restart();
        cluster.wait_healthy(HEALTHY);
        eprintln!("bench: round {} of {rounds} done", round + 1);
    }
    let (router_log, haproxy_log) = (via_router.stop(), via_haproxy.stop());
    drop(probe);
    let mut landing_rows = Vec::new();
    for l in &mut landers {
        let landings = l.clients.stop();
        let (bad, of) = wrong(&landings, l.read_write);
        let failed = landings.iter().filter(|(_, x)| x.is_none()).count();
        eprintln!(
            "bench: {}: {bad} of {of} new connections on the wrong role ({failed} failed)",
            l.what
        );
        landing_rows.push((l.what, bad, of, failed));
    }
    for (what, bad, of, failed) in &landing_rows {
        let target = if what.starts_with("router") {
            let met = *bad == 0;
            targets_met.push((format!("wrong-role landings, {what}"), met));
            format!("0: {}", if met { "met" } else { "MISSED" })
        } else {
            String::new()
        };
        rows.push((
            format!("new connections on the wrong role across the changes, {what}"),
            format!("{bad} of {of}"),
            String::new(),
            format!("{target} ({failed} failed to connect)"),
        ));
    }
    for what in ["switchover", "SIGKILL of the primary"] {
        let pick = |f: fn(&Change) -> Option<f64>| {
            let mut v: Vec<f64> = changes
                .iter()
                .filter(|c| c.what == what)
                .filter_map(f)
                .collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let r = pick(|c| c.router_ms);
        let h = pick(|c| c.haproxy_ms);
        let med = |v: &[f64]| v.get(v.len() / 2).copied().unwrap_or(f64::NAN);
        let max = |v: &[f64]| v.last().copied().unwrap_or(f64::NAN);
        let met = !r.is_empty() && max(&r) < 100.0;
        targets_met.push((
            format!("{what}: promotion to first write through the router"),
            met,
        ));
        rows.push((
            format!(
                "{what}: promotion to first write acknowledged, router (median / max of {})",
                r.len()
            ),
            format!("{:.0} / {:.0} ms", med(&r), max(&r)),
            format!("{:.3}", med(&r) / med(&h)),
            format!("< 100 ms: {}", if met { "met" } else { "MISSED" }),
        ));
        rows.push((
            format!(
                "{what}: promotion to first write acknowledged, HAProxy (median / max of {})",
                h.len()
            ),
            format!("{:.0} / {:.0} ms", med(&h), max(&h)),
            "1.000".into(),
            String::new(),
        ));
        eprintln!("bench: {what}: router {r:?} ms, HAProxy {h:?} ms");
    }
    let unknown = router_log.unknown_count() + haproxy_log.unknown_count();
    drop(proxy);
    cluster.stop_all(Duration::from_secs(60));

    // The report.
    let mut table =
        String::from("| metric | value | vs baseline | target |\n|---|---:|---:|---|\n");
    for (m, v, r, t) in &rows {
        let _ = writeln!(table, "| {m} | {v} | {r} | {t} |");
    }
    let commit = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let cpus = command_output("nproc", &[]);
    let report = format!(
        "# The router beside a direct connection and HAProxy\n\n\
         Written by `bench/router.sh` (`tests/bench_router.rs`); rerun it to replace this file.\n\n\
         - date: {date}\n- pgha commit: {commit}\n- {pg}; {haproxy_v}\n\
         - machine: {cpus} cores, {mem:.1} GiB; load average {load_start} at the start, {load_end} at the end (everything below shares these cores: pgbench, the three Postgres, etcd, the agents, HAProxy)\n\
         - run time {run:.1} min; open files limit {fd_limit} (the agent and HAProxy each need two per idle connection, so at most about half of it can be held)\n\n{table}\n\
         ## How\n\n\
         - Three nodes on loopback, ttl 3 s, each agent's router on (`hold_timeout` 10 s); HAProxy 2.6 with the check settings of `config/haproxy.cfg` (`inter 1s fall 2 rise 1 on-marked-down shutdown-sessions`, `/primary` and `/replica`), its `maxconn` raised to {hap_max} for the idle test. \"vs baseline\" is the ratio to the first row of its group (direct), or to HAProxy.\n\
         - Throughput: `pgbench -n -c {clients} -j 2` (`-S` for select-only) on a scale-10 database, {secs} s per target in slices of at most 10 s taken round-robin over the targets (so background load falls on all alike); tps without the initial connection time, averaged over the slices.\n\
         - New connections: {clients} threads, each opening a connection (TCP, startup, SCRAM password), running `SELECT 1` and closing it, for {storm} s; latency to the connection being ready.\n\
         - Idle connections: TCP connections that send nothing, opened in batches of 250; each reaches the primary's Postgres, which forks a backend that waits up to `authentication_timeout` (600 s; `max_connections` {maxc} so the postmaster admits them); \"held\" counts the backends that appeared. RSS from /proc of the agent process (the router is in it) and of HAProxy, before and after.\n\
         - Changes of primary: {rounds} switchovers and {rounds} SIGKILLs (agent and Postgres), alternating; a client through the router of a node that is never killed and one through HAProxy's primary port each open a new connection per insert, every {we} ms, waiting up to 10 s to connect; the promotion instant is the first 5 ms probe of `pg_is_in_recovery()` that sees the new primary writable. Four more clients open a connection every {le} ms through the router's two ports and HAProxy's two, and ask `pg_is_in_recovery()`: a read-write port landing on a node in recovery, or a read-only port on a writable node, is on the wrong role. Writes with an unknown outcome: {unknown}.\n",
        date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        pg = command_output("/usr/lib/postgresql/15/bin/postgres", &["--version"]),
        haproxy_v = command_output("haproxy", &["-v"]).lines().next().unwrap_or(""),
        mem = memory_gib(),
        load_end = load_average(),
        run = run_started.elapsed().as_secs_f64() / 60.0,
        hap_max = idle_n + 200,
        fd_limit = fd_limit,
        storm = storm.as_secs(),
        maxc = idle_n / 2 + 200,
        we = WRITE_EVERY.as_millis(),
        le = LAND_EVERY.as_millis(),
    );
    eprintln!("\n{report}");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/router-results.md");
    fs::write(path, &report).expect("write bench/router-results.md");
    eprintln!("wrote {path}");
    for (what, met) in &targets_met {
        eprintln!("target {}: {what}", if *met { "met" } else { "MISSED" });
    }
}
