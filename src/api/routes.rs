//! Request routing: Patroni's health-check paths and status codes (200 when
//! the check holds, 503 when not), status documents and metrics, all
//! answered from a rendered snapshot. Pure: no I/O, the age is an argument.

use std::time::Duration;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::json;

use super::health::Health;
use super::metrics::{self, Live};
use super::status::{lag_bytes, replay_lag_bytes, Rendered};
use crate::ha::DynamicConfig;
use crate::snapshot::Snapshot;

pub const JSON: &str = "application/json";
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Methods every endpoint answers; the operator actions (POST, PATCH) come later.
pub const ALLOWED_METHODS: &str = "GET, HEAD, OPTIONS";

/// A routed answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    /// Empty for HEAD and OPTIONS.
    pub body: Bytes,
    /// Send an `Allow` header (405 and OPTIONS).
    pub allow: bool,
}

impl Reply {
    fn error(status: StatusCode, message: &str) -> Reply {
        Reply {
            status,
            content_type: JSON,
            body: Bytes::from(json!({ "error": message }).to_string()),
            allow: status == StatusCode::METHOD_NOT_ALLOWED,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Primary,
    Leader,
    StandbyLeader,
    Replica,
    ReadOnly,
    Sync,
    Async,
    Health,
    Liveness,
    Readiness,
    Status,
    Cluster,
    History,
    Config,
    Metrics,
}

impl Endpoint {
    fn from_path(path: &str) -> Option<Endpoint> {
        Some(match path {
            "/" | "/primary" | "/read-write" | "/master" => Endpoint::Primary,
            "/leader" => Endpoint::Leader,
            "/standby-leader" | "/standby_leader" => Endpoint::StandbyLeader,
            "/replica" => Endpoint::Replica,
            "/read-only" => Endpoint::ReadOnly,
            "/sync" | "/synchronous" => Endpoint::Sync,
            "/async" | "/asynchronous" => Endpoint::Async,
            "/health" => Endpoint::Health,
            "/liveness" => Endpoint::Liveness,
            "/readiness" => Endpoint::Readiness,
            "/status" | "/patroni" => Endpoint::Status,
            "/cluster" => Endpoint::Cluster,
            "/history" => Endpoint::History,
            "/config" => Endpoint::Config,
            "/metrics" => Endpoint::Metrics,
            _ => return None,
        })
    }
}

/// Which WAL position a lag filter measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LagMode {
    /// Replayed WAL: what reads on the replica see (default).
    #[default]
    Apply,
    /// Received (flushed) WAL: what a promotion would keep.
    Write,
}

/// The query parameters health checks understand. Unknown names are
/// ignored, as Patroni does, so load balancers may add their own.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filters {
    /// `lag=<bytes>` or with a unit (`16MB`, `1GB`).
    pub lag: Option<u64>,
    /// `mode=apply|write`: which position `lag` measures.
    pub mode: LagMode,
    /// `replication_state=streaming`.
    pub replication_state: Option<String>,
    /// `tag_<key>=<value>`.
    pub tags: Vec<(String, String)>,
}

/// Parses a query string. Errors name the parameter and what was wrong.
pub fn parse_query(query: &str) -> Result<Filters, String> {
    let mut f = Filters::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_key, raw_value) = match pair.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (pair, None),
        };
        let key =
            percent_decode(raw_key).map_err(|e| format!("query parameter {raw_key:?}: {e}"))?;
        let value = raw_value
            .map(percent_decode)
            .transpose()
            .map_err(|e| format!("query parameter {key:?}: {e}"))?;
        let known =
            matches!(key.as_str(), "lag" | "mode" | "replication_state") || key.starts_with("tag_");
        if !known {
            continue;
        }
        let Some(value) = value else {
            return Err(format!("query parameter {key:?} needs a value ({key}=...)"));
        };
        match key.as_str() {
            "lag" => {
                f.lag = Some(crate::config::parse_bytes(&value).map_err(|e| format!("lag: {e}"))?)
            }
            "mode" => {
                f.mode = match value.as_str() {
                    "apply" | "replay" => LagMode::Apply,
                    "write" | "receive" => LagMode::Write,
                    _ => {
                        return Err(format!(
                            "mode: expected \"apply\" or \"write\", got {value:?}"
                        ))
                    }
                }
            }
            "replication_state" => f.replication_state = Some(value),
            _ => {
                let tag = key.strip_prefix("tag_").expect("checked above");
                f.tags.push((tag.to_string(), value));
            }
        }
    }
    Ok(f)
}

