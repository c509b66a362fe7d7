//! HTTP API: health checks with Patroni's paths and status codes, status
//! documents and Prometheus metrics. Every answer comes from the snapshot the
//! agent loop last published; no request ever waits on Postgres or etcd.
//!
//! This file is the server (listening, limits, connections); `routes` decides
//! the answers, `health` holds the role checks, `status` and `metrics`
//! render them.

pub mod backup;
pub mod health;
pub mod metrics;
pub mod operator;
pub mod routes;
pub mod status;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::net::IpFamily;
use crate::snapshot::Snapshot;
use crate::tls::CertExpiries;
pub use health::Health;
pub use metrics::Live;
pub use routes::{route, Reply};
pub use status::{lag_bytes, replay_lag_bytes, Rendered};

/// Bounds on what one client can make the server hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Request body size; beyond it the answer is 413.
    pub max_body_bytes: usize,
    /// Time to send the request line and headers, and how long an idle
    /// keep-alive connection is kept.
    pub header_read_timeout: Duration,
    /// Time to send a request body.
    pub body_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 1024,
            max_body_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(5),
        }
    }
}

/// How long open connections get to finish their request at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Where operator requests go, and who may send them.
#[derive(Clone)]
pub struct Operator {
    pub calls: tokio::sync::mpsc::Sender<crate::operator::Call>,
    pub auth: operator::Auth,
    /// Failsafe confirmations this node gives its leader (`POST /failsafe`),
    /// each a promise not to take part in an election for `failsafe_ttl`.
    pub failsafe: Arc<crate::failsafe::Promise>,
    pub failsafe_ttl: Duration,
}

/// What the API serves beside the snapshot: this node's TLS and its
/// router's counters. The default: plain HTTP, no certificates, no router.
#[derive(Default)]
pub struct ApiSetup {
    /// Serve HTTPS with this; plain HTTP when `None`.
    pub https: Option<crate::tls::https::ApiTls>,
    /// The expiry of each certificate the node uses (`/metrics`), kept
    /// current by the TLS rotation; `None` without TLS.
    pub certificates: Option<watch::Receiver<CertExpiries>>,
    /// The router's counters (`/metrics`), when it runs.
    pub router: Option<Arc<crate::router::RouterMetrics>>,
    /// The backup task (`/backup`, `/backups`, `/metrics`), when backups are on.
    pub backup: Option<crate::backup::BackupHandle>,
}

/// How long an operator request may wait for the agent's answer.
const OPERATOR_TIMEOUT: Duration = Duration::from_secs(120);

/// What every connection shares.
struct Shared {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    operator: Option<Operator>,
    /// The last snapshot rendered; replaced when the agent publishes a new one.
    rendered: Mutex<Arc<Rendered>>,
    stale_after: Duration,
    limits: Limits,
    /// HTTPS: every connection starts with a TLS handshake.
    tls: Option<crate::tls::https::ApiTls>,
    certificates: Option<watch::Receiver<CertExpiries>>,
    router: Option<Arc<crate::router::RouterMetrics>>,
    backup: Option<crate::backup::BackupHandle>,
}

impl Shared {
    fn current(&self) -> Arc<Rendered> {
        let snapshot = self.snapshots.borrow().clone();
        let cached = self
            .rendered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if Arc::ptr_eq(&cached.snapshot, &snapshot) {
            return cached;
        }
        // Two requests may render the same snapshot at once; either result is right.
        let fresh = Arc::new(Rendered::new(snapshot));
        *self.rendered.lock().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        fresh
    }
}

/// Serves the API on every listen address until `shutdown` is cancelled.
pub async fn serve(
    listen: Vec<SocketAddr>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stale_after: Duration,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with_operator(
        listen,
        IpFamily::Dual,
        snapshots,
        stale_after,
        None,
        shutdown,
    )
    .await
}

/// Serves the API including the operator endpoints, whose requests go to
/// the agent through `operator`.
pub async fn serve_with_operator(
    listen: Vec<SocketAddr>,
    family: IpFamily,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stale_after: Duration,
    operator: Option<Operator>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with_tls(
        listen,
        family,
        snapshots,
        stale_after,
        operator,
        ApiSetup::default(),
        shutdown,
    )
    .await
}

/// As [`serve_with_operator`], over HTTPS when `tls.https` is given.
pub async fn serve_with_tls(
    listen: Vec<SocketAddr>,
    family: IpFamily,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stale_after: Duration,
    operator: Option<Operator>,
    tls: ApiSetup,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listeners = bind_all_in(&listen, family)?;
    serve_listeners(
        listeners,
        snapshots,
        stale_after,
        Limits::default(),
        operator,
        tls,
        shutdown,
    )
    .await
}

