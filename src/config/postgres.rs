//! The `[postgresql]` section: data and binary directories, addresses,
//! socket, users and passwords, extra parameters and pg_hba lines.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use super::context::{non_empty, secret, Context};
use super::env::EnvKind;
use super::identity::{self, Defaulted, Platform};
use super::values::{OneOrMany, ParameterValue, Port};
use super::{ConfigError, Secret};
use crate::net::IpFamily;

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
    /// WAL archiving through pgBackRest (from `[backup]`; filled in after
    /// it is validated), `None` while backups are off.
    pub archiving: Option<Archiving>,
    /// Where a replica with an empty data directory copies it from.
    pub clone_from: CloneFrom,
}

/// `postgresql.clone_from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CloneFrom {
    /// pg_basebackup from the leader.
    #[default]
    Primary,
    /// The newest backup in the repository (`[backup]`), then WAL from the
    /// archive and streaming: the primary serves only what is newer. Falls
    /// back to pg_basebackup when the repository has no usable backup.
    Backup,
}

/// The postgresql.conf side of WAL archiving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archiving {
    /// `archive_command`: pushes a segment (`%p`) to the repository.
    pub archive_command: String,
    /// `restore_command`: fetches `%f` into `%p` from the repository.
    pub restore_command: String,
    pub archive_timeout: std::time::Duration,
}

const DEFAULT_PORT: u16 = 5432;
const DEFAULT_OS_USER: &str = "postgres";
const DEFAULT_SUPERUSER: &str = "postgres";
const DEFAULT_REPLICATION_USER: &str = "replicator";

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

pub(super) const KEYS: &[(&str, EnvKind)] = &[
    ("postgresql.data_dir", EnvKind::Text),
    ("postgresql.bin_dir", EnvKind::Text),
    ("postgresql.listen_addresses", EnvKind::Text),
    ("postgresql.port", EnvKind::Integer),
    ("postgresql.advertise_host", EnvKind::Text),
    ("postgresql.advertise_port", EnvKind::Integer),
    ("postgresql.socket_dir", EnvKind::Text),
    ("postgresql.os_user", EnvKind::Text),
    ("postgresql.clone_from", EnvKind::Text),
    ("postgresql.pg_hba", EnvKind::Lines),
    ("postgresql.superuser.username", EnvKind::Text),
    ("postgresql.superuser.password", EnvKind::Text),
    ("postgresql.superuser.password_file", EnvKind::Text),
    ("postgresql.replication.username", EnvKind::Text),
    ("postgresql.replication.password", EnvKind::Text),
    ("postgresql.replication.password_file", EnvKind::Text),
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilePostgres {
    data_dir: String,
    bin_dir: Option<String>,
    listen_addresses: Option<OneOrMany>,
    port: Option<Port>,
    advertise_host: Option<String>,
    advertise_port: Option<Port>,
    socket_dir: Option<String>,
    os_user: Option<String>,
    clone_from: Option<String>,
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
pub(super) struct FileCredentials {
    username: Option<String>,
    password: Option<String>,
    password_file: Option<String>,
}

impl FilePostgres {
    /// `platform` gives `advertise_host` when the file leaves it out (noted
    /// in `defaulted`).
    pub(super) fn validate(
        self,
        cx: &Context<'_>,
        family: IpFamily,
        platform: &Platform,
        defaulted: &mut Vec<Defaulted>,
    ) -> Result<PostgresConfig, ConfigError> {
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
        let key = "postgresql.advertise_host";
        let advertise_host = match &self.advertise_host {
            Some(text) => advertise_host(text).map_err(|msg| cx.invalid(key, msg))?,
            None => {
                let (host, origin) =
                    identity::advertise_host(platform).map_err(|p| cx.problem(key, p))?;
                defaulted.push(Defaulted {
                    key,
                    value: host.clone(),
                    origin,
                });
                host
            }
        };

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
            archiving: None,
            clone_from: match self.clone_from.as_deref().map(str::trim) {
                None | Some("primary") => CloneFrom::Primary,
                Some("backup") => CloneFrom::Backup,
                Some(other) => {
                    return Err(cx.invalid(
                        "postgresql.clone_from",
                        format!("expected \"primary\" or \"backup\", got {other:?}"),
                    ))
                }
            },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;

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
}
