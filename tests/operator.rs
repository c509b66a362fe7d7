//! Operator controls against a real cluster: credentials on operator
//! endpoints, maintenance mode, planned switchover under write load,
//! concurrent switchover requests, and the graceful handover a leader makes
//! on SIGTERM (a platform's rolling deploy). Judged by the data a writer got
//! acknowledged, as in the failover tests.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{
    create_writes_table, pgha, serial, stored_seqs, wait_until, Cluster, Node, Options, Timing,
    Writer, WriterLog,
};

const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(90);
const WRITE_EVERY: Duration = Duration::from_millis(20);
const TOKEN: &str = "operator-s3cret";

fn fast() -> Options {
    Options {
        timing: Timing::FAST,
        ..Options::default()
    }
}

/// One HTTP/1.1 request with an optional JSON body and bearer token.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(130))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Sends `request` as it is and returns the status and whether the answer
/// closes the connection.
fn raw_request(addr: SocketAddr, request: &str) -> (u16, bool) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).expect("send");
    let mut answer = Vec::new();
    // The server closes after a framing error or our `Connection: close`;
    // a timeout here means it kept the connection open.
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line for {request:?}: {text:?}"));
    (status, text.contains("\r\nconnection: close\r\n"))
}

/// What an operator request could have changed.
#[derive(Debug, PartialEq)]
struct Observed {
    leader: Option<String>,
    history: usize,
    postmaster_started: Vec<(String, String)>,
    config: serde_json::Value,
}

fn observe(cluster: &mut Cluster, primary: &str) -> Observed {
    let view = cluster.view().expect("cluster view");
    let node = cluster.node(primary);
    Observed {
        leader: view.leader.clone(),
        history: node
            .get_json("/history")
            .and_then(|h| h.as_array().map(Vec::len))
            .expect("history"),
        postmaster_started: cluster
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.query("select pg_postmaster_start_time()")))
            .collect(),
        config: node.get_json("/config").expect("config"),
    }
}

