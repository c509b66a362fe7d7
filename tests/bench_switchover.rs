//! Planned-maintenance benchmark, run by `bench/switchover.sh` (ignored by
//! `cargo test`): a three-node cluster in synchronous_mode `on` at the
//! default timings, a client inserting a row every 20 ms through a multi-host
//! connection string. Measures the write outage the client sees
//! - in 10 switchovers (`POST /switchover`, alternating targets), and
//! - in each step of a rolling restart (SIGINT to each agent in turn, as the
//!   platform's deploys do, then start it again),
//!
//! and the acknowledged writes lost over all of it. Prints a table; asserts
//! only that no acknowledged write was lost.

mod common;

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use common::{
    create_writes_table, serial, stored_seqs, wait_until, Cluster, Options, Timing, Writer,
    WriterLog,
};

const WRITE_EVERY: Duration = Duration::from_millis(20);
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(120);

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    match v.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Longest time without an acknowledged write within [from, to].
fn longest_gap(log: &WriterLog, from: Instant, to: Instant) -> Duration {
    let mut at: Vec<Instant> = log
        .acked()
        .map(|(_, a)| a.at)
        .filter(|a| *a >= from && *a <= to)
        .collect();
    at.sort();
    at.windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(to - from)
}

#[test]
#[ignore = "benchmark of a few minutes: run bench/switchover.sh"]
fn write_outage_in_switchovers_and_a_rolling_restart() {
    let _serial = serial();
    let rounds: usize = std::env::var("PGHA_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut cluster = Cluster::start(
        3,
        Options {
            timing: Timing::STANDARD,
            extra_toml: "[cluster]\nsynchronous_mode = \"on\"\n".into(),
            ..Options::default()
        },
    );
    let view = cluster.wait_healthy(HEALTHY_TIMEOUT);
    let mut primary = view.primaries()[0].name.clone();
    create_writes_table(cluster.node(&primary));
    let writer = Writer::multi_host("bench", &cluster.pg_ports(), WRITE_EVERY);
    wait_until("writes", Duration::from_secs(20), || {
        (writer.log().acked_count() >= 25).then_some(())
    });

    let mut switchovers = Vec::new();
    for round in 0..rounds {
        let target = cluster
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .filter(|n| *n != primary)
            .nth(round % 2)
            .expect("a replica");
        wait_until(
            &format!("{primary} to see {target} caught up"),
            Duration::from_secs(60),
            || {
                let v = cluster.node(&primary).cluster_view()?;
                (v.member(&target)?.replay_lag_bytes? < 1024 * 1024
                    && v.streaming_replicas().len() == 2)
                    .then_some(())
            },
        );
        let old_port = cluster.node(&primary).pg_port;
        let new_port = cluster.node(&target).pg_port;
        let asked = Instant::now();
        let (status, answer) = common::http_post(
            cluster.node(&primary).api_addr(),
            "/switchover",
            &format!(r#"{{"leader":"{primary}","candidate":"{target}"}}"#),
        );
        assert_eq!(status, 200, "{answer}");
        let first_new = writer.wait_for_ack_on(new_port, asked, Duration::from_secs(30));
        let log = writer.log();
        let last_old = log
            .acked()
            .map(|(_, a)| a)
            .filter(|a| a.port == old_port && a.at <= first_new.at)
            .map(|a| a.at)
            .max()
            .unwrap_or(asked);
        let outage = first_new.at - last_old;
        eprintln!(
            "switchover {}: {primary} -> {target}: {}",
            round + 1,
            ms(outage)
        );
        switchovers.push(outage);
        primary = target;
        cluster.wait_healthy(HEALTHY_TIMEOUT);
    }

    let mut steps = Vec::new();
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    for name in names {
        cluster.wait_healthy(HEALTHY_TIMEOUT);
        let was_primary = cluster.primary().name == name;
        let start = Instant::now();
        let node = cluster.node_mut(&name);
        let pid = node.agent_pid().expect("agent pid");
        let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
        let exited = node
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{name} did not exit within 60 s of SIGINT"));
        assert!(exited.success(), "{name}: {exited:?}");
        let stopped_after = start.elapsed();
        node.restart();
        cluster.wait_healthy(HEALTHY_TIMEOUT);
        let settled = writer.wait_for_ack_after(Instant::now(), Duration::from_secs(10));
        let gap = longest_gap(&writer.log(), start, settled.at);
        eprintln!(
            "rolling restart: {name} ({}) exited after {}, longest write gap {}",
            if was_primary { "primary" } else { "replica" },
            ms(stopped_after),
            ms(gap)
        );
        steps.push((name, was_primary, stopped_after, gap));
    }

    let primary = cluster.wait_healthy(HEALTHY_TIMEOUT).primaries()[0]
        .name
        .clone();
    let log = writer.stop();
    let stored = stored_seqs(cluster.node(&primary).pg_port, "bench").expect("rows");
    let lost = log.lost(&stored);

    println!();
    println!("| measurement (sync on, ttl 10 s) | median | max | n |");
    println!("|---|---|---|---|");
    println!(
        "| switchover write outage | {} | {} | {} |",
        ms(median(switchovers.clone())),
        ms(switchovers.iter().max().copied().unwrap_or_default()),
        switchovers.len()
    );
    for (name, was_primary, stopped, gap) in &steps {
        println!(
            "| rolling restart {name} ({}): longest write gap (agent exit after {}) | {} | | 1 |",
            if *was_primary { "primary" } else { "replica" },
            ms(*stopped),
            ms(*gap)
        );
    }
    println!(
        "| acknowledged writes lost | {} of {} | | |",
        lost.len(),
        log.acked_count()
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}
