//! `--api`, `--config` and the TLS flags every cluster command shares: how
//! the CLI finds a member's API and how it verifies and authenticates to it.

use std::path::PathBuf;
use std::process::ExitCode;

use super::load_config;

/// How the CLI finds and talks to the cluster.
#[derive(clap::Args)]
pub(super) struct Target {
    /// API of any member; localhost is reached over IPv6 or IPv4, whichever answers.
    #[arg(long, env = "PGHA_API_URL", default_value = "http://localhost:8008")]
    api: String,
    /// Find the API through this node's config instead.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Bearer token for operator requests.
    #[arg(long, env = "PGHA_API_TOKEN", hide_env_values = true)]
    pub(super) token: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub(super) json: bool,
    /// CA certificate that verifies an https:// API (default with --config:
    /// the node's shared CA).
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// Client certificate for operator endpoints that require one (with --key).
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Key of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
}

impl Target {
    /// The API URL; also sets up how https:// URLs are verified.
    pub(super) fn api(&self) -> Result<String, ExitCode> {
        let config = self.config.as_deref().map(load_config).transpose()?;
        let ca_pem = match (&self.cacert, &config) {
            (Some(path), _) => Some(read_pem(path)?),
            (None, Some(c)) => match &c.tls.ca {
                crate::tls::CaSource::Shared { cert_pem, .. } => Some(cert_pem.clone()),
                crate::tls::CaSource::Own => None,
            },
            (None, None) => None,
        };
        if let Some(ca_pem) = ca_pem {
            let identity = match (&self.cert, &self.key) {
                (Some(cert), Some(key)) => Some((read_pem(cert)?, read_pem(key)?)),
                _ => None,
            };
            let identity = identity.as_ref().map(|(c, k)| (c.as_str(), k.as_str()));
            if let Err(e) = crate::tls::https::trust_for_api_clients(&ca_pem, identity) {
                eprintln!("error: {e}");
                return Err(ExitCode::from(2));
            }
        }
        match config {
            Some(c) => Ok(c.api.advertise_url),
            None => match crate::net::HttpUrl::parse(&self.api) {
                Ok(_) => Ok(self.api.clone()),
                Err(why) => {
                    eprintln!("error: --api {:?}: {why}", self.api);
                    Err(ExitCode::from(2))
                }
            },
        }
    }
}

fn read_pem(path: &std::path::Path) -> Result<String, ExitCode> {
    std::fs::read_to_string(path).map_err(|e| {
        eprintln!("error: {}: {e}", path.display());
        ExitCode::from(2)
    })
}
