//! TLS out of the box: this node's certificates for Postgres, replication
//! and the API, signed by the cluster CA (or a CA of the node's own when
//! none is configured), written atomically, and renewed before expiry with a
//! Postgres reload and a hot swap of the API's certificate.
//!
//! `pki` is the certificate logic without I/O, `settings` the `[tls]` config
//! section, `https` the rustls configurations of the API server and client.

pub mod https;
pub mod pki;
pub mod settings;

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::secret::Secret;
pub use https::postgres_client;
use pki::{CertInfo, Issued, Issuer, SubjectName};
pub use settings::{CaSource, FileTls, TlsConfig};

/// Validity of the CA a node creates for itself when none is configured.
const OWN_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);

/// File names inside the TLS directory.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.crt";
pub const SERVER_KEY: &str = "server.key";
pub const REPLICATION_CERT: &str = "replication.crt";
pub const REPLICATION_KEY: &str = "replication.key";

/// What Postgres rendering and process control need to know about TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgTls {
    pub enabled: bool,
    pub dir: PathBuf,
    /// Peers share a CA: replication verifies the server (`verify-full`).
    pub verify_full: bool,
    /// Clients must use TLS (`hostssl` in pg_hba).
    pub hostssl_clients: bool,
    /// Replication authenticates with a client certificate too.
    pub replication_client_cert: bool,
}

