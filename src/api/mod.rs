//! HTTP API: health checks with Patroni's paths and status codes, and status
//! endpoints. Every answer comes from the snapshot the agent loop last
//! published; no request ever waits on Postgres or etcd.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::agent::Snapshot;
use crate::ha::{MemberRole, MemberStatus};

/// A routed answer: status and optional JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Option<Value>,
}

fn answer(ok: bool, body: Value) -> Answer {
    Answer { status: if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, body: Some(body) }
}

fn running(m: &MemberStatus) -> bool {
    matches!(m.state.as_str(), "running" | "streaming")
}

/// Lag of `m` behind the leader's WAL position, in bytes.
pub fn lag_bytes(members: &[MemberStatus], leader: Option<&str>, m: &MemberStatus) -> Option<u64> {
    let leader = members.iter().find(|x| Some(x.name.as_str()) == leader)?;
    let top = leader.wal_position?;
    if m.name == leader.name {
        return Some(0);
    }
    let pos = m.replay_lsn.max(m.receive_lsn).or(m.wal_position)?;
    Some(top.0.saturating_sub(pos.0))
}

fn member_json(s: &Snapshot, m: &MemberStatus) -> Value {
    let is_leader = s.leader.as_deref() == Some(m.name.as_str());
    json!({
        "name": m.name,
        "role": if is_leader && m.role == MemberRole::Primary { "primary".to_string() } else { m.role.to_string() },
        "state": m.state,
        "timeline": m.timeline,
        "leader": is_leader,
        "lag_bytes": lag_bytes(&s.members, s.leader.as_deref(), m),
        "wal_position": m.wal_position.map(|l| l.to_string()),
        "receive_lsn": m.receive_lsn.map(|l| l.to_string()),
        "replay_lsn": m.replay_lsn.map(|l| l.to_string()),
        "api_url": m.api_url,
        "pg_host": m.pg_host,
        "pg_port": m.pg_port,
        "host": crate::net::host_port(&m.pg_host, m.pg_port),
        "tags": m.tags,
        "nofailover": m.nofailover,
        "noloadbalance": m.noloadbalance,
        "failover_priority": m.failover_priority,
        "basebackup": m.basebackup,
        "version": m.version,
    })
}

fn status_json(s: &Snapshot, age: Duration) -> Value {
    let mut v = member_json(s, &s.me);
    let o = v.as_object_mut().expect("object");
    o.insert("scope".into(), json!(s.scope));
    o.insert("cluster_leader".into(), json!(s.leader));
    o.insert("term".into(), json!(s.leader_revision));
    o.insert("dcs_reachable".into(), json!(s.dcs_reachable));
    o.insert("snapshot_age_ms".into(), json!(age.as_millis() as u64));
    o.insert("lease_remaining_ms".into(), json!(s.lease_remaining.map(|d| d.as_millis() as u64)));
    o.insert("last_error".into(), json!(s.last_error));
    v
}

/// Routes one request against a snapshot of age `age`. `stale_after` is
/// the age past which health checks fail.
pub fn route(s: &Snapshot, age: Duration, stale_after: Duration, method: &Method, path: &str, query: &str) -> Answer {
    if method != Method::GET && method != Method::HEAD && method != Method::OPTIONS {
        return Answer { status: StatusCode::METHOD_NOT_ALLOWED, body: Some(json!({"error": "method not allowed"})) };
    }
    let fresh = age <= stale_after;
    let me = &s.me;
    let leads = s.leader.as_deref() == Some(me.name.as_str());
    let is_primary = fresh && leads && me.role == MemberRole::Primary && running(me);
    let is_replica = fresh && me.role == MemberRole::Replica && running(me);
    let body = status_json(s, age);
    match path {
        "/" | "/primary" | "/read-write" | "/master" => answer(is_primary, body),
        "/leader" => answer(fresh && leads, body),
        "/standby-leader" => answer(false, body),
        "/replica" => {
            let mut ok = is_replica && !me.noloadbalance;
            for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
                match k {
                    "lag" => match crate::config::parse_bytes(v) {
                        Ok(max) => ok &= lag_bytes(&s.members, s.leader.as_deref(), me).is_some_and(|l| l <= max),
                        Err(e) => return Answer { status: StatusCode::BAD_REQUEST, body: Some(json!({"error": format!("lag: {e}")})) },
                    },
                    "replication_state" => ok &= me.state == v,
                    _ => {
                        if let Some(tag) = k.strip_prefix("tag_") {
                            ok &= me.tags.get(tag).map(String::as_str) == Some(v);
                        }
                    }
                }
            }
            answer(ok, body)
        }
        "/read-only" => answer(is_primary || is_replica, body),
        "/health" => answer(fresh && running(me), body),
        "/liveness" => answer(fresh, json!({"snapshot_age_ms": age.as_millis() as u64})),
        "/readiness" => answer(is_primary || (is_replica && me.state == "streaming"), body),
        "/status" | "/patroni" => answer(true, body),
        "/cluster" => answer(
            true,
            json!({
                "scope": s.scope,
                "leader": s.leader,
                "term": s.leader_revision,
                "members": s.members.iter().map(|m| member_json(s, m)).collect::<Vec<_>>(),
            }),
        ),
        "/history" => answer(true, serde_json::to_value(&s.history).unwrap_or(Value::Null)),
        "/config" => answer(true, serde_json::to_value(&s.config).unwrap_or(Value::Null)),
        _ => Answer { status: StatusCode::NOT_FOUND, body: Some(json!({"error": format!("no such endpoint: {path}")})) },
    }
}

fn respond(method: &Method, a: Answer) -> Response<Full<Bytes>> {
    let body = match (&a.body, method) {
        (Some(v), &Method::GET) => Bytes::from(serde_json::to_vec(v).expect("json")),
        _ => Bytes::new(),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = a.status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Serves the API on every listen address until `shutdown` is cancelled.
pub async fn serve(
    listen: Vec<SocketAddr>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stale_after: Duration,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut listeners = Vec::new();
    for addr in &listen {
        let l = bind(*addr)?;
        tracing::info!(%addr, "api listening");
        listeners.push(l);
    }
    let mut tasks = Vec::new();
    for l in listeners {
        let snapshots = snapshots.clone();
        let shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = l.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let _ = stream.set_nodelay(true);
                let snapshots = snapshots.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let snap = snapshots.borrow().clone();
                        async move {
                            let age = snap.taken_at.elapsed();
                            let a = route(&snap, age, stale_after, req.method(), req.uri().path(), req.uri().query().unwrap_or(""));
                            Ok::<_, Infallible>(respond(req.method(), a))
                        }
                    });
                    let conn = http1::Builder::new()
                        .header_read_timeout(Duration::from_secs(5))
                        .timer(hyper_util::rt::TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), svc);
                    let _ = conn.await;
                });
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

/// Binds one address; an IPv6 wildcard is dual stack.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}
