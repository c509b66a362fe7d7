//! Addresses and outgoing connections. IPv6 literals get brackets wherever a
//! port follows; a host name with addresses of both families is connected
//! with Happy Eyeballs (RFC 8305): IPv6 first, IPv4 after a 250 ms head
//! start, the first connection up wins and the others are dropped.
//!
//! The racing itself is hyper-util's `HttpConnector`; what this module adds
//! is the address order it races on (getaddrinfo's order depends on the
//! host's gai.conf and routes; the RFC wants IPv6 first) and the delay.

use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::net::TcpStream;

/// How long IPv6 runs alone before IPv4 joins the race (RFC 8305 §5 recommends 250 ms).
pub const HAPPY_EYEBALLS_DELAY: Duration = Duration::from_millis(250);

/// `host:port`, with `[v6]:port` for IPv6 literals.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Which IP families the listeners (API, Postgres) bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IpFamily {
    /// IPv6 and IPv4 (an IPv6 wildcard socket that also accepts IPv4).
    #[default]
    Dual,
    Ipv6,
    Ipv4,
}

impl IpFamily {
    pub fn parse(text: &str) -> Option<IpFamily> {
        match text {
            "dual" => Some(IpFamily::Dual),
            "ipv6" => Some(IpFamily::Ipv6),
            "ipv4" => Some(IpFamily::Ipv4),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::Dual => "dual",
            IpFamily::Ipv6 => "ipv6",
            IpFamily::Ipv4 => "ipv4",
        }
    }

    /// Whether a listener may bind `ip` under this setting.
    pub fn allows(self, ip: IpAddr) -> bool {
        match self {
            IpFamily::Dual => true,
            IpFamily::Ipv6 => ip.is_ipv6(),
            IpFamily::Ipv4 => ip.is_ipv4(),
        }
    }

    /// The wildcard address of this family (dual: the IPv6 wildcard, which
    /// accepts IPv4 too).
    pub fn wildcard(self) -> IpAddr {
        match self {
            IpFamily::Dual | IpFamily::Ipv6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            IpFamily::Ipv4 => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        }
    }

    /// Postgres' `listen_addresses` meaning "every address of this family".
    pub fn postgres_wildcard(self) -> &'static str {
        match self {
            IpFamily::Dual => "*",
            IpFamily::Ipv6 => "::",
            IpFamily::Ipv4 => "0.0.0.0",
        }
    }
}

/// An `http(s)://host:port` URL split into its parts; `host` keeps no
/// brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub scheme: String,
    pub host: String,
    pub port: Option<u16>,
    /// Path and query, `""` when there are none.
    pub path: String,
}

