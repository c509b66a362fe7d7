//! Configuration: the TOML file (plus `PGHA_<SECTION>_<KEY>` environment
//! overrides) is parsed into a serde file struct, then validated into the
//! runtime [`Config`] the rest of the agent uses. Every error names the file,
//! the key and what was expected.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::net::{HttpUrl, IpFamily};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use toml::Value;

/// A password or other secret: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

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
    /// Certificates for Postgres, replication and the API.
    pub tls: crate::tls::TlsConfig,
}

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `http://host:port` URLs (IPv6 literals in brackets).
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster, always ending in `/`: `<namespace>/<scope>/`.
    pub prefix: String,
    pub dial_timeout: Duration,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct PostgresConfig {
    pub data_dir: PathBuf,
    /// Resolved: configured, else `pg_config --bindir`, else newest `/usr/lib/postgresql/*/bin`.
    pub bin_dir: PathBuf,
    /// Value for `listen_addresses` in postgresql.conf, e.g. `*` or `127.0.0.1,::1`.
    pub listen_addresses: String,
    pub port: u16,
    /// Host name or address other members and clients use to reach this Postgres.
    pub advertise_host: String,
    pub advertise_port: u16,
    /// Directory of the Unix socket the agent uses to talk to its Postgres.
    pub socket_dir: PathBuf,
    /// OS user that runs Postgres when the agent runs as root.
    pub os_user: String,
    pub superuser: Credentials,
    pub replication: Credentials,
    /// Extra postgresql.conf parameters (rendered verbatim, values quoted as needed).
    pub parameters: BTreeMap<String, String>,
    /// Extra pg_hba.conf lines, placed before the agent's own lines.
    pub pg_hba: Vec<String>,
    /// TLS files and modes (from `[tls]`; filled in after `[tls]` is validated).
    pub tls: crate::tls::PgTls,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: Vec<SocketAddr>,
    /// URL other members and the CLI use to reach this API.
    pub advertise_url: String,
    /// Bearer token that authorizes operator requests.
    pub token: Option<Secret>,
    /// Basic-auth credentials that authorize operator requests.
    pub username: Option<String>,
    pub password: Option<Secret>,
}

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Lease TTL of the leader key and member keys.
    pub ttl: Duration,
    /// Interval between two passes of the agent loop when nothing wakes it.
    pub loop_wait: Duration,
    /// Timeout of one etcd or Postgres operation before it counts as failed.
    pub retry_timeout: Duration,
    /// How long a graceful stop (SIGINT/SIGTERM) may take, handover included.
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ClusterDefaults {
    /// Replicas lagging more than this many bytes are not promoted.
    pub maximum_lag_on_failover: u64,
    /// How long a crashed primary may take to come back before the key is released.
    pub primary_start_timeout: Duration,
    /// How long the primary keeps the slot of a member gone from etcd.
    pub member_slot_grace: Duration,
    /// Only nodes of this region may become primary.
    pub primary_region: Option<String>,
    /// Reclone a former primary whose rewind failed (the old data directory
    /// is moved aside, never deleted).
    pub auto_reinit: bool,
    /// Written to the dynamic config when this node bootstraps the cluster.
    pub failsafe_mode: bool,
    pub synchronous_mode: crate::ha::SyncMode,
    pub synchronous_node_count: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tags {
    pub nofailover: bool,
    pub noloadbalance: bool,
    pub nosync: bool,
    pub failover_priority: i32,
    /// Free-form tags, as in `tags.extra = { zone = "a" }`.
    pub extra: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `tracing` filter directive; `RUST_LOG` overrides it.
    pub level: String,
}

// ---------------------------------------------------------------------------
// Defaults and limits
// ---------------------------------------------------------------------------

const ENV_PREFIX: &str = "PGHA_";
/// `PGHA_` variables read by the CLI, not configuration keys.
const ENV_NOT_CONFIG: &[&str] = &["PGHA_CONFIG", "PGHA_API_URL"];

const DEFAULT_NAMESPACE: &str = "/pgha";
const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_PORT: u16 = 5432;
const DEFAULT_OS_USER: &str = "postgres";
const DEFAULT_SUPERUSER: &str = "postgres";
const DEFAULT_REPLICATION_USER: &str = "replicator";
const DEFAULT_API_PORT: u16 = 8008;
const DEFAULT_TTL: Duration = Duration::from_secs(10);
const DEFAULT_LOOP_WAIT: Duration = Duration::from_secs(1);
const DEFAULT_RETRY_TIMEOUT: Duration = Duration::from_secs(3);
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(45);
const DEFAULT_MAXIMUM_LAG_ON_FAILOVER: u64 = 1024 * 1024;
const DEFAULT_PRIMARY_START_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MEMBER_SLOT_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_FAILOVER_PRIORITY: i32 = 1;
const DEFAULT_LOG_LEVEL: &str = "info";

/// Below this the leader lease cannot survive one slow etcd round trip.
const MIN_TTL: Duration = Duration::from_secs(3);
/// Longest Unix socket path that works everywhere: `sun_path` holds 104
/// bytes on the BSDs and macOS (108 on Linux), including the final NUL.
const MAX_SOCKET_PATH: usize = 103;
/// postgresql.conf parameters that have a key of their own.
const PARAMETERS_WITH_OWN_KEY: &[(&str, &str)] = &[
    ("port", "postgresql.port"),
    ("listen_addresses", "postgresql.listen_addresses"),
    ("unix_socket_directories", "postgresql.socket_dir"),
    ("data_directory", "postgresql.data_dir"),
    ("synchronous_standby_names", "cluster.synchronous_mode"),
];

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why a configuration could not be loaded. The message always starts with
/// the file, then the key (or the environment variable that set it).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", .file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", .file.display())]
    Syntax {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: {}: {message}", .file.display(), key_location(.key, .env_var.as_deref()))]
    Invalid {
        file: PathBuf,
        /// Dotted key path, e.g. `postgresql.port`.
        key: String,
        /// The `PGHA_*` variable the bad value came from, if any.
        env_var: Option<String>,
        message: String,
    },
    #[error(
        "{}: {var}: unknown environment variable: no configuration key is named so \
         (besides keys, only PGHA_CONFIG and PGHA_API_URL are read)",
        .file.display()
    )]
    UnknownEnv { file: PathBuf, var: String },
}

fn key_location(key: &str, env_var: Option<&str>) -> String {
    match env_var {
        Some(var) => format!("{var} ({key})"),
        None => key.to_owned(),
    }
}

impl ConfigError {
    /// The dotted key path the error is about, when it is about one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }

    /// The environment variable the error is about, if any.
    pub fn env_var(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { env_var, .. } => env_var.as_deref(),
            ConfigError::UnknownEnv { var, .. } => Some(var),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------

/// Where `PGHA_*` overrides come from: the process environment in
/// production, a map in tests.
pub trait EnvSource {
    /// All variables; only those starting with `PGHA_` are looked at.
    fn vars(&self) -> Vec<(String, String)>;
}

/// The environment of this process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn vars(&self) -> Vec<(String, String)> {
        // vars_os: a stray non-UTF-8 variable elsewhere must not abort startup.
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())))
            .collect()
    }
}

