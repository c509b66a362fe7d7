//! The router over loopback TCP: backends written here greet each new
//! connection with their name, then echo. Waits are bounded polls of a
//! condition, never sleeps standing in for synchronisation.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::*;

/// Upper bound of any wait in these tests.
const PATIENCE: Duration = Duration::from_secs(5);

/// A backend that greets with its name and echoes; reports each close.
struct EchoBackend {
    backend: Backend,
    closed: mpsc::UnboundedReceiver<()>,
}

async fn echo_backend(name: &str) -> EchoBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (closed_tx, closed) = mpsc::unbounded_channel();
    let greeting = format!("{name}\n");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let closed_tx = closed_tx.clone();
            let greeting = greeting.clone();
            tokio::spawn(async move {
                if stream.write_all(greeting.as_bytes()).await.is_ok() {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
                let _ = closed_tx.send(());
            });
        }
    });
    EchoBackend {
        backend: Backend::new(name, "127.0.0.1", port),
        closed,
    }
}

impl EchoBackend {
    /// Waits for `n` connections to this backend to have closed.
    async fn assert_closes(&mut self, n: usize) {
        for _ in 0..n {
            tokio::time::timeout(PATIENCE, self.closed.recv())
                .await
                .expect("backend side closed in time")
                .unwrap();
        }
    }

    fn assert_still_open(&mut self) {
        assert!(
            self.closed.try_recv().is_err(),
            "a backend connection closed"
        );
    }
}

/// A client through the router, after the backend's greeting.
struct Client {
    stream: BufReader<TcpStream>,
    backend: String,
}

impl Client {
    /// Connects and waits for the greeting (the relay is up).
    async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        Client::greeted(stream).await
    }

    async fn greeted(stream: TcpStream) -> Client {
        let mut stream = BufReader::new(stream);
        let mut line = String::new();
        tokio::time::timeout(PATIENCE, stream.read_line(&mut line))
            .await
            .expect("greeting in time")
            .unwrap();
        assert!(line.ends_with('\n'), "no greeting: {line:?}");
        Client {
            stream,
            backend: line.trim_end().to_owned(),
        }
    }

    async fn echo(&mut self, text: &str) {
        self.stream
            .get_mut()
            .write_all(text.as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; text.len()];
        tokio::time::timeout(PATIENCE, self.stream.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(buf, text.as_bytes());
    }

    async fn assert_closed(mut self) {
        assert_closed(self.stream.get_mut()).await;
    }
}

/// The router closed this connection: EOF (or a reset) within the bound.
async fn assert_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => {}
        Ok(Ok(n)) => panic!("read {n} bytes from a connection that should be closed"),
        Err(_) => panic!("connection still open after {PATIENCE:?}"),
    }
}

/// Polls `condition` until it holds or the bound passes.
async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn config() -> RouterConfig {
    RouterConfig {
        enabled: true,
        listen: "127.0.0.1:0".parse().unwrap(),
        replica_listen: Some("127.0.0.1:0".parse().unwrap()),
        replica_fallback: false,
        hold_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(1),
        keepalive: Duration::from_secs(10),
        dual_stack: false,
    }
}

fn valid_for(d: Duration) -> Option<Instant> {
    Some(Instant::now() + d)
}

fn primary_route(primary: &EchoBackend, d: Duration) -> Route {
    Route {
        primary: Some(primary.backend.clone()),
        replicas: Vec::new(),
        valid_until: valid_for(d),
    }
}

struct Running {
    handle: RouterHandle,
    routes: watch::Sender<Route>,
    cancel: CancellationToken,
}

impl Running {
    fn rw(&self) -> ListenerStats {
        self.handle.metrics.rw.stats()
    }

    fn ro(&self) -> ListenerStats {
        self.handle.metrics.ro.stats()
    }

    fn ro_addr(&self) -> SocketAddr {
        self.handle.ro_addr.unwrap()
    }
}

