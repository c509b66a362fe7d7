//! The `[router]` section: the TCP router in every agent that forwards the
//! application's connections to the current primary (and, optionally, spreads
//! read-only connections over the replicas). Off unless `enabled = true`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

use super::api::ApiConfig;
use super::context::Context;
use super::env::EnvKind;
use super::postgres::PostgresConfig;
use super::values::{convert_value, describe, FileDuration};
use super::ConfigError;
use crate::net::IpFamily;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterConfig {
    /// Whether the agent runs the router at all.
    pub enabled: bool,
    /// The read-write listener: connections go to the primary.
    pub listen: SocketAddr,
    /// The read-only listener, if any: connections go to the replicas.
    pub replica_listen: Option<SocketAddr>,
    /// Whether the read-only listener sends connections to the primary while
    /// no replica is routable (else they are held like read-write ones).
    pub replica_fallback: bool,
    /// How long a new connection waits for a routable backend before it is
    /// closed; zero closes it at once.
    pub hold_timeout: Duration,
    /// How long connecting to a backend may take.
    pub connect_timeout: Duration,
    /// TCP keepalive idle time (and probe interval) on both sides of a relay.
    pub keepalive: Duration,
    /// Whether an IPv6 wildcard listener (`[::]`) accepts IPv4 clients too
    /// (false under `ip_family = "ipv6"`).
    pub dual_stack: bool,
}

const DEFAULT_PORT: u16 = 5432;
const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(10);

impl Default for RouterConfig {
    /// The defaults of the file (router off, `[::]:5432`, dual stack).
    fn default() -> Self {
        RouterConfig::defaults_in(IpFamily::Dual)
    }
}

impl RouterConfig {
    fn defaults_in(family: IpFamily) -> Self {
        RouterConfig {
            enabled: false,
            listen: SocketAddr::new(family.wildcard(), DEFAULT_PORT),
            replica_listen: None,
            replica_fallback: false,
            hold_timeout: DEFAULT_HOLD_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            keepalive: DEFAULT_KEEPALIVE,
            dual_stack: family == IpFamily::Dual,
        }
    }
}

pub(super) const KEYS: &[(&str, EnvKind)] = &[
    ("router.enabled", EnvKind::Boolean),
    ("router.listen", EnvKind::Text),
    ("router.replica_listen", EnvKind::Text),
    ("router.replica_fallback", EnvKind::Boolean),
    ("router.hold_timeout", EnvKind::Text),
    ("router.connect_timeout", EnvKind::Text),
    ("router.keepalive", EnvKind::Text),
];

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRouter {
    enabled: Option<bool>,
    listen: Option<ListenAddr>,
    replica_listen: Option<ListenAddr>,
    replica_fallback: Option<bool>,
    hold_timeout: Option<FileDuration>,
    connect_timeout: Option<FileDuration>,
    keepalive: Option<FileDuration>,
}

/// `host:port` with an IP address (`[v6]:port` for IPv6) and a port 1..65535.
struct ListenAddr(SocketAddr);

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        convert_value(d, |value| {
            value
                .as_str()
                .and_then(|s| s.trim().parse::<SocketAddr>().ok())
                .filter(|addr| addr.port() != 0)
                .map(ListenAddr)
                .ok_or_else(|| {
                    format!(
                        "expected an address like \"[::]:5432\", \"[fdaa::2]:5432\" or \"0.0.0.0:5432\", got {}",
                        describe(value)
                    )
                })
        })
    }
}

impl FileRouter {
    pub(super) fn validate(
        self,
        cx: &Context<'_>,
        family: IpFamily,
        postgresql: &PostgresConfig,
        api: &ApiConfig,
    ) -> Result<RouterConfig, ConfigError> {
        let defaults = RouterConfig::defaults_in(family);
        let listen = self.listen.map_or(defaults.listen, |a| a.0);
        let replica_listen = self.replica_listen.map(|a| a.0);
        for (key, addr) in [
            ("router.listen", Some(listen)),
            ("router.replica_listen", replica_listen),
        ] {
            if let Some(addr) = addr.filter(|a| !family.allows(a.ip())) {
                return Err(cx.invalid(
                    key,
                    format!(
                        "\"{addr}\" is not an address of ip_family {:?}",
                        family.as_str()
                    ),
                ));
            }
        }
        let positive = |key: &str, value: Option<FileDuration>, default: Duration| {
            let d = value.map_or(default, |d| d.0);
            if d.is_zero() {
                Err(cx.invalid(key, "expected a duration of more than 0s, like \"3s\""))
            } else {
                Ok(d)
            }
        };
        let connect_timeout = positive(
            "router.connect_timeout",
            self.connect_timeout,
            defaults.connect_timeout,
        )?;
        let keepalive = positive("router.keepalive", self.keepalive, defaults.keepalive)?;
        if keepalive < Duration::from_secs(1) || keepalive.subsec_nanos() != 0 {
            return Err(cx.invalid(
                "router.keepalive",
                format!(
                    "expected whole seconds, at least 1s (TCP keepalive counts seconds), got {}",
                    humantime::format_duration(keepalive)
                ),
            ));
        }
        let config = RouterConfig {
            enabled: self.enabled.unwrap_or(defaults.enabled),
            listen,
            replica_listen,
            replica_fallback: self.replica_fallback.unwrap_or(defaults.replica_fallback),
            hold_timeout: self.hold_timeout.map_or(defaults.hold_timeout, |d| d.0),
            connect_timeout,
            keepalive,
            dual_stack: defaults.dual_stack,
        };
        if config.enabled {
            config.check_ports(cx, postgresql, api)?;
        }
        Ok(config)
    }
}

