//! Automatic failover under faults, judged by the data clients wrote: a
//! writer inserts a row every 20 ms through a multi-host connection string
//! while the primary is killed, cut off from etcd, frozen or orphaned. Each
//! test checks who was promoted and when, that acknowledged rows survive,
//! and that no two nodes ever took writes at the same time. They use the
//! shortest timings (ttl 3 s, fencing margin 1 s) unless a test needs a
//! longer lease, and run one at a time.

mod common;

use std::time::{Duration, Instant};

use pgha::ha::Lsn;

use common::{
    create_writes_table, process_alive, replace_with_copy_lacking_wal, serial, stored_seqs,
    wait_until, Ack, Cluster, Node, Options, ProbeRound, RoleProbe, Timing, Writer, WriterLog,
};

const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(90);
const REJOIN_TIMEOUT: Duration = Duration::from_secs(60);
const WRITE_EVERY: Duration = Duration::from_millis(20);
const PROBE_EVERY: Duration = Duration::from_millis(100);
const TIMING: Timing = Timing::FAST;
/// `min(2 s, ttl / 3)`, as the agent computes it.
const FENCING_MARGIN: Duration = Duration::from_secs(1);
/// Time a signal needs to take a Postgres down once the deadline fired.
const STOP_SLACK: Duration = Duration::from_millis(250);

fn ttl() -> Duration {
    Duration::from_secs(TIMING.ttl_s)
}