fn start(config: &RouterConfig, route: Route) -> Running {
    let (routes, rx) = watch::channel(route);
    let cancel = CancellationToken::new();
    let handle = Router::start(config, rx, cancel.clone()).unwrap();
    Running {
        handle,
        routes,
        cancel,
    }
}

#[tokio::test]
async fn relays_both_ways_and_counts_bytes_on_close() {
    let mut n1 = echo_backend("n1").await;
    let router = start(&config(), primary_route(&n1, Duration::from_secs(60)));
    let mut client = Client::connect(router.handle.rw_addr).await;
    assert_eq!(client.backend, "n1");
    client.echo("hello").await;
    assert_eq!(router.rw().connections, 1);
    assert_eq!(router.rw().accepted_total, 1);
    drop(client);
    n1.assert_closes(1).await;
    wait_for("the relay to end", || router.rw().connections == 0).await;
    // "n1\n" + "hello" each way.
    assert_eq!(router.rw().bytes_total, 3 + 5 + 5);
    assert_eq!(router.rw().closed_by_fence_total, 0);

    // Cancelling stops everything.
    let mut open = Client::connect(router.handle.rw_addr).await;
    open.echo("x").await;
    router.cancel.cancel();
    tokio::time::timeout(PATIENCE, router.handle.stopped())
        .await
        .expect("router stopped");
    open.assert_closed().await;
    assert_eq!(router.rw().closed_by_fence_total, 0, "shutdown is no fence");
    assert!(TcpStream::connect(router.handle.rw_addr).await.is_err());
}

#[tokio::test]
async fn held_connection_is_relayed_once_a_primary_is_published() {
    let n1 = echo_backend("n1").await;
    let router = start(&config(), Route::none());
    let stream = TcpStream::connect(router.handle.rw_addr).await.unwrap();
    wait_for("the connection to be held", || {
        router.rw().held_connections == 1
    })
    .await;
    let published = Instant::now();
    router
        .routes
        .send_replace(primary_route(&n1, Duration::from_secs(60)));
    let mut client = Client::greeted(stream).await;
    let waited = published.elapsed();
    assert!(
        waited < Duration::from_millis(500),
        "relayed {waited:?} after the route"
    );
    assert_eq!(client.backend, "n1");
    client.echo("ping").await;
    assert_eq!(router.rw().held_connections, 0);
    assert_eq!(router.rw().route_changes_total, 1);
}

#[tokio::test]
async fn held_connection_is_closed_at_hold_timeout() {
    let config = RouterConfig {
        hold_timeout: Duration::from_millis(200),
        ..config()
    };
    let router = start(&config, Route::none());
    let started = Instant::now();
    let mut stream = TcpStream::connect(router.handle.rw_addr).await.unwrap();
    assert_closed(&mut stream).await;
    let held = started.elapsed();
    assert!(held >= Duration::from_millis(200), "closed after {held:?}");
    assert!(held < Duration::from_secs(2), "closed after {held:?}");
    wait_for("the hold to end", || router.rw().held_connections == 0).await;

    // An expired route holds too.
    let n1 = echo_backend("n1").await;
    router.routes.send_replace(Route {
        valid_until: Some(Instant::now() - Duration::from_millis(1)),
        ..primary_route(&n1, Duration::ZERO)
    });
    let mut stream = TcpStream::connect(router.handle.rw_addr).await.unwrap();
    assert_closed(&mut stream).await;
}

#[tokio::test]
async fn primary_change_closes_open_connections_and_routes_new_ones() {
    let mut n1 = echo_backend("n1").await;
    let mut n2 = echo_backend("n2").await;
    let router = start(&config(), primary_route(&n1, Duration::from_secs(60)));
    let mut a = Client::connect(router.handle.rw_addr).await;
    let mut b = Client::connect(router.handle.rw_addr).await;
    a.echo("a").await;
    b.echo("b").await;
    assert_eq!((a.backend.as_str(), b.backend.as_str()), ("n1", "n1"));

    router
        .routes
        .send_replace(primary_route(&n2, Duration::from_secs(60)));
    a.assert_closed().await;
    b.assert_closed().await;
    n1.assert_closes(2).await;
    wait_for("fence closes counted", || {
        router.rw().closed_by_fence_total == 2
    })
    .await;
    assert_eq!(router.rw().connections, 0);

    let mut c = Client::connect(router.handle.rw_addr).await;
    assert_eq!(c.backend, "n2");
    c.echo("c").await;
    n2.assert_still_open();
    assert_eq!(router.rw().route_changes_total, 2);

    // Withdrawing the route closes too.
    router.routes.send_replace(Route::none());
    c.assert_closed().await;
    n2.assert_closes(1).await;
    wait_for("fence close counted", || {
        router.rw().closed_by_fence_total == 3
    })
    .await;
}

