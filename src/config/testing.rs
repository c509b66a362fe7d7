//! Helpers of the configuration tests: a minimal valid file, edits of it,
//! and assertions that an error names the file, the key and the variable.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Config, ConfigError, EnvSource};

pub(super) const SOURCE: &str = "/etc/pgha.toml";

/// The smallest valid file; sections are present (empty) so tests can
/// insert keys under them.
pub(super) fn minimal() -> String {
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
pub(super) fn with(section: &str, line: &str) -> String {
    add(&minimal(), section, line)
}

pub(super) fn add(text: &str, section: &str, line: &str) -> String {
    if section.is_empty() {
        return format!("{line}\n{text}");
    }
    let header = format!("[{section}]\n");
    assert!(text.contains(&header), "no section {section}");
    text.replacen(&header, &format!("{header}{line}\n"), 1)
}

/// `minimal()` without the line starting with `prefix`.
pub(super) fn without(prefix: &str) -> String {
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

pub(super) fn env(vars: &[(&str, &str)]) -> BTreeMap<String, String> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
    parse_env(text, &[])
}

pub(super) fn parse_env(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(SOURCE), &env(vars))
}

/// An environment with a hostname, as a process has (a map has none).
pub(super) struct WithHostname(pub BTreeMap<String, String>, pub &'static str);

impl EnvSource for WithHostname {
    fn vars(&self) -> Vec<(String, String)> {
        self.0.vars()
    }
    fn hostname(&self) -> Option<String> {
        Some(self.1.to_owned())
    }
}

/// `text` on a machine whose hostname is `hostname`.
pub(super) fn parse_on_host(
    text: &str,
    vars: &[(&str, &str)],
    hostname: &'static str,
) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(SOURCE), &WithHostname(env(vars), hostname))
}

#[track_caller]
pub(super) fn expect_err(result: Result<Config, ConfigError>) -> ConfigError {
    match result {
        Ok(config) => panic!("expected an error, got {config:#?}"),
        Err(err) => err,
    }
}

/// The error is about `key`, and its message names it after the file.
#[track_caller]
pub(super) fn assert_key(result: Result<Config, ConfigError>, key: &str) -> String {
    let err = expect_err(result);
    let message = err.to_string();
    assert_eq!(err.key(), Some(key), "{message}");
    assert!(
        message.starts_with(&format!("{SOURCE}: {key}: ")),
        "{message}"
    );
    message
}

/// The error is about `key`, set by `var`, and says so.
#[track_caller]
pub(super) fn assert_key_env(result: Result<Config, ConfigError>, key: &str, var: &str) -> String {
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