/// Issue 18: every malformed or ambiguous operator request is refused with
/// its status, and nothing happens; then one valid request acts, to show
/// the observation would have seen it.
fn malformed_requests_change_nothing(cluster: &mut Cluster, primary: &str, guarded: &str) {
    let replica = replica_names(cluster, primary)
        .into_iter()
        .find(|r| r != guarded)
        .expect("an open replica");
    let api = cluster.node(primary).api_addr();
    let (p, r, g) = (primary, replica.as_str(), guarded);
    let with_length = |method: &str, path: &str, body: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let chunked = |path: &str, body: &str| {
        let chunk = if body.is_empty() {
            String::new()
        } else {
            format!("{:x}\r\n{body}\r\n", body.len())
        };
        format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}0\r\n\r\n"
        )
    };
    let valid = format!(r#"{{"leader":"{p}","candidate":"{r}"}}"#);
    let post = |path: &str, body: &str| with_length("POST", path, body);
    // (what, request, status, the server must close the connection: a
    // framing error)
    let table: Vec<(&str, String, u16, bool)> = vec![
        ("switchover, no body", "POST /switchover HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".into(), 411, false),
        ("switchover, empty body", post("/switchover", ""), 400, false),
        ("switchover, empty chunked body", chunked("/switchover", ""), 400, true),
        ("switchover, {}", post("/switchover", "{}"), 400, false),
        ("switchover, null", post("/switchover", "null"), 400, false),
        ("switchover, not JSON", post("/switchover", "{leader"), 400, false),
        ("switchover, candidate only", post("/switchover", &format!(r#"{{"candidate":"{r}"}}"#)), 400, false),
        ("switchover, a replica as leader", post("/switchover", &format!(r#"{{"leader":"{r}","candidate":"{g}"}}"#)), 412, false),
        ("switchover, an unknown leader", post("/switchover", r#"{"leader":"nobody"}"#), 412, false),
        ("switchover, leader a number", post("/switchover", r#"{"leader":1}"#), 400, false),
        ("switchover, leader empty", post("/switchover", r#"{"leader":""}"#), 400, false),
        ("switchover, candidate = leader", post("/switchover", &format!(r#"{{"leader":"{p}","candidate":"{p}"}}"#)), 400, false),
        ("switchover, misspelt candidate", post("/switchover", &format!(r#"{{"leader":"{p}","cnadidate":"{r}"}}"#)), 400, false),
        ("switchover, unknown candidate", post("/switchover", &format!(r#"{{"leader":"{p}","candidate":"ghost"}}"#)), 412, false),
        ("switchover, scheduled_at not a time", post("/switchover", &format!(r#"{{"leader":"{p}","scheduled_at":"tomorrow"}}"#)), 400, false),
        ("switchover, scheduled_at in the past", post("/switchover", &format!(r#"{{"leader":"{p}","scheduled_at":"2001-01-01T00:00:00Z"}}"#)), 422, false),
        ("switchover, valid body chunked", chunked("/switchover", &valid), 400, true),
        ("switchover, Transfer-Encoding and Content-Length",
            format!("POST /switchover HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: {}\r\n\r\n{:x}\r\n{valid}\r\n0\r\n\r\n", valid.len(), valid.len()), 400, true),
        ("switchover, Content-Length and Transfer-Encoding",
            format!("POST /switchover HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{valid}\r\n0\r\n\r\n", valid.len(), valid.len()), 400, true),
        ("switchover, conflicting Content-Length",
            format!("POST /switchover HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nContent-Length: 2\r\n\r\n{valid}", valid.len()), 400, true),
        ("switchover, Content-Length list",
            format!("POST /switchover HTTP/1.1\r\nHost: t\r\nContent-Length: {0}, {0}\r\n\r\n{valid}", valid.len()), 400, true),
        ("switchover, Content-Length not a number",
            format!("POST /switchover HTTP/1.1\r\nHost: t\r\nContent-Length: x{}\r\n\r\n{valid}", valid.len()), 400, true),
        ("failover, no body", "POST /failover HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".into(), 411, false),
        ("failover, {}", post("/failover", "{}"), 400, false),
        ("failover, force a string", post("/failover", &format!(r#"{{"candidate":"{r}","force":"yes"}}"#)), 400, false),
        ("failover, unknown candidate", post("/failover", r#"{"candidate":"ghost"}"#), 412, false),
        ("failover, a replica as leader", post("/failover", &format!(r#"{{"leader":"{g}","candidate":"{r}"}}"#)), 412, false),
        ("failover, scheduled", post("/failover", &format!(r#"{{"candidate":"{r}","scheduled_at":"2030-01-01T00:00:00Z"}}"#)), 400, false),
        ("restart, unknown role", post("/restart", r#"{"role":"no-such-role"}"#), 400, false),
        ("restart, role a number", post("/restart", r#"{"role":1}"#), 400, false),
        ("restart, the other role", post("/restart", r#"{"role":"replica"}"#), 503, false),
        ("restart, restart_pending a string", post("/restart", r#"{"restart_pending":"true"}"#), 400, false),
        ("restart, unsupported condition", post("/restart", r#"{"postgres_version":"99"}"#), 400, false),
        ("restart, schedule", post("/restart", r#"{"schedule":"2030-01-01T00:00:00Z"}"#), 422, false),
        ("restart, an array", post("/restart", "[]"), 400, false),
        ("restart, chunked {}", chunked("/restart", "{}"), 400, true),
        ("reinitialize, unknown field", post("/reinitialize", r#"{"from_leader":true}"#), 400, false),
        ("reload, unknown field", post("/reload", r#"{"now":true}"#), 400, false),
        ("pause, an array", post("/pause", "[]"), 400, false),
        ("resume, unknown field", post("/resume", r#"{"paused":false}"#), 400, false),
        ("PATCH /config, no body", "PATCH /config HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".into(), 411, false),
        ("PATCH /config, empty body", with_length("PATCH", "/config", ""), 400, false),
        ("PATCH /config, unknown setting", with_length("PATCH", "/config", r#"{"bogus":1}"#), 400, false),
        ("PATCH /config, wrong type", with_length("PATCH", "/config", r#"{"paused":"yes"}"#), 400, false),
        ("PUT /config, unknown setting", with_length("PUT", "/config", r#"{"nope":true}"#), 400, false),
        ("DELETE /switchover with a body", with_length("DELETE", "/switchover", r#"{"leader":"x"}"#), 400, true),
        ("GET /cluster with a body", with_length("GET", "/cluster", "hello"), 400, true),
    ];
    assert!(table.len() >= 30);
    let before = observe(cluster, primary);
    for (what, request, status, closes) in &table {
        let (got, closed) = raw_request(api, request);
        assert_eq!(got, *status, "{what}: {request:?}");
        assert!(closed || !closes, "{what}: Connection: close expected");
        assert_eq!(
            observe(cluster, primary),
            before,
            "{what} changed something"
        );
    }
    // Nothing pending either: no switchover key was written.
    let cluster_doc = cluster.node(primary).get_json("/cluster").expect("cluster");
    assert!(
        cluster_doc["scheduled_switchover"].is_null(),
        "{cluster_doc}"
    );

    // A valid request acts, and the observation sees it.
    let (got, _) = raw_request(api, &post("/restart", r#"{"role":"primary"}"#));
    assert_eq!(got, 200, "a valid restart");
    cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    let after = observe(cluster, primary);
    assert_eq!(after.leader, before.leader);
    assert_ne!(
        after.postmaster_started, before.postmaster_started,
        "the restart was not observed"
    );
}

/// Restarts `name` with an API token in its config (other nodes keep none).
fn require_token(cluster: &mut Cluster, name: &str) {
    let node = cluster.node_mut(name);
    node.sigterm();
    let text = std::fs::read_to_string(&node.config).expect("config");
    let text = text.replacen("[api]\n", &format!("[api]\ntoken = \"{TOKEN}\"\n"), 1);
    std::fs::write(&node.config, text).expect("write config");
    node.restart();
}

fn healthy(cluster: &mut Cluster) -> String {
    let view = cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    view.primaries()[0].name.clone()
}

fn replica_names(cluster: &mut Cluster, primary: &str) -> Vec<String> {
    cluster
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .filter(|n| n != primary)
        .collect()
}

fn start_writer(cluster: &Cluster) -> Writer {
    let writer = Writer::multi_host("app", &cluster.pg_ports(), WRITE_EVERY);
    wait_until("25 acknowledged writes", Duration::from_secs(20), || {
        (writer.log().acked_count() >= 25).then_some(())
    });
    writer
}

/// Stops the writer and returns its log and the acknowledged writes that
/// `primary` does not have.
fn settle(writer: Writer, primary: &Node) -> (WriterLog, Vec<i64>) {
    let log = writer.stop();
    let stored = stored_seqs(primary.pg_port, &log.writer).expect("read back the rows");
    let lost = log.lost(&stored);
    (log, lost)
}

/// Longest time between two acknowledged writes.
fn longest_gap(log: &WriterLog) -> Duration {
    let mut at: Vec<Instant> = log.acked().map(|(_, a)| a.at).collect();
    at.sort();
    at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
}

#[test]
fn operator_endpoints_need_credentials_and_pause_stops_automatic_actions() {
    let _serial = serial();
    let mut cluster = Cluster::start(3, fast());
    let primary = healthy(&mut cluster);
    let guarded = replica_names(&mut cluster, &primary)[0].clone();
    require_token(&mut cluster, &guarded);
    cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    let api = cluster.node(&guarded).api_addr();
    malformed_requests_change_nothing(&mut cluster, &primary, &guarded);

    assert_eq!(
        http(api, "POST", "/pause", "", None).0,
        401,
        "no credentials"
    );
    assert_eq!(
        http(api, "POST", "/pause", "", Some("wrong")).0,
        401,
        "wrong token"
    );
    let config = cluster.node(&primary).get_json("/config").expect("config");
    assert_eq!(config["paused"], false, "a refused request changed nothing");
    let (status, body) = http(api, "POST", "/pause", "", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    wait_until(
        "every node to see the pause",
        Duration::from_secs(10),
        || {
            cluster
                .nodes
                .iter()
                .all(|n| n.get_json("/config").is_some_and(|c| c["paused"] == true))
                .then_some(())
        },
    );
    // Without configured credentials, loopback clients may act.
    let open = cluster.node(&primary).api_addr();
    assert_eq!(http(open, "POST", "/reload", "", None).0, 200);
    assert_eq!(
        http(open, "PATCH", "/config", r#"{"bogus": 1}"#, None).0,
        400,
        "unknown setting"
    );
    assert_eq!(
        http(open, "PATCH", "/config", "{not json", None).0,
        400,
        "malformed JSON"
    );

    // Paused: the primary's Postgres dies, and nothing happens.
    let pid = cluster.node(&primary).postmaster_pid().expect("postmaster");
    common::kill_postmaster(&cluster.node(&primary).data_dir);
    wait_until("the postmaster to be gone", Duration::from_secs(10), || {
        (!common::process_alive(pid)).then_some(())
    });
    let quiet_until = Instant::now() + Duration::from_secs(3 * Timing::FAST.ttl_s);
    while Instant::now() < quiet_until {
        let view = cluster.view().expect("cluster view");
        assert_eq!(
            view.leader.as_deref(),
            Some(primary.as_str()),
            "leadership moved while paused"
        );
        assert!(
            cluster.node(&primary).postmaster_pid().is_none(),
            "postgres was restarted while paused"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let (status, body) = http(api, "POST", "/resume", "", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    let view = cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    assert_eq!(
        view.primaries()[0].name,
        primary,
        "after resume the leader restarts its own postgres"
    );
}

#[test]
fn switchover_under_load_loses_nothing_and_the_old_primary_follows_without_rewind() {
    let _serial = serial();
    let mut cluster = Cluster::start(3, fast());
    let old = healthy(&mut cluster);
    create_writes_table(cluster.node(&old));
    let target = replica_names(&mut cluster, &old)[1].clone();
    let writer = start_writer(&cluster);

    // The leader judges its candidate from published statuses: wait until
    // they show the target caught up (a WAL segment switch right after
    // bootstrap can make a just-cloned replica look far behind).
    wait_until(
        &format!("{old} to see {target} caught up"),
        Duration::from_secs(30),
        || {
            let view = cluster.node(&old).cluster_view()?;
            let lag = view.member(&target)?.replay_lag_bytes?;
            (lag < 1024 * 1024).then_some(())
        },
    );
    let api = cluster.node(&old).api_addr();
    let asked = Instant::now();
    let (status, body) = http(
        api,
        "POST",
        "/switchover",
        &format!(r#"{{"leader":"{old}","candidate":"{target}"}}"#),
        None,
    );
    let took = asked.elapsed();
    assert_eq!(status, 200, "{body}");
    let view = cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    assert_eq!(view.primaries()[0].name, target, "{view:#?}");
    writer.wait_for_ack_after(Instant::now(), Duration::from_secs(10));

    let (log, lost) = settle(writer, cluster.node(&target));
    assert!(
        lost.is_empty(),
        "acknowledged writes lost in a switchover: {lost:?}"
    );
    let old_log = cluster.node(&old).current_run_log();
    assert!(
        !old_log.contains("action=rewind"),
        "the old primary needed a rewind"
    );
    assert!(old_log.contains(&format!("action=start replica of {target}")));
    let history = cluster.node(&target).get_json("/history").expect("history");
    let last = history.as_array().and_then(|h| h.last()).expect("entry");
    assert_eq!(last["kind"], "switchover");
    assert_eq!(last["old_leader"], old.as_str());
    assert_eq!(last["new_leader"], target.as_str());
    eprintln!(
        "SUMMARY switchover: request answered after {} ms, longest write gap {} ms, {} writes acked, {} lost",
        took.as_millis(),
        longest_gap(&log).as_millis(),
        log.acked_count(),
        lost.len()
    );
}

#[test]
fn of_two_concurrent_switchover_requests_exactly_one_runs() {
    let _serial = serial();
    let mut cluster = Cluster::start(3, fast());
    let old = healthy(&mut cluster);
    let replicas = replica_names(&mut cluster, &old);
    // Each node judges a candidate from the member keys it last read.
    for r in &replicas {
        wait_until(
            &format!("{r} to see both replicas streaming"),
            Duration::from_secs(20),
            || {
                let view = cluster.node(r).cluster_view()?;
                (view.streaming_replicas().len() == 2).then_some(())
            },
        );
    }
    let requests: Vec<(SocketAddr, String)> = replicas
        .iter()
        .map(|r| {
            (
                cluster.node(r).api_addr(),
                format!(r#"{{"leader":"{old}","candidate":"{r}"}}"#),
            )
        })
        .collect();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(requests.len()));
    let answers: Vec<(u16, String)> = requests
        .into_iter()
        .map(|(api, body)| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                http(api, "POST", "/switchover", &body, None)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("request thread"))
        .collect();
    // The loser finds the winner's request pending (409), or the cluster
    // already changing under it (412): either way it does not run.
    let mut statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    statuses.sort();
    assert!(
        statuses == [200, 409] || statuses == [200, 412],
        "{answers:?}"
    );
    let view = cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    assert_ne!(view.primaries()[0].name, old);
    let history = cluster
        .node(&view.primaries()[0].name)
        .get_json("/history")
        .expect("history");
    assert_eq!(
        history.as_array().map(Vec::len),
        Some(1),
        "exactly one switchover ran: {history}"
    );
}

#[test]
fn sigterm_on_the_primary_hands_over_then_exits_and_a_rolling_restart_loses_nothing() {
    let _serial = serial();
    let mut cluster = Cluster::start(3, fast());
    let first = healthy(&mut cluster);
    create_writes_table(cluster.node(&first));
    let writer = start_writer(&cluster);

    // The primary first: it must hand over before it exits.
    let stopping = Instant::now();
    let status = cluster.node_mut(&first).sigterm();
    let took = stopping.elapsed();
    assert!(status.success(), "{first} exited with {status}");
    assert!(
        took < Duration::from_secs(45),
        "graceful stop took {took:?}, over shutdown_timeout"
    );
    let log = cluster.node(&first).current_run_log();
    assert!(
        log.contains("handing leadership over first"),
        "no handover in {first}'s log"
    );
    let view = cluster.wait_for(
        "a new leader while the old one is down",
        Duration::from_secs(20),
        |v| v.leader.as_ref().is_some_and(|l| *l != first),
    );
    let second = view.leader.clone().expect("leader");
    eprintln!(
        "SUMMARY sigterm on primary: agent exited after {} ms, {second} leads",
        took.as_millis()
    );
    cluster.node_mut(&first).restart();
    cluster.wait_healthy(BOOTSTRAP_TIMEOUT);

    // Then every node once more, one after another, as a rolling deploy does.
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    for name in names {
        let step = Instant::now();
        let status = cluster.node_mut(&name).sigterm();
        assert!(status.success(), "{name} exited with {status}");
        cluster.node_mut(&name).restart();
        cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
        eprintln!(
            "SUMMARY rolling restart: {name} back after {} ms",
            step.elapsed().as_millis()
        );
    }
    writer.wait_for_ack_after(Instant::now(), Duration::from_secs(10));
    let primary = cluster.wait_healthy(BOOTSTRAP_TIMEOUT).primaries()[0]
        .name
        .clone();
    let (log, lost) = settle(writer, cluster.node(&primary));
    assert!(
        lost.is_empty(),
        "acknowledged writes lost across the rolling restart: {lost:?}"
    );
    eprintln!(
        "SUMMARY rolling restart: longest write gap {} ms, {} writes acked, {} lost",
        longest_gap(&log).as_millis(),
        log.acked_count(),
        lost.len()
    );
}

#[test]
fn cluster_wide_parameters_reload_everywhere_and_restart_only_when_pending() {
    let _serial = serial();
    let mut cluster = Cluster::start(3, fast());
    let primary = healthy(&mut cluster);
    let api = cluster.node(&primary).api_url();
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();

    // A reloadable parameter reaches every member without a restart.
    let started: Vec<String> = names
        .iter()
        .map(|n| cluster.node(n).query("SELECT pg_postmaster_start_time()"))
        .collect();
    let (code, out, err) = pgha(
        &["config", "set", "parameters.work_mem=7MB", "--api", &api],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    for n in &names {
        wait_until(
            &format!("{n}: work_mem 7MB"),
            Duration::from_secs(15),
            || (cluster.node(n).query("SHOW work_mem") == "7MB").then_some(()),
        );
    }
    // A parameter pgha manages is refused and changes nothing.
    let (code, out, err) = pgha(
        &[
            "config",
            "set",
            "parameters.wal_level=minimal",
            "--api",
            &api,
        ],
        &[],
    );
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        format!("{out}{err}").contains("parameters.wal_level"),
        "{out}{err}"
    );

    // One that needs a restart is pending until `restart --pending`.
    let (code, out, err) = pgha(
        &[
            "config",
            "set",
            "parameters.max_locks_per_transaction=128",
            "--api",
            &api,
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    let list = wait_until(
        "pgha list to show pending restarts",
        Duration::from_secs(15),
        || {
            let (_, list, _) = pgha(&["list", "--api", &api], &[]);
            (list.contains("Pending restart") && list.matches('*').count() == 3).then_some(list)
        },
    );
    let replica = names
        .iter()
        .find(|n| **n != primary)
        .expect("a replica")
        .clone();
    let (code, out, err) = pgha(&["restart", &replica, "--pending", "--api", &api], &[]);
    assert_eq!(code, 0, "{out}{err}\n{list}");
    wait_until(
        &format!("{replica}: max_locks_per_transaction 128"),
        Duration::from_secs(30),
        || {
            (cluster
                .node(&replica)
                .psql("SHOW max_locks_per_transaction")
                .ok()?
                == "128")
                .then_some(())
        },
    );
    // Nothing pending on it any more: --pending does nothing.
    wait_until(
        "the restarted replica to clear its flag",
        Duration::from_secs(15),
        || {
            let v = cluster.node(&replica).get_json("/status")?;
            (v["pending_restart"] == false).then_some(())
        },
    );
    let before = cluster
        .node(&replica)
        .query("SELECT pg_postmaster_start_time()");
    // 409 while the agent still winds up the restart job that answered us.
    let (code, out, err) = wait_until(
        "a second restart --pending",
        Duration::from_secs(10),
        || {
            let r = pgha(&["restart", &replica, "--pending", "--api", &api], &[]);
            (!format!("{}{}", r.1, r.2).contains("409")).then_some(r)
        },
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        format!("{out}{err}").contains("no restart pending"),
        "{out}{err}"
    );
    assert_eq!(
        cluster
            .node(&replica)
            .query("SELECT pg_postmaster_start_time()"),
        before
    );
    // The others were not restarted by any of this.
    for (n, t) in names.iter().zip(&started) {
        if *n != replica {
            assert_eq!(
                &cluster.node(n).query("SELECT pg_postmaster_start_time()"),
                t,
                "{n}"
            );
        }
    }

    // `config edit` through an editor script; a broken edit changes nothing.
    let dir = std::env::temp_dir().join(format!("pgha-edit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pause = dir.join("pause.sh");
    std::fs::write(
        &pause,
        "#!/bin/sh\nsed -i 's/\"paused\": false/\"paused\": true/' \"$1\"\n",
    )
    .unwrap();
    let broken = dir.join("broken.sh");
    std::fs::write(&broken, "#!/bin/sh\necho '{ not json' > \"$1\"\n").unwrap();
    for s in [&pause, &broken] {
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(s)
            .status()
            .unwrap();
    }
    let (code, out, err) = pgha(
        &["config", "edit", "--api", &api],
        &[("EDITOR", broken.to_str().unwrap()), ("VISUAL", "")],
    );
    assert_eq!(code, 2, "{out}{err}");
    assert_eq!(
        cluster.node(&primary).get_json("/config").unwrap()["paused"],
        false
    );
    let (code, out, err) = pgha(
        &["config", "edit", "--api", &api],
        &[("VISUAL", pause.to_str().unwrap())],
    );
    assert_eq!(code, 0, "{out}{err}");
    let config = wait_until("the edit to reach the API", Duration::from_secs(10), || {
        let c = cluster.node(&primary).get_json("/config")?;
        (c["paused"] == true).then_some(c)
    });
    assert_eq!(
        config["parameters"]["work_mem"], "7MB",
        "the rest is kept: {config}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