impl PgTls {
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// libpq parameters for a connection to a peer: `sslmode` and, for
    /// replication with client certificates, the certificate to present.
    pub fn libpq_params(&self, replication: bool) -> Vec<(&'static str, String)> {
        if !self.enabled {
            return Vec::new();
        }
        let path = |name: &str| self.file(name).display().to_string();
        let mut params = if self.verify_full {
            vec![
                ("sslmode", "verify-full".to_owned()),
                ("sslrootcert", path(CA_CERT)),
            ]
        } else {
            vec![("sslmode", "require".to_owned())]
        };
        if replication && self.replication_client_cert {
            params.push(("sslcert", path(REPLICATION_CERT)));
            params.push(("sslkey", path(REPLICATION_KEY)));
        }
        params
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Pki(#[from] pki::PkiError),
    #[error("{0}")]
    Other(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TlsError {
    let what = what.into();
    move |source| TlsError::Io { what, source }
}

/// Expiry time of each certificate this node uses (`ca`, `server`,
/// `replication`), sorted by name: the seconds-until-expiry inputs of
/// `/metrics`. The API receives a [`watch`] of it when it is set up.
pub type CertExpiries = Vec<(&'static str, SystemTime)>;

fn record_expiry(
    table: &watch::Sender<CertExpiries>,
    certificate: &'static str,
    not_after: SystemTime,
) {
    table.send_modify(|table| {
        table.retain(|(name, _)| *name != certificate);
        table.push((certificate, not_after));
        table.sort();
    });
}

/// This node's certificates: issued at start, renewed by [`NodeTls::rotate`].
pub struct NodeTls {
    cfg: TlsConfig,
    data_dir: PathBuf,
    /// uid/gid of the Postgres OS user when the agent runs as root.
    owner: Option<(u32, u32)>,
    issuer: Issuer,
    /// The API's certificate, swapped in place at renewal.
    api: Option<Arc<https::CertSwap>>,
    /// Validity of the current server certificate.
    current: Mutex<(SystemTime, SystemTime)>,
    /// Updated at every issue and renewal.
    expiries: watch::Sender<CertExpiries>,
}

impl NodeTls {
    /// Loads or creates the CA, issues this node's certificates and writes
    /// them. `None` when TLS is disabled. `os_user` owns the files when the
    /// agent runs as root; `data_dir` is the Postgres data directory.
    pub fn prepare(
        cfg: &TlsConfig,
        os_user: &str,
        data_dir: &Path,
    ) -> Result<Option<Arc<NodeTls>>, TlsError> {
        if !cfg.enabled {
            return Ok(None);
        }
        let owner = postgres_owner(os_user)?;
        create_private_dir(&cfg.dir, owner)?;
        let now = SystemTime::now();
        let issuer = match &cfg.ca {
            CaSource::Shared {
                cert_pem,
                key_pem,
                origin,
            } => {
                let issuer = Issuer::from_pem(cert_pem, key_pem.expose(), now).map_err(|p| {
                    let (pki::CaProblem::Cert(e) | pki::CaProblem::Key(e)) = p;
                    TlsError::Other(format!("CA from {origin}: {e}"))
                })?;
                write_file(&cfg.dir.join(CA_CERT), &issuer.cert_pem, 0o644, owner)?;
                // A CA of the node's own from before is no longer used.
                let _ = std::fs::remove_file(cfg.dir.join(CA_KEY));
                issuer
            }
            CaSource::Own => own_ca(&cfg.dir, &cfg.common_name, owner, now)?,
        };
        let expiries = watch::Sender::new(CertExpiries::new());
        record_expiry(&expiries, "ca", issuer.not_after);
        let node = NodeTls {
            cfg: cfg.clone(),
            data_dir: data_dir.to_owned(),
            owner,
            issuer,
            api: None,
            current: Mutex::new((now, now)),
            expiries,
        };
        let server = node.issue_all(now)?;
        let api = cfg
            .api
            .then(|| https::CertSwap::new(&server))
            .transpose()?
            .map(Arc::new);
        Ok(Some(Arc::new(NodeTls { api, ..node })))
    }

    pub fn config(&self) -> &TlsConfig {
        &self.cfg
    }

    /// The expiry of each certificate this node uses, kept current across renewals.
    pub fn expiries(&self) -> watch::Receiver<CertExpiries> {
        self.expiries.subscribe()
    }

    /// The CA certificate peers and clients trust (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.issuer.cert_pem
    }

    /// The API server's TLS setup, when the API serves HTTPS.
    pub fn api_server(&self) -> Result<Option<https::ApiTls>, TlsError> {
        match &self.api {
            Some(swap) => https::ApiTls::new(
                swap.clone(),
                &self.issuer.cert_pem,
                self.cfg.api_client_auth,
            )
            .map(Some),
            None => Ok(None),
        }
    }

    /// Every SAN of this node's certificate right now: the configured names
    /// plus, when listening on a wildcard, every interface address.
    fn subject_names(&self) -> Vec<SubjectName> {
        let mut names = self.cfg.names.clone();
        if self.cfg.listens_on_any {
            if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
                for ifaddr in addrs {
                    let Some(addr) = ifaddr.address else { continue };
                    if let Some(v4) = addr.as_sockaddr_in() {
                        names.push(SubjectName::Ip(v4.ip().into()));
                    } else if let Some(v6) = addr.as_sockaddr_in6() {
                        let ip = v6.ip();
                        // Link-local addresses need a zone; no client names them in a URL.
                        if ip.segments()[0] & 0xffc0 != 0xfe80 {
                            names.push(SubjectName::Ip(ip.into()));
                        }
                    }
                }
            }
        }
        names.sort();
        names.dedup();
        names
    }

    /// Issues and writes the server certificate (and the replication client
    /// certificate when configured); returns the server certificate.
    fn issue_all(&self, now: SystemTime) -> Result<Issued, TlsError> {
        let cfg = &self.cfg;
        let names = self.subject_names();
        let server = self
            .issuer
            .issue(&cfg.common_name, &names, true, now, cfg.cert_validity)?;
        // Key first: Postgres reading the new certificate with the old key
        // would refuse both; the reverse order has the same window, and a
        // reload happens only after both are in place.
        write_file(
            &cfg.dir.join(SERVER_KEY),
            server.key_pem.expose(),
            0o600,
            self.owner,
        )?;
        write_file(
            &cfg.dir.join(SERVER_CERT),
            &server.cert_pem,
            0o644,
            self.owner,
        )?;
        record_expiry(&self.expiries, "server", server.not_after);
        if cfg.replication_client_cert {
            let client =
                self.issuer
                    .issue(&cfg.replication_user, &[], false, now, cfg.cert_validity)?;
            write_file(
                &cfg.dir.join(REPLICATION_KEY),
                client.key_pem.expose(),
                0o600,
                self.owner,
            )?;
            write_file(
                &cfg.dir.join(REPLICATION_CERT),
                &client.cert_pem,
                0o644,
                self.owner,
            )?;
            record_expiry(&self.expiries, "replication", client.not_after);
        }
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = (now, server.not_after);
        info!(
            dir = %cfg.dir.display(),
            not_after = %humantime::format_rfc3339_seconds(server.not_after),
            names = %names.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            "certificate issued"
        );
        Ok(server)
    }

    /// Renews the certificates once less than a third of their validity is
    /// left: new files, then Postgres reloads (SIGHUP, no restart) and the
    /// API swaps its certificate while its listeners stay open.
    pub async fn rotate(self: Arc<Self>, shutdown: CancellationToken) {
        // Often enough that a short validity (tests) renews in time.
        let check_every =
            (self.cfg.cert_validity / 30).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut warned_ca_expiry = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(check_every) => {}
            }
            let now = SystemTime::now();
            let (not_before, not_after) = *self.current.lock().unwrap_or_else(|p| p.into_inner());
            if !pki::renewal_due(not_before, not_after, now) {
                continue;
            }
            if self.issuer.not_after <= not_after {
                // A certificate never outlives its CA: renewing would not
                // extend it. Only a new CA (and a restart) helps.
                if !warned_ca_expiry {
                    warn!(
                        ca_not_after = %humantime::format_rfc3339_seconds(self.issuer.not_after),
                        "the CA expires with this node's certificate: replace the CA"
                    );
                    warned_ca_expiry = true;
                }
                continue;
            }
            match self.issue_all(now) {
                Ok(server) => {
                    if let Some(api) = &self.api {
                        if let Err(e) = api.replace(&server) {
                            warn!(error = %e, "API certificate not swapped");
                        }
                    }
                    self.reload_postgres();
                }
                Err(e) => warn!(error = %e, "certificate renewal failed; retrying"),
            }
        }
    }

    /// SIGHUP to the postmaster: Postgres re-reads its certificate files.
    fn reload_postgres(&self) {
        let Some(pid) = crate::fence::postmaster_pid(&self.data_dir) else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(pid);
        match nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP) {
            Ok(()) => info!(
                pid = pid.as_raw(),
                "postgres reloaded for the new certificate"
            ),
            Err(e) => warn!(pid = pid.as_raw(), error = %e, "postgres reload failed"),
        }
    }
}

