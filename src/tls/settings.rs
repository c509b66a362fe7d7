//! The `[tls]` section of the config file: parsed by serde, checked here
//! (CA files read and verified), turned into [`TlsConfig`]. The config
//! loader (`config/tls.rs`) tells it about the node through [`NodeFacts`],
//! calls [`FileTls::validate`] and wraps its errors as "FILE: KEY: ...".

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::pki::{CaProblem, Issuer, SubjectName};
use super::PgTls;
use crate::secret::Secret;

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
    service_names: Option<Vec<String>>,
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
    /// Names of the whole service (the routers' address, e.g.
    /// `<app>.internal`), the same on every node; part of `names`.
    pub service_names: Vec<String>,
    /// SANs known from the config: node name, advertised and extra host
    /// names, service names, localhost, listen and advertised addresses.
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
            service_names: Vec::new(),
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
pub struct NodeFacts<'a> {
    pub name: &'a str,
    pub data_dir: &'a Path,
    pub advertise_host: &'a str,
    /// `listen_addresses` of Postgres, comma-separated.
    pub pg_listen: &'a str,
    pub api_listen: &'a [std::net::SocketAddr],
    pub api_advertise_url: &'a str,
    pub replication_user: &'a str,
    /// `tls.service_names` when the file leaves it out (the platform's).
    pub default_service_names: &'a [String],
}

/// A bad key: its dotted path and what was expected.
pub type KeyError = (String, String);

fn bad(key: &str, message: impl Into<String>) -> KeyError {
    (key.to_owned(), message.into())
}

impl FileTls {
    /// Whether the platform's default `service_names` would be used: the
    /// file sets none, and TLS is not turned off.
    pub fn takes_default_service_names(&self) -> bool {
        self.service_names.is_none() && self.enabled != Some(false)
    }

    /// Whether the API is to serve HTTPS (`tls.api`), for a default `api.advertise_url`.
    pub fn serves_https_api(&self) -> bool {
        self.api.unwrap_or(false)
    }

    /// Checks the section; `resolve` makes a path from the file absolute.
    /// `node` is what the other, already validated sections say.
    pub fn validate(
        self,
        node: &NodeFacts<'_>,
        resolve: &dyn Fn(&str) -> PathBuf,
        now: SystemTime,
    ) -> Result<TlsConfig, KeyError> {
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
            names.push(subject_name(&format!("tls.hostnames[{index}]"), host)?);
        }
        let service_names = self
            .service_names
            .clone()
            .unwrap_or_else(|| node.default_service_names.to_vec());
        for (index, host) in service_names.iter().enumerate() {
            names.push(subject_name(&format!("tls.service_names[{index}]"), host)?);
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
            service_names,
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

/// A host name (a label may be `*`) or an IP address for a certificate's SANs.
fn subject_name(key: &str, host: &str) -> Result<SubjectName, KeyError> {
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
                key,
                format!("expected a host name or an IP address, got {host:?}"),
            ));
        }
    }
    Ok(name)
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
    use super::*;

    // The section as the loader assembles it (with Postgres rendering) is
    // tested in config/tls.rs.

    #[test]
    fn url_hosts() {
        assert_eq!(url_host("https://n1.internal:8008"), Some("n1.internal"));
        assert_eq!(url_host("http://[fdaa::2]:8008/x"), Some("fdaa::2"));
        assert_eq!(url_host("http://127.0.0.1"), Some("127.0.0.1"));
    }
}
