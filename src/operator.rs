//! Operator requests (from the API and the CLI) and how they are answered:
//! the request types, the reply with Patroni's status codes, and the pure
//! validation of dynamic-config changes.

use serde_json::Value;
use tokio::sync::oneshot;

use crate::ha::{DynamicConfig, PgRole};

/// What an operator asks this node's agent to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Re-render the Postgres configuration and reload it.
    Reload,
    /// Restart the local Postgres in its current role (with `pending_only`,
    /// only if a changed setting waits for a restart; with `role`, only if
    /// Postgres runs in that role).
    Restart {
        pending_only: bool,
        role: Option<PgRole>,
    },
    /// Throw the local replica's data away and clone the leader again.
    Reinitialize,
    /// Merge this JSON object into the dynamic config (`null` resets a key).
    PatchConfig(Value),
    /// Replace the dynamic config.
    PutConfig(Value),
    /// Planned change of leader, now or at `at_ms` (ms since the Unix epoch).
    /// `leader` must be the leader now (412 otherwise).
    Switchover {
        leader: String,
        candidate: Option<String>,
        at_ms: Option<u64>,
    },
    /// Make `candidate` the leader: when a primary is healthy this is a
    /// switchover unless `force`; a `leader` given must be the leader now.
    Failover {
        leader: Option<String>,
        candidate: String,
        force: bool,
    },
    /// Cancel a pending (scheduled) switchover.
    CancelSwitchover,
}

/// The answer: an HTTP status (Patroni's codes) and a message or document.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    pub fn ok(body: Value) -> Reply {
        Reply { status: 200, body }
    }
    pub fn message(status: u16, message: impl Into<String>) -> Reply {
        Reply {
            status,
            body: serde_json::json!({ "message": message.into() }),
        }
    }
}

/// A request and where to send its reply.
#[derive(Debug)]
pub struct Call {
    pub request: Request,
    pub reply: oneshot::Sender<Reply>,
}

/// Applies a JSON merge patch (RFC 7386) to the dynamic config and checks
/// the result: unknown keys and wrong types are refused with the key named.
pub fn patch_config(current: &DynamicConfig, patch: &Value) -> Result<DynamicConfig, String> {
    let Value::Object(changes) = patch else {
        return Err("expected a JSON object of settings".into());
    };
    let mut doc = serde_json::to_value(current).expect("config serializes");
    let defaults = serde_json::to_value(DynamicConfig::default()).expect("config serializes");
    let obj = doc.as_object_mut().expect("object");
    for (key, value) in changes {
        if !defaults.as_object().expect("object").contains_key(key) {
            return Err(format!("{key}: unknown setting"));
        }
        match (obj.get_mut(key), value) {
            (_, Value::Null) => {
                obj.insert(key.clone(), defaults[key].clone());
            }
            // Objects merge (RFC 7386): `{"parameters": {"work_mem": null}}`
            // removes one parameter and keeps the others.
            (Some(Value::Object(existing)), Value::Object(change)) => {
                for (k, v) in change {
                    if v.is_null() {
                        existing.remove(k);
                    } else {
                        existing.insert(k.clone(), v.clone());
                    }
                }
            }
            _ => {
                obj.insert(key.clone(), value.clone());
            }
        }
    }
    parse_config(&doc)
}

/// Checks a whole dynamic config document.
pub fn parse_config(doc: &Value) -> Result<DynamicConfig, String> {
    let config: DynamicConfig = serde_path_to_error::deserialize(doc.clone()).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            inner
        } else {
            format!("{path}: {inner}")
        }
    })?;
    if config.synchronous_node_count == 0 {
        return Err("synchronous_node_count: expected at least 1".into());
    }
    for name in config.parameters.keys() {
        if crate::postgres::conf::MANAGED_PARAMETERS.contains(&name.as_str()) {
            return Err(format!(
                "parameters.{name}: set by pgha itself (from the node's config or synchronous_mode)"
            ));
        }
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            return Err(format!("parameters.{name}: not a Postgres parameter name"));
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patch_merges_resets_and_validates() {
        let base = DynamicConfig::default();
        let c = patch_config(
            &base,
            &json!({"paused": true, "maximum_lag_on_failover": 2048}),
        )
        .unwrap();
        assert!(c.paused);
        assert_eq!(c.maximum_lag_on_failover, 2048);
        let c = patch_config(&c, &json!({"maximum_lag_on_failover": null})).unwrap();
        assert_eq!(c.maximum_lag_on_failover, base.maximum_lag_on_failover);
        assert!(c.paused, "untouched keys stay");
        assert_eq!(
            patch_config(&base, &json!({"bogus": 1})).unwrap_err(),
            "bogus: unknown setting"
        );
        assert!(patch_config(&base, &json!({"paused": "yes"}))
            .unwrap_err()
            .starts_with("paused:"));
        assert!(patch_config(&base, &json!([1])).is_err());
    }

    #[test]
    fn put_needs_a_valid_document() {
        assert!(parse_config(&json!({"paused": true})).unwrap().paused);
        assert!(parse_config(&json!({"nope": true})).is_err());
    }
}
