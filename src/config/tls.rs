//! Glue for the `[tls]` section, which `crate::tls::settings` owns: its
//! environment keys, and its validation (last, since it checks names and
//! addresses of the other sections) with errors as "FILE: KEY: ...".

use super::context::Context;
use super::env::EnvKind;
use super::{Config, ConfigError};

pub(super) const KEYS: &[(&str, EnvKind)] = &[
    ("tls.enabled", EnvKind::Boolean),
    ("tls.ca_cert_file", EnvKind::Text),
    ("tls.ca_key_file", EnvKind::Text),
    ("tls.ca_cert", EnvKind::Text),
    ("tls.ca_key", EnvKind::Text),
    ("tls.dir", EnvKind::Text),
    ("tls.cert_validity", EnvKind::Text),
    ("tls.hostnames", EnvKind::List),
    ("tls.hostssl_clients", EnvKind::Boolean),
    ("tls.replication_client_cert", EnvKind::Boolean),
    ("tls.api", EnvKind::Boolean),
    ("tls.api_client_auth", EnvKind::Boolean),
];

/// Validates `[tls]` against the rest of `config` and fills in the TLS
/// settings of `config` and of its Postgres section.
pub(super) fn validate(
    file: crate::tls::FileTls,
    config: &mut Config,
    cx: &Context<'_>,
) -> Result<(), ConfigError> {
    config.tls = file
        .validate(
            config,
            &|path| cx.resolve(path),
            std::time::SystemTime::now(),
        )
        .map_err(|(key, message)| cx.invalid(&key, message))?;
    config.postgresql.tls = config.tls.for_postgres();
    Ok(())
}