impl RouterConfig {
    /// A router listener cannot share a port with Postgres, the API or the
    /// other listener on an overlapping address: the bind would fail at start.
    fn check_ports(
        &self,
        cx: &Context<'_>,
        postgresql: &PostgresConfig,
        api: &ApiConfig,
    ) -> Result<(), ConfigError> {
        let listeners = [
            ("router.listen", Some(self.listen)),
            ("router.replica_listen", self.replica_listen),
        ];
        for (key, addr) in listeners {
            let Some(addr) = addr else { continue };
            if addr.port() == postgresql.port
                && postgresql
                    .listen_addresses
                    .split(',')
                    .any(|entry| postgres_overlaps(entry, addr.ip()))
            {
                return Err(cx.invalid(
                    key,
                    format!(
                        "\"{addr}\" takes port {} from Postgres (postgresql.port): move one of them, e.g. postgresql.port = 5433",
                        postgresql.port
                    ),
                ));
            }
            if let Some(taken) = api.listen.iter().find(|a| overlaps(**a, addr)) {
                return Err(cx.invalid(
                    key,
                    format!("\"{addr}\" takes the port of api.listen \"{taken}\""),
                ));
            }
        }
        if let Some(ro) = self.replica_listen.filter(|ro| overlaps(*ro, self.listen)) {
            return Err(cx.invalid(
                "router.replica_listen",
                format!(
                    "\"{ro}\" takes the port of router.listen \"{}\": the read-only listener needs a port of its own",
                    self.listen
                ),
            ));
        }
        Ok(())
    }
}

/// Whether two listeners on these addresses would compete for one port.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip().is_unspecified() || b.ip().is_unspecified() || a.ip() == b.ip())
}

