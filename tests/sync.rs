//! Synchronous replication against real etcd and PostgreSQL 15: the sync
//! key and the health endpoints name the synchronous standby, a SIGKILLed
//! primary never costs an acknowledged write (10 rounds), `strict` blocks
//! commits rather than run unprotected, and `quorum` promotes a standby
//! that provably holds every commit.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{
    create_writes_table, serial, stored_seqs, wait_until, Cluster, Options, RoleProbe, Timing,
    Writer,
};

const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(90);
const WRITE_EVERY: Duration = Duration::from_millis(20);
const ROUNDS: usize = 10;

fn sync_options(mode: &str) -> Options {
    Options {
        timing: Timing::FAST,
        extra_toml: format!("[cluster]\nsynchronous_mode = \"{mode}\"\n"),
        ..Options::default()
    }
}

/// The published claim: (members, quorum).
fn sync_key(cluster: &Cluster) -> Option<(Vec<String>, u64)> {
    let v: Value = cluster.etcd.get_json("/pgha/t/sync")?;
    let members = v["members"]
        .as_array()?
        .iter()
        .filter_map(|m| m.as_str().map(String::from))
        .collect();
    Some((members, v["quorum"].as_u64()?))
}

/// Waits until the leader `primary` published a claim naming at least one
/// standby, and returns its members.
fn wait_sync_claim(cluster: &Cluster, primary: &str) -> Vec<String> {
    wait_until(
        "the leader to publish a synchronous standby",
        Duration::from_secs(30),
        || {
            let v: Value = cluster.etcd.get_json("/pgha/t/sync")?;
            let (members, quorum) = sync_key(cluster)?;
            (v["leader"] == primary && quorum > 0).then_some(members)
        },
    )
}

