//! Tests of the assembled configuration: defaults, conversions and error
//! messages across sections, paths, secrets and IP families. Tests of one
//! section's own logic sit in that section's file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::testing::*;
use super::*;

#[test]
fn minimal_config_gets_defaults() {
    let config = parse(&minimal()).unwrap();
    assert_eq!(config.source, Path::new(SOURCE));
    assert_eq!(config.scope, "demo");
    assert_eq!(config.name, "n1");

    assert_eq!(config.etcd.endpoints, ["http://127.0.0.1:2379"]);
    assert_eq!(config.etcd.prefix, "/pgha/demo/");
    assert_eq!(config.etcd.dial_timeout, Duration::from_secs(2));
    assert_eq!(config.etcd.username, None);
    assert!(config.etcd.password.is_none());

    let pg = &config.postgresql;
    assert_eq!(pg.data_dir, Path::new("/var/lib/pgha/n1/data"));
    assert_eq!(pg.bin_dir, std::env::temp_dir());
    assert_eq!(pg.listen_addresses, "*");
    assert_eq!(pg.port, 5432);
    assert_eq!(pg.advertise_host, "n1.internal");
    assert_eq!(pg.advertise_port, 5432);
    assert_eq!(pg.socket_dir, Path::new("/var/lib/pgha/n1"));
    assert_eq!(pg.os_user, "postgres");
    assert_eq!(pg.superuser.username, "postgres");
    assert!(pg.superuser.password.is_none());
    assert_eq!(pg.replication.username, "replicator");
    assert_eq!(
        pg.replication.password.as_ref().map(Secret::expose),
        Some("repl-secret")
    );
    assert!(pg.parameters.is_empty());
    assert!(pg.pg_hba.is_empty());

    assert_eq!(config.ip_family, IpFamily::Dual);
    assert_eq!(
        config.api.listen,
        ["[::]:8008".parse::<SocketAddr>().unwrap()],
        "dual stack by default"
    );
    assert_eq!(config.api.advertise_url, "http://n1.internal:8008");
    assert_eq!(config.api_url_for_cli(), "http://n1.internal:8008");

    assert_eq!(config.timing.ttl, Duration::from_secs(10));
    assert_eq!(config.timing.loop_wait, Duration::from_secs(1));
    assert_eq!(config.timing.retry_timeout, Duration::from_secs(3));

    assert_eq!(config.cluster.maximum_lag_on_failover, 1024 * 1024);
    assert_eq!(
        config.cluster.primary_start_timeout,
        Duration::from_secs(30)
    );
    assert_eq!(config.cluster.member_slot_grace, Duration::from_secs(30));

    assert_eq!(
        config.tags,
        Tags {
            nofailover: false,
            noloadbalance: false,
            nosync: false,
            failover_priority: 1,
            extra: BTreeMap::new(),
        }
    );
    assert_eq!(config.log.format, LogFormat::Text);
    assert_eq!(config.log.level, "info");
}

#[test]
fn sections_with_defaults_may_be_left_out() {
    let text: String = minimal()
        .lines()
        .filter(|l| {
            !matches!(
                *l,
                "[timing]" | "[cluster]" | "[tags]" | "[log]" | "[postgresql.superuser]"
            )
        })
        .map(|l| format!("{l}\n"))
        .collect();
    parse(&text).unwrap();
}

