//! Glue for the `[tls]` section, which `crate::tls::settings` owns: its
//! environment keys, and its validation (last, since it checks names and
//! addresses of the other sections) with errors as "FILE: KEY: ...".

use super::context::Context;
use super::env::EnvKind;
use super::identity::{self, Defaulted, Platform};
use super::{Config, ConfigError};
use crate::tls::settings::NodeFacts;

pub(super) const KEYS: &[(&str, EnvKind)] = &[
    ("tls.enabled", EnvKind::Boolean),
    ("tls.ca_cert_file", EnvKind::Text),
    ("tls.ca_key_file", EnvKind::Text),
    ("tls.ca_cert", EnvKind::Text),
    ("tls.ca_key", EnvKind::Text),
    ("tls.dir", EnvKind::Text),
    ("tls.cert_validity", EnvKind::Text),
    ("tls.hostnames", EnvKind::List),
    ("tls.service_names", EnvKind::List),
    ("tls.hostssl_clients", EnvKind::Boolean),
    ("tls.replication_client_cert", EnvKind::Boolean),
    ("tls.api", EnvKind::Boolean),
    ("tls.api_client_auth", EnvKind::Boolean),
];

/// Validates `[tls]` against the rest of `config` and fills in the TLS
/// settings of `config` and of its Postgres section. `platform` gives the
/// service names when the file leaves them out.
pub(super) fn validate(
    file: crate::tls::FileTls,
    config: &mut Config,
    cx: &Context<'_>,
    platform: &Platform,
) -> Result<(), ConfigError> {
    let key = "tls.service_names";
    let default_service_names = if !file.takes_default_service_names() {
        Vec::new()
    } else {
        match identity::service_names(platform).map_err(|p| cx.problem(key, p))? {
            Some((names, origin)) => {
                config.identity_defaults.push(Defaulted {
                    key,
                    value: names.join(","),
                    origin,
                });
                names
            }
            None => Vec::new(),
        }
    };
    let node = NodeFacts {
        name: &config.name,
        data_dir: &config.postgresql.data_dir,
        advertise_host: &config.postgresql.advertise_host,
        pg_listen: &config.postgresql.listen_addresses,
        api_listen: &config.api.listen,
        api_advertise_url: &config.api.advertise_url,
        replication_user: &config.postgresql.replication.username,
        default_service_names: &default_service_names,
    };
    config.tls = file
        .validate(
            &node,
            &|path| cx.resolve(path),
            std::time::SystemTime::now(),
        )
        .map_err(|(key, message)| cx.invalid(&key, message))?;
    config.postgresql.tls = config.tls.for_postgres();
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    use crate::config::Config;
    use crate::postgres::conf::{managed_parameters, primary_conninfo, render_pg_hba, Upstream};
    use crate::tls::settings::DEFAULT_CERT_VALIDITY;

    fn node(tls: &str, extra_api: &str) -> String {
        format!(
            "scope = \"demo\"\nname = \"n1\"\n[etcd]\nendpoints = [\"127.0.0.1:2379\"]\n\
             [postgresql]\ndata_dir = \"/var/lib/pgha/n1/data\"\nbin_dir = '{}'\n\
             listen_addresses = \"127.0.0.1,::1\"\nadvertise_host = \"fdaa::2\"\n\
             [postgresql.replication]\npassword = \"x\"\n\
             [api]\nlisten = [\"[::]:8008\"]\nadvertise_url = \"{extra_api}\"\n[tls]\n{tls}\n",
            std::env::temp_dir().display()
        )
    }

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/pgha.toml"), &BTreeMap::new())
            .map_err(|e| e.to_string())
    }

    /// A shared CA in files under a temporary directory; returns the [tls] lines.
    fn shared_ca(dir: &Path) -> String {
        let now = SystemTime::now();
        let ca = crate::tls::pki::create_ca("t", now, Duration::from_secs(86_400)).unwrap();
        std::fs::write(dir.join("ca.crt"), &ca.cert_pem).unwrap();
        std::fs::write(dir.join("ca.key"), ca.key_pem.expose()).unwrap();
        format!(
            "ca_cert_file = \"{}\"\nca_key_file = \"{}\"\n",
            dir.join("ca.crt").display(),
            dir.join("ca.key").display()
        )
    }

    #[test]
    fn defaults_turn_tls_on_with_a_ca_of_the_node_s_own() {
        let config = parse(&node(
            "hostnames = [\"n1.internal\"]",
            "http://n1.internal:8008",
        ))
        .unwrap();
        let tls = &config.tls;
        assert!(tls.enabled && !tls.shared_ca() && !tls.api);
        assert_eq!(tls.dir, Path::new("/var/lib/pgha/n1/data.tls"));
        assert_eq!(tls.cert_validity, DEFAULT_CERT_VALIDITY);
        assert!(tls.listens_on_any, "api on [::]");
        let names: Vec<String> = tls.names.iter().map(ToString::to_string).collect();
        assert_eq!(
            names,
            [
                "DNS:localhost",
                "DNS:n1",
                "DNS:n1.internal",
                "IP:127.0.0.1",
                "IP:::1",
                "IP:fdaa::2"
            ]
        );

        // Postgres: ssl on, not overridable; replication hostssl, encrypted only.
        let mut pg = config.postgresql.clone();
        pg.parameters.insert("ssl".into(), "off".into());
        let params = managed_parameters(&pg, "n1", None, &Default::default());
        assert_eq!(params["ssl"], "on");
        assert_eq!(params["ssl_min_protocol_version"], "'TLSv1.2'");
        assert_eq!(
            params["ssl_key_file"],
            "'/var/lib/pgha/n1/data.tls/server.key'"
        );
        assert_eq!(params["ssl_ca_file"], "'/var/lib/pgha/n1/data.tls/ca.crt'");
        let hba = render_pg_hba(&pg);
        assert!(
            hba.contains("hostssl replication  replicator   0.0.0.0/0            scram-sha-256\n"),
            "{hba}"
        );
        assert!(
            hba.contains("host    all          all          ::/0"),
            "{hba}"
        );
        assert!(!hba.contains("host    replication"), "{hba}");
        let up = Upstream {
            name: "n2".into(),
            host: "fdaa::3".into(),
            port: 5432,
        };
        let conninfo = primary_conninfo(&pg, "n1", &up);
        assert!(conninfo.ends_with(" sslmode='require'"), "{conninfo}");
    }

    #[test]
    fn a_shared_ca_gives_verify_full_and_client_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let tls = format!(
            "{}replication_client_cert = true\nhostssl_clients = true\napi = true\napi_client_auth = true\ncert_validity = \"2m\"\n",
            shared_ca(dir.path())
        );
        let config = parse(&node(&tls, "https://n1.internal:8008")).unwrap();
        assert!(config.tls.shared_ca() && config.tls.api && config.tls.api_client_auth);
        assert_eq!(config.tls.cert_validity, Duration::from_secs(120));
        let pg = &config.postgresql;
        let hba = render_pg_hba(pg);
        assert!(
            hba.contains("scram-sha-256 clientcert=verify-full\n"),
            "{hba}"
        );
        assert!(hba.contains("hostssl all          all"), "{hba}");
        assert!(!hba.contains("host    "), "{hba}");
        let up = Upstream {
            name: "n2".into(),
            host: "n2.internal".into(),
            port: 5432,
        };
        let conninfo = primary_conninfo(pg, "n1", &up);
        for part in [
            " sslmode='verify-full'",
            " sslrootcert='/var/lib/pgha/n1/data.tls/ca.crt'",
            " sslcert='/var/lib/pgha/n1/data.tls/replication.crt'",
            " sslkey='/var/lib/pgha/n1/data.tls/replication.key'",
        ] {
            assert!(conninfo.contains(part), "{conninfo} lacks {part}");
        }
        // pg_rewind connects as the superuser: no replication certificate.
        assert_eq!(pg.tls.libpq_params(false).len(), 2);
        // The CA key never shows in Debug output.
        let debug = format!("{config:?}");
        assert!(!debug.contains("PRIVATE KEY"), "{debug}");
    }

    #[test]
    fn contradictions_are_errors_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = shared_ca(dir.path());
        let cert_only = ca.lines().next().unwrap().to_owned();
        for (tls, url, expected) in [
            (
                "api = true",
                "https://n1:8008",
                "/etc/pgha.toml: tls.api: an HTTPS API needs a CA shared",
            ),
            (
                &format!("{ca}api = true") as &str,
                "http://n1:8008",
                "api.advertise_url: expected an https:// URL",
            ),
            (
                "replication_client_cert = true",
                "http://n1:8008",
                "tls.replication_client_cert: client certificates needs a CA shared",
            ),
            (
                "api_client_auth = true",
                "http://n1:8008",
                "tls.api_client_auth: needs tls.api = true",
            ),
            (
                "enabled = false\nhostssl_clients = true",
                "http://n1:8008",
                "tls.hostssl_clients: needs tls.enabled",
            ),
            (
                "cert_validity = \"10s\"",
                "http://n1:8008",
                "tls.cert_validity: must be at least 1m",
            ),
            (
                "cert_validity = \"soon\"",
                "http://n1:8008",
                "tls.cert_validity: expected a duration",
            ),
            (
                "dir = \"/var/lib/pgha/n1/data/tls\"",
                "http://n1:8008",
                "tls.dir: /var/lib/pgha/n1/data/tls is inside postgresql.data_dir",
            ),
            (
                "hostnames = [\"bad name\"]",
                "http://n1:8008",
                "tls.hostnames[0]: expected a host name",
            ),
            (
                &cert_only as &str,
                "http://n1:8008",
                "tls.ca_cert_file: a CA certificate needs its key too",
            ),
            (
                "ca_key = \"x\"\nca_key_file = \"y\"",
                "http://n1:8008",
                "tls.ca_key_file: conflicts with tls.ca_key",
            ),
            (
                "tls_typo = 1",
                "http://n1:8008",
                "tls.tls_typo: unknown key",
            ),
        ] {
            let err = parse(&node(tls, url)).unwrap_err();
            assert!(err.contains(expected), "{tls}: {err}");
        }
    }

    #[test]
    fn the_default_postgres_listen_address_counts_as_a_wildcard() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "scope = \"demo\"\nname = \"n1\"\n[etcd]\nendpoints = [\"127.0.0.1:2379\"]\n\
             [postgresql]\ndata_dir = \"{}\"\nbin_dir = '{}'\nadvertise_host = \"n1.internal\"\n\
             [postgresql.replication]\npassword = \"x\"\n\
             [api]\nadvertise_url = \"http://n1.internal:8008\"\n",
            dir.path().join("data").display(),
            std::env::temp_dir().display()
        );
        let config = Config::parse(&text, &dir.path().join("pgha.toml"), &BTreeMap::new()).unwrap();
        assert!(config.tls.listens_on_any, "listen_addresses defaults to *");
    }
}
