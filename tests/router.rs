//! The router in every agent (issue 17) against real etcd, PostgreSQL 15,
//! psql and pgbench: one host and one port reach the primary through any
//! node, and follow a failover.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Each node's router listeners (read-write, read-only), by node name.
struct Routers {
    rw: Vec<(String, u16)>,
    ro: Vec<(String, u16)>,
}

impl Routers {
    fn rw(&self, node: &str) -> u16 {
        self.rw.iter().find(|(n, _)| n == node).expect("node").1
    }
    fn ro(&self, node: &str) -> u16 {
        self.ro.iter().find(|(n, _)| n == node).expect("node").1
    }
}

fn with_routers(n: usize) -> (Options, Routers) {
    let mut opts = Options {
        timing: Timing::FAST,
        ..Options::default()
    };
    let mut routers = Routers {
        rw: Vec::new(),
        ro: Vec::new(),
    };
    for i in 1..=n {
        let name = format!("n{i}");
        let (rw, ro) = (free_port(), free_port());
        opts.node_toml.insert(
            name.clone(),
            format!(
                "[router]\nenabled = true\nlisten = \"127.0.0.1:{rw}\"\nreplica_listen = \"127.0.0.1:{ro}\"\nhold_timeout = \"10s\"\n"
            ),
        );
        routers.rw.push((name.clone(), rw));
        routers.ro.push((name, ro));
    }
    (opts, routers)
}

fn pgbench(port: u16, args: &[&str]) -> Result<String, String> {
    let out = Command::new(Path::new(PG_BIN).join("pgbench"))
        .args(["-h", "127.0.0.1", "-U", "postgres"])
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .arg("postgres")
        .env("PGPASSWORD", SUPERUSER_PASSWORD)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running pgbench: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// `number of transactions actually processed: N` of a pgbench report.
fn processed(report: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

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

    // A writer with one host and one port (the replica's router) across a
    // SIGKILL of the primary and its Postgres.
    create_writes_table(cluster.node(&primary));
    let writer = Writer::direct("via-router", via, Duration::from_millis(20));
    writer.wait_for_ack_on(primary_port, Instant::now(), Duration::from_secs(10));
    let killed = Instant::now();
    cluster.node_mut(&primary).kill9_with_postgres();
    let view = cluster.wait_for("a new primary", Duration::from_secs(30), |v| {
        v.primaries().len() == 1 && v.primaries()[0].name != primary
    });
    let new_primary = view.primaries()[0].name.clone();
    let new_port = cluster.node(&new_primary).pg_port;
    let ack = writer.wait_for_ack_on(new_port, killed, Duration::from_secs(30));
    let resumed = ack.at - killed;
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
