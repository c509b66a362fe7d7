//! The HTTP API as its clients see it. First a server on a hand-made
//! snapshot (keep-alive, limits, malformed input, IPv4 + IPv6, arbitrary
//! bytes); then real clusters (etcd + three agents with Postgres 15): every
//! health check against each node's real role, replay lag, `promtool` on real
//! metrics; and across a SIGKILL, a switchover and a SIGINT handover, a
//! 20 ms probe of every node's `/primary` and `/replica` against
//! `pg_is_in_recovery()`, and HAProxy's two ports counting connections
//! that reach the wrong role.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgha::api::Limits;
use pgha::dcs::HistoryEntry;
use pgha::ha::{DynamicConfig, Lsn, MemberStatus};
use pgha::snapshot::{LoopHistogram, Snapshot};
use proptest::prelude::*;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use common::proxy::{haproxy, where_am_i, HaProxy, Landing, ProxyClients};
use common::{free_port, psql, serial, wait_until, Cluster, Node, Options, Timing};

// ---------------------------------------------------------------------------
// A small HTTP/1.1 client that shows exactly what went over the wire
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response (status line, headers, `content-length` body).
fn read_answer(reader: &mut BufReader<TcpStream>, head_request: bool) -> std::io::Result<Answer> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    let mut parts = line.trim_end().splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts.next().and_then(|s| s.parse().ok());
    let (true, Some(status)) = (version == "HTTP/1.1", status) else {
        return Err(bad(format!("bad status line {line:?}")));
    };
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header {l:?}")))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut answer = Answer {
        status,
        headers,
        body: Vec::new(),
    };
    let len: usize = answer
        .header("content-length")
        .map_or(Ok(0), str::parse)
        .map_err(|e| bad(format!("{e}")))?;
    if !head_request {
        answer.body.resize(len, 0);
        reader.read_exact(&mut answer.body)?;
    }
    Ok(answer)
}

/// One keep-alive connection.
struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Conn {
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, raw: &[u8]) {
        self.reader.get_mut().write_all(raw).expect("send");
    }

    fn ask(&mut self, method: &str, target: &str) -> Answer {
        self.send(format!("{method} {target} HTTP/1.1\r\nHost: pgha\r\n\r\n").as_bytes());
        read_answer(&mut self.reader, method == "HEAD")
            .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
    }

    /// True when the server closed the connection (EOF) within the read timeout.
    fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(self.reader.read(&mut buf), Ok(0))
    }
}

/// One request on a fresh connection.
fn ask(addr: SocketAddr, method: &str, target: &str) -> Answer {
    Conn::open(addr).ask(method, target)
}

fn try_ask(addr: SocketAddr, method: &str, target: &str) -> Option<Answer> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let mut reader = BufReader::new(stream);
    let raw = format!("{method} {target} HTTP/1.1\r\nHost: pgha\r\nConnection: close\r\n\r\n");
    reader.get_mut().write_all(raw.as_bytes()).ok()?;
    read_answer(&mut reader, method == "HEAD").ok()
}

// ---------------------------------------------------------------------------
// A server on a hand-made snapshot
// ---------------------------------------------------------------------------

fn member(name: &str, role: &str, state: &str, wal: u64) -> MemberStatus {
    let replica = role == "replica";
    serde_json::from_value(json!({
        "name": name, "role": role, "state": state, "timeline": 1,
        "wal_position": wal, "receive_lsn": replica.then_some(wal), "replay_lsn": replica.then_some(wal),
        "pg_host": "127.0.0.1", "pg_port": 5432, "api_url": format!("http://{name}:8008"),
        "updated_at_ms": 0, "version": env!("CARGO_PKG_VERSION"),
    }))
    .expect("member status")
}

/// A healthy three-member cluster as its leader n1 sees it.
fn leader_snapshot() -> Snapshot {
    let members = vec![
        member("n1", "primary", "running", 50_000),
        member("n2", "replica", "streaming", 50_000),
        member("n3", "replica", "streaming", 40_000),
    ];
    let mut loop_durations = LoopHistogram::default();
    for ms in [2, 4, 20, 700] {
        loop_durations.observe(Duration::from_millis(ms));
    }
    Snapshot {
        taken_at: Instant::now(),
        scope: "batman".into(),
        me: members[0].clone(),
        leader: Some("n1".into()),
        leader_revision: Some(7),
        members,
        history: vec![
            HistoryEntry {
                kind: "failover".into(),
                timeline: Some(2),
                lsn: Some(Lsn(100)),
                at_ms: 1,
                old_leader: Some("n3".into()),
                new_leader: "n1".into(),
                reason: "leader key expired".into(),
            },
            HistoryEntry {
                kind: "switchover".into(),
                timeline: Some(3),
                lsn: Some(Lsn(200)),
                at_ms: 2,
                old_leader: Some("n1".into()),
                new_leader: "n1".into(),
                reason: "operator".into(),
            },
        ],
        config: Some(DynamicConfig::default()),
        sync: None,
        sync_standbys: None,
        switchover: None,
        dcs_reachable: true,
        dcs_last_seen: Some(Instant::now()),
        lease_remaining: Some(Duration::from_secs(3600)),
        fencing_remaining: Some(Duration::from_secs(3600)),
        pending_restart: true,
        paused: false,
        promotions: 1,
        loop_durations,
        last_error: None,
        route: None,
        transition: None,
    }
}

/// `pgha::api` on its own runtime, on loopback port 0; stopped on drop.
struct TestServer {
    addrs: Vec<SocketAddr>,
    shutdown: CancellationToken,
    snapshots: watch::Sender<Arc<Snapshot>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestServer {
    fn start(listen: &[&str], snapshot: Snapshot, limits: Limits) -> TestServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listen: Vec<SocketAddr> = listen.iter().map(|a| a.parse().unwrap()).collect();
        let listeners = runtime
            .block_on(async { pgha::api::bind_all(&listen) })
            .expect("bind");
        let addrs = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let (tx, rx) = watch::channel(Arc::new(snapshot));
        let shutdown = CancellationToken::new();
        let ttl = Duration::from_secs(10);
        runtime.spawn(pgha::api::serve_on(
            listeners,
            rx,
            ttl,
            limits,
            shutdown.clone(),
        ));
        TestServer {
            addrs,
            shutdown,
            snapshots: tx,
            runtime: Some(runtime),
        }
    }

    fn on_loopback(limits: Limits) -> TestServer {
        TestServer::start(&["127.0.0.1:0"], leader_snapshot(), limits)
    }

    fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

#[test]
fn one_keep_alive_connection_carries_many_requests() {
    let server = TestServer::on_loopback(Limits::default());
    let mut conn = Conn::open(server.addr());
    for _ in 0..3 {
        let a = conn.ask("GET", "/health");
        assert_eq!(a.status, 200);
        assert_eq!(a.header("content-type"), Some("application/json"));
        assert_eq!(a.json()["name"], "n1");
        let a = conn.ask("HEAD", "/primary");
        assert_eq!(a.status, 200);
        let a = conn.ask("OPTIONS", "/replica");
        assert_eq!((a.status, a.body.len()), (503, 0));
        assert_eq!(a.header("allow"), Some("GET, HEAD, OPTIONS"));
        let a = conn.ask("GET", "/nope");
        assert_eq!(a.status, 404);
        assert_eq!(conn.ask("GET", "/metrics").status, 200);
    }
    conn.send(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(read_answer(&mut conn.reader, false).unwrap().status, 200);
    assert!(conn.closed(), "Connection: close is honoured");
}

#[test]
fn a_new_snapshot_is_served_at_once() {
    let server = TestServer::on_loopback(Limits::default());
    let mut conn = Conn::open(server.addr());
    assert_eq!(conn.ask("GET", "/primary").status, 200);
    let mut demoted = leader_snapshot();
    demoted.me = member("n1", "replica", "streaming", 50_000);
    demoted.leader = Some("n2".into());
    demoted.lease_remaining = None;
    demoted.fencing_remaining = None;
    server.snapshots.send_replace(Arc::new(demoted));
    assert_eq!(conn.ask("GET", "/primary").status, 503);
    assert_eq!(conn.ask("GET", "/replica").status, 200);
    assert_eq!(conn.ask("GET", "/status").json()["cluster_leader"], "n2");
}

#[test]
fn errors_have_the_right_status_and_say_why() {
    let server = TestServer::on_loopback(Limits::default());
    let addr = server.addr();
    let a = ask(addr, "GET", "/no/such/path");
    assert_eq!(a.status, 404);
    assert!(a.json()["error"]
        .as_str()
        .unwrap()
        .contains("/no/such/path"));
    for method in ["POST", "PUT", "DELETE", "PATCH", "BREW"] {
        let a = ask(addr, method, "/primary");
        assert_eq!(a.status, 405, "{method}");
        assert_eq!(a.header("allow"), Some("GET, HEAD, OPTIONS"), "{method}");
    }
    let a = ask(addr, "GET", "/replica?lag=lots");
    assert_eq!(a.status, 400);
    assert!(
        a.json()["error"].as_str().unwrap().starts_with("lag:"),
        "{}",
        a.text()
    );
    assert_eq!(ask(addr, "GET", "/replica?lag=%G0").status, 400);
    assert_eq!(
        ask(addr, "GET", "/config").json()["maximum_lag_on_failover"],
        1 << 20
    );
    assert_eq!(ask(addr, "GET", "/history").json()[1]["kind"], "switchover");
    assert_eq!(
        ask(addr, "GET", "/cluster").json()["members"][2]["lag_bytes"],
        10_000
    );
}

#[test]
fn a_body_over_64_kib_is_refused_with_413_a_chunked_or_get_body_with_400_and_a_small_one_is_read() {
    let server = TestServer::on_loopback(Limits::default());
    // Declared too large: refused before any of it is read.
    let mut conn = Conn::open(server.addr());
    conn.send(b"POST /primary HTTP/1.1\r\nHost: x\r\nContent-Length: 65537\r\n\r\n");
    let a = read_answer(&mut conn.reader, false).unwrap();
    assert_eq!(a.status, 413);
    assert_eq!(a.header("connection"), Some("close"));
    assert!(conn.closed());

    // Chunked: refused whatever its size (issue 18: a framing a proxy in
    // front could read differently), before any of it is read.
    let mut conn = Conn::open(server.addr());
    conn.send(b"POST /primary HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    let a = read_answer(&mut conn.reader, false).unwrap();
    assert_eq!(a.status, 400);
    assert_eq!(a.header("connection"), Some("close"));
    assert!(conn.closed());

    // A GET takes no body at all.
    let mut conn = Conn::open(server.addr());
    conn.send(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello");
    let a = read_answer(&mut conn.reader, false).unwrap();
    assert_eq!(a.status, 400);
    assert!(conn.closed());

    // A body within the limit is read, and the connection goes on.
    let mut conn = Conn::open(server.addr());
    conn.send(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(read_answer(&mut conn.reader, false).unwrap().status, 405);
    assert_eq!(conn.ask("GET", "/health").status, 200);
}

#[test]
fn connections_over_the_limit_get_503_and_are_closed() {
    let server = TestServer::on_loopback(Limits {
        max_connections: 4,
        ..Limits::default()
    });
    let mut held: Vec<Conn> = (0..4).map(|_| Conn::open(server.addr())).collect();
    for c in &mut held {
        assert_eq!(c.ask("GET", "/health").status, 200);
    }
    let mut extra = Conn::open(server.addr());
    let a = read_answer(&mut extra.reader, false).expect("an answer without asking");
    assert_eq!(a.status, 503);
    assert!(a.text().contains("too many open connections"));
    assert!(extra.closed());
    // The held connections still work; closing one frees a place.
    assert_eq!(held[0].ask("GET", "/health").status, 200);
    drop(held.pop());
    wait_until("a free connection slot", Duration::from_secs(5), || {
        try_ask(server.addr(), "GET", "/health").filter(|a| a.status == 200)
    });
}

#[test]
fn a_client_that_sends_no_complete_header_is_cut_off() {
    let server = TestServer::on_loopback(Limits {
        header_read_timeout: Duration::from_millis(300),
        ..Limits::default()
    });
    let started = Instant::now();
    let mut conn = Conn::open(server.addr());
    conn.send(b"GET /health HTTP/1.1\r\nHost: slowloris\r\n");
    let mut rest = Vec::new();
    let _ = conn.reader.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );
    // An idle keep-alive connection is closed the same way.
    let mut conn = Conn::open(server.addr());
    assert_eq!(conn.ask("GET", "/health").status, 200);
    let idle = Instant::now();
    assert!(conn.closed());
    assert!(idle.elapsed() < Duration::from_secs(3));
}

#[test]
fn an_ipv6_wildcard_serves_ipv4_and_ipv6_clients() {
    let server = TestServer::start(&["[::]:0"], leader_snapshot(), Limits::default());
    let port = server.addr().port();
    for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        let a = ask(addr.parse().unwrap(), "GET", "/primary");
        assert_eq!(a.status, 200, "{addr}");
    }
}

#[test]
fn ipv4_and_ipv6_listen_addresses_on_one_port_both_serve() {
    let port = free_port();
    let v4 = format!("127.0.0.1:{port}");
    let v6 = format!("[::1]:{port}");
    let server = TestServer::start(&[&v4, &v6], leader_snapshot(), Limits::default());
    assert_eq!(server.addrs.len(), 2);
    for addr in [v4, v6] {
        assert_eq!(
            ask(addr.parse().unwrap(), "GET", "/health").status,
            200,
            "{addr}"
        );
    }
}

/// Whatever a client sends, the server answers with a well-formed HTTP
/// response or closes without a word, and keeps serving others.
fn assert_well_formed_or_silent(raw: &[u8], server: &TestServer) -> Result<(), TestCaseError> {
    let mut stream = TcpStream::connect(server.addr()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = stream.write_all(raw);
    let _ = stream.shutdown(Shutdown::Write);
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    if !out.is_empty() {
        let text = String::from_utf8_lossy(&out);
        let status_line = text.split("\r\n").next().unwrap_or_default();
        let code = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse::<u16>().ok());
        prop_assert!(
            code.is_some_and(|c| (100..600).contains(&c)),
            "bad answer {text:?} to {raw:?}"
        );
        prop_assert!(text.contains("\r\n\r\n"), "no end of header in {text:?}");
    }
    Ok(())
}

fn arb_request() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        prop::sample::select(vec![
            "GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE", "TRACE", "CONNECT"
        ])
        .prop_map(String::from),
        "[A-Za-z]{1,12}",
    ];
    let path = prop_oneof![
        prop::sample::select(vec![
            "/",
            "/primary",
            "/replica",
            "/metrics",
            "/cluster",
            "/readiness",
            "*"
        ])
        .prop_map(String::from),
        "/[!-~]{0,60}",
    ];
    let query = prop::option::of("[ -~&&[^ ]]{0,40}");
    let headers = prop::collection::vec("[A-Za-z-]{1,12}: [ -~]{0,30}", 0..4);
    let body = prop::option::of(prop::collection::vec(any::<u8>(), 0..200));
    (method, path, query, headers, body).prop_map(|(m, p, q, h, b)| {
        let target = match q {
            Some(q) => format!("{p}?{q}"),
            None => p,
        };
        let mut raw = format!("{m} {target} HTTP/1.1\r\nHost: x\r\n");
        for line in h {
            raw.push_str(&line);
            raw.push_str("\r\n");
        }
        let mut raw = raw.into_bytes();
        match b {
            Some(body) => {
                raw.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
                raw.extend_from_slice(&body);
            }
            None => raw.extend_from_slice(b"\r\n"),
        }
        raw
    })
}

#[test]
fn arbitrary_requests_and_bytes_always_get_a_well_formed_answer() {
    let server = TestServer::on_loopback(Limits {
        header_read_timeout: Duration::from_secs(2),
        ..Limits::default()
    });
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 200,
        ..ProptestConfig::default()
    });
    runner
        .run(&arb_request(), |raw| {
            // A complete request always gets an answer.
            let mut stream = TcpStream::connect(server.addr()).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            stream.write_all(&raw).unwrap();
            let mut reader = BufReader::new(stream);
            let answer = read_answer(&mut reader, raw.starts_with(b"HEAD "));
            prop_assert!(
                answer.is_ok(),
                "{answer:?} for {:?}",
                String::from_utf8_lossy(&raw)
            );
            let status = answer.unwrap().status;
            prop_assert!(
                [200, 400, 404, 405, 413, 414, 431, 501, 503].contains(&status),
                "{status} for {:?}",
                String::from_utf8_lossy(&raw)
            );
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    runner
        .run(&prop::collection::vec(any::<u8>(), 0..600), |raw| {
            assert_well_formed_or_silent(&raw, &server)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    runner
        .run(
            &arb_request().prop_flat_map(|r| {
                let n = r.len();
                (Just(r), 0..n)
            }),
            |(raw, cut)| assert_well_formed_or_silent(&raw[..cut], &server),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ask(server.addr(), "GET", "/health").status,
        200,
        "still serving"
    );
}

// ---------------------------------------------------------------------------
// Metrics format, the shipped HAProxy config and Grafana dashboard
// ---------------------------------------------------------------------------

/// `promtool`, or `None` after saying loudly that the check is skipped.
fn promtool() -> Option<PathBuf> {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if matches!(found, Ok(s) if s.success()) {
        return Some(PathBuf::from("promtool"));
    }
    eprintln!("\n!!!!! promtool not found: SKIPPING the Prometheus format check (apt-get install prometheus; scripts/test installs it) !!!!!\n");
    None
}

/// Runs `promtool check metrics` on `text`; panics with its complaints.
fn assert_promtool_accepts(text: &str, source: &str) {
    let Some(promtool) = promtool() else { return };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "promtool on {source}:\n{complaints}\n---\n{text}"
    );
}

#[test]
fn metrics_pass_promtool() {
    let server = TestServer::on_loopback(Limits::default());
    let a = ask(server.addr(), "GET", "/metrics");
    assert_eq!(a.status, 200);
    assert_eq!(
        a.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = a.text();
    assert!(
        text.contains("pgha_switchovers_total{scope=\"batman\",name=\"n1\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("pgha_pending_restart{scope=\"batman\",name=\"n1\"} 1\n"),
        "{text}"
    );
    assert_promtool_accepts(&text, "a hand-made snapshot");
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn the_shipped_haproxy_config_is_valid() {
    let Some(haproxy) = haproxy() else { return };
    let out = Command::new(haproxy)
        .arg("-c")
        .arg("-f")
        .arg(repo_file("config/haproxy.cfg"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_grafana_dashboard_graphs_only_metrics_we_export() {
    let text = fs::read_to_string(repo_file("config/grafana/pgha-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("template variables");
    assert!(
        vars.iter().any(|v| v["name"] == "scope"),
        "templated on scope"
    );
    let server = TestServer::on_loopback(Limits::default());
    let metrics = ask(server.addr(), "GET", "/metrics").text();
    let families: BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            assert!(
                expr.contains("scope=~\"$scope\"") || expr.contains("scope=\"$scope\""),
                "{expr}"
            );
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("pgha_") {
                    let family = ["_bucket", "_sum", "_count"]
                        .iter()
                        .fold(word, |w, s| w.strip_suffix(s).unwrap_or(w));
                    assert!(
                        families.contains(family),
                        "{word} in {expr} is not exported"
                    );
                    used.insert(family.to_string());
                }
            }
        }
    }
    for needed in [
        "pgha_primary",
        "pgha_replication_lag_bytes",
        "pgha_leader_lease_remaining_seconds",
        "pgha_failovers_total",
    ] {
        assert!(used.contains(needed), "the dashboard graphs {needed}");
    }
}

// ---------------------------------------------------------------------------
// Real clusters
// ---------------------------------------------------------------------------

const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(120);

/// Status code of `method path` on `node`, or 0 when it does not answer.
fn code(node: &Node, method: &str, target: &str) -> u16 {
    try_ask(node.api_addr(), method, target).map_or(0, |a| a.status)
}

/// Polls until `method target` on `node` answers `want`.
fn wait_code(node: &Node, target: &str, want: u16, timeout: Duration) {
    let mut last = 0;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        last = code(node, "GET", target);
        if last == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = try_ask(node.api_addr(), "GET", "/status").map(|a| a.text());
    panic!(
        "{}: GET {target} answered {last}, not {want}, for {timeout:?}; /status: {status:?}",
        node.name
    );
}

const ON_PRIMARY: &[(&str, u16)] = &[
    ("/", 200),
    ("/primary", 200),
    ("/read-write", 200),
    ("/master", 200),
    ("/leader", 200),
    ("/standby-leader", 503),
    ("/replica", 503),
    ("/replica?lag=1GB", 503),
    ("/read-only", 200),
    ("/sync", 503),
    ("/synchronous", 503),
    ("/async", 503),
    ("/asynchronous", 503),
    ("/health", 200),
    ("/liveness", 200),
    ("/readiness", 200),
    ("/status", 200),
    ("/patroni", 200),
    ("/cluster", 200),
    ("/history", 200),
    ("/config", 200),
    ("/metrics", 200),
];

const ON_REPLICA: &[(&str, u16)] = &[
    ("/", 503),
    ("/primary", 503),
    ("/read-write", 503),
    ("/master", 503),
    ("/leader", 503),
    ("/standby-leader", 503),
    ("/replica", 200),
    ("/replica?replication_state=streaming", 200),
    ("/replica?lag=16MB", 200),
    ("/replica?tag_nosuchtag=x", 503),
    ("/read-only", 200),
    ("/sync", 503),
    ("/synchronous", 503),
    ("/async", 200),
    ("/asynchronous", 200),
    ("/health", 200),
    ("/liveness", 200),
    ("/readiness", 200),
    ("/status", 200),
    ("/patroni", 200),
    ("/cluster", 200),
    ("/history", 200),
    ("/config", 200),
    ("/metrics", 200),
];

#[test]
fn health_checks_follow_each_nodes_real_role() {
    let _serial = serial();
    let mut cluster = Cluster::start(3, Options::default());
    let view = cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    let primary = view.primaries()[0].name.clone();
    let replicas: Vec<String> = view
        .streaming_replicas()
        .iter()
        .map(|m| m.name.clone())
        .collect();
    // /readiness of a replica depends on its lag: the last clone's backup
    // ends with a WAL segment switch on the primary, which the replicas'
    // member keys show a loop later. Wait for each node to see itself
    // within maximum_lag_on_failover (1 MiB) before checking the table.
    for node in &cluster.nodes {
        wait_until(
            &format!("{} within maximum_lag_on_failover", node.name),
            Duration::from_secs(15),
            || {
                let lag = node.get_json("/status")?["lag_bytes"].as_u64()?;
                (lag <= 1 << 20).then_some(())
            },
        );
    }

    for node in &cluster.nodes {
        let (expected, role) = if node.name == primary {
            (ON_PRIMARY, "primary")
        } else {
            (ON_REPLICA, "replica")
        };
        for (target, want) in expected {
            for method in ["GET", "HEAD", "OPTIONS"] {
                let a = try_ask(node.api_addr(), method, target)
                    .unwrap_or_else(|| panic!("{}: {method} {target}: no answer", node.name));
                assert_eq!(
                    a.status,
                    *want,
                    "{} ({role}): {method} {target}: {}",
                    node.name,
                    a.text()
                );
                if method == "GET" && *target != "/metrics" {
                    let _ = a.json();
                } else if method != "GET" {
                    assert!(
                        a.body.is_empty(),
                        "{}: {method} {target} has a body",
                        node.name
                    );
                }
            }
        }
        let status = ask(node.api_addr(), "GET", "/status").json();
        assert_eq!(status["role"], role, "{status}");
        assert_eq!(status["cluster_leader"], primary.as_str());
        assert_eq!(status["scope"], "t");
        let metrics = ask(node.api_addr(), "GET", "/metrics").text();
        let flag = |name: &str| format!("{name}{{scope=\"t\",name=\"{}\"}} ", node.name);
        let is_primary = u8::from(node.name == primary);
        assert!(
            metrics.contains(&format!("{}{is_primary}\n", flag("pgha_primary"))),
            "{metrics}"
        );
        assert!(
            metrics.contains(&format!("{}{}\n", flag("pgha_replica"), 1 - is_primary)),
            "{metrics}"
        );
        assert!(
            metrics.contains(&format!("{}1\n", flag("pgha_up"))),
            "{metrics}"
        );
        assert!(
            metrics.contains(&format!("{}1\n", flag("pgha_dcs_reachable"))),
            "{metrics}"
        );
        assert_promtool_accepts(&metrics, &format!("{} ({role})", node.name));
    }
    let cluster_doc = ask(cluster.node(&primary).api_addr(), "GET", "/cluster").json();
    assert_eq!(cluster_doc["leader"], primary.as_str());
    assert_eq!(cluster_doc["members"].as_array().unwrap().len(), 3);
    let cfg = ask(cluster.node(&primary).api_addr(), "GET", "/config").json();
    assert!(cfg["maximum_lag_on_failover"].as_u64().is_some(), "{cfg}");

    // Pause replay on one replica and write on the primary: the replica
    // receives the WAL but readers there no longer see the new rows.
    let paused = cluster.node(&replicas[0]);
    let other = cluster.node(&replicas[1]);
    wait_code(paused, "/replica?lag=0", 200, Duration::from_secs(30));
    paused.query("SELECT pg_wal_replay_pause()");
    cluster.node(&primary).query(
        "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 50000) g",
    );
    // Member status is published about every second: poll.
    wait_code(paused, "/replica?lag=0", 503, Duration::from_secs(15));
    wait_code(paused, "/readiness", 503, Duration::from_secs(15));
    assert_eq!(code(paused, "GET", "/replica?lag=1GB"), 200);
    assert_eq!(code(paused, "GET", "/replica"), 200);
    wait_code(
        paused,
        "/replica?lag=0&mode=write",
        200,
        Duration::from_secs(15),
    );
    let lag = ask(paused.api_addr(), "GET", "/status").json()["replay_lag_bytes"]
        .as_u64()
        .expect("replay lag");
    assert!(lag > 1 << 20, "replay lag {lag} after writing ~12 MB");
    let metrics = ask(paused.api_addr(), "GET", "/metrics").text();
    let series = format!(
        "pgha_replication_replay_lag_bytes{{scope=\"t\",name=\"{}\",member=\"{}\"}} ",
        paused.name, paused.name
    );
    let seen: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .expect("own replay lag series")
        .parse()
        .unwrap();
    assert!(seen > 1 << 20, "{seen}");
    wait_code(other, "/replica?lag=0", 200, Duration::from_secs(15));

    paused.query("SELECT pg_wal_replay_resume()");
    wait_code(paused, "/replica?lag=0", 200, Duration::from_secs(30));
    wait_code(paused, "/readiness", 200, Duration::from_secs(15));
}

// ---------------------------------------------------------------------------
// Role changes as health checks and HAProxy see them
// ---------------------------------------------------------------------------

/// The check interval and fall count of the test's HAProxy (as in
/// `config/haproxy.cfg`): how long HAProxy may still send new connections
/// to a node after its check turned 503.
const HAPROXY_INTER: Duration = Duration::from_secs(1);
const HAPROXY_FALL: u32 = 2;

/// How often the probes ask, as the issue measured.
const PROBE_EVERY: Duration = Duration::from_millis(20);

/// `pg_is_in_recovery()` of one node over a kept-open connection, opened
/// again after an error; `None` when Postgres does not answer.
struct RecoveryPoll {
    runtime: tokio::runtime::Runtime,
    port: u16,
    client: Option<tokio_postgres::Client>,
    /// The last poll found Postgres not serving: the connection refused or
    /// the query failed, not merely timed out.
    refused: bool,
}

impl RecoveryPoll {
    fn new(port: u16) -> RecoveryPoll {
        RecoveryPoll {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime"),
            port,
            client: None,
            refused: false,
        }
    }

    /// The answer, and when it arrived.
    fn ask(&mut self) -> (Instant, Option<bool>) {
        // A node starting or stopping may hold a connection attempt: give
        // up soon, so the probe keeps its pace.
        let (connect, limit) = (Duration::from_millis(300), Duration::from_secs(1));
        let (port, slot) = (self.port, &mut self.client);
        self.refused = false;
        let refused = &mut self.refused;
        let answer = self.runtime.block_on(async move {
            if slot.is_none() {
                let config: tokio_postgres::Config = format!(
                    "host=127.0.0.1 port={port} user=postgres password={} dbname=postgres connect_timeout=1",
                    common::SUPERUSER_PASSWORD
                )
                .parse()
                .expect("connection string");
                match tokio::time::timeout(connect, config.connect(tokio_postgres::NoTls)).await {
                    Ok(Ok((client, connection))) => {
                        tokio::spawn(connection);
                        *slot = Some(client);
                    }
                    // Refused or turned away: Postgres is not serving.
                    Ok(Err(_)) => *refused = true,
                    // Slow (a loaded machine, a start under way): unknown.
                    Err(_) => {}
                }
            }
            let client = slot.as_ref()?;
            let row =
                tokio::time::timeout(limit, client.query_one("SELECT pg_is_in_recovery()", &[]))
                    .await;
            match row {
                Ok(Ok(row)) => Some(row.get::<_, bool>(0)),
                Ok(Err(_)) => {
                    *refused = true;
                    *slot = None;
                    None
                }
                Err(_) => {
                    *slot = None;
                    None
                }
            }
        });
        (Instant::now(), answer)
    }
}

/// One round of [`HealthProbe`] on one node: each health answer lies
/// between two `pg_is_in_recovery()` polls, so it is judged against what
/// Postgres was just before and just after it.
#[derive(Debug, Clone, Copy)]
struct HealthSample {
    /// Before `/primary`, between the two requests, after `/replica`.
    pg: [(Instant, Option<bool>); 3],
    /// Whether each poll's connection was refused (not merely slow).
    pg_refused: [bool; 3],
    /// When each answer arrived and its status (0: no answer).
    primary: (Instant, u16),
    replica: (Instant, u16),
}

impl HealthSample {
    /// `/primary` 200 while Postgres ran read-only before and after it.
    fn primary_on_read_only(&self) -> bool {
        self.primary.1 == 200 && self.pg[0].1 == Some(true) && self.pg[1].1 == Some(true)
    }

    /// `/replica` 200 while Postgres ran read-write before and after it.
    fn replica_on_writable(&self) -> bool {
        self.replica.1 == 200 && self.pg[1].1 == Some(false) && self.pg[2].1 == Some(false)
    }

    /// `/primary` 200 while Postgres refused both polls around it (a poll
    /// that only timed out, on a loaded machine, proves nothing).
    fn primary_while_down(&self) -> bool {
        self.primary.1 == 200 && self.pg_refused[0] && self.pg_refused[1]
    }

    /// The sample in one line, its times in ms since `origin`.
    fn describe(&self, origin: Instant) -> String {
        let ms = |t: Instant| t.saturating_duration_since(origin).as_millis();
        let pg = |(t, r): (Instant, Option<bool>)| {
            let r = r.map_or("-", |r| if r { "t" } else { "f" });
            format!("pg {r} @{}", ms(t))
        };
        format!(
            "{}, /primary {} @{}, {}, /replica {} @{}, {}",
            pg(self.pg[0]),
            self.primary.1,
            ms(self.primary.0),
            pg(self.pg[1]),
            self.replica.1,
            ms(self.replica.0),
            pg(self.pg[2])
        )
    }
}

/// Every `PROBE_EVERY`, on each node (a thread each): `pg_is_in_recovery()`,
/// `GET /primary`, `pg_is_in_recovery()`, `GET /replica`,
/// `pg_is_in_recovery()`.
struct HealthProbe {
    stop: Arc<AtomicBool>,
    threads: Vec<(String, std::thread::JoinHandle<Vec<HealthSample>>)>,
}

impl HealthProbe {
    fn start(nodes: &[Node]) -> HealthProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = nodes
            .iter()
            .map(|n| {
                let (stop, api, port) = (stop.clone(), n.api_addr(), n.pg_port);
                let answer = move |path: &str| {
                    let status = try_ask(api, "GET", path).map_or(0, |a| a.status);
                    (Instant::now(), status)
                };
                let thread = std::thread::spawn(move || {
                    let mut pg = RecoveryPoll::new(port);
                    let mut samples = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let round = Instant::now();
                        let before = pg.ask();
                        let refused_before = pg.refused;
                        let primary = answer("/primary");
                        let between = pg.ask();
                        let refused_between = pg.refused;
                        let replica = answer("/replica");
                        let after = pg.ask();
                        samples.push(HealthSample {
                            pg: [before, between, after],
                            pg_refused: [refused_before, refused_between, pg.refused],
                            primary,
                            replica,
                        });
                        std::thread::sleep(PROBE_EVERY.saturating_sub(round.elapsed()));
                    }
                    samples
                });
                (n.name.clone(), thread)
            })
            .collect();
        HealthProbe { stop, threads }
    }

    fn stop(&mut self) -> BTreeMap<String, Vec<HealthSample>> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .drain(..)
            .map(|(name, t)| (name, t.join().expect("probe thread")))
            .collect()
    }
}

impl Drop for HealthProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Where one new connection through HAProxy landed: when it answered,
/// `pg_is_in_recovery()` and the server's port (`None`: it failed).
/// One change of primary the test caused.
struct RoleChange {
    what: &'static str,
    from: String,
    to: String,
    at: Instant,
    /// The old primary's agent runs through it (not SIGKILLed): its
    /// `/primary` must turn 503 before its Postgres stops taking writes.
    demotes: bool,
}

/// `to - from` in milliseconds, negative when `to` came first.
fn signed_ms(from: Instant, to: Instant) -> i64 {
    if to >= from {
        (to - from).as_millis() as i64
    } else {
        -((from - to).as_millis() as i64)
    }
}

fn median_and_max(mut v: Vec<i64>) -> String {
    if v.is_empty() {
        return "no samples".into();
    }
    v.sort_unstable();
    format!(
        "median {} ms, max {} ms, all {v:?}",
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

/// What the probes saw of one role change.
#[derive(Debug)]
struct ChangeTimes {
    /// From the first poll that found the new primary writable to its
    /// first `/primary` 200.
    promotion_to_primary_ms: Option<i64>,
    /// From that poll to its first `/replica` 503 (negative: before).
    promotion_to_replica_503_ms: Option<i64>,
    /// From the old primary's first `/primary` 503 to the first poll that
    /// found its Postgres no longer writable (positive: the 503 came first).
    demotion_lead_ms: Option<i64>,
    /// From that 503 to the first poll that found the old primary running
    /// again, read-only: until then no connection can reach it as one.
    demotion_to_standby_ms: Option<i64>,
}

fn change_times(c: &RoleChange, samples: &BTreeMap<String, Vec<HealthSample>>) -> ChangeTimes {
    let after = |t: &Instant| *t >= c.at;
    let new = &samples[&c.to];
    let writable_at = new
        .iter()
        .flat_map(|s| s.pg)
        .find(|(t, r)| after(t) && *r == Some(false))
        .map(|(t, _)| t);
    let primary_at = new
        .iter()
        .map(|s| s.primary)
        .find(|(t, code)| after(t) && *code == 200)
        .map(|(t, _)| t);
    let replica_503_at = new
        .iter()
        .map(|s| s.replica)
        .find(|(t, code)| after(t) && *code != 200)
        .map(|(t, _)| t);
    let old = &samples[&c.from];
    let primary_503_at = old
        .iter()
        .map(|s| s.primary)
        .find(|(t, code)| after(t) && *code != 200)
        .map(|(t, _)| t);
    let read_only_at = old
        .iter()
        .flat_map(|s| s.pg)
        .find(|(t, r)| after(t) && *r != Some(false))
        .map(|(t, _)| t);
    let standby_at = old
        .iter()
        .flat_map(|s| s.pg)
        .find(|(t, r)| after(t) && *r == Some(true))
        .map(|(t, _)| t);
    let between = |a: Option<Instant>, b: Option<Instant>| Some(signed_ms(a?, b?));
    ChangeTimes {
        promotion_to_primary_ms: between(writable_at, primary_at),
        promotion_to_replica_503_ms: between(writable_at, replica_503_at),
        demotion_lead_ms: if c.demotes {
            between(primary_503_at, read_only_at)
        } else {
            None
        },
        demotion_to_standby_ms: if c.demotes {
            between(primary_503_at, standby_at)
        } else {
            None
        },
    }
}

/// What the probe saw of a node's check over the `inter × fall` (plus a
/// little for the check's own time) before a connection landed there.
#[derive(Debug, PartialEq, Eq)]
enum CheckSeen {
    /// A 200: HAProxy may still have had the node up.
    Passed,
    /// Only failures, none more than `MAX_GAP` apart: HAProxy had no
    /// reason to keep the node.
    Failed,
    /// Too few answers to tell (the probe itself waited on a poll).
    Unknown,
}

fn check_seen(answers: impl Iterator<Item = (Instant, u16)>, at: Instant) -> CheckSeen {
    const MAX_GAP: Duration = Duration::from_millis(250);
    let window = HAPROXY_INTER * HAPROXY_FALL + Duration::from_millis(500);
    let from = at.checked_sub(window).unwrap_or(at);
    let (mut last, mut gap) = (from, Duration::ZERO);
    for (t, code) in answers.filter(|(t, _)| (from..=at).contains(t)) {
        if code == 200 {
            return CheckSeen::Passed;
        }
        gap = gap.max(t - last);
        last = t;
    }
    if gap.max(at - last) <= MAX_GAP {
        CheckSeen::Failed
    } else {
        CheckSeen::Unknown
    }
}

/// Connections through an HAProxy port that reached the wrong role, each
/// with its time in ms since `origin` and what the probe saw of that
/// node's check before it ([`CheckSeen`]), and of those the ones HAProxy's
/// own check period does not explain (`Failed`).
fn wrong_landings<'a>(
    landings: &'a [Landing],
    origin: Instant,
    wrong: impl Fn(bool) -> bool,
    node_of_port: impl Fn(u16) -> &'a str,
    seen: impl Fn(&str, Instant) -> CheckSeen,
) -> (Vec<String>, Vec<String>) {
    let mut all = Vec::new();
    let mut unexplained = Vec::new();
    for (at, landed) in landings {
        let Some((in_recovery, port)) = landed else {
            continue;
        };
        if !wrong(*in_recovery) {
            continue;
        }
        let node = node_of_port(*port);
        let seen = seen(node, *at);
        let what = format!(
            "@{} {node} (in recovery: {in_recovery}), its check within inter x fall before: {seen:?}",
            at.saturating_duration_since(origin).as_millis()
        );
        if seen == CheckSeen::Failed {
            unexplained.push(what.clone());
        }
        all.push(what);
    }
    (all, unexplained)
}

/// A switchover from the current leader to a replica, through the API;
/// retried while the leader does not yet see a fit candidate (412).
fn switch_over(cluster: &mut Cluster, from: &str) -> String {
    let view = cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    let to = view.streaming_replicas()[0].name.clone();
    cluster.switch_over(from, &to);
    to
}

/// The node that is the one healthy primary once the cluster is healthy.
fn healthy_primary(cluster: &mut Cluster) -> String {
    cluster.wait_healthy(BOOTSTRAP_TIMEOUT).primaries()[0]
        .name
        .clone()
}

#[test]
fn health_checks_and_haproxy_follow_a_kill_a_switchover_and_a_sigint_handover() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let haproxy = haproxy();
    let _serial = serial();
    let timing = Timing::FAST;
    let mut cluster = Cluster::start(
        3,
        Options {
            timing,
            ..Options::default()
        },
    );
    let view = cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    let old = view.primaries()[0].name.clone();
    let old_port = cluster.node(&old).pg_port;
    let replica_ports: Vec<u16> = view
        .streaming_replicas()
        .iter()
        .map(|m| cluster.node(&m.name).pg_port)
        .collect();
    let proxy = haproxy.map(|h| HaProxy::start(&h, &cluster.nodes));

    if let Some(proxy) = &proxy {
        // HAProxy takes servers as up until their first checks fail: wait
        // for its view to settle, several connections in a row reaching
        // the right kind.
        let settled = |port: u16, ok: &dyn Fn((bool, u16)) -> bool| {
            (0..6)
                .map(|_| where_am_i(port))
                .all(|w| w.is_some_and(ok))
                .then_some(())
        };
        wait_until(
            "HAProxy's primary port to reach only the primary",
            Duration::from_secs(20),
            || settled(proxy.primary_port, &|w| w == (false, old_port)),
        );
        wait_until(
            "HAProxy's replica port to reach only replicas",
            Duration::from_secs(20),
            || {
                settled(proxy.replica_port, &|(recovery, port)| {
                    recovery && replica_ports.contains(&port)
                })
            },
        );
    }
    let origin = Instant::now();
    eprintln!(
        "probes start at {} (@0 below; agent logs are in UTC)",
        humantime::format_rfc3339_micros(std::time::SystemTime::now())
    );
    let mut probe = HealthProbe::start(&cluster.nodes);
    let mut clients = proxy.as_ref().map(|p| {
        (
            ProxyClients::start(p.primary_port, PROBE_EVERY),
            ProxyClients::start(p.replica_port, PROBE_EVERY),
        )
    });
    let mut changes = Vec::new();

    // 1. The primary's agent dies; its fence guard stops its Postgres.
    let killed_at = Instant::now();
    cluster.node_mut(&old).kill9();
    let new = if let Some(proxy) = &proxy {
        let limit = Duration::from_secs(timing.ttl_s) + Duration::from_secs(6);
        let (_, port) = wait_until("HAProxy to reach a new primary", limit, || {
            where_am_i(proxy.primary_port).filter(|(recovery, port)| !recovery && *port != old_port)
        });
        eprintln!(
            "new primary reachable through HAProxy {:?} after the old agent was killed",
            killed_at.elapsed()
        );
        cluster.node_by_port(port).name.clone()
    } else {
        let view = cluster.wait_for("a new primary", Duration::from_secs(30), |v| {
            v.primaries().iter().any(|m| m.name != old)
        });
        view.primaries()
            .iter()
            .find(|m| m.name != old)
            .unwrap()
            .name
            .clone()
    };
    assert_ne!(new, old);
    assert_eq!(cluster.node(&new).query("SELECT pg_is_in_recovery()"), "f");
    wait_until(
        "the old primary's Postgres to be stopped by its fence guard",
        Duration::from_secs(10),
        || cluster.node(&old).postmaster_pid().is_none().then_some(()),
    );
    if let Some(proxy) = &proxy {
        psql(
            proxy.primary_port,
            "CREATE TABLE through_haproxy AS SELECT 1 AS id",
        )
        .expect("write through HAProxy");
    }
    changes.push(RoleChange {
        what: "SIGKILL",
        from: old.clone(),
        to: new.clone(),
        at: killed_at,
        demotes: false,
    });
    cluster.node_mut(&old).restart();

    // 2. Switchovers and SIGINT handovers, once each unless asked for more
    // (PGHA_TEST_ROLE_CHANGES=N: N of each, for a distribution).
    let rounds: usize = std::env::var("PGHA_TEST_ROLE_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for _ in 0..rounds {
        let from = healthy_primary(&mut cluster);
        let at = Instant::now();
        let to = switch_over(&mut cluster, &from);
        changes.push(RoleChange {
            what: "switchover",
            from,
            to,
            at,
            demotes: true,
        });

        let from = healthy_primary(&mut cluster);
        let at = Instant::now();
        let pid = cluster.node(&from).agent_pid().expect("agent runs");
        kill(Pid::from_raw(pid), Signal::SIGINT).expect("SIGINT");
        let exit = cluster.node_mut(&from).wait_exit(Duration::from_secs(60));
        assert!(
            exit.is_some_and(|e| e.success()),
            "{from} after SIGINT: {exit:?}"
        );
        let view = cluster.wait_for("a new primary", Duration::from_secs(30), |v| {
            v.primaries().iter().any(|m| m.name != from)
        });
        let to = view
            .primaries()
            .iter()
            .find(|m| m.name != from)
            .expect("checked")
            .name
            .clone();
        changes.push(RoleChange {
            what: "SIGINT",
            from: from.clone(),
            to,
            at,
            demotes: true,
        });
        cluster.node_mut(&from).restart();
    }
    cluster.wait_healthy(BOOTSTRAP_TIMEOUT);
    // Let HAProxy's checks catch up before the clients stop.
    std::thread::sleep(HAPROXY_INTER * (HAPROXY_FALL + 1));
    let samples = probe.stop();
    let landings = clients.as_mut().map(|(p, r)| (p.stop(), r.stop()));

    // What the probes saw, printed before anything is asserted.
    let mut promotion_to_primary = Vec::new();
    let mut promotion_to_replica_503 = Vec::new();
    let mut demotion_lead = Vec::new();
    let mut demotion_to_standby = Vec::new();
    for c in &changes {
        let t = change_times(c, &samples);
        eprintln!(
            "{} {} -> {} @{}: promotion -> /primary 200 {:?} ms, promotion -> /replica 503 {:?} ms, old /primary 503 ahead of its Postgres stopping writes by {:?} ms, and of it running read-only by {:?} ms",
            c.what, c.from, c.to, c.at.saturating_duration_since(origin).as_millis(), t.promotion_to_primary_ms, t.promotion_to_replica_503_ms, t.demotion_lead_ms, t.demotion_to_standby_ms
        );
        promotion_to_primary.extend(t.promotion_to_primary_ms);
        promotion_to_replica_503.extend(t.promotion_to_replica_503_ms);
        demotion_lead.extend(t.demotion_lead_ms);
        demotion_to_standby.extend(t.demotion_to_standby_ms);
    }
    let mut wrong = Vec::new();
    for (name, samples) in &samples {
        for s in samples {
            if s.primary_on_read_only() {
                wrong.push(format!(
                    "{name}: /primary 200 while read-only: {}",
                    s.describe(origin)
                ));
            }
            if s.replica_on_writable() {
                wrong.push(format!(
                    "{name}: /replica 200 while writable: {}",
                    s.describe(origin)
                ));
            }
            if s.primary_while_down() {
                wrong.push(format!(
                    "{name}: /primary 200 while Postgres is down: {}",
                    s.describe(origin)
                ));
            }
        }
    }
    let rounds_probed: usize = samples.values().map(Vec::len).sum();
    let longest_gaps: Vec<String> = samples
        .iter()
        .map(|(name, s)| {
            let gap = s
                .windows(2)
                .map(|w| w[1].primary.0 - w[0].primary.0)
                .max()
                .unwrap_or_default();
            format!("{name} {} ms", gap.as_millis())
        })
        .collect();
    eprintln!("longest gap between two probe rounds: {longest_gaps:?}");
    eprintln!(
        "SUMMARY health probe ({rounds_probed} rounds every {PROBE_EVERY:?}): promotion -> /primary 200: {}; promotion -> /replica 503: {}; demotion lead (/primary 503 before writes stop): {}; /primary 503 before the old primary runs read-only: {}; wrong-role answers: {}",
        median_and_max(promotion_to_primary.clone()),
        median_and_max(promotion_to_replica_503.clone()),
        median_and_max(demotion_lead.clone()),
        median_and_max(demotion_to_standby.clone()),
        wrong.len()
    );
    let mut unexplained = Vec::new();
    if let Some((primary_landings, replica_landings)) = &landings {
        let node_of_port = |port: u16| cluster.node_by_port(port).name.as_str();
        let seen = |check: fn(&HealthSample) -> (Instant, u16)| {
            let samples = &samples;
            move |node: &str, at: Instant| check_seen(samples[node].iter().map(check), at)
        };
        let (primary_wrong, primary_unexplained) = wrong_landings(
            primary_landings,
            origin,
            |in_recovery| in_recovery,
            node_of_port,
            seen(|s| s.primary),
        );
        let (replica_wrong, replica_unexplained) = wrong_landings(
            replica_landings,
            origin,
            |in_recovery| !in_recovery,
            node_of_port,
            seen(|s| s.replica),
        );
        let connected = |l: &[Landing]| l.iter().filter(|(_, w)| w.is_some()).count();
        eprintln!(
            "through HAProxy's primary port to a read-only node: {primary_wrong:#?}\nthrough its replicas port to a writable node: {replica_wrong:#?}"
        );
        eprintln!(
            "SUMMARY HAProxy: primary port {} of {} connections on a read-only node ({} failed to connect); replicas port {} of {} on a writable node ({} failed); unexplained by inter x fall: {} and {}",
            primary_wrong.len(),
            connected(primary_landings),
            primary_landings.len() - connected(primary_landings),
            replica_wrong.len(),
            connected(replica_landings),
            replica_landings.len() - connected(replica_landings),
            primary_unexplained.len(),
            replica_unexplained.len(),
        );
        // A stopped primary stays down for api.balancer_window, longer
        // than HAProxy's inter x fall: its primary port never reaches a
        // read-only node.
        unexplained.extend(
            primary_wrong
                .into_iter()
                .map(|w| format!("primary port: {w}")),
        );
        drop(primary_unexplained);
        unexplained.extend(
            replica_unexplained
                .into_iter()
                .map(|w| format!("replicas port: {w}")),
        );
    }

    assert!(
        wrong.is_empty(),
        "health answers of the wrong role: {wrong:#?}"
    );
    assert!(
        unexplained.is_empty(),
        "connections through HAProxy that reached the wrong role longer than inter x fall after the check turned 503: {unexplained:#?}"
    );
    assert_eq!(
        promotion_to_primary.len(),
        changes.len(),
        "every new primary was seen writable and answering /primary 200"
    );
    // The target is well under 50 ms; a loaded CI machine gets slack.
    for ms in &promotion_to_primary {
        assert!(*ms < 1000, "/primary 200 {ms} ms after the promotion");
    }
}

// ---------------------------------------------------------------------------
// Never blocks: a hung Postgres
// ---------------------------------------------------------------------------

#[test]
fn health_answers_at_once_while_postgres_is_sigstopped_and_turns_503() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let _serial = serial();
    let mut cluster = Cluster::start(
        1,
        Options {
            timing: Timing::FAST,
            ..Options::default()
        },
    );
    cluster.wait_for("a primary", BOOTSTRAP_TIMEOUT, |v| v.primaries().len() == 1);
    let node = &cluster.nodes[0];
    let api = node.api_addr();
    assert_eq!(ask(api, "GET", "/health").status, 200);
    let pid = Pid::from_raw(node.postmaster_pid().expect("postmaster"));
    // Postgres' children each start their own session: stop every child
    // of the postmaster too, so no backend answers.
    let mut pids = children_of(pid.as_raw());
    pids.push(pid.as_raw());
    for p in &pids {
        kill(Pid::from_raw(*p), Signal::SIGSTOP).expect("SIGSTOP postgres");
    }
    let resume = scopeguard(move || {
        for p in &pids {
            let _ = kill(Pid::from_raw(*p), Signal::SIGCONT);
        }
    });

    let until = Instant::now() + Duration::from_secs(8);
    let mut slowest = Duration::ZERO;
    let mut saw_503 = false;
    while Instant::now() < until {
        let asked = Instant::now();
        let answer = try_ask(api, "GET", "/health").expect("an answer");
        slowest = slowest.max(asked.elapsed());
        saw_503 |= answer.status == 503;
        if std::env::var_os("PGHA_TEST_VERBOSE").is_some() {
            eprintln!(
                "{} {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        slowest < Duration::from_millis(50),
        "/health took {slowest:?} with postgres stopped"
    );
    assert!(saw_503, "/health kept answering 200 for a hung postgres");
    drop(resume);
    eprintln!("SUMMARY /health with postgres SIGSTOPped: slowest answer {slowest:?}, turned 503");
}

/// PIDs whose parent is `parent`, from /proc.
fn children_of(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The command may contain spaces: fields after the last ')' are fixed.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// Runs `f` when dropped (also when the test panics).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