impl EnvSource for BTreeMap<String, String> {
    fn vars(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl<S: BuildHasher> EnvSource for HashMap<String, String, S> {
    fn vars(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// How the text of an environment variable becomes a TOML value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EnvKind {
    Text,
    Integer,
    Boolean,
    /// Comma-separated.
    List,
    /// One entry per line (pg_hba lines contain commas).
    Lines,
}

/// Every leaf key of the file. `PGHA_<KEY>` (upper-cased, `.` → `_`)
/// overrides it; matching against this list resolves the `_` ambiguity.
const KEYS: &[(&str, EnvKind)] = &[
    ("scope", EnvKind::Text),
    ("name", EnvKind::Text),
    ("region", EnvKind::Text),
    ("ip_family", EnvKind::Text),
    ("etcd.endpoints", EnvKind::List),
    ("etcd.namespace", EnvKind::Text),
    ("etcd.dial_timeout", EnvKind::Text),
    ("etcd.username", EnvKind::Text),
    ("etcd.password", EnvKind::Text),
    ("etcd.password_file", EnvKind::Text),
    ("postgresql.data_dir", EnvKind::Text),
    ("postgresql.bin_dir", EnvKind::Text),
    ("postgresql.listen_addresses", EnvKind::Text),
    ("postgresql.port", EnvKind::Integer),
    ("postgresql.advertise_host", EnvKind::Text),
    ("postgresql.advertise_port", EnvKind::Integer),
    ("postgresql.socket_dir", EnvKind::Text),
    ("postgresql.os_user", EnvKind::Text),
    ("postgresql.pg_hba", EnvKind::Lines),
    ("postgresql.superuser.username", EnvKind::Text),
    ("postgresql.superuser.password", EnvKind::Text),
    ("postgresql.superuser.password_file", EnvKind::Text),
    ("postgresql.replication.username", EnvKind::Text),
    ("postgresql.replication.password", EnvKind::Text),
    ("postgresql.replication.password_file", EnvKind::Text),
    ("api.listen", EnvKind::List),
    ("api.advertise_url", EnvKind::Text),
    ("api.token", EnvKind::Text),
    ("api.username", EnvKind::Text),
    ("api.password", EnvKind::Text),
    ("timing.ttl", EnvKind::Text),
    ("timing.loop_wait", EnvKind::Text),
    ("timing.retry_timeout", EnvKind::Text),
    ("timing.shutdown_timeout", EnvKind::Text),
    ("cluster.maximum_lag_on_failover", EnvKind::Text),
    ("cluster.primary_start_timeout", EnvKind::Text),
    ("cluster.member_slot_grace", EnvKind::Text),
    ("cluster.primary_region", EnvKind::Text),
    ("cluster.auto_reinit", EnvKind::Boolean),
    ("cluster.failsafe_mode", EnvKind::Boolean),
    ("cluster.synchronous_mode", EnvKind::Text),
    ("cluster.synchronous_node_count", EnvKind::Integer),
    ("tags.nofailover", EnvKind::Boolean),
    ("tags.noloadbalance", EnvKind::Boolean),
    ("tags.nosync", EnvKind::Boolean),
    ("tags.failover_priority", EnvKind::Integer),
    ("log.format", EnvKind::Text),
    ("log.level", EnvKind::Text),
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

/// Tables of free-form entries: `PGHA_<TABLE>_<ENTRY>` sets
/// `<table>.<entry>` with the entry name lower-cased.
const FREE_TABLES: &[&str] = &["postgresql.parameters", "tags.extra"];

fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase().replace('.', "_"))
}

/// The key a `PGHA_*` variable overrides, or `None` if it names no key.
fn env_key(var: &str) -> Option<(String, EnvKind)> {
    if let Some(&(key, kind)) = KEYS.iter().find(|(key, _)| env_name(key) == var) {
        return Some((key.to_owned(), kind));
    }
    FREE_TABLES.iter().find_map(|table| {
        let entry = var.strip_prefix(&format!("{}_", env_name(table)))?;
        (!entry.is_empty()).then(|| {
            (
                format!("{table}.{}", entry.to_ascii_lowercase()),
                EnvKind::Text,
            )
        })
    })
}

/// Converts to the type the key expects; text that does not convert is kept
/// as a string so deserialization reports it with the usual message.
fn env_value(kind: EnvKind, raw: &str) -> Value {
    let split = |sep: char| {
        Value::Array(
            raw.split(sep)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        )
    };
    match kind {
        EnvKind::Text => Value::String(raw.to_owned()),
        EnvKind::Integer => raw
            .trim()
            .parse()
            .map_or_else(|_| Value::String(raw.to_owned()), Value::Integer),
        EnvKind::Boolean => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "on" | "1" | "yes" => Value::Boolean(true),
            "false" | "off" | "0" | "no" => Value::Boolean(false),
            _ => Value::String(raw.to_owned()),
        },
        EnvKind::List => split(','),
        EnvKind::Lines => split('\n'),
    }
}

/// Applies the `PGHA_*` variables on top of the file's table. Returns which
/// variable set which key, so errors can name the variable.
fn apply_env(
    table: &mut toml::Table,
    env: &dyn EnvSource,
    file: &Path,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .vars()
        .into_iter()
        .filter(|(var, _)| var.starts_with(ENV_PREFIX) && !ENV_NOT_CONFIG.contains(&var.as_str()))
        .collect();
    vars.sort();

    let mut set_by = BTreeMap::new();
    for (var, raw) in vars {
        let Some((key, kind)) = env_key(&var) else {
            return Err(ConfigError::UnknownEnv {
                file: file.to_owned(),
                var,
            });
        };
        if let Err(blocker) = set_key(table, &key, env_value(kind, &raw)) {
            return Err(ConfigError::Invalid {
                file: file.to_owned(),
                key: blocker,
                env_var: None,
                message: format!("expected a table, so that {var} can set {key}"),
            });
        }
        set_by.insert(key, var);
    }

    // A password from the environment replaces a password_file from the
    // file, and the other way round; both from the environment conflict.
    for key in set_by.keys() {
        let other = if let Some(section) = key.strip_suffix(".password_file") {
            format!("{section}.password")
        } else if let Some(section) = key.strip_suffix(".password") {
            format!("{section}.password_file")
        } else {
            continue;
        };
        if !set_by.contains_key(&other) {
            remove_key(table, &other);
        }
    }
    Ok(set_by)
}

/// Sets a dotted key, creating tables on the way. On failure returns the
/// path of the value that is in the way (not a table).
fn set_key(table: &mut toml::Table, key: &str, value: Value) -> Result<(), String> {
    let (parents, leaf) = key
        .rsplit_once('.')
        .map_or((None, key), |(p, l)| (Some(p), l));
    let mut current = table;
    let mut walked = String::new();
    for part in parents.into_iter().flat_map(|p| p.split('.')) {
        if !walked.is_empty() {
            walked.push('.');
        }
        walked.push_str(part);
        let next = current
            .entry(part)
            .or_insert_with(|| Value::Table(toml::Table::new()));
        current = next.as_table_mut().ok_or_else(|| walked.clone())?;
    }
    current.insert(leaf.to_owned(), value);
    Ok(())
}

fn remove_key(table: &mut toml::Table, key: &str) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let Some(leaf) = parts.pop() else { return };
    let mut current = table;
    for part in parts {
        match current.get_mut(part).and_then(Value::as_table_mut) {
            Some(next) => current = next,
            None => return,
        }
    }
    current.remove(leaf);
}

