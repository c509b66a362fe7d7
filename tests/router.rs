//! The router in every agent (issue 17) against real etcd, PostgreSQL 15,
//! psql and pgbench: one host and one port reach the primary through any
//! node, and follow a failover.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::proxy::{pgbench, processed, with_routers};
use common::*;

#[test]
fn one_host_and_port_reach_the_primary_through_any_node_and_follow_a_failover() {
    let _serial = serial();
    let (opts, routers) = with_routers(3);
    let mut cluster = Cluster::start(3, opts);
    let view = cluster.wait_healthy(Duration::from_secs(60));
    let primary = view.primaries()[0].name.clone();
    let primary_port = cluster.node(&primary).pg_port;
    let replica = view.streaming_replicas()[0].name.clone();

    // Through every node's read-write router: the primary, by psql.
    for (node, port) in &routers.rw {
        let answer = wait_until(
            &format!("psql through {node}'s router"),
            Duration::from_secs(10),
            || psql(*port, "SELECT pg_is_in_recovery(), inet_server_port()").ok(),
        );
        assert_eq!(
            answer,
            format!("f|{primary_port}"),
            "{node}'s router did not reach the primary"
        );
    }
    // `pgha list --json` names every member's router listeners.
    let list = Command::new(env!("CARGO_BIN_EXE_pgha"))
        .args(["list", "--json", "--api", &cluster.node(&replica).api_url()])
        .output()
        .expect("pgha list");
    let members: serde_json::Value =
        serde_json::from_slice(&list.stdout).expect("pgha list --json is JSON");
    for (node, port) in &routers.rw {
        let m = members
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == node.as_str()))
            .unwrap_or_else(|| panic!("{node} not in {members}"));
        assert_eq!(m["router_rw"], format!("127.0.0.1:{port}"), "{m}");
        assert_eq!(
            m["router_ro"],
            format!("127.0.0.1:{}", routers.ro(node)),
            "{m}"
        );
    }
    // The read-only router of the primary's node reaches a replica.
    let ro = psql(routers.ro(&primary), "SELECT pg_is_in_recovery()").expect("read-only router");
    assert_eq!(ro, "t", "the read-only router reached a writable node");

    // pgbench through a replica's router: initialise, TPC-B, select-only.
    let via = routers.rw(&replica);
    pgbench(via, &["-i", "-s", "1", "-q"]).expect("pgbench -i through the router");
    let tpcb = pgbench(via, &["-c", "4", "-j", "2", "-T", "5"]).expect("pgbench TPC-B");
    let select = pgbench(via, &["-S", "-c", "4", "-j", "2", "-T", "5"]).expect("pgbench -S");
    let (tpcb_n, select_n) = (processed(&tpcb), processed(&select));
    assert!(tpcb_n > 0 && select_n > 0, "{tpcb}\n{select}");
    // The router counted them, on /metrics, in a form Prometheus accepts.
    let metrics = metrics_of(cluster.node(&replica));
    assert!(router_sample(&metrics, "pgha_router_accepted_total", "rw") >= 9);
    assert!(router_sample(&metrics, "pgha_router_bytes_total", "rw") > 0);
    promtool_accepts(&metrics);

    // A writer with one host and one port (the replica's router) across a
    // SIGKILL of the primary and its Postgres.
    create_writes_table(cluster.node(&primary));
    let writer = Writer::direct("via-router", via, Duration::from_millis(20));
    writer.wait_for_ack_on(primary_port, Instant::now(), Duration::from_secs(10));
    let kill_began = Instant::now();
    cluster.node_mut(&primary).kill9_with_postgres();
    // The agent dies first and its Postgres a moment later: an ack in
    // between is the old primary's, before it was gone.
    let killed = Instant::now();
    let view = cluster.wait_for("a new primary", Duration::from_secs(30), |v| {
        v.primaries().len() == 1 && v.primaries()[0].name != primary
    });
    let new_primary = view.primaries()[0].name.clone();
    let new_port = cluster.node(&new_primary).pg_port;
    let ack = writer.wait_for_ack_on(new_port, killed, Duration::from_secs(30));
    let resumed = ack.at - kill_began;
    let log = writer.stop();
    let after_kill: Vec<_> = log.acked().filter(|(_, a)| a.at > killed).collect();
    assert!(
        after_kill.iter().all(|(_, a)| a.port == new_port),
        "an acknowledgement after the kill came from another server than {new_primary}"
    );
    let stored = stored_seqs(new_port, "via-router").expect("rows on the new primary");
    let missing: Vec<i64> = log
        .acked()
        .filter(|(_, a)| a.port == new_port)
        .map(|(at, _)| at.seq)
        .filter(|s| !stored.contains(s))
        .collect();
    assert!(
        missing.is_empty(),
        "writes acknowledged by {new_primary} are missing: {missing:?}"
    );
    eprintln!(
        "SUMMARY router: pgbench through {replica}'s router: TPC-B {tpcb_n} tx, select-only {select_n} tx in 5 s (4 clients); after SIGKILL of {primary}, writes through the router resumed on {new_primary} {} ms after the kill ({} acknowledged after it)",
        resumed.as_millis(),
        after_kill.len()
    );
}