/// Decodes `%XX` escapes and `+` (a space in form encoding); rejects broken
/// escapes and text that is not UTF-8.
fn percent_decode(text: &str) -> Result<String, String> {
    if !text.contains(['%', '+']) {
        return Ok(text.to_string());
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or("incomplete %-escape")?;
                let hex = std::str::from_utf8(hex).map_err(|_| "invalid %-escape")?;
                out.push(
                    u8::from_str_radix(hex, 16).map_err(|_| format!("invalid %-escape %{hex}"))?,
                );
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 once decoded".to_string())
}

fn tags_match(s: &Snapshot, f: &Filters) -> bool {
    let me = &s.me;
    f.tags.iter().all(|(k, v)| match k.as_str() {
        "nofailover" => v.eq_ignore_ascii_case(&me.nofailover.to_string()),
        "noloadbalance" => v.eq_ignore_ascii_case(&me.noloadbalance.to_string()),
        "nosync" => v.eq_ignore_ascii_case(&me.nosync.to_string()),
        "failover_priority" => *v == me.failover_priority.to_string(),
        _ => me.tags.get(k) == Some(v),
    })
}

/// This node's lag behind the leader as `mode` measures it.
fn my_lag(s: &Snapshot, mode: LagMode) -> Option<u64> {
    let leader = s.leader.as_deref();
    match mode {
        LagMode::Apply => replay_lag_bytes(&s.members, leader, &s.me),
        LagMode::Write => lag_bytes(&s.members, leader, &s.me),
    }
}

/// The `/replica` filters a running replica must also pass.
fn replica_filters_hold(s: &Snapshot, f: &Filters) -> bool {
    let lag_ok = f
        .lag
        .is_none_or(|max| my_lag(s, f.mode).is_some_and(|l| l <= max));
    let state_ok = f
        .replication_state
        .as_deref()
        .is_none_or(|want| s.me.state == want);
    lag_ok && state_ok && tags_match(s, f)
}

/// Routes one request against a rendered snapshot of age `age`; past
/// `stale_after` (the agent loop stopped publishing) every health check fails.
/// `live` holds what `/metrics` reads at the time of the request.
pub fn route(
    r: &Rendered,
    age: Duration,
    stale_after: Duration,
    live: &Live<'_>,
    method: &Method,
    path: &str,
    query: &str,
) -> Reply {
    let Some(endpoint) = Endpoint::from_path(path) else {
        return Reply::error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}"));
    };
    let with_body = match *method {
        Method::GET => true,
        Method::HEAD | Method::OPTIONS => false,
        _ => {
            return Reply::error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{path} allows {ALLOWED_METHODS}"),
            )
        }
    };
    let filters = match parse_query(query) {
        Ok(f) => f,
        Err(e) => return Reply::error(StatusCode::BAD_REQUEST, &e),
    };
    let s = &*r.snapshot;
    let h = Health::of(s, age, stale_after);
    let me = &s.me;
    let replica_ok = h.replica && replica_filters_hold(s, &filters);
    let (ok, content_type, body): (bool, &'static str, Option<Bytes>) = match endpoint {
        Endpoint::Primary => (h.primary, JSON, None),
        Endpoint::Leader => (h.leader, JSON, None),
        // No standby clusters (replicating from another cluster) yet.
        Endpoint::StandbyLeader => (false, JSON, None),
        Endpoint::Replica => (replica_ok && !me.noloadbalance, JSON, None),
        Endpoint::ReadOnly => (
            (h.primary && tags_match(s, &filters)) || (replica_ok && !me.noloadbalance),
            JSON,
            None,
        ),
        // A synchronous standby is one the leader's published claim names.
        Endpoint::Sync => (replica_ok && s.is_sync_standby(&me.name), JSON, None),
        Endpoint::Async => (replica_ok && !s.is_sync_standby(&me.name), JSON, None),
        Endpoint::Health => (h.running, JSON, None),
        Endpoint::Liveness => {
            let body = json!({
                "snapshot_age_ms": age.as_millis() as u64,
                "stale_after_ms": stale_after.as_millis() as u64,
            });
            (h.fresh, JSON, Some(Bytes::from(body.to_string())))
        }
        Endpoint::Readiness => {
            let max = filters.lag.unwrap_or_else(|| {
                s.config
                    .as_ref()
                    .map_or(DynamicConfig::default().maximum_lag_on_failover, |c| {
                        c.maximum_lag_on_failover
                    })
            });
            let caught_up =
                me.state == "streaming" && my_lag(s, filters.mode).is_some_and(|l| l <= max);
            (h.primary || (h.replica && caught_up), JSON, None)
        }
        Endpoint::Status => (true, JSON, None),
        Endpoint::Cluster => (true, JSON, Some(r.cluster.clone())),
        Endpoint::History => (true, JSON, Some(r.history.clone())),
        Endpoint::Config => match &r.config {
            Some(c) => (true, JSON, Some(c.clone())),
            None => {
                return Reply::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cluster config not read from etcd yet",
                )
            }
        },
        Endpoint::Metrics => {
            let text = if with_body {
                Bytes::from(metrics::render(s, age, stale_after, live))
            } else {
                Bytes::new()
            };
            (true, PROMETHEUS_TEXT, Some(text))
        }
    };
    let body = match (with_body, body) {
        (false, _) => Bytes::new(),
        (true, Some(b)) => b,
        (true, None) => r.status(age),
    };
    Reply {
        status: if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        content_type,
        body,
        allow: *method == Method::OPTIONS,
    }
}
