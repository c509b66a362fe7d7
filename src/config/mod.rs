//! Configuration: the TOML file (plus `PGHA_<SECTION>_<KEY>` environment
//! overrides) is parsed into a serde file struct, then validated into the
//! runtime [`Config`] the rest of the agent uses. Every error names the file,
//! the key and what was expected.
//!
//! Each section owns its file struct, defaults, environment keys and
//! validation (`etcd`, `postgres`, `api`, `timing`, `cluster`, `tags`, `log`,
//! `router`, `backup`;
//! `[tls]` is owned by `crate::tls::settings`, glued in by `tls`: config
//! depends on tls, never the other way). `loader`
//! only assembles them; `env` applies the `PGHA_*` overrides; `identity`
//! fills in the node's name, region, addresses and service names from the
//! platform (`FLY_*`, the hostname) where the file leaves them out;
//! `context` turns problems into [`ConfigError`]s that read "FILE: KEY: ...".

mod api;
mod backup;
mod cluster;
mod context;
mod env;
mod error;
mod etcd;
pub mod identity;
mod loader;
mod log;
mod postgres;
mod router;
mod tags;
mod timing;
mod tls;
mod values;

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use crate::net::IpFamily;

pub use crate::secret::Secret;
pub use api::ApiConfig;
pub use backup::{BackupConfig, Compress};
pub use cluster::ClusterDefaults;
pub use env::{EnvSource, ProcessEnv};
pub use error::ConfigError;
pub use etcd::EtcdConfig;
pub use log::{LogConfig, LogFormat};
pub use postgres::{Archiving, CloneFrom, Credentials, PostgresConfig};
pub use router::RouterConfig;
pub use tags::Tags;
pub use timing::Timing;
pub use values::parse_bytes;

/// The validated runtime configuration of one agent.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration was read from (for messages).
    pub source: PathBuf,
    /// Cluster name; every node of one cluster shares it.
    pub scope: String,
    /// This node's name, unique in the cluster.
    pub name: String,
    /// Region this node runs in (e.g. the platform's region code), if any.
    pub region: Option<String>,
    /// IP families the API and Postgres listen on.
    pub ip_family: IpFamily,
    pub etcd: EtcdConfig,
    pub postgresql: PostgresConfig,
    pub api: ApiConfig,
    pub timing: Timing,
    /// Seeds of the dynamic cluster configuration, written to etcd by the
    /// node that bootstraps the cluster.
    pub cluster: ClusterDefaults,
    pub tags: Tags,
    pub log: LogConfig,
    /// The TCP router to the primary (and replicas); off by default.
    pub router: RouterConfig,
    /// WAL archiving and backups through pgBackRest; off by default.
    pub backup: BackupConfig,
    /// Certificates for Postgres, replication and the API.
    pub tls: crate::tls::TlsConfig,
    /// Keys the file and the `PGHA_*` variables left out that the node's
    /// identity filled in (the name from `FLY_MACHINE_ID`, ...), in order.
    pub identity_defaults: Vec<identity::Defaulted>,
}

impl Config {
    /// The URL the CLI uses to reach this node's API.
    pub fn api_url_for_cli(&self) -> String {
        self.api.advertise_url.clone()
    }

    /// One line describing what was loaded, for `pgha check-config`.
    pub fn summary(&self) -> String {
        format!(
            "scope={} name={} etcd={} prefix={} data_dir={} bin_dir={} port={} api={}",
            self.scope,
            self.name,
            self.etcd.endpoints.join(","),
            self.etcd.prefix,
            self.postgresql.data_dir.display(),
            self.postgresql.bin_dir.display(),
            self.postgresql.port,
            self.api.advertise_url,
        )
    }
}
