//! Happy Eyeballs in a network namespace the test creates: a name with an
//! IPv6 address that is black-holed (packets vanish: no reset, no ICMP) and
//! an IPv4 address that answers is connected over IPv4 within 400 ms; a name
//! whose addresses both answer is connected over IPv6.
//!
//! The checks must resolve names through the namespace's /etc/hosts, which
//! `ip netns exec` mounts only for the command it starts: so the outer test
//! builds the network and runs this test binary again inside it, where the
//! ignored `inside_the_namespace` test does the measuring.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::netns::NetLab;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Set (to the black-holed address) for the run inside the namespace.
const INSIDE: &str = "PGHA_TEST_HAPPY_EYEBALLS_NETNS";
const LIMIT: Duration = Duration::from_millis(400);

#[test]
fn happy_eyeballs_falls_back_to_ipv4_and_prefers_ipv6() {
    let mut lab = NetLab::new();
    let client = lab.add_host("client", true);
    let hole = lab.black_hole(&client);
    lab.write_hosts(
        &client,
        &format!(
            "::1 localhost\n127.0.0.1 localhost\n\
             {hole} dual.internal\n127.0.0.1 dual.internal\n\
             ::1 both.internal\n127.0.0.1 both.internal\n\
             {hole} hole.internal\n"
        ),
    );
    let out = lab
        .command(&client, std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "inside_the_namespace",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(INSIDE, hole.to_string())
        .output()
        .expect("run the test binary in the namespace");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "checks inside the namespace failed");
    assert!(
        text.contains("1 passed"),
        "the inner test did not run: {text}"
    );
}