#[test]
fn file_values_are_converted() {
    let mut text = minimal();
    for (section, line) in [
        ("etcd", "namespace = \"service//\""),
        ("etcd", "dial_timeout = \"500ms\""),
        ("etcd", "username = \"pgha\""),
        ("etcd", "password = \"etcd-secret\""),
        ("postgresql", "listen_addresses = [\"127.0.0.1\", \"::1\"]"),
        ("postgresql", "port = 5433"),
        ("postgresql", "advertise_port = 6432"),
        ("postgresql", "socket_dir = \"/run/pg\""),
        ("postgresql", "os_user = \"pg\""),
        (
            "postgresql",
            "pg_hba = [\"host all all 10.0.0.0/8 scram-sha-256\"]",
        ),
        (
            "postgresql",
            "parameters = { max_connections = 100, shared_buffers = \"128MB\", \
                 Log_Min_Messages = \"warning\", fsync = true, random_page_cost = 1.5 }",
        ),
        ("postgresql.superuser", "username = \"admin\""),
        ("postgresql.replication", "username = \"repl\""),
        ("api", "listen = \"127.0.0.1:8008\""),
        ("timing", "ttl = \"30s\""),
        ("timing", "loop_wait = \"2s\""),
        ("timing", "retry_timeout = \"10s\""),
        ("cluster", "maximum_lag_on_failover = \"16MB\""),
        ("cluster", "primary_start_timeout = \"0s\""),
        ("cluster", "member_slot_grace = \"5m\""),
        ("tags", "nofailover = true"),
        ("tags", "noloadbalance = true"),
        ("tags", "nosync = true"),
        ("tags", "failover_priority = -3"),
        ("tags", "extra = { zone = \"a\" }"),
        ("log", "format = \"json\""),
        ("log", "level = \"info,pgha=debug\""),
    ] {
        text = add(&text, section, line);
    }
    let config = parse(&text).unwrap();
    assert_eq!(config.etcd.prefix, "/service/demo/");
    assert_eq!(config.etcd.dial_timeout, Duration::from_millis(500));
    assert_eq!(config.etcd.username.as_deref(), Some("pgha"));
    assert_eq!(
        config.etcd.password.as_ref().map(Secret::expose),
        Some("etcd-secret")
    );
    let pg = &config.postgresql;
    assert_eq!(pg.listen_addresses, "127.0.0.1,::1");
    assert_eq!((pg.port, pg.advertise_port), (5433, 6432));
    assert_eq!(pg.socket_dir, Path::new("/run/pg"));
    assert_eq!(pg.os_user, "pg");
    assert_eq!(pg.pg_hba, ["host all all 10.0.0.0/8 scram-sha-256"]);
    let parameters: Vec<(&str, &str)> = pg
        .parameters
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        parameters,
        [
            ("fsync", "on"),
            ("log_min_messages", "warning"),
            ("max_connections", "100"),
            ("random_page_cost", "1.5"),
            ("shared_buffers", "128MB"),
        ]
    );
    assert_eq!(pg.superuser.username, "admin");
    assert_eq!(pg.replication.username, "repl");
    assert_eq!(
        config.api.listen,
        ["127.0.0.1:8008".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(config.timing.ttl, Duration::from_secs(30));
    assert_eq!(config.cluster.maximum_lag_on_failover, 16 << 20);
    assert_eq!(config.cluster.primary_start_timeout, Duration::ZERO);
    assert_eq!(config.cluster.member_slot_grace, Duration::from_secs(300));
    assert!(config.tags.nofailover && config.tags.noloadbalance && config.tags.nosync);
    assert_eq!(config.tags.failover_priority, -3);
    assert_eq!(config.tags.extra.get("zone").map(String::as_str), Some("a"));
    assert_eq!(config.log.format, LogFormat::Json);
    assert_eq!(config.log.level, "info,pgha=debug");
}

#[test]
fn error_messages_read_file_key_problem() {
    let err = expect_err(parse(&with("timing", "ttl = \"ten\"")));
    assert_eq!(
        err.to_string(),
        "/etc/pgha.toml: timing.ttl: expected a duration like \"10s\", got \"ten\""
    );
    let err = expect_err(parse(&without("data_dir")));
    assert_eq!(
        err.to_string(),
        "/etc/pgha.toml: postgresql.data_dir: required key missing"
    );
    let err = expect_err(parse(&with("postgresql", "port = \"abc\"")));
    assert_eq!(
        err.to_string(),
        "/etc/pgha.toml: postgresql.port: expected an integer 1..65535, got \"abc\""
    );
    let err = expect_err(parse(&with("timing", "loop_wait = \"5s\"")));
    assert_eq!(
            err.to_string(),
            "/etc/pgha.toml: timing: loop_wait (5s) + 2 × retry_timeout (3s) = 11s must not exceed ttl (10s)"
        );
    let err = expect_err(parse(&with("postgresql", "prot = 5432")));
    assert_eq!(
        err.to_string(),
        "/etc/pgha.toml: postgresql.prot: unknown key (expected one of: data_dir, bin_dir, \
             listen_addresses, port, advertise_host, advertise_port, socket_dir, os_user, clone_from, \
             parameters, pg_hba, superuser, replication)"
    );
}

#[test]
fn invalid_values_name_their_key() {
    let long_dir = format!("/{}/data", "d".repeat(90));
    let cases: Vec<(String, &str, &str)> = vec![
        // Unknown keys, top level and nested.
        (
            with("", "colour = \"blue\""),
            "colour",
            "unknown key (expected one of: scope, name,",
        ),
        (
            with("etcd", "endpoint = []"),
            "etcd.endpoint",
            "unknown key",
        ),
        (
            with("postgresql.replication", "user = \"r\""),
            "postgresql.replication.user",
            "unknown key",
        ),
        (with("tags", "zone = \"a\""), "tags.zone", "unknown key"),
        // Wrong types.
        (
            minimal().replace("scope = \"demo\"", "scope = 5"),
            "scope",
            "expected a string, got 5",
        ),
        (
            with("tags", "nofailover = \"yes\""),
            "tags.nofailover",
            "expected a boolean, got \"yes\"",
        ),
        (
            with("tags", "failover_priority = 1.5"),
            "tags.failover_priority",
            "expected an integer, got 1.5",
        ),
        (
            with("tags", "failover_priority = 9999999999"),
            "tags.failover_priority",
            "expected an integer",
        ),
        (
            with("tags", "extra = { zone = 1 }"),
            "tags.extra.zone",
            "expected a string, got 1",
        ),
        (
            with("postgresql", "port = 0"),
            "postgresql.port",
            "expected an integer 1..65535, got 0",
        ),
        (
            with("postgresql", "port = 70000"),
            "postgresql.port",
            "1..65535",
        ),
        (
            with("postgresql", "listen_addresses = [1]"),
            "postgresql.listen_addresses",
            "array of strings",
        ),
        (
            with("postgresql", "pg_hba = \"host all\""),
            "postgresql.pg_hba",
            "expected an array, got \"host all\"",
        ),
        (
            with("postgresql", "pg_hba = [\" \"]"),
            "postgresql.pg_hba[0]",
            "must not be empty",
        ),
        (
            with("postgresql", "parameters = { x = [1] }"),
            "postgresql.parameters.x",
            "got an array",
        ),
        (
            with("postgresql", "parameters = { port = 1 }"),
            "postgresql.parameters.port",
            "set postgresql.port instead",
        ),
        (
            with("postgresql", "parameters = { \"a b\" = 1 }"),
            "postgresql.parameters.a b",
            "parameter name",
        ),
        (
            add(&minimal().replace("[log]\n", ""), "", "log = 1"),
            "log",
            "expected a table, got 1",
        ),
        (
            with("log", "format = \"xml\""),
            "log.format",
            "expected \"text\" or \"json\", got \"xml\"",
        ),
        (
            with("log", "level = \"\""),
            "log.level",
            "must not be empty",
        ),
        // Missing required keys.
        (without("scope"), "scope", "required key missing"),
        (without("name"), "name", "required key missing"),
        (
            without("endpoints"),
            "etcd.endpoints",
            "required key missing",
        ),
        (
            without("advertise_host"),
            "postgresql.advertise_host",
            "required key missing",
        ),
        (
            without("password"),
            "postgresql.replication.password",
            "set postgresql.replication.password, postgresql.replication.password_file \
                 or PGHA_POSTGRESQL_REPLICATION_PASSWORD",
        ),
        (
            minimal().replace("[etcd]\nendpoints = [\"127.0.0.1:2379\"]\n", ""),
            "etcd",
            "required section [etcd] missing",
        ),
        // Names.
        (
            minimal().replace("name = \"n1\"", "name = \"n 1\""),
            "name",
            "expected letters, digits",
        ),
        (
            minimal().replace("scope = \"demo\"", "scope = \"a/b\""),
            "scope",
            "expected letters",
        ),
        // Timing.
        (
            with("timing", "ttl = \"2s\""),
            "timing.ttl",
            "must be at least 3s, got 2s",
        ),
        (
            with("timing", "ttl = \"10s 500ms\""),
            "timing.ttl",
            "whole seconds",
        ),
        (
            with("timing", "ttl = 10"),
            "timing.ttl",
            "expected a duration like \"10s\", got 10",
        ),
        (
            with("timing", "ttl = 1979-05-27"),
            "timing.ttl",
            "expected a duration like \"10s\", got \"1979-05-27\"",
        ),
        (
            with("postgresql", "parameters = { fsync = true, FSYNC = false }"),
            "postgresql.parameters.fsync",
            "set twice",
        ),
        (
            with("timing", "retry_timeout = \"5s\""),
            "timing",
            "retry_timeout (5s) = 11s must not exceed ttl (10s)",
        ),
        (
            with("timing", "loop_wait = \"0s\""),
            "timing.loop_wait",
            "more than 0s",
        ),
        (
            with("timing", "retry_timeout = \"99999999999y\""),
            "timing",
            "must not exceed ttl",
        ),
        (
            with("etcd", "dial_timeout = \"fast\""),
            "etcd.dial_timeout",
            "expected a duration",
        ),
        (
            with("cluster", "member_slot_grace = \"-1s\""),
            "cluster.member_slot_grace",
            "expected a duration",
        ),
        (
            with("cluster", "maximum_lag_on_failover = \"lots\""),
            "cluster.maximum_lag_on_failover",
            "expected a size",
        ),
        (
            with("cluster", "maximum_lag_on_failover = -1"),
            "cluster.maximum_lag_on_failover",
            "zero or more",
        ),
        // Endpoints and addresses.
        (
            minimal().replace("[\"127.0.0.1:2379\"]", "[\"ftp://e:2379\"]"),
            "etcd.endpoints",
            "http or https",
        ),
        (
            minimal().replace("[\"127.0.0.1:2379\"]", "[\"localhost\"]"),
            "etcd.endpoints",
            "with a port",
        ),
        (
            minimal().replace("[\"127.0.0.1:2379\"]", "[\"::1:2379\"]"),
            "etcd.endpoints",
            "in brackets",
        ),
        (
            minimal().replace("[\"127.0.0.1:2379\"]", "[\"http://[::zz]:2379\"]"),
            "etcd.endpoints",
            "bad IPv6",
        ),
        (
            minimal().replace("[\"127.0.0.1:2379\"]", "[\"e:2379/v3\"]"),
            "etcd.endpoints",
            "no path",
        ),
        (
            minimal().replace("[\"127.0.0.1:2379\"]", "[\"e:http\"]"),
            "etcd.endpoints",
            "got \"e:http\"",
        ),
        (
            minimal().replace("[\"127.0.0.1:2379\"]", "[]"),
            "etcd.endpoints",
            "at least one",
        ),
        (
            with("api", "listen = [\"localhost:8008\"]"),
            "api.listen[0]",
            "expected an address like",
        ),
        (
            with("api", "listen = [\"[::1]:8008\", \"::1:8008\"]"),
            "api.listen[1]",
            "got \"::1:8008\"",
        ),
        (with("api", "listen = []"), "api.listen", "at least one"),
        (
            with("api", "balancer_window = \"2 minutes\""),
            "api.balancer_window",
            "expected at most 1m",
        ),
        (
            with("api", "balancer_window = 3"),
            "api.balancer_window",
            "expected a duration like",
        ),
        (
            minimal().replace("\"http://n1.internal:8008\"", "\"n1.internal:8008\""),
            "api.advertise_url",
            "http:// or https://",
        ),
        (
            minimal().replace("\"n1.internal\"", "\"n1:5432\""),
            "postgresql.advertise_host",
            "no port",
        ),
        (
            minimal().replace("\"n1.internal\"", "\"[n1]\""),
            "postgresql.advertise_host",
            "host name",
        ),
        // Passwords.
        (
            with(
                "postgresql.superuser",
                "password = \"a\"\npassword_file = \"/pw\"",
            ),
            "postgresql.superuser.password_file",
            "conflicts with postgresql.superuser.password",
        ),
        (
            with("etcd", "password = \"a\"\npassword_file = \"/pw\""),
            "etcd.password_file",
            "set only one",
        ),
        (
            with(
                "postgresql.superuser",
                "password_file = \"/nonexistent/pw\"",
            ),
            "postgresql.superuser.password_file",
            "cannot read /nonexistent/pw",
        ),
        (
            with("postgresql.superuser", "password = \"\""),
            "postgresql.superuser.password",
            "must not be empty",
        ),
        // Paths.
        (
            minimal().replace("/var/lib/pgha/n1/data", &long_dir),
            "postgresql.socket_dir",
            "bytes, more than the 103",
        ),
        (
            with(
                "postgresql",
                &format!("socket_dir = \"/{}\"", "s".repeat(95)),
            ),
            "postgresql.socket_dir",
            "set a shorter directory",
        ),
        (
            minimal().replace(
                &format!("'{}'", std::env::temp_dir().display()),
                "'/nonexistent/bin'",
            ),
            "postgresql.bin_dir",
            "/nonexistent/bin is not a directory",
        ),
    ];
    for (text, key, fragment) in cases {
        let result = parse(&text);
        assert!(result.is_err(), "{key}: accepted\n{text}");
        let message = assert_key(result, key);
        assert!(
            message.contains(fragment),
            "{key}: {message:?} lacks {fragment:?}"
        );
    }
}

#[test]
fn syntax_errors_give_line_and_column() {
    let text = minimal().replace("name = \"n1\"", "name = \"n1");
    let err = expect_err(parse(&text));
    let ConfigError::Syntax { line, column, .. } = &err else {
        panic!("expected a syntax error, got {err}");
    };
    assert_eq!(*line, 2, "{err}");
    assert!(*column > 1, "{err}");
    assert!(
        err.to_string().starts_with(&format!("{SOURCE}:2:")),
        "{err}"
    );
    assert!(!err.to_string().contains('\n'), "{err}");
    assert_eq!(err.key(), None);

    // Duplicate keys are syntax errors too.
    let err = expect_err(parse(&with("", "scope = \"again\"")));
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
}

#[test]
fn unreadable_file_names_it() {
    let err = Config::load_with_env(Path::new("/nonexistent/pgha.toml"), &env(&[])).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(
        err.to_string().starts_with("/nonexistent/pgha.toml: "),
        "{err}"
    );
}

#[test]
fn relative_paths_and_password_files_resolve_against_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("repl.pw"), "from-file\r\n").unwrap();
    std::fs::create_dir(dir.path().join("bin")).unwrap();
    let text = minimal()
        .replace("\"/var/lib/pgha/n1/data\"", "\"./n1/data\"")
        .replace(&format!("'{}'", std::env::temp_dir().display()), "'bin'")
        .replace("password = \"repl-secret\"", "password_file = \"repl.pw\"");
    let path = dir.path().join("pgha.toml");
    std::fs::write(&path, text).unwrap();

    let config = Config::load_with_env(&path, &env(&[])).unwrap();
    let root = std::path::absolute(dir.path()).unwrap();
    assert_eq!(config.postgresql.data_dir, root.join("n1/data"));
    assert_eq!(config.postgresql.socket_dir, root.join("n1"));
    assert_eq!(config.postgresql.bin_dir, root.join("bin"));
    assert_eq!(
        config
            .postgresql
            .replication
            .password
            .as_ref()
            .map(Secret::expose),
        Some("from-file")
    );

    std::fs::write(dir.path().join("repl.pw"), "\n").unwrap();
    let err = Config::load_with_env(&path, &env(&[])).unwrap_err();
    assert_eq!(err.key(), Some("postgresql.replication.password_file"));
    assert!(err.to_string().contains("is empty"), "{err}");
}