fn pgha_list(api: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pgha"))
        .args(["list", "--api", api])
        .output()
        .expect("run pgha list");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn sync_on_sigkill_of_the_primary_never_loses_an_acknowledged_write() {
    let _serial = serial();
    let mut cluster = Cluster::start(3, sync_options("on"));
    let view = cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    let mut primary = view.primaries()[0].name.clone();
    create_writes_table(cluster.node(&primary));
    let sync = wait_sync_claim(&cluster, &primary);
    assert_eq!(sync.len(), 1, "synchronous_node_count 1: {sync:?}");

    // The standby Postgres waits for is the one etcd names, and the health
    // endpoints and `pgha list` agree.
    let names = cluster
        .node(&primary)
        .query("SHOW synchronous_standby_names");
    assert_eq!(names, format!("ANY 1 (\"{}\")", sync[0]));
    let async_one = cluster
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .find(|n| *n != primary && *n != sync[0])
        .expect("a third node");
    // Each agent serves what its last pass read from etcd: give it a pass.
    wait_until(
        "/sync and /async to follow the claim",
        Duration::from_secs(10),
        || {
            let codes = [
                cluster.node(&sync[0]).get_status_code("/sync"),
                cluster.node(&sync[0]).get_status_code("/async"),
                cluster.node(&async_one).get_status_code("/sync"),
                cluster.node(&async_one).get_status_code("/async"),
            ];
            (codes == [Some(200), Some(503), Some(503), Some(200)]).then_some(())
        },
    );
    let list = wait_until(
        "pgha list to name the sync standby",
        Duration::from_secs(10),
        || {
            let list = pgha_list(&cluster.node(&primary).api_url());
            list.lines()
                .any(|l| l.contains(&format!("| {} ", sync[0])) && l.contains("Sync Standby"))
                .then_some(list)
        },
    );
    assert!(list.contains("Synchronous mode: on"), "{list}");

    let ports = cluster.pg_ports();
    let writer = Writer::multi_host("app", &ports, WRITE_EVERY);
    let mut outages = Vec::new();
    for round in 1..=ROUNDS {
        let sync = wait_sync_claim(&cluster, &primary);
        wait_until(
            "writes to be acknowledged before the kill",
            Duration::from_secs(20),
            || (writer.log().acked_count() >= 25 * round).then_some(()),
        );
        let old_port = cluster.node(&primary).pg_port;
        let probe = RoleProbe::start(&ports, Duration::from_millis(100));
        let killed_at = Instant::now();
        cluster.node_mut(&primary).kill9_with_postgres();
        let new_port = wait_until("a promotion", Duration::from_secs(60), || {
            probe
                .rounds()
                .iter()
                .find_map(|r| r.primaries().into_iter().find(|p| *p != old_port))
        });
        let rounds = probe.stop();
        assert!(
            rounds.iter().all(|r| r.primaries().len() <= 1),
            "round {round}: two primaries at once"
        );
        let new = cluster.node_by_port(new_port).name.clone();
        assert!(
            sync.contains(&new),
            "round {round}: {new} was promoted but the published synchronous set was {sync:?}"
        );
        let ack = writer.wait_for_ack_on(new_port, killed_at, Duration::from_secs(30));
        outages.push(ack.at - killed_at);
        let old = primary.clone();
        cluster.node_mut(&old).restart();
        cluster.wait_healthy(Duration::from_secs(90));
        primary = new;
    }
    let log = writer.stop();
    let stored = stored_seqs(cluster.node(&primary).pg_port, "app").expect("rows");
    let lost = log.lost(&stored);
    eprintln!(
        "sync on: {ROUNDS} kills, {} writes acknowledged, {} unknown, outages {:?}",
        log.acked_count(),
        log.unknown_count(),
        outages
    );
    assert!(
        lost.is_empty(),
        "acknowledged writes lost in synchronous mode: {lost:?}"
    );
}

#[test]
fn strict_blocks_commits_without_a_standby_and_resumes_when_one_returns() {
    let _serial = serial();
    let mut cluster = Cluster::start(3, sync_options("strict"));
    let view = cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    let primary = view.primaries()[0].name.clone();
    create_writes_table(cluster.node(&primary));
    wait_sync_claim(&cluster, &primary);
    let replicas: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .filter(|n| *n != primary)
        .collect();
    let writer = Writer::direct("strict", cluster.node(&primary).pg_port, WRITE_EVERY);
    wait_until("writes before the stop", Duration::from_secs(20), || {
        (writer.log().acked_count() >= 25).then_some(())
    });
    for r in &replicas {
        let status = cluster.node_mut(r).sigterm();
        assert!(status.success(), "{r}: {status:?}");
    }
    // Writes in flight when the last standby left may still complete;
    // after a moment, nothing more is acknowledged.
    std::thread::sleep(Duration::from_secs(2));
    let blocked_from = writer.log().acked_count();
    std::thread::sleep(Duration::from_secs(5));
    let blocked_to = writer.log().acked_count();
    assert_eq!(
        blocked_from, blocked_to,
        "strict: commits were acknowledged with no synchronous standby"
    );
    let (_, quorum) = sync_key(&cluster).expect("sync key");
    assert!(quorum > 0, "strict never publishes a claim of nothing");

    let back_at = Instant::now();
    cluster.node_mut(&replicas[0]).restart();
    wait_until(
        "writes to resume once a standby streams again",
        Duration::from_secs(60),
        || (writer.log().acked_count() > blocked_to + 10).then_some(()),
    );
    eprintln!(
        "strict: writes resumed {:?} after the standby's agent started",
        back_at.elapsed()
    );
    cluster.node_mut(&replicas[1]).restart();
    cluster.wait_healthy(Duration::from_secs(90));
    let log = writer.stop();
    let stored = stored_seqs(cluster.node(&primary).pg_port, "strict").expect("rows");
    assert!(log.lost(&stored).is_empty());
}

#[test]
fn quorum_mode_waits_for_any_and_promotes_a_standby_that_holds_every_commit() {
    let _serial = serial();
    let mut cluster = Cluster::start(3, sync_options("quorum"));
    let view = cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    let primary = view.primaries()[0].name.clone();
    create_writes_table(cluster.node(&primary));
    let members = wait_until(
        "a claim over both standbys",
        Duration::from_secs(30),
        || {
            let (m, q) = sync_key(&cluster)?;
            (m.len() == 2 && q == 1).then_some(m)
        },
    );
    let names = cluster
        .node(&primary)
        .query("SHOW synchronous_standby_names");
    assert_eq!(
        names,
        format!("ANY 1 (\"{}\", \"{}\")", members[0], members[1])
    );
    wait_until(
        "pgha list to show both quorum standbys",
        Duration::from_secs(10),
        || {
            let list = pgha_list(&cluster.node(&primary).api_url());
            (list.matches("Quorum Standby").count() == 2).then_some(())
        },
    );

    let ports = cluster.pg_ports();
    let writer = Writer::multi_host("quorum", &ports, WRITE_EVERY);
    wait_until("writes before the kill", Duration::from_secs(20), || {
        (writer.log().acked_count() >= 50).then_some(())
    });
    let killed_at = Instant::now();
    let old_port = cluster.node(&primary).pg_port;
    cluster.node_mut(&primary).kill9_with_postgres();
    let ack = wait_until(
        "a new primary to take writes",
        Duration::from_secs(60),
        || {
            writer
                .log()
                .acked()
                .map(|(_, a)| a)
                .find(|a| a.at > killed_at && a.port != old_port)
                .map(|a| (a.at, a.port))
        },
    );
    let (acked_at, new_port) = ack;
    let new = cluster.node_by_port(new_port).name.clone();
    eprintln!(
        "quorum: {new} took writes {:?} after the kill",
        acked_at - killed_at
    );
    let log = writer.stop();
    let stored = stored_seqs(new_port, "quorum").expect("rows");
    assert!(
        log.lost(&stored).is_empty(),
        "acknowledged writes lost in quorum mode"
    );
}
