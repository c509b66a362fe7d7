//! The workload: three writers (libpq multi-host with
//! target_session_attrs=read-write, HAProxy's primary port, and the router
//! of a node that was not the primary when the run began) that record
//! every insert's outcome, and a prober that asks every node's `/primary` and
//! `pg_is_in_recovery()` every 100 ms.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_postgres::config::TargetSessionAttrs;

use crate::cluster::{AddressBook, NODES, PG_PORT, ROUTER_PORT, SUPERUSER_PASSWORD};

pub const TABLE: &str = "chaos_writes";
pub const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS chaos_writes (
    writer text NOT NULL, seq bigint NOT NULL, node text NOT NULL, timeline int NOT NULL,
    ts timestamptz NOT NULL DEFAULT clock_timestamp(), PRIMARY KEY (writer, seq))";

/// How long one connection attempt or one insert may take before the writer
/// gives up on it (an insert timed out has an unknown outcome).
const WRITER_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between two inserts of one writer.
const WRITE_EVERY: Duration = Duration::from_millis(50);
pub const PROBE_EVERY: Duration = Duration::from_millis(100);
const PROBE_TIMEOUT: Duration = Duration::from_millis(400);

pub fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

fn thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[derive(Debug, Clone)]
pub struct Ack {
    pub at: Instant,
    /// cluster_name of the server that committed it (the pgha node name).
    pub node: String,
    pub timeline: u32,
    /// Server clock_timestamp() of the insert, ms since the epoch.
    pub server_ms: f64,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Acked(Ack),
    /// An ERROR on a live session: not committed.
    Rejected(String),
    /// Sent, no answer (connection lost, FATAL, timeout): either way.
    Unknown(String),
}

#[derive(Debug, Clone)]
pub struct Attempt {
    pub seq: i64,
    pub sent: Instant,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Default)]
pub struct WriterLog {
    pub writer: String,
    pub attempts: Vec<Attempt>,
    pub connect_failures: usize,
}

impl WriterLog {
    pub fn acks(&self) -> impl Iterator<Item = (i64, &Ack)> {
        self.attempts.iter().filter_map(|a| match &a.outcome {
            Outcome::Acked(ack) => Some((a.seq, ack)),
            _ => None,
        })
    }
    pub fn unknown(&self) -> usize {
        self.attempts
            .iter()
            .filter(|a| matches!(a.outcome, Outcome::Unknown(_)))
            .count()
    }
    pub fn last_ack(&self) -> Option<Instant> {
        self.acks().map(|(_, a)| a.at).max()
    }
}

/// Where a writer connects.
#[derive(Clone)]
pub enum Target {
    /// Every node, as a libpq multi-host string with
    /// target_session_attrs=read-write (addresses taken at each connection).
    MultiHost(AddressBook),
    /// HAProxy's primary port on the host.
    Haproxy(u16),
    /// One node's router (one host, one port, as an application without
    /// libpq's multi-host strings connects), whatever that node's role.
    Router(AddressBook, &'static str),
}

impl Target {
    fn config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.user("postgres")
            .password(SUPERUSER_PASSWORD)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(1));
        match self {
            Target::MultiHost(book) => {
                for node in NODES {
                    if let Some(ip) = book.get(node) {
                        c.host(ip.to_string()).port(PG_PORT);
                    }
                }
                c.target_session_attrs(TargetSessionAttrs::ReadWrite);
            }
            Target::Haproxy(port) => {
                c.host("127.0.0.1").port(*port);
            }
            Target::Router(book, node) => {
                if let Some(ip) = book.get(node) {
                    c.host(ip.to_string()).port(ROUTER_PORT);
                }
            }
        }
        c
    }
}

pub struct Writer {
    pub name: String,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<WriterLog>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    pub fn start(name: &str, target: Target) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(WriterLog {
            writer: name.to_string(),
            ..WriterLog::default()
        }));
        let thread = {
            let (stop, log, name) = (stop.clone(), log.clone(), name.to_string());
            std::thread::Builder::new()
                .name(format!("writer-{name}"))
                .spawn(move || thread_runtime().block_on(write_loop(target, name, stop, log)))
                .expect("spawn writer")
        };
        Writer {
            name: name.to_string(),
            stop,
            log,
            thread: Some(thread),
        }
    }

    pub fn log(&self) -> WriterLog {
        self.log.lock().unwrap().clone()
    }

    pub fn stop(mut self) -> WriterLog {
        self.halt();
        self.log()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.halt();
    }
}

