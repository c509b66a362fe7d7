//! Operator endpoints: parsing requests into `operator::Request`, checking
//! credentials, and answering with Patroni's status codes. The agent does
//! the work; this module only translates.

use std::net::SocketAddr;

use hyper::{Method, StatusCode};
use serde_json::Value;

use serde::Deserialize;

use crate::config::{ApiConfig, Secret};
use crate::ha::{DynamicConfig, PgRole};
use crate::operator::{parse_config, patch_config, Request};

/// Who may call operator endpoints.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    pub token: Option<Secret>,
    pub basic: Option<(String, Secret)>,
}

impl Auth {
    pub fn from_config(api: &ApiConfig) -> Auth {
        Auth {
            token: api.token.clone(),
            basic: api.username.clone().zip(api.password.clone()),
        }
    }

    /// Whether a token or basic-auth credentials are configured.
    pub fn has_credentials(&self) -> bool {
        self.token.is_some() || self.basic.is_some()
    }

    /// `Ok` when the request may act; otherwise the status (401 or 403) and why.
    pub fn check(
        &self,
        authorization: Option<&str>,
        peer: SocketAddr,
    ) -> Result<(), (StatusCode, &'static str)> {
        if self.token.is_none() && self.basic.is_none() {
            // On a dual-stack socket an IPv4 client shows as ::ffff:a.b.c.d.
            return if peer.ip().to_canonical().is_loopback() {
                Ok(())
            } else {
                Err((StatusCode::FORBIDDEN, "no API credentials configured: operator requests are accepted from loopback only"))
            };
        }
        let Some(header) = authorization else {
            return Err((StatusCode::UNAUTHORIZED, "credentials required"));
        };
        let (scheme, value) = header.split_once(' ').unwrap_or((header, ""));
        let ok = match scheme.to_ascii_lowercase().as_str() {
            "bearer" => self
                .token
                .as_ref()
                .is_some_and(|t| constant_time_eq(t.expose().as_bytes(), value.trim().as_bytes())),
            "basic" => self.basic.as_ref().is_some_and(|(user, pw)| {
                let expected = base64_encode(format!("{user}:{}", pw.expose()).as_bytes());
                constant_time_eq(expected.as_bytes(), value.trim().as_bytes())
            }),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err((StatusCode::UNAUTHORIZED, "invalid credentials"))
        }
    }
}

/// Compares without an early exit, so the time taken does not reveal how
/// much of a secret matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

pub fn base64_encode(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Whether (method, path) is an operator endpoint.
pub fn is_operator(method: &Method, path: &str) -> bool {
    matches!(
        (method.as_str(), path),
        (
            "POST",
            "/switchover"
                | "/failover"
                | "/restart"
                | "/reload"
                | "/reinitialize"
                | "/pause"
                | "/resume"
        ) | ("DELETE", "/switchover" | "/restart")
            | ("PATCH" | "PUT", "/config")
    )
}

/// An operator request body as sent: `None` without a `Content-Length`
/// (nothing declared), `Some` with the bytes received (maybe none).
pub type Body<'a> = Option<&'a [u8]>;

/// Why a request is refused before it reaches the agent: the status and
/// a message naming the field.
pub type Refusal = (StatusCode, String);

fn bad(m: impl Into<String>) -> Refusal {
    (StatusCode::BAD_REQUEST, m.into())
}

/// Parses a body into `T`, refusing unknown fields, wrong types and
/// invalid values with the field named. `required` endpoints refuse an
/// absent body (411, as Patroni) and an empty one (400); the others read
/// an empty body as `{}`.
fn strict<T: serde::de::DeserializeOwned>(body: Body, required: &str) -> Result<T, Refusal> {
    let empty = body.is_none_or(|b| b.iter().all(|c| c.is_ascii_whitespace()));
    if empty && !required.is_empty() {
        let status = if body.is_none() {
            StatusCode::LENGTH_REQUIRED
        } else {
            StatusCode::BAD_REQUEST
        };
        return Err((status, format!("a JSON body is required: {required}")));
    }
    let text: &[u8] = if empty {
        b"{}"
    } else {
        body.unwrap_or_default()
    };
    let value: Value = serde_json::from_slice(text)
        .map_err(|e| bad(format!("request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(bad("request body must be a JSON object"));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        bad(if path == "." {
            inner
        } else {
            format!("{path}: {inner}")
        })
    })
}

/// A name field that must not be empty when given.
fn name(field: &str, value: Option<String>) -> Result<Option<String>, Refusal> {
    match value {
        Some(v) if v.trim().is_empty() => Err(bad(format!("{field}: must not be empty"))),
        v => Ok(v),
    }
}

/// Endpoints that take no parameters: an empty body or `{}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParameters {}

