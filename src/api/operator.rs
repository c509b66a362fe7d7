//! Operator endpoints: parsing requests into `operator::Request`, checking
//! credentials, and answering with Patroni's status codes. The agent does
//! the work; this module only translates.

use std::net::SocketAddr;

use hyper::{Method, StatusCode};
use serde_json::Value;

use crate::config::{ApiConfig, Secret};
use crate::operator::Request;

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

fn parse_body(body: &[u8]) -> Result<Value, String> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_slice(body).map_err(|e| format!("request body is not valid JSON: {e}"))
}

fn string_field(doc: &Value, key: &str) -> Result<Option<String>, String> {
    match &doc[key] {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => Err(format!("{key}: expected a string, got {other}")),
    }
}

/// `scheduled_at` as an RFC 3339 time, in ms since the Unix epoch.
fn scheduled_at(doc: &Value) -> Result<Option<u64>, String> {
    let Some(text) = string_field(doc, "scheduled_at")? else {
        return Ok(None);
    };
    let t = humantime::parse_rfc3339_weak(&text)
        .map_err(|e| format!("scheduled_at: expected a time like \"2026-11-26T12:00:00Z\": {e}"))?;
    Ok(Some(
        t.duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_millis() as u64,
    ))
}

/// Turns an operator request into what the agent should do, or a 4xx.
pub fn parse(method: &Method, path: &str, body: &[u8]) -> Result<Request, (StatusCode, String)> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, m);
    let doc = parse_body(body).map_err(bad)?;
    if !doc.is_object() {
        return Err(bad("request body must be a JSON object".into()));
    }
    Ok(match (method.as_str(), path) {
        ("POST", "/switchover") => Request::Switchover {
            leader: string_field(&doc, "leader").map_err(bad)?,
            candidate: string_field(&doc, "candidate").map_err(bad)?,
            at_ms: scheduled_at(&doc).map_err(bad)?,
        },
        ("POST", "/failover") => {
            let candidate = string_field(&doc, "candidate")
                .map_err(bad)?
                .ok_or_else(|| bad("candidate: required for a failover".into()))?;
            let force = match &doc["force"] {
                Value::Null => false,
                Value::Bool(b) => *b,
                other => return Err(bad(format!("force: expected true or false, got {other}"))),
            };
            Request::Failover { candidate, force }
        }
        ("DELETE", "/switchover") => Request::CancelSwitchover,
        ("POST", "/restart") => {
            if doc.get("schedule").is_some() {
                return Err((
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "scheduled restarts are not supported".into(),
                ));
            }
            let pending_only = match &doc["restart_pending"] {
                Value::Null => false,
                Value::Bool(b) => *b,
                other => {
                    return Err(bad(format!(
                        "restart_pending: expected true or false, got {other}"
                    )))
                }
            };
            Request::Restart { pending_only }
        }
        ("DELETE", "/restart") => {
            return Err((StatusCode::NOT_FOUND, "no scheduled restart".into()))
        }
        ("POST", "/reload") => Request::Reload,
        ("POST", "/reinitialize") => Request::Reinitialize,
        ("POST", "/pause") => Request::PatchConfig(serde_json::json!({ "paused": true })),
        ("POST", "/resume") => Request::PatchConfig(serde_json::json!({ "paused": false })),
        ("PATCH", "/config") => Request::PatchConfig(doc),
        ("PUT", "/config") => Request::PutConfig(doc),
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
    fn requests_parse_with_clear_errors() {
        let post = Method::POST;
        assert_eq!(
            parse(&post, "/switchover", br#"{"leader":"n1","candidate":"n2"}"#).unwrap(),
            Request::Switchover {
                leader: Some("n1".into()),
                candidate: Some("n2".into()),
                at_ms: None
            }
        );
        assert!(matches!(
            parse(
                &post,
                "/switchover",
                br#"{"scheduled_at":"2030-01-01T00:00:00Z"}"#
            )
            .unwrap(),
            Request::Switchover { at_ms: Some(_), .. }
        ));
        assert_eq!(
            parse(&post, "/switchover", b"{nope").unwrap_err().0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            parse(&post, "/switchover", br#"{"candidate":5}"#)
                .unwrap_err()
                .0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            parse(&post, "/failover", b"{}").unwrap_err().0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            parse(&post, "/failover", br#"{"candidate":"n2","force":true}"#).unwrap(),
            Request::Failover {
                candidate: "n2".into(),
                force: true
            }
        );
        assert_eq!(
            parse(&post, "/pause", b"").unwrap(),
            Request::PatchConfig(serde_json::json!({"paused": true}))
        );
        assert_eq!(
            parse(&Method::DELETE, "/restart", b"").unwrap_err().0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            parse(&Method::PATCH, "/config", b"[1]").unwrap_err().0,
            StatusCode::BAD_REQUEST
        );
    }
}
