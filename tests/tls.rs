//! TLS as clients see it, against real etcd, Postgres 15, psql/libpq and the
//! real `pgha` binary: a cluster with a shared CA (`pgha certs ca`) served
//! with verify-full by host name, private name and IPv6 literal, and by the
//! service name through the router of a replica's agent, replication
//! encrypted and authenticated by client certificates, a 2-minute
//! certificate renewed (service name kept) without restarting Postgres; nodes without a CA
//! (their own CA, sslmode=require); the HTTPS API with client certificates
//! for operator endpoints; and every bad CA input refused before anything starts.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pgha::tls::pki::{self, CertInfo, SubjectName};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use common::{serial, wait_until, Cluster, Node, Options, TestDir, PG_BIN, SUPERUSER_PASSWORD};

const PGHA: &str = env!("CARGO_BIN_EXE_pgha");
const PRIVATE_NAME: &str = "pgha-test.internal";
/// The name of the whole service (`tls.service_names`), as `<app>.internal`
/// on the platform; the tests connect to it with `hostaddr=127.0.0.1`, as if
/// it resolved to loopback (`localhost` would not do: every certificate has it).
const SERVICE_NAME: &str = "pgha-service.internal";

fn pgha(args: &[&str]) -> Output {
    let mut cmd = Command::new(PGHA);
    cmd.args(args).stdin(Stdio::null());
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("PGHA_") {
            cmd.env_remove(var);
        }
    }
    cmd.output().expect("run pgha")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `pgha certs ca --out DIR`; returns (ca.crt, ca.key).
fn make_ca(dir: &Path) -> (PathBuf, PathBuf) {
    let out = pgha(&["certs", "ca", "--out", dir.to_str().unwrap()]);
    assert!(out.status.success(), "certs ca: {}", text(&out.stderr));
    let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Asked again, it refuses to replace the CA.
    let again = pgha(&["certs", "ca", "--out", dir.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        text(&again.stderr).contains("not overwriting"),
        "{}",
        text(&again.stderr)
    );
    (cert, key)
}

/// psql with a full conninfo as the superuser; stdout or stderr.
fn psql_conninfo(conninfo: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(Path::new(PG_BIN).join("psql"))
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conninfo,
            "-c",
            sql,
        ])
        .env("PGPASSWORD", SUPERUSER_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "3")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running psql: {e}"))?;
    if out.status.success() {
        Ok(text(&out.stdout).trim().to_owned())
    } else {
        Err(text(&out.stderr).trim().to_owned())
    }
}

fn verify_full(host: &str, hostaddr: Option<&str>, port: u16, ca: &Path) -> String {
    let hostaddr = hostaddr
        .map(|a| format!(" hostaddr={a}"))
        .unwrap_or_default();
    format!(
        "host={host}{hostaddr} port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
        ca.display()
    )
}

const SSL_OF_THIS_SESSION: &str = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";

fn rustls_client(ca_pem: &str, identity: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(pgha::tls::https::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    })
}

/// The certificate a Postgres serves (SSLRequest, then a TLS handshake
/// verified for `name`).
fn served_pg_certificate(port: u16, name: &str, ca_pem: &str) -> Result<CertInfo, String> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // SSLRequest: length 8, code 80877103.
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .map_err(|e| e.to_string())?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).map_err(|e| e.to_string())?;
    if answer[0] != b'S' {
        return Err(format!(
            "server answered {:?} to SSLRequest",
            answer[0] as char
        ));
    }
    let server_name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(rustls_client(ca_pem, None), server_name)
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| e.to_string())?;
    }
    let certs = tls.conn.peer_certificates().ok_or("no certificate")?;
    CertInfo::from_der(&certs[0]).map_err(|e| e.to_string())
}