/// Whether an entry of Postgres' `listen_addresses` covers `ip` (host names
/// are not resolved here).
fn postgres_overlaps(entry: &str, ip: IpAddr) -> bool {
    let entry = entry.trim().trim_start_matches('[').trim_end_matches(']');
    if ip.is_unspecified() || entry == "*" {
        return true;
    }
    entry
        .parse::<IpAddr>()
        .is_ok_and(|other| other.is_unspecified() || other == ip)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::testing::*;
    use crate::config::RouterConfig;

    #[test]
    fn defaults_are_off_on_port_5432_dual_stack() {
        let config = parse(&minimal()).unwrap();
        assert_eq!(config.router, RouterConfig::default());
        let r = &config.router;
        assert!(!r.enabled && !r.replica_fallback && r.dual_stack);
        assert_eq!(r.listen, "[::]:5432".parse().unwrap());
        assert_eq!(r.replica_listen, None);
        assert_eq!(r.hold_timeout, Duration::from_secs(10));
        assert_eq!(r.connect_timeout, Duration::from_secs(3));
        assert_eq!(r.keepalive, Duration::from_secs(10));
        // Off, the default listener does not conflict with Postgres' 5432.
        let v4 = parse(&with("", "ip_family = \"ipv4\"")).unwrap();
        assert_eq!(v4.router.listen, "0.0.0.0:5432".parse().unwrap());
        let v6 = parse(&with("", "ip_family = \"ipv6\"")).unwrap();
        assert!(!v6.router.dual_stack);
    }

    #[test]
    fn every_key_is_read_from_the_file_and_the_environment() {
        let text = format!(
            "{}\n[router]\nenabled = true\nlisten = \"[::]:6432\"\nreplica_listen = \"0.0.0.0:6434\"\n\
             replica_fallback = true\nhold_timeout = \"0s\"\nconnect_timeout = \"500ms\"\nkeepalive = \"30s\"\n",
            minimal()
        );
        let r = parse(&text).unwrap().router;
        assert!(r.enabled && r.replica_fallback);
        assert_eq!(r.listen, "[::]:6432".parse().unwrap());
        assert_eq!(r.replica_listen, Some("0.0.0.0:6434".parse().unwrap()));
        assert_eq!(r.hold_timeout, Duration::ZERO);
        assert_eq!(r.connect_timeout, Duration::from_millis(500));
        assert_eq!(r.keepalive, Duration::from_secs(30));

        let r = parse_env(
            &minimal(),
            &[
                ("PGHA_ROUTER_ENABLED", "on"),
                ("PGHA_ROUTER_LISTEN", "[fdaa::2]:6432"),
                ("PGHA_ROUTER_REPLICA_LISTEN", "127.0.0.1:6434"),
                ("PGHA_ROUTER_REPLICA_FALLBACK", "yes"),
                ("PGHA_ROUTER_HOLD_TIMEOUT", "1m"),
                ("PGHA_ROUTER_CONNECT_TIMEOUT", "2s"),
                ("PGHA_ROUTER_KEEPALIVE", "5s"),
            ],
        )
        .unwrap()
        .router;
        assert!(r.enabled && r.replica_fallback);
        assert_eq!(r.listen, "[fdaa::2]:6432".parse().unwrap());
        assert_eq!(r.replica_listen, Some("127.0.0.1:6434".parse().unwrap()));
        assert_eq!(r.hold_timeout, Duration::from_secs(60));
        assert_eq!(r.connect_timeout, Duration::from_secs(2));
        assert_eq!(r.keepalive, Duration::from_secs(5));
    }

    fn router(lines: &str) -> String {
        format!("{}\n[router]\n{lines}\n", minimal())
    }

    #[test]
    fn bad_values_name_the_key_and_what_was_expected() {
        for (lines, key, expected) in [
            (
                "listen = \"localhost:5432\"",
                "router.listen",
                "expected an address like",
            ),
            (
                "listen = \"fdaa::2:5432\"",
                "router.listen",
                "expected an address like",
            ),
            (
                "listen = \"[::]:0\"",
                "router.listen",
                "expected an address like",
            ),
            ("listen = 5432", "router.listen", "got 5432"),
            (
                "replica_listen = \"*:5434\"",
                "router.replica_listen",
                "expected an address like",
            ),
            (
                "enabled = \"maybe\"",
                "router.enabled",
                "expected a boolean",
            ),
            (
                "replica_fallback = 1",
                "router.replica_fallback",
                "expected a boolean",
            ),
            (
                "hold_timeout = \"ten\"",
                "router.hold_timeout",
                "expected a duration",
            ),
            (
                "connect_timeout = \"0s\"",
                "router.connect_timeout",
                "more than 0s",
            ),
            ("keepalive = \"0s\"", "router.keepalive", "more than 0s"),
            (
                "keepalive = \"1500ms\"",
                "router.keepalive",
                "whole seconds",
            ),
            ("listn = \"[::]:5432\"", "router.listn", "unknown key"),
        ] {
            let message = assert_key(parse(&router(lines)), key);
            assert!(message.contains(expected), "{lines}: {message}");
        }
        let message = assert_key_env(
            parse_env(&minimal(), &[("PGHA_ROUTER_HOLD_TIMEOUT", "soon")]),
            "router.hold_timeout",
            "PGHA_ROUTER_HOLD_TIMEOUT",
        );
        assert!(message.contains("expected a duration"), "{message}");
        let v4 = format!("ip_family = \"ipv4\"\n{}", router("listen = \"[::]:6432\""));
        let message = assert_key(parse(&v4), "router.listen");
        assert!(message.contains("ip_family"), "{message}");
    }

    #[test]
    fn an_enabled_router_needs_ports_of_its_own() {
        // Postgres listens on every address, port 5432 by default.
        let message = assert_key(parse(&router("enabled = true")), "router.listen");
        assert!(message.contains("postgresql.port = 5433"), "{message}");
        // Moving Postgres fixes it.
        parse(&add(&router("enabled = true"), "postgresql", "port = 5433")).unwrap();
        // The API's default port.
        let message = assert_key(
            parse(&router("enabled = true\nlisten = \"127.0.0.1:8008\"")),
            "router.listen",
        );
        assert!(message.contains("api.listen"), "{message}");
        let message = assert_key(
            parse(&router(
                "enabled = true\nlisten = \"[::]:6432\"\nreplica_listen = \"127.0.0.1:6432\"",
            )),
            "router.replica_listen",
        );
        assert!(message.contains("router.listen"), "{message}");
        // Different addresses on one port do not compete.
        let text = add(
            &router("enabled = true\nlisten = \"10.0.0.1:5432\""),
            "postgresql",
            "listen_addresses = \"127.0.0.1\"",
        );
        parse(&text).unwrap();
    }
}