// ---------------------------------------------------------------------------
// The file struct
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    scope: String,
    name: String,
    region: Option<String>,
    ip_family: Option<String>,
    etcd: FileEtcd,
    postgresql: FilePostgres,
    api: FileApi,
    #[serde(default)]
    timing: FileTiming,
    #[serde(default)]
    cluster: FileCluster,
    #[serde(default)]
    tags: FileTags,
    #[serde(default)]
    log: FileLog,
    #[serde(default)]
    tls: crate::tls::FileTls,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEtcd {
    endpoints: OneOrMany,
    namespace: Option<String>,
    dial_timeout: Option<FileDuration>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePostgres {
    data_dir: String,
    bin_dir: Option<String>,
    listen_addresses: Option<OneOrMany>,
    port: Option<Port>,
    advertise_host: String,
    advertise_port: Option<Port>,
    socket_dir: Option<String>,
    os_user: Option<String>,
    #[serde(default)]
    parameters: BTreeMap<String, ParameterValue>,
    #[serde(default)]
    pg_hba: Vec<String>,
    #[serde(default)]
    superuser: FileCredentials,
    #[serde(default)]
    replication: FileCredentials,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileCredentials {
    username: Option<String>,
    password: Option<String>,
    password_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileApi {
    listen: Option<OneOrMany>,
    advertise_url: String,
    token: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileTiming {
    ttl: Option<FileDuration>,
    loop_wait: Option<FileDuration>,
    retry_timeout: Option<FileDuration>,
    shutdown_timeout: Option<FileDuration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    maximum_lag_on_failover: Option<ByteSize>,
    primary_start_timeout: Option<FileDuration>,
    member_slot_grace: Option<FileDuration>,
    primary_region: Option<String>,
    auto_reinit: Option<bool>,
    failsafe_mode: Option<bool>,
    synchronous_mode: Option<crate::ha::SyncMode>,
    synchronous_node_count: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileTags {
    nofailover: Option<bool>,
    noloadbalance: Option<bool>,
    nosync: Option<bool>,
    failover_priority: Option<i32>,
    #[serde(default)]
    extra: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileLog {
    format: Option<FileLogFormat>,
    level: Option<String>,
}

/// Deserializes any TOML value and converts it, so that the message says
/// both what was expected and what was found.
fn convert_value<'de, D, T>(
    d: D,
    convert: impl FnOnce(&Value) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    let value = Value::deserialize(d)?;
    convert(&value).map_err(D::Error::custom)
}

/// A value as a user would write it, for "got ..." in messages.
fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Integer(n) => n.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Boolean(b) => b.to_string(),
        Value::Datetime(d) => format!("the date-time {d}"),
        Value::Array(_) => "an array".to_owned(),
        Value::Table(_) => "a table".to_owned(),
    }
}

/// A humantime duration: "10s", "1m 30s", "500ms".
struct FileDuration(Duration);

impl<'de> Deserialize<'de> for FileDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        convert_value(d, |value| {
            value
                .as_str()
                .and_then(|s| humantime::parse_duration(s.trim()).ok())
                .map(FileDuration)
                .ok_or_else(|| format!("expected a duration like \"10s\", got {}", describe(value)))
        })
    }
}

struct Port(u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        convert_value(d, |value| {
            value
                .as_integer()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|&n| n != 0)
                .map(Port)
                .ok_or_else(|| format!("expected an integer 1..65535, got {}", describe(value)))
        })
    }
}

/// Bytes: an integer, or a size string for [`parse_bytes`].
struct ByteSize(u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        convert_value(d, |value| match value {
            Value::String(s) => parse_bytes(s).map(ByteSize),
            Value::Integer(n) => u64::try_from(*n)
                .map(ByteSize)
                .map_err(|_| format!("expected a size of zero or more bytes, got {n}")),
            _ => Err(format!("{SIZE_EXPECTED}, got {}", describe(value))),
        })
    }
}

/// A string or an array of strings.
struct OneOrMany(Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        convert_value(d, |value| {
            let expected = || {
                format!(
                    "expected a string or an array of strings, got {}",
                    describe(value)
                )
            };
            match value {
                Value::String(s) => Ok(OneOrMany(vec![s.clone()])),
                Value::Array(items) => items
                    .iter()
                    .map(|item| item.as_str().map(str::to_owned).ok_or_else(expected))
                    .collect::<Result<_, _>>()
                    .map(OneOrMany),
                _ => Err(expected()),
            }
        })
    }
}

/// A postgresql.conf value, kept as the text Postgres would read.
struct ParameterValue(String);

impl<'de> Deserialize<'de> for ParameterValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        convert_value(d, |value| match value {
            Value::String(s) => Ok(ParameterValue(s.clone())),
            Value::Integer(n) => Ok(ParameterValue(n.to_string())),
            Value::Float(f) => Ok(ParameterValue(f.to_string())),
            Value::Boolean(b) => Ok(ParameterValue(if *b { "on" } else { "off" }.to_owned())),
            _ => Err(format!(
                "expected a string, number or boolean, got {}",
                describe(value)
            )),
        })
    }
}

struct FileLogFormat(LogFormat);

impl<'de> Deserialize<'de> for FileLogFormat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        convert_value(d, |value| match value.as_str() {
            Some("text") => Ok(FileLogFormat(LogFormat::Text)),
            Some("json") => Ok(FileLogFormat(LogFormat::Json)),
            _ => Err(format!(
                "expected \"text\" or \"json\", got {}",
                describe(value)
            )),
        })
    }
}

// ---------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------

const SIZE_EXPECTED: &str =
    "expected a size like \"16MB\", \"1 MiB\", \"512kB\" or a number of bytes";

/// Parses a byte size: a plain number of bytes, or a number and a unit as
/// Postgres writes them (`kB`, `MB`, `GB`, `TB`: powers of 1024) or their
/// IEC spellings (`KiB`, `MiB`, `GiB`, `TiB`). Units are case-insensitive,
/// `B` means bytes, and a space may separate number and unit.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let invalid = || format!("{SIZE_EXPECTED}, got {text:?}");
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits_end);
    if number.is_empty() {
        return Err(invalid());
    }
    let multiplier: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(invalid()),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("size {text:?} is too large"))
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

impl Config {
    /// Reads `path` with overrides from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with_env(path, &ProcessEnv)
    }

    /// Reads `path` with overrides from `env`.
    pub fn load_with_env(path: &Path, env: &dyn EnvSource) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path, env)
    }

    /// Parses the text of the file at `source`: relative paths in it are
    /// resolved against the directory of `source`.
    pub fn parse(text: &str, source: &Path, env: &dyn EnvSource) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|err: toml::de::Error| syntax_error(source, text, &err))?;
        let set_by = apply_env(&mut table, env, source)?;
        let cx = Context {
            source,
            base_dir: base_dir(source),
            set_by,
        };
        let file: FileConfig = serde_path_to_error::deserialize(Value::Table(table))
            .map_err(|err| cx.serde_error(&err))?;
        file.validate(&cx)
    }

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

fn syntax_error(file: &Path, text: &str, err: &toml::de::Error) -> ConfigError {
    let offset = err.span().map_or(0, |span| span.start).min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    ConfigError::Syntax {
        file: file.to_owned(),
        line,
        column,
        // toml's messages may span lines ("invalid table header\nexpected ...").
        message: err
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(": "),
    }
}

/// The absolute directory holding the config file.
fn base_dir(source: &Path) -> PathBuf {
    let absolute = std::path::absolute(source).unwrap_or_else(|_| source.to_owned());
    absolute
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_owned)
}

/// What validation needs to know besides the file struct.
struct Context<'a> {
    source: &'a Path,
    base_dir: PathBuf,
    /// Key path → the `PGHA_*` variable that set it.
    set_by: BTreeMap<String, String>,
}

