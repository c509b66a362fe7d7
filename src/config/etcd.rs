//! The `[etcd]` section: endpoints, key prefix, dial timeout, credentials.

use std::net::Ipv6Addr;
use std::time::Duration;

use serde::Deserialize;

use super::context::{secret, Context};
use super::env::EnvKind;
use super::values::{FileDuration, OneOrMany};
use super::{ConfigError, Secret};

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `http://host:port` URLs (IPv6 literals in brackets).
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster, always ending in `/`: `<namespace>/<scope>/`.
    pub prefix: String,
    pub dial_timeout: Duration,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

const DEFAULT_NAMESPACE: &str = "/pgha";
const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) const KEYS: &[(&str, EnvKind)] = &[
    ("etcd.endpoints", EnvKind::List),
    ("etcd.namespace", EnvKind::Text),
    ("etcd.dial_timeout", EnvKind::Text),
    ("etcd.username", EnvKind::Text),
    ("etcd.password", EnvKind::Text),
    ("etcd.password_file", EnvKind::Text),
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileEtcd {
    endpoints: OneOrMany,
    namespace: Option<String>,
    dial_timeout: Option<FileDuration>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<String>,
}

impl FileEtcd {
    pub(super) fn validate(self, cx: &Context<'_>, scope: &str) -> Result<EtcdConfig, ConfigError> {
        let endpoints = self
            .endpoints
            .0
            .iter()
            .map(|endpoint| {
                etcd_endpoint(endpoint).map_err(|msg| cx.invalid("etcd.endpoints", msg))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(cx.invalid(
                "etcd.endpoints",
                "expected at least one endpoint, like \"http://127.0.0.1:2379\"",
            ));
        }
        let dial_timeout = self.dial_timeout.map_or(DEFAULT_DIAL_TIMEOUT, |d| d.0);
        if dial_timeout.is_zero() {
            return Err(cx.invalid("etcd.dial_timeout", "must be more than 0s"));
        }
        Ok(EtcdConfig {
            endpoints,
            prefix: etcd_prefix(
                self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE),
                scope,
            ),
            dial_timeout,
            username: self.username.filter(|u| !u.is_empty()),
            password: secret(cx, "etcd", self.password, self.password_file)?,
        })
    }
}

/// `http(s)://host:port` from a URL or a bare `host:port`.
fn etcd_endpoint(text: &str) -> Result<String, String> {
    let invalid = |why: &str| {
        format!("expected URLs like \"http://127.0.0.1:2379\" or \"http://[::1]:2379\"{why}, got {text:?}")
    };
    let trimmed = text.trim();
    let (scheme, authority) = trimmed.split_once("://").unwrap_or(("http", trimmed));
    if scheme != "http" && scheme != "https" {
        return Err(invalid(" (http or https)"));
    }
    let authority = authority.trim_end_matches('/');
    if authority.contains('/') {
        return Err(invalid(" (no path)"));
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (address, port) = rest
            .split_once("]:")
            .ok_or_else(|| invalid(" with a port"))?;
        address
            .parse::<Ipv6Addr>()
            .map_err(|_| invalid(" (bad IPv6 address)"))?;
        (address, port)
    } else {
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| invalid(" with a port"))?;
        if host.contains(':') {
            return Err(invalid(" (IPv6 addresses go in brackets)"));
        }
        (host, port)
    };
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(invalid(""));
    }
    Ok(format!("{scheme}://{authority}"))
}

/// `<namespace>/<scope>/` with exactly one leading and one trailing slash.
fn etcd_prefix(namespace: &str, scope: &str) -> String {
    let mut prefix = String::from("/");
    for part in namespace.split('/').filter(|p| !p.is_empty()) {
        prefix.push_str(part);
        prefix.push('/');
    }
    prefix.push_str(scope);
    prefix.push('/');
    prefix
}

#[cfg(test)]
mod tests {
    use crate::config::testing::*;

    #[test]
    fn namespace_is_normalised() {
        for (namespace, prefix) in [
            ("/pgha", "/pgha/demo/"),
            ("pgha", "/pgha/demo/"),
            ("/pgha/", "/pgha/demo/"),
            ("//a//b/", "/a/b/demo/"),
            ("/", "/demo/"),
            ("", "/demo/"),
        ] {
            let config = parse(&with("etcd", &format!("namespace = {namespace:?}"))).unwrap();
            assert_eq!(config.etcd.prefix, prefix, "namespace {namespace:?}");
        }
    }
}