impl HttpUrl {
    /// Parses `http://` and `https://` URLs. An IPv6 literal must be in
    /// brackets (`http://[fdaa::2]:8008`): without them the port cannot be
    /// told from the address.
    pub fn parse(text: &str) -> Result<HttpUrl, String> {
        let trimmed = text.trim();
        let (scheme, rest) = trimmed
            .split_once("://")
            .ok_or("expected a URL starting with http:// or https://")?;
        if scheme != "http" && scheme != "https" {
            return Err(format!("expected http or https, got {scheme:?}"));
        }
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err("credentials do not go in the URL".into());
        }
        let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
            let (address, after) = inner
                .split_once(']')
                .ok_or("an IPv6 address in brackets lacks its \"]\"")?;
            address
                .parse::<Ipv6Addr>()
                .map_err(|_| format!("{address:?} in brackets is not an IPv6 address"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or("expected \":port\" after \"]\"")?,
                ),
            };
            (address, port)
        } else if authority.matches(':').count() > 1 {
            return Err(
                "an IPv6 address goes in brackets, like \"http://[fdaa::2]:8008\"".to_string(),
            );
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err("the URL names no host".into());
        }
        if host.parse::<Ipv6Addr>().is_err() && !is_host_name(host) {
            return Err(format!("{host:?} is not a host name or IP address"));
        }
        let port = port
            .map(|p| match p.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(format!("{p:?} is not a port (1-65535)")),
            })
            .transpose()?;
        Ok(HttpUrl {
            scheme: scheme.to_owned(),
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    /// `scheme://host[:port]`, brackets around an IPv6 literal, no path.
    pub fn origin(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.port {
            Some(port) => format!("{}://{host}:{port}", self.scheme),
            None => format!("{}://{host}", self.scheme),
        }
    }
}

/// A DNS name or an IPv4 literal: letters, digits, `-`, `.` and `_`.
pub fn is_host_name(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Orders resolved addresses for Happy Eyeballs: IPv6 first, then the two
/// families alternating (RFC 8305 §4), each family in getaddrinfo's order.
pub fn happy_eyeballs_order(addrs: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    let (v6, v4): (Vec<_>, Vec<_>) = addrs.into_iter().partition(SocketAddr::is_ipv6);
    let mut out = Vec::with_capacity(v6.len() + v4.len());
    let (mut v6, mut v4) = (v6.into_iter(), v4.into_iter());
    loop {
        match (v6.next(), v4.next()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

/// getaddrinfo (on tokio's blocking pool), then [`happy_eyeballs_order`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Resolver;

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((name.as_str(), 0)).await?;
            Ok(happy_eyeballs_order(addrs).into_iter())
        })
    }
}

/// Time for all addresses of one family; hyper-util gives each address its
/// share, so a black-holed first address does not stall the next one for the
/// kernel's two minutes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The connector every outgoing HTTP request of pgha uses (member APIs, CLI).
pub fn http_connector() -> HttpConnector<Resolver> {
    let mut connector = HttpConnector::new_with_resolver(Resolver);
    connector.set_happy_eyeballs_timeout(Some(HAPPY_EYEBALLS_DELAY));
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    connector.set_nodelay(true);
    connector
}

/// Connects to `host:port` (a name, or an IP literal with or without
/// brackets) with Happy Eyeballs.
pub async fn connect_tcp(host: &str, port: u16) -> std::io::Result<TcpStream> {
    use tower_service::Service;
    let uri: hyper::Uri = format!("http://{}", host_port(host, port))
        .parse()
        .map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{host}:{port}: {e}"),
            )
        })?;
    let mut connector = http_connector();
    let io = connector.call(uri).await.map_err(|e| {
        // ConnectError's Display is only "tcp connect error": keep its cause.
        let cause = std::error::Error::source(&e)
            .map(ToString::to_string)
            .unwrap_or_default();
        std::io::Error::other(format!("{}: {e}: {cause}", host_port(host, port)))
    })?;
    Ok(io.into_inner())
}

/// The address a Happy Eyeballs connection to `host:port` reaches, for
/// tools that try addresses one after the other (libpq: pg_basebackup,
/// pg_rewind) and get it as `hostaddr`. An IP literal is returned without
/// connecting.
pub async fn pick_address(host: &str, port: u16, timeout: Duration) -> std::io::Result<IpAddr> {
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return Ok(ip);
    }
    Ok(connect_tcp_within(host, port, timeout)
        .await?
        .peer_addr()?
        .ip())
}

/// [`connect_tcp`], failing with `TimedOut` after `timeout`.
pub async fn connect_tcp_within(
    host: &str,
    port: u16,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    tokio::time::timeout(timeout, connect_tcp(host, port))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "{}: no connection within {timeout:?}",
                    host_port(host, port)
                ),
            )
        })?
}

