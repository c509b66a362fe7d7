//! The `[tls]` section of the config file: parsed by serde, checked here
//! (CA files read and verified), turned into [`TlsConfig`]. `config.rs`
//! calls [`FileTls::validate`] and wraps its errors as "FILE: KEY: ...".

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::pki::{CaProblem, Issuer, SubjectName};
use super::PgTls;
use crate::config::{Config, Secret};

pub const DEFAULT_CERT_VALIDITY: Duration = Duration::from_secs(90 * 86_400);
/// Below this, renewal (at a third of the validity left) would run constantly.
const MIN_CERT_VALIDITY: Duration = Duration::from_secs(60);

/// `[tls]` as written in the file; every key optional.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    enabled: Option<bool>,
    ca_cert_file: Option<String>,
    ca_key_file: Option<String>,
    ca_cert: Option<String>,
    ca_key: Option<String>,
    dir: Option<String>,
    cert_validity: Option<String>,
    #[serde(default)]
    hostnames: Vec<String>,
    hostssl_clients: Option<bool>,
    replication_client_cert: Option<bool>,
    api: Option<bool>,
    api_client_auth: Option<bool>,
}

/// Where this node's CA comes from.
#[derive(Clone)]
pub enum CaSource {
    /// A CA shared by the cluster, given through config or environment:
    /// peers verify each other (`sslmode=verify-full`).
    Shared {
        cert_pem: String,
        key_pem: Secret,
        /// File or key the certificate came from, for messages.
        origin: String,
    },
    /// No CA configured: the node keeps its own CA in `dir` (created on
    /// first start). Traffic is encrypted, but peers cannot verify it.
    Own,
}

impl std::fmt::Debug for CaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaSource::Shared { origin, .. } => write!(f, "Shared({origin})"),
            CaSource::Own => f.write_str("Own"),
        }
    }
}

/// Validated TLS settings of one node.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// `tls.enabled = false` turns TLS off entirely (an explicit choice, never a fallback).
    pub enabled: bool,
    pub ca: CaSource,
    /// Where certificates and keys are written (owned by the Postgres user).
    pub dir: PathBuf,
    pub cert_validity: Duration,
    /// Common name of this node's certificate: the node name.
    pub common_name: String,
    /// SANs known from the config: node name, advertised and extra host
    /// names, localhost, listen and advertised addresses.
    pub names: Vec<SubjectName>,
    /// Postgres or the API listens on a wildcard address: the node's
    /// interface addresses are added at issuance.
    pub listens_on_any: bool,
    pub hostssl_clients: bool,
    pub replication_client_cert: bool,
    /// Serve the API over HTTPS with the node certificate.
    pub api: bool,
    /// Operator endpoints require a client certificate signed by the CA.
    pub api_client_auth: bool,
    /// Common name of the replication client certificate (the replication user).
    pub replication_user: String,
}

impl TlsConfig {
    /// TLS off; the placeholder while `[tls]` is validated.
    pub fn disabled() -> TlsConfig {
        TlsConfig {
            enabled: false,
            ca: CaSource::Own,
            dir: PathBuf::new(),
            cert_validity: DEFAULT_CERT_VALIDITY,
            common_name: String::new(),
            names: Vec::new(),
            listens_on_any: false,
            hostssl_clients: false,
            replication_client_cert: false,
            api: false,
            api_client_auth: false,
            replication_user: String::new(),
        }
    }

    pub fn shared_ca(&self) -> bool {
        matches!(self.ca, CaSource::Shared { .. })
    }

    /// The part Postgres rendering and process control need.
    pub fn for_postgres(&self) -> PgTls {
        PgTls {
            enabled: self.enabled,
            dir: self.dir.clone(),
            verify_full: self.shared_ca(),
            hostssl_clients: self.hostssl_clients,
            replication_client_cert: self.replication_client_cert,
        }
    }
}

/// What the rest of the config tells TLS about this node.
struct NodeFacts<'a> {
    name: &'a str,
    data_dir: &'a Path,
    advertise_host: &'a str,
    /// `listen_addresses` of Postgres, comma-separated.
    pg_listen: &'a str,
    api_listen: &'a [std::net::SocketAddr],
    api_advertise_url: &'a str,
    replication_user: &'a str,
}

/// A bad key: its dotted path and what was expected.
pub type KeyError = (String, String);

fn bad(key: &str, message: impl Into<String>) -> KeyError {
    (key.to_owned(), message.into())
}