/// A listener on [::] (both families) answering every connection with a
/// small HTTP response; reports the peer address of each connection.
async fn serve(listener: tokio::net::TcpListener, peers: tokio::sync::mpsc::Sender<SocketAddr>) {
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            return;
        };
        let _ = peers.send(peer).await;
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let body = r#"{"ok":true}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[test]
#[ignore = "runs inside the network namespace of happy_eyeballs_falls_back_to_ipv4_and_prefers_ipv6"]
fn inside_the_namespace() {
    let hole = std::env::var(INSIDE)
        .expect("run by happy_eyeballs_falls_back_to_ipv4_and_prefers_ipv6 only");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The resolver alone returns the black hole last here (getaddrinfo
        // ranks an address it deems unreachable low); our order puts IPv6 first.
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host(("dual.internal", 1))
            .await
            .unwrap()
            .collect();
        assert_eq!(resolved.len(), 2, "{resolved:?}");
        assert!(pgha::net::happy_eyeballs_order(resolved.clone())[0].is_ipv6());

        // The black hole really is one: no answer, no error.
        let hole_port = 9;
        let attempt = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect((hole.as_str(), hole_port)),
        )
        .await;
        assert!(attempt.is_err(), "{hole} answered: {attempt:?}");

        let listeners = pgha::api::bind_all(&["[::]:0".parse().unwrap()]).unwrap();
        let listener = listeners.into_iter().next().unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, mut peers) = tokio::sync::mpsc::channel(16);
        tokio::spawn(serve(listener, tx));

        // IPv6 black-holed, IPv4 answering: IPv4 after the head start.
        let started = Instant::now();
        let stream = pgha::net::connect_tcp("dual.internal", port).await.unwrap();
        let took = started.elapsed();
        println!(
            "dual.internal, IPv6 black-holed: connected over {} in {took:?}",
            stream.peer_addr().unwrap()
        );
        assert!(stream.peer_addr().unwrap().is_ipv4());
        assert!(took < LIMIT, "took {took:?}");
        assert!(
            took >= pgha::net::HAPPY_EYEBALLS_DELAY - Duration::from_millis(10),
            "IPv4 did not wait for IPv6's head start: {took:?}"
        );
        let peer = peers.recv().await.unwrap();
        assert!(peer.ip().to_canonical().is_ipv4(), "{peer}");
        drop(stream);

        // The HTTP client of the CLI and of the agent's calls to members.
        let started = Instant::now();
        let (status, body) =
            pgha::ctl::get_json(&format!("http://dual.internal:{port}"), "/status")
                .await
                .unwrap();
        let took = started.elapsed();
        println!("GET http://dual.internal:{port}/status, IPv6 black-holed: {status} in {took:?}");
        assert_eq!((status, body["ok"].as_bool()), (200, Some(true)));
        assert!(took < LIMIT, "took {took:?}");
        let peer = peers.recv().await.unwrap();
        assert!(peer.ip().to_canonical().is_ipv4(), "{peer}");

        // Both answering: IPv6 wins.
        let started = Instant::now();
        let stream = pgha::net::connect_tcp("both.internal", port).await.unwrap();
        let took = started.elapsed();
        println!(
            "both.internal, both answering: connected over {} in {took:?}",
            stream.peer_addr().unwrap()
        );
        assert!(stream.peer_addr().unwrap().is_ipv6());
        let peer = peers.recv().await.unwrap();
        assert!(
            peer.is_ipv6() && peer.ip().to_canonical().is_ipv6(),
            "{peer}"
        );
        drop(stream);
        let (status, _) = pgha::ctl::get_json(&format!("http://both.internal:{port}"), "/status")
            .await
            .unwrap();
        assert_eq!(status, 200);
        let peer = peers.recv().await.unwrap();
        assert!(peer.ip().to_canonical().is_ipv6(), "{peer}");

        // An IPv6 literal in a URL, and a libpq-style pick of the address.
        let (status, _) = pgha::ctl::get_json(&format!("http://[::1]:{port}"), "/status")
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert!(peers.recv().await.unwrap().is_ipv6());
        let started = Instant::now();
        let picked = pgha::net::pick_address("dual.internal", port, Duration::from_secs(2))
            .await
            .unwrap();
        let took = started.elapsed();
        println!("hostaddr for pg_basebackup/pg_rewind from dual.internal: {picked} in {took:?}");
        assert_eq!(picked, "127.0.0.1".parse::<std::net::IpAddr>().unwrap());
        assert!(took < LIMIT, "took {took:?}");
        let _ = peers.recv().await;

        // etcd endpoints: tonic connects them with hyper-util's own Happy
        // Eyeballs (300 ms, getaddrinfo's order); measured, bounded loosely.
        let etcd = EtcdOnLoopback::start();
        let started = Instant::now();
        let client = pgha::dcs::Etcd::connect(
            &pgha::config::EtcdConfig {
                endpoints: vec!["http://dual.internal:2379".into()],
                prefix: "/pgha/he/".into(),
                dial_timeout: Duration::from_secs(2),
                username: None,
                password: None,
            },
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        let first = client.load().await;
        let took = started.elapsed();
        println!("etcd at http://dual.internal:2379, IPv6 black-holed: first answer in {took:?}");
        assert!(first.is_ok(), "{:?}", first.err());
        assert!(took < Duration::from_secs(1), "took {took:?}");
        drop(etcd);

        // A name whose only address is black-holed fails by the caller's
        // deadline instead of hanging.
        let attempt =
            pgha::net::pick_address("hole.internal", port, Duration::from_millis(300)).await;
        assert!(attempt.is_err());
    });
}

/// etcd on 127.0.0.1:2379 of the namespace (a fresh namespace has every port free).
struct EtcdOnLoopback {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl EtcdOnLoopback {
    fn start() -> EtcdOnLoopback {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = std::process::Command::new("etcd")
            .arg("--name=he")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg("--listen-client-urls=http://127.0.0.1:2379")
            .arg("--advertise-client-urls=http://127.0.0.1:2379")
            .arg("--listen-peer-urls=http://127.0.0.1:2380")
            .arg("--initial-advertise-peer-urls=http://127.0.0.1:2380")
            .arg("--initial-cluster=he=http://127.0.0.1:2380")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        let etcd = EtcdOnLoopback { child, _dir: dir };
        common::wait_until("etcd to answer", Duration::from_secs(20), || {
            common::http_get("127.0.0.1:2379".parse().unwrap(), "/health")
                .ok()
                .filter(|(status, _)| *status == 200)
        });
        etcd
    }
}

impl Drop for EtcdOnLoopback {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