impl Context<'_> {
    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        // An error inside an overridden value (`api.listen[1]`) names its variable too.
        let env_var = self.set_by.iter().find_map(|(set, var)| {
            let inside = key
                .strip_prefix(set.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']));
            inside.then(|| var.clone())
        });
        ConfigError::Invalid {
            file: self.source.to_owned(),
            key: key.to_owned(),
            env_var,
            message: message.into(),
        }
    }

    fn resolve(&self, path: &str) -> PathBuf {
        let joined = self.base_dir.join(path);
        // `absolute` drops `.` components; `joined` is already absolute.
        std::path::absolute(&joined).unwrap_or(joined)
    }

    fn serde_error(&self, err: &serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
        let mut path = String::new();
        for segment in err.path().iter() {
            match segment {
                serde_path_to_error::Segment::Seq { index } => path.push_str(&format!("[{index}]")),
                serde_path_to_error::Segment::Map { key } => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                }
                serde_path_to_error::Segment::Enum { .. }
                | serde_path_to_error::Segment::Unknown => {}
            }
        }
        let message = err.inner().message().trim_end();

        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.strip_suffix('`'))
        {
            let key = if path.is_empty() {
                field.to_owned()
            } else {
                format!("{path}.{field}")
            };
            let what = if ["etcd", "postgresql", "api"].contains(&key.as_str()) {
                format!("required section [{key}] missing")
            } else {
                "required key missing".to_owned()
            };
            return self.invalid(&key, what);
        }
        if message.starts_with("unknown field `") {
            // serde: "unknown field `x`, expected one of `a`, `b`" / "expected `a`" / "there are no fields"
            let known = message
                .split_once(", expected ")
                .map(|(_, rest)| rest.trim_start_matches("one of ").replace('`', ""));
            let what = match known {
                Some(known) => format!("unknown key (expected one of: {known})"),
                None => "unknown key".to_owned(),
            };
            return self.invalid(&path, what);
        }
        for prefix in ["invalid type: ", "invalid value: "] {
            if let Some((found, expected)) = message
                .strip_prefix(prefix)
                .and_then(|rest| rest.split_once(", expected "))
            {
                return self.invalid(
                    &path,
                    format!(
                        "expected {}, got {}",
                        serde_expected(expected),
                        serde_found(found)
                    ),
                );
            }
        }
        self.invalid(&path, message)
    }
}

/// serde's description of an expected type, in the words of a TOML user.
fn serde_expected(expected: &str) -> String {
    if expected.starts_with("struct ") || expected == "a map" {
        return "a table".to_owned();
    }
    match expected {
        "a sequence" => "an array".to_owned(),
        "i32" | "i64" | "u16" | "u32" | "u64" => "an integer".to_owned(),
        other => other.to_owned(),
    }
}

/// serde's description of an unexpected value (`string "x"`, `integer `5``).
fn serde_found(found: &str) -> String {
    match found {
        "sequence" => return "an array".to_owned(),
        "map" => return "a table".to_owned(),
        _ => {}
    }
    if let Some(quoted) = found.strip_prefix("string ") {
        return quoted.to_owned();
    }
    // `integer `5``, `floating point `1.5``, `boolean `true``: keep the value.
    match found.split_once('`') {
        Some((_, value)) => value.trim_end_matches('`').to_owned(),
        None => found.to_owned(),
    }
}

// ---------------------------------------------------------------------------
// Validation: file struct → Config
// ---------------------------------------------------------------------------

impl FileConfig {
    fn validate(self, cx: &Context<'_>) -> Result<Config, ConfigError> {
        let scope = plain_name(cx, "scope", self.scope)?;
        let name = plain_name(cx, "name", self.name)?;
        let ip_family = match self.ip_family.as_deref().map(str::trim) {
            None => IpFamily::default(),
            Some(text) => IpFamily::parse(text).ok_or_else(|| {
                cx.invalid(
                    "ip_family",
                    format!("expected \"dual\", \"ipv6\" or \"ipv4\", got {text:?}"),
                )
            })?,
        };
        let mut config = Config {
            source: cx.source.to_owned(),
            ip_family,
            etcd: self.etcd.validate(cx, &scope)?,
            postgresql: self.postgresql.validate(cx, ip_family)?,
            api: self.api.validate(cx, ip_family)?,
            timing: self.timing.validate(cx)?,
            cluster: self.cluster.validate(cx)?,
            tags: self.tags.validate(),
            log: self.log.validate(cx)?,
            tls: crate::tls::TlsConfig::disabled(),
            region: self.region.filter(|r| !r.is_empty()),
            scope,
            name,
        };
        // Last: [tls] checks names and addresses of the sections above.
        config.tls = self
            .tls
            .validate(
                &config,
                &|path| cx.resolve(path),
                std::time::SystemTime::now(),
            )
            .map_err(|(key, message)| cx.invalid(&key, message))?;
        config.postgresql.tls = config.tls.for_postgres();
        Ok(config)
    }
}

/// Scope and node names become etcd key segments and file names.
fn plain_name(cx: &Context<'_>, key: &str, value: String) -> Result<String, ConfigError> {
    let ok = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(value)
    } else {
        Err(cx.invalid(
            key,
            format!("expected letters, digits, '_', '.' or '-', got {value:?}"),
        ))
    }
}

fn non_empty(cx: &Context<'_>, key: &str, value: String) -> Result<String, ConfigError> {
    if value.trim().is_empty() {
        Err(cx.invalid(key, "must not be empty"))
    } else {
        Ok(value)
    }
}

/// `password` or `password_file` of `section`; at most one may be set.
fn secret(
    cx: &Context<'_>,
    section: &str,
    password: Option<String>,
    password_file: Option<String>,
) -> Result<Option<Secret>, ConfigError> {
    match (password, password_file) {
        (Some(_), Some(_)) => Err(cx.invalid(
            &format!("{section}.password_file"),
            format!("conflicts with {section}.password: set only one of them"),
        )),
        (Some(password), None) if password.is_empty() => Err(cx.invalid(
            &format!("{section}.password"),
            "must not be empty (leave the key out instead)",
        )),
        (Some(password), None) => Ok(Some(Secret::new(password))),
        (None, Some(file)) => {
            let key = format!("{section}.password_file");
            let path = cx.resolve(&file);
            let text = std::fs::read_to_string(&path).map_err(|err| {
                cx.invalid(&key, format!("cannot read {}: {err}", path.display()))
            })?;
            let password = text.trim_end_matches(['\n', '\r']);
            if password.is_empty() {
                return Err(cx.invalid(&key, format!("{} is empty", path.display())));
            }
            Ok(Some(Secret::new(password)))
        }
        (None, None) => Ok(None),
    }
}

impl FileEtcd {
    fn validate(self, cx: &Context<'_>, scope: &str) -> Result<EtcdConfig, ConfigError> {
        let endpoints = self
            .endpoints
            .0
            .iter()
            .map(|endpoint| {
                etcd_endpoint(endpoint).map_err(|msg| cx.invalid("etcd.endpoints", msg))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(cx.invalid(
                "etcd.endpoints",
                "expected at least one endpoint, like \"http://127.0.0.1:2379\"",
            ));
        }
        let dial_timeout = self.dial_timeout.map_or(DEFAULT_DIAL_TIMEOUT, |d| d.0);
        if dial_timeout.is_zero() {
            return Err(cx.invalid("etcd.dial_timeout", "must be more than 0s"));
        }
        Ok(EtcdConfig {
            endpoints,
            prefix: etcd_prefix(
                self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE),
                scope,
            ),
            dial_timeout,
            username: self.username.filter(|u| !u.is_empty()),
            password: secret(cx, "etcd", self.password, self.password_file)?,
        })
    }
}

