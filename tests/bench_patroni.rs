//! pgha against Patroni, side by side in one run (issue 11), run by
//! `bench/patroni.sh` (ignored by `cargo test`). Both systems run three
//! nodes on the same PostgreSQL 15 binaries and the same etcd, in synchronous
//! mode, and every measurement alternates between them round by round.
//! Prints a table with the ratio pgha / Patroni and writes `bench/results.md`.
//!
//! Series, each on fresh clusters:
//! 1. each system's default timings (pgha ttl 10 s, Patroni ttl 30 s):
//!    start to healthy, 60 s idle (RSS, CPU), wrk on `/health`, failovers,
//!    switchovers;
//! 2. both at TTL 20 s, the lowest Patroni accepts: start to healthy, failovers;
//! 3. pgha alone at its lowest TTL (3 s): failovers, compared with series 2.
//!
//! Environment: PGHA_BENCH_ROUNDS (default 10) rounds per failover and
//! switchover series, PGHA_BENCH_IDLE_SECS (default 60), PATRONI_VENV.

mod common;
#[path = "common/patroni.rs"]
mod patroni;

use std::fmt::Write as _;
use std::fs;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::procs::{
    agent_tree, clock_ticks_per_second, command_output, cpu_ticks, load_average, memory_gib,
    pss_kib, rss_kib,
};
use common::{
    create_writes_table_on_port, http_post, serial, stored_seqs, wait_until, Cluster, Etcd,
    Options, Timing, Writer,
};
use patroni::{PatroniCluster, PatroniTiming};

const WRITE_EVERY: Duration = Duration::from_millis(20);
const READY_TIMEOUT: Duration = Duration::from_secs(180);
const NODES: usize = 3;

/// The cluster as one measurement step needs it: healthy, with a
/// synchronous standby.
struct Ready {
    primary: String,
    sync_standby: String,
    replicas: Vec<String>,
}

/// What the benchmark does to either system.
trait HaSystem {
    fn pg_ports(&self) -> Vec<u16>;
    fn port_of(&self, name: &str) -> u16;
    /// One primary, every other node streaming from it, one of them the
    /// synchronous standby.
    fn ready(&mut self) -> Ready;
    /// SIGKILL of the node's agent and its whole Postgres at once.
    fn kill_with_postgres(&mut self, name: &str);
    fn restart(&mut self, name: &str);
    /// Planned switchover through the system's REST API.
    fn switchover(&mut self, from: &str, to: &str);
    /// The agent process of every node.
    fn agent_pids(&self) -> Vec<i32>;
    fn health_url(&self, name: &str) -> String;
    /// The etcd key holding the leader's name.
    fn leader_key(&self) -> String;
}

struct Pgha(Cluster);

impl HaSystem for Pgha {
    fn pg_ports(&self) -> Vec<u16> {
        self.0.pg_ports()
    }

    fn port_of(&self, name: &str) -> u16 {
        self.0.node(name).pg_port
    }

    fn ready(&mut self) -> Ready {
        wait_until(
            "pgha: healthy with a synchronous standby",
            READY_TIMEOUT,
            || {
                let view = self.0.wait_healthy(READY_TIMEOUT);
                let primary = view.primaries()[0].name.clone();
                let json = self.0.node(&primary).get_json("/cluster")?;
                let sync_standby = json["members"]
                    .as_array()?
                    .iter()
                    .find(|m| m["sync_standby"].as_bool() == Some(true))?["name"]
                    .as_str()?
                    .to_string();
                let replicas = view
                    .members
                    .iter()
                    .map(|m| m.name.clone())
                    .filter(|n| *n != primary)
                    .collect();
                Some(Ready {
                    primary,
                    sync_standby,
                    replicas,
                })
            },
        )
    }

    fn kill_with_postgres(&mut self, name: &str) {
        self.0.node_mut(name).kill9_with_postgres();
    }

    fn restart(&mut self, name: &str) {
        self.0.node_mut(name).restart();
    }

    fn switchover(&mut self, from: &str, to: &str) {
        let (status, answer) = http_post(
            self.0.node(from).api_addr(),
            "/switchover",
            &format!(r#"{{"leader":"{from}","candidate":"{to}"}}"#),
        );
        assert_eq!(status, 200, "pgha switchover {from} -> {to}: {answer}");
    }

    fn agent_pids(&self) -> Vec<i32> {
        self.0
            .nodes
            .iter()
            .map(|n| n.agent_pid().expect("pgha agent running"))
            .collect()
    }

    fn health_url(&self, name: &str) -> String {
        format!("{}/health", self.0.node(name).api_url())
    }

    fn leader_key(&self) -> String {
        format!("/pgha/{}/leader", self.0.opts.scope)
    }
}

struct Patroni(PatroniCluster);

impl HaSystem for Patroni {
    fn pg_ports(&self) -> Vec<u16> {
        self.0.pg_ports()
    }