/// Binds every address. An IPv6 wildcard (`[::]`) accepts IPv4 too, unless
/// an IPv4 address on the same port is listed: then each family gets its own
/// socket. Must run inside a tokio runtime.
pub fn bind_all(listen: &[SocketAddr]) -> std::io::Result<Vec<TcpListener>> {
    bind_all_in(listen, IpFamily::Dual)
}

/// [`bind_all`] under `ip_family`: with `ipv6`, an IPv6 wildcard accepts
/// IPv6 clients only.
pub fn bind_all_in(listen: &[SocketAddr], family: IpFamily) -> std::io::Result<Vec<TcpListener>> {
    let v4_ports: HashSet<u16> = listen
        .iter()
        .filter(|a| a.is_ipv4())
        .map(|a| a.port())
        .collect();
    let mut out = Vec::new();
    for addr in listen {
        let dual_stack = family == IpFamily::Dual
            && addr.is_ipv6()
            && addr.ip().is_unspecified()
            && !v4_ports.contains(&addr.port());
        let listener = crate::net::bind_listener(*addr, dual_stack)
            .map_err(|e| std::io::Error::new(e.kind(), format!("api.listen {addr}: {e}")))?;
        out.push(TcpListener::from_std(listener)?);
    }
    Ok(out)
}

/// Serves on already bound listeners until `shutdown` is cancelled, then
/// gives open connections a moment to finish.
pub async fn serve_on(
    listeners: Vec<TcpListener>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stale_after: Duration,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_listeners(
        listeners,
        snapshots,
        stale_after,
        limits,
        None,
        ApiSetup::default(),
        shutdown,
    )
    .await
}

async fn serve_listeners(
    listeners: Vec<TcpListener>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stale_after: Duration,
    limits: Limits,
    operator: Option<Operator>,
    tls: ApiSetup,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let first = Arc::new(Rendered::new(snapshots.borrow().clone()));
    let shared = Arc::new(Shared {
        operator,
        snapshots,
        rendered: Mutex::new(first),
        stale_after,
        limits,
        tls: tls.https,
        certificates: tls.certificates,
        router: tls.router,
        backup: tls.backup,
    });
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut tasks = Vec::new();
    for listener in listeners {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "api listening");
        }
        tasks.push(tokio::spawn(
            accept_loop(listener, shared.clone(), permits.clone(), shutdown.clone())
                .in_current_span(),
        ));
    }
    for t in tasks {
        let _ = t.await;
    }
    // Wait (bounded) for connections to drain: each holds a permit.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT * 2, permits.acquire_many(all)).await;
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    warn!(error = %e, "api accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let shared = shared.clone();
                let shutdown = shutdown.clone();
                let connection = async move {
                    match shared.tls.clone() {
                        None => serve_connection(stream, peer, false, shared, shutdown).await,
                        Some(tls) => {
                            // The handshake counts against the header timeout.
                            let timeout = shared.limits.header_read_timeout;
                            match tokio::time::timeout(timeout, tls.acceptor.accept(stream)).await {
                                Ok(Ok(stream)) => {
                                    // rustls only reports a certificate it verified.
                                    let client_cert =
                                        stream.get_ref().1.peer_certificates().is_some();
                                    serve_connection(stream, peer, client_cert, shared, shutdown)
                                        .await;
                                }
                                Ok(Err(e)) => debug!(%peer, error = %e, "api TLS handshake failed"),
                                Err(_) => debug!(%peer, "api TLS handshake timed out"),
                            }
                        }
                    }
                    drop(permit);
                };
                tokio::spawn(connection.in_current_span());
            }
            Err(_) => {
                debug!(%peer, "api connection limit reached: 503");
                tokio::spawn(refuse(stream).in_current_span());
            }
        }
    }
}

/// Answers 503 on a connection over the limit and closes it, without
/// reading from it.
async fn refuse(mut stream: TcpStream) {
    const BODY: &str = r#"{"error":"too many open connections"}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// One HTTP/1.1 connection; `client_cert` when the client presented a
/// certificate the CA verified (HTTPS with client authentication).
async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    client_cert: bool,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let header_read_timeout = shared.limits.header_read_timeout;
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(&shared, peer, client_cert, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
        }
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(routes::JSON));
    resp
}

