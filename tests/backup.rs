//! Backups through pgBackRest (Debian's 2.45) against a real three-node
//! cluster with a posix repository: archiving from whichever node is the
//! primary, `pgha backup --wait`, `pgha backups --json`, and `pgha restore`
//! to a point in time and to the latest archived WAL after a SIGKILL
//! failover, checked row by row in a Postgres started on the restored copy.

mod common;

use std::time::{Duration, Instant};

use common::{archive_now, pgha, recovered, serial, wait_until, Cluster, Options, TestDir, Timing};
use serde_json::Value;

const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(90);
const RECOVERY: Duration = Duration::from_secs(60);

fn rows(query: impl Fn(&str) -> Result<String, String>) -> Vec<i64> {
    query("SELECT id FROM pitr ORDER BY id")
        .expect("read pitr")
        .lines()
        .map(|l| l.trim().parse().expect("an id"))
        .collect()
}

#[test]
fn archives_across_a_failover_and_restores_to_a_point_in_time() {
    let _serial = serial();
    let dir = TestDir::new("pgha-it-backup");
    let repo = dir.path().join("repo");
    let opts = Options {
        timing: Timing::FAST,
        extra_toml: format!(
            "[backup]\nenabled = true\nrepo_path = \"{}\"\nfull_every = \"off\"\narchive_timeout = \"5s\"\n",
            repo.display()
        ),
        ..Options::default()
    };
    let mut cluster = Cluster::start(3, opts);
    let view = cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    let first = view.primaries()[0].name.clone();
    let api = cluster.node(&first).api_url();
    let primary = cluster.node(&first);
    // The leader creates the stanza by itself.
    wait_until("the stanza", Duration::from_secs(60), || {
        primary
            .get_json("/backups")
            .filter(|b| b["task"]["stanza_ready"] == true)
    });
    primary
        .psql("CREATE TABLE pitr (id bigint PRIMARY KEY, at timestamptz DEFAULT clock_timestamp()); INSERT INTO pitr SELECT generate_series(1, 10)")
        .expect("first rows");

    // A full backup through the CLI, sent to the leader.
    let began = Instant::now();
    let (code, out, err) = pgha(&["backup", "--api", &api, "--wait", "5m", "--json"], &[]);
    assert_eq!(code, 0, "pgha backup: {out}\n{err}");
    let backup: Value = serde_json::from_str(out.trim()).expect("backup JSON");
    assert_eq!(backup["type"], "full", "{backup}");
    eprintln!(
        "SUMMARY full backup of a small database through pgha backup: {:.1} s",
        began.elapsed().as_secs_f64()
    );
    // A second one while none runs is fine; two at once are not.
    let (code, _, err) = pgha(&["backup", "--api", &api, "--type", "diff"], &[]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = pgha(&["backup", "--api", &api], &[]);
    assert_ne!(code, 0, "a second backup began while one ran");
    assert!(err.contains("running"), "{err}");
    wait_until("the diff backup to end", Duration::from_secs(120), || {
        cluster
            .node(&first)
            .get_json("/backups")
            .filter(|b| b["task"]["running"].is_null())
    });
    // The cluster-wide lock: while the `backup` key names another holder
    // (a backup running elsewhere, say begun before a failover), the
    // leader begins none.
    cluster.etcd.put("/pgha/t/backup", "elsewhere");
    let (code, _, err) = pgha(&["backup", "--api", &api], &[]);
    assert_ne!(code, 0, "a backup began while another node held the lock");
    assert!(err.contains("a backup is running on elsewhere"), "{err}");
    cluster.etcd.delete("/pgha/t/backup");
    // Asked of a replica, it says who to ask.
    let replica = view.streaming_replicas()[0].name.clone();
    let (status, body) = common::http_post(cluster.node(&replica).api_addr(), "/backup", "{}");
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("not the leader"), "{body}");
    let (status, body) = common::http_post(
        cluster.node(&first).api_addr(),
        "/backup",
        r#"{"type":"weekly"}"#,
    );
    assert_eq!(status, 400, "{body}");

    // The list, from any node (the repository is shared).
    let (code, out, err) = pgha(
        &[
            "backups",
            "--api",
            &cluster.node(&replica).api_url(),
            "--json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let list: Vec<Value> = serde_json::from_str(out.trim()).expect("list JSON");
    assert_eq!(list.len(), 2, "{out}");
    for b in &list {
        for key in [
            "label",
            "type",
            "start",
            "stop",
            "wal_start",
            "wal_stop",
            "size_bytes",
        ] {
            assert!(!b[key].is_null(), "{key} missing: {b}");
        }
    }
    assert_eq!(list[1]["type"], "diff");
    assert_eq!(list[1]["prior"], list[0]["label"]);

    // Rows before and after a target time, taken from Postgres' clock.
    let primary = cluster.node(&first);
    primary
        .psql("INSERT INTO pitr SELECT generate_series(11, 20)")
        .expect("rows before the target");
    std::thread::sleep(Duration::from_millis(300));
    let target = primary
        .psql("SELECT clock_timestamp()::text")
        .expect("target time");
    std::thread::sleep(Duration::from_millis(300));
    primary
        .psql("INSERT INTO pitr SELECT generate_series(21, 30)")
        .expect("rows after the target");
    archive_now(primary.pg_port);

    // SIGKILL of the primary: the new one archives on its own timeline.
    cluster.node_mut(&first).kill9_with_postgres();
    let view = cluster.wait_for("a new primary", Duration::from_secs(30), |v| {
        v.primaries().iter().any(|m| m.name != first)
    });
    let second = view
        .primaries()
        .iter()
        .find(|m| m.name != first)
        .expect("checked")
        .name
        .clone();
    let new_primary = cluster.node(&second);
    wait_until(
        "the new primary to take writes",
        Duration::from_secs(30),
        || {
            new_primary
                .psql("INSERT INTO pitr SELECT generate_series(31, 40)")
                .ok()
        },
    );
    archive_now(new_primary.pg_port);
    let on_new_primary = rows(|q| new_primary.psql(q));
    assert!(on_new_primary.ends_with(&(31..=40).collect::<Vec<_>>()));
    let timeline: u32 = new_primary
        .psql("SELECT timeline_id FROM pg_control_checkpoint()")
        .expect("timeline")
        .parse()
        .expect("a number");

    // The repository made unwritable: archiving fails loudly (status, the
    // list, metrics) while Postgres keeps taking writes, and catches up
    // when the repository is back.
    let mode = |m: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(m)).expect("chmod repo");
    };
    mode(0o000);
    let cut = Instant::now();
    new_primary
        .psql("INSERT INTO pitr SELECT generate_series(41, 50)")
        .expect("writes while archiving fails");
    let stuck = new_primary
        .psql("SELECT pg_walfile_name(pg_switch_wal())")
        .expect("switch");
    let me = |v: &Value| -> Option<Value> {
        v["members"]
            .as_array()?
            .iter()
            .find(|m| m["name"] == second.as_str())
            .cloned()
    };
    wait_until(
        "archiving reported failing",
        Duration::from_secs(30),
        || {
            let m = me(&new_primary.get_json("/cluster")?)?;
            m["archiver"]["failing_for_s"].as_u64().map(|_| m)
        },
    );
    eprintln!(
        "SUMMARY repository unwritable: archiving reported failing {:.1} s after the cut",
        cut.elapsed().as_secs_f64()
    );
    let (_, list, _) = pgha(&["list", "--api", &new_primary.api_url()], &[]);
    assert!(list.contains("WAL archiving failing"), "{list}");
    let metrics = common::http_get(new_primary.api_addr(), "/metrics")
        .expect("metrics")
        .1;
    assert!(
        metrics.contains("pgha_wal_archive_failed_total{"),
        "{metrics}"
    );
    new_primary
        .psql("INSERT INTO pitr SELECT generate_series(51, 60)")
        .expect("Postgres keeps serving");
    mode(0o750);
    wait_until("archiving to catch up", Duration::from_secs(60), || {
        let last = new_primary
            .psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
            .ok()?;
        (last.as_str() >= stuck.as_str()).then_some(())
    });
    wait_until(
        "archiving reported healthy again",
        Duration::from_secs(30),
        || {
            let m = me(&new_primary.get_json("/cluster")?)?;
            m["archiver"]["failing_for_s"].is_null().then_some(())
        },
    );
    archive_now(new_primary.pg_port);
    let on_new_primary = rows(|q| new_primary.psql(q));

    // Restore to the target time: exactly the rows committed before it.
    let config = cluster.node(&second).config.display().to_string();
    let into = dir.path().join("restored-at-target");
    let began = Instant::now();
    let into_text = into.display().to_string();
    let (code, out, err) = pgha(
        &[
            "restore", "--config", &config, "--to", &target, "--into", &into_text,
        ],
        &[],
    );
    assert_eq!(code, 0, "pgha restore: {out}\n{err}");
    let pg = recovered(&into, &dir.path().join("sock-target"), RECOVERY);
    eprintln!(
        "SUMMARY restore to a point in time (restore and recovery, small database): {:.1} s",
        began.elapsed().as_secs_f64()
    );
    let restored = rows(|q| common::psql(pg.port, q));
    assert_eq!(
        restored,
        (1..=20).collect::<Vec<_>>(),
        "rows as of {target}"
    );
    drop(pg);

    // Restore to the latest archived WAL: what the new primary holds, on
    // its timeline (the history file reached the archive too).
    let into = dir.path().join("restored-latest");
    let into_text = into.display().to_string();
    let (code, out, err) = pgha(
        &[
            "restore", "--config", &config, "--to", "latest", "--into", &into_text,
        ],
        &[],
    );
    assert_eq!(code, 0, "pgha restore latest: {out}\n{err}");
    let pg = recovered(&into, &dir.path().join("sock-latest"), RECOVERY);
    assert_eq!(rows(|q| common::psql(pg.port, q)), on_new_primary);
    let restored_timeline: u32 =
        common::psql(pg.port, "SELECT timeline_id FROM pg_control_checkpoint()")
            .expect("timeline")
            .parse()
            .expect("a number");
    assert!(
        restored_timeline > timeline,
        "a promoted copy starts a timeline after {timeline}, got {restored_timeline}"
    );
    drop(pg);

    // Nothing is restored over a directory that holds something.
    let (code, _, err) = pgha(
        &[
            "restore", "--config", &config, "--to", "latest", "--into", &into_text,
        ],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("not empty"), "{err}");

    // A total loss: every node, data directory and etcd gone. A new cluster
    // with bootstrap_from = "latest" comes up with the archived data: its
    // first leader restores and promotes, the others restore from the
    // repository too (clone_from = "backup") and stream from it.
    drop(cluster);
    let began = Instant::now();
    let opts = Options {
        timing: Timing::FAST,
        extra_toml: format!(
            "[backup]\nenabled = true\nrepo_path = \"{}\"\nfull_every = \"off\"\narchive_timeout = \"5s\"\nbootstrap_from = \"latest\"\n",
            repo.display()
        ),
        // The replicas restore from the repository, not from the leader.
        postgresql_lines: "clone_from = \"backup\"".into(),
        ..Options::default()
    };
    let mut cluster = Cluster::start(3, opts);
    let view = cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    eprintln!(
        "SUMMARY total loss to a healthy 3-node cluster with bootstrap_from (small database): {:.1} s",
        began.elapsed().as_secs_f64()
    );
    let leader = view.primaries()[0].name.clone();
    assert_eq!(rows(|q| cluster.node(&leader).psql(q)), on_new_primary);
    for r in view.streaming_replicas() {
        let replica = cluster.node(&r.name);
        wait_until(
            &format!("{} to hold every row", r.name),
            Duration::from_secs(30),
            || (rows(|q| replica.psql(q)) == on_new_primary).then_some(()),
        );
    }
    for r in view.streaming_replicas() {
        let log = cluster.node(&r.name).log_text();
        assert!(
            log.contains("cloned from the backup repository"),
            "{} was not cloned from the repository:\n{}",
            r.name,
            common::tail(&cluster.node(&r.name).log, 40)
        );
    }
    // It archives and backs up into the same stanza.
    let api = cluster.node(&leader).api_url();
    let (code, out, err) = pgha(&["backup", "--api", &api, "--wait", "5m", "--json"], &[]);
    assert_eq!(code, 0, "backup after the bootstrap: {out}\n{err}");
    archive_now(cluster.node(&leader).pg_port);
    let second = leader;

    // The metrics say what the task knows.
    let metrics = common::http_get(cluster.node(&second).api_addr(), "/metrics")
        .expect("metrics")
        .1;
    assert!(
        metrics.contains("pgha_backup_last_success_timestamp_seconds{"),
        "{metrics}"
    );
    assert!(metrics.contains("pgha_backup_failed_total{"), "{metrics}");
}