/// `POST /switchover`, as Patroni: the current leader must be named so a
/// stray or stale request cannot move the primary.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchoverBody {
    leader: String,
    #[serde(default, alias = "member")]
    candidate: Option<String>,
    #[serde(default)]
    scheduled_at: Option<String>,
}

/// `POST /failover`: the candidate must be named.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverBody {
    #[serde(alias = "member")]
    candidate: String,
    #[serde(default)]
    leader: Option<String>,
    #[serde(default)]
    force: bool,
}

/// `POST /restart`: every field is a condition; a condition that cannot be
/// parsed is refused, never read as "no condition".
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestartBody {
    #[serde(default)]
    restart_pending: bool,
    #[serde(default)]
    role: Option<RestartRole>,
    #[serde(default)]
    schedule: Option<Value>,
}

/// The roles `POST /restart` can be limited to.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RestartRole {
    Primary,
    Replica,
}

/// `POST /reinitialize`: `force` is accepted (patronictl always sends it)
/// but never cancels a job in progress: a busy node still answers 409.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReinitializeBody {
    #[serde(default)]
    #[allow(dead_code)]
    force: bool,
}

/// `scheduled_at` as an RFC 3339 time in UTC, in ms since the Unix epoch.
fn scheduled_at(text: Option<String>) -> Result<Option<u64>, Refusal> {
    let Some(text) = name("scheduled_at", text)? else {
        return Ok(None);
    };
    let t = humantime::parse_rfc3339_weak(&text).map_err(|e| {
        bad(format!(
            "scheduled_at: expected a UTC time like \"2026-11-26T12:00:00Z\", got {text:?}: {e}"
        ))
    })?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| bad("scheduled_at: before 1970"))?
        .as_millis() as u64;
    Ok(Some(ms))
}