    fn port_of(&self, name: &str) -> u16 {
        self.0.node(name).pg_port
    }

    fn ready(&mut self) -> Ready {
        let members = self.0.wait_healthy(READY_TIMEOUT, true);
        let primary = members
            .iter()
            .find(|m| m.role == "leader")
            .expect("leader")
            .name
            .clone();
        let sync_standby = members
            .iter()
            .find(|m| m.role == "sync_standby")
            .expect("sync standby")
            .name
            .clone();
        let replicas = members
            .iter()
            .map(|m| m.name.clone())
            .filter(|n| *n != primary)
            .collect();
        Ready {
            primary,
            sync_standby,
            replicas,
        }
    }

    fn kill_with_postgres(&mut self, name: &str) {
        self.0.node_mut(name).kill9_with_postgres();
    }

    fn restart(&mut self, name: &str) {
        self.0.node_mut(name).restart();
    }

    fn switchover(&mut self, from: &str, to: &str) {
        let (status, answer) = self.0.switchover(from, to);
        assert_eq!(status, 200, "Patroni switchover {from} -> {to}: {answer}");
    }

    fn agent_pids(&self) -> Vec<i32> {
        self.0
            .nodes
            .iter()
            .map(|n| n.agent_pid().expect("patroni running"))
            .collect()
    }

    fn health_url(&self, name: &str) -> String {
        format!("{}/health", self.0.node(name).api_url())
    }

    fn leader_key(&self) -> String {
        format!("{}{}/leader", patroni::NAMESPACE, self.0.scope)
    }
}

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

/// Outages and writes of one system in one series.
#[derive(Default)]
struct Outages {
    windows: Vec<Duration>,
    /// Failovers: from the SIGKILL until the old leader key was gone.
    key_gone: Vec<Duration>,
    acked: usize,
    lost: usize,
    /// Time spent in the rounds, for the run-time estimate.
    spent: Duration,
}

impl Outages {
    fn median(&self) -> Duration {
        median(&self.windows)
    }