#[test]
fn a_primary_cut_off_from_etcd_closes_its_routers_clients_and_the_others_move() {
    let _serial = serial();
    let (mut opts, routers) = with_routers(3);
    opts.etcd_proxy = true;
    let mut cluster = Cluster::start(3, opts);
    let view = cluster.wait_healthy(Duration::from_secs(60));
    let primary = view.primaries()[0].name.clone();
    let primary_port = cluster.node(&primary).pg_port;
    let replica = view.streaming_replicas()[0].name.clone();
    create_writes_table(cluster.node(&primary));
    // One client through the primary's own router, one through a replica's.
    let own = Writer::direct(
        "own-router",
        routers.rw(&primary),
        Duration::from_millis(20),
    );
    let other = Writer::direct(
        "other-router",
        routers.rw(&replica),
        Duration::from_millis(20),
    );
    own.wait_for_ack_on(primary_port, Instant::now(), Duration::from_secs(10));
    other.wait_for_ack_on(primary_port, Instant::now(), Duration::from_secs(10));
    let cut = Instant::now();
    cluster.node(&primary).etcd_proxy().cut();
    let view = cluster.wait_for("a primary elsewhere", Duration::from_secs(30), |v| {
        v.primaries().iter().any(|m| m.name != primary)
    });
    let new_primary = view
        .primaries()
        .iter()
        .find(|m| m.name != primary)
        .expect("checked")
        .name
        .clone();
    let new_port = cluster.node(&new_primary).pg_port;
    let moved = other.wait_for_ack_on(new_port, cut, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let (own, other) = (own.stop(), other.stop());
    cluster.node(&primary).etcd_proxy().heal();
    let ttl = Duration::from_secs(Timing::FAST.ttl_s);
    let last_old = own
        .acked()
        .chain(other.acked())
        .filter(|(_, a)| a.port == primary_port)
        .map(|(_, a)| a.at)
        .max()
        .expect("acknowledged before the cut");
    assert!(
        last_old < cut + ttl,
        "the old primary acknowledged through a router {} ms after it was cut off (ttl {} s)",
        (last_old - cut).as_millis(),
        ttl.as_secs()
    );
    let first_new = other
        .acked()
        .filter(|(_, a)| a.port == new_port)
        .map(|(_, a)| a.at)
        .min()
        .expect("moved");
    assert!(
        last_old < first_new,
        "writes through the routers reached both primaries' terms interleaved"
    );
    eprintln!(
        "SUMMARY router fencing: {primary} cut off from etcd: last write through a router acknowledged by it {} ms after the cut (ttl {} s); {replica}'s router reached {new_primary} {} ms after the cut",
        (last_old - cut).as_millis(),
        ttl.as_secs(),
        (moved.at - cut).as_millis()
    );
}

/// The `/metrics` text of `node`.
fn metrics_of(node: &Node) -> String {
    let (status, body) = http_get(node.api_addr(), "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of router family `family` for `listener` in a `/metrics` text.
fn router_sample(metrics: &str, family: &str, listener: &str) -> u64 {
    let label = format!("listener=\"{listener}\"}}");
    metrics
        .lines()
        .find(|l| l.starts_with(&format!("{family}{{")) && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {family} for {listener} in\n{metrics}"))
}

/// `promtool check metrics` finds no error in `metrics`.
fn promtool_accepts(metrics: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/test installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(metrics.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !said.contains("error"),
        "promtool: {said}"
    );
}

/// Whether the peer has closed `stream` (EOF or reset), waiting at most
/// `within` for it.
fn closed_within(stream: &mut std::net::TcpStream, within: Duration) -> bool {
    use std::io::Read;
    stream
        .set_read_timeout(Some(within.max(Duration::from_millis(1))))
        .expect("read timeout");
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Connections through the routers across store trouble and a switchover,
/// at the production TTL (10 s, fence window 8 s), on one cluster:
/// 1. etcd frozen (SIGSTOP) for 2 s under pgbench through a replica's
///    router: no connection dropped, no client aborted;
/// 2. one replica cut off from etcd: its router closes what it relays
///    within the fence window, though the primary runs on (the router's own
///    fencing, apart from the fence guard), and the other routers drop
///    nothing; healed, it routes again;
/// 3. a switchover under a client that opens a new connection for every
///    write through a replica's router: new connections are held, not
///    refused, and every write lands on a writable primary;
/// 4. etcd frozen for longer than the fence window: open connections
///    closed by the fencing deadline, writes resume once etcd is back.
#[test]
fn routers_ride_out_store_trouble_and_hold_new_connections_across_a_switchover() {
    let _serial = serial();
    let (mut opts, routers) = with_routers(3);
    opts.timing = Timing::STANDARD;
    opts.etcd_proxy = true;
    let mut cluster = Cluster::start(3, opts);
    let view = cluster.wait_healthy(Duration::from_secs(90));
    let primary = view.primaries()[0].name.clone();
    let primary_port = cluster.node(&primary).pg_port;
    let replicas: Vec<String> = view
        .streaming_replicas()
        .iter()
        .map(|m| m.name.clone())
        .collect();
    let (via, cut_off) = (replicas[0].clone(), replicas[1].clone());
    let fence_window = Duration::from_secs(Timing::STANDARD.ttl_s - 2);
    let fenced_total = |cluster: &Cluster, node: &str| {
        router_sample(
            &metrics_of(cluster.node(node)),
            "pgha_router_closed_by_fence_total",
            "rw",
        )
    };

    // 1. A 2 s freeze of etcd under pgbench: nothing dropped.
    pgbench(routers.rw(&via), &["-i", "-s", "1", "-q"]).expect("pgbench -i");
    let bench = {
        let port = routers.rw(&via);
        std::thread::spawn(move || pgbench(port, &["-c", "8", "-j", "2", "-T", "8"]))
    };
    std::thread::sleep(Duration::from_secs(2));
    cluster.etcd.pause();
    std::thread::sleep(Duration::from_secs(2));
    cluster.etcd.resume();
    let report = bench
        .join()
        .expect("pgbench thread")
        .unwrap_or_else(|e| panic!("pgbench through {via}'s router across a 2 s etcd freeze: {e}"));
    assert!(
        !report.contains("aborted") && processed(&report) > 0,
        "{report}"
    );
    for node in [&primary, &via, &cut_off] {
        assert_eq!(
            fenced_total(&cluster, node),
            0,
            "{node}'s router closed connections over a 2 s etcd freeze"
        );
    }
    let tps = report
        .lines()
        .find(|l| l.starts_with("tps = "))
        .unwrap_or("tps = ?")
        .to_string();

    // 2. One replica cut off from etcd: its router stops vouching.
    create_writes_table(cluster.node(&primary));
    let through_cut = Writer::direct(
        "through-cut",
        routers.rw(&cut_off),
        Duration::from_millis(50),
    );
    let through_other =
        Writer::direct("through-other", routers.rw(&via), Duration::from_millis(50));
    through_cut.wait_for_ack_on(primary_port, Instant::now(), Duration::from_secs(10));
    through_other.wait_for_ack_on(primary_port, Instant::now(), Duration::from_secs(10));
    let mut idle =
        std::net::TcpStream::connect(("127.0.0.1", routers.rw(&cut_off))).expect("connect");
    let mut idle_other =
        std::net::TcpStream::connect(("127.0.0.1", routers.rw(&via))).expect("connect");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !closed_within(&mut idle, Duration::ZERO),
        "closed before the cut"
    );
    let cut = Instant::now();
    cluster.node(&cut_off).etcd_proxy().cut();
    let closed = closed_within(&mut idle, fence_window + Duration::from_secs(3));
    let cut_closed_after = cut.elapsed();
    assert!(
        closed,
        "{cut_off}'s router kept a connection open {} ms after it lost etcd (fence window {} ms)",
        cut_closed_after.as_millis(),
        fence_window.as_millis()
    );
    assert!(
        cut_closed_after >= Duration::from_secs(2),
        "{cut_off}'s router dropped its clients {} ms after losing etcd: sooner than a hiccup",
        cut_closed_after.as_millis()
    );
    assert!(
        !closed_within(&mut idle_other, Duration::ZERO),
        "{via}'s router closed a connection while {cut_off} was cut off"
    );
    assert!(
        fenced_total(&cluster, &cut_off) >= 2,
        "the cut-off router's fence count"
    );
    assert_eq!(fenced_total(&cluster, &via), 0);
    cluster.node(&cut_off).etcd_proxy().heal();
    let healed = Instant::now();
    through_cut.wait_for_ack_on(primary_port, healed, Duration::from_secs(15));
    let (cut_log, other_log) = (through_cut.stop(), through_other.stop());
    let other_lost = other_log.unknown_count() + other_log.connect_failures.len();
    assert_eq!(
        other_lost, 0,
        "the writer through {via}'s router lost its connection while {cut_off} was cut off"
    );
    assert!(
        cut_log.acked().all(|(_, a)| a.port == primary_port),
        "a write through the cut-off router reached another server than {primary}"
    );
    let primary_now = cluster
        .view()
        .and_then(|v| v.primaries().first().map(|m| m.name.clone()));
    assert_eq!(
        primary_now.as_deref(),
        Some(primary.as_str()),
        "the primary moved"
    );

    // 3. A switchover under a client with a new connection per write.
    let target = via.clone();
    let target_port = cluster.node(&target).pg_port;
    let fresh = Writer::reconnecting(
        "fresh-connections",
        routers.rw(&cut_off),
        Duration::from_millis(20),
        Duration::from_secs(15),
    );
    fresh.wait_for_ack_on(primary_port, Instant::now(), Duration::from_secs(10));
    let asked = Instant::now();
    let (status, answer) = http_post(
        cluster.node(&primary).api_addr(),
        "/switchover",
        &format!(r#"{{"leader":"{primary}","candidate":"{target}"}}"#),
    );
    assert_eq!(status, 200, "switchover: {answer}");
    let moved = fresh.wait_for_ack_on(target_port, asked, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let log = fresh.stop();
    let during: Vec<_> = log.attempts.iter().filter(|a| a.sent_at >= asked).collect();
    let failed_connects = log
        .connect_failures
        .iter()
        .filter(|(at, _)| *at >= asked)
        .count();
    let failed_writes = during.iter().filter(|a| a.ack().is_none()).count();
    let gap = log
        .acked()
        .map(|(_, a)| a.at)
        .filter(|at| *at >= asked)
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let old_after_new = log
        .acked()
        .filter(|(_, a)| a.at > moved.at && a.port == primary_port)
        .count();
    assert_eq!(
        old_after_new, 0,
        "{primary} acknowledged writes after {target} did"
    );
    // A connection routed to the old primary a moment before it began to
    // stop may be cut by that stop; anything more is a router that refuses.
    assert!(
        failed_connects + failed_writes <= 2,
        "across the switchover {failed_connects} connection attempt(s) and {failed_writes} write(s) failed through {cut_off}'s router: {:?} {:?}",
        log.connect_failures,
        during.iter().filter(|a| a.ack().is_none()).collect::<Vec<_>>()
    );

    // 4. etcd frozen past the fence window: connections closed by the
    // deadline, writes resume once it is back.
    let leader = target.clone();
    let leader_port = target_port;
    let writer = Writer::direct(
        "long-freeze",
        routers.rw(&leader),
        Duration::from_millis(50),
    );
    writer.wait_for_ack_on(leader_port, Instant::now(), Duration::from_secs(10));
    let mut open =
        std::net::TcpStream::connect(("127.0.0.1", routers.rw(&primary))).expect("connect");
    std::thread::sleep(Duration::from_millis(300));
    let frozen = Instant::now();
    cluster.etcd.pause();
    let closed = closed_within(&mut open, fence_window + Duration::from_secs(2));
    let closed_after = frozen.elapsed();
    std::thread::sleep((fence_window + Duration::from_secs(3)).saturating_sub(frozen.elapsed()));
    cluster.etcd.resume();
    let back = Instant::now();
    let resumed = writer.wait_for_ack_after(back, Duration::from_secs(40));
    let log = writer.stop();
    let last_before = log
        .acked()
        .map(|(_, a)| a.at)
        .filter(|at| *at < back)
        .max()
        .expect("acknowledged before the freeze");
    assert!(
        closed,
        "a connection through {primary}'s router outlived the fence window with etcd frozen"
    );
    assert!(
        last_before < frozen + fence_window + Duration::from_millis(500),
        "a write was acknowledged {} ms into an etcd freeze (fence window {} ms)",
        (last_before - frozen).as_millis(),
        fence_window.as_millis()
    );
    eprintln!(
        "SUMMARY router store trouble: 2 s etcd freeze under pgbench (8 clients) through {via}'s router: 0 connections dropped, {tps}; \
         {cut_off} cut off from etcd: its router closed its clients {} ms after the cut (fence window {} ms), the others dropped none; \
         switchover {primary} -> {target} under one new connection per write through {cut_off}'s router: {failed_connects} failed connection attempts, {failed_writes} failed writes of {}, longest gap between acknowledgements {} ms; \
         etcd frozen {} s: connections through {primary}'s router closed {} ms into it, last write acknowledged {} ms into it, writes resumed {} ms after etcd returned",
        cut_closed_after.as_millis(),
        fence_window.as_millis(),
        during.len(),
        gap.as_millis(),
        (fence_window + Duration::from_secs(3)).as_secs(),
        closed_after.as_millis(),
        (last_before - frozen).as_millis(),
        (resumed.at - back).as_millis(),
    );
}
