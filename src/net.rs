//! Address formatting shared by config, API and CLI: IPv6 literals get
//! brackets wherever a port follows.

/// `host:port`, with `[v6]:port` for IPv6 literals.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_literals_get_brackets() {
        assert_eq!(host_port("fdaa::2", 5432), "[fdaa::2]:5432");
        assert_eq!(host_port("n1.internal", 5432), "n1.internal:5432");
        assert_eq!(host_port("127.0.0.1", 8008), "127.0.0.1:8008");
    }
}