fn fast() -> Options {
    Options {
        timing: TIMING,
        ..Options::default()
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// A healthy cluster with the writes table on its primary; returns the
/// primary's name.
fn healthy(cluster: &mut Cluster) -> String {
    let view = cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    let primary = view.primaries()[0].name.clone();
    create_writes_table(cluster.node(&primary));
    primary
}

/// The multi-host writer, started and seen to write.
fn start_writer(cluster: &Cluster) -> Writer {
    let writer = Writer::multi_host("app", &cluster.pg_ports(), WRITE_EVERY);
    wait_until(
        "the writer to get 25 writes acknowledged",
        Duration::from_secs(20),
        || (writer.log().acked_count() >= 25).then_some(()),
    );
    writer
}

/// One writer straight to each node: shows exactly which nodes take writes.
fn direct_writers(cluster: &Cluster) -> Vec<Writer> {
    cluster
        .nodes
        .iter()
        .map(|n| Writer::direct(&format!("direct-{}", n.name), n.pg_port, WRITE_EVERY))
        .collect()
}

/// Waits for a node other than `old_port` to answer as a primary in the
/// probe; returns its port and the probe round's time.
fn wait_promotion(probe: &RoleProbe, old_port: u16, since: Instant) -> (u16, Instant) {
    wait_until("a replica to be promoted", Duration::from_secs(60), || {
        probe.rounds().iter().find_map(|r| {
            let new = r.primaries().into_iter().find(|p| *p != old_port)?;
            (r.at >= since).then_some((new, r.at))
        })
    })
}

/// Probe rounds in which two nodes answered as primaries at once.
fn two_primaries(rounds: &[ProbeRound]) -> Vec<&ProbeRound> {
    rounds.iter().filter(|r| r.primaries().len() > 1).collect()
}

/// No write acknowledged by the old primary after the first write the new
/// one acknowledged, over every writer. Returns the gap between them.
fn assert_one_writable_primary(logs: &[WriterLog], old_port: u16, new_port: u16) -> Duration {
    let acks: Vec<(&str, &Ack)> = logs
        .iter()
        .flat_map(|l| l.acked().map(move |(_, a)| (l.writer.as_str(), a)))
        .collect();
    let first_new = acks
        .iter()
        .filter(|(_, a)| a.port == new_port)
        .min_by_key(|(_, a)| a.at)
        .map(|(_, a)| *a)
        .expect("the new primary acknowledged writes");
    let last_old = acks
        .iter()
        .filter(|(_, a)| a.port == old_port)
        .max_by_key(|(_, a)| a.at)
        .map(|(_, a)| *a)
        .expect("the old primary acknowledged writes");
    let late: Vec<&(&str, &Ack)> = acks
        .iter()
        .filter(|(_, a)| a.port == old_port && a.at >= first_new.at)
        .collect();
    assert!(
        late.is_empty(),
        "the old primary (port {old_port}) acknowledged {} writes after the new one (port {new_port}) took its first: {late:#?}, first new: {first_new:?}",
        late.len()
    );
    assert!(
        last_old.server_epoch < first_new.server_epoch,
        "server clocks: last old write {} is not before the first new write {}",
        last_old.server_epoch,
        first_new.server_epoch
    );
    first_new.at - last_old.at
}

/// Every check that two nodes never took writes at once, after a fault:
/// on client acknowledgements, on the stored rows and in the role probe.
/// Returns the gap between the two primaries' writes.
fn assert_single_writer(
    logs: &[WriterLog],
    probe: RoleProbe,
    new: &Node,
    old_port: u16,
    new_port: u16,
) -> Duration {
    let gap = assert_one_writable_primary(logs, old_port, new_port);
    assert_rows_do_not_overlap(new, old_port, new_port);
    let rounds = probe.stop();
    assert!(
        two_primaries(&rounds).is_empty(),
        "{:#?}",
        two_primaries(&rounds)
    );
    gap
}

/// The same on the stored data: every row the old primary wrote that
/// survived precedes every row the new primary wrote (one machine, one clock).
fn assert_rows_do_not_overlap(primary: &Node, old_port: u16, new_port: u16) {
    let out = primary.query(&format!(
        "SELECT coalesce(max(ts) FILTER (WHERE server_port = {old_port}) < min(ts) FILTER (WHERE server_port = {new_port}), true) FROM pgha_writes"
    ));
    assert_eq!(
        out, "t",
        "rows of the old primary (port {old_port}) interleave with rows of the new one (port {new_port})"
    );
}

/// Stops the writers; returns their logs and the acknowledged writes
/// missing on `primary` (counted over all writers).
fn settle(writers: Vec<Writer>, primary: &Node) -> (Vec<WriterLog>, Vec<(String, i64)>) {
    let logs: Vec<WriterLog> = writers.into_iter().map(Writer::stop).collect();
    let mut lost = Vec::new();
    for log in &logs {
        let stored = stored_seqs(primary.pg_port, &log.writer).expect("read back the rows");
        lost.extend(
            log.lost(&stored)
                .into_iter()
                .map(|s| (log.writer.clone(), s)),
        );
    }
    (logs, lost)
}

/// Waits until `node` has replayed exactly the rows `primary` has.
fn wait_same_rows(node: &Node, primary: &Node, writer: &str) {
    let want = stored_seqs(primary.pg_port, writer).expect("rows on the primary");
    wait_until(
        &format!("{} to replay {} rows of {writer}", node.name, want.len()),
        Duration::from_secs(20),
        || (stored_seqs(node.pg_port, writer).ok()? == want).then_some(()),
    );
}

fn assert_rewound_not_cloned(node: &Node) {
    let log = node.current_run_log();
    assert!(
        log.contains("action=rewind"),
        "{}: no rewind in the log of its current run",
        node.name
    );
    assert!(
        !log.contains("action=clone"),
        "{}: cloned again instead of rewinding",
        node.name
    );
}

/// Client-seen write outage across a failover: from the writer's last
/// acknowledgement by the old primary to its first by the new one.
fn outage(log: &WriterLog, old_port: u16, new_port: u16) -> Option<Duration> {
    let last_old = log
        .acked()
        .map(|(_, a)| a)
        .filter(|a| a.port == old_port)
        .map(|a| a.at)
        .max()?;
    let first_new = log
        .acked()
        .map(|(_, a)| a)
        .filter(|a| a.port == new_port)
        .map(|a| a.at)
        .min()?;
    Some(first_new.saturating_duration_since(last_old))
}

fn acked_after(log: &WriterLog, port: u16, after: Instant) -> Vec<&Ack> {
    log.acked()
        .map(|(_, a)| a)
        .filter(|a| a.port == port && a.at > after)
        .collect()
}

#[test]
fn sigkill_of_the_primary_and_its_postgres_fails_over_within_the_ttl() {
    let _serial = serial();
    let mut cluster = Cluster::start(3, fast());
    let old = healthy(&mut cluster);
    let old_port = cluster.node(&old).pg_port;
    let old_tl: u32 = cluster
        .node(&old)
        .query("SELECT timeline_id FROM pg_control_checkpoint()")
        .parse()
        .expect("timeline");
    // A member that has vanished since reserved three timelines more (no
    // WAL archive: nobody here has their history files). The promotion
    // must go past them, and the replicas must follow across the gap.
    let reserved = old_tl + 3;
    let scope = cluster.opts.scope.clone();
    cluster.etcd.put(
        &format!("/pgha/{scope}/timeline"),
        &format!(r#"{{"timeline":{reserved},"by":"gone"}}"#),
    );
    let probe = RoleProbe::start(&cluster.pg_ports(), PROBE_EVERY);
    let writer = start_writer(&cluster);

    let killed_at = Instant::now();
    cluster.node_mut(&old).kill9_with_postgres();
    let (new_port, promoted_at) = wait_promotion(&probe, old_port, killed_at);
    let failover = promoted_at - killed_at;
    assert!(
        failover <= ttl() + Duration::from_secs(2),
        "promotion took {failover:?} after the kill, more than ttl + 2 s"
    );
    let first_new = writer.wait_for_ack_on(new_port, killed_at, Duration::from_secs(30));
    assert_eq!(
        first_new.timeline,
        reserved + 1,
        "{first_new:?}: not past the reserved timeline {reserved}"
    );
    let new = cluster.node_by_port(new_port).name.clone();
    let key = cluster
        .etcd
        .get_json(&format!("/pgha/{scope}/timeline"))
        .expect("timeline key");
    assert_eq!(key["timeline"], reserved + 1, "{key}");
    assert_eq!(key["by"], new.as_str(), "{key}");
    // The skipped numbers keep placeholder history files: a standby below
    // the gap fetches every history file up to the primary's timeline.
    let mut placeholders: Vec<_> = std::fs::read_dir(cluster.node(&new).data_dir.join("pg_wal"))
        .expect("pg_wal")
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path()).is_ok_and(|t| t.starts_with("# pgha placeholder"))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    placeholders.sort();
    let expected: Vec<String> = (old_tl + 1..=reserved)
        .map(|t| format!("{t:08X}.history"))
        .collect();
    assert_eq!(placeholders, expected);

    cluster.node_mut(&old).restart();
    let view = cluster.wait_healthy(REJOIN_TIMEOUT);
    assert_eq!(
        view.primaries()[0].name,
        new,
        "leadership moved again: {view:#?}"
    );
    let new_tl = view.primaries()[0].timeline;
    assert_eq!(new_tl, Some(reserved + 1));
    for m in &view.members {
        assert_eq!(m.timeline, new_tl, "{} is not on the new timeline", m.name);
    }
    assert_rewound_not_cloned(cluster.node(&old));
    // Writes go on, and reach the rejoined node.
    writer.wait_for_ack_after(Instant::now(), Duration::from_secs(10));

    let (logs, lost) = settle(vec![writer], cluster.node(&new));
    let log = &logs[0];
    for (_, seq) in &lost {
        let attempt = log
            .attempts
            .iter()
            .find(|a| a.seq == *seq)
            .expect("attempt");
        // Async replication may lose what the old primary acknowledged last
        // (also in the instant between `killed_at` and its death); never
        // what the new primary acknowledged.
        assert_eq!(
            attempt.ack().expect("acked").port,
            old_port,
            "write {seq}, acknowledged by the new primary, is missing: {attempt:?}"
        );
    }
    wait_same_rows(cluster.node(&old), cluster.node(&new), "app");
    let rounds = probe.stop();
    assert!(
        two_primaries(&rounds).is_empty(),
        "{:#?}",
        two_primaries(&rounds)
    );
    eprintln!(
        "SUMMARY sigkill primary+postgres: promoted after {} ms (ttl {} s), write outage {} ms, {} writes acked, {} unknown, {} lost",
        ms(failover),
        TIMING.ttl_s,
        ms(outage(log, old_port, new_port).expect("writes on both primaries")),
        log.acked_count(),
        log.unknown_count(),
        lost.len()
    );
}

#[test]
fn a_primary_cut_off_from_etcd_fences_itself_before_a_replica_is_promoted() {
    let _serial = serial();
    let mut cluster = Cluster::start(
        3,
        Options {
            etcd_proxy: true,
            ..fast()
        },
    );
    let old = healthy(&mut cluster);
    let old_port = cluster.node(&old).pg_port;
    let probe = RoleProbe::start(&cluster.pg_ports(), PROBE_EVERY);
    let direct = direct_writers(&cluster);
    let writer = start_writer(&cluster);

    let cut_at = Instant::now();
    cluster.node(&old).etcd_proxy().cut();
    // The last renewal was sent before the cut, so its deadline is at most this.
    let deadline = cut_at + ttl() - FENCING_MARGIN;
    let (new_port, promoted_at) = wait_promotion(&probe, old_port, cut_at);
    let new = cluster.node_by_port(new_port).name.clone();
    writer.wait_for_ack_on(new_port, promoted_at, Duration::from_secs(30));
    // Let the old node's direct writer keep knocking a while after the deadline.
    let watch_until = deadline + ttl();
    std::thread::sleep(watch_until.saturating_duration_since(Instant::now()));

    let old_direct = direct[cluster
        .nodes
        .iter()
        .position(|n| n.name == old)
        .expect("old")]
    .log();
    let late = old_direct
        .acked()
        .filter(|(a, _)| a.sent_at > deadline + STOP_SLACK)
        .count();
    assert_eq!(
        late, 0,
        "the cut-off primary acknowledged {late} direct writes sent after its fencing deadline"
    );
    let tries_after = old_direct
        .attempts
        .iter()
        .filter(|a| a.sent_at > deadline + STOP_SLACK)
        .count()
        + old_direct
            .connect_failures
            .iter()
            .filter(|(at, _)| *at > deadline + STOP_SLACK)
            .count();
    assert!(
        tries_after > 10,
        "the direct writer did not try the old primary after its deadline"
    );
    let last_old_ack = old_direct
        .acked()
        .map(|(_, a)| a.at)
        .max()
        .expect("the old primary took direct writes before the cut");

    cluster.node(&old).etcd_proxy().heal();
    let view = cluster.wait_healthy(REJOIN_TIMEOUT);
    assert_eq!(view.primaries()[0].name, new, "{view:#?}");
    assert_rewound_not_cloned(cluster.node(&old));

    let mut writers = direct;
    writers.push(writer);
    let (logs, lost) = settle(writers, cluster.node(&new));
    let gap = assert_single_writer(&logs, probe, cluster.node(&new), old_port, new_port);
    let app = logs.last().expect("app writer");
    eprintln!(
        "SUMMARY etcd cut: old primary's last ack {} ms after the cut (deadline <= {} ms), promoted after {} ms, gap between primaries {} ms, app outage {} ms, {} writes acked, {} lost",
        ms(last_old_ack.saturating_duration_since(cut_at)),
        ms(deadline - cut_at),
        ms(promoted_at - cut_at),
        ms(gap),
        ms(outage(app, old_port, new_port).expect("writes on both primaries")),
        logs.iter().map(WriterLog::acked_count).sum::<usize>(),
        lost.len()
    );
}

#[test]
fn a_replica_with_paused_replay_beyond_maximum_lag_is_never_promoted() {
    paused_replica_survives_a_failover(5000, true);
}

#[test]
fn a_replica_with_paused_replay_is_never_promoted_even_within_maximum_lag() {
    paused_replica_survives_a_failover(50, false);
}

/// Pauses replay on the replica that wins ties (the first name), writes
/// `rows` of 1 kB (beyond maximum_lag_on_failover or not), kills the
/// primary: the other replica is promoted, the paused one never answers as
/// primary.
fn paused_replica_survives_a_failover(rows: u32, beyond_max_lag: bool) {
    let _serial = serial();
    let mut cluster = Cluster::start(3, fast());
    let old = healthy(&mut cluster);
    let old_port = cluster.node(&old).pg_port;
    let view = cluster.view().expect("/cluster");
    let mut replicas: Vec<String> = view
        .streaming_replicas()
        .iter()
        .map(|m| m.name.clone())
        .collect();
    replicas.sort();
    // The first name wins ties between equally advanced replicas: pause that one.
    let (paused, other) = (replicas[0].clone(), replicas[1].clone());
    cluster.node(&paused).query("SELECT pg_wal_replay_pause()");
    let primary = cluster.node(&old);
    primary.query("CREATE TABLE filler (t text)");
    primary.query(&format!(
        "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, {rows})"
    ));
    let filled = Lsn::parse(&primary.query("SELECT pg_current_wal_lsn()")).expect("LSN");
    let view = cluster.wait_for(
        "the leader to publish its position after the fill, the lags and the pause",
        Duration::from_secs(30),
        |v| {
            let leader_at = v
                .member(&old)
                .and_then(|m| m.wal_position.as_deref())
                .and_then(Lsn::parse);
            let lag = |n: &str| v.member(n).and_then(|m| m.replay_lag_bytes);
            leader_at.is_some_and(|l| l >= filled)
                && lag(&paused).is_some_and(|l| l > 0 && (l > 1 << 20) == beyond_max_lag)
                && lag(&other).is_some_and(|l| l < 1 << 20)
                && v.member(&paused).is_some_and(|m| m.replay_paused)
        },
    );
    let paused_lag = view
        .member(&paused)
        .and_then(|m| m.replay_lag_bytes)
        .unwrap_or_default();
    let probe = RoleProbe::start(&cluster.pg_ports(), PROBE_EVERY);

    let killed_at = Instant::now();
    cluster.node_mut(&old).kill9_with_postgres();
    let (new_port, promoted_at) = wait_promotion(&probe, old_port, killed_at);
    assert_eq!(
        cluster.node_by_port(new_port).name,
        other,
        "the replica with paused replay was promoted"
    );
    // And it stays that way.
    let paused_port = cluster.node(&paused).pg_port;
    let until = promoted_at + 2 * ttl();
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
    let rounds = probe.stop();
    assert!(
        !rounds.iter().any(|r| r.primaries().contains(&paused_port)),
        "{paused} answered as a primary"
    );
    assert!(
        two_primaries(&rounds).is_empty(),
        "{:#?}",
        two_primaries(&rounds)
    );
    assert_eq!(
        cluster.node(&paused).query("SELECT pg_is_in_recovery()"),
        "t"
    );
    eprintln!(
        "SUMMARY paused replay: {paused} {paused_lag} bytes behind in replay, {other} promoted after {} ms",
        ms(promoted_at - killed_at)
    );
}

/// Kills the primary, waits until another node is a primary with every
/// live replica streaming from it; returns its name.
fn kill_primary_and_wait(cluster: &mut Cluster, probe: &RoleProbe, expected: &str) -> String {
    let old = cluster.primary().name.clone();
    let old_port = cluster.node(&old).pg_port;
    let killed_at = Instant::now();
    cluster.node_mut(&old).kill9_with_postgres();
    let (new_port, promoted_at) = wait_promotion(probe, old_port, killed_at);
    let new = cluster.node_by_port(new_port).name.clone();
    assert_eq!(new, expected, "promoted after {old} was killed");
    eprintln!(
        "{new} promoted {} ms after {old} was killed",
        ms(promoted_at - killed_at)
    );
    cluster.wait_healthy(REJOIN_TIMEOUT);
    new
}

/// Kills the primary and asserts that no node becomes primary for 3 × ttl.
fn kill_primary_and_expect_none(cluster: &mut Cluster, probe: &RoleProbe, survivor: &str) {
    let old = cluster.primary().name.clone();
    let old_port = cluster.node(&old).pg_port;
    let killed_at = Instant::now();
    cluster.node_mut(&old).kill9_with_postgres();
    let until = killed_at + 3 * ttl();
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
    let promoted: Vec<ProbeRound> = probe
        .rounds()
        .into_iter()
        .filter(|r| r.at > killed_at && r.primaries().iter().any(|p| *p != old_port))
        .collect();
    assert!(promoted.is_empty(), "a node was promoted: {promoted:#?}");
    let node = cluster.node(survivor);
    assert_eq!(node.query("SELECT pg_is_in_recovery()"), "t", "{survivor}");
    let status = node.get_json("/status").expect("/status");
    assert_eq!(status["role"], "replica", "{status}");
}

#[test]
fn a_nofailover_replica_is_never_promoted() {
    let _serial = serial();
    let opts = Options {
        node_toml: [("n3".to_string(), "[tags]\nnofailover = true".to_string())].into(),
        ..fast()
    };
    // n1 bootstraps alone, so the tagged n3 starts as a replica.
    let mut cluster = Cluster::start(1, opts);
    cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    cluster.add_node("n2", |_| {});
    cluster.add_node("n3", |_| {});
    cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    let probe = RoleProbe::start(&cluster.pg_ports(), PROBE_EVERY);
    let started = Instant::now();
    kill_primary_and_wait(&mut cluster, &probe, "n2");
    kill_primary_and_expect_none(&mut cluster, &probe, "n3");
    let rounds = probe.stop();
    assert!(
        two_primaries(&rounds).is_empty(),
        "{:#?}",
        two_primaries(&rounds)
    );
    eprintln!(
        "SUMMARY nofailover: n2 promoted, n3 stayed a replica for {} s without a leader ({} ms in all)",
        3 * TIMING.ttl_s,
        ms(started.elapsed())
    );
}

#[test]
fn only_nodes_in_the_primary_region_are_promoted() {
    let _serial = serial();
    let opts = Options {
        regions: [("n1", "ams"), ("n2", "ams"), ("n3", "syd")]
            .map(|(n, r)| (n.to_string(), r.to_string()))
            .into(),
        extra_toml: "[cluster]\nprimary_region = \"ams\"".into(),
        ..fast()
    };
    let mut cluster = Cluster::start(3, opts);
    let first = healthy(&mut cluster);
    assert_ne!(first, "n3", "bootstrapped outside primary_region");
    let probe = RoleProbe::start(&cluster.pg_ports(), PROBE_EVERY);
    let other_ams = if first == "n1" { "n2" } else { "n1" };
    kill_primary_and_wait(&mut cluster, &probe, other_ams);
    kill_primary_and_expect_none(&mut cluster, &probe, "n3");
    let rounds = probe.stop();
    assert!(
        two_primaries(&rounds).is_empty(),
        "{:#?}",
        two_primaries(&rounds)
    );
    eprintln!(
        "SUMMARY primary_region: {first} then {other_ams} led; syd node n3 stayed a replica for {} s",
        3 * TIMING.ttl_s
    );
}

#[test]
fn a_frozen_primary_agent_is_fenced_by_its_guard_and_rejoins_after_sigcont() {
    let _serial = serial();
    let mut cluster = Cluster::start(3, fast());
    let old = healthy(&mut cluster);
    let old_port = cluster.node(&old).pg_port;
    let postmaster = cluster.node(&old).postmaster_pid().expect("postmaster");
    let probe = RoleProbe::start(&cluster.pg_ports(), PROBE_EVERY);
    let direct = direct_writers(&cluster);
    let writer = start_writer(&cluster);

    let stopped_at = Instant::now();
    cluster.node(&old).sigstop();
    let deadline = stopped_at + ttl() - FENCING_MARGIN;
    let fenced_at = wait_until(
        "the guard to stop the frozen primary",
        Duration::from_secs(10),
        || (!process_alive(postmaster)).then(Instant::now),
    );
    assert!(
        fenced_at <= deadline + STOP_SLACK + PROBE_EVERY,
        "postmaster stopped {} ms after the freeze, deadline at most {} ms",
        ms(fenced_at - stopped_at),
        ms(deadline - stopped_at)
    );
    let (new_port, promoted_at) = wait_promotion(&probe, old_port, stopped_at);
    let new = cluster.node_by_port(new_port).name.clone();
    writer.wait_for_ack_on(new_port, promoted_at, Duration::from_secs(30));
    let thaw = stopped_at + 3 * ttl();
    std::thread::sleep(thaw.saturating_duration_since(Instant::now()));
    cluster.node(&old).sigcont();

    let view = cluster.wait_healthy(REJOIN_TIMEOUT);
    assert_eq!(view.primaries()[0].name, new, "{view:#?}");
    assert_rewound_not_cloned(cluster.node(&old));
    let mut writers = direct;
    writers.push(writer);
    let (logs, lost) = settle(writers, cluster.node(&new));
    for log in &logs {
        let late: Vec<&Ack> = acked_after(log, old_port, deadline + STOP_SLACK);
        assert!(
            late.is_empty(),
            "{}: the frozen primary acknowledged writes after its deadline: {late:#?}",
            log.writer
        );
    }
    let gap = assert_single_writer(&logs, probe, cluster.node(&new), old_port, new_port);
    let app = logs.last().expect("app writer");
    eprintln!(
        "SUMMARY frozen agent: postmaster stopped {} ms after SIGSTOP (deadline <= {} ms), promoted after {} ms, gap between primaries {} ms, app outage {} ms, {} writes acked, {} lost",
        ms(fenced_at - stopped_at),
        ms(deadline - stopped_at),
        ms(promoted_at - stopped_at),
        ms(gap),
        ms(outage(app, old_port, new_port).expect("writes on both primaries")),
        logs.iter().map(WriterLog::acked_count).sum::<usize>(),
        lost.len()
    );
}

#[test]
fn a_primary_whose_agent_dies_is_stopped_at_once_and_takes_no_writes_after_promotion() {
    let _serial = serial();
    let mut cluster = Cluster::start(3, fast());
    let old = healthy(&mut cluster);
    let old_port = cluster.node(&old).pg_port;
    let postmaster = cluster.node(&old).postmaster_pid().expect("postmaster");
    let probe = RoleProbe::start(&cluster.pg_ports(), PROBE_EVERY);
    let direct = direct_writers(&cluster);
    let writer = start_writer(&cluster);

    let killed_at = Instant::now();
    cluster.node_mut(&old).kill9();
    let stopped_at = wait_until(
        "the guard to stop the orphaned postmaster",
        Duration::from_secs(10),
        || (!process_alive(postmaster)).then(Instant::now),
    );
    assert!(
        stopped_at - killed_at <= Duration::from_secs(2),
        "the orphaned postmaster ran {} ms after its agent died",
        ms(stopped_at - killed_at)
    );
    let (new_port, promoted_at) = wait_promotion(&probe, old_port, killed_at);
    writer.wait_for_ack_on(new_port, promoted_at, Duration::from_secs(30));
    let new = cluster.node_by_port(new_port).name.clone();

    let mut writers = direct;
    writers.push(writer);
    let (logs, lost) = settle(writers, cluster.node(&new));
    for log in &logs {
        let late = acked_after(log, old_port, stopped_at);
        assert!(
            late.is_empty(),
            "{}: writes acknowledged by the stopped primary: {late:#?}",
            log.writer
        );
    }
    let gap = assert_single_writer(&logs, probe, cluster.node(&new), old_port, new_port);
    let app = logs.last().expect("app writer");
    eprintln!(
        "SUMMARY agent sigkill, postgres left running: postmaster stopped {} ms after the kill, promoted after {} ms, gap between primaries {} ms, app outage {} ms, {} writes acked, {} lost",
        ms(stopped_at - killed_at),
        ms(promoted_at - killed_at),
        ms(gap),
        ms(outage(app, old_port, new_port).expect("writes on both primaries")),
        logs.iter().map(WriterLog::acked_count).sum::<usize>(),
        lost.len()
    );
}

#[test]
fn replicas_keep_running_while_a_second_failover_waits_for_the_lease() {
    let _serial = serial();
    // A TTL longer than the 5 s after which a stalled standby is judged
    // diverged: the survivor waits that long for the dead leader's lease.
    let timing = Timing {
        ttl_s: 7,
        loop_wait_s: 1,
        retry_timeout_s: 1,
    };
    let mut cluster = Cluster::start(
        3,
        Options {
            timing,
            ..Options::default()
        },
    );
    let first = healthy(&mut cluster);
    // First failover: the survivors follow the new primary onto timeline 2.
    cluster.node_mut(&first).kill9_with_postgres();
    let view = cluster.wait_healthy(REJOIN_TIMEOUT);
    let second = view.primaries()[0].name.clone();
    let second_port = cluster.node(&second).pg_port;
    let survivor = view.streaming_replicas()[0].name.clone();
    let survivor_port = cluster.node(&survivor).pg_port;
    let postmaster = cluster
        .node(&survivor)
        .postmaster_pid()
        .expect("postmaster");
    let probe = RoleProbe::start(&cluster.pg_ports(), PROBE_EVERY);

    // Second failover: the survivor is the only candidate.
    let killed_at = Instant::now();
    cluster.node_mut(&second).kill9_with_postgres();
    let (new_port, promoted_at) = wait_promotion(&probe, second_port, killed_at);
    assert_eq!(new_port, survivor_port);
    let rounds = probe.stop();
    let down: Vec<Instant> = rounds
        .iter()
        .filter(|r| r.at > killed_at && r.at < promoted_at)
        .filter(|r| {
            r.in_recovery
                .iter()
                .any(|(p, v)| *p == survivor_port && v.is_none())
        })
        .map(|r| r.at)
        .collect();
    let log = cluster.node(&survivor).current_run_log();
    let stops: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("action=stop postgres"))
        .collect();
    assert!(
        stops.is_empty()
            && down.is_empty()
            && cluster.node(&survivor).postmaster_pid() == Some(postmaster),
        "{survivor} stopped its Postgres while the dead leader's lease ran out \
         ({} probe rounds without an answer, from {:?} to {:?} after the kill): {stops:#?}",
        down.len(),
        down.first().map(|t| *t - killed_at),
        down.last().map(|t| *t - killed_at),
    );
    let failover = promoted_at - killed_at;
    assert!(
        failover <= Duration::from_secs(timing.ttl_s + 2),
        "promotion took {failover:?}"
    );
    eprintln!(
        "SUMMARY second failover (ttl {} s): {survivor} promoted after {} ms, postmaster kept",
        timing.ttl_s,
        ms(failover)
    );
}

/// Issue 26 on real processes: a member that can never report a WAL
/// position (a standby that waits for a primary to become consistent) kept
/// every election waiting for good after a whole-cluster stop and start.
/// Now the others wait for it at most `primary_start_timeout`; and a member
/// whose rewind was cut short (its marker beside the data directory) does
/// not start at all, so nobody waits for it, and it rewinds once there is
/// a leader.
/// A standby whose start still waits for that WAL is pointed at the new
/// leader as soon as it runs (SIGHUP, `primary_conninfo`), and streams.
#[test]
fn a_whole_cluster_restart_elects_a_primary_despite_a_member_that_cannot_start() {
    let _serial = serial();
    let start_timeout = Duration::from_secs(10);
    let mut cluster = Cluster::start(
        3,
        Options {
            extra_toml: format!(
                "[cluster]\nprimary_start_timeout = \"{}s\"\n",
                start_timeout.as_secs()
            ),
            ..fast()
        },
    );
    let leader = healthy(&mut cluster);
    let leader_port = cluster.node(&leader).pg_port;
    cluster
        .node(&leader)
        .query("INSERT INTO pgha_writes (writer, seq, server_port, timeline) SELECT 'before', g, 0, 0 FROM generate_series(1, 100) g");
    let names: Vec<String> = ["n1", "n2", "n3"].iter().map(|s| s.to_string()).collect();
    let mut others = names.iter().filter(|n| **n != leader).cloned();
    let (stuck, marked) = (others.next().unwrap(), others.next().unwrap());

    // 1. The stuck member: a copy taken while the leader runs, without its
    // WAL; then every agent stops at once, as in a rolling deploy.
    let stuck_dir = cluster.node(&stuck).data_dir.clone();
    cluster.node_mut(&stuck).sigterm();
    replace_with_copy_lacking_wal(&stuck_dir, leader_port);
    for (name, status) in cluster.sigterm_all(Duration::from_secs(40)) {
        assert!(status.is_some(), "{name} did not stop");
    }
    let started = Instant::now();
    for n in &names {
        cluster.node_mut(n).restart();
    }
    let view = cluster.wait_for(
        "a primary although a member cannot become consistent",
        start_timeout + ttl() + Duration::from_secs(30),
        |v| v.primaries().len() == 1,
    );
    let first = started.elapsed();
    let new_leader = view.primaries()[0].name.clone();
    assert_ne!(new_leader, stuck, "the member without a position led");
    let log = cluster.node(&new_leader).current_run_log();
    assert!(
        log.contains(&format!(
            "{stuck} is starting: wait until it reports its WAL position"
        )),
        "the wait was not logged:\n{}",
        common::tail(&cluster.node(&new_leader).log, 40)
    );
    assert!(
        log.contains(&format!("no longer waiting for {stuck}")),
        "giving up the wait was not logged:\n{}",
        common::tail(&cluster.node(&new_leader).log, 40)
    );
    assert!(
        first >= start_timeout,
        "a primary after {first:?}: the wait for {stuck} was not applied"
    );
    // With a primary, the copy is pointed at it while its start still
    // waits, gets its WAL and streams.
    cluster.wait_healthy(REJOIN_TIMEOUT);
    let rejoined = started.elapsed();
    assert!(
        cluster
            .node(&stuck)
            .current_run_log()
            .contains(&format!("stream from {new_leader}")),
        "the starting standby was not pointed at {new_leader}:\n{}",
        common::tail(&cluster.node(&stuck).log, 40)
    );

    // 2. A rewind cut short: its marker is left beside the data directory.
    // Another stop and start: the marked member is not started, reports
    // rewind_pending, delays nobody, and rewinds against the new leader.
    for (name, status) in cluster.sigterm_all(Duration::from_secs(40)) {
        assert!(status.is_some(), "{name} did not stop");
    }
    let marked_dir = cluster.node(&marked).data_dir.clone();
    let marker = marked_dir.with_file_name("data.pgha-job");
    assert_eq!(
        marked_dir.file_name().and_then(|n| n.to_str()),
        Some("data")
    );
    std::fs::write(&marker, "rewind\nsource gone\n").expect("write marker");
    let started = Instant::now();
    for n in &names {
        cluster.node_mut(n).restart();
    }
    let scope = cluster.opts.scope.clone();
    wait_until(
        "the marked member to report rewind_pending",
        Duration::from_secs(30),
        || {
            let m = cluster
                .etcd
                .get_json(&format!("/pgha/{scope}/members/{marked}"))?;
            (m["state"] == "rewind_pending").then_some(())
        },
    );
    assert!(
        cluster.node(&marked).postmaster_pid().is_none(),
        "Postgres runs on a directory with an unfinished rewind"
    );
    cluster.wait_for(
        "a primary without waiting for the marked member",
        ttl() + Duration::from_secs(20),
        |v| v.primaries().len() == 1,
    );
    let second = started.elapsed();
    assert!(
        second < start_timeout + ttl(),
        "a primary after {second:?}: the election waited for the marked member"
    );
    let view = cluster.wait_healthy(REJOIN_TIMEOUT);
    assert!(view.streaming_replicas().iter().any(|m| m.name == marked));
    assert!(!marker.exists(), "the marker outlived a successful rewind");
    assert!(
        cluster
            .node(&marked)
            .current_run_log()
            .contains("the last pg_rewind did not finish"),
        "{}",
        common::tail(&cluster.node(&marked).log, 40)
    );
    let primary = view.primaries()[0].name.clone();
    assert_eq!(
        cluster
            .node(&primary)
            .query("SELECT count(*) FROM pgha_writes WHERE writer = 'before'"),
        "100"
    );
    eprintln!(
        "SUMMARY whole-cluster restart: primary {} ms after the start with a member that cannot become consistent (primary_start_timeout {} s, ttl {} s), all streaming after {} ms; {} ms with a member whose rewind was cut short",
        ms(first),
        start_timeout.as_secs(),
        TIMING.ttl_s,
        ms(rejoined),
        ms(second)
    );
}
