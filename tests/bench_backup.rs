//! Backup benchmark, run by `bench/backup.sh` (ignored by `cargo test`): a
//! three-node cluster with pgBackRest archiving into a posix repository and
//! a pgbench database of scale `PGHA_BENCH_SCALE` (default 64, about 1 GiB).
//! Measures, in one run on this machine:
//! - a full backup through `pgha backup --wait`, beside `pg_basebackup` of
//!   the same primary (what a user would run instead);
//! - WAL archiving under a 30 s pgbench TPC-B run (WAL written, and how long
//!   after the run the last segment was in the archive);
//! - `pgha restore` to a point in time and to the latest WAL, and the
//!   recovery after it;
//! - a total loss (every node, data directory and etcd removed) to a healthy
//!   three-node cluster with `bootstrap_from = "latest"` and
//!   `clone_from = "backup"`, checked against the row count.
//!
//! Writes `bench/backup-results.md`. Asserts only that the data came back.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    archive_now, pgha, psql, recovered, serial, Cluster, Options, TestDir, Timing, PG_BIN,
    REPLICATION_PASSWORD,
};

const HEALTHY: Duration = Duration::from_secs(600);
const RECOVERY: Duration = Duration::from_secs(1800);

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// `pgbench ARGS` on the primary (the harness's one runner), timed.
fn pgbench(port: u16, args: &[&str]) -> Duration {
    let began = Instant::now();
    if let Err(report) = common::proxy::pgbench(port, args) {
        panic!("pgbench {args:?}: {report}");
    }
    began.elapsed()
}

