//! Failover benchmark, run by `bench/failover.sh` (ignored by `cargo test`):
//! a three-node cluster with a client inserting a row every 20 ms through a
//! multi-host connection string; the primary's agent and Postgres are
//! SIGKILLed again and again, and each time the write outage the client saw
//! is measured: from its last write acknowledged by the old primary to its
//! first acknowledged by the new one. Once at the default TTL (10 s), once at
//! 3 s. Prints a table; fails if a median misses its target.

mod common;

use std::time::{Duration, Instant};

use common::{
    create_writes_table, serial, stored_seqs, Ack, Cluster, Options, RoleProbe, Timing, Writer,
};

const WRITE_EVERY: Duration = Duration::from_millis(20);
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(120);

/// One kill, measured from the instant of the SIGKILL.
struct Round {
    /// Client-seen write outage: last acknowledgement by the old primary
    /// to the first by the new one.
    window: Duration,
    /// Until the old leader key was gone from etcd.
    key_gone: Duration,
    /// Until a replica answered `pg_is_in_recovery() = false`.
    promoted: Duration,
}

/// What one TTL setting measured.
struct Series {
    timing: Timing,
    rounds: Vec<Round>,
    acked: usize,
    lost: usize,
    elapsed: Duration,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    let n = v.len();
    match n {
        0 => Duration::ZERO,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

impl Series {
    fn windows(&self) -> Vec<Duration> {
        self.rounds.iter().map(|r| r.window).collect()
    }

    fn median(&self) -> Duration {
        median(self.windows())
    }

    fn max(&self) -> Duration {
        self.windows().into_iter().max().unwrap_or_default()
    }

    /// The target for the median window.
    fn target(&self) -> Duration {
        if self.timing.ttl_s >= 10 {
            Duration::from_secs(self.timing.ttl_s + 1)
        } else {
            Duration::from_secs(4)
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn measure(timing: Timing, rounds: usize) -> Series {
    let started = Instant::now();
    let mut cluster = Cluster::start(
        3,
        Options {
            scope: format!("bench{}", timing.ttl_s),
            timing,
            ..Options::default()
        },
    );
    let view = cluster.wait_healthy(HEALTHY_TIMEOUT);
    create_writes_table(cluster.node(&view.primaries()[0].name));
    let writer = Writer::multi_host("bench", &cluster.pg_ports(), WRITE_EVERY);
    writer.wait_for_ack_after(Instant::now(), Duration::from_secs(20));

    let probe = RoleProbe::start(&cluster.pg_ports(), Duration::from_millis(50));
    let leader_key = format!("/pgha/{}/leader", cluster.opts.scope);
    let mut measured = Vec::new();
    for round in 1..=rounds {
        let old = cluster.wait_healthy(HEALTHY_TIMEOUT).primaries()[0]
            .name
            .clone();
        let old_port = cluster.node(&old).pg_port;
        // Some writes on the old primary first.
        writer.wait_for_ack_on(old_port, Instant::now(), Duration::from_secs(20));
        let killed_at = Instant::now();
        cluster.node_mut(&old).kill9_with_postgres();
        let mut key_gone = None;
        let first_new: Ack = common::wait_until(
            "the writer to be acknowledged by a new primary",
            Duration::from_secs(120),
            || {
                if key_gone.is_none()
                    && cluster.etcd.get(&leader_key).as_deref() != Some(old.as_bytes())
                {
                    key_gone = Some(killed_at.elapsed());
                }
                writer
                    .log()
                    .acked()
                    .map(|(_, a)| a.clone())
                    .find(|a| a.at > killed_at && a.port != old_port)
            },
        );
        let log = writer.log();
        let last_old = log
            .acked()
            .map(|(_, a)| a)
            .filter(|a| a.port == old_port && a.at < first_new.at)
            .map(|a| a.at)
            .max()
            .expect("acknowledged writes on the old primary");
        // The writer may be faster than the probe's next round.
        let promoted = common::wait_until(
            "the probe to see the new primary",
            Duration::from_secs(5),
            || probe.first_primary_after(first_new.port, killed_at),
        ) - killed_at;
        let r = Round {
            window: first_new.at - last_old,
            key_gone: key_gone.unwrap_or_else(|| killed_at.elapsed()),
            promoted,
        };
        let new = cluster.node_by_port(first_new.port).name.clone();
        eprintln!(
            "ttl {} s, round {round}/{rounds}: killed {old}; leader key gone after {}, {new} promoted after {}, write outage {}",
            timing.ttl_s,
            secs(r.key_gone),
            secs(r.promoted),
            secs(r.window)
        );
        measured.push(r);
        cluster.node_mut(&old).restart();
    }
    let view = cluster.wait_healthy(HEALTHY_TIMEOUT);
    let log = writer.stop();
    let primary = cluster.node(&view.primaries()[0].name);
    let stored = stored_seqs(primary.pg_port, &log.writer).expect("rows on the primary");
    Series {
        timing,
        rounds: measured,
        acked: log.acked_count(),
        lost: log.lost(&stored).len(),
        elapsed: started.elapsed(),
    }
}

#[test]
#[ignore = "benchmark of several minutes: run bench/failover.sh"]
fn write_outage_when_the_primary_is_killed() {
    let _serial = serial();
    let rounds: usize = std::env::var("PGHA_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    let series: Vec<Series> = [Timing::STANDARD, Timing::FAST]
        .into_iter()
        .map(|t| measure(t, rounds))
        .collect();

    println!();
    println!(
        "Write outage seen by a client (one insert every {} ms, multi-host, target_session_attrs=read-write)",
        WRITE_EVERY.as_millis()
    );
    println!("after SIGKILL of the primary's agent and Postgres, {rounds} rounds per TTL");
    println!("(key gone, promoted: medians from the kill until the leader key was gone from");
    println!("etcd and until a replica answered pg_is_in_recovery() = false):");
    println!();
    println!("| ttl  | median  | max     | target (median)    | key gone | promoted | acked writes | lost writes | run time |");
    println!("|------|---------|---------|--------------------|----------|----------|--------------|-------------|----------|");
    let mut missed = Vec::new();
    for s in &series {
        let met = s.median() <= s.target();
        println!(
            "| {:>2} s | {:>7} | {:>7} | <= {:>7} {:<6} | {:>8} | {:>8} | {:>12} | {:>11} | {:>6} s |",
            s.timing.ttl_s,
            secs(s.median()),
            secs(s.max()),
            secs(s.target()),
            if met { "met" } else { "MISSED" },
            secs(median(s.rounds.iter().map(|r| r.key_gone).collect())),
            secs(median(s.rounds.iter().map(|r| r.promoted).collect())),
            s.acked,
            s.lost,
            s.elapsed.as_secs()
        );
        if !met {
            missed.push(format!(
                "ttl {} s: median {} above {}",
                s.timing.ttl_s,
                secs(s.median()),
                secs(s.target())
            ));
        }
    }
    for s in &series {
        let all: Vec<String> = s.windows().into_iter().map(secs).collect();
        println!("ttl {} s windows: {}", s.timing.ttl_s, all.join(", "));
    }
    assert!(missed.is_empty(), "targets missed: {missed:?}");
}