#[tokio::test]
async fn expiry_of_valid_until_closes_connections_without_any_update() {
    let mut n1 = echo_backend("n1").await;
    let lease = Duration::from_millis(300);
    let router = start(&config(), primary_route(&n1, lease));
    let until = router.routes.borrow().valid_until.unwrap();
    let mut client = Client::connect(router.handle.rw_addr).await;
    client.echo("before").await;
    client.assert_closed().await;
    let late = Instant::now().saturating_duration_since(until);
    assert!(Instant::now() >= until, "closed before valid_until");
    assert!(
        late < Duration::from_millis(200),
        "closed {late:?} after valid_until"
    );
    n1.assert_closes(1).await;
    wait_for("fence close counted", || {
        router.rw().closed_by_fence_total == 1
    })
    .await;
    // The route is now unusable: new connections are held.
    let _held = TcpStream::connect(router.handle.rw_addr).await.unwrap();
    wait_for("a new connection to be held", || {
        router.rw().held_connections == 1
    })
    .await;
    assert_eq!(router.rw().route_changes_total, 2, "n1, then none");
}

#[tokio::test]
async fn renewing_valid_until_for_the_same_primary_drops_nothing() {
    let mut n1 = echo_backend("n1").await;
    let lease = Duration::from_millis(300);
    let router = start(&config(), primary_route(&n1, lease));
    let mut client = Client::connect(router.handle.rw_addr).await;
    // Renew every 100 ms for well past the first valid_until.
    let renewals_end = Instant::now() + Duration::from_millis(1000);
    while Instant::now() < renewals_end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        router
            .routes
            .send_modify(|route| route.valid_until = valid_for(lease));
        client.echo("still here").await;
    }
    n1.assert_still_open();
    assert_eq!(router.rw().closed_by_fence_total, 0);
    assert_eq!(router.rw().route_changes_total, 1);
    assert_eq!(router.rw().connections, 1);
}

#[tokio::test]
async fn read_only_listener_spreads_over_replicas_and_closes_a_leaving_one() {
    let n1 = echo_backend("n1").await;
    let mut n2 = echo_backend("n2").await;
    let mut n3 = echo_backend("n3").await;
    let route = Route {
        replicas: vec![n2.backend.clone(), n3.backend.clone()],
        ..primary_route(&n1, Duration::from_secs(60))
    };
    let router = start(&config(), route);
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Client::connect(router.ro_addr()).await);
    }
    let names: Vec<&str> = clients.iter().map(|c| c.backend.as_str()).collect();
    assert_eq!(names, ["n2", "n3", "n2", "n3"]);
    assert_eq!(router.ro().connections, 4);

    // n3 leaves the replica set: its connections close, n2's stay.
    router
        .routes
        .send_modify(|r| r.replicas.retain(|b| b.name != "n3"));
    n3.assert_closes(2).await;
    let (mut on_n2, on_n3): (Vec<_>, Vec<_>) = clients.into_iter().partition(|c| c.backend == "n2");
    for client in on_n3 {
        client.assert_closed().await;
    }
    for client in &mut on_n2 {
        client.echo("read").await;
    }
    n2.assert_still_open();
    wait_for("fence closes counted", || {
        router.ro().closed_by_fence_total == 2
    })
    .await;
    assert_eq!(router.rw().closed_by_fence_total, 0);
    assert_eq!(router.ro().route_changes_total, 2);
    assert_eq!(Client::connect(router.ro_addr()).await.backend, "n2");
}