/// Turns an operator request into what the agent should do, or a 4xx.
/// `body` is `None` when the request declared no body at all.
pub fn parse(method: &Method, path: &str, body: Body) -> Result<Request, Refusal> {
    const SWITCHOVER: &str = r#"{"leader": NAME, "candidate": NAME?, "scheduled_at": TIME?}"#;
    const FAILOVER: &str = r#"{"candidate": NAME, "leader": NAME?, "force": BOOL?}"#;
    const CONFIG: &str = "a JSON object of dynamic settings";
    Ok(match (method.as_str(), path) {
        ("POST", "/switchover") => {
            let b: SwitchoverBody = strict(body, SWITCHOVER)?;
            let leader = name("leader", Some(b.leader))?.expect("given");
            let candidate = name("candidate", b.candidate)?;
            if candidate.as_ref() == Some(&leader) {
                return Err(bad("candidate: the same as leader"));
            }
            Request::Switchover {
                leader,
                candidate,
                at_ms: scheduled_at(b.scheduled_at)?,
            }
        }
        ("POST", "/failover") => {
            let b: FailoverBody = strict(body, FAILOVER)?;
            let candidate = name("candidate", Some(b.candidate))?.expect("given");
            let leader = name("leader", b.leader)?;
            if leader.as_ref() == Some(&candidate) {
                return Err(bad("candidate: the same as leader"));
            }
            Request::Failover {
                leader,
                candidate,
                force: b.force,
            }
        }
        ("DELETE", "/switchover") => {
            strict::<NoParameters>(body, "")?;
            Request::CancelSwitchover
        }
        ("POST", "/restart") => {
            let b: RestartBody = strict(body, "")?;
            if b.schedule.is_some() {
                return Err((
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "scheduled restarts are not supported".into(),
                ));
            }
            Request::Restart {
                pending_only: b.restart_pending,
                role: b.role.map(|r| match r {
                    RestartRole::Primary => PgRole::Primary,
                    RestartRole::Replica => PgRole::Replica,
                }),
            }
        }
        ("DELETE", "/restart") => {
            strict::<NoParameters>(body, "")?;
            return Err((StatusCode::NOT_FOUND, "no scheduled restart".into()));
        }
        ("POST", "/reload") => {
            strict::<NoParameters>(body, "")?;
            Request::Reload
        }
        ("POST", "/reinitialize") => {
            strict::<ReinitializeBody>(body, "")?;
            Request::Reinitialize
        }
        ("POST", "/pause") => {
            strict::<NoParameters>(body, "")?;
            Request::PatchConfig(serde_json::json!({ "paused": true }))
        }
        ("POST", "/resume") => {
            strict::<NoParameters>(body, "")?;
            Request::PatchConfig(serde_json::json!({ "paused": false }))
        }
        ("PATCH", "/config") => {
            let doc: Value = strict(body, CONFIG)?;
            // Checked against the defaults here so a typo is a 400; the
            // agent checks again against the current config.
            patch_config(&DynamicConfig::default(), &doc).map_err(bad)?;
            Request::PatchConfig(doc)
        }
        ("PUT", "/config") => {
            let doc: Value = strict(body, CONFIG)?;
            parse_config(&doc).map_err(bad)?;
            Request::PutConfig(doc)
        }
        _ => {
            return Err((
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {method} {path}"),
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str) -> SocketAddr {
        format!("{ip}:40000").parse().unwrap()
    }

    #[test]
    fn without_credentials_only_loopback_may_act() {
        let auth = Auth::default();
        assert!(auth.check(None, peer("127.0.0.1")).is_ok());
        assert!(auth.check(None, "[::1]:1".parse().unwrap()).is_ok());
        // An IPv4 client of a dual-stack listener.
        assert!(auth
            .check(None, "[::ffff:127.0.0.1]:1".parse().unwrap())
            .is_ok());
        assert_eq!(
            auth.check(None, peer("10.0.0.5")).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            auth.check(None, "[::ffff:10.0.0.5]:1".parse().unwrap())
                .unwrap_err()
                .0,
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn token_and_basic_credentials_are_checked() {
        let auth = Auth {
            token: Some(Secret::new("s3cret")),
            basic: Some(("admin".into(), Secret::new("pw"))),
        };
        let p = peer("127.0.0.1");
        assert_eq!(
            auth.check(None, p).unwrap_err().0,
            StatusCode::UNAUTHORIZED,
            "loopback needs them too once configured"
        );
        assert_eq!(
            auth.check(Some("Bearer wrong"), p).unwrap_err().0,
            StatusCode::UNAUTHORIZED
        );
        assert!(auth.check(Some("Bearer s3cret"), p).is_ok());
        assert!(auth
            .check(Some(&format!("Basic {}", base64_encode(b"admin:pw"))), p)
            .is_ok());
        assert!(auth
            .check(Some(&format!("Basic {}", base64_encode(b"admin:no"))), p)
            .is_err());
        assert!(auth.check(Some("Digest x"), p).is_err());
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), enc);
        }
    }

    #[test]
    fn requests_parse_into_what_they_say() {
        let ok = |m: Method, path: &str, body: Option<&str>| {
            parse(&m, path, body.map(str::as_bytes)).unwrap_or_else(|e| panic!("{path}: {e:?}"))
        };
        assert_eq!(
            ok(
                Method::POST,
                "/switchover",
                Some(r#"{"leader":"n1","candidate":"n2"}"#)
            ),
            Request::Switchover {
                leader: "n1".into(),
                candidate: Some("n2".into()),
                at_ms: None
            }
        );
        assert!(matches!(
            ok(
                Method::POST,
                "/switchover",
                Some(r#"{"leader":"n1","scheduled_at":"2030-01-01T00:00:00Z"}"#)
            ),
            Request::Switchover { at_ms: Some(_), .. }
        ));
        assert_eq!(
            ok(
                Method::POST,
                "/failover",
                Some(r#"{"member":"n2","force":true}"#)
            ),
            Request::Failover {
                leader: None,
                candidate: "n2".into(),
                force: true
            }
        );
        assert_eq!(
            ok(Method::POST, "/restart", Some(r#"{"role":"replica"}"#)),
            Request::Restart {
                pending_only: false,
                role: Some(PgRole::Replica)
            }
        );
        assert_eq!(
            ok(Method::POST, "/restart", None),
            Request::Restart {
                pending_only: false,
                role: None
            }
        );
        let paused = Request::PatchConfig(serde_json::json!({"paused": true}));
        assert_eq!(ok(Method::POST, "/pause", None), paused);
        assert_eq!(ok(Method::POST, "/pause", Some("")), paused);
        assert_eq!(ok(Method::POST, "/pause", Some(" {} ")), paused);
        assert_eq!(ok(Method::POST, "/reload", None), Request::Reload);
        assert_eq!(
            ok(Method::POST, "/reinitialize", Some(r#"{"force":false}"#)),
            Request::Reinitialize
        );
        assert_eq!(
            ok(Method::DELETE, "/switchover", None),
            Request::CancelSwitchover
        );
        assert!(matches!(
            ok(
                Method::PATCH,
                "/config",
                Some(r#"{"maximum_lag_on_failover":2048}"#)
            ),
            Request::PatchConfig(_)
        ));
    }

    #[test]
    fn malformed_requests_are_refused_with_the_field_named() {
        use Method as M;
        // (method, path, body, status, what the message must contain)
        let table: &[(Method, &str, Option<&str>, u16, &str)] = &[
            (M::POST, "/switchover", None, 411, "leader"),
            (M::POST, "/switchover", Some(""), 400, "leader"),
            (M::POST, "/switchover", Some("  \n"), 400, "leader"),
            (
                M::POST,
                "/switchover",
                Some("{}"),
                400,
                "missing field `leader`",
            ),
            (M::POST, "/switchover", Some("null"), 400, "JSON object"),
            (M::POST, "/switchover", Some("[]"), 400, "JSON object"),
            (M::POST, "/switchover", Some(r#""n1""#), 400, "JSON object"),
            (M::POST, "/switchover", Some("{nope"), 400, "not valid JSON"),
            (
                M::POST,
                "/switchover",
                Some(r#"{"leader":5}"#),
                400,
                "leader: invalid type: integer `5`, expected a string",
            ),
            (
                M::POST,
                "/switchover",
                Some(r#"{"leader":null}"#),
                400,
                "leader",
            ),
            (
                M::POST,
                "/switchover",
                Some(r#"{"leader":""}"#),
                400,
                "leader: must not be empty",
            ),
            (
                M::POST,
                "/switchover",
                Some(r#"{"leader":"n1","candidate":5}"#),
                400,
                "candidate: invalid type",
            ),
            (
                M::POST,
                "/switchover",
                Some(r#"{"leader":"n1","candidate":""}"#),
                400,
                "candidate: must not be empty",
            ),
            (
                M::POST,
                "/switchover",
                Some(r#"{"leader":"n1","candidate":"n1"}"#),
                400,
                "same as leader",
            ),
            (
                M::POST,
                "/switchover",
                Some(r#"{"leader":"n1","cnadidate":"n2"}"#),
                400,
                "unknown field `cnadidate`",
            ),
            (
                M::POST,
                "/switchover",
                Some(r#"{"leader":"n1","scheduled_at":"tomorrow"}"#),
                400,
                "scheduled_at",
            ),
            (
                M::POST,
                "/switchover",
                Some(r#"{"leader":"n1","scheduled_at":1}"#),
                400,
                "scheduled_at: invalid type",
            ),
            (M::POST, "/failover", None, 411, "candidate"),
            (
                M::POST,
                "/failover",
                Some("{}"),
                400,
                "missing field `candidate`",
            ),
            (
                M::POST,
                "/failover",
                Some(r#"{"candidate":"n2","force":"yes"}"#),
                400,
                "force: invalid type: string \"yes\", expected a boolean",
            ),
            (
                M::POST,
                "/failover",
                Some(r#"{"candidate":"n2","scheduled_at":"2030-01-01T00:00:00Z"}"#),
                400,
                "unknown field `scheduled_at`",
            ),
            (
                M::POST,
                "/restart",
                Some(r#"{"role":"no-such-role"}"#),
                400,
                "unknown variant `no-such-role`, expected `primary` or `replica`",
            ),
            (M::POST, "/restart", Some(r#"{"role":1}"#), 400, "role"),
            (
                M::POST,
                "/restart",
                Some(r#"{"restart_pending":"true"}"#),
                400,
                "restart_pending: invalid type",
            ),
            (
                M::POST,
                "/restart",
                Some(r#"{"postgres_version":"16"}"#),
                400,
                "unknown field `postgres_version`",
            ),
            (
                M::POST,
                "/restart",
                Some(r#"{"schedule":"2030-01-01T00:00:00Z"}"#),
                422,
                "not supported",
            ),
            (
                M::POST,
                "/reload",
                Some(r#"{"now":true}"#),
                400,
                "unknown field `now`",
            ),
            (M::POST, "/pause", Some("[]"), 400, "JSON object"),
            (
                M::POST,
                "/resume",
                Some(r#"{"paused":false}"#),
                400,
                "unknown field `paused`",
            ),
            (
                M::POST,
                "/reinitialize",
                Some(r#"{"from_leader":true}"#),
                400,
                "unknown field `from_leader`",
            ),
            (
                M::DELETE,
                "/switchover",
                Some(r#"{"leader":"n1"}"#),
                400,
                "unknown field `leader`",
            ),
            (M::DELETE, "/restart", None, 404, "no scheduled restart"),
            (M::PATCH, "/config", None, 411, "JSON object"),
            (M::PATCH, "/config", Some(""), 400, "JSON object"),
            (M::PATCH, "/config", Some("[1]"), 400, "JSON object"),
            (
                M::PATCH,
                "/config",
                Some(r#"{"bogus":1}"#),
                400,
                "bogus: unknown setting",
            ),
            (
                M::PATCH,
                "/config",
                Some(r#"{"paused":"yes"}"#),
                400,
                "paused",
            ),
            (M::PUT, "/config", Some(r#"{"nope":true}"#), 400, "nope"),
        ];
        for (method, path, body, status, needle) in table {
            let (got, why) = parse(method, path, body.map(str::as_bytes))
                .expect_err(&format!("{method} {path} {body:?} must be refused"));
            assert_eq!(got.as_u16(), *status, "{method} {path} {body:?}: {why}");
            assert!(
                why.contains(needle),
                "{method} {path} {body:?}: {why:?} should mention {needle:?}"
            );
        }
    }
}
