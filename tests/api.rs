//! The HTTP API as its clients see it. First a server on a hand-made
//! snapshot (keep-alive, limits, malformed input, IPv4 + IPv6, arbitrary
//! bytes); then real clusters (etcd + three agents with Postgres 15): every
//! health check against each node's real role, replay lag, `promtool` on real
//! metrics, and HAProxy routing clients to the primary through a failover.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

use common::{free_port, psql, serial, wait_until, Cluster, Node, Options, TestDir, Timing};

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

/// `haproxy`, or `None` after saying loudly that the check is skipped.
fn haproxy() -> Option<PathBuf> {
    for p in [
        "/usr/sbin/haproxy",
        "/usr/bin/haproxy",
        "/usr/local/sbin/haproxy",
    ] {
        if Path::new(p).exists() {
            return Some(PathBuf::from(p));
        }
    }
    eprintln!("\n!!!!! haproxy not found: SKIPPING the HAProxy tests (apt-get install haproxy; scripts/test installs it) !!!!!\n");
    None
}

/// An HAProxy in front of a cluster, configured as Patroni users do:
/// one port reaching the primary, one reaching the replicas.
struct HaProxy {
    primary_port: u16,
    replica_port: u16,
    child: Child,
    log: PathBuf,
    _dir: TestDir,
}

impl HaProxy {
    fn start(binary: &Path, nodes: &[Node]) -> HaProxy {
        let dir = TestDir::new("pgha-haproxy-");
        let (primary_port, replica_port) = (free_port(), free_port());
        let servers = |check: &str| {
            nodes
                .iter()
                .map(|n| {
                    format!(
                        "    server {} 127.0.0.1:{} maxconn 100 check port {} # {check}\n",
                        n.name, n.pg_port, n.api_port
                    )
                })
                .collect::<String>()
        };
        let cfg = format!(
            "global\n    maxconn 200\n\n\
             defaults\n    mode tcp\n    retries 2\n    timeout connect 2s\n    timeout client 30m\n    timeout server 30m\n    timeout check 2s\n\n\
             listen primary\n    bind 127.0.0.1:{primary_port}\n    option httpchk GET /primary\n    http-check expect status 200\n\
             \x20   default-server inter 1s fall 2 rise 1 on-marked-down shutdown-sessions\n{}\n\
             listen replicas\n    bind 127.0.0.1:{replica_port}\n    balance roundrobin\n    option httpchk GET /replica\n    http-check expect status 200\n\
             \x20   default-server inter 1s fall 2 rise 1 on-marked-down shutdown-sessions\n{}",
            servers("/primary"),
            servers("/replica"),
        );
        let path = dir.path().join("haproxy.cfg");
        fs::write(&path, cfg).unwrap();
        let log = dir.path().join("haproxy.log");
        let out = fs::File::create(&log).unwrap();
        let child = Command::new(binary)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start haproxy");
        HaProxy {
            primary_port,
            replica_port,
            child,
            log,
            _dir: dir,
        }
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- haproxy log -----\n{}", common::tail(&self.log, 40));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pg_is_in_recovery()|inet_server_port()` through a proxy port.
fn where_am_i(port: u16) -> Option<(bool, u16)> {
    let out = psql(
        port,
        "SELECT pg_is_in_recovery()::text || '|' || inet_server_port()",
    )
    .ok()?;
    let (recovery, server_port) = out.split_once('|')?;
    Some((recovery == "true", server_port.parse().ok()?))
}

#[test]
fn haproxy_sends_clients_to_the_primary_and_follows_a_failover() {
    let Some(haproxy) = haproxy() else { return };
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
    let proxy = HaProxy::start(&haproxy, &cluster.nodes);

    // HAProxy takes servers as up until their first checks fail: wait for
    // its view to settle, several connections in a row reaching the right kind.
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

    // The agent dies; its fence guard stops the primary's Postgres.
    let killed_at = Instant::now();
    cluster.node_mut(&old).kill9();
    let limit = Duration::from_secs(timing.ttl_s) + Duration::from_secs(6);
    let (recovery, port) = wait_until("HAProxy to reach a new primary", limit, || {
        where_am_i(proxy.primary_port).filter(|(recovery, port)| !recovery && *port != old_port)
    });
    let took = killed_at.elapsed();
    eprintln!("new primary reachable through HAProxy {took:?} after the old agent was killed");
    assert!(!recovery);
    let new = cluster
        .nodes
        .iter()
        .find(|n| n.pg_port == port)
        .expect("a cluster node")
        .name
        .clone();
    assert_ne!(new, old);
    assert_eq!(cluster.node(&new).query("SELECT pg_is_in_recovery()"), "f");
    wait_until(
        "the old primary's Postgres to be stopped by its fence guard",
        Duration::from_secs(10),
        || cluster.node(&old).postmaster_pid().is_none().then_some(()),
    );
    // Writes through the proxy land on the new primary.
    psql(
        proxy.primary_port,
        "CREATE TABLE through_haproxy AS SELECT 1 AS id",
    )
    .expect("write through HAProxy");
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