    fn max(&self) -> Duration {
        self.windows.iter().max().copied().unwrap_or_default()
    }
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    match v.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

fn env_number(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Starts a writer on `sys` (table created on its primary) and waits for
/// its first acknowledgement.
fn start_writer(sys: &mut dyn HaSystem, name: &str) -> Writer {
    let ready = sys.ready();
    create_writes_table_on_port(sys.port_of(&ready.primary));
    let writer = Writer::multi_host(name, &sys.pg_ports(), WRITE_EVERY);
    writer.wait_for_ack_after(Instant::now(), Duration::from_secs(30));
    writer
}

/// Stops the writer and counts its acknowledged rows missing on the primary.
fn finish_writer(sys: &mut dyn HaSystem, writer: Writer, into: &mut Outages) {
    let ready = sys.ready();
    let log = writer.stop();
    let stored = stored_seqs(sys.port_of(&ready.primary), &log.writer).expect("rows");
    into.acked += log.acked_count();
    into.lost += log.lost(&stored).len();
}

/// One unplanned failover: SIGKILL of the primary's agent and Postgres;
/// the outage runs from the last write acknowledged by the old primary to
/// the first acknowledged by a new one. The killed node is restarted and
/// has rejoined before this returns.
fn failover_round(
    sys: &mut dyn HaSystem,
    etcd: &Etcd,
    writer: &Writer,
    label: &str,
) -> (Duration, Duration) {
    let ready = sys.ready();
    let old = ready.primary;
    let old_port = sys.port_of(&old);
    let leader_key = sys.leader_key();
    assert_eq!(
        etcd.get(&leader_key).as_deref(),
        Some(old.as_bytes()),
        "{label}: {leader_key} names the primary"
    );
    writer.wait_for_ack_on(old_port, Instant::now(), Duration::from_secs(30));
    let killed_at = Instant::now();
    sys.kill_with_postgres(&old);
    let mut key_gone = None;
    let first_new = wait_until(
        &format!("{label}: a write acknowledged by a new primary"),
        READY_TIMEOUT,
        || {
            if key_gone.is_none() && etcd.get(&leader_key).as_deref() != Some(old.as_bytes()) {
                key_gone = Some(killed_at.elapsed());
            }
            writer
                .log()
                .acked()
                .map(|(_, a)| a.clone())
                .find(|a| a.at > killed_at && a.port != old_port)
        },
    );
    let last_old = writer
        .log()
        .acked()
        .map(|(_, a)| a)
        .filter(|a| a.port == old_port && a.at < first_new.at)
        .map(|a| a.at)
        .max()
        .expect("acknowledged writes on the old primary");
    let outage = first_new.at - last_old;
    let key_gone = key_gone.unwrap_or_else(|| killed_at.elapsed());
    let promoted_sync = sys.port_of(&ready.sync_standby) == first_new.port;
    eprintln!(
        "{label}: killed {old}; leader key gone after {:.2} s, write outage {:.2} s (new primary {} the synchronous standby)",
        key_gone.as_secs_f64(),
        outage.as_secs_f64(),
        if promoted_sync { "was" } else { "was NOT" }
    );
    sys.restart(&old);
    sys.ready();
    (outage, key_gone)
}

/// One planned switchover from the primary to its synchronous standby
/// (Patroni refuses any other candidate in synchronous mode).
fn switchover_round(sys: &mut dyn HaSystem, writer: &Writer, label: &str) -> Duration {
    let ready = sys.ready();
    let (from, to) = (ready.primary, ready.sync_standby);
    let (old_port, new_port) = (sys.port_of(&from), sys.port_of(&to));
    writer.wait_for_ack_on(old_port, Instant::now(), Duration::from_secs(30));
    let asked = Instant::now();
    sys.switchover(&from, &to);
    let first_new = writer.wait_for_ack_on(new_port, asked, Duration::from_secs(60));
    let last_old = writer
        .log()
        .acked()
        .map(|(_, a)| a)
        .filter(|a| a.port == old_port && a.at <= first_new.at)
        .map(|a| a.at)
        .max()
        .unwrap_or(asked);
    let outage = first_new.at - last_old;
    eprintln!(
        "{label}: switchover {from} -> {to}; write outage {:.0} ms",
        outage.as_secs_f64() * 1000.0
    );
    sys.ready();
    outage
}

/// Per agent (process tree as [`agent_tree`]), means over the nodes.
#[derive(Default, Clone, Copy)]
struct Idle {
    rss_mib: f64,
    rss_max_mib: f64,
    /// The agent process alone, without its helpers.
    agent_only_rss_mib: f64,
    /// PSS of the whole tree.
    pss_mib: f64,
    cpu_s: f64,
    processes_per_agent: usize,
}

/// RSS after `idle` of idling and CPU seconds spent in it, for both
/// systems over the same window.
fn measure_idle(systems: [&dyn HaSystem; 2], idle: Duration) -> [Idle; 2] {
    let trees = systems.map(|s| {
        s.agent_pids()
            .into_iter()
            .map(agent_tree)
            .collect::<Vec<_>>()
    });
    let ticks = |trees: &Vec<Vec<i32>>| -> Vec<u64> {
        trees
            .iter()
            .map(|t| t.iter().map(|&p| cpu_ticks(p)).sum())
            .collect()
    };
    let before = [ticks(&trees[0]), ticks(&trees[1])];
    std::thread::sleep(idle);
    let hz = clock_ticks_per_second();
    let mut out = [Idle::default(); 2];
    for (i, trees) in trees.iter().enumerate() {
        let after = ticks(trees);
        let rss: Vec<f64> = trees
            .iter()
            .map(|t| t.iter().map(|&p| rss_kib(p)).sum::<u64>() as f64 / 1024.0)
            .collect();
        let cpu: Vec<f64> = after
            .iter()
            .zip(&before[i])
            .map(|(a, b)| a.saturating_sub(*b) as f64 / hz)
            .collect();
        let n = trees.len() as f64;
        out[i] = Idle {
            rss_mib: rss.iter().sum::<f64>() / n,
            rss_max_mib: rss.iter().copied().fold(0.0, f64::max),
            agent_only_rss_mib: trees
                .iter()
                .map(|t| rss_kib(t[0]) as f64 / 1024.0)
                .sum::<f64>()
                / n,
            pss_mib: trees
                .iter()
                .map(|t| t.iter().map(|&p| pss_kib(p)).sum::<u64>() as f64 / 1024.0)
                .sum::<f64>()
                / n,
            cpu_s: cpu.iter().sum::<f64>() / n,
            processes_per_agent: trees.iter().map(Vec::len).max().unwrap_or(0),
        };
    }
    out
}

/// `wrk -c16 -t2 -d10s --latency`: requests/s, p99 in ms, non-2xx count.
#[derive(Default, Clone, Copy)]
struct Wrk {
    rps: f64,
    p99_ms: f64,
    non_2xx: u64,
}

fn run_wrk(url: &str) -> Wrk {
    let out = Command::new("wrk")
        .args(["-c16", "-t2", "-d10s", "--latency", url])
        .output()
        .expect("run wrk (bench/patroni.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("wrk {url}:\n{text}");
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.trim().to_string())
    };
    let rps = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let p99_ms = field("99%").map(|v| to_ms(&v)).unwrap_or(f64::NAN);
    let non_2xx = field("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Wrk {
        rps,
        p99_ms,
        non_2xx,
    }
}

/// wrk's latency ("850.00us", "1.23ms", "1.02s", "2.00m") in ms.
fn to_ms(v: &str) -> f64 {
    let split = v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => f64::NAN,
    }
}

// ---------------------------------------------------------------------------
// Clusters
// ---------------------------------------------------------------------------

fn start_pgha(etcd: &Arc<Etcd>, scope: &str, timing: Timing) -> (Pgha, Duration) {
    let started = Instant::now();
    let mut cluster = Cluster::start_on(
        etcd.clone(),
        NODES,
        Options {
            scope: scope.into(),
            timing,
            extra_toml: "[cluster]\nsynchronous_mode = \"on\"\n".into(),
            ..Options::default()
        },
    );
    cluster.wait_healthy(READY_TIMEOUT);
    let took = started.elapsed();
    eprintln!(
        "pgha ({scope}): healthy 3-node cluster after {:.1} s",
        took.as_secs_f64()
    );
    (Pgha(cluster), took)
}

fn start_patroni(etcd: &Etcd, scope: &str, timing: PatroniTiming) -> (Patroni, Duration) {
    let started = Instant::now();
    let cluster = PatroniCluster::start_on(etcd, NODES, scope, timing);
    cluster.wait_healthy(READY_TIMEOUT, false);
    let took = started.elapsed();
    eprintln!(
        "Patroni ({scope}): healthy 3-node cluster after {:.1} s",
        took.as_secs_f64()
    );
    (Patroni(cluster), took)
}

/// Alternating failover rounds on both systems, one writer each.
fn failovers(
    etcd: &Etcd,
    pgha: &mut Pgha,
    patroni: Option<&mut Patroni>,
    rounds: usize,
    tag: &str,
) -> (Outages, Option<Outages>) {
    let mut a = Outages::default();
    let mut b = patroni.as_ref().map(|_| Outages::default());
    let wa = start_writer(pgha, &format!("pgha-{tag}"));
    let mut patroni = patroni;
    let wb = patroni
        .as_deref_mut()
        .map(|p| start_writer(p, &format!("patroni-{tag}")));
    for round in 1..=rounds {
        let t = Instant::now();
        let (window, key_gone) =
            failover_round(pgha, etcd, &wa, &format!("pgha {tag} {round}/{rounds}"));
        a.windows.push(window);
        a.key_gone.push(key_gone);
        a.spent += t.elapsed();
        if let (Some(p), Some(w), Some(b)) = (patroni.as_deref_mut(), wb.as_ref(), b.as_mut()) {
            let t = Instant::now();
            let (window, key_gone) =
                failover_round(p, etcd, w, &format!("Patroni {tag} {round}/{rounds}"));
            b.windows.push(window);
            b.key_gone.push(key_gone);
            b.spent += t.elapsed();
        }
    }
    finish_writer(pgha, wa, &mut a);
    if let (Some(p), Some(w), Some(b)) = (patroni, wb, b.as_mut()) {
        finish_writer(p, w, b);
    }
    (a, b)
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

struct Row {
    metric: String,
    pgha: String,
    patroni: String,
    ratio: String,
    target: String,
    met: String,
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && b.is_finite() {
        format!("{:.3}", a / b)
    } else {
        "-".into()
    }
}

fn verdict(ok: bool) -> String {
    if ok { "met" } else { "MISSED" }.into()
}

fn duration_row(metric: &str, a: Duration, b: Duration, target: &str, met: Option<bool>) -> Row {
    Row {
        metric: metric.into(),
        pgha: secs(a),
        patroni: secs(b),
        ratio: ratio(a.as_secs_f64(), b.as_secs_f64()),
        target: target.into(),
        met: met.map(verdict).unwrap_or_else(|| "-".into()),
    }
}

fn render_table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str("| metric | pgha | Patroni | pgha / Patroni | target | met |\n");
    out.push_str("|---|---:|---:|---:|---|---|\n");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            r.metric, r.pgha, r.patroni, r.ratio, r.target, r.met
        );
    }
    out
}