/// The node's own CA from `dir`, created when missing or no longer usable.
fn own_ca(
    dir: &Path,
    node: &str,
    owner: Option<(u32, u32)>,
    now: SystemTime,
) -> Result<Issuer, TlsError> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    if let (Ok(cert), Ok(key)) = (
        std::fs::read_to_string(&cert_path),
        std::fs::read_to_string(&key_path),
    ) {
        match Issuer::from_pem(&cert, &key, now) {
            Ok(issuer) => return Ok(issuer),
            Err(pki::CaProblem::Cert(e) | pki::CaProblem::Key(e)) => {
                warn!(file = %cert_path.display(), reason = %e, "this node's own CA is unusable: creating a new one");
            }
        }
    }
    let ca = pki::create_ca(&format!("pgha node CA {node}"), now, OWN_CA_VALIDITY)?;
    write_file(&key_path, ca.key_pem.expose(), 0o600, owner)?;
    write_file(&cert_path, &ca.cert_pem, 0o644, owner)?;
    info!(file = %cert_path.display(), "created this node's own CA (no tls.ca_cert_file configured)");
    Issuer::from_pem(&ca.cert_pem, ca.key_pem.expose(), now).map_err(|p| {
        let (pki::CaProblem::Cert(e) | pki::CaProblem::Key(e)) = p;
        TlsError::Pki(e)
    })
}

/// uid/gid of `os_user` when this process is root (files go to Postgres).
fn postgres_owner(os_user: &str) -> Result<Option<(u32, u32)>, TlsError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name(os_user)
        .map_err(|e| TlsError::Other(format!("looking up OS user {os_user}: {e}")))?
        .ok_or_else(|| {
            TlsError::Other(format!(
                "OS user {os_user} (postgresql.os_user) does not exist"
            ))
        })?;
    Ok(Some((user.uid.as_raw(), user.gid.as_raw())))
}

fn create_private_dir(dir: &Path, owner: Option<(u32, u32)>) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("chmod {}", dir.display())))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))
            .map_err(io_err(format!("chown {}", dir.display())))?;
    }
    Ok(())
}

/// Writes `contents` atomically: a temporary file created with `mode` (a
/// key is never readable by others, not even for a moment), synced, owned
/// by `owner`, then renamed over `path`.
pub fn write_file(
    path: &Path,
    contents: &str,
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), TlsError> {
    // Per file (server.crt and server.key must not share one).
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".pgha-tmp");
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(format!("creating {}", tmp.display())))?;
    // The umask may have narrowed `mode`; a certificate must stay readable.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {}", tmp.display())))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_err(format!("writing {}", tmp.display())))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))
            .map_err(io_err(format!("chown {}", tmp.display())))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(format!("renaming into {}", path.display())))
}

/// `pgha certs ca`: a new cluster CA in `out` (`ca.crt`, `ca.key` 0600).
/// Refuses to replace existing files.
pub fn create_ca_files(
    out: &Path,
    common_name: &str,
    validity: Duration,
) -> Result<(PathBuf, PathBuf), TlsError> {
    std::fs::create_dir_all(out).map_err(io_err(format!("creating {}", out.display())))?;
    let (cert_path, key_path) = (out.join(CA_CERT), out.join(CA_KEY));
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(TlsError::Other(format!(
                "{} exists: not overwriting a CA (remove it first, or choose another --out)",
                path.display()
            )));
        }
    }
    let ca = pki::create_ca(common_name, SystemTime::now(), validity)?;
    write_file(&key_path, ca.key_pem.expose(), 0o600, None)?;
    write_file(&cert_path, &ca.cert_pem, 0o644, None)?;
    Ok((cert_path, key_path))
}