/// The operator credentials check of a request that changes something:
/// the agent's operator side when it passes, else the refusal to send.
fn authorize<'a>(
    shared: &'a Shared,
    peer: SocketAddr,
    client_cert: bool,
    method: &hyper::Method,
    path: &str,
    authorization: Option<&str>,
) -> Result<&'a Operator, Box<Response<Full<Bytes>>>> {
    let message =
        |status: StatusCode, m: &str| json_response(status, &serde_json::json!({ "message": m }));
    let Some(op) = &shared.operator else {
        return Err(Box::new(message(
            StatusCode::SERVICE_UNAVAILABLE,
            "operator requests are not served here",
        )));
    };
    let needs_client_cert = shared
        .tls
        .as_ref()
        .is_some_and(|t| t.operator_needs_client_cert);
    let checked = if !needs_client_cert {
        op.auth.check(authorization, peer)
    } else if !client_cert {
        Err((
            StatusCode::FORBIDDEN,
            "operator requests need a client certificate signed by the cluster CA",
        ))
    } else if op.auth.has_credentials() {
        op.auth.check(authorization, peer)
    } else {
        // A verified client certificate stands in for the loopback rule.
        Ok(())
    };
    if let Err((status, why)) = checked {
        warn!(%peer, %method, path, status = status.as_u16(), why, "operator request refused");
        let mut resp = message(status, why);
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"pgha\", Basic realm=\"pgha\""),
            );
        }
        return Err(Box::new(resp));
    }
    Ok(op)
}

/// `POST /backup` (checked like an operator request) and `GET /backups`;
/// `None` for any other path.
async fn backup_request(
    shared: &Shared,
    peer: SocketAddr,
    client_cert: bool,
    parts: &hyper::http::request::Parts,
    body: &[u8],
) -> Option<Response<Full<Bytes>>> {
    let (method, path) = (&parts.method, parts.uri.path());
    let (status, body) = match (method.as_str(), path) {
        ("POST", "/backup") => {
            let authorization = parts
                .headers
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if let Err(refused) = authorize(shared, peer, client_cert, method, path, authorization)
            {
                return Some(*refused);
            }
            info!(%peer, %method, path, "operator request");
            backup::begin(shared.backup.as_ref(), body).await
        }
        ("GET", "/backups") => backup::list(shared.backup.as_ref()).await,
        (_, "/backup") => return Some(method_not_allowed("POST")),
        (_, "/backups") => return Some(method_not_allowed("GET")),
        _ => return None,
    };
    Some(json_response(status, &body))
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut resp = json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &serde_json::json!({ "message": format!("use {allow}") }),
    );
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    resp
}

/// Checks credentials, hands the request to the agent and relays its answer.
async fn operator_request(
    shared: &Shared,
    peer: SocketAddr,
    client_cert: bool,
    method: &hyper::Method,
    path: &str,
    authorization: Option<&str>,
    body: operator::Body<'_>,
) -> Response<Full<Bytes>> {
    let message =
        |status: StatusCode, m: &str| json_response(status, &serde_json::json!({ "message": m }));
    let op = match authorize(shared, peer, client_cert, method, path, authorization) {
        Ok(op) => op,
        Err(refused) => return *refused,
    };
    let request = match operator::parse(method, path, body) {
        Ok(r) => r,
        Err((status, why)) => return message(status, &why),
    };
    info!(%peer, %method, path, "operator request");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let call = crate::operator::Call { request, reply: tx };
    if op.calls.send(call).await.is_err() {
        return message(StatusCode::SERVICE_UNAVAILABLE, "the agent is not running");
    }
    match tokio::time::timeout(OPERATOR_TIMEOUT, rx).await {
        Ok(Ok(reply)) => json_response(
            StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &reply.body,
        ),
        Ok(Err(_)) => message(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent dropped the request",
        ),
        Err(_) => message(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent did not answer in time",
        ),
    }
}

/// `POST /failsafe` from the leader while etcd is unreachable: a peer
/// request, not an operator one (a confirmation only ever holds this node
/// back from an election it could not hold without etcd anyway).
fn failsafe_request(shared: &Shared, method: &hyper::Method, body: &[u8]) -> Response<Full<Bytes>> {
    let message =
        |status: StatusCode, m: &str| json_response(status, &serde_json::json!({ "message": m }));
    if method != hyper::Method::POST {
        let mut resp = message(StatusCode::METHOD_NOT_ALLOWED, "use POST");
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    let Some(op) = &shared.operator else {
        return message(StatusCode::SERVICE_UNAVAILABLE, "no agent behind this API");
    };
    let request: crate::failsafe::FailsafeRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return message(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"leader\": NAME}}: {e}"),
            )
        }
    };
    let snapshot = shared.snapshots.borrow().clone();
    let me = crate::failsafe::ReplicaView {
        node: &snapshot.me.name,
        dcs_reachable: snapshot.dcs_reachable,
        leader: snapshot.leader.as_deref(),
        is_replica: snapshot.me.role == crate::ha::MemberRole::Replica
            && status::running(&snapshot.me),
    };
    match op
        .failsafe
        .confirm(&me, &request, op.failsafe_ttl, std::time::Instant::now())
    {
        Ok(()) => {
            info!(leader = %request.leader, "failsafe: confirmed the leader while etcd is unreachable");
            json_response(
                StatusCode::OK,
                &serde_json::json!({ "confirmed": true, "node": snapshot.me.name }),
            )
        }
        Err(why) => message(StatusCode::CONFLICT, &why),
    }
}

