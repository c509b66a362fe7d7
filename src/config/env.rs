//! `PGHA_<SECTION>_<KEY>` overrides: applied to the parsed TOML table before
//! deserialization, so an override is checked exactly like the file's value.
//! Each section lists its own keys; this module only joins the lists.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::path::Path;

use toml::Value;

use super::ConfigError;

const ENV_PREFIX: &str = "PGHA_";
/// `PGHA_` variables read by the CLI, not configuration keys.
const ENV_NOT_CONFIG: &[&str] = &["PGHA_CONFIG", "PGHA_API_URL"];

/// Where `PGHA_*` overrides come from: the process environment in
/// production, a map in tests.
pub trait EnvSource {
    /// All variables: those starting with `PGHA_` override keys, a few of
    /// the platform's (`FLY_MACHINE_ID`, ...) give defaults to others.
    fn vars(&self) -> Vec<(String, String)>;

    /// The machine's hostname, the last default of the node's name. A map
    /// of variables has none.
    fn hostname(&self) -> Option<String> {
        None
    }
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

    fn hostname(&self) -> Option<String> {
        nix::unistd::gethostname().ok()?.into_string().ok()
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
pub(super) enum EnvKind {
    Text,
    Integer,
    Boolean,
    /// Comma-separated.
    List,
    /// One entry per line (pg_hba lines contain commas).
    Lines,
}

/// Every leaf key of the file, section by section. `PGHA_<KEY>`
/// (upper-cased, `.` → `_`) overrides it; matching against these lists
/// resolves the `_` ambiguity.
const SECTION_KEYS: &[&[(&str, EnvKind)]] = &[
    super::loader::KEYS,
    super::etcd::KEYS,
    super::postgres::KEYS,
    super::api::KEYS,
    super::timing::KEYS,
    super::cluster::KEYS,
    super::tags::KEYS,
    super::log::KEYS,
    super::router::KEYS,
    super::backup::KEYS,
    super::tls::KEYS,
];

/// Every leaf key of the file with how its variable is read.
pub(super) fn keys() -> impl Iterator<Item = (&'static str, EnvKind)> {
    SECTION_KEYS
        .iter()
        .flat_map(|section| section.iter().copied())
}

/// Tables of free-form entries: `PGHA_<TABLE>_<ENTRY>` sets
/// `<table>.<entry>` with the entry name lower-cased.
const FREE_TABLES: &[&str] = &["postgresql.parameters", "tags.extra"];

fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase().replace('.', "_"))
}

/// The key a `PGHA_*` variable overrides, or `None` if it names no key.
fn env_key(var: &str) -> Option<(String, EnvKind)> {
    if let Some((key, kind)) = keys().find(|(key, _)| env_name(key) == var) {
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
pub(super) fn apply_env(
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::config::testing::*;
    use crate::config::{LogFormat, Secret};

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
        let mut names: Vec<String> = keys().map(|(key, _)| env_name(key)).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), keys().count());
        for (key, kind) in keys() {
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
        let text = include_str!("../../config/pgha.example.toml");
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
        for (key, _) in keys() {
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
}