/// A rough run time for `rounds` rounds, before anything is measured:
/// seconds per round from a validation run on 2 shared cores.
fn estimate(rounds: u64, idle_s: u64) -> Duration {
    // Fixed: 5 cluster starts, idle window, 2 wrk runs, teardown.
    let fixed = 120 + idle_s + 50;
    // Per round: failovers at defaults (pgha, Patroni), at TTL 20 (pgha,
    // Patroni), at pgha's lowest TTL, and one switchover each.
    let per_round = 25 + 45 + 35 + 30 + 10 + 5 + 10;
    Duration::from_secs(fixed + rounds * per_round)
}

fn list(windows: &[Duration]) -> String {
    windows
        .iter()
        .map(|w| format!("{:.2}", w.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
#[ignore = "side-by-side benchmark against Patroni of about half an hour: run bench/patroni.sh"]
fn pgha_and_patroni_side_by_side() {
    let _serial = serial();
    let rounds = env_number("PGHA_BENCH_ROUNDS", 10).max(1);
    let idle_s = env_number("PGHA_BENCH_IDLE_SECS", 60);
    let run_started = Instant::now();
    let load_before = load_average();
    let patroni_version = patroni::version();
    eprintln!(
        "{patroni_version}; {rounds} round(s) per series; estimated run time {:.0} min ({:.0} min with 10 rounds)",
        estimate(rounds, idle_s).as_secs_f64() / 60.0,
        estimate(10, idle_s).as_secs_f64() / 60.0
    );
    let etcd = Arc::new(Etcd::start());
    let mut starts_pgha = Vec::new();
    let mut starts_patroni = Vec::new();
    let mut fixed = Duration::ZERO;

    // Series 1: each system at its defaults.
    let t = Instant::now();
    let (mut pgha, took) = start_pgha(&etcd, "bench-default", Timing::STANDARD);
    starts_pgha.push(took);
    let (mut patroni, took) = start_patroni(&etcd, "bench-default", PatroniTiming::DEFAULT);
    starts_patroni.push(took);
    pgha.ready();
    patroni.ready();
    eprintln!("both clusters idle for {idle_s} s (RSS, CPU)");
    let [idle_pgha, idle_patroni] = measure_idle(
        [&pgha as &dyn HaSystem, &patroni],
        Duration::from_secs(idle_s),
    );
    // A replica of each, then the primary of each, alternating.
    let (pgha_ready, patroni_ready) = (pgha.ready(), patroni.ready());
    let wrk_pgha = run_wrk(&pgha.health_url(&pgha_ready.replicas[0]));
    let wrk_patroni = run_wrk(&patroni.health_url(&patroni_ready.replicas[0]));
    let wrk_pgha_primary = run_wrk(&pgha.health_url(&pgha_ready.primary));
    let wrk_patroni_primary = run_wrk(&patroni.health_url(&patroni_ready.primary));
    fixed += t.elapsed();
    let (fo_default_pgha, fo_default_patroni) = failovers(
        &etcd,
        &mut pgha,
        Some(&mut patroni),
        rounds as usize,
        "defaults",
    );
    let fo_default_patroni = fo_default_patroni.expect("Patroni series");
    let mut so_pgha = Outages::default();
    let mut so_patroni = Outages::default();
    {
        let wa = start_writer(&mut pgha, "pgha-switchover");
        let wb = start_writer(&mut patroni, "patroni-switchover");
        for round in 1..=rounds {
            let t = Instant::now();
            so_pgha.windows.push(switchover_round(
                &mut pgha,
                &wa,
                &format!("pgha {round}/{rounds}"),
            ));
            so_pgha.spent += t.elapsed();
            let t = Instant::now();
            so_patroni.windows.push(switchover_round(
                &mut patroni,
                &wb,
                &format!("Patroni {round}/{rounds}"),
            ));
            so_patroni.spent += t.elapsed();
        }
        finish_writer(&mut pgha, wa, &mut so_pgha);
        finish_writer(&mut patroni, wb, &mut so_patroni);
    }
    let t = Instant::now();
    drop(pgha);
    drop(patroni);

    // Series 2: both at TTL 20 s; Patroni starts first this time.
    let (mut patroni, took) = start_patroni(&etcd, "bench-ttl20", PatroniTiming::LOWEST_TTL);
    starts_patroni.push(took);
    let (mut pgha, took) = start_pgha(
        &etcd,
        "bench-ttl20",
        Timing {
            ttl_s: 20,
            ..Timing::STANDARD
        },
    );
    starts_pgha.push(took);
    fixed += t.elapsed();
    let (fo_ttl20_pgha, fo_ttl20_patroni) = failovers(
        &etcd,
        &mut pgha,
        Some(&mut patroni),
        rounds as usize,
        "ttl20",
    );
    let fo_ttl20_patroni = fo_ttl20_patroni.expect("Patroni series");
    let t = Instant::now();
    drop(pgha);
    drop(patroni);

    // Series 3: pgha at the lowest TTL it accepts.
    let (mut pgha, took) = start_pgha(&etcd, "bench-ttl3", Timing::FAST);
    starts_pgha.push(took);
    fixed += t.elapsed();
    let (fo_fast_pgha, _) = failovers(&etcd, &mut pgha, None, rounds as usize, "ttl3");
    let t = Instant::now();
    drop(pgha);
    drop(etcd);
    fixed += t.elapsed();
    let elapsed = run_started.elapsed();
    let load_after = load_average();

    // The same run with 10 rounds: fixed parts as measured, rounds scaled.
    let round_time: Duration = [
        &fo_default_pgha,
        &fo_default_patroni,
        &fo_ttl20_pgha,
        &fo_ttl20_patroni,
        &fo_fast_pgha,
        &so_pgha,
        &so_patroni,
    ]
    .iter()
    .map(|o| o.spent)
    .sum();
    let rest = elapsed.saturating_sub(round_time).saturating_sub(fixed);
    for (name, o) in [
        ("failovers pgha defaults", &fo_default_pgha),
        ("failovers Patroni defaults", &fo_default_patroni),
        ("failovers pgha ttl 20", &fo_ttl20_pgha),
        ("failovers Patroni ttl 20", &fo_ttl20_patroni),
        ("failovers pgha ttl 3", &fo_fast_pgha),
        ("switchovers pgha", &so_pgha),
        ("switchovers Patroni", &so_patroni),
    ] {
        eprintln!(
            "time in {name}: {:.0} s ({:.0} s per round)",
            o.spent.as_secs_f64(),
            o.spent.as_secs_f64() / rounds as f64
        );
    }
    let full_estimate = fixed + rest + round_time.mul_f64(10.0 / rounds as f64);

    let half = Duration::from_secs_f64;
    let mut rows = vec![
        duration_row(
            "start to healthy 3-node cluster (median of starts)",
            median(&starts_pgha),
            median(&starts_patroni),
            "",
            None,
        ),
        duration_row(
            &format!(
                "failover write outage, defaults (pgha ttl {} s, Patroni ttl {} s), median",
                Timing::STANDARD.ttl_s,
                PatroniTiming::DEFAULT.ttl_s
            ),
            fo_default_pgha.median(),
            fo_default_patroni.median(),
            "<= 1/2",
            Some(fo_default_pgha.median() <= half(fo_default_patroni.median().as_secs_f64() / 2.0)),
        ),
        duration_row(
            "failover write outage, defaults, max",
            fo_default_pgha.max(),
            fo_default_patroni.max(),
            "",
            None,
        ),
        duration_row(
            "failover write outage, both ttl 20 s, median",
            fo_ttl20_pgha.median(),
            fo_ttl20_patroni.median(),
            "",
            None,
        ),
        duration_row(
            "failover write outage, both ttl 20 s, max",
            fo_ttl20_pgha.max(),
            fo_ttl20_patroni.max(),
            "",
            None,
        ),
        duration_row(
            &format!(
                "failover write outage, lowest accepted ttl (pgha {} s, Patroni {} s), median",
                Timing::FAST.ttl_s,
                PatroniTiming::LOWEST_TTL.ttl_s
            ),
            fo_fast_pgha.median(),
            fo_ttl20_patroni.median(),
            "<= 1/4",
            Some(fo_fast_pgha.median() <= half(fo_ttl20_patroni.median().as_secs_f64() / 4.0)),
        ),
        duration_row(
            "failover write outage, lowest accepted ttl, max",
            fo_fast_pgha.max(),
            fo_ttl20_patroni.max(),
            "",
            None,
        ),
        duration_row(
            "switchover write outage, defaults, median",
            so_pgha.median(),
            so_patroni.median(),
            "pgha < 1 s",
            Some(so_pgha.median() < Duration::from_secs(1)),
        ),
        duration_row(
            "switchover write outage, defaults, max",
            so_pgha.max(),
            so_patroni.max(),
            "pgha < 1 s",
            Some(so_pgha.max() < Duration::from_secs(1)),
        ),
    ];
    for (what, a, b) in [
        ("defaults", &fo_default_pgha, &fo_default_patroni),
        ("both ttl 20 s", &fo_ttl20_pgha, &fo_ttl20_patroni),
        ("lowest accepted ttl", &fo_fast_pgha, &fo_ttl20_patroni),
    ] {
        rows.push(duration_row(
            &format!("failover, {what}: SIGKILL to old leader key gone from etcd, median"),
            median(&a.key_gone),
            median(&b.key_gone),
            "",
            None,
        ));
    }
    let failover_series_pgha = [&fo_default_pgha, &fo_ttl20_pgha, &fo_fast_pgha];
    let failover_series_patroni = [&fo_default_patroni, &fo_ttl20_patroni];
    let lost_pgha: usize = failover_series_pgha.iter().map(|o| o.lost).sum();
    let acked_pgha: usize = failover_series_pgha.iter().map(|o| o.acked).sum();
    let lost_patroni: usize = failover_series_patroni.iter().map(|o| o.lost).sum();
    let acked_patroni: usize = failover_series_patroni.iter().map(|o| o.acked).sum();
    rows.push(Row {
        metric: "acknowledged writes lost in all failovers (sync mode), lost of acked".into(),
        pgha: format!("{lost_pgha} of {acked_pgha}"),
        patroni: format!("{lost_patroni} of {acked_patroni}"),
        ratio: "-".into(),
        target: "0 for both".into(),
        met: verdict(lost_pgha == 0 && lost_patroni == 0),
    });
    rows.push(Row {
        metric: "acknowledged writes lost in switchovers (sync mode), lost of acked".into(),
        pgha: format!("{} of {}", so_pgha.lost, so_pgha.acked),
        patroni: format!("{} of {}", so_patroni.lost, so_patroni.acked),
        ratio: "-".into(),
        target: "0 for both".into(),
        met: verdict(so_pgha.lost == 0 && so_patroni.lost == 0),
    });
    rows.push(Row {
        metric: format!("agent RSS after {idle_s} s idle, mean per node (max)"),
        pgha: format!(
            "{:.1} MiB ({:.1})",
            idle_pgha.rss_mib, idle_pgha.rss_max_mib
        ),
        patroni: format!(
            "{:.1} MiB ({:.1})",
            idle_patroni.rss_mib, idle_patroni.rss_max_mib
        ),
        ratio: ratio(idle_pgha.rss_mib, idle_patroni.rss_mib),
        target: "<= 1/3".into(),
        met: verdict(idle_pgha.rss_mib * 3.0 <= idle_patroni.rss_mib),
    });
    rows.push(Row {
        metric: "agent RSS, the agent process alone (pgha without its fence guard), mean per node"
            .into(),
        pgha: format!("{:.1} MiB", idle_pgha.agent_only_rss_mib),
        patroni: format!("{:.1} MiB", idle_patroni.agent_only_rss_mib),
        ratio: ratio(
            idle_pgha.agent_only_rss_mib,
            idle_patroni.agent_only_rss_mib,
        ),
        target: "".into(),
        met: "-".into(),
    });
    rows.push(Row {
        metric: "agent PSS (shared pages split among the processes sharing them), agent and helpers, mean per node".into(),
        pgha: format!("{:.1} MiB", idle_pgha.pss_mib),
        patroni: format!("{:.1} MiB", idle_patroni.pss_mib),
        ratio: ratio(idle_pgha.pss_mib, idle_patroni.pss_mib),
        target: "".into(),
        met: "-".into(),
    });
    rows.push(Row {
        metric: format!("agent CPU seconds over {idle_s} s idle, mean per node"),
        pgha: format!("{:.2} s", idle_pgha.cpu_s),
        patroni: format!("{:.2} s", idle_patroni.cpu_s),
        ratio: ratio(idle_pgha.cpu_s, idle_patroni.cpu_s),
        target: "".into(),
        met: "-".into(),
    });
    rows.push(Row {
        metric: "/health throughput (wrk -c16 -t2 -d10s) on a replica".into(),
        pgha: format!("{:.0} req/s", wrk_pgha.rps),
        patroni: format!("{:.0} req/s", wrk_patroni.rps),
        ratio: ratio(wrk_pgha.rps, wrk_patroni.rps),
        target: ">= 10x".into(),
        met: verdict(wrk_pgha.rps >= 10.0 * wrk_patroni.rps && wrk_pgha.non_2xx == 0),
    });
    rows.push(Row {
        metric: "/health p99 latency on a replica".into(),
        pgha: format!("{:.2} ms", wrk_pgha.p99_ms),
        patroni: format!("{:.2} ms", wrk_patroni.p99_ms),
        ratio: ratio(wrk_pgha.p99_ms, wrk_patroni.p99_ms),
        target: "pgha < 5 ms".into(),
        met: verdict(wrk_pgha.p99_ms < 5.0),
    });
    rows.push(Row {
        metric: "/health throughput on the primary".into(),
        pgha: format!("{:.0} req/s", wrk_pgha_primary.rps),
        patroni: format!("{:.0} req/s", wrk_patroni_primary.rps),
        ratio: ratio(wrk_pgha_primary.rps, wrk_patroni_primary.rps),
        target: "".into(),
        met: "-".into(),
    });
    rows.push(Row {
        metric: "/health p99 latency on the primary".into(),
        pgha: format!("{:.2} ms", wrk_pgha_primary.p99_ms),
        patroni: format!("{:.2} ms", wrk_patroni_primary.p99_ms),
        ratio: ratio(wrk_pgha_primary.p99_ms, wrk_patroni_primary.p99_ms),
        target: "".into(),
        met: "-".into(),
    });
    let table = render_table(&rows);

    let commit = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let dirty =
        !command_output("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let postgres_version = command_output(&format!("{}/postgres", common::PG_BIN), &["--version"]);
    let etcd_version = command_output("etcd", &["--version"])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let mut md = String::new();
    let _ = writeln!(md, "# pgha and Patroni, side by side\n");
    let _ = writeln!(
        md,
        "Written by `bench/patroni.sh` (`tests/bench_patroni.rs`); rerun it to replace this file.\n"
    );
    let _ = writeln!(md, "- date: {date}");
    let _ = writeln!(
        md,
        "- pgha commit: {commit}{}",
        if dirty {
            " (with uncommitted changes)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "- Patroni: {patroni_version} (PyPI, `patroni[etcd3]`, psycopg2-binary)"
    );
    let _ = writeln!(
        md,
        "- {postgres_version}; {etcd_version} (one member, shared by both)"
    );
    let _ = writeln!(
        md,
        "- machine: {cores} cores ({cpu_model}), {:.1} GiB memory; load average (1, 5, 15 min) {load_before} at the start, {load_after} at the end (other work on the machine skews every number, wrk's p99 most)",
        memory_gib()
    );
    let _ = writeln!(
        md,
        "- rounds: {rounds} per failover and switchover series{}; run time {:.1} min (with 10 rounds about {:.0} min)\n",
        if rounds < 10 {
            " (a validation run: fewer than the 10 the issue asks for)"
        } else {
            ""
        },
        elapsed.as_secs_f64() / 60.0,
        full_estimate.as_secs_f64() / 60.0
    );
    md.push_str(&table);
    let _ = writeln!(md, "\n## How\n");
    let _ = writeln!(
        md,
        "- Three nodes per system on loopback, synchronous mode on (pgha `synchronous_mode = \"on\"`, Patroni `synchronous_mode: true`), the same Postgres binaries and etcd, different key prefixes. Measurements alternate between the systems round by round."
    );
    let _ = writeln!(
        md,
        "- Timings: defaults are pgha ttl {}/loop_wait {}/retry_timeout {} s and Patroni {}/{}/{} s. At ttl 20 s pgha keeps loop_wait {} s and retry_timeout {} s; Patroni keeps loop_wait {} s and takes retry_timeout {} s so that loop_wait + 2 × retry_timeout fits in the TTL. pgha's lowest TTL runs at {}/{}/{} s.",
        Timing::STANDARD.ttl_s, Timing::STANDARD.loop_wait_s, Timing::STANDARD.retry_timeout_s,
        PatroniTiming::DEFAULT.ttl_s, PatroniTiming::DEFAULT.loop_wait_s, PatroniTiming::DEFAULT.retry_timeout_s,
        Timing::STANDARD.loop_wait_s, Timing::STANDARD.retry_timeout_s,
        PatroniTiming::LOWEST_TTL.loop_wait_s, PatroniTiming::LOWEST_TTL.retry_timeout_s,
        Timing::FAST.ttl_s, Timing::FAST.loop_wait_s, Timing::FAST.retry_timeout_s,
    );
    let _ = writeln!(
        md,
        "- Start to healthy: from spawning three agents on empty data directories (etcd already running) until one primary and two replicas stream from it; pgha's clusters started {} times, Patroni's {} times, one at a time.",
        starts_pgha.len(),
        starts_patroni.len()
    );
    let _ = writeln!(
        md,
        "- Write outage: a client inserts a row every {} ms through `host=127.0.0.1,127.0.0.1,127.0.0.1 port=P1,P2,P3 target_session_attrs=read-write` (tokio-postgres, 1 s connect and 2 s statement timeouts) and records every acknowledgement. Failover: SIGKILL of the primary's agent and its Postgres process group at once; outage from the last write acknowledged by the old primary to the first acknowledged by the new one; then the killed node is restarted and must stream again (and a synchronous standby be in place) before the next round. Switchover: through each system's REST API (`POST /switchover` with leader and candidate; the candidate is the synchronous standby, the only one Patroni accepts in synchronous mode); same outage definition.",
        WRITE_EVERY.as_millis()
    );
    let _ = writeln!(
        md,
        "- Lost writes: after each series every acknowledged row is looked up on the final primary.",
    );
    let _ = writeln!(
        md,
        "- Idle: both clusters idle at the same time for {idle_s} s, before any writer starts; VmRSS at the end and utime + stime over the window from /proc. A pgha node counts its agent and its fence guard ({} processes per node); a Patroni node its Python process ({} per node). Postgres processes are not counted for either.",
        idle_pgha.processes_per_agent,
        idle_patroni.processes_per_agent
    );
    let _ = writeln!(
        md,
        "- wrk: `wrk -c16 -t2 -d10s --latency` on `/health` of a replica of each, then of the primary of each, one run at a time, on the same 2 cores as everything else (wrk, both idle clusters and etcd included). Non-2xx answers: pgha {}, Patroni {}.",
        wrk_pgha.non_2xx + wrk_pgha_primary.non_2xx,
        wrk_patroni.non_2xx + wrk_patroni_primary.non_2xx
    );
    let _ = writeln!(md, "\n## Every round (write outage, seconds)\n");
    for (name, o) in [
        ("pgha, defaults", &fo_default_pgha),
        ("Patroni, defaults", &fo_default_patroni),
        ("pgha, ttl 20 s", &fo_ttl20_pgha),
        ("Patroni, ttl 20 s", &fo_ttl20_patroni),
        ("pgha, ttl 3 s", &fo_fast_pgha),
    ] {
        let _ = writeln!(
            md,
            "- failover, {name}: {} (leader key gone after: {})",
            list(&o.windows),
            list(&o.key_gone)
        );
    }
    let _ = writeln!(md, "- switchover, pgha: {}", list(&so_pgha.windows));
    let _ = writeln!(md, "- switchover, Patroni: {}", list(&so_patroni.windows));
    let _ = writeln!(
        md,
        "- start to healthy, pgha: {}; Patroni: {}",
        list(&starts_pgha),
        list(&starts_patroni)
    );

    println!();
    println!("{table}");
    println!(
        "run time {:.1} min; with 10 rounds about {:.0} min",
        elapsed.as_secs_f64() / 60.0,
        full_estimate.as_secs_f64() / 60.0
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results.md");
    fs::write(&path, md).expect("write bench/results.md");
    println!("wrote {}", path.display());
}
