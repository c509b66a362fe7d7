//! `pgha certs ...`: create a cluster CA, issue an operator's client
//! certificate, describe certificates. Returns the text to print; the
//! dispatcher (`cli::Cli::dispatch`) prints it and chooses the exit code.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum CertsAction {
    /// Create a cluster CA (ECDSA P-256): DIR/ca.crt and DIR/ca.key (0600).
    /// Give both to every node (tls.ca_cert_file and tls.ca_key_file, or
    /// PGHA_TLS_CA_CERT and PGHA_TLS_CA_KEY holding the PEM text).
    Ca {
        #[arg(long)]
        out: PathBuf,
        /// Validity, e.g. "3650days".
        #[arg(long, default_value = "3650days", value_parser = humantime::parse_duration)]
        validity: Duration,
        /// Common name of the CA.
        #[arg(long, default_value = "pgha cluster CA")]
        name: String,
    },
    /// Issue a client certificate signed by the CA (for operator endpoints
    /// with tls.api_client_auth): OUT/NAME.crt and OUT/NAME.key (0600).
    Client {
        #[arg(long)]
        ca_cert: PathBuf,
        #[arg(long)]
        ca_key: PathBuf,
        /// Common name, e.g. the operator's name.
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "90days", value_parser = humantime::parse_duration)]
        validity: Duration,
    },
    /// Print subject, SANs, issuer and expiry of each certificate: the
    /// files given, or those a node's config uses.
    Show {
        #[arg(long)]
        config: Option<PathBuf>,
        files: Vec<PathBuf>,
    },
}

/// Carries out `action`; the text to print, or why it failed.
pub fn run(action: CertsAction) -> Result<String, String> {
    match action {
        CertsAction::Ca {
            out,
            validity,
            name,
        } => {
            let (cert, key) =
                crate::tls::create_ca_files(&out, &name, validity).map_err(|e| e.to_string())?;
            Ok(format!(
                "created {} and {} (keep the key secret)\n",
                cert.display(),
                key.display()
            ))
        }
        CertsAction::Client {
            ca_cert,
            ca_key,
            name,
            out,
            validity,
        } => {
            let (cert, key) =
                crate::tls::create_client_files(&ca_cert, &ca_key, &name, &out, validity)
                    .map_err(|e| e.to_string())?;
            Ok(format!(
                "created {} and {}\n",
                cert.display(),
                key.display()
            ))
        }
        CertsAction::Show { config, mut files } => {
            if let Some(path) = config {
                let cfg = crate::config::Config::load(&path).map_err(|e| e.to_string())?;
                files.extend(crate::tls::node_files(&cfg.tls));
            }
            if files.is_empty() {
                return Err("no certificate to show: give files or --config FILE".into());
            }
            crate::tls::describe_files(&files).map_err(|e| e.to_string())
        }
    }
}