/// One HTTPS request; returns status and body.
fn https(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
) -> Result<(u16, String), String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = ServerName::from(addr.ip());
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(
        tls,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        // A server closing without close_notify is fine for a closed connection.
        Err(e) if !raw.is_empty() && e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e.to_string()),
    }
    let answer = text(&raw);
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("bad answer")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    Ok((status, body.to_owned()))
}

/// Rewrites lines of a node's generated config before its agent starts.
fn edit_config(node: &Node, edits: &[(&str, &str)]) {
    let mut config = fs::read_to_string(&node.config).unwrap();
    for (from, to) in edits {
        assert!(config.contains(from), "config lacks {from}");
        config = config.replace(from, to);
    }
    fs::write(&node.config, config).unwrap();
}

fn tls_dir(node: &Node) -> PathBuf {
    node.dir.join("data.tls")
}

fn server_cert(node: &Node) -> CertInfo {
    CertInfo::from_pem(&fs::read_to_string(tls_dir(node).join("server.crt")).unwrap()).unwrap()
}

/// Repeats a verify-full connection until stopped; counts outcomes.
struct Prober {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(conninfo: String) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let thread = {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match psql_conninfo(&conninfo, SSL_OF_THIS_SESSION) {
                        Ok(v) if v == "t" => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(v) => failures.lock().unwrap().push(format!("ssl = {v}")),
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            })
        };
        Prober {
            stop,
            ok,
            failures,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failures.lock().unwrap().clone(),
        )
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// psql with `sslmode=verify-full host=SERVICE_NAME` through the router of
/// the replica's agent; returns the primary and whether it connected (to
/// the primary). Without the service name in the primary's certificate it
/// must fail on the name, not on anything else.
fn verify_full_through_a_replica_s_router(
    cluster: &mut Cluster,
    routers: &std::collections::BTreeMap<String, u16>,
    ca_cert: &Path,
) -> (String, bool) {
    let primary = cluster.primary().name.clone();
    let replica = &cluster
        .nodes
        .iter()
        .find(|n| n.name != primary)
        .unwrap()
        .name;
    let conninfo = verify_full(SERVICE_NAME, Some("127.0.0.1"), routers[replica], ca_cert);
    // Right after a failover the router may not have the route yet.
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        match psql_conninfo(&conninfo, "select pg_is_in_recovery()") {
            Err(e) if !e.contains("does not match host name") => {
                assert!(Instant::now() < deadline, "through {replica}'s router: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            other => break other,
        }
    };
    let has_name = server_cert(cluster.node(&primary))
        .sans
        .contains(&format!("DNS:{SERVICE_NAME}"));
    match answer {
        Ok(in_recovery) => {
            assert_eq!(
                in_recovery, "f",
                "through {replica}'s router: not the primary"
            );
            assert!(
                has_name,
                "verified without {SERVICE_NAME} in the certificate"
            );
            (primary, true)
        }
        Err(e) => {
            assert!(
                e.contains(&format!("does not match host name \"{SERVICE_NAME}\"")),
                "{e}"
            );
            assert!(
                !has_name,
                "{SERVICE_NAME} is in {primary}'s certificate, yet: {e}"
            );
            (primary, false)
        }
    }
}

#[test]
fn shared_ca_verify_full_replication_client_certs_and_rotation_without_restart() {
    let _serial = serial();
    let ca_dir = TestDir::new("pgha-ca-");
    let (ca_cert, ca_key) = make_ca(ca_dir.path());
    let ca_pem = fs::read_to_string(&ca_cert).unwrap();
    let opts = Options {
        extra_toml: format!(
            "[tls]\nca_cert_file = \"{}\"\nca_key_file = \"{}\"\nhostnames = [\"{PRIVATE_NAME}\"]\n\
             cert_validity = \"2m\"\nreplication_client_cert = true\nhostssl_clients = true\n",
            ca_cert.display(),
            ca_key.display()
        ),
        ..Options::default()
    };
    // Each agent runs the router; only n1 has the service name, so whichever
    // node is the primary, before or after the failover below, one of the
    // two phases shows verify-full through a router failing without it.
    let mut opts = opts;
    let mut routers = std::collections::BTreeMap::new();
    for name in ["n1", "n2"] {
        let port = common::free_port();
        opts.node_toml.insert(
            name.into(),
            format!("[router]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n"),
        );
        routers.insert(name.to_owned(), port);
    }
    let mut cluster = Cluster::start(0, opts);
    for name in ["n1", "n2"] {
        cluster.add_node(name, |node| {
            let hostnames = format!("hostnames = [\"{PRIVATE_NAME}\"]");
            let with_service = format!("{hostnames}\nservice_names = [\"{SERVICE_NAME}\"]");
            let mut edits = vec![(
                "listen_addresses = \"127.0.0.1\"",
                "listen_addresses = \"127.0.0.1,::1\"",
            )];
            if name == "n1" {
                edits.push((hostnames.as_str(), with_service.as_str()));
            }
            edit_config(node, &edits)
        });
    }
    cluster.wait_healthy(Duration::from_secs(90));
    let primary = cluster.primary().name.clone();
    let started = Instant::now();
    let n1_issued = server_cert(cluster.node("n1"));
    assert!(
        n1_issued.sans.contains(&format!("DNS:{SERVICE_NAME}")),
        "n1: {:?}",
        n1_issued.sans
    );
    assert!(!server_cert(cluster.node("n2"))
        .sans
        .contains(&format!("DNS:{SERVICE_NAME}")));
    let mut service_checks = vec![verify_full_through_a_replica_s_router(
        &mut cluster,
        &routers,
        &ca_cert,
    )];

    // Every node by host name, private name, IPv4 and IPv6 literal; never by a wrong name.
    for node in &cluster.nodes {
        let port = node.pg_port;
        for (host, hostaddr) in [
            ("localhost", None),
            (node.name.as_str(), Some("127.0.0.1")),
            (PRIVATE_NAME, Some("127.0.0.1")),
            ("127.0.0.1", None),
            ("::1", None),
        ] {
            let got = psql_conninfo(
                &verify_full(host, hostaddr, port, &ca_cert),
                SSL_OF_THIS_SESSION,
            );
            assert_eq!(
                got.as_deref(),
                Ok("t"),
                "{}: verify-full as {host}",
                node.name
            );
        }
        let wrong = psql_conninfo(
            &verify_full("wrong.example", Some("127.0.0.1"), port, &ca_cert),
            "select 1",
        )
        .unwrap_err();
        assert!(
            wrong.contains("does not match host name"),
            "{}: {wrong}",
            node.name
        );

        // Keys: 0600, owned by the Postgres user; certificates name the node.
        let postgres = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        for key in ["server.key", "replication.key"] {
            let meta = fs::metadata(tls_dir(node).join(key)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{key}");
            assert_eq!(meta.uid(), postgres.uid.as_raw(), "{key}");
        }
        assert!(
            !tls_dir(node).join("ca.key").exists(),
            "the shared CA key is never written"
        );
        let sans = server_cert(node).sans;
        for name in [
            format!("DNS:{}", node.name),
            format!("DNS:{PRIVATE_NAME}"),
            "DNS:localhost".into(),
            "IP:127.0.0.1".into(),
            "IP:::1".into(),
        ] {
            assert!(
                sans.contains(&name),
                "{}: {name} not in {sans:?}",
                node.name
            );
        }
        let show = pgha(&["certs", "show", "--config", node.config.to_str().unwrap()]);
        let shown = text(&show.stdout);
        assert!(show.status.success(), "{}", text(&show.stderr));
        assert!(
            shown.contains(&format!("CN={}", node.name))
                && shown.contains("IP:::1")
                && shown.contains("CN=pgha cluster CA"),
            "{shown}"
        );
        let (_, metrics) = common::http_get(node.api_addr(), "/metrics").unwrap();
        let server_line = metrics
            .lines()
            .find(|l| {
                l.starts_with("pgha_tls_certificate_expiry_seconds")
                    && l.contains("certificate=\"server\"")
            })
            .unwrap_or_else(|| panic!("no server expiry in {metrics}"));
        let left: i64 = server_line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((60..=120).contains(&left), "{server_line}");
    }

    // Replication is encrypted and authenticated with the replica's client certificate.
    let p = cluster.node(&primary).pg_port;
    let replication_ssl = |p: u16| {
        common::psql(
            p,
            "select count(*) filter (where s.ssl) || '/' || count(*) || ' ' || coalesce(min(s.client_dn), '-') \
             from pg_stat_replication r join pg_stat_ssl s using (pid)",
        )
        .unwrap()
    };
    assert_eq!(replication_ssl(p), "1/1 /O=pgha/CN=replicator");
    let replica = cluster.nodes.iter().find(|n| n.name != primary).unwrap();
    let conninfo = replica.query("select conninfo from pg_stat_wal_receiver");
    assert!(conninfo.contains("sslmode=verify-full"), "{conninfo}");

    // Rotation: the 2-minute certificate is renewed after 80 s while a client
    // keeps connecting with verify-full; Postgres is reloaded, not restarted.
    let node = cluster.node(&primary);
    let before = server_cert(node);
    let served_before = served_pg_certificate(node.pg_port, &node.name, &ca_pem).unwrap();
    assert_eq!(served_before.public_key_der, before.public_key_der);
    let start_time = node.query("select pg_postmaster_start_time()");
    let postmaster = node.postmaster_pid();
    let prober = Prober::start(verify_full(
        &node.name,
        Some("127.0.0.1"),
        node.pg_port,
        &ca_cert,
    ));
    let renewed = wait_until(
        "the server certificate renewed",
        Duration::from_secs(150),
        || {
            let now = server_cert(node);
            (now.public_key_der != before.public_key_der).then_some(now)
        },
    );
    let renewed_after = started.elapsed();
    let served_after = wait_until(
        "Postgres to serve the new certificate",
        Duration::from_secs(10),
        || {
            served_pg_certificate(node.pg_port, &node.name, &ca_pem)
                .ok()
                .filter(|c| c.public_key_der == renewed.public_key_der)
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    let (ok, failures) = prober.stop();
    assert!(
        failures.is_empty(),
        "verify-full connections failed during rotation: {failures:?}"
    );
    assert!(ok > 20, "only {ok} connections during rotation");
    assert!(served_after.not_after > before.not_after);
    assert_eq!(
        node.query("select pg_postmaster_start_time()"),
        start_time,
        "Postgres restarted"
    );
    assert_eq!(node.postmaster_pid(), postmaster);
    assert!(node
        .log_text()
        .contains("postgres reloaded for the new certificate"));
    // Renewal keeps the service name (n1's certificate renews as the
    // primary's did, whichever node that is).
    let n1_renewed = wait_until("n1's certificate renewed", Duration::from_secs(60), || {
        let now = server_cert(cluster.node("n1"));
        (now.public_key_der != n1_issued.public_key_der).then_some(now)
    });
    assert!(
        n1_renewed.sans.contains(&format!("DNS:{SERVICE_NAME}")),
        "renewal dropped the service name: {:?}",
        n1_renewed.sans
    );
    if primary == "n1" {
        // Through the replica's router, verified for the service name: the
        // renewed certificate of the primary.
        let via = routers[&cluster
            .nodes
            .iter()
            .find(|n| n.name != primary)
            .unwrap()
            .name];
        let served = served_pg_certificate(via, SERVICE_NAME, &ca_pem).unwrap();
        assert_eq!(served.public_key_der, n1_renewed.public_key_der);
    }
    eprintln!("certificate renewed {renewed_after:?} after the cluster was healthy; {ok} verify-full connections, none failed");

    // Replication reconnects with the renewed certificates on both sides.
    node.query("select pg_terminate_backend(pid) from pg_stat_replication");
    wait_until("replication back over TLS", Duration::from_secs(30), || {
        (replication_ssl(p) == "1/1 /O=pgha/CN=replicator").then_some(())
    });
    // Clients must use TLS (hostssl_clients).
    let plaintext = psql_conninfo(
        &format!("host=127.0.0.1 port={p} user=postgres dbname=postgres sslmode=disable"),
        "select 1",
    )
    .unwrap_err();
    assert!(plaintext.contains("no pg_hba.conf entry"), "{plaintext}");

    // Failover and rejoin: pg_rewind and the checkpoint before it connect
    // to the new primary over verified TLS.
    cluster.node_mut(&primary).kill9_with_postgres();
    let new_primary = cluster
        .wait_for("the replica to take over", Duration::from_secs(60), |v| {
            v.primaries().len() == 1 && v.primaries()[0].name != primary
        })
        .primaries()[0]
        .name
        .clone();
    cluster
        .node(&new_primary)
        .query("create table after_failover as select 1 as id");
    cluster.node_mut(&primary).restart();
    cluster.wait_healthy(Duration::from_secs(90));
    let rejoined = cluster.node(&primary);
    let log = rejoined.current_run_log();
    assert!(
        log.contains("pg_rewind finished"),
        "{primary} did not rewind:\n{log}"
    );
    assert!(
        !log.contains("action=clone"),
        "{primary} cloned instead:\n{log}"
    );
    wait_until(
        "the rejoined node to replay",
        Duration::from_secs(10),
        || (rejoined.psql("select id from after_failover").ok()? == "1").then_some(()),
    );
    assert_eq!(
        replication_ssl(cluster.node(&new_primary).pg_port),
        "1/1 /O=pgha/CN=replicator"
    );

    // The other node is the primary now: through the router, verify-full
    // for the service name works exactly when the primary's certificate has it.
    service_checks.push(verify_full_through_a_replica_s_router(
        &mut cluster,
        &routers,
        &ca_cert,
    ));
    service_checks.sort();
    assert_eq!(
        service_checks,
        [("n1".to_owned(), true), ("n2".to_owned(), false)],
        "(primary, verify-full for {SERVICE_NAME} through a replica's router)"
    );
    eprintln!(
        "verify-full for {SERVICE_NAME} through a replica's router, by primary: {service_checks:?}"
    );

    // No key material in any log.
    for node in &cluster.nodes {
        let log = node.log_text();
        assert!(
            !log.contains("PRIVATE KEY"),
            "{}: key material in the log",
            node.name
        );
    }
}

#[test]
fn without_a_ca_each_node_makes_its_own_and_serves_sslmode_require() {
    let _serial = serial();
    let mut cluster = Cluster::start(2, Options::default());
    cluster.wait_healthy(Duration::from_secs(90));
    let primary = cluster.primary().name.clone();
    let mut cas = Vec::new();
    for node in &cluster.nodes {
        let require = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
            node.pg_port
        );
        assert_eq!(
            psql_conninfo(&require, SSL_OF_THIS_SESSION).as_deref(),
            Ok("t")
        );
        // The node's own CA verifies its own certificate.
        let own_ca = tls_dir(node).join("ca.crt");
        assert_eq!(
            psql_conninfo(
                &verify_full("localhost", None, node.pg_port, &own_ca),
                SSL_OF_THIS_SESSION
            )
            .as_deref(),
            Ok("t")
        );
        let key = fs::metadata(tls_dir(node).join("ca.key")).unwrap();
        assert_eq!(key.permissions().mode() & 0o777, 0o600);
        cas.push(fs::read_to_string(own_ca).unwrap());
    }
    assert_ne!(cas[0], cas[1], "each node has a CA of its own");
    let encrypted = cluster.node(&primary).query(
        "select count(*) from pg_stat_replication r join pg_stat_ssl s using (pid) where s.ssl",
    );
    assert_eq!(encrypted, "1");
    let replica = cluster.nodes.iter().find(|n| n.name != primary).unwrap();
    let conninfo = replica.query("select conninfo from pg_stat_wal_receiver");
    assert!(conninfo.contains("sslmode=require"), "{conninfo}");
    // Plaintext replication is not accepted (hostssl only).
    let plain = Command::new(Path::new(PG_BIN).join("psql"))
        .args(["-X", "-d"])
        .arg(format!(
            "host=127.0.0.1 port={} user=replicator dbname=replication replication=true sslmode=disable",
            cluster.node(&primary).pg_port
        ))
        .args(["-c", "IDENTIFY_SYSTEM"])
        .env("PGPASSWORD", common::REPLICATION_PASSWORD)
        .output()
        .unwrap();
    assert!(!plain.status.success());
    assert!(
        text(&plain.stderr).contains("no pg_hba.conf entry"),
        "{}",
        text(&plain.stderr)
    );
}

#[test]
fn https_api_verified_with_the_ca_and_operator_endpoints_with_client_certificates() {
    let _serial = serial();
    let ca_dir = TestDir::new("pgha-ca-");
    let (ca_cert, ca_key) = make_ca(ca_dir.path());
    let ca_pem = fs::read_to_string(&ca_cert).unwrap();
    let opts = Options {
        extra_toml: format!(
            "[tls]\nca_cert_file = \"{}\"\nca_key_file = \"{}\"\napi = true\napi_client_auth = true\n",
            ca_cert.display(),
            ca_key.display()
        ),
        ..Options::default()
    };
    let mut cluster = Cluster::start(0, opts);
    for name in ["n1", "n2"] {
        cluster.add_node(name, |node| {
            edit_config(
                node,
                &[("advertise_url = \"http://", "advertise_url = \"https://")],
            )
        });
    }
    let node = cluster.node("n1");
    let api = format!("https://127.0.0.1:{}", node.api_port);
    let ca = ca_cert.to_str().unwrap();

    // The CLI verifies the API with --cacert.
    let leader_and_replica = |api: &str| -> Option<(String, String)> {
        let out = pgha(&["list", "--json", "--api", api, "--cacert", ca]);
        let members: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let members = members.as_array()?;
        let leader = members
            .iter()
            .find(|m| m["leader"] == true && m["role"] == "primary" && m["state"] == "running")?;
        let replica = members
            .iter()
            .find(|m| m["role"] == "replica" && m["state"] == "streaming")?;
        Some((
            leader["name"].as_str()?.to_owned(),
            replica["name"].as_str()?.to_owned(),
        ))
    };
    let (leader, replica) = wait_until(
        "a primary and a streaming replica, seen over HTTPS",
        Duration::from_secs(90),
        || leader_and_replica(&api),
    );
    let listed = text(&pgha(&["list", "--api", &api, "--cacert", ca]).stdout);
    assert!(
        listed.contains("| n1") && listed.contains("| n2"),
        "{listed}"
    );
    let no_ca = pgha(&["list", "--api", &api]);
    assert!(!no_ca.status.success());
    assert!(
        text(&no_ca.stderr).contains("--cacert"),
        "{}",
        text(&no_ca.stderr)
    );
    let other_ca_dir = TestDir::new("pgha-ca-");
    let (other_ca, _) = make_ca(other_ca_dir.path());
    let wrong = pgha(&[
        "list",
        "--api",
        &api,
        "--cacert",
        other_ca.to_str().unwrap(),
    ]);
    assert!(!wrong.status.success());
    // Plain HTTP is not served.
    assert!(common::http_get(node.api_addr(), "/health").map_or(true, |(s, _)| s != 200));

    // Health without a client certificate; operator requests need one.
    let anonymous = rustls_client(&ca_pem, None);
    let leader_api = cluster.node(&leader).api_addr();
    assert_eq!(
        https(leader_api, anonymous.clone(), "GET", "/primary")
            .unwrap()
            .0,
        200
    );
    let (status, body) = https(node.api_addr(), anonymous, "POST", "/pause").unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("client certificate"), "{body}");
    let refused = pgha(&["pause", "--api", &api, "--cacert", ca]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stdout).starts_with("403"),
        "{}",
        text(&refused.stdout)
    );

    let clients = TestDir::new("pgha-client-");
    let out = pgha(&[
        "certs",
        "client",
        "--ca-cert",
        ca,
        "--ca-key",
        ca_key.to_str().unwrap(),
        "--name",
        "operator",
        "--out",
        clients.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (cert, key) = (
        clients.path().join("operator.crt"),
        clients.path().join("operator.key"),
    );
    let paused = pgha(&[
        "pause",
        "--api",
        &api,
        "--cacert",
        ca,
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(
        paused.status.success(),
        "{} {}",
        text(&paused.stdout),
        text(&paused.stderr)
    );
    let authorized = rustls_client(&ca_pem, Some((&cert, &key)));
    let (status, body) = https(node.api_addr(), authorized, "POST", "/resume").unwrap();
    assert_eq!(status, 200, "{body}");

    // A switchover: the leader asks its target's API over HTTPS, verified
    // with the cluster CA.
    let switched = pgha(&[
        "switchover",
        "--to",
        &replica,
        "--api",
        &api,
        "--cacert",
        ca,
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(
        switched.status.success(),
        "{} {}",
        text(&switched.stdout),
        text(&switched.stderr)
    );
    wait_until("the switchover to finish", Duration::from_secs(60), || {
        leader_and_replica(&api).filter(|(l, r)| *l == replica && *r == leader)
    });

    // A client certificate from another CA fails the handshake.
    let foreign_dir = TestDir::new("pgha-client-");
    let other_key = other_ca_dir.path().join("ca.key");
    let out = pgha(&[
        "certs",
        "client",
        "--ca-cert",
        other_ca.to_str().unwrap(),
        "--ca-key",
        other_key.to_str().unwrap(),
        "--name",
        "intruder",
        "--out",
        foreign_dir.path().to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let foreign = rustls_client(
        &ca_pem,
        Some((
            &foreign_dir.path().join("intruder.crt"),
            &foreign_dir.path().join("intruder.key"),
        )),
    );
    assert!(https(node.api_addr(), foreign, "POST", "/pause").is_err());
}

/// `pgha check-config` and `pgha run` with a bad CA: exit 2, the message
/// names the key and the file, and nothing is created.
#[test]
fn bad_ca_inputs_are_refused_naming_the_file() {
    let dir = TestDir::new("pgha-badca-");
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        fs::write(&path, text).unwrap();
        path
    };
    let good = pki::create_ca("good CA", now, 10 * day).unwrap();
    let other = pki::create_ca("other CA", now, 10 * day).unwrap();
    let expired = pki::create_ca("old CA", now - 30 * day, day).unwrap();
    let issuer = pki::Issuer::from_pem(&good.cert_pem, good.key_pem.expose(), now).unwrap();
    let leaf = issuer
        .issue("n1", &[SubjectName::parse("n1")], true, now, day)
        .unwrap();

    let good_cert = write("good.crt", &good.cert_pem);
    let good_key = write("good.key", good.key_pem.expose());
    let cases: Vec<(&str, PathBuf, PathBuf, &str, &str)> = vec![
        (
            "unreadable",
            dir.path().join("missing.crt"),
            good_key.clone(),
            "tls.ca_cert_file",
            "cannot read",
        ),
        (
            "malformed",
            write("garbage.crt", "not a certificate\n"),
            good_key.clone(),
            "tls.ca_cert_file",
            "no certificate found",
        ),
        (
            "truncated",
            write("truncated.crt", &good.cert_pem[..good.cert_pem.len() / 2]),
            good_key.clone(),
            "tls.ca_cert_file",
            "",
        ),
        (
            "key of another CA",
            good_cert.clone(),
            write("other.key", other.key_pem.expose()),
            "tls.ca_key_file",
            "does not match",
        ),
        (
            "malformed key",
            good_cert.clone(),
            write(
                "garbage.key",
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            ),
            "tls.ca_key_file",
            "not a PEM private key",
        ),
        (
            "expired",
            write("expired.crt", &expired.cert_pem),
            write("expired.key", expired.key_pem.expose()),
            "tls.ca_cert_file",
            "expired",
        ),
        (
            "not a CA",
            write("leaf.crt", &leaf.cert_pem),
            write("leaf.key", leaf.key_pem.expose()),
            "tls.ca_cert_file",
            "CA flag",
        ),
    ];
    for (what, cert, key, bad_key, reason) in cases {
        let node_dir = dir.path().join(what.replace(' ', "-"));
        let config = node_dir.join("pgha.toml");
        fs::create_dir_all(&node_dir).unwrap();
        fs::write(
            &config,
            format!(
                "scope = \"t\"\nname = \"n1\"\n[etcd]\nendpoints = [\"127.0.0.1:1\"]\n\
                 [postgresql]\ndata_dir = \"data\"\nbin_dir = \"{PG_BIN}\"\nadvertise_host = \"127.0.0.1\"\n\
                 [postgresql.replication]\npassword = \"x\"\n\
                 [api]\nadvertise_url = \"http://127.0.0.1:1\"\n\
                 [tls]\nca_cert_file = \"{}\"\nca_key_file = \"{}\"\n",
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        let file = if bad_key == "tls.ca_key_file" {
            &key
        } else {
            &cert
        };
        for args in [
            vec!["check-config", config.to_str().unwrap()],
            vec!["run", "--config", config.to_str().unwrap()],
        ] {
            let out = pgha(&args);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{what}: {args:?}: {stderr}");
            let expected_start =
                format!("error: {}: {bad_key}: {}", config.display(), file.display());
            assert!(stderr.starts_with(&expected_start), "{what}: {stderr}");
            assert!(stderr.contains(reason), "{what}: {stderr}");
            let key_body = fs::read_to_string(&key).unwrap_or_default();
            if let Some(line) = key_body.lines().nth(1) {
                assert!(!stderr.contains(line), "{what}: key material in {stderr}");
            }
            assert!(!stderr.contains("AAAA"), "{what}: {stderr}");
        }
        assert!(
            !node_dir.join("data").exists() && !node_dir.join("data.tls").exists(),
            "{what}: something was created"
        );
    }

    // The same through the environment, as a platform hands out secrets.
    let config = dir.path().join("env.toml");
    fs::write(
        &config,
        format!(
            "scope = \"t\"\nname = \"n1\"\n[etcd]\nendpoints = [\"127.0.0.1:1\"]\n\
             [postgresql]\ndata_dir = \"data\"\nbin_dir = \"{PG_BIN}\"\nadvertise_host = \"127.0.0.1\"\n\
             [postgresql.replication]\npassword = \"x\"\n\
             [api]\nadvertise_url = \"http://127.0.0.1:1\"\n"
        ),
    )
    .unwrap();
    let out = Command::new(PGHA)
        .args(["check-config", config.to_str().unwrap()])
        .env("PGHA_TLS_CA_CERT", &good.cert_pem)
        .env("PGHA_TLS_CA_KEY", other.key_pem.expose())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("PGHA_TLS_CA_KEY (tls.ca_key): the PEM text: the key does not match"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(other.key_pem.expose().lines().nth(1).unwrap()),
        "{stderr}"
    );
    let out = Command::new(PGHA)
        .args(["check-config", config.to_str().unwrap()])
        .env("PGHA_TLS_CA_CERT", &good.cert_pem)
        .env("PGHA_TLS_CA_KEY", good.key_pem.expose())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}