fn du(path: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-sb"])
        .arg(path)
        .output()
        .expect("du");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn backup_toml(repo: &Path, bootstrap: bool) -> String {
    format!(
        "[backup]\nenabled = true\nrepo_path = \"{}\"\nfull_every = \"off\"\nprocess_max = 2\n{}",
        repo.display(),
        if bootstrap {
            "bootstrap_from = \"latest\"\n"
        } else {
            ""
        }
    )
}

#[test]
#[ignore = "benchmark: run bench/backup.sh"]
fn backup_restore_and_total_loss() {
    let _serial = serial();
    let scale: u32 = std::env::var("PGHA_BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let dir = TestDir::new("pgha-bench-backup");
    let repo = dir.path().join("repo");
    let started = Instant::now();
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut cluster = Cluster::start(
        3,
        Options {
            timing: Timing::STANDARD,
            extra_toml: backup_toml(&repo, false),
            ..Options::default()
        },
    );
    let view = cluster.wait_healthy(HEALTHY);
    let leader = view.primaries()[0].name.clone();
    let port = cluster.node(&leader).pg_port;
    let api = cluster.node(&leader).api_url();

    let load = pgbench(port, &["-i", "-q", "-s", &scale.to_string()]);
    let db_bytes: u64 = psql(port, "SELECT pg_database_size('postgres')")
        .expect("size")
        .parse()
        .expect("a number");
    rows.push((
        format!("pgbench -i -s {scale} (database {})", mib(db_bytes)),
        secs(load),
    ));
    archive_now(port);

    // A full backup, then pg_basebackup of the same primary.
    let began = Instant::now();
    let (code, out, err) = pgha(&["backup", "--api", &api, "--wait", "30m", "--json"], &[]);
    assert_eq!(code, 0, "pgha backup: {out}\n{err}");
    let full = began.elapsed();
    rows.push((
        "full backup, `pgha backup --wait` (pgBackRest, lz4, 2 processes)".into(),
        secs(full),
    ));
    rows.push(("repository size after it".into(), mib(du(&repo))));
    let copy = dir.path().join("basebackup");
    let began = Instant::now();
    let out = Command::new(Path::new(PG_BIN).join("pg_basebackup"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "replicator",
        ])
        .args(["-X", "stream", "-c", "fast", "--no-password", "-D"])
        .arg(&copy)
        .env("PGPASSWORD", REPLICATION_PASSWORD)
        .stdin(Stdio::null())
        .output()
        .expect("pg_basebackup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rows.push((
        "pg_basebackup of the same primary (plain, -X stream)".into(),
        secs(began.elapsed()),
    ));
    let _ = std::fs::remove_dir_all(&copy);

    // Archiving under load.
    let lsn = |p: u16| {
        psql(p, "SELECT pg_current_wal_lsn() - '0/0'")
            .expect("lsn")
            .parse::<f64>()
            .expect("a number") as u64
    };
    let before = lsn(port);
    let run = pgbench(port, &["-c", "8", "-j", "2", "-T", "30", "-n"]);
    let written = lsn(port) - before;
    let target = psql(port, "SELECT clock_timestamp()::text").expect("time");
    let waited = Instant::now();
    archive_now(port);
    let lag = waited.elapsed();
    rows.push((
        "WAL written by 30 s of pgbench TPC-B (8 clients), archived as it was written".to_string(),
        format!(
            "{} ({:.1} MiB/s)",
            mib(written),
            written as f64 / (1024.0 * 1024.0) / run.as_secs_f64()
        ),
    ));
    rows.push((
        "after the run: until its last segment was in the archive".into(),
        secs(lag),
    ));
    psql(
        port,
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (0, 0, 0, 0, now())",
    )
    .expect("a row after the target");
    archive_now(port);

    // Restores, each into a new directory, with the recovery after it.
    let config = cluster.node(&leader).config.display().to_string();
    for (what, to) in [
        ("to a point in time", target.as_str()),
        ("to the latest WAL", "latest"),
    ] {
        let into = dir.path().join(format!("restored-{}", rows.len()));
        let into_text = into.display().to_string();
        let began = Instant::now();
        let (code, out, err) = pgha(
            &[
                "restore", "--config", &config, "--to", to, "--into", &into_text,
            ],
            &[],
        );
        assert_eq!(code, 0, "pgha restore: {out}\n{err}");
        let restore = began.elapsed();
        let pg = recovered(
            &into,
            &dir.path().join(format!("sock-{}", rows.len())),
            RECOVERY,
        );
        rows.push((
            format!("`pgha restore` {what}: restore / then recovery and promotion"),
            format!("{} / {}", secs(restore), secs(began.elapsed() - restore)),
        ));
        drop(pg);
        let _ = std::fs::remove_dir_all(&into);
    }
    let accounts = psql(port, "SELECT count(*) FROM pgbench_accounts").expect("count");

    // A total loss.
    drop(cluster);
    let began = Instant::now();
    let mut cluster = Cluster::start(
        3,
        Options {
            timing: Timing::STANDARD,
            extra_toml: backup_toml(&repo, true),
            postgresql_lines: "clone_from = \"backup\"".into(),
            ..Options::default()
        },
    );
    let view = cluster.wait_healthy(HEALTHY);
    let healthy = began.elapsed();
    let leader = view.primaries()[0].name.clone();
    let after = cluster
        .node(&leader)
        .psql("SELECT count(*) FROM pgbench_accounts")
        .expect("count");
    assert_eq!(after, accounts, "rows after the total loss");
    rows.push((
        "total loss to a healthy 3-node cluster (`bootstrap_from = \"latest\"`, replicas `clone_from = \"backup\"`)".into(),
        secs(healthy),
    ));
    // Each replica's restore from the repository, as its agent logged it.
    for r in view.streaming_replicas() {
        let log = cluster.node(&r.name).log_text();
        let took = log
            .lines()
            .find(|l| l.contains("cloned from the backup repository"))
            .and_then(|l| l.split("seconds=").nth(1))
            .and_then(|t| t.split_whitespace().next())
            .and_then(|t| t.parse::<f64>().ok());
        rows.push((
            format!("replica {} cloned from the repository (restore --type=standby; compare pg_basebackup above)", r.name),
            took.map_or_else(|| "not logged".into(), |t| format!("{t:.1} s")),
        ));
    }
    drop(cluster);

    let machine = format!(
        "{} cores; load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut md = format!(
        "# Backups: pgBackRest driven by pgha, beside pg_basebackup\n\n\
         Written by `bench/backup.sh` (`tests/bench_backup.rs`); rerun it to replace this file.\n\n\
         - pgBackRest 2.45, PostgreSQL 15, posix repository on the same disk, release build\n\
         - machine: {machine} at the end; run time {}\n\n| step | time |\n|---|---:|\n",
        secs(started.elapsed())
    );
    for (what, value) in &rows {
        md.push_str(&format!("| {what} | {value} |\n"));
        eprintln!("SUMMARY {what}: {value}");
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/backup-results.md");
    std::fs::write(path, md).expect("write bench/backup-results.md");
}