/// Binds a listening TCP socket (non-blocking, backlog 1024). An IPv6
/// wildcard accepts IPv4 too when `dual_stack`, set explicitly: the system
/// default (`net.ipv6.bindv6only`) varies.
pub fn bind_listener(addr: SocketAddr, dual_stack: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(!dual_stack)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_literals_get_brackets() {
        assert_eq!(host_port("fdaa::2", 5432), "[fdaa::2]:5432");
        assert_eq!(host_port("[fdaa::2]", 5432), "[fdaa::2]:5432");
        assert_eq!(host_port("n1.internal", 5432), "n1.internal:5432");
        assert_eq!(host_port("127.0.0.1", 8008), "127.0.0.1:8008");
    }

    #[test]
    fn ipv6_first_then_alternating() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let resolved = [
            a("10.0.0.1:1"),
            a("10.0.0.2:1"),
            a("10.0.0.3:1"),
            a("[fdaa::1]:1"),
            a("[fdaa::2]:1"),
        ];
        assert_eq!(
            happy_eyeballs_order(resolved),
            [
                a("[fdaa::1]:1"),
                a("10.0.0.1:1"),
                a("[fdaa::2]:1"),
                a("10.0.0.2:1"),
                a("10.0.0.3:1"),
            ]
        );
        assert_eq!(happy_eyeballs_order([a("10.0.0.1:1")]), [a("10.0.0.1:1")]);
        assert!(happy_eyeballs_order([]).is_empty());
    }

    #[test]
    fn urls_with_ipv6_literals() {
        let url = HttpUrl::parse("http://[fdaa:0:c037::2]:8008/cluster").unwrap();
        assert_eq!(
            (url.scheme.as_str(), url.host.as_str(), url.port),
            ("http", "fdaa:0:c037::2", Some(8008))
        );
        assert_eq!(url.path, "/cluster");
        assert_eq!(url.origin(), "http://[fdaa:0:c037::2]:8008");
        let no_port = HttpUrl::parse("https://[::1]").unwrap();
        assert_eq!((no_port.host.as_str(), no_port.port), ("::1", None));
        assert_eq!(no_port.origin(), "https://[::1]");
        let name = HttpUrl::parse("http://n1.internal:8008").unwrap();
        assert_eq!((name.host.as_str(), name.port), ("n1.internal", Some(8008)));
        assert_eq!(name.origin(), "http://n1.internal:8008");
        let v4 = HttpUrl::parse("http://10.1.2.3:2379/").unwrap();
        assert_eq!((v4.host.as_str(), v4.port), ("10.1.2.3", Some(2379)));
    }

    #[test]
    fn malformed_urls_say_why() {
        for (text, why) in [
            ("http://fdaa::2:8008", "brackets"),
            ("http://[fdaa::2:8008", "\"]\""),
            ("http://[fdaa::zz]:8008", "not an IPv6 address"),
            ("http://[::1]8008", ":port"),
            ("http://[::1]:0", "not a port"),
            ("http://n1:http", "not a port"),
            ("ftp://n1:21", "http or https"),
            ("n1:8008", "http://"),
            ("http://:8008", "no host"),
            ("http://user:pw@n1:8008", "credentials"),
            ("http://n 1:8008", "not a host name"),
        ] {
            let err = HttpUrl::parse(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn families() {
        assert_eq!(IpFamily::parse("dual"), Some(IpFamily::Dual));
        assert_eq!(IpFamily::parse("IPv6"), None);
        for f in [IpFamily::Dual, IpFamily::Ipv6, IpFamily::Ipv4] {
            assert_eq!(IpFamily::parse(f.as_str()), Some(f));
            assert!(f.allows(f.wildcard()));
        }
        assert!(!IpFamily::Ipv4.allows("::1".parse().unwrap()));
        assert!(!IpFamily::Ipv6.allows("127.0.0.1".parse().unwrap()));
    }

    /// Over loopback in the test's own namespace: an IPv6 literal, an IPv4
    /// literal, and a refused IPv6 port falling back at once (no 250 ms wait:
    /// a refusal ends the IPv6 attempt).
    #[tokio::test]
    async fn connects_to_literals_of_both_families() {
        let v6 = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
        let v4 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = connect_tcp("::1", v6.local_addr().unwrap().port())
            .await
            .unwrap();
        assert!(s.peer_addr().unwrap().is_ipv6());
        let s = connect_tcp("[::1]", v6.local_addr().unwrap().port())
            .await
            .unwrap();
        assert!(s.peer_addr().unwrap().is_ipv6());
        let s = connect_tcp("127.0.0.1", v4.local_addr().unwrap().port())
            .await
            .unwrap();
        assert!(s.peer_addr().unwrap().is_ipv4());
        let closed = v6.local_addr().unwrap().port();
        drop(v6);
        let err = connect_tcp("::1", closed).await.unwrap_err();
        assert!(err.to_string().contains("[::1]"), "{err}");
    }
}