impl FileTls {
    /// Checks the section; `resolve` makes a path from the file absolute.
    /// `config` is the rest of the validated config (its `tls` a placeholder).
    pub fn validate(
        self,
        config: &Config,
        resolve: &dyn Fn(&str) -> PathBuf,
        now: SystemTime,
    ) -> Result<TlsConfig, KeyError> {
        let node = NodeFacts {
            name: &config.name,
            data_dir: &config.postgresql.data_dir,
            advertise_host: &config.postgresql.advertise_host,
            pg_listen: &config.postgresql.listen_addresses,
            api_listen: &config.api.listen,
            api_advertise_url: &config.api.advertise_url,
            replication_user: &config.postgresql.replication.username,
        };
        let enabled = self.enabled.unwrap_or(true);
        let cert_validity = match &self.cert_validity {
            None => DEFAULT_CERT_VALIDITY,
            Some(text) => humantime::parse_duration(text.trim()).map_err(|_| {
                bad(
                    "tls.cert_validity",
                    format!("expected a duration like \"90days\" or \"2m\", got {text:?}"),
                )
            })?,
        };
        if cert_validity < MIN_CERT_VALIDITY {
            return Err(bad(
                "tls.cert_validity",
                format!(
                    "must be at least {}",
                    humantime::format_duration(MIN_CERT_VALIDITY)
                ),
            ));
        }
        let ca = self.ca_source(resolve, now)?;
        let dir = match &self.dir {
            Some(d) if d.trim().is_empty() => return Err(bad("tls.dir", "must not be empty")),
            Some(d) => resolve(d),
            None => {
                let mut s = node.data_dir.as_os_str().to_owned();
                s.push(".tls");
                PathBuf::from(s)
            }
        };
        if dir.starts_with(node.data_dir) {
            return Err(bad(
                "tls.dir",
                format!(
                    "{} is inside postgresql.data_dir: a clone would copy this node's keys to others",
                    dir.display()
                ),
            ));
        }

        let mut names = vec![
            SubjectName::parse(node.name),
            SubjectName::parse(node.advertise_host),
            SubjectName::Dns("localhost".into()),
        ];
        for (index, host) in self.hostnames.iter().enumerate() {
            let name = SubjectName::parse(host);
            if let SubjectName::Dns(d) = &name {
                let ok = !d.is_empty()
                    && d.split('.').all(|label| {
                        !label.is_empty()
                            && label
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '*'))
                    });
                if !ok {
                    return Err(bad(
                        &format!("tls.hostnames[{index}]"),
                        format!("expected a host name or an IP address, got {host:?}"),
                    ));
                }
            }
            names.push(name);
        }
        let mut listens_on_any = false;
        for address in node.pg_listen.split(',').map(str::trim) {
            match address.parse::<IpAddr>() {
                Ok(ip) if ip.is_unspecified() => listens_on_any = true,
                Ok(ip) => names.push(SubjectName::Ip(ip)),
                Err(_) if address == "*" => listens_on_any = true,
                Err(_) if !address.is_empty() => names.push(SubjectName::parse(address)),
                Err(_) => {}
            }
        }
        for addr in node.api_listen {
            if addr.ip().is_unspecified() {
                listens_on_any = true;
            } else {
                names.push(SubjectName::Ip(addr.ip()));
            }
        }
        if let Some(host) = url_host(node.api_advertise_url) {
            names.push(SubjectName::parse(host));
        }
        names.sort();
        names.dedup();

        let config = TlsConfig {
            enabled,
            ca,
            dir,
            cert_validity,
            common_name: node.name.to_owned(),
            names,
            listens_on_any,
            hostssl_clients: self.hostssl_clients.unwrap_or(false),
            replication_client_cert: self.replication_client_cert.unwrap_or(false),
            api: self.api.unwrap_or(false),
            api_client_auth: self.api_client_auth.unwrap_or(false),
            replication_user: node.replication_user.to_owned(),
        };
        let https = node.api_advertise_url.starts_with("https://");
        let needs = |key: &str, what: &str| -> Result<(), KeyError> {
            if !config.enabled {
                return Err(bad(key, format!("{what} needs tls.enabled = true")));
            }
            if !config.shared_ca() {
                return Err(bad(
                    key,
                    format!(
                        "{what} needs a CA shared by the cluster (tls.ca_cert_file and \
                         tls.ca_key_file, or PGHA_TLS_CA_CERT and PGHA_TLS_CA_KEY): \
                         with a CA of its own per node, peers cannot verify each other"
                    ),
                ));
            }
            Ok(())
        };
        if config.replication_client_cert {
            needs("tls.replication_client_cert", "client certificates")?;
        }
        if config.api {
            needs("tls.api", "an HTTPS API")?;
            if !https {
                return Err(bad(
                    "api.advertise_url",
                    format!(
                        "expected an https:// URL since tls.api = true, got {:?}",
                        node.api_advertise_url
                    ),
                ));
            }
        }
        if config.api_client_auth && !config.api {
            return Err(bad("tls.api_client_auth", "needs tls.api = true"));
        }
        if config.hostssl_clients && !config.enabled {
            return Err(bad("tls.hostssl_clients", "needs tls.enabled = true"));
        }
        Ok(config)
    }

    /// Reads and checks the CA from files or environment text.
    fn ca_source(
        &self,
        resolve: &dyn Fn(&str) -> PathBuf,
        now: SystemTime,
    ) -> Result<CaSource, KeyError> {
        let read = |key: &str, path: &str| -> Result<(String, String), KeyError> {
            let path = resolve(path);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| bad(key, format!("{}: cannot read: {e}", path.display())))?;
            Ok((text, path.display().to_string()))
        };
        let pick = |text_key: &str,
                    text: &Option<String>,
                    file_key: &str,
                    file: &Option<String>|
         -> Result<Option<(String, String, String)>, KeyError> {
            match (text, file) {
                (Some(_), Some(_)) => Err(bad(
                    file_key,
                    format!("conflicts with {text_key}: set only one of them"),
                )),
                (Some(t), None) if t.trim().is_empty() => Err(bad(
                    text_key,
                    "must not be empty (leave the key out instead)",
                )),
                (Some(t), None) => Ok(Some((t.clone(), text_key.to_owned(), text_key.to_owned()))),
                (None, Some(f)) => {
                    let (t, origin) = read(file_key, f)?;
                    Ok(Some((t, file_key.to_owned(), origin)))
                }
                (None, None) => Ok(None),
            }
        };
        let cert = pick(
            "tls.ca_cert",
            &self.ca_cert,
            "tls.ca_cert_file",
            &self.ca_cert_file,
        )?;
        let key = pick(
            "tls.ca_key",
            &self.ca_key,
            "tls.ca_key_file",
            &self.ca_key_file,
        )?;
        match (cert, key) {
            (None, None) => Ok(CaSource::Own),
            (Some((_, cert_key, _)), None) => Err(bad(
                &cert_key,
                "a CA certificate needs its key too (tls.ca_key_file or PGHA_TLS_CA_KEY): \
                 the node signs its own certificate with it",
            )),
            (None, Some((_, key_key, _))) => Err(bad(
                &key_key,
                "a CA key needs its certificate too (tls.ca_cert_file or PGHA_TLS_CA_CERT)",
            )),
            (Some((cert_pem, cert_key, cert_origin)), Some((key_pem, key_key, key_origin))) => {
                let key_pem = Secret::new(key_pem);
                match Issuer::from_pem(&cert_pem, key_pem.expose(), now) {
                    Ok(_) => Ok(CaSource::Shared {
                        cert_pem,
                        key_pem,
                        origin: cert_origin,
                    }),
                    Err(CaProblem::Cert(e)) => Err(bad(
                        &cert_key,
                        format!("{}: {}", origin_label(&cert_key, &cert_origin), e.0),
                    )),
                    Err(CaProblem::Key(e)) => Err(bad(
                        &key_key,
                        format!("{}: {}", origin_label(&key_key, &key_origin), e.0),
                    )),
                }
            }
        }
    }
}

/// The file a value came from, or "the value" when it was inline text.
fn origin_label(key: &str, origin: &str) -> String {
    if key == origin {
        "the PEM text".to_owned()
    } else {
        origin.to_owned()
    }
}

/// The host of an `http(s)://host:port/...` URL, IPv6 without brackets.
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next();
    }
    authority.split(':').next().filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::Config;
    use crate::postgres::conf::{managed_parameters, primary_conninfo, render_pg_hba, Upstream};

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
        let ca = super::super::pki::create_ca("t", now, Duration::from_secs(86_400)).unwrap();
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
    fn url_hosts() {
        assert_eq!(url_host("https://n1.internal:8008"), Some("n1.internal"));
        assert_eq!(url_host("http://[fdaa::2]:8008/x"), Some("fdaa::2"));
        assert_eq!(url_host("http://127.0.0.1"), Some("127.0.0.1"));
    }
}
