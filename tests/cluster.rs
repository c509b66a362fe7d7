//! End-to-end behaviour of a pgha cluster on a real etcd and real Postgres 15:
//! bootstrap from empty directories, replication, the initialize race,
//! rejoining after SIGKILL without a new basebackup, and refusing data
//! directories that are not ours. Tests run one at a time (see `serial`).

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    initdb_as_postgres, serial, system_identifier, Cluster, DirSnapshot, Etcd, Node, Options,
    Timing,
};

const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(90);

fn three_healthy_nodes(opts: Options) -> Cluster {
    let mut cluster = Cluster::start(3, opts);
    cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    cluster
}

/// Polls `sql` on `node` until it prints `expected`.
fn wait_for_value(node: &Node, sql: &str, expected: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match node.psql(sql) {
            Ok(v) if v == expected => return,
            other => other,
        };
        if Instant::now() >= deadline {
            panic!(
                "{}: `{sql}` did not return {expected:?} within {timeout:?}; last: {last:?}",
                node.name
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn three_nodes_bootstrap_into_one_primary_and_two_streaming_replicas() {
    let _serial = serial();
    let mut cluster = three_healthy_nodes(Options::default());
    let view = cluster.view().expect("/cluster");
    assert_eq!(view.primaries().len(), 1, "{view:#?}");
    assert_eq!(view.streaming_replicas().len(), 2, "{view:#?}");
    let primary = view.primaries()[0].name.clone();
    assert_eq!(view.leader.as_deref(), Some(primary.as_str()));
    let mut replicas: Vec<String> = view
        .streaming_replicas()
        .iter()
        .map(|m| m.name.clone())
        .collect();
    replicas.sort();

    // Postgres agrees with the API: the primary streams to both, by name.
    let primary_node = cluster.node(&primary);
    assert_eq!(primary_node.query("SELECT pg_is_in_recovery()"), "f");
    wait_for_value(
        primary_node,
        "SELECT string_agg(application_name || ':' || state, ',' ORDER BY application_name) FROM pg_stat_replication",
        &replicas.iter().map(|r| format!("{r}:streaming")).collect::<Vec<_>>().join(","),
        Duration::from_secs(10),
    );
    for r in &replicas {
        assert_eq!(
            cluster.node(r).query("SELECT pg_is_in_recovery()"),
            "t",
            "{r}"
        );
    }

    // Health endpoints follow the roles.
    assert_eq!(primary_node.get_status_code("/primary"), Some(200));
    assert_eq!(primary_node.get_status_code("/replica"), Some(503));
    for r in &replicas {
        assert_eq!(
            cluster.node(r).get_status_code("/primary"),
            Some(503),
            "{r}"
        );
        assert_eq!(
            cluster.node(r).get_status_code("/replica"),
            Some(200),
            "{r}"
        );
    }

    // Exactly one node ran initdb; the others cloned it.
    let initdb_nodes: Vec<&str> = cluster
        .nodes
        .iter()
        .filter(|n| n.log_text().contains("action=initdb"))
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(initdb_nodes, vec![primary.as_str()]);
}

#[test]
fn a_row_written_on_the_primary_is_read_on_both_replicas() {
    let _serial = serial();
    let mut cluster = three_healthy_nodes(Options::default());
    let view = cluster.view().expect("/cluster");
    let primary = cluster.node(&view.primaries()[0].name);
    primary.query("CREATE TABLE replicated (id int PRIMARY KEY, note text)");
    primary.query("INSERT INTO replicated VALUES (1, 'written on the primary')");
    for r in view.streaming_replicas() {
        wait_for_value(
            cluster.node(&r.name),
            "SELECT note FROM replicated WHERE id = 1",
            "written on the primary",
            Duration::from_secs(5),
        );
    }
}

#[test]
fn exactly_one_node_runs_initdb_when_three_start_at_once() {
    let _serial = serial();
    let etcd = Arc::new(Etcd::start());
    let started = Instant::now();
    for round in 0..20 {
        let scope = format!("race{round}");
        let mut cluster = Cluster::start_on(
            etcd.clone(),
            3,
            Options {
                scope: scope.clone(),
                ..Options::default()
            },
        );
        let view = cluster.wait_for(
            &format!("round {round}: a primary"),
            Duration::from_secs(60),
            |v| {
                assert!(
                    v.primaries().len() <= 1,
                    "round {round}: two primaries: {v:#?}"
                );
                v.primaries().len() == 1
            },
        );
        let primary = view.primaries()[0].name.clone();
        let primary_sysid: u64 = cluster
            .node(&primary)
            .query("SELECT system_identifier FROM pg_control_system()")
            .parse()
            .expect("system identifier");
        let init = etcd
            .get_json(&format!("/pgha/{scope}/initialize"))
            .expect("initialize key");
        // Stop first, then judge the complete logs: a late second initdb counts too.
        for (name, status) in cluster.sigterm_all(Duration::from_secs(20)) {
            let status = status
                .unwrap_or_else(|| panic!("round {round}: {name} still runs 20 s after SIGTERM"));
            assert!(
                status.success(),
                "round {round}: {name} exited with {status} after SIGTERM"
            );
        }
        cluster.assert_no_leftovers(Duration::from_secs(5));

        let initdb_nodes: Vec<&str> = cluster
            .nodes
            .iter()
            .filter(|n| n.log_text().contains("action=initdb"))
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(
            initdb_nodes,
            vec![primary.as_str()],
            "round {round}: nodes that ran initdb"
        );
        let won: Vec<&str> = cluster
            .nodes
            .iter()
            .filter(|n| n.log_text().contains("won the initialize race"))
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(
            won,
            vec![primary.as_str()],
            "round {round}: nodes that won the initialize race"
        );
        assert_eq!(init["node"], primary.as_str(), "round {round}: {init}");
        assert_eq!(
            init["system_identifier"].as_u64(),
            Some(primary_sysid),
            "round {round}: {init}"
        );
        for node in &cluster.nodes {
            if node.data_dir.join("global/pg_control").exists() {
                assert_eq!(
                    system_identifier(&node.data_dir),
                    Some(primary_sysid),
                    "round {round}: {}",
                    node.name
                );
            }
        }
    }
    eprintln!("20 initialize races in {:?}", started.elapsed());
}

/// Drops a file into the data directory. A basebackup needs an empty
/// directory, so the file surviving the restart shows that none ran.
fn drop_marker(node: &Node) -> std::path::PathBuf {
    let marker = node.data_dir.join("pgha_test_marker");
    fs::write(
        &marker,
        format!("{} was here before the restart\n", node.name),
    )
    .expect("write marker");
    marker
}

#[test]
fn replicas_killed_with_sigkill_rejoin_without_a_basebackup() {
    let _serial = serial();
    let mut cluster = three_healthy_nodes(Options::default());
    let view = cluster.view().expect("/cluster");
    let primary = view.primaries()[0].name.clone();
    let replicas: Vec<String> = view
        .streaming_replicas()
        .iter()
        .map(|m| m.name.clone())
        .collect();
    let (keeps_pg, loses_pg) = (replicas[0].clone(), replicas[1].clone());
    cluster
        .node(&primary)
        .query("CREATE TABLE before_kill AS SELECT 1 AS id");

    // One agent dies alone and its Postgres keeps running; the other dies with its Postgres.
    let kept_postmaster = cluster
        .node(&keeps_pg)
        .postmaster_pid()
        .expect("postmaster");
    cluster.node_mut(&keeps_pg).kill9();
    cluster.node_mut(&loses_pg).kill9_with_postgres();
    assert_eq!(
        cluster.node(&keeps_pg).postmaster_pid(),
        Some(kept_postmaster),
        "SIGKILL of the agent stopped its postgres"
    );
    cluster
        .node(&primary)
        .query("CREATE TABLE while_down AS SELECT 2 AS id");

    let mut markers = Vec::new();
    for name in [&keeps_pg, &loses_pg] {
        let node = cluster.node_mut(name);
        let inode = fs::metadata(&node.data_dir).expect("data dir").ino();
        markers.push((name.clone(), drop_marker(node), inode));
        node.restart();
    }
    cluster.wait_healthy(Duration::from_secs(60));

    for (name, marker, inode) in markers {
        let node = cluster.node(&name);
        let log = node.current_run_log();
        assert!(
            !log.contains("action=clone"),
            "{name} cloned again after the restart:\n{log}"
        );
        assert!(
            marker.exists(),
            "{name}: {} is gone: the data directory was replaced",
            marker.display()
        );
        assert_eq!(
            fs::metadata(&node.data_dir).expect("data dir").ino(),
            inode,
            "{name}: data directory replaced"
        );
        assert_eq!(node.query("SELECT pg_is_in_recovery()"), "t", "{name}");
        wait_for_value(
            node,
            "SELECT id FROM while_down",
            "2",
            Duration::from_secs(5),
        );
    }
    assert_eq!(
        cluster.node(&keeps_pg).postmaster_pid(),
        Some(kept_postmaster),
        "the surviving postgres was restarted"
    );
    cluster
        .node(&primary)
        .query("CREATE TABLE after_restart AS SELECT 3 AS id");
    for name in [&keeps_pg, &loses_pg] {
        wait_for_value(
            cluster.node(name),
            "SELECT id FROM after_restart",
            "3",
            Duration::from_secs(5),
        );
    }
}

#[test]
fn a_primary_killed_with_sigkill_fails_over_and_rejoins_without_a_basebackup() {
    let _serial = serial();
    let mut cluster = three_healthy_nodes(Options {
        timing: Timing::FAST,
        ..Options::default()
    });
    let old = cluster.view().expect("/cluster").primaries()[0]
        .name
        .clone();
    cluster
        .node(&old)
        .query("CREATE TABLE before_failover AS SELECT 1 AS id");
    for r in cluster.view().expect("/cluster").streaming_replicas() {
        wait_for_value(
            cluster.node(&r.name),
            "SELECT id FROM before_failover",
            "1",
            Duration::from_secs(5),
        );
    }

    cluster.node_mut(&old).kill9_with_postgres();
    let view = cluster.wait_for("another node to take over", Duration::from_secs(60), |v| {
        v.primaries().len() == 1
            && v.primaries()[0].name != old
            && v.streaming_replicas().len() == 1
    });
    let new = view.primaries()[0].name.clone();
    cluster
        .node(&new)
        .query("CREATE TABLE after_failover AS SELECT 2 AS id");

    let node = cluster.node_mut(&old);
    let inode = fs::metadata(&node.data_dir).expect("data dir").ino();
    node.restart();
    let view = cluster.wait_healthy(Duration::from_secs(60));
    assert_eq!(
        view.primaries()[0].name,
        new,
        "leadership moved again: {view:#?}"
    );

    let node = cluster.node(&old);
    let log = node.current_run_log();
    assert!(
        !log.contains("action=clone"),
        "{old} cloned again after the restart:\n{log}"
    );
    assert_eq!(
        fs::metadata(&node.data_dir).expect("data dir").ino(),
        inode,
        "{old}: data directory replaced"
    );
    assert_eq!(node.query("SELECT pg_is_in_recovery()"), "t");
    wait_for_value(
        node,
        "SELECT id FROM before_failover",
        "1",
        Duration::from_secs(5),
    );
    wait_for_value(
        node,
        "SELECT id FROM after_failover",
        "2",
        Duration::from_secs(5),
    );
}

/// Starts `name` on `cluster` with a prepared data directory and asserts
/// that the agent exits non-zero, says `problem` in its log, and leaves the
/// data directory exactly as it was.
fn assert_refused(
    cluster: &mut Cluster,
    name: &str,
    prepare: impl FnOnce(&Node),
    problem: &[&str],
) {
    let mut before = None;
    let node = cluster.add_node(name, |node| {
        prepare(node);
        before = Some(DirSnapshot::take(&node.data_dir));
    });
    let status = node
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{name}: agent still runs after 30 s"));
    assert!(
        !status.success(),
        "{name}: agent exited with {status}, expected a failure"
    );
    let log = node.log_text();
    for words in problem {
        assert!(
            log.contains(words),
            "{name}: log does not say {words:?}:\n{log}"
        );
    }
    assert!(
        !log.contains("action=initdb") && !log.contains("action=clone"),
        "{name}: touched the data directory:\n{log}"
    );
    let before = before.expect("snapshot taken");
    let after = DirSnapshot::take(&node.data_dir);
    assert!(before.len() > 1, "{name}: empty snapshot");
    let diff = before.diff(&after);
    assert!(diff.is_empty(), "{name}: data directory changed: {diff:#?}");
}

#[test]
fn a_data_directory_of_another_cluster_is_refused_and_left_unchanged() {
    let _serial = serial();
    let mut cluster = three_healthy_nodes(Options::default());
    let primary = cluster.view().expect("/cluster").primaries()[0]
        .name
        .clone();
    let cluster_sysid = system_identifier(&cluster.node(&primary).data_dir).expect("cluster sysid");

    let mut foreign_sysid = None;
    assert_refused(
        &mut cluster,
        "n4",
        |node| {
            initdb_as_postgres(&node.data_dir);
            foreign_sysid = system_identifier(&node.data_dir);
        },
        &["belongs to another cluster", "refusing"],
    );
    let foreign_sysid = foreign_sysid.expect("foreign sysid");
    assert_ne!(foreign_sysid, cluster_sysid);
    let log = cluster.node("n4").log_text();
    assert!(
        log.contains(&foreign_sysid.to_string()),
        "the refusal does not name the foreign identifier:\n{log}"
    );

    // The cluster is unharmed and n4 is not a member.
    let view = cluster.wait_healthy(Duration::from_secs(30));
    assert!(view.member("n4").is_none(), "{view:#?}");
}

/// A few files that are no Postgres cluster, one of them pretending to be.
fn fill_with_unknown_files(node: &Node) {
    let dir = &node.data_dir;
    fs::create_dir_all(dir.join("notes/old")).expect("mkdir");
    fs::write(dir.join("README"), "not a database\n").expect("write");
    fs::write(dir.join("PG_VERSION"), "15\n").expect("write");
    // Deterministic noise (xorshift), so a failure reproduces.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(dir.join("notes/old/blob.bin"), &noise).expect("write");
    fs::write(dir.join("notes/todo.txt"), "keep me\n").expect("write");
}

#[test]
fn a_non_empty_directory_that_is_no_cluster_is_refused_and_left_unchanged() {
    let _serial = serial();
    // Joining an initialized cluster.
    let mut cluster = Cluster::start(1, Options::default());
    cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    let problem = ["holds no Postgres cluster", "refusing"];
    assert_refused(&mut cluster, "n2", fill_with_unknown_files, &problem);
    let view = cluster.wait_healthy(Duration::from_secs(30));
    assert!(view.member("n2").is_none(), "{view:#?}");

    // The first node of a new cluster: it must not even claim the initialize key.
    let mut fresh = Cluster::start_on(
        cluster.etcd.clone(),
        0,
        Options {
            scope: "fresh".into(),
            ..Options::default()
        },
    );
    assert_refused(&mut fresh, "n1", fill_with_unknown_files, &problem);
    assert_eq!(
        fresh.etcd.count_prefix("/pgha/fresh/"),
        0,
        "the refused node wrote to etcd"
    );
}