#[test]
fn secrets_never_appear_in_debug_output() {
    let dir = tempfile::tempdir().unwrap();
    let pw_file = dir.path().join("su.pw");
    std::fs::write(&pw_file, "superuser-secret\n").unwrap();
    let text = add(
        &with("etcd", "password = \"etcd-secret\""),
        "postgresql.superuser",
        &format!("password_file = '{}'", pw_file.display()),
    );
    let config = parse(&text).unwrap();
    assert_eq!(
        config
            .postgresql
            .superuser
            .password
            .as_ref()
            .map(Secret::expose),
        Some("superuser-secret")
    );
    let debug = format!("{config:?} {config:#?}");
    for secret in ["etcd-secret", "superuser-secret", "repl-secret"] {
        assert!(!debug.contains(secret), "{secret} leaked: {debug}");
    }
    assert!(debug.contains("Secret(***)"));
}

#[test]
fn ipv6_literals() {
    let text = minimal()
        .replace(
            "[\"127.0.0.1:2379\"]",
            "[\"http://[::1]:2379\", \"[fdaa::2]:2379\", \"https://[fdaa::3]:2379/\"]",
        )
        .replace("\"n1.internal\"", "\"[fdaa::2]\"")
        .replace("\"http://n1.internal:8008\"", "\"http://[fdaa::2]:8008\"");
    let config = parse(&add(
        &text,
        "api",
        "listen = [\"[::1]:8008\", \"[::]:8009\"]",
    ))
    .unwrap();
    assert_eq!(
        config.etcd.endpoints,
        [
            "http://[::1]:2379",
            "http://[fdaa::2]:2379",
            "https://[fdaa::3]:2379"
        ]
    );
    assert_eq!(config.postgresql.advertise_host, "fdaa::2");
    assert_eq!(
        config.api.listen,
        [
            "[::1]:8008".parse::<SocketAddr>().unwrap(),
            "[::]:8009".parse().unwrap()
        ]
    );
    assert_eq!(config.api_url_for_cli(), "http://[fdaa::2]:8008");

    let unbracketed = parse(&minimal().replace("\"n1.internal\"", "\"fdaa::2\"")).unwrap();
    assert_eq!(unbracketed.postgresql.advertise_host, "fdaa::2");

    let listen = parse(&with(
        "postgresql",
        "listen_addresses = [\"fdaa::2\", \"[fdaa::3]\", \"::1,127.0.0.1\", \"n1.internal\"]",
    ))
    .unwrap();
    assert_eq!(
        listen.postgresql.listen_addresses,
        "fdaa::2,fdaa::3,::1,127.0.0.1,n1.internal"
    );
    // The same literals through the environment.
    let from_env = parse_env(
        &minimal(),
        &[
            (
                "PGHA_ETCD_ENDPOINTS",
                "http://[fdaa::9]:2379,[fdaa::a]:2379",
            ),
            ("PGHA_POSTGRESQL_ADVERTISE_HOST", "fdaa::2"),
            ("PGHA_POSTGRESQL_LISTEN_ADDRESSES", "[::]"),
            ("PGHA_API_LISTEN", "[fdaa::2]:8008"),
            ("PGHA_API_ADVERTISE_URL", "http://[fdaa::2]:8008"),
        ],
    )
    .unwrap();
    assert_eq!(
        from_env.etcd.endpoints,
        ["http://[fdaa::9]:2379", "http://[fdaa::a]:2379"]
    );
    assert_eq!(from_env.postgresql.advertise_host, "fdaa::2");
    assert_eq!(from_env.postgresql.listen_addresses, "::");
    assert_eq!(
        from_env.api.listen,
        ["[fdaa::2]:8008".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(from_env.api.advertise_url, "http://[fdaa::2]:8008");
}

#[test]
fn ip_family_sets_the_wildcards_and_rejects_the_other_family() {
    let dual = parse(&minimal()).unwrap();
    assert_eq!(dual.postgresql.listen_addresses, "*");
    assert_eq!(dual.api.listen, ["[::]:8008".parse().unwrap()]);

    let v6 = parse(&with("", "ip_family = \"ipv6\"")).unwrap();
    assert_eq!(v6.ip_family, IpFamily::Ipv6);
    assert_eq!(v6.postgresql.listen_addresses, "::");
    assert_eq!(v6.api.listen, ["[::]:8008".parse().unwrap()]);
    let star = parse(&add(
        &with("", "ip_family = \"ipv6\""),
        "postgresql",
        "listen_addresses = \"*\"",
    ))
    .unwrap();
    assert_eq!(star.postgresql.listen_addresses, "::");

    let v4 = parse_env(&minimal(), &[("PGHA_IP_FAMILY", "ipv4")]).unwrap();
    assert_eq!(v4.ip_family, IpFamily::Ipv4);
    assert_eq!(v4.postgresql.listen_addresses, "0.0.0.0");
    assert_eq!(v4.api.listen, ["0.0.0.0:8008".parse().unwrap()]);

    for (text, key, expected) in [
        (
            with("", "ip_family = \"v6\""),
            "ip_family",
            "expected \"dual\", \"ipv6\" or \"ipv4\", got \"v6\"",
        ),
        (
            add(
                &with("", "ip_family = \"ipv4\""),
                "api",
                "listen = [\"0.0.0.0:8008\", \"[::]:8009\"]",
            ),
            "api.listen[1]",
            "not an address of ip_family \"ipv4\"",
        ),
        (
            add(
                &with("", "ip_family = \"ipv6\""),
                "postgresql",
                "listen_addresses = [\"::\", \"10.0.0.1\"]",
            ),
            "postgresql.listen_addresses[1]",
            "not an address of ip_family \"ipv6\"",
        ),
        (
            with("postgresql", "listen_addresses = \"fdaa::zz\""),
            "postgresql.listen_addresses[0]",
            "expected \"*\", an IP address",
        ),
        (
            with("postgresql", "listen_addresses = []"),
            "postgresql.listen_addresses",
            "at least one",
        ),
        (
            minimal().replace("\"http://n1.internal:8008\"", "\"http://fdaa::2:8008\""),
            "api.advertise_url",
            "goes in brackets",
        ),
        (
            minimal().replace("\"http://n1.internal:8008\"", "\"http://[fdaa::2:8008\""),
            "api.advertise_url",
            "lacks its",
        ),
    ] {
        let message = assert_key(parse(&text), key);
        assert!(message.contains(expected), "{message}");
    }
    let err = expect_err(parse_env(&minimal(), &[("PGHA_IP_FAMILY", "both")]));
    assert_eq!(
        (err.key(), err.env_var()),
        (Some("ip_family"), Some("PGHA_IP_FAMILY"))
    );
}

#[test]
fn summary_is_one_line() {
    let summary = parse(&minimal()).unwrap().summary();
    assert!(!summary.contains('\n'));
    assert!(summary.starts_with("scope=demo name=n1 "), "{summary}");
}

/// The file of one app's every Machine: no name, no addresses.
fn one_file_for_every_machine() -> String {
    let text = minimal().replace("name = \"n1\"\n", "");
    let text = text.replace("advertise_host = \"n1.internal\"\n", "");
    text.replace("advertise_url = \"http://n1.internal:8008\"\n", "")
}

#[test]
fn one_file_serves_every_machine_the_identity_comes_from_the_platform() {
    let text = one_file_for_every_machine();
    let machine = |id: &str, ip: &str| {
        parse_env(
            &text,
            &[
                ("FLY_MACHINE_ID", id),
                ("FLY_PRIVATE_IP", ip),
                ("FLY_REGION", "ams"),
                ("FLY_APP_NAME", "mydb"),
            ],
        )
        .unwrap()
    };
    let a = machine("3d8d9e1b2c4e89", "fdaa:0:c037:a7b:c207:e395:9a80:2");
    let b = machine("e784079b449483", "fdaa:0:c037:a7b:c5:7d2a:1b4c:2");
    assert_eq!(a.name, "3d8d9e1b2c4e89");
    assert_eq!(b.name, "e784079b449483");
    assert_eq!(a.region.as_deref(), Some("ams"));
    assert_eq!(
        a.postgresql.advertise_host,
        "fdaa:0:c037:a7b:c207:e395:9a80:2"
    );
    assert_eq!(
        a.api.advertise_url,
        "http://[fdaa:0:c037:a7b:c207:e395:9a80:2]:8008"
    );
    assert_eq!(
        b.api.advertise_url,
        "http://[fdaa:0:c037:a7b:c5:7d2a:1b4c:2]:8008"
    );
    assert_eq!(a.tls.service_names, ["mydb.internal"]);
    let sans: Vec<String> = a.tls.names.iter().map(ToString::to_string).collect();
    for san in [
        "DNS:3d8d9e1b2c4e89",
        "DNS:mydb.internal",
        "IP:fdaa:0:c037:a7b:c207:e395:9a80:2",
    ] {
        assert!(sans.contains(&san.to_owned()), "{san} not in {sans:?}");
    }
    let shown: Vec<String> = a
        .identity_defaults
        .iter()
        .map(|d| format!("{}={} ({})", d.key, d.value, d.origin))
        .collect();
    assert_eq!(
        shown,
        [
            "name=3d8d9e1b2c4e89 ($FLY_MACHINE_ID)",
            "region=ams ($FLY_REGION)",
            "postgresql.advertise_host=fdaa:0:c037:a7b:c207:e395:9a80:2 ($FLY_PRIVATE_IP)",
            "api.advertise_url=http://[fdaa:0:c037:a7b:c207:e395:9a80:2]:8008 \
             (postgresql.advertise_host and api.listen)",
            "tls.service_names=mydb.internal ($FLY_APP_NAME)",
        ]
    );
    // The replication connection to it takes the literal without brackets.
    let up = crate::postgres::conf::Upstream {
        name: a.name.clone(),
        host: a.postgresql.advertise_host.clone(),
        port: a.postgresql.advertise_port,
    };
    let conninfo = crate::postgres::conf::primary_conninfo(&b.postgresql, &b.name, &up);
    assert!(
        conninfo.starts_with("host='fdaa:0:c037:a7b:c207:e395:9a80:2' port=5432 "),
        "{conninfo}"
    );
}

#[test]
fn what_the_file_or_pgha_variables_say_wins_over_the_platform() {
    let fly = [
        ("FLY_MACHINE_ID", "3d8d9e1b2c4e89"),
        ("FLY_PRIVATE_IP", "fdaa::2"),
        ("FLY_REGION", "ams"),
        ("FLY_APP_NAME", "mydb"),
    ];
    // The file's own values (minimal() sets name and addresses).
    let file = parse_env(&minimal(), &fly).unwrap();
    assert_eq!(file.name, "n1");
    assert_eq!(file.postgresql.advertise_host, "n1.internal");
    assert_eq!(file.api.advertise_url, "http://n1.internal:8008");
    let keys: Vec<&str> = file.identity_defaults.iter().map(|d| d.key).collect();
    assert_eq!(keys, ["region", "tls.service_names"]);

    // PGHA_* overrides beat the platform too; empty values opt out.
    let mut vars = fly.to_vec();
    vars.extend([
        ("PGHA_NAME", "pg1"),
        ("PGHA_POSTGRESQL_ADVERTISE_HOST", "pg1.internal"),
        ("PGHA_REGION", ""),
        ("PGHA_TLS_SERVICE_NAMES", ""),
    ]);
    let env = parse_env(&one_file_for_every_machine(), &vars).unwrap();
    assert_eq!(env.name, "pg1");
    assert_eq!(env.postgresql.advertise_host, "pg1.internal");
    assert_eq!(env.api.advertise_url, "http://pg1.internal:8008");
    assert_eq!(env.region, None);
    assert!(env.tls.service_names.is_empty());
    let keys: Vec<&str> = env.identity_defaults.iter().map(|d| d.key).collect();
    assert_eq!(keys, ["api.advertise_url"]);

    // Service names of the file replace the platform's.
    let named = parse_env(
        &format!(
            "{}[tls]\nservice_names = [\"db.example.com\", \"fdaa::99\"]\n",
            minimal()
        ),
        &fly,
    )
    .unwrap();
    assert_eq!(named.tls.service_names, ["db.example.com", "fdaa::99"]);
    let sans: Vec<String> = named.tls.names.iter().map(ToString::to_string).collect();
    assert!(sans.contains(&"DNS:db.example.com".to_owned()), "{sans:?}");
    assert!(sans.contains(&"IP:fdaa::99".to_owned()), "{sans:?}");
    assert!(!sans.contains(&"DNS:mydb.internal".to_owned()), "{sans:?}");

    // Without TLS there is no certificate to name the service in.
    let plain = parse_env(&format!("{}[tls]\nenabled = false\n", minimal()), &fly).unwrap();
    assert!(plain.tls.service_names.is_empty());
    let keys: Vec<&str> = plain.identity_defaults.iter().map(|d| d.key).collect();
    assert_eq!(keys, ["region"]);
}

#[test]
fn off_the_platform_the_name_is_the_hostname_and_the_api_url_follows_the_host() {
    let text = one_file_for_every_machine().replace(
        "[postgresql]\n",
        "[postgresql]\nadvertise_host = \"[fdaa::7]\"\n",
    );
    let text = add(&text, "api", "listen = [\"[::]:9000\"]");
    let config = parse_on_host(&text, &[], "db-7.example.com").unwrap();
    assert_eq!(config.name, "db-7.example.com");
    assert_eq!(config.postgresql.advertise_host, "fdaa::7");
    assert_eq!(config.api.advertise_url, "http://[fdaa::7]:9000");
    assert_eq!(config.region, None);
    assert!(config.tls.service_names.is_empty());

    // Nothing gives a value: the key, and what would have.
    let message = assert_key(parse(&one_file_for_every_machine()), "name");
    assert!(
        message.contains("PGHA_NAME") && message.contains("FLY_MACHINE_ID"),
        "{message}"
    );
    let message = assert_key(
        parse_on_host(&one_file_for_every_machine(), &[], "db-7"),
        "postgresql.advertise_host",
    );
    assert!(
        message.contains("PGHA_POSTGRESQL_ADVERTISE_HOST") && message.contains("FLY_PRIVATE_IP"),
        "{message}"
    );
    assert_key(
        parse_on_host(&one_file_for_every_machine(), &[], "localhost"),
        "name",
    );
    let message = assert_key(
        parse_on_host(&one_file_for_every_machine(), &[], "db 7"),
        "name",
    );
    assert!(
        message.contains("the hostname is not a usable name"),
        "{message}"
    );
    // A platform variable that cannot be used is named with the key.
    assert_key_env(
        parse_env(
            &one_file_for_every_machine(),
            &[("FLY_MACHINE_ID", "m1"), ("FLY_PRIVATE_IP", "fdaa::zz")],
        ),
        "postgresql.advertise_host",
        "FLY_PRIVATE_IP",
    );
    assert_key_env(
        parse_env(
            &one_file_for_every_machine(),
            &[("FLY_MACHINE_ID", "m/1"), ("FLY_PRIVATE_IP", "fdaa::2")],
        ),
        "name",
        "FLY_MACHINE_ID",
    );
    assert_key_env(
        parse_env(
            &one_file_for_every_machine(),
            &[
                ("FLY_MACHINE_ID", "m1"),
                ("FLY_PRIVATE_IP", "fdaa::2"),
                ("FLY_APP_NAME", "my app"),
            ],
        ),
        "tls.service_names",
        "FLY_APP_NAME",
    );
    // The file's bad service name is the file's error.
    assert_key(
        parse(&format!(
            "{}[tls]\nservice_names = [\"bad name\"]\n",
            minimal()
        )),
        "tls.service_names[0]",
    );
}
