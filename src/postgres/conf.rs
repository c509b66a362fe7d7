//! Rendering of the files the agent owns in the data directory:
//! postgresql.conf (which includes the initdb original), pg_hba.conf,
//! pg_ident.conf and the standby signal. Pure functions, unit-tested.

use std::collections::BTreeMap;

use crate::config::PostgresConfig;

/// Where this Postgres gets its WAL from, when it runs as a standby.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    pub host: String,
    pub port: u16,
}

/// Quotes a value for postgresql.conf.
pub fn quote_conf(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// Quotes a value for a libpq conninfo string.
pub fn quote_conninfo(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Seconds libpq waits for each address of the upstream: the walreceiver
/// tries a name's addresses one after the other, so an unreachable IPv6
/// address must not hold up the IPv4 one for the kernel's two minutes.
pub const UPSTREAM_CONNECT_TIMEOUT_S: u32 = 3;

/// The conninfo a standby uses to stream from `up`.
pub fn primary_conninfo(cfg: &PostgresConfig, node: &str, up: &Upstream) -> String {
    let mut s = format!(
        "host={} port={} user={} application_name={} dbname=replication target_session_attrs=any \
         connect_timeout={UPSTREAM_CONNECT_TIMEOUT_S}",
        // libpq wants IPv6 literals without brackets.
        quote_conninfo(up.host.trim_start_matches('[').trim_end_matches(']')),
        up.port,
        quote_conninfo(&cfg.replication.username),
        quote_conninfo(node),
    );
    if let Some(pw) = &cfg.replication.password {
        s.push_str(&format!(" password={}", quote_conninfo(pw.expose())));
    }
    for (key, value) in cfg.tls.libpq_params(true) {
        s.push_str(&format!(" {key}={}", quote_conninfo(&value)));
    }
    s
}

/// Parameters the agent sets itself: neither the config file nor the
/// dynamic config may set them.
pub const MANAGED_PARAMETERS: &[&str] = &[
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "data_directory",
    "wal_level",
    "hot_standby",
    "wal_log_hints",
    "cluster_name",
    "hba_file",
    "ident_file",
    "recovery_target_timeline",
    "primary_conninfo",
    "primary_slot_name",
    "synchronous_standby_names",
];

/// Parameters the agent sets; the dynamic config's cluster-wide parameters,
/// then the config file's, may add to them and override all but the ones
/// replication depends on.
pub fn managed_parameters(
    cfg: &PostgresConfig,
    node: &str,
    upstream: Option<&Upstream>,
    dynamic: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut p = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        p.insert(k.to_string(), v);
    };
    set("max_connections", "100".into());
    set("max_wal_senders", "10".into());
    set("max_replication_slots", "10".into());
    set("wal_keep_size", quote_conf("128MB"));
    set("hot_standby_feedback", "on".into());
    // A standby that repoints (failover, a slot created a moment later)
    // retries streaming after this long; Postgres' default is 5 s. A
    // promotion requested while the startup process waits out this interval
    // was measured to wait for the rest of it (1 s with "1s"), so it is kept
    // short: the cost is a connection attempt every 250 ms while the
    // upstream is down.
    set("wal_retrieve_retry_interval", quote_conf("250ms"));
    // A standby that vanishes without closing its connection (host gone,
    // network cut) is listed as streaming until the walsender times out,
    // and while it is the synchronous standby every commit waits for it:
    // the agent drops it from synchronous_standby_names only once Postgres
    // stops listing it. Postgres' 60 s default held commits for as long;
    // 10 s (the default TTL: a dead standby costs writes about as long as a
    // dead primary) still leaves a live standby 5 s to answer the keepalive
    // the walsender sends after 5 s of silence. The standby side likewise
    // gives up on a silent upstream after 10 s and reconnects.
    set("wal_sender_timeout", quote_conf("10s"));
    set("wal_receiver_timeout", quote_conf("10s"));
    for (k, v) in dynamic.iter().chain(&cfg.parameters) {
        set(k, quote_conf(v));
    }
    // Replication depends on these: a user value does not win.
    set("listen_addresses", quote_conf(&cfg.listen_addresses));
    set("port", cfg.port.to_string());
    set(
        "unix_socket_directories",
        quote_conf(&cfg.socket_dir.display().to_string()),
    );
    set("wal_level", "replica".into());
    set("hot_standby", "on".into());
    set("wal_log_hints", "on".into());
    set("cluster_name", quote_conf(node));
    set(
        "hba_file",
        quote_conf(&cfg.data_dir.join("pg_hba.conf").display().to_string()),
    );
    set(
        "ident_file",
        quote_conf(&cfg.data_dir.join("pg_ident.conf").display().to_string()),
    );
    set("recovery_target_timeline", quote_conf("latest"));
    if cfg.tls.enabled {
        // The agent's certificates: a user value does not win, TLS is never
        // silently off.
        let file = |name: &str| quote_conf(&cfg.tls.file(name).display().to_string());
        set("ssl", "on".into());
        set("ssl_cert_file", file(crate::tls::SERVER_CERT));
        set("ssl_key_file", file(crate::tls::SERVER_KEY));
        set("ssl_ca_file", file(crate::tls::CA_CERT));
        set("ssl_min_protocol_version", quote_conf("TLSv1.2"));
    }
    if let Some(a) = &cfg.archiving {
        // Every node: a primary archives, a standby (archive_mode on, not
        // always) does not until it is promoted, and fetches from the
        // repository what streaming cannot give it any more.
        set("archive_mode", "on".into());
        set("archive_command", quote_conf(&a.archive_command));
        set("restore_command", quote_conf(&a.restore_command));
        set("archive_timeout", a.archive_timeout.as_secs().to_string());
    }
    match upstream {
        Some(up) => {
            set(
                "primary_conninfo",
                quote_conf(&primary_conninfo(cfg, node, up)),
            );
            set("primary_slot_name", quote_conf(&crate::ha::slot_name(node)));
        }
        None => {
            set("primary_conninfo", quote_conf(""));
            set("primary_slot_name", quote_conf(""));
        }
    }
    p
}

/// The file that holds `synchronous_standby_names`, in the data directory.
pub const SYNC_CONF: &str = "pgha.sync.conf";

/// postgresql.conf as the agent writes it.
pub fn render_postgresql_conf(params: &BTreeMap<String, String>) -> String {
    let mut s = String::from(
        "# Written by pgha on every start: edits here are overwritten.\n\
         # Put settings in the pgha config ([postgresql.parameters]).\n\
         include_if_exists 'postgresql.base.conf'\n\n",
    );
    for (k, v) in params {
        s.push_str(&format!("{k} = {v}\n"));
    }
    s.push_str(&format!(
        "\n# synchronous_standby_names, set by pgha at run time (synchronous_mode).\ninclude_if_exists '{SYNC_CONF}'\n"
    ));
    s
}

/// pgha.sync.conf.
pub fn render_sync_conf(standby_names: &str) -> String {
    format!(
        "# Written by pgha (synchronous_mode): the standbys commits wait for.\nsynchronous_standby_names = {}\n",
        quote_conf(standby_names)
    )
}

/// pg_hba.conf: operator lines first, then local superuser access through
/// the `pgha` ident map, then replication and clients with passwords.
pub fn render_pg_hba(cfg: &PostgresConfig) -> String {
    let mut s = String::from("# Written by pgha: edits here are overwritten. Use postgresql.pg_hba in the pgha config.\n");
    for line in &cfg.pg_hba {
        s.push_str(line);
        s.push('\n');
    }
    s.push_str("local   all          all                  peer map=pgha\n");
    let repl = &cfg.replication.username;
    let tls = &cfg.tls;
    let (repl_type, repl_options) = match (tls.enabled, tls.replication_client_cert) {
        (false, _) => ("host", ""),
        (true, false) => ("hostssl", ""),
        (true, true) => ("hostssl", " clientcert=verify-full"),
    };
    for net in ["0.0.0.0/0", "::/0"] {
        s.push_str(&format!(
            "{repl_type:<7} replication  {repl:<12} {net:<20} scram-sha-256{repl_options}\n"
        ));
    }
    let client_type = if tls.enabled && tls.hostssl_clients {
        "hostssl"
    } else {
        "host"
    };
    for net in ["0.0.0.0/0", "::/0"] {
        s.push_str(&format!(
            "{client_type:<7} all          all          {net:<20} scram-sha-256\n"
        ));
    }
    s
}

/// pg_ident.conf: the agent's OS user (and root) may connect as the superuser.
pub fn render_pg_ident(cfg: &PostgresConfig, agent_os_user: &str) -> String {
    let su = &cfg.superuser.username;
    let mut s = String::from("# Written by pgha: edits here are overwritten.\n");
    s.push_str("pgha  /^(.*)$  \\1\n");
    for os in [agent_os_user, "root", cfg.os_user.as_str()] {
        s.push_str(&format!("pgha  {os}  {su}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_conninfo_takes_ipv6_literals_and_names() {
        let cfg = crate::config::Config::parse(
            &format!(
                "scope = \"s\"\nname = \"n2\"\n[etcd]\nendpoints = [\"[::1]:2379\"]\n\
                 [postgresql]\ndata_dir = \"/d\"\nbin_dir = '{}'\nadvertise_host = \"fdaa::3\"\n\
                 [postgresql.replication]\npassword = \"pw\"\n\
                 [api]\nadvertise_url = \"http://[fdaa::3]:8008\"\n",
                std::env::temp_dir().display()
            ),
            std::path::Path::new("/t.toml"),
            &std::collections::BTreeMap::new(),
        )
        .unwrap()
        .postgresql;
        for (host, rendered) in [
            ("fdaa:0:c037::2", "host='fdaa:0:c037::2' "),
            ("[fdaa::2]", "host='fdaa::2' "),
            ("n1.internal", "host='n1.internal' "),
        ] {
            let up = Upstream {
                name: "n1".into(),
                host: host.into(),
                port: 5432,
            };
            let conninfo = primary_conninfo(&cfg, "n2", &up);
            assert!(conninfo.starts_with(rendered), "{conninfo}");
            assert!(conninfo.contains(" port=5432 "), "{conninfo}");
            assert!(conninfo.contains(" connect_timeout=3"), "{conninfo}");
        }
    }

    #[test]
    fn replication_timeouts_default_to_ten_seconds_and_stay_overridable() {
        let toml = |extra: &str| {
            crate::config::Config::parse(
                &format!(
                    "scope = \"s\"\nname = \"n1\"\n[etcd]\nendpoints = [\"127.0.0.1:2379\"]\n\
                     [postgresql]\ndata_dir = \"/d\"\nbin_dir = '{}'\nadvertise_host = \"10.0.0.1\"\n\
                     [postgresql.replication]\npassword = \"pw\"\n{extra}\
                     [api]\nadvertise_url = \"http://10.0.0.1:8008\"\n",
                    std::env::temp_dir().display()
                ),
                std::path::Path::new("/t.toml"),
                &BTreeMap::new(),
            )
            .unwrap()
            .postgresql
        };
        let p = managed_parameters(&toml(""), "n1", None, &BTreeMap::new());
        assert_eq!(p["wal_sender_timeout"], "'10s'");
        assert_eq!(p["wal_receiver_timeout"], "'10s'");
        let cfg = toml("[postgresql.parameters]\nwal_sender_timeout = \"60s\"\n");
        let p = managed_parameters(&cfg, "n1", None, &BTreeMap::new());
        assert_eq!(p["wal_sender_timeout"], "'60s'");
    }

    #[test]
    fn quoting_escapes_quotes_and_backslashes() {
        assert_eq!(quote_conf("it's"), "'it''s'");
        assert_eq!(quote_conf(r"a\b"), r"'a\\b'");
        assert_eq!(quote_conninfo("p'w"), r"'p\'w'");
    }
}