/// `pgha certs client`: a client certificate for an operator, signed by the
/// CA in `ca_dir`, written to `out` as `NAME.crt` and `NAME.key` (0600).
pub fn create_client_files(
    ca_cert: &Path,
    ca_key: &Path,
    name: &str,
    out: &Path,
    validity: Duration,
) -> Result<(PathBuf, PathBuf), TlsError> {
    let read =
        |p: &Path| std::fs::read_to_string(p).map_err(io_err(format!("reading {}", p.display())));
    let key_pem = Secret::new(read(ca_key)?);
    let now = SystemTime::now();
    let issuer = Issuer::from_pem(&read(ca_cert)?, key_pem.expose(), now).map_err(|p| match p {
        pki::CaProblem::Cert(e) => TlsError::Other(format!("{}: {e}", ca_cert.display())),
        pki::CaProblem::Key(e) => TlsError::Other(format!("{}: {e}", ca_key.display())),
    })?;
    let cert = issuer.issue(name, &[], false, now, validity)?;
    std::fs::create_dir_all(out).map_err(io_err(format!("creating {}", out.display())))?;
    let (cert_path, key_path) = (
        out.join(format!("{name}.crt")),
        out.join(format!("{name}.key")),
    );
    write_file(&key_path, cert.key_pem.expose(), 0o600, None)?;
    write_file(&cert_path, &cert.cert_pem, 0o644, None)?;
    Ok((cert_path, key_path))
}

/// `pgha certs show`: every certificate in `files`, described.
pub fn describe_files(files: &[PathBuf]) -> Result<String, TlsError> {
    let now = SystemTime::now();
    let mut out = String::new();
    for file in files {
        let text =
            std::fs::read_to_string(file).map_err(io_err(format!("reading {}", file.display())))?;
        let infos = CertInfo::all_from_pem(&text)
            .map_err(|e| TlsError::Other(format!("{}: {e}", file.display())))?;
        for info in infos {
            out.push_str(&info.render(&file.display().to_string(), now));
        }
    }
    Ok(out)
}

/// The certificate files of a node's TLS directory that exist.
pub fn node_files(cfg: &TlsConfig) -> Vec<PathBuf> {
    [CA_CERT, SERVER_CERT, REPLICATION_CERT]
        .iter()
        .map(|name| cfg.dir.join(name))
        .filter(|p| p.exists())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_writes_the_node_s_files_with_interface_addresses_for_a_wildcard() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        // What the loader passes for a config with only the required keys
        // (config/tls.rs checks that `listen_addresses` defaults to `*`).
        let api_listen = ["[::]:8008".parse().unwrap()];
        let facts = settings::NodeFacts {
            name: "n1",
            data_dir: &data_dir,
            advertise_host: "n1.internal",
            pg_listen: "*",
            api_listen: &api_listen,
            api_advertise_url: "http://n1.internal:8008",
            replication_user: "replicator",
            default_service_names: &[],
        };
        let cfg = FileTls::default()
            .validate(&facts, &|p| dir.path().join(p), SystemTime::now())
            .unwrap();
        assert!(cfg.listens_on_any, "listen_addresses defaults to *");
        let node = NodeTls::prepare(&cfg, "postgres", &data_dir)
            .unwrap()
            .expect("TLS on by default");
        let tls_dir = dir.path().join("data.tls");
        let mode = |name: &str| {
            std::fs::metadata(tls_dir.join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(SERVER_KEY), 0o600);
        assert_eq!(mode(CA_KEY), 0o600);
        assert_eq!(mode(SERVER_CERT), 0o644);
        assert!(!data_dir.exists(), "the data directory is not touched");
        let server =
            CertInfo::from_pem(&std::fs::read_to_string(tls_dir.join(SERVER_CERT)).unwrap())
                .unwrap();
        // The loopback interface is every machine's: both families.
        for name in [
            "DNS:n1",
            "DNS:n1.internal",
            "DNS:localhost",
            "IP:127.0.0.1",
            "IP:::1",
        ] {
            assert!(
                server.sans.contains(&name.to_owned()),
                "{name} not in {:?}",
                server.sans
            );
        }
        let ca = CertInfo::from_pem(node.ca_pem()).unwrap();
        assert_eq!(server.issuer, ca.subject);

        // A second start keeps the node's own CA and issues a new certificate.
        let again = NodeTls::prepare(&cfg, "postgres", &data_dir)
            .unwrap()
            .unwrap();
        assert_eq!(again.ca_pem(), node.ca_pem());
        let renewed =
            CertInfo::from_pem(&std::fs::read_to_string(tls_dir.join(SERVER_CERT)).unwrap())
                .unwrap();
        assert_ne!(renewed.public_key_der, server.public_key_der);
        let expiries = again.expiries();
        let names: Vec<&str> = expiries.borrow().iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["ca", "server"]);
    }
}