/// `http(s)://host:port` from a URL or a bare `host:port`.
fn etcd_endpoint(text: &str) -> Result<String, String> {
    let invalid = |why: &str| {
        format!("expected URLs like \"http://127.0.0.1:2379\" or \"http://[::1]:2379\"{why}, got {text:?}")
    };
    let trimmed = text.trim();
    let (scheme, authority) = trimmed.split_once("://").unwrap_or(("http", trimmed));
    if scheme != "http" && scheme != "https" {
        return Err(invalid(" (http or https)"));
    }
    let authority = authority.trim_end_matches('/');
    if authority.contains('/') {
        return Err(invalid(" (no path)"));
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (address, port) = rest
            .split_once("]:")
            .ok_or_else(|| invalid(" with a port"))?;
        address
            .parse::<Ipv6Addr>()
            .map_err(|_| invalid(" (bad IPv6 address)"))?;
        (address, port)
    } else {
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| invalid(" with a port"))?;
        if host.contains(':') {
            return Err(invalid(" (IPv6 addresses go in brackets)"));
        }
        (host, port)
    };
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(invalid(""));
    }
    Ok(format!("{scheme}://{authority}"))
}

/// `<namespace>/<scope>/` with exactly one leading and one trailing slash.
fn etcd_prefix(namespace: &str, scope: &str) -> String {
    let mut prefix = String::from("/");
    for part in namespace.split('/').filter(|p| !p.is_empty()) {
        prefix.push_str(part);
        prefix.push('/');
    }
    prefix.push_str(scope);
    prefix.push('/');
    prefix
}