fn respond(reply: Reply) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(reply.body));
    *resp.status_mut() = reply.status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    if reply.allow {
        headers.insert(ALLOW, HeaderValue::from_static(routes::ALLOWED_METHODS));
    }
    resp
}

/// An error answer after which the connection closes: the rest of the
/// request body is unread, so the next request cannot be found.
fn respond_and_close(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(routes::JSON));
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Refuses what RFC 9112 §6.3 calls a framing error, and what a proxy in
/// front could frame differently from us. hyper already answers 400 to
/// conflicting `Content-Length` values and to a `Transfer-Encoding` other
/// than chunked; a `Content-Length` next to `Transfer-Encoding` it drops
/// from the headers, so no request may carry `Transfer-Encoding` at all:
/// every endpoint takes small bodies and every client of ours sends a
/// length (Patroni, on Python's `http.server`, reads no chunked body either).
fn framing(method: &hyper::Method, headers: &hyper::HeaderMap) -> Result<(), &'static str> {
    if headers.contains_key(hyper::header::TRANSFER_ENCODING) {
        return Err("Transfer-Encoding is not accepted: send the body with a Content-Length");
    }
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    let length = match (lengths.next(), lengths.next()) {
        (None, _) => None,
        (Some(v), None) => {
            let text = v.to_str().map_err(|_| "Content-Length is not a number")?;
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err("Content-Length must be one decimal number");
            }
            Some(
                text.parse::<u64>()
                    .map_err(|_| "Content-Length is too large")?,
            )
        }
        (Some(_), Some(_)) => return Err("more than one Content-Length"),
    };
    let bodiless = matches!(
        *method,
        hyper::Method::GET
            | hyper::Method::HEAD
            | hyper::Method::OPTIONS
            | hyper::Method::DELETE
            | hyper::Method::TRACE
    );
    if bodiless && length.is_some_and(|n| n > 0) {
        return Err("this method takes no request body");
    }
    Ok(())
}

async fn handle(
    shared: &Shared,
    peer: SocketAddr,
    client_cert: bool,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let limits = shared.limits;
    let (parts, body) = req.into_parts();
    if let Err(why) = framing(&parts.method, &parts.headers) {
        warn!(%peer, method = %parts.method, path = parts.uri.path(), why, "request refused: framing");
        return respond_and_close(StatusCode::BAD_REQUEST, why);
    }
    let too_large = || format!("request body over {} bytes", limits.max_body_bytes);
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return respond_and_close(StatusCode::PAYLOAD_TOO_LARGE, &too_large());
    }
    // Read the body (operator requests carry JSON; for the others it must
    // be read for the connection to carry the next request).
    let mut body_bytes = Bytes::new();
    if body.size_hint().exact() != Some(0) {
        let read = tokio::time::timeout(
            limits.body_read_timeout,
            Limited::new(body, limits.max_body_bytes).collect(),
        );
        match read.await {
            Ok(Ok(collected)) => body_bytes = collected.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return respond_and_close(StatusCode::PAYLOAD_TOO_LARGE, &too_large());
            }
            Ok(Err(_)) => {
                return respond_and_close(StatusCode::BAD_REQUEST, "malformed request body")
            }
            Err(_) => {
                return respond_and_close(
                    StatusCode::REQUEST_TIMEOUT,
                    "request body not received in time",
                )
            }
        }
    }
    if parts.uri.path() == "/failsafe" {
        return failsafe_request(shared, &parts.method, &body_bytes);
    }
    if let Some(resp) = backup_request(shared, peer, client_cert, &parts, &body_bytes).await {
        return resp;
    }
    if operator::is_operator(&parts.method, parts.uri.path()) {
        let authorization = parts
            .headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        return operator_request(
            shared,
            peer,
            client_cert,
            &parts.method,
            parts.uri.path(),
            authorization,
            declared.map(|_| &body_bytes[..]),
        )
        .await;
    }
    let rendered = shared.current();
    let age = rendered.snapshot.taken_at.elapsed();
    let query = parts.uri.query().unwrap_or("");
    let certificates = shared
        .certificates
        .as_ref()
        .map(|c| c.borrow().clone())
        .unwrap_or_default();
    let backup = shared.backup.as_ref().map(|b| b.status.borrow().clone());
    let live = Live {
        certificates: &certificates,
        router: shared.router.as_deref(),
        backup: backup.as_ref(),
    };
    respond(route(
        &rendered,
        age,
        shared.stale_after,
        &live,
        &parts.method,
        parts.uri.path(),
        query,
    ))
}
