//! `POST /backup` (an operator request: begin a base backup on this node,
//! which must be the leader) and `GET /backups` (the repository's backups
//! and archive range, and what this node's backup task knows).

use hyper::StatusCode;
use serde_json::{json, Value};

use crate::backup::{BackupHandle, BackupStatus, Kind};

/// `POST /backup` with an optional `{"type": "full" | "diff" | "incr"}`.
pub async fn begin(handle: Option<&BackupHandle>, body: &[u8]) -> (StatusCode, Value) {
    let kind = if body.iter().all(u8::is_ascii_whitespace) {
        Kind::Full
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(o)) if o.keys().all(|k| k == "type") => match o.get("type") {
                None => Kind::Full,
                Some(t) => match t.as_str().and_then(Kind::parse) {
                    Some(k) => k,
                    None => {
                        return (
                            StatusCode::BAD_REQUEST,
                            json!({"message": format!("type: expected \"full\", \"diff\" or \"incr\", got {t}")}),
                        )
                    }
                },
            },
            Ok(Value::Object(_)) => {
                return (
                    StatusCode::BAD_REQUEST,
                    json!({"message": "unknown field: the body takes only \"type\""}),
                )
            }
            _ => {
                return (
                    StatusCode::BAD_REQUEST,
                    json!({"message": "expected a JSON object like {\"type\": \"full\"}"}),
                )
            }
        }
    };
    let Some(handle) = handle else {
        return off();
    };
    match handle.request(kind).await {
        Ok(message) => (
            StatusCode::ACCEPTED,
            json!({"message": message, "type": kind}),
        ),
        Err(why) => (StatusCode::CONFLICT, json!({"message": why})),
    }
}

/// `GET /backups`: read from the repository now.
pub async fn list(handle: Option<&BackupHandle>) -> (StatusCode, Value) {
    let Some(handle) = handle else {
        return off();
    };
    let status = handle.status.borrow().clone();
    match handle.info().await {
        Ok(repo) => (
            StatusCode::OK,
            json!({
                "backups": repo.backups,
                "wal_min": repo.wal_min,
                "wal_max": repo.wal_max,
                "repository_status": {"code": repo.status_code, "message": repo.status_message},
                "task": task_json(&status),
            }),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"message": format!("cannot read the repository: {e}"), "task": task_json(&status)}),
        ),
    }
}

/// What the node's backup task knows, for `/backups` and `/status`.
pub fn task_json(st: &BackupStatus) -> Value {
    json!({
        "stanza_ready": st.stanza_ready,
        "running": st.running.map(|(kind, since)| json!({"type": kind, "since": since})),
        "last_success": st.last_success.iter().map(|(k, t)| (k.as_str().to_owned(), json!(t))).collect::<serde_json::Map<_, _>>(),
        "failed_total": st.failed_total,
        "last_error": st.last_error,
    })
}

fn off() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"message": "backups are off on this node ([backup] enabled = false)"}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_backups_both_endpoints_say_they_are_off() {
        let (status, body) = begin(None, b"").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body["message"]
            .as_str()
            .unwrap()
            .contains("enabled = false"));
        let (status, _) = list(None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        // A bad body is a 400 whatever the node.
        for body in [
            &b"{\"type\":\"weekly\"}"[..],
            b"{\"kind\":\"full\"}",
            b"[1]",
            b"{",
        ] {
            let (status, answer) = begin(None, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        }
    }

    #[test]
    fn the_task_state_reads_as_json() {
        let mut st = BackupStatus::default();
        st.last_success.insert(Kind::Full, 7);
        st.running = Some((Kind::Diff, 9));
        let v = task_json(&st);
        assert_eq!(v["last_success"]["full"], 7);
        assert_eq!(v["running"]["type"], "diff");
        assert_eq!(v["stanza_ready"], false);
    }
}