#[tokio::test]
async fn read_only_listener_holds_without_replicas_unless_fallback() {
    let n1 = echo_backend("n1").await;
    let no_fallback = RouterConfig {
        hold_timeout: Duration::from_millis(200),
        ..config()
    };
    let router = start(&no_fallback, primary_route(&n1, Duration::from_secs(60)));
    let mut stream = TcpStream::connect(router.ro_addr()).await.unwrap();
    wait_for("the ro connection to be held", || {
        router.ro().held_connections == 1
    })
    .await;
    assert_closed(&mut stream).await;
    assert_eq!(router.ro().connections, 0);

    let fallback = RouterConfig {
        replica_fallback: true,
        ..config()
    };
    let router = start(&fallback, primary_route(&n1, Duration::from_secs(60)));
    let mut client = Client::connect(router.ro_addr()).await;
    assert_eq!(client.backend, "n1");
    client.echo("read").await;
    // A fallback connection is fenced with the primary.
    router.routes.send_replace(Route::none());
    client.assert_closed().await;
    wait_for("fence close counted", || {
        router.ro().closed_by_fence_total == 1
    })
    .await;
}

#[tokio::test]
async fn a_refusing_primary_is_retried_until_the_route_moves() {
    // A port nobody listens on.
    let closed_port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let gone = Route {
        primary: Some(Backend::new("n1", "127.0.0.1", closed_port)),
        replicas: Vec::new(),
        valid_until: valid_for(Duration::from_secs(60)),
    };
    let router = start(&config(), gone);
    let stream = TcpStream::connect(router.handle.rw_addr).await.unwrap();
    wait_for("the connection to be held", || {
        router.rw().held_connections == 1
    })
    .await;
    let n2 = echo_backend("n2").await;
    router
        .routes
        .send_replace(primary_route(&n2, Duration::from_secs(60)));
    assert_eq!(Client::greeted(stream).await.backend, "n2");
}

#[tokio::test]
async fn metrics_text_carries_the_counts() {
    let mut n1 = echo_backend("n1").await;
    let n2 = echo_backend("n2").await;
    let router = start(&config(), primary_route(&n1, Duration::from_secs(60)));
    let mut a = Client::connect(router.handle.rw_addr).await;
    a.echo("abc").await;
    router
        .routes
        .send_replace(primary_route(&n2, Duration::from_secs(60)));
    a.assert_closed().await;
    n1.assert_closes(1).await;
    wait_for("fence close counted", || {
        router.rw().closed_by_fence_total == 1
    })
    .await;
    let _b = Client::connect(router.handle.rw_addr).await;
    let text = router.handle.metrics.render("");
    for line in [
        "pgha_router_connections{listener=\"rw\"} 1",
        "pgha_router_accepted_total{listener=\"rw\"} 2",
        "pgha_router_accepted_total{listener=\"ro\"} 0",
        "pgha_router_closed_by_fence_total{listener=\"rw\"} 1",
        "pgha_router_route_changes_total{listener=\"rw\"} 2",
        "pgha_router_held_connections{listener=\"rw\"} 0",
        // "n1\n" + "abc" each way.
        "pgha_router_bytes_total{listener=\"rw\"} 9",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
}

#[tokio::test]
async fn an_ipv6_wildcard_listener_accepts_ipv4_when_dual_stack() {
    let n1 = echo_backend("n1").await;
    let dual = RouterConfig {
        listen: "[::]:0".parse().unwrap(),
        replica_listen: None,
        dual_stack: true,
        ..config()
    };
    let router = start(&dual, primary_route(&n1, Duration::from_secs(60)));
    let port = router.handle.rw_addr.port();
    assert_eq!(router.handle.ro_addr, None);
    for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        let stream = TcpStream::connect(&addr).await.unwrap();
        assert_eq!(Client::greeted(stream).await.backend, "n1", "{addr}");
    }
}