impl FilePostgres {
    fn validate(self, cx: &Context<'_>, family: IpFamily) -> Result<PostgresConfig, ConfigError> {
        let data_dir = cx.resolve(&non_empty(cx, "postgresql.data_dir", self.data_dir)?);
        let bin_dir = match self.bin_dir {
            Some(dir) => {
                let dir = cx.resolve(&dir);
                if !dir.is_dir() {
                    return Err(cx.invalid(
                        "postgresql.bin_dir",
                        format!("{} is not a directory", dir.display()),
                    ));
                }
                dir
            }
            None => detect_bin_dir().ok_or_else(|| {
                cx.invalid(
                    "postgresql.bin_dir",
                    "not set, and no PostgreSQL server found (`pg_config --bindir` names no \
                     directory holding `postgres`, nor does any /usr/lib/postgresql/<version>/bin); \
                     set postgresql.bin_dir or PGHA_POSTGRESQL_BIN_DIR",
                )
            })?,
        };
        let listen_addresses = match self.listen_addresses {
            None => family.postgres_wildcard().to_owned(),
            Some(list) => list
                .0
                .iter()
                // A string may hold several, as in postgresql.conf.
                .flat_map(|entry| entry.split(','))
                .enumerate()
                .map(|(index, text)| {
                    listen_address(text, family).map_err(|msg| {
                        cx.invalid(&format!("postgresql.listen_addresses[{index}]"), msg)
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
        };
        if listen_addresses.is_empty() {
            return Err(cx.invalid(
                "postgresql.listen_addresses",
                "expected at least one address, like \"*\" or \"::\"",
            ));
        }
        let port = self.port.map_or(DEFAULT_PORT, |p| p.0);
        let advertise_host = advertise_host(&self.advertise_host)
            .map_err(|msg| cx.invalid("postgresql.advertise_host", msg))?;

        let socket_dir_given = self.socket_dir.is_some();
        let socket_dir = match self.socket_dir {
            Some(dir) => cx.resolve(&non_empty(cx, "postgresql.socket_dir", dir)?),
            None => data_dir
                .parent()
                .map_or_else(|| PathBuf::from("/"), Path::to_owned),
        };
        let socket = socket_dir.join(format!(".s.PGSQL.{port}"));
        let socket_len = socket.as_os_str().len();
        if socket_len > MAX_SOCKET_PATH {
            let origin = if socket_dir_given {
                ""
            } else {
                " (by default the parent directory of postgresql.data_dir)"
            };
            return Err(cx.invalid(
                "postgresql.socket_dir",
                format!(
                    "the Unix socket path {} is {socket_len} bytes, more than the {MAX_SOCKET_PATH} \
                     a socket address can hold; set a shorter directory{origin}",
                    socket.display()
                ),
            ));
        }

        let mut parameters = BTreeMap::new();
        for (name, value) in self.parameters {
            let key = format!("postgresql.parameters.{name}");
            let name = name.to_ascii_lowercase();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.'))
            {
                return Err(cx.invalid(
                    &key,
                    "expected a parameter name of letters, digits, '_' or '.'",
                ));
            }
            if let Some((_, own_key)) = PARAMETERS_WITH_OWN_KEY.iter().find(|(p, _)| *p == name) {
                return Err(cx.invalid(&key, format!("set {own_key} instead")));
            }
            if parameters.insert(name, value.0).is_some() {
                return Err(cx.invalid(&key, "set twice (parameter names ignore case)"));
            }
        }
        if let Some(index) = self.pg_hba.iter().position(|line| line.trim().is_empty()) {
            return Err(cx.invalid(&format!("postgresql.pg_hba[{index}]"), "must not be empty"));
        }

        let superuser = self.superuser;
        let replication = self.replication;
        let replication_password = secret(
            cx,
            "postgresql.replication",
            replication.password,
            replication.password_file,
        )?
        .ok_or_else(|| {
            cx.invalid(
                "postgresql.replication.password",
                "required: set postgresql.replication.password, \
                 postgresql.replication.password_file or PGHA_POSTGRESQL_REPLICATION_PASSWORD",
            )
        })?;

        Ok(PostgresConfig {
            data_dir,
            bin_dir,
            listen_addresses,
            port,
            advertise_host,
            advertise_port: self.advertise_port.map_or(port, |p| p.0),
            socket_dir,
            os_user: non_empty(
                cx,
                "postgresql.os_user",
                self.os_user.unwrap_or_else(|| DEFAULT_OS_USER.to_owned()),
            )?,
            superuser: Credentials {
                username: non_empty(
                    cx,
                    "postgresql.superuser.username",
                    superuser
                        .username
                        .unwrap_or_else(|| DEFAULT_SUPERUSER.to_owned()),
                )?,
                password: secret(
                    cx,
                    "postgresql.superuser",
                    superuser.password,
                    superuser.password_file,
                )?,
            },
            replication: Credentials {
                username: non_empty(
                    cx,
                    "postgresql.replication.username",
                    replication
                        .username
                        .unwrap_or_else(|| DEFAULT_REPLICATION_USER.to_owned()),
                )?,
                password: Some(replication_password),
            },
            parameters,
            pg_hba: self.pg_hba,
            tls: crate::tls::PgTls::default(),
        })
    }
}

/// One entry of Postgres' `listen_addresses`: `*` (every address of
/// `family`), an IP literal (brackets dropped) or a host name.
fn listen_address(text: &str, family: IpFamily) -> Result<String, String> {
    let trimmed = text.trim();
    if trimmed == "*" {
        return Ok(family.postgres_wildcard().to_owned());
    }
    let literal = trimmed
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(trimmed);
    if let Ok(ip) = literal.parse::<std::net::IpAddr>() {
        if !family.allows(ip) {
            return Err(format!(
                "{trimmed:?} is not an address of ip_family {:?}",
                family.as_str()
            ));
        }
        return Ok(ip.to_string());
    }
    if crate::net::is_host_name(trimmed) && !trimmed.contains(':') {
        return Ok(trimmed.to_owned());
    }
    Err(format!(
        "expected \"*\", an IP address (\"::\", \"fdaa::2\", \"0.0.0.0\") or a host name, got {text:?}"
    ))
}

/// A host name or IP address; an IPv6 literal loses its brackets.
fn advertise_host(text: &str) -> Result<String, String> {
    let trimmed = text.trim();
    let invalid = || format!("expected a host name or an IP address (no port), got {text:?}");
    if let Some(inner) = trimmed.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(|_| inner.to_owned())
            .map_err(|_| invalid());
    }
    if trimmed.contains(':') {
        return trimmed
            .parse::<Ipv6Addr>()
            .map(|_| trimmed.to_owned())
            .map_err(|_| invalid());
    }
    let ok = !trimmed.is_empty()
        && trimmed
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(trimmed.to_owned())
    } else {
        Err(invalid())
    }
}

/// The PostgreSQL server binaries: `pg_config --bindir` when it names a
/// directory holding `postgres`, else the newest
/// `/usr/lib/postgresql/<version>/bin` that does (Debian's layout; a
/// client-only package installs a `bin` without `postgres`).
fn detect_bin_dir() -> Option<PathBuf> {
    pg_config_bindir()
        .filter(|dir| dir.join("postgres").is_file())
        .or_else(|| newest_versioned_bin_dir(Path::new("/usr/lib/postgresql")))
}

fn pg_config_bindir() -> Option<PathBuf> {
    let output = Command::new("pg_config").arg("--bindir").output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let dir = text.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// `<root>/<version>/bin` of the highest version (compared numerically, so
/// 10 > 9.6) whose `bin` holds `postgres`.
fn newest_versioned_bin_dir(root: &Path) -> Option<PathBuf> {
    std::fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<_>>>()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

impl FileApi {
    fn validate(self, cx: &Context<'_>, family: IpFamily) -> Result<ApiConfig, ConfigError> {
        let listen = match self.listen {
            Some(list) => list
                .0
                .iter()
                // A string may hold several, as in postgresql.conf.
                .flat_map(|entry| entry.split(','))
                .enumerate()
                .map(|(index, text)| {
                    let key = format!("api.listen[{index}]");
                    let addr = text.trim().parse::<SocketAddr>().map_err(|_| {
                        cx.invalid(
                            &key,
                            format!(
                                "expected an address like \"[::]:8008\", \"[fdaa::2]:8008\" or \"0.0.0.0:8008\", got {text:?}"
                            ),
                        )
                    })?;
                    if family.allows(addr.ip()) {
                        Ok(addr)
                    } else {
                        Err(cx.invalid(
                            &key,
                            format!(
                                "{text:?} is not an address of ip_family {:?}",
                                family.as_str()
                            ),
                        ))
                    }
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => vec![SocketAddr::new(family.wildcard(), DEFAULT_API_PORT)],
        };
        if listen.is_empty() {
            return Err(cx.invalid(
                "api.listen",
                "expected at least one address, like \"[::]:8008\"",
            ));
        }
        let url = self.advertise_url.trim().trim_end_matches('/');
        if let Err(why) = HttpUrl::parse(url) {
            return Err(cx.invalid(
                "api.advertise_url",
                format!(
                    "expected a URL like \"http://n1.internal:8008\" or \"http://[fdaa::2]:8008\" ({why}), got {:?}",
                    self.advertise_url
                ),
            ));
        }
        if self.username.is_some() != self.password.is_some() {
            return Err(cx.invalid(
                "api.username",
                "api.username and api.password go together: set both or neither",
            ));
        }
        for (key, value) in [("api.token", &self.token), ("api.password", &self.password)] {
            if value.as_deref().is_some_and(str::is_empty) {
                return Err(cx.invalid(key, "must not be empty"));
            }
        }
        Ok(ApiConfig {
            listen,
            advertise_url: url.to_owned(),
            token: self.token.map(Secret::new),
            username: self.username,
            password: self.password.map(Secret::new),
        })
    }
}

impl FileTiming {
    fn validate(self, cx: &Context<'_>) -> Result<Timing, ConfigError> {
        let ttl = self.ttl.map_or(DEFAULT_TTL, |d| d.0);
        let loop_wait = self.loop_wait.map_or(DEFAULT_LOOP_WAIT, |d| d.0);
        let retry_timeout = self.retry_timeout.map_or(DEFAULT_RETRY_TIMEOUT, |d| d.0);
        let show = |d: Duration| humantime::format_duration(d).to_string();
        if ttl < MIN_TTL {
            return Err(cx.invalid(
                "timing.ttl",
                format!("must be at least {}, got {}", show(MIN_TTL), show(ttl)),
            ));
        }
        if ttl.subsec_nanos() != 0 {
            return Err(cx.invalid(
                "timing.ttl",
                format!(
                    "must be whole seconds (etcd lease TTLs are), got {}",
                    show(ttl)
                ),
            ));
        }
        if loop_wait.is_zero() {
            return Err(cx.invalid("timing.loop_wait", "must be more than 0s"));
        }
        if retry_timeout.is_zero() {
            return Err(cx.invalid("timing.retry_timeout", "must be more than 0s"));
        }
        // Checked: absurd durations like "1000000y" must fail, not overflow.
        let needed = retry_timeout
            .checked_mul(2)
            .and_then(|d| d.checked_add(loop_wait))
            .unwrap_or(Duration::MAX);
        if needed > ttl {
            return Err(cx.invalid(
                "timing",
                format!(
                    "loop_wait ({}) + 2 × retry_timeout ({}) = {} must not exceed ttl ({})",
                    show(loop_wait),
                    show(retry_timeout),
                    show(needed),
                    show(ttl)
                ),
            ));
        }
        let shutdown_timeout = self
            .shutdown_timeout
            .map_or(DEFAULT_SHUTDOWN_TIMEOUT, |d| d.0);
        if shutdown_timeout.is_zero() {
            return Err(cx.invalid("timing.shutdown_timeout", "must be more than 0s"));
        }
        Ok(Timing {
            ttl,
            loop_wait,
            retry_timeout,
            shutdown_timeout,
        })
    }
}

impl FileCluster {
    fn validate(self, cx: &Context<'_>) -> Result<ClusterDefaults, ConfigError> {
        let synchronous_node_count = self.synchronous_node_count.unwrap_or(1);
        if synchronous_node_count == 0 {
            return Err(cx.invalid("cluster.synchronous_node_count", "expected at least 1"));
        }
        Ok(ClusterDefaults {
            failsafe_mode: self.failsafe_mode.unwrap_or(false),
            synchronous_mode: self.synchronous_mode.unwrap_or_default(),
            synchronous_node_count,
            maximum_lag_on_failover: self
                .maximum_lag_on_failover
                .map_or(DEFAULT_MAXIMUM_LAG_ON_FAILOVER, |b| b.0),
            primary_start_timeout: self
                .primary_start_timeout
                .map_or(DEFAULT_PRIMARY_START_TIMEOUT, |d| d.0),
            member_slot_grace: self
                .member_slot_grace
                .map_or(DEFAULT_MEMBER_SLOT_GRACE, |d| d.0),
            primary_region: self.primary_region.filter(|r| !r.is_empty()),
            auto_reinit: self.auto_reinit.unwrap_or(false),
        })
    }
}

impl FileTags {
    fn validate(self) -> Tags {
        Tags {
            nofailover: self.nofailover.unwrap_or(false),
            noloadbalance: self.noloadbalance.unwrap_or(false),
            nosync: self.nosync.unwrap_or(false),
            failover_priority: self.failover_priority.unwrap_or(DEFAULT_FAILOVER_PRIORITY),
            extra: self.extra,
        }
    }
}

impl FileLog {
    fn validate(self, cx: &Context<'_>) -> Result<LogConfig, ConfigError> {
        let level = non_empty(
            cx,
            "log.level",
            self.level.unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned()),
        )?;
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&level) {
            return Err(cx.invalid(
                "log.level",
                format!(
                    "expected a filter like \"info\" or \"info,pgha=debug\", got {level:?} ({err})"
                ),
            ));
        }
        Ok(LogConfig {
            format: self.format.map_or(LogFormat::Text, |f| f.0),
            level,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = "/etc/pgha.toml";

    /// The smallest valid file; sections are present (empty) so tests can
    /// insert keys under them.
    fn minimal() -> String {
        format!(
            r#"scope = "demo"
name = "n1"

[etcd]
endpoints = ["127.0.0.1:2379"]

[postgresql]
data_dir = "/var/lib/pgha/n1/data"
bin_dir = '{}'
advertise_host = "n1.internal"

[postgresql.superuser]

[postgresql.replication]
password = "repl-secret"

[api]
advertise_url = "http://n1.internal:8008"

[timing]

[cluster]

[tags]

[log]
"#,
            std::env::temp_dir().display()
        )
    }

    /// `minimal()` with `line` added under `[section]` ("" = top level).
    fn with(section: &str, line: &str) -> String {
        add(&minimal(), section, line)
    }

    fn add(text: &str, section: &str, line: &str) -> String {
        if section.is_empty() {
            return format!("{line}\n{text}");
        }
        let header = format!("[{section}]\n");
        assert!(text.contains(&header), "no section {section}");
        text.replacen(&header, &format!("{header}{line}\n"), 1)
    }

    /// `minimal()` without the line starting with `prefix`.
    fn without(prefix: &str) -> String {
        let text = minimal();
        assert!(
            text.lines().any(|l| l.starts_with(prefix)),
            "no line {prefix}"
        );
        text.lines()
            .filter(|l| !l.starts_with(prefix))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    fn env(vars: &[(&str, &str)]) -> BTreeMap<String, String> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        parse_env(text, &[])
    }

    fn parse_env(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new(SOURCE), &env(vars))
    }

    #[track_caller]
    fn expect_err(result: Result<Config, ConfigError>) -> ConfigError {
        match result {
            Ok(config) => panic!("expected an error, got {config:#?}"),
            Err(err) => err,
        }
    }

    /// The error is about `key`, and its message names it after the file.
    #[track_caller]
    fn assert_key(result: Result<Config, ConfigError>, key: &str) -> String {
        let err = expect_err(result);
        let message = err.to_string();
        assert_eq!(err.key(), Some(key), "{message}");
        assert!(
            message.starts_with(&format!("{SOURCE}: {key}: ")),
            "{message}"
        );
        message
    }

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
    fn namespace_is_normalised() {
        for (namespace, prefix) in [
            ("/pgha", "/pgha/demo/"),
            ("pgha", "/pgha/demo/"),
            ("/pgha/", "/pgha/demo/"),
            ("//a//b/", "/a/b/demo/"),
            ("/", "/demo/"),
            ("", "/demo/"),
        ] {
            let config = parse(&with("etcd", &format!("namespace = {namespace:?}"))).unwrap();
            assert_eq!(config.etcd.prefix, prefix, "namespace {namespace:?}");
        }
    }

    #[test]
    fn env_overrides_keys_of_every_type() {
        let config = parse_env(
            &minimal(),
            &[
                ("PGHA_SCOPE", "prod"),
                (
                    "PGHA_ETCD_ENDPOINTS",
                    "http://10.0.0.1:2379, 10.0.0.2:2379,",
                ),
                ("PGHA_ETCD_DIAL_TIMEOUT", "5s"),
                ("PGHA_POSTGRESQL_DATA_DIR", "/data/pg"),
                ("PGHA_POSTGRESQL_PORT", "5433"),
                (
                    "PGHA_POSTGRESQL_PG_HBA",
                    "host a,b all 10.0.0.0/8 md5\nlocal all all peer\n",
                ),
                ("PGHA_POSTGRESQL_PARAMETERS_SHARED_BUFFERS", "256MB"),
                ("PGHA_POSTGRESQL_PARAMETERS_MAX_CONNECTIONS", "200"),
                ("PGHA_POSTGRESQL_REPLICATION_PASSWORD", "from-env"),
                ("PGHA_API_LISTEN", "127.0.0.1:8008,[::1]:8008"),
                ("PGHA_API_ADVERTISE_URL", "https://n1.example:8443/"),
                ("PGHA_TIMING_TTL", "20s"),
                ("PGHA_CLUSTER_MAXIMUM_LAG_ON_FAILOVER", "1048576"),
                ("PGHA_TAGS_NOFAILOVER", "on"),
                ("PGHA_TAGS_NOSYNC", "1"),
                ("PGHA_TAGS_NOLOADBALANCE", "false"),
                ("PGHA_TAGS_FAILOVER_PRIORITY", "7"),
                ("PGHA_TAGS_EXTRA_ZONE", "b"),
                ("PGHA_LOG_FORMAT", "json"),
                // Read by the CLI, not configuration keys.
                ("PGHA_CONFIG", "/elsewhere.toml"),
                ("PGHA_API_URL", "http://x:8008"),
                // Not ours.
                ("PATH", "/usr/bin"),
            ],
        )
        .unwrap();
        assert_eq!(config.scope, "prod");
        assert_eq!(config.etcd.prefix, "/pgha/prod/");
        assert_eq!(
            config.etcd.endpoints,
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(config.etcd.dial_timeout, Duration::from_secs(5));
        let pg = &config.postgresql;
        assert_eq!(pg.data_dir, Path::new("/data/pg"));
        assert_eq!(pg.socket_dir, Path::new("/data"));
        assert_eq!((pg.port, pg.advertise_port), (5433, 5433));
        assert_eq!(
            pg.pg_hba,
            ["host a,b all 10.0.0.0/8 md5", "local all all peer"]
        );
        assert_eq!(pg.parameters["shared_buffers"], "256MB");
        assert_eq!(pg.parameters["max_connections"], "200");
        assert_eq!(
            pg.replication.password.as_ref().map(Secret::expose),
            Some("from-env")
        );
        assert_eq!(
            config.api.listen,
            [
                "127.0.0.1:8008".parse::<SocketAddr>().unwrap(),
                "[::1]:8008".parse().unwrap()
            ]
        );
        assert_eq!(config.api.advertise_url, "https://n1.example:8443");
        assert_eq!(config.timing.ttl, Duration::from_secs(20));
        assert_eq!(config.cluster.maximum_lag_on_failover, 1 << 20);
        assert!(config.tags.nofailover && config.tags.nosync && !config.tags.noloadbalance);
        assert_eq!(config.tags.failover_priority, 7);
        assert_eq!(config.tags.extra["zone"], "b");
        assert_eq!(config.log.format, LogFormat::Json);
    }

    #[test]
    fn env_can_supply_a_section_missing_from_the_file() {
        let text = without("advertise_url").replace("[api]\n", "");
        let config = parse_env(&text, &[("PGHA_API_ADVERTISE_URL", "http://n1:8008")]).unwrap();
        assert_eq!(config.api.advertise_url, "http://n1:8008");
    }

    #[test]
    fn env_password_replaces_password_file_of_the_file() {
        let text = with(
            "postgresql.superuser",
            "password_file = \"/nonexistent/pw\"",
        );
        let config = parse_env(&text, &[("PGHA_POSTGRESQL_SUPERUSER_PASSWORD", "env-pw")]).unwrap();
        assert_eq!(
            config
                .postgresql
                .superuser
                .password
                .as_ref()
                .map(Secret::expose),
            Some("env-pw")
        );
        // Both from the environment is still a conflict.
        let err = parse_env(
            &minimal(),
            &[
                ("PGHA_POSTGRESQL_SUPERUSER_PASSWORD", "a"),
                ("PGHA_POSTGRESQL_SUPERUSER_PASSWORD_FILE", "/pw"),
            ],
        );
        let message = assert_key_env(
            err,
            "postgresql.superuser.password_file",
            "PGHA_POSTGRESQL_SUPERUSER_PASSWORD_FILE",
        );
        assert!(message.contains("set only one"), "{message}");
    }

    /// The error is about `key`, set by `var`, and says so.
    #[track_caller]
    fn assert_key_env(result: Result<Config, ConfigError>, key: &str, var: &str) -> String {
        let err = expect_err(result);
        let message = err.to_string();
        assert_eq!(err.key(), Some(key), "{message}");
        assert_eq!(err.env_var(), Some(var), "{message}");
        assert!(
            message.starts_with(&format!("{SOURCE}: {var} ({key}): ")),
            "{message}"
        );
        message
    }

    #[test]
    fn bad_env_values_name_the_variable_and_the_key() {
        let message = assert_key_env(
            parse_env(&minimal(), &[("PGHA_POSTGRESQL_PORT", "abc")]),
            "postgresql.port",
            "PGHA_POSTGRESQL_PORT",
        );
        assert!(
            message.ends_with(": expected an integer 1..65535, got \"abc\""),
            "{message}"
        );
        assert_key_env(
            parse_env(&minimal(), &[("PGHA_TIMING_TTL", "ten")]),
            "timing.ttl",
            "PGHA_TIMING_TTL",
        );
        assert_key_env(
            parse_env(&minimal(), &[("PGHA_TAGS_NOSYNC", "maybe")]),
            "tags.nosync",
            "PGHA_TAGS_NOSYNC",
        );
        assert_key_env(
            parse_env(&minimal(), &[("PGHA_API_LISTEN", "127.0.0.1:8008,nowhere")]),
            "api.listen[1]",
            "PGHA_API_LISTEN",
        );
        assert_key_env(
            parse_env(&minimal(), &[("PGHA_ETCD_ENDPOINTS", "")]),
            "etcd.endpoints",
            "PGHA_ETCD_ENDPOINTS",
        );
    }

    #[test]
    fn unknown_env_var_is_an_error_naming_it() {
        for var in [
            "PGHA_TIMING_TTLL",
            "PGHA_POSTGRESQL",
            "PGHA_POSTGRESQL_PARAMETERS_",
            "PGHA_",
        ] {
            let err = expect_err(parse_env(&minimal(), &[(var, "x")]));
            assert_eq!(err.env_var(), Some(var));
            assert_eq!(err.key(), None);
            assert!(
                err.to_string()
                    .starts_with(&format!("{SOURCE}: {var}: unknown environment variable")),
                "{err}"
            );
        }
        // Lower case is not ours.
        parse_env(&minimal(), &[("pgha_timing_ttll", "x")]).unwrap();
    }

    #[test]
    fn every_key_has_a_distinct_env_name_that_the_file_struct_accepts() {
        let mut names: Vec<String> = KEYS.iter().map(|(key, _)| env_name(key)).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), KEYS.len());
        for &(key, kind) in KEYS {
            let var = env_name(key);
            assert_eq!(env_key(&var), Some((key.to_owned(), kind)));
            assert!(!ENV_NOT_CONFIG.contains(&var.as_str()));
            // Whatever else may be wrong with "x", the key itself is known.
            if let Err(err) = parse_env(&minimal(), &[(&var, "x")]) {
                assert!(!err.to_string().contains("unknown"), "{var}: {err}");
            }
        }
    }

    #[test]
    fn example_file_is_valid_and_documents_every_key() {
        let text = include_str!("../config/pgha.example.toml");
        let bin_dir = std::env::temp_dir();
        let config = parse_env(
            text,
            &[("PGHA_POSTGRESQL_BIN_DIR", bin_dir.to_str().unwrap())],
        )
        .unwrap();
        assert_eq!(
            (config.scope.as_str(), config.name.as_str()),
            ("demo", "n1")
        );
        assert_eq!(config.etcd.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(
            config.postgresql.data_dir,
            Path::new("/var/lib/pgha/n1/data")
        );
        assert_eq!(config.postgresql.port, 5432);
        assert_eq!(
            config.api.listen,
            ["127.0.0.1:8008".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            config
                .postgresql
                .replication
                .password
                .as_ref()
                .map(Secret::expose),
            Some("change-me")
        );
        for &(key, _) in KEYS {
            let leaf = key.rsplit('.').next().unwrap();
            assert!(text.contains(&format!("{leaf} = ")), "example lacks {key}");
            assert!(
                text.contains(&env_name(key)),
                "example lacks {}",
                env_name(key)
            );
        }
        for table in FREE_TABLES {
            assert!(
                text.contains(&format!("{}_<NAME>", env_name(table))),
                "{table}"
            );
        }
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
             listen_addresses, port, advertise_host, advertise_port, socket_dir, os_user, \
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
                without("advertise_url"),
                "api.advertise_url",
                "required key missing",
            ),
            (
                without("password"),
                "postgresql.replication.password",
                "set postgresql.replication.password, postgresql.replication.password_file \
                 or PGHA_POSTGRESQL_REPLICATION_PASSWORD",
            ),
            (
                minimal().replace("[api]\nadvertise_url = \"http://n1.internal:8008\"\n", ""),
                "api",
                "required section [api] missing",
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
    fn socket_path_limit_is_inclusive() {
        // "/<dir>/.s.PGSQL.5432" is len + 15 bytes.
        let fits = format!("socket_dir = \"/{}\"", "s".repeat(MAX_SOCKET_PATH - 15));
        parse(&with("postgresql", &fits)).unwrap();
        let too_long = format!("socket_dir = \"/{}\"", "s".repeat(MAX_SOCKET_PATH - 14));
        assert_key(
            parse(&with("postgresql", &too_long)),
            "postgresql.socket_dir",
        );
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
        let err =
            Config::load_with_env(Path::new("/nonexistent/pgha.toml"), &env(&[])).unwrap_err();
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
    fn parse_bytes_accepts_numbers_and_postgres_units() {
        for (text, bytes) in [
            ("0", 0),
            ("1048576", 1 << 20),
            (" 42 ", 42),
            ("10B", 10),
            ("512kB", 512 << 10),
            ("512KB", 512 << 10),
            ("2KiB", 2 << 10),
            ("16MB", 16 << 20),
            ("16mb", 16 << 20),
            ("1 MiB", 1 << 20),
            ("1GB", 1 << 30),
            ("3GiB", 3 << 30),
            ("2TB", 2 << 40),
        ] {
            assert_eq!(parse_bytes(text), Ok(bytes), "{text:?}");
        }
        for text in ["", "MB", "-1", "1.5MB", "16 XB", "16MBs", "abc", "1 2"] {
            let err = parse_bytes(text).unwrap_err();
            assert!(err.starts_with("expected a size like"), "{text:?}: {err}");
        }
        assert!(parse_bytes("99999999999999999999")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_bytes("99999999999TB")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn newest_postgres_bin_dir_is_chosen_numerically() {
        let root = tempfile::tempdir().unwrap();
        for (version, has_postgres) in [
            ("9.6", true),
            ("10", true),
            ("15", true),
            ("16", false),
            ("misc", true),
        ] {
            let bin = root.path().join(version).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            if has_postgres {
                std::fs::write(bin.join("postgres"), "").unwrap();
            }
        }
        // 16 holds only client programs.
        assert_eq!(
            newest_versioned_bin_dir(root.path()),
            Some(root.path().join("15").join("bin"))
        );
        assert_eq!(newest_versioned_bin_dir(&root.path().join("none")), None);
    }

    #[test]
    fn summary_is_one_line() {
        let summary = parse(&minimal()).unwrap().summary();
        assert!(!summary.contains('\n'));
        assert!(summary.starts_with("scope=demo name=n1 "), "{summary}");
    }
}
