//! Failsafe mode against real etcd and PostgreSQL 15: with etcd frozen the
//! primary keeps taking writes while every member confirms it over the
//! API; once one member is gone it stops at its fencing deadline, and no
//! replica promotes without etcd. When etcd returns the same node leads
//! again and no acknowledged write is lost.

mod common;

use std::time::{Duration, Instant};

use common::{
    create_writes_table, serial, stored_seqs, wait_until, Cluster, Options, RoleProbe, Timing,
    Writer,
};

const WRITE_EVERY: Duration = Duration::from_millis(20);

/// Longest time without an acknowledged write between `from` and `to`.
fn longest_gap(acks: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut at: Vec<Instant> = acks
        .iter()
        .copied()
        .filter(|a| *a >= from && *a <= to)
        .collect();
    at.insert(0, from);
    at.push(to);
    at.sort();
    at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
}

#[test]
fn failsafe_keeps_the_primary_while_every_member_confirms_and_demotes_when_one_is_gone() {
    let _serial = serial();
    let timing = Timing::STANDARD;
    let ttl = Duration::from_secs(timing.ttl_s);
    let mut cluster = Cluster::start(
        3,
        Options {
            timing,
            extra_toml: "[cluster]\nfailsafe_mode = true\n".into(),
            ..Options::default()
        },
    );
    let view = cluster.wait_healthy(Duration::from_secs(90));
    let primary = view.primaries()[0].name.clone();
    create_writes_table(cluster.node(&primary));
    let replicas: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .filter(|n| *n != primary)
        .collect();
    let primary_port = cluster.node(&primary).pg_port;
    let writer = Writer::direct("failsafe", primary_port, WRITE_EVERY);
    wait_until("writes before the outage", Duration::from_secs(20), || {
        (writer.log().acked_count() >= 25).then_some(())
    });
    let probe = RoleProbe::start(&cluster.pg_ports(), Duration::from_millis(100));

    // etcd down for two TTLs: every member confirms, writes go on.
    let frozen_at = Instant::now();
    cluster.etcd.pause();
    std::thread::sleep(2 * ttl);
    let acks: Vec<Instant> = writer.log().acked().map(|(_, a)| a.at).collect();
    let gap = longest_gap(&acks, frozen_at, Instant::now());
    assert!(
        gap < Duration::from_secs(3),
        "with etcd down and every member confirming, writes stopped for {gap:?}"
    );
    assert!(
        cluster
            .node(&primary)
            .log_text()
            .contains("every member confirmed us"),
        "the primary never logged a failsafe confirmation"
    );

    // One replica gone: no full confirmation, the primary stops at its
    // fencing deadline, and the other replica does not promote.
    let killed_at = Instant::now();
    cluster.node_mut(&replicas[0]).kill9_with_postgres();
    let fenced = wait_until(
        "the primary to stop taking writes",
        ttl + Duration::from_secs(10),
        || {
            let last = writer.log().acked().map(|(_, a)| a.at).max()?;
            (last.elapsed() > Duration::from_secs(3)).then_some(last)
        },
    );
    let after_kill = fenced.saturating_duration_since(killed_at);
    assert!(
        after_kill <= ttl + Duration::from_secs(1),
        "the primary took writes {after_kill:?} after a member stopped confirming"
    );
    std::thread::sleep(Duration::from_secs(3));
    let rounds = probe.stop();
    let late: Vec<_> = rounds
        .iter()
        .filter(|r| r.at > fenced + Duration::from_secs(1) && !r.primaries().is_empty())
        .collect();
    assert!(
        late.is_empty(),
        "a node ran as primary without etcd after the fence: {late:?}"
    );
    assert!(
        rounds.iter().all(|r| r.primaries().len() <= 1),
        "two primaries at once"
    );

    // etcd back: a primary again, and every acknowledged write is there.
    cluster.etcd.resume();
    cluster.node_mut(&replicas[0]).restart();
    let view = cluster.wait_healthy(Duration::from_secs(90));
    let new_primary = view.primaries()[0].name.clone();
    let port = cluster.node(&new_primary).pg_port;
    let log = writer.stop();
    let stored = stored_seqs(port, "failsafe").expect("rows");
    assert!(
        log.lost(&stored).is_empty(),
        "acknowledged writes lost: {:?}",
        log.lost(&stored)
    );
    eprintln!(
        "failsafe: longest write gap with etcd down {gap:?}; fenced {after_kill:?} after a member died; {new_primary} leads after etcd returned"
    );
}