async fn write_loop(
    target: Target,
    name: String,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<WriterLog>>,
) {
    let insert = format!(
        "INSERT INTO {TABLE} (writer, seq, node, timeline)
         VALUES ($1, $2, current_setting('cluster_name'),
                 ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int)
         RETURNING node, timeline, extract(epoch FROM ts)::float8 * 1000"
    );
    let mut session: Option<(tokio_postgres::Client, tokio_postgres::Statement)> = None;
    let mut seq: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(WRITE_EVERY).await;
        if session.is_none() {
            let config = target.config();
            let connected = tokio::time::timeout(WRITER_TIMEOUT, async {
                let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                let statement = client.prepare(&insert).await?;
                Ok::<_, tokio_postgres::Error>((client, statement))
            })
            .await;
            match connected {
                Ok(Ok(s)) => session = Some(s),
                _ => {
                    log.lock().unwrap().connect_failures += 1;
                    continue;
                }
            }
        }
        let (client, statement) = session.as_ref().unwrap();
        seq += 1;
        let sent = Instant::now();
        let answer =
            tokio::time::timeout(WRITER_TIMEOUT, client.query_one(statement, &[&name, &seq])).await;
        let outcome = match answer {
            Ok(Ok(row)) => Outcome::Acked(Ack {
                at: Instant::now(),
                node: row.get(0),
                timeline: row.get::<_, i32>(1) as u32,
                server_ms: row.get(2),
            }),
            Ok(Err(e)) => {
                let rejected =
                    e.as_db_error().is_some_and(|d| d.severity() == "ERROR") && !client.is_closed();
                if rejected {
                    Outcome::Rejected(e.to_string())
                } else {
                    session = None;
                    Outcome::Unknown(e.to_string())
                }
            }
            Err(_) => {
                session = None;
                Outcome::Unknown("timed out".into())
            }
        };
        if matches!(outcome, Outcome::Rejected(_)) {
            // A read-only server behind a stale route: find the primary again.
            session = None;
        }
        log.lock()
            .unwrap()
            .attempts
            .push(Attempt { seq, sent, outcome });
    }
}

/// One node's answers in one probe round; None where it did not answer.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeProbe {
    pub primary_200: Option<bool>,
    pub writable: Option<bool>,
    /// The leader key's revision the node last saw (`term` in its API's JSON).
    pub term: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Round {
    pub at: Instant,
    pub nodes: [NodeProbe; 3],
}

pub struct Prober {
    stop: Arc<AtomicBool>,
    rounds: Arc<Mutex<Vec<Round>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Prober {
    /// One thread per node, all on the same 100 ms schedule so that round k
    /// of every node covers the same instant.
    pub fn start(book: AddressBook) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let base = Instant::now() + Duration::from_millis(50);
        let rounds = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..NODES.len())
            .map(|i| {
                let (stop, rounds, book) = (stop.clone(), rounds.clone(), book.clone());
                std::thread::spawn(move || {
                    thread_runtime().block_on(probe_loop(i, base, book, stop, rounds))
                })
            })
            .collect();
        Prober {
            stop,
            rounds,
            threads,
        }
    }

    pub fn stop(mut self) -> Vec<Round> {
        self.halt();
        std::mem::take(&mut *self.rounds.lock().unwrap())
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.halt();
    }
}

async fn probe_loop(
    index: usize,
    base: Instant,
    book: AddressBook,
    stop: Arc<AtomicBool>,
    rounds: Arc<Mutex<Vec<Round>>>,
) {
    let node = NODES[index];
    let mut client: Option<(std::net::IpAddr, tokio_postgres::Client)> = None;
    let mut k: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        let at = base + PROBE_EVERY * k;
        tokio::time::sleep_until(at.into()).await;
        let ip = book.get(node);
        let mut probe = NodeProbe::default();
        if let Some(ip) = ip {
            let api = SocketAddr::new(ip, 8008);
            let http = tokio::task::spawn_blocking(move || {
                crate::http::get(api, "/primary", PROBE_TIMEOUT).map(|(s, body)| {
                    let term = serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["term"].as_u64());
                    (s == 200, term)
                })
            });
            if client
                .as_ref()
                .is_some_and(|(a, c)| *a != ip || c.is_closed())
            {
                client = None;
            }
            if client.is_none() {
                let mut c = tokio_postgres::Config::new();
                c.host(ip.to_string())
                    .port(PG_PORT)
                    .user("postgres")
                    .password(SUPERUSER_PASSWORD)
                    .dbname("postgres")
                    .connect_timeout(PROBE_TIMEOUT);
                if let Ok(Ok((cl, conn))) =
                    tokio::time::timeout(PROBE_TIMEOUT, c.connect(tokio_postgres::NoTls)).await
                {
                    tokio::spawn(conn);
                    client = Some((ip, cl));
                }
            }
            if let Some((_, c)) = &client {
                match tokio::time::timeout(
                    PROBE_TIMEOUT,
                    c.query_one("SELECT pg_is_in_recovery()", &[]),
                )
                .await
                {
                    Ok(Ok(row)) => probe.writable = Some(!row.get::<_, bool>(0)),
                    _ => client = None,
                }
            }
            if let Ok(Ok((primary, term))) = http.await {
                probe.primary_200 = Some(primary);
                probe.term = term;
            }
        }
        {
            let mut all = rounds.lock().unwrap();
            let idx = k as usize;
            while all.len() <= idx {
                let n = all.len() as u32;
                all.push(Round {
                    at: base + PROBE_EVERY * n,
                    nodes: [NodeProbe::default(); 3],
                });
            }
            all[idx].nodes[index] = probe;
        }
        // A round that overran skips the instants it missed.
        let now = Instant::now();
        k += 1;
        while base + PROBE_EVERY * k < now {
            k += 1;
        }
    }
}
